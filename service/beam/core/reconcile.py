"""Reconcile BeamCustomer, BeamApiKey and BeamPriceList specs into the stores.

A ``Reconciler`` takes a tenant (namespace), a name and a spec (the CRD's camelCase shape),
converges the stores, and returns the status to publish as plain values. It knows the CRDs'
shapes (the spec fields, and the condition types, reasons and messages the Beam kinds
publish), not Kopf nor the Kubernetes API: the operator turns its ``Condition`` values into
``metav1.Condition`` entries and merges them into the object (``beam_operator.conditions``);
``beam apply -f`` calls it without a cluster.

It is given exactly what it touches, once, by the runtime: ``Admin`` (credits, customer views
and states, authorized as the operator), the PostgreSQL store it writes (customers, prices,
API keys), the ledger's account loader (a customer's hot-path copy in Redis) and the price
cache it invalidates.

Every step is idempotent or looks before it acts, so a restart in the middle of a
reconcile, or two operators one after the other, converge to the same ledger: credits are
ledger transactions keyed ``crd:<customerId>:<credit id>``, applied once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from beam.adapters.postgres_store import PostgresStore
from beam.constants import MAX_GRAINS
from beam.core.admin import Admin
from beam.core.auth import Principal, generate_key, hash_key
from beam.core.commands import (
    CREDIT_ID_PATTERN,
    LedgerCommand,
    require_id,
    require_range,
    validate_strategy,
)
from beam.core.pricing import PriceBook, parse_price_entries
from beam.core.usage import spent_since
from beam.errors import BeamError, Reason, invalid
from beam.records import ApiKeyRecord, Customer, CustomerState, Role

# Loads one customer's account from PostgreSQL into Redis (``Ledger.reload_account``).
AccountLoader = Callable[[str, str], Awaitable[bool]]


def operator_principal(tenant: str) -> Principal:
    return Principal(tenant, Role.ADMIN, "beam-operator", frozenset())


@dataclass(slots=True)
class Condition:
    type: str
    status: str
    reason: str
    message: str = ""


@dataclass(slots=True)
class CustomerStatus:
    balance: int
    reserved: int
    available: int
    lifetime_spent_grains: int
    overage_grains: int
    applied_credits: list[str]
    conditions: list[Condition] = field(default_factory=list)
    # Settlements, expiries and adjustments of the last 24 hours (usage analytics).
    spent_last_24h_grains: int = 0


@dataclass(slots=True)
class ApiKeyResult:
    key_id: str
    plaintext: str | None  # set only when a new key was generated
    rotation_generation: int
    previous_key_expires_at: datetime | None
    conditions: list[Condition] = field(default_factory=list)


def parse_customer_spec(tenant: str, spec: dict[str, Any]) -> tuple[Customer, list[dict[str, Any]]]:
    customer_id = str(spec.get("customerId") or "")
    require_id(customer_id, "spec.customerId")
    strategy = str(spec.get("bufferStrategy") or "conservative")
    validate_strategy(strategy, "spec.bufferStrategy")
    ttl = spec.get("holdTtlSeconds")
    if ttl is not None:
        require_range(ttl, "spec.holdTtlSeconds", 1, 86_400)
    cap = spec.get("maxRequestGrains")
    if cap is not None:
        require_range(cap, "spec.maxRequestGrains", 1, MAX_GRAINS)
    threshold = spec.get("lowBalanceThresholdGrains")
    if threshold is not None:
        require_range(threshold, "spec.lowBalanceThresholdGrains", 0, MAX_GRAINS)
    credits = list(spec.get("credits") or [])
    seen: set[str] = set()
    for index, credit in enumerate(credits):
        credit_id = str(credit.get("id") or "")
        require_id(credit_id, f"spec.credits[{index}].id", CREDIT_ID_PATTERN)
        if credit_id in seen:
            raise invalid(f"spec.credits[{index}].id", f"duplicate credit id {credit_id!r}")
        seen.add(credit_id)
        require_range(credit.get("amountGrains"), f"spec.credits[{index}].amountGrains", 1,
                      MAX_GRAINS)  # fmt: skip
    customer = Customer(
        tenant=tenant,
        customer_id=customer_id,
        display_name=str(spec.get("displayName") or "")[:256],
        platform_user_id=str(spec.get("platformUserId") or "")[:256],
        buffer_strategy=strategy,
        hold_ttl_seconds=ttl,
        max_request_grains=cap,
        low_balance_threshold_grains=threshold,
        state=CustomerState.SUSPENDED if spec.get("suspended") else CustomerState.ACTIVE,
    )
    return customer, credits


def credit_transaction_id(customer_id: str, credit_id: str) -> str:
    return f"crd:{customer_id}:{credit_id}"


def parse_api_key_spec(spec: dict[str, Any]) -> tuple[Role, frozenset[str], datetime | None]:
    role_name = str(spec.get("role") or "")
    if role_name not in {r.value for r in Role}:
        raise invalid("spec.role", "must be one of enforcer, reader, admin")
    customers = frozenset(str(c) for c in spec.get("customers") or [])
    for customer_id in customers:
        require_id(customer_id, "spec.customers")
    expires = spec.get("expiresAt")
    return Role(role_name), customers, _parse_time(expires, "spec.expiresAt") if expires else None


class Reconciler:
    """One per process (``Runtime.reconciler``); holds only what reconciling touches."""

    def __init__(
        self, admin: Admin, store: PostgresStore, load_account: AccountLoader, prices: PriceBook
    ) -> None:
        self.admin = admin
        self.store = store
        self.load_account = load_account
        self.prices = prices

    async def reconcile_customer(
        self, tenant: str, spec: dict[str, Any], owner: str = ""
    ) -> CustomerStatus:
        """``owner`` names the managing resource ("BeamCustomer/<name>"): a second resource
        naming the same customerId gets CUSTOMER_EXISTS instead of sharing the customer."""
        customer, credits = parse_customer_spec(tenant, spec)
        customer = replace(customer, owner=owner)
        await self.store.upsert_customer(customer)
        await self.load_account(tenant, customer.customer_id)
        principal = operator_principal(tenant)
        applied: list[str] = []
        conflicts: list[str] = []
        for credit in credits:
            command = LedgerCommand(
                customer.customer_id,
                int(credit["amountGrains"]),
                str(credit.get("description") or "")[:512],
                credit_transaction_id(customer.customer_id, str(credit["id"])),
            )
            try:
                await self.admin.credit(principal, command, system=True)
                applied.append(str(credit["id"]))
            except BeamError as error:
                if error.reason is not Reason.TRANSACTION_ID_CONFLICT:
                    raise
                conflicts.append(str(credit["id"]))
        status = await self.customer_status(tenant, customer.customer_id, spec)
        status.applied_credits = applied
        if conflicts:
            status.conditions[0] = Condition(
                "Ready", "False", "CreditConflict",
                f"credits {', '.join(conflicts)} were applied earlier with another amount; "
                "use a new credit id",
            )  # fmt: skip
        return status

    async def customer_status(
        self, tenant: str, customer_id: str, spec: dict[str, Any]
    ) -> CustomerStatus:
        view = await self.admin.get_customer(operator_principal(tenant), customer_id)
        c = view.customer
        threshold = spec.get("lowBalanceThresholdGrains")
        low = threshold is not None and view.available < int(threshold)
        suspended = c.state is CustomerState.SUSPENDED
        conditions = [
            Condition("Ready", "True", "Reconciled", "customer is in the ledger and the hot path"),
            Condition(
                "LowBalance",
                "True" if low else "False",
                ("Depleted" if view.available <= 0 else "BelowThreshold")
                if low
                else "AboveThreshold",
                f"available {view.available} grains, threshold {threshold}"
                if threshold is not None
                else "no threshold set",
            ),
            Condition(
                "Suspended",
                "True" if suspended else "False",
                "SuspendedBySpec" if suspended else "Active",
                "checks are rejected with CUSTOMER_SUSPENDED" if suspended else "",
            ),
        ]
        return CustomerStatus(
            balance=c.balance_grains,
            reserved=view.reserved,
            available=view.available,
            lifetime_spent_grains=c.lifetime_spent_grains,
            overage_grains=c.overage_grains,
            applied_credits=[],
            conditions=conditions,
            spent_last_24h_grains=await spent_since(
                self.store, tenant, customer_id, timedelta(hours=24)
            ),
        )

    async def close_customer(self, tenant: str, customer_id: str, owner: str = "") -> None:
        """Deleting a BeamCustomer closes it: new checks get CUSTOMER_CLOSED; the ledger stays.
        Only the owner closes it: deleting a resource that was refused closes nothing."""
        await self.admin.set_state(
            tenant, customer_id, CustomerState.CLOSED, owner if owner else None
        )

    async def reconcile_price_list(self, tenant: str, name: str, spec: dict[str, Any]) -> int:
        """All or nothing: a bad entry rejects the whole list. Returns the number of models."""
        effective = spec.get("effectiveFrom")
        when = _parse_time(effective, "spec.effectiveFrom") if effective else None
        records = parse_price_entries(tenant, list(spec.get("models") or []), when)
        if not records:
            raise invalid("spec.models", "at least one model is required", Reason.MISSING_FIELD)
        await self.store.save_prices(tenant, records, source=f"BeamPriceList/{name}")
        self.prices.invalidate()
        return len(records)

    async def reconcile_api_key(
        self,
        tenant: str,
        name: str,
        spec: dict[str, Any],
        *,
        current_key_hash: str | None,
        default_grace_seconds: int = 3600,
        keep_existing: bool = False,
    ) -> ApiKeyResult:
        """Converge the key of one BeamApiKey. ``current_key_hash`` is the hash of the key the
        caller holds (the Secret's); a new key is generated only when it is missing, unknown or
        revoked, or when ``spec.rotation.generation`` moved past the stored generation.
        ``keep_existing`` (``beam apply``, which holds no Secret) keeps any live key instead."""
        role, customers, expires_at = parse_api_key_spec(spec)
        rotation = spec.get("rotation") or {}
        generation = int(rotation.get("generation") or 0)
        grace = int(rotation.get("gracePeriodSeconds", default_grace_seconds))
        key_name = f"{name}#{generation}"
        keys = await self.store.api_keys_of(tenant, name)  # every generation, one query
        live = [k for k in keys if k.name == key_name and k.revoked_at is None]
        current = next((k for k in live if k.key_hash == current_key_hash), None)
        if current is None and keep_existing and live:
            current = live[-1]
        plaintext = None
        if current is None:
            plaintext, key_id, digest = generate_key()
            current = ApiKeyRecord(digest, key_id, tenant, role, key_name)
        current = ApiKeyRecord(
            current.key_hash, current.key_id, tenant, role, key_name, customers, expires_at
        )
        await self.store.upsert_api_key(current)
        previous_expiry = await self._retire_older(keys, generation, current, grace)
        return ApiKeyResult(current.key_id, plaintext, generation, previous_expiry)

    async def _retire_older(
        self, keys: list[ApiKeyRecord], generation: int, current: ApiKeyRecord, grace: int
    ) -> datetime | None:
        """Every older generation's live key stays valid for the grace period, however far the
        generation jumped; stray keys of this generation go at once. Keys already revoked keep
        their moment, and keys of a later generation (a spec that went back) are left alone.
        One statement, whatever the number of generations."""
        now = datetime.now(UTC)
        until: dict[str, datetime] = {}
        for key in keys:
            if key.key_hash == current.key_hash or key.revoked_at is not None:
                continue
            older = _generation_of(key)
            if older < generation:
                until[key.key_hash] = now + timedelta(seconds=grace)
            elif older == generation:
                until[key.key_hash] = now
        await self.store.revoke_api_keys(until)
        return max(until.values(), default=None)

    async def api_key_revoked(self, plaintext: str) -> bool:
        """Whether a key (read from its Secret) is unknown or revoked by now: the operator then
        issues a new one."""
        record = await self.store.get_api_key(hash_key(plaintext))
        return record is None or (
            record.revoked_at is not None and record.revoked_at <= datetime.now(UTC)
        )

    async def revoke_api_key(self, tenant: str, name: str, generation: int) -> int:
        """Deleting a BeamApiKey revokes all its keys at once (grace periods end too): every
        generation's, not only up to ``generation`` (kept for callers), in two queries."""
        now = datetime.now(UTC)
        keys = await self.store.api_keys_of(tenant, name)
        return await self.store.revoke_api_keys(
            {k.key_hash: now for k in keys if k.revoked_at is None or k.revoked_at > now}
        )


def _generation_of(key: ApiKeyRecord) -> int:
    """``<name>#<generation>``: the store only returns names ending in ``#<digits>``."""
    return int(key.name.rpartition("#")[2])


def _parse_time(value: Any, name: str) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise invalid(name, "must be an RFC 3339 date-time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
