"""bench/report.py on fixed inputs: ratios, percentiles, targets and the table. No timing.

``make test`` collects it (pytest's testpaths are tests/ and bench/).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import report as rp

X = rp.TIMES  # the multiplication sign


def m(call: str, server: str, mode: str, ok: int, seconds: float = 10.0, **kw: object
      ) -> rp.Measurement:  # fmt: skip
    values: dict[str, object] = {
        "tool": "ghz", "sent": ok, "errors": 0, "latencies_ms": [1.0] * ok,
        "concurrency": 32 if mode == rp.CLOSED else None,
    }  # fmt: skip
    values.update(kw)
    return rp.Measurement(call=call, server=server, mode=mode, seconds=seconds, ok=ok, **values)  # type: ignore[arg-type]


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 1001)]  # 1..1000
    assert rp.percentile(values, 50) == 500
    assert rp.percentile(values, 99) == 990
    assert rp.percentile(values, 99.9) == 999
    assert rp.percentile(values, 100) == 1000
    assert rp.percentile([7.0], 99.9) == 7.0
    assert math.isnan(rp.percentile([], 50))
    assert rp.percentile([3.0, 1.0, 2.0], 50) == 2.0  # unsorted input


def test_throughput_cpu_and_kept_up() -> None:
    closed = m("check", rp.BEAM, rp.CLOSED, ok=5_000, seconds=10, server_cpu_seconds=2.5)
    assert closed.throughput == 500
    assert closed.cpu_us_per_call == 500
    assert closed.kept_up
    slow = m("check", rp.BEAM, rp.OPEN, ok=900, seconds=10, offered_rps=100.0)
    assert slow.throughput == 90
    assert not slow.kept_up  # under 95% of the offered rate
    failing = m("check", rp.BEAM, rp.OPEN, ok=1000, seconds=10, offered_rps=100.0, errors=1)
    assert not failing.kept_up
    assert math.isnan(m("check", rp.BEAM, rp.CLOSED, ok=0).cpu_us_per_call)


def fixed_measurements() -> list[rp.Measurement]:
    fast = [1.0] * 985 + [1.5] * 13 + [3.0] * 2
    return [
        m("check", rp.EMPTY, rp.CLOSED, ok=40_000, server_cpu_seconds=10.0),
        m("check", rp.BEAM, rp.CLOSED, ok=34_000, server_cpu_seconds=17.0),
        m("check", rp.BEAM, rp.OPEN, ok=1000, seconds=1.0, offered_rps=1000.0,
          latencies_ms=fast),
        m("finalize_spread", rp.EMPTY, rp.CLOSED, ok=40_000),
        m("finalize_spread", rp.BEAM, rp.CLOSED, ok=10_000),
        m("finalize_spread", rp.BEAM, rp.OPEN, ok=1000, seconds=1.0, offered_rps=2000.0),
        m("finalize_hot", rp.BEAM, rp.CLOSED, ok=12_000),
        m("get_balance", rp.EMPTY, rp.CLOSED, ok=40_000),
        m("get_balance", rp.BEAM, rp.CLOSED, ok=20_000),
        m("rest_get_balance", rp.EMPTY, rp.CLOSED, ok=30_000, tool="hey"),
        m("rest_get_balance", rp.BEAM, rp.CLOSED, ok=19_000, tool="hey"),
    ]  # fmt: skip


def test_rows_ratios_and_targets() -> None:
    rows = {row.call.key: row for row in rp.build_rows(fixed_measurements())}
    assert list(rows) == ["check", "finalize_spread", "finalize_hot", "get_balance",
                          "rest_get_balance"]  # fmt: skip

    check = rows["check"]
    assert check.empty_rps == 4000
    assert check.beam_rps == 3400
    assert check.ratio == pytest.approx(0.85)
    assert check.ratio_met is True
    assert check.beam_cpu_us == 500
    assert check.empty_cpu_us == 250
    assert check.open_rps == 1000
    assert check.p99_met is True  # p99 1.5 ms <= 2 ms, and it kept up

    spread = rows["finalize_spread"]
    assert spread.ratio == pytest.approx(0.25)
    assert spread.ratio_met is False
    assert spread.p99_met is False  # answered 1000/s of 2000/s offered: overloaded

    hot = rows["finalize_hot"]  # shares the empty Finalize runs of the spread row
    assert hot.empty_rps == 4000
    assert hot.ratio == pytest.approx(0.3)
    assert hot.ratio_met is True  # >= 0.3 exactly
    assert hot.p99_met is None  # no open-loop run

    assert rows["get_balance"].ratio == pytest.approx(0.5)
    assert rows["get_balance"].p99_met is None  # no p99 goal for GetBalance
    assert rows["rest_get_balance"].ratio_met is None  # its goal is against gRPC
    assert rp.rest_vs_grpc(rows.values()) == pytest.approx(0.95)


def test_markdown_table() -> None:
    lines = rp.markdown_table(rp.build_rows(fixed_measurements()))
    assert lines[0].startswith(
        "| call | empty handler calls/s | Beam calls/s | ratio (rounds) "
        "| CPU µs/call Beam (empty) | CPU ratio |"
    )
    check = next(line for line in lines if line.startswith("| CheckBalance |"))
    assert (
        f"| 4,000 | 3,400 | **0.85{X}** | 500 (250) | **0.50{X}** | 1,000 | 1.00 / 1.50 / 3.00 |"
        in check
    )
    assert f"≥ 0.8{X} ✅; p99 ≤ 2 ms ✅" in check
    spread = next(line for line in lines if line.startswith("| FinalizeRequest, 64"))
    assert "overloaded: 1,000/s answered, 0 errors" in spread
    assert f"≥ 0.5{X} ❌; p99 ≤ 5 ms ❌" in spread
    assert lines[-1].startswith("| REST ÷ gRPC GetBalance (Beam) |")
    assert f"**0.95{X}**" in lines[-1]
    assert f"≥ 0.9{X} ✅" in lines[-1]
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_json() -> None:
    data = rp.to_json(rp.build_rows(fixed_measurements()), fixed_measurements(), date="d")
    assert data["date"] == "d"
    check = data["rows"][0]
    assert check["call"] == "check"
    assert check["ratio"] == 0.85
    assert check["cpu_ratio"] == 0.5
    assert check["target"] == {"min_ratio": 0.8, "max_p99_ms": 2.0}
    assert check["beam_open_loop"]["p99_ms"] == 1.5
    assert data["rest_vs_grpc_get_balance"] == 0.95
    assert "latencies_ms" not in data["measurements"][0]


def test_merge_rounds_and_round_ratios() -> None:
    empty = [
        m("check", rp.EMPTY, rp.CLOSED, ok=1000, seconds=1.0, server_cpu_seconds=0.25,
          store_cpu_seconds={"redis": 0.01}, error_kinds={"x": 1}, errors=1, sent=1001),
        m("check", rp.EMPTY, rp.CLOSED, ok=2000, seconds=1.0, server_cpu_seconds=0.5,
          store_cpu_seconds={"redis": 0.02, "postgres": 0.1}, error_kinds={"x": 2}),
    ]  # fmt: skip
    beam = [
        m("check", rp.BEAM, rp.CLOSED, ok=500, seconds=1.0),
        m("check", rp.BEAM, rp.CLOSED, ok=500, seconds=1.0),
    ]
    merged = rp.merge(empty)
    assert merged.ok == 3000
    assert merged.sent == 3001
    assert merged.errors == 1
    assert merged.seconds == 2.0
    assert merged.throughput == 1500
    assert merged.server_cpu_seconds == 0.75
    assert merged.store_cpu_seconds == {"postgres": 0.1, "redis": pytest.approx(0.03)}
    assert merged.error_kinds == {"x": 3}
    assert merged.round_rps == [1000, 2000]
    assert len(merged.latencies_ms) == 3000
    row = rp.build_rows([merged, rp.merge(beam)])[0]
    assert row.ratio == pytest.approx(500 / 1500)
    assert row.round_ratios == [0.5, 0.25]  # 500/1000, then 500/2000
    line = rp.markdown_table([row])[2]
    assert f"**0.33{X}** (0.25 to 0.50)" in line


def stream(kind: str, round_index: int, first: float, stream_ms: float, **kw: object
           ) -> rp.StreamRun:  # fmt: skip
    values: dict[str, object] = {"tokens": 1000, "client_cpu_ms": 100.0}
    if kind != rp.DIRECT:
        values |= {
            "rpcs": 4,
            "status": "COMPLETED_SUCCESS",
            "client_cpu_ms": 110.0,
            "open_ms": first - 1.0,
        }
    values.update(kw)
    return rp.StreamRun(kind=kind, round=round_index, first_token_ms=first,  # type: ignore[arg-type]
                        last_chunk_ms=first + stream_ms, **values)  # fmt: skip


def fixed_guard_bench() -> rp.GuardBench:
    runs = []
    for i, direct_ms in enumerate([330.0, 340.0, 350.0]):  # median 340
        runs += [
            stream(rp.DIRECT, i, 2.0, direct_ms),
            stream(rp.GUARD, i, 4.6, direct_ms * 1.005),  # +0.5 %
            # +20 ms Beam: the stream 2 % longer, 3 RPCs in one round, one stream cut short.
            stream(rp.GUARD_SLOW, i, 24.0 + i, direct_ms * 1.02, rpcs=3 + (i == 1),
                   rpcs_at_proxy=3 + (i == 1), tokens=1000 - (i == 2), open_ms=20.0),
        ]  # fmt: skip
    return rp.GuardBench(
        tokens=1000, rate=3000.0, delay_ms=20.0, runs=runs,
        check_ms={rp.GUARD: [1.0, 1.5, 2.0, 9.0], rp.GUARD_SLOW: [21.0, 21.5, 22.0]},
        check_in_place_ms={rp.GUARD: [1.2, 1.9, 3.0], rp.GUARD_SLOW: [21.0, 21.5, 22.0]},
        wakeup_ms={"Redis PING": {"0": [0.2, 0.1, 0.3], "50": [0.9, 1.0, 1.1]}},
        load_averages=["1.0 1.0 1.0"] * 3,
    )  # fmt: skip


def test_guard_rows() -> None:
    fast, slow = rp.build_guard_rows(fixed_guard_bench())
    assert fast.title == "guard, Beam as is"
    assert fast.direct_stream_ms == 340
    assert fast.stream_ms == pytest.approx(341.7)
    assert fast.stream_ratio == pytest.approx(1.005)
    assert fast.round_ratios == pytest.approx([1.005] * 3)
    assert fast.stream_met is True
    assert fast.first_token_overhead_ms == pytest.approx(2.6)
    assert fast.check_hot_p50_ms == 1.5  # back to back; nearest rank: the 2nd of 4
    assert fast.check_p50_ms == 1.9  # in place: the target's reference
    assert fast.open_ms == pytest.approx(3.6)
    assert fast.after_check_ms == pytest.approx(1.0)  # 4.6 - 3.6, run by run
    assert fast.beyond_check_ms == pytest.approx(-1.0)  # 1.0 after the Check against 2.0
    assert fast.first_token_met is True
    assert fast.medians_met is True  # 2.6 ms <= 1.9 + 1
    hot_only = dataclasses.replace(fast, check_in_place_ms=[])
    assert hot_only.medians_met is False  # 2.6 > 1.5 + 1
    assert fast.total_ratio == pytest.approx((4.6 + 341.7) / 342)
    assert (fast.direct_cpu_ms, fast.cpu_ms) == (100, 110)
    assert fast.rpcs_max == 4
    assert fast.rpcs_at_proxy_max is None
    assert fast.complete == 3
    assert fast.rpcs_met is True

    assert slow.title == "guard, every Beam response +20 ms"
    assert slow.stream_ratio == pytest.approx(1.02)
    assert slow.stream_met is False
    assert slow.first_token_ms == 25  # 24, 25, 26
    assert slow.first_token_overhead_ms == 23
    assert slow.check_p50_ms == 21.5
    assert slow.after_check_ms == 5  # 4, 5, 6 after a 20 ms Check
    assert slow.beyond_check_ms == 3
    assert slow.first_token_met is False  # 3 ms beyond the Check > 1
    assert slow.medians_met is False  # 23 > 21.5 + 1
    assert slow.rpcs_max == 4
    assert slow.rpcs_at_proxy_max == 4
    assert slow.complete == 2
    assert slow.rpcs_met is False  # a stream was cut: not one its hold covered to the end


def test_guard_table_and_json() -> None:
    bench = fixed_guard_bench()
    rows = rp.build_guard_rows(bench)
    lines = rp.guard_table(rows)
    assert lines[0].startswith("| stream | runs | stream ms, unguarded → guarded |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert lines[2] == (
        "| guard, Beam as is | 3 | 340 → 342 | **+0.5 %** (+0.5 to +0.5) | 2.00 → 4.60 | +2.6 "
        f"| 1.90, 1.50 (3.60) | 1.00 (-1.0) | **1.01{X}** | 100 → 110 | 4 | 3/3 "
        "| ≤ +1 % ✅; first token ≤ its Check + 1 ms ✅ (medians: ✅); ≤ 4 RPCs ✅ |"
    )
    assert (
        "| 4; 4 at the proxy | 2/3 "
        "| ≤ +1 % ❌; first token ≤ its Check + 1 ms ❌ (medians: ❌); ≤ 4 RPCs ❌ |"
    ) in lines[3]
    runs = rp.stream_run_table(bench.runs)
    assert len(runs) == 2 + 9
    assert "| 1 | guard_slow | 25 | 347 | 372 | — | 20 | 1,000 | 4 (0/0/0) | 4 |" in runs[7]
    data = rp.guard_json(bench, rows)
    assert data["rows"][0]["stream_overhead"] == 0.005
    assert data["rows"][1]["first_token_overhead_ms"] == 23
    assert data["rows"][1]["guard_check_ms_p50"] == 20
    assert data["rows"][1]["beyond_check_ms"] == 3
    assert data["rows"][1]["rpcs_met"] is False
    assert data["runs"][0]["stream_ms"] == 330
    assert data["check_ms"][rp.GUARD_SLOW] == [21.0, 21.5, 22.0]
    assert data["rows"][0]["check_ms_p50"] == 1.9
    assert data["rows"][0]["check_back_to_back_ms_p50"] == 1.5
    assert data["check_in_place_ms"][rp.GUARD] == [1.2, 1.9, 3.0]
    assert data["wakeup_ms"]["Redis PING"]["50"] == [0.9, 1.0, 1.1]
    assert rp.wakeup_table(bench.wakeup_ms) == [
        "| call (p50 ms) | back to back | after 50 ms idle |",
        "|---|---:|---:|",
        "| Redis PING | 0.20 | 1.00 |",
    ]
