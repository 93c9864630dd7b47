"""Issue 18 item 5: one customer's holds must not stall Redis for every other customer.

VerifyIntegrity (any role: a reader's key is enough) sums every open hold of a customer.
Before ``redis_holds_per_script`` one Lua script did it for all of them: a customer with
10,000 open holds made each call one long script, and Redis runs nothing else meanwhile. Now a
script visits at most ``BEAM_REDIS_HOLDS_PER_SCRIPT`` holds (default 256) and a customer with
more is summed in steps; 10,000 reproduces the old single script for such a customer.

One run, side by side (bench/README.md, "Bounded scripts"):

1. Real PostgreSQL and Redis (beam_dev.servers), seeded by ``beam apply`` (bench/run.py's
   price list and enforcer key, a reader key, customers ``c1`` and ``hot``), then 10,000
   one-grain holds on ``hot``, opened through Beam's own CheckBalance (64 in flight).
2. Three phases, each against a new ``beam serve`` (production mode, pinned like run.py's)
   with its own ``BEAM_REDIS_HOLDS_PER_SCRIPT``; the stores and the holds stay:
   (a) 256, no other load; (b) 10,000 with 4 loops calling VerifyIntegrity for ``hot``
   (REST, the reader key); (c) 256 with the same 4 loops. ``--rounds`` repeats a, b, c.
3. In each phase ``c1``'s GetBalance over gRPC with ghz in open loop at a fixed rate
   (``--rate``, ``--seconds``): p50/p95/p99/p99.9; the VerifyIntegrity calls that ended while
   ghz ran and their latencies; a few lone VerifyIntegrity calls before the loops start;
   Redis's long commands (SLOWLOG) and CPU.
4. Writes bench/results/<date>-<host>-bounded-scripts.{md,json}: the machine, the load
   averages, the ratios (c)/(a) and (b)/(a) of GetBalance's p95 and p99 (pooled over the
   rounds, with each round's own ratio beside them).

Usage: ``python bench/bounded_scripts.py [--rate 100] [--seconds 20] [--rounds 2]`` (finds or
builds ghz first, like run.py).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import report as rp

HOT = "hot"  # the customer with 10,000 open holds
READER = "c1"  # the other customer, whose GetBalance is measured
HOT_HOLDS = 10_000  # MAX_OPEN_HOLDS_PER_CUSTOMER
READER_KEY = "bench-reader"
VERIFY_PATH = "/v1/admin/verify-integrity"
SLOW_MS = 10.0  # a Redis command at least this long counts as "long" in the report


# -- pure: the phases and their report (bench/test_bounded_scripts.py) -----------------------


@dataclass(frozen=True)
class PhaseSpec:
    key: str  # "a", "b", "c"
    holds_per_script: int  # BEAM_REDIS_HOLDS_PER_SCRIPT of this phase's beam serve
    verify_loops: int  # concurrent loops calling VerifyIntegrity for HOT
    title: str


PHASES: tuple[PhaseSpec, ...] = (
    PhaseSpec("a", 256, 0, "256 holds per script, no verify load"),
    PhaseSpec("b", 10_000, 4, "10,000 holds per script (one script per audit: the old way)"),
    PhaseSpec("c", 256, 4, "256 holds per script (the default)"),
)
BASELINE = "a"
RATIO_PERCENTILES = (50, 95, 99)  # GetBalance's, each phase over the baseline's


@dataclass(frozen=True)
class VerifyCall:
    """One VerifyIntegrity call (times: time.monotonic())."""

    started: float
    ended: float
    status: int  # HTTP status, 0 when the call failed without one
    ok: bool = False  # the answer's "ok" (the books balance)
    open_holds_sum: int | None = None  # of HOT, as the answer reported it
    held_unverified: bool = False

    @property
    def ms(self) -> float:
        return (self.ended - self.started) * 1000


@dataclass
class PhaseResult:
    """One phase of one round, or (``pool``) one phase over every round."""

    spec: PhaseSpec
    get_balance: rp.Measurement  # c1's GetBalance, ghz open loop
    windows: list[tuple[float, float]]  # monotonic start and end of each ghz run
    verify_calls: list[VerifyCall] = field(default_factory=list)  # every call of the loops
    lone_verify: list[VerifyCall] = field(default_factory=list)  # one at a time, no other load
    # Redis SLOWLOG from the loops' start to their end: (script name or command, ms).
    slowlog: list[tuple[str, float]] = field(default_factory=list)
    load_averages: list[str] = field(default_factory=list)  # before each ghz run
    round: int = 0  # -1 when pooled

    @property
    def window_seconds(self) -> float:
        return sum(end - start for start, end in self.windows)

    @property
    def verify_in_window(self) -> list[VerifyCall]:
        """The loops' calls that ended while ghz ran."""
        return [c for c in self.verify_calls if any(s <= c.ended <= e for s, e in self.windows)]

    @property
    def verify_answered(self) -> list[VerifyCall]:
        return [c for c in self.verify_in_window if c.status == 200]

    @property
    def verify_failed(self) -> int:
        """Calls that ended in the window without an answer, or whose answer was not ok."""
        done = self.verify_in_window
        return sum(1 for c in done if c.status != 200 or not c.ok)

    @property
    def verify_rate(self) -> float:
        seconds = self.window_seconds
        return len(self.verify_answered) / seconds if seconds > 0 else math.nan

    def verify_p(self, q: float) -> float:
        return rp.percentile([c.ms for c in self.verify_answered], q)

    @property
    def lone_ms(self) -> list[float]:
        return [c.ms for c in self.lone_verify if c.status == 200]

    @property
    def holds_seen(self) -> list[int]:
        """The distinct open-holds sums the answers reported (loops and lone calls)."""
        calls = [*self.verify_answered, *self.lone_verify]
        return sorted({c.open_holds_sum for c in calls if c.open_holds_sum is not None})

    @property
    def slowlog_ms(self) -> list[float]:
        return [ms for _, ms in self.slowlog]

    def long_commands(self) -> dict[str, tuple[int, int, float]]:
        """Per script (or command) in the SLOWLOG: (entries, entries of at least SLOW_MS,
        max ms), the longest first."""
        groups: dict[str, list[float]] = {}
        for name, ms in self.slowlog:
            groups.setdefault(name, []).append(ms)
        return {
            name: (len(values), sum(1 for ms in values if ms >= SLOW_MS), max(values))
            for name, values in sorted(groups.items(), key=lambda kv: (-max(kv[1]), kv[0]))
        }

    @property
    def redis_busy(self) -> float:
        """Redis's CPU time over the ghz runs' wall time."""
        m = self.get_balance
        seconds = m.store_cpu_seconds.get("redis")
        return seconds / m.seconds if seconds is not None and m.seconds > 0 else math.nan

    @property
    def beam_busy(self) -> float:
        return self.get_balance.server_busy

    @property
    def redis_ms_per_verify(self) -> float:
        """Redis's CPU time over the ghz runs per VerifyIntegrity answered in them (GetBalance's
        share included: (a)'s Redis busy shows how small it is)."""
        seconds = self.get_balance.store_cpu_seconds.get("redis")
        answered = len(self.verify_answered)
        return seconds / answered * 1000 if seconds is not None and answered else math.nan


def pool(parts: Sequence[PhaseResult]) -> PhaseResult:
    """One phase's rounds as one result: GetBalance's calls pooled (bench/report.py's merge),
    the windows, calls and SLOWLOG entries of every round."""
    return PhaseResult(
        spec=parts[0].spec,
        get_balance=rp.merge([p.get_balance for p in parts]),
        windows=[w for p in parts for w in p.windows],
        verify_calls=[c for p in parts for c in p.verify_calls],
        lone_verify=[c for p in parts for c in p.lone_verify],
        slowlog=[e for p in parts for e in p.slowlog],
        load_averages=[a for p in parts for a in p.load_averages],
        round=-1,
    )


def pooled(results: Sequence[PhaseResult]) -> list[PhaseResult]:
    """One pooled result per phase, in the phases' order."""
    keys = list(dict.fromkeys(r.spec.key for r in results))
    return [pool([r for r in results if r.spec.key == key]) for key in keys]


def _ratio(base: PhaseResult | None, other: PhaseResult | None, q: float) -> float | None:
    if base is None or other is None:
        return None
    value, reference = other.get_balance.p(q), base.get_balance.p(q)
    if math.isnan(value) or math.isnan(reference) or reference <= 0:
        return None
    return value / reference


def ratio(results: Sequence[PhaseResult], key: str, q: float) -> float | None:
    """GetBalance's percentile ``q`` in phase ``key`` over the baseline phase's, every round
    pooled."""
    phases = {r.spec.key: r for r in pooled(results)}
    return _ratio(phases.get(BASELINE), phases.get(key), q)


def round_ratios(results: Sequence[PhaseResult], key: str, q: float) -> list[float]:
    """The same ratio within each round (phase ``key`` over the baseline of the same round)."""
    rounds = sorted({r.round for r in results})
    values = []
    for n in rounds:
        phases = {r.spec.key: r for r in results if r.round == n}
        value = _ratio(phases.get(BASELINE), phases.get(key), q)
        if value is not None:
            values.append(value)
    return values


def ratios(results: Sequence[PhaseResult]) -> dict[str, dict[str, Any]]:
    """{"b/a": {"p50": 9.1, "p50_rounds": [...], "p95": ..., ...}, "c/a": ...}"""
    keys = [k for k in dict.fromkeys(r.spec.key for r in results) if k != BASELINE]
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        values: dict[str, Any] = {}
        for q in RATIO_PERCENTILES:
            value = ratio(results, key, q)
            values[f"p{q}"] = None if value is None else round(value, 3)
            values[f"p{q}_rounds"] = [round(v, 3) for v in round_ratios(results, key, q)]
        out[f"{key}/{BASELINE}"] = values
    return out


def _ratio_text(value: float | None, rounds: Sequence[float] = ()) -> str:
    if value is None:
        return "—"
    text = f"**{value:.2f}{rp.TIMES}**"
    if len(rounds) > 1:
        text += f" ({min(rounds):.2f} to {max(rounds):.2f})"
    return text


def _latencies(m: rp.Measurement) -> str:
    text = " / ".join(rp._ms(m.p(q)) for q in (50, 95, 99, 99.9))
    if not m.kept_up:
        text += f" (overloaded: {m.throughput:,.0f}/s answered, {m.errors:,} errors)"
    return text


def _loads(averages: Sequence[str]) -> str:
    ones = [float(a.split()[0]) for a in averages if a.split()]
    if not ones:
        return "—"
    return f"{min(ones):.1f}" if min(ones) == max(ones) else f"{min(ones):.1f} to {max(ones):.1f}"


def get_balance_table(results: Sequence[PhaseResult]) -> list[str]:
    """One row per phase, every round pooled."""
    lines = [
        f"| phase | holds per script | verify loops | GetBalance `{READER}`: answered of sent "
        "| p50 / p95 / p99 / p99.9 ms | p95 vs (a) | p99 vs (a) | `beam serve` busy | Redis busy "
        "| load average (1 min) |",
        "|---|---:|---:|---:|---|---|---|---:|---:|---|",
    ]
    for r in pooled(results):
        m, key = r.get_balance, r.spec.key
        p95 = p99 = "—"
        if key != BASELINE:
            p95 = _ratio_text(ratio(results, key, 95), round_ratios(results, key, 95))
            p99 = _ratio_text(ratio(results, key, 99), round_ratios(results, key, 99))
        lines.append(
            f"| ({key}) {r.spec.title} | {r.spec.holds_per_script:,} | {r.spec.verify_loops} | "
            f"{m.ok:,} of {m.sent:,} | {_latencies(m)} | {p95} | {p99} | {r.beam_busy:.0%} | "
            f"{r.redis_busy:.0%} | {_loads(r.load_averages)} |"
        )
    return lines


def verify_table(results: Sequence[PhaseResult]) -> list[str]:
    lines = [
        f"| phase | VerifyIntegrity `{HOT}` ended while ghz ran | per s | p50 / p99 / max ms | "
        "failed | lone call p50 ms | open holds seen | Redis CPU ms per call | Redis commands ≥ "
        f"{SLOW_MS:g} ms | longest in SLOWLOG: max ms (entries, ≥ {SLOW_MS:g} ms) |",
        "|---|---:|---:|---|---:|---:|---|---:|---:|---|",
    ]
    for r in pooled(results):
        loops = r.spec.verify_loops > 0
        answered = r.verify_answered
        latencies = "—"
        if loops:
            top = max((c.ms for c in answered), default=math.nan)
            latencies = f"{rp._ms(r.verify_p(50))} / {rp._ms(r.verify_p(99))} / {rp._ms(top)}"
        longest = ", ".join(
            f"`{name}` {rp._ms(top)} ({entries:,}, {long:,})"
            for name, (entries, long, top) in list(r.long_commands().items())[:3]
        )
        lines.append(
            f"| ({r.spec.key}) | {len(answered):,} | "
            f"{rp._num(r.verify_rate, 1) if loops else '—'} | {latencies} | "
            f"{r.verify_failed:,} | {rp._ms(rp.percentile(r.lone_ms, 50))} | "
            f"{', '.join(f'{s:,}' for s in r.holds_seen) or '—'} | "
            f"{rp._num(r.redis_ms_per_verify, 1)} | "
            f"{sum(1 for ms in r.slowlog_ms if ms >= SLOW_MS):,} | {longest or '—'} |"
        )
    return lines


def phase_json(r: PhaseResult) -> dict[str, Any]:
    answered = r.verify_answered
    return {
        "phase": r.spec.key,
        "round": r.round,
        "title": r.spec.title,
        "holds_per_script": r.spec.holds_per_script,
        "verify_loops": r.spec.verify_loops,
        "load_averages": r.load_averages,
        "get_balance": r.get_balance.summary() | {"p95_ms": rp._round(r.get_balance.p(95))},
        "redis_busy": rp._round(r.redis_busy),
        "beam_serve_busy": rp._round(r.beam_busy),
        "window_seconds": rp._round(r.window_seconds),
        "verify": {
            "calls_total": len(r.verify_calls),
            "ended_in_window": len(r.verify_in_window),
            "answered_in_window": len(answered),
            "failed_in_window": r.verify_failed,
            "held_unverified_in_window": sum(1 for c in answered if c.held_unverified),
            "per_s": rp._round(r.verify_rate, 2),
            "p50_ms": rp._round(r.verify_p(50)),
            "p99_ms": rp._round(r.verify_p(99)),
            "max_ms": rp._round(max((c.ms for c in answered), default=math.nan)),
            "open_holds_sums": r.holds_seen,
            "lone_ms": [round(ms, 3) for ms in r.lone_ms],
            "redis_cpu_ms_per_call": rp._round(r.redis_ms_per_verify, 2),
        },
        "redis_slowlog": {
            "entries": len(r.slowlog),
            "max_ms": rp._round(max(r.slowlog_ms, default=math.nan)),
            f"at_least_{SLOW_MS:g}_ms": sum(1 for ms in r.slowlog_ms if ms >= SLOW_MS),
            "by_command": {
                name: {
                    "entries": entries,
                    f"at_least_{SLOW_MS:g}_ms": long,
                    "max_ms": round(top, 3),
                }
                for name, (entries, long, top) in r.long_commands().items()
            },
        },
    }


def to_json(results: Sequence[PhaseResult], **context: Any) -> dict[str, Any]:
    return {
        **context,
        "ratios_to_a": ratios(results),
        "phases": [phase_json(r) for r in pooled(results)],
        "rounds": [phase_json(r) for r in results],
    }


def render(context: dict[str, Any], results: Sequence[PhaseResult]) -> str:
    m, s = context["machine"], context["settings"]
    pins = m["pinning"]
    pinned = (
        f"`beam serve` on CPU {pins['servers']}; this script (the verify loops), ghz, Redis and "
        f"PostgreSQL on CPU {pins['load_and_stores']} (checked in /proc: {pins['checked']})"
        if pins["servers"] is not None
        else "not pinned (fewer than two CPUs available, or no taskset)"
    )
    ratio_lines = [
        f"- ({key}) over (a): "
        + ", ".join(
            f"p{q} {_ratio_text(ratio(results, key, q), round_ratios(results, key, q))}"
            for q in RATIO_PERCENTILES
        )
        for key in dict.fromkeys(r.spec.key for r in results)
        if key != BASELINE
    ]
    notes = ["## Notes", "", *(f"- {n}" for n in context["notes"]), ""] if context["notes"] else []
    return "\n".join(
        [
            f"# Bounded Redis scripts: another customer's GetBalance while `{HOT}`'s "
            f"{s['hot_holds']:,} holds are verified, {context['date']} on {m['host']}",
            "",
            "Produced by `python bench/bounded_scripts.py`; method and caveats: "
            '[bench/README.md](../README.md) ("Bounded scripts").',
            "",
            "## Machine",
            f"- code: {context['code']}",
            f"- {m['nproc']} CPUs ({m['model_name']}), {m['memory_gib']} GiB; {m['kernel']}",
            f"- Python {m['python']}, grpcio {m['grpcio']}; {m['redis']}; {m['postgres']}; "
            f"ghz {m['ghz']}",
            f"- load average (1/5/15 min) at the start: **{m['load_average_start']}**, at the "
            f"end: **{m['load_average_end']}** (the machine is shared: anything above 0 is "
            "other work)",
            f"- pinning: {pinned}",
            f"- `{HOT}`: {s['hot_holds']:,} open holds of 1 grain (opened in "
            f"{s['hold_open_seconds']:.0f} s through CheckBalance, 64 in flight). Per phase "
            f"and round: GetBalance of `{READER}` over gRPC, ghz `--async` at {s['rate']:g} "
            f"calls/s, {s['calls']:,} calls (about {s['seconds']:g} s); phases (b) and (c): "
            f"{s['verify_loops']} loops of `POST {VERIFY_PATH}` "
            f'`{{"customer_id": "{HOT}"}}` with a `reader` key, each calling again as soon '
            f"as it is answered, started {s['ramp_seconds']:g} s before ghz; every phase: "
            f"{s['lone_verifies']} lone VerifyIntegrity calls before that",
            f"- {s['rounds']} round(s) of (a), (b), (c), each phase against a new `beam serve`; "
            f"whole run: {context['run_seconds']:.0f} s",
            "",
            f"## GetBalance of `{READER}` (another customer)",
            "",
            *get_balance_table(results),
            "",
            *ratio_lines,
            "",
            "Every round pooled; in brackets the lowest and highest ratio within one round. "
            "Percentiles are nearest-rank over every call of the open loops, failed calls "
            "included; the ratios divide percentiles measured in this run, on the same "
            "machine, minutes apart. Busy: the process's CPU time over the ghz runs' wall time "
            "(1 = a whole CPU). Load average: the range of the 1-minute figure just before "
            "each ghz run.",
            "",
            f"## VerifyIntegrity of `{HOT}`, and Redis",
            "",
            *verify_table(results),
            "",
            "Ended while ghz ran: calls of the loops answered (HTTP 200) inside the ghz runs; "
            "per s over those runs. Failed: calls that ended there without an answer, or "
            f"whose answer was not `ok`. Lone call: {s['lone_verifies']} calls one at a time "
            "before the loops started. Open holds seen: the distinct `open_holds_sum` the "
            "answers reported. Redis CPU per call: Redis's CPU time over the ghz runs "
            "divided by the calls answered in them (GetBalance's share included; (a) shows "
            f"it alone). SLOWLOG: every Redis command of at least "
            f"{s['slowlog_threshold_us'] / 1000:g} ms from the loops' start to their end, "
            "by script (or, for the commands a script or Beam called, by command). Its times "
            "are wall time: on a loaded machine they include the time Redis waited for a "
            "CPU, which a plain HGET of 1 ms or more shows.",
            "",
            *notes,
        ]
    )


# -- the run -----------------------------------------------------------------------------------


class VerifyLoops:
    """``loops`` concurrent loops calling VerifyIntegrity for HOT over REST, each calling again
    as soon as its answer arrives, on their own event loop in a thread of this process."""

    def __init__(self, url: str, key: str, loops: int, call_timeout: float) -> None:
        self.url, self.key, self.loops, self.call_timeout = url, key, loops, call_timeout
        self.calls: list[VerifyCall] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {self.key}"}
        async with httpx.AsyncClient(base_url=self.url, headers=headers) as client:

            async def loop() -> None:
                while not self._stop.is_set():
                    self.calls.append(await verify_once(client, self.call_timeout))

            await asyncio.gather(*(loop() for _ in range(self.loops)))

    def __enter__(self) -> VerifyLoops:
        if self.loops:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.loops:
            self._thread.join(timeout=self.call_timeout + 30)


async def verify_once(client: Any, call_timeout: float) -> VerifyCall:
    import httpx

    started = time.monotonic()
    try:
        answer = await client.post(VERIFY_PATH, json={"customer_id": HOT}, timeout=call_timeout)
    except httpx.HTTPError:
        return VerifyCall(started, time.monotonic(), 0)
    ended = time.monotonic()
    if answer.status_code != 200:
        return VerifyCall(started, ended, answer.status_code)
    body = answer.json()
    customer = next(iter(body.get("customers") or []), {})
    total = customer.get("open_holds_sum", customer.get("openHoldsSum"))
    return VerifyCall(
        started,
        ended,
        200,
        ok=bool(body.get("ok")),
        open_holds_sum=None if total is None else int(total),
        held_unverified=bool(customer.get("held_unverified", customer.get("heldUnverified"))),
    )


def lone_verifies(url: str, key: str, count: int, call_timeout: float) -> list[VerifyCall]:
    async def run() -> list[VerifyCall]:
        import httpx

        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=url, headers=headers) as client:
            return [await verify_once(client, call_timeout) for _ in range(count)]

    return asyncio.run(run())


def seed_text(rb: Any) -> str:
    """run.py's price list and enforcer key with only ``c1``, plus a reader key and ``hot``
    (whose holds live a day, not the 15-minute default: they must outlast the run)."""
    extra = [
        {
            "apiVersion": "beam.dev/v1alpha1",
            "kind": "BeamApiKey",
            "metadata": {"name": READER_KEY, "namespace": rb.TENANT},
            "spec": {"role": "reader"},
        },
        {
            "apiVersion": "beam.dev/v1alpha1",
            "kind": "BeamCustomer",
            "metadata": {"name": HOT, "namespace": rb.TENANT},
            "spec": {
                "customerId": HOT,
                "holdTtlSeconds": 86_400,
                "credits": [
                    {"id": "bench-seed", "amountGrains": rb.BALANCE, "description": "bench"}
                ],
            },
        },
    ]
    return rb.manifests([READER]) + "".join(f"---\n{json.dumps(d)}\n" for d in extra)


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[PhaseResult]]:
    import redis as redis_client
    import run as rb

    started, load_start = time.monotonic(), rb.loadavg()
    bin_dir = rb.build_tools()
    pinning = rb.Pinning.plan(args.server_cpus, args.load_cpus)
    pinning.apply_to_self()
    rb.log(f"load average {load_start}; pinning: servers {pinning.server}, load {pinning.load}")
    results: list[PhaseResult] = []
    settings: dict[str, Any] = {}
    checked: list[str] = []
    with tempfile.TemporaryDirectory(prefix="beam-bench-bounded-") as tmp:
        workdir = Path(tmp)
        postgres = rb.devservers.PostgresServer(workdir / "postgres")
        redis = rb.devservers.RedisServer(workdir / "redis")
        beam = None
        try:
            postgres.start()
            redis.start()
            env = dict(os.environ) | {
                "BEAM_ENVIRONMENT": "production",
                "BEAM_DATABASE_URL": postgres.dsn,
                "BEAM_REDIS_URL": redis.url,
                "BEAM_REQUEST_TOKEN_SECRET": rb.TOKEN_SECRET,
            }
            applied = rb.apply_manifests(env, workdir, seed_text(rb))
            key, reader_key = (rb.applied_key(applied, n) for n in ("bench-enforcer", READER_KEY))
            rb.log(f"seeded tenant {rb.TENANT}: customers {READER} and {HOT}, two keys")
            assert redis.pid
            assert postgres.pid
            bench = rb.Bench(
                args, bin_dir, workdir, key, {"redis": redis.pid, "postgres": postgres.pid}
            )
            store = redis_client.Redis.from_url(redis.url)
            store.config_set("slowlog-log-slower-than", args.slowlog_us)
            store.config_set("slowlog-max-len", 100_000)
            for round_index in range(args.rounds):
                for spec in PHASES:
                    phase_env = env | {"BEAM_REDIS_HOLDS_PER_SCRIPT": str(spec.holds_per_script)}
                    beam = rb.start_beam(phase_env, pinning, workdir, 1)
                    if not results:
                        t0 = time.monotonic()
                        rb.open_holds(beam.grpc_target, key, [HOT], HOT_HOLDS, "hot",
                                      estimated_grains=1, buffer_multiplier=1.0)  # fmt: skip
                        settings["hold_open_seconds"] = round(time.monotonic() - t0, 1)
                        checked = [
                            f"beam {rb.allowed_cpus(beam.pid)}",
                            f"redis {rb.allowed_cpus(redis.pid)}",
                            f"this script {rb.allowed_cpus(os.getpid())}",
                        ]
                    results.append(phase(bench, beam, spec, round_index, args, reader_key, store))
                    if beam.process.poll() is not None:
                        raise RuntimeError(f"beam serve died in phase ({spec.key})")
                    beam.stop()
                    beam = None
        finally:
            if beam is not None:
                beam.stop()
            redis.stop()
            postgres.stop()
    settings |= {
        "rate": args.rate,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "calls": rb.open_calls(args, args.rate),
        "verify_loops": max(s.verify_loops for s in PHASES),
        "ramp_seconds": args.ramp,
        "lone_verifies": args.lone,
        "hot_holds": HOT_HOLDS,
        "slowlog_threshold_us": args.slowlog_us,
        "call_timeout_seconds": args.call_timeout,
        "phases": [s.__dict__ for s in PHASES],
    }
    notes = [
        "Each phase: a new `beam serve` with its `BEAM_REDIS_HOLDS_PER_SCRIPT`, 300 GetBalance "
        "calls of warm-up, then (once `beam serve` and PostgreSQL were idle: run.py's settle) "
        "the lone VerifyIntegrity calls, the loops, and the measured open loop. The stores "
        f"and `{HOT}`'s holds stayed from the first phase to the last.",
    ]
    context = {
        "date": dt.date.today().isoformat(),
        "code": rb.code_version(),
        "machine": rb.machine(load_start, rb.loadavg(), pinning, {"checked": ", ".join(checked)}),
        "settings": settings,
        "run_seconds": round(time.monotonic() - started, 1),
        "notes": notes,
    }
    return context, results


def phase(
    bench: Any,
    beam: Any,
    spec: PhaseSpec,
    round_index: int,
    args: argparse.Namespace,
    reader_key: str,
    store: Any,
) -> PhaseResult:
    import run as rb

    from beam.adapters.redis_store import load_scripts

    name = f"({spec.key}) round {round_index + 1}"
    rb.log(f"--- {name}: {spec.title}, {spec.verify_loops} verify loops")
    data = [{"customer_id": READER}]
    bench.ghz("get_balance", beam, "GetBalance", data, concurrency=32, total=300,
              record=False, note=f"{name} warm-up")  # fmt: skip
    bench.settle(beam)
    lone = lone_verifies(beam.http_url, reader_key, args.lone, args.call_timeout)
    rb.log(
        f"{name} lone VerifyIntegrity {HOT}: "
        + ", ".join(f"{c.ms:.0f} ms (HTTP {c.status}, sum {c.open_holds_sum})" for c in lone)
    )
    bench.settle(beam)
    store.slowlog_reset()
    with VerifyLoops(beam.http_url, reader_key, spec.verify_loops, args.call_timeout) as loops:
        time.sleep(args.ramp if spec.verify_loops else 0)
        start = time.monotonic()
        measured = bench.ghz(
            "get_balance", beam, "GetBalance", data, rps=args.rate,
            total=rb.open_calls(args, args.rate), record=False, note=name,
        )  # fmt: skip
        end = time.monotonic()
    scripts = {script.sha: script.name for script in load_scripts().values()}
    slowlog = store.slowlog_get(100_000)
    result = PhaseResult(
        spec=spec,
        get_balance=measured,
        windows=[(start, end)],
        verify_calls=list(loops.calls),
        lone_verify=lone,
        slowlog=[(_command(e["command"], scripts), e["duration"] / 1000) for e in slowlog],
        load_averages=[measured.load_average],
        round=round_index,
    )
    rb.log(
        f"{name}: GetBalance p95 {measured.p(95):.1f} ms; VerifyIntegrity "
        f"{len(result.verify_answered)} in {result.window_seconds:.1f} s, p50 "
        f"{result.verify_p(50):.0f} ms; Redis busy {result.redis_busy:.0%}, beam serve busy "
        f"{result.beam_busy:.0%}; SLOWLOG {result.long_commands()}"
    )
    return result


def _command(command: Any, scripts: dict[str, str]) -> str:
    """A SLOWLOG entry's script name (``EVALSHA <sha> ...``), else its command's name."""
    text = command.decode(errors="replace") if isinstance(command, bytes) else str(command)
    name, *rest = text.split() or ["?"]
    if name.upper() in ("EVALSHA", "EVALSHA_RO") and rest:
        return scripts.get(rest[0], f"script {rest[0][:8]}")
    return name.upper()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100.0, help="GetBalance calls/s")
    parser.add_argument("--seconds", type=float, default=20.0, help="ghz run per phase")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of phases a, b, c")
    parser.add_argument("--ramp", type=float, default=3.0, help="verify loops before ghz, s")
    parser.add_argument("--lone", type=int, default=5, help="lone VerifyIntegrity per phase")
    parser.add_argument("--call-timeout", type=float, default=10.0, help="seconds per call")
    parser.add_argument("--slowlog-us", type=int, default=1000, help="Redis SLOWLOG threshold")
    parser.add_argument("--server-cpus", default="0", help="taskset CPU list for beam serve")
    parser.add_argument("--load-cpus", default="1", help="CPU list for load and stores")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    # What bench/run.py's Bench reads from its arguments.
    args.connections, args.profile, args.native, args.py_spy = 1, None, False, []
    args.settle = False  # each phase settles before its loops start, never under them

    context, results = run(args)
    host = re.sub(r"[^A-Za-z0-9-]+", "-", context["machine"]["host"]).strip("-") or "host"
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{context['date']}-{host}-bounded-scripts"
    stem.with_suffix(".md").write_text(render(context, results))
    stem.with_suffix(".json").write_text(
        json.dumps(to_json(results, **context), indent=2, default=str) + "\n"
    )
    print("\n".join(get_balance_table(results)))
    print("\n".join(verify_table(results)))
    m = context["machine"]
    print(
        f"\n{m['nproc']} CPUs, {m['model_name']}; load average {m['load_average_start']} "
        f"-> {m['load_average_end']}; wrote {stem}.md and .json"
    )


if __name__ == "__main__":
    main()
