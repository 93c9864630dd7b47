"""One home for every Redis key shape, script name and hard limit.

Redis keys of one customer all share the hash tag ``{tenant:customer}``, so every Lua
script touches a single cluster slot. Scripts derive per-hold keys from the account key's
prefix (``beam:{t:c}:``); those keys are in the same slot by construction.

Amounts are bounded by ``MAX_GRAINS`` = 2**53 - 1: Redis runs Lua 5.1, whose numbers are
IEEE doubles, and every integer up to 2**53 is exact in a double. Inputs above the bound
are rejected as OUT_OF_RANGE (see docs/adr/0002-grain-bounds.md).
"""

from __future__ import annotations

from typing import Final

KEY_NAMESPACE: Final = "beam"

# Account hash: balance, version, held, state, ttl_ms, max_request_grains.
ACCOUNT_SUFFIX: Final = "acct"
# Sorted set of open holds (member: hold id, score: expiry in unix ms).
OPEN_HOLDS_SUFFIX: Final = "open"
# Sorted set of holds that expired and await settlement at their consumed amount.
EXPIRING_HOLDS_SUFFIX: Final = "exp"
# Sorted set of holds whose settlement is being committed to PostgreSQL (score: deadline).
SETTLING_HOLDS_SUFFIX: Final = "stl"
# Counter of changes to a customer's holds (one added, removed, moved between sets, or its
# amount changed): a stepwise scan of many holds checks it to know it saw one state.
HOLDS_SEQ_SUFFIX: Final = "hseq"
# Hash per hold: "h:<hold id>".
HOLD_PREFIX: Final = "h:"
# Settled request marker for replies to retries: "done:<request_id>" (hash, with TTL).
DONE_PREFIX: Final = "done:"
# Hold ids that no client can name (client ids start with a letter or digit): an admin
# debit holds "#debit:<transaction id>".
SYSTEM_HOLD_PREFIX: Final = "#"
DEBIT_HOLD_PREFIX: Final = "#debit:"
# A credit being committed: "#credit:<transaction id>" (0 grains; lets the reaper finish it).
CREDIT_HOLD_PREFIX: Final = "#credit:"

# Transaction id prefixes Beam writes itself; a client transaction id may not start with
# one (it could pre-empt a settlement, an expiry or an operator credit).
SYSTEM_TRANSACTION_PREFIXES: Final = (
    "expiry:",
    "settlement:",
    "adjustment:",
    "crd:",
    "open:",
    "credit:",
    "debit:",
)

# Lua scripts, by file name in lua/ (without .lua); beam.adapters.scripts is their face.
SCRIPT_OPEN_HOLD: Final = "open_hold"
SCRIPT_DEDUCT: Final = "deduct"
SCRIPT_BEGIN_SETTLEMENT: Final = "begin_settlement"
SCRIPT_SETTLE_HOLD: Final = "settle_hold"
SCRIPT_EXPIRE_HOLDS: Final = "expire_holds"
SCRIPT_ABANDON_SETTLEMENT: Final = "abandon_settlement"
SCRIPT_OPEN_PENDING: Final = "open_pending"
SCRIPT_RETIRE_HOLD: Final = "retire_hold"
SCRIPT_READ_BALANCE: Final = "read_balance"
SCRIPT_LOAD_ACCOUNT: Final = "load_account"
SCRIPT_APPLY_BALANCE: Final = "apply_balance"
SCRIPT_AUDIT_ACCOUNT: Final = "audit_account"
SCRIPT_SCAN_HOLDS: Final = "scan_holds"
ALL_SCRIPTS: Final = (
    SCRIPT_OPEN_HOLD,
    SCRIPT_DEDUCT,
    SCRIPT_BEGIN_SETTLEMENT,
    SCRIPT_SETTLE_HOLD,
    SCRIPT_EXPIRE_HOLDS,
    SCRIPT_ABANDON_SETTLEMENT,
    SCRIPT_OPEN_PENDING,
    SCRIPT_RETIRE_HOLD,
    SCRIPT_READ_BALANCE,
    SCRIPT_LOAD_ACCOUNT,
    SCRIPT_APPLY_BALANCE,
    SCRIPT_AUDIT_ACCOUNT,
    SCRIPT_SCAN_HOLDS,
)

# PostgreSQL NOTIFY channels.
CHANNEL_API_KEYS: Final = "beam_api_keys"
CHANNEL_PRICES: Final = "beam_model_prices"

# Limits (STYLE: a bound on everything).
MAX_GRAINS: Final = 2**53 - 1
MAX_PRICE_GRAINS_PER_MILLION: Final = 10**12
MAX_TOKENS_PER_CALL: Final = 2**31 - 1
MAX_TOKENS_PER_REQUEST: Final = 10**9
MAX_OPEN_HOLDS_PER_CUSTOMER: Final = 10_000
# The most holds one script visits to sum or list a customer's holds (VerifyIntegrity, a
# sync, a forced load): more are scanned in steps of this many, so no customer's holds can
# make a script that stalls Redis for every other customer (RuntimeSettings can lower it).
HOLDS_PER_SCRIPT: Final = 256
# Scans that found the holds changing before the caller gives up (an audit) or sums them
# in one script after all (a forced load, which must not fail).
HOLD_SCAN_ATTEMPTS: Final = 3
MAX_SEQUENCE_NUMBER: Final = 10**9
EXPIRE_BATCH_PER_CALL: Final = 8
DONE_MARKER_TTL_SECONDS: Final = 86_400
# Deduct results a hold remembers per sequence number (the newest ones).
SEQUENCE_WINDOW: Final = 128
# A settling hold whose commit has not come after this long is abandoned by the reaper
# (longer than any commit can take: PostgreSQL's command timeout is 30 s).
SETTLE_DEADLINE_MS: Final = 120_000
# The reaper completes a settling hold from the ledger once it has been pending this long
# (a settlement in flight normally finishes in milliseconds).
SETTLE_REPAIR_GRACE_MS: Final = 2_000
# Finalizes of one customer a process settles at once; beyond it a Finalize is refused
# before it reserves anything (STORE_UNAVAILABLE, retry): a hot customer's backlog stays
# bounded (a batch of group commit is at most 64 settlements, 4 in flight).
MAX_SETTLEMENTS_IN_FLIGHT_PER_CUSTOMER: Final = 256
MIN_BUFFER_MULTIPLIER: Final = 1.0
MAX_BUFFER_MULTIPLIER: Final = 100.0
# Multipliers are applied as integer parts-per-million, rounding up.
MULTIPLIER_SCALE: Final = 1_000_000
TOKENS_PER_MILLION: Final = 1_000_000
MAX_ID_LENGTH: Final = 128
MAX_DESCRIPTION_LENGTH: Final = 512
MAX_NAME_LENGTH: Final = 256  # display_name, platform_user_id
MAX_CUSTOM_PROPERTIES: Final = 16
MAX_CUSTOM_PROPERTY_BYTES: Final = 256
MAX_LIST_LIMIT: Final = 1000
DEFAULT_TENANT: Final = "default"

# Buffer strategies: the multiplier used when a Check sends buffer_multiplier = 0.
BUFFER_STRATEGY_MULTIPLIERS_PPM: Final = {
    "conservative": 1_500_000,
    "balanced": 1_200_000,
    "aggressive": 1_100_000,
}

# The well-known dev key of `beam dev`; refused by any service not in dev mode.
DEV_API_KEY: Final = "beam_test_key_1234567890"
DEV_CUSTOMER_ID: Final = "test_customer_1"
DEV_CUSTOMER_BALANCE_GRAINS: Final = 100_000_000


def customer_tag(tenant: str, customer_id: str) -> str:
    return f"{{{tenant}:{customer_id}}}"


def account_key(tenant: str, customer_id: str) -> str:
    return f"{KEY_NAMESPACE}:{customer_tag(tenant, customer_id)}:{ACCOUNT_SUFFIX}"


def open_holds_key(tenant: str, customer_id: str) -> str:
    return f"{KEY_NAMESPACE}:{customer_tag(tenant, customer_id)}:{OPEN_HOLDS_SUFFIX}"


def expiring_holds_key(tenant: str, customer_id: str) -> str:
    return f"{KEY_NAMESPACE}:{customer_tag(tenant, customer_id)}:{EXPIRING_HOLDS_SUFFIX}"


def hold_key(tenant: str, customer_id: str, request_id: str) -> str:
    return f"{KEY_NAMESPACE}:{customer_tag(tenant, customer_id)}:{HOLD_PREFIX}{request_id}"


def done_key(tenant: str, customer_id: str, request_id: str) -> str:
    return f"{KEY_NAMESPACE}:{customer_tag(tenant, customer_id)}:{DONE_PREFIX}{request_id}"


def holds_seq_key(tenant: str, customer_id: str) -> str:
    return f"{KEY_NAMESPACE}:{customer_tag(tenant, customer_id)}:{HOLDS_SEQ_SUFFIX}"


def settling_holds_key(tenant: str, customer_id: str) -> str:
    return f"{KEY_NAMESPACE}:{customer_tag(tenant, customer_id)}:{SETTLING_HOLDS_SUFFIX}"


def customer_keys(tenant: str, customer_id: str, hold_id: str = "") -> list[str]:
    """KEYS for every script, in the order the scripts expect (lua/_common.lua)."""
    return [
        account_key(tenant, customer_id),
        open_holds_key(tenant, customer_id),
        expiring_holds_key(tenant, customer_id),
        hold_key(tenant, customer_id, hold_id),
        done_key(tenant, customer_id, hold_id),
        settling_holds_key(tenant, customer_id),
    ]


def lua_constants() -> str:
    """The constants block put in front of every script, so Lua and Python share them."""
    values: dict[str, int | str] = {
        "MAX_GRAINS": MAX_GRAINS,
        "MILLION": TOKENS_PER_MILLION,
        "SEQUENCE_WINDOW": SEQUENCE_WINDOW,
        "ACCOUNT_SUFFIX": ACCOUNT_SUFFIX,
        "HOLD_PREFIX": HOLD_PREFIX,
        "HOLDS_SEQ_SUFFIX": HOLDS_SEQ_SUFFIX,
    }
    lines = ["-- Generated from beam.constants by beam.adapters.scripts; do not edit."]
    for name, value in values.items():
        literal = repr(value) if isinstance(value, str) else str(value)
        lines.append(f"local {name} = {literal}")
    return "\n".join(lines) + "\n"


def parse_customer_key(key: str) -> tuple[str, str] | None:
    """Inverse of the key builders: ``beam:{t:c}:open`` -> (t, c)."""
    prefix = f"{KEY_NAMESPACE}:{{"
    if not key.startswith(prefix):
        return None
    end = key.find("}", len(prefix))
    if end < 0:
        return None
    tenant, sep, customer = key[len(prefix) : end].partition(":")
    if not sep:
        return None
    return tenant, customer
