"""Unknown API keys cost PostgreSQL a bounded number of look-ups, per process.

A key missing from the in-process copy is looked up in PostgreSQL, within one token bucket
per process (``MISS_LOOKUPS_PER_SECOND``, bursts of ``MISS_LOOKUP_BURST``). Against a real
PostgresStore whose ``get_api_key`` is wrapped to count the look-ups: a flood of distinct
random keys makes exactly the budgeted number of queries and the rest are refused without
one (and counted in ``beam_auth_lookups_shed_total``); a valid key created while the
budget is spent still authenticates once the copy reloads, by NOTIFY or by age. The
bucket's clock is a frozen fake where exact numbers are asserted, so nothing refills
behind the test's back.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from prometheus_client import REGISTRY

from beam.adapters.postgres_store import PostgresStore
from beam.config import ServiceSettings
from beam.constants import CHANNEL_API_KEYS
from beam.core.auth import (
    MISS_LOOKUP_BURST,
    MISS_LOOKUPS_PER_SECOND,
    Authenticator,
    Principal,
    generate_key,
    hash_key,
)
from beam.errors import BeamError, Reason
from beam.records import ApiKeyRecord, Role
from tests.support.stack import TEST_TOKEN_SECRET, Stores, Tenant

RATE = int(MISS_LOOKUPS_PER_SECOND)


class FrozenClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Counted:
    """A real PostgresStore (migrated by the tenant fixture) whose ``get_api_key`` is
    wrapped to record the hashes it is asked for, in order (the store itself is real)."""

    store: PostgresStore
    lookups: list[str]


@pytest.fixture
async def counted(stores: Stores, tenant: Tenant) -> AsyncIterator[Counted]:
    assert stores.postgres is not None
    store = await PostgresStore.connect(
        ServiceSettings(
            database_url=stores.postgres.dsn,  # type: ignore[arg-type]
            request_token_secret=TEST_TOKEN_SECRET,  # type: ignore[arg-type]
            database_pool_min=1,
            database_pool_max=3,
        )
    )
    result = Counted(store, [])
    original = store.get_api_key

    async def get_api_key(key_hash: str) -> ApiKeyRecord | None:
        result.lookups.append(key_hash)
        return await original(key_hash)

    store.get_api_key = get_api_key  # type: ignore[method-assign]
    try:
        yield result
    finally:
        await store.close()


def shed_total() -> float:
    value = REGISTRY.get_sample_value("beam_auth_lookups_shed_total")
    assert value is not None
    return value


def random_keys(count: int) -> list[str]:
    return [generate_key()[0] for _ in range(count)]


async def refused(auth: Authenticator, key: str) -> None:
    with pytest.raises(BeamError) as error:
        await auth.authenticate(f"Bearer {key}")
    assert error.value.reason is Reason.UNAUTHENTICATED
    assert error.value.message == "invalid, expired or revoked API key"


async def authenticated(auth: Authenticator, key: str, deadline_seconds: float) -> Principal:
    """Retry until the key authenticates (every miss on the way must be UNAUTHENTICATED)."""
    deadline = time.monotonic() + deadline_seconds
    while True:
        try:
            return await auth.authenticate(f"Bearer {key}")
        except BeamError as error:
            if error.reason is not Reason.UNAUTHENTICATED:
                raise
            if time.monotonic() > deadline:
                raise AssertionError(f"the key was not accepted in {deadline_seconds} s") from None
        await asyncio.sleep(0.02)


async def new_key(store: PostgresStore, tenant: Tenant, role: Role) -> tuple[str, ApiKeyRecord]:
    """A valid key of ``tenant``, upserted as the operator does (which NOTIFYs)."""
    plaintext, key_id, digest = generate_key()
    record = ApiKeyRecord(digest, key_id, tenant.name, role, f"lookups-{role.value}")
    await store.upsert_api_key(record)
    return plaintext, record


async def test_a_flood_of_random_keys_makes_exactly_the_budgeted_lookups(
    counted: Counted, tenant: Tenant
) -> None:
    store = counted.store
    clock = FrozenClock()
    auth = Authenticator(store, dev_mode=False, max_age_seconds=3600, clock=clock)
    await auth.reload()
    shed_before = shed_total()

    flood = random_keys(MISS_LOOKUP_BURST + 30)
    for key in flood:
        await refused(auth, key)
    # The first MISS_LOOKUP_BURST keys were looked up, in order; the other 30 were not.
    assert counted.lookups == [hash_key(k) for k in flood[:MISS_LOOKUP_BURST]]
    assert shed_total() - shed_before == 30

    # A key already looked up is negatively cached (no query, nothing shed); a shed key is
    # not cached: it is shed again.
    await refused(auth, flood[0])
    await refused(auth, flood[-1])
    assert len(counted.lookups) == MISS_LOOKUP_BURST
    assert shed_total() - shed_before == 31

    # A key in the in-process copy needs no look-up and no budget.
    principal = await auth.authenticate(f"Bearer {tenant.keys['admin']}")
    assert (principal.tenant, principal.role) == (tenant.name, Role.ADMIN)
    assert len(counted.lookups) == MISS_LOOKUP_BURST

    # One second later exactly MISS_LOOKUPS_PER_SECOND more look-ups are allowed ...
    clock.now += 1.0
    second = random_keys(RATE + 5)
    for key in second:
        await refused(auth, key)
    assert counted.lookups[MISS_LOOKUP_BURST:] == [hash_key(k) for k in second[:RATE]]
    assert shed_total() - shed_before == 36

    # ... and an idle hour refills the bucket to its burst, not to 3600 seconds' worth.
    clock.now += 3600.0
    third = random_keys(MISS_LOOKUP_BURST + 1)
    for key in third:
        await refused(auth, key)
    assert len(counted.lookups) == 2 * MISS_LOOKUP_BURST + RATE
    assert shed_total() - shed_before == 37


async def test_a_concurrent_flood_stays_within_the_budget_in_real_time(
    counted: Counted,
) -> None:
    """The real clock, 200 random keys at once: at most the burst plus what the rate
    refilled while they ran; at least the burst (the bucket starts full)."""
    auth = Authenticator(counted.store, dev_mode=False, max_age_seconds=3600)
    await auth.reload()
    shed_before = shed_total()
    flood = random_keys(200)
    started = time.monotonic()
    results = await asyncio.gather(
        *(auth.authenticate(f"Bearer {key}") for key in flood), return_exceptions=True
    )
    elapsed = time.monotonic() - started
    assert all(isinstance(r, BeamError) and r.reason is Reason.UNAUTHENTICATED for r in results), (
        results
    )
    made = len(counted.lookups)
    assert MISS_LOOKUP_BURST <= made <= MISS_LOOKUP_BURST + math.ceil(elapsed * RATE)
    assert shed_total() - shed_before == 200 - made


async def test_a_new_key_works_after_the_budget_is_spent(counted: Counted, tenant: Tenant) -> None:
    store = counted.store
    clock = FrozenClock()  # the bucket never refills: only a reload can admit the new keys

    # By NOTIFY: the listener invalidates the copy, as Runtime does.
    auth = Authenticator(store, dev_mode=False, max_age_seconds=3600, clock=clock)
    await auth.reload()
    listener = await store.listen([CHANNEL_API_KEYS], lambda _c, _p: auth.invalidate())
    try:
        for key in random_keys(MISS_LOOKUP_BURST + 1):
            await refused(auth, key)
        assert len(counted.lookups) == MISS_LOOKUP_BURST
        plaintext, record = await new_key(store, tenant, Role.ENFORCER)
        principal = await authenticated(auth, plaintext, deadline_seconds=10)
    finally:
        await store.release(listener)
    assert principal == Principal(tenant.name, Role.ENFORCER, record.key_id, frozenset())
    assert len(counted.lookups) == MISS_LOOKUP_BURST  # it came by NOTIFY, not by a look-up

    # By age: nobody listens; the copy reloads when older than max_age_seconds.
    periodic = Authenticator(store, dev_mode=False, max_age_seconds=1.0, clock=clock)
    await periodic.reload()
    for key in random_keys(MISS_LOOKUP_BURST):
        await refused(periodic, key)
    assert len(counted.lookups) == 2 * MISS_LOOKUP_BURST
    plaintext, record = await new_key(store, tenant, Role.READER)
    shed_before = shed_total()
    await refused(periodic, plaintext)  # the copy is fresh and the budget spent: shed
    assert shed_total() - shed_before == 1
    principal = await authenticated(periodic, plaintext, deadline_seconds=10)
    assert principal == Principal(tenant.name, Role.READER, record.key_id, frozenset())
    assert len(counted.lookups) == 2 * MISS_LOOKUP_BURST
