"""Plain records shared by the core and the adapters (no behaviour, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


class CustomerState(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    CLOSED = "closed"


class Role(StrEnum):
    ENFORCER = "enforcer"
    READER = "reader"
    ADMIN = "admin"


class EntryType(StrEnum):
    CREDIT = "credit"
    DEBIT = "debit"
    SETTLEMENT = "settlement"
    EXPIRY = "expiry"
    ADJUSTMENT = "adjustment"


class SettlementStatus(StrEnum):
    """How a request ended; stored in requests.status."""

    COMPLETED = "completed"
    KILLED = "killed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Customer:
    tenant: str
    customer_id: str
    display_name: str = ""
    platform_user_id: str = ""
    balance_grains: int = 0
    balance_version: int = 0
    lifetime_spent_grains: int = 0
    overage_grains: int = 0
    buffer_strategy: str = "conservative"
    hold_ttl_seconds: int | None = None
    max_request_grains: int | None = None
    low_balance_threshold_grains: int | None = None
    state: CustomerState = CustomerState.ACTIVE
    created_at: datetime | None = None
    # The resource that manages it ("BeamCustomer/<name>"), or "" (created through the API).
    owner: str = ""


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """The outcome of appending (or replaying) one ledger transaction."""

    transaction_id: str
    balance_after_grains: int
    balance_version: int
    replayed: bool


@dataclass(frozen=True, slots=True)
class SettleFence:
    """Which settling hold a commit belongs to: its id, nonce and attempt (the settlements
    begun on it, this one included). Once the reaper has abandoned that hold it fences
    every attempt up to its own count, and a commit of a fenced attempt is refused: a
    commit that waited past its hold's deadline must not land after the reservation that
    covered it was released (docs/ARCHITECTURE.md, "Settling")."""

    hold_id: str
    nonce: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Settlement:
    """One settled request: what was charged and what the balance became."""

    tenant: str
    customer_id: str
    request_id: str
    status: SettlementStatus
    model: str = ""
    estimated_grains: int = 0
    reserved_grains: int = 0
    consumed_grains: int = 0
    charged_grains: int = 0
    refunded_grains: int = 0
    overage_grains: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    balance_after_grains: int = 0
    balance_version: int = 0
    created_at: datetime | None = None
    completed_at: datetime | None = None
    replayed: bool = False
    # The nonce of the hold this settles ('' for a Finalize without a hold or token).
    hold_nonce: str = ""
    # The app let the request through while Beam was unreachable (a label, not money).
    let_through: bool = False


class RecordOutcome(StrEnum):
    """What recording a settlement found."""

    NEW = "new"  # this call committed it
    REPLAY = "replay"  # the same hold was settled before: the first settlement stands
    OTHER_HOLD = "other_hold"  # the request id was settled by another hold


@dataclass(frozen=True, slots=True)
class RecordedSettlement:
    settlement: Settlement  # the request's settlement (this one, or the one before)
    outcome: RecordOutcome
    # OTHER_HOLD with something charged: the entry that charged this hold on its own.
    orphan_entry: LedgerEntry | None = None


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    key_hash: str
    key_id: str
    tenant: str
    role: Role
    name: str = ""
    customers: frozenset[str] = field(default_factory=frozenset)
    expires_at: datetime | None = None
    revoked_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class PriceRecord:
    tenant: str
    model: str
    version: int
    input_grains_per_million: int
    output_grains_per_million: int
    cached_input_grains_per_million: int
    effective_from: datetime
    source: str = ""
