"""Kopf's peering, configured so that of several operators exactly one reconciles.

Operators of one peering (a ClusterKopfPeering when the operator watches every namespace,
a KopfPeering of the same name in each watched namespace otherwise) write a keep-alive
into the object's status, with their priority, every ``lifetime`` minus 5-10 seconds. An
operator that sees a live peer of a higher priority pauses (no watches, no timers; handlers
already running finish) until that peer's keep-alive is gone: removed when it exits
cleanly, or expired ``lifetime`` seconds after the last one when it died or lost the API
server. Equal priorities pause everybody (Kopf's rule), so every operator needs its own.

The priority is the process's start time in microseconds since the epoch: the operator that
started last wins. That is the one the Deployment wants: a rollout's new pod, or the pod
that replaced one cut off by a partition. An older operator pauses as soon as it sees the
newer one's keep-alive, also when it comes back from a partition (it reads the peering
object again before anything else can pause it). Priorities only have to differ, so clocks
need not agree; below 2**53 (until the year 2255) they are exact in every JSON reader.

Peering is mandatory (unless standalone): Kopf then starts paused, and resumes only after
it has read the peering object and found no live peer above it. A missing CRD or object
would leave it paused forever, silently, so start-up checks that the objects exist and
fails (retried, then the process exits) with what to do.

This is not a lease, and the overlaps it leaves are short: when a newer operator starts,
the older one keeps going until it sees the newer keep-alive (milliseconds) and finishes
the handlers it is running; when the operator that was active is cut off, another takes
over ``lifetime`` seconds after its last keep-alive, and if it comes back it reclaims (it is
the newer) as soon as its next keep-alive lands. Reconciles are idempotent for money (each
credit has its ledger key), so an overlap can at worst issue a key twice.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from beam.config import OperatorSettings
from beam_operator.constants import KUBE_REQUEST_TIMEOUT_SECONDS

GROUP = "kopf.dev"
VERSION = "v1"
CLUSTER_PLURAL = "clusterkopfpeerings"
NAMESPACED_PLURAL = "kopfpeerings"
# Priorities stay below this (exact in every JSON reader, float64) until the year 2255.
PRIORITY_LIMIT = 2**53
_NAMESPACE_PATTERN_CHARS = frozenset("*?[]!,")


class PeeringUnusable(Exception):
    """The peering CRD or object is missing or unreadable: Kopf would wait, paused, forever."""


def priority_for(started_ns: int) -> int:
    """The peering priority of a process that started at ``started_ns`` (``time.time_ns()``):
    its start in microseconds, so the later, the higher."""
    priority = started_ns // 1000
    assert 0 < priority < PRIORITY_LIMIT
    return priority


@dataclass(frozen=True, slots=True)
class Peering:
    name: str
    clusterwide: bool
    priority: int
    lifetime_seconds: int

    @classmethod
    def of(cls, settings: OperatorSettings, started_ns: int) -> Peering | None:
        """The peering of this process, or None when it runs standalone."""
        if settings.standalone:
            return None
        return cls(
            name=settings.peering_name,
            clusterwide=not settings.namespaces,
            priority=priority_for(started_ns),
            lifetime_seconds=settings.peering_lifetime_seconds,
        )

    @property
    def kind(self) -> str:
        return "ClusterKopfPeering" if self.clusterwide else "KopfPeering"

    def describe(self) -> dict[str, Any]:
        return {
            "peering": f"{self.kind}/{self.name}",
            "peering_priority": self.priority,
            "peering_lifetime_seconds": self.lifetime_seconds,
        }


def configure(settings: kopf.OperatorSettings, peering: Peering | None) -> None:
    """Kopf's peering settings: mandatory peering under ``peering``, else standalone."""
    if peering is None:
        settings.peering.standalone = True
        settings.peering.mandatory = False
        return
    settings.peering.standalone = False
    settings.peering.mandatory = True
    settings.peering.name = peering.name
    settings.peering.clusterwide = peering.clusterwide
    settings.peering.priority = peering.priority
    settings.peering.lifetime = peering.lifetime_seconds
    settings.peering.stealth = True  # keep-alives are not logged; pauses and resumes are


def _api_client() -> Any:
    """In-cluster ServiceAccount first, else KUBECONFIG: the order of Kopf's
    ``login_via_client`` and of the Secret client, so all act as the same identity."""
    try:
        configuration = client.Configuration()
        config.load_incluster_config(configuration)  # type: ignore[no-untyped-call]
        return client.ApiClient(configuration)
    except config.ConfigException:
        kubeconfig = os.environ.get("KUBECONFIG") or None
        return config.new_client_from_config(kubeconfig)  # type: ignore[no-untyped-call]


def _missing(peering: Peering, where: str) -> PeeringUnusable:
    return PeeringUnusable(
        f"{peering.kind} {peering.name!r} {where} does not exist, and without it the operator "
        "would wait, paused, forever: apply crds/ (Kopf's peering CRDs are there) and create the "
        "object (the Helm chart does), set BEAM_PEERING_NAME to the one that exists, or run "
        "`beam operator --standalone` (BEAM_STANDALONE=true) when no other operator can run"
    )


def _forbidden(peering: Peering, where: str) -> PeeringUnusable:
    return PeeringUnusable(
        f"the operator may not read {peering.kind} {peering.name!r} {where}: its RBAC (the Helm "
        "chart's) covers only the release's own peering object, so BEAM_PEERING_NAME must be "
        "the one the chart sets"
    )


async def check_objects(peering: Peering, namespaces: Sequence[str]) -> None:
    """Raise PeeringUnusable unless every peering object this operator will use exists.
    Namespace patterns (globs, exclusions) cannot be checked and are skipped."""
    api_client = _api_client()
    try:
        api = client.CustomObjectsApi(api_client)
        if peering.clusterwide:
            targets: list[str | None] = [None]
        else:
            targets = [n for n in namespaces if not _NAMESPACE_PATTERN_CHARS & set(n)]
        for namespace in targets:
            try:
                if namespace is None:
                    await asyncio.to_thread(
                        api.get_cluster_custom_object, GROUP, VERSION, CLUSTER_PLURAL,
                        peering.name, _request_timeout=KUBE_REQUEST_TIMEOUT_SECONDS,
                    )  # fmt: skip
                else:
                    await asyncio.to_thread(
                        api.get_namespaced_custom_object, GROUP, VERSION, namespace,
                        NAMESPACED_PLURAL, peering.name,
                        _request_timeout=KUBE_REQUEST_TIMEOUT_SECONDS,
                    )  # fmt: skip
            except ApiException as error:
                where = "(cluster-wide)" if namespace is None else f"in {namespace!r}"
                if error.status == 404:
                    raise _missing(peering, where) from None
                if error.status == 403:
                    raise _forbidden(peering, where) from None
                raise
    finally:
        api_client.close()
