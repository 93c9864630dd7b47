"""The hot path costs one Redis round trip per call (docs/PERFORMANCE.md).

Counted on the server, not assumed from the code: a dedicated Redis (so no other test's
service or reaper talks to it) is watched with MONITOR while exactly one call goes
through a real `beam serve`. MONITOR prints every command a client sends, and marks the
commands a Lua script runs as ``[0 lua]``; those are not round trips. Marker commands
sent from the test before and after the call delimit exactly what that call cost.
INFO commandstats (which counts script-internal commands too) cross-checks the EVALSHA.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from beam.adapters.redis_store import load_scripts
from beam.balance.v1 import balance_pb2 as pb
from beam.balance.v1 import balance_pb2_grpc as pb_grpc
from beam.constants import (
    SCRIPT_BEGIN_SETTLEMENT,
    SCRIPT_DEDUCT,
    SCRIPT_OPEN_HOLD,
    SCRIPT_READ_BALANCE,
    SCRIPT_SETTLE_HOLD,
)
from beam_dev import servers as devservers
from tests.support.rest import rest_client
from tests.support.stack import ServiceProcess, Stores, Tenant, provision_tenant

_LINE = re.compile(r'^\+\d+\.\d+ \[\d+ (?P<client>[^\]]+)\] "(?P<command>[^"]+)"(?P<args>.*)$')


class Monitor:
    """A MONITOR connection read by a thread; ``commands()`` delimits one action."""

    def __init__(self, server: devservers.RedisServer) -> None:
        self.server = server
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        self.sock.sendall(b"MONITOR\r\n")
        self.stream = self.sock.makefile("rb")
        assert self.stream.readline().strip() == b"+OK"
        self.lines: list[str] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        self.marks = 0
        # One connection for the markers, opened now: its handshake is not in any window.
        self.marker = server.client()
        self.marker_address = str(self.marker.client_info()["addr"])

    def _read(self) -> None:
        try:
            for raw in self.stream:
                with self.lock:
                    self.lines.append(raw.decode(errors="replace").rstrip("\r\n"))
        except (OSError, ValueError):
            return

    def _mark(self) -> str:
        self.marks += 1
        mark = f"beam-round-trip-mark-{self.marks}"
        self.marker.echo(mark)
        return mark

    def _wait_for(self, mark: str) -> int:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self.lock:
                for index, line in enumerate(self.lines):
                    if mark in line:
                        return index
            time.sleep(0.01)
        raise TimeoutError(f"MONITOR never showed {mark}")

    @contextmanager
    def commands(self) -> Iterator[list[tuple[str, str]]]:
        """Yields a list that, after the block, holds (command, first arg) of every command
        clients sent during it (script-internal commands and the markers excluded)."""
        start = self._wait_for(self._mark())
        seen: list[tuple[str, str]] = []
        yield seen
        end = self._wait_for(self._mark())
        with self.lock:
            window = self.lines[start + 1 : end]
        for line in window:
            match = _LINE.match(line)
            assert match, line
            if match["client"] in ("lua", self.marker_address):
                continue
            first = match["args"].split('"')[1] if '"' in match["args"] else ""
            seen.append((match["command"].lower(), first))

    def close(self) -> None:
        self.marker.close()
        self.sock.close()


@pytest.fixture(scope="module")
def quiet_stack(stores: Stores, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stores]:
    """Shared PostgreSQL, a Redis of its own."""
    workdir = tmp_path_factory.mktemp("round-trips")
    redis = devservers.RedisServer(workdir / "redis")
    redis.start()
    try:
        yield Stores(workdir, "standalone", postgres=stores.postgres, redis=redis)
    finally:
        redis.stop()


@pytest.fixture(scope="module")
def quiet_service(
    quiet_stack: Stores, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    # The reaper would SCAN between our markers; it is not part of a call's cost.
    service = ServiceProcess(
        quiet_stack, tmp_path_factory.mktemp("round-trips-service"),
        BEAM_REAPER_INTERVAL_SECONDS="3600",
    ).start()  # fmt: skip
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
async def quiet_tenant(quiet_stack: Stores) -> Tenant:
    assert quiet_stack.postgres is not None
    return await provision_tenant(quiet_stack.postgres.dsn)


@pytest.fixture
async def stub(quiet_service: ServiceProcess) -> AsyncIterator[pb_grpc.BalanceServiceStub]:
    async with grpc.aio.insecure_channel(quiet_service.grpc_target) as channel:
        yield pb_grpc.BalanceServiceStub(channel)


def evalsha_calls(server: devservers.RedisServer) -> int:
    with server.client() as client:
        stats = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_check_deduct_and_get_balance_each_cost_one_redis_round_trip(
    quiet_stack: Stores,
    quiet_service: ServiceProcess,
    quiet_tenant: Tenant,
    stub: pb_grpc.BalanceServiceStub,
    tmp_path: Path,
) -> None:
    server: devservers.RedisServer = quiet_stack.redis
    metadata = (("authorization", f"Bearer {quiet_tenant.keys['admin']}"),)
    async with rest_client(quiet_service, quiet_tenant) as rest:
        await rest.create_customer("cus", 1_000_000)

        def check(request_id: str) -> pb.CheckBalanceRequest:
            return pb.CheckBalanceRequest(
                customer_id="cus", request_id=request_id, estimated_grains=1_000,
                buffer_multiplier=1.0, metadata=pb.RequestMetadata(model="cheap"),
            )  # fmt: skip

        # Warm up: the account is loaded into Redis, every script is loaded (the first
        # EVALSHA of a script on a new server answers NOSCRIPT), keys and prices cached.
        warm = await stub.CheckBalance(check("warm"), metadata=metadata)
        await stub.DeductTokens(
            pb.DeductTokensRequest(customer_id="cus", request_id="warm",
                                   request_token=warm.request_token, tokens_consumed=1),
            metadata=metadata,
        )  # fmt: skip
        await stub.FinalizeRequest(
            pb.FinalizeRequestRequest(customer_id="cus", request_id="warm",
                                      status=pb.COMPLETED_SUCCESS, total_actual_cost_grains=1),
            metadata=metadata,
        )  # fmt: skip
        shas = {name: script.sha for name, script in load_scripts().items()}
        monitor = Monitor(server)
        try:
            before = evalsha_calls(server)
            with monitor.commands() as sent:
                measured = await stub.CheckBalance(check("measured"), metadata=metadata)
            assert measured.approved is True
            assert sent == [("evalsha", shas[SCRIPT_OPEN_HOLD])]

            with monitor.commands() as sent:
                deduct = await stub.DeductTokens(
                    pb.DeductTokensRequest(
                        customer_id="cus", request_id="measured", tokens_consumed=100,
                        request_token=measured.request_token, is_completion=True,
                        sequence_number=1,
                    ),
                    metadata=metadata,
                )  # fmt: skip
            assert (deduct.success, deduct.consumed_grains) == (True, 200)
            assert sent == [("evalsha", shas[SCRIPT_DEDUCT])]

            with monitor.commands() as sent:
                balance = await stub.GetBalance(
                    pb.GetBalanceRequest(customer_id="cus"), metadata=metadata
                )
            assert (balance.balance, balance.reserved) == (999_999, 1_000)
            assert sent == [("evalsha", shas[SCRIPT_READ_BALANCE])]

            with monitor.commands() as sent:
                read = await rest.get("/v1/balance/cus", role="reader")
            assert read["reserved"] == "1000"
            assert sent == [("evalsha", shas[SCRIPT_READ_BALANCE])]
            # Finalize is not on the per-token path: it marks the hold settling (reserving
            # the charge), commits in PostgreSQL, then releases the hold. Two round trips,
            # both EVALSHA.
            with monitor.commands() as sent:
                final = await stub.FinalizeRequest(
                    pb.FinalizeRequestRequest(
                        customer_id="cus", request_id="measured", status=pb.COMPLETED_SUCCESS,
                        actual_completion_tokens=100,
                    ),
                    metadata=metadata,
                )  # fmt: skip
            assert (final.charged_grains, final.refunded_grains) == (200, 800)
            begin, settle = shas[SCRIPT_BEGIN_SETTLEMENT], shas[SCRIPT_SETTLE_HOLD]
            assert sent == [("evalsha", begin), ("evalsha", settle)]
            # One Check, one Deduct, two balance reads, one Finalize: six EVALSHA.
            assert evalsha_calls(server) - before == 6
        finally:
            monitor.close()
