"""Metrics (Prometheus) and structured JSON logs.

Every metric of the service's layers (api, core, adapters) is declared here, once; the
operator's own reconcile metrics live in ``beam_operator.metrics``. Logs are JSON lines; a
filter scrubs anything shaped like an API key or request token from every record as a last
line of defence (no code path logs them on purpose)."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.metrics import MetricWrapperBase
from pythonjsonlogger.json import JsonFormatter

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
)  # fmt: skip

CALL_LATENCY = Histogram(
    "beam_call_duration_seconds",
    "Latency of each API call, by call and transport",
    ["call", "transport"],
    buckets=_LATENCY_BUCKETS,
)
DECISIONS = Counter(
    "beam_decisions_total",
    "Outcomes of Check/Deduct/Finalize calls by reason (OK when approved)",
    ["call", "reason"],
)
STREAM_KILLS = Counter(
    "beam_stream_kills_total", "Deducts answered success=false (the app must stop)", ["reason"]
)
GRAINS = Counter(
    "beam_grains_total",
    "Grains moved: held (opened holds), settled (charged), refunded, overage",
    ["kind"],
)
STORE_LATENCY = Histogram(
    "beam_store_duration_seconds",
    "Latency of Redis scripts and PostgreSQL transactions",
    ["store", "operation"],
    buckets=_LATENCY_BUCKETS,
)
REAPER_SETTLED = Counter("beam_reaper_settled_total", "Expired holds settled by the reaper")
SPENT = Counter(
    "beam_spent_grains_total",
    "Grains charged by new ledger entries that spend (settlements, expiries, late-Finalize "
    "adjustments upwards), by model; docs/DATABASE.md has the exact per-customer figures",
    ["model"],
)
REAPER_PASSES = Counter("beam_reaper_passes_total", "Reaper passes", ["result"])
REAPER_FAILURES = Counter(
    "beam_reaper_failures_total",
    "Holds or customers the reaper could not settle in a pass (retried the next pass)",
)
AUTH_LOOKUPS_SHED = Counter(
    "beam_auth_lookups_shed_total",
    "Unknown API keys refused without a PostgreSQL lookup (lookup budget spent)",
)

_CHILDREN: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}


def child(metric: MetricWrapperBase, *labels: str) -> Any:
    """``metric.labels(*labels)``, bound once and then read from a dict: ``labels()`` takes
    a lock and validates the values on every call, a cost the hot path pays several times
    per call (docs/PERFORMANCE.md). Holds what prometheus_client holds anyway (one child
    per label values), so it is bounded by the same label values."""
    key = (metric, labels)
    bound = _CHILDREN.get(key)
    if bound is None:
        bound = _CHILDREN[key] = metric.labels(*labels)
    return bound


_SECRET_PATTERNS = re.compile(
    r"(beam_sk_[A-Za-z0-9_\-]+|beam_test_key_[A-Za-z0-9]+|v1\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{16,}"
    r"|Bearer\s+\S+)"
)


def scrub(text: str) -> str:
    return _SECRET_PATTERNS.sub("[REDACTED]", text)


class ScrubSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = scrub(record.msg)
        if record.args:
            record.args = tuple(
                scrub(a) if isinstance(a, str) else a for a in _as_tuple(record.args)
            )
        for key, value in list(record.__dict__.items()):
            if isinstance(value, str) and key not in ("msg", "name", "levelname", "pathname"):
                record.__dict__[key] = scrub(value)
        return True


def _as_tuple(args: Any) -> tuple[Any, ...]:
    return args if isinstance(args, tuple) else (args,)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
    )
    handler.addFilter(ScrubSecrets())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
