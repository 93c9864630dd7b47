"""``beam apply -f``: run the operator's reconcile functions on manifests, without a cluster.

Targets the stores named by ``BEAM_*`` settings, or a running ``beam dev`` (its state dir
holds ``connection.env``). The tenant is each manifest's namespace (``-n`` or "default"
when absent). Price lists go first, then customers, then keys; a new key's plaintext is
printed once, since there is no Secret to hold it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import click
import yaml

from beam.config import Environment, ServiceSettings
from beam.constants import DEFAULT_TENANT
from beam.core.runtime import Runtime
from beam.errors import BeamError

KINDS = ("BeamPriceList", "BeamCustomer", "BeamApiKey")
CONNECTION_FILE = "connection.env"


def read_manifests(paths: list[Path]) -> list[dict[str, Any]]:
    files: list[Path] = []
    for path in paths:
        files += sorted(path.glob("*.y*ml")) if path.is_dir() else [path]
    documents = []
    for file in files:
        for document in yaml.safe_load_all(file.read_text()):
            if isinstance(document, dict) and document.get("kind") in KINDS:
                documents.append(document)
    return sorted(documents, key=lambda d: KINDS.index(d["kind"]))


def settings_for(state_dir: Path) -> ServiceSettings:
    connection = state_dir / CONNECTION_FILE
    if "BEAM_DATABASE_URL" not in os.environ and connection.is_file():
        values = dict(
            line.split("=", 1) for line in connection.read_text().splitlines() if "=" in line
        )
        return ServiceSettings(
            environment=Environment.DEV,
            redis_url=values["BEAM_REDIS_URL"],
            database_url=values["BEAM_DATABASE_URL"],
        )
    return ServiceSettings()


async def apply_documents(runtime: Runtime, documents: list[dict[str, Any]], namespace: str
                          ) -> list[str]:  # fmt: skip
    lines = []
    for document in documents:
        metadata = document.get("metadata") or {}
        tenant = metadata.get("namespace") or namespace
        name = str(metadata.get("name") or "")
        kind = document["kind"]
        spec = document.get("spec") or {}
        if kind == "BeamPriceList":
            count = await runtime.reconciler.reconcile_price_list(tenant, name, spec)
            lines.append(f"beampricelist/{name} ({tenant}): {count} models")
        elif kind == "BeamCustomer":
            status = await runtime.reconciler.reconcile_customer(
                tenant, spec, owner=f"BeamCustomer/{name}"
            )
            lines.append(
                f"beamcustomer/{name} ({tenant}): balance {status.balance}, "
                f"available {status.available}, credits applied {len(status.applied_credits)}"
            )
        else:
            result = await runtime.reconciler.reconcile_api_key(
                tenant, name, spec, current_key_hash=None, keep_existing=True
            )
            shown = result.plaintext or "(unchanged; the key was shown when it was created)"
            lines.append(f"beamapikey/{name} ({tenant}): key {result.key_id}: {shown}")
    return lines


def apply_paths(paths: list[Path], namespace: str | None, state_dir: Path) -> None:
    documents = read_manifests(paths)
    if not documents:
        raise click.ClickException("no BeamPriceList, BeamCustomer or BeamApiKey manifests found")
    settings = settings_for(state_dir)

    async def run() -> list[str]:
        runtime = await Runtime.create(
            settings.model_copy(update={"migrate_on_start": True}), background=False
        )
        try:
            return await apply_documents(runtime, documents, namespace or DEFAULT_TENANT)
        finally:
            await runtime.stop()

    try:
        for line in asyncio.run(run()):
            click.echo(line)
    except BeamError as error:
        raise click.ClickException(f"{error.reason.value}: {error.message}") from None
