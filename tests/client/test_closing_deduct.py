"""A Deduct still in flight when the guard closes, that then fails, changes no settlement.

Check grants 100 completion tokens; the stream ends at 50, all within the hold, with its
one Deduct in flight; that Deduct then runs out of deadlines (Beam unreachable). The
guard decided an ordinary Finalize when the close began: it is sent unlabelled (Beam's
hold covered every token), with the usage as it stood, and the fail-open policy is not
asked for an allowance the stream can no longer use (no record that would never finish).
Both faces alike, against a scripted BalanceService.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest
from beam_client import (
    AsyncBeamClient,
    BeamClient,
    FailOpen,
    LetThrough,
    RequestStatus,
    RetryPolicy,
)

from tests.client.test_transport import Failure, Scripted, _check_granting
from tests.client.test_transport import scripted as scripted  # the fixture

pytestmark = pytest.mark.timeout(60)

QUICK = RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.02)


@pytest.mark.parametrize("blocking", [False, True], ids=["asyncio", "blocking"])
async def test_a_deduct_failing_while_the_guard_closes_is_not_let_through(
    scripted: tuple[Scripted, str], blocking: bool, caplog: pytest.LogCaptureFixture
) -> None:
    script, target = scripted
    script.answers["CheckBalance"] = _check_granting(100)
    # Every attempt of the Deduct stalls past the client's deadline.
    script.failures["DeductTokens"] = [Failure(grpc.StatusCode.UNAVAILABLE, stall=2.0)] * 2
    finished: list[LetThrough] = []
    policy = FailOpen(max_calls=5, on_let_through=finished.append)
    kwargs: dict[str, Any] = {
        "retry": QUICK,
        "finalize_retry": QUICK,
        "failure_policy": policy,
        "timeout": 0.3,
    }
    guard_args: dict[str, Any] = {"model": "m", "prompt_tokens": 10, "max_tokens": 100}
    caplog.set_level(logging.WARNING, logger="beam_client")

    if blocking:

        def run() -> tuple[Any, dict[str, int]]:
            with BeamClient(target, "k", **kwargs) as beam:
                g = beam.guard("cus_1", **guard_args).open()
                g.add(50)  # half the grant: the Deduct goes out, and stalls
                assert g.deduct_in_flight
                g.close()
                return g, beam.stats()

        g, stats = await asyncio.to_thread(run)
    else:
        async with AsyncBeamClient(target, "k", **kwargs) as beam:
            g = await beam.guard("cus_1", **guard_args).open()
            await g.add(50)
            assert g.deduct_in_flight
            await g.aclose()
            stats = beam.stats()

    # The Deduct was tried (and given up) before the Finalize went out.
    methods = [name for name, _, _ in script.received]
    assert methods == ["CheckBalance", "DeductTokens", "DeductTokens", "FinalizeRequest"]
    assert not g.deduct_in_flight
    (final,) = script.calls("FinalizeRequest")
    assert final.let_through is False
    assert final.status == RequestStatus.COMPLETED_SUCCESS
    assert (final.actual_prompt_tokens, final.actual_completion_tokens) == (10, 50)
    assert g.result is not None
    assert g.result.charged_grains == 42
    assert (g.fail_open, g.status, g.settlement_queued) == (
        False,
        RequestStatus.COMPLETED_SUCCESS,
        False,
    )
    # The failure is counted and logged; no allowance was spent on a stream already over.
    assert (stats["unavailable"], stats["deducts"], stats["deducts_skipped_open"]) == (1, 0, 0)
    assert (stats["fail_open_calls"], stats["fail_open_finished"]) == (0, 0)
    assert (stats["finalizes"], stats["finalizes_queued"], stats["outbox_pending"]) == (1, 0, 0)
    assert (list(policy.records), finished) == ([], [])
    assert "after its stream ended" in caplog.text
