"""BeamApiKey rotation and revocation on real PostgreSQL (issue 8, item 7).

A rotation retires every older generation's key, however far the generation jumped, with the
grace period; deleting the resource revokes every generation's key in a bounded number of
store calls, whatever the generation.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from beam.adapters.postgres_store import PostgresStore
from beam.core.auth import hash_key
from beam.core.reconcile import ApiKeyResult
from beam.core.runtime import Runtime
from beam.errors import BeamError, Reason
from tests.support.stack import Tenant

GRACE = 3600


def key_spec(generation: int, grace: int | None = GRACE) -> dict[str, Any]:
    rotation: dict[str, Any] = {"generation": generation}
    if grace is not None:
        rotation["gracePeriodSeconds"] = grace
    return {"role": "reader", "rotation": rotation}


async def issue(
    runtime: Runtime,
    tenant: Tenant,
    name: str,
    spec: dict[str, Any],
    held: str | None = None,
    default_grace_seconds: int = GRACE,
) -> ApiKeyResult:
    return await runtime.reconciler.reconcile_api_key(
        tenant.name,
        name,
        spec,
        current_key_hash=hash_key(held) if held else None,
        default_grace_seconds=default_grace_seconds,
    )


async def authenticates(runtime: Runtime, plaintext: str) -> bool:
    await runtime.auth.reload()
    try:
        await runtime.auth.authenticate(f"Bearer {plaintext}")
    except BeamError as error:
        if error.reason != Reason.UNAUTHENTICATED:
            raise
        return False
    return True


async def revoked_at(runtime: Runtime, plaintext: str) -> datetime | None:
    record = await runtime.postgres.get_api_key(hash_key(plaintext))
    assert record is not None
    return record.revoked_at


@contextmanager
def counted_store_calls(store: PostgresStore, budget: int) -> Iterator[list[str]]:
    """Count the calls of every public coroutine method of the real store (each is one or
    two round trips); the call past ``budget`` fails at once instead of looping on."""
    calls: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        for name in dir(type(store)):
            if name.startswith("_") or not inspect.iscoroutinefunction(getattr(type(store), name)):
                continue

            def wrap(name: str, method: Any) -> Any:
                async def counted(*args: Any, **kwargs: Any) -> Any:
                    calls.append(name)
                    if len(calls) > budget:
                        raise AssertionError(f"more than {budget} store calls: {calls[:8]}…")
                    return await method(*args, **kwargs)

                return counted

            patch.setattr(store, name, wrap(name, getattr(store, name)))
        yield calls


async def test_a_rotation_by_five_generations_retires_the_old_key_after_the_grace(
    runtime: Runtime, tenant: Tenant
) -> None:
    first = await issue(runtime, tenant, "svc", key_spec(1))
    assert first.plaintext is not None
    old = first.plaintext
    before = datetime.now(UTC)
    sixth = await issue(runtime, tenant, "svc", key_spec(6), held=old)
    after = datetime.now(UTC)
    assert sixth.plaintext is not None
    assert sixth.rotation_generation == 6
    # The generation-1 key ends exactly one grace period after the rotation.
    expiry = await revoked_at(runtime, old)
    assert expiry is not None
    assert before + timedelta(seconds=GRACE) <= expiry <= after + timedelta(seconds=GRACE)
    assert sixth.previous_key_expires_at == expiry
    assert await authenticates(runtime, old)  # within the grace
    assert await authenticates(runtime, sixth.plaintext)
    # Reconciling the same spec again neither re-issues nor extends the grace.
    again = await issue(runtime, tenant, "svc", key_spec(6), held=sixth.plaintext)
    assert (again.plaintext, again.key_id) == (None, sixth.key_id)
    assert await revoked_at(runtime, old) == expiry
    assert await revoked_at(runtime, sixth.plaintext) is None


async def test_after_the_default_grace_the_old_key_no_longer_authenticates(
    runtime: Runtime, tenant: Tenant
) -> None:
    # No gracePeriodSeconds: the operator's keyRotationGraceSeconds applies.
    first = await issue(runtime, tenant, "svc", key_spec(1, grace=None), default_grace_seconds=1)
    assert first.plaintext is not None
    sixth = await issue(
        runtime, tenant, "svc", key_spec(6, grace=None), held=first.plaintext,
        default_grace_seconds=1,
    )  # fmt: skip
    assert sixth.plaintext is not None
    expiry = await revoked_at(runtime, first.plaintext)
    assert expiry is not None
    assert await authenticates(runtime, first.plaintext)
    await asyncio.sleep(max(0.0, (expiry - datetime.now(UTC)).total_seconds()) + 0.05)
    assert not await authenticates(runtime, first.plaintext)
    assert await authenticates(runtime, sixth.plaintext)


async def test_revoking_at_generation_one_million_takes_a_bounded_number_of_calls(
    runtime: Runtime, tenant: Tenant
) -> None:
    keys: list[str] = []
    held = None
    for generation in (0, 1, 5):
        result = await issue(runtime, tenant, "svc", key_spec(generation), held=held)
        assert result.plaintext is not None
        keys.append(held := result.plaintext)
    last = await issue(runtime, tenant, "svc", key_spec(1_000_000), held=held)
    assert last.plaintext is not None
    keys.append(last.plaintext)
    # Every older key is in its grace period: valid now, revoked in the future.
    for plaintext in keys:
        assert await authenticates(runtime, plaintext)
    neighbour = await issue(runtime, tenant, "svc-2", key_spec(0))
    assert neighbour.plaintext is not None

    with counted_store_calls(runtime.postgres, budget=2) as calls:
        revoked = await runtime.reconciler.revoke_api_key(tenant.name, "svc", 1_000_000)
    assert len(calls) <= 2
    assert revoked == len(keys)  # grace periods end too
    now = datetime.now(UTC)
    for plaintext in keys:
        expiry = await revoked_at(runtime, plaintext)
        assert expiry is not None
        assert expiry <= now
        assert not await authenticates(runtime, plaintext)
    # Only this resource's keys: "svc" is not a prefix of "svc-2"'s key names.
    assert await authenticates(runtime, neighbour.plaintext)
    # Revoking again changes nothing.
    assert await runtime.reconciler.revoke_api_key(tenant.name, "svc", 1_000_000) == 0


async def test_a_rotation_reads_every_generation_in_one_query(
    runtime: Runtime, tenant: Tenant
) -> None:
    first = await issue(runtime, tenant, "svc", key_spec(0))
    assert first.plaintext is not None
    # Read every generation's key, store the new key, retire the old ones: three calls.
    with counted_store_calls(runtime.postgres, budget=3) as calls:
        last = await issue(runtime, tenant, "svc", key_spec(1_000_000), held=first.plaintext)
    assert len(calls) == 3
    assert last.previous_key_expires_at is not None
    assert await revoked_at(runtime, first.plaintext) == last.previous_key_expires_at
