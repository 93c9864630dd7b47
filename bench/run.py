"""Beam's hot-path benchmark (issue 9): every figure next to an empty handler measured in the
same run, on the same machine, with the same load generator.

What one run does (bench/README.md has the method and how to read it):

1. Builds (or finds in the cache) ``ghz`` and ``hey`` at the versions in
   hack/bench/versions.env (hack/bench/build.sh, Go module proxy).
2. Starts real PostgreSQL and Redis (beam_dev.servers), seeds tenant ``bench`` through
   ``beam apply`` (gpt-4 at 30,000,000 input / 60,000,000 output grains per million, 64
   customers ``c0``..``c63`` with 10^12 grains each, one enforcer key), then starts
   ``beam serve`` (production mode, a bench token secret), the empty gRPC servicer and the
   empty FastAPI app (bench/empty_servers.py), each in its own process.
3. Pins the servers to one CPU and everything else (this process, ghz, hey, Redis,
   PostgreSQL) to the other, when there are two.
4. For each call: the empty handler and Beam, closed loop (``--concurrency`` in flight for
   ``--seconds``) for calls/s and server CPU per call, then open loop at ``--open-fraction``
   of the empty handler's closed-loop calls/s for p50/p99/p99.9.
5. The guard row (issue 16; ``--calls guard``, bench/guard_streams.py): a 1,000-token stream
   from a paced fake provider through the real openai SDK, unguarded and through the Python
   client's guard against ``beam serve`` (direct, and behind a proxy that delays every Beam
   response by 20 ms), interleaved: stream-time and first-token overhead, RPCs per stream.
6. Writes bench/results/<date>-<host>.json and .md and prints the tables.

Usage: ``python bench/run.py [--seconds 10] [--concurrency 32] [--open-fraction 0.5]
[--calls get_balance,rest_get_balance,...]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import report as rp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "service"))

from beam.balance.v1 import balance_pb2 as pb  # noqa: E402
from beam.balance.v1 import balance_pb2_grpc as pb_grpc  # noqa: E402
from beam_dev import servers as devservers  # noqa: E402

TOKEN_SECRET = "bench-request-token-secret-0123456789abcdef"  # noqa: S105 (a bench-only stack)
TENANT = "bench"
CUSTOMERS = [f"c{i}" for i in range(64)]
HOT = "c0"  # FinalizeRequest's hot customer
READER = "c1"  # GetBalance's customer (hey takes one URL; gRPC reads the same one)
BALANCE = 10**12  # grains per customer: far more than a run spends
HOT_HOLD_CAP = 8_000  # open holds per customer are limited to 10,000 (MAX_OPEN_HOLDS_PER_CUSTOMER)
PROTO_DIR = ROOT / "proto"
PROTO_FILE = "beam/balance/v1/balance.proto"
SERVICE = "beam.balance.v1.BalanceService"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
CHECK_ESTIMATE = 50_000  # grains; x1.2 buffer = a 60,000-grain hold
ALL_CALLS = [
    "get_balance",
    "rest_get_balance",
    "deduct",
    "finalize_spread",
    "finalize_hot",
    "check",
    "guard",
]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# -- processes: CPU, memory, pinning --------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    """``root`` and its live descendants (the stats of exited children are not counted)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def cpu_seconds(roots: Iterable[int]) -> float:
    """User + system CPU time of the process trees under ``roots`` (from /proc/<pid>/stat)."""
    total = 0
    for root in roots:
        for pid in process_tree(root):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def children_cpu_seconds() -> float:
    """User + system CPU time of this process's waited-for children (the load generators)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rss_mib(roots: Iterable[int]) -> float:
    total_pages = 0
    for root in roots:
        for pid in process_tree(root):
            try:
                total_pages += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
            except OSError:
                continue
    return total_pages * PAGE_KB / 1024


def allowed_cpus(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    return "?"


@dataclass
class Pinning:
    server: str | None  # taskset CPU list for the servers under test, None: not pinned
    load: str | None  # for this process and its children (load generators, Redis, PostgreSQL)

    @classmethod
    def plan(cls, server: str, load: str) -> Pinning:
        available = os.sched_getaffinity(0)
        wanted = {int(c) for c in f"{server},{load}".split(",")}
        if len(available) < 2 or not wanted <= available or not shutil.which("taskset"):
            return cls(None, None)
        return cls(server, load)

    def apply_to_self(self) -> None:
        if self.load is not None:
            os.sched_setaffinity(0, {int(c) for c in self.load.split(",")})

    def server_prefix(self) -> list[str]:
        return ["taskset", "-c", self.server] if self.server is not None else []


# -- the stack ---------------------------------------------------------------------------------


def manifests(customers: Sequence[str] = CUSTOMERS) -> str:
    documents: list[dict[str, Any]] = [
        {
            "apiVersion": "beam.dev/v1alpha1",
            "kind": "BeamPriceList",
            "metadata": {"name": "bench", "namespace": TENANT},
            "spec": {
                "models": [
                    {
                        "model": "gpt-4",
                        "inputGrainsPerMillion": 30_000_000,
                        "outputGrainsPerMillion": 60_000_000,
                    }
                ]
            },
        },
        {
            "apiVersion": "beam.dev/v1alpha1",
            "kind": "BeamApiKey",
            "metadata": {"name": "bench-enforcer", "namespace": TENANT},
            "spec": {"role": "enforcer"},
        },
    ]
    for customer in customers:
        documents.append(
            {
                "apiVersion": "beam.dev/v1alpha1",
                "kind": "BeamCustomer",
                "metadata": {"name": customer, "namespace": TENANT},
                "spec": {
                    "customerId": customer,
                    "credits": [
                        {"id": "bench-seed", "amountGrains": BALANCE, "description": "bench"}
                    ],
                },
            }
        )
    # JSON is YAML: one document per line, separated by ---.
    return "\n---\n".join(json.dumps(d) for d in documents) + "\n"


def seed(env: dict[str, str], workdir: Path) -> str:
    """Applies the manifests with ``beam apply`` (it migrates first); returns the key."""
    return applied_key(apply_manifests(env, workdir, manifests()), "bench-enforcer")


def apply_manifests(env: dict[str, str], workdir: Path, text: str) -> str:
    """``beam apply -f`` of ``text`` (YAML); returns its output (the keys it created)."""
    path = workdir / "bench.yaml"
    path.write_text(text)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "beam.cli.main",
            "apply",
            "-f",
            str(path),
            "--state-dir",
            str(workdir / "no-dev-state"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"beam apply failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout


def applied_key(output: str, name: str) -> str:
    """The key ``beam apply`` printed for the BeamApiKey ``name`` of tenant ``TENANT``."""
    pattern = rf"^beamapikey/{re.escape(name)} \({TENANT}\): key \S+: (\S+)$"
    match = re.search(pattern, output, re.M)
    if not match:
        raise RuntimeError(f"no key {name} in beam apply's output:\n{output}")
    return match.group(1)


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    grpc_target: str | None = None
    http_url: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def spawn(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as out:
        return subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_http(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: server exited:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready in 60 s:\n{log_path.read_text()[-3000:]}")


def wait_grpc(target: str) -> None:
    async def ready() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            await asyncio.wait_for(channel.channel_ready(), timeout=60)

    asyncio.run(ready())


def serve_has_workers() -> bool:
    out = subprocess.run([sys.executable, "-m", "beam.cli.main", "serve", "--help"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    return "--workers" in out.stdout


def start_beam(env: dict[str, str], pinning: Pinning, workdir: Path, workers: int) -> Server:
    http_port, grpc_port = devservers.free_port(), devservers.free_port()
    env = env | {
        "BEAM_HTTP_HOST": "127.0.0.1",
        "BEAM_HTTP_PORT": str(http_port),
        "BEAM_GRPC_HOST": "127.0.0.1",
        "BEAM_GRPC_PORT": str(grpc_port),
        "BEAM_LOG_LEVEL": "WARNING",
    }
    log_path = workdir / "beam-serve.log"
    argv = [*pinning.server_prefix(), sys.executable, "-m", "beam.cli.main", "serve"]
    if workers > 1:  # a supervisor and N worker processes sharing the ports (SO_REUSEPORT)
        argv += ["--workers", str(workers)]
    process = spawn(argv, env, log_path)
    server = Server("beam", process, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}")
    wait_http(f"{server.http_url}/ready", process, log_path)
    return server


def start_empty(kind: str, pinning: Pinning, workdir: Path) -> Server:
    port = devservers.free_port()
    log_path = workdir / f"empty-{kind}.log"
    process = spawn(
        [
            *pinning.server_prefix(),
            sys.executable,
            str(Path(__file__).with_name("empty_servers.py")),
            kind,
            str(port),
        ],
        dict(os.environ),
        log_path,
    )
    if kind == "grpc":
        server = Server("empty-grpc", process, grpc_target=f"127.0.0.1:{port}")
        wait_grpc(f"127.0.0.1:{port}")
    else:
        server = Server("empty-rest", process, http_url=f"http://127.0.0.1:{port}")
        wait_http(f"{server.http_url}/ready", process, log_path)
    return server


# -- holds opened ahead of the measured calls ------------------------------------------------------


def open_holds(
    target: str,
    key: str,
    customers: Sequence[str],
    count: int,
    tag: str,
    in_flight: int = 64,
    *,
    estimated_grains: int = CHECK_ESTIMATE,
    buffer_multiplier: float = 1.2,
) -> list[dict[str, str]]:
    """``count`` real holds (CheckBalance through Beam), round-robin over ``customers``."""

    async def run() -> list[dict[str, str]]:
        holds: list[dict[str, str]] = []
        metadata = (("authorization", f"Bearer {key}"),)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.BalanceServiceStub(channel)  # type: ignore[no-untyped-call]
            queue = iter(range(count))

            async def worker() -> None:
                for index in queue:
                    request = pb.CheckBalanceRequest(
                        customer_id=customers[index % len(customers)],
                        request_id=f"{tag}-{index}",
                        estimated_grains=estimated_grains,
                        buffer_multiplier=buffer_multiplier,
                        metadata=pb.RequestMetadata(model="gpt-4"),
                    )
                    answer = await stub.CheckBalance(request, metadata=metadata, timeout=30)
                    if not answer.approved:
                        raise RuntimeError(
                            f"hold {request.request_id} refused: {answer.rejection_reason}"
                        )
                    holds.append(
                        {
                            "customer_id": request.customer_id,
                            "request_id": request.request_id,
                            "request_token": answer.request_token,
                        }
                    )

            await asyncio.gather(*(worker() for _ in range(in_flight)))
        return holds

    started = time.monotonic()
    holds = asyncio.run(run())
    log(f"opened {len(holds):,} holds ({tag}) in {time.monotonic() - started:.1f} s")
    return holds


# -- call data (ghz takes a JSON array: call i uses element i mod len) ----------------------------


def check_data(tag: str) -> list[dict[str, Any]]:
    # A new request id per call (ghz's template), customers round-robin.
    return [
        {
            "customer_id": c,
            "request_id": f"chk-{tag}-{{{{.RequestNumber}}}}",
            "estimated_grains": str(CHECK_ESTIMATE),
            "buffer_multiplier": 1.2,
            "metadata": {"model": "gpt-4"},
        }
        for c in CUSTOMERS
    ]


def deduct_data(holds: Sequence[dict[str, str]], first_sequence: int) -> list[dict[str, Any]]:
    # 50 completion tokens per call, as a stream reports them; a sequence number per call that
    # grows across runs (each hold sees increasing numbers, so none is a replay).
    return [
        {
            **hold,
            "tokens_consumed": 50,
            "model": "gpt-4",
            "is_completion": True,
            "sequence_number": f"{{{{add .RequestNumber {first_sequence}}}}}",
        }
        for hold in holds
    ]


def finalize_data(holds: Sequence[dict[str, str]]) -> list[dict[str, Any]]:
    # Cost computed from the tokens at the hold's locked prices: 234 x 30 + 487 x 60 grains.
    return [
        {
            **hold,
            "status": "COMPLETED_SUCCESS",
            "actual_prompt_tokens": 234,
            "actual_completion_tokens": 487,
            "model": "gpt-4",
        }
        for hold in holds
    ]


FAKE_HOLDS = [
    {"customer_id": c, "request_id": f"fake-{c}", "request_token": "v1.fake"} for c in CUSTOMERS
]


# -- load generators -------------------------------------------------------------------------------


def _cut_off(error: str) -> bool:
    return any(
        text in error
        for text in (
            "use of closed network connection",
            "client connection is closing",
            "code = Canceled",
        )
    )


@dataclass
class Bench:
    args: argparse.Namespace
    bin_dir: Path
    workdir: Path
    key: str
    store_pids: dict[str, int]
    measurements: list[rp.Measurement] = field(default_factory=list)
    server_prefix: list[str] = field(default_factory=list)  # taskset for a server we start
    guard: rp.GuardBench | None = None  # the guard scenario's runs
    store_urls: dict[str, str] = field(default_factory=dict)  # redis, postgres (their URLs)
    runs: int = 0
    profiles: int = 0

    def _file(self, suffix: str) -> Path:
        self.runs += 1
        return self.workdir / f"run-{self.runs:03d}{suffix}"

    def settle(self, server: Server) -> None:
        """Waits (at most 60 s) until the server and PostgreSQL are idle: an overloaded run
        can leave them working through calls their client gave up on. PostgreSQL too: the
        settlements of one hot customer that outlive their callers (ADR 0010: shielded)
        wait on its row lock, so `beam serve` looks idle while they drain."""
        deadline = time.monotonic() + 60
        pids = [server.pid, self.store_pids["postgres"]]
        while time.monotonic() < deadline:
            before = [cpu_seconds([pid]) for pid in pids]
            time.sleep(0.5)
            if all(cpu_seconds([p]) - b < 0.05 for p, b in zip(pids, before, strict=True)):
                return  # each under 10% of a CPU
        log(f"{server.name} or PostgreSQL still busy after 60 s; measuring anyway")

    def _measure(
        self, server: Server, command: list[str], timeout: float, profile: str | None = None
    ) -> tuple[subprocess.CompletedProcess[str], float, dict[str, float], str, float]:
        if self.args.settle:
            self.settle(server)
        load = loadavg()
        client_cpu = children_cpu_seconds()
        server_cpu = cpu_seconds([server.pid])
        store_cpu = {name: cpu_seconds([pid]) for name, pid in self.store_pids.items()}
        with self._profiling(server, profile):
            out = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, check=False
            )
        server_cpu = cpu_seconds([server.pid]) - server_cpu
        store_cpu = {
            name: cpu_seconds([pid]) - store_cpu[name] for name, pid in self.store_pids.items()
        }
        client_cpu = children_cpu_seconds() - client_cpu
        if out.returncode != 0:
            raise RuntimeError(f"{command[0]} failed ({out.returncode}):\n{out.stderr[-3000:]}")
        return out, server_cpu, store_cpu, load, client_cpu

    @contextlib.contextmanager
    def _profiling(self, server: Server, name: str | None) -> Iterator[None]:
        """With --profile DIR, py-spy samples the server during each closed-loop round, Beam
        and the empty handler alike (collapsed stacks, ``<call>-<server>-NN.txt``;
        bench/profile.py summarizes them). py-spy runs on the load CPU, but with --native it
        stops the server for every sample: the figures of a profiled run are not the bench's."""
        if self.args.profile is None or name is None:
            yield
            return
        self.args.profile.mkdir(parents=True, exist_ok=True)
        self.profiles += 1
        out = self.args.profile / f"{name}-{server.name}-{self.profiles:02d}.txt"
        command = [
            *self.args.py_spy, "record", "--pid", str(server.pid), "--format", "raw",
            "--rate", "250", "--output", str(out), "--subprocesses",
        ]  # fmt: skip
        # Native frames (grpcio's C core, hiredis, upb) need the process stopped per sample.
        command.append("--native" if self.args.native else "--nonblocking")
        spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # attached before the first call
        try:
            yield
        finally:
            spy.send_signal(signal.SIGINT)
            try:
                _, errors = spy.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                _, errors = spy.communicate(timeout=10)
            if not out.exists():
                log(f"py-spy wrote no profile: {errors.decode(errors='replace')[-500:]}")

    def ghz(
        self,
        call: str,
        server: Server,
        method: str,
        data: list[dict[str, Any]],
        *,
        concurrency: int | None = None,
        rps: float | None = None,
        seconds: float | None = None,
        total: int | None = None,
        mode: str | None = None,
        record: bool = True,
        note: str = "",
    ) -> rp.Measurement:
        assert server.grpc_target
        assert seconds or total
        rps = None if rps is None else float(max(1, round(rps)))  # ghz takes whole calls/s
        data_file, report_file = self._file("-data.json"), self._file("-ghz.json")
        data_file.write_text(json.dumps(data))
        command = [
            str(self.bin_dir / "ghz"),
            "--insecure",
            "--proto",
            PROTO_FILE,
            "--import-paths",
            str(PROTO_DIR),
            "--call",
            f"{SERVICE}.{method}",
            "--metadata",
            json.dumps({"authorization": f"Bearer {self.key}"}),
            "--data-file",
            str(data_file),
            "--format",
            "json",
            "--output",
            str(report_file),
            "--connections",
            str(self.args.connections),
            "--timeout",
            f"{self.args.call_timeout:g}s",
            "--cpus",
            str(len(os.sched_getaffinity(0))),
        ]
        if rps is None:
            assert concurrency
            command += ["--concurrency", str(concurrency)]
        else:
            # --async: each call is sent on its tick whether or not earlier ones answered.
            command += ["--async", "--rps", str(round(rps)), "--concurrency", "8"]
        command += ["--duration", f"{seconds:g}s"] if seconds else ["--total", str(total)]
        command.append(server.grpc_target)
        expected = seconds or (total / (rps or 200))  # type: ignore[operator]
        _, server_cpu, store_cpu, load, client_cpu = self._measure(
            server,
            command,
            timeout=expected + 2 * self.args.call_timeout + 120,
            profile=call if note.startswith("round") else None,
        )
        result = json.loads(report_file.read_text())
        details = result.get("details") or []
        cut_off = 0
        if seconds:
            # ghz ends a --duration run by closing its connection: the calls in flight then
            # (at most --concurrency) fail on the client side. They are not the server's.
            kept = [d for d in details if not _cut_off(d.get("error") or "")]
            cut_off, details = len(details) - len(kept), kept
        ok = sum(1 for d in details if d.get("status") == "OK")
        kinds: dict[str, int] = {}
        for d in details:
            if d.get("status") != "OK":
                kind = re.sub(r"\S+:\d+->\S+:\d+", "…", d.get("error") or d.get("status", "?"))
                kinds[kind] = kinds.get(kind, 0) + 1
        measurement = rp.Measurement(
            call=call,
            server=rp.EMPTY if server.name.startswith("empty") else rp.BEAM,
            mode=mode or (rp.CLOSED if rps is None else rp.OPEN),
            tool="ghz",
            seconds=result["total"] / 1e9,
            sent=len(details),
            ok=ok,
            errors=len(details) - ok,
            latencies_ms=[d["latency"] / 1e6 for d in details],
            error_latencies_ms=[d["latency"] / 1e6 for d in details if d.get("status") != "OK"],
            concurrency=concurrency if rps is None else None,
            offered_rps=rps,
            server_cpu_seconds=server_cpu,
            client_cpu_seconds=client_cpu,
            store_cpu_seconds=store_cpu,
            error_kinds=kinds,
            load_average=load,
            cut_off=cut_off,
        )
        self._done(measurement, record, note)
        return measurement

    def hey(
        self,
        call: str,
        server: Server,
        path: str,
        *,
        concurrency: int,
        rps: float | None = None,
        seconds: float | None = None,
        total: int | None = None,
        mode: str | None = None,
        record: bool = True,
        note: str = "",
    ) -> rp.Measurement:
        assert server.http_url
        assert seconds or total
        command = [
            str(self.bin_dir / "hey"),
            "-c",
            str(concurrency),
            "-o",
            "csv",
            "-cpus",
            str(len(os.sched_getaffinity(0))),
            "-t",
            f"{self.args.call_timeout:g}",
            "-H",
            f"Authorization: Bearer {self.key}",
        ]
        if rps is not None:
            # hey has no open loop: -q paces each of the -c workers, which waits for its answer.
            command += ["-q", f"{rps / concurrency:.4f}"]
        command += ["-z", f"{seconds:g}s"] if seconds else ["-n", str(total)]
        command.append(f"{server.http_url}{path}")
        out, server_cpu, store_cpu, load, client_cpu = self._measure(
            server,
            command,
            timeout=(seconds or 60) + self.args.call_timeout + 120,
            profile=call if note.startswith("round") else None,
        )
        latencies: list[float] = []
        statuses: dict[str, int] = {}
        start, end = math.inf, 0.0
        for line in out.stdout.splitlines()[1:]:
            fields = line.split(",")
            if len(fields) < 8:
                continue
            latency, status, offset = float(fields[0]), fields[6], float(fields[7])
            latencies.append(latency * 1000)
            statuses[status] = statuses.get(status, 0) + 1
            start, end = min(start, offset), max(end, offset + latency)
        ok = statuses.get("200", 0)
        measurement = rp.Measurement(
            call=call,
            server=rp.EMPTY if server.name.startswith("empty") else rp.BEAM,
            mode=mode or (rp.CLOSED if rps is None else rp.OPEN),
            tool="hey",
            seconds=end - start if latencies else 0.0,
            sent=len(latencies),
            ok=ok,
            errors=len(latencies) - ok,
            latencies_ms=latencies,
            concurrency=concurrency if rps is None else None,
            offered_rps=rps,
            server_cpu_seconds=server_cpu,
            client_cpu_seconds=client_cpu,
            store_cpu_seconds=store_cpu,
            error_kinds={f"HTTP {k}": v for k, v in statuses.items() if k != "200"},
            load_average=load,
        )
        self._done(measurement, record, note)
        return measurement

    def _done(self, m: rp.Measurement, record: bool, note: str = "") -> None:
        if record:
            self.measurements.append(m)
        load = f"{m.concurrency} in flight" if m.offered_rps is None else f"{m.offered_rps:.0f}/s"
        note = f"({note}) " if note else ""
        log(
            f"{note}{m.call} {m.server} {m.tool} {load}: "
            f"{m.throughput:,.0f}/s ok={m.ok:,} err={m.errors:,} p50 {m.p(50):.2f} "
            f"p99 {m.p(99):.2f} p99.9 {m.p(99.9):.2f} ms, server CPU "
            f"{m.cpu_us_per_call:.0f} µs/call, load {m.load_average}"
        )
        if m.errors:
            latencies = sorted(m.error_latencies_ms)
            span = f"{latencies[0]:.0f} to {latencies[-1]:.0f} ms" if latencies else "?"
            log(f"  errors (latency {span}): {m.error_kinds}")

    def record(self, m: rp.Measurement) -> None:
        self._done(m, True, f"{len(m.round_rps)} rounds" if m.round_rps else "")

    def alternate(
        self,
        run_empty: Callable[[int], rp.Measurement],
        run_beam: Callable[[int], rp.Measurement],
    ) -> tuple[rp.Measurement, rp.Measurement]:
        """Closed loop in --rounds rounds, empty then Beam, back to back: both see the same
        machine, and the per-round ratios show how much the machine moved."""
        empty_parts, beam_parts = [], []
        for index in range(self.args.rounds):
            empty_parts.append(run_empty(index))
            beam_parts.append(run_beam(index))
        empty, beam = rp.merge(empty_parts), rp.merge(beam_parts)
        self.record(empty)
        self.record(beam)
        return empty, beam


# -- scenarios -------------------------------------------------------------------------------------
#
# Each call: the empty handler and Beam in closed loop (calls/s, CPU per call), then in open
# loop at --open-fraction of the empty handler's calls/s (issue 9's latency rate), and Beam
# once more at the same fraction of its own calls/s (a rate it can sustain). When Beam's
# closed loop is already below the empty-derived rate, that open loop is known to overload
# it; it then runs for --overload-seconds only, enough to show the queue, not to wait on it.


@dataclass
class Servers:
    beam: Server
    empty_grpc: Server
    empty_rest: Server


@dataclass
class Plan:
    """The open-loop runs after both closed loops: (server, mode, rate, number of calls)."""

    runs: list[tuple[Server, str, float, int]]


def open_calls(args: argparse.Namespace, rate: float, seconds: float | None = None) -> int:
    """Open loop runs --total calls (not --duration): ghz then waits for every answer."""
    return max(100, math.ceil(rate * (seconds or args.seconds)))


def open_plan(
    args: argparse.Namespace,
    servers: Servers,
    empty_server: Server,
    empty: rp.Measurement,
    beam: rp.Measurement,
) -> Plan:
    rate = args.open_fraction * empty.throughput
    overloads = beam.throughput < 0.9 * rate
    own = args.open_fraction * beam.throughput
    return Plan(
        [
            (empty_server, rp.OPEN, rate, open_calls(args, rate)),
            (
                servers.beam,
                rp.OPEN,
                rate,
                open_calls(args, rate, args.overload_seconds if overloads else None),
            ),
            (servers.beam, rp.OPEN_OWN, own, open_calls(args, own)),
        ]
    )


def round_calls(args: argparse.Namespace, warm_up: rp.Measurement) -> int:
    """Closed-loop rounds run --total calls (about --seconds / --rounds at the warm-up's
    rate), not --duration: ghz would end those by cutting the calls in flight."""
    return max(50, math.ceil(warm_up.throughput * args.seconds / args.rounds))


def simple_grpc(
    bench: Bench,
    servers: Servers,
    call: str,
    method: str,
    data: Callable[[str], list[dict[str, Any]]],
) -> None:
    """``data(tag)`` gives each run its call data (a tag so request ids never repeat)."""
    args, c = bench.args, bench.args.concurrency
    warm = {
        server.name: bench.ghz(
            call,
            server,
            method,
            data("w" + server.name),
            concurrency=c,
            total=args.warm_up,
            record=False,
            note="warm-up",
        )
        for server in (servers.empty_grpc, servers.beam)
    }

    def closed(server: Server) -> Callable[[int], rp.Measurement]:
        total = round_calls(args, warm[server.name])
        return lambda i: bench.ghz(
            call,
            server,
            method,
            data(f"c{server.name}{i}"),
            concurrency=c,
            total=total,
            record=False,
            note=f"round {i + 1}",
        )

    empty, beam = bench.alternate(closed(servers.empty_grpc), closed(servers.beam))
    for index, (server, mode, rate, total) in enumerate(
        open_plan(args, servers, servers.empty_grpc, empty, beam).runs
    ):
        bench.ghz(call, server, method, data(f"o{index}"), mode=mode, rps=rate, total=total)


def scenario_get_balance(bench: Bench, servers: Servers) -> None:
    simple_grpc(bench, servers, "get_balance", "GetBalance", lambda tag: [{"customer_id": READER}])


def scenario_rest_get_balance(bench: Bench, servers: Servers) -> None:
    args, path, call = bench.args, f"/v1/balance/{READER}", "rest_get_balance"
    warm = {
        server.name: bench.hey(
            call,
            server,
            path,
            concurrency=args.concurrency,
            total=args.warm_up,
            record=False,
            note="warm-up",
        )
        for server in (servers.empty_rest, servers.beam)
    }

    def closed(server: Server) -> Callable[[int], rp.Measurement]:
        total = round_calls(args, warm[server.name])
        return lambda i: bench.hey(
            call,
            server,
            path,
            concurrency=args.concurrency,
            total=total,
            record=False,
            note=f"round {i + 1}",
        )

    empty, beam = bench.alternate(closed(servers.empty_rest), closed(servers.beam))
    for server, mode, rate, total in open_plan(args, servers, servers.empty_rest, empty, beam).runs:
        bench.hey(
            call,
            server,
            path,
            mode=mode,
            concurrency=args.open_workers,
            rps=rate,
            seconds=total / rate,
        )


def scenario_check(bench: Bench, servers: Servers) -> None:
    simple_grpc(bench, servers, "check", "CheckBalance", check_data)


def scenario_deduct(bench: Bench, servers: Servers) -> None:
    assert servers.beam.grpc_target
    holds = open_holds(servers.beam.grpc_target, bench.key, CUSTOMERS, 512, "ded")
    counter = iter(range(1, 100))

    def data(tag: str) -> list[dict[str, Any]]:
        return deduct_data(holds, next(counter) * 10_000_000)

    simple_grpc(bench, servers, "deduct", "DeductTokens", data)


def scenario_finalize(
    bench: Bench, servers: Servers, call: str, customers: Sequence[str], cap: int | None
) -> None:
    """Every Finalize settles its own hold, opened just before its run (not timed)."""
    args, target, c = bench.args, servers.beam.grpc_target, bench.args.concurrency
    assert target
    fake = finalize_data(FAKE_HOLDS)
    warm_empty = bench.ghz(
        call,
        servers.empty_grpc,
        "FinalizeRequest",
        fake,
        concurrency=c,
        total=args.warm_up,
        record=False,
        note="warm-up",
    )

    def finalize(tag: str, count: int, **load: Any) -> rp.Measurement:
        count = min(count, cap) if cap else count
        holds = open_holds(target, bench.key, customers, count, f"{call}-{tag}")
        return bench.ghz(
            call, servers.beam, "FinalizeRequest", finalize_data(holds), total=len(holds), **load
        )

    # The warm-up also estimates Beam's rate, to open about --seconds' worth of holds.
    warm_beam = finalize("w", args.warm_up, concurrency=c, record=False, note="warm-up")
    per_round = round_calls(args, warm_beam)
    if cap:
        per_round = min(per_round, cap // args.rounds)
    holds = open_holds(target, bench.key, customers, per_round * args.rounds, f"{call}-c")
    empty_total = round_calls(args, warm_empty)
    empty, beam = bench.alternate(
        lambda i: bench.ghz(
            call,
            servers.empty_grpc,
            "FinalizeRequest",
            fake,
            concurrency=c,
            total=empty_total,
            record=False,
            note=f"round {i + 1}",
        ),
        lambda i: bench.ghz(
            call,
            servers.beam,
            "FinalizeRequest",
            finalize_data(holds[i * per_round : (i + 1) * per_round]),
            concurrency=c,
            total=per_round,
            record=False,
            note=f"round {i + 1}",
        ),
    )
    for index, (server, mode, rate, total) in enumerate(
        open_plan(args, servers, servers.empty_grpc, empty, beam).runs
    ):
        if server is servers.beam:
            finalize(f"o{index}", total, mode=mode, rps=rate)
        elif not any(
            m.server == rp.EMPTY and m.mode == mode and m.call.startswith("finalize")
            for m in bench.measurements
        ):  # the empty handler does not look at customers: its open loop is measured once
            bench.ghz(call, server, "FinalizeRequest", fake, mode=mode, rps=rate, total=total)


def scenario_guard(bench: Bench, servers: Servers) -> None:
    """Issue 16: a stream through the client's guard against the same stream unguarded.

    bench/stream_servers.py (the paced provider and the delaying proxy in front of Beam's
    gRPC port) runs on the servers' CPU; the app — this process, the real openai SDK and
    beam_client — on the load CPU. bench/guard_streams.py runs the rounds."""
    import guard_streams

    args, beam = bench.args, servers.beam
    assert beam.grpc_target
    provider_port, proxy_port = devservers.free_port(), devservers.free_port()
    log_path = bench.workdir / "stream-servers.log"
    argv = [
        *bench.server_prefix, sys.executable, str(Path(__file__).with_name("stream_servers.py")),
        "--provider-port", str(provider_port), "--proxy-port", str(proxy_port),
        "--upstream", beam.grpc_target, "--delay-ms", f"{args.guard_delay_ms:g}",
        "--rate", f"{args.guard_rate:g}", "--prompt-tokens", str(guard_streams.PROMPT_TOKENS),
    ]  # fmt: skip
    streams = Server("stream-servers", spawn(argv, dict(os.environ), log_path),
                     http_url=f"http://127.0.0.1:{provider_port}")  # fmt: skip
    try:
        wait_http(f"{streams.http_url}/ready", streams.process, log_path)
        if args.settle:
            bench.settle(beam)
        setup = guard_streams.Setup(
            beam_target=beam.grpc_target, proxy_target=f"127.0.0.1:{proxy_port}",
            provider_url=f"http://127.0.0.1:{provider_port}", api_key=bench.key,
            customers=CUSTOMERS[2:], tokens=args.guard_tokens, rate=args.guard_rate,
            delay_ms=args.guard_delay_ms, rounds=args.guard_rounds,
            warm_up=args.guard_warm_up, checks_per_round=args.guard_checks,
            loadavg=loadavg, log=log, redis_url=bench.store_urls.get("redis", ""),
            postgres_dsn=bench.store_urls.get("postgres", ""),
        )  # fmt: skip
        bench.guard = guard_streams.measure(setup)
    finally:
        streams.stop()
    for row in rp.build_guard_rows(bench.guard):
        log(
            f"{row.title}: stream {row.direct_stream_ms:.1f} -> {row.stream_ms:.1f} ms "
            f"({(row.stream_ratio - 1) * 100:+.1f} %), first token "
            f"{row.first_token_overhead_ms:+.1f} ms (Check p50 in place {row.check_p50_ms:.1f} ms, "
            f"back to back {row.check_hot_p50_ms:.1f} ms), "
            f"RPCs max {row.rpcs_max}, {row.complete}/{len(row.guarded)} complete"
        )


SCENARIOS: dict[str, Callable[[Bench, Servers], None]] = {
    "get_balance": scenario_get_balance,
    "rest_get_balance": scenario_rest_get_balance,
    "deduct": scenario_deduct,
    "finalize_spread": lambda b, s: scenario_finalize(b, s, "finalize_spread", CUSTOMERS, None),
    "finalize_hot": lambda b, s: scenario_finalize(b, s, "finalize_hot", [HOT], HOT_HOLD_CAP),
    "check": scenario_check,
    "guard": scenario_guard,
}


def memory_run(bench: Bench, beam: Server, calls: int) -> list[tuple[int, float]]:
    """--rss-calls N: N more GetBalance calls (closed loop) in ten parts, `beam serve`'s RSS
    after each: [(calls of this run so far, MiB)]. Growth would show as a rising series."""
    series, done, part = [(0, rss_mib([beam.pid]))], 0, max(1, calls // 10)
    while done < calls:
        count = min(part, calls - done)
        bench.ghz(
            "get_balance",
            beam,
            "GetBalance",
            [{"customer_id": READER}],
            concurrency=bench.args.concurrency,
            total=count,
            record=False,
            note=f"memory {done + count:,}/{calls:,}",
        )
        done += count
        series.append((done, rss_mib([beam.pid])))
        log(f"beam serve RSS {series[-1][1]:.1f} MiB after {done:,} more calls")
    return series


# -- report ----------------------------------------------------------------------------------------


def versions_env() -> dict[str, str]:
    values = {}
    for line in (ROOT / "hack" / "bench" / "versions.env").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            name, value = line.split("=", 1)
            values[name.strip()] = value.strip()
    return values


def machine(
    load_start: str, load_end: str, pinning: Pinning, pins: dict[str, str]
) -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    memory_kb = int(Path("/proc/meminfo").read_text().split()[1])

    def version(argv: list[str]) -> str:
        try:
            return subprocess.run(
                argv, capture_output=True, text=True, check=False, timeout=10
            ).stdout.strip()
        except OSError:
            return "?"

    import fastapi
    import uvicorn

    pg_bin = devservers.find_pg_bin_dir().path
    tools = versions_env()
    return {
        "host": socket.gethostname(),
        "nproc": os.cpu_count(),
        "model_name": cpu,
        "memory_gib": round(memory_kb / 1024 / 1024, 1),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "fastapi": fastapi.__version__,
        "uvicorn": uvicorn.__version__,
        "redis": version([str(devservers.find_redis_server().path), "--version"]),
        "postgres": version([str(Path(pg_bin) / "postgres"), "--version"]),
        "ghz": tools.get("GHZ_VERSION"),
        "hey": tools.get("HEY_VERSION"),
        "load_average_start": load_start,
        "load_average_end": load_end,
        "pinning": {"servers": pinning.server, "load_and_stores": pinning.load, **pins},
    }


def render_guard(guard: rp.GuardBench) -> list[str]:
    rows = rp.build_guard_rows(guard)
    loads = [float(load.split()[0]) for load in guard.load_averages]
    checks = ", ".join(f"{len(v)} on the {k} path" for k, v in guard.check_ms.items())
    in_place = ", ".join(f"{len(v)} on the {k} path" for k, v in guard.check_in_place_ms.items())
    return [
        f"## The guard: a {guard.tokens:,}-token stream at {guard.rate:,.0f} tokens/s (issue 16)",
        "",
        f"{len(loads)} rounds of four units in an order rotating by round, each a stream "
        "unguarded (the real `openai` SDK straight to a paced fake provider on loopback), a "
        "pause, then one of: the stream through `async with beam.guard(...) as g:` / "
        "`g.openai(stream)` against `beam serve`; the same through a second client whose "
        f"target is a TCP proxy that delays every Beam response by {guard.delay_ms:g} ms; a "
        "lone CheckBalance on either path, in place of the guard's own ("
        f"{in_place}); then CheckBalance calls back to back ({checks}); "
        "bench/guard_streams.py. Medians over the rounds; the load average (1 min) before "
        f"the rounds ranged {min(loads, default=math.nan):.1f} to "
        f"{max(loads, default=math.nan):.1f}.",
        "",
        *rp.guard_table(rows),
        "",
        "Stream time: first content chunk to last chunk, as the app sees them; its overhead "
        "is the guarded median over the unguarded median, in brackets the lowest and highest "
        "per-round ratio. First token: from just before the guard is entered (unguarded: "
        "before the provider is called) to the first content chunk; the guard's includes its "
        "CheckBalance, so the target is the p50 of a lone Check made where the guard makes "
        "its own (right after an unguarded stream and the same pause) on the same path, in "
        "the same rounds, + 1 ms; next to it the p50 of Checks back to back (every process "
        "on the path awake: the wake-ups an idle path pays are bench/idle_wakeup.py's), in "
        "brackets the median of the guard's own Check (its entry). "
        "Start to last chunk: both together. App CPU: the process time "
        "of the app (the SDK, the guard, the gRPC client) over one stream. RPCs: the client's "
        '`stats()["calls"]` over the stream, and the HTTP/2 streams the proxy saw open; '
        "complete: streams that delivered every token (none cut by the guard).",
        "",
        "### Waking an idle path",
        "",
        "The same call back to back and after the app idled (bench/guard_streams.py "
        "`wakeup`): each process a call wakes after a pause (the app's and Beam's gRPC "
        "threads and event loops, Redis, PostgreSQL) adds its wake-up latency, which Checks "
        "back to back never pay and a guard's Check, made after the app read a stream for a "
        "third of a second, always does. That, not the guard, is the gap between the two "
        "Check columns above.",
        "",
        *rp.wakeup_table(guard.wakeup_ms),
        "",
        "### Every stream",
        "",
        *rp.stream_run_table(guard.runs),
        "",
    ]


def render(
    context: dict[str, Any],
    rows: list[rp.Row],
    measurements: list[rp.Measurement],
    guard: rp.GuardBench | None = None,
) -> str:
    m, s = context["machine"], context["settings"]
    pins = m["pinning"]
    if pins["servers"] is not None:
        pinned = (
            f"`beam serve` and the empty servers on CPU {pins['servers']}; this script, "
            f"ghz, hey, Redis and PostgreSQL on CPU {pins['load_and_stores']} (taskset / "
            f"sched_setaffinity; checked in /proc: {pins['checked']})"
        )
    else:
        pinned = "not pinned (fewer than two CPUs available, or no taskset)"
    rss = context["rss_mib"]
    lines = [
        f"# Beam hot-path benchmark, {context['date']} on {m['host']}",
        "",
        "Produced by `make bench` (`python bench/run.py`); method and caveats: "
        "[bench/README.md](../README.md).",
        "",
        "## Machine",
        f"- code: {context['code']}",
        f"- {m['nproc']} CPUs ({m['model_name']}), {m['memory_gib']} GiB; {m['kernel']}",
        f"- Python {m['python']}, grpcio {m['grpcio']}, FastAPI {m['fastapi']}, uvicorn "
        f"{m['uvicorn']}; {m['redis']}; {m['postgres']}; ghz {m['ghz']}, hey {m['hey']}",
        f"- load average (1/5/15 min) at the start: **{m['load_average_start']}**, at the end: "
        f"**{m['load_average_end']}** (the machine is shared: anything above 0 is other work)",
        f"- pinning: {pinned}",
        f"- `beam serve` with {s['workers']} worker process(es); ghz over "
        f"{s['ghz_connections']} HTTP/2 connection(s), hey over one HTTP/1.1 connection per "
        "hey worker (`-c`)",
        f"- closed loop: {s['concurrency']} calls in flight, about {s['seconds']:g} s per "
        f"server in {s['rounds']} rounds alternating empty handler and Beam (each round a "
        f"fixed number of calls, from a {s['warm_up_calls']}-call warm-up's rate); open loop: "
        f"{s['open_fraction']:g}{rp.TIMES} the empty handler's closed-loop calls/s for "
        f"{s['seconds']:g} s ({s['overload_seconds']:g} s when Beam's closed loop is already "
        f"slower; ghz `--async`; REST: hey `-q` over {s['open_workers']} workers)",
        f"- `beam serve` RSS: {rss['beam_idle']:.0f} MiB idle, {rss['beam_after']:.0f} MiB after "
        f"the run; empty gRPC server {rss['empty_grpc_after']:.0f} MiB, empty FastAPI app "
        f"{rss['empty_rest_after']:.0f} MiB after the run",
        *(
            [
                f"- `beam serve` RSS over {series[-1][0]:,} more GetBalance calls after the "
                "run (`--rss-calls`): " + ", ".join(f"{mib:.0f} MiB" for _, mib in series)
            ]
            if (series := context.get("rss_series"))
            else []
        ),
        f"- whole run: {context['run_seconds']:.0f} s",
        "",
    ]
    if rows:
        lines += [
            "## Result",
            "",
            *rp.markdown_table(rows),
            "",
            "Ratio: Beam's closed-loop calls/s over the empty handler's (same call, same load "
            "generator, same settings); in brackets the lowest and highest ratio of the "
            "back-to-back rounds, a measure of how much the shared machine moved. Latency: the "
            "open-loop run at the rate in its column; "
            '"overloaded" means the server answered less than 95% of what was offered, or '
            "failed calls, so its percentiles measure a queue. CPU: user + system time of the "
            "server's process over the closed-loop run, per call answered. The empty handler "
            "of GetBalance (REST) is the empty FastAPI app; FinalizeRequest's empty handler is "
            "measured once for both Finalize rows.",
            "",
            "## Every measurement",
            "",
            *rp.measurement_table(measurements),
            "",
        ]
    if guard is not None:
        lines += render_guard(guard)
    closed = [m for m in measurements if m.mode == rp.CLOSED]
    if closed:
        busiest = max(m.server_busy for m in closed)
        lines += [
            "## How much CPU the servers got",
            "",
            f"In the closed loops the server under test was busy at most **{busiest:.0%}** "
            f"of the wall time (median {statistics.median(m.server_busy for m in closed):.0%}; "
            'column "server busy"). A server with 32 calls waiting and a CPU of its own '
            "is near 100%; less means the scheduler gave its CPU to other work on the "
            "machine, so calls/s (and the calls/s ratio) measure the machine as much as "
            "the code. The **CPU ratio** (the empty handler's CPU per call over Beam's) is "
            "what the calls/s ratio would be if both servers got the same share of a CPU, "
            "whatever that share was: the steadier figure on a shared machine.",
            "",
        ]
    if context.get("notes"):
        lines += ["## Notes", "", *(f"- {note}" for note in context["notes"]), ""]
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------


def code_version() -> str:
    """The commit measured, and whether the working tree differed from it under service/
    (the server) or clients/python/ (the guard row's client)."""

    def git(*argv: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(ROOT), *argv], capture_output=True, text=True, check=False
        )
        return out.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    status = git("status", "--porcelain", "--", "service", "clients/python")
    changed = [line for line in status.splitlines() if line]
    if changed:
        return (
            f"{head} + uncommitted changes in {len(changed)} files under service/ and "
            "clients/python/"
        )
    return f"{head} (service/ and clients/python/ as committed)"


def build_tools() -> Path:
    log("building / finding ghz and hey (hack/bench/build.sh)")
    out = subprocess.run(
        ["bash", str(ROOT / "hack" / "bench" / "build.sh")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def run(
    args: argparse.Namespace,
) -> tuple[dict[str, Any], list[rp.Row], list[rp.Measurement], rp.GuardBench | None]:
    started, load_start = time.monotonic(), loadavg()
    bin_dir = build_tools()
    pinning = Pinning.plan(args.server_cpus, args.load_cpus)
    pinning.apply_to_self()
    log(f"load average {load_start}; pinning: servers {pinning.server}, load {pinning.load}")
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="beam-bench-") as tmp:
        workdir = Path(tmp)
        postgres = devservers.PostgresServer(workdir / "postgres")
        redis = devservers.RedisServer(workdir / "redis")
        try:
            postgres.start()
            redis.start()
            env = dict(os.environ) | {
                "BEAM_ENVIRONMENT": "production",
                "BEAM_DATABASE_URL": postgres.dsn,
                "BEAM_REDIS_URL": redis.url,
                "BEAM_REQUEST_TOKEN_SECRET": TOKEN_SECRET,
            }
            key = seed(env, workdir)
            log(f"seeded tenant {TENANT}: {len(CUSTOMERS)} customers, gpt-4 prices, a key")
            beam = start_beam(env, pinning, workdir, args.workers)
            servers.append(beam)
            empty_grpc = start_empty("grpc", pinning, workdir)
            servers.append(empty_grpc)
            empty_rest = start_empty("rest", pinning, workdir)
            servers.append(empty_rest)
            time.sleep(2)
            rss = {"beam_idle": rss_mib([beam.pid])}
            assert redis.pid
            assert postgres.pid
            store_pids = {"redis": redis.pid, "postgres": postgres.pid}
            checked = [f"{s.name} {allowed_cpus(s.pid)}" for s in servers]
            checked += [
                f"redis {allowed_cpus(redis.pid)}",
                f"this script {allowed_cpus(os.getpid())}",
            ]
            pins = {"checked": ", ".join(checked)}
            bench = Bench(args, bin_dir, workdir, key, store_pids)
            bench.store_urls = {"redis": redis.url, "postgres": postgres.dsn}
            bench.server_prefix = pinning.server_prefix()
            group = Servers(beam, empty_grpc, empty_rest)
            for name in args.calls:
                log(f"--- {name}")
                SCENARIOS[name](bench, group)
            time.sleep(2)
            series = memory_run(bench, beam, args.rss_calls) if args.rss_calls else []
            rss |= {
                "beam_after": rss_mib([beam.pid]),
                "empty_grpc_after": rss_mib([empty_grpc.pid]),
                "empty_rest_after": rss_mib([empty_rest.pid]),
            }
            if beam.process.poll() is not None:
                raise RuntimeError("beam serve died during the run")
        finally:
            for server in servers:
                server.stop()
            redis.stop()
            postgres.stop()
    notes = [
        f"`beam serve` ran with {args.workers} worker process(es) "
        f"(`--workers {args.workers}`; CPU and RSS are summed over its process tree); the "
        "empty handlers are one process each. `bench/run.py --workers N --server-cpus 0,1` "
        "measures N workers on both CPUs (then sharing them with the load generator).",
    ]
    context = {
        "date": dt.date.today().isoformat(),
        "code": code_version(),
        "machine": machine(load_start, loadavg(), pinning, pins),
        "settings": {
            "seconds": args.seconds,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "workers": args.workers,
            "ghz_connections": args.connections,
            "warm_up_calls": args.warm_up,
            "open_fraction": args.open_fraction,
            "open_workers": args.open_workers,
            "overload_seconds": args.overload_seconds,
            "call_timeout_seconds": args.call_timeout,
            "calls": args.calls,
        },
        "rss_mib": {k: round(v, 1) for k, v in rss.items()},
        "rss_series": series,
        "run_seconds": round(time.monotonic() - started, 1),
        "notes": notes,
    }
    return context, rp.build_rows(bench.measurements), bench.measurements, bench.guard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per closed/open run")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop in flight")
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="closed loop: alternating empty/Beam rounds of --seconds/rounds",
    )
    parser.add_argument("--warm-up", type=int, default=300, help="calls per server and call")
    parser.add_argument(
        "--open-fraction",
        type=float,
        default=0.5,
        help="open-loop rate as a fraction of the empty handler's calls/s",
    )
    parser.add_argument("--open-workers", type=int, default=64, help="hey workers, open loop")
    parser.add_argument(
        "--overload-seconds",
        type=float,
        default=3.0,
        help="open loop length when Beam cannot sustain the rate",
    )
    parser.add_argument("--call-timeout", type=float, default=10.0, help="seconds per call")
    parser.add_argument("--calls", default=",".join(ALL_CALLS), help="scenarios to run")
    parser.add_argument("--server-cpus", default="0", help="taskset CPU list for the servers")
    parser.add_argument("--load-cpus", default="1", help="CPU list for load and stores")
    parser.add_argument("--workers", type=int, default=1, help="beam serve --workers N")
    parser.add_argument(
        "--no-settle",
        dest="settle",
        action="store_false",
        help="do not wait for an idle server before each run",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=None,
        help="ghz HTTP/2 connections (default 1; 4 per worker when N > 1)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--guard-rounds", type=int, default=21, help="guard: rounds measured")
    parser.add_argument("--guard-warm-up", type=int, default=2, help="guard: rounds not kept")
    parser.add_argument("--guard-tokens", type=int, default=1000, help="guard: tokens/stream")
    parser.add_argument("--guard-rate", type=float, default=3000.0, help="guard: tokens/s")
    parser.add_argument(
        "--guard-delay-ms", type=float, default=20.0, help="guard: added to Beam's responses"
    )
    parser.add_argument(
        "--guard-checks", type=int, default=3, help="guard: lone CheckBalances per round, path"
    )
    parser.add_argument(
        "--rss-calls",
        type=int,
        default=0,
        help="after the run, this many GetBalance calls more, RSS read every tenth",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="py-spy every closed-loop round into this directory (bench/profile.py reads it)",
    )
    parser.add_argument(
        "--native", action="store_true", help="--profile: native frames too (grpcio's C core)"
    )
    args = parser.parse_args()
    args.py_spy = [str(Path(sys.executable).with_name("py-spy"))]
    if args.profile is not None and not Path(args.py_spy[0]).exists():
        parser.error("--profile needs py-spy in the venv: .venv/bin/pip install py-spy")
    args.calls = [c for c in args.calls.split(",") if c]
    if args.workers > 1 and not serve_has_workers():
        parser.error("this beam serve has no --workers option")
    if args.connections is None:
        args.connections = 1 if args.workers == 1 else 4 * args.workers
    unknown = set(args.calls) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown --calls {sorted(unknown)}; known: {', '.join(SCENARIOS)}")

    context, rows, measurements, guard = run(args)
    host = re.sub(r"[^A-Za-z0-9-]+", "-", context["machine"]["host"]).strip("-") or "host"
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"-workers{args.workers}" if args.workers > 1 else ""
    stem = args.out / f"{context['date']}-{host}{suffix}"
    text = render(context, rows, measurements, guard)
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(
        json.dumps(
            rp.to_json(
                rows,
                measurements,
                guard=rp.guard_json(guard, rp.build_guard_rows(guard)) if guard else None,
                **context,
            ),
            indent=2,
            default=str,
        )
        + "\n"
    )
    if rows:
        print("\n".join(rp.markdown_table(rows)))
    if guard is not None:
        print("\n".join(rp.guard_table(rp.build_guard_rows(guard))))
    m = context["machine"]
    print(
        f"\n{m['nproc']} CPUs, {m['model_name']}; load average {m['load_average_start']} "
        f"-> {m['load_average_end']}; wrote {stem}.md and .json"
    )


if __name__ == "__main__":
    main()
