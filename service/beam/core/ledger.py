"""The four-call lifecycle and the money invariants (docs/ARCHITECTURE.md, "Invariants").

Where each piece of state lives, and why the order of writes is safe:

* Redis holds in-flight state: holds and ``held``, plus a *cache* of the settled balance
  tagged with PostgreSQL's ``balance_version``. Check and Deduct are one EVALSHA each.
* PostgreSQL is the ledger. Every settlement (Finalize, expiry, debit, late adjustment)
  runs in three steps: (1) a script marks the hold *settling* and grows it to at least the
  charge; (2) the settlement commits to PostgreSQL; (3) ``settle_hold`` releases that hold
  (matched by its nonce) and adopts the new balance if its version is newer. Between (2)
  and (3) Redis still reserves the charge, so its ``available`` can only be *below* the
  ledger's. Step (3) runs in a task the caller's cancellation cannot stop; if the process
  dies there, the reaper finds the settling hold, reads the ledger, and completes step (3)
  within seconds (``complete_settling``). Redis is therefore never ahead of the ledger, and
  a stale or repeated apply is ignored by version.
* PostgreSQL is also the authority on which request ids are settled: Redis remembers a
  settlement only while its done marker lives (24 h), so a Check that opens a hold asks the
  ledger too, and voids the hold if the id was settled before. A settlement releases only
  the hold it settled, never a later hold under the same id.
* There are NO cross-process locks: atomicity per customer comes from Lua (Redis runs one
  script at a time) and from ``SELECT ... FOR UPDATE`` on the customer row in PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from beam.adapters.postgres_store import PostgresStore
from beam.adapters.scripts import (
    AccountNotLoaded,
    BeginSettlementReply,
    DoneMarker,
    HoldView,
    PriceArgs,
    Scripts,
    SettlingHold,
    Shorten,
)
from beam.constants import (
    BUFFER_STRATEGY_MULTIPLIERS_PPM,
    DONE_MARKER_TTL_SECONDS,
    EXPIRE_BATCH_PER_CALL,
    MAX_GRAINS,
    MAX_OPEN_HOLDS_PER_CUSTOMER,
    MAX_SETTLEMENTS_IN_FLIGHT_PER_CUSTOMER,
    MAX_TOKENS_PER_CALL,
    MAX_TOKENS_PER_REQUEST,
    SETTLE_DEADLINE_MS,
    SYSTEM_HOLD_PREFIX,
)
from beam.core import faults
from beam.core.auth import Action, Principal, RequestTokens, customer_not_found
from beam.core.commands import (
    CheckCommand,
    DeductCommand,
    FinalizeCommand,
    require_id,
    validate_check,
    validate_deduct,
    validate_finalize,
)
from beam.core.faults import now_ms
from beam.core.money import (
    Prices,
    affordable_output_tokens,
    check_settlement,
    multiplier_ppm,
    new_deficit,
    refunded,
    token_cost,
)
from beam.core.pricing import PriceBook
from beam.errors import BeamError, Reason, invalid
from beam.observability import SPENT
from beam.records import (
    Customer,
    EntryType,
    LedgerEntry,
    RecordedSettlement,
    RecordOutcome,
    SettleFence,
    Settlement,
    SettlementStatus,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_K = TypeVar("_K")

# A Check waits at most this long for the ledger to say whether its request id is settled.
SETTLED_LOOKUP_TIMEOUT_SECONDS = 1.0

_FINAL_STATUS = {
    "COMPLETED_SUCCESS": SettlementStatus.COMPLETED,
    "KILLED_INSUFFICIENT_BALANCE": SettlementStatus.KILLED,
    "FAILED_ERROR": SettlementStatus.FAILED,
    "FAILED_TIMEOUT": SettlementStatus.TIMEOUT,
}


@dataclass(frozen=True, slots=True)
class CheckResult:
    approved: bool
    remaining_balance: int
    request_token: str = ""
    rejection_reason: str = ""
    reserved_grains: int = 0
    max_affordable_completion_tokens: int = 0
    hold_expires_at_unix_ms: int = 0
    replayed: bool = False
    granted_completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class DeductResult:
    success: bool
    remaining_balance: int
    error_code: str = ""
    consumed_grains: int = 0
    reserved_grains: int = 0
    covered_completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class FinalizeResult:
    success: bool
    refunded_grains: int
    final_balance: int
    charged_grains: int
    overage_grains: int
    replayed: bool


@dataclass(frozen=True, slots=True)
class Balance:
    balance: int
    reserved: int

    @property
    def available(self) -> int:
        return self.balance - self.reserved


def fingerprint(*parts: object) -> str:
    text = "\x1f".join(str(p) for p in parts)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def price_args(prices: Prices | None) -> PriceArgs | None:
    if prices is None:
        return None
    return PriceArgs(
        prices.model,
        prices.input_grains_per_million,
        prices.output_grains_per_million,
        prices.cached_input_grains_per_million,
    )


def marker_of(s: Settlement) -> DoneMarker:
    return DoneMarker(
        s.charged_grains,
        s.refunded_grains,
        s.balance_after_grains,
        s.overage_grains,
        s.status.value,
        s.hold_nonce,
    )


def second_hold_entry_id(customer_id: str, request_id: str, nonce: str) -> str:
    """The ledger entry that charges a second hold opened under a settled request id on
    its own (``beam_settle``, migrations/0004): it never settles the request again."""
    return f"settlement:{customer_id}:{request_id}#{nonce}"


def request_id_conflict(request_id: str, why: str) -> BeamError:
    return BeamError(
        Reason.REQUEST_ID_CONFLICT, f"request_id {request_id!r} {why}", field="request_id"
    )


class Ledger:
    def __init__(
        self,
        scripts: Scripts,
        postgres: PostgresStore,
        prices: PriceBook,
        tokens: RequestTokens,
        *,
        default_hold_ttl_seconds: int = 900,
        max_settlements_per_customer: int = MAX_SETTLEMENTS_IN_FLIGHT_PER_CUSTOMER,
    ) -> None:
        self.scripts = scripts
        self.postgres = postgres
        self.prices = prices
        self.tokens = tokens
        self.default_hold_ttl_ms = default_hold_ttl_seconds * 1000
        self.max_settlements_per_customer = max_settlements_per_customer
        self._finishing: set[asyncio.Task[Any]] = set()
        # Finalizes this process is settling: per customer (the admission bound) and per
        # request id (the reaper leaves those to this process until their deadline).
        self._settling_customers: Counter[tuple[str, str]] = Counter()
        self._settling_requests: Counter[tuple[str, str, str]] = Counter()

    # -- accounts --------------------------------------------------------------------------

    async def load_account(self, customer: Customer, *, force: bool = False) -> None:
        """Put a customer's settled balance and configuration into Redis (keeps holds)."""
        await self.scripts.load_account(
            customer.tenant,
            customer.customer_id,
            balance=customer.balance_grains,
            version=customer.balance_version,
            state=customer.state.value,
            hold_ttl_ms=(customer.hold_ttl_seconds or 0) * 1000,
            max_request_grains=customer.max_request_grains or 0,
            buffer_ppm=BUFFER_STRATEGY_MULTIPLIERS_PPM.get(customer.buffer_strategy, 1_500_000),
            force=force,
        )

    async def reload_account(self, tenant: str, customer_id: str, *, force: bool = False) -> bool:
        """Copy a customer from PostgreSQL into Redis while none of its ledger entries can
        commit (see ``PostgresStore.customer_locked``). False if there is no such customer."""
        async with self.postgres.customer_locked(tenant, customer_id) as customer:
            if customer is None:
                return False
            await self.load_account(customer, force=force)
            return True

    async def loaded(self, tenant: str, customer_id: str, call: Callable[[], Awaitable[_T]]) -> _T:
        """Run a per-customer script, loading the account from PostgreSQL on first use."""
        try:
            return await call()
        except AccountNotLoaded:
            if not await self.reload_account(tenant, customer_id):
                raise customer_not_found(customer_id) from None
            return await call()

    # -- finishing what was committed --------------------------------------------------------

    async def finish(self, work: Coroutine[Any, Any, _T]) -> _T:
        """Run ``work`` (a commit and the Redis update after it) to the end even if the
        caller is cancelled (a client deadline, a disconnect, shutdown): the caller stops
        waiting, the work does not. ``drain`` waits for what is still running."""
        if faults.enabled(faults.BUG_UNSHIELDED_COMMIT):
            return await work
        task = asyncio.ensure_future(work)
        self._finishing.add(task)
        task.add_done_callback(_forget(self._finishing))
        return await asyncio.shield(task)

    async def drain(self, timeout_seconds: float) -> None:
        """Wait (bounded) for settlements whose callers went away."""
        if self._finishing:
            await asyncio.wait(list(self._finishing), timeout=timeout_seconds)

    async def release(
        self,
        tenant: str,
        customer_id: str,
        hold_id: str,
        nonce: str,
        entry: Settlement | LedgerEntry | Customer | None = None,
        marker: Settlement | None = None,
        *,
        only_status: str = "",
        attempt: int = 0,
    ) -> int:
        """Step (3): release hold ``nonce`` and adopt the balance ``entry`` committed (none
        for a void); returns the customer's ``held`` afterwards. ``attempt``: the settlement
        attempt releasing it; a hold a newer attempt has taken over is kept (its own
        settlement releases it), only the balance is adopted."""
        balance, version = _balance_of(entry)
        reply = await self.scripts.settle_hold(
            tenant,
            customer_id,
            hold_id,
            nonce=nonce,
            balance_after=balance,
            balance_version=version,
            marker=marker_of(marker) if marker is not None else None,
            marker_ttl_seconds=DONE_MARKER_TTL_SECONDS,
            only_status=only_status,
            max_attempt=attempt,
        )
        return reply.held

    # -- CheckBalance ------------------------------------------------------------------------

    async def check(self, principal: Principal, command: CheckCommand) -> CheckResult:
        principal.require(Action.ENFORCE)
        validate_check(command)
        principal.require_customer(command.customer_id)
        tenant = principal.tenant
        prices = (
            await self.prices.require(tenant, command.model, "metadata.model")
            if command.model
            else None
        )
        estimated = command.estimated_grains or _estimate(command, prices)
        ppm = multiplier_ppm(command.buffer_multiplier) if command.buffer_multiplier else 0
        digest = fingerprint(
            estimated,
            ppm,
            command.model,
            command.max_tokens,
            command.prompt_tokens,
            command.cached_prompt_tokens,
            sorted(command.custom_properties.items()),
            command.min_completion_tokens,
        )
        shorten = (
            Shorten(
                command.prompt_tokens - command.cached_prompt_tokens,
                command.cached_prompt_tokens,
                command.min_completion_tokens,
                command.max_tokens,
            )
            if not command.estimated_grains  # min_completion_tokens 0: never shortened
            else None
        )
        nonce = self.tokens.new_nonce()
        opened = await self.loaded(
            tenant,
            command.customer_id,
            lambda: self.scripts.open_hold(
                tenant,
                command.customer_id,
                command.request_id,
                now_ms=now_ms(),
                estimated_grains=estimated,
                multiplier_ppm=ppm,
                fingerprint=digest,
                nonce=nonce,
                prices=price_args(prices),
                default_ttl_ms=self.default_hold_ttl_ms,
                max_open_holds=MAX_OPEN_HOLDS_PER_CUSTOMER,
                expire_batch=EXPIRE_BATCH_PER_CALL,
                shorten=shorten,
            ),
        )
        if opened.outcome == "CONFLICT":
            raise request_id_conflict(command.request_id, "was already used with other parameters")
        if opened.outcome == "SETTLED":
            raise request_id_conflict(command.request_id, "is already settled")
        if opened.outcome == "REJECT":
            return CheckResult(
                approved=False, remaining_balance=opened.available, rejection_reason=opened.reason
            )
        if not faults.enabled(faults.BUG_FREE_REUSE):
            await self._refuse_settled_id(
                tenant, command.customer_id, command.request_id, opened.nonce, opened.replayed
            )
        affordable = 0
        if prices is not None:
            prompt_cost = token_cost(
                prices,
                input_tokens=command.prompt_tokens - command.cached_prompt_tokens,
                output_tokens=0,
                cached_input_tokens=command.cached_prompt_tokens,
            )
            affordable = affordable_output_tokens(
                opened.amount + max(opened.remaining, 0) - prompt_cost,
                prices,
                MAX_TOKENS_PER_CALL,
            )
        token = self.tokens.issue(tenant, command.customer_id, command.request_id, opened.nonce)
        return CheckResult(
            approved=True,
            remaining_balance=opened.remaining,
            request_token=token,
            reserved_grains=opened.amount,
            max_affordable_completion_tokens=affordable,
            hold_expires_at_unix_ms=opened.expires_at_ms,
            replayed=opened.replayed,
            granted_completion_tokens=opened.granted_out if not command.estimated_grains else 0,
        )

    async def _refuse_settled_id(
        self, tenant: str, customer_id: str, request_id: str, nonce: str, replayed: bool
    ) -> None:
        """The ledger, not the done marker (it expires), says whether a request id was
        settled. A hold is taken back only as far as nobody else relies on it
        (``retire_hold``): for a settled id, an untouched hold is voided before anyone has
        its token, a touched one is shrunk to what it consumed and charged on its own; for
        a Check whose caller left, only a hold this call opened and nobody used is voided."""
        try:
            await faults.point(faults.CHECK_OPENED)
            async with asyncio.timeout(SETTLED_LOOKUP_TIMEOUT_SECONDS):
                settled_nonce = await self.postgres.settled_nonce(tenant, customer_id, request_id)
        except faults.SimulatedCrash:
            raise
        except (BeamError, TimeoutError) as error:
            if isinstance(error, BeamError) and error.reason is not Reason.STORE_UNAVAILABLE:
                raise
            # The ledger is unreachable: enforcement goes on from Redis. Should this id turn
            # out to be settled, whatever its new hold consumes is charged on its own when
            # it settles (PostgresStore.record_settlement), so no token is ever free.
            log.warning("settled-id lookup unavailable; check proceeds from redis")
            return
        except BaseException:
            if not replayed:
                await _quietly(
                    self.finish(self._retire(tenant, customer_id, request_id, nonce, "cancelled"))
                )
            raise
        if settled_nonce is None:
            return
        if settled_nonce != nonce:  # equal: this hold's own settlement is committing now
            await self.finish(self._retire(tenant, customer_id, request_id, nonce, "settled"))
        raise request_id_conflict(request_id, "is already settled")

    async def _retire(
        self,
        tenant: str,
        customer_id: str,
        request_id: str,
        nonce: str,
        mode: Literal["cancelled", "settled"],
    ) -> str:
        return await self.scripts.retire_hold(
            tenant, customer_id, request_id, nonce=nonce, now_ms=now_ms(), mode=mode
        )

    # -- DeductTokens ------------------------------------------------------------------------

    async def deduct(self, principal: Principal, command: DeductCommand) -> DeductResult:
        principal.require(Action.ENFORCE)
        validate_deduct(command)
        principal.require_customer(command.customer_id)
        tenant = principal.tenant
        nonce = self.tokens.verify(
            command.request_token, tenant, command.customer_id, command.request_id
        )
        prices = await self.prices.lookup(tenant, command.model) if command.model else None
        kind: Literal["in", "out", "cached"] = (
            "out" if command.is_completion else "cached" if command.is_cached_prompt else "in"
        )
        reply = await self.loaded(
            tenant,
            command.customer_id,
            lambda: self.scripts.deduct(
                tenant,
                command.customer_id,
                command.request_id,
                now_ms=now_ms(),
                nonce=nonce,
                tokens=command.tokens_consumed,
                token_kind=kind,
                sequence=command.sequence_number,
                prices=price_args(prices),
                expire_batch=EXPIRE_BATCH_PER_CALL,
                max_tokens_per_request=MAX_TOKENS_PER_REQUEST,
                reserve_ahead_tokens=command.reserve_ahead_tokens,
                prompt_tokens=command.prompt_tokens,
                cached_prompt_tokens=command.cached_prompt_tokens,
            ),
        )
        if reply.outcome == "ERR":
            raise _deduct_error(reply.code, command)
        return DeductResult(
            success=reply.outcome == "OK",
            remaining_balance=reply.available,
            error_code=reply.code,
            consumed_grains=reply.consumed,
            reserved_grains=reply.amount,
            covered_completion_tokens=reply.covered_out,
        )

    # -- FinalizeRequest ---------------------------------------------------------------------

    async def finalize(self, principal: Principal, command: FinalizeCommand) -> FinalizeResult:
        principal.require(Action.ENFORCE)
        validate_finalize(command)
        principal.require_customer(command.customer_id)
        tenant = principal.tenant
        token_nonce = (
            self.tokens.verify(
                command.request_token, tenant, command.customer_id, command.request_id
            )
            if command.request_token
            else ""
        )
        customer = (tenant, command.customer_id)
        if self._settling_customers[customer] >= self.max_settlements_per_customer:
            # Refused before anything is reserved: the hold (if any) stays open, a retry
            # settles it. Without a bound, callers that time out leave their settlements
            # running and a hot customer's queue only grows.
            raise BeamError(
                Reason.STORE_UNAVAILABLE,
                f"{self.max_settlements_per_customer} settlements of customer "
                f"{command.customer_id!r} are in flight: retry with back-off",
            )
        # Counted now (before the task starts, so concurrent calls see it) until the work
        # ends, not until its caller stops waiting.
        request = (tenant, command.customer_id, command.request_id)
        self._settling_customers[customer] += 1
        self._settling_requests[request] += 1
        # From here on the settlement runs to the end even if the caller goes away: once
        # the hold is reserving the charge, only a commit (or the reaper) may finish it.
        return await self.finish(
            self._counted(customer, request, self._settle_request(tenant, command, token_nonce))
        )

    async def _counted(
        self,
        customer: tuple[str, str],
        request: tuple[str, str, str],
        work: Coroutine[Any, Any, _T],
    ) -> _T:
        """Run ``work``, then uncount it (``finalize`` counted it)."""
        try:
            return await work
        finally:
            _uncount(self._settling_customers, customer)
            _uncount(self._settling_requests, request)

    def settling_here(self, tenant: str, customer_id: str, request_id: str) -> bool:
        """Whether this process has a Finalize of that request in flight."""
        return (tenant, customer_id, request_id) in self._settling_requests

    async def _settle_request(
        self, tenant: str, command: FinalizeCommand, token_nonce: str
    ) -> FinalizeResult:
        prices = await self.prices.lookup(tenant, command.model) if command.model else None
        begun = await self._begin(tenant, command, token_nonce, prices)
        if begun.outcome == "ERR" and begun.code == "UNKNOWN_MODEL" and not command.model:
            # A late Finalize with tokens but no model: price them as the settlement did.
            earlier = await self.postgres.find_settlement(
                tenant, command.customer_id, command.request_id
            )
            if earlier is not None and earlier.model:
                prices = await self.prices.lookup(tenant, earlier.model)
                begun = await self._begin(tenant, command, token_nonce, prices)
        if begun.outcome == "DONE":
            assert begun.done is not None
            return _replayed(command, begun.done, token_nonce)
        if begun.outcome == "ERR" and begun.code == "INVALID_REQUEST_TOKEN":
            # The hold under this id is not the token's: a retry of a Finalize the ledger
            # already settled (its hold gone, another one opened since) replays its answer.
            earlier = await self.postgres.find_settlement(
                tenant, command.customer_id, command.request_id
            )
            if (
                earlier is not None
                and token_nonce
                and earlier.hold_nonce == token_nonce
                and earlier.status is not SettlementStatus.EXPIRED  # that one adjusts, below
            ):
                return _finalize_result(RecordedSettlement(earlier, RecordOutcome.REPLAY))
        if begun.outcome == "ERR":
            raise _finalize_error(begun.code, command)
        assert begun.hold is not None
        hold = begun.hold
        settlement = _settlement(tenant, command, hold, token_nonce)
        check_settlement(
            reserved_grains=settlement.reserved_grains,
            charged_grains=settlement.charged_grains,
            refunded_grains=settlement.refunded_grains,
            overage_grains=0,
        )
        await faults.point(faults.FINALIZE_BEGUN)
        return await self._commit_finalize(command, hold, settlement)

    async def _begin(
        self, tenant: str, command: FinalizeCommand, token_nonce: str, prices: Prices | None
    ) -> BeginSettlementReply:
        claim_nonce = self.tokens.new_nonce()
        return await self.loaded(
            tenant,
            command.customer_id,
            lambda: self.scripts.begin_settlement(
                tenant,
                command.customer_id,
                command.request_id,
                now_ms=now_ms(),
                token_nonce=token_nonce,
                claim_nonce=claim_nonce,
                total_cost_grains=command.total_actual_cost_grains,
                prompt_tokens=command.actual_prompt_tokens,
                completion_tokens=command.actual_completion_tokens,
                cached_prompt_tokens=command.actual_cached_prompt_tokens,
                prices=price_args(prices),
                expire_batch=EXPIRE_BATCH_PER_CALL,
                settle_deadline_ms=SETTLE_DEADLINE_MS,
            ),
        )

    async def _commit_finalize(
        self, command: FinalizeCommand, hold: SettlingHold, settlement: Settlement
    ) -> FinalizeResult:
        """Steps (2) and (3) of a Finalize; runs to the end once started (``finish``)."""
        tenant, customer_id, request_id = settlement.tenant, command.customer_id, command.request_id
        recorded = await self.postgres.record_settlement(
            settlement,
            _created_at(hold),
            # A claim (Redis has no hold for this id) names a hold only through its token:
            # if that hold is not the one that settled the id, it is a second hold Redis
            # lost, and the usage reported for it is charged on its own, under the same
            # entry id the reaper would use (settlement:<c>:<r>#<nonce>): never twice. A
            # claim without a token names no hold and charges nothing again; nor does a
            # claim whose id was settled by a settlement that names no hold (migration 0007).
            charge_other_hold=not hold.claim or bool(settlement.hold_nonce),
            fence=SettleFence(request_id, hold.nonce, hold.attempt),
            claim=hold.claim,
        )
        await faults.point(faults.FINALIZE_COMMITTED)
        first = recorded.settlement
        if recorded.outcome is RecordOutcome.OTHER_HOLD and (
            not hold.claim or settlement.hold_nonce
        ):
            # A hold (or a token) of this id that is not the one that settled it: the id was
            # reused. Whatever that hold consumed was charged on its own; nothing settles
            # the request again.
            await self.release(
                tenant, customer_id, request_id, hold.nonce, recorded.orphan_entry,
                attempt=hold.attempt,
            )  # fmt: skip
            raise request_id_conflict(request_id, "is already settled by another hold")
        if first.status is SettlementStatus.EXPIRED and recorded.outcome is not RecordOutcome.NEW:
            return await self._adjust_expired(command, hold, first)
        await self.release(
            tenant, customer_id, request_id, hold.nonce, first, marker=first, attempt=hold.attempt
        )
        if recorded.outcome is RecordOutcome.NEW:
            SPENT.labels(first.model or "none").inc(first.charged_grains)
        return _finalize_result(recorded)

    async def _adjust_expired(
        self, command: FinalizeCommand, hold: SettlingHold, expired: Settlement
    ) -> FinalizeResult:
        """A Finalize that arrives after its hold expired and was charged what it consumed:
        the provider's usage wins, through one ``adjustment`` ledger entry (never an edit),
        idempotent by request id. The hold (or claim) that reserved the charge is released
        only after the adjustment committed."""
        tenant, customer_id, request_id = expired.tenant, command.customer_id, command.request_id
        reported = command.total_actual_cost_grains or (
            command.actual_prompt_tokens or command.actual_completion_tokens
        )
        actual = hold.charged if reported else expired.charged_grains
        delta = actual - expired.charged_grains
        transaction_id = f"adjustment:{customer_id}:{request_id}"
        if delta == 0:
            earlier = await self.postgres.find_entry(tenant, transaction_id)
            # Adopt the newest committed balance: an adjustment with other usage may have
            # committed while its own Redis half was cut short (its claim is this hold).
            adopted = earlier if earlier is not None else expired
            await self.release(
                tenant, customer_id, request_id, hold.nonce, adopted, expired,
                attempt=hold.attempt,
            )  # fmt: skip
            if earlier is not None:
                raise request_id_conflict(request_id, "was already finalized with other usage")
            await self._label_let_through(command, tenant)
            return FinalizeResult(
                True, 0, expired.balance_after_grains, expired.charged_grains, 0, True
            )
        try:
            entry = await self.postgres.append_entry(
                tenant=tenant,
                customer_id=customer_id,
                transaction_id=transaction_id,
                entry_type=EntryType.ADJUSTMENT,
                amount_grains=-delta,
                description="late finalize of an expired hold",
                reference_id=request_id,
                fingerprint=fingerprint("adjustment", customer_id, request_id, delta),
                fence=SettleFence(request_id, hold.nonce, hold.attempt),
            )
        except BeamError as error:
            if error.reason is not Reason.TRANSACTION_ID_CONFLICT:
                raise
            # Another late Finalize committed its adjustment; if a fault cut its Redis half
            # short, the claim it left settling is the one we hold now, and releasing it
            # without adopting that adjustment would offer its grains again.
            earlier = await self.postgres.find_entry(tenant, transaction_id)
            await self.release(
                tenant, customer_id, request_id, hold.nonce, earlier, attempt=hold.attempt
            )
            raise request_id_conflict(
                request_id, "was already finalized with other usage"
            ) from None
        await faults.point(faults.ADJUST_COMMITTED)
        await self.release(
            tenant, customer_id, request_id, hold.nonce, entry, expired, attempt=hold.attempt
        )
        if delta > 0 and not entry.replayed:
            SPENT.labels(expired.model or "none").inc(delta)
        await self._label_let_through(command, tenant)
        after = entry.balance_after_grains
        return FinalizeResult(
            success=True,
            refunded_grains=max(0, -delta),
            final_balance=after,
            charged_grains=actual,
            overage_grains=new_deficit(after + delta, after),
            replayed=entry.replayed,
        )

    async def _label_let_through(self, command: FinalizeCommand, tenant: str) -> None:
        """A let-through Finalize that found its request settled by the reaper (its hold
        expired first, as it does in a long outage): the request and its expiry's and
        adjustment's usage events are labelled all the same. After the settlement is
        committed and released, and best effort: a label never fails a settlement (a retry
        of the same Finalize labels again)."""
        if not command.let_through:
            return
        try:
            await self.postgres.label_let_through(tenant, command.customer_id, command.request_id)
        except Exception:  # a label: the money is settled
            log.warning(
                "request %s of customer %s: let-through label not recorded",
                command.request_id, command.customer_id, exc_info=True,
            )  # fmt: skip

    # -- the reaper's half: holds whose settlement never finished ----------------------------

    async def complete_settling(self, tenant: str, customer_id: str, hold: HoldView) -> str:
        """A hold has been settling for a while: its process may have died between the
        commit and the Redis update. Read the ledger (after any commit in flight for this
        customer): committed -> finish step (3) from it; not committed and past the hold's
        deadline -> abandon it (a request hold is then charged what it consumed, like any
        expired hold). Returns what was done: completed, abandoned or pending."""
        system = hold.hold_id.startswith(SYSTEM_HOLD_PREFIX)  # a debit or a credit
        if (
            not system
            and now_ms() < hold.deadline_ms
            and self.settling_here(tenant, customer_id, hold.hold_id)
        ):
            # Its settlement is running in this process and will finish steps (2) and (3)
            # itself: reading the ledger now would only queue behind it on the customer's
            # row lock (under load, on every reaper pass). Past the deadline the reaper
            # fences and abandons it like any other.
            return "pending"
        entries = (
            [hold.hold_id.partition(":")[2]]
            if system
            else [
                f"adjustment:{customer_id}:{hold.hold_id}",  # a late Finalize's difference
                # A hold charged on its own under a settled id; for a claim, the hold its
                # request token names (a second hold Redis lost).
                second_hold_entry_id(customer_id, hold.hold_id, hold.token or hold.nonce),
            ]
        )
        # Past its deadline, the hold is fenced under the lock the reading takes: from then
        # on a commit of it that has not landed never will, so abandoning it below cannot
        # leave a commit that nothing reserves.
        past_deadline = now_ms() >= hold.deadline_ms
        fence = SettleFence(hold.hold_id, hold.nonce, hold.attempt) if past_deadline else None
        settlement, found, customer = await self.postgres.committed_after_lock(
            tenant, customer_id, "" if system else hold.hold_id, entries, fence
        )
        if customer is not None and _committed(hold, settlement, found, entries):
            # The customer's balance as the ledger has it now (it includes this entry).
            ours = settlement is not None and not system and settlement.hold_nonce == hold.nonce
            await self.release(
                tenant,
                customer_id,
                hold.hold_id,
                hold.nonce,
                customer,
                settlement if ours or hold.kind == "claim" else None,
                attempt=hold.attempt,  # a Finalize that took the hold over since keeps it
            )
            return "completed"
        if customer is not None:
            # Not finished yet, but Redis may still lag entries that did commit (an expiry
            # whose release was cut short before a Finalize took the hold over): adopting the
            # ledger's balance is safe while this hold keeps reserving its charge.
            await self.scripts.apply_balance(
                tenant,
                customer_id,
                balance=customer.balance_grains,
                version=customer.balance_version,
            )
        if past_deadline:
            await self.scripts.abandon_settlement(
                tenant,
                customer_id,
                hold.hold_id,
                nonce=hold.nonce,
                attempt=hold.attempt,
                now_ms=now_ms(),
            )
            return "abandoned"
        return "pending"

    # -- GetBalance --------------------------------------------------------------------------

    async def balance(self, principal: Principal, customer_id: str) -> Balance:
        principal.require(Action.READ)
        require_id(customer_id, "customer_id")
        principal.require_customer(customer_id)
        tenant = principal.tenant
        view = await self.loaded(
            tenant,
            customer_id,
            lambda: self.scripts.read_balance(
                tenant, customer_id, now_ms=now_ms(), expire_batch=EXPIRE_BATCH_PER_CALL
            ),
        )
        return Balance(balance=view.balance, reserved=view.held)

    async def adopt_balance(self, tenant: str, customer_id: str, entry: LedgerEntry) -> int:
        """After a credit committed: let Redis adopt it; returns ``held`` (0 if not loaded)."""
        view = await self.scripts.apply_balance(
            tenant, customer_id, balance=entry.balance_after_grains, version=entry.balance_version
        )
        return view.held


def _estimate(command: CheckCommand, prices: Prices | None) -> int:
    assert prices is not None, "validate_check requires a model when estimated_grains is 0"
    estimate = token_cost(
        prices,
        input_tokens=command.prompt_tokens - command.cached_prompt_tokens,
        output_tokens=command.max_tokens,
        cached_input_tokens=command.cached_prompt_tokens,
    )
    if estimate > MAX_GRAINS:
        raise invalid("metadata.max_tokens", "the estimated cost exceeds the grain limit")
    return max(estimate, 1)


def _forget(tasks: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("settlement finished with an error", exc_info=task.exception())

    return done


async def _quietly(work: Awaitable[Any]) -> None:
    """Best-effort clean-up inside an error path: its own failure must not mask the error
    being raised (the reaper abandons whatever it leaves)."""
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await work


def _uncount(counter: Counter[_K], key: _K) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def _balance_of(entry: Settlement | LedgerEntry | Customer | None) -> tuple[int, int]:
    if entry is None:
        return 0, 0
    if isinstance(entry, Customer):
        return entry.balance_grains, entry.balance_version
    return entry.balance_after_grains, entry.balance_version


def _committed(
    hold: HoldView, settlement: Settlement | None, found: frozenset[str], entries: list[str]
) -> bool:
    """Whether what ``hold`` was settling is in the ledger (``entries``: the ids of the
    entries that may settle it, as complete_settling lists them)."""
    if hold.hold_id.startswith(SYSTEM_HOLD_PREFIX):
        return entries[0] in found  # the debit or credit itself
    adjustment, second_hold = entries
    if settlement is None:
        return False
    if hold.kind != "claim" and settlement.hold_nonce != hold.nonce:
        return second_hold in found  # charged on its own under a settled id
    if hold.kind == "claim" and hold.token and settlement.hold_nonce not in ("", hold.token):
        # A claim for a token whose hold did not settle the id: what it commits is that
        # hold's own entry, not the settlement already there (migration 0007).
        return second_hold in found
    if settlement.status is SettlementStatus.EXPIRED:
        return adjustment in found  # a late Finalize: its adjustment is what it commits
    return True


def _settlement(
    tenant: str, command: FinalizeCommand, hold: SettlingHold, token_nonce: str
) -> Settlement:
    return Settlement(
        tenant=tenant,
        customer_id=command.customer_id,
        request_id=command.request_id,
        status=_FINAL_STATUS[command.status],
        model=command.model or hold.model,
        estimated_grains=hold.estimated,
        reserved_grains=hold.reserved,
        consumed_grains=hold.consumed,
        charged_grains=hold.charged,
        refunded_grains=refunded(hold.reserved, hold.charged),
        prompt_tokens=command.actual_prompt_tokens,
        completion_tokens=command.actual_completion_tokens,
        cached_prompt_tokens=command.actual_cached_prompt_tokens,
        hold_nonce=token_nonce if hold.claim else hold.nonce,
        let_through=command.let_through,
    )


def _finalize_result(recorded: RecordedSettlement) -> FinalizeResult:
    s = recorded.settlement
    check_settlement(
        reserved_grains=s.reserved_grains,
        charged_grains=s.charged_grains,
        refunded_grains=s.refunded_grains,
        overage_grains=s.overage_grains,
    )
    return FinalizeResult(
        success=True,
        refunded_grains=s.refunded_grains,
        final_balance=s.balance_after_grains,
        charged_grains=s.charged_grains,
        overage_grains=s.overage_grains,
        replayed=recorded.outcome is not RecordOutcome.NEW,
    )


def _replayed(command: FinalizeCommand, done: DoneMarker, token_nonce: str) -> FinalizeResult:
    if token_nonce and done.nonce != token_nonce:
        raise request_id_conflict(command.request_id, "is already settled by another hold")
    return FinalizeResult(True, done.refunded, done.final_balance, done.charged, done.overage, True)


def _created_at(hold: SettlingHold) -> datetime | None:
    if hold.claim or hold.created_ms <= 0:
        return None
    return datetime.fromtimestamp(hold.created_ms / 1000, tz=UTC)


def _finalize_error(code: str, command: FinalizeCommand) -> BeamError:
    if code == "SETTLEMENT_IN_FLIGHT":
        return BeamError(
            Reason.STORE_UNAVAILABLE,
            f"a settlement of request {command.request_id!r} for another request token is "
            "in flight: retry with back-off",
        )
    if code == "INVALID_REQUEST_TOKEN":
        return BeamError(
            Reason.INVALID_REQUEST_TOKEN,
            "request_token belongs to another hold of this request id",
            field="request_token",
        )
    if code == "UNKNOWN_MODEL":
        return BeamError(
            Reason.UNKNOWN_MODEL,
            "model: the hold has no locked price and no known model was given",
            field="model",
        )
    assert code == "COST_LIMIT", code
    return invalid("actual_completion_tokens", "cost exceeds the grain limit", Reason.OUT_OF_RANGE)


def _deduct_error(code: str, command: DeductCommand) -> BeamError:
    if code == "HOLD_NOT_FOUND":
        return BeamError(
            Reason.HOLD_NOT_FOUND,
            f"no open hold for request_id {command.request_id!r} (never checked, or expired "
            "and settled)",
            field="request_id",
        )
    if code == "TOKEN_LIMIT":
        return invalid(
            "tokens_consumed",
            f"a request may consume at most {MAX_TOKENS_PER_REQUEST} tokens",
            Reason.OUT_OF_RANGE,
        )
    if code == "INVALID_REQUEST_TOKEN":
        return BeamError(
            Reason.INVALID_REQUEST_TOKEN,
            "request_token belongs to another hold of this request id",
            field="request_token",
        )
    if code == "UNKNOWN_MODEL":
        return BeamError(
            Reason.UNKNOWN_MODEL,
            "model: the hold has no locked price and no known model was given",
            field="model",
        )
    reason = Reason[code]
    return BeamError(reason, f"{code.lower().replace('_', ' ')}", field="request_id")
