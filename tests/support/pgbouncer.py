"""A real PgBouncer process (Debian's ``pgbouncer`` package) on 127.0.0.1, for the tests of
asyncpg through a transaction-mode pooler and of the chart's PgBouncer shutdown.

PgBouncer refuses to run as root, so as root it is started with ``-u`` as the unprivileged
user PostgreSQL runs as (beam_dev.servers), and its files are handed to that user. The ini
is the caller's (the chart's rendered one, or the test's), with the paths and ports of this
machine substituted: ``/run/pgbouncer`` becomes the workdir.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from beam_dev.servers import _grant_search, _postgres_os_user, free_port

PGBOUNCER_BINARIES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")
RUNTIME_DIR = "/run/pgbouncer"  # where the chart keeps userlist.txt and the pid file
START_TIMEOUT_SECONDS = 10.0


def pgbouncer_binary() -> str:
    """The pgbouncer binary, or skip (fail under CI, where .ci/run installs it)."""
    found = shutil.which("pgbouncer") or next(
        (path for path in PGBOUNCER_BINARIES if os.access(path, os.X_OK)), None
    )
    if found is None:
        message = "pgbouncer is not installed (apt-get install pgbouncer)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


def pgbouncer_version() -> tuple[int, int]:
    output = subprocess.run(
        [pgbouncer_binary(), "--version"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    match = re.search(r"PgBouncer (\d+)\.(\d+)", output)
    assert match is not None, output
    return int(match.group(1)), int(match.group(2))


class PgBouncer:
    """``ini`` is a pgbouncer.ini whose [databases] entry the caller points at its server."""

    def __init__(self, workdir: Path, ini: str, *, user: str, password: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.user = user
        self.password = password
        ini = ini.replace(RUNTIME_DIR, str(workdir))
        ini = re.sub(r"(?m)^listen_addr = .*$", "listen_addr = 127.0.0.1", ini)
        ini = re.sub(r"(?m)^listen_port = .*$", f"listen_port = {self.port}", ini)
        if "pidfile" not in ini:
            ini = ini.replace("[pgbouncer]\n", f"[pgbouncer]\npidfile = {workdir}/pgbouncer.pid\n")
        self.ini = ini
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid_file(self) -> Path:
        return self.workdir / "pgbouncer.pid"

    @property
    def log_path(self) -> Path:
        return self.workdir / "pgbouncer.log"

    def dsn(self, database: str = "beam") -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def start(self) -> PgBouncer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "pgbouncer.ini").write_text(self.ini)
        # The chart writes the same line from PGUSER/PGPASSWORD at start.
        (self.workdir / "userlist.txt").write_text(f'"{self.user}" "{self.password}"\n')
        argv = [pgbouncer_binary()]
        owner = _postgres_os_user()
        if owner is not None:
            _grant_search(self.workdir.parent, owner)
            for path in (self.workdir, *self.workdir.iterdir()):
                shutil.chown(path, owner.name, owner.gid)
            argv += ["-u", owner.name]
        argv.append(str(self.workdir / "pgbouncer.ini"))
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"pgbouncer exited at start:\n{self.log_path.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise AssertionError(f"pgbouncer did not listen:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        """SIGKILL (tests that care about shutdown signal it themselves) and reap."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
