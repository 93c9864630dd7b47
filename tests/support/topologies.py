"""Redis Sentinel and Redis Cluster topologies on loopback, for the tests only.

Built on ``beam_dev.servers`` (the standalone servers ``beam dev`` runs): every node is a
``RedisServer`` and every process goes through the same child-process handling, bounded
waits and atexit safety net. They live here, not in the product package, because only the
topology tests (``tests/integration/test_topologies.py``, the Sentinel failover in
``test_faults.py``, ``test_devservers.py``) need them: ``beam dev`` runs one standalone Redis.
This module uses the harness's private helpers on purpose: it is the other half of it.
"""

from __future__ import annotations

import contextlib
import functools
import secrets
import shutil
import signal
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import redis

from beam_dev.servers import (
    LOOPBACK_HOST,
    START_TIMEOUT_SECONDS,
    STOP_TIMEOUT_SECONDS,
    Address,
    BinaryNotFoundError,
    DevServerError,
    RedisServer,
    _Child,
    _command,
    _config_value,
    _is_executable,
    _Lifecycle,
    _ping,
    _port_is_free,
    _run_logged,
    _wait_for,
    find_redis_server,
    free_port,
)

FAILOVER_TIMEOUT_SECONDS: Final = 30.0
PORT_PROBES_MAX: Final = 2000
CLUSTER_SLOT_COUNT: Final = 16384
CLUSTER_BUS_PORT_OFFSET: Final = 10000
# Cluster nodes need `port` and `port + 10000` free (Redis 6.2 has no `cluster-port`), so they
# are drawn from below the Linux ephemeral range (32768+) rather than from bind(0).
CLUSTER_PORT_LOW: Final = 10000
CLUSTER_PORT_HIGH: Final = 32767 - CLUSTER_BUS_PORT_OFFSET

ClusterCreation = Literal["auto", "redis-cli", "client"]


# ------------------------------------------------------------------------------- helpers


def find_redis_cli(redis_server: Path) -> Path | None:
    """``redis-cli`` next to the given server (same version) or else on PATH."""
    sibling = redis_server.parent / "redis-cli"
    if _is_executable(sibling):
        return sibling
    found = shutil.which("redis-cli")
    return Path(found) if found else None


def _free_cluster_ports(count: int) -> list[int]:
    """``count`` ports p such that p and p + 10000 (the cluster bus) are both free."""
    taken: set[int] = set()
    chosen: list[int] = []
    for _ in range(PORT_PROBES_MAX):
        port = CLUSTER_PORT_LOW + secrets.randbelow(CLUSTER_PORT_HIGH - CLUSTER_PORT_LOW)
        bus_port = port + CLUSTER_BUS_PORT_OFFSET
        if port in taken or bus_port in taken:
            continue
        if _port_is_free(port) and _port_is_free(bus_port):
            chosen.append(port)
            taken.update((port, bus_port))
            if len(chosen) == count:
                return chosen
    raise DevServerError(f"found only {len(chosen)} of {count} free cluster port pairs")


def _stop_all(stoppers: Iterable[Callable[[], None]]) -> None:
    """Run every stopper even when one fails; re-raise the first failure at the end."""
    first_error: BaseException | None = None
    for stopper in stoppers:
        try:
            stopper()
        except Exception as error:  # keep stopping the rest; re-raised below
            first_error = first_error or error
    if first_error is not None:
        raise first_error


def _info_fields(text: str) -> dict[str, str]:
    """Parse ``key:value`` lines (CLUSTER INFO, INFO sections)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, separator, value = line.partition(":")
        if separator:
            fields[key.strip()] = value.strip()
    return fields


def _role(port: int) -> str:
    reply = _command(port, "ROLE")
    if not isinstance(reply, list) or not reply:
        raise DevServerError(f"unexpected ROLE reply from port {port}: {reply!r}")
    return str(reply[0])


def _as_str_dict(entry: Any) -> dict[str, str]:
    """A RESP3 map (dict) or a RESP2 flat ``[key, value, ...]`` list, as a str dict."""
    if isinstance(entry, dict):
        return {str(key): str(value) for key, value in entry.items()}
    return {str(key): str(value) for key, value in zip(entry[::2], entry[1::2], strict=True)}


# --------------------------------------------------------------------------- redis sentinel


class _Sentinel:
    """One Sentinel process (``redis-server <conf> --sentinel``); its config is rewritten by it."""

    def __init__(self, workdir: Path, binary: Path, port: int) -> None:
        self.workdir = workdir
        self.binary = binary
        self.port = port
        self._child = _Child(f"sentinel:{port}", workdir / "sentinel.log", signal.SIGTERM)

    @property
    def child(self) -> _Child:
        return self._child

    def start(self, config_lines: Sequence[str], timeout: float) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "sentinel.conf"
        header = [
            f"port {self.port}",
            f"bind {LOOPBACK_HOST}",
            "protected-mode no",
            "daemonize no",
            f"dir {_config_value(str(self.workdir))}",
            'logfile ""',
            f"sentinel announce-ip {LOOPBACK_HOST}",
            "sentinel resolve-hostnames no",
        ]
        config_path.write_text("\n".join([*header, *config_lines]) + "\n")
        argv = [str(self.binary), str(config_path), "--sentinel"]
        self._child.spawn(argv, cwd=self.workdir)
        _wait_for(
            f"{self._child.name} to answer PING", lambda: _ping(self.port), timeout, [self._child]
        )

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        self._child.stop(timeout)

    def master_address(self, master_name: str) -> Address | None:
        reply = _command(self.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", master_name)
        if not reply:
            return None
        host, port = reply
        return (str(host), int(port))

    def peers(self, master_name: str, kind: Literal["SLAVES", "SENTINELS"]) -> list[dict[str, str]]:
        """``SENTINEL SLAVES|SENTINELS name``, one dict per peer."""
        reply = _command(self.port, "SENTINEL", kind, master_name)
        return [_as_str_dict(entry) for entry in reply]


class RedisSentinelGroup(_Lifecycle):
    """A master, ``replicas`` replicas and ``sentinels`` Sentinels watching them, on loopback.

    Node ``node-0`` starts as master; after a failover :meth:`master` follows the Sentinels.
    Every :meth:`start` regenerates all configs, so ``node-0`` is master again and the
    replicas resync from it (writes made on a promoted replica since are dropped: dev only).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        sentinels: int = 3,
        replicas: int = 1,
        master_name: str = "mymaster",
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        binary: Path | None = None,
    ) -> None:
        if not 1 <= quorum <= sentinels or replicas < 0:
            raise ValueError(
                f"need 1 <= quorum ({quorum}) <= sentinels ({sentinels}), replicas >= 0"
            )
        self.workdir = Path(workdir).resolve()
        self.master_name = master_name
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        binary = binary if binary is not None else find_redis_server().path
        self.binary = binary
        self.servers = [self._make_server(0, None)]
        for index in range(1, replicas + 1):
            self.servers.append(self._make_server(index, self.servers[0].port))
        self._sentinels = [
            _Sentinel(self.workdir / f"sentinel-{index}", binary, free_port())
            for index in range(sentinels)
        ]
        self._known_master: Address = self.servers[0].address

    def _make_server(self, index: int, master_port: int | None) -> RedisServer:
        extra = {"replica-announce-ip": LOOPBACK_HOST}
        if master_port is not None:
            extra["replicaof"] = f"{LOOPBACK_HOST} {master_port}"
        return RedisServer(self.workdir / f"node-{index}", binary=self.binary, extra_config=extra)

    @property
    def sentinel_addresses(self) -> list[Address]:
        return [(LOOPBACK_HOST, sentinel.port) for sentinel in self._sentinels]

    @property
    def replicas(self) -> list[RedisServer]:
        """The servers started as replicas (roles change after a failover)."""
        return self.servers[1:]

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Start the data nodes, wait for replication, then the Sentinels until they agree."""
        try:
            for server in self.servers:
                server.start(timeout)
            self._known_master = self.servers[0].address
            data_children = [server._child for server in self.servers]
            _wait_for("replicas to sync", self._replicas_synced, timeout, data_children)
            for sentinel in self._sentinels:
                sentinel.start(self._sentinel_config(), timeout)
            _wait_for(
                "sentinels to agree on master, replicas and peers",
                self._sentinels_agree,
                timeout,
                self._children(),
            )
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()
            raise

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """Sentinels first (so they do not fail over a stopping master), then the data nodes."""
        stoppers = [functools.partial(sentinel.stop, timeout) for sentinel in self._sentinels]
        stoppers += [functools.partial(server.stop, timeout) for server in reversed(self.servers)]
        _stop_all(stoppers)

    def master_address(self) -> Address:
        """The master's address as the first answering Sentinel reports it."""
        errors: list[str] = []
        for sentinel in self._sentinels:
            try:
                address = sentinel.master_address(self.master_name)
            except (redis.RedisError, OSError) as error:
                errors.append(f"{sentinel.port}: {error}")
                continue
            if address is not None:
                return address
        raise DevServerError(f"no sentinel knows master {self.master_name!r}: {errors}")

    def master(self) -> RedisServer:
        """The RedisServer that the Sentinels currently report as master."""
        return self._server_at(self.master_address())

    def kill_master(self) -> RedisServer:
        """SIGKILL the current master (a crash); :meth:`wait_for_failover` waits for the new one."""
        server = self.master()
        self._known_master = server.address
        server.kill()
        return server

    def wait_for_failover(self, timeout: float = FAILOVER_TIMEOUT_SECONDS) -> Address:
        """Wait until every Sentinel names one new master and that server says it is master."""
        old_master = self._known_master
        found: list[Address] = []

        def promoted() -> bool:
            addresses = {s.master_address(self.master_name) for s in self._sentinels}
            if len(addresses) != 1 or None in addresses or old_master in addresses:
                return False
            (address,) = addresses
            assert address is not None
            if _role(address[1]) != "master":
                return False
            found.append(address)
            return True

        live = [child for child in self._children() if child.running()]
        _wait_for(f"failover away from {old_master}", promoted, timeout, live)
        self._known_master = found[-1]
        return found[-1]

    def _server_at(self, address: Address) -> RedisServer:
        for server in self.servers:
            if server.port == address[1]:
                return server
        raise DevServerError(f"sentinels report master {address}, which is not in this group")

    def _children(self) -> list[_Child]:
        return [server._child for server in self.servers] + [s.child for s in self._sentinels]

    def _sentinel_config(self) -> list[str]:
        name = self.master_name
        return [
            f"sentinel monitor {name} {LOOPBACK_HOST} {self.servers[0].port} {self.quorum}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
        ]

    def _replicas_synced(self) -> bool:
        for server in self.replicas:
            reply = _command(server.port, "ROLE")
            if str(reply[0]) != "slave" or str(reply[3]) != "connected":
                return False
        return True

    def _sentinels_agree(self) -> bool:
        expected_replicas = {server.port for server in self.replicas}
        for sentinel in self._sentinels:
            if sentinel.master_address(self.master_name) != self._known_master:
                return False
            replicas = sentinel.peers(self.master_name, "SLAVES")
            healthy = {int(r["port"]) for r in replicas if _is_healthy(r.get("flags", ""))}
            if healthy != expected_replicas:
                return False
            if len(sentinel.peers(self.master_name, "SENTINELS")) != len(self._sentinels) - 1:
                return False
        return True


def _is_healthy(flags: str) -> bool:
    return not {"s_down", "o_down", "disconnected"} & set(flags.split(","))


# ---------------------------------------------------------------------------- redis cluster


class RedisClusterGroup(_Lifecycle):
    """A Redis Cluster of ``masters`` masters (slots split evenly) and their replicas.

    Created with ``redis-cli --cluster create`` when redis-cli exists (``create_with="auto"``),
    else with CLUSTER ADDSLOTS(RANGE)/MEET/REPLICATE from the Python client. Starting over a
    workdir whose nodes already hold slots reuses that cluster (pass the same ``ports``).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        masters: int = 3,
        replicas_per_master: int = 0,
        ports: Sequence[int] | None = None,
        create_with: ClusterCreation = "auto",
        binary: Path | None = None,
    ) -> None:
        if masters < 1 or replicas_per_master < 0:
            raise ValueError("need masters >= 1 and replicas_per_master >= 0")
        total = masters * (1 + replicas_per_master)
        if ports is not None and len(ports) != total:
            raise ValueError(f"need {total} ports, got {len(ports)}")
        self.workdir = Path(workdir).resolve()
        self.masters = masters
        self.replicas_per_master = replicas_per_master
        self.binary = binary if binary is not None else find_redis_server().path
        self.create_with: ClusterCreation = create_with
        node_ports = list(ports) if ports is not None else _free_cluster_ports(total)
        cluster_config = {
            "cluster-enabled": "yes",
            "cluster-config-file": "nodes.conf",
            "cluster-node-timeout": "5000",
        }
        self.nodes = [
            RedisServer(
                self.workdir / f"node-{i}", port, binary=self.binary, extra_config=cluster_config
            )
            for i, port in enumerate(node_ports)
        ]

    @property
    def startup_nodes(self) -> list[Address]:
        return [node.address for node in self.nodes]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Start every node, create the cluster unless it exists, wait for cluster_state:ok."""
        try:
            for node in self.nodes:
                node.start(timeout)
            if not self._already_created():
                self._create(timeout)
            children = [node._child for node in self.nodes]
            _wait_for("cluster_state:ok on every node", self._cluster_ok, timeout, children)
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()
            raise

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        _stop_all([functools.partial(node.stop, timeout) for node in reversed(self.nodes)])

    def _already_created(self) -> bool:
        info = _info_fields(str(_command(self.nodes[0].port, "CLUSTER", "INFO")))
        return int(info.get("cluster_slots_assigned", "0")) > 0

    def _create(self, timeout: float) -> None:
        cli = find_redis_cli(self.binary) if self.create_with != "client" else None
        if self.create_with == "redis-cli" and cli is None:
            raise BinaryNotFoundError("create_with='redis-cli' but no redis-cli was found")
        if self.create_with == "redis-cli" and self.masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        if cli is not None and self.masters >= 3:
            self._create_with_cli(cli, timeout)
        else:
            self._create_with_client(timeout)

    def _create_with_cli(self, cli: Path, timeout: float) -> None:
        argv = [str(cli), "--cluster", "create", *(f"{h}:{p}" for h, p in self.startup_nodes)]
        argv += ["--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"]
        _run_logged(argv, self.workdir / "cluster-create.log", timeout)

    def _create_with_client(self, timeout: float) -> None:
        ports = [node.port for node in self.nodes]
        node_ids = [str(_command(port, "CLUSTER", "MYID")) for port in ports]
        for epoch, port in enumerate(ports, start=1):
            _command(port, "CLUSTER", "SET-CONFIG-EPOCH", epoch)
        for port, (first, last) in zip(
            ports[: self.masters], _slot_ranges(self.masters), strict=True
        ):
            _add_slots(port, first, last)
        for port in ports[1:]:
            _command(ports[0], "CLUSTER", "MEET", LOOPBACK_HOST, port)
        children = [node._child for node in self.nodes]
        _wait_for(
            "every node to know every other node",
            lambda: all(set(node_ids) <= _known_node_ids(port) for port in ports),
            timeout,
            children,
        )
        for index, port in enumerate(ports[self.masters :]):
            _command(port, "CLUSTER", "REPLICATE", node_ids[index % self.masters])

    def _cluster_ok(self) -> bool:
        expected_replicas = self.masters * self.replicas_per_master
        for node in self.nodes:
            info = _info_fields(str(_command(node.port, "CLUSTER", "INFO")))
            if info.get("cluster_state") != "ok":
                return False
            if int(info.get("cluster_slots_ok", "0")) != CLUSTER_SLOT_COUNT:
                return False
            if int(info.get("cluster_known_nodes", "0")) != len(self.nodes):
                return False
            nodes_text = str(_command(node.port, "CLUSTER", "NODES"))
            if _count_flag(nodes_text, "slave") != expected_replicas:
                return False
        return True


def _slot_ranges(masters: int) -> list[tuple[int, int]]:
    bounds = [index * CLUSTER_SLOT_COUNT // masters for index in range(masters + 1)]
    return [(bounds[index], bounds[index + 1] - 1) for index in range(masters)]


def _add_slots(port: int, first: int, last: int) -> None:
    """CLUSTER ADDSLOTSRANGE (Redis 7+), or ADDSLOTS slot by slot on Redis 6.2."""
    try:
        _command(port, "CLUSTER", "ADDSLOTSRANGE", first, last)
    except redis.ResponseError:
        _command(port, "CLUSTER", "ADDSLOTS", *range(first, last + 1))


def _known_node_ids(port: int) -> set[str]:
    """Node ids this node knows and has finished the handshake with."""
    text = str(_command(port, "CLUSTER", "NODES"))
    rows = (line.split() for line in text.splitlines() if line.strip())
    return {row[0] for row in rows if "handshake" not in row[2] and "noaddr" not in row[2]}


def _count_flag(cluster_nodes_text: str, flag: str) -> int:
    rows = (line.split() for line in cluster_nodes_text.splitlines() if line.strip())
    return sum(1 for row in rows if flag in row[2].split(","))
