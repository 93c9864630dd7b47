"""PostgreSQL: the durable, append-only ledger (asyncpg).

Every money movement is one transaction that locks the customer row (``FOR UPDATE``),
checks its idempotency key, appends a ledger row and moves the cached balance together
with ``balance_version``. Row locks serialize writers per customer, so the version is a
gap-free sequence: entry N of a customer has balance_version N. Nothing here UPDATEs or
DELETEs a ledger row (a trigger refuses it); corrections are new entries.

Two pools. ``pool`` carries every money movement (settlements, credits, debits, the
reaper) and the look-ups those make on their way (settled ids, API keys, prices).
``read_pool`` (``BEAM_DATABASE_READ_POOL_MAX``, small) carries the read-only paths that
settle nothing: usage analytics, ListCustomers, GetCustomer, VerifyIntegrity, request
history. However many of those run, or however slow they are, they queue for their own
connections (``read_connection``) and never for the ones a FinalizeRequest needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Final, TypeVar

import asyncpg

from beam.adapters.batching import Batcher
from beam.adapters.migrations import migrate
from beam.config import StoreSettings
from beam.errors import BeamError, Reason
from beam.observability import STORE_LATENCY
from beam.records import (
    ApiKeyRecord,
    Customer,
    CustomerState,
    EntryType,
    LedgerEntry,
    PriceRecord,
    RecordedSettlement,
    RecordOutcome,
    Role,
    SettleFence,
    Settlement,
    SettlementStatus,
)

_CUSTOMER_COLUMNS = """tenant, customer_id, display_name, platform_user_id,
    current_balance_grains, balance_version, lifetime_spent_grains, overage_grains,
    buffer_strategy, hold_ttl_seconds, max_request_grains, low_balance_threshold_grains,
    state, created_at, owner"""

_REQUEST_COLUMNS = """tenant, customer_id, request_id, status, model, estimated_cost_grains,
    reserved_grains, consumed_grains, actual_cost_grains, refunded_grains, overage_grains,
    prompt_tokens, completion_tokens, cached_prompt_tokens, balance_after_grains,
    balance_version, created_at, completed_at, hold_nonce, let_through"""


def _customer(row: asyncpg.Record) -> Customer:
    return Customer(
        tenant=row["tenant"],
        customer_id=row["customer_id"],
        display_name=row["display_name"],
        platform_user_id=row["platform_user_id"],
        balance_grains=row["current_balance_grains"],
        balance_version=row["balance_version"],
        lifetime_spent_grains=row["lifetime_spent_grains"],
        overage_grains=row["overage_grains"],
        buffer_strategy=row["buffer_strategy"],
        hold_ttl_seconds=row["hold_ttl_seconds"],
        max_request_grains=row["max_request_grains"],
        low_balance_threshold_grains=row["low_balance_threshold_grains"],
        state=CustomerState(row["state"]),
        created_at=row["created_at"],
        owner=row["owner"],
    )


def _settlement(row: Mapping[str, Any], *, replayed: bool) -> Settlement:
    return Settlement(
        tenant=row["tenant"],
        customer_id=row["customer_id"],
        request_id=row["request_id"],
        status=SettlementStatus(row["status"]),
        model=row["model"],
        estimated_grains=row["estimated_cost_grains"],
        reserved_grains=row["reserved_grains"],
        consumed_grains=row["consumed_grains"],
        charged_grains=row["actual_cost_grains"],
        refunded_grains=row["refunded_grains"],
        overage_grains=row["overage_grains"],
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        cached_prompt_tokens=row["cached_prompt_tokens"],
        balance_after_grains=row["balance_after_grains"],
        balance_version=row["balance_version"],
        created_at=row["created_at"],
        completed_at=row["completed_at"],
        replayed=replayed,
        hold_nonce=row["hold_nonce"],
        let_through=row["let_through"],
    )


# "PostgreSQL cannot be reached now": refused or dropped connections (asyncpg reports a
# connection closed under it as InterfaceError), a server shutting down or starting up, a
# connect or pool timeout. Anything else is a bug and stays loud.
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
)
_T = TypeVar("_T")

# How long a read path waits for a connection of the read pool before it answers
# STORE_UNAVAILABLE (retry later): a burst of analytics queues, but not without end.
READ_WAIT_SECONDS: Final = 10.0


@contextlib.asynccontextmanager
async def read_connection(
    pool: asyncpg.Pool, wait_seconds: float = READ_WAIT_SECONDS
) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the read pool, waited for at most ``wait_seconds``.

    asyncpg would wait for a free connection without end, so a flood of slow analytics
    would pile up callers; past the wait the read is refused as STORE_UNAVAILABLE (which
    clients retry with back-off) and names the setting that sizes the pool."""
    try:
        conn = await pool.acquire(timeout=wait_seconds)
    except TimeoutError:
        raise BeamError(
            Reason.STORE_UNAVAILABLE,
            f"no read connection within {wait_seconds:g} s: all "
            f"{pool.get_max_size()} (BEAM_DATABASE_READ_POOL_MAX) are busy with other reads, "
            "or PostgreSQL is slow to answer; retry later",
        ) from None
    try:
        yield conn
    finally:
        await pool.release(conn)


@contextlib.contextmanager
def _unavailable_as_store_error() -> Iterator[None]:
    try:
        yield
    except _UNAVAILABLE as error:
        raise BeamError(
            Reason.STORE_UNAVAILABLE, f"postgresql unavailable: {type(error).__name__}"
        ) from error


def _translate_unavailable(cls: type[_T]) -> type[_T]:
    """Every public coroutine method answers STORE_UNAVAILABLE (like ``RedisStore``) when
    PostgreSQL cannot be reached, instead of leaking asyncpg's errors as INTERNAL."""
    for name, member in list(vars(cls).items()):
        if name.startswith("_") or not inspect.iscoroutinefunction(member):
            continue

        def bind(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            @functools.wraps(method)
            async def call(*args: Any, **kwargs: Any) -> Any:
                with _unavailable_as_store_error():
                    return await method(*args, **kwargs)

            return call

        setattr(cls, name, bind(member))
    return cls


@_translate_unavailable
class PostgresStore:
    def __init__(
        self,
        pool: asyncpg.Pool,
        read_pool: asyncpg.Pool | None = None,
        *,
        settle_batch_size: int = 64,
        read_wait_seconds: float = READ_WAIT_SECONDS,
    ) -> None:
        """``read_pool``: the read-only paths' own pool (see the module's docstring); None
        shares ``pool`` (a tool that opens one pool, never the service)."""
        self.pool = pool
        self.read_pool = pool if read_pool is None else read_pool
        self.read_wait_seconds = read_wait_seconds
        self._listening: dict[asyncpg.Connection, tuple[list[str], Any]] = {}
        # At most a quarter of the pool settles at once: the rest stays for the look-ups of
        # Checks, credits, debits and the reaper, even while one hot customer's settlements
        # queue up. (Analytics and admin reads have a pool of their own, read_pool.)
        self._settlements: Batcher[dict[str, Any], RecordedSettlement] = Batcher(
            self._settle_batch,
            max_items=settle_batch_size,
            max_in_flight=max(1, pool.get_max_size() // 4),
        )
        self._lookups: Batcher[tuple[str, str, str], str | None] = Batcher(
            self._settled_nonces, max_items=256, max_in_flight=max(1, pool.get_max_size() // 4)
        )

    @classmethod
    async def connect(cls, settings: StoreSettings) -> PostgresStore:
        """Both pools, to the same database and with the same connection settings (so the
        read pool goes through PgBouncer exactly as the settlement pool does, statement
        cache included). The read pool opens its connections on demand: a process that
        never reads (the migration Job) holds none."""
        pool = await _create_pool(
            settings, min_size=settings.database_pool_min, max_size=settings.database_pool_max
        )
        try:
            read_pool = await _create_pool(
                settings, min_size=0, max_size=settings.database_read_pool_max
            )
        except BaseException:
            pool.terminate()
            raise
        return cls(pool, read_pool)

    async def close(self, timeout_seconds: float = 10.0) -> None:
        await self._settlements.close(timeout_seconds)
        await self._lookups.close(timeout_seconds)
        pools = {self.pool, self.read_pool}  # one, when reads share the pool
        await asyncio.gather(*(_close_pool(pool, timeout_seconds) for pool in pools))

    def _reading(self) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]:
        """A connection for a read-only path: from the read pool, waited for at most
        ``read_wait_seconds`` (``read_connection``). Never for a money path."""
        return read_connection(self.read_pool, self.read_wait_seconds)

    async def migrate(self) -> list[str]:
        async with self.pool.acquire() as conn:
            return await migrate(conn)

    async def ping(self) -> bool:
        try:
            async with self.pool.acquire(timeout=2) as conn:
                return bool(await conn.fetchval("SELECT 1"))
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return False

    # -- customers ---------------------------------------------------------------------

    async def get_customer(self, tenant: str, customer_id: str) -> Customer | None:
        """A read path (GetCustomer, usage, request history): the read pool. The money
        paths read the customer under its row lock instead (``customer_locked``)."""
        async with self._reading() as conn:
            row = await conn.fetchrow(
                f"""SELECT {_CUSTOMER_COLUMNS} FROM customers
                    WHERE tenant = $1 AND customer_id = $2""",
                tenant,
                customer_id,
            )
        return _customer(row) if row else None

    @contextlib.asynccontextmanager
    async def customer_locked(
        self, tenant: str, customer_id: str
    ) -> AsyncIterator[Customer | None]:
        """The customer, its row share-locked until the block ends.

        No ledger entry of this customer can commit meanwhile (they lock the row FOR
        UPDATE), so what the block copies into Redis cannot be older than a balance a
        concurrent settlement or credit has already written there: without the lock, a copy
        read before that commit and written after it would hand spent money back.
        """
        with _unavailable_as_store_error():  # the block's own errors are BeamErrors already
            async with self.pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    f"""SELECT {_CUSTOMER_COLUMNS} FROM customers
                        WHERE tenant = $1 AND customer_id = $2 FOR SHARE""",
                    tenant,
                    customer_id,
                )
                yield _customer(row) if row else None

    async def list_customers(
        self, tenant: str, *, limit: int, after_customer_id: str = ""
    ) -> list[Customer]:
        async with self._reading() as conn:
            rows = await conn.fetch(
                f"""SELECT {_CUSTOMER_COLUMNS} FROM customers
                    WHERE tenant = $1 AND customer_id > $2 ORDER BY customer_id LIMIT $3""",
                tenant,
                after_customer_id,
                limit,
            )
        return [_customer(r) for r in rows]

    async def all_customer_ids(self, tenant: str | None = None) -> list[tuple[str, str]]:
        """Every customer (of ``tenant``): what SyncAll and the resync after Redis lost
        writes walk. On the settlement pool: a resync must never wait behind analytics
        (until it runs, settled holds Redis brought back can stream again)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT tenant, customer_id FROM customers
                   WHERE $1::text IS NULL OR tenant = $1 ORDER BY tenant, customer_id""",
                tenant,
            )
        return [(r["tenant"], r["customer_id"]) for r in rows]

    async def upsert_customer(self, customer: Customer) -> tuple[Customer, bool]:
        """Create or update a customer's configuration (never its money). Returns
        (customer, created). A customer managed by another owner that is not closed is
        CUSTOMER_EXISTS; an unowned or closed one is adopted."""
        row = await self.pool.fetchrow(
            f"""INSERT INTO customers (tenant, customer_id, display_name, platform_user_id,
                    buffer_strategy, hold_ttl_seconds, max_request_grains,
                    low_balance_threshold_grains, state, owner)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                ON CONFLICT (tenant, customer_id) DO UPDATE SET
                    owner = EXCLUDED.owner,
                    display_name = EXCLUDED.display_name,
                    platform_user_id = EXCLUDED.platform_user_id,
                    buffer_strategy = EXCLUDED.buffer_strategy,
                    hold_ttl_seconds = EXCLUDED.hold_ttl_seconds,
                    max_request_grains = EXCLUDED.max_request_grains,
                    low_balance_threshold_grains = EXCLUDED.low_balance_threshold_grains,
                    state = EXCLUDED.state,
                    updated_at = now()
                WHERE customers.owner IN ('', EXCLUDED.owner) OR customers.state = 'closed'
                RETURNING {_CUSTOMER_COLUMNS}, (xmax = 0) AS created""",
            customer.tenant,
            customer.customer_id,
            customer.display_name,
            customer.platform_user_id,
            customer.buffer_strategy,
            customer.hold_ttl_seconds,
            customer.max_request_grains,
            customer.low_balance_threshold_grains,
            customer.state.value,
            customer.owner,
        )
        if row is None:
            raise BeamError(
                Reason.CUSTOMER_EXISTS,
                f"customer {customer.customer_id!r} is managed by another resource; "
                "delete it first or pick another customerId",
                field="spec.customerId",
            )
        return _customer(row), bool(row["created"])

    async def insert_customer(self, customer: Customer) -> bool:
        """Create a customer if absent; returns False when it already existed."""
        status = await self.pool.execute(
            """INSERT INTO customers (tenant, customer_id, display_name, platform_user_id,
                   buffer_strategy, state)
               VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING""",
            customer.tenant,
            customer.customer_id,
            customer.display_name,
            customer.platform_user_id,
            customer.buffer_strategy,
            customer.state.value,
        )
        return bool(status.endswith(" 1"))

    async def set_customer_state(
        self, tenant: str, customer_id: str, state: CustomerState, owner: str | None = None
    ) -> Customer | None:
        """Change the state; with ``owner``, only if that owner manages the customer."""
        row = await self.pool.fetchrow(
            f"""UPDATE customers SET state = $3, updated_at = now()
                WHERE tenant = $1 AND customer_id = $2 AND ($4::text IS NULL OR owner = $4)
                RETURNING {_CUSTOMER_COLUMNS}""",
            tenant,
            customer_id,
            state.value,
            owner,
        )
        return _customer(row) if row else None

    # -- the ledger ----------------------------------------------------------------------

    async def _lock_customer(
        self, conn: asyncpg.Connection, tenant: str, customer_id: str
    ) -> asyncpg.Record:
        row = await conn.fetchrow(
            """SELECT current_balance_grains, balance_version FROM customers
               WHERE tenant = $1 AND customer_id = $2 FOR UPDATE""",
            tenant,
            customer_id,
        )
        if row is None:
            raise BeamError(
                Reason.CUSTOMER_NOT_FOUND,
                f"customer {customer_id!r} not found",
                field="customer_id",
            )
        return row

    async def append_entry(
        self,
        *,
        tenant: str,
        customer_id: str,
        transaction_id: str,
        entry_type: EntryType,
        amount_grains: int,
        description: str = "",
        reference_id: str | None = None,
        fingerprint: str = "",
        fence: SettleFence | None = None,
    ) -> LedgerEntry:
        """Append one credit/debit/adjustment exactly once per transaction id. ``fence``:
        the settling hold that reserves it; refused (STORE_UNAVAILABLE, nothing written) if
        the reaper abandoned that hold meanwhile."""
        with STORE_LATENCY.labels("postgres", "append_entry").time():
            return await self._append_entry(
                tenant, customer_id, transaction_id, entry_type, amount_grains, description,
                reference_id, fingerprint, fence,
            )  # fmt: skip

    async def _append_entry(
        self,
        tenant: str,
        customer_id: str,
        transaction_id: str,
        entry_type: EntryType,
        amount_grains: int,
        description: str,
        reference_id: str | None,
        fingerprint: str,
        fence: SettleFence | None,
    ) -> LedgerEntry:
        async with self.pool.acquire() as conn, conn.transaction():
            account = await self._lock_customer(conn, tenant, customer_id)
            existing = await conn.fetchrow(
                """SELECT customer_id, fingerprint, balance_after_grains, balance_version
                   FROM transactions WHERE tenant = $1 AND transaction_id = $2""",
                tenant,
                transaction_id,
            )
            if existing is not None:
                if existing["fingerprint"] != fingerprint or existing["customer_id"] != customer_id:
                    raise BeamError(
                        Reason.TRANSACTION_ID_CONFLICT,
                        f"transaction_id {transaction_id!r} was used with other parameters",
                        field="transaction_id",
                    )
                return LedgerEntry(
                    transaction_id,
                    existing["balance_after_grains"],
                    existing["balance_version"],
                    replayed=True,
                )
            if fence is not None and await conn.fetchval(
                "SELECT beam_fenced($1, $2, $3, $4, $5)",
                tenant, customer_id, fence.hold_id, fence.nonce, fence.attempt,
            ):  # fmt: skip
                raise BeamError(
                    Reason.STORE_UNAVAILABLE,
                    f"{transaction_id!r} waited past its deadline: nothing was written, retry",
                )
            return await self._append(
                conn, account, (tenant, customer_id, transaction_id, entry_type),
                amount_grains, reference_id, description, fingerprint,
            )  # fmt: skip

    async def _append(
        self,
        conn: asyncpg.Connection,
        account: asyncpg.Record,
        head: tuple[str, str, str, EntryType],
        amount_grains: int,
        reference_id: str | None,
        description: str,
        fingerprint: str,
    ) -> LedgerEntry:
        """Append one entry to a customer locked by this transaction and move its cached
        balance, version, lifetime spend and overage with it (``beam_append_entry``, the
        same SQL that settlements use, so the rules live once)."""
        tenant, customer_id, transaction_id, entry_type = head
        try:
            row = await conn.fetchrow(
                "SELECT balance, version FROM beam_append_entry($1, $2, $3, $4, $5, $6, $7,"
                " $8, $9, $10)",
                tenant, customer_id, transaction_id, entry_type.value, amount_grains,
                reference_id, description, fingerprint, account["current_balance_grains"],
                account["balance_version"],
            )  # fmt: skip
        except asyncpg.PostgresError as error:
            reason = _SQLSTATE_REASONS.get(getattr(error, "sqlstate", "") or "")
            if reason is None:
                raise
            raise BeamError(reason, str(error), field="amount_grains") from None
        assert row is not None
        return LedgerEntry(transaction_id, row["balance"], row["version"], replayed=False)

    # The look-ups below (find_entry, find_settlement, settled_nonce, committed_after_lock)
    # are reads, but of the money paths (Check, Finalize, credits, debits, the reaper): they
    # stay on the settlement pool, never behind analytics.

    async def find_entry(
        self, tenant: str, transaction_id: str, customer_id: str | None = None
    ) -> LedgerEntry | None:
        row = await self.pool.fetchrow(
            """SELECT transaction_id, balance_after_grains, balance_version FROM transactions
               WHERE tenant = $1 AND transaction_id = $2
                 AND ($3::text IS NULL OR customer_id = $3)""",
            tenant,
            transaction_id,
            customer_id,
        )
        if row is None:
            return None
        return LedgerEntry(
            row["transaction_id"], row["balance_after_grains"], row["balance_version"], True
        )

    async def label_let_through(self, tenant: str, customer_id: str, request_id: str) -> None:
        """Label a request settled by its expiry as let through, with its expiry's and its
        adjustment's usage events: a let-through Finalize that came after the reaper charged
        the expired hold (migrations/0008_let_through.sql). A label, never money: no ledger
        entry is touched; idempotent."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """UPDATE requests SET let_through = TRUE
                    WHERE tenant = $1 AND customer_id = $2 AND request_id = $3
                      AND NOT let_through""",
                tenant,
                customer_id,
                request_id,
            )
            await conn.execute(
                """UPDATE usage_events SET let_through = TRUE
                    WHERE tenant = $1 AND customer_id = $2 AND request_id = $3
                      AND transaction_id IN ($4, $5) AND NOT let_through""",
                tenant,
                customer_id,
                request_id,
                f"expiry:{customer_id}:{request_id}",
                f"adjustment:{customer_id}:{request_id}",
            )

    async def find_settlement(
        self, tenant: str, customer_id: str, request_id: str
    ) -> Settlement | None:
        row = await self.pool.fetchrow(
            f"""SELECT {_REQUEST_COLUMNS} FROM requests
                WHERE tenant = $1 AND customer_id = $2 AND request_id = $3""",
            tenant,
            customer_id,
            request_id,
        )
        return _settlement(row, replayed=True) if row else None

    async def settled_nonce(self, tenant: str, customer_id: str, request_id: str) -> str | None:
        """The nonce of the hold that settled this request id; None if it never settled.
        What a Check for a new request id asks the ledger; concurrent Checks share one
        query (natural batching, like settlements)."""
        with (
            STORE_LATENCY.labels("postgres", "settled_nonce").time(),
            _unavailable_as_store_error(),
        ):
            return await self._lookups.submit((tenant, customer_id, request_id))

    async def _settled_nonces(
        self, keys: Sequence[tuple[str, str, str]]
    ) -> list[str | BaseException | None]:
        rows = await self.pool.fetch(
            """SELECT q.i, r.hold_nonce
               FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY
                    AS q(tenant, customer_id, request_id, i)
               JOIN requests r USING (tenant, customer_id, request_id)""",
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
        )
        found: list[str | BaseException | None] = [None] * len(keys)
        for row in rows:
            found[row["i"] - 1] = str(row["hold_nonce"])
        return found

    async def committed_after_lock(
        self,
        tenant: str,
        customer_id: str,
        request_id: str,
        transaction_ids: Sequence[str],
        fence: SettleFence | None = None,
    ) -> tuple[Settlement | None, frozenset[str], Customer | None]:
        """What the ledger holds for a settling hold: its request's settlement ('' for
        none), which of ``transaction_ids`` exist, and the customer, read after
        share-locking the customer row, so any settlement in flight has committed or rolled
        back first. The reaper completes or abandons settling holds from this. ``fence``
        (a hold past its deadline, about to be abandoned): written under the same lock, so
        a commit of that hold either is in what this reads or is refused from now on."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"""SELECT {_CUSTOMER_COLUMNS} FROM customers
                    WHERE tenant = $1 AND customer_id = $2 FOR SHARE""",
                tenant,
                customer_id,
            )
            if row is None:
                return None, frozenset(), None
            if fence is not None:
                await conn.execute(
                    """INSERT INTO settle_fences (tenant, customer_id, hold_id, nonce, attempt)
                       VALUES ($1, $2, $3, $4, $5)
                       ON CONFLICT (tenant, customer_id, hold_id, nonce) DO UPDATE
                       SET attempt = GREATEST(settle_fences.attempt, EXCLUDED.attempt),
                           fenced_at = now()""",
                    tenant, customer_id, fence.hold_id, fence.nonce, fence.attempt,
                )  # fmt: skip
            request = await conn.fetchrow(
                f"""SELECT {_REQUEST_COLUMNS} FROM requests
                    WHERE tenant = $1 AND customer_id = $2 AND request_id = $3""",
                tenant,
                customer_id,
                request_id,
            )
            found = await conn.fetch(
                """SELECT transaction_id FROM transactions
                   WHERE tenant = $1 AND customer_id = $2 AND transaction_id = ANY($3::text[])""",
                tenant,
                customer_id,
                list(transaction_ids),
            )
        return (
            _settlement(request, replayed=True) if request else None,
            frozenset(r["transaction_id"] for r in found),
            _customer(row),
        )

    async def record_settlement(
        self,
        s: Settlement,
        created_at: datetime | None,
        *,
        charge_other_hold: bool = True,
        fence: SettleFence | None = None,
        claim: bool = False,
    ) -> RecordedSettlement:
        """Charge a settled request exactly once. A second call for the same hold (same
        nonce) returns the first result. A different hold under an id that is already
        settled is charged on its own (``charge_other_hold``: it consumed real tokens), by
        one entry ``settlement:<customer>:<request>#<nonce>``, and never settles the request
        again. Concurrent calls share one round trip and one commit (group commit,
        ``beam_settle`` in migrations/0004_settle_batch.sql); each is acknowledged only
        after the batch it joined committed, and one bad settlement never fails another.
        ``fence``: the settling hold this commit belongs to; refused (STORE_UNAVAILABLE,
        retry) if the reaper abandoned it meanwhile (migrations/0006_settle_fences.sql).
        ``claim``: Redis had no hold for it; a claim never charges a second hold on top of
        a settlement that names no hold (migrations/0007_claim_second_hold.sql)."""
        item = _settlement_item(s, created_at, charge_other_hold)
        if claim:
            item["claim"] = True
        if fence is not None:
            item["fence"] = {
                "hold_id": fence.hold_id,
                "nonce": fence.nonce,
                "attempt": fence.attempt,
            }
        with (
            STORE_LATENCY.labels("postgres", "record_settlement").time(),
            _unavailable_as_store_error(),
        ):
            return await self._settlements.submit(item)

    async def _settle_batch(
        self, items: Sequence[dict[str, Any]]
    ) -> list[RecordedSettlement | BaseException]:
        batch = [{**item, "i": index} for index, item in enumerate(items)]
        with STORE_LATENCY.labels("postgres", "settle_batch").time():
            async with self.pool.acquire() as conn:
                answer = await conn.fetchval("SELECT beam_settle($1::jsonb)", json.dumps(batch))
        results: list[RecordedSettlement | BaseException] = [
            BeamError(Reason.INTERNAL, "no answer for this settlement")
        ] * len(items)
        for result in json.loads(answer):
            results[int(result["i"])] = _recorded(result)
        return results

    # -- requests ------------------------------------------------------------------------

    async def list_requests(self, tenant: str, customer_id: str, limit: int) -> list[Settlement]:
        async with self._reading() as conn:
            rows = await conn.fetch(
                f"""SELECT {_REQUEST_COLUMNS} FROM requests
                    WHERE tenant = $1 AND customer_id = $2
                    ORDER BY completed_at DESC, request_id LIMIT $3""",
                tenant,
                customer_id,
                limit,
            )
        return [_settlement(r, replayed=True) for r in rows]

    async def get_request(
        self,
        tenant: str,
        request_id: str,
        customer_id: str = "",
        allowed_customers: Sequence[str] = (),
    ) -> Settlement | None:
        """The newest settlement of ``request_id`` in the tenant, among ``allowed_customers``
        when the caller's key has an allow-list (filtered before LIMIT, so a visible
        settlement is never hidden behind an invisible one)."""
        async with self._reading() as conn:
            row = await conn.fetchrow(
                f"""SELECT {_REQUEST_COLUMNS} FROM requests
                    WHERE tenant = $1 AND request_id = $2 AND ($3 = '' OR customer_id = $3)
                      AND (cardinality($4::text[]) = 0 OR customer_id = ANY($4::text[]))
                    ORDER BY completed_at DESC LIMIT 1""",
                tenant,
                request_id,
                customer_id,
                list(allowed_customers),
            )
        return _settlement(row, replayed=True) if row else None

    # -- integrity -------------------------------------------------------------------------

    async def ledger_summary(
        self, tenant: str, customer_ids: Sequence[str]
    ) -> list[dict[str, Any]]:
        """Every listed customer's ledger sums (VerifyIntegrity): over a whole tenant, the
        heaviest read Beam makes, so the read pool."""
        async with self._reading() as conn:
            rows = await conn.fetch(
                """SELECT c.customer_id, c.current_balance_grains, c.balance_version,
                          COALESCE(SUM(t.amount_grains), 0)::bigint AS ledger_sum,
                          COUNT(t.id)::bigint AS entries,
                          COALESCE(MAX(t.balance_version), 0)::bigint AS last_version
                   FROM customers c
                   LEFT JOIN transactions t
                     ON t.tenant = c.tenant AND t.customer_id = c.customer_id
                   WHERE c.tenant = $1 AND c.customer_id = ANY($2::text[])
                   GROUP BY c.customer_id, c.current_balance_grains, c.balance_version
                   ORDER BY c.customer_id""",
                tenant,
                list(customer_ids),
            )
        return [dict(r) for r in rows]

    # -- process-wide state ----------------------------------------------------------------

    async def get_state(self, name: str) -> str | None:
        value = await self.pool.fetchval("SELECT value FROM beam_state WHERE name = $1", name)
        return None if value is None else str(value)

    async def set_state(self, name: str, value: str) -> None:
        await self.pool.execute(
            """INSERT INTO beam_state (name, value) VALUES ($1, $2)
               ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, updated_at = now()""",
            name,
            value,
        )

    # -- API keys ------------------------------------------------------------------------

    async def load_api_keys(self) -> list[ApiKeyRecord]:
        rows = await self.pool.fetch(
            """SELECT key_hash, key_id, tenant, role, name, customers, expires_at, revoked_at
               FROM api_keys WHERE revoked_at IS NULL OR revoked_at > now()"""
        )
        return [_api_key(r) for r in rows]

    async def get_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        row = await self.pool.fetchrow(
            """SELECT key_hash, key_id, tenant, role, name, customers, expires_at, revoked_at
               FROM api_keys WHERE key_hash = $1""",
            key_hash,
        )
        return _api_key(row) if row else None

    async def upsert_api_key(self, key: ApiKeyRecord) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """INSERT INTO api_keys (key_hash, key_id, tenant, name, role, customers,
                       expires_at, revoked_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                   ON CONFLICT (key_hash) DO UPDATE SET role = EXCLUDED.role,
                       customers = EXCLUDED.customers, expires_at = EXCLUDED.expires_at,
                       revoked_at = EXCLUDED.revoked_at, name = EXCLUDED.name""",
                key.key_hash,
                key.key_id,
                key.tenant,
                key.name,
                key.role.value,
                sorted(key.customers),
                key.expires_at,
                key.revoked_at,
            )
            await conn.execute("SELECT pg_notify('beam_api_keys', $1)", key.key_id)

    async def api_keys_named(self, tenant: str, name: str) -> list[ApiKeyRecord]:
        rows = await self.pool.fetch(
            """SELECT key_hash, key_id, tenant, role, name, customers, expires_at, revoked_at
               FROM api_keys WHERE tenant = $1 AND name = $2 ORDER BY created_at""",
            tenant,
            name,
        )
        return [_api_key(r) for r in rows]

    async def api_keys_of(self, tenant: str, resource: str) -> list[ApiKeyRecord]:
        """Every key of one BeamApiKey, of every generation: the keys of the tenant named
        ``<resource>#<digits>`` (exactly: ``api`` does not match ``api-2#0``), in one query."""
        prefix = f"{resource}#"
        rows = await self.pool.fetch(
            """SELECT key_hash, key_id, tenant, role, name, customers, expires_at, revoked_at
               FROM api_keys
               WHERE tenant = $1 AND left(name, length($2)) = $2
                 AND substr(name, length($2) + 1) ~ '^[0-9]+$'
               ORDER BY created_at""",
            tenant,
            prefix,
        )
        return [_api_key(r) for r in rows]

    async def revoke_api_keys(self, revoked_at: dict[str, datetime]) -> int:
        """Revoke many keys (key hash -> moment) in one statement and one NOTIFY. A key's
        ``revoked_at`` only ever moves earlier: a key already revoked sooner keeps its moment
        (an ended grace period is never extended). Returns how many keys changed."""
        if not revoked_at:
            return 0
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """UPDATE api_keys AS k SET revoked_at = r.revoked_at
                   FROM unnest($1::text[], $2::timestamptz[]) AS r(key_hash, revoked_at)
                   WHERE k.key_hash = r.key_hash
                     AND (k.revoked_at IS NULL OR k.revoked_at > r.revoked_at)
                   RETURNING k.key_id""",
                list(revoked_at),
                list(revoked_at.values()),
            )
            if rows:
                await conn.execute("SELECT pg_notify('beam_api_keys', $1)", rows[0]["key_id"])
        return len(rows)

    # -- prices --------------------------------------------------------------------------

    async def load_prices(self) -> list[PriceRecord]:
        rows = await self.pool.fetch(
            """SELECT DISTINCT ON (tenant, model) tenant, model, version,
                      input_grains_per_million, output_grains_per_million,
                      cached_input_grains_per_million, effective_from, source
               FROM model_prices WHERE effective_from <= now()
               ORDER BY tenant, model, effective_from DESC, version DESC"""
        )
        return [_price(r) for r in rows]

    async def save_prices(self, tenant: str, entries: Sequence[PriceRecord], source: str) -> int:
        """Record a new version for every model whose price differs from its latest one.
        All or nothing; returns how many models got a new version."""
        changed = 0
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"prices:{tenant}")
            for entry in entries:
                latest = await conn.fetchrow(
                    """SELECT version, input_grains_per_million, output_grains_per_million,
                              cached_input_grains_per_million, effective_from
                       FROM model_prices WHERE tenant = $1 AND model = $2
                       ORDER BY version DESC LIMIT 1""",
                    tenant,
                    entry.model,
                )
                same = latest is not None and (
                    latest["input_grains_per_million"],
                    latest["output_grains_per_million"],
                    latest["cached_input_grains_per_million"],
                    latest["effective_from"],
                ) == (
                    entry.input_grains_per_million,
                    entry.output_grains_per_million,
                    entry.cached_input_grains_per_million,
                    entry.effective_from,
                )
                if same:
                    continue
                await conn.execute(
                    """INSERT INTO model_prices (tenant, model, version,
                           input_grains_per_million, output_grains_per_million,
                           cached_input_grains_per_million, effective_from, source)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
                    tenant,
                    entry.model,
                    (latest["version"] + 1) if latest else 1,
                    entry.input_grains_per_million,
                    entry.output_grains_per_million,
                    entry.cached_input_grains_per_million,
                    entry.effective_from,
                    source,
                )
                changed += 1
            if changed:
                await conn.execute("SELECT pg_notify('beam_model_prices', $1)", tenant)
        return changed

    # -- notifications -------------------------------------------------------------------

    async def listen(
        self, channels: Sequence[str], callback: Callable[[str, str], Awaitable[None] | None]
    ) -> asyncpg.Connection:
        """A dedicated connection delivering NOTIFY payloads to ``callback(channel, payload)``."""
        conn: asyncpg.Connection = await self.pool.acquire()

        def deliver(_c: Any, _pid: int, channel: str, payload: str) -> None:
            callback(channel, payload)

        for channel in channels:
            await conn.add_listener(channel, deliver)
        self._listening[conn] = (list(channels), deliver)
        return conn

    async def release(self, conn: asyncpg.Connection) -> None:
        channels, deliver = self._listening.pop(conn, ([], None))
        try:
            for channel in channels:  # drop listeners before the pool reuses the connection
                await conn.remove_listener(channel, deliver)
        finally:
            await self.pool.release(conn)


_SQLSTATE_REASONS = {
    "BL001": Reason.BALANCE_LIMIT_EXCEEDED,
    "BL002": Reason.OUT_OF_RANGE,
    "BL003": Reason.CUSTOMER_NOT_FOUND,
    # A commit that waited past its hold's deadline (fenced): nothing written, retry.
    "BL004": Reason.STORE_UNAVAILABLE,
}


async def _create_pool(settings: StoreSettings, *, min_size: int, max_size: int) -> asyncpg.Pool:
    """One pool to BEAM_DATABASE_URL. Both pools are made here, so a connection setting
    (the statement cache a transaction-mode PgBouncer needs off, the command timeout) can
    never differ between them."""
    return await asyncpg.create_pool(
        settings.database_url.get_secret_value(),
        min_size=min_size,
        max_size=max_size,
        command_timeout=30,
        statement_cache_size=settings.database_statement_cache_size,
    )


async def _close_pool(pool: asyncpg.Pool, timeout_seconds: float) -> None:
    """Close gracefully (connections finish their queries), or cut them past the timeout."""
    try:
        await asyncio.wait_for(pool.close(), timeout_seconds)
    except TimeoutError:
        pool.terminate()


def _settlement_item(
    s: Settlement, created_at: datetime | None, charge_other_hold: bool
) -> dict[str, Any]:
    return {
        "tenant": s.tenant, "customer_id": s.customer_id, "request_id": s.request_id,
        "status": s.status.value, "model": s.model, "estimated_grains": s.estimated_grains,
        "reserved_grains": s.reserved_grains, "consumed_grains": s.consumed_grains,
        "charged_grains": s.charged_grains, "refunded_grains": s.refunded_grains,
        "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
        "cached_prompt_tokens": s.cached_prompt_tokens, "hold_nonce": s.hold_nonce,
        "created_at_ms": int(created_at.timestamp() * 1000) if created_at else None,
        "charge_other_hold": charge_other_hold, "let_through": s.let_through,
    }  # fmt: skip


def _recorded(result: dict[str, Any]) -> RecordedSettlement | BeamError:
    """One item of beam_settle's answer."""
    if "error" in result:
        reason = _SQLSTATE_REASONS.get(result["error"], Reason.INTERNAL)
        field = "customer_id" if reason is Reason.CUSTOMER_NOT_FOUND else None
        return BeamError(reason, str(result["message"]), field=field)
    row = result["row"]
    for name in ("created_at", "completed_at"):
        row[name] = datetime.fromisoformat(row[name])
    outcome = RecordOutcome(result["outcome"])
    settlement = _settlement(row, replayed=outcome is not RecordOutcome.NEW)
    orphan = result.get("orphan")
    if not orphan:
        return RecordedSettlement(settlement, outcome)
    entry = LedgerEntry(
        orphan["transaction_id"],
        int(orphan["balance_after_grains"]),
        int(orphan["balance_version"]),
        bool(orphan["replayed"]),
    )
    return RecordedSettlement(settlement, outcome, entry)


def _api_key(row: asyncpg.Record) -> ApiKeyRecord:
    return ApiKeyRecord(
        key_hash=row["key_hash"],
        key_id=row["key_id"],
        tenant=row["tenant"],
        role=Role(row["role"]),
        name=row["name"],
        customers=frozenset(row["customers"] or ()),
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
    )


def _price(row: asyncpg.Record) -> PriceRecord:
    return PriceRecord(
        tenant=row["tenant"],
        model=row["model"],
        version=row["version"],
        input_grains_per_million=row["input_grains_per_million"],
        output_grains_per_million=row["output_grains_per_million"],
        cached_input_grains_per_million=row["cached_input_grains_per_million"],
        effective_from=row["effective_from"],
        source=row["source"],
    )
