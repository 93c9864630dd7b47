"""Proto message in, proto message out: the calls both transports serve.

gRPC servicers and REST routes are thin shells around these functions (authenticate,
parse, call, render), so the two APIs cannot drift: same validation, same reason codes,
same numbers. Metrics for every call are recorded here.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from google.protobuf.message import Message

from beam.admin.v1 import admin_pb2 as admin_pb
from beam.balance.v1 import balance_pb2 as balance_pb
from beam.core.admin import CustomerIntegrity, CustomerView, EntryResult
from beam.core.auth import Principal
from beam.core.commands import (
    CheckCommand,
    DeductCommand,
    FinalizeCommand,
    LedgerCommand,
    validate_limit,
)
from beam.core.runtime import Runtime
from beam.core.usage import (
    CustomerSpend,
    TopCustomersQuery,
    TopCustomersReport,
    Usage,
    UsageQuery,
    UsageReport,
)
from beam.errors import BeamError, Reason, invalid
from beam.observability import CALL_LATENCY, DECISIONS, GRAINS, STREAM_KILLS, child
from beam.records import Customer, CustomerState, Settlement

M = TypeVar("M", bound=Message)


def _status_name(value: int) -> str:
    try:
        return str(balance_pb.RequestStatus.Name(value))
    except ValueError:
        return str(value)


def check_command(m: balance_pb.CheckBalanceRequest) -> CheckCommand:
    md = m.metadata
    return CheckCommand(
        customer_id=m.customer_id,
        request_id=m.request_id,
        estimated_grains=m.estimated_grains,
        buffer_multiplier=m.buffer_multiplier,
        model=md.model,
        max_tokens=md.max_tokens,
        prompt_tokens=md.prompt_tokens,
        cached_prompt_tokens=md.cached_prompt_tokens,
        custom_properties=dict(md.custom_properties),
        min_completion_tokens=md.min_completion_tokens,
    )


def deduct_command(m: balance_pb.DeductTokensRequest) -> DeductCommand:
    return DeductCommand(
        customer_id=m.customer_id,
        request_id=m.request_id,
        request_token=m.request_token,
        tokens_consumed=m.tokens_consumed,
        model=m.model,
        is_completion=m.is_completion,
        sequence_number=m.sequence_number,
        is_cached_prompt=m.is_cached_prompt,
        reserve_ahead_tokens=m.reserve_ahead_tokens,
        prompt_tokens=m.prompt_tokens,
        cached_prompt_tokens=m.cached_prompt_tokens,
    )


def finalize_command(m: balance_pb.FinalizeRequestRequest) -> FinalizeCommand:
    return FinalizeCommand(
        customer_id=m.customer_id,
        request_id=m.request_id,
        status=_status_name(m.status),
        actual_prompt_tokens=m.actual_prompt_tokens,
        actual_completion_tokens=m.actual_completion_tokens,
        actual_cached_prompt_tokens=m.actual_cached_prompt_tokens,
        total_actual_cost_grains=m.total_actual_cost_grains,
        model=m.model,
        request_token=m.request_token,
        let_through=m.let_through,
    )


class Handlers:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.ledger = runtime.ledger
        self.admin = runtime.admin
        self.usage = Usage(runtime.postgres)

    async def authenticate(self, authorization: str | None) -> Principal:
        return await self.runtime.auth.authenticate(authorization)

    async def timed(
        self,
        call: str,
        transport: str,
        handler: Callable[[Principal, Any], Awaitable[M]],
        principal: Principal,
        request: Any,
    ) -> M:
        started = time.perf_counter()
        try:
            return await handler(principal, request)
        finally:
            child(CALL_LATENCY, call, transport).observe(time.perf_counter() - started)

    # -- balance -----------------------------------------------------------------------------

    async def check(self, p: Principal, m: balance_pb.CheckBalanceRequest) -> Message:
        result = await self.ledger.check(p, check_command(m))
        child(DECISIONS, "check", result.rejection_reason or "OK").inc()
        if result.approved:
            child(GRAINS, "held").inc(result.reserved_grains)
        return balance_pb.CheckBalanceResponse(
            approved=result.approved,
            remaining_balance=result.remaining_balance,
            request_token=result.request_token,
            rejection_reason=result.rejection_reason,
            reserved_grains=result.reserved_grains,
            max_affordable_completion_tokens=result.max_affordable_completion_tokens,
            hold_expires_at_unix_ms=result.hold_expires_at_unix_ms,
            replayed=result.replayed,
            granted_completion_tokens=result.granted_completion_tokens,
        )

    async def deduct(self, p: Principal, m: balance_pb.DeductTokensRequest) -> Message:
        result = await self.ledger.deduct(p, deduct_command(m))
        child(DECISIONS, "deduct", result.error_code or "OK").inc()
        if not result.success:
            child(STREAM_KILLS, result.error_code).inc()
        return balance_pb.DeductTokensResponse(
            success=result.success,
            remaining_balance=result.remaining_balance,
            error_code=result.error_code,
            consumed_grains=result.consumed_grains,
            reserved_grains=result.reserved_grains,
            covered_completion_tokens=result.covered_completion_tokens,
        )

    async def finalize(self, p: Principal, m: balance_pb.FinalizeRequestRequest) -> Message:
        result = await self.ledger.finalize(p, finalize_command(m))
        child(DECISIONS, "finalize", "REPLAYED" if result.replayed else "OK").inc()
        if not result.replayed:
            child(GRAINS, "settled").inc(result.charged_grains)
            child(GRAINS, "refunded").inc(result.refunded_grains)
            child(GRAINS, "overage").inc(result.overage_grains)
        return balance_pb.FinalizeRequestResponse(
            success=result.success,
            refunded_grains=result.refunded_grains,
            final_balance=result.final_balance,
            charged_grains=result.charged_grains,
            overage_grains=result.overage_grains,
            replayed=result.replayed,
        )

    async def get_balance(self, p: Principal, m: balance_pb.GetBalanceRequest) -> Message:
        result = await self.ledger.balance(p, m.customer_id)
        return balance_pb.GetBalanceResponse(
            balance=result.balance, reserved=result.reserved, available=result.available
        )

    # -- admin -------------------------------------------------------------------------------

    async def create_customer(self, p: Principal, m: admin_pb.CreateCustomerRequest) -> Message:
        view = await self.admin.create_customer(
            p,
            Customer(
                tenant=p.tenant,
                customer_id=m.customer_id,
                display_name=m.display_name,
                platform_user_id=m.platform_user_id,
                buffer_strategy=m.buffer_strategy or "conservative",
            ),
            m.initial_balance_grains,
        )
        return customer_message(view)

    async def get_customer(self, p: Principal, m: admin_pb.GetCustomerRequest) -> Message:
        return customer_message(await self.admin.get_customer(p, m.customer_id))

    async def list_customers(self, p: Principal, m: admin_pb.ListCustomersRequest) -> Message:
        validate_limit(m.limit)
        views = await self.admin.list_customers(p, m.limit or 100, m.after_customer_id)
        return admin_pb.ListCustomersResponse(customers=[customer_message(v) for v in views])

    async def credit(self, p: Principal, m: admin_pb.CreditBalanceRequest) -> Message:
        return entry_message(await self.admin.credit(p, ledger_command(m)))

    async def debit(self, p: Principal, m: admin_pb.DebitBalanceRequest) -> Message:
        return entry_message(await self.admin.debit(p, ledger_command(m)))

    async def list_requests(self, p: Principal, m: admin_pb.ListRequestsRequest) -> Message:
        validate_limit(m.limit)
        found = await self.admin.list_requests(p, m.customer_id, m.limit or 20)
        return admin_pb.ListRequestsResponse(requests=[request_message(s) for s in found])

    async def get_request(self, p: Principal, m: admin_pb.GetRequestRequest) -> Message:
        return request_message(await self.admin.get_request(p, m.request_id, m.customer_id))

    async def verify_integrity(self, p: Principal, m: admin_pb.VerifyIntegrityRequest) -> Message:
        reports = await self.admin.verify_integrity(p, m.customer_id)
        return admin_pb.VerifyIntegrityResponse(
            ok=all(r.ok for r in reports),
            customers_checked=len(reports),
            customers=[integrity_message(r) for r in reports],
        )

    async def sync_all(self, p: Principal, m: admin_pb.SyncAllRequest) -> Message:
        synced, kept = await self.admin.sync(p)
        return admin_pb.SyncAllResponse(customers_synced=synced, open_holds_kept=kept)

    # -- usage analytics ----------------------------------------------------------------------

    async def get_usage(self, p: Principal, m: admin_pb.GetUsageRequest) -> Message:
        query = UsageQuery(m.customer_id, m.start, m.end, m.bucket, m.group_by)
        return usage_message(await self.usage.customer_usage(p, query))

    async def get_top_customers(self, p: Principal, m: admin_pb.GetTopCustomersRequest) -> Message:
        query = TopCustomersQuery(m.start, m.end, m.limit)
        return top_customers_message(await self.usage.top_customers(p, query))


_STATES = {
    CustomerState.ACTIVE: admin_pb.ACTIVE,
    CustomerState.SUSPENDED: admin_pb.SUSPENDED,
    CustomerState.CLOSED: admin_pb.CLOSED,
}


def _unix_ms(value: Any) -> int:
    return int(value.timestamp() * 1000) if value is not None else 0


def customer_message(view: CustomerView) -> admin_pb.Customer:
    c = view.customer
    return admin_pb.Customer(
        customer_id=c.customer_id,
        display_name=c.display_name,
        platform_user_id=c.platform_user_id,
        balance=c.balance_grains,
        reserved=view.reserved,
        available=view.available,
        lifetime_spent_grains=c.lifetime_spent_grains,
        buffer_strategy=c.buffer_strategy,
        state=_STATES[c.state],
        hold_ttl_seconds=c.hold_ttl_seconds or 0,
        max_request_grains=c.max_request_grains or 0,
        overage_grains=c.overage_grains,
        created_at_unix_ms=_unix_ms(c.created_at),
    )


def ledger_command(
    m: admin_pb.CreditBalanceRequest | admin_pb.DebitBalanceRequest,
) -> LedgerCommand:
    return LedgerCommand(m.customer_id, m.amount_grains, m.description, m.transaction_id)


def entry_message(result: EntryResult) -> admin_pb.LedgerEntryResponse:
    return admin_pb.LedgerEntryResponse(
        transaction_id=result.transaction_id,
        balance=result.balance,
        available=result.available,
        replayed=result.replayed,
    )


def request_message(s: Settlement) -> admin_pb.Request:
    return admin_pb.Request(
        request_id=s.request_id,
        customer_id=s.customer_id,
        model=s.model,
        status=s.status.value,
        estimated_grains=s.estimated_grains,
        reserved_grains=s.reserved_grains,
        consumed_grains=s.consumed_grains,
        actual_cost_grains=s.charged_grains,
        refunded_grains=s.refunded_grains,
        overage_grains=s.overage_grains,
        prompt_tokens=s.prompt_tokens,
        completion_tokens=s.completion_tokens,
        created_at_unix_ms=_unix_ms(s.created_at),
        settled_at_unix_ms=_unix_ms(s.completed_at),
        let_through=s.let_through,
    )


def integrity_message(r: CustomerIntegrity) -> admin_pb.CustomerIntegrity:
    return admin_pb.CustomerIntegrity(
        customer_id=r.customer_id,
        ledger_sum_grains=r.ledger_sum_grains,
        postgres_balance=r.postgres_balance,
        redis_balance=r.redis_balance,
        redis_held=r.redis_held,
        open_holds_sum=r.open_holds_sum,
        held_unverified=r.held_unverified,
        ok=r.ok,
        problems=r.problems,
    )


def usage_message(report: UsageReport) -> admin_pb.GetUsageResponse:
    answer = admin_pb.GetUsageResponse(bucket=report.bucket.value)
    answer.start.FromDatetime(report.start)
    answer.end.FromDatetime(report.end)
    for row in report.rows:
        bucket = answer.buckets.add(
            model=row.model,
            requests=row.requests,
            charged_grains=row.charged_grains,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            cached_prompt_tokens=row.cached_prompt_tokens,
            let_through_requests=row.let_through_requests,
            let_through_grains=row.let_through_grains,
        )
        bucket.start.FromDatetime(row.start)
    return answer


def top_customers_message(report: TopCustomersReport) -> admin_pb.GetTopCustomersResponse:
    answer = admin_pb.GetTopCustomersResponse(
        customers=[spend_message(c) for c in report.customers]
    )
    answer.start.FromDatetime(report.start)
    answer.end.FromDatetime(report.end)
    return answer


def spend_message(c: CustomerSpend) -> admin_pb.CustomerSpend:
    return admin_pb.CustomerSpend(
        customer_id=c.customer_id,
        requests=c.requests,
        charged_grains=c.charged_grains,
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
        cached_prompt_tokens=c.cached_prompt_tokens,
        let_through_requests=c.let_through_requests,
        let_through_grains=c.let_through_grains,
    )


def too_large(limit: int) -> BeamError:
    return invalid("body", f"larger than the limit of {limit} bytes", Reason.BODY_TOO_LARGE)
