"""The operator's Prometheus metrics (served on BEAM_METRICS_PORT by ``main.run``).

The service's metrics live in ``beam.observability``; these describe only reconciling.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RECONCILES = Counter(
    "beam_operator_reconciles_total",
    "Handler runs by kind, handler and outcome (ok, temporary, permanent)",
    ["kind", "handler", "outcome"],
)
RECONCILE_LATENCY = Histogram(
    "beam_operator_reconcile_duration_seconds",
    "Duration of handler runs by kind and handler",
    ["kind", "handler"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
EVENTS = Counter("beam_operator_events_total", "Kubernetes Events emitted, by reason", ["reason"])
STATUS_REFRESHES = Counter(
    "beam_operator_status_refreshes_total",
    "Timer passes by kind and outcome (unchanged, patched, skipped, failed)",
    ["kind", "outcome"],
)
