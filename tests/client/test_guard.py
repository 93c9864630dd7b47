"""The streaming guard against a real `beam serve`: exact charges, stops, cancellation.

Prices (tests/support/stack.py): "cheap" 1 grain per input token, 2 per output token;
"gpt-4o-mini" 150000 / 600000 / 75000 (cached input) grains per million tokens. Every
expected value is computed by hand in a comment.
"""

from __future__ import annotations

import asyncio

import pytest
from beam_client import (
    AsyncBeamClient,
    AsyncGuard,
    BeamClient,
    BeamError,
    InsufficientBalance,
    RequestStatus,
)

from tests.client.conftest import Admin
from tests.client.fakes import Paced, PacedSync, anthropic_stream, endless, openai_stream
from tests.support.stack import ServiceProcess, Tenant

pytestmark = pytest.mark.timeout(60)


async def test_an_openai_stream_is_charged_exactly_its_usage(
    client: AsyncBeamClient, admin: Admin
) -> None:
    customer = await admin.customer(1_000_000)
    # The app estimates 100 prompt tokens; the provider streams 130 one-token pieces and
    # reports prompt 110 (of which 40 cached), completion 130.
    stream = openai_stream(["tok "] * 130, usage=(110, 130, 40))
    async with client.guard(customer, model="gpt-4o-mini", prompt_tokens=100, max_tokens=500) as g:
        assert g.affordable_completion_tokens > 500
        pieces = [chunk async for chunk in g.openai(stream)]
    assert len(pieces) == 131  # 130 content chunks and the usage chunk, unchanged
    # The hold covers the 500 tokens granted: the first report would be due at half of
    # that, so 130 tokens cost no Deduct at all: Check and Finalize, two RPCs.
    assert g.granted_completion_tokens == g.max_tokens_for_provider == 500
    assert g.last_deduct is None
    assert client.stats()["calls"] == 2
    assert g.reported_usage.prompt_tokens == 110
    assert g.status is RequestStatus.COMPLETED_SUCCESS
    # (70 x 150000 + 40 x 75000 + 130 x 600000) / 1e6 = 10.5 + 3 + 78 = 91.5 -> 92
    assert g.result is not None
    assert g.result.charged_grains == 92
    assert await admin.balance(customer) == (1_000_000 - 92, 0, 1_000_000 - 92)
    settled = await admin.request(g.request_id, customer)
    assert (settled["status"], settled["actual_cost_grains"]) == ("completed", "92")
    assert (settled["prompt_tokens"], settled["completion_tokens"]) == ("110", "130")
    assert client.stats()["finalizes"] == 1


async def test_an_anthropic_stream_is_charged_exactly_its_usage(
    client: AsyncBeamClient, admin: Admin
) -> None:
    customer = await admin.customer(1_000_000)
    # message_start: 200 fresh input tokens + 1000 read from cache; message_delta: 75 out.
    stream = anthropic_stream(["word"] * 60, input_tokens=200, output_tokens=75, cache_read=1000)
    async with client.guard(customer, model="gpt-4o-mini", prompt_tokens=1200, max_tokens=100) as g:
        async for _ in g.anthropic(stream):
            pass
    assert g.reported_usage.prompt_tokens == 1200
    assert g.reported_usage.cached_prompt_tokens == 1000
    assert g.reported_usage.completion_tokens == 75
    # (200 x 150000 + 1000 x 75000 + 75 x 600000) / 1e6 = 30 + 75 + 45 = 150
    assert g.result is not None
    assert g.result.charged_grains == 150
    assert await admin.balance(customer) == (1_000_000 - 150, 0, 1_000_000 - 150)
    settled = await admin.request(g.request_id, customer)
    assert (settled["prompt_tokens"], settled["completion_tokens"]) == ("1200", "75")


async def test_the_sync_guard_charges_exactly_the_usage_and_reported_cost_wins(
    service: ServiceProcess, tenant: Tenant, admin: Admin
) -> None:
    customer = await admin.customer(10_000)

    def run() -> tuple[int, int]:
        with BeamClient(service.grpc_target, tenant.keys["enforcer"]) as beam:
            with beam.guard(customer, model="cheap", prompt_tokens=10, max_tokens=100) as g:
                for _ in g.openai(openai_stream(["ab"] * 80, usage=(12, 80))):
                    pass
            assert g.result is not None
            charged_by_tokens = g.result.charged_grains
            # total_cost_grains, when given, is the charge.
            with beam.guard(customer, model="cheap", prompt_tokens=10, max_tokens=100) as g2:
                g2.add(3)
                g2.usage(prompt_tokens=10, completion_tokens=3, total_cost_grains=1234)
            assert g2.result is not None
            return charged_by_tokens, g2.result.charged_grains

    by_tokens, by_cost = await asyncio.to_thread(run)
    assert by_tokens == 12 * 1 + 80 * 2  # 172
    assert by_cost == 1234
    assert await admin.balance(customer) == (10_000 - 172 - 1234, 0, 10_000 - 172 - 1234)


async def test_a_stream_is_stopped_ahead_of_the_money_and_the_balance_never_goes_below_zero(
    client: AsyncBeamClient, admin: Admin
) -> None:
    """Issue 16, failure 4 (one stream): a stream cut by Beam left the balance at -100."""
    customer = await admin.customer(1000)
    # Hold: ceil((100 x 1 + 300 x 2) x 1.2) = 840, which covers (840 - 100) / 2 = 370
    # completion tokens. The provider ignores max_tokens and never ends. Paced: each
    # Deduct's answer lands before the next token.
    async with client.guard(
        customer, model="cheap", prompt_tokens=100, max_tokens=300, buffer_multiplier=1.2
    ) as g:
        assert g.check is not None
        assert (g.check.reserved_grains, g.granted_completion_tokens) == (840, 300)
        stream = Paced(openai_stream(endless(), usage=None), g)
        async for _ in g.openai(stream):
            pass
    # Reports: at 150 (half the 300 granted; the prompt rides along; 150 ahead), at 260
    # (half the 220 of headroom left; 40 ahead, up to the grant). Past the grant the
    # provider overruns: at 315 (reserving 100 ahead: the hold grows to 930, covering 415)
    # and at 365, where the hold cannot cover 365 + 100 tokens (100 + 930 = 1030 > 1000
    # grains): stop now, which takes effect at the next chunk (366, within the 415).
    assert stream.closed
    assert stream.pieces_sent == g.completion_tokens == 366
    assert (g.should_stop, g.stop_reason) == (True, "INSUFFICIENT_BALANCE")
    assert g.status is RequestStatus.KILLED_INSUFFICIENT_BALANCE
    assert client.stats()["deducts"] == 4
    # consumed 100 + 365 x 2 = 830; the hold keeps all it could (1000) and covers
    # (1000 - 100) / 2 = 450 completion tokens: more than were streamed.
    assert g.last_deduct is not None
    assert (g.last_deduct.consumed_grains, g.last_deduct.reserved_grains) == (830, 1000)
    assert g.last_deduct.covered_completion_tokens == 450
    # Settled at what was delivered: 100 + 366 x 2 = 832, no overage; the balance never
    # went below zero.
    assert g.result is not None
    assert (g.result.charged_grains, g.result.overage_grains) == (832, 0)
    assert await admin.balance(customer) == (168, 0, 168)
    settled = await admin.request(g.request_id, customer)
    assert (settled["status"], settled["overage_grains"]) == ("killed", "0")


async def test_the_sync_guard_makes_the_same_decisions(
    service: ServiceProcess, tenant: Tenant, admin: Admin
) -> None:
    """One core, two faces: the blocking guard stops the same stream at the same token."""
    customer = await admin.customer(1000)

    def run() -> tuple[int, str, int, int]:
        with BeamClient(service.grpc_target, tenant.keys["enforcer"]) as beam:
            with beam.guard(
                customer, model="cheap", prompt_tokens=100, max_tokens=300,
                buffer_multiplier=1.2,
            ) as g:  # fmt: skip
                stream = PacedSync(openai_stream(endless(), usage=None), g)
                for _ in g.openai(stream):
                    pass
            assert g.result is not None
            return (
                g.completion_tokens,
                g.stop_reason,
                g.result.charged_grains,
                beam.stats()["deducts"],
            )

    # As test_a_stream_is_stopped_ahead_of_the_money_...: 4 Deducts, stopped at 366.
    assert await asyncio.to_thread(run) == (366, "INSUFFICIENT_BALANCE", 832, 4)
    assert await admin.balance(customer) == (168, 0, 168)


async def test_a_stream_its_hold_covers_costs_four_rpcs(
    client: AsyncBeamClient, admin: Admin
) -> None:
    """Issue 16, failure 6: a 1,000-token stream cost 23 RPCs, each awaited by the stream."""
    customer = await admin.customer(1_000_000)
    async with client.guard(
        customer, model="cheap", prompt_tokens=20, max_tokens=1000, buffer_multiplier=1.2
    ) as g:
        stream = Paced(openai_stream(["tok "] * 1000, usage=(20, 1000)), g)
        async for _ in g.openai(stream):
            pass
    # The hold, ceil((20 + 1000 x 2) x 1.2) = 2424, covers (2424 - 20) / 2 = 1202 tokens.
    # Reports at 500 (half the 1000 granted; the prompt rides along) and at 851 (half the
    # 702 left); Check, 2 Deducts, Finalize.
    assert client.stats()["calls"] == 4
    assert client.stats()["deducts"] == 2
    assert g.last_deduct is not None
    assert (g.last_deduct.consumed_grains, g.last_deduct.covered_completion_tokens) == (
        20 + 851 * 2, 1202,
    )  # fmt: skip
    assert g.result is not None
    assert g.result.charged_grains == 2020
    assert await admin.balance(customer) == (1_000_000 - 2020, 0, 1_000_000 - 2020)


async def test_fifty_concurrent_under_estimated_streams_never_overspend(
    client: AsyncBeamClient, admin: Admin
) -> None:
    """Issue 16, failure 4: 50 streams of one customer estimated at 50 tokens, the provider
    streaming 200: the customer spent 1,548 of 1,260 grains (23 % over)."""
    customer = await admin.customer(1260)
    guards: list[AsyncGuard] = []
    refused = 0

    async def one() -> None:
        nonlocal refused
        g = client.guard(
            customer, model="cheap", prompt_tokens=10, max_tokens=50, buffer_multiplier=1.2
        )
        try:
            async with g:
                guards.append(g)
                # Paced (each Deduct answered before the stream's next token), so the
                # holds grow as they would against a provider slower than Beam.
                stream = Paced(openai_stream(["tok "] * 200, usage=(10, 200), delay=0.001), g)
                async for _ in g.openai(stream):
                    pass
        except InsufficientBalance:
            refused += 1

    await asyncio.gather(*(one() for _ in range(50)))
    assert len(guards) + refused == 50
    charged = 0
    for g in guards:
        assert g.result is not None
        assert g.result.overage_grains == 0
        # Each is charged what it streamed (10 + 2 per token), and streamed no more than
        # its hold covered.
        assert g.result.charged_grains == 10 + 2 * g.completion_tokens
        charged += g.result.charged_grains
    assert any(g.status is RequestStatus.KILLED_INSUFFICIENT_BALANCE for g in guards)
    balance, reserved, available = await admin.balance(customer)
    assert (balance, reserved, available) == (1260 - charged, 0, 1260 - charged)
    assert balance >= 0
    assert await admin.ledger_entries(customer) == len(guards)


async def test_a_low_balance_shortens_the_answer_instead_of_refusing_it(
    client: AsyncBeamClient, admin: Admin
) -> None:
    """Issue 16, failure 5: 130 grains were refused at max_tokens 150, 200 and 500."""
    customer = await admin.customer(130)
    for max_tokens in (150, 200, 500):
        g = client.guard(
            customer, model="cheap", prompt_tokens=10, max_tokens=max_tokens,
            buffer_multiplier=1.0,
        )  # fmt: skip
        await g.open()
        # (130 - 10) / 2 = 60 completion tokens are all the customer can pay for: the hold
        # is sized for them (the default min_tokens, 50, is below that).
        assert g.check is not None
        assert (g.granted_completion_tokens, g.max_tokens_for_provider) == (60, 60)
        assert g.check.reserved_grains == 130
        await g.abandon()  # nothing streamed: nothing charged
        assert g.result is not None
        assert g.result.charged_grains == 0
    # The provider is asked for 60 and streams them: charged 10 + 60 x 2 = 130, all of it.
    async with client.guard(
        customer, model="cheap", prompt_tokens=10, max_tokens=500, buffer_multiplier=1.0
    ) as g:
        count = g.max_tokens_for_provider
        async for _ in g.openai(openai_stream(["tok "] * count, usage=(10, count))):
            pass
    # The hold covers exactly the 60 granted: the stream ends there, completed.
    assert (g.completion_tokens, g.stop_reason) == (60, "MAX_TOKENS_REACHED")
    assert g.status is RequestStatus.COMPLETED_SUCCESS
    assert g.result is not None
    assert (g.result.charged_grains, g.result.overage_grains) == (130, 0)
    assert await admin.balance(customer) == (0, 0, 0)
    # Below min_tokens it is still a refusal; min_tokens=0 is all of max_tokens or nothing.
    await admin.customer(130, customer_id=f"{customer}_b")
    with pytest.raises(InsufficientBalance):
        await client.guard(
            f"{customer}_b", model="cheap", prompt_tokens=10, max_tokens=500, min_tokens=61,
            buffer_multiplier=1.0,
        ).open()  # fmt: skip
    with pytest.raises(InsufficientBalance):
        await client.guard(
            f"{customer}_b", model="cheap", prompt_tokens=10, max_tokens=500, min_tokens=0,
            buffer_multiplier=1.0,
        ).open()  # fmt: skip
    # The plain call has it too.
    check = await client.check_balance(
        f"{customer}_b", "plain-1", model="cheap", prompt_tokens=10, max_tokens=500,
        min_completion_tokens=1, buffer_multiplier=1.0,
    )  # fmt: skip
    assert (check.approved, check.granted_completion_tokens) == (True, 60)


async def test_cancelling_the_caller_mid_stream_still_settles_the_hold(
    client: AsyncBeamClient, admin: Admin
) -> None:
    customer = await admin.customer(100_000)
    stream = openai_stream(endless(), usage=None, delay=0.002)
    guards: list[object] = []
    reached = asyncio.Event()

    async def caller() -> None:
        async with client.guard(customer, model="cheap", prompt_tokens=40, max_tokens=2000) as g:
            guards.append(g)
            async for _ in g.openai(stream):
                if g.completion_tokens >= 120:
                    reached.set()

    task = asyncio.create_task(caller())
    await asyncio.wait_for(reached.wait(), 30)
    task.cancel()
    # Cancel again while the guard's exit is waiting for its FinalizeRequest: the wait ends,
    # the settlement does not.
    for _ in range(3):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await client.close()  # waits for settlements still in flight
    (g,) = guards
    assert g.status is RequestStatus.FAILED_TIMEOUT  # type: ignore[attr-defined]
    counted = g.completion_tokens  # type: ignore[attr-defined]
    assert counted >= 120
    # Charged the prompt estimate and the counted tokens: 40 + counted x 2.
    balance, reserved, available = await admin.balance(customer)
    assert reserved == 0
    assert balance == available == 100_000 - (40 + counted * 2)
    settled = await admin.request(g.request_id, customer)  # type: ignore[attr-defined]
    assert settled["status"] == "timeout"
    assert settled["actual_cost_grains"] == str(40 + counted * 2)
    assert client.stats()["finalizes"] == 1


async def test_an_exception_in_the_block_settles_as_failed_and_is_not_swallowed(
    client: AsyncBeamClient, admin: Admin
) -> None:
    customer = await admin.customer(10_000)
    g = client.guard(customer, model="cheap", prompt_tokens=30, max_tokens=100)

    async def stream_then_fail() -> None:
        async with g:
            for _ in range(60):
                await g.add(1)
            raise RuntimeError("provider broke")

    with pytest.raises(RuntimeError, match="provider broke"):
        await stream_then_fail()
    assert g.status is RequestStatus.FAILED_ERROR
    # 30 x 1 + 60 x 2 = 150
    assert g.result is not None
    assert g.result.charged_grains == 150
    assert (await admin.request(g.request_id, customer))["status"] == "failed"

    # Failing before anything streamed reports no tokens: nothing was used, nothing charged.
    g2 = client.guard(customer, model="cheap", prompt_tokens=30, max_tokens=100)

    async def fail_at_once() -> None:
        async with g2:
            raise ValueError("bad prompt")

    with pytest.raises(ValueError, match="bad prompt"):
        await fail_at_once()
    assert g2.result is not None
    assert g2.result.charged_grains == 0
    assert await admin.balance(customer) == (10_000 - 150, 0, 10_000 - 150)


async def test_a_customer_who_cannot_pay_gets_insufficient_balance_and_no_hold(
    client: AsyncBeamClient, admin: Admin
) -> None:
    customer = await admin.customer(100)
    with pytest.raises(InsufficientBalance) as refused:
        async with client.guard(customer, model="cheap", prompt_tokens=50, max_tokens=100):
            raise AssertionError("the block must not run")
    assert refused.value.reason == "INSUFFICIENT_BALANCE"
    assert refused.value.remaining_balance == 100
    assert await admin.balance(customer) == (100, 0, 100)
    assert client.stats()["checks_rejected"] == 1


async def test_a_reused_request_id_is_one_request(client: AsyncBeamClient, admin: Admin) -> None:
    customer = await admin.customer(10_000)
    # Opening the same request id twice (a retried job) answers the same hold.
    first = client.guard(
        customer, model="cheap", prompt_tokens=10, max_tokens=10, request_id="job-7"
    )
    await first.open()
    second = client.guard(
        customer, model="cheap", prompt_tokens=10, max_tokens=10, request_id="job-7"
    )
    await second.open()
    assert second.check is not None
    assert second.check.replayed
    assert second.request_token == first.request_token
    await first.add(5)
    await first.aclose()
    await second.aclose()  # a second Finalize is the first settlement, replayed
    assert first.result is not None
    assert second.result is not None
    assert first.result.charged_grains == second.result.charged_grains == 10 + 5 * 2
    assert second.result.replayed
    # Once settled, the id cannot buy anything again.
    with pytest.raises(BeamError) as conflict:
        await client.guard(customer, model="cheap", max_tokens=10, request_id="job-7").open()
    assert conflict.value.reason == "REQUEST_ID_CONFLICT"
    assert await admin.balance(customer) == (10_000 - 20, 0, 10_000 - 20)


async def test_abandoning_a_guard_whose_block_never_ran_releases_the_hold(
    client: AsyncBeamClient, admin: Admin
) -> None:
    customer = await admin.customer(10_000)
    g = client.guard(customer, model="cheap", prompt_tokens=30, max_tokens=100)
    await g.open()
    assert (await admin.balance(customer))[1] > 0  # held
    await g.abandon()  # e.g. the web client left before the stream started
    await g.abandon()  # idempotent
    assert g.status is RequestStatus.FAILED_TIMEOUT
    assert g.result is not None
    assert g.result.charged_grains == 0
    assert await admin.balance(customer) == (10_000, 0, 10_000)
    assert (await admin.request(g.request_id, customer))["status"] == "timeout"
    with pytest.raises(RuntimeError, match="closed"):
        await g.open()  # a settled guard cannot be entered again
