"""API keys, roles, tenancy and request tokens.

A key is ``beam_sk_<key_id>_<secret>``; only its SHA-256 is stored. Keys are cached in
process so the hot path costs no store round trip: the cache reloads when PostgreSQL
NOTIFYs ``beam_api_keys`` (revocation reaches every replica in milliseconds) and at least
every ``cache_max_age_seconds`` otherwise. An unknown hash is looked up once in
PostgreSQL (a key created a moment ago works before its NOTIFY arrives) and negatively
cached briefly. Those look-ups share one budget per process, a token bucket of
``MISS_LOOKUPS_PER_SECOND`` with bursts of up to ``MISS_LOOKUP_BURST``: once it is spent,
an unknown key is refused UNAUTHENTICATED without a query and counted in
``beam_auth_lookups_shed_total``. So a flood of distinct bad keys costs PostgreSQL at most
that many queries per second per replica, however many keys it tries; during such a flood
a new key still arrives by NOTIFY or the periodic reload, it only loses the look-up
shortcut.

Tenancy: a key belongs to one tenant and every lookup is scoped by it, so another tenant's
customer is indistinguishable from an unknown one. A customer outside a key's allow-list
answers the same way.

Request tokens bind tenant, customer, request id and the hold's nonce with an HMAC; the
nonce is also stored in the hold, so a token from an earlier hold of a reused request id
does not match the current one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum

from beam.adapters.postgres_store import PostgresStore
from beam.constants import DEV_API_KEY
from beam.core.snapshot import Snapshot
from beam.errors import BeamError, Reason
from beam.observability import AUTH_LOOKUPS_SHED
from beam.records import ApiKeyRecord, Role

KEY_PREFIX = "beam_sk_"
_NEGATIVE_CACHE_SECONDS = 2.0
_NEGATIVE_CACHE_MAX = 10_000
# PostgreSQL look-ups of keys missing from the in-process copy, per process: the steady
# rate and the burst (bucket size). Beyond them unknown keys are refused without a query.
MISS_LOOKUPS_PER_SECOND = 10.0
MISS_LOOKUP_BURST = 20


class Action(Enum):
    ENFORCE = "enforce"  # Check, Deduct, Finalize
    READ = "read"  # GetBalance, lists, integrity report
    ADMIN = "admin"  # customers, credits, debits, sync


_ALLOWED = {
    Role.ENFORCER: {Action.ENFORCE, Action.READ},
    Role.READER: {Action.READ},
    Role.ADMIN: {Action.ENFORCE, Action.READ, Action.ADMIN},
}


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    role: Role
    key_id: str
    customers: frozenset[str]

    def require(self, action: Action) -> None:
        if action not in _ALLOWED[self.role]:
            raise BeamError(
                Reason.PERMISSION_DENIED,
                f"a {self.role.value} key cannot perform {action.value} calls",
            )

    def can_see(self, customer_id: str) -> bool:
        return not self.customers or customer_id in self.customers

    def require_customer(self, customer_id: str) -> None:
        if not self.can_see(customer_id):
            raise customer_not_found(customer_id)


def customer_not_found(customer_id: str) -> BeamError:
    return BeamError(
        Reason.CUSTOMER_NOT_FOUND, f"customer {customer_id!r} not found", field="customer_id"
    )


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> tuple[str, str, str]:
    """A new key: (plaintext, key_id, sha256). The plaintext is shown once, never stored."""
    key_id = secrets.token_hex(6)
    plaintext = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    return plaintext, key_id, hash_key(plaintext)


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise BeamError(Reason.UNAUTHENTICATED, "missing Authorization: Bearer <key>")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise BeamError(Reason.UNAUTHENTICATED, "Authorization must be 'Bearer <key>'")
    return token.strip()


class Authenticator:
    def __init__(
        self,
        postgres: PostgresStore,
        *,
        dev_mode: bool,
        max_age_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._postgres = postgres
        self._dev_mode = dev_mode
        self._keys: Snapshot[dict[str, ApiKeyRecord]] = Snapshot(
            "API keys", self._load, {}, max_age_seconds
        )
        self._clock = clock
        self._misses: dict[str, float] = {}
        self._lookups = TokenBucket(MISS_LOOKUPS_PER_SECOND, MISS_LOOKUP_BURST, clock)
        self._dev_key_hash = hash_key(DEV_API_KEY)
        # The Principal of each key digest served from the current copy: built once, not
        # per call. Cleared whenever the copy is replaced, so a revocation (NOTIFY) or an
        # expiry (checked per call) takes effect as before.
        self._principals: dict[str, tuple[Principal, ApiKeyRecord]] = {}
        self._principals_of: dict[str, ApiKeyRecord] | None = None

    async def _load(self) -> dict[str, ApiKeyRecord]:
        records = await self._postgres.load_api_keys()
        self._misses.clear()
        return {r.key_hash: r for r in records}

    async def reload(self) -> None:
        await self._keys.reload()

    def invalidate(self) -> None:
        self._keys.invalidate()

    async def authenticate(self, authorization: str | None) -> Principal:
        key = bearer_token(authorization)
        digest = hash_key(key)
        if digest == self._dev_key_hash and not self._dev_mode:
            raise BeamError(Reason.UNAUTHENTICATED, "the dev key is refused outside dev mode")
        keys = await self._keys.get()
        if keys is not self._principals_of:  # reloaded (NOTIFY, max age): forget them all
            self._principals.clear()
            self._principals_of = keys
        known = self._principals.get(digest)
        if known is not None:
            principal, cached = known
            if cached.revoked_at is None and cached.expires_at is None:
                return principal
            if _usable(cached):
                return principal
            raise _unusable()
        record = keys.get(digest) or await self._lookup_miss(digest)
        if record is None or not _usable(record):
            raise _unusable()
        principal = Principal(record.tenant, record.role, record.key_id, record.customers)
        if keys.get(digest) is record:  # bounded: one per key in the copy
            self._principals[digest] = (principal, record)
        return principal

    async def _lookup_miss(self, digest: str) -> ApiKeyRecord | None:
        now = self._clock()
        if now - self._misses.get(digest, -1e9) < _NEGATIVE_CACHE_SECONDS:
            return None
        if not self._lookups.take():
            AUTH_LOOKUPS_SHED.inc()
            return None
        record = await self._postgres.get_api_key(digest)
        if record is None:
            if len(self._misses) >= _NEGATIVE_CACHE_MAX:
                self._misses.clear()
            self._misses[digest] = now
            return None
        self._keys.value[digest] = record
        return record


def _unusable() -> BeamError:
    return BeamError(Reason.UNAUTHENTICATED, "invalid, expired or revoked API key")


class TokenBucket:
    """``rate`` takes per second on average, at most ``burst`` at once (starts full)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


def _usable(record: ApiKeyRecord) -> bool:
    now = datetime.now(UTC)
    if record.revoked_at is not None and record.revoked_at <= now:
        return False
    return record.expires_at is None or record.expires_at > now


class RequestTokens:
    """``v1.<nonce>.<mac>``: HMAC-SHA256 over tenant, customer, request id and nonce."""

    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()

    @staticmethod
    def new_nonce() -> str:
        return secrets.token_urlsafe(12)

    def issue(self, tenant: str, customer_id: str, request_id: str, nonce: str) -> str:
        return f"v1.{nonce}.{self._mac(tenant, customer_id, request_id, nonce)}"

    def verify(self, token: str, tenant: str, customer_id: str, request_id: str) -> str:
        """The token's nonce, or INVALID_REQUEST_TOKEN."""
        # Tokens are ASCII. Anything else (non-ASCII, an unpaired surrogate from JSON) is
        # refused here: compare_digest raises TypeError on non-ASCII str, encode() on a
        # surrogate. The MAC is compared as bytes.
        if not token.isascii():
            raise _invalid_token()
        version, _, rest = token.partition(".")
        nonce, _, mac = rest.partition(".")
        expected = self._mac(tenant, customer_id, request_id, nonce)
        if version != "v1" or not nonce or not hmac.compare_digest(mac.encode(), expected.encode()):
            raise _invalid_token()
        return nonce

    def _mac(self, *parts: str) -> str:
        message = "\x1f".join(_escape(parts)).encode()
        digest = hmac.new(self._secret, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:24]).decode().rstrip("=")


def _invalid_token() -> BeamError:
    return BeamError(
        Reason.INVALID_REQUEST_TOKEN,
        "request_token does not match this customer and request",
        field="request_token",
    )


def _escape(parts: Iterable[str]) -> list[str]:
    return [p.replace("\x1f", "") for p in parts]
