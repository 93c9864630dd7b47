"""Usage analytics without stores: times, ranges, buckets, settings, the CLI's chart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import click
import pytest
from pydantic import ValidationError

from beam.cli.usage import bar_chart, instant, label
from beam.core.usage import (
    BUCKET_WIDTHS,
    Bucket,
    UsageSettings,
    ceil_to,
    floor_to,
    parse_bucket,
    parse_group_by,
    parse_instant,
    widened_range,
)
from beam.errors import BeamError, Reason

NOW = datetime(2026, 11, 1, 10, 17, 42, 123456, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-01T10:00:00Z", datetime(2026, 11, 1, 10, tzinfo=UTC)),
        ("2026-11-01T12:00:00+02:00", datetime(2026, 11, 1, 10, tzinfo=UTC)),
        ("2026-11-01T10:00:00.5-00:30", datetime(2026, 11, 1, 10, 30, 0, 500000, tzinfo=UTC)),
        ("1793491200000", datetime(2026, 11, 1, tzinfo=UTC)),
        ("0", datetime(1970, 1, 1, tzinfo=UTC)),
        ("", None),
    ],
)
def test_instants_are_rfc3339_or_unix_milliseconds(text: str, expected: datetime | None) -> None:
    assert parse_instant(text, "start") == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("2026-11-01T10:00:00", Reason.INVALID_FIELD),  # no zone
        ("2026-11-01", Reason.INVALID_FIELD),
        ("yesterday", Reason.INVALID_FIELD),
        ("-1", Reason.INVALID_FIELD),
        ("1e12", Reason.INVALID_FIELD),
        ("١٢٣", Reason.INVALID_FIELD),  # digits, not ASCII ones
        ("1969-12-31T23:59:59Z", Reason.OUT_OF_RANGE),
        ("9999-12-31T00:00:00Z", Reason.OUT_OF_RANGE),
        ("999999999999999999999", Reason.OUT_OF_RANGE),
        ("1" * 65, Reason.OUT_OF_RANGE),
    ],
)
def test_bad_instants_name_their_field(text: str, reason: Reason) -> None:
    with pytest.raises(BeamError) as refused:
        parse_instant(text, "end")
    assert (refused.value.reason, refused.value.field) == (reason, "end")
    assert refused.value.message.startswith("end: ")


def test_ranges_widen_to_whole_buckets_in_utc() -> None:
    for bucket, width in BUCKET_WIDTHS.items():
        start, end = widened_range(
            "2026-11-01T10:17:42+05:00", "2026-11-02T00:00:01Z", width, width, NOW
        )
        assert start <= datetime(2026, 11, 1, 5, 17, 42, tzinfo=UTC) < start + width, bucket
        assert end - width < datetime(2026, 11, 2, 0, 0, 1, tzinfo=UTC) <= end, bucket
        assert floor_to(start, width) == start
        assert ceil_to(end, width) == end
    day = BUCKET_WIDTHS[Bucket.DAY]
    assert widened_range("", "", day, timedelta(days=30), NOW) == (
        datetime(2026, 10, 2, tzinfo=UTC), datetime(2026, 11, 2, tzinfo=UTC),
    )  # fmt: skip
    exact = widened_range("1793491200000", "1793494800000", BUCKET_WIDTHS[Bucket.HOUR],
                          timedelta(hours=1), NOW)  # fmt: skip
    assert exact == (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 1, 1, tzinfo=UTC))


def test_an_empty_or_reversed_range_is_out_of_range_naming_end() -> None:
    for start, end in (("1000", "1000"), ("2000", "1000")):
        with pytest.raises(BeamError) as refused:
            widened_range(start, end, timedelta(minutes=1), timedelta(hours=1), NOW)
        assert (refused.value.reason, refused.value.field) == (Reason.OUT_OF_RANGE, "end")


def test_buckets_and_groupings() -> None:
    assert [parse_bucket(b) for b in ("", "minute", "hour", "day")] == [
        Bucket.HOUR, Bucket.MINUTE, Bucket.HOUR, Bucket.DAY,
    ]  # fmt: skip
    assert [parse_group_by(g) for g in ("", "none", "model")] == [False, False, True]
    for call, value, field in ((parse_bucket, "week", "bucket"), (parse_bucket, "Hour", "bucket"),
                               (parse_group_by, "customer", "group_by")):  # fmt: skip
        with pytest.raises(BeamError) as refused:
            call(value)  # type: ignore[operator]
        assert (refused.value.reason, refused.value.field) == (Reason.INVALID_FIELD, field)


def test_usage_settings_keep_raw_events_past_the_refresh_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert UsageSettings().policies().compress_after_days == 7
    monkeypatch.setenv("BEAM_USAGE_RAW_RETENTION_DAYS", "30")
    monkeypatch.setenv("BEAM_USAGE_HOURLY_RETENTION_DAYS", "400")
    assert UsageSettings().policies().raw_retention_days == 30
    for raw, hourly in (("3", "0"), ("30", "10"), ("0", "400")):
        monkeypatch.setenv("BEAM_USAGE_RAW_RETENTION_DAYS", raw)
        monkeypatch.setenv("BEAM_USAGE_HOURLY_RETENTION_DAYS", hourly)
        with pytest.raises(ValidationError):
            UsageSettings()


def test_since_takes_durations_or_times() -> None:
    now = 1_793_491_200_000
    assert instant("90s", now, "--since") == str(now - 90_000)
    assert instant("1h", now, "--since") == str(now - 3_600_000)
    assert instant("7d", now, "--since") == str(now - 7 * 86_400_000)
    assert instant("2w", now, "--since") == str(now - 14 * 86_400_000)
    assert instant("2026-11-01T00:00:00Z", now, "--since") == "2026-11-01T00:00:00Z"
    assert instant("1793491200000", now, "--since") == "1793491200000"
    for bad in ("1y", "soon", "", "-1h"):
        with pytest.raises(click.BadParameter):
            instant(bad, now, "--since")


def test_bar_chart_scales_to_the_largest_value() -> None:
    chart = bar_chart([("a", 48_700), ("b", 24_350), ("c", -800), ("d", 1)], width=8)
    lines = chart.splitlines()
    assert len(lines) == 4
    bars = [line.split(" ", 1)[1] for line in lines]
    assert bars[0].startswith("│" + "█" * 8) or bars[0].startswith("|" + "#" * 8)
    assert bars[0].endswith(" 48,700")
    assert bars[1].endswith(" 24,350")
    assert bars[2].endswith(" -800")
    assert bar_chart([]) == "(no spend in this period)"
    assert label("2026-11-01T10:00:00Z", "day") == "2026-11-01"
    assert label("2026-11-01T10:05:00Z", "minute") == "2026-11-01 10:05"
