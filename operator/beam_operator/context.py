"""What every handler needs, built once at start-up and kept in Kopf's memo.

Kopf gives each object a shallow copy of the operator-wide memo, so all objects share the
one ``OperatorContext`` (one PostgreSQL pool, one Redis client, one Kubernetes client)
while per-object notes (the last LowBalance state seen) stay per object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from beam.config import OperatorSettings, RuntimeSettings, StoreSettings
from beam.core.reconcile import Reconciler
from beam.core.runtime import Runtime, UnsignedTokens
from beam_operator.secrets import SecretStore

MEMO_KEY = "beam"


@dataclass(slots=True)
class OperatorContext:
    settings: OperatorSettings
    runtime: Runtime
    secrets: SecretStore

    @property
    def reconciler(self) -> Reconciler:
        return self.runtime.reconciler


def context_of(memo: Any) -> OperatorContext:
    found = memo.get(MEMO_KEY)
    assert isinstance(found, OperatorContext), "the startup handler did not run"
    return found


def runtime_settings(settings: OperatorSettings) -> RuntimeSettings:
    """The store part of the operator's settings, in the shape ``Runtime`` takes.

    Built from the validated values (not the environment again), so the operator and its
    Runtime can never disagree about where the stores are. Not ``ServiceSettings``: the
    operator has no request-token key and needs none.
    """
    stores = {name: getattr(settings, name) for name in StoreSettings.model_fields}
    return RuntimeSettings.model_validate({**stores, "migrate_on_start": settings.migrate_on_start})


async def open_runtime(settings: RuntimeSettings) -> Runtime:
    """``Runtime.create`` without the background reaper (the service replicas run it) and
    with tokens that cannot sign (the operator never issues or verifies a request token)."""
    return await Runtime.create(settings, tokens=UnsignedTokens(), background=False)


def tenant_of(namespace: str | None) -> str:
    """Beam's kinds are namespaced, and a namespace is a tenant."""
    assert namespace, "a Beam object without a namespace"
    return namespace
