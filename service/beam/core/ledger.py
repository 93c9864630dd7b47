"""The four-call lifecycle and the money invariants (DESIGN §1-§2).

Where each piece of state lives, and why the order of writes is safe:

* Redis holds in-flight state: holds and ``held``, plus a *cache* of the settled balance
  tagged with PostgreSQL's ``balance_version``. Check and Deduct are one EVALSHA each.
* PostgreSQL is the ledger. Every settled movement (Finalize, expiry, credit, debit) is
  committed there FIRST; only then does a script release the hold in Redis and adopt the
  new balance if its version is newer. A crash between the two leaves an open hold whose
  settlement is already durable: the next Finalize retry, or the reaper when the hold
  expires, finds the settlement in PostgreSQL (idempotent by request id) and completes
  the Redis half. Redis can therefore never be ahead of the ledger, and a stale or
  repeated apply is ignored by version.
* There are NO cross-process locks: atomicity per customer comes from Lua (Redis runs one
  script at a time) and from ``SELECT ... FOR UPDATE`` on the customer row in PostgreSQL.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from beam.adapters.postgres_store import PostgresStore
from beam.adapters.redis_store import RedisStore
from beam.constants import (
    BUFFER_STRATEGY_MULTIPLIERS_PPM,
    DONE_MARKER_TTL_SECONDS,
    EXPIRE_BATCH_PER_CALL,
    MAX_GRAINS,
    MAX_OPEN_HOLDS_PER_CUSTOMER,
    MAX_TOKENS_PER_CALL,
    MAX_TOKENS_PER_REQUEST,
    SCRIPT_APPLY_BALANCE,
    SCRIPT_DEDUCT,
    SCRIPT_LOAD_ACCOUNT,
    SCRIPT_OPEN_HOLD,
    SCRIPT_PEEK_HOLD,
    SCRIPT_READ_BALANCE,
    SCRIPT_SETTLE_HOLD,
    customer_keys,
)
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
from beam.core.money import Prices, affordable_output_tokens, multiplier_ppm, token_cost
from beam.core.pricing import PriceBook
from beam.errors import BeamError, Reason, invalid
from beam.records import Customer, EntryType, Settlement, SettlementStatus

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


@dataclass(frozen=True, slots=True)
class DeductResult:
    success: bool
    remaining_balance: int
    error_code: str = ""
    consumed_grains: int = 0
    reserved_grains: int = 0


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


@dataclass(frozen=True, slots=True)
class Hold:
    """A hold as peek_hold reports it."""

    balance: int
    held: int
    amount: int
    consumed: int
    in_tokens: int
    out_tokens: int
    cached_tokens: int
    prices: Prices | None
    nonce: str
    estimated: int
    status: str
    created_ms: int


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def fingerprint(*parts: object) -> str:
    text = "\x1f".join(str(p) for p in parts)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class Ledger:
    def __init__(
        self,
        redis: RedisStore,
        postgres: PostgresStore,
        prices: PriceBook,
        tokens: RequestTokens,
        *,
        default_hold_ttl_seconds: int = 900,
    ) -> None:
        self.redis = redis
        self.postgres = postgres
        self.prices = prices
        self.tokens = tokens
        self.default_hold_ttl_ms = default_hold_ttl_seconds * 1000

    # -- accounts --------------------------------------------------------------------------

    async def load_account(self, customer: Customer, *, force: bool = False) -> list[int]:
        """Put a customer's settled balance and configuration into Redis (keeps holds)."""
        ttl_ms = (customer.hold_ttl_seconds or 0) * 1000
        buffer_ppm = BUFFER_STRATEGY_MULTIPLIERS_PPM.get(customer.buffer_strategy, 1_500_000)
        result = await self.redis.run(
            SCRIPT_LOAD_ACCOUNT,
            customer_keys(customer.tenant, customer.customer_id),
            [
                customer.balance_grains,
                customer.balance_version,
                customer.state.value,
                ttl_ms,
                customer.max_request_grains or 0,
                "1" if force else "0",
                buffer_ppm,
            ],
            idempotent=True,
        )
        return [int(v) for v in result]

    async def reload_account(self, tenant: str, customer_id: str, *, force: bool = False) -> bool:
        """Copy a customer from PostgreSQL into Redis while none of its ledger entries can
        commit (see ``PostgresStore.customer_locked``). False if there is no such customer."""
        async with self.postgres.customer_locked(tenant, customer_id) as customer:
            if customer is None:
                return False
            await self.load_account(customer, force=force)
            return True

    async def _ensure_loaded(self, tenant: str, customer_id: str) -> None:
        if not await self.reload_account(tenant, customer_id):
            raise customer_not_found(customer_id)

    async def run_customer_script(
        self,
        script: str,
        tenant: str,
        customer_id: str,
        request_id: str,
        args: list[Any],
        *,
        idempotent: bool,
    ) -> list[Any]:
        """Run a per-customer script, loading the account from PostgreSQL on first use."""
        keys = customer_keys(tenant, customer_id, request_id)
        result = await self.redis.run(script, keys, args, idempotent=idempotent)
        if result and result[0] == "NOT_LOADED":
            await self._ensure_loaded(tenant, customer_id)
            result = await self.redis.run(script, keys, args, idempotent=idempotent)
        assert isinstance(result, list)
        return result

    # -- CheckBalance ------------------------------------------------------------------------

    async def check(self, principal: Principal, command: CheckCommand) -> CheckResult:
        principal.require(Action.ENFORCE)
        validate_check(command)
        principal.require_customer(command.customer_id)
        tenant = principal.tenant
        prices = (
            await self.prices.require(tenant, command.model, "metadata.model")
            if (command.model)
            else None
        )
        estimated = command.estimated_grains or _estimate(command, prices)
        ppm = multiplier_ppm(command.buffer_multiplier) if command.buffer_multiplier else 0
        nonce = self.tokens.new_nonce()
        digest = fingerprint(
            estimated, ppm, command.model, command.max_tokens, command.prompt_tokens,
            command.cached_prompt_tokens, sorted(command.custom_properties.items()),
        )  # fmt: skip
        result = await self.run_customer_script(
            SCRIPT_OPEN_HOLD,
            tenant,
            command.customer_id,
            command.request_id,
            [
                now_ms(), command.request_id, estimated, ppm, digest, nonce, command.model,
                *_price_args(prices), self.default_hold_ttl_ms, MAX_OPEN_HOLDS_PER_CUSTOMER,
                EXPIRE_BATCH_PER_CALL,
            ],
            idempotent=True,
        )  # fmt: skip
        return self._check_result(principal, command, prices, result)

    def _check_result(
        self,
        principal: Principal,
        command: CheckCommand,
        prices: Prices | None,
        result: list[Any],
    ) -> CheckResult:
        outcome = result[0]
        if outcome in ("CONFLICT", "SETTLED"):
            raise BeamError(
                Reason.REQUEST_ID_CONFLICT,
                f"request_id {command.request_id!r} was already used with other parameters"
                if outcome == "CONFLICT"
                else f"request_id {command.request_id!r} is already settled",
                field="request_id",
            )
        if outcome == "REJECT":
            return CheckResult(
                approved=False, remaining_balance=int(result[2]), rejection_reason=result[1]
            )
        assert outcome == "OK", result
        amount, remaining, nonce, expires_at = (
            int(result[1]), int(result[2]), str(result[3]), int(result[4]),
        )  # fmt: skip
        affordable = 0
        if prices is not None:
            prompt_cost = token_cost(
                prices,
                input_tokens=command.prompt_tokens - command.cached_prompt_tokens,
                output_tokens=0,
                cached_input_tokens=command.cached_prompt_tokens,
            )
            affordable = affordable_output_tokens(
                amount + max(remaining, 0) - prompt_cost, prices, MAX_TOKENS_PER_CALL
            )
        token = self.tokens.issue(principal.tenant, command.customer_id, command.request_id, nonce)
        return CheckResult(
            approved=True,
            remaining_balance=remaining,
            request_token=token,
            reserved_grains=amount,
            max_affordable_completion_tokens=affordable,
            hold_expires_at_unix_ms=expires_at,
        )

    # -- DeductTokens ------------------------------------------------------------------------

    async def deduct(self, principal: Principal, command: DeductCommand) -> DeductResult:
        principal.require(Action.ENFORCE)
        validate_deduct(command)
        principal.require_customer(command.customer_id)
        nonce = self.tokens.verify(
            command.request_token, principal.tenant, command.customer_id, command.request_id
        )
        prices = (
            await self.prices.lookup(principal.tenant, command.model) if (command.model) else None
        )
        kind = "out" if command.is_completion else "cached" if command.is_cached_prompt else "in"
        result = await self.run_customer_script(
            SCRIPT_DEDUCT,
            principal.tenant,
            command.customer_id,
            command.request_id,
            [
                now_ms(), command.request_id, nonce, command.tokens_consumed, kind,
                command.sequence_number, command.model, *_price_args(prices),
                EXPIRE_BATCH_PER_CALL, MAX_TOKENS_PER_REQUEST,
            ],
            idempotent=command.sequence_number > 0,
        )  # fmt: skip
        outcome, code = result[0], result[1]
        if outcome == "ERR":
            raise _deduct_error(code, command)
        return DeductResult(
            success=outcome == "OK",
            remaining_balance=int(result[2]),
            error_code=code,
            consumed_grains=int(result[3]),
            reserved_grains=int(result[4]),
        )

    # -- FinalizeRequest ---------------------------------------------------------------------

    async def finalize(self, principal: Principal, command: FinalizeCommand) -> FinalizeResult:
        principal.require(Action.ENFORCE)
        validate_finalize(command)
        principal.require_customer(command.customer_id)
        tenant = principal.tenant
        nonce = (
            self.tokens.verify(
                command.request_token, tenant, command.customer_id, command.request_id
            )
            if command.request_token
            else None
        )
        peek = await self.run_customer_script(
            SCRIPT_PEEK_HOLD, tenant, command.customer_id, command.request_id,
            [now_ms(), EXPIRE_BATCH_PER_CALL], idempotent=True,
        )  # fmt: skip
        if peek[0] == "DONE" and peek[5] != SettlementStatus.EXPIRED.value:
            return FinalizeResult(
                True, int(peek[2]), int(peek[3]), int(peek[1]), int(peek[4]), True
            )
        hold = _hold(peek) if peek[0] == "HOLD" else None
        if hold is not None and nonce is not None and nonce != hold.nonce:
            raise BeamError(
                Reason.INVALID_REQUEST_TOKEN,
                "request_token belongs to another hold of this request id",
                field="request_token",
            )
        if hold is None:
            # No hold in Redis: settled before (its marker gone or expired), or never held.
            existing = await self.postgres.find_settlement(
                tenant, command.customer_id, command.request_id
            )
            if existing is not None:
                return await self._answer(tenant, command, existing)
        available = int(peek[1]) - int(peek[2]) if peek[0] in ("HOLD", "NONE") else 0
        settlement = await self._settlement(tenant, command, hold, available)
        recorded = await self.postgres.record_settlement(settlement, _created_at(hold))
        return await self._answer(tenant, command, recorded)

    async def _answer(
        self, tenant: str, command: FinalizeCommand, recorded: Settlement
    ) -> FinalizeResult:
        """Finish the Redis half (idempotent) and answer with the ledger's settlement."""
        await self.settle_in_redis(recorded)
        if recorded.replayed and recorded.status is SettlementStatus.EXPIRED:
            return await self._adjust_expired(tenant, command, recorded)
        return FinalizeResult(
            success=True,
            refunded_grains=recorded.refunded_grains,
            final_balance=recorded.balance_after_grains,
            charged_grains=recorded.charged_grains,
            overage_grains=recorded.overage_grains,
            replayed=recorded.replayed,
        )

    async def _adjust_expired(
        self, tenant: str, command: FinalizeCommand, expired: Settlement
    ) -> FinalizeResult:
        """A Finalize that arrives after its hold expired and was charged what it consumed:
        the provider's usage wins, through one ``adjustment`` ledger entry (never an edit),
        idempotent by request id. Without a reported cost the tokens are priced at the
        model's current price (the hold that locked its prices is gone)."""
        if (
            command.total_actual_cost_grains
            or command.actual_prompt_tokens
            or (command.actual_completion_tokens)
        ):
            if not command.total_actual_cost_grains and not command.model:
                command = replace(command, model=expired.model)
            actual = await self._actual_cost(tenant, command, None)
        else:
            actual = expired.charged_grains
        delta = actual - expired.charged_grains
        transaction_id = f"adjustment:{command.customer_id}:{command.request_id}"
        if delta == 0:
            if await self.postgres.find_entry(tenant, transaction_id) is not None:
                raise BeamError(
                    Reason.REQUEST_ID_CONFLICT,
                    f"request_id {command.request_id!r} was already finalized with other usage",
                    field="request_id",
                )
            return FinalizeResult(
                True, 0, expired.balance_after_grains, expired.charged_grains, 0, True
            )
        entry = await self.postgres.append_entry(
            tenant=tenant,
            customer_id=command.customer_id,
            transaction_id=transaction_id,
            entry_type=EntryType.ADJUSTMENT,
            amount_grains=-delta,
            description="late finalize of an expired hold",
            reference_id=command.request_id,
            fingerprint=fingerprint("adjustment", command.customer_id, command.request_id, delta),
        )
        await self.adopt_balance(
            tenant, command.customer_id, entry.balance_after_grains, entry.balance_version
        )
        return FinalizeResult(
            success=True,
            refunded_grains=max(0, -delta),
            final_balance=entry.balance_after_grains,
            charged_grains=actual,
            overage_grains=max(0, min(delta, -entry.balance_after_grains)),
            replayed=entry.replayed,
        )

    async def _settlement(
        self, tenant: str, command: FinalizeCommand, hold: Hold | None, available: int
    ) -> Settlement:
        charged = await self._actual_cost(tenant, command, hold)
        reserved = hold.amount if hold else 0
        # `available` excludes this hold (it is part of held); the hold itself pays first.
        overage = max(0, charged - reserved - max(available, 0))
        return Settlement(
            tenant=tenant,
            customer_id=command.customer_id,
            request_id=command.request_id,
            status=_FINAL_STATUS[command.status],
            model=command.model or (hold.prices.model if hold and hold.prices else ""),
            estimated_grains=hold.estimated if hold else 0,
            reserved_grains=reserved,
            consumed_grains=hold.consumed if hold else 0,
            charged_grains=charged,
            refunded_grains=max(0, reserved - charged),
            overage_grains=overage,
            prompt_tokens=command.actual_prompt_tokens,
            completion_tokens=command.actual_completion_tokens,
            cached_prompt_tokens=command.actual_cached_prompt_tokens,
        )

    async def _actual_cost(self, tenant: str, command: FinalizeCommand, hold: Hold | None) -> int:
        """The provider's cost if given; else the actual tokens at the locked prices. With
        neither, what the stream already consumed (delivered tokens are never free)."""
        if command.total_actual_cost_grains:
            return command.total_actual_cost_grains
        tokens = (command.actual_prompt_tokens, command.actual_completion_tokens)
        if tokens == (0, 0):
            return hold.consumed if hold else 0
        prices = hold.prices if hold and hold.prices else None
        if prices is None:
            prices = await self.prices.require(tenant, command.model)
        cost = token_cost(
            prices,
            input_tokens=command.actual_prompt_tokens - command.actual_cached_prompt_tokens,
            output_tokens=command.actual_completion_tokens,
            cached_input_tokens=command.actual_cached_prompt_tokens,
        )
        if cost > MAX_GRAINS:
            raise invalid("actual_completion_tokens", "cost exceeds the grain limit")
        return cost

    async def settle_in_redis(self, s: Settlement) -> None:
        await self.redis.run(
            SCRIPT_SETTLE_HOLD,
            customer_keys(s.tenant, s.customer_id, s.request_id),
            [
                s.request_id, s.balance_after_grains, s.balance_version, s.charged_grains,
                s.refunded_grains, s.overage_grains, s.status.value, DONE_MARKER_TTL_SECONDS,
            ],
            idempotent=True,
        )  # fmt: skip

    # -- GetBalance --------------------------------------------------------------------------

    async def balance(self, principal: Principal, customer_id: str) -> Balance:
        principal.require(Action.READ)
        require_id(customer_id, "customer_id")
        principal.require_customer(customer_id)
        result = await self.run_customer_script(
            SCRIPT_READ_BALANCE, principal.tenant, customer_id, "",
            [now_ms(), EXPIRE_BATCH_PER_CALL], idempotent=True,
        )  # fmt: skip
        return Balance(balance=int(result[1]), reserved=int(result[2]))

    async def adopt_balance(self, tenant: str, customer_id: str, balance: int, version: int) -> int:
        """After a ledger entry: let Redis adopt it; returns ``held`` (0 if not loaded)."""
        result = await self.redis.run(
            SCRIPT_APPLY_BALANCE,
            customer_keys(tenant, customer_id),
            [balance, version],
            idempotent=True,
        )
        return int(result[2])


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


def _price_args(prices: Prices | None) -> list[int]:
    if prices is None:
        return [0, 0, 0, 0]
    return [
        1,
        prices.input_grains_per_million,
        prices.output_grains_per_million,
        prices.cached_input_grains_per_million,
    ]


def _hold(peek: list[Any]) -> Hold:
    (_, balance, held, amount, consumed, in_t, out_t, cached_t, has_prices, p_in, p_out,
     p_cached, model, nonce, estimated, status, created) = peek  # fmt: skip
    prices = Prices(model, int(p_in), int(p_out), int(p_cached)) if int(has_prices) else None
    return Hold(
        int(balance), int(held), int(amount), int(consumed), int(in_t), int(out_t),
        int(cached_t), prices, str(nonce), int(estimated), str(status), int(created),
    )  # fmt: skip


def _created_at(hold: Hold | None) -> datetime | None:
    if hold is None or hold.created_ms <= 0:
        return None
    return datetime.fromtimestamp(hold.created_ms / 1000, tz=UTC)


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
