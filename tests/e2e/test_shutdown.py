"""SIGTERM drains: in-flight calls finish, nothing acknowledged is lost, exit status 0."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import asyncpg
import httpx

from tests.support.rest import rest_client
from tests.support.stack import ServiceProcess, Stores, Tenant

REQUESTS = 120


async def test_sigterm_drains_in_flight_calls(
    stores: Stores, tenant: Tenant, tmp_path: Path
) -> None:
    service = ServiceProcess(stores, tmp_path).start()
    try:
        async with rest_client(service, tenant) as rest:
            await rest.create_customer("c", 10_000_000)
            for index in range(REQUESTS):
                check = await rest.check("c", f"r{index}", 1_000)
                assert check["approved"] is True

            async def finalize(index: int) -> int | str:
                try:
                    body = {
                        "customer_id": "c",
                        "request_id": f"r{index}",
                        "status": "COMPLETED_SUCCESS",
                        "total_actual_cost_grains": 700,
                    }
                    response = await rest.raw("POST", "/v1/balance/finalize", body)
                except httpx.TransportError as error:
                    return type(error).__name__  # refused after the listener closed
                return response.status_code

            tasks = [asyncio.create_task(finalize(i)) for i in range(REQUESTS)]
            await asyncio.sleep(0.05)
            assert service.process is not None
            service.process.send_signal(signal.SIGTERM)
            outcomes = await asyncio.gather(*tasks)
        started = time.monotonic()
        exit_status = service.process.wait(timeout=40)
        assert exit_status == 0, service.log_tail()
        assert time.monotonic() - started < 40
    finally:
        service.stop()
    acknowledged = {f"r{i}" for i, outcome in enumerate(outcomes) if outcome == 200}
    assert acknowledged, outcomes
    # Never a server error: a call is either answered or refused before it was accepted.
    assert all(o == 200 or isinstance(o, str) for o in outcomes), outcomes
    assert stores.postgres is not None
    conn = await asyncpg.connect(stores.postgres.dsn)
    try:
        rows = await conn.fetch(
            "SELECT request_id, actual_cost_grains FROM requests WHERE tenant = $1", tenant.name
        )
    finally:
        await conn.close()
    settled = {r["request_id"]: r["actual_cost_grains"] for r in rows}
    # Every call the service accepted was answered: no settlement without its reply.
    assert set(settled) == acknowledged
    assert set(settled.values()) == {700}
    assert "Traceback" not in service.log_text()
