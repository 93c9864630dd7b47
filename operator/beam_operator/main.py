"""``beam operator``: configure Kopf, register the handlers, run.

Everything about Kopf's behaviour is set here, explicitly, rather than left to defaults
that change between releases: watch timeouts, the finalizer name, where handler progress
and the last handled spec are kept (annotations under ``beam.dev/``), which log lines
become Kubernetes Events, and standalone mode.

The dangerous part: Kopf's peering is not leader election, and this operator runs
standalone (the chart grants no peering RBAC and runs one replica with the Recreate
strategy). Two operators at once would both reconcile; that stays safe for money (every
credit is an idempotent ledger transaction) but would issue API keys twice.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import kopf
from prometheus_client import start_http_server

from beam.config import OperatorSettings
from beam.observability import configure_logging
from beam_operator.constants import ANNOTATION_PREFIX, EVENT_COMPONENT, FINALIZER
from beam_operator.context import MEMO_KEY, OperatorContext, open_runtime, runtime_settings
from beam_operator.handlers import apikey, customer, instance_labels, pricelist
from beam_operator.secrets import SecretStore

SETTINGS_MEMO_KEY = "beam_settings"
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


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    settings.peering.standalone = True
    settings.peering.mandatory = False
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
    configure_kopf(settings)
    operator_settings: OperatorSettings = memo[SETTINGS_MEMO_KEY]
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


def run() -> None:
    settings = OperatorSettings()
    configure_logging(settings.log_level)
    for handler in logging.getLogger().handlers:
        handler.addFilter(DropKopfInternals())
    # The chart's startup probe is a TCP check on this port: it opens before Kopf starts.
    # Liveness is Kopf's own endpoint (health_port), which fails when Kopf is stuck.
    start_http_server(settings.metrics_port)
    namespaces = list(settings.namespaces)
    log.info(
        "beam operator starting",
        extra={"namespaces": namespaces or "all", "metrics_port": settings.metrics_port},
    )
    kopf.run(
        registry=build_registry(settings),
        memo=kopf.Memo({SETTINGS_MEMO_KEY: settings}),
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=(
            f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
        ),
    )
