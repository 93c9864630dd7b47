"""Usage analytics: who spent what, on which model, when.

``Usage.customer_usage`` (GetUsage) answers one customer's spend per time bucket (minute,
hour or day; by model or not), ``Usage.top_customers`` (GetTopCustomers) the tenant's
biggest spenders over a period, ``spent_since`` the BeamCustomer's 24 h spend. Every
figure is a sum of ledger entries that spend (settlement, expiry, adjustment), bucketed by
settlement time in UTC; see migrations/0005_usage_analytics.sql and docs/DATABASE.md.

Bounds: a range is widened to whole buckets and may span at most ``MAX_USAGE_BUCKETS``
buckets (``MAX_TOP_RANGE`` for the top customers); an answer holds at most
``MAX_USAGE_ROWS`` rows (more is OUT_OF_RANGE, naming ``start``: narrow the range) and at
most ``MAX_TOP_CUSTOMERS`` customers. Reads need the ``read`` role; tenancy and a key's
customer allow-list hold as for every other read.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from beam.adapters.postgres_store import PostgresStore
from beam.adapters.usage_store import (
    Bucket,
    CustomerSpend,
    UsagePolicies,
    UsageRow,
    UsageStore,
)
from beam.core.auth import Action, Principal, customer_not_found
from beam.core.commands import require_id, require_range
from beam.errors import Reason, invalid

__all__ = [
    "Bucket",
    "CustomerSpend",
    "TopCustomersQuery",
    "TopCustomersReport",
    "Usage",
    "UsageQuery",
    "UsageReport",
    "UsageRow",
    "UsageSettings",
]

MAX_USAGE_BUCKETS: Final = 1440  # a day of minutes, 60 days of hours, ~4 years of days
MAX_USAGE_ROWS: Final = 10_000  # buckets x models in one answer
DEFAULT_TOP_CUSTOMERS: Final = 10
MAX_TOP_CUSTOMERS: Final = 100
MAX_TOP_RANGE: Final = timedelta(days=400)
DEFAULT_TOP_SPAN: Final = timedelta(days=30)
MAX_INSTANT_LENGTH: Final = 64
BUCKET_WIDTHS: Final = {
    Bucket.MINUTE: timedelta(minutes=1),
    Bucket.HOUR: timedelta(hours=1),
    Bucket.DAY: timedelta(days=1),
}
# The span asked for when `start` is empty: an hour of minutes, a day of hours, 30 days.
DEFAULT_SPANS: Final = {
    Bucket.MINUTE: timedelta(hours=1),
    Bucket.HOUR: timedelta(days=1),
    Bucket.DAY: timedelta(days=30),
}
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
LATEST: Final = datetime(9999, 12, 30, tzinfo=UTC)  # room to widen to a whole day
_MICROSECOND = timedelta(microseconds=1)
_INSTANT_FORMS = "an RFC 3339 time such as 2026-11-01T00:00:00Z, or unix milliseconds"


class UsageSettings(BaseSettings):
    """TimescaleDB retention and compression of usage analytics (``BEAM_USAGE_*``), applied
    by ``beam migrate``. Days; 0 = no policy (keep everything / never compress). Raw
    events must outlive the hourly aggregate's refresh window (3 days): at least 7 days."""

    model_config = SettingsConfigDict(env_prefix="BEAM_USAGE_", extra="ignore")

    raw_retention_days: int = Field(default=0, ge=0, le=36_500)
    compress_after_days: int = Field(default=7, ge=0, le=36_500)
    hourly_retention_days: int = Field(default=0, ge=0, le=36_500)

    @model_validator(mode="after")
    def check_windows(self) -> Self:
        if 0 < self.raw_retention_days < 7:
            raise ValueError(
                "BEAM_USAGE_RAW_RETENTION_DAYS must be 0 (keep) or at least 7: the hourly "
                "aggregate refreshes the last 3 days from raw events"
            )
        raw, hourly = self.raw_retention_days, self.hourly_retention_days
        if hourly and (raw == 0 or hourly < raw):
            raise ValueError(
                "BEAM_USAGE_HOURLY_RETENTION_DAYS must be 0 (keep) or at least "
                "BEAM_USAGE_RAW_RETENTION_DAYS (which must then be set)"
            )
        return self

    def policies(self) -> UsagePolicies:
        return UsagePolicies(
            raw_retention_days=self.raw_retention_days,
            compress_after_days=self.compress_after_days,
            hourly_retention_days=self.hourly_retention_days,
        )


@dataclass(frozen=True, slots=True)
class UsageQuery:
    customer_id: str
    start: str = ""
    end: str = ""
    bucket: str = ""
    group_by: str = ""


@dataclass(frozen=True, slots=True)
class UsageReport:
    start: datetime
    end: datetime
    bucket: Bucket
    rows: list[UsageRow]


@dataclass(frozen=True, slots=True)
class TopCustomersQuery:
    start: str = ""
    end: str = ""
    limit: int = 0


@dataclass(frozen=True, slots=True)
class TopCustomersReport:
    start: datetime
    end: datetime
    customers: list[CustomerSpend]


class Usage:
    def __init__(self, postgres: PostgresStore) -> None:
        self.postgres = postgres
        self.store = usage_store(postgres)

    async def customer_usage(
        self, principal: Principal, query: UsageQuery, now: datetime | None = None
    ) -> UsageReport:
        principal.require(Action.READ)
        require_id(query.customer_id, "customer_id")
        bucket = parse_bucket(query.bucket)
        by_model = parse_group_by(query.group_by)
        width = BUCKET_WIDTHS[bucket]
        start, end = widened_range(
            query.start, query.end, width, DEFAULT_SPANS[bucket], now or datetime.now(UTC)
        )
        if end - start > width * MAX_USAGE_BUCKETS:
            raise invalid(
                "start",
                f"start..end spans {(end - start) // width} {bucket.value} buckets; at most "
                f"{MAX_USAGE_BUCKETS} (shorten the range or use a larger bucket)",
                Reason.OUT_OF_RANGE,
            )
        principal.require_customer(query.customer_id)
        # An unknown customer (or another tenant's) is NOT_FOUND, not an empty history.
        if await self.postgres.get_customer(principal.tenant, query.customer_id) is None:
            raise customer_not_found(query.customer_id)
        rows = await self.store.customer_usage(
            principal.tenant, query.customer_id, start, end, bucket,
            by_model=by_model, limit=MAX_USAGE_ROWS + 1,
        )  # fmt: skip
        if len(rows) > MAX_USAGE_ROWS:
            raise invalid(
                "start",
                f"the answer would hold more than {MAX_USAGE_ROWS} rows (buckets x models); "
                "shorten the range, use a larger bucket or drop group_by",
                Reason.OUT_OF_RANGE,
            )
        return UsageReport(start, end, bucket, rows)

    async def top_customers(
        self, principal: Principal, query: TopCustomersQuery, now: datetime | None = None
    ) -> TopCustomersReport:
        principal.require(Action.READ)
        require_range(query.limit, "limit", 0, MAX_TOP_CUSTOMERS)
        width = BUCKET_WIDTHS[Bucket.HOUR]
        start, end = widened_range(
            query.start, query.end, width, DEFAULT_TOP_SPAN, now or datetime.now(UTC)
        )
        if end - start > MAX_TOP_RANGE:
            raise invalid(
                "start",
                f"start..end spans more than {MAX_TOP_RANGE.days} days",
                Reason.OUT_OF_RANGE,
            )
        customers = await self.store.top_customers(
            principal.tenant, start, end, limit=query.limit or DEFAULT_TOP_CUSTOMERS,
            customers=sorted(principal.customers),
        )  # fmt: skip
        return TopCustomersReport(start, end, customers)

    async def spent_since(self, tenant: str, customer_id: str, since: datetime) -> int:
        return await self.store.spent_since(tenant, customer_id, since)

    async def apply_policies(self, settings: UsageSettings) -> list[str]:
        return await self.store.apply_policies(settings.policies())


def usage_store(postgres: PostgresStore) -> UsageStore:
    """The usage queries on ``postgres``'s read pool, with its wait (so analytics never
    hold a settlement's connection); the policies on its main pool."""
    return UsageStore(
        postgres.pool, postgres.read_pool, read_wait_seconds=postgres.read_wait_seconds
    )


async def spent_since(postgres: PostgresStore, tenant: str, customer_id: str,
                      window: timedelta) -> int:  # fmt: skip
    """Grains a customer spent over the last ``window`` (the BeamCustomer's status)."""
    return await usage_store(postgres).spent_since(tenant, customer_id, datetime.now(UTC) - window)


# -- input ---------------------------------------------------------------------------------


def parse_bucket(value: str) -> Bucket:
    if not value:
        return Bucket.HOUR
    try:
        return Bucket(value)
    except ValueError:
        raise invalid("bucket", "must be minute, hour or day") from None


def parse_group_by(value: str) -> bool:
    """True: one row per bucket and model."""
    if value in ("", "none"):
        return False
    if value == "model":
        return True
    raise invalid("group_by", "must be model or none")


def parse_instant(value: str, name: str) -> datetime | None:
    """RFC 3339 (with a zone: ``Z`` or ``±hh:mm``) or unix milliseconds; None when empty."""
    if not value:
        return None
    if len(value) > MAX_INSTANT_LENGTH:
        raise invalid(name, f"at most {MAX_INSTANT_LENGTH} characters", Reason.OUT_OF_RANGE)
    if value.isascii() and value.isdigit():
        milliseconds = int(value)
        if milliseconds > (LATEST - EPOCH) // timedelta(milliseconds=1):
            raise invalid(name, f"must be before {LATEST:%Y-%m-%d}", Reason.OUT_OF_RANGE)
        return EPOCH + timedelta(milliseconds=milliseconds)
    try:
        instant = datetime.fromisoformat(value)
    except ValueError:
        raise invalid(name, f"must be {_INSTANT_FORMS}") from None
    if instant.tzinfo is None:
        raise invalid(name, "must carry a time zone: Z or an offset such as +02:00")
    try:
        instant = instant.astimezone(UTC)
    except OverflowError:
        raise invalid(name, "out of range", Reason.OUT_OF_RANGE) from None
    if not EPOCH <= instant < LATEST:
        raise invalid(
            name, f"must be between 1970-01-01 and {LATEST:%Y-%m-%d}", Reason.OUT_OF_RANGE
        )
    return instant


def widened_range(
    start_text: str, end_text: str, width: timedelta, default_span: timedelta, now: datetime
) -> tuple[datetime, datetime]:
    """[start, end) from the caller's text, widened to whole buckets of ``width`` (UTC):
    start down, end up. ``end`` defaults to now, ``start`` to ``end - default_span``."""
    end = parse_instant(end_text, "end") or now
    start = parse_instant(start_text, "start") or max(EPOCH, end - default_span)
    if end <= start:
        raise invalid("end", "must be after start", Reason.OUT_OF_RANGE)
    return floor_to(start, width), ceil_to(end, width)


def floor_to(instant: datetime, width: timedelta) -> datetime:
    step = width // _MICROSECOND
    return EPOCH + _MICROSECOND * (((instant - EPOCH) // _MICROSECOND) // step * step)


def ceil_to(instant: datetime, width: timedelta) -> datetime:
    step = width // _MICROSECOND
    return EPOCH + _MICROSECOND * (-(-((instant - EPOCH) // _MICROSECOND) // step) * step)
