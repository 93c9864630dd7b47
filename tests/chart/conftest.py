"""The `helm` fixture: the helm binary hack/controlplane/build.sh builds (and caches).

Like tests/k8s/conftest.py, the binaries are found or built before the first test runs
(`pytest_runtestloop`), so a cold build never counts against a test's timeout. No API
server is started: these tests only render the chart (`helm template`) and run what it
renders as real processes.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Generator
from pathlib import Path
from typing import NoReturn

import pytest

from tests.support.controlplane import ControlPlaneError, find_or_build_binaries

THIS_DIR = Path(__file__).resolve().parent
# BEAM_TEST_CHART renders another copy of the chart (e.g. an older commit's, to watch a
# regression test fail against it).
CHART = Path(os.environ.get("BEAM_TEST_CHART") or THIS_DIR.parents[1] / "charts" / "beam")

_bin_dir: Path | None = None
_error: str | None = None


def _is_chart_item(item: pytest.Item) -> bool:
    return THIS_DIR in Path(str(item.path)).resolve().parents


@pytest.hookimpl(wrapper=True)
def pytest_runtestloop(session: pytest.Session) -> Generator[None, object, object]:
    global _bin_dir, _error
    if not session.config.option.collectonly and any(map(_is_chart_item, session.items)):
        try:
            _bin_dir = find_or_build_binaries()
        except ControlPlaneError as error:
            _error = str(error)
    return (yield)


def _unavailable(reason: str) -> NoReturn:
    message = f"helm unavailable: {reason}"
    if os.environ.get("BEAM_REQUIRE_K8S") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


class Helm:
    def __init__(self, binary: Path, home: Path) -> None:
        self.binary = binary
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.binary), *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=self.env,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
        return result

    def template(self, *args: str, namespace: str = "beam-test", check: bool = True) -> str:
        return self.run(
            "template", "beam", str(CHART), "--namespace", namespace, *args, check=check
        ).stdout


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    if _error is not None:
        _unavailable(_error)
    bin_dir = _bin_dir
    if bin_dir is None:
        try:
            bin_dir = find_or_build_binaries()
        except ControlPlaneError as error:
            _unavailable(str(error))
    return Helm(bin_dir / "helm", tmp_path_factory.mktemp("helm-home"))
