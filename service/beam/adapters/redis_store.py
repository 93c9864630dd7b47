"""Redis: the hot path. Connects to one topology and runs Beam's Lua scripts by EVALSHA.

Topologies (``BEAM_REDIS_MODE``): standalone URL, Sentinel (the master is discovered by set
name and re-discovered after a failover), and Cluster (scripts are routed by their first
key; every key of a script shares one hash tag, so one slot).

Each script is the constants block from ``beam.constants`` + ``lua/_common.lua`` +
``lua/<name>.lua``; ``beam.adapters.scripts`` gives each one typed arguments and replies.
Its SHA-1 is computed here, so the first call is already an EVALSHA; a NOSCRIPT answer
(new server, failover, SCRIPT FLUSH) loads the script and retries once. Connection
failures, and the replies NOREPLICAS, MASTERDOWN, TRYAGAIN and LOADING, become
STORE_UNAVAILABLE. A script is retried after a connection failure only
when the caller says it is idempotent: a reply lost in flight must not charge twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    MasterDownError,
    NoScriptError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from beam.adapters.resources import lua_dir
from beam.config import RedisMode, StoreSettings
from beam.constants import ALL_SCRIPTS, KEY_NAMESPACE, lua_constants
from beam.errors import BeamError, Reason
from beam.observability import STORE_LATENCY, child

_TRANSIENT = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError)
# Error replies that mean "not now, nothing was done": NOREPLICAS (the master has fewer
# in-sync replicas than min-replicas-to-write, e.g. while a replica resyncs after a failover),
# MASTERDOWN (a replica lost its master), TRYAGAIN (a Cluster slot is moving). Like LOADING
# (BusyLoadingError, a ConnectionError), they are STORE_UNAVAILABLE and retried, never INTERNAL.
# redis-py parses the last two into their own classes (without the code in the message);
# an error raised inside a script keeps its code as text.
_TRANSIENT_REPLIES = ("NOREPLICAS", "MASTERDOWN", "TRYAGAIN")
_TRANSIENT_REPLY_CLASSES = (MasterDownError, TryAgainError)
_RETRY_DELAYS_SECONDS = (0.05, 0.2, 0.5, 1.0)


def is_transient(error: BaseException) -> bool:
    """A failure worth retrying: the connection, or a reply that says "not now"."""
    if isinstance(error, (*_TRANSIENT, *_TRANSIENT_REPLY_CLASSES)):
        return True
    return isinstance(error, ResponseError) and str(error).startswith(_TRANSIENT_REPLIES)


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str


def load_scripts() -> dict[str, Script]:
    """Each script is the constants block + ``_common.lua`` + ``<name>.lua``."""
    directory = lua_dir()
    common = lua_constants() + (directory / "_common.lua").read_text()
    scripts = {}
    for name in ALL_SCRIPTS:
        source = common + "\n" + (directory / f"{name}.lua").read_text()
        sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
        scripts[name] = Script(name, source, sha)
    return scripts


def _client(settings: StoreSettings) -> Any:
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    timeout = settings.redis_timeout_seconds
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "decode_responses": True,
        "health_check_interval": 15,
    }
    if settings.redis_mode is RedisMode.CLUSTER:
        return RedisCluster.from_url(settings.redis_url, password=password, **common)
    if settings.redis_mode is RedisMode.SENTINEL:
        sentinels = []
        for address in settings.redis_sentinels:
            host, _, port = address.rpartition(":")
            sentinels.append((host or "127.0.0.1", int(port)))
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            sentinels,
            sentinel_kwargs={"password": password, "socket_timeout": timeout},
            password=password,
            **common,
        )
        return sentinel.master_for(settings.redis_sentinel_master)
    return aioredis.Redis.from_url(
        settings.redis_url, password=password, max_connections=512, **common
    )


class RedisStore:
    """The Redis connection plus Beam's scripts."""

    def __init__(self, client: Any, mode: RedisMode) -> None:
        self.client = client
        self.mode = mode
        self.scripts = load_scripts()

    @classmethod
    def connect(cls, settings: StoreSettings) -> RedisStore:
        return cls(_client(settings), settings.redis_mode)

    async def close(self, timeout_seconds: float = 5.0) -> None:
        """Close the connections; bounded, so a wedged connection cannot hang shutdown."""
        try:
            await asyncio.wait_for(self.client.aclose(), timeout_seconds)
        except (TimeoutError, *_TRANSIENT):
            pass

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except _TRANSIENT:
            return False

    async def run(
        self, name: str, keys: Sequence[str], args: Sequence[str | int], *, idempotent: bool
    ) -> Any:
        """EVALSHA a script; loads it on NOSCRIPT; retries transient failures if idempotent."""
        script = self.scripts[name]
        started = time.perf_counter()
        try:
            return await self._run(script, keys, args, idempotent=idempotent)
        finally:
            child(STORE_LATENCY, "redis", name).observe(time.perf_counter() - started)

    async def _run(
        self, script: Script, keys: Sequence[str], args: Sequence[str | int], *, idempotent: bool
    ) -> Any:
        attempts = len(_RETRY_DELAYS_SECONDS) + 1 if idempotent else 1
        for attempt in range(attempts):
            try:
                return await self._evalsha(script, keys, args)
            except (*_TRANSIENT, ResponseError) as error:
                if not is_transient(error):
                    raise
                if attempt + 1 >= attempts:
                    raise BeamError(
                        Reason.STORE_UNAVAILABLE, f"redis unavailable: {type(error).__name__}"
                    ) from error
                await asyncio.sleep(_RETRY_DELAYS_SECONDS[attempt])
        raise AssertionError("unreachable")

    async def _evalsha(self, script: Script, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        try:
            return await self.client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.client.script_load(script.source)
            return await self.client.evalsha(script.sha, len(keys), *keys, *args)
        except ResponseError as error:
            if "NOSCRIPT" in str(error):
                await self.client.script_load(script.source)
                return await self.client.evalsha(script.sha, len(keys), *keys, *args)
            raise

    async def identity(self) -> frozenset[str]:
        """Who is serving: the run id and replication id of every primary. It changes when a
        server restarts or a replica is promoted, i.e. whenever recent writes may be lost."""
        try:
            if self.mode is RedisMode.CLUSTER:
                replies = await self.client.info("server", "replication", target_nodes="primaries")
                infos = list(replies.values()) if isinstance(replies, dict) else [replies]
                if infos and not isinstance(infos[0], dict):
                    infos = [replies]
            else:
                infos = [await self.client.info("server"), await self.client.info("replication")]
        except (*_TRANSIENT, ResponseError) as error:
            if not is_transient(error):
                raise
            raise BeamError(Reason.STORE_UNAVAILABLE, "redis unavailable") from error
        return frozenset(
            f"{key}={info[key]}"
            for info in infos
            if isinstance(info, dict)
            for key in ("run_id", "master_replid")
            if key in info
        )

    async def load_all_scripts(self) -> None:
        for script in self.scripts.values():
            await self.client.script_load(script.source)

    async def scan_hold_sets(self, count: int = 500) -> AsyncIterator[str]:
        """Every open/expiring hold set of every customer (SCAN; bounded work per call)."""
        match = f"{KEY_NAMESPACE}:*"
        async for key in self.client.scan_iter(match=match, count=count, _type="zset"):
            yield cast(str, key)

    async def scan_accounts(self, count: int = 500) -> AsyncIterator[str]:
        match = f"{KEY_NAMESPACE}:*:acct"
        async for key in self.client.scan_iter(match=match, count=count, _type="hash"):
            yield cast(str, key)

    async def flush_beam_keys(self) -> int:
        """Delete every Beam key (tests and disaster drills only)."""
        deleted = 0
        async for key in self.client.scan_iter(match=f"{KEY_NAMESPACE}:*", count=1000):
            deleted += int(await self.client.delete(key))
        return deleted
