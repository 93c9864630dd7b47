"""What the guard does when Beam cannot be reached: fail closed (default) or fail open.

**Fail closed** (:class:`FailClosed`): a guard whose CheckBalance cannot reach Beam after
its retries raises :class:`~beam_client.errors.BeamUnavailable`; nothing is called.

**Fail open** (:class:`FailOpen`): such a guard proceeds *without a hold*, as long as the
allowance has room, and records what it let through. The allowance is a hard bound, kept
in memory per policy object (share one per process):

- ``max_calls`` / ``max_grains``: per process, at most this many requests let through, and
  their worst-case cost within this many grains;
- ``max_calls_per_customer`` / ``max_grains_per_customer``: the same, per customer;
- ``window_seconds``: the allowance is spent over a sliding window of this length (what
  was let through longer ago no longer counts); ``None`` (default): never refilled until
  the process restarts.

A request's worst case is its ``estimated_grains`` when the guard was given one, else
``ceil((uncached_prompt x input + cached x cached_input + max_tokens x output) / 1e6)``
from ``prices`` (the same numbers as your ``BeamPriceList``); a request with neither is
refused under a grain bound. A let-through guard stops its stream (``should_stop``) when
the completion tokens reach ``max_tokens``.

**Mid-stream.** A stream whose hold is open and whose DeductTokens stops reaching Beam
counts against the same allowances (:meth:`FailOpen.extend`): one call, and the worst case
of the completion tokens it may stream past what the hold covers. It stops at
``min(max_tokens, covered + allowance_tokens)``, where ``allowance_tokens`` is what the
grain allowances left pay for at the model's output price (all of ``max_tokens`` under a
calls-only allowance). Refused (allowance spent, or no price under a grain bound): the
stream stops now, as under fail-closed.

The allowance is spent by worst cases and never refunded, so "never exceeded" needs no
knowledge of actual prices. Each request let through is logged (WARNING, logger
``beam_client``) when it starts and when it ends, with its usage; the last ``keep`` are in
:attr:`FailOpen.records`, and ``on_let_through`` is called with each finished record. Its
settlement goes to the client's outbox and is posted to Beam under the request's own id
once Beam answers again (a request that never had a hold settles as a claim charging its
usage): let-through usage is billed, late, exactly once, and labelled ``let_through``
(on the request and in Beam's usage analytics; the charge is the same).

Only unreachability (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, ``STORE_UNAVAILABLE`` after
the retries) is failed open. A customer who cannot pay, a bad key or a bad argument is
refused under either policy. Under fail-closed, a DeductTokens that cannot reach Beam
stops the stream.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger("beam_client")


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Grains per million tokens, as in a ``BeamPriceList`` entry."""

    input_grains_per_million: int
    output_grains_per_million: int
    cached_input_grains_per_million: int | None = None

    def worst_case(self, prompt_tokens: int, cached_prompt_tokens: int, max_tokens: int) -> int:
        cached = min(cached_prompt_tokens, prompt_tokens)
        cached_price = (
            self.input_grains_per_million
            if self.cached_input_grains_per_million is None
            else self.cached_input_grains_per_million
        )
        micro = (
            (prompt_tokens - cached) * self.input_grains_per_million
            + cached * cached_price
            + max_tokens * self.output_grains_per_million
        )
        return math.ceil(micro / 1_000_000) if micro else 0


@dataclass(slots=True)
class LetThrough:
    """One request the fail-open policy let through without Beam.

    ``mid_stream``: its hold was open and its Deducts stopped reaching Beam;
    ``allowance_tokens`` completion tokens past what the hold covered were allowed.
    ``reconciled``: its settlement was acknowledged by Beam (set by the client's outbox).
    """

    request_id: str
    customer_id: str
    model: str
    allowance_grains: int
    started_at: float
    status: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    total_cost_grains: int = 0
    ended_at: float | None = None
    allowance_tokens: int = 0
    mid_stream: bool = False
    reconciled: bool = False


class FailurePolicy:
    """Base of the two policies; :attr:`fail_open` says which one it is."""

    fail_open = False

    def admit(
        self,
        *,
        customer_id: str,
        request_id: str,
        model: str,
        prompt_tokens: int,
        cached_prompt_tokens: int,
        max_tokens: int,
        estimated_grains: int,
    ) -> LetThrough | None:
        """A record if this request may go ahead without Beam, else ``None``."""
        return None

    def extend(
        self,
        *,
        customer_id: str,
        request_id: str,
        model: str,
        covered_tokens: int,
        max_tokens: int,
    ) -> LetThrough | None:
        """A record if this held stream may go on past ``covered_tokens`` without Beam."""
        return None

    def finish(self, record: LetThrough) -> None:
        """Called once when a let-through request ends, with its usage filled in."""

    def stats(self) -> dict[str, int]:
        return {}


class FailClosed(FailurePolicy):
    """Refuse every request Beam cannot approve (the default)."""

    def __repr__(self) -> str:
        return "FailClosed()"


@dataclass(slots=True)
class _Spent:
    calls: int = 0
    grains: int = 0


class FailOpen(FailurePolicy):
    """Let requests through without Beam, up to bounded allowances (module docstring)."""

    fail_open = True

    def __init__(
        self,
        *,
        max_calls: int | None = None,
        max_grains: int | None = None,
        max_calls_per_customer: int | None = None,
        max_grains_per_customer: int | None = None,
        window_seconds: float | None = None,
        prices: Mapping[str, ModelPrice] | None = None,
        keep: int = 1000,
        on_let_through: Callable[[LetThrough], None] | None = None,
    ) -> None:
        bounds = (max_calls, max_grains, max_calls_per_customer, max_grains_per_customer)
        if all(b is None for b in bounds):
            raise ValueError(
                "FailOpen needs a bound: max_calls=, max_grains= (or per customer), or both"
            )
        if any(b is not None and b < 0 for b in bounds):
            raise ValueError("FailOpen bounds must be >= 0")
        if window_seconds is not None and window_seconds <= 0:
            raise ValueError("window_seconds must be > 0")
        self.max_calls = max_calls
        self.max_grains = max_grains
        self.max_calls_per_customer = max_calls_per_customer
        self.max_grains_per_customer = max_grains_per_customer
        self.window_seconds = window_seconds
        self.prices = dict(prices or {})
        self.on_let_through = on_let_through
        self.records: deque[LetThrough] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._spent = _Spent()
        self._per_customer: dict[str, _Spent] = {}
        # (time, customer, grains) of each admission, while a window is set (bounded).
        self._events: deque[tuple[float, str, int]] = deque(maxlen=_MAX_EVENTS)
        self._calls = 0
        self._grains = 0
        self._refusals = 0
        self._finished = 0
        self._completion_tokens = 0

    def __repr__(self) -> str:
        return f"FailOpen(max_calls={self.max_calls}, max_grains={self.max_grains})"

    def admit(
        self,
        *,
        customer_id: str,
        request_id: str,
        model: str,
        prompt_tokens: int,
        cached_prompt_tokens: int,
        max_tokens: int,
        estimated_grains: int,
    ) -> LetThrough | None:
        worst = estimated_grains
        priced = estimated_grains > 0 or model in self.prices
        if worst <= 0 and model in self.prices:
            worst = self.prices[model].worst_case(prompt_tokens, cached_prompt_tokens, max_tokens)
        with self._lock:
            refusal = self._refusal(customer_id, model, worst, priced)
            if refusal:
                self._refuse(customer_id, request_id, refusal)
                return None
            record = LetThrough(request_id, customer_id, model, worst, time.time())
            self._spend(record)
            calls, grains = self._spent.calls, self._spent.grains
        log.warning(
            "beam unreachable; fail-open lets request %s of customer %s (model %s) through "
            "without a hold: worst case %d grains; spent %d of %s calls, %d of %s grains",
            request_id, customer_id, model, worst,
            calls, _bound(self.max_calls), grains, _bound(self.max_grains),
        )  # fmt: skip
        return record

    def extend(
        self,
        *,
        customer_id: str,
        request_id: str,
        model: str,
        covered_tokens: int,
        max_tokens: int,
    ) -> LetThrough | None:
        price = self.prices.get(model)
        grain_bound = self.max_grains is not None or self.max_grains_per_customer is not None
        with self._lock:
            self._prune()
            refusal = self._refusal(customer_id, model, 0, price is not None or not grain_bound)
            if not refusal and not grain_bound and max_tokens <= 0:
                refusal = "no max_tokens bounds the stream (and no grain allowance)"
            if refusal:
                self._refuse(customer_id, request_id, refusal)
                return None
            tokens = max(0, max_tokens - covered_tokens) if max_tokens > 0 else _INT32_MAX
            if grain_bound and price is not None and price.output_grains_per_million > 0:
                left = self._grains_left(customer_id)
                tokens = min(tokens, left * 1_000_000 // price.output_grains_per_million)
            worst = price.worst_case(0, 0, tokens) if price is not None else 0
            record = LetThrough(
                request_id, customer_id, model, worst, time.time(),
                allowance_tokens=tokens, mid_stream=True,
            )  # fmt: skip
            self._spend(record)
            calls, grains = self._spent.calls, self._spent.grains
        log.warning(
            "beam unreachable mid-stream; fail-open lets request %s of customer %s (model %s) "
            "stream %d completion tokens past the %d its hold covers: worst case %d grains; "
            "spent %d of %s calls, %d of %s grains",
            request_id, customer_id, model, tokens, covered_tokens, worst,
            calls, _bound(self.max_calls), grains, _bound(self.max_grains),
        )  # fmt: skip
        return record

    def _refusal(self, customer_id: str, model: str, worst: int, priced: bool) -> str:
        """Why this admission would pass an allowance ('' if it fits); under the lock."""
        self._prune()
        mine = self._per_customer.get(customer_id, _Spent())
        for spent, max_calls, max_grains, scope in (
            (self._spent, self.max_calls, self.max_grains, "process"),
            (mine, self.max_calls_per_customer, self.max_grains_per_customer, "customer"),
        ):
            if max_calls is not None and spent.calls >= max_calls:
                return f"the {scope} allowance of {max_calls} calls is spent"
            if max_grains is not None:
                if not priced:
                    return f"no estimate for model {model!r} (pass estimated_grains or prices)"
                if spent.grains + worst > max_grains:
                    return (
                        f"{worst} grains would pass the {scope} allowance "
                        f"({spent.grains} of {max_grains} spent)"
                    )
        return ""

    def _grains_left(self, customer_id: str) -> int:
        mine = self._per_customer.get(customer_id, _Spent())
        left = _INT32_MAX * 1000
        if self.max_grains is not None:
            left = min(left, self.max_grains - self._spent.grains)
        if self.max_grains_per_customer is not None:
            left = min(left, self.max_grains_per_customer - mine.grains)
        return max(0, left)

    def _refuse(self, customer_id: str, request_id: str, refusal: str) -> None:
        self._refusals += 1
        log.error(
            "beam unreachable; fail-open refuses request %s of customer %s: %s",
            request_id, customer_id, refusal,
        )  # fmt: skip

    def _spend(self, record: LetThrough) -> None:
        self._calls += 1
        self._grains += record.allowance_grains
        self._spent.calls += 1
        self._spent.grains += record.allowance_grains
        mine = self._per_customer.setdefault(record.customer_id, _Spent())
        mine.calls += 1
        mine.grains += record.allowance_grains
        if self.window_seconds is not None:
            self._events.append((record.started_at, record.customer_id, record.allowance_grains))
        self.records.append(record)

    def _prune(self) -> None:
        """Forget admissions older than the window (under the lock)."""
        if self.window_seconds is None:
            return
        horizon = time.time() - self.window_seconds
        while self._events and self._events[0][0] < horizon:
            _, customer_id, grains = self._events.popleft()
            self._spent.calls -= 1
            self._spent.grains -= grains
            mine = self._per_customer[customer_id]
            mine.calls -= 1
            mine.grains -= grains
            if mine.calls <= 0:
                del self._per_customer[customer_id]

    def finish(self, record: LetThrough) -> None:
        with self._lock:
            self._finished += 1
            self._completion_tokens += record.completion_tokens
        log.warning(
            "fail-open request %s of customer %s ended %s: prompt %d (cached %d), "
            "completion %d tokens, provider cost %d grains; its settlement is queued for "
            "Beam",
            record.request_id, record.customer_id, record.status, record.prompt_tokens,
            record.cached_prompt_tokens, record.completion_tokens, record.total_cost_grains,
        )  # fmt: skip
        if self.on_let_through is not None:
            try:
                self.on_let_through(record)
            except Exception:
                log.exception("on_let_through failed for request %s", record.request_id)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "fail_open_calls": self._calls,
                "fail_open_grains": self._grains,
                "fail_open_refusals": self._refusals,
                "fail_open_finished": self._finished,
                "fail_open_completion_tokens": self._completion_tokens,
            }


_INT32_MAX = 2**31 - 1
# Admissions remembered for a sliding window: a bound on memory, far above any allowance.
_MAX_EVENTS = 1_000_000


def _bound(value: int | None) -> str:
    return "unbounded" if value is None else str(value)
