"""bench/report.py on fixed inputs: ratios, percentiles, targets and the table. No timing.

``make test`` collects it (pytest's testpaths are tests/ and bench/).
"""

from __future__ import annotations

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
