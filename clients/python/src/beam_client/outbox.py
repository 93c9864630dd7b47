"""The durable outbox: a settlement Beam did not acknowledge is kept until it is.

A FinalizeRequest moves money out of a hold and into the ledger; losing one leaves the
hold to expire at its TTL, charged only what the Deducts reported. So a Finalize whose
first attempt fails is written here (the serialized request: same request id, same token)
before it is retried, and removed once Beam acknowledges it. What is still here when the
guard gives up is replayed by the client: when it starts (an outbox left by a process that
died is picked up by the next one), then periodically with a bounded back-off per entry,
until Beam acknowledges it. FinalizeRequest is idempotent by request id on the server, so
a replay never charges twice (it answers the stored settlement, ``replayed``).

Fail-open settlements (requests let through without Beam, or past their hold) are written
here directly, and posted the same way once Beam answers again.

The default store is a SQLite file (stdlib ``sqlite3``, WAL, synchronous writes):
``BEAM_OUTBOX_PATH`` or ``outbox_path=``, else ``$XDG_STATE_HOME/beam_client/outbox.sqlite3``
(``~/.local/state/...``). ``:memory:`` keeps it in memory only (lost with the process).
Entries are scoped by Beam's address and a fingerprint of the API key, so several clients
(or tenants) may share one file, and each replays only its own. Any object with the
:class:`Outbox` methods can be passed as ``outbox=`` (a shared database, a queue).

Dangerous parts: this module does blocking file I/O (the async client runs it in a
thread); the store is bounded (``max_entries``; a full outbox refuses and logs, and the
hold's TTL is then the last net).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from beam_client.errors import BeamError
from beam_client.retry import is_retryable

log = logging.getLogger("beam_client")

OUTBOX_PATH_ENV = "BEAM_OUTBOX_PATH"
MEMORY = ":memory:"
DEFAULT_MAX_ENTRIES = 100_000
# Entries replayed per pass, and the bounded back-off between attempts of one entry.
REPLAY_BATCH = 100
BACKOFF_INITIAL_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 10.0
# How often the client looks at the outbox when nothing woke it sooner.
REPLAY_INTERVAL_SECONDS = 1.0

Kind = Literal["finalize", "let_through"]


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One settlement waiting for Beam: a serialized ``FinalizeRequestRequest``."""

    scope: str
    customer_id: str
    request_id: str
    payload: bytes
    kind: str = "finalize"
    attempts: int = 0
    next_attempt_at: float = 0.0
    created_at: float = 0.0


class Outbox(Protocol):
    """Where unacknowledged settlements wait. Methods may block (file or network I/O)."""

    def put(self, entry: OutboxEntry) -> bool:
        """Store (or replace) the entry; ``False`` when the outbox is full."""
        ...

    def remove(self, scope: str, customer_id: str, request_id: str) -> None: ...

    def due(self, scope: str, now: float, limit: int) -> list[OutboxEntry]:
        """Entries of ``scope`` whose next attempt is due, oldest first."""
        ...

    def reschedule(self, entry: OutboxEntry, attempts: int, next_attempt_at: float) -> None: ...

    def count(self, scope: str) -> int: ...

    def close(self) -> None: ...


def scope_for(address: str, api_key: str) -> str:
    """The outbox scope of a client: Beam's address and a fingerprint of its key."""
    fingerprint = hashlib.sha256(api_key.encode()).hexdigest()[:16]
    return f"{address}|{fingerprint}"


def next_attempt_at(now: float, attempts: int) -> float:
    """When to try an entry again after ``attempts`` failed attempts (bounded back-off)."""
    delay = BACKOFF_INITIAL_SECONDS * 2.0 ** max(0, attempts - 1)
    return now + min(BACKOFF_MAX_SECONDS, delay)


def replay_decision(error: BeamError) -> Literal["retry", "drop"]:
    """Try again later when Beam was unreachable; drop what Beam refused (it always will)."""
    return "retry" if is_retryable(error) else "drop"


def default_path(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    configured = env.get(OUTBOX_PATH_ENV)
    if configured:
        return configured
    state = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "beam_client", "outbox.sqlite3")


def open_outbox(path: str | os.PathLike[str] | None = None) -> Outbox:
    """The outbox at ``path`` (default: :func:`default_path`); in memory if it cannot be
    opened (logged at ERROR: settlements then survive only as long as the process)."""
    where = os.fspath(path) if path is not None else default_path()
    if where == MEMORY:
        return MemoryOutbox()
    try:
        return SQLiteOutbox(where)
    except (OSError, sqlite3.Error) as error:
        log.error("cannot open the settlement outbox %s (%s); keeping it in memory", where, error)
        return MemoryOutbox()


class MemoryOutbox:
    """An outbox in memory: replayed while the process lives, lost with it."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: dict[tuple[str, str, str], OutboxEntry] = {}
        self._lock = threading.Lock()

    def put(self, entry: OutboxEntry) -> bool:
        key = (entry.scope, entry.customer_id, entry.request_id)
        with self._lock:
            if key not in self._entries and len(self._entries) >= self.max_entries:
                return False
            self._entries[key] = entry
            return True

    def remove(self, scope: str, customer_id: str, request_id: str) -> None:
        with self._lock:
            self._entries.pop((scope, customer_id, request_id), None)

    def due(self, scope: str, now: float, limit: int) -> list[OutboxEntry]:
        with self._lock:
            ready = [e for e in self._entries.values() if e.scope == scope]
        ready = [e for e in ready if e.next_attempt_at <= now]
        return sorted(ready, key=lambda e: e.created_at)[:limit]

    def reschedule(self, entry: OutboxEntry, attempts: int, next_attempt_at: float) -> None:
        key = (entry.scope, entry.customer_id, entry.request_id)
        with self._lock:
            if key in self._entries:
                self._entries[key] = replace(
                    entry, attempts=attempts, next_attempt_at=next_attempt_at
                )

    def count(self, scope: str) -> int:
        with self._lock:
            return sum(1 for e in self._entries.values() if e.scope == scope)

    def close(self) -> None:
        return None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    scope TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    payload BLOB NOT NULL,
    kind TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    next_attempt_at REAL NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (scope, customer_id, request_id)
)
"""


class SQLiteOutbox:
    """The default outbox: one SQLite file, safe for several threads and processes."""

    def __init__(self, path: str | os.PathLike[str], max_entries: int = DEFAULT_MAX_ENTRIES):
        self.path = Path(path)
        self.max_entries = max_entries
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, timeout=10.0, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)

    def put(self, entry: OutboxEntry) -> bool:
        with self._lock:
            (size,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
            if size >= self.max_entries:
                exists = self._db.execute(
                    "SELECT 1 FROM outbox WHERE scope=? AND customer_id=? AND request_id=?",
                    (entry.scope, entry.customer_id, entry.request_id),
                ).fetchone()
                if exists is None:
                    return False
            self._db.execute(
                "INSERT OR REPLACE INTO outbox VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.scope, entry.customer_id, entry.request_id, entry.payload,
                    entry.kind, entry.attempts, entry.next_attempt_at, entry.created_at,
                ),
            )  # fmt: skip
            return True

    def remove(self, scope: str, customer_id: str, request_id: str) -> None:
        with self._lock:
            self._db.execute(
                "DELETE FROM outbox WHERE scope=? AND customer_id=? AND request_id=?",
                (scope, customer_id, request_id),
            )

    def due(self, scope: str, now: float, limit: int) -> list[OutboxEntry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT scope, customer_id, request_id, payload, kind, attempts, "
                "next_attempt_at, created_at FROM outbox WHERE scope=? AND next_attempt_at<=? "
                "ORDER BY created_at LIMIT ?",
                (scope, now, limit),
            ).fetchall()
        return [OutboxEntry(*row) for row in rows]

    def reschedule(self, entry: OutboxEntry, attempts: int, next_attempt_at: float) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE outbox SET attempts=?, next_attempt_at=? "
                "WHERE scope=? AND customer_id=? AND request_id=?",
                (attempts, next_attempt_at, entry.scope, entry.customer_id, entry.request_id),
            )

    def count(self, scope: str) -> int:
        with self._lock:
            (size,) = self._db.execute(
                "SELECT COUNT(*) FROM outbox WHERE scope=?", (scope,)
            ).fetchone()
        return int(size)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def new_entry(
    scope: str, request: Any, kind: Kind, now: float | None = None, delay: float = 0.0
) -> OutboxEntry:
    """The entry of a ``FinalizeRequestRequest`` (due ``delay`` seconds from now)."""
    at = time.time() if now is None else now
    return OutboxEntry(
        scope=scope,
        customer_id=str(request.customer_id),
        request_id=str(request.request_id),
        payload=bytes(request.SerializeToString()),
        kind=kind,
        attempts=0,
        next_attempt_at=at + delay,
        created_at=at,
    )
