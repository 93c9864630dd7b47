"""The walkthrough a new user follows, verbatim, against `beam dev` (issue 2, item 2).

`beam dev` runs as a child exactly as a user starts it; the curl commands run through
`bash -c` as a user pastes them. Only the port (free ports, so tests never collide with a
running `beam dev`) and the request token the user is told to paste are substituted.

Two texts are checked: the seed README's walkthrough (kept below as the user got it,
``req_test_'$(date +%s)'`` included) and the "Try it" block of this repository's
README.md, whose commented outputs are asserted as written.

About ``$(date +%s)``: the seed builds the request id from the clock in each of its three
calls, so a walkthrough that crosses a second boundary would check, deduct and finalize
three different requests. Instead of retrying until three calls fit in one second (slow,
and still racy), each command runs with a shell function ``date`` that prints one epoch,
fixed for the whole walkthrough: the command text stays verbatim and the three calls
share one request id, as they do for a user who types them within one second.

Then the same calls go over gRPC, discovered through server reflection only (no
compiled stubs: the descriptors come from the server, messages are built dynamically,
as grpcurl does), and grpcurl itself when it is installed. Finally: a second `beam dev`
on the same state directory keeps the balance, and SIGINT (Ctrl-C) stops Beam, Redis and
PostgreSQL, checked by pid.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from beam_dev.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
DEV_KEY = "beam_test_key_1234567890"
PLACEHOLDER_TOKEN = "YOUR_TOKEN_HERE"

# The seed README's walkthrough, as its users got it (port 8080, token to paste).
SEED_WALKTHROUGH = [
    """curl -H "Authorization: Bearer beam_test_key_1234567890" \\
  http://localhost:8080/v1/balance/test_customer_1""",
    """curl -X POST http://localhost:8080/v1/balance/check \\
  -H "Authorization: Bearer beam_test_key_1234567890" \\
  -H "Content-Type: application/json" \\
  -d '{
    "customer_id": "test_customer_1",
    "estimated_grains": 50000,
    "buffer_multiplier": 1.2,
    "request_id": "req_test_'$(date +%s)'",
    "metadata": {
      "model": "gpt-4"
    }
  }'""",
    """curl -X POST http://localhost:8080/v1/balance/deduct \\
  -H "Authorization: Bearer beam_test_key_1234567890" \\
  -H "Content-Type: application/json" \\
  -d '{
    "customer_id": "test_customer_1",
    "request_id": "req_test_'$(date +%s)'",
    "request_token": "YOUR_TOKEN_HERE",
    "tokens_consumed": 50,
    "model": "gpt-4",
    "is_completion": true
  }'""",
    """curl -X POST http://localhost:8080/v1/balance/finalize \\
  -H "Authorization: Bearer beam_test_key_1234567890" \\
  -H "Content-Type: application/json" \\
  -d '{
    "customer_id": "test_customer_1",
    "request_id": "req_test_'$(date +%s)'",
    "status": "COMPLETED_SUCCESS",
    "actual_prompt_tokens": 234,
    "actual_completion_tokens": 487,
    "total_actual_cost_grains": 48700,
    "model": "gpt-4"
  }'""",
    """curl -H "Authorization: Bearer beam_test_key_1234567890" \\
  http://localhost:8080/v1/balance/test_customer_1""",
]


# -- beam dev as a child process ------------------------------------------------------------


@dataclass
class BeamDev:
    state_dir: Path
    log_path: Path
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> BeamDev:
        argv = [sys.executable, "-m", "beam.cli.main", "dev", "--state-dir", str(self.state_dir),
                "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port)]  # fmt: skip
        with self.log_path.open("ab") as log:
            # Its own session, like a shell job: SIGINT below reaches `beam dev` only, so it
            # alone must stop Redis and PostgreSQL.
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"beam dev exited:\n{self.log_tail()}"
            try:
                if httpx.get(f"http://127.0.0.1:{self.http_port}/ready", timeout=1).is_success:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"beam dev not ready in {timeout}s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])

    def process_tree(self) -> set[int]:
        """`beam dev`, Redis, PostgreSQL (pid files) and every descendant of `beam dev`."""
        assert self.process is not None
        pids = {self.process.pid, *_descendants(self.process.pid)}
        pids.add(int((self.state_dir / "redis" / "redis.pid").read_text().split()[0]))
        postmaster = self.state_dir / "postgres" / "data" / "postmaster.pid"
        pids.add(int(postmaster.read_text().split()[0]))
        return pids

    def interrupt(self, timeout: float = 60.0) -> int:
        """Ctrl-C: SIGINT, then wait (bounded) for `beam dev` to exit."""
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def _descendants(root: int) -> set[int]:
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
    found: set[int] = set()
    frontier = [root]
    while frontier and len(found) < 10_000:
        for child in children.get(frontier.pop(), []):
            if child not in found:
                found.add(child)
                frontier.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its exit status is left


def assert_all_stopped(pids: set[int], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert sorted(p for p in pids if _alive(p)) == []


@pytest.fixture
def dev_run(tmp_path: Path) -> Iterator[list[BeamDev]]:
    """Started `beam dev` processes; whatever a failed test leaves running is killed."""
    runs: list[BeamDev] = []
    yield runs
    for run in runs:
        leftovers = set()
        if run.process is not None and run.process.poll() is None:
            leftovers = run.process_tree()
        run.kill()
        for pid in leftovers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# -- running the commands ---------------------------------------------------------------------


def shell(command: str, dev: BeamDev, epoch: int, token: str = "") -> dict[str, Any]:
    """Run one walkthrough command as pasted, with `date` pinned and the port substituted."""
    command = command.replace("localhost:8080", f"localhost:{dev.http_port}")
    if token:
        command = command.replace(PLACEHOLDER_TOKEN, token)
    script = f"date() {{ printf '%s\\n' {epoch}; }}\n{command}"
    result = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def test_seed_walkthrough_verbatim_then_grpc_by_reflection_then_restart_and_ctrl_c(
    tmp_path: Path, dev_run: list[BeamDev]
) -> None:
    dev = BeamDev(tmp_path / "state", tmp_path / "beam-dev.log").start()
    dev_run.append(dev)
    epoch = int(time.time())
    request_id = f"req_test_{epoch}"

    assert shell(SEED_WALKTHROUGH[0], dev, epoch) == {
        "balance": "100000000", "reserved": "0", "available": "100000000",
    }  # fmt: skip
    check = shell(SEED_WALKTHROUGH[1], dev, epoch)
    token = check.pop("request_token")
    assert check.pop("hold_expires_at_unix_ms").isdigit()
    assert check == {
        "approved": True, "remaining_balance": "99940000", "rejection_reason": "",
        "reserved_grains": "60000", "max_affordable_completion_tokens": "1666666",
        "replayed": False, "granted_completion_tokens": "0",
    }  # fmt: skip
    deduct = shell(SEED_WALKTHROUGH[2], dev, epoch, token)
    assert deduct == {
        "success": True, "remaining_balance": "99940000", "error_code": "",
        "consumed_grains": "3000", "reserved_grains": "60000",
        "covered_completion_tokens": "1000",
    }  # fmt: skip
    final = shell(SEED_WALKTHROUGH[3], dev, epoch)
    assert final == {
        "success": True, "refunded_grains": "11300", "final_balance": "99951300",
        "charged_grains": "48700", "overage_grains": "0", "replayed": False,
    }  # fmt: skip
    assert shell(SEED_WALKTHROUGH[4], dev, epoch) == {
        "balance": "99951300", "reserved": "0", "available": "99951300",
    }  # fmt: skip
    # The three calls were one request, settled once.
    settled = httpx.get(
        f"http://127.0.0.1:{dev.http_port}/v1/requests/{request_id}",
        headers={"Authorization": f"Bearer {DEV_KEY}"},
    ).json()
    assert (settled["status"], settled["actual_cost_grains"]) == ("completed", "48700")

    grpc_walkthrough(dev)
    grpcurl_balance(dev, expected_balance="99902600")

    pids = dev.process_tree()
    assert len(pids) >= 3
    assert dev.interrupt() == 0, dev.log_tail()
    assert_all_stopped(pids)

    again = BeamDev(dev.state_dir, tmp_path / "beam-dev-2.log").start()
    dev_run.append(again)
    assert shell(SEED_WALKTHROUGH[4], again, epoch) == {
        "balance": "99902600", "reserved": "0", "available": "99902600",
    }  # fmt: skip
    pids = again.process_tree()
    assert again.interrupt() == 0, again.log_tail()
    assert_all_stopped(pids)


# -- gRPC through server reflection ---------------------------------------------------------------


class ReflectedService:
    """Calls a service whose descriptors come from the server (grpcurl's method)."""

    def __init__(self, channel: grpc.Channel, service: str) -> None:
        self.channel = channel
        database = ProtoReflectionDescriptorDatabase(channel)
        assert service in database.get_services()
        self.pool = descriptor_pool.DescriptorPool(database)
        self.service = self.pool.FindServiceByName(service)

    def call(self, method_name: str, body: dict[str, Any]) -> dict[str, Any]:
        method = self.service.FindMethodByName(method_name)
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        rpc = self.channel.unary_unary(
            f"/{self.service.full_name}/{method.name}",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        request = json_format.ParseDict(body, request_type())
        response = rpc(request, metadata=(("authorization", f"Bearer {DEV_KEY}"),), timeout=30)
        return json_format.MessageToDict(
            response,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
        )


def grpc_walkthrough(dev: BeamDev) -> None:
    """The same four calls over gRPC, continuing from the REST walkthrough's balance."""
    with grpc.insecure_channel(f"localhost:{dev.grpc_port}") as channel:
        balance = ReflectedService(channel, "beam.balance.v1.BalanceService")
        assert balance.call("GetBalance", {"customer_id": "test_customer_1"}) == {
            "balance": "99951300", "reserved": "0", "available": "99951300",
        }  # fmt: skip
        check = balance.call("CheckBalance", {
            "customer_id": "test_customer_1", "estimated_grains": 50000,
            "buffer_multiplier": 1.2, "request_id": "req_grpc_1",
            "metadata": {"model": "gpt-4"},
        })  # fmt: skip
        token = check.pop("request_token")
        check.pop("hold_expires_at_unix_ms")
        assert check == {
            "approved": True, "remaining_balance": "99891300", "rejection_reason": "",
            "reserved_grains": "60000", "max_affordable_completion_tokens": "1665855",
            "replayed": False, "granted_completion_tokens": "0",
        }  # fmt: skip
        deduct = balance.call("DeductTokens", {
            "customer_id": "test_customer_1", "request_id": "req_grpc_1",
            "request_token": token, "tokens_consumed": 50, "model": "gpt-4",
            "is_completion": True,
        })  # fmt: skip
        assert (deduct["success"], deduct["consumed_grains"], deduct["remaining_balance"]) == (
            True, "3000", "99891300",
        )  # fmt: skip
        final = balance.call("FinalizeRequest", {
            "customer_id": "test_customer_1", "request_id": "req_grpc_1",
            "status": "COMPLETED_SUCCESS", "actual_prompt_tokens": 234,
            "actual_completion_tokens": 487, "total_actual_cost_grains": 48700,
            "model": "gpt-4",
        })  # fmt: skip
        assert (final["refunded_grains"], final["final_balance"], final["charged_grains"]) == (
            "11300", "99902600", "48700",
        )  # fmt: skip
        assert balance.call("GetBalance", {"customer_id": "test_customer_1"}) == {
            "balance": "99902600", "reserved": "0", "available": "99902600",
        }  # fmt: skip
        admin = ReflectedService(channel, "beam.admin.v1.AdminService")
        report = admin.call("VerifyIntegrity", {"customer_id": "test_customer_1"})
        assert (report["ok"], report["customers_checked"]) == (True, "1")


def find_grpcurl() -> str | None:
    cache = Path(os.environ.get("BEAM_CACHE_DIR", Path.home() / ".cache" / "beam"))
    candidate = cache / "grpcurl" / "bin" / "grpcurl"
    return shutil.which("grpcurl") or (str(candidate) if candidate.is_file() else None)


def grpcurl_balance(dev: BeamDev, expected_balance: str) -> None:
    """README's grpcurl command, when grpcurl is installed (optional: it is a Go tool)."""
    grpcurl = find_grpcurl()
    if grpcurl is None:
        print("grpcurl not installed: the reflection client above made the same calls")
        return
    result = subprocess.run(
        [grpcurl, "-plaintext", "-H", f"authorization: Bearer {DEV_KEY}",
         "-d", '{"customer_id": "test_customer_1"}', f"localhost:{dev.grpc_port}",
         "beam.balance.v1.BalanceService/GetBalance"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "balance": expected_balance, "available": expected_balance,
    }  # fmt: skip


# -- README.md's walkthrough, as written ------------------------------------------------------


@dataclass
class ReadmeStep:
    command: str
    expected: str  # the commented output; "…" stands for any text


def readme_walkthrough() -> list[ReadmeStep]:
    """The curl commands of README.md's "Try it" block, each with the output shown under it."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Try it", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    steps: list[ReadmeStep] = []
    command: list[str] = []
    for line in block.splitlines():
        if line.startswith("curl"):
            command = [line]
            continue
        if command and line.strip() and not line.startswith("#"):
            command.append(line)
            continue
        if command:
            steps.append(ReadmeStep("\n".join(command), ""))
            command = []
        if line.startswith("# {"):
            steps[-1].expected = line[2:]
        elif line.startswith("#  ") and steps and steps[-1].expected:
            steps[-1].expected += line[1:].strip()
    if command:
        steps.append(ReadmeStep("\n".join(command), ""))
    return steps


def test_readme_walkthrough_gives_the_outputs_it_shows(
    tmp_path: Path, dev_run: list[BeamDev]
) -> None:
    steps = readme_walkthrough()
    assert [bool(s.expected) for s in steps] == [True] * 5, steps
    dev = BeamDev(tmp_path / "state", tmp_path / "beam-dev.log").start()
    dev_run.append(dev)
    token = ""
    for step in steps:
        output = shell(step.command, dev, int(time.time()), token)
        rendered = json.dumps(output, separators=(",", ":"), ensure_ascii=False)
        pattern = ".*".join(re.escape(piece) for piece in step.expected.split("…"))
        assert re.fullmatch(pattern, rendered), (step.command, rendered, step.expected)
        token = output.get("request_token", token)
    assert token
    pids = dev.process_tree()
    assert dev.interrupt() == 0
    assert_all_stopped(pids)
