"""Beam's CheckBalance benchmark: every figure a ratio to a baseline measured in the same run.

Timing claims live here, never in pass/fail tests. One run (about a minute):

1. Store ceiling: ``redis-benchmark`` runs Beam's own ``open_hold`` script by EVALSHA
   against the same Redis (a new hold per call: ``__rand_int__`` request ids), 50 clients,
   one command per round trip, as the service sends them.
2. RPC stack ceiling: an empty ``grpc.aio`` handler serving the same
   ``BalanceService/CheckBalance`` method (same messages, no work), in its own process.
3. Beam: ``beam serve`` (one process, standalone Redis, PostgreSQL) answering CheckBalance.

For 2 and 3: closed-loop saturation throughput (``--concurrency`` calls in flight), then
open-loop runs at fixed rates (calls are sent on schedule whether or not earlier ones
answered; latency counts from the scheduled send time, so a stall is not hidden by
coordinated omission), with p50/p99/p99.9 latency and server CPU per call (user + system
time of the server process, from /proc). The load generator is one asyncio process on the
same machine: it competes with the servers for the same cores, and says so in the report.

Usage: ``python bench/run.py [--seconds 6] [--rates 250,500,1000] [--out bench/results]``
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "service"))

from beam import devservers  # noqa: E402
from beam.adapters.migrations import migrate as apply_migrations  # noqa: E402
from beam.adapters.redis_store import load_scripts  # noqa: E402
from beam.balance.v1 import balance_pb2 as pb  # noqa: E402
from beam.balance.v1 import balance_pb2_grpc as pb_grpc  # noqa: E402
from beam.constants import (  # noqa: E402
    SCRIPT_LOAD_ACCOUNT,
    SCRIPT_OPEN_HOLD,
    customer_keys,
)
from beam.core.auth import generate_key  # noqa: E402

TOKEN_SECRET = "bench-request-token-secret-0123456789abcdef"  # noqa: S105 (a bench-only stack)
CUSTOMERS = 64  # checks are spread over customers: no one hits the open-hold limit
BALANCE = 10**15
CLK_TCK = os.sysconf("SC_CLK_TCK")
LOAD_AT_START = " ".join(Path("/proc/loadavg").read_text().split()[:3])


# -- baseline: an empty grpc.aio handler -------------------------------------------------------


class EmptyBalanceService(pb_grpc.BalanceServiceServicer):
    async def CheckBalance(self, request: Any, context: Any) -> Any:
        return pb.CheckBalanceResponse()


async def serve_empty(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_BalanceServiceServicer_to_server(EmptyBalanceService(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


# -- load generation -----------------------------------------------------------------------------


@dataclass
class Result:
    label: str
    offered_rps: float | None  # None: closed loop
    seconds: float
    sent: int
    ok: int
    errors: int
    latencies_ms: list[float]
    cpu_seconds: float

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds

    def percentile(self, p: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    @property
    def cpu_us_per_call(self) -> float:
        return self.cpu_seconds / max(self.ok, 1) * 1e6


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Caller:
    """One gRPC channel; each call is a CheckBalance with a new request id."""

    def __init__(self, target: str, api_key: str) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.BalanceServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),)
        self.prefix = secrets.token_hex(4)
        self.count = 0

    def request(self) -> Any:
        self.count += 1
        return pb.CheckBalanceRequest(
            customer_id=f"c{self.count % CUSTOMERS}",
            request_id=f"{self.prefix}-{self.count}",
            estimated_grains=1_000,
            buffer_multiplier=1.2,
            metadata=pb.RequestMetadata(model="gpt-4"),
        )

    async def one(self) -> bool:
        try:
            response = await self.stub.CheckBalance(
                self.request(), metadata=self.metadata, timeout=10
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(response.approved) or response.ByteSize() == 0

    async def close(self) -> None:
        await self.channel.close()


async def closed_loop(caller: Caller, label: str, pid: int, concurrency: int, seconds: float
                      ) -> Result:  # fmt: skip
    latencies: list[float] = []
    counts = {"ok": 0, "errors": 0}
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            ok = await caller.one()
            latencies.append((time.perf_counter() - started) * 1000)
            counts["ok" if ok else "errors"] += 1

    cpu_before, started = cpu_seconds(pid), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return Result(label, None, elapsed, counts["ok"] + counts["errors"], counts["ok"],
                  counts["errors"], latencies, cpu_seconds(pid) - cpu_before)  # fmt: skip


async def open_loop(caller: Caller, label: str, pid: int, rate: float, seconds: float) -> Result:
    latencies: list[float] = []
    counts = {"ok": 0, "errors": 0}
    total = int(rate * seconds)
    tasks: set[asyncio.Task[None]] = set()

    async def call(scheduled: float) -> None:
        ok = await caller.one()
        latencies.append((time.perf_counter() - scheduled) * 1000)
        counts["ok" if ok else "errors"] += 1

    cpu_before, start = cpu_seconds(pid), time.perf_counter()
    for index in range(total):
        scheduled = start + index / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(call(scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    elapsed = max(time.perf_counter() - start, seconds)
    return Result(label, rate, elapsed, total, counts["ok"], counts["errors"], latencies,
                  cpu_seconds(pid) - cpu_before)  # fmt: skip


# -- the stack -----------------------------------------------------------------------------------


async def provision(dsn: str, redis_url: str) -> str:
    """A tenant with an enforcer key, gpt-4's price and CUSTOMERS funded customers."""
    plaintext, key_id, digest = generate_key()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO api_keys (key_hash, key_id, tenant, name, role) "
            "VALUES ($1, $2, 'bench', 'bench', 'enforcer')",
            digest,
            key_id,
        )
        await conn.execute(
            "INSERT INTO model_prices (tenant, model, version, input_grains_per_million, "
            "output_grains_per_million, cached_input_grains_per_million, effective_from) "
            "VALUES ('bench', 'gpt-4', 1, 30000000, 60000000, 30000000, now() - interval '1d')"
        )
        for index in range(CUSTOMERS):
            cid = f"c{index}"
            await conn.execute(
                "INSERT INTO customers (tenant, customer_id, current_balance_grains, "
                "balance_version) VALUES ('bench', $1, $2, 1)",
                cid,
                BALANCE,
            )
            await conn.execute(
                "INSERT INTO transactions (tenant, customer_id, transaction_id, "
                "transaction_type, amount_grains, balance_after_grains, balance_version) "
                "VALUES ('bench', $1, $2, 'credit', $3, $3, 1)",
                cid,
                f"open:{cid}",
                BALANCE,
            )
    finally:
        await conn.close()
    return plaintext


async def migrate(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()


def start_service(dsn: str, redis_url: str, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    http_port, grpc_port = devservers.free_port(), devservers.free_port()
    env = {
        **os.environ,
        "BEAM_ENVIRONMENT": "production",
        "BEAM_DATABASE_URL": dsn,
        "BEAM_REDIS_URL": redis_url,
        "BEAM_REQUEST_TOKEN_SECRET": TOKEN_SECRET,
        "BEAM_HTTP_HOST": "127.0.0.1",
        "BEAM_GRPC_HOST": "127.0.0.1",
        "BEAM_HTTP_PORT": str(http_port),
        "BEAM_GRPC_PORT": str(grpc_port),
        "BEAM_LOG_LEVEL": "WARNING",
        "BEAM_REAPER_INTERVAL_SECONDS": "60",
    }
    log = (workdir / "service.log").open("ab")
    process = subprocess.Popen([sys.executable, "-m", "beam.api.cli", "serve"], env=env,
                               stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, (workdir / "service.log").read_text()[-2000:]
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/ready", timeout=1).is_success:
                return process, grpc_port
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError("beam serve did not become ready")


def start_empty_server(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = devservers.free_port()
    log = (workdir / "empty.log").open("ab")
    process = subprocess.Popen([sys.executable, __file__, "--empty-server", str(port)],
                               stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    return process, port


async def wait_ready(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=30)


def redis_benchmark(redis: devservers.RedisServer, requests: int) -> dict[str, float]:
    """Beam's open_hold by EVALSHA, a new hold per call, 50 clients, no pipelining."""
    scripts = load_scripts()
    with redis.client() as client:
        sha = client.script_load(scripts[SCRIPT_OPEN_HOLD].source)
        client.script_load(scripts[SCRIPT_LOAD_ACCOUNT].source)
        keys = customer_keys("rb", "c0")
        client.evalsha(scripts[SCRIPT_LOAD_ACCOUNT].sha, 5, *keys,
                       BALANCE, 1, "active", 0, 0, "0", 1_500_000)  # fmt: skip
    hold_key = customer_keys("rb", "c0", "r:__rand_int__")
    now_ms = int(time.time() * 1000)
    argv = ["evalsha", sha, "5", *hold_key[:3], hold_key[3], hold_key[4],
            str(now_ms), "r:__rand_int__", "1000", "1200000", "fp", "nonce", "gpt-4", "1",
            "30000000", "60000000", "30000000", "900000", "1000000000", "8"]  # fmt: skip
    binary = shutil.which("redis-benchmark")
    assert binary, "redis-benchmark not found (Debian package redis-tools)"
    out = subprocess.run(
        [binary, "-h", "127.0.0.1", "-p", str(redis.port), "-c", "50", "-n", str(requests),
         "-r", "1000000000", "--csv", *argv],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    header, row = [line for line in out.splitlines() if line.strip()][-2:]
    names = [h.strip('"') for h in header.split(",")]
    values = [v.strip('"') for v in row.split(",")]
    data = dict(zip(names, values, strict=True))
    return {"rps": float(data["rps"]), "p50_ms": float(data["p50_latency_ms"]),
            "p99_ms": float(data["p99_latency_ms"])}  # fmt: skip


# -- report ----------------------------------------------------------------------------------------


def machine() -> list[str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True,
                                   text=True, check=False).stdout.split()[2]  # fmt: skip
    return [
        f"- CPU: {os.cpu_count()} cores ({cpu}), {memory_kb / 1024 / 1024:.0f} GiB memory",
        f"- {platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"grpcio {grpc.__version__}, Redis {redis_version.removeprefix('v=')}",
        "- everything on this one machine over loopback: load generator (one asyncio "
        "process), `beam serve` (one process), Redis, PostgreSQL",
        f"- load average (1/5/15 min) at the start: {LOAD_AT_START}, at the end: "
        f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])} (anything above 0 is "
        "other work sharing these cores)",
    ]


def table(results: list[Result]) -> list[str]:
    lines = [
        "| target | load | calls | throughput (calls/s) | p50 ms | p99 ms | p99.9 ms "
        "| errors | server CPU µs/call |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        load = "closed loop" if r.offered_rps is None else f"{r.offered_rps:.0f}/s open loop"
        lines.append(
            f"| {r.label} | {load} | {r.sent} | {r.throughput:.0f} | {r.percentile(50):.2f} | "
            f"{r.percentile(99):.2f} | {r.percentile(99.9):.2f} | {r.errors} | "
            f"{r.cpu_us_per_call:.0f} |"
        )
    return lines


def report(store: dict[str, float], results: list[Result], args: argparse.Namespace) -> str:
    by = {(r.label, r.offered_rps): r for r in results}
    beam_max, empty_max = by[("beam", None)], by[("empty grpc.aio", None)]
    lines = [
        f"# CheckBalance benchmark, {dt.date.today().isoformat()}",
        "",
        "Produced by `python bench/run.py` (see bench/README.md for the method).",
        "",
        "## Machine",
        *machine(),
        "",
        "## Ratios (the figures to quote)",
        f"- Beam CheckBalance saturation throughput: **{beam_max.throughput:.0f} calls/s** = "
        f"**{beam_max.throughput / empty_max.throughput:.2f}x** the empty grpc.aio handler "
        f"({empty_max.throughput:.0f} calls/s) and "
        f"**{beam_max.throughput / store['rps']:.3f}x** Redis running open_hold by EVALSHA "
        f"({store['rps']:.0f} calls/s).",
        f"- Server CPU per CheckBalance: **{beam_max.cpu_us_per_call:.0f} µs** vs "
        f"{empty_max.cpu_us_per_call:.0f} µs for the empty handler "
        f"(**{beam_max.cpu_us_per_call / max(empty_max.cpu_us_per_call, 1):.1f}x**).",
    ]
    for rate in args.rates:
        beam, empty = by.get(("beam", rate)), by.get(("empty grpc.aio", rate))
        if beam and empty:
            lines.append(
                f"- At {rate:.0f} calls/s: p50 {beam.percentile(50):.2f} ms "
                f"({beam.percentile(50) / empty.percentile(50):.1f}x empty), p99 "
                f"{beam.percentile(99):.2f} ms ({beam.percentile(99) / empty.percentile(99):.1f}x"
                f" empty), p99.9 {beam.percentile(99.9):.2f} ms."
            )
    lines += [
        "",
        "## Store ceiling: redis-benchmark, open_hold by EVALSHA",
        f"50 clients, one call per round trip, {args.redis_requests} calls, a new hold each: "
        f"**{store['rps']:.0f} calls/s**, p50 {store['p50_ms']:.3f} ms, "
        f"p99 {store['p99_ms']:.3f} ms.",
        "",
        "## gRPC CheckBalance",
        f"Closed loop: {args.concurrency} calls in flight for {args.seconds:g} s. Open loop: "
        f"{args.seconds:g} s per rate; latency from the scheduled send time.",
        "",
        *table(results),
        "",
    ]
    return "\n".join(lines)


async def measure(args: argparse.Namespace, workdir: Path) -> str:
    postgres = devservers.PostgresServer(workdir / "postgres")
    redis = devservers.RedisServer(workdir / "redis")
    postgres.start()
    redis.start()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        await migrate(postgres.dsn)
        api_key = await provision(postgres.dsn, redis.url)
        store = redis_benchmark(redis, args.redis_requests)
        print(f"redis-benchmark open_hold: {store['rps']:.0f} calls/s", flush=True)
        service, service_port = start_service(postgres.dsn, redis.url, workdir)
        empty, empty_port = start_empty_server(workdir)
        processes += [service, empty]
        results: list[Result] = []
        for label, process, port in (("empty grpc.aio", empty, empty_port),
                                     ("beam", service, service_port)):  # fmt: skip
            target = f"127.0.0.1:{port}"
            await wait_ready(target)
            caller = Caller(target, api_key)
            try:
                for _ in range(200):  # warm up: connections, key and price caches, accounts
                    await caller.one()
                results.append(await closed_loop(caller, label, process.pid, args.concurrency,
                                                 args.seconds))  # fmt: skip
                for rate in args.rates:
                    results.append(await open_loop(caller, label, process.pid, rate,
                                                   args.seconds))  # fmt: skip
            finally:
                await caller.close()
            for r in results[-1 - len(args.rates) :]:
                print(f"{r.label:>15} {r.offered_rps or 'max':>6} {r.throughput:8.0f}/s "
                      f"p50 {r.percentile(50):7.2f} p99 {r.percentile(99):7.2f} "
                      f"p99.9 {r.percentile(99.9):7.2f} ms cpu {r.cpu_us_per_call:5.0f} µs",
                      flush=True)  # fmt: skip
        return report(store, results, args)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        redis.stop()
        postgres.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="per measurement")
    parser.add_argument("--rates", default="250,500,1000", help="open-loop calls/s")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop in flight")
    parser.add_argument("--redis-requests", type=int, default=200_000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--empty-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.empty_server:
        asyncio.run(serve_empty(args.empty_server))
        return
    args.rates = [float(r) for r in args.rates.split(",") if r]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="beam-bench-") as workdir:
        text = asyncio.run(measure(args, Path(workdir)))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{dt.date.today().isoformat()}.md"
    path.write_text(text + f"\nWhole run: {time.monotonic() - started:.0f} s.\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
