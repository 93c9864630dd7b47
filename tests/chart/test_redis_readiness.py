"""The Redis readiness probe (ready-redis.sh) against a real replica syncing a large dataset.

PING answers PONG on a replica from its first second, long before it holds any data; the
probe must say "not ready" until the full sync is done (master_link_status:up), so that a
rolling update does not move on while the master has no synced replica. Two redis-server
processes on 127.0.0.1 (a master holding 100,000 keys, saving its sync payload slowly with
rdb-key-save-delay, and a replica joining it) and the chart's rendered script, run by
/bin/sh exactly as the probe's command runs it; only the path lib.sh is sourced from is
pointed at the rendered copy (the pod mounts it at /opt/beam-redis).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.chart.conftest import Helm
from tests.chart.test_render import container, find, render

pytestmark = pytest.mark.timeout(120)

PASSWORD = "probe-test-password"
KEYS = 100_000
SYNC_DEADLINE_SECONDS = 100.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Redis:
    def __init__(self, workdir: Path, *args: str) -> None:
        self.port = _free_port()
        workdir.mkdir()
        argv = [
            "redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir",
            str(workdir), "--save", "", "--appendonly", "no", "--requirepass", PASSWORD,
            "--masterauth", PASSWORD, "--enable-debug-command", "yes",
            "--repl-diskless-sync-delay", "0", *args,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while self.cli("PING") != "PONG":
            assert time.monotonic() < deadline, f"redis-server on {self.port} did not start"
            time.sleep(0.05)

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            ["redis-cli", "--no-auth-warning", "-p", str(self.port), "--raw", *args],
            env={**os.environ, "REDISCLI_AUTH": PASSWORD},
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return result.stdout.strip()

    def field(self, section: str, name: str) -> str:
        for line in self.cli("INFO", section).splitlines():
            if line.startswith(f"{name}:"):
                return line.split(":", 1)[1].strip()
        return ""

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def probe(helm: Helm, tmp_path: Path) -> tuple[list[str], Path]:
    """The readiness probe's command and the directory holding the rendered scripts."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server and redis-cli are not installed")
    docs = render(helm)
    scripts = tmp_path / "beam-redis"
    scripts.mkdir()
    for name, text in find(docs, "ConfigMap", "beam-redis-config")["data"].items():
        (scripts / name).write_text(text.replace("/opt/beam-redis/", f"{scripts}/"))
    command = container(docs, "StatefulSet", "beam-redis")["readinessProbe"]["exec"]["command"]
    assert command[-1] == "CLI_TIMEOUT_SECONDS=2 exec /bin/sh /opt/beam-redis/ready-redis.sh"
    return [*command[:-1], command[-1].replace("/opt/beam-redis/", f"{scripts}/")], scripts


def _ready(command: list[str], redis: Redis) -> tuple[bool, str]:
    result = subprocess.run(
        command,
        env={"PATH": os.environ["PATH"], "REDIS_PASSWORD": PASSWORD, "REDIS_PORT": str(redis.port)},
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return result.returncode == 0, result.stdout.strip()


def test_a_replica_is_ready_only_once_synced(probe: tuple[list[str], Path], tmp_path: Path) -> None:
    command, _ = probe
    master = Redis(tmp_path / "master")
    replica: Redis | None = None
    try:
        assert master.cli("DEBUG", "POPULATE", str(KEYS), "key", "64") == "OK"
        assert master.cli("CONFIG", "SET", "rdb-key-save-delay", "20") == "OK"  # ~2 s sync
        assert _ready(command, master) == (True, "")

        replica = Redis(tmp_path / "replica", "--replicaof", "127.0.0.1", str(master.port))
        observed = []
        deadline = time.monotonic() + SYNC_DEADLINE_SECONDS
        while True:
            assert time.monotonic() < deadline, observed[-5:]
            ready, said = _ready(command, replica)
            ping = replica.cli("PING")
            observed.append((ready, said, ping))
            if ready:
                break
            time.sleep(0.2)
        not_ready = [o for o in observed if not o[0]]
        # While the link was down PING answered PONG (the old probe: ready) and this one
        # said no, with the reason; during the load PING answers LOADING.
        assert len([o for o in not_ready if o[2] == "PONG"]) >= 3, observed
        assert {ping.split()[0] for _, _, ping in not_ready} <= {"PONG", "LOADING"}, observed
        assert {said for _, said, _ in not_ready} <= {
            "not ready: replica, master_link_status:down",
            "not ready: loading",
        }, observed
        # Ready means synced: the whole dataset is there at the first ready answer.
        assert replica.field("replication", "master_link_status") == "up"
        assert replica.cli("DBSIZE") == str(KEYS)
        assert _ready(command, master) == (True, "")

        # A replica whose master is gone is not ready again.
        master.stop()
        deadline = time.monotonic() + 20
        while replica.field("replication", "master_link_status") != "down":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert _ready(command, replica) == (False, "not ready: replica, master_link_status:down")
    finally:
        master.stop()
        if replica is not None:
            replica.stop()


def test_the_statefulset_waits_after_each_ready_pod(helm: Helm) -> None:
    docs = render(helm)
    assert find(docs, "StatefulSet", "beam-redis")["spec"]["minReadySeconds"] == 10
    docs = render(helm, "--set", "redis.minReadySeconds=30")
    assert find(docs, "StatefulSet", "beam-redis")["spec"]["minReadySeconds"] == 30
