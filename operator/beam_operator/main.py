"""``beam operator``: configure Kopf, register the handlers, run.

Everything about Kopf's behaviour is set here, explicitly, rather than left to defaults
that change between releases: watch timeouts, the finalizer name, where handler progress
and the last handled spec are kept (annotations under ``beam.dev/``), which log lines
become Kubernetes Events, and peering.

Peering (``beam_operator.peering``): two operators can be alive at once (a RollingUpdate
rollout, a pod replaced while the old one is cut off by a partition, a second replica).
They join one Kopf peering, ``BEAM_PEERING_NAME`` (a ClusterKopfPeering when the operator
watches all namespaces, a KopfPeering in each watched namespace otherwise; the chart
creates it and grants the RBAC), each with a priority from its start time, so the one that
started last reconciles and the others wait, paused, until it is gone. Peering is
mandatory: without its objects the operator does not start. ``beam operator --standalone``
(``BEAM_STANDALONE``) runs without peering, for development: then nothing stops a second
operator, which stays safe for money (every credit is an idempotent ledger transaction) but
would issue API keys twice.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import kopf
from prometheus_client import start_http_server

from beam.config import OperatorSettings
from beam.observability import configure_logging
from beam_operator.constants import ANNOTATION_PREFIX, EVENT_COMPONENT, FINALIZER
from beam_operator.context import MEMO_KEY, OperatorContext, open_runtime, runtime_settings
from beam_operator.handlers import apikey, customer, instance_labels, pricelist
from beam_operator.peering import Peering, check_objects
from beam_operator.peering import configure as configure_peering
from beam_operator.secrets import SecretStore

SETTINGS_MEMO_KEY = "beam_settings"
PEERING_MEMO_KEY = "beam_peering"
# The API server ends each watch after this long and Kopf starts a new one; the client
# gives up a little later if the server went silent. An int: Kopf sends it verbatim as the
# watch's `timeoutSeconds`, which the API server parses as an integer.
WATCH_SERVER_TIMEOUT_SECONDS = 300
WATCH_CLIENT_TIMEOUT_SECONDS = 330.0
CONNECT_TIMEOUT_SECONDS = 10.0
REQUEST_TIMEOUT_SECONDS = 30.0
# Objects handled concurrently (Kopf's per-object workers).
WORKER_LIMIT = 64
# Start-up needs the stores (and migrates them); give them about two minutes.
STARTUP_RETRIES = 40
STARTUP_BACKOFF_SECONDS = 3.0

log = logging.getLogger(__name__)


class DropKopfInternals(logging.Filter):
    """Shape Kopf's per-object log records for the JSON log.

    - They carry Kopf's settings object (for posting Events), which the JSON formatter
      cannot serialize: dropped; ``k8s_ref`` (namespace, name, uid) stays.
    - A timer's success is logged at INFO on every pass (each object, every interval):
      dropped; its failures and everything else stay.

    Attached to the root handler, it runs after Kopf's own Event-posting handler, which
    sits on Kopf's logger and still sees the full record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("settings", None)
        record.__dict__.pop("k8s_skip", None)
        message = record.getMessage()
        routine = message.startswith("Timer '") and message.endswith("' succeeded.")
        return not (routine and record.levelno <= logging.INFO)


def configure_kopf(settings: kopf.OperatorSettings, peering: Peering | None = None) -> None:
    """Kopf's settings; ``peering`` None: standalone (no peering)."""
    configure_peering(settings, peering)
    settings.watching.server_timeout = WATCH_SERVER_TIMEOUT_SECONDS
    settings.watching.client_timeout = WATCH_CLIENT_TIMEOUT_SECONDS
    settings.watching.connect_timeout = CONNECT_TIMEOUT_SECONDS
    settings.networking.connect_timeout = CONNECT_TIMEOUT_SECONDS
    settings.networking.request_timeout = REQUEST_TIMEOUT_SECONDS
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    # Handler log lines become Events only from WARNING up (failures and retries); the
    # balance and key Events are posted explicitly with kopf.event.
    settings.posting.enabled = True
    settings.posting.loggers = True
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = EVENT_COMPONENT
    settings.posting.reporting_instance = socket.gethostname()[:128]
    settings.posting.event_name_prefix = "beam-"
    settings.queueing.worker_limit = WORKER_LIMIT


async def startup(settings: kopf.OperatorSettings, memo: Any, logger: Any, **_: Any) -> None:
    operator_settings: OperatorSettings = memo[SETTINGS_MEMO_KEY]
    peering: Peering | None = memo.get(PEERING_MEMO_KEY)
    configure_kopf(settings, peering)
    if peering is not None:  # Kopf would otherwise wait, paused and silent, for the object
        await check_objects(peering, operator_settings.namespaces)
    runtime = await open_runtime(runtime_settings(operator_settings))
    try:
        secrets = SecretStore.connect()
    except Exception:
        await runtime.stop()
        raise
    memo[MEMO_KEY] = OperatorContext(operator_settings, runtime, secrets)
    logger.info("stores connected; reconciling BeamCustomer, BeamApiKey, BeamPriceList")


async def cleanup(memo: Any, **_: Any) -> None:
    context = memo.get(MEMO_KEY)
    if isinstance(context, OperatorContext):
        context.secrets.close()
        await context.runtime.stop()


def build_registry(settings: OperatorSettings) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    # The same credentials as the Secret client: in-cluster ServiceAccount, else KUBECONFIG
    # (a bare registry has none of Kopf's implicit login handlers).
    kopf.on.login(id="kubernetes-client", registry=registry)(kopf.login_via_client)
    kopf.on.startup(
        id="connect-stores",
        registry=registry,
        retries=STARTUP_RETRIES,
        backoff=STARTUP_BACKOFF_SECONDS,
    )(startup)
    kopf.on.cleanup(id="disconnect-stores", registry=registry)(cleanup)
    interval = settings.status_interval_seconds
    labels = instance_labels(settings.operator_instance)
    customer.register(registry, status_interval_seconds=interval, labels=labels)
    apikey.register(registry, status_interval_seconds=interval, labels=labels)
    pricelist.register(registry, labels=labels)
    return registry


def run(*, standalone: bool = False) -> None:
    started_ns = time.time_ns()  # the peering priority: the operator that started last wins
    settings = OperatorSettings()
    if standalone:
        settings = settings.model_copy(update={"standalone": True})
    peering = Peering.of(settings, started_ns)
    configure_logging(settings.log_level)
    for handler in logging.getLogger().handlers:
        handler.addFilter(DropKopfInternals())
    # The chart's startup probe is a TCP check on this port: it opens before Kopf starts.
    # Liveness is Kopf's own endpoint (health_port), which fails when Kopf is stuck.
    start_http_server(settings.metrics_port)
    namespaces = list(settings.namespaces)
    log.info(
        "beam operator starting",
        extra={
            "namespaces": namespaces or "all",
            "metrics_port": settings.metrics_port,
            **(peering.describe() if peering is not None else {"peering": "standalone"}),
        },
    )
    kopf.run(
        registry=build_registry(settings),
        memo=kopf.Memo({SETTINGS_MEMO_KEY: settings, PEERING_MEMO_KEY: peering}),
        standalone=peering is None,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=(
            f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
        ),
    )
