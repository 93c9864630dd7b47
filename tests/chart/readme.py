"""Regenerates the Parameters section of charts/beam/README.md from values.yaml.

The section is the `## @section` and `## @param` lines of values.yaml, in order, with each
key's default (Bitnami readme-generator style). tests/unit/test_chart_values.py fails when the
README and values.yaml disagree; run `python -m tests.chart.readme` to bring them in step.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART_DIR = Path(__file__).resolve().parents[2] / "charts" / "beam"
VALUES_FILE = CHART_DIR / "values.yaml"
README_FILE = CHART_DIR / "README.md"
MARKER = "## Parameters\n"
INTRO = (
    "Generated from the `## @param` lines of `values.yaml` (the unit tests keep both in step).\n"
)
_LINE = re.compile(r"^\s*## @(section|param) (.*)$")


def _lookup(values: dict[str, Any], path: str) -> Any:
    node: Any = values
    for key in path.split("."):
        node = node[key]
    return node


def _default(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return '""'
    if isinstance(value, list):
        return "[" + ", ".join(_default(item) for item in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{" + ", ".join(f"{k}: {_default(v)}" for k, v in value.items()) + "}"
    return str(value)


def parameters_section(values_text: str) -> str:
    values = yaml.safe_load(values_text)
    out = [MARKER, "\n", INTRO]
    for line in values_text.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        kind, rest = match.groups()
        if kind == "section":
            out += ["\n", f"### {rest}\n", "\n", "| Name | Description | Default |\n"]
            out.append("| --- | --- | --- |\n")
            continue
        name, _, text = rest.partition(" ")
        default = _default(_lookup(values, name))
        out.append(f"| `{name}` | {text.replace('|', chr(92) + '|')} | `{default}` |\n")
    return "".join(out)


def render_readme(readme: str, values_text: str) -> str:
    head, marker, _ = readme.partition(MARKER)
    assert marker, f"{README_FILE} has no '{MARKER.strip()}' section"
    return head + parameters_section(values_text)


def main() -> int:
    readme = README_FILE.read_text(encoding="utf-8")
    updated = render_readme(readme, VALUES_FILE.read_text(encoding="utf-8"))
    if updated != readme:
        README_FILE.write_text(updated, encoding="utf-8")
        print(f"updated {README_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
