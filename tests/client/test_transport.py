"""Retries, deadlines, errors, metadata and TLS, against a scripted gRPC BalanceService.

A small in-process server answers the four methods from a script (fail N times with a
given code and ``beam-reason`` trailer, or stall, then answer), and records every request
it receives with its metadata: what the client sent on each attempt can be compared.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from beam_client import (
    AsyncBeamClient,
    BeamClient,
    BeamError,
    BeamUnavailable,
    RequestStatus,
    RetryPolicy,
)
from beam_client._generated import balance_pb2 as pb

from beam_dev import servers as devservers

pytestmark = pytest.mark.timeout(60)

FAST = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.02)


@dataclass
class Failure:
    code: grpc.StatusCode
    reason: str = ""
    field: str = ""
    stall: float = 0.0  # sleep this long first (to pass the client's deadline)


@dataclass
class Scripted:
    """Fails the first calls of each method as scripted, then answers."""

    failures: dict[str, list[Failure]] = field(default_factory=dict)
    received: list[tuple[str, Any, dict[str, str]]] = field(default_factory=list)
    # Per method: seconds to wait before each answer (in turn; then none), and answers
    # replacing the defaults.
    delays: dict[str, list[float]] = field(default_factory=dict)
    answers: dict[str, Callable[[Any], Any]] = field(default_factory=dict)

    def handler(self, method: str, answer: Callable[[Any], Any]) -> Any:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
            self.received.append((method, request, metadata))
            pending = self.failures.get(method) or []
            if pending:
                failure = pending.pop(0)
                if failure.stall:
                    await asyncio.sleep(failure.stall)
                trailers = []
                if failure.reason:
                    trailers.append(("beam-reason", failure.reason))
                if failure.field:
                    trailers.append(("beam-field", failure.field))
                context.set_trailing_metadata(tuple(trailers))
                await context.abort(failure.code, f"scripted {failure.code.name}")
            delays = self.delays.get(method) or [0.0]
            await asyncio.sleep(delays.pop(0) if len(delays) > 1 else delays[0])
            return self.answers.get(method, answer)(request)

        return handle

    def service(self) -> grpc.GenericRpcHandler:
        def rpc(method: str, request_type: Any, answer: Callable[[Any], Any]) -> Any:
            return grpc.unary_unary_rpc_method_handler(
                self.handler(method, answer),
                request_deserializer=request_type.FromString,
                response_serializer=lambda m: m.SerializeToString(),
            )

        return grpc.method_handlers_generic_handler(
            "beam.balance.v1.BalanceService",
            {
                "CheckBalance": rpc(
                    "CheckBalance",
                    pb.CheckBalanceRequest,
                    lambda r: pb.CheckBalanceResponse(
                        approved=True,
                        request_token="v1.t",
                        reserved_grains=100,
                        max_affordable_completion_tokens=1000,
                    ),
                ),
                "DeductTokens": rpc(
                    "DeductTokens",
                    pb.DeductTokensRequest,
                    lambda r: pb.DeductTokensResponse(success=True, consumed_grains=7),
                ),
                "FinalizeRequest": rpc(
                    "FinalizeRequest",
                    pb.FinalizeRequestRequest,
                    lambda r: pb.FinalizeRequestResponse(success=True, charged_grains=42),
                ),
                "GetBalance": rpc(
                    "GetBalance",
                    pb.GetBalanceRequest,
                    lambda r: pb.GetBalanceResponse(balance=5, reserved=2, available=3),
                ),
            },
        )

    def calls(self, method: str) -> list[Any]:
        return [request for name, request, _ in self.received if name == method]


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[Scripted, str]]:
    script = Scripted()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((script.service(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield script, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_store_unavailable_and_unavailable_are_retried_with_the_same_ids(
    scripted: tuple[Scripted, str],
) -> None:
    script, target = scripted
    script.failures = {
        # Beam's own refusal when its stores are down: UNAVAILABLE + beam-reason.
        "CheckBalance": [Failure(grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")],
        # The reason alone is enough, whatever the code.
        "DeductTokens": [Failure(grpc.StatusCode.INTERNAL, "STORE_UNAVAILABLE")] * 2,
        "FinalizeRequest": [Failure(grpc.StatusCode.UNAVAILABLE)] * 3,
    }
    beam = AsyncBeamClient(target, "beam_sk_k_s", retry=FAST, finalize_retry=FAST)
    async with beam:
        async with beam.guard(
            "cus_1", model="m", prompt_tokens=5, max_tokens=10, deduct_every=3
        ) as g:
            await g.add(3)  # Deduct 1 (the prompt and 3 tokens), in the background
        assert g.result is not None
        assert g.result.charged_grains == 42
        stats = beam.stats()
    checks = script.calls("CheckBalance")
    assert len(checks) == 2
    assert checks[0] == checks[1]
    assert checks[0].request_id == g.request_id
    assert checks[0].metadata.max_tokens == 10
    deducts = script.calls("DeductTokens")
    # seq 1 failed twice, then was answered (the Finalize waited for it).
    assert [d.sequence_number for d in deducts] == [1, 1, 1]
    assert all(d == deducts[0] for d in deducts)
    assert (deducts[0].tokens_consumed, deducts[0].prompt_tokens) == (3, 5)
    finalizes = script.calls("FinalizeRequest")
    assert len(finalizes) == 4
    assert all(f == finalizes[0] for f in finalizes)
    assert finalizes[0].status == RequestStatus.COMPLETED_SUCCESS
    assert (finalizes[0].actual_prompt_tokens, finalizes[0].actual_completion_tokens) == (5, 3)
    assert finalizes[0].request_token == "v1.t"
    assert (stats["retries"], stats["calls"], stats["finalizes"]) == (6, 9, 1)
    # The Finalize was in the outbox from its first failed attempt until acknowledged.
    assert (stats["finalizes_queued"], stats["outbox_pending"]) == (1, 0)
    # Every call carried the key.
    assert {meta.get("authorization") for _, _, meta in script.received} == {"Bearer beam_sk_k_s"}


async def test_a_refused_call_is_not_retried_and_keeps_reason_and_field(
    scripted: tuple[Scripted, str],
) -> None:
    script, target = scripted
    script.failures = {
        "GetBalance": [Failure(grpc.StatusCode.INVALID_ARGUMENT, "OUT_OF_RANGE", "customer_id")]
    }
    async with AsyncBeamClient(target, "k", retry=FAST) as beam:
        with pytest.raises(BeamError) as refused:
            await beam.get_balance("x" * 200)
    error = refused.value
    assert not isinstance(error, BeamUnavailable)
    assert (error.code, error.reason, error.field) == (
        "INVALID_ARGUMENT",
        "OUT_OF_RANGE",
        "customer_id",
    )
    assert error.message == "scripted INVALID_ARGUMENT"
    assert len(script.calls("GetBalance")) == 1


async def test_deadlines_are_per_attempt_and_retries_are_bounded(
    scripted: tuple[Scripted, str],
) -> None:
    script, target = scripted
    stall = Failure(grpc.StatusCode.UNAVAILABLE, stall=1.0)
    script.failures = {"GetBalance": [stall] * 4}
    async with AsyncBeamClient(target, "k", timeout=0.1, retry=FAST) as beam:
        with pytest.raises(BeamUnavailable) as gave_up:
            await beam.get_balance("cus_1")
        assert (gave_up.value.code, gave_up.value.attempts) == ("DEADLINE_EXCEEDED", 4)
    script.failures = {"GetBalance": [stall]}
    async with AsyncBeamClient(target, "k", timeout=0.1, retry=FAST) as beam:
        # One attempt times out, the next is answered.
        balance = await beam.get_balance("cus_1")
    assert (balance.balance, balance.reserved, balance.available) == (5, 2, 3)


async def test_the_sync_client_retries_the_same_way(scripted: tuple[Scripted, str]) -> None:
    script, target = scripted
    script.failures = {"DeductTokens": [Failure(grpc.StatusCode.UNAVAILABLE)] * 2}

    def run() -> int:
        with BeamClient(target, "k", retry=FAST) as beam:
            result = beam.deduct_tokens("cus_1", "r1", "v1.t", 50, sequence_number=9)
            return result.consumed_grains

    assert await asyncio.to_thread(run) == 7
    assert [d.sequence_number for d in script.calls("DeductTokens")] == [9, 9, 9]


def test_a_deduct_without_a_sequence_number_is_refused_by_the_client() -> None:
    beam = BeamClient("127.0.0.1:1", "k")
    with pytest.raises(ValueError, match="sequence_number"):
        beam.deduct_tokens("c", "r", "t", 50, sequence_number=0)


# -- TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    directory: Path = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(directory / "key.pem"), "-out", str(directory / "cert.pem"),
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return (directory / "key.pem").read_bytes(), (directory / "cert.pem").read_bytes()


async def test_grpcs_targets_use_tls(certificate: tuple[bytes, bytes]) -> None:
    key, cert = certificate
    script = Scripted()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((script.service(),))
    port = devservers.free_port()
    server.add_secure_port(f"localhost:{port}", grpc.ssl_server_credentials([(key, cert)]))
    await server.start()
    try:
        async with AsyncBeamClient(
            f"grpcs://localhost:{port}", "k", root_certificates=cert
        ) as beam:
            assert beam.target.tls
            assert (await beam.get_balance("cus_1")).available == 3

        def sync_call() -> int:
            with BeamClient(f"grpcs://localhost:{port}", "k", root_certificates=cert) as beam:
                return beam.get_balance("cus_1").available

        assert await asyncio.to_thread(sync_call) == 3
        # Plaintext to a TLS port, or TLS without trusting the certificate, never connects.
        for target in (f"grpc://localhost:{port}", f"grpcs://localhost:{port}"):
            async with AsyncBeamClient(target, "k", retry=FAST, timeout=1) as beam:
                with pytest.raises(BeamUnavailable):
                    await beam.get_balance("cus_1")
    finally:
        await server.stop(None)
    assert len(script.calls("GetBalance")) == 2


async def test_the_first_deduct_carries_the_prompt_fresh_and_cached_then_completions(
    scripted: tuple[Scripted, str],
) -> None:
    script, target = scripted
    async with AsyncBeamClient(target, "k") as beam, beam.guard(
        "cus_1", model="m", prompt_tokens=300, cached_prompt_tokens=200, max_tokens=99,
        deduct_every=10,
    ) as g:  # fmt: skip
        assert await g.add(9)  # below the interval: nothing sent
        await asyncio.sleep(0.05)
        assert script.calls("DeductTokens") == []
        await g.add(1)  # due: Deduct 1 starts in the background
        await g.add(25)  # coalesced while Deduct 1 is in flight
        assert await g.flush()  # waits for Deduct 1, then sends the 25
        assert await g.flush()  # nothing pending: nothing sent
        await g.add(4)
        assert await g.flush()  # 4 pending: sent now
    sent = [
        (
            d.sequence_number, d.tokens_consumed, d.is_completion, d.prompt_tokens,
            d.cached_prompt_tokens, d.reserve_ahead_tokens, d.model,
        )
        for d in script.calls("DeductTokens")
    ]  # fmt: skip
    # The prompt rides with the first completion tokens (100 fresh + 200 cached), never in
    # a Deduct of its own. No coverage known (the Check answered none): the interval is
    # deduct_every and each Deduct reserves two intervals ahead (20 tokens).
    assert sent == [
        (1, 10, True, 100, 200, 20, "m"),
        (2, 25, True, 0, 0, 20, "m"),
        (3, 4, True, 0, 0, 20, "m"),
    ]
    (final,) = script.calls("FinalizeRequest")
    assert (final.actual_prompt_tokens, final.actual_cached_prompt_tokens) == (300, 200)
    assert final.actual_completion_tokens == 39


def _check_granting(granted: int) -> Callable[[Any], Any]:
    return lambda r: pb.CheckBalanceResponse(
        approved=True, request_token="v1.t", reserved_grains=10**6,
        max_affordable_completion_tokens=10**6, granted_completion_tokens=granted,
    )  # fmt: skip


async def test_add_never_waits_for_beam_and_one_deduct_is_in_flight_at_a_time(
    scripted: tuple[Scripted, str],
) -> None:
    """Issue 16, failure 6: the stream waited for every Deduct (23 RPCs per 1,000 tokens)."""
    script, target = scripted
    script.answers["CheckBalance"] = _check_granting(1000)
    script.answers["DeductTokens"] = lambda r: pb.DeductTokensResponse(
        success=True, covered_completion_tokens=5000
    )
    script.delays["DeductTokens"] = [0.5]  # a slow Beam
    async with AsyncBeamClient(target, "k") as beam:
        async with beam.guard("cus_1", model="m", prompt_tokens=10, max_tokens=1000) as g:
            for _ in range(999):
                adding = g.add(1)
                # The coroutine runs to its end without suspending once: it cannot be
                # waiting for a Deduct (nor for anything else).
                with pytest.raises(StopIteration) as finished:
                    adding.send(None)
                assert finished.value.value is True
            await asyncio.sleep(0.1)
            # Half the headroom of 1000 granted tokens: one Deduct at 500, still in flight;
            # the 499 tokens since wait for the next interval.
            assert [d.tokens_consumed for d in script.calls("DeductTokens")] == [500]
            assert g.deduct_in_flight
        stats = beam.stats()
    (deduct,) = script.calls("DeductTokens")
    assert (deduct.sequence_number, deduct.prompt_tokens, deduct.reserve_ahead_tokens) == (
        1, 10, 500,
    )  # fmt: skip
    # Check, one Deduct, Finalize (which waited for the Deduct): 3 RPCs for 999 tokens.
    assert (stats["calls"], stats["deducts"], stats["finalizes"]) == (3, 1, 1)
    (final,) = script.calls("FinalizeRequest")
    assert final.actual_completion_tokens == 999


async def test_the_stream_is_cut_where_the_hold_coverage_ends_when_beam_is_slow(
    scripted: tuple[Scripted, str],
) -> None:
    """Issue 16, item 1: no token past what the hold pays for, however slow Beam is."""
    script, target = scripted
    script.answers["CheckBalance"] = _check_granting(1000)
    # The first answer says the hold covers 600 tokens in all (the money is short); the
    # second is slow.
    script.answers["DeductTokens"] = lambda r: pb.DeductTokensResponse(
        success=True, covered_completion_tokens=600
    )
    script.delays["DeductTokens"] = [0.0, 1.0, 0.0]
    async with AsyncBeamClient(target, "k") as beam:
        async with beam.guard("cus_1", model="m", prompt_tokens=10, max_tokens=1000) as g:
            went_on = [await g.add(1) for _ in range(500)]
            for _ in range(1000):  # bounded: the first answer lands
                if not g.deduct_in_flight:
                    break
                await asyncio.sleep(0.005)
            assert g.covered_completion_tokens == 600
            went_on += [await g.add(1) for _ in range(500)]
        assert went_on.index(False) == 599  # the 600th token is the last the hold covers
        assert (g.completion_tokens, g.should_stop, g.stop_reason) == (1000, True, "HOLD_COVERAGE")
        assert g.status is RequestStatus.KILLED_INSUFFICIENT_BALANCE
        assert beam.stats()["coverage_cuts"] == 1
    # 500 at half the 1000 granted, reserving 500 ahead; then, with 100 of headroom left,
    # every 50 (reserving 100): the one at 550 was still in flight at 600.
    sent = [(d.tokens_consumed, d.reserve_ahead_tokens) for d in script.calls("DeductTokens")]
    assert sent == [(500, 500), (50, 100)]


async def test_a_stream_that_reaches_the_tokens_granted_ends_completed(
    scripted: tuple[Scripted, str],
) -> None:
    script, target = scripted
    script.answers["CheckBalance"] = _check_granting(100)
    script.delays["DeductTokens"] = [1.0]
    async with (
        AsyncBeamClient(target, "k") as beam,
        beam.guard("cus_1", model="m", prompt_tokens=10, max_tokens=500) as g,
    ):
        went_on = [await g.add(1) for _ in range(300)]  # a provider ignoring max_tokens
    assert went_on.index(False) == 99
    assert (g.completion_tokens, g.stop_reason) == (300, "MAX_TOKENS_REACHED")
    assert g.status is RequestStatus.COMPLETED_SUCCESS


async def test_the_sync_guard_never_blocks_the_stream_on_a_deduct(
    scripted: tuple[Scripted, str],
) -> None:
    script, target = scripted
    script.answers["CheckBalance"] = _check_granting(1000)
    script.answers["DeductTokens"] = lambda r: pb.DeductTokensResponse(
        success=True, covered_completion_tokens=5000
    )
    script.delays["DeductTokens"] = [2.0]

    def stream() -> tuple[bool, int, int]:
        with BeamClient(target, "k") as beam:
            with beam.guard("cus_1", model="m", prompt_tokens=10, max_tokens=1000) as g:
                assert all(g.add(1) for _ in range(999))
                # Had add() waited for the Deduct sent at 500, it would be answered by now.
                in_flight = g.deduct_in_flight
            return in_flight, beam.stats()["calls"], beam.stats()["deducts"]

    in_flight, calls, deducts = await asyncio.to_thread(stream)
    assert (in_flight, calls, deducts) == (True, 3, 1)
    assert [d.tokens_consumed for d in script.calls("DeductTokens")] == [500]


async def test_a_settlement_cut_short_by_its_loop_shutting_down_is_kept_and_replayed(
    scripted: tuple[Scripted, str],
) -> None:
    script, target = scripted
    script.delays["FinalizeRequest"] = [30.0, 0.0]  # the first attempt hangs; later ones not

    def app() -> None:
        async def handle_request() -> None:
            beam = AsyncBeamClient(target, "k")
            async with beam.guard("cus_1", model="m", prompt_tokens=5, max_tokens=10) as g:
                await g.add(3)

        async def main() -> None:
            task = asyncio.create_task(handle_request())
            for _ in range(1000):  # bounded: until the Finalize is in flight
                await asyncio.sleep(0.01)
                if script.calls("FinalizeRequest"):
                    break
            task.cancel()  # the app shuts down, leaving the client unclosed
            with contextlib.suppress(asyncio.CancelledError):
                await task

        asyncio.run(main())  # cancels the settlement still running: it goes to the outbox

    await asyncio.to_thread(app)
    async with AsyncBeamClient(target, "k") as beam:
        for _ in range(200):
            if beam.stats()["outbox_replayed"] == 1:
                break
            await asyncio.sleep(0.05)
        assert (beam.stats()["outbox_replayed"], beam.stats()["outbox_pending"]) == (1, 0)
    first, replayed = script.calls("FinalizeRequest")
    assert first == replayed  # the same request id, token and usage
    assert (replayed.actual_prompt_tokens, replayed.actual_completion_tokens) == (5, 3)
