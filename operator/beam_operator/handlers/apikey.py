"""BeamApiKey: a key whose hash is in PostgreSQL and whose plaintext is in one Secret.

- create / update of ``spec`` / resume -> ``reconcile_api_key`` with the hash of the key
  the Secret holds. A new key is generated only when the Secret has none, holds a key the
  store does not know (or has revoked), or ``spec.rotation.generation`` moved on; then the
  plaintext goes into the Secret (``spec.secretName``, default ``<name>-key``; data keys
  ``api-key``, ``key-id``, ``tenant``), owned by the BeamApiKey so the garbage collector
  deletes it with the key. Role, customer list and expiry are updated in place: the
  service's key cache reloads on PostgreSQL NOTIFY, so changes reach it within a second.
- rotation: the previous generation's key stays valid for ``gracePeriodSeconds`` (its
  ``revoked_at`` is set in the future), then the service refuses it by the clock.
- delete -> ``revoke_api_key`` at once (grace periods end too), the Secret is deleted.
- a timer re-issues the key when its Secret was deleted or holds a revoked key, and clears
  ``previousKeyExpiresAt`` once that moment has passed.

The dangerous part: the hash is stored before the Secret is written. If the operator dies
in between, the next run finds a Secret without that key, issues another, and revokes the
orphan at once (a stray key of the current generation), so no unknown key stays valid.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import kopf

from beam.core.auth import hash_key
from beam.core.reconcile import ApiKeyResult, Condition
from beam_operator.conditions import READY, publish_status, rfc3339
from beam_operator.constants import (
    API_KEYS,
    SECRET_KEY_API_KEY,
    SECRET_KEY_KEY_ID,
    SECRET_KEY_TENANT,
    SECRET_NAME_SUFFIX,
)
from beam_operator.context import OperatorContext, context_of, tenant_of
from beam_operator.errors import classify
from beam_operator.handlers import register_reconciler
from beam_operator.metrics import EVENTS, STATUS_REFRESHES
from beam_operator.reconciling import reconciling
from beam_operator.secrets import Owner, SecretNotOwned

KIND = "BeamApiKey"

log = logging.getLogger(__name__)


def register(
    registry: kopf.OperatorRegistry, *, status_interval_seconds: float, labels: Mapping[str, Any]
) -> None:
    register_reconciler(
        registry,
        API_KEYS,
        reconcile,
        labels=labels,
        on_delete=("revoke", revoke),
        timer=("check-key", check_key, status_interval_seconds),
    )


def secret_name_of(spec: Any, name: str) -> str:
    return str(spec.get("secretName") or f"{name}{SECRET_NAME_SUFFIX}")


def owner_of(name: str, uid: str) -> Owner:
    return Owner(KIND, name, uid)


async def converge(
    context: OperatorContext, namespace: str, name: str, uid: str, spec: dict[str, Any]
) -> tuple[ApiKeyResult, str]:
    """Make the store and the Secret agree with the spec; returns the result and Secret."""
    owner = owner_of(name, uid)
    secret_name = secret_name_of(spec, name)
    stored = await context.secrets.read(namespace, secret_name, owner)
    if stored is not None and not stored.owned:
        raise SecretNotOwned(
            f"Secret {secret_name} exists and is not owned by this BeamApiKey; "
            "delete it or set spec.secretName to another name"
        )
    plaintext = stored.data.get(SECRET_KEY_API_KEY) if stored is not None else None
    result = await context.reconciler.reconcile_api_key(
        namespace,
        name,
        spec,
        current_key_hash=hash_key(plaintext) if plaintext else None,
        default_grace_seconds=context.settings.key_rotation_grace_seconds,
    )
    if result.plaintext is not None:
        data = {
            SECRET_KEY_API_KEY: result.plaintext,
            SECRET_KEY_KEY_ID: result.key_id,
            SECRET_KEY_TENANT: namespace,
        }
        await context.secrets.write(namespace, secret_name, data, owner)
    return result, secret_name


async def reconcile(
    *,
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    name: str,
    namespace: str | None,
    uid: str,
    patch: kopf.Patch,
    memo: Any,
    retry: int,
    logger: Any,
    **_: Any,
) -> None:
    tenant = tenant_of(namespace)
    context = context_of(memo)
    generation = meta.get("generation")
    with reconciling(
        KIND, "reconcile", patch=patch, status=status, generation=generation, retry=retry,
        logger=logger,
    ):  # fmt: skip
        result, secret_name = await converge(context, tenant, name, uid, copy.deepcopy(dict(spec)))
        previous_secret = status.get("secretName")
        if previous_secret and previous_secret != secret_name:
            # spec.secretName changed: the old Secret holds a key that is no longer current.
            await context.secrets.delete_owned(tenant, previous_secret, owner_of(name, uid))
    if result.plaintext is not None:
        logger.info(f"issued key {result.key_id} into Secret {secret_name}")
    publish(patch, status, result, secret_name, generation)


def publish(
    patch: kopf.Patch,
    status: Any,
    result: ApiKeyResult,
    secret_name: str,
    generation: int | None,
) -> None:
    previous_expiry = _previous_expiry(result, status)
    ready = Condition(READY, "True", "KeyIssued", f"key {result.key_id} is in Secret {secret_name}")
    fields = {
        "keyId": result.key_id,
        "secretName": secret_name,
        "rotationGeneration": result.rotation_generation,
        "previousKeyExpiresAt": previous_expiry,
        "observedGeneration": generation,
    }
    publish_status(patch, status, fields, [ready], generation)


def _previous_expiry(result: ApiKeyResult, status: Any) -> str | None:
    """The retired key's end of grace: new from this rotation, else the published one
    while it lies in the future (a later edit must not hide a still-valid old key)."""
    if result.previous_key_expires_at is not None:
        return rfc3339(result.previous_key_expires_at)
    published = status.get("previousKeyExpiresAt")
    if published and _parse(published) > datetime.now(UTC):
        return str(published)
    return None


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def revoke(
    *,
    spec: kopf.Spec,
    status: kopf.Status,
    name: str,
    namespace: str | None,
    uid: str,
    memo: Any,
    retry: int,
    logger: Any,
    **_: Any,
) -> None:
    tenant = tenant_of(namespace)
    context = context_of(memo)
    generation = int((spec.get("rotation") or {}).get("generation") or 0)
    try:
        revoked = await context.reconciler.revoke_api_key(tenant, name, generation)
    except Exception as error:
        raise classify(error, retry).error from error
    logger.info(f"revoked {revoked} key(s)")
    # The garbage collector deletes the Secret too (ownerReference); deleting it now keeps
    # a revoked plaintext from lingering. Best effort: GC is the guarantee.
    for secret_name in {secret_name_of(spec, name), status.get("secretName")} - {None}:
        try:
            await context.secrets.delete_owned(tenant, str(secret_name), owner_of(name, uid))
        except Exception as error:
            log.info("could not delete Secret %s/%s: %s", tenant, secret_name, error)


async def check_key(
    *,
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    name: str,
    namespace: str | None,
    uid: str,
    body: kopf.Body,
    patch: kopf.Patch,
    memo: Any,
    logger: Any,
    **_: Any,
) -> None:
    tenant = tenant_of(namespace)
    generation = status.get("observedGeneration")
    if generation is None or generation != meta.get("generation"):
        STATUS_REFRESHES.labels(KIND, "skipped").inc()
        return  # the reconcile handler has not (successfully) handled this spec yet
    context = context_of(memo)
    try:
        if await _key_is_missing(context, tenant, name, uid, spec):
            result, secret_name = await converge(
                context, tenant, name, uid, copy.deepcopy(dict(spec))
            )
            publish(patch, status, result, secret_name, generation)
            message = f"the Secret's key was missing or revoked; issued key {result.key_id}"
            kopf.event(body, type="Warning", reason="KeyReissued", message=message)
            EVENTS.labels("KeyReissued").inc()
            return
    except SecretNotOwned:
        STATUS_REFRESHES.labels(KIND, "skipped").inc()
        return
    except Exception as error:  # a store or API outage: next interval, quietly
        STATUS_REFRESHES.labels(KIND, "failed").inc()
        log.info("key check of %s/%s failed: %s", tenant, name, classify(error, 0).message)
        return
    expiry = status.get("previousKeyExpiresAt")
    if expiry and _parse(str(expiry)) <= datetime.now(UTC):
        patch.status["previousKeyExpiresAt"] = None
    STATUS_REFRESHES.labels(KIND, "patched" if patch.get("status") else "unchanged").inc()


async def _key_is_missing(
    context: OperatorContext, namespace: str, name: str, uid: str, spec: Any
) -> bool:
    stored = await context.secrets.read(namespace, secret_name_of(spec, name), owner_of(name, uid))
    if stored is None:
        return True
    if not stored.owned:
        raise SecretNotOwned(stored.name)
    plaintext = stored.data.get(SECRET_KEY_API_KEY)
    if not plaintext:
        return True
    return await context.reconciler.api_key_revoked(plaintext)
