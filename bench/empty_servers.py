"""The baselines: servers of Beam's interfaces that do no work.

``python bench/empty_servers.py grpc PORT``: a ``grpc.aio`` servicer of the same
``beam.balance.v1.BalanceService`` (same messages) answering every call with a constant
message, one process, one event loop, like ``beam serve``'s gRPC side without its work.

``python bench/empty_servers.py rest PORT``: a FastAPI app with the route of REST GetBalance
(``GET /v1/balance/{customer_id}``) answering a constant JSON body, served by uvicorn with
the same settings ``beam serve`` uses (no access log, no lifespan, inside ``asyncio.run``).

Both stop on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any

import grpc
import uvicorn
from fastapi import FastAPI

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))

from beam.balance.v1 import balance_pb2 as pb
from beam.balance.v1 import balance_pb2_grpc as pb_grpc

CHECK = pb.CheckBalanceResponse(
    approved=True,
    remaining_balance=999_940_000,
    request_token="v1.constant",  # noqa: S106 (not a secret)
    reserved_grains=60_000,
    max_affordable_completion_tokens=16_666_666,
    hold_expires_at_unix_ms=1_800_000_000_000,
)
DEDUCT = pb.DeductTokensResponse(
    success=True, remaining_balance=999_937_000, consumed_grains=3_000, reserved_grains=60_000
)
FINALIZE = pb.FinalizeRequestResponse(
    success=True, refunded_grains=23_760, final_balance=999_963_760, charged_grains=36_240
)
BALANCE = pb.GetBalanceResponse(balance=1_000_000_000, reserved=60_000, available=999_940_000)
BALANCE_JSON = {"balance": "1000000000", "reserved": "60000", "available": "999940000"}


class EmptyBalanceService(pb_grpc.BalanceServiceServicer):
    async def CheckBalance(self, request: Any, context: Any) -> Any:
        return CHECK

    async def DeductTokens(self, request: Any, context: Any) -> Any:
        return DEDUCT

    async def FinalizeRequest(self, request: Any, context: Any) -> Any:
        return FINALIZE

    async def GetBalance(self, request: Any, context: Any) -> Any:
        return BALANCE


async def _until_sigterm() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve_grpc(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_BalanceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        EmptyBalanceService(), server
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await _until_sigterm()
    await server.stop(1)


def rest_app() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/balance/{customer_id}")
    async def get_balance(customer_id: str) -> dict[str, str]:
        return BALANCE_JSON

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    return app


class _Uvicorn(uvicorn.Server):
    """As in beam serve: no signal handling of its own (SIGTERM is ours)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def serve_rest(port: int) -> None:
    config = uvicorn.Config(
        rest_app(),
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        lifespan="off",
    )
    server = _Uvicorn(config)
    task = asyncio.create_task(server.serve())
    await _until_sigterm()
    server.should_exit = True
    await task


def main() -> None:
    kind, port = sys.argv[1], int(sys.argv[2])
    asyncio.run({"grpc": serve_grpc, "rest": serve_rest}[kind](port))


if __name__ == "__main__":
    main()
