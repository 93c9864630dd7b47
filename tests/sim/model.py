"""The reference model: plain Python that predicts every answer and every balance.

It knows the rules as docs/API.md and docs/ARCHITECTURE.md state them, not how the Lua is
written: a hold is ``ceil(estimate x multiplier)``; a Check needs ``amount <= balance -
held``; a Deduct's cost is recomputed from cumulative tokens (cheap: 1 grain per input or
cached token, 2 per output token) and grows the hold from the available balance; a
Finalize charges the provider's cost, else the reported tokens, else what was consumed,
and an entry that pushes the balance below zero records that much overage; an overdue
hold shrinks to what it consumed and the reaper records it as an ``expiry``; a Finalize
after that is charged the difference once (``adjustment``); a settled request id is never
opened, charged or settled again; every credit and debit is exactly once per transaction
id. Where the docs leave the implementation a choice (when exactly a script shrinks an
overdue hold; the ``available`` a credit reports), the model accepts each answer the rules
allow.

Each customer is either *certain* (the model predicts it exactly) or *uncertain*: after a
cancelled, crashed or failed call, or a Redis restart, the model cannot know what the
stores did. The runner then checks only the invariants that need no model, and re-anchors
the customer from PostgreSQL (the truth) once it has no hold left; every ledger entry that
appeared meanwhile must be explained by a call that was made (``attribute``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from typing import Any

from beam.errors import BeamError

MILLION = 1_000_000
# Prices per million tokens (input, output, cached input), as tests/support/stack.py seeds.
PRICES = {"cheap": (1_000_000, 2_000_000, 1_000_000)}
DEFAULT_BUFFER_PPM = 1_500_000  # "conservative", the default strategy
MAX_TOKENS_PER_CALL = 2**31 - 1

STATUS = {
    "COMPLETED_SUCCESS": "completed",
    "KILLED_INSUFFICIENT_BALANCE": "killed",
    "FAILED_ERROR": "failed",
    "FAILED_TIMEOUT": "timeout",
}


class Mismatch(Exception):
    """The stores answered something the rules do not allow."""

    def __init__(self, invariant: str, detail: str) -> None:
        super().__init__(f"[{invariant}] {detail}")
        self.invariant = invariant
        self.detail = detail


def ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def cost_of(model: str, in_t: int, out_t: int, cached_t: int) -> int:
    p_in, p_out, p_cached = PRICES[model]
    return ceil_div(in_t * p_in + out_t * p_out + cached_t * p_cached, MILLION)


def multiplier_ppm(multiplier: float) -> int:
    scaled = Decimal(repr(multiplier)) * MILLION
    return int(scaled.to_integral_value(rounding=ROUND_CEILING))


def new_deficit(before: int, after: int) -> int:
    """How far an entry pushed the balance below zero (what it records as overage)."""
    return max(0, max(0, -after) - max(0, -before))


def nonce_of(token: str) -> str:
    """A request token is ``v1.<nonce>.<mac>``; two tokens of one request name the same
    hold exactly when their nonces are equal."""
    parts = token.split(".")
    return parts[1] if len(parts) == 3 else token


def reason_of(result: Any) -> str | None:
    return result.reason.value if isinstance(result, BeamError) else None


def show(result: Any) -> str:
    if isinstance(result, BeamError):
        return f"error {result.reason.value} ({result.message})"
    return repr(result)


@dataclass
class Hold:
    rid: str
    amount: int
    estimated: int
    fp: tuple[Any, ...]
    token: str
    amount0: int
    remaining0: int
    affordable0: int
    expires: int
    model: str  # locked prices ("" = none yet)
    consumed: int = 0
    in_t: int = 0
    out_t: int = 0
    cached_t: int = 0
    status: str = "open"  # open | expiring
    seqs: dict[int, tuple[str, str]] = field(default_factory=dict)
    granted0: int = 0  # completion tokens the hold was sized for (0: from estimated_grains)


@dataclass
class Settled:
    status: str
    charged: int
    overage: int
    refunded: int
    nonce: str  # the nonce of the hold it settled ("" for none)
    model: str
    balance_after: int | None = None  # learned from PostgreSQL after a reaper pass
    version: int | None = None


@dataclass
class Txn:
    customer: int
    kind: str  # credit | debit | adjustment
    amount: int  # signed, as in the ledger
    balance_after: int
    version: int


@dataclass
class Cust:
    balance: int
    version: int
    overage: int = 0
    lifetime: int = 0
    holds: dict[str, Hold] = field(default_factory=dict)
    settled: dict[str, Settled] = field(default_factory=dict)
    adjusted: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # delta, after, v
    # Holds charged on their own under a settled id (``settlement:<c>:<r>#<nonce>``): nonces.
    second_charged: set[str] = field(default_factory=set)
    certain: bool = True

    @property
    def held(self) -> int:
        return sum(h.amount for h in self.holds.values())


@dataclass
class Journal:
    """Every call made for one customer (kept whatever the model's certainty), so an
    entry found in the ledger can be traced to a call that could have written it."""

    credits: set[tuple[str, int]] = field(default_factory=set)  # (txid or "", amount)
    debits: set[tuple[str, int]] = field(default_factory=set)
    finalized: set[str] = field(default_factory=set)
    let_through: set[str] = field(default_factory=set)  # finalized with the label
    held: set[str] = field(default_factory=set)  # request ids a Check may have opened
    consumed: dict[str, int] = field(default_factory=dict)  # highest consumed reported
    sequences: dict[str, set[int]] = field(default_factory=dict)  # Deduct sequence numbers
    consumed_by: dict[str, int] = field(default_factory=dict)  # per hold (nonce): consumed


class Model:
    def __init__(self, balances: tuple[tuple[int, ...], ...], ttl_ms: int) -> None:
        self.ttl_ms = ttl_ms
        self.now = 0
        self.custs: dict[tuple[int, int], Cust] = {}
        self.txns: dict[int, dict[str, Txn]] = {}
        self.journal: dict[tuple[int, int], Journal] = {}
        # Tokens issued per (tenant, customer, request), oldest first.
        self.tokens: dict[tuple[int, int, str], list[str]] = {}
        for t, row in enumerate(balances):
            self.txns[t] = {}
            for c, balance in enumerate(row):
                self.custs[t, c] = Cust(balance, 1)  # the opening entry (0 included)
                self.journal[t, c] = Journal()
                self.txns[t][f"open:c{c}"] = Txn(c, "credit", balance, balance, 1)
                self.journal[t, c].credits.add((f"open:c{c}", balance))

    # -- helpers --------------------------------------------------------------------------

    def token_ok(self, t: int, c: int, rid: str, token: str) -> bool:
        """Whether the token's HMAC is valid for this tenant, customer and request."""
        return token in self.tokens.get((t, c, rid), [])

    def expire_due(self, cust: Cust) -> None:
        """What every script that touches a customer does first."""
        for hold in cust.holds.values():
            if hold.status == "open" and hold.expires <= self.now:
                hold.status = "expiring"
                hold.amount = hold.consumed

    def due(self, cust: Cust) -> list[Hold]:
        return [h for h in cust.holds.values() if h.status == "open" and h.expires <= self.now]

    def held_range(self, cust: Cust) -> set[int]:
        """``held`` before and after overdue holds are shrunk (no expiry step ran yet)."""
        held = cust.held
        return {held, held - sum(h.amount - h.consumed for h in self.due(cust))}

    def append(self, cust: Cust, amount: int, spending: bool) -> int:
        """One ledger entry: returns the overage it records."""
        before = cust.balance
        cust.balance += amount
        cust.version += 1
        if spending:
            cust.lifetime = max(0, cust.lifetime - amount)
        overage = new_deficit(before, cust.balance)
        cust.overage += overage
        return overage

    # -- CheckBalance ---------------------------------------------------------------------

    def check(self, t: int, c: int, a: dict[str, Any], actual: Any) -> None:
        cust, rid = self.custs[t, c], a["rid"]
        prices = a["model"] or None
        estimated = a["est"] or max(cost_of("cheap", a["prompt"], a["max_tokens"], 0), 1)
        ppm_arg = multiplier_ppm(a["mult"]) if a["mult"] else 0
        ppm = ppm_arg or DEFAULT_BUFFER_PPM
        minimum = a.get("min", 0)
        fp = (estimated, ppm_arg, a["model"], a["max_tokens"], a["prompt"], minimum)
        where = f"Check {rid}"
        if rid in cust.settled:
            # A settled id never opens a hold again: refused, or (no done marker left and
            # not enough money for the hold) rejected before the ledger is asked.
            if reason_of(actual) == "REQUEST_ID_CONFLICT":
                return
            if not isinstance(actual, BeamError) and not actual.approved:
                return
            raise Mismatch(
                "6 settled id reused",
                f"{where}: the id is settled (PostgreSQL); expected REQUEST_ID_CONFLICT, "
                f"got {show(actual)}",
            )
        hold = cust.holds.get(rid)
        if hold is not None:
            if hold.fp != fp:
                self._expect_error(where, actual, "REQUEST_ID_CONFLICT")
                return
            expected = (True, hold.remaining0, hold.amount0, hold.token, hold.affordable0)
            got = self._check_tuple(actual)
            granted = getattr(actual, "granted_completion_tokens", hold.granted0)
            if got != expected or not getattr(actual, "replayed", True) or granted != hold.granted0:
                raise Mismatch(
                    "answer", f"{where} retried: expected the original answer {expected} "
                    f"(replayed), got {show(actual)}"
                )  # fmt: skip
            return
        self.expire_due(cust)
        available = cust.balance - cust.held
        amount = ceil_div(estimated * ppm, MILLION)
        granted = a["max_tokens"] if not a["est"] else 0
        if minimum and amount > available:
            # Shorten rather than refuse: the most completion tokens in [min, max_tokens)
            # whose hold fits (none: refused, as for the hold at min).
            def hold_for(t: int) -> int:
                return ceil_div(max(cost_of("cheap", a["prompt"], t, 0), 1) * ppm, MILLION)

            fitting = [t for t in range(minimum, a["max_tokens"]) if hold_for(t) <= available]
            granted = max(fitting) if fitting else minimum
            estimated = max(cost_of("cheap", a["prompt"], granted, 0), 1)
            amount = hold_for(granted)
        if amount > available:
            if isinstance(actual, BeamError) or actual.approved:
                raise Mismatch(
                    "answer", f"{where}: hold {amount} > available {available}; expected a "
                    f"rejection, got {show(actual)}"
                )  # fmt: skip
            if (actual.rejection_reason, actual.remaining_balance) != (
                "INSUFFICIENT_BALANCE",
                available,
            ):
                raise Mismatch(
                    "answer", f"{where}: expected INSUFFICIENT_BALANCE with remaining "
                    f"{available}, got {show(actual)}"
                )  # fmt: skip
            return
        remaining = available - amount
        affordable = 0
        if prices:
            budget = amount + max(remaining, 0) - cost_of("cheap", a["prompt"], 0, 0)
            affordable = min(MAX_TOKENS_PER_CALL, budget * MILLION // PRICES["cheap"][1])
            affordable = max(affordable, 0)
        if isinstance(actual, BeamError) or not actual.approved:
            raise Mismatch(
                "answer", f"{where}: hold {amount} <= available {available}; expected "
                f"approval, got {show(actual)}"
            )  # fmt: skip
        got = (*self._check_tuple(actual)[:3], actual.max_affordable_completion_tokens)
        if (
            got != (True, remaining, amount, affordable)
            or getattr(actual, "replayed", False)
            or getattr(actual, "granted_completion_tokens", granted) != granted
        ):
            raise Mismatch(
                "answer", f"{where}: expected approved, remaining {remaining}, reserved "
                f"{amount}, affordable {affordable}, granted {granted}; got {show(actual)}"
            )  # fmt: skip
        token = actual.request_token
        if token in self.tokens.get((t, c, rid), []):
            raise Mismatch("answer", f"{where}: a new hold reuses an old request token")
        self.tokens.setdefault((t, c, rid), []).append(token)
        cust.holds[rid] = Hold(
            rid, amount, estimated, fp, token, amount, remaining, affordable,
            self.now + self.ttl_ms, a["model"], granted0=granted,
        )  # fmt: skip

    @staticmethod
    def _check_tuple(actual: Any) -> tuple[Any, ...]:
        if isinstance(actual, BeamError):
            return ("error", actual.reason.value)
        return (
            actual.approved,
            actual.remaining_balance,
            actual.reserved_grains,
            actual.request_token,
            actual.max_affordable_completion_tokens,
        )

    @staticmethod
    def _expect_error(where: str, actual: Any, *reasons: str) -> None:
        if reason_of(actual) not in reasons:
            raise Mismatch(
                "answer", f"{where}: expected error {' or '.join(reasons)}, got {show(actual)}"
            )

    # -- DeductTokens ---------------------------------------------------------------------

    def deduct(self, t: int, c: int, a: dict[str, Any], token: str, actual: Any) -> None:
        cust, rid = self.custs[t, c], a["rid"]
        where = f"Deduct {rid} seq {a['seq']}"
        if not self.token_ok(t, c, rid, token):
            self._expect_error(where, actual, "INVALID_REQUEST_TOKEN")
            return
        self.expire_due(cust)
        hold = cust.holds.get(rid)
        if hold is None:
            if rid in cust.settled:
                if not isinstance(actual, BeamError) and actual.success:
                    raise Mismatch(
                        "6 settled id reused",
                        f"{where}: the id is settled; a Deduct bought tokens: {show(actual)}",
                    )
                self._expect_error(where, actual, "REQUEST_ALREADY_SETTLED", "HOLD_NOT_FOUND")
            else:
                self._expect_error(where, actual, "HOLD_NOT_FOUND")
            return
        if token != hold.token:
            self._expect_error(where, actual, "INVALID_REQUEST_TOKEN")
            return
        seq = a["seq"]
        if seq and seq in hold.seqs:
            outcome, code = hold.seqs[seq]
            self._deduct_answer(where, actual, cust, hold, outcome, code)
            return
        if hold.status != "open":
            self._deduct_answer(where, actual, cust, hold, "FAIL", "HOLD_EXPIRED")
            return
        model = hold.model
        if not model:
            if not a["model"]:
                self._expect_error(where, actual, "UNKNOWN_MODEL")
                return
            model = hold.model = a["model"]
        kind, tokens = a["kind"], a["tokens"]
        if kind == "out":
            hold.out_t += tokens
        elif kind == "cached":
            hold.cached_t += tokens
        else:
            hold.in_t += tokens
        hold.in_t += a.get("prompt_in", 0)
        hold.cached_t += a.get("prompt_cached", 0)
        cost = cost_of(model, hold.in_t, hold.out_t, hold.cached_t)
        # A guard reserves ahead: the hold grows to pay for that many more completion
        # tokens too; if it cannot, the answer is stop now (it keeps what it could).
        target = cost_of(model, hold.in_t, hold.out_t + a.get("ahead", 0), hold.cached_t)
        outcome, code = "OK", ""
        if target > hold.amount:
            grow = target - hold.amount
            available = cust.balance - cust.held
            if grow > available:
                grow = max(available, 0)
                outcome, code = "FAIL", "INSUFFICIENT_BALANCE"
            hold.amount += grow
        hold.consumed = min(cost, hold.amount)
        hold.expires = self.now + self.ttl_ms
        if seq:
            hold.seqs[seq] = (outcome, code)
        self._deduct_answer(where, actual, cust, hold, outcome, code)

    def _deduct_answer(
        self, where: str, actual: Any, cust: Cust, hold: Hold, outcome: str, code: str
    ) -> None:
        # Completion tokens the hold pays for in all (cheap: 1 grain per input or cached
        # token, 2 per output token); 0 if not even the prompt is covered, 0 without prices.
        paid = hold.amount - hold.in_t - hold.cached_t
        covered = max(paid, 0) // 2 if hold.model else 0
        expected = (
            outcome == "OK", cust.balance - cust.held, code, hold.consumed, hold.amount, covered,
        )  # fmt: skip
        got = (
            ("error", actual.reason.value)
            if isinstance(actual, BeamError)
            else (
                actual.success,
                actual.remaining_balance,
                actual.error_code,
                actual.consumed_grains,
                actual.reserved_grains,
                actual.covered_completion_tokens,
            )
        )
        if got != expected:
            raise Mismatch(
                "answer", f"{where}: expected (success, remaining, code, consumed, reserved) "
                f"= {expected}, got {show(actual)}"
            )  # fmt: skip

    # -- FinalizeRequest ------------------------------------------------------------------

    def finalize(self, t: int, c: int, a: dict[str, Any], token: str, actual: Any) -> None:
        cust, rid = self.custs[t, c], a["rid"]
        where = f"Finalize {rid}"
        if token and not self.token_ok(t, c, rid, token):
            self._expect_error(where, actual, "INVALID_REQUEST_TOKEN")
            return
        cost, prompt, completion = a["cost"], a["prompt"], a["completion"]
        reported = bool(cost or prompt or completion)
        hold = cust.holds.get(rid)
        settled = cust.settled.get(rid)
        if hold is None and settled is not None:
            self._finalize_settled(where, t, c, a, token, settled, actual)
            return
        self.expire_due(cust)
        if hold is not None and token and token != hold.token:
            self._expect_error(where, actual, "INVALID_REQUEST_TOKEN")
            return
        if cost:
            charged = cost
        elif not reported:
            charged = hold.consumed if hold else 0
        else:
            model = (hold.model if hold else "") or a["model"]
            if not model:
                self._expect_error(where, actual, "UNKNOWN_MODEL", "MISSING_FIELD")
                return
            charged = cost_of(model, prompt, completion, 0)
        reserved = hold.amount if hold else 0
        overage = self.append(cust, -charged, spending=True)
        status = STATUS[a["status"]]
        model_name = a["model"] or (hold.model if hold else "")
        cust.settled[rid] = Settled(
            status, charged, overage, max(0, reserved - charged),
            nonce_of(hold.token if hold else token), model_name, cust.balance, cust.version,
        )  # fmt: skip
        cust.holds.pop(rid, None)
        expected = FinalizeAnswer(
            max(0, reserved - charged), cust.balance, charged, overage, replayed=False
        )
        expected.compare(where, actual)

    def _finalize_settled(
        self,
        where: str,
        t: int,
        c: int,
        a: dict[str, Any],
        token: str,
        settled: Settled,
        actual: Any,
    ) -> None:
        cust = self.custs[t, c]
        cost, prompt, completion = a["cost"], a["prompt"], a["completion"]
        if (
            (prompt or completion)
            and not (cost or a["model"] or settled.model)
            and reason_of(actual) in ("UNKNOWN_MODEL", "MISSING_FIELD")
        ):
            return  # tokens without a price to charge them at: refused, whatever else holds
        if token and nonce_of(token) != settled.nonce:
            # A token of another hold of this id: never answered with this settlement. That
            # hold is gone from Redis (the model tracks every hold of a certain customer,
            # and this id has none): a second hold Redis lost, whose reported usage is
            # charged on its own, once, unless the id's settlement names no hold (a
            # Finalize without a token may have settled that very hold's usage).
            nonce = nonce_of(token)
            if settled.nonce and nonce not in cust.second_charged:
                model = a["model"] or settled.model
                charge = cost or (cost_of(model, prompt, completion, 0) if model else 0)
                if charge > 0:
                    self.append(cust, -charge, spending=True)
                    cust.second_charged.add(nonce)
            self._expect_error(where, actual, "REQUEST_ID_CONFLICT", "INVALID_REQUEST_TOKEN")
            return
        if settled.status != "expired":
            FinalizeAnswer(
                settled.refunded, settled.balance_after, settled.charged, settled.overage,
                replayed=True,
            ).compare(where, actual)  # fmt: skip
            return
        # A late Finalize: the provider's usage wins, through one adjustment entry.
        if cost:
            actual_cost = cost
        elif prompt or completion:
            model = a["model"] or settled.model
            if not model:
                self._expect_error(where, actual, "UNKNOWN_MODEL", "MISSING_FIELD")
                return
            actual_cost = cost_of(model, prompt, completion, 0)
        else:
            actual_cost = settled.charged
        delta = actual_cost - settled.charged
        earlier = cust.adjusted.get(a["rid"])
        if delta == 0:
            if earlier is not None:
                self._expect_error(where, actual, "REQUEST_ID_CONFLICT")
                return
            FinalizeAnswer(0, settled.balance_after, settled.charged, 0, replayed=True).compare(
                where, actual
            )
            return
        if earlier is not None:
            if earlier[0] != delta:
                self._expect_error(where, actual, "REQUEST_ID_CONFLICT", "TRANSACTION_ID_CONFLICT")
                return
            _, after, _ = earlier
            FinalizeAnswer(
                max(0, -delta), after, actual_cost, new_deficit(after + delta, after), True
            ).compare(where, actual)
            return
        before = cust.balance
        self.append(cust, -delta, spending=True)
        cust.adjusted[a["rid"]] = (delta, cust.balance, cust.version)
        self.txns[t][f"adjustment:c{c}:{a['rid']}"] = Txn(
            c, "adjustment", -delta, cust.balance, cust.version
        )
        FinalizeAnswer(
            max(0, -delta), cust.balance, actual_cost, new_deficit(before, cust.balance), False
        ).compare(where, actual)

    # -- credits and debits ---------------------------------------------------------------

    def entry(self, t: int, c: int, kind: str, a: dict[str, Any], actual: Any) -> None:
        cust, amount, txid = self.custs[t, c], a["amount"], a["txid"]
        where = f"{kind.capitalize()} {txid or '(no id)'} {amount}"
        signed = amount if kind == "credit" else -amount
        existing = self.txns[t].get(txid) if txid else None
        if existing is not None:
            if (existing.customer, existing.kind, existing.amount) != (c, kind, signed):
                self._expect_error(where, actual, "TRANSACTION_ID_CONFLICT")
                return
            owner = self.custs[t, existing.customer]
            self._entry_answer(
                where, actual, txid, existing.balance_after, self.held_range(owner), True
            )
            return
        if kind == "debit":
            self.expire_due(cust)
            available = cust.balance - cust.held
            if amount > available:
                self._expect_error(where, actual, "INSUFFICIENT_BALANCE")
                return
        self.append(cust, signed, spending=False)
        if isinstance(actual, BeamError):
            raise Mismatch("answer", f"{where}: expected success, got {show(actual)}")
        txid = txid or actual.transaction_id
        self.txns[t][txid] = Txn(c, kind, signed, cust.balance, cust.version)
        held = {cust.held} if kind == "debit" else self.held_range(cust)
        self._entry_answer(where, actual, txid, cust.balance, held, False)

    @staticmethod
    def _entry_answer(
        where: str, actual: Any, txid: str, balance: int, held: set[int], replayed: bool
    ) -> None:
        if isinstance(actual, BeamError):
            raise Mismatch("answer", f"{where}: expected success, got {show(actual)}")
        got = (actual.transaction_id, actual.balance, actual.replayed)
        if got != (txid, balance, replayed) or actual.available not in {balance - h for h in held}:
            raise Mismatch(
                "answer", f"{where}: expected (id, balance, replayed) = "
                f"{(txid, balance, replayed)} and available in "
                f"{sorted(balance - h for h in held)}, got {show(actual)}"
            )  # fmt: skip

    # -- GetBalance -----------------------------------------------------------------------

    def balance(self, t: int, c: int, actual: Any) -> None:
        cust = self.custs[t, c]
        self.expire_due(cust)
        expected = (cust.balance, cust.held)
        if isinstance(actual, BeamError) or (actual.balance, actual.reserved) != expected:
            raise Mismatch(
                "answer", f"GetBalance: expected (balance, reserved) = {expected}, "
                f"got {show(actual)}"
            )  # fmt: skip

    # -- the reaper -----------------------------------------------------------------------

    def reap(
        self, abandoning: frozenset[tuple[int, int, str]] = frozenset()
    ) -> set[tuple[int, int]]:
        """A reaper pass over certain customers: every overdue hold is recorded as an
        expiry at what it consumed and released. Returns the customers it settled for
        (their entries' order within the pass is the reaper's choice: the runner reads
        each expiry's balance and version back from PostgreSQL). ``abandoning``: holds
        (tenant, customer, request id) left settling past their deadline by a stalled
        Finalize: this pass abandons them (back to expiring, at what they consumed) and
        the next one records them."""
        touched = set()
        for key, cust in self.custs.items():
            if not cust.certain or not cust.holds:
                continue
            self.expire_due(cust)
            for hold in sorted(cust.holds.values(), key=lambda h: h.rid):
                if hold.status != "expiring" or (*key, hold.rid) in abandoning:
                    continue
                assert hold.rid not in cust.settled
                overage = self.append(cust, -hold.consumed, spending=True)
                cust.settled[hold.rid] = Settled(
                    "expired", hold.consumed, overage, 0, nonce_of(hold.token), hold.model
                )
                del cust.holds[hold.rid]
                touched.add(key)
        return touched

    # -- a call that stalled past its hold's deadline, then resumed ----------------------

    def finalize_stalled(
        self, t: int, c: int, a: dict[str, Any], token: str, actual: Any, nonce: str | None
    ) -> None:
        """A Finalize paused after reserving (its hold or claim settling), past the hold's
        deadline; the reaper fenced and abandoned it; now its commit runs. Nothing it would
        write may land (refused: STORE_UNAVAILABLE, retryable); a replay of what the ledger
        already has (the id settled meanwhile, by an expiry or a retry) still answers.
        ``nonce``: the hold nonce its settlement names (the hold it took over, else the
        token's, '' for none), when the pause came before the settlement was recorded: a
        fenced settlement is replayed only if the id is settled under that nonce."""
        settled = self.custs[t, c].settled.get(a["rid"])
        where = f"Finalize {a['rid']} (resumed past its deadline)"
        if nonce is not None and (settled is None or settled.nonce != nonce):
            self._expect_error(where, actual, "STORE_UNAVAILABLE")
            return
        self._resumed(t, c, where, actual, lambda m: m.finalize(t, c, a, token, actual))

    def entry_stalled(self, t: int, c: int, kind: str, a: dict[str, Any], actual: Any) -> None:
        """A debit paused with its hold open, past the hold's deadline (see
        ``finalize_stalled``): a new entry is refused; a transaction id the ledger has
        answers as before (replayed, or a conflict)."""
        where = f"{kind.capitalize()} {a['txid'] or '(no id)'} (resumed past its deadline)"
        if not a["txid"] or a["txid"] not in self.txns[t]:
            self._expect_error(where, actual, "STORE_UNAVAILABLE")
            return
        self._resumed(t, c, where, actual, lambda m: m.entry(t, c, kind, a, actual))

    def _resumed(
        self, t: int, c: int, where: str, actual: Any, predict: Callable[[Model], None]
    ) -> None:
        """What the call would do now: if that writes to the ledger, it must have been
        refused; otherwise it must answer exactly that (a replay)."""
        trial = copy.deepcopy(self)
        with contextlib.suppress(Mismatch):  # the answer is checked below, not here
            predict(trial)
        if trial.custs[t, c].version != self.custs[t, c].version:
            self._expect_error(where, actual, "STORE_UNAVAILABLE")
            return
        predict(self)

    def mark_uncertain(self, key: tuple[int, int]) -> None:
        cust = self.custs[key]
        cust.certain = False
        cust.holds.clear()


@dataclass(frozen=True)
class FinalizeAnswer:
    refunded: int
    final_balance: int | None
    charged: int
    overage: int
    replayed: bool

    def compare(self, where: str, actual: Any) -> None:
        if isinstance(actual, BeamError):
            raise Mismatch("answer", f"{where}: expected {self}, got {show(actual)}")
        got = (
            actual.success,
            actual.refunded_grains,
            actual.final_balance,
            actual.charged_grains,
            actual.overage_grains,
            actual.replayed,
        )
        expected = (
            True,
            self.refunded,
            actual.final_balance if self.final_balance is None else self.final_balance,
            self.charged,
            self.overage,
            self.replayed,
        )
        if got != expected:
            raise Mismatch(
                "answer", f"{where}: expected (success, refunded, final_balance, charged, "
                f"overage, replayed) = {expected}, got {got}"
            )  # fmt: skip
