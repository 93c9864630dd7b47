"""Session fixtures: real PostgreSQL + Redis (per topology) and a `beam serve` per topology.

`BEAM_TEST_TOPOLOGIES` (default "standalone,sentinel,cluster") picks which Redis
topologies the topology-parametrized tests run on. Every test gets its own tenant, so
tests share servers but never money.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from beam.core.runtime import Runtime
from tests.support.stack import (
    ServiceProcess,
    Stores,
    Tenant,
    provision_tenant,
)

TOPOLOGIES = [
    t.strip()
    for t in os.environ.get("BEAM_TEST_TOPOLOGIES", "standalone,sentinel,cluster").split(",")
    if t.strip()
]

_stores: dict[str, Stores] = {}
_services: dict[str, ServiceProcess] = {}


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("beam-stack")


def _get_stores(topology: str, session_dir: Path) -> Stores:
    if topology not in _stores:
        _stores[topology] = Stores(session_dir / topology, topology).start()
    return _stores[topology]


@pytest.fixture(scope="session", autouse=True)
def _stop_everything() -> Iterator[None]:
    yield
    for service in _services.values():
        service.stop()
    for stores in _stores.values():
        stores.stop()


@pytest.fixture(scope="session")
def stores(session_dir: Path) -> Stores:
    """Standalone Redis + PostgreSQL (tests not about topologies)."""
    return _get_stores("standalone", session_dir)


@pytest.fixture(scope="session", params=TOPOLOGIES)
def topology_stores(request: pytest.FixtureRequest, session_dir: Path) -> Stores:
    return _get_stores(str(request.param), session_dir)


def _get_service(stores: Stores, session_dir: Path) -> ServiceProcess:
    if stores.topology not in _services:
        _services[stores.topology] = ServiceProcess(stores, session_dir).start()
    return _services[stores.topology]


@pytest.fixture(scope="session")
def service(stores: Stores, session_dir: Path) -> ServiceProcess:
    """A shared `beam serve` on standalone Redis."""
    return _get_service(stores, session_dir)


@pytest.fixture(scope="session")
def topology_service(topology_stores: Stores, session_dir: Path) -> ServiceProcess:
    return _get_service(topology_stores, session_dir)


@pytest.fixture
async def tenant(stores: Stores) -> Tenant:
    assert stores.postgres is not None
    return await provision_tenant(stores.postgres.dsn)


@pytest.fixture
async def topology_tenant(topology_stores: Stores) -> Tenant:
    assert topology_stores.postgres is not None
    return await provision_tenant(topology_stores.postgres.dsn)


@pytest.fixture
async def runtime(stores: Stores) -> AsyncIterator[Runtime]:
    """An in-process Runtime (no servers, no reaper task) on standalone Redis."""
    rt = await Runtime.create(stores.settings(), background=False)
    try:
        yield rt
    finally:
        await rt.stop()


@pytest.fixture
async def topology_runtime(topology_stores: Stores) -> AsyncIterator[Runtime]:
    rt = await Runtime.create(topology_stores.settings(), background=False)
    try:
        yield rt
    finally:
        await rt.stop()
