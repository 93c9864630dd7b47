"""The benchmark's numbers in, its table out: pure functions, no I/O, no clock.

``run.py`` measures and fills ``Measurement``s; everything here turns them into the one table
(call | empty handler calls/s | Beam calls/s | ratio | p50/p99/p99.9 | CPU µs/call | targets)
and its Markdown and JSON forms. ``bench/test_report.py`` checks it on fixed inputs; no test
anywhere asserts a timing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

CLOSED = "closed"
OPEN = "open"  # at a fraction of the empty handler's closed-loop calls/s (issue 9's p99 rate)
OPEN_OWN = "open-own"  # at the same fraction of Beam's own closed-loop calls/s
EMPTY = "empty"
BEAM = "beam"


@dataclass(frozen=True)
class Target:
    """Issue 9's goal for one row: throughput ratio to the empty handler, p99 at the open rate."""

    min_ratio: float | None
    max_p99_ms: float | None


@dataclass(frozen=True)
class Call:
    key: str
    title: str
    target: Target
    # For the text: what the empty handler of this row is.
    baseline: str = "empty grpc.aio handler"
    # The row whose empty-handler runs this row shares (the empty handler ignores customers).
    empty_call: str | None = None


CALLS: tuple[Call, ...] = (
    Call("check", "CheckBalance", Target(0.8, 2.0)),
    Call("deduct", "DeductTokens", Target(0.8, 2.0)),
    Call("finalize_spread", "FinalizeRequest, 64 customers", Target(0.5, 5.0)),
    Call(
        "finalize_hot",
        "FinalizeRequest, 1 hot customer",
        Target(0.3, 5.0),
        empty_call="finalize_spread",
    ),
    Call("get_balance", "GetBalance (gRPC)", Target(0.8, None)),
    Call("rest_get_balance", "GetBalance (REST)", Target(None, None), "empty FastAPI app"),
)
CALLS_BY_KEY = {call.key: call for call in CALLS}
# Issue 9: REST GetBalance >= 0.9x gRPC GetBalance (both Beam).
REST_VS_GRPC_TARGET = 0.9
TIMES = "\u00d7"  # the multiplication sign of "0.80x"


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (the smallest value with at least p% of values at or below it)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p * len(ordered) / 100 - 1e-9))  # 99.9% of 1000 is 999, not 1000
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class Measurement:
    """One load-generator run against one server."""

    call: str  # a Call.key
    server: str  # EMPTY or BEAM
    mode: str  # CLOSED (concurrency in flight) or OPEN (offered_rps on schedule)
    tool: str  # "ghz" or "hey"
    seconds: float  # from the first call sent to the last answer
    sent: int
    ok: int
    errors: int
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    error_latencies_ms: list[float] = field(default_factory=list, repr=False)  # of failed calls
    concurrency: int | None = None
    offered_rps: float | None = None
    server_cpu_seconds: float = 0.0
    client_cpu_seconds: float = 0.0  # the load generator's own (ghz or hey)
    # CPU seconds of each store's processes (Redis, PostgreSQL) over the run.
    store_cpu_seconds: dict[str, float] = field(default_factory=dict)
    error_kinds: dict[str, int] = field(default_factory=dict)
    load_average: str = ""  # /proc/loadavg's 1/5/15 minutes just before the run
    cut_off: int = 0  # calls in flight when a closed-loop run's clock stopped (not counted)
    # A closed loop runs in rounds alternating with the other server's: calls/s of each round.
    round_rps: list[float] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us_per_call(self) -> float:
        return self.server_cpu_seconds / self.ok * 1e6 if self.ok else math.nan

    @property
    def client_cpu_us_per_call(self) -> float:
        return self.client_cpu_seconds / self.ok * 1e6 if self.ok else math.nan

    @property
    def server_busy(self) -> float:
        """The server's CPU time over the run's wall time (1.0 = one whole CPU)."""
        return self.server_cpu_seconds / self.seconds if self.seconds > 0 else math.nan

    def store_cpu_us_per_call(self, store: str) -> float:
        seconds = self.store_cpu_seconds.get(store)
        return seconds / self.ok * 1e6 if self.ok and seconds is not None else math.nan

    def p(self, q: float) -> float:
        return percentile(self.latencies_ms, q)

    @property
    def kept_up(self) -> bool:
        """Open loop only: the server answered (about) everything offered, in time."""
        if self.offered_rps is None:
            return True
        return self.errors == 0 and self.throughput >= 0.95 * self.offered_rps

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        del data["latencies_ms"], data["error_latencies_ms"]
        data |= {
            "throughput": round(self.throughput, 1),
            "p50_ms": _round(self.p(50)),
            "p99_ms": _round(self.p(99)),
            "p999_ms": _round(self.p(99.9)),
            "max_ms": _round(max(self.latencies_ms, default=math.nan)),
            "failed_calls_latency_ms": {
                "min": _round(min(self.error_latencies_ms, default=math.nan)),
                "p50": _round(percentile(self.error_latencies_ms, 50)),
                "max": _round(max(self.error_latencies_ms, default=math.nan)),
            },
            "server_cpu_us_per_call": _round(self.cpu_us_per_call, 1),
            "server_busy": _round(self.server_busy),
            "client_cpu_us_per_call": _round(self.client_cpu_us_per_call, 1),
            "store_cpu_us_per_call": {
                store: _round(self.store_cpu_us_per_call(store), 1)
                for store in self.store_cpu_seconds
            },
        }
        return data


def merge(parts: Sequence[Measurement]) -> Measurement:
    """Rounds of one closed loop as one measurement (sums; latencies pooled)."""
    first = parts[0]
    stores = {store for part in parts for store in part.store_cpu_seconds}
    kinds: dict[str, int] = {}
    for part in parts:
        for kind, count in part.error_kinds.items():
            kinds[kind] = kinds.get(kind, 0) + count
    return replace(
        first,
        seconds=sum(part.seconds for part in parts),
        sent=sum(part.sent for part in parts),
        ok=sum(part.ok for part in parts),
        errors=sum(part.errors for part in parts),
        latencies_ms=[latency for part in parts for latency in part.latencies_ms],
        error_latencies_ms=[latency for part in parts for latency in part.error_latencies_ms],
        server_cpu_seconds=sum(part.server_cpu_seconds for part in parts),
        client_cpu_seconds=sum(part.client_cpu_seconds for part in parts),
        store_cpu_seconds={
            store: sum(part.store_cpu_seconds.get(store, 0.0) for part in parts)
            for store in sorted(stores)
        },
        error_kinds=kinds,
        cut_off=sum(part.cut_off for part in parts),
        round_rps=[part.throughput for part in parts],
    )


def _round(value: float, digits: int = 3) -> float | None:
    return None if math.isnan(value) else round(value, digits)


@dataclass
class Row:
    call: Call
    empty_rps: float | None
    beam_rps: float | None
    open_rps: float | None  # the open-loop rate: 50% of the empty handler's saturation
    beam_open: Measurement | None
    empty_open: Measurement | None
    beam_open_own: Measurement | None
    beam_cpu_us: float | None
    empty_cpu_us: float | None
    beam_closed: Measurement | None = None
    empty_closed: Measurement | None = None

    @property
    def ratio(self) -> float | None:
        if not self.empty_rps or self.beam_rps is None:
            return None
        return self.beam_rps / self.empty_rps

    @property
    def cpu_ratio(self) -> float | None:
        """Empty handler's CPU per call over Beam's: the calls/s ratio if each server had the
        same share of a CPU, whatever that share was (on a shared machine, often < 1)."""
        if not self.beam_cpu_us or self.empty_cpu_us is None:
            return None
        if math.isnan(self.beam_cpu_us) or math.isnan(self.empty_cpu_us):
            return None
        return self.empty_cpu_us / self.beam_cpu_us

    @property
    def round_ratios(self) -> list[float]:
        """Beam over empty round by round (each pair ran back to back): the spread to expect."""
        if self.beam_closed is None or self.empty_closed is None:
            return []
        pairs = zip(self.beam_closed.round_rps, self.empty_closed.round_rps, strict=False)
        return [beam / empty for beam, empty in pairs if empty > 0]

    @property
    def ratio_met(self) -> bool | None:
        goal = self.call.target.min_ratio
        if goal is None or self.ratio is None:
            return None
        return self.ratio >= goal

    @property
    def p99_met(self) -> bool | None:
        goal = self.call.target.max_p99_ms
        if goal is None or self.beam_open is None:
            return None
        return self.beam_open.kept_up and self.beam_open.p(99) <= goal


def build_rows(measurements: Iterable[Measurement]) -> list[Row]:
    by = {(m.call, m.server, m.mode): m for m in measurements}
    rows = []
    for call in CALLS:
        # A row without its own empty-handler run uses empty_call's (the empty handler
        # does not look at customers).
        def empty(mode: str, call: Call = call) -> Measurement | None:
            found = by.get((call.key, EMPTY, mode))
            return found or (by.get((call.empty_call, EMPTY, mode)) if call.empty_call else None)

        empty_closed = empty(CLOSED)
        beam_closed = by.get((call.key, BEAM, CLOSED))
        beam_open = by.get((call.key, BEAM, OPEN))
        if empty_closed is None and beam_closed is None and beam_open is None:
            continue
        rows.append(
            Row(
                call=call,
                empty_rps=empty_closed.throughput if empty_closed else None,
                beam_rps=beam_closed.throughput if beam_closed else None,
                open_rps=beam_open.offered_rps if beam_open else None,
                beam_open=beam_open,
                empty_open=empty(OPEN),
                beam_open_own=by.get((call.key, BEAM, OPEN_OWN)),
                beam_cpu_us=beam_closed.cpu_us_per_call if beam_closed else None,
                empty_cpu_us=empty_closed.cpu_us_per_call if empty_closed else None,
                beam_closed=beam_closed,
                empty_closed=empty_closed,
            )
        )
    return rows


def rest_vs_grpc(rows: Iterable[Row]) -> float | None:
    """Beam's REST GetBalance calls/s over its gRPC GetBalance calls/s (issue 9: >= 0.9)."""
    by = {row.call.key: row for row in rows}
    rest, grpc = by.get("rest_get_balance"), by.get("get_balance")
    if not rest or not grpc or not rest.beam_rps or not grpc.beam_rps:
        return None
    return rest.beam_rps / grpc.beam_rps


# -- formatting ----------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:,.{digits}f}"


def _ms(value: float) -> str:
    if math.isnan(value):
        return "—"
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def _latency(m: Measurement | None, with_rate: bool = False) -> str:
    if m is None:
        return "—"
    text = f"{_ms(m.p(50))} / {_ms(m.p(99))} / {_ms(m.p(99.9))}"
    if with_rate:
        text = f"{_num(m.offered_rps)}/s: {text}"
    if not m.kept_up:
        text += f" (overloaded: {m.throughput:,.0f}/s answered, {m.errors:,} errors)"
    return text


def _mark(met: bool | None) -> str:
    return {True: "✅", False: "❌", None: ""}[met]


def _targets(row: Row) -> str:
    target = row.call.target
    parts = []
    if target.min_ratio is not None:
        parts.append(f"≥ {target.min_ratio:g}{TIMES} {_mark(row.ratio_met)}".rstrip())
    if target.max_p99_ms is not None:
        parts.append(f"p99 ≤ {target.max_p99_ms:g} ms {_mark(row.p99_met)}".rstrip())
    return "; ".join(parts) or "—"


def _ratio(value: float | None, rounds: Sequence[float] = ()) -> str:
    if value is None:
        return "—"
    text = f"**{value:.2f}{TIMES}**"
    if len(rounds) > 1:
        text += f" ({min(rounds):.2f} to {max(rounds):.2f})"
    return text


def markdown_table(rows: Sequence[Row]) -> list[str]:
    lines = [
        "| call | empty handler calls/s | Beam calls/s | ratio (rounds) "
        "| CPU µs/call Beam (empty) | CPU ratio | open loop at calls/s "
        "| Beam p50 / p99 / p99.9 ms | empty p50 / p99 / p99.9 ms "
        "| Beam at half its own calls/s: p50 / p99 / p99.9 ms | issue 9 targets |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.call.title} | {_num(row.empty_rps)} | {_num(row.beam_rps)} "
            f"| {_ratio(row.ratio, row.round_ratios)} "
            f"| {_num(row.beam_cpu_us)} ({_num(row.empty_cpu_us)}) | {_ratio(row.cpu_ratio)} "
            f"| {_num(row.open_rps)} | {_latency(row.beam_open)} "
            f"| {_latency(row.empty_open)} | {_latency(row.beam_open_own, with_rate=True)} "
            f"| {_targets(row)} |"
        )
    ratio = rest_vs_grpc(rows)
    if ratio is not None:
        met = _mark(ratio >= REST_VS_GRPC_TARGET)
        lines.append(
            f"| REST ÷ gRPC GetBalance (Beam) | | | {_ratio(ratio)} | | | | | | "
            f"| ≥ {REST_VS_GRPC_TARGET:g}{TIMES} {met} |"
        )
    return lines


def measurement_table(measurements: Sequence[Measurement]) -> list[str]:
    lines = [
        "| call | server | tool | load | calls sent | answered OK | errors | calls/s "
        "| p50 ms | p99 ms | p99.9 ms | max ms | server CPU µs/call | server busy "
        "| Redis CPU µs/call | PostgreSQL CPU µs/call | load generator CPU µs/call "
        "| load average before |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m in measurements:
        if m.mode == CLOSED:
            load = f"closed, {m.concurrency} in flight"
        elif m.mode == OPEN:
            load = f"open, {_num(m.offered_rps)}/s"
        else:
            load = f"open, {_num(m.offered_rps)}/s (half of Beam's own)"
        lines.append(
            f"| {CALLS_BY_KEY[m.call].title} | {m.server} | {m.tool} | {load} | {m.sent:,} "
            f"| {m.ok:,} | {m.errors:,} | {_num(m.throughput)} | {_ms(m.p(50))} "
            f"| {_ms(m.p(99))} | {_ms(m.p(99.9))} "
            f"| {_ms(max(m.latencies_ms, default=math.nan))} "
            f"| {_num(m.cpu_us_per_call)} | {_num(m.server_busy * 100)}% "
            f"| {_num(m.store_cpu_us_per_call('redis'))} "
            f"| {_num(m.store_cpu_us_per_call('postgres'))} "
            f"| {_num(m.client_cpu_us_per_call)} | {m.load_average} |"
        )
    return lines


def to_json(
    rows: Sequence[Row], measurements: Sequence[Measurement], **context: Any
) -> dict[str, Any]:
    return {
        **context,
        "rows": [
            {
                "call": row.call.key,
                "title": row.call.title,
                "baseline": row.call.baseline,
                "empty_calls_per_s": _round(row.empty_rps or math.nan, 1),
                "beam_calls_per_s": _round(row.beam_rps or math.nan, 1),
                "ratio": _round(row.ratio if row.ratio is not None else math.nan),
                "round_ratios": [round(r, 3) for r in row.round_ratios],
                "open_loop_calls_per_s": _round(row.open_rps or math.nan, 1),
                "beam_open_loop": row.beam_open.summary() if row.beam_open else None,
                "empty_open_loop": row.empty_open.summary() if row.empty_open else None,
                "beam_open_loop_own_rate": (
                    row.beam_open_own.summary() if row.beam_open_own else None
                ),
                "beam_cpu_us_per_call": _round(row.beam_cpu_us or math.nan, 1),
                "empty_cpu_us_per_call": _round(row.empty_cpu_us or math.nan, 1),
                "cpu_ratio": _round(row.cpu_ratio if row.cpu_ratio is not None else math.nan),
                "target": asdict(row.call.target),
                "ratio_met": row.ratio_met,
                "p99_met": row.p99_met,
            }
            for row in rows
        ],
        "rest_vs_grpc_get_balance": _round(rest_vs_grpc(rows) or math.nan),
        "rest_vs_grpc_target": REST_VS_GRPC_TARGET,
        "measurements": [m.summary() for m in measurements],
    }


# -- the guard row: one stream through the Python client's guard against the same unguarded --
#
# bench/run.py's ``guard`` scenario streams ``tokens`` tokens at ``rate`` tokens/s from a paced
# fake provider on loopback through the real openai SDK, in rounds that interleave the stream
# unguarded (DIRECT), through ``g.openai(...)`` against Beam (GUARD) and against Beam behind a
# proxy that delays every Beam response (GUARD_SLOW). Each round also times CheckBalance calls
# by themselves, on each path: one where a guard's Check is made (right after an unguarded
# stream and the same pause: "in place"), and a few back to back. Issue 16's targets per
# guarded row: stream time (first content chunk to last chunk) at most 1% over the unguarded
# median, first-token overhead at most the in-place Check's p50 on the same path + 1 ms, at
# most 4 RPCs per stream its hold covers.

DIRECT = "direct"
GUARD = "guard"
GUARD_SLOW = "guard_slow"
STREAM_KINDS = (DIRECT, GUARD, GUARD_SLOW)


@dataclass(frozen=True)
class GuardTarget:
    max_stream_overhead: float = 0.01  # stream time over the unguarded median, minus 1
    first_token_slack_ms: float = 1.0  # first-token overhead <= the Check's p50 + this
    max_rpcs: int = 4  # per stream its hold covers


GUARD_TARGET = GuardTarget()


@dataclass
class StreamRun:
    """One stream, as the app saw it (milliseconds from its start: before the guard is
    entered, or before the provider is called when unguarded)."""

    kind: str  # DIRECT, GUARD or GUARD_SLOW
    round: int
    first_token_ms: float  # to the first content chunk
    last_chunk_ms: float  # to the stream's last chunk (the app has the whole answer)
    exit_ms: float | None = None  # to the guard's exit (the settlement acknowledged)
    open_ms: float | None = None  # to the guard's entry (its CheckBalance answered)
    tokens: int = 0  # content chunks received
    rpcs: int | None = None  # the client's stats()["calls"] over the stream
    rpcs_at_proxy: int | None = None  # HTTP/2 streams opened through the delaying proxy
    rpc_kinds: dict[str, int] = field(default_factory=dict)  # checks, deducts, finalizes
    status: str = ""  # the settlement's status (guarded)
    client_cpu_ms: float = 0.0  # the app process's CPU time over the stream
    load_average: str = ""

    @property
    def stream_ms(self) -> float:
        """First content chunk to last chunk: the time the stream itself took."""
        return self.last_chunk_ms - self.first_token_ms


@dataclass
class GuardBench:
    """Everything the guard scenario measured (warm-up runs excluded)."""

    tokens: int
    rate: float  # tokens/s the provider paced
    delay_ms: float  # added to every Beam response on the GUARD_SLOW path
    runs: list[StreamRun] = field(default_factory=list)
    # Lone CheckBalance calls per path (GUARD / GUARD_SLOW): back to back, and in place (each
    # right after an unguarded stream and the pause, as the guard's own Check is made).
    check_ms: dict[str, list[float]] = field(default_factory=dict)
    check_in_place_ms: dict[str, list[float]] = field(default_factory=dict)
    # The wake-up probe: call name -> ms the app idled before each call -> its latencies.
    wakeup_ms: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    load_averages: list[str] = field(default_factory=list)  # before each round


def _median(values: Iterable[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


@dataclass
class GuardRow:
    """One guarded path (GUARD or GUARD_SLOW) against the unguarded runs of the same rounds."""

    kind: str
    title: str
    tokens: int
    direct: list[StreamRun]
    guarded: list[StreamRun]
    check_ms: list[float]  # back to back
    check_in_place_ms: list[float] = field(default_factory=list)
    target: GuardTarget = GUARD_TARGET

    @property
    def stream_ms(self) -> float:
        return _median(r.stream_ms for r in self.guarded)

    @property
    def direct_stream_ms(self) -> float:
        return _median(r.stream_ms for r in self.direct)

    @property
    def stream_ratio(self) -> float:
        """Guarded over unguarded median stream time (1.0: no overhead)."""
        return self.stream_ms / self.direct_stream_ms if self.direct_stream_ms > 0 else math.nan

    @property
    def round_ratios(self) -> list[float]:
        """Stream time, guarded over the median unguarded of the same round."""
        by_round: dict[int, list[float]] = {}
        for r in self.direct:
            by_round.setdefault(r.round, []).append(r.stream_ms)
        direct = {index: _median(values) for index, values in by_round.items()}
        return [r.stream_ms / direct[r.round] for r in self.guarded if direct.get(r.round)]

    @property
    def first_token_ms(self) -> float:
        return _median(r.first_token_ms for r in self.guarded)

    @property
    def direct_first_token_ms(self) -> float:
        return _median(r.first_token_ms for r in self.direct)

    @property
    def first_token_overhead_ms(self) -> float:
        return self.first_token_ms - self.direct_first_token_ms

    @property
    def check_p50_ms(self) -> float:
        """The Check the first-token target is measured against: a lone Check made where the
        guard makes its own (after an unguarded stream and the pause); back to back when the
        run has no in-place Checks."""
        return percentile(self.check_in_place_ms or self.check_ms, 50)

    @property
    def check_hot_p50_ms(self) -> float:
        """Lone Checks back to back: every process on the path awake."""
        return percentile(self.check_ms, 50)

    @property
    def open_ms(self) -> float:
        """The guard's own CheckBalance (its entry), median: the first-token overhead's
        share that is the Check."""
        return _median(r.open_ms for r in self.guarded if r.open_ms is not None)

    @property
    def after_check_ms(self) -> float:
        """Median over the guarded runs of the first token's time after the guard's own Check
        answered (its entry): what the app waited for the provider."""
        return _median(r.first_token_ms - r.open_ms for r in self.guarded if r.open_ms is not None)

    @property
    def beyond_check_ms(self) -> float:
        """The first-token wait the guard adds beyond its Check: the time after the Check
        (run by run) over the unguarded first token (median against median). The difference
        of the first-token medians is not the Check's median plus this: the Check's
        latency is skewed (an idle path's wake-ups), and the median of a sum of skewed
        latencies exceeds the sum of their medians."""
        return self.after_check_ms - self.direct_first_token_ms

    @property
    def total_ratio(self) -> float:
        """Start to last chunk (the first-token wait included), guarded over unguarded."""
        direct = _median(r.last_chunk_ms for r in self.direct)
        return _median(r.last_chunk_ms for r in self.guarded) / direct if direct > 0 else math.nan

    @property
    def cpu_ms(self) -> float:
        return _median(r.client_cpu_ms for r in self.guarded)

    @property
    def direct_cpu_ms(self) -> float:
        return _median(r.client_cpu_ms for r in self.direct)

    @property
    def rpcs_max(self) -> int | None:
        counts = [r.rpcs for r in self.guarded if r.rpcs is not None]
        return max(counts) if counts else None

    @property
    def rpcs_at_proxy_max(self) -> int | None:
        counts = [r.rpcs_at_proxy for r in self.guarded if r.rpcs_at_proxy is not None]
        return max(counts) if counts else None

    @property
    def complete(self) -> int:
        """Guarded streams that delivered every token (none cut)."""
        return sum(1 for r in self.guarded if r.tokens == self.tokens)

    @property
    def stream_met(self) -> bool | None:
        if math.isnan(self.stream_ratio):
            return None
        return self.stream_ratio - 1 <= self.target.max_stream_overhead

    @property
    def first_token_met(self) -> bool | None:
        """The first token waits for the Check and at most ``first_token_slack_ms`` more,
        run by run (see ``beyond_check_ms``)."""
        if math.isnan(self.beyond_check_ms):
            return None
        return self.beyond_check_ms <= self.target.first_token_slack_ms

    @property
    def medians_met(self) -> bool | None:
        """The same target read off the medians: first-token overhead (difference of the
        medians) at most the in-place Check's p50 + the slack. Skew makes it stricter than
        the run-by-run reading (``beyond_check_ms``); reported beside it."""
        if math.isnan(self.first_token_overhead_ms) or math.isnan(self.check_p50_ms):
            return None
        return self.first_token_overhead_ms <= self.check_p50_ms + self.target.first_token_slack_ms

    @property
    def rpcs_met(self) -> bool | None:
        counts = [c for c in (self.rpcs_max, self.rpcs_at_proxy_max) if c is not None]
        if not counts:
            return None
        return max(counts) <= self.target.max_rpcs and self.complete == len(self.guarded)


def build_guard_rows(bench: GuardBench) -> list[GuardRow]:
    direct = [r for r in bench.runs if r.kind == DIRECT]
    titles = {
        GUARD: "guard, Beam as is",
        GUARD_SLOW: f"guard, every Beam response +{bench.delay_ms:g} ms",
    }
    rows = []
    for kind, title in titles.items():
        guarded = [r for r in bench.runs if r.kind == kind]
        if guarded:
            rows.append(
                GuardRow(
                    kind,
                    title,
                    bench.tokens,
                    direct,
                    guarded,
                    bench.check_ms.get(kind, []),
                    bench.check_in_place_ms.get(kind, []),
                )
            )
    return rows


def _signed_ms(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:+.1f}"


def _overhead(ratio: float, rounds: Sequence[float] = ()) -> str:
    if math.isnan(ratio):
        return "—"
    text = f"**{(ratio - 1) * 100:+.1f} %**"
    if len(rounds) > 1:
        text += f" ({(min(rounds) - 1) * 100:+.1f} to {(max(rounds) - 1) * 100:+.1f})"
    return text


def _rpcs(row: GuardRow) -> str:
    parts = [_num(row.rpcs_max)]
    if row.rpcs_at_proxy_max is not None:
        parts.append(f"{row.rpcs_at_proxy_max} at the proxy")
    return "; ".join(parts)


def guard_table(rows: Sequence[GuardRow]) -> list[str]:
    """The guard rows: medians of the guarded runs next to the unguarded runs' medians."""
    t = GUARD_TARGET
    lines = [
        "| stream | runs | stream ms, unguarded → guarded | stream-time overhead (rounds) "
        "| first token ms, unguarded → guarded | first-token overhead ms "
        "| Check p50 ms: in place, back to back (the guard's own) "
        "| first token after the guard's Check ms (beyond the unguarded) "
        "| start to last chunk, ratio | app CPU ms/stream, unguarded → guarded "
        "| RPCs/stream (max) | streams complete | issue 16 targets |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        targets = "; ".join(
            [
                f"≤ +{t.max_stream_overhead * 100:g} % {_mark(row.stream_met)}",
                f"first token ≤ its Check + {t.first_token_slack_ms:g} ms "
                f"{_mark(row.first_token_met)} (medians: {_mark(row.medians_met)})",
                f"≤ {t.max_rpcs} RPCs {_mark(row.rpcs_met)}",
            ]
        )
        lines.append(
            f"| {row.title} | {len(row.guarded)} "
            f"| {_ms(row.direct_stream_ms)} → {_ms(row.stream_ms)} "
            f"| {_overhead(row.stream_ratio, row.round_ratios)} "
            f"| {_ms(row.direct_first_token_ms)} → {_ms(row.first_token_ms)} "
            f"| {_signed_ms(row.first_token_overhead_ms)} "
            f"| {_ms(row.check_p50_ms)}, {_ms(row.check_hot_p50_ms)} ({_ms(row.open_ms)}) "
            f"| {_ms(row.after_check_ms)} ({_signed_ms(row.beyond_check_ms)}) "
            f"| {_ratio(row.total_ratio)} | {_ms(row.direct_cpu_ms)} → {_ms(row.cpu_ms)} "
            f"| {_rpcs(row)} | {row.complete}/{len(row.guarded)} | {targets} |"
        )
    return lines


def wakeup_table(wakeup: dict[str, dict[str, list[float]]]) -> list[str]:
    """One row per probed call: its p50 back to back and after each idle pause."""
    pauses = sorted({pause for by_pause in wakeup.values() for pause in by_pause}, key=float)
    if not pauses:
        return []
    heads = ["back to back" if float(p) == 0 else f"after {p} ms idle" for p in pauses]
    lines = [
        "| call (p50 ms) | " + " | ".join(heads) + " |",
        "|---|" + "---:|" * len(pauses),
    ]
    for name, by_pause in wakeup.items():
        cells = [_ms(percentile(by_pause[p], 50)) if p in by_pause else "—" for p in pauses]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def stream_run_table(runs: Sequence[StreamRun]) -> list[str]:
    lines = [
        "| round | stream | first token ms | stream ms | last chunk ms | guard exit ms "
        "| Check (guard entry) ms | tokens | RPCs (check/deduct/finalize) | RPCs at proxy "
        "| status | app CPU ms | load average before |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---|",
    ]
    for r in runs:
        kinds = "/".join(str(r.rpc_kinds.get(k, 0)) for k in ("checks", "deducts", "finalizes"))
        lines.append(
            f"| {r.round} | {r.kind} | {_ms(r.first_token_ms)} | {_ms(r.stream_ms)} "
            f"| {_ms(r.last_chunk_ms)} | {_ms(r.exit_ms if r.exit_ms is not None else math.nan)} "
            f"| {_ms(r.open_ms if r.open_ms is not None else math.nan)} | {r.tokens:,} "
            f"| {_num(r.rpcs)}{f' ({kinds})' if r.rpcs is not None else ''} "
            f"| {_num(r.rpcs_at_proxy)} | {r.status or '—'} | {_ms(r.client_cpu_ms)} "
            f"| {r.load_average} |"
        )
    return lines


def guard_json(bench: GuardBench, rows: Sequence[GuardRow]) -> dict[str, Any]:
    return {
        "tokens": bench.tokens,
        "rate_tokens_per_s": bench.rate,
        "delay_ms": bench.delay_ms,
        "target": asdict(GUARD_TARGET),
        "load_averages": bench.load_averages,
        "rows": [
            {
                "kind": row.kind,
                "title": row.title,
                "runs": len(row.guarded),
                "direct_stream_ms_p50": _round(row.direct_stream_ms),
                "stream_ms_p50": _round(row.stream_ms),
                "stream_overhead": _round(row.stream_ratio - 1, 4),
                "round_ratios": [round(r, 4) for r in row.round_ratios],
                "direct_first_token_ms_p50": _round(row.direct_first_token_ms),
                "first_token_ms_p50": _round(row.first_token_ms),
                "first_token_overhead_ms": _round(row.first_token_overhead_ms),
                "check_ms_p50": _round(row.check_p50_ms),
                "check_in_place_calls": len(row.check_in_place_ms),
                "check_back_to_back_ms_p50": _round(row.check_hot_p50_ms),
                "check_calls": len(row.check_ms),
                "guard_check_ms_p50": _round(row.open_ms),
                "after_check_ms_p50": _round(row.after_check_ms),
                "beyond_check_ms": _round(row.beyond_check_ms),
                "medians_met": row.medians_met,
                "total_ratio": _round(row.total_ratio, 4),
                "direct_client_cpu_ms_p50": _round(row.direct_cpu_ms),
                "client_cpu_ms_p50": _round(row.cpu_ms),
                "rpcs_max": row.rpcs_max,
                "rpcs_at_proxy_max": row.rpcs_at_proxy_max,
                "complete": row.complete,
                "stream_met": row.stream_met,
                "first_token_met": row.first_token_met,
                "rpcs_met": row.rpcs_met,
            }
            for row in rows
        ],
        "runs": [{**asdict(r), "stream_ms": _round(r.stream_ms)} for r in bench.runs],
        "check_ms": {
            path: [round(v, 3) for v in values] for path, values in bench.check_ms.items()
        },
        "check_in_place_ms": {
            path: [round(v, 3) for v in values] for path, values in bench.check_in_place_ms.items()
        },
        "wakeup_ms": {
            name: {pause: [round(v, 3) for v in values] for pause, values in by_pause.items()}
            for name, by_pause in bench.wakeup_ms.items()
        },
    }
