"""`pip install ./clients/python` in a fresh venv: a light client that works on its own.

The guide's install command (docs/INTEGRATION.md, example "install") runs in a fresh
virtual environment, from a copy of the checkout's ``clients/python`` and ``proto`` (so the
build does not write into the working tree the suite imports from). The result: beam-client
with grpcio and protobuf and nothing of the server (no kopf, kubernetes, fastapi, ...), its
protobuf module compiled at build time (and not in git), and a call to the session's real
service from that venv. Needs PyPI (the build backend and the dependencies); skipped when
it cannot be reached. Marked slow: about a minute on a cold pip cache.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.client.conftest import Admin
from tests.client.test_docs import examples
from tests.support.stack import ServiceProcess, Tenant

ROOT = Path(__file__).resolve().parents[2]
SERVER_ONLY = {
    "asyncpg", "click", "fastapi", "grpcio-health-checking", "grpcio-reflection", "httpx",
    "kopf", "kubernetes", "prometheus-client", "pydantic", "pydantic-settings", "redis",
    "uvicorn", "beam", "grpcio-tools", "hatchling",
}  # fmt: skip


def pypi_reachable() -> bool:
    try:
        return httpx.get("https://pypi.org/simple/grpcio/", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def run(argv: list[str], cwd: Path, timeout: float = 600) -> str:
    done = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{argv}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_pip_install_in_a_fresh_venv_is_light_and_works(
    tmp_path: Path, service: ServiceProcess, tenant: Tenant
) -> None:
    if not pypi_reachable():
        pytest.skip("PyPI cannot be reached")
    checkout = tmp_path / "beam"
    shutil.copytree(
        ROOT / "clients" / "python", checkout / "clients" / "python",
        ignore=shutil.ignore_patterns("_generated", "build", "dist", "*.egg-info", "__pycache__"),
    )  # fmt: skip
    shutil.copytree(ROOT / "proto", checkout / "proto")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    pip = venv / "bin" / "pip"

    _, code = examples()["install"]
    command = code.splitlines()[0].split("#")[0].split()
    assert command[:2] == ["pip", "install"]
    run([str(pip), "--disable-pip-version-check", "install", "--quiet", *command[2:]], checkout)

    installed = {
        entry["name"].lower().replace("_", "-")
        for entry in json.loads(run([str(pip), "list", "--format", "json"], tmp_path))
    }
    assert {"beam-client", "grpcio", "protobuf"} <= installed
    assert installed & SERVER_ONLY == set()
    assert installed <= {
        "beam-client",
        "grpcio",
        "protobuf",
        "pip",
        "setuptools",
        "typing-extensions",
    }

    # The generated module is in the wheel, and only there: not in git.
    files = run([str(pip), "show", "--files", "beam-client"], tmp_path)
    assert "beam_client/_generated/balance_pb2.py" in files
    assert "beam_client/py.typed" in files
    tracked = run(["git", "ls-files", "clients/python"], ROOT)
    assert "_generated" not in tracked
    assert "_pb2" not in tracked

    # From that venv, a call to the real service.
    customer = await Admin(service, tenant).customer(4321)
    script = (
        "import sys\n"
        "from beam_client import BeamClient\n"
        "with BeamClient(sys.argv[1], sys.argv[2]) as beam:\n"
        "    print(beam.get_balance(sys.argv[3]).available)\n"
    )
    python = str(venv / "bin" / "python")
    argv = [python, "-c", script, service.grpc_target, tenant.keys["reader"], customer]
    out = run(argv, tmp_path, timeout=60)
    assert out.strip() == "4321"
