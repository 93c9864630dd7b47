"""The client across a restart of its `beam serve`, and with Beam gone mid-stream.

Each test runs its own `beam serve` (ServiceProcess) on the session's stores, so it can
stop and start it without disturbing the shared service. A restart keeps the ports, and
holds live in Redis, so a request survives it: the client's retries carry the same request
id and sequence numbers, and nothing is charged twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from beam_client import AsyncBeamClient, RetryPolicy

from tests.client.conftest import QUICK_RETRY, Admin
from tests.support.stack import ServiceProcess, Stores, Tenant

pytestmark = pytest.mark.timeout(240)

# Long enough to outlast a restart (~2 s here, more on a busy machine), bounded: at most
# ~80 s of back-off.
PATIENT = RetryPolicy(max_attempts=400, initial_backoff=0.05, max_backoff=0.2)


@pytest.fixture
async def own_service(stores: Stores, tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    service = ServiceProcess(stores, tmp_path)
    await asyncio.to_thread(service.start)
    try:
        yield service
    finally:
        await asyncio.to_thread(service.stop)


async def test_a_service_restart_during_a_stream_is_retried_without_double_charging(
    own_service: ServiceProcess, tenant: Tenant
) -> None:
    admin = Admin(own_service, tenant)
    customer = await admin.customer(100_000)
    beam = AsyncBeamClient(
        own_service.grpc_target, tenant.keys["enforcer"], retry=PATIENT, finalize_retry=PATIENT
    )
    async with beam:
        async with beam.guard(customer, model="cheap", prompt_tokens=40, max_tokens=1000) as g:
            for _ in range(100):
                await g.add(1)
            # Deducts 1 (prompt, 40), 2 (50 tokens) and 3 (50 tokens): 40 + 100 x 2 = 240.
            assert g.last_deduct is not None
            assert g.last_deduct.consumed_grains == 240

            await asyncio.to_thread(own_service.stop)
            restart = asyncio.create_task(asyncio.to_thread(own_service.start))
            for _ in range(100):  # Deducts 4 and 5 are retried until the service is back
                await g.add(1)
            await restart
            assert not g.should_stop
            assert g.last_deduct.consumed_grains == 440  # 40 + 200 x 2, nothing twice

            # An applied Deduct whose answer was lost comes back as a retry with its sequence
            # number: the stored outcome, nothing charged.
            again = await beam.deduct_tokens(
                customer, g.request_id, g.request_token, 50, sequence_number=5
            )
            assert (again.success, again.consumed_grains) == (True, 440)

            # The Finalize on exit meets a second restart.
            await asyncio.to_thread(own_service.stop)
            restart = asyncio.create_task(asyncio.to_thread(own_service.start))
        await restart
        assert beam.stats()["retries"] > 0
        assert beam.stats()["finalizes"] == 1

    assert g.result is not None
    assert (g.result.charged_grains, g.result.replayed) == (440, False)
    assert await admin.balance(customer) == (100_000 - 440, 0, 100_000 - 440)
    assert await admin.ledger_entries(customer) == 1
    settled = await admin.request(g.request_id, customer)
    assert (settled["status"], settled["actual_cost_grains"]) == ("completed", "440")


async def test_beam_gone_mid_stream_stops_a_fail_closed_stream_and_the_hold_is_settled_later(
    own_service: ServiceProcess, tenant: Tenant
) -> None:
    admin = Admin(own_service, tenant)
    customer = await admin.customer(100_000)
    beam = AsyncBeamClient(
        own_service.grpc_target, tenant.keys["enforcer"], retry=QUICK_RETRY,
        finalize_retry=QUICK_RETRY,
    )  # fmt: skip
    async with beam:
        async with beam.guard(customer, model="cheap", prompt_tokens=10, max_tokens=1000) as g:
            await asyncio.to_thread(own_service.stop)
            tokens = 0
            while await g.add(1):
                tokens += 1
        # The first Deduct (at 50 tokens) could not reach Beam: the stream stopped there.
        assert tokens == 49
        assert (g.should_stop, g.stop_reason) == (True, "BEAM_UNAVAILABLE")
        # The Finalize could not either: logged and counted, not raised.
        assert g.result is None
        assert g.finalize_error is not None
        assert g.finalize_error.code == "UNAVAILABLE"
        stats = beam.stats()
        assert (stats["finalize_failures"], stats["unavailable"]) == (1, 2)

    # Beam is back: the same settlement, sent again (here by a new client, as a retrying
    # job would), settles the hold once.
    await asyncio.to_thread(own_service.start)
    async with AsyncBeamClient(own_service.grpc_target, tenant.keys["enforcer"]) as again:
        assert g.status is not None
        result = await again.finalize_request(
            customer, g.request_id, status=g.status, request_token=g.request_token,
            model="cheap", prompt_tokens=10, completion_tokens=50,
        )  # fmt: skip
    assert result.charged_grains == 10 + 50 * 2
    assert await admin.balance(customer) == (100_000 - 110, 0, 100_000 - 110)
    assert (await admin.request(g.request_id, customer))["status"] == "failed"
