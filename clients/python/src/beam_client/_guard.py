"""The streaming guard's state and decisions, shared by the async and the sync guard.

The I/O (CheckBalance, DeductTokens, FinalizeRequest) is done by
:class:`beam_client.aio.AsyncGuard` and :class:`beam_client.sync.Guard`; everything they
decide — which Deducts to send with which sequence numbers, when to stop, the status and
usage of the settlement — is decided here, once.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from beam_client import _wire
from beam_client.errors import BeamError, BeamUnavailable, InsufficientBalance, RequestRejected
from beam_client.policy import FailurePolicy, LetThrough
from beam_client.stats import Counters
from beam_client.types import CheckResult, DeductResult, FinalizeResult, RequestStatus, Usage

log = logging.getLogger("beam_client")

# Deduct error codes that mean "the customer's money ran out" (KILLED_INSUFFICIENT_BALANCE).
MONEY_STOPS = frozenset({"INSUFFICIENT_BALANCE", "MAX_REQUEST_GRAINS_EXCEEDED"})
# stop_reason values set by the client itself (Beam's error codes are the others).
STOP_UNAVAILABLE = "BEAM_UNAVAILABLE"
STOP_FAIL_OPEN_MAX_TOKENS = "FAIL_OPEN_MAX_TOKENS"

State = Literal["new", "open", "closing", "closed"]
# How a caller stops waiting; the request settles as FAILED_TIMEOUT.
_GAVE_UP = (asyncio.CancelledError, GeneratorExit, KeyboardInterrupt, TimeoutError)


def new_request_id() -> str:
    """A fresh request id (``req_`` + 24 hex digits); pass your own to retry a request."""
    return f"req_{secrets.token_hex(12)}"


@dataclass(frozen=True, slots=True)
class DeductPlan:
    """One DeductTokens to send, with its sequence number fixed before the first attempt."""

    sequence_number: int
    tokens: int
    is_completion: bool
    is_cached_prompt: bool = False


def status_for(error: BaseException | None, stop_reason: str) -> RequestStatus:
    """The settlement status from how the guarded block ended.

    - Beam stopped the stream for money (a Deduct answered ``INSUFFICIENT_BALANCE`` or
      ``MAX_REQUEST_GRAINS_EXCEEDED``): ``KILLED_INSUFFICIENT_BALANCE``, however the block
      then ended;
    - the caller stopped waiting: ``asyncio.CancelledError`` (a deadline, a client that
      disconnected, shutdown), ``GeneratorExit`` (the guard was inside a generator that its
      consumer abandoned), ``KeyboardInterrupt``, ``TimeoutError`` or any exception whose
      class name contains ``Timeout`` (``httpx.ReadTimeout``, ``openai.APITimeoutError``),
      or Beam said the hold expired: ``FAILED_TIMEOUT``;
    - any other exception, or a stream stopped because Beam could not be reached (or
      refused a Deduct): ``FAILED_ERROR``;
    - otherwise ``COMPLETED_SUCCESS`` (also when a fail-open stream was cut at max_tokens).
    """
    if stop_reason in MONEY_STOPS:
        return RequestStatus.KILLED_INSUFFICIENT_BALANCE
    if error is not None:
        if isinstance(error, _GAVE_UP):
            return RequestStatus.FAILED_TIMEOUT
        if any("Timeout" in cls.__name__ for cls in type(error).__mro__):
            return RequestStatus.FAILED_TIMEOUT
        return RequestStatus.FAILED_ERROR
    if stop_reason == "HOLD_EXPIRED":
        return RequestStatus.FAILED_TIMEOUT
    if stop_reason and stop_reason != STOP_FAIL_OPEN_MAX_TOKENS:
        return RequestStatus.FAILED_ERROR
    return RequestStatus.COMPLETED_SUCCESS


class GuardCore:
    """State of one guarded request. Use it through ``client.guard(...)``."""

    def __init__(
        self,
        customer_id: str,
        *,
        model: str,
        prompt_tokens: int = 0,
        max_tokens: int = 0,
        cached_prompt_tokens: int = 0,
        request_id: str | None = None,
        estimated_grains: int = 0,
        buffer_multiplier: float = 0.0,
        custom_properties: Mapping[str, str] | None = None,
        deduct_every: int = 50,
        failure_policy: FailurePolicy,
        counters: Counters,
    ) -> None:
        if deduct_every < 1:
            raise ValueError("deduct_every must be >= 1")
        for name, value in (
            ("prompt_tokens", prompt_tokens),
            ("max_tokens", max_tokens),
            ("cached_prompt_tokens", cached_prompt_tokens),
            ("estimated_grains", estimated_grains),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0")
        self.customer_id = customer_id
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.cached_prompt_tokens = cached_prompt_tokens
        self.request_id = request_id or new_request_id()
        self.estimated_grains = estimated_grains
        self.buffer_multiplier = buffer_multiplier
        self.custom_properties = dict(custom_properties or {})
        self.deduct_every = deduct_every
        self.failure_policy = failure_policy
        self._counters = counters

        #: CheckBalance's answer (``None`` before ``open`` and when let through fail-open).
        self.check: CheckResult | None = None
        #: The fail-open record when the request went ahead without Beam.
        self.let_through: LetThrough | None = None
        #: True once the stream must stop; ``stop_reason`` says why.
        self.should_stop = False
        self.stop_reason = ""
        #: Completion tokens counted by ``add`` (the usage when the provider reports none).
        self.completion_tokens = 0
        #: The newest DeductTokens answer.
        self.last_deduct: DeductResult | None = None
        #: Set on exit: the status sent, and the settlement (``None`` if not acknowledged).
        self.status: RequestStatus | None = None
        self.result: FinalizeResult | None = None
        self.finalize_error: BeamError | None = None
        self._state: State = "new"
        self._pending = 0
        self._sequence = 0
        self._prompt_reported = False
        self._skip_deducts = False
        self._usage = Usage()

    # -- what the application reads ------------------------------------------------------

    @property
    def request_token(self) -> str:
        return self.check.request_token if self.check is not None else ""

    @property
    def fail_open(self) -> bool:
        """True when the request was let through without a hold (fail-open policy)."""
        return self.let_through is not None

    @property
    def affordable_completion_tokens(self) -> int:
        """Completion tokens the customer can pay for now (Check's
        ``max_affordable_completion_tokens``); ask the provider for at most
        ``min(max_tokens, affordable_completion_tokens)``. Under fail-open: ``max_tokens``.
        """
        if self.check is not None:
            return self.check.max_affordable_completion_tokens
        return self.max_tokens

    @property
    def reported_usage(self) -> Usage:
        """The usage set so far by ``usage()`` or an adapter."""
        return self._usage

    def usage(
        self,
        *,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        cached_prompt_tokens: int | None = None,
        total_cost_grains: int | None = None,
    ) -> None:
        """Set the provider's usage (fields left ``None`` keep their earlier value).

        FinalizeRequest reports it on exit. ``total_cost_grains`` (the provider's exact
        cost) wins over the tokens; without it Beam prices the tokens at the hold's locked
        prices. Unreported completion tokens fall back to those counted by ``add``,
        unreported prompt tokens to the guard's ``prompt_tokens``.
        """
        for name, value in (
            ("prompt_tokens", prompt_tokens),
            ("completion_tokens", completion_tokens),
            ("cached_prompt_tokens", cached_prompt_tokens),
            ("total_cost_grains", total_cost_grains),
        ):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0")
        old = self._usage
        self._usage = Usage(
            old.prompt_tokens if prompt_tokens is None else prompt_tokens,
            old.completion_tokens if completion_tokens is None else completion_tokens,
            old.cached_prompt_tokens if cached_prompt_tokens is None else cached_prompt_tokens,
            old.total_cost_grains if total_cost_grains is None else total_cost_grains,
        )

    # -- decisions -----------------------------------------------------------------------

    def _check_args(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "max_tokens": self.max_tokens,
            "estimated_grains": self.estimated_grains,
            "buffer_multiplier": self.buffer_multiplier,
            "custom_properties": self.custom_properties,
        }

    def _begin_open(self) -> bool:
        """False when already opened (``open`` is idempotent)."""
        if self._state != "new":
            if self._state != "open":
                raise RuntimeError("this guard is closed; open a new one per request")
            return False
        return True

    def _opened(self, check: CheckResult) -> None:
        if not check.approved:
            self._counters.bump("checks_rejected")
            self._state = "closed"
            reason = check.rejection_reason
            exc = InsufficientBalance if reason == "INSUFFICIENT_BALANCE" else RequestRejected
            raise exc(self.customer_id, reason, check.remaining_balance)
        self._counters.bump("checks_approved")
        self.check = check
        self._state = "open"

    def _open_failed(self, error: BeamError) -> None:
        """Fail open if the policy allows; else re-raise."""
        if not isinstance(error, BeamUnavailable):
            self._state = "closed"
            raise error
        record = self.failure_policy.admit(
            customer_id=self.customer_id,
            request_id=self.request_id,
            model=self.model,
            prompt_tokens=self.prompt_tokens,
            cached_prompt_tokens=self.cached_prompt_tokens,
            max_tokens=self.max_tokens,
            estimated_grains=self.estimated_grains,
        )
        if record is None:
            if not self.failure_policy.fail_open:
                self._counters.bump("fail_closed_refusals")
                log.error(
                    "beam unreachable; fail-closed refuses request %s of customer %s: %s",
                    self.request_id, self.customer_id, error,
                )  # fmt: skip
            self._state = "closed"
            raise error
        self.let_through = record
        self._state = "open"

    def _plan_add(self, tokens: int) -> list[DeductPlan]:
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        if self._state != "open":
            raise RuntimeError("add() outside an open guard")
        self.completion_tokens += tokens
        if self.let_through is not None:
            if self.max_tokens and self.completion_tokens >= self.max_tokens:
                self._stop(STOP_FAIL_OPEN_MAX_TOKENS)
            return []
        self._pending += tokens
        if self._pending < self.deduct_every:
            return []
        return self._plan_flush()

    def _plan_flush(self) -> list[DeductPlan]:
        if self._state != "open" or self.let_through is not None:
            return []
        if self.should_stop or self._skip_deducts or self._pending <= 0:
            return []
        plans: list[DeductPlan] = []
        if not self._prompt_reported:
            # The prompt is charged first, so the stop decision counts it. The best prompt
            # count known now: the provider's (an adapter may have set it) or the estimate.
            self._prompt_reported = True
            prompt = self._usage.prompt_tokens
            cached = self._usage.cached_prompt_tokens
            if prompt is None:
                prompt, cached = self.prompt_tokens, self.cached_prompt_tokens
            cached = min(cached or 0, prompt)
            if prompt - cached > 0:
                plans.append(self._plan(prompt - cached, is_completion=False))
            if cached > 0:
                plans.append(self._plan(cached, is_completion=False, is_cached_prompt=True))
        pending, self._pending = self._pending, 0
        while pending > 0:
            chunk = min(pending, _wire.INT32_MAX)
            plans.append(self._plan(chunk, is_completion=True))
            pending -= chunk
        return plans

    def _plan(
        self, tokens: int, *, is_completion: bool, is_cached_prompt: bool = False
    ) -> DeductPlan:
        self._sequence += 1
        return DeductPlan(
            self._sequence, min(tokens, _wire.INT32_MAX), is_completion, is_cached_prompt
        )

    def _deduct_request(self, plan: DeductPlan) -> Any:
        return _wire.deduct_request(
            self.customer_id,
            self.request_id,
            self.request_token,
            tokens=plan.tokens,
            sequence_number=plan.sequence_number,
            model=self.model,
            is_completion=plan.is_completion,
            is_cached_prompt=plan.is_cached_prompt,
        )

    def _deducted(self, result: DeductResult) -> None:
        self._counters.bump("deducts")
        self.last_deduct = result
        if not result.success:
            self._counters.bump("stream_stops")
            log.info(
                "beam stops request %s of customer %s: %s (consumed %d grains)",
                self.request_id, self.customer_id, result.error_code, result.consumed_grains,
            )  # fmt: skip
            self._stop(result.error_code or "STOPPED")

    def _deduct_failed(self, error: BeamError) -> None:
        if isinstance(error, BeamUnavailable) and self.failure_policy.fail_open:
            self._counters.bump("deducts_skipped_open")
            self._skip_deducts = True
            log.warning(
                "beam unreachable during request %s of customer %s; fail-open: the stream "
                "goes on without Deducts (its Finalize settles it): %s",
                self.request_id, self.customer_id, error,
            )  # fmt: skip
            return
        reason = STOP_UNAVAILABLE if isinstance(error, BeamUnavailable) else error.reason
        log.error(
            "DeductTokens failed for request %s of customer %s; stopping the stream: %s",
            self.request_id, self.customer_id, error,
        )  # fmt: skip
        self._stop(reason or error.code)

    def _stop(self, reason: str) -> None:
        if not self.should_stop:
            self.should_stop = True
            self.stop_reason = reason

    def _begin_close(self, error: BaseException | None) -> Literal["none", "open", "finalize"]:
        """What closing needs: nothing, finishing a fail-open record, or a Finalize."""
        if self._state != "open":
            return "none"
        self._state = "closing"
        self.status = status_for(error, self.stop_reason)
        if self.let_through is not None:
            record = self.let_through
            prompt, completion, cached, cost = self._final_usage(self.status)
            record.status = self.status.name
            record.prompt_tokens, record.completion_tokens = prompt, completion
            record.cached_prompt_tokens, record.total_cost_grains = cached, cost
            record.ended_at = time.time()
            self.failure_policy.finish(record)
            self._state = "closed"
            return "open"
        return "finalize"

    def _final_usage(self, status: RequestStatus) -> tuple[int, int, int, int]:
        """(prompt, completion, cached prompt, cost) to settle with.

        The provider's usage where reported; else the tokens ``add`` counted and the
        guard's prompt estimate — the prompt only if the request got anywhere (it completed,
        or tokens were counted, or the provider reported something): a block that failed
        before streaming reports no tokens, and is charged what its Deducts reported.
        """
        usage = self._usage
        reached = (
            status == RequestStatus.COMPLETED_SUCCESS
            or self.completion_tokens > 0
            or usage != Usage()
        )
        completion = (
            self.completion_tokens if usage.completion_tokens is None else usage.completion_tokens
        )
        if usage.prompt_tokens is not None:
            prompt, cached = usage.prompt_tokens, usage.cached_prompt_tokens or 0
        elif reached:
            prompt = self.prompt_tokens
            cached = (
                self.cached_prompt_tokens
                if usage.cached_prompt_tokens is None
                else usage.cached_prompt_tokens
            )
        else:
            prompt, cached = 0, 0
        cap = _wire.INT32_MAX
        prompt, completion = min(prompt, cap), min(completion, cap)
        return prompt, completion, min(cached, prompt), usage.total_cost_grains or 0

    def _finalize_request(self) -> Any:
        assert self.status is not None
        prompt, completion, cached, cost = self._final_usage(self.status)
        return _wire.finalize_request(
            self.customer_id,
            self.request_id,
            status=self.status,
            request_token=self.request_token,
            model=self.model,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_prompt_tokens=cached,
            total_cost_grains=cost,
        )

    def _settled(self, result: FinalizeResult | None, error: BeamError | None) -> None:
        self.result = result
        self.finalize_error = error
        self._state = "closed"

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.request_id} customer={self.customer_id} "
            f"state={self._state} tokens={self.completion_tokens} stop={self.stop_reason!r}>"
        )


def finalize_failed(counters: Counters, request: Any, error: BeamError) -> None:
    counters.bump("finalize_failures")
    log.error(
        "FinalizeRequest for request %s of customer %s was not acknowledged; the hold will "
        "expire and be charged what its Deducts reported: %s",
        request.request_id, request.customer_id, error,
    )  # fmt: skip
