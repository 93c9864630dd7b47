"""The Secrets that hold BeamApiKeys' plaintext keys (a Kubernetes adapter).

The plaintext of a key exists in exactly one place: the Secret owned by its BeamApiKey
(an ownerReference, so the garbage collector deletes the Secret with the key). The
operator's RBAC lets it write any Secret (RBAC cannot narrow by owner), so this module
refuses to touch a Secret that another object owns: ``SecretNotOwned``.

Kopf has no public client for other resources; the official ``kubernetes`` client is
synchronous, so every call runs in a worker thread with a request timeout. It reads the
same credentials Kopf does: the in-cluster ServiceAccount, else ``KUBECONFIG``.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from beam_operator.constants import (
    API_VERSION,
    EVENT_COMPONENT,
    KUBE_REQUEST_TIMEOUT_SECONDS,
    LABEL_API_KEY,
    LABEL_MANAGED_BY,
)

_MERGE_PATCH = "application/merge-patch+json"


class SecretNotOwned(Exception):
    """The Secret exists and belongs to something else; the operator will not overwrite it."""


@dataclass(frozen=True, slots=True)
class Owner:
    """The BeamApiKey a Secret belongs to."""

    kind: str
    name: str
    uid: str


@dataclass(frozen=True, slots=True)
class StoredSecret:
    name: str
    uid: str
    owned: bool
    data: dict[str, str]  # decoded


class SecretStore:
    def __init__(self, api_client: Any) -> None:
        self._api_client = api_client
        self._core = client.CoreV1Api(api_client)

    @classmethod
    def connect(cls) -> SecretStore:
        """In-cluster ServiceAccount first, else KUBECONFIG: the order of Kopf's
        ``login_via_client``, so both clients act as the same identity."""
        try:
            configuration = client.Configuration()
            config.load_incluster_config(configuration)  # type: ignore[no-untyped-call]
            return cls(client.ApiClient(configuration))
        except config.ConfigException:
            kubeconfig = os.environ.get("KUBECONFIG") or None
            return cls(config.new_client_from_config(kubeconfig))  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self._api_client.close()

    async def read(self, namespace: str, name: str, owner: Owner) -> StoredSecret | None:
        try:
            secret = await asyncio.to_thread(
                self._core.read_namespaced_secret,
                name,
                namespace,
                _request_timeout=KUBE_REQUEST_TIMEOUT_SECONDS,
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        metadata = secret.metadata
        assert metadata is not None, "the API server always returns metadata"
        return StoredSecret(
            name=name,
            uid=str(metadata.uid),
            owned=_owned_by(metadata.owner_references, owner),
            data={k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()},
        )

    async def write(self, namespace: str, name: str, data: Mapping[str, str], owner: Owner) -> None:
        """Create the Secret, or update one this owner already has; never anyone else's."""
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        body = client.V1Secret(
            api_version="v1",
            kind="Secret",
            type="Opaque",
            metadata=client.V1ObjectMeta(
                name=name,
                namespace=namespace,
                labels={LABEL_MANAGED_BY: EVENT_COMPONENT, LABEL_API_KEY: owner.name},
                owner_references=[
                    client.V1OwnerReference(
                        api_version=API_VERSION,
                        kind=owner.kind,
                        name=owner.name,
                        uid=owner.uid,
                        controller=True,
                    )
                ],
            ),
            data=encoded,
        )
        try:
            await asyncio.to_thread(
                self._core.create_namespaced_secret,
                namespace,
                body,
                _request_timeout=KUBE_REQUEST_TIMEOUT_SECONDS,
            )
            return
        except ApiException as error:
            if error.status != 409:
                raise
        existing = await self.read(namespace, name, owner)
        if existing is None or not existing.owned:
            raise SecretNotOwned(
                f"Secret {namespace}/{name} exists and is not owned by {owner.kind}/{owner.name}"
            )
        # Merge patch replaces the keys we write and keeps any a user added.
        await asyncio.to_thread(
            self._core.patch_namespaced_secret,
            name,
            namespace,
            {"data": encoded},
            _content_type=_MERGE_PATCH,
            _request_timeout=KUBE_REQUEST_TIMEOUT_SECONDS,
        )

    async def delete_owned(self, namespace: str, name: str, owner: Owner) -> bool:
        """Delete the Secret if this owner owns it (the uid precondition makes it exact)."""
        existing = await self.read(namespace, name, owner)
        if existing is None or not existing.owned:
            return False
        try:
            await asyncio.to_thread(
                self._core.delete_namespaced_secret,
                name,
                namespace,
                body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=existing.uid)),
                _request_timeout=KUBE_REQUEST_TIMEOUT_SECONDS,
            )
        except ApiException as error:
            if error.status in (404, 409):  # gone already, or replaced by another object
                return False
            raise
        return True


def _owned_by(references: list[Any] | None, owner: Owner) -> bool:
    return any(ref.uid == owner.uid for ref in references or [])
