"""Fixtures of the Python client's tests: a client of the shared `beam serve`, customers.

The client talks gRPC to the session's real service (tests/conftest.py ``service``), as an
enforcer of a fresh tenant. Customers are created, and requests and balances read back,
over the service's REST admin API with the tenant's admin key, independently of the client
under test. Prices (tests/support/stack.py): "cheap" is 1 grain per input token and 2 per
output token; "gpt-4o-mini" 0.15 / 0.6 / 0.075 (cached) grains per token.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from beam_client import AsyncBeamClient, RetryPolicy

from tests.support.rest import rest_client
from tests.support.stack import ServiceProcess, Stores, Tenant

# Fast retries for tests that expect Beam to stay away.
QUICK_RETRY = RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.01)


class Admin:
    """REST admin calls of one tenant on one service (the tests' independent view)."""

    def __init__(self, service: ServiceProcess, tenant: Tenant) -> None:
        self.service = service
        self.tenant = tenant

    async def customer(self, balance: int, customer_id: str | None = None) -> str:
        customer_id = customer_id or f"cus_{secrets.token_hex(4)}"
        async with rest_client(self.service, self.tenant) as rest:
            await rest.create_customer(customer_id, balance)
        return customer_id

    async def balance(self, customer_id: str) -> tuple[int, int, int]:
        """(balance, reserved, available)."""
        async with rest_client(self.service, self.tenant) as rest:
            return await rest.balance(customer_id)

    async def request(self, request_id: str, customer_id: str) -> dict[str, Any]:
        async with rest_client(self.service, self.tenant) as rest:
            return await rest.get(f"/v1/requests/{request_id}", customer_id=customer_id)

    async def request_list(self, customer_id: str) -> list[dict[str, Any]]:
        """Settled requests of the customer (ListRequests)."""
        async with rest_client(self.service, self.tenant) as rest:
            answer = await rest.get(f"/v1/customers/{customer_id}/requests", limit=1000)
        requests = answer["requests"]
        assert isinstance(requests, list)
        return requests

    async def ledger_entries(self, customer_id: str) -> int:
        """Settled requests of the customer (each settles by one ledger entry)."""
        return len(await self.request_list(customer_id))


@pytest.fixture(autouse=True)
async def every_client_closed() -> AsyncIterator[None]:
    """A test closes every AsyncBeamClient it opens: an open one's outbox replay runs on
    in the session's event loop (and other suites' checks for leftover work see it)."""
    before = set(asyncio.all_tasks())
    yield
    left = [
        t for t in asyncio.all_tasks()
        if t not in before and not t.done() and t.get_name() == "beam-client-replay"
    ]  # fmt: skip
    for task in left:
        task.cancel()
    assert not left, f"{len(left)} AsyncBeamClient(s) left open"


@pytest.fixture(autouse=True)
def outbox_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's clients share one outbox file of its own (never the user's)."""
    path = tmp_path / "outbox.sqlite3"
    monkeypatch.setenv("BEAM_OUTBOX_PATH", str(path))
    return path


@pytest.fixture
async def admin(service: ServiceProcess, tenant: Tenant) -> Admin:
    return Admin(service, tenant)


@pytest.fixture
async def client(service: ServiceProcess, tenant: Tenant) -> AsyncIterator[AsyncBeamClient]:
    beam = AsyncBeamClient(service.grpc_target, tenant.keys["enforcer"])
    try:
        yield beam
    finally:
        await beam.close()


@pytest.fixture
async def own_service(stores: Stores, tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    """A `beam serve` of the test's own (on the session's stores), to stop and start."""
    service = ServiceProcess(stores, tmp_path)
    await asyncio.to_thread(service.start)
    try:
        yield service
    finally:
        await asyncio.to_thread(service.stop)
