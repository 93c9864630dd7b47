"""End-to-end helpers: one client for both transports, and a snapshot of the stores.

`Api` sends any call over REST (the proto3 JSON routes) or gRPC (the generated messages,
or raw bytes) with a given key, and normalises failures to `Failure` so a test can say the
same thing about both transports. `StoreSnapshot` captures everything a tenant has in
PostgreSQL (customer rows, ledger/request/usage row counts) and Redis (a DUMP of every key
under the tenant's hash tags): two equal snapshots prove that a call wrote nothing.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import asyncpg
import grpc
import httpx
import pytest
import redis.asyncio as aioredis
from google.protobuf import json_format
from google.protobuf.message import Message

from beam.admin.v1 import admin_pb2 as admin
from beam.balance.v1 import balance_pb2 as balance
from tests.support.rest import Rest
from tests.support.stack import ServiceProcess, Stores, Tenant


@dataclass(frozen=True)
class CallSpec:
    """One call on both transports."""

    grpc_method: str
    request_type: type[Message]
    response_type: type[Message]
    http_method: str
    route: str

    @property
    def path_fields(self) -> list[str]:
        return re.findall(r"{(\w+)}", self.route)


_B = "/beam.balance.v1.BalanceService/"
_A = "/beam.admin.v1.AdminService/"
CALLS: dict[str, CallSpec] = {
    "check": CallSpec(
        _B + "CheckBalance", balance.CheckBalanceRequest, balance.CheckBalanceResponse,
        "POST", "/v1/balance/check",
    ),
    "deduct": CallSpec(
        _B + "DeductTokens", balance.DeductTokensRequest, balance.DeductTokensResponse,
        "POST", "/v1/balance/deduct",
    ),
    "finalize": CallSpec(
        _B + "FinalizeRequest", balance.FinalizeRequestRequest, balance.FinalizeRequestResponse,
        "POST", "/v1/balance/finalize",
    ),
    "get_balance": CallSpec(
        _B + "GetBalance", balance.GetBalanceRequest, balance.GetBalanceResponse,
        "GET", "/v1/balance/{customer_id}",
    ),
    "create_customer": CallSpec(
        _A + "CreateCustomer", admin.CreateCustomerRequest, admin.Customer,
        "POST", "/v1/customers",
    ),
    "get_customer": CallSpec(
        _A + "GetCustomer", admin.GetCustomerRequest, admin.Customer,
        "GET", "/v1/customers/{customer_id}",
    ),
    "list_customers": CallSpec(
        _A + "ListCustomers", admin.ListCustomersRequest, admin.ListCustomersResponse,
        "GET", "/v1/customers",
    ),
    "credit": CallSpec(
        _A + "CreditBalance", admin.CreditBalanceRequest, admin.LedgerEntryResponse,
        "POST", "/v1/customers/{customer_id}/credits",
    ),
    "debit": CallSpec(
        _A + "DebitBalance", admin.DebitBalanceRequest, admin.LedgerEntryResponse,
        "POST", "/v1/customers/{customer_id}/debits",
    ),
    "list_requests": CallSpec(
        _A + "ListRequests", admin.ListRequestsRequest, admin.ListRequestsResponse,
        "GET", "/v1/customers/{customer_id}/requests",
    ),
    "get_request": CallSpec(
        _A + "GetRequest", admin.GetRequestRequest, admin.Request,
        "GET", "/v1/requests/{request_id}",
    ),
    "verify_integrity": CallSpec(
        _A + "VerifyIntegrity", admin.VerifyIntegrityRequest, admin.VerifyIntegrityResponse,
        "POST", "/v1/admin/verify-integrity",
    ),
    "sync_all": CallSpec(
        _A + "SyncAll", admin.SyncAllRequest, admin.SyncAllResponse, "POST", "/v1/admin/sync",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Failure:
    """A refused call, as either transport reports it."""

    code: str  # canonical code name: INVALID_ARGUMENT, NOT_FOUND, ...
    reason: str
    field: str | None
    message: str
    http_status: int | None = None  # REST only


def rest_failure(response: httpx.Response) -> Failure:
    """The REST error body, checked for its documented shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) <= {"code", "reason", "field", "message"}, error
    return Failure(
        error["code"], error["reason"], error.get("field"), error["message"], response.status_code
    )


def ok_json(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    data = response.json()
    assert isinstance(data, dict)
    return data


class Api:
    """REST and gRPC clients of one service; `key` picks the caller on each call."""

    def __init__(self, service: ServiceProcess) -> None:
        self.service = service
        self.http = httpx.AsyncClient(base_url=service.http_url, timeout=30)
        # No tenant: every call says which key it sends (or none, or a malformed header).
        self.web = Rest(self.http, "")
        self.channel = grpc.aio.insecure_channel(
            service.grpc_target, options=[("grpc.max_send_message_length", 8 * 1024 * 1024)]
        )

    async def close(self) -> None:
        await self.http.aclose()
        await self.channel.close()

    # -- REST ------------------------------------------------------------------------------

    def rest_request(self, call: str, fields: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        """(method, URL path, remaining fields) with path fields put into the route."""
        spec = CALLS[call]
        rest = dict(fields)
        path = spec.route
        for name in spec.path_fields:
            path = path.replace(f"{{{name}}}", quote(str(rest.pop(name)), safe=""))
        return spec.http_method, path, rest

    async def rest(
        self,
        call: str,
        fields: dict[str, Any],
        key: str | None,
        *,
        authorization: str | None = None,
    ) -> httpx.Response:
        """`authorization` replaces `Bearer <key>` verbatim; no key and none: no header."""
        method, path, rest = self.rest_request(call, fields)
        headers = {"Authorization": authorization} if authorization is not None else bearer(key)
        if method == "GET":
            return await self.web.raw(method, path, params=rest, headers=headers)
        return await self.web.raw(method, path, rest, headers=headers)

    async def rest_raw(
        self,
        method: str,
        path: str,
        key: str | None,
        content: Any = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        all_headers = {"Content-Type": "application/json", **bearer(key), **(headers or {})}
        return await self.web.raw(method, path, content=content, headers=all_headers)

    # -- gRPC ------------------------------------------------------------------------------

    def grpc_message(self, call: str, fields: dict[str, Any]) -> Message:
        message = CALLS[call].request_type()
        json_format.ParseDict(fields, message)
        return message

    async def grpc(
        self,
        call: str,
        request: Message | bytes | dict[str, Any],
        key: str | None,
        *,
        authorization: str | None = None,
    ) -> Message | Failure:
        """The answer, or the failure; `authorization` replaces `Bearer <key>` verbatim."""
        spec = CALLS[call]
        if isinstance(request, dict):
            request = self.grpc_message(call, request)
        payload = request if isinstance(request, bytes) else request.SerializeToString()
        method = self.channel.unary_unary(
            spec.grpc_method,
            request_serializer=lambda raw: raw,
            response_deserializer=spec.response_type.FromString,
        )
        metadata: tuple[tuple[str, str], ...] = ()
        if authorization is not None:
            metadata = (("authorization", authorization),)
        elif key is not None:
            metadata = (("authorization", f"Bearer {key}"),)
        try:
            return await method(payload, metadata=metadata, timeout=30)  # type: ignore[no-any-return]
        except grpc.aio.AioRpcError as error:
            trailers = dict(error.trailing_metadata() or ())
            return Failure(
                error.code().name,
                str(trailers.get("beam-reason", "")),
                str(trailers["beam-field"]) if "beam-field" in trailers else None,
                error.details() or "",
            )


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key is not None else {}


@pytest.fixture
async def api(service: ServiceProcess) -> AsyncIterator[Api]:
    client = Api(service)
    try:
        yield client
    finally:
        await client.close()


# -- what a tenant has in the stores ----------------------------------------------------------


@dataclass(frozen=True)
class StoreSnapshot:
    customers: tuple[tuple[Any, ...], ...]
    counts: tuple[int, ...]
    redis: tuple[tuple[bytes, bytes], ...]


class StoreProbe:
    """Direct PostgreSQL and Redis access for one tenant's state."""

    def __init__(self, conn: asyncpg.Connection, redis: aioredis.Redis) -> None:
        self.conn = conn
        self.redis = redis

    @classmethod
    async def open(cls, stores: Stores) -> StoreProbe:
        assert stores.postgres is not None
        conn = await asyncpg.connect(stores.postgres.dsn)
        return cls(conn, aioredis.Redis.from_url(stores.redis.url))

    async def close(self) -> None:
        await self.conn.close()
        await self.redis.aclose()

    async def snapshot(self, tenant: Tenant) -> StoreSnapshot:
        rows = await self.conn.fetch(
            "SELECT * FROM customers WHERE tenant = $1 ORDER BY customer_id", tenant.name
        )
        counts = []
        for table in ("transactions", "requests", "usage_events"):
            counts.append(
                await self.conn.fetchval(
                    f"SELECT count(*) FROM {table} WHERE tenant = $1",  # noqa: S608
                    tenant.name,
                )
            )
        dumped = []
        async for key in self.redis.scan_iter(match=f"beam:{{{tenant.name}:*", count=1000):
            value = await self.redis.dump(key)
            dumped.append((key, value or b""))
        return StoreSnapshot(
            tuple(tuple(r.values()) for r in rows), tuple(counts), tuple(sorted(dumped))
        )

    async def ledger_rows(self, tenant: Tenant, customer_id: str) -> int:
        return int(
            await self.conn.fetchval(
                "SELECT count(*) FROM transactions WHERE tenant = $1 AND customer_id = $2",
                tenant.name,
                customer_id,
            )
        )


async def create_customer(api: Api, tenant: Tenant, customer_id: str, balance: int) -> None:
    response = await api.rest(
        "create_customer",
        {"customer_id": customer_id, "display_name": customer_id,
         "initial_balance_grains": str(balance)},
        tenant.keys["admin"],
    )  # fmt: skip
    assert ok_json(response)["balance"] == str(balance)


async def rest_balance(api: Api, tenant: Tenant, customer_id: str) -> tuple[int, int, int]:
    response = await api.rest("get_balance", {"customer_id": customer_id}, tenant.keys["admin"])
    data = ok_json(response)
    return int(data["balance"]), int(data["reserved"]), int(data["available"])


async def open_hold(
    api: Api,
    tenant: Tenant,
    customer_id: str,
    request_id: str,
    estimated_grains: int,
    model: str = "gpt-4",
) -> str:
    """CheckBalance with multiplier 1.0 over REST; returns the request token."""
    data = ok_json(
        await api.rest(
            "check",
            {"customer_id": customer_id, "request_id": request_id,
             "estimated_grains": str(estimated_grains), "buffer_multiplier": 1.0,
             "metadata": {"model": model}},
            tenant.keys["enforcer"],
        )
    )  # fmt: skip
    assert data["approved"] is True, data
    assert data["reserved_grains"] == str(estimated_grains)
    return str(data["request_token"])
