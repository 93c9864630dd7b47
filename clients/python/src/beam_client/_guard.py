"""The streaming guard's state and decisions: one core, shared by the async and sync guard.

This module does no I/O and never waits. :class:`beam_client.aio.AsyncGuard` and
:class:`beam_client.sync.Guard` send what it plans (CheckBalance, DeductTokens,
FinalizeRequest) and hand the answers back; everything they decide — when a Deduct is due
and what it carries, where the stream must be cut, when to stop, the fail-open allowance
mid-stream, the status and usage of the settlement, and whether the settlement goes to
Beam or straight to the outbox — is decided here, once.

**The stream never waits for Beam.** ``add`` counts tokens and, when a report is due,
returns a :class:`DeductPlan` that the face sends in the background (at most one in flight
per guard; tokens that arrive meanwhile are coalesced into the next one). The dangerous
part is what keeps that safe: every Deduct asks Beam to reserve ahead
(``reserve_ahead_tokens``) for the tokens that may arrive before the next answer, and each
answer says how many completion tokens the hold pays for in all
(``covered_completion_tokens``). The guard cuts the stream itself when its count reaches
that number before a newer answer raised it, so no token goes past what the hold pays for,
however slow Beam is; a stop answer takes effect at the next chunk.

**Pacing.** The interval between reports is half the hold's headroom (covered minus
reported) at the newest answer, between ``deduct_every`` and ``deduct_every_max``: a hold
with plenty of room is reported rarely, a hold near its end often. Before the first answer
it is half the tokens granted (below ``deduct_every`` too), so the first report lands
before the stream reaches the grant; past the grant (a provider streaming more than it was
asked for) a report goes out at half the headroom left. The reserve-ahead is twice the
interval (a report goes out while one interval of room is left), but no further than the
tokens granted while the stream is within them — a customer who can pay for the grant is
never stopped short of it — and ``2 * deduct_every`` past them. Completion tokens streamed
but in no Deduct sent are less than one interval (at most ``deduct_every_max``) whenever
each answer is back before the next report is due; while a Deduct is late they grow, but
never past what the hold covers: the bound on what a process that dies mid-stream leaves
unreported.
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

# stop_reason values set by the client itself (Beam's error codes are the others).
STOP_UNAVAILABLE = "BEAM_UNAVAILABLE"
STOP_FAIL_OPEN_MAX_TOKENS = "FAIL_OPEN_MAX_TOKENS"
# The stream reached the completion tokens the hold covers before a newer answer raised it.
STOP_HOLD_COVERAGE = "HOLD_COVERAGE"
# The stream reached the tokens granted, all the hold covers: the provider's own end.
STOP_MAX_TOKENS_REACHED = "MAX_TOKENS_REACHED"
# Deduct error codes (and the guard's own cut) that mean "the customer's money ran out"
# (KILLED_INSUFFICIENT_BALANCE).
MONEY_STOPS = frozenset({"INSUFFICIENT_BALANCE", "MAX_REQUEST_GRAINS_EXCEEDED", STOP_HOLD_COVERAGE})

DEFAULT_DEDUCT_EVERY = 50
DEFAULT_MIN_TOKENS = 50
DEFAULT_DEDUCT_EVERY_MAX = 500

State = Literal["new", "open", "closing", "closed"]
# How a caller stops waiting; the request settles as FAILED_TIMEOUT.
_GAVE_UP = (asyncio.CancelledError, GeneratorExit, KeyboardInterrupt, TimeoutError)


@dataclass(frozen=True, slots=True)
class Settlement:
    """How a settlement ended: acknowledged (``result``), or not (``error``), and whether
    it waits in the outbox (``queued``: it will be replayed until acknowledged)."""

    result: FinalizeResult | None
    error: BeamError | None
    queued: bool = False


@dataclass(frozen=True, slots=True)
class ClosePlan:
    """The settlement a closing guard sends, decided when the close begins.

    ``request``: the FinalizeRequest, built (status, usage, ``let_through`` label) from the
    guard's state at that moment, before any Deduct still in flight is waited for: that
    Deduct's outcome cannot change it. ``queue_now``: a let-through request (Beam was
    unreachable), straight to the outbox; else sent now (retried, then outboxed).
    ``record``: the let-through record, finished already (``None`` if not let through).
    """

    request: Any
    queue_now: bool
    record: LetThrough | None


def finalize_failed(counters: Counters, request: Any, error: BeamError, queued: bool) -> None:
    counters.bump("finalize_failures")
    if queued:
        log.error(
            "FinalizeRequest for request %s of customer %s was not acknowledged; it waits in "
            "the outbox and is replayed until Beam acknowledges it: %s",
            request.request_id, request.customer_id, error,
        )  # fmt: skip
    else:
        log.error(
            "FinalizeRequest for request %s of customer %s was refused or could not be "
            "queued; the hold will expire and be charged what its Deducts reported: %s",
            request.request_id, request.customer_id, error,
        )  # fmt: skip


def new_request_id() -> str:
    """A fresh request id (``req_`` + 24 hex digits); pass your own to retry a request."""
    return f"req_{secrets.token_hex(12)}"


def default_min_tokens(max_tokens: int) -> int:
    """The shortest answer a guard takes rather than a refusal: 50 completion tokens (all
    of ``max_tokens`` when it is smaller)."""
    return min(max_tokens, DEFAULT_MIN_TOKENS)


@dataclass(frozen=True, slots=True)
class DeductPlan:
    """One DeductTokens to send, with its sequence number fixed before the first attempt.

    ``tokens`` completion tokens; the first Deduct also carries the prompt
    (``prompt_tokens`` uncached, ``cached_prompt_tokens`` cached).
    """

    sequence_number: int
    tokens: int
    reserve_ahead_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0


def status_for(error: BaseException | None, stop_reason: str) -> RequestStatus:
    """The settlement status from how the guarded block ended.

    - the stream was stopped for money (a Deduct answered ``INSUFFICIENT_BALANCE`` or
      ``MAX_REQUEST_GRAINS_EXCEEDED``, or the guard cut it where the hold's coverage ends):
      ``KILLED_INSUFFICIENT_BALANCE``, however the block then ended;
    - the caller stopped waiting: ``asyncio.CancelledError`` (a deadline, a client that
      disconnected, shutdown), ``GeneratorExit`` (the guard was inside a generator that its
      consumer abandoned), ``KeyboardInterrupt``, ``TimeoutError`` or any exception whose
      class name contains ``Timeout`` (``httpx.ReadTimeout``, ``openai.APITimeoutError``),
      or Beam said the hold expired: ``FAILED_TIMEOUT``;
    - any other exception, or a stream stopped because Beam could not be reached (or
      refused a Deduct): ``FAILED_ERROR``;
    - otherwise ``COMPLETED_SUCCESS`` (also when a fail-open stream was cut at its limit,
      or a stream at the tokens granted).
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
    if stop_reason and stop_reason not in (STOP_FAIL_OPEN_MAX_TOKENS, STOP_MAX_TOKENS_REACHED):
        return RequestStatus.FAILED_ERROR
    return RequestStatus.COMPLETED_SUCCESS


def _check_arguments(*, deduct_every: int, **counts: int) -> None:
    if deduct_every < 1:
        raise ValueError("deduct_every must be >= 1")
    for name, value in counts.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0")


def interval_for(headroom: int, deduct_every: int, deduct_every_max: int) -> int:
    """Tokens until the next report: half the headroom, within [deduct_every, max]."""
    return max(1, min(deduct_every_max, max(deduct_every, headroom // 2)))


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
        min_tokens: int | None = None,
        request_id: str | None = None,
        estimated_grains: int = 0,
        buffer_multiplier: float = 0.0,
        custom_properties: Mapping[str, str] | None = None,
        deduct_every: int = DEFAULT_DEDUCT_EVERY,
        deduct_every_max: int | None = None,
        failure_policy: FailurePolicy,
        counters: Counters,
    ) -> None:
        _check_arguments(
            deduct_every=deduct_every, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
            cached_prompt_tokens=cached_prompt_tokens, estimated_grains=estimated_grains,
            min_tokens=min_tokens or 0,
        )  # fmt: skip
        self.customer_id = customer_id
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.cached_prompt_tokens = cached_prompt_tokens
        #: The fewest completion tokens worth answering: below ``max_tokens`` the Check
        #: shortens the request rather than refuse it (0: all of ``max_tokens`` or nothing).
        self.min_tokens = min(
            max_tokens, default_min_tokens(max_tokens) if min_tokens is None else min_tokens
        )
        self.request_id = request_id or new_request_id()
        self.estimated_grains = estimated_grains
        self.buffer_multiplier = buffer_multiplier
        self.custom_properties = dict(custom_properties or {})
        self.deduct_every = deduct_every
        self.deduct_every_max = max(
            deduct_every,
            DEFAULT_DEDUCT_EVERY_MAX if deduct_every_max is None else deduct_every_max,
        )
        self.failure_policy = failure_policy
        self._counters = counters

        #: CheckBalance's answer (``None`` before ``open`` and when let through fail-open).
        self.check: CheckResult | None = None
        #: The fail-open record when the request went ahead without Beam (at open, or when
        #: its Deducts could not reach Beam mid-stream).
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
        #: True when the settlement was not acknowledged and waits in the client's outbox
        #: (it is replayed, same request id, until Beam acknowledges it).
        self.settlement_queued = False
        self._state: State = "new"
        self._sequence = 0
        self._reported = 0  # completion tokens in Deducts sent
        self._limit = 0  # completion tokens the stream may reach (0: no limit known)
        self._interval = deduct_every
        self._in_flight: DeductPlan | None = None
        self._prompt_reported = False
        self._skip_deducts = False
        self._usage = Usage()

    # -- what the application reads ------------------------------------------------------

    @property
    def request_token(self) -> str:
        return self.check.request_token if self.check is not None else ""

    @property
    def fail_open(self) -> bool:
        """True when the request went on without Beam (fail-open policy)."""
        return self.let_through is not None

    @property
    def out_of_credit(self) -> bool:
        """True when the stream was stopped because the customer's money ran out (Beam
        answered ``INSUFFICIENT_BALANCE`` or ``MAX_REQUEST_GRAINS_EXCEEDED``, or the stream
        reached what its hold covers): it settles as ``KILLED_INSUFFICIENT_BALANCE``. A
        stream that merely reached the tokens granted (``MAX_TOKENS_REACHED``) is not."""
        return self.should_stop and self.stop_reason in MONEY_STOPS

    @property
    def affordable_completion_tokens(self) -> int:
        """Completion tokens the customer can pay for now (Check's
        ``max_affordable_completion_tokens``). Under fail-open: ``max_tokens``."""
        if self.check is not None:
            return self.check.max_affordable_completion_tokens
        return self.max_tokens

    @property
    def granted_completion_tokens(self) -> int:
        """Completion tokens the hold was sized for: ``max_tokens``, or fewer when the
        customer's balance made Beam shorten the request (never below ``min_tokens``)."""
        if self.check is not None and self.check.granted_completion_tokens > 0:
            return self.check.granted_completion_tokens
        return self.max_tokens

    @property
    def max_tokens_for_provider(self) -> int:
        """What to pass to the provider as its ``max_tokens``: the tokens granted."""
        return self.granted_completion_tokens

    @property
    def covered_completion_tokens(self) -> int:
        """Completion tokens the stream may reach before a newer answer (0: no limit)."""
        return self._limit

    @property
    def unreported_tokens(self) -> int:
        """Completion tokens counted but in no Deduct sent yet."""
        return self.completion_tokens - self._reported

    @property
    def deduct_in_flight(self) -> bool:
        return self._in_flight is not None

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

    # -- opening -------------------------------------------------------------------------

    def _check_args(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "max_tokens": self.max_tokens,
            "min_completion_tokens": self.min_tokens if self.estimated_grains <= 0 else 0,
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
        # Until the first answer, the stream may reach what the hold was sized for.
        self._limit = check.granted_completion_tokens
        self._repace()

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
        self._skip_deducts = True
        self._limit = self.max_tokens
        self._state = "open"

    # -- streaming -----------------------------------------------------------------------

    def _plan_add(self, tokens: int) -> DeductPlan | None:
        """Count ``tokens``; the Deduct to start in the background, if one is due."""
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        if self._state != "open":
            raise RuntimeError("add() outside an open guard")
        self.completion_tokens += tokens
        self._cut_at_limit()
        return self._due()

    def _cut_at_limit(self) -> None:
        """Stop the stream where what pays for it ends (the count may not go past it).

        Held, at exactly the tokens granted when the hold covers no more: the provider
        delivered all it was asked for (``MAX_TOKENS_REACHED``, settled as completed; its
        final usage chunk, if any, is not waited for). Anywhere else: ``HOLD_COVERAGE``.
        """
        if self._limit <= 0 or self.completion_tokens < self._limit or self.should_stop:
            return
        if self.let_through is not None:
            self._stop(STOP_FAIL_OPEN_MAX_TOKENS)
            return
        if self.completion_tokens == self._limit == self.granted_completion_tokens:
            self._stop(STOP_MAX_TOKENS_REACHED)
            return
        self._counters.bump("coverage_cuts")
        log.info(
            "request %s of customer %s reached the %d completion tokens its hold covers "
            "before a newer answer; the guard cuts the stream",
            self.request_id, self.customer_id, self._limit,
        )  # fmt: skip
        self._stop(STOP_HOLD_COVERAGE)

    def _due(self) -> DeductPlan | None:
        if self._in_flight is not None:
            return None
        interval = self._interval
        granted = self.granted_completion_tokens
        if 0 < granted < self.completion_tokens and self._limit > 0:
            # The provider streams past what it was asked for: report while half of the
            # hold's headroom is left, so the hold can grow before the stream reaches it.
            interval = max(1, min(interval, (self._limit - self._reported) // 2))
        if self.unreported_tokens < interval:
            return None
        return self._plan_flush()

    def _plan_flush(self) -> DeductPlan | None:
        """The Deduct of every unreported token now (``None``: nothing to send)."""
        if self._state != "open" or self._in_flight is not None:
            return None
        if self.should_stop or self._skip_deducts:
            return None
        tokens = min(self.unreported_tokens, _wire.INT32_MAX)
        if tokens <= 0:
            return None
        prompt = cached = 0
        if not self._prompt_reported:
            # The prompt rides with the first completion tokens, so the stop decision
            # counts it: the provider's count (an adapter may have set it) or the estimate.
            self._prompt_reported = True
            prompt_known, cached_known = self._usage.prompt_tokens, self._usage.cached_prompt_tokens
            if prompt_known is None:
                prompt_known, cached_known = self.prompt_tokens, self.cached_prompt_tokens
            cached = min(cached_known or 0, prompt_known)
            prompt = prompt_known - cached
        self._sequence += 1
        self._reported += tokens
        plan = DeductPlan(
            self._sequence,
            tokens,
            reserve_ahead_tokens=self._reserve_ahead(),
            prompt_tokens=min(prompt, _wire.INT32_MAX),
            cached_prompt_tokens=min(cached, _wire.INT32_MAX),
        )
        self._in_flight = plan
        return plan

    def _reserve_ahead(self) -> int:
        """Completion tokens that may arrive before the next answer: two intervals, but
        no further than the tokens granted while the stream is within them (a customer who
        can pay for what was granted is never stopped short of it), and two
        ``deduct_every`` at a time past them (a provider streaming more than asked)."""
        ahead = 2 * max(self._interval, self.deduct_every)
        granted = self.granted_completion_tokens
        if granted > 0:
            past = self._reported >= granted
            ahead = 2 * self.deduct_every if past else min(ahead, granted - self._reported)
        return min(ahead, _wire.INT32_MAX)

    def _repace(self) -> None:
        """The interval from the hold's headroom: half of it, within [deduct_every, max];
        before the first answer (the Check's grant, not a known coverage) also below
        ``deduct_every``, so the first report lands before the stream reaches the grant."""
        if self._limit <= 0:
            self._interval = self.deduct_every
            return
        headroom = self._limit - self._reported
        if self.last_deduct is None:
            self._interval = max(1, min(self.deduct_every_max, headroom // 2))
        else:
            self._interval = interval_for(headroom, self.deduct_every, self.deduct_every_max)

    def _deduct_request(self, plan: DeductPlan) -> Any:
        return _wire.deduct_request(
            self.customer_id,
            self.request_id,
            self.request_token,
            tokens=plan.tokens,
            sequence_number=plan.sequence_number,
            model=self.model,
            reserve_ahead_tokens=plan.reserve_ahead_tokens,
            prompt_tokens=plan.prompt_tokens,
            cached_prompt_tokens=plan.cached_prompt_tokens,
        )

    def _deducted(self, plan: DeductPlan, result: DeductResult) -> DeductPlan | None:
        """Record an answer; the next Deduct to send at once, if one is due."""
        self._in_flight = None
        self._counters.bump("deducts")
        self.last_deduct = result
        if result.covered_completion_tokens > 0:
            self._limit = result.covered_completion_tokens
        self._repace()
        if not result.success:
            self._counters.bump("stream_stops")
            log.info(
                "beam stops request %s of customer %s: %s (consumed %d grains)",
                self.request_id, self.customer_id, result.error_code, result.consumed_grains,
            )  # fmt: skip
            self._stop(result.error_code or "STOPPED")
            return None
        if self._state != "open":
            return None
        return self._due()

    def _deduct_failed(self, plan: DeductPlan, error: BeamError) -> None:
        """A Deduct that got no answer: fail open within the allowance, or stop now.

        Once the guard is closing (or closed) the stream is over and its settlement was
        decided when the close began: the failure is logged, and nothing else changes. No
        let-through is made of it (no allowance spent, no record that nothing would
        finish): the Finalize that follows reports the usage anyway, retried and outboxed
        like every Finalize, and it is labelled by what happened while the stream ran.
        """
        self._in_flight = None
        if self._state != "open":
            log.warning(
                "DeductTokens failed for request %s of customer %s after its stream ended; "
                "its FinalizeRequest settles the usage: %s",
                self.request_id, self.customer_id, error,
            )  # fmt: skip
            return
        if isinstance(error, BeamUnavailable) and self.failure_policy.fail_open:
            # What the hold covers is paid; past it, the stream runs on the allowance.
            covered = self._limit if self._limit > 0 else self._reported - plan.tokens
            record = self.failure_policy.extend(
                customer_id=self.customer_id,
                request_id=self.request_id,
                model=self.model,
                covered_tokens=covered,
                max_tokens=self.granted_completion_tokens,
            )
            if record is not None:
                self._counters.bump("deducts_skipped_open")
                self.let_through = record
                self._skip_deducts = True
                limit = covered + record.allowance_tokens
                if self.granted_completion_tokens > 0:
                    limit = min(limit, self.granted_completion_tokens)
                if limit <= self.completion_tokens:
                    self._stop(STOP_FAIL_OPEN_MAX_TOKENS)
                self._limit = max(limit, 1)
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

    # -- closing -------------------------------------------------------------------------

    def _begin_close(self, error: BaseException | None) -> ClosePlan | None:
        """The settlement to send (``None``: not open, nothing to settle).

        Decided here, from the state now, and built now: the face waits for a Deduct still
        in flight only after this, and whatever that Deduct's outcome (an answer, or a
        failure: see ``_deduct_failed``) it changes neither the status, the usage nor the
        ``let_through`` label of this settlement.
        """
        if self._state != "open":
            return None
        self._state = "closing"
        self.status = status_for(error, self.stop_reason)
        record = self.let_through
        if record is not None:
            prompt, completion, cached, cost = self._final_usage(self.status)
            record.status = self.status.name
            record.prompt_tokens, record.completion_tokens = prompt, completion
            record.cached_prompt_tokens, record.total_cost_grains = cached, cost
            record.ended_at = time.time()
            self.failure_policy.finish(record)
        return ClosePlan(self._finalize_request(), queue_now=record is not None, record=record)

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
        """The settlement, under the request's own id: for a let-through request that
        never had a hold (no token), Beam settles it as a claim charging its usage. A
        let-through request (at open or mid-stream) says so: Beam labels its usage."""
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
            let_through=self.let_through is not None,
        )

    def _settled(self, settlement: Settlement) -> None:
        self.result = settlement.result
        self.finalize_error = settlement.error
        self.settlement_queued = settlement.queued
        self._state = "closed"

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.request_id} customer={self.customer_id} "
            f"state={self._state} tokens={self.completion_tokens} stop={self.stop_reason!r}>"
        )
