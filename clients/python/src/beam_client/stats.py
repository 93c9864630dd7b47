"""The client's counters, exposed by ``client.stats()`` (no metrics library needed).

Export them to your metrics system by reading ``stats()`` periodically; every counter only
grows. The fail-open policy's counters (``fail_open_*``) are merged in.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class Counters:
    """The client's counters (``client.stats()``); safe to bump from several threads."""

    values: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    NAMES = (
        "calls",  # RPCs sent, retries included
        "retries",  # RPCs sent again after a retryable failure
        "unavailable",  # calls given up after every retry
        "errors",  # calls Beam refused (not retryable)
        "checks_approved",
        "checks_rejected",
        "deducts",
        "stream_stops",  # Deducts that answered success=false
        "finalizes",  # settlements acknowledged
        "finalize_failures",  # settlements the guard's retries could not get acknowledged
        "finalizes_queued",  # settlements written to the outbox (unacknowledged, let-through)
        "outbox_replayed",  # queued settlements Beam acknowledged on replay
        "outbox_dropped",  # queued settlements Beam refused on replay (logged, given up)
        "outbox_full",  # settlements the outbox could not store (the hold TTL is the net)
        "let_through_posted",  # fail-open requests whose usage reached Beam's ledger
        "fail_closed_refusals",  # guards refused because Beam was unreachable
        "deducts_skipped_open",  # streams that went on past their hold under fail-open
        "coverage_cuts",  # streams cut where their hold's coverage ended, before an answer
    )

    def __post_init__(self) -> None:
        for name in self.NAMES:
            self.values.setdefault(name, 0)

    def bump(self, name: str, by: int = 1) -> None:
        with self._lock:
            self.values[name] = self.values.get(name, 0) + by

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.values)
