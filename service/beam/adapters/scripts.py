"""One typed face per Lua script: keyword arguments in, decoded replies out.

The scripts in ``lua/`` take positional KEYS/ARGV and answer with positional lists. This
module is the only place that knows those positions (each script names them at its top),
in the spirit of redis-py's ``AsyncScript`` and arq's named ``ARGV`` locals: the core
calls ``scripts.begin_settlement(...)`` with names and gets a dataclass back. A script
that finds the customer's account missing from Redis answers ``NOT_LOADED``; that is
raised as ``AccountNotLoaded`` so the caller can load the account and call again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from beam.adapters.redis_store import RedisStore
from beam.constants import (
    HOLD_SCAN_ATTEMPTS,
    HOLDS_PER_SCRIPT,
    MAX_OPEN_HOLDS_PER_CUSTOMER,
    SCRIPT_ABANDON_SETTLEMENT,
    SCRIPT_APPLY_BALANCE,
    SCRIPT_AUDIT_ACCOUNT,
    SCRIPT_BEGIN_SETTLEMENT,
    SCRIPT_DEDUCT,
    SCRIPT_EXPIRE_HOLDS,
    SCRIPT_LOAD_ACCOUNT,
    SCRIPT_OPEN_HOLD,
    SCRIPT_OPEN_PENDING,
    SCRIPT_READ_BALANCE,
    SCRIPT_RETIRE_HOLD,
    SCRIPT_SCAN_HOLDS,
    SCRIPT_SETTLE_HOLD,
    customer_keys,
)
from beam.errors import BeamError, Reason

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Scan:
    holds_seq: int
    server_run: str
    holds: tuple[ScannedHold, ...]
    consistent: bool  # every step saw one holds_seq on one server
    one_server: bool  # every step ran on one server process (ZSCAN's cursor kept its meaning)


class AccountNotLoaded(Exception):
    """The customer's account is not in Redis: load it from PostgreSQL and call again."""


@dataclass(frozen=True, slots=True)
class PriceArgs:
    """Grains per million tokens, as a script locks them into a hold."""

    model: str
    input_grains_per_million: int
    output_grains_per_million: int
    cached_input_grains_per_million: int


def _price_args(prices: PriceArgs | None) -> list[str | int]:
    if prices is None:
        return [0, 0, 0, 0]
    return [
        1,
        prices.input_grains_per_million,
        prices.output_grains_per_million,
        prices.cached_input_grains_per_million,
    ]


@dataclass(frozen=True, slots=True)
class OpenHoldReply:
    outcome: Literal["OK", "REJECT", "CONFLICT", "SETTLED"]
    amount: int = 0
    remaining: int = 0
    nonce: str = ""
    expires_at_ms: int = 0
    replayed: bool = False
    granted_out: int = 0  # OK: the completion tokens the hold was sized for
    reason: str = ""  # REJECT: the rejection reason
    available: int = 0  # REJECT: what was available


@dataclass(frozen=True, slots=True)
class Shorten:
    """A Check that may be shortened: the estimate is the cost of these tokens (prompt and
    ``max_output_tokens``) at the hold's prices, and the hold may be sized for as few as
    ``min_output_tokens`` (0: no shortening)."""

    input_tokens: int = 0
    cached_tokens: int = 0
    min_output_tokens: int = 0
    max_output_tokens: int = 0


@dataclass(frozen=True, slots=True)
class DeductReply:
    outcome: Literal["OK", "FAIL", "ERR"]
    code: str
    available: int
    consumed: int
    amount: int
    covered_out: int = 0  # completion tokens the hold pays for in all


@dataclass(frozen=True, slots=True)
class DoneMarker:
    """A settlement as the done marker remembers it."""

    charged: int
    refunded: int
    final_balance: int
    overage: int
    status: str
    nonce: str


@dataclass(frozen=True, slots=True)
class SettlingHold:
    """What begin_settlement reserved: the hold (or a new claim) now settling."""

    claim: bool
    nonce: str
    reserved: int
    charged: int
    consumed: int
    estimated: int
    model: str
    in_tokens: int
    out_tokens: int
    cached_tokens: int
    created_ms: int
    attempt: int  # settlements begun on this hold, this one included (the commit's fence)


@dataclass(frozen=True, slots=True)
class BeginSettlementReply:
    outcome: Literal["DONE", "SETTLE", "ERR"]
    done: DoneMarker | None = None
    hold: SettlingHold | None = None
    code: str = ""


@dataclass(frozen=True, slots=True)
class SettleReply:
    released: int
    held: int
    balance: int


@dataclass(frozen=True, slots=True)
class HoldView:
    """A hold as the reaper sees it (expire_holds)."""

    hold_id: str
    kind: str  # request | claim | debit
    status: str  # expiring | settling
    nonce: str
    amount: int
    consumed: int
    in_tokens: int
    out_tokens: int
    cached_tokens: int
    model: str
    estimated: int
    created_ms: int
    marked_ms: int
    deadline_ms: int
    attempt: int  # settlements begun on it (0: none, or a debit/credit hold)
    token: str = ""  # a claim: the nonce of the request token it settles for


@dataclass(frozen=True, slots=True)
class ReaperWork:
    expiring: list[HoldView]
    settling: list[HoldView]


@dataclass(frozen=True, slots=True)
class AccountView:
    balance: int
    held: int
    version: int


@dataclass(frozen=True, slots=True)
class AuditView:
    exists: bool
    balance: int
    held: int
    version: int
    holds_sum: int
    open_count: int
    expiring_count: int
    settling_count: int
    # The holds counter (lua/_common.lua) when the account was read.
    holds_seq: int = 0
    # The Redis server process that answered (INFO run_id).
    server_run: str = ""

    @property
    def hold_count(self) -> int:
        return self.open_count + self.expiring_count + self.settling_count


@dataclass(frozen=True, slots=True)
class ScannedHold:
    hold_id: str
    amount: int
    nonce: str
    status: str  # '' when the hold hash is gone (a stale id in a set)
    kind: str


@dataclass(frozen=True, slots=True)
class HoldScan:
    """Every hold of a customer, read in bounded steps that all saw one ``holds_seq`` on
    one Redis server process (``server_run``)."""

    holds_seq: int
    server_run: str
    holds: tuple[ScannedHold, ...]

    @property
    def amount(self) -> int:
        return sum(hold.amount for hold in self.holds)


def _hold_view(fields: Sequence[Any]) -> HoldView:
    (hold_id, kind, status, nonce, amount, consumed, in_tokens, out_tokens, cached_tokens,
     model, estimated, created, marked, deadline, attempt, *rest) = fields  # fmt: skip
    return HoldView(
        str(hold_id), str(kind), str(status), str(nonce), int(amount), int(consumed),
        int(in_tokens), int(out_tokens), int(cached_tokens), str(model), int(estimated),
        int(created), int(marked), int(deadline), int(attempt), str(rest[0]) if rest else "",
    )  # fmt: skip


class Scripts:
    """Beam's Lua scripts, called by name with keyword arguments."""

    def __init__(self, redis: RedisStore, *, holds_per_script: int = HOLDS_PER_SCRIPT) -> None:
        self.redis = redis
        # The most holds a script sums or lists in one call (constants.HOLDS_PER_SCRIPT).
        self.holds_per_script = holds_per_script

    async def _run(
        self,
        name: str,
        keys: list[str],
        args: Sequence[str | int],
        *,
        idempotent: bool,
    ) -> list[Any]:
        reply = await self.redis.run(name, keys, args, idempotent=idempotent)
        if reply and reply[0] == "NOT_LOADED":
            raise AccountNotLoaded(keys[0])
        assert isinstance(reply, list), reply
        return reply

    async def open_hold(
        self,
        tenant: str,
        customer_id: str,
        hold_id: str,
        *,
        now_ms: int,
        estimated_grains: int,
        multiplier_ppm: int,
        fingerprint: str,
        nonce: str,
        prices: PriceArgs | None,
        default_ttl_ms: int,
        max_open_holds: int,
        expire_batch: int,
        kind: Literal["request", "debit"] = "request",
        settle_deadline_ms: int = 0,
        shorten: Shorten | None = None,
    ) -> OpenHoldReply:
        """``shorten``: size the hold for fewer completion tokens rather than refuse it."""
        s = shorten or Shorten()
        reply = await self._run(
            SCRIPT_OPEN_HOLD,
            customer_keys(tenant, customer_id, hold_id),
            [
                now_ms, hold_id, estimated_grains, multiplier_ppm, fingerprint, nonce,
                prices.model if prices else "", *_price_args(prices), default_ttl_ms,
                max_open_holds, expire_batch, kind, settle_deadline_ms, s.input_tokens,
                s.cached_tokens, s.min_output_tokens, s.max_output_tokens,
            ],
            idempotent=True,
        )  # fmt: skip
        outcome = reply[0]
        if outcome == "OK":
            return OpenHoldReply(
                "OK", int(reply[1]), int(reply[2]), str(reply[3]), int(reply[4]),
                bool(int(reply[5])), int(reply[6]),
            )  # fmt: skip
        if outcome == "REJECT":
            return OpenHoldReply("REJECT", reason=str(reply[1]), available=int(reply[2]))
        assert outcome in ("CONFLICT", "SETTLED"), reply
        return OpenHoldReply(outcome)

    async def deduct(
        self,
        tenant: str,
        customer_id: str,
        hold_id: str,
        *,
        now_ms: int,
        nonce: str,
        tokens: int,
        token_kind: Literal["in", "out", "cached"],
        sequence: int,
        prices: PriceArgs | None,
        expire_batch: int,
        max_tokens_per_request: int,
        reserve_ahead_tokens: int = 0,
        prompt_tokens: int = 0,
        cached_prompt_tokens: int = 0,
    ) -> DeductReply:
        reply = await self._run(
            SCRIPT_DEDUCT,
            customer_keys(tenant, customer_id, hold_id),
            [
                now_ms, hold_id, nonce, tokens, token_kind, sequence,
                prices.model if prices else "", *_price_args(prices), expire_batch,
                max_tokens_per_request, reserve_ahead_tokens, prompt_tokens,
                cached_prompt_tokens,
            ],
            idempotent=sequence > 0,  # without a sequence number a retry would charge twice
        )  # fmt: skip
        covered = int(reply[5]) if len(reply) > 5 else 0
        return DeductReply(
            reply[0], str(reply[1]), int(reply[2]), int(reply[3]), int(reply[4]), covered
        )

    async def begin_settlement(
        self,
        tenant: str,
        customer_id: str,
        hold_id: str,
        *,
        now_ms: int,
        token_nonce: str,
        claim_nonce: str,
        total_cost_grains: int,
        prompt_tokens: int,
        completion_tokens: int,
        cached_prompt_tokens: int,
        prices: PriceArgs | None,
        expire_batch: int,
        settle_deadline_ms: int,
    ) -> BeginSettlementReply:
        price_args = _price_args(prices)
        reply = await self._run(
            SCRIPT_BEGIN_SETTLEMENT,
            customer_keys(tenant, customer_id, hold_id),
            [
                now_ms, hold_id, token_nonce, claim_nonce, total_cost_grains, prompt_tokens,
                completion_tokens, cached_prompt_tokens, *price_args, expire_batch,
                settle_deadline_ms,
            ],
            idempotent=True,
        )  # fmt: skip
        outcome = reply[0]
        if outcome == "DONE":
            marker = DoneMarker(
                int(reply[1]), int(reply[2]), int(reply[3]), int(reply[4]), str(reply[5]),
                str(reply[6]),
            )  # fmt: skip
            return BeginSettlementReply("DONE", done=marker)
        if outcome == "ERR":
            return BeginSettlementReply("ERR", code=str(reply[1]))
        assert outcome == "SETTLE", reply
        (_, claim, nonce, reserved, charged, consumed, estimated, model, in_tokens,
         out_tokens, cached_tokens, created, attempt) = reply  # fmt: skip
        hold = SettlingHold(
            bool(int(claim)), str(nonce), int(reserved), int(charged), int(consumed),
            int(estimated), str(model), int(in_tokens), int(out_tokens), int(cached_tokens),
            int(created), int(attempt),
        )  # fmt: skip
        return BeginSettlementReply("SETTLE", hold=hold)

    async def settle_hold(
        self,
        tenant: str,
        customer_id: str,
        hold_id: str,
        *,
        nonce: str,
        balance_after: int = 0,
        balance_version: int = 0,
        marker: DoneMarker | None = None,
        marker_ttl_seconds: int = 0,
        only_status: str = "",
        max_attempt: int = 0,
    ) -> SettleReply:
        """Release the hold with ``nonce`` (if it is still there and no settlement newer
        than ``max_attempt`` has begun on it; 0 = any), adopt the balance if its version is
        newer, and write the done marker when one is given. With only a nonce it voids a
        hold nothing was committed for."""
        m = marker or DoneMarker(0, 0, balance_after, 0, "", "")
        reply = await self._run(
            SCRIPT_SETTLE_HOLD,
            customer_keys(tenant, customer_id, hold_id),
            [
                hold_id, nonce, balance_after, balance_version, "1" if marker else "0",
                m.charged, m.refunded, m.overage, m.status, m.nonce, marker_ttl_seconds,
                only_status, m.final_balance, max_attempt,
            ],
            idempotent=True,
        )  # fmt: skip
        return SettleReply(int(reply[0]), int(reply[1]), int(reply[2]))

    async def reaper_work(
        self, tenant: str, customer_id: str, *, now_ms: int, limit: int, grace_ms: int
    ) -> ReaperWork:
        reply = await self._run(
            SCRIPT_EXPIRE_HOLDS,
            customer_keys(tenant, customer_id),
            [now_ms, limit, grace_ms],
            idempotent=True,
        )
        expiring, settling = reply
        return ReaperWork([_hold_view(h) for h in expiring], [_hold_view(h) for h in settling])

    async def abandon_settlement(
        self,
        tenant: str,
        customer_id: str,
        hold_id: str,
        *,
        nonce: str,
        attempt: int,
        now_ms: int,
    ) -> str:
        """Only attempt ``attempt`` (the one the reaper fenced): EXPIRING, RELEASED or GONE."""
        reply = await self._run(
            SCRIPT_ABANDON_SETTLEMENT,
            customer_keys(tenant, customer_id, hold_id),
            [hold_id, nonce, now_ms, attempt],
            idempotent=True,
        )
        return str(reply[0])

    async def open_pending(
        self,
        tenant: str,
        customer_id: str,
        hold_id: str,
        *,
        now_ms: int,
        nonce: str,
        kind: Literal["credit"],
        deadline_ms: int,
    ) -> str:
        """Mark a credit as being committed; returns the pending hold's nonce (a retry
        reuses the first). AccountNotLoaded: nothing in Redis to protect."""
        reply = await self._run(
            SCRIPT_OPEN_PENDING,
            customer_keys(tenant, customer_id, hold_id),
            [now_ms, hold_id, nonce, kind, deadline_ms],
            idempotent=True,
        )
        return str(reply[1])

    async def retire_hold(
        self,
        tenant: str,
        customer_id: str,
        hold_id: str,
        *,
        nonce: str,
        now_ms: int,
        mode: Literal["cancelled", "settled"],
    ) -> str:
        """Take back a hold a Check opened: VOIDED if untouched; else KEPT ('cancelled')
        or EXPIRING ('settled': shrunk to what it consumed, for the reaper); or GONE."""
        reply = await self._run(
            SCRIPT_RETIRE_HOLD,
            customer_keys(tenant, customer_id, hold_id),
            [hold_id, nonce, now_ms, mode],
            idempotent=True,
        )
        return str(reply[0])

    async def list_holds(self, tenant: str, customer_id: str) -> list[tuple[str, str, str, str]]:
        """Every hold of a customer: (hold id, nonce, status, kind), read in bounded steps.
        Each is judged on its own by the caller (by its nonce), so holds that changed
        during the steps do not matter: nothing ever moves into the open set, so a settled
        hold still open is listed. The steps must run on one Redis server, though (a
        restart or a failover voids ZSCAN's cursor: holds could be missed); a listing that
        straddled one is taken again, and after every attempt did, the call fails
        (STORE_UNAVAILABLE: the sync is retried)."""
        for _ in range(HOLD_SCAN_ATTEMPTS):
            scan = await self._scan_holds(tenant, customer_id)
            if scan.one_server:
                return [(h.hold_id, h.nonce, h.status, h.kind) for h in scan.holds if h.status]
        raise BeamError(
            Reason.STORE_UNAVAILABLE,
            f"the holds of customer {customer_id} could not be listed on one Redis server",
        )

    async def scan_holds(self, tenant: str, customer_id: str) -> HoldScan | None:
        """Every hold of a customer, ``holds_per_script`` per script; ``None`` when the
        holds changed between the steps (the caller may scan again)."""
        scan = await self._scan_holds(tenant, customer_id)
        return HoldScan(scan.holds_seq, scan.server_run, scan.holds) if scan.consistent else None

    async def _scan_holds(self, tenant: str, customer_id: str) -> _Scan:
        keys = customer_keys(tenant, customer_id)
        seen: dict[str, ScannedHold] = {}
        states: set[tuple[int, str]] = set()  # (holds_seq, server_run) of each step
        # ZSCAN ends; this bound only guards against a set that never stops growing.
        max_steps = 3 * (MAX_OPEN_HOLDS_PER_CUSTOMER // self.holds_per_script + 2) * 4
        steps = 0
        for which in (1, 2, 3):
            cursor = "0"
            while True:
                steps += 1
                if steps > max_steps:
                    return _Scan(-1, "", tuple(seen.values()), False, False)
                reply = await self.redis.run(
                    SCRIPT_SCAN_HOLDS, keys, [which, cursor, self.holds_per_script],
                    idempotent=True,
                )  # fmt: skip
                cursor, holds = str(reply[0]), reply[3]
                states.add((int(reply[1]), str(reply[2])))
                for hold_id, amount, nonce, status, kind in holds:
                    seen[str(hold_id)] = ScannedHold(
                        str(hold_id), int(amount), str(nonce), str(status), str(kind)
                    )
                if cursor == "0":
                    break
        ((seq, run), *_) = states
        one_server = len({server for _, server in states}) == 1
        return _Scan(seq, run, tuple(seen.values()), len(states) == 1, one_server)

    async def read_balance(
        self, tenant: str, customer_id: str, *, now_ms: int, expire_batch: int
    ) -> AccountView:
        reply = await self._run(
            SCRIPT_READ_BALANCE,
            customer_keys(tenant, customer_id),
            [now_ms, expire_batch],
            idempotent=True,
        )
        return AccountView(int(reply[1]), int(reply[2]), int(reply[3]))

    async def load_account(
        self,
        tenant: str,
        customer_id: str,
        *,
        balance: int,
        version: int,
        state: str,
        hold_ttl_ms: int,
        max_request_grains: int,
        buffer_ppm: int,
        force: bool,
    ) -> AccountView:
        """Load the account; when ``held`` must be re-derived (a new account, or ``force``)
        and there are more holds than one script should sum, they are summed in bounded
        steps first and the script adopts that sum only if no hold changed since, on the
        same Redis server. When the holds changed during every attempt (a busy customer),
        an existing account keeps its ``held`` (kept atomically with the holds by every
        script; lua/load_account.lua) and a missing one is summed in one script: a load
        must not fail. Logged."""
        keys = customer_keys(tenant, customer_id)
        args: list[str | int] = [
            balance, version, state, hold_ttl_ms, max_request_grains,
            "1" if force else "0", buffer_ppm,
        ]  # fmt: skip
        scanned: list[str | int] = ["", "", ""]
        for attempt in range(HOLD_SCAN_ATTEMPTS + 1):
            keep_held = "0"
            if attempt == HOLD_SCAN_ATTEMPTS:
                keep_held = "1"
                log.warning(
                    "the holds of customer %s/%s kept changing through %d scans: its held "
                    "is kept (or summed in one script if its account is missing)",
                    tenant, customer_id, HOLD_SCAN_ATTEMPTS,
                )  # fmt: skip
            reply = await self._run(
                SCRIPT_LOAD_ACCOUNT,
                keys,
                [*args, self.holds_per_script, *scanned, keep_held],
                idempotent=True,
            )
            if reply[0] == "OK":
                return AccountView(int(reply[1]), int(reply[2]), int(reply[3]))
            scan = await self.scan_holds(tenant, customer_id)
            scanned = ["", "", ""]
            if scan is not None:
                scanned = [scan.amount, scan.holds_seq, scan.server_run]
        raise AssertionError("load_account: the script summing every hold answered SCAN")

    async def apply_balance(
        self, tenant: str, customer_id: str, *, balance: int, version: int
    ) -> AccountView:
        """Adopt a committed balance if newer; ``held`` is 0 for an account not loaded."""
        reply = await self._run(
            SCRIPT_APPLY_BALANCE,
            customer_keys(tenant, customer_id),
            [balance, version],
            idempotent=True,
        )
        return AccountView(int(reply[1]), int(reply[2]), 0)

    async def audit_account(self, tenant: str, customer_id: str) -> AuditView:
        """The account and the sum of its holds, read as one state. More holds than
        ``holds_per_script`` are summed in bounded steps; if they kept changing through
        every attempt, ``holds_sum`` is -1 (not verified: try again later)."""
        keys = customer_keys(tenant, customer_id)
        audit = None
        for _ in range(HOLD_SCAN_ATTEMPTS):
            reply = await self._run(
                SCRIPT_AUDIT_ACCOUNT, keys, [self.holds_per_script], idempotent=True
            )
            exists, balance, held, version, total, open_, expiring, settling, seq = (
                int(v) for v in reply[:9]
            )
            audit = AuditView(
                bool(exists), balance, held, version, total, open_, expiring, settling, seq,
                str(reply[9]),
            )  # fmt: skip
            if not audit.exists or audit.holds_sum >= 0:
                return audit
            scan = await self.scan_holds(tenant, customer_id)
            if scan is not None and (scan.holds_seq, scan.server_run) == (
                audit.holds_seq,
                audit.server_run,
            ):
                return replace(audit, holds_sum=scan.amount)
        assert audit is not None
        return audit
