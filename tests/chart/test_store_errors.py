"""Redis's "not now" replies are STORE_UNAVAILABLE (retryable), never INTERNAL.

The chart's Redis refuses writes with NOREPLICAS while a master has fewer in-sync replicas
than min-replicas-to-write (during a failover, or while a restarted replica resyncs), a
replica answers MASTERDOWN when it lost its master and may not serve stale data, and a
Cluster answers TRYAGAIN while a slot moves. Each means the command did nothing, so
`RedisStore` retries it and then answers STORE_UNAVAILABLE, as it does for LOADING.
NOREPLICAS and MASTERDOWN come from real redis-server processes; TRYAGAIN needs a resharding
Cluster, so it comes from a stub client.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import ResponseError, TryAgainError

from beam.adapters.redis_store import RedisStore, Script
from beam.config import Environment, RedisMode, StoreSettings
from beam.errors import BeamError, Reason

pytestmark = pytest.mark.timeout(60)

WRITE = Script("write", "return redis.call('INCR', KEYS[1])", "unused-sha")
READ = Script("read", "return redis.call('GET', KEYS[1])", "unused-sha")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], int]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
            *args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise AssertionError("redis-server did not start")


def _store(port: int) -> RedisStore:
    settings = StoreSettings(
        environment=Environment.DEV,
        redis_mode=RedisMode.STANDALONE,
        redis_url=f"redis://127.0.0.1:{port}/0",
    )
    store = RedisStore.connect(settings)
    for script in (WRITE, READ):
        store.scripts[script.name] = Script(script.name, script.source, _sha(script.source))
    return store


def _sha(source: str) -> str:
    return hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


@pytest.fixture
def master_without_replicas(tmp_path: Path) -> Iterator[int]:
    process, port = _start(tmp_path, "--min-replicas-to-write", "1")
    yield port
    process.kill()
    process.wait(10)


@pytest.fixture
def replica_without_master(tmp_path: Path) -> Iterator[int]:
    process, port = _start(
        tmp_path, "--replicaof", "127.0.0.1", str(_free_port()), "--replica-serve-stale-data", "no"
    )
    yield port
    process.kill()
    process.wait(10)


@pytest.mark.parametrize("idempotent", [True, False])
async def test_noreplicas_is_store_unavailable(
    master_without_replicas: int, idempotent: bool
) -> None:
    store = _store(master_without_replicas)
    try:
        with pytest.raises(BeamError) as raised:
            await store.run("write", ["k"], [], idempotent=idempotent)
        assert raised.value.reason is Reason.STORE_UNAVAILABLE
        assert "NOREPLICAS" in str(raised.value.__cause__)
    finally:
        await store.close()


async def test_masterdown_is_store_unavailable(replica_without_master: int) -> None:
    store = _store(replica_without_master)
    try:
        with pytest.raises(BeamError) as raised:
            await store.run("read", ["k"], [], idempotent=True)
        assert raised.value.reason is Reason.STORE_UNAVAILABLE
        assert "Link with MASTER is down" in str(raised.value.__cause__)
    finally:
        await store.close()


class _Stub:
    """A client whose EVALSHA fails with `errors` in turn, then answers 1."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def evalsha(self, *_args: Any) -> int:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return 1

    async def aclose(self) -> None:
        return None


async def test_tryagain_is_retried_then_store_unavailable() -> None:
    recovering = _Stub(TryAgainError("Multiple keys request during rehashing of slot"))
    store = RedisStore(recovering, RedisMode.CLUSTER)
    store.scripts["write"] = WRITE
    assert await store.run("write", ["k"], [], idempotent=True) == 1
    assert recovering.calls == 2

    never = _Stub(*(TryAgainError("slot moving") for _ in range(10)))
    store = RedisStore(never, RedisMode.CLUSTER)
    store.scripts["write"] = WRITE
    with pytest.raises(BeamError) as raised:
        await store.run("write", ["k"], [], idempotent=True)
    assert raised.value.reason is Reason.STORE_UNAVAILABLE


async def test_other_error_replies_stay_errors() -> None:
    stub = _Stub(ResponseError("ERR user_script:1: Script attempted to access nonexistent key"))
    store = RedisStore(stub, RedisMode.STANDALONE)
    store.scripts["write"] = WRITE
    with pytest.raises(ResponseError):
        await store.run("write", ["k"], [], idempotent=True)
    assert stub.calls == 1
