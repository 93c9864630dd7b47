"""What the guard does when Beam cannot be reached: fail closed (default) or fail open.

**Fail closed** (:class:`FailClosed`): a guard whose CheckBalance cannot reach Beam after
its retries raises :class:`~beam_client.errors.BeamUnavailable`; nothing is called.

**Fail open** (:class:`FailOpen`): such a guard proceeds *without a hold*, as long as this
process's allowance has room, and records what it let through. The allowance is a hard,
per-process bound (it is kept in memory, per policy object, and starts afresh when the
process does):

- ``max_calls``: at most this many requests let through;
- ``max_grains``: the worst-case cost of the requests let through stays within this many
  grains. A request's worst case is its ``estimated_grains`` when the guard was given one,
  else ``ceil((uncached_prompt x input + cached x cached_input + max_tokens x output) /
  1e6)`` from ``prices`` (the same numbers as your ``BeamPriceList``); a request with
  neither is refused. A let-through guard stops its stream (``should_stop``) when the
  completion tokens reach ``max_tokens``, so the worst case holds as long as the provider
  honours ``max_tokens``.

Both may be set; a request is let through only if it fits both. The allowance is spent by
worst cases and never refunded, so "never exceeded" needs no knowledge of actual prices.
Each request let through is logged (WARNING, logger ``beam_client``) when it starts and when
it ends, with its usage; the last ``keep`` are in :attr:`FailOpen.records`, and
``on_let_through`` is called with each finished record (to bill it later, for example).

Only unreachability (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, ``STORE_UNAVAILABLE`` after
the retries) is failed open. A customer who cannot pay, a bad key or a bad argument is
refused under either policy. During a stream whose hold is open, a DeductTokens that cannot
reach Beam stops the stream under fail-closed, and is skipped under fail-open (the
request is settled by its FinalizeRequest, or, if Beam stays away, its hold expires and is
charged what earlier Deducts reported).
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
    """One request the fail-open policy let through without a hold."""

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

    def finish(self, record: LetThrough) -> None:
        """Called once when a let-through request ends, with its usage filled in."""

    def stats(self) -> dict[str, int]:
        return {}


class FailClosed(FailurePolicy):
    """Refuse every request Beam cannot approve (the default)."""

    def __repr__(self) -> str:
        return "FailClosed()"


class FailOpen(FailurePolicy):
    """Let requests through without Beam, up to a per-process allowance (module docstring)."""

    fail_open = True

    def __init__(
        self,
        *,
        max_calls: int | None = None,
        max_grains: int | None = None,
        prices: Mapping[str, ModelPrice] | None = None,
        keep: int = 1000,
        on_let_through: Callable[[LetThrough], None] | None = None,
    ) -> None:
        if max_calls is None and max_grains is None:
            raise ValueError("FailOpen needs a bound: max_calls=, max_grains= or both")
        if (max_calls is not None and max_calls < 0) or (max_grains is not None and max_grains < 0):
            raise ValueError("FailOpen bounds must be >= 0")
        self.max_calls = max_calls
        self.max_grains = max_grains
        self.prices = dict(prices or {})
        self.on_let_through = on_let_through
        self.records: deque[LetThrough] = deque(maxlen=keep)
        self._lock = threading.Lock()
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
        if worst <= 0 and model in self.prices:
            worst = self.prices[model].worst_case(prompt_tokens, cached_prompt_tokens, max_tokens)
        with self._lock:
            refusal = ""
            if self.max_calls is not None and self._calls >= self.max_calls:
                refusal = f"the allowance of {self.max_calls} calls is spent"
            elif self.max_grains is not None:
                if worst <= 0 and not (estimated_grains > 0 or model in self.prices):
                    refusal = f"no estimate for model {model!r} (pass estimated_grains or prices)"
                elif self._grains + worst > self.max_grains:
                    refusal = (
                        f"{worst} grains would pass the allowance "
                        f"({self._grains} of {self.max_grains} spent)"
                    )
            if refusal:
                self._refusals += 1
                log.error(
                    "beam unreachable; fail-open refuses request %s of customer %s: %s",
                    request_id, customer_id, refusal,
                )  # fmt: skip
                return None
            self._calls += 1
            self._grains += worst
            record = LetThrough(request_id, customer_id, model, worst, time.time())
            self.records.append(record)
            calls, grains = self._calls, self._grains
        log.warning(
            "beam unreachable; fail-open lets request %s of customer %s (model %s) through "
            "without a hold: worst case %d grains; spent %d of %s calls, %d of %s grains",
            request_id, customer_id, model, worst,
            calls, _bound(self.max_calls), grains, _bound(self.max_grains),
        )  # fmt: skip
        return record

    def finish(self, record: LetThrough) -> None:
        with self._lock:
            self._finished += 1
            self._completion_tokens += record.completion_tokens
        log.warning(
            "fail-open request %s of customer %s ended %s: prompt %d (cached %d), "
            "completion %d tokens, provider cost %d grains; not charged by Beam",
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


def _bound(value: int | None) -> str:
    return "unbounded" if value is None else str(value)
