"""``beam usage``: a customer's spend per time bucket, or the tenant's top spenders.

    beam usage --customer-id cus_1 --since 7d --bucket day [--by-model]
    beam usage --top 10 --since 30d

Prints a table and a bar chart of the charged grains (UTF-8 blocks, ``#`` on terminals that
cannot show them); ``--json`` prints the API's JSON. Times are UTC. Registered on the
``beam`` group by ``beam.cli.main`` (``register``), whose client options it shares.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import click

BAR_WIDTH = 40
_EIGHTHS = " ▏▎▍▌▋▊▉"
_DURATION = re.compile(r"^(\d{1,9})([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
# let_through_*: of the requests and grains, those let through while Beam was unreachable.
BUCKET_COLUMNS = ["start", "requests", "charged_grains", "prompt_tokens", "completion_tokens",
                  "cached_prompt_tokens", "let_through_requests",
                  "let_through_grains"]  # fmt: skip
TOP_COLUMNS = ["customer_id", "requests", "charged_grains", "prompt_tokens",
               "completion_tokens", "cached_prompt_tokens", "let_through_requests",
               "let_through_grains"]  # fmt: skip


def instant(value: str, now_ms: int, name: str) -> str:
    """``--since``/``--until``: a duration back from now (90s, 30m, 1h, 7d, 2w), or a time
    the API takes as it is (RFC 3339 or unix milliseconds)."""
    match = _DURATION.fullmatch(value)
    if match:
        return str(now_ms - int(match.group(1)) * _SECONDS[match.group(2)] * 1000)
    if value and value.isascii() and (value.isdigit() or "T" in value):
        return value
    raise click.BadParameter(
        "a duration (90s, 30m, 1h, 7d, 2w), an RFC 3339 time or unix milliseconds",
        param_hint=name,
    )


def register(group: click.Group, with_client: Callable[[Any], Any], client: type[Any]) -> None:
    """Add ``usage`` to ``group``; ``with_client`` adds --server/--api-key/--json, ``client``
    is the CLI's REST client class (taken as arguments: ``beam.cli.main`` imports this
    module, never the other way round)."""

    @group.command("usage")
    @click.option("--customer-id", default="", help="The customer (or --top).")
    @click.option("--top", type=click.IntRange(1, 100), default=None,
                  help="Instead: the tenant's N customers that spent most.")  # fmt: skip
    @click.option(
        "--since",
        default="24h",
        show_default=True,
        help="Start: a duration back from now (90s, 30m, 1h, 7d, 2w) or a time.",
    )
    @click.option("--until", default="", help="End (exclusive), same forms; default now.")
    @click.option("--bucket", type=click.Choice(["minute", "hour", "day"]), default="hour",
                  show_default=True)  # fmt: skip
    @click.option("--by-model", is_flag=True, help="One row per bucket and model.")
    @with_client
    def usage(customer_id: str, top: int | None, since: str, until: str, bucket: str,
              by_model: bool, server: str | None, api_key: str | None,
              as_json: bool) -> None:  # fmt: skip
        """Spend per time bucket (UTC), from the ledger's settlements, expiries and
        adjustments: a table and a bar chart."""
        if bool(customer_id) == (top is not None):
            raise click.UsageError("give either --customer-id or --top")
        now_ms = int(time.time() * 1000)
        params = {"start": instant(since, now_ms, "--since"),
                  "end": instant(until, now_ms, "--until") if until else str(now_ms)}  # fmt: skip
        api = client(server, api_key, as_json)
        if top is not None:
            data = api.call("GET", "/v1/usage/top-customers", params={**params, "limit": top})
            show_top(data, as_json)
            return
        params["bucket"] = bucket
        if by_model:
            params["group_by"] = "model"
        data = api.call("GET", f"/v1/customers/{quote(customer_id, safe='')}/usage",
                        params=params)  # fmt: skip
        show_usage(data, as_json, by_model)


# -- output --------------------------------------------------------------------------------


def show_usage(data: dict[str, Any], as_json: bool, by_model: bool) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    rows = list(data.get("buckets", []))
    columns = [*BUCKET_COLUMNS[:1], "model", *BUCKET_COLUMNS[1:]] if by_model else BUCKET_COLUMNS
    click.echo(f"usage {data.get('start', '')} .. {data.get('end', '')} by {data.get('bucket')}"
               " (UTC)")  # fmt: skip
    click.echo(table(rows, columns))
    totals: dict[str, int] = {}
    for row in rows:
        totals[row["start"]] = totals.get(row["start"], 0) + int(row["charged_grains"])
    requests = sum(int(r["requests"]) for r in rows)
    click.echo("")
    click.echo(bar_chart([(label(s, str(data.get("bucket"))), v) for s, v in totals.items()]))
    plural = "" if requests == 1 else "s"
    total = f"total: {grains(sum(totals.values()))} grains, {requests:,} request{plural}"
    let_through = sum(int(r.get("let_through_requests", 0)) for r in rows)
    let_through_grains = sum(int(r.get("let_through_grains", 0)) for r in rows)
    if let_through or let_through_grains:
        plural = "" if let_through == 1 else "s"
        total += (f" (let through: {let_through:,} request{plural}, "
                  f"{grains(let_through_grains)} grains)")  # fmt: skip
    click.echo(total)


def show_top(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    rows = list(data.get("customers", []))
    click.echo(f"top customers {data.get('start', '')} .. {data.get('end', '')} (UTC)")
    click.echo(table(rows, TOP_COLUMNS))
    click.echo("")
    click.echo(bar_chart([(r["customer_id"], int(r["charged_grains"])) for r in rows]))


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Columns as the other client commands print them; "(none)" for no rows."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = [
        "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()
        for values in [[c.upper() for c in columns], *cells]
    ]
    if not rows:
        lines.append("(none)")
    return "\n".join(lines)


def bar_chart(points: list[tuple[str, int]], width: int = BAR_WIDTH) -> str:
    """One bar per point, scaled to the largest value; values below zero (a refund) draw
    no bar. Empty when there are no points."""
    if not points:
        return "(no spend in this period)"
    full, eighths = _blocks()
    axis = "│" if full == "█" else "|"
    top = max(max(v for _, v in points), 1)
    name_width = max(len(n) for n, _ in points)
    lines = []
    for name, value in points:
        scaled = max(0, value) * width * 8 // top
        bar = full * (scaled // 8) + (eighths[scaled % 8] if scaled % 8 else "")
        if value > 0 and not bar.strip():
            bar = eighths[1] if full == "█" else full  # visible, however small
        lines.append(f"{name.ljust(name_width)} {axis}{bar.ljust(width)} {grains(value)}")
    return "\n".join(lines)


def _blocks() -> tuple[str, str]:
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        ("█│" + _EIGHTHS).encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return "#", " " * 8
    return "█", _EIGHTHS


def grains(value: int) -> str:
    return f"{value:,}"


def label(start: str, bucket: str) -> str:
    """A bucket's start, as short as its width allows: 2026-11-01 (day), 2026-11-01 10:00."""
    try:
        moment = datetime.fromisoformat(start.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return start
    return f"{moment:%Y-%m-%d}" if bucket == "day" else f"{moment:%Y-%m-%d %H:%M}"
