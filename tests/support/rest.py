"""The tests' one REST client: a running ``beam serve`` seen by one tenant.

Every test that talks REST to a service process goes through :class:`Rest`, so the wire
details (paths, the ``Authorization`` header of each role, grains sent as strings, "200 or
the test fails") live in one place. ``raw`` returns the response for tests that expect a
refusal; ``call`` and the named calls assert a 200 and return the JSON body.

Amounts go out as strings, the proto3 JSON form of ``int64``; the service also accepts
numbers, which the tests of the REST surface (tests/e2e) cover on their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx

from tests.support.stack import ServiceProcess, Tenant

DEFAULT_TIMEOUT = httpx.Timeout(30, connect=5)


class Rest:
    """REST calls of ``tenant`` (as ``role`` unless a call says otherwise) to ``base_url``."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        tenant: Tenant | None = None,
        role: str = "admin",
    ) -> None:
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.tenant = tenant
        self.role = role

    def at(self, base_url: str) -> Rest:
        """The same tenant and client, talking to another replica."""
        return Rest(self.http, base_url, self.tenant, self.role)

    def headers(self, role: str | None = None) -> dict[str, str]:
        return self.tenant.header(role or self.role) if self.tenant is not None else {}

    async def raw(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        role: str | None = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        content: bytes | str | None = None,
    ) -> httpx.Response:
        """``headers`` add to (or replace) the role's; ``content`` is a body sent verbatim."""
        return await self.http.request(
            method,
            self.base_url + path,
            json=body,
            content=content,
            params=params,
            headers={**self.headers(role), **(headers or {})},
        )

    async def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        role: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The JSON body of a 200; any other answer fails the test with the body."""
        response = await self.raw(method, path, body, role=role, params=params)
        assert response.status_code == 200, f"{method} {path}: {response.text}"
        data = response.json()
        assert isinstance(data, dict)
        return data

    async def get(self, path: str, *, role: str | None = None, **params: Any) -> dict[str, Any]:
        return await self.call("GET", path, role=role, params=params or None)

    async def post(
        self, path: str, body: dict[str, Any], *, role: str | None = None
    ) -> dict[str, Any]:
        return await self.call("POST", path, body, role=role)

    # -- the calls most tests make ---------------------------------------------------------

    async def create_customer(self, customer_id: str, balance: int) -> dict[str, Any]:
        return await self.post(
            "/v1/customers",
            {
                "customer_id": customer_id,
                "display_name": customer_id,
                "initial_balance_grains": str(balance),
            },
            role="admin",
        )

    async def balance(self, customer_id: str) -> tuple[int, int, int]:
        """(balance, reserved, available)."""
        data = await self.get(f"/v1/balance/{customer_id}", role="reader")
        return int(data["balance"]), int(data["reserved"]), int(data["available"])

    async def check(
        self, customer_id: str, request_id: str, estimated: int, **extra: Any
    ) -> dict[str, Any]:
        body = {
            "customer_id": customer_id,
            "request_id": request_id,
            "estimated_grains": str(estimated),
            "buffer_multiplier": 1.0,
            "metadata": {"model": "cheap"},
            **extra,
        }
        return await self.post("/v1/balance/check", body, role="enforcer")

    async def deduct(
        self, customer_id: str, request_id: str, token: str, tokens: int, sequence: int = 0
    ) -> dict[str, Any]:
        body = {
            "customer_id": customer_id,
            "request_id": request_id,
            "request_token": token,
            "tokens_consumed": tokens,
            "model": "cheap",
            "is_completion": True,
            "sequence_number": str(sequence),
        }
        return await self.post("/v1/balance/deduct", body, role="enforcer")

    async def finalize(
        self, customer_id: str, request_id: str, status: str = "COMPLETED_SUCCESS", **extra: Any
    ) -> dict[str, Any]:
        body = {
            "customer_id": customer_id,
            "request_id": request_id,
            "status": status,
            "model": "cheap",
            **extra,
        }
        return await self.post("/v1/balance/finalize", body, role="enforcer")

    async def integrity(self) -> dict[str, Any]:
        return await self.post("/v1/admin/verify-integrity", {}, role="reader")


@contextlib.asynccontextmanager
async def rest_client(
    service: ServiceProcess | str,
    tenant: Tenant | None = None,
    role: str = "admin",
    http_timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
) -> AsyncIterator[Rest]:
    """A :class:`Rest` to ``service`` (a ServiceProcess or a base URL), closed afterwards."""
    base_url = service if isinstance(service, str) else service.http_url
    async with httpx.AsyncClient(timeout=http_timeout) as http:
        yield Rest(http, base_url, tenant, role)
