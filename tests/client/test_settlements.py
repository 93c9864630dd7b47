"""Settlements are never lost, fail-open is bounded and reconciled (issue 16, items 4 and 5).

Against a real `beam serve` of the test's own (stopped and started: an outage), or behind a
TCP proxy the test cuts (Beam unreachable while it runs). Prices: "cheap" is 1 grain per
input token, 2 per output token. Usage let through reaches the ledger labelled: its request
says ``let_through``, and usage analytics count it apart.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from beam_client import (
    AsyncBeamClient,
    AsyncGuard,
    BeamClient,
    BeamUnavailable,
    FailOpen,
    LetThrough,
    ModelPrice,
    RequestStatus,
)
from beam_client._generated import balance_pb2 as pb
from beam_client.config import parse_target
from beam_client.outbox import new_entry, open_outbox, scope_for

from tests.client.conftest import QUICK_RETRY, Admin
from tests.client.fakes import Paced, endless, openai_stream
from tests.client.faults import CuttableProxy
from tests.support.rest import rest_client
from tests.support.stack import ServiceProcess, Tenant

pytestmark = pytest.mark.timeout(120)

CHEAP = ModelPrice(input_grains_per_million=1_000_000, output_grains_per_million=2_000_000)


async def _usage(admin: Admin, customer_id: str) -> tuple[int, int, int, int]:
    """The customer's usage of the last day (GetUsage over REST): (requests, charged
    grains, let-through requests, let-through grains)."""
    now = int(time.time() * 1000)
    async with rest_client(admin.service, admin.tenant) as rest:
        data = await rest.get(f"/v1/customers/{customer_id}/usage", bucket="day",
                              start=str(now - 86_400_000), end=str(now + 60_000))  # fmt: skip
    fields = ("requests", "charged_grains", "let_through_requests", "let_through_grains")
    a, b, c, d = (sum(int(bucket[f]) for bucket in data["buckets"]) for f in fields)
    return a, b, c, d


async def _until(condition: object, seconds: float = 40.0) -> None:
    """Wait (bounded) until ``condition()`` is true."""
    assert callable(condition)
    for _ in range(int(seconds / 0.1)):
        if condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


@pytest.mark.parametrize(
    "outage_seconds",
    [25, pytest.param(120, marks=pytest.mark.timeout(240))],
)
async def test_settlements_of_an_outage_mid_traffic_all_land_once_beam_is_back(
    own_service: ServiceProcess, tenant: Tenant, outage_seconds: int
) -> None:
    """Issue 16, failure 2: a 25 s outage outlasted the Finalize retries (about 15 s);
    the settlements were only logged and the holds stayed until their TTL."""
    admin = Admin(own_service, tenant)
    customer = await admin.customer(100_000)
    beam = AsyncBeamClient(own_service.grpc_target, tenant.keys["enforcer"])
    opened = 0
    beam_down = asyncio.Event()

    async def one(i: int) -> AsyncGuard:
        nonlocal opened
        async with beam.guard(customer, model="cheap", prompt_tokens=20, max_tokens=1000) as g:
            opened += 1
            for _ in range(200):
                await g.add(1)
                await asyncio.sleep(0)
            await beam_down.wait()
            for _ in range(100):  # the stream goes on; no Deduct is due (every 500 here)
                await g.add(1)
                await asyncio.sleep(0)
            g.usage(prompt_tokens=20 + i, completion_tokens=300)  # the provider's usage
        return g

    streams = [asyncio.create_task(one(i)) for i in range(4)]
    await _until(lambda: opened == 4)
    down_at = time.monotonic()
    await asyncio.to_thread(own_service.stop)
    beam_down.set()
    guards = await asyncio.gather(*streams)  # each exit outlasts its Finalize's retries
    for g in guards:
        assert g.status is RequestStatus.COMPLETED_SUCCESS
        assert (g.result, g.settlement_queued) == (None, True)
        assert g.finalize_error is not None
    stats = beam.stats()
    assert (stats["finalize_failures"], stats["finalizes_queued"]) == (4, 4)
    assert (stats["outbox_pending"], stats["finalizes"]) == (4, 0)

    await asyncio.sleep(max(0.0, outage_seconds - (time.monotonic() - down_at)))
    await asyncio.to_thread(own_service.start)
    await _until(lambda: beam.stats()["outbox_pending"] == 0)
    assert beam.stats()["outbox_replayed"] == 4
    await beam.close()

    # Every settlement landed once, at the provider's usage: (20 + 21 + 22 + 23) + 4 x 600.
    assert await admin.balance(customer) == (100_000 - 2486, 0, 100_000 - 2486)
    assert await admin.ledger_entries(customer) == 4
    for i, g in enumerate(guards):
        settled = await admin.request(g.request_id, customer)
        assert (settled["status"], settled["actual_cost_grains"]) == ("completed", str(620 + i))


async def test_a_stream_whose_deducts_fail_midway_stops_at_its_allowance_and_is_billed_later(
    service: ServiceProcess, tenant: Tenant, admin: Admin
) -> None:
    """Issue 16, failure 3: under FailOpen(max_calls=1, max_grains=1) a stream whose Deducts
    stopped reaching Beam ran 5,000 tokens, unrecorded and never billed."""
    customer = await admin.customer(10_000)
    finished: list[LetThrough] = []
    policy = FailOpen(
        max_calls=1, max_grains=1, prices={"cheap": CHEAP}, on_let_through=finished.append
    )
    with CuttableProxy(service.grpc_target) as proxy:
        beam = AsyncBeamClient(
            proxy.address, tenant.keys["enforcer"], retry=QUICK_RETRY,
            finalize_retry=QUICK_RETRY, failure_policy=policy,
        )  # fmt: skip
        # Hold 100 + 2000 x 2 = 4100 at multiplier 1.0: it covers 2000 completion tokens.
        async with beam.guard(
            customer, model="cheap", prompt_tokens=100, max_tokens=2000, buffer_multiplier=1.0
        ) as g:
            stream = Paced(openai_stream(endless(), usage=None), g)
            async for _ in g.openai(stream):  # a provider that never stops by itself
                if g.completion_tokens == 700:
                    proxy.cut()  # Beam unreachable from here on
                assert g.completion_tokens <= 5000
        # The Deduct at 1000 failed: the stream went on within what the hold covered (2000)
        # plus what 1 grain of allowance pays for (0 tokens), and stopped there.
        assert (g.completion_tokens, g.stop_reason) == (2000, "FAIL_OPEN_MAX_TOKENS")
        assert g.status is RequestStatus.COMPLETED_SUCCESS
        assert stream.closed
        # Counted against the allowance, recorded, and passed to on_let_through.
        assert policy.stats()["fail_open_calls"] == 1
        (record,) = finished
        assert (record.request_id, record.mid_stream, record.allowance_tokens) == (
            g.request_id, True, 0,
        )  # fmt: skip
        assert (record.completion_tokens, record.reconciled) == (2000, False)
        # The allowance is spent: the next request is refused while Beam is away.
        with pytest.raises(BeamUnavailable):
            await beam.guard(customer, model="cheap", prompt_tokens=1, max_tokens=1).open()

        proxy.restore()
        await _until(lambda: beam.stats()["let_through_posted"] == 1)
        assert record.reconciled
        await beam.close()
    # Billed once Beam answered again, under the request's own id: 100 + 2000 x 2; past its
    # hold it ran let through, and is labelled so.
    assert await admin.balance(customer) == (10_000 - 4100, 0, 10_000 - 4100)
    settled = await admin.request(g.request_id, customer)
    assert (settled["status"], settled["actual_cost_grains"], settled["let_through"]) == (
        "completed", "4100", True,
    )  # fmt: skip
    assert await _usage(admin, customer) == (1, 4100, 1, 4100)


async def test_requests_let_through_at_open_reach_the_ledger_once_beam_answers(
    service: ServiceProcess, tenant: Tenant, admin: Admin
) -> None:
    """Issue 16, failure 3: 0 of 3 let-through requests reached the ledger. Item 5: nothing
    said they were let through."""
    customer, other = await admin.customer(10_000), await admin.customer(10_000)
    finished: list[LetThrough] = []
    policy = FailOpen(max_calls=3, max_calls_per_customer=3, on_let_through=finished.append)
    with CuttableProxy(service.grpc_target) as proxy:
        beam = AsyncBeamClient(
            proxy.address, tenant.keys["enforcer"], retry=QUICK_RETRY,
            finalize_retry=QUICK_RETRY, failure_policy=policy,
        )  # fmt: skip
        # While Beam answers: an ordinary request (10 + 20 x 2 = 50), not labelled.
        async with beam.guard(other, model="cheap", prompt_tokens=10, max_tokens=100) as normal:
            assert not normal.fail_open
            async for _ in normal.openai(openai_stream(["tok "] * 20, usage=(10, 20))):
                pass
        assert normal.result is not None
        proxy.cut()
        guards = []
        for i in range(3):
            async with beam.guard(customer, model="cheap", prompt_tokens=10, max_tokens=100) as g:
                assert g.fail_open
                async for _ in g.openai(openai_stream(["tok "] * (30 + i), usage=(10, 30 + i))):
                    pass
            guards.append(g)
            assert g.settlement_queued
        assert [r.completion_tokens for r in finished] == [30, 31, 32]
        with pytest.raises(BeamUnavailable):  # the customer's allowance is spent
            await beam.guard(customer, model="cheap", prompt_tokens=1, max_tokens=1).open()
        proxy.restore()
        await _until(lambda: beam.stats()["let_through_posted"] == 3)
        assert all(r.reconciled for r in finished)
        await beam.close()
    # 3 claims under their own request ids: (10 + 60) + (10 + 62) + (10 + 64) = 216.
    assert await admin.balance(customer) == (10_000 - 216, 0, 10_000 - 216)
    assert await admin.ledger_entries(customer) == 3
    for i, g in enumerate(guards):
        settled = await admin.request(g.request_id, customer)
        assert settled["actual_cost_grains"] == str(10 + 2 * (30 + i))
        assert settled["completion_tokens"] == str(30 + i)
        assert settled["let_through"] is True
    # Labelled in the ledger and in usage analytics; the ordinary request is not.
    assert (await admin.request(normal.request_id, other))["let_through"] is False
    assert await _usage(admin, customer) == (3, 216, 3, 216)
    assert await _usage(admin, other) == (1, 50, 0, 0)


def _child(code: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


async def test_a_settlement_left_by_a_process_that_exited_is_posted_by_the_next(
    service: ServiceProcess, tenant: Tenant, admin: Admin, outbox_path: Path
) -> None:
    customer = await admin.customer(10_000)
    with CuttableProxy(service.grpc_target) as proxy:
        child = _child(
            """
            import asyncio, json, sys
            from beam_client import AsyncBeamClient, RetryPolicy

            async def main():
                quick = RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.01)
                beam = AsyncBeamClient(sys.argv[1] if len(sys.argv) > 1 else None,
                                       finalize_retry=quick)
                async with beam.guard(CUSTOMER, model="cheap", prompt_tokens=10,
                                      max_tokens=100, buffer_multiplier=1.0) as g:
                    for _ in range(40):
                        await g.add(1)
                    print("streamed", flush=True)
                    sys.stdin.readline()  # the parent cuts Beam off
                await beam.close()
                print(json.dumps([g.request_id, g.settlement_queued]), flush=True)

            asyncio.run(main())
            """.replace("CUSTOMER", repr(customer)),
            {
                "BEAM_GRPC_TARGET": proxy.address,
                "BEAM_SERVER": proxy.address,
                "BEAM_API_KEY": tenant.keys["enforcer"],
                "BEAM_OUTBOX_PATH": str(outbox_path),
            },
        )
        assert child.stdin is not None
        assert child.stdout is not None
        assert await asyncio.to_thread(child.stdout.readline) == "streamed\n"
        proxy.cut()
        child.stdin.write("\n")
        child.stdin.flush()
        request_id, queued = json.loads(await asyncio.to_thread(child.stdout.readline))
        assert await asyncio.to_thread(child.wait, 30) == 0
        child.stdin.close()
        child.stdout.close()
        assert queued
        # Nothing settled yet: the hold (10 + 100 x 2) is still held.
        assert await admin.balance(customer) == (10_000, 210, 9_790)

        proxy.restore()
        # The next process (here: a client of the same outbox, Beam and key) posts it at
        # start.
        async with AsyncBeamClient(proxy.address, tenant.keys["enforcer"]) as beam:
            await _until(lambda: beam.stats()["outbox_replayed"] == 1)
    # 10 + 40 x 2
    assert await admin.balance(customer) == (10_000 - 90, 0, 10_000 - 90)
    settled = await admin.request(request_id, customer)
    assert (settled["status"], settled["actual_cost_grains"]) == ("completed", "90")


async def test_a_process_that_dies_mid_stream_leaves_at_most_one_interval_unreported(
    service: ServiceProcess, tenant: Tenant, admin: Admin
) -> None:
    """INTEGRATION.md's bound: tokens streamed but in no Deduct sent are fewer than one
    interval (at most deduct_every_max) when each answer is back before the next is due."""
    customer = await admin.customer(100_000)
    child = _child(
        """
        import asyncio, json, os
        from beam_client import AsyncBeamClient

        async def main():
            beam = AsyncBeamClient(deduct_every_max=100)
            g = beam.guard(CUSTOMER, model="cheap", prompt_tokens=20, max_tokens=1000)
            await g.open()
            for _ in range(750):  # the provider, paced: each Deduct ends before a token
                await g.add(1)
                while g.deduct_in_flight:
                    await asyncio.sleep(0.002)
            print(json.dumps([g.request_id, g.request_token, g.unreported_tokens]), flush=True)
            os._exit(0)  # the process dies: no Finalize

        asyncio.run(main())
        """.replace("CUSTOMER", repr(customer)),
        {"BEAM_GRPC_TARGET": service.grpc_target, "BEAM_API_KEY": tenant.keys["enforcer"]},
    )
    assert child.stdout is not None
    request_id, token, unreported = json.loads(await asyncio.to_thread(child.stdout.readline))
    assert await asyncio.to_thread(child.wait, 30) == 0
    child.stdout.close()
    assert child.stdin is not None
    child.stdin.close()
    # Reports every 100 tokens (the interval's cap): 100, 200, ..., 700; 50 unreported.
    assert unreported == 50 < 100
    # What Beam knows is what a hold left by a dead process is charged: a Finalize without
    # usage (or the hold's expiry) charges the reported 20 + 700 x 2.
    async with AsyncBeamClient(service.grpc_target, tenant.keys["enforcer"]) as beam:
        result = await beam.finalize_request(
            customer, request_id, status=RequestStatus.FAILED_TIMEOUT, request_token=token
        )
    assert result.charged_grains == 1420
    assert await admin.balance(customer) == (100_000 - 1420, 0, 100_000 - 1420)


async def test_the_blocking_client_queues_and_replays_a_settlement_too(
    service: ServiceProcess, tenant: Tenant, admin: Admin
) -> None:
    customer = await admin.customer(10_000)
    with CuttableProxy(service.grpc_target) as proxy:

        def run() -> tuple[bool, bool, dict[str, int]]:
            with BeamClient(
                proxy.address, tenant.keys["enforcer"], finalize_retry=QUICK_RETRY
            ) as beam:
                with beam.guard(customer, model="cheap", prompt_tokens=10, max_tokens=100) as g:
                    assert all(g.add(1) for _ in range(30))
                    proxy.cut()
                queued = g.settlement_queued
                proxy.restore()
                for _ in range(400):  # bounded: the replay thread posts it
                    if beam.stats()["outbox_replayed"] == 1:
                        break
                    time.sleep(0.05)
                return queued, g.result is None, beam.stats()

        queued, unsettled, stats = await asyncio.to_thread(run)
    assert (queued, unsettled) == (True, True)
    assert (stats["finalizes_queued"], stats["outbox_replayed"], stats["outbox_pending"]) == (
        1, 1, 0,
    )  # fmt: skip
    # 10 + 30 x 2; queued, but not let through: not labelled.
    assert await admin.balance(customer) == (10_000 - 70, 0, 10_000 - 70)
    assert await _usage(admin, customer) == (1, 70, 0, 0)


async def test_the_blocking_client_labels_let_through_usage(
    service: ServiceProcess, tenant: Tenant, admin: Admin
) -> None:
    customer = await admin.customer(10_000)
    policy = FailOpen(max_calls=1)
    with CuttableProxy(service.grpc_target) as proxy:

        def run() -> tuple[str, bool, int]:
            with BeamClient(
                proxy.address, tenant.keys["enforcer"], retry=QUICK_RETRY,
                finalize_retry=QUICK_RETRY, failure_policy=policy,
            ) as beam:  # fmt: skip
                proxy.cut()
                with beam.guard(customer, model="cheap", prompt_tokens=10, max_tokens=100) as g:
                    assert g.fail_open
                    assert all(g.add(1) for _ in range(25))
                    g.usage(prompt_tokens=12, completion_tokens=25)
                proxy.restore()
                for _ in range(400):  # bounded: the replay thread posts it
                    if beam.stats()["let_through_posted"] == 1:
                        break
                    time.sleep(0.05)
                return g.request_id, g.settlement_queued, beam.stats()["let_through_posted"]

        request_id, queued, posted = await asyncio.to_thread(run)
    assert (queued, posted) == (True, 1)
    # The provider's usage, 12 + 25 x 2 = 62, charged once and labelled.
    assert await admin.balance(customer) == (10_000 - 62, 0, 10_000 - 62)
    settled = await admin.request(request_id, customer)
    assert (settled["actual_cost_grains"], settled["let_through"]) == ("62", True)
    assert await _usage(admin, customer) == (1, 62, 1, 62)


async def test_a_let_through_settlement_queued_without_the_label_is_posted_with_it(
    service: ServiceProcess, tenant: Tenant, admin: Admin, outbox_path: Path
) -> None:
    """An outbox entry of kind let_through written by a client that did not send the label
    yet (its payload lacks it) is labelled when it is posted."""
    customer = await admin.customer(10_000)
    request = pb.FinalizeRequestRequest(
        customer_id=customer, request_id="older-client", status=pb.COMPLETED_SUCCESS,
        actual_prompt_tokens=10, actual_completion_tokens=20, model="cheap",
    )  # fmt: skip
    outbox = open_outbox(outbox_path)
    try:
        scope = scope_for(parse_target(service.grpc_target).address, tenant.keys["enforcer"])
        assert outbox.put(new_entry(scope, request, "let_through"))
    finally:
        outbox.close()
    async with AsyncBeamClient(service.grpc_target, tenant.keys["enforcer"]) as beam:
        await _until(lambda: beam.stats()["let_through_posted"] == 1)
    settled = await admin.request("older-client", customer)
    assert (settled["actual_cost_grains"], settled["let_through"]) == ("50", True)
