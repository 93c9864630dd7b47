"""Customers, credits and debits, request history, integrity and sync.

Credits go to PostgreSQL first, then Redis adopts the new balance by version (a credit cut
short after its commit leaves Redis *below* the ledger, never above, until the customer's
next movement or a sync). A debit takes money a customer could otherwise spend, so it goes
through a hold like a request: the hold opens *settling* under an id no client can name
(``#debit:<transaction id>``), only if the available balance covers it; the debit commits
to the ledger; then the hold is released while the new balance is adopted. A debit whose
commit is refused voids its hold; one cut short after its commit is finished by the caller's
shielded task or, after a crash, by the reaper from the ledger.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

from beam.adapters.postgres_store import PostgresStore
from beam.adapters.scripts import AccountNotLoaded, Scripts
from beam.constants import (
    CREDIT_HOLD_PREFIX,
    DEBIT_HOLD_PREFIX,
    EXPIRE_BATCH_PER_CALL,
    MAX_GRAINS,
    MAX_NAME_LENGTH,
    MAX_OPEN_HOLDS_PER_CUSTOMER,
    MULTIPLIER_SCALE,
    SETTLE_DEADLINE_MS,
    SYSTEM_HOLD_PREFIX,
)
from beam.core import faults
from beam.core.auth import Action, Principal, customer_not_found
from beam.core.commands import (
    REQUEST_ID_PATTERN,
    LedgerCommand,
    require_id,
    require_range,
    require_text,
    validate_client_transaction_id,
    validate_ledger_command,
    validate_strategy,
)
from beam.core.faults import now_ms
from beam.core.ledger import Ledger, fingerprint, second_hold_entry_id
from beam.errors import BeamError, Reason
from beam.records import (
    Customer,
    CustomerState,
    EntryType,
    LedgerEntry,
    SettleFence,
    Settlement,
)


@dataclass(frozen=True, slots=True)
class EntryResult:
    transaction_id: str
    balance: int
    available: int
    replayed: bool


@dataclass(frozen=True, slots=True)
class CustomerView:
    customer: Customer
    reserved: int

    @property
    def available(self) -> int:
        return self.customer.balance_grains - self.reserved


@dataclass(slots=True)
class CustomerIntegrity:
    customer_id: str
    ledger_sum_grains: int = 0
    postgres_balance: int = 0
    redis_balance: int = 0
    redis_held: int = 0
    open_holds_sum: int = 0
    problems: list[str] = field(default_factory=list)
    # The holds kept changing through every stepwise scan (Scripts.audit_account): held was
    # not compared with them. Not a problem: verify again later.
    held_unverified: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


class Admin:
    def __init__(self, ledger: Ledger, scripts: Scripts, postgres: PostgresStore) -> None:
        self.ledger = ledger
        self.scripts = scripts
        self.postgres = postgres
        # One VerifyIntegrity at a time per tenant in this process (any role may call it,
        # and it reads every hold of the customers it checks): a tenant looping it in
        # parallel queues behind itself instead of multiplying the Redis work.
        self._verifying: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    # -- customers -----------------------------------------------------------------------

    async def create_customer(
        self,
        principal: Principal,
        customer: Customer,
        initial_balance_grains: int = 0,
    ) -> CustomerView:
        principal.require(Action.ADMIN)
        require_id(customer.customer_id, "customer_id")
        principal.require_customer(customer.customer_id)
        validate_strategy(customer.buffer_strategy)
        require_text(customer.display_name, "display_name", MAX_NAME_LENGTH)
        require_text(customer.platform_user_id, "platform_user_id", MAX_NAME_LENGTH)
        # Validated here, not by the opening credit: nothing is written for a bad amount.
        require_range(initial_balance_grains, "initial_balance_grains", 0, MAX_GRAINS)
        customer = _with_tenant(customer, principal.tenant)
        created = await self.postgres.insert_customer(customer)
        if not created:
            existing = await self.postgres.get_customer(principal.tenant, customer.customer_id)
            assert existing is not None
            if (existing.display_name, existing.platform_user_id) != (
                customer.display_name,
                customer.platform_user_id,
            ):
                raise BeamError(
                    Reason.CUSTOMER_EXISTS,
                    f"customer {customer.customer_id!r} already exists",
                    field="customer_id",
                )
        # The opening entry is written even for 0, so that a retry asking for another
        # opening balance is refused (TRANSACTION_ID_CONFLICT: same id, other amount)
        # instead of crediting, or silently answering the existing customer.
        opening = LedgerCommand(
            customer.customer_id,
            initial_balance_grains,
            "opening balance",
            f"open:{customer.customer_id}",
        )
        if initial_balance_grains:
            await self.credit(principal, opening, system=True)
        else:
            await self.postgres.append_entry(
                tenant=principal.tenant,
                customer_id=customer.customer_id,
                transaction_id=opening.transaction_id,
                entry_type=EntryType.CREDIT,
                amount_grains=0,
                description=opening.description,
                fingerprint=fingerprint("credit", customer.customer_id, 0),
            )
        return await self.get_customer(principal, customer.customer_id)

    async def get_customer(self, principal: Principal, customer_id: str) -> CustomerView:
        principal.require(Action.READ)
        require_id(customer_id, "customer_id")
        principal.require_customer(customer_id)
        customer = await self.postgres.get_customer(principal.tenant, customer_id)
        if customer is None:
            raise customer_not_found(customer_id)
        balance = await self.ledger.balance(principal, customer_id)
        return CustomerView(_with_balance(customer, balance.balance), balance.reserved)

    async def list_customers(
        self, principal: Principal, limit: int, after_customer_id: str = ""
    ) -> list[CustomerView]:
        principal.require(Action.READ)
        if after_customer_id:
            require_id(after_customer_id, "after_customer_id")
        customers = await self.postgres.list_customers(
            principal.tenant, limit=limit, after_customer_id=after_customer_id
        )
        views = []
        for customer in customers:
            if principal.can_see(customer.customer_id):
                balance = await self.ledger.balance(principal, customer.customer_id)
                views.append(
                    CustomerView(_with_balance(customer, balance.balance), balance.reserved)
                )
        return views

    # -- credits and debits ----------------------------------------------------------------

    async def credit(
        self, principal: Principal, command: LedgerCommand, *, system: bool = False
    ) -> EntryResult:
        """``system``: Beam's own ids (``open:``, the operator's ``crd:``) are allowed."""
        principal.require(Action.ADMIN)
        validate_ledger_command(command)
        if not system:
            validate_client_transaction_id(command.transaction_id)
        principal.require_customer(command.customer_id)
        transaction_id = command.transaction_id or f"credit:{uuid.uuid4().hex}"
        # Runs to the end even if the caller goes away (see Ledger.finish).
        return await self.ledger.finish(self._credit(principal.tenant, command, transaction_id))

    async def _credit(
        self, tenant: str, command: LedgerCommand, transaction_id: str
    ) -> EntryResult:
        customer_id, hold_id = command.customer_id, CREDIT_HOLD_PREFIX + transaction_id
        try:
            nonce = await self.scripts.open_pending(
                tenant,
                customer_id,
                hold_id,
                now_ms=now_ms(),
                nonce=self.ledger.tokens.new_nonce(),
                kind="credit",
                deadline_ms=now_ms() + SETTLE_DEADLINE_MS,
            )
        except AccountNotLoaded:
            nonce = ""  # Redis will load the account from the ledger, credit included
        try:
            entry = await self.postgres.append_entry(
                tenant=tenant,
                customer_id=customer_id,
                transaction_id=transaction_id,
                entry_type=EntryType.CREDIT,
                amount_grains=command.amount_grains,
                description=command.description,
                fingerprint=fingerprint("credit", customer_id, command.amount_grains),
            )
        except BeamError as error:
            if nonce and error.reason is not Reason.STORE_UNAVAILABLE:
                # Refused (another amount under this id, another customer's id, ...). The
                # pending hold may be an earlier attempt's whose credit committed and whose
                # Redis half was cut short (a retry is handed the same hold): release it
                # adopting what this id committed for this customer, never dropping that
                # repair. Nothing committed: a plain void.
                earlier = await self.postgres.find_entry(tenant, transaction_id, customer_id)
                await self.ledger.release(tenant, customer_id, hold_id, nonce, earlier)
            raise
        await faults.point(faults.CREDIT_COMMITTED)
        held = await self.ledger.release(tenant, customer_id, hold_id, nonce, entry)
        return _entry_result(entry, held)

    async def _adopt(self, tenant: str, customer_id: str, entry: LedgerEntry) -> EntryResult:
        held = await self.ledger.adopt_balance(tenant, customer_id, entry)
        return _entry_result(entry, held)

    async def debit(self, principal: Principal, command: LedgerCommand) -> EntryResult:
        principal.require(Action.ADMIN)
        validate_ledger_command(command)
        validate_client_transaction_id(command.transaction_id)
        principal.require_customer(command.customer_id)
        transaction_id = command.transaction_id or f"debit:{uuid.uuid4().hex}"
        # Runs to the end even if the caller goes away (see Ledger.finish).
        return await self.ledger.finish(self._debit(principal.tenant, command, transaction_id))

    async def _debit(self, tenant: str, command: LedgerCommand, transaction_id: str) -> EntryResult:
        customer_id = command.customer_id
        digest = fingerprint("debit", customer_id, command.amount_grains)
        if await self.postgres.find_entry(tenant, transaction_id) is not None:
            # A retry of a committed debit: the ledger answers (or refuses a conflict).
            entry = await self._append_debit(tenant, command, transaction_id, digest)
            return await self._adopt(tenant, customer_id, entry)
        hold_id = DEBIT_HOLD_PREFIX + transaction_id
        opened = await self.ledger.loaded(
            tenant,
            customer_id,
            lambda: self.scripts.open_hold(
                tenant,
                customer_id,
                hold_id,
                now_ms=now_ms(),
                estimated_grains=command.amount_grains,
                multiplier_ppm=MULTIPLIER_SCALE,
                fingerprint=digest,
                nonce=self.ledger.tokens.new_nonce(),
                prices=None,
                default_ttl_ms=SETTLE_DEADLINE_MS,
                max_open_holds=MAX_OPEN_HOLDS_PER_CUSTOMER,
                expire_batch=EXPIRE_BATCH_PER_CALL,
                kind="debit",
                settle_deadline_ms=SETTLE_DEADLINE_MS,
            ),
        )
        if opened.outcome == "REJECT":
            raise BeamError(
                Reason[opened.reason] if opened.reason in Reason.__members__ else Reason.INTERNAL,
                f"cannot debit {command.amount_grains} grains: {opened.reason} "
                f"(available {opened.available})",
                field="amount_grains",
            )
        if opened.outcome != "OK":
            raise BeamError(
                Reason.TRANSACTION_ID_CONFLICT,
                f"transaction_id {transaction_id!r} was used with other parameters",
                field="transaction_id",
            )
        await faults.point(faults.DEBIT_OPENED)
        return await self._commit_debit(tenant, command, transaction_id, digest, opened.nonce)

    async def _commit_debit(
        self, tenant: str, command: LedgerCommand, transaction_id: str, digest: str, nonce: str
    ) -> EntryResult:
        customer_id, hold_id = command.customer_id, DEBIT_HOLD_PREFIX + transaction_id
        # Attempt 0: the hold was opened for this commit and nothing else settles it.
        fence = SettleFence(hold_id, nonce, 0)
        try:
            entry = await self._append_debit(tenant, command, transaction_id, digest, fence)
        except BeamError as error:
            if error.reason is not Reason.STORE_UNAVAILABLE:
                # Nothing committed by this attempt; adopt what this id did commit (another
                # attempt's, whose Redis half may have been cut short), if anything.
                earlier = await self.postgres.find_entry(tenant, transaction_id, customer_id)
                await self.ledger.release(tenant, customer_id, hold_id, nonce, earlier)
            # Unavailable: the commit may have happened; the hold stays settling and the
            # reaper completes or abandons it from the ledger.
            raise
        await faults.point(faults.DEBIT_COMMITTED)
        held = await self.ledger.release(tenant, customer_id, hold_id, nonce, entry)
        return _entry_result(entry, held)

    async def _append_debit(
        self,
        tenant: str,
        command: LedgerCommand,
        transaction_id: str,
        digest: str,
        fence: SettleFence | None = None,
    ) -> LedgerEntry:
        return await self.postgres.append_entry(
            tenant=tenant,
            customer_id=command.customer_id,
            transaction_id=transaction_id,
            entry_type=EntryType.DEBIT,
            amount_grains=-command.amount_grains,
            description=command.description,
            fingerprint=digest,
            fence=fence,
        )

    # -- requests ----------------------------------------------------------------------------

    async def list_requests(
        self, principal: Principal, customer_id: str, limit: int
    ) -> list[Settlement]:
        principal.require(Action.READ)
        require_id(customer_id, "customer_id")
        principal.require_customer(customer_id)
        # An unknown customer (or another tenant's) is NOT_FOUND, not an empty history.
        if await self.postgres.get_customer(principal.tenant, customer_id) is None:
            raise customer_not_found(customer_id)
        return await self.postgres.list_requests(principal.tenant, customer_id, limit)

    async def get_request(
        self, principal: Principal, request_id: str, customer_id: str = ""
    ) -> Settlement:
        principal.require(Action.READ)
        require_id(request_id, "request_id", REQUEST_ID_PATTERN)
        if customer_id:
            require_id(customer_id, "customer_id")
        found = await self.postgres.get_request(
            principal.tenant, request_id, customer_id, sorted(principal.customers)
        )
        if found is None or not principal.can_see(found.customer_id):
            raise BeamError(
                Reason.REQUEST_NOT_FOUND,
                f"no settled request {request_id!r}",
                field="request_id",
            )
        return found

    # -- integrity and sync ------------------------------------------------------------------

    async def verify_integrity(
        self, principal: Principal, customer_id: str = ""
    ) -> list[CustomerIntegrity]:
        principal.require(Action.READ)
        if customer_id:
            require_id(customer_id, "customer_id")
            principal.require_customer(customer_id)
        async with self._verifying[principal.tenant]:
            return await self._verify_integrity(principal, customer_id)

    async def _verify_integrity(
        self, principal: Principal, customer_id: str
    ) -> list[CustomerIntegrity]:
        if customer_id:
            ids = [customer_id]
        else:
            ids = [
                c for _, c in await self.postgres.all_customer_ids(principal.tenant)
                if principal.can_see(c)
            ]  # fmt: skip
        summaries = await self.postgres.ledger_summary(principal.tenant, ids)
        if customer_id and not summaries:
            raise customer_not_found(customer_id)
        return [await self._audit(principal.tenant, row) for row in summaries]

    async def _audit(self, tenant: str, row: dict[str, Any]) -> CustomerIntegrity:
        report = CustomerIntegrity(
            row["customer_id"], row["ledger_sum"], row["current_balance_grains"]
        )
        if row["ledger_sum"] != row["current_balance_grains"]:
            report.problems.append(
                f"ledger sum {row['ledger_sum']} != cached balance {row['current_balance_grains']}"
            )
        if row["entries"] != row["balance_version"] or row["last_version"] != row["entries"]:
            report.problems.append(
                f"balance_version {row['balance_version']} != ledger entries {row['entries']}"
            )
        audit = await self.scripts.audit_account(tenant, row["customer_id"])
        balance, held, version, holds_sum = (
            audit.balance,
            audit.held,
            audit.version,
            audit.holds_sum,
        )
        report.redis_balance, report.redis_held, report.open_holds_sum = balance, held, holds_sum
        if audit.exists:
            if version != row["balance_version"] or balance != row["current_balance_grains"]:
                report.problems.append(
                    f"redis balance {balance} (version {version}) != postgres "
                    f"{row['current_balance_grains']} (version {row['balance_version']})"
                )
            if holds_sum < 0:
                report.held_unverified, report.open_holds_sum = True, 0
            elif held != holds_sum:
                report.problems.append(f"redis held {held} != sum of open holds {holds_sum}")
        return report

    async def sync(self, principal: Principal) -> tuple[int, int]:
        """Rebuild every account of the caller's tenant from PostgreSQL, keeping holds."""
        principal.require(Action.ADMIN)
        return await self.sync_tenant(principal.tenant)

    async def sync_tenant(self, tenant: str | None) -> tuple[int, int]:
        synced = kept = 0
        for tenant_id, customer_id in await self.postgres.all_customer_ids(tenant):
            if not await self.ledger.reload_account(tenant_id, customer_id, force=True):
                continue
            await self._release_settled_holds(tenant_id, customer_id)
            audit = await self.scripts.audit_account(tenant_id, customer_id)
            synced += 1
            kept += audit.open_count + audit.expiring_count + audit.settling_count
        return synced, kept

    async def _release_settled_holds(self, tenant: str, customer_id: str) -> int:
        """Release holds the ledger has settled: a Redis that lost its last writes brings
        settled holds back, and a settled hold must never stream again."""
        released = 0
        for hold_id, nonce, status, kind in await self.scripts.list_holds(tenant, customer_id):
            if kind != "request" or hold_id.startswith(SYSTEM_HOLD_PREFIX):
                continue
            if status == "settling":
                # A settlement is in flight and this hold reserves its charge until Redis
                # adopts it; only its own process or the reaper (complete_settling, from
                # the ledger) may release it.
                continue
            settled_nonce = await self.postgres.settled_nonce(tenant, customer_id, hold_id)
            if settled_nonce is None:
                continue  # never settled: a live request
            if settled_nonce == nonce:
                settled = await self.postgres.find_settlement(tenant, customer_id, hold_id)
                await self.ledger.release(tenant, customer_id, hold_id, nonce, settled, settled)
                released += 1
                continue
            # A second hold under a settled id: settled on its own if its entry exists.
            orphan = await self.postgres.find_entry(
                tenant, second_hold_entry_id(customer_id, hold_id, nonce), customer_id
            )
            if orphan is not None:
                await self.ledger.release(tenant, customer_id, hold_id, nonce, orphan)
                released += 1
        return released

    async def set_state(
        self, tenant: str, customer_id: str, state: CustomerState, owner: str | None = None
    ) -> None:
        customer = await self.postgres.set_customer_state(tenant, customer_id, state, owner)
        if customer is not None:
            await self.ledger.load_account(customer)


def _entry_result(entry: LedgerEntry, held: int) -> EntryResult:
    return EntryResult(
        entry.transaction_id,
        entry.balance_after_grains,
        entry.balance_after_grains - held,
        entry.replayed,
    )


def _with_tenant(customer: Customer, tenant: str) -> Customer:
    return replace(customer, tenant=tenant)


def _with_balance(customer: Customer, balance: int) -> Customer:
    return replace(customer, balance_grains=balance)
