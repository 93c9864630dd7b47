"""The client across a restart of its `beam serve`, and with Beam gone mid-stream.

Each test runs its own `beam serve` (ServiceProcess) on the session's stores, so it can
stop and start it without disturbing the shared service. A restart keeps the ports, and
holds live in Redis, so a request survives it: the client's retries carry the same request
id and sequence numbers, and nothing is charged twice.
"""

from __future__ import annotations

import asyncio

import pytest
from beam_client import AsyncBeamClient, AsyncGuard, RequestStatus, RetryPolicy

from tests.client.conftest import QUICK_RETRY, Admin
from tests.support.stack import ServiceProcess, Tenant

pytestmark = pytest.mark.timeout(240)

# Long enough to outlast a restart (~2 s here, more on a busy machine), bounded: at most
# ~80 s of back-off.
PATIENT = RetryPolicy(max_attempts=400, initial_backoff=0.05, max_backoff=0.2)


async def _idle(guard: AsyncGuard) -> None:
    """Wait (bounded) until the guard has no Deduct in flight."""
    for _ in range(4000):
        if not guard.deduct_in_flight:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("a Deduct stayed in flight")


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
            assert await g.flush()  # Deduct 1: the prompt (40) and 100 tokens: 40 + 200
            assert g.last_deduct is not None
            assert g.last_deduct.consumed_grains == 240

            await asyncio.to_thread(own_service.stop)
            restart = asyncio.create_task(asyncio.to_thread(own_service.start))
            for _ in range(100):
                await g.add(1)
            assert await g.flush()  # Deduct 2 is retried until the service is back
            await restart
            assert not g.should_stop
            assert g.last_deduct.consumed_grains == 440  # 40 + 200 x 2, nothing twice

            # An applied Deduct whose answer was lost comes back as a retry with its sequence
            # number: the stored outcome, nothing charged.
            again = await beam.deduct_tokens(
                customer, g.request_id, g.request_token, 100, sequence_number=2
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


async def test_beam_gone_mid_stream_stops_a_fail_closed_stream_and_the_outbox_settles_it(
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
            for _ in range(2000):  # the provider, paced: each Deduct ends before a token
                await _idle(g)
                if g.should_stop:
                    break
                await g.add(1)
        # The first Deduct (at 500 tokens, half the 1000 granted) could not reach Beam:
        # under fail-closed the stream stopped there.
        assert g.completion_tokens == 500
        assert (g.should_stop, g.stop_reason) == (True, "BEAM_UNAVAILABLE")
        assert g.status is RequestStatus.FAILED_ERROR
        # The Finalize could not either: not raised, and kept in the outbox.
        assert g.result is None
        assert g.finalize_error is not None
        assert g.finalize_error.code == "UNAVAILABLE"
        assert g.settlement_queued
        stats = beam.stats()
        assert (stats["finalize_failures"], stats["finalizes_queued"]) == (1, 1)
        assert stats["outbox_pending"] == 1

    # Beam is back: the next client on the same outbox (here in this process; a restarted
    # process alike) posts it at start, with the same request id and token: settled once.
    await asyncio.to_thread(own_service.start)
    async with AsyncBeamClient(own_service.grpc_target, tenant.keys["enforcer"]) as again:
        for _ in range(200):
            if again.stats()["outbox_replayed"] == 1:
                break
            await asyncio.sleep(0.05)
        assert (again.stats()["outbox_replayed"], again.stats()["outbox_pending"]) == (1, 0)
    # 10 (the prompt estimate) + 500 x 2
    assert await admin.balance(customer) == (100_000 - 1010, 0, 100_000 - 1010)
    settled = await admin.request(g.request_id, customer)
    assert (settled["status"], settled["actual_cost_grains"]) == ("failed", "1010")
