"""bench/bounded_scripts.py's report on fixed inputs: windows, pooling, ratios, the tables and
the JSON. No timing, no servers.
"""

from __future__ import annotations

import json
import math
import types

import bounded_scripts as bs
import pytest
import report as rp

A, B, C = bs.PHASES
X = rp.TIMES


def get_balance(latencies: list[float], **kw: object) -> rp.Measurement:
    values: dict[str, object] = {
        "call": "get_balance", "server": rp.BEAM, "mode": rp.OPEN, "tool": "ghz",
        "seconds": len(latencies) / 100, "sent": len(latencies), "ok": len(latencies),
        "errors": 0, "latencies_ms": latencies, "offered_rps": 100.0,
    }  # fmt: skip
    values.update(kw)
    return rp.Measurement(**values)  # type: ignore[arg-type]


def spread(p50: float, tail: float) -> list[float]:
    """100 calls: 90 at ``p50``, 10 at ``tail`` (p95 = p99 = ``tail``)."""
    return [p50] * 90 + [tail] * 10


def result(spec: bs.PhaseSpec, latencies: list[float], round_index: int = 0, **kw: object
           ) -> bs.PhaseResult:  # fmt: skip
    values: dict[str, object] = {"windows": [(100.0, 101.0)], "load_averages": ["1.50 1.0 0.5"]}
    values.update(kw)
    return bs.PhaseResult(spec, get_balance(latencies), round=round_index, **values)  # type: ignore[arg-type]


def call(start: float, ms: float, status: int = 200, ok: bool = True) -> bs.VerifyCall:
    return bs.VerifyCall(start, start + ms / 1000, status, ok=ok, open_holds_sum=10_000)


def test_verify_calls_counted_in_the_ghz_window_only() -> None:
    r = result(
        C,
        spread(2, 10),
        windows=[(100.0, 102.0)],
        verify_calls=[
            call(99.0, 500),  # ended before ghz started
            call(99.9, 200),  # started before, ended inside: counted
            call(100.5, 400),
            call(101.0, 300, status=503),  # ended inside without an answer: failed
            call(101.2, 100, ok=False),  # answered, books not ok: failed
            call(101.9, 500),  # ended after ghz: not counted
        ],
    )
    assert [c.started for c in r.verify_answered] == [99.9, 100.5, 101.2]
    assert r.verify_failed == 2
    assert r.verify_rate == pytest.approx(1.5)  # 3 answered over 2 s
    assert r.verify_p(50) == pytest.approx(200)
    assert r.holds_seen == [10_000]


def test_long_commands_grouped_longest_first() -> None:
    r = result(
        B,
        spread(2, 10),
        slowlog=[("audit_account", 80.0), ("HGET", 12.0), ("audit_account", 5.0), ("GET", 1.0)],
    )
    assert r.long_commands() == {
        "audit_account": (2, 1, 80.0),
        "HGET": (1, 1, 12.0),
        "GET": (1, 0, 1.0),
    }
    assert r.slowlog_ms == [80.0, 12.0, 5.0, 1.0]


def test_busy_from_cpu_over_wall_time() -> None:
    m = get_balance(spread(2, 10), server_cpu_seconds=0.25,
                    store_cpu_seconds={"redis": 0.5, "postgres": 0.0})  # fmt: skip
    r = bs.PhaseResult(B, m, windows=[(0.0, 1.0)])
    assert r.beam_busy == pytest.approx(0.25)  # 100 calls at 100/s: 1 s
    assert r.redis_busy == pytest.approx(0.5)
    r.verify_calls = [call(0.1, 100), call(0.3, 100)]
    assert r.redis_ms_per_verify == pytest.approx(250)  # 0.5 s over 2 calls
    assert math.isnan(result(A, spread(2, 10)).redis_busy)  # no Redis reading


def rounds() -> list[bs.PhaseResult]:
    # Round 1: b/a = 100/10 = 10, c/a = 20/10 = 2. Round 2: b/a = 300/10 = 30, c/a = 4.
    return [
        result(A, spread(2, 10), 0),
        result(B, spread(50, 100), 0, verify_calls=[call(100.1, 80)]),
        result(C, spread(3, 20), 0, verify_calls=[call(100.1, 300)]),
        result(A, spread(2, 10), 1, windows=[(200.0, 201.0)]),
        result(
            B,
            spread(60, 300),
            1,
            windows=[(200.0, 201.0)],
            verify_calls=[call(200.1, 90), call(200.2, 95)],
        ),
        result(C, spread(3, 40), 1, windows=[(200.0, 201.0)]),
    ]


def test_pooled_phases_merge_every_round() -> None:
    pooled = bs.pooled(rounds())
    assert [r.spec.key for r in pooled] == ["a", "b", "c"]
    b = pooled[1]
    assert b.round == -1
    assert b.get_balance.ok == 200
    assert b.windows == [(100.0, 101.0), (200.0, 201.0)]
    assert len(b.verify_answered) == 3
    assert b.verify_rate == pytest.approx(1.5)  # 3 answered over 2 s of ghz
    assert b.load_averages == ["1.50 1.0 0.5"] * 2


def test_ratios_pooled_and_per_round() -> None:
    results = rounds()
    # Pooled: a 180 x 2, 20 x 10 ms (p95 = p99 = 10); b 90 x 50, 90 x 60, 10 x 100, 10 x 300
    # (p95 = 100, p99 = 300); c 180 x 3, 10 x 20, 10 x 40 (p95 = 20, p99 = 40).
    assert bs.ratio(results, "b", 95) == pytest.approx(10)
    assert bs.ratio(results, "b", 99) == pytest.approx(30)
    assert bs.ratio(results, "c", 99) == pytest.approx(4)
    assert bs.round_ratios(results, "b", 95) == pytest.approx([10, 30])
    assert bs.round_ratios(results, "c", 95) == pytest.approx([2, 4])
    assert bs.ratios(results) == {
        "b/a": {
            "p50": 30.0, "p50_rounds": [25.0, 30.0],
            "p95": 10.0, "p95_rounds": [10.0, 30.0],
            "p99": 30.0, "p99_rounds": [10.0, 30.0],
        },
        "c/a": {
            "p50": 1.5, "p50_rounds": [1.5, 1.5],
            "p95": 2.0, "p95_rounds": [2.0, 4.0],
            "p99": 4.0, "p99_rounds": [2.0, 4.0],
        },
    }  # fmt: skip
    assert bs.ratio(results[1:3], "b", 95) is None  # no baseline
    assert bs.ratio([result(A, []), result(B, spread(1, 2))], "b", 95) is None  # no calls


def test_get_balance_table() -> None:
    lines = bs.get_balance_table(rounds())
    assert len(lines) == 2 + 3
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    a, b, c = lines[2:]
    assert a.startswith("| (a) 256 holds per script, no verify load | 256 | 0 | 200 of 200 |")
    assert "| — | — |" in a  # no ratio against itself
    assert f"| **10.00{X}** (10.00 to 30.00) | **30.00{X}** (10.00 to 30.00) |" in b
    assert "| 10,000 | 4 |" in b
    assert "| 60 / 100 / 300 / 300 |" in b  # p50 / p95 / p99 / p99.9
    assert f"| **2.00{X}** (2.00 to 4.00) | **4.00{X}** (2.00 to 4.00) |" in c
    assert "| 1.5 |" in a  # load average range, one value


def test_overloaded_open_loop_is_said() -> None:
    m = get_balance(spread(1, 2), ok=50, errors=50, seconds=1.0)
    assert "overloaded: 50/s answered, 50 errors" in bs._latencies(m)


def test_verify_table() -> None:
    results = rounds()
    results[1].slowlog = [("audit_account", 80.0), ("HGET", 12.0)]
    results[2].lone_verify = [call(50.0, 150), call(51.0, 250), call(52.0, 10, status=500)]
    lines = bs.verify_table(results)
    assert len(lines) == 5
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    a, b, c = lines[2:]
    assert a.startswith("| (a) | 0 | — | — | 0 |")  # no loops in (a)
    assert b.startswith("| (b) | 3 | 1.5 | 90 / 95 / 95 | 0 |")
    assert "`audit_account` 80 (1, 1), `HGET` 12 (1, 1)" in b
    assert "| 2 |" in b  # two commands of 10 ms or more
    assert "| 10,000 | — | 2 |" in b  # no Redis CPU reading: no CPU per call
    assert "| 150 | 10,000 |" in c  # lone p50 of the answered ones, holds seen


def test_json_round_trips_and_keeps_rounds() -> None:
    results = rounds()
    data = json.loads(json.dumps(bs.to_json(results, date="2026-12-06"), default=str))
    assert data["date"] == "2026-12-06"
    assert [p["phase"] for p in data["phases"]] == ["a", "b", "c"]
    assert [p["round"] for p in data["rounds"]] == [0, 0, 0, 1, 1, 1]
    assert data["ratios_to_a"]["b/a"]["p95"] == 10.0
    b = data["phases"][1]
    assert b["holds_per_script"] == 10_000
    assert b["verify"]["answered_in_window"] == 3
    assert b["get_balance"]["p95_ms"] == 100
    assert "latencies_ms" not in b["get_balance"]


def test_render_has_machine_tables_and_ratios() -> None:
    context = {
        "date": "2026-12-06",
        "code": "abc1234",
        "machine": {
            "host": "vm", "nproc": 2, "model_name": "cpu", "memory_gib": 23.5,
            "kernel": "Linux", "python": "3.11", "grpcio": "1", "redis": "Redis 7",
            "postgres": "PostgreSQL 15", "ghz": "v0.120.0", "load_average_start": "1.0 1.0 1.0",
            "load_average_end": "2.0 1.5 1.0",
            "pinning": {"servers": "0", "load_and_stores": "1", "checked": "beam 0"},
        },
        "settings": {
            "hot_holds": 10_000, "hold_open_seconds": 20.0, "rate": 100.0, "calls": 2000,
            "seconds": 20.0, "verify_loops": 4, "ramp_seconds": 3.0, "lone_verifies": 5,
            "rounds": 2, "slowlog_threshold_us": 1000,
        },
        "run_seconds": 300.0,
        "notes": ["a note"],
    }  # fmt: skip
    text = bs.render(context, rounds())
    assert "load average (1/5/15 min) at the start: **1.0 1.0 1.0**" in text
    assert (
        f"- (b) over (a): p50 **30.00{X}** (25.00 to 30.00), p95 **10.00{X}** (10.00 to "
        f"30.00), p99 **30.00{X}** (10.00 to 30.00)\n" in text
    )
    assert f"- (c) over (a): p50 **1.50{X}** (1.50 to 1.50), p95 **2.00{X}**" in text
    assert "- a note" in text


def test_slowlog_commands_named_by_script() -> None:
    scripts = {"f" * 40: "audit_account"}
    assert bs._command(b"EVALSHA " + b"f" * 40 + b" 9 k", scripts) == "audit_account"
    assert bs._command(f"EVALSHA {'f' * 40} 9 k", scripts) == "audit_account"
    assert bs._command("evalsha 0123456789abcdef 1", scripts) == "script 01234567"
    assert bs._command(b"hget k f", scripts) == "HGET"
    assert bs._command("", scripts) == "?"


def test_seed_text_adds_a_reader_key_and_the_hot_customer() -> None:
    fake_run = types.SimpleNamespace(
        TENANT="bench",
        BALANCE=10**12,
        manifests=lambda customers: "\n---\n".join(json.dumps({"c": c}) for c in customers) + "\n",
    )
    documents = [json.loads(d) for d in bs.seed_text(fake_run).split("---\n")]
    assert documents[0] == {"c": "c1"}
    key, hot = documents[1:]
    assert key["kind"] == "BeamApiKey"
    assert key["spec"] == {"role": "reader"}
    assert hot["spec"]["customerId"] == "hot"
    assert hot["spec"]["holdTtlSeconds"] == 86_400
