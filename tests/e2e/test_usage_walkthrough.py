"""README's walkthrough against `beam dev`, then `beam usage` shows what it charged.

The user follows the "Try it" block (check, deduct, finalize with the provider's cost of
48 700 grains), then asks `beam usage --customer-id test_customer_1 --since 1h --bucket
minute`, exactly as documented, pointed at this `beam dev` (free ports; the dev key is the
default against localhost): one minute bucket, one request, 48 700 grains, in the table,
the bar chart and the JSON.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_cli import parse_table
from tests.e2e.test_walkthrough import BeamDev, assert_all_stopped, readme_walkthrough, shell


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[BeamDev]:
    started = BeamDev(tmp_path / "state", tmp_path / "beam-dev.log").start()
    try:
        yield started
    finally:
        started.kill()


def beam_usage(dev: BeamDev, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "beam.cli.main", "usage", "--customer-id", "test_customer_1",
            "--since", "1h", "--bucket", "minute", "--server",
            f"http://localhost:{dev.http_port}", *args]  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env=env)


def test_readme_walkthrough_then_beam_usage_shows_the_48700_grains(dev: BeamDev) -> None:
    token = ""
    for step in readme_walkthrough():
        output = shell(step.command, dev, int(time.time()), token)
        rendered = json.dumps(output, separators=(",", ":"), ensure_ascii=False)
        pattern = ".*".join(re.escape(piece) for piece in step.expected.split("…"))
        assert re.fullmatch(pattern, rendered), (step.command, rendered, step.expected)
        token = output.get("request_token", token)
    assert token

    shown = beam_usage(dev)
    assert (shown.returncode, shown.stderr) == (0, ""), shown
    head, rest = shown.stdout.split("\n", 1)
    table_text, chart = rest.split("\n\n", 1)
    assert head.endswith(" by minute (UTC)")
    rows = parse_table(table_text)
    assert [(r["requests"], r["charged_grains"], r["prompt_tokens"], r["completion_tokens"])
            for r in rows] == [("1", "48700", "234", "487")]  # fmt: skip
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:00Z", rows[0]["start"])
    (bar,) = [line for line in chart.splitlines() if "│" in line]
    assert bar.endswith(" 48,700")
    assert "█" * 40 in bar
    assert chart.rstrip().endswith("total: 48,700 grains, 1 request")

    data = json.loads(beam_usage(dev, "--json").stdout)
    assert [(b["requests"], b["charged_grains"]) for b in data["buckets"]] == [("1", "48700")]

    pids = dev.process_tree()
    assert dev.interrupt() == 0
    assert_all_stopped(pids)
