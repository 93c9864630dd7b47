"""The `control_plane` fixture: one real Kubernetes API server for the whole test session.

Where it comes from, in order:
1. `BEAM_TEST_KUBECONFIG` set: that cluster, used as is and never stopped.
2. Otherwise hack/controlplane/: binaries built from source (cached by version), then etcd,
   kube-apiserver and kube-controller-manager started on 127.0.0.1 in a temporary directory.

When neither works, the k8s tests are skipped with the reason, except under
`BEAM_REQUIRE_K8S=1` (CI), where they fail: CI must not go green by skipping them.

The binaries are built before the first test runs (in `pytest_runtestloop`), not inside the
fixture: a cold build takes minutes and would otherwise count against the first test's
pytest-timeout. Every test in this directory is marked `k8s`.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from tests.support.controlplane import ControlPlane, ControlPlaneError, find_or_build_binaries

THIS_DIR = Path(__file__).resolve().parent

# The outcome of building the binaries before the test loop: a bin dir or why there is none.
_prepared_bin_dir: Path | None = None
_preparation_error: str | None = None


def _is_k8s_item(item: pytest.Item) -> bool:
    return THIS_DIR in Path(str(item.path)).resolve().parents


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _is_k8s_item(item):
            item.add_marker(pytest.mark.k8s)


@pytest.hookimpl(wrapper=True)
def pytest_runtestloop(session: pytest.Session) -> Generator[None, object, object]:
    global _prepared_bin_dir, _preparation_error
    wanted = (
        not session.config.option.collectonly
        and not os.environ.get("BEAM_TEST_KUBECONFIG")
        and any(_is_k8s_item(item) for item in session.items)
    )
    if wanted:
        try:
            _prepared_bin_dir = find_or_build_binaries()
        except ControlPlaneError as error:
            _preparation_error = str(error)
    return (yield)


def _unavailable(reason: str) -> NoReturn:
    message = f"Kubernetes control plane unavailable: {reason}"
    if os.environ.get("BEAM_REQUIRE_K8S") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    external = os.environ.get("BEAM_TEST_KUBECONFIG")
    if external:
        try:
            plane = ControlPlane.external(Path(external))
        except ControlPlaneError as error:
            _unavailable(str(error))
        yield plane
        return

    if _preparation_error is not None:
        _unavailable(_preparation_error)
    try:
        # _prepared_bin_dir is None when the hook did not run (e.g. a plugin replaced the
        # test loop); start() then builds or finds the binaries itself.
        plane = ControlPlane.start(tmp_path_factory.mktemp("controlplane"), _prepared_bin_dir)
    except ControlPlaneError as error:
        _unavailable(str(error))
    try:
        yield plane
    finally:
        plane.stop()
