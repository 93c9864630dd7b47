"""Short schedules for the defects the simulator found, replayed by tests/sim/test_simulator.py.

Each was reduced by hand from a failing seed to the few steps that matter. ``OPEN`` names
the ones the core has not fixed yet (their test is a strict xfail: it turns into a failure,
as a reminder to move the schedule to the fixed ones, the day the core is fixed).
"""

from __future__ import annotations

from tests.sim.steps import ADJUST_QUEUED, Fault, Schedule, Step

BALANCES = ((1_000, 1_000), (1_000, 1_000))
HAND_WRITTEN = {"edited": True}  # replayed from its JSON, not from its seed


def _check(rid: str, est: int = 100) -> Step:
    args = {"rid": rid, "est": est, "mult": 1.0, "model": "cheap", "max_tokens": 0, "prompt": 0}
    return Step("check", 0, 0, args)


def _deduct(rid: str, tokens: int, seq: int) -> Step:
    args = {"rid": rid, "tokens": tokens, "kind": "out", "seq": seq, "model": "cheap"}
    return Step("deduct", 0, 0, {**args, "token": "current"})


def _finalize(rid: str, cost: int, source: str = "current", fault: Fault | None = None) -> Step:
    """``source``: which request token the runner sends (see Runner.token)."""
    args = {"rid": rid, "status": "COMPLETED_SUCCESS", "cost": cost, "prompt": 0}
    args.update(completion=0, model="cheap", token=source)
    return Step("finalize", 0, 0, args, fault)


def _usage(rid: str, completion: int) -> Step:
    """A Finalize reporting the provider's tokens (no cost), with the current token."""
    args = {"rid": rid, "status": "COMPLETED_SUCCESS", "cost": 0, "prompt": 0}
    args.update(completion=completion, model="cheap", token="current")
    return Step("finalize", 0, 0, args)


SCHEDULES: dict[str, Schedule] = {
    # A credit committed, then the process died before Redis adopted it: nothing held a
    # hold for the reaper to find, so Redis stayed behind the ledger (invariant 2). Fixed
    # by bracketing credits with a 0-grain pending hold (d4ef466). Seeds 16 and 17 then.
    "credit_crash_after_commit": Schedule(
        101,
        2,
        2,
        BALANCES,
        (
            Step(
                "credit", 0, 0, {"amount": 500, "txid": "tx1"}, Fault("crash", "credit.committed")
            ),
            Step("balance", 0, 0),
        ),
        HAND_WRITTEN,
    ),
    # Redis restarted from a snapshot older than a settlement: the start-up resync kept the
    # settled request's hold, and a Deduct with its token bought tokens for a settled id
    # (invariant 6). Fixed: the resync releases holds whose request id is settled. Seeds
    # 1020, 1248 and 3001 then.
    "settled_hold_back_after_redis_restart": Schedule(
        102,
        2,
        2,
        BALANCES,
        (
            _check("r0"),
            Step("snapshot"),
            _finalize("r0", 50),
            Step("redis_restart"),
            _deduct("r0", 10, 1),
            _check("r0"),
        ),
        HAND_WRITTEN,
    ),
    # A reaper pass cancelled after committing an expiry; a late Finalize takes the hold
    # over and its process dies before committing. The restart's reaper left the hold
    # settling until its deadline (the hold's TTL, 15 min) and nothing adopted the committed
    # expiry meanwhile: Redis's balance and version lagged the ledger's (invariant 2; no
    # overspend: the settling hold still reserved the charge). Seed 6044 then; fixed by the
    # reaper adopting the ledger's balance for a settling hold it cannot finish yet.
    "late_finalize_crash_after_cancelled_expiry": Schedule(
        103,
        2,
        2,
        BALANCES,
        (
            _check("r1"),
            _deduct("r1", 20, 1),
            Step("advance", args={"ms": 1_200_000}),
            Step("reaper", fault=Fault("cancel", "reaper.committed")),
            _finalize("r1", 90, source="none", fault=Fault("crash", "finalize.begun")),
            Step("balance", 0, 0),
        ),
        HAND_WRITTEN,
    ),
    # A late Finalize commits its adjustment and a store error stops it before the Redis
    # half: its claim stays settling and reserves the charge (fine). A second late Finalize
    # with other usage is refused (REQUEST_ID_CONFLICT) and, on that path, releases the
    # settling claim without adopting the committed balance: Redis then offers the
    # adjustment's grains again (invariant 2, Redis ahead of the ledger). Seed 8897; fixed
    # by adopting the committed adjustment on both of the refused paths.
    "conflicting_late_finalize_releases_committed_claim": Schedule(
        104,
        2,
        2,
        BALANCES,
        (
            _check("r1"),
            _deduct("r1", 20, 1),
            Step("advance", args={"ms": 1_200_000}),
            Step("reaper"),
            _finalize("r1", 90, source="none", fault=Fault("error", "adjust.committed")),
            _finalize("r1", 70, source="none"),
            Step("balance", 0, 0),
        ),
        HAND_WRITTEN,
    ),
}


# Stalls (review finding 2, tests/integration/test_review_findings.py): a settlement that
# reserved and has not committed pauses past its hold's deadline while the reaper runs. The
# reaper fences and abandons the hold; the resumed commit must be refused (STORE_UNAVAILABLE,
# nothing charged) and the client's retry settle once. Fixed by settle_fences (fc9c07d).


def _stalled(point: str, reaps: int = 1, during: str = "") -> Fault:
    return Fault("stall", point, retry=True, reaps=reaps, during=during)


SCHEDULES.update(
    {
        # A claim (a Finalize for an id never checked): released at its 2 min deadline.
        "stalled_claim_is_fenced": Schedule(
            105,
            2,
            2,
            BALANCES,
            (_finalize("r2", 300, source="none", fault=_stalled("finalize.begun")),),
            HAND_WRITTEN,
        ),
        # A request hold: abandoned at its TTL (back to expiring), then its expiry recorded;
        # the retry is a late Finalize (an adjustment).
        "stalled_request_hold_is_fenced": Schedule(
            106,
            2,
            2,
            BALANCES,
            (
                _check("r0"),
                _deduct("r0", 20, 1),
                _finalize("r0", 600, fault=_stalled("finalize.begun", reaps=2)),
                Step("balance", 0, 0),
            ),
            HAND_WRITTEN,
        ),
        # The client's retry runs while the first attempt is still paused: it takes the
        # abandoned hold over (a new attempt) and settles; the first then replays it.
        "stalled_request_hold_retried_while_paused": Schedule(
            107,
            2,
            2,
            BALANCES,
            (
                _check("r0"),
                _finalize("r0", 600, fault=_stalled("finalize.begun", during="retry")),
                Step("balance", 0, 0),
            ),
            HAND_WRITTEN,
        ),
        # A resync (SyncAll) while the paused Finalize's hold reserves its charge, and again
        # once the reaper abandoned it: the hold is kept while settling (finding 4).
        "stalled_request_hold_through_resyncs": Schedule(
            110,
            2,
            2,
            BALANCES,
            (
                _check("r0"),
                _deduct("r0", 20, 1),
                _finalize("r0", 600, fault=_stalled("finalize.begun", during="sync")),
                Step("balance", 0, 0),
            ),
            HAND_WRITTEN,
        ),
        # A debit: its hold is released at its 2 min deadline; the retry debits once.
        "stalled_debit_is_fenced": Schedule(
            108,
            2,
            2,
            BALANCES,
            (
                Step("debit", 0, 0, {"amount": 400, "txid": "tx1"}, _stalled("debit.opened")),
                Step("balance", 0, 0),
            ),
            HAND_WRITTEN,
        ),
        # A late Finalize's adjustment queued behind a slow pool: its claim is abandoned.
        "stalled_adjustment_is_fenced": Schedule(
            109,
            2,
            2,
            BALANCES,
            (
                _check("r1"),
                _deduct("r1", 20, 1),
                Step("advance", args={"ms": 1_200_000}),
                Step("reaper"),
                _finalize("r1", 90, source="none", fault=_stalled(ADJUST_QUEUED, reaps=2)),
                Step("balance", 0, 0),
            ),
            HAND_WRITTEN,
        ),
    }
)

# Issue 23: two fresh seeds that failed on 2c809f7.
SCHEDULES.update(
    {
        # Credit tx2 commits and its Redis half fails (its pending hold is what lets the
        # reaper repair Redis); a retry of tx2 with another amount is handed that hold, is
        # refused TRANSACTION_ID_CONFLICT and released it adopting nothing: Redis stayed
        # behind the ledger with nothing left to repair it (invariant 2). Seed 108572;
        # fixed by adopting what the id committed on every refused path.
        "refused_credit_retry_drops_the_repair": Schedule(
            111,
            2,
            2,
            BALANCES,
            (
                Step(
                    "credit",
                    0,
                    0,
                    {"amount": 6_486, "txid": "tx2"},
                    Fault("error", "credit.committed"),
                ),
                Step("credit", 0, 0, {"amount": 100, "txid": "tx2"}),
                Step("balance", 0, 0),
            ),
            HAND_WRITTEN,
        ),
        # A second hold opened under settled r0 (its settled-id lookup failed), a Deduct
        # brought it to 200, then Redis restarted from a snapshot older than that hold: it
        # is gone with its consumption, like any open hold on Redis data loss. The model
        # still expected a charge for it (seed 103576): it now follows what Redis kept.
        "second_hold_lost_in_a_redis_restart": Schedule(
            112,
            2,
            2,
            BALANCES,
            (
                _finalize("r0", 50, source="none"),
                Step("expire_done", 0, 0),
                Step("check", 0, 0, _check("r0").args, Fault("error", "check.opened")),
                _deduct("r0", 100, 1),
                Step("redis_restart"),
            ),
            HAND_WRITTEN,
        ),
        # The same, with r0 settled by its own hold's Finalize, and then the lost second
        # hold's Finalize with its own token reporting 300 completion tokens: charged 600
        # on its own (settlement:<c>:r0#<nonce>), once; on 2c809f7 it was charged 0.
        "lost_second_hold_finalized_with_its_token": Schedule(
            113,
            2,
            2,
            BALANCES,
            (
                _check("r0"),
                _finalize("r0", 50),
                Step("expire_done", 0, 0),
                Step("check", 0, 0, _check("r0").args, Fault("error", "check.opened")),
                _deduct("r0", 100, 1),
                Step("redis_restart"),
                _usage("r0", 300),
                _usage("r0", 300),
                Step("balance", 0, 0),
            ),
            HAND_WRITTEN,
        ),
        # Hold A of r0 lost in a Redis restart, r0 checked again (hold B) and settled by
        # B's Finalize; then A's Finalize (its token, "stale" now) reporting 1 000: charged
        # on its own. The done marker of B's settlement answered it REQUEST_ID_CONFLICT and
        # charged nothing, while the ledger (the marker gone, a day later) charged it: the
        # model caught the difference (seed 302226). Now both charge it.
        "lost_first_hold_finalized_while_the_marker_lives": Schedule(
            114,
            2,
            2,
            BALANCES,
            (
                Step("snapshot"),
                _check("r0"),
                _deduct("r0", 50, 1),
                Step("redis_restart"),
                _check("r0"),
                _finalize("r0", 300),
                _finalize("r0", 600, source="stale"),
                _finalize("r0", 600, source="stale"),
                Step("balance", 0, 0),
            ),
            HAND_WRITTEN,
        ),
    }
)

OPEN: frozenset[str] = frozenset()
