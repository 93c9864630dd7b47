"""Fail-closed and fail-open when Beam cannot be reached; the fail-open allowance is a bound.

"Unreachable" is a loopback port nobody listens on: every call is refused at once
(UNAVAILABLE), and the client gives up after its (quick) retries.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
from beam_client import (
    AsyncBeamClient,
    BeamClient,
    BeamUnavailable,
    FailOpen,
    InsufficientBalance,
    LetThrough,
    ModelPrice,
    RequestStatus,
)

from beam_dev import servers as devservers
from tests.client.conftest import QUICK_RETRY, Admin
from tests.client.fakes import endless, openai_stream
from tests.support.stack import ServiceProcess, Tenant

pytestmark = pytest.mark.timeout(60)

CHEAP = ModelPrice(input_grains_per_million=1_000_000, output_grains_per_million=2_000_000)


def unreachable() -> str:
    return f"127.0.0.1:{devservers.free_port()}"


async def test_fail_closed_refuses_when_beam_is_unreachable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    beam = AsyncBeamClient(unreachable(), "beam_sk_x_y", retry=QUICK_RETRY)
    caplog.set_level(logging.WARNING, logger="beam_client")
    with pytest.raises(BeamUnavailable) as refused:
        await beam.guard("cus_1", model="cheap", prompt_tokens=10, max_tokens=10).open()
    assert (refused.value.code, refused.value.attempts) == ("UNAVAILABLE", 2)
    stats = beam.stats()
    assert (stats["fail_closed_refusals"], stats["unavailable"], stats["retries"]) == (1, 1, 1)
    assert "fail-closed refuses request" in caplog.text
    await beam.close()


async def test_the_fail_open_call_allowance_is_never_exceeded_under_concurrency(
    caplog: pytest.LogCaptureFixture,
) -> None:
    finished: list[LetThrough] = []
    policy = FailOpen(max_calls=3, on_let_through=finished.append)
    beam = AsyncBeamClient(unreachable(), "beam_sk_x_y", retry=QUICK_RETRY, failure_policy=policy)
    caplog.set_level(logging.WARNING, logger="beam_client")

    async def one(i: int) -> int:
        async with beam.guard(f"cus_{i}", model="cheap", prompt_tokens=10, max_tokens=100) as g:
            assert g.fail_open
            assert g.affordable_completion_tokens == 100
            for _ in range(20):
                await g.add(1)
            g.usage(prompt_tokens=11, completion_tokens=20)
        return i

    outcomes = await asyncio.gather(*(one(i) for i in range(10)), return_exceptions=True)
    let_through = [o for o in outcomes if isinstance(o, int)]
    refused = [o for o in outcomes if isinstance(o, BeamUnavailable)]
    assert (len(let_through), len(refused)) == (3, 7)
    stats = beam.stats()
    assert (stats["fail_open_calls"], stats["fail_open_refusals"]) == (3, 7)
    assert stats["fail_open_finished"] == 3
    assert stats["fail_open_completion_tokens"] == 60
    assert stats["deducts"] == 0  # nothing was sent for requests without a hold
    # What was let through is recorded, with its usage.
    assert sorted(r.customer_id for r in policy.records) == sorted(f"cus_{i}" for i in let_through)
    assert len(finished) == 3
    assert {(r.status, r.prompt_tokens, r.completion_tokens) for r in finished} == {
        ("COMPLETED_SUCCESS", 11, 20)
    }
    assert caplog.text.count("fail-open lets request") == 3
    assert caplog.text.count("fail-open refuses request") == 7
    await beam.close()


async def test_the_fail_open_grain_allowance_counts_worst_cases_and_cuts_at_max_tokens() -> None:
    policy = FailOpen(max_grains=1000, prices={"cheap": CHEAP})
    beam = AsyncBeamClient(unreachable(), "beam_sk_x_y", retry=QUICK_RETRY, failure_policy=policy)
    # Worst case: 100 x 1 + 200 x 2 = 500 grains; two fit in 1000.
    for _ in range(2):
        stream = openai_stream(endless(), usage=None)
        async with beam.guard("cus_1", model="cheap", prompt_tokens=100, max_tokens=200) as g:
            async for _ in g.openai(stream):
                pass
        # The provider would not stop: the guard cut it at max_tokens.
        assert (g.completion_tokens, stream.closed, g.stop_reason) == (
            200,
            True,
            "FAIL_OPEN_MAX_TOKENS",
        )
        assert g.status is RequestStatus.COMPLETED_SUCCESS
    with pytest.raises(BeamUnavailable):
        await beam.guard("cus_1", model="cheap", prompt_tokens=1, max_tokens=1).open()
    # A model without a price and no estimate: no worst case, refused.
    policy2 = FailOpen(max_grains=10**9, prices={"cheap": CHEAP})
    with pytest.raises(BeamUnavailable):
        await beam.guard("cus_1", model="other", max_tokens=1, failure_policy=policy2).open()
    # An explicit estimate is the worst case.
    async with beam.guard("cus_1", model="other", estimated_grains=7, failure_policy=policy2) as g2:
        assert g2.fail_open
    assert policy.stats()["fail_open_grains"] == 1000
    assert policy.stats()["fail_open_refusals"] == 1
    assert (policy2.stats()["fail_open_grains"], policy2.stats()["fail_open_refusals"]) == (7, 1)
    await beam.close()


def test_the_sync_fail_open_allowance_holds_across_threads() -> None:
    policy = FailOpen(max_calls=5)
    beam = BeamClient(unreachable(), "beam_sk_x_y", retry=QUICK_RETRY, failure_policy=policy)
    admitted: list[int] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            with beam.guard(f"cus_{i}", model="cheap", max_tokens=10) as g:
                g.add(3)
        except BeamUnavailable:
            return
        with lock:
            admitted.append(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(admitted) == 5
    assert (beam.stats()["fail_open_calls"], beam.stats()["fail_open_refusals"]) == (5, 7)
    beam.close()


async def test_fail_open_never_admits_a_customer_beam_refuses(
    service: ServiceProcess, tenant: Tenant, admin: Admin
) -> None:
    customer = await admin.customer(10)
    policy = FailOpen(max_calls=100)
    beam = AsyncBeamClient(service.grpc_target, tenant.keys["enforcer"], failure_policy=policy)
    with pytest.raises(InsufficientBalance):
        await beam.guard(customer, model="cheap", prompt_tokens=100, max_tokens=100).open()
    assert policy.stats()["fail_open_calls"] == 0
    await beam.close()


def test_fail_open_needs_a_bound() -> None:
    with pytest.raises(ValueError, match="needs a bound"):
        FailOpen()
