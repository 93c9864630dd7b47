"""Tenancy and auth through both public transports.

Two tenants share one service and one PostgreSQL. Tenant A's keys must find nothing of
tenant B's: every call on B's customer answers exactly (code, reason, field, message) as
it does on a customer that exists nowhere, and B's stores are byte-for-byte unchanged.
Roles limit what a key can do, a customer allow-list limits what it can see, bad and stale
keys are UNAUTHENTICATED, a request_token from anywhere but its own hold moves nothing,
the dev key is refused outside dev mode even when its hash is in the database, and no
plaintext key is ever written to the service log or to any PostgreSQL table.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from beam.adapters.postgres_store import PostgresStore
from beam.config import ServiceSettings
from beam.constants import DEV_API_KEY, hold_key
from beam.core.auth import RequestTokens, generate_key, hash_key
from beam.records import ApiKeyRecord, Role
from tests.e2e.conftest import (
    Api,
    Failure,
    StoreProbe,
    create_customer,
    ok_json,
    open_hold,
    rest_balance,
    rest_failure,
)
from tests.support.stack import (
    TEST_TOKEN_SECRET,
    ServiceProcess,
    Stores,
    Tenant,
    provision_tenant,
)

TRANSPORTS = ("rest", "grpc")
GHOST = "cus_ghost"  # a customer that exists in no tenant
GARBAGE_KEYS = ("garbage-key-7f3a9c2e1b", "beam_sk_000000000000_Q2hlY2tpbmdOb1N1Y2hLZXlFeGlzdHM")
HTTP_STATUS = {"NOT_FOUND": 404, "PERMISSION_DENIED": 403, "UNAUTHENTICATED": 401}


@dataclass
class Scene:
    service: ServiceProcess
    api: Api
    probe: StoreProbe
    dsn: str
    a: Tenant
    b: Tenant
    b_open_token: str  # B's open hold req-b-open on cus_b
    a_same_token: str  # A's open hold r-same on A's "shared"
    b_same_token: str  # B's open hold r-same on B's "shared"
    keys_used: list[str] = field(default_factory=list)


async def _store(dsn: str) -> PostgresStore:
    return await PostgresStore.connect(
        ServiceSettings(
            database_url=dsn,  # type: ignore[arg-type]
            request_token_secret=TEST_TOKEN_SECRET,  # type: ignore[arg-type]
            database_pool_min=1,
            database_pool_max=2,
        )
    )


async def add_key(
    scene: Scene, tenant: Tenant, role: Role, **fields: Any
) -> tuple[str, ApiKeyRecord]:
    """A new key of `tenant`: (plaintext, record); fields as ApiKeyRecord's."""
    plaintext, key_id, digest = generate_key()
    record = ApiKeyRecord(digest, key_id, tenant.name, role, f"e2e-{role.value}", **fields)
    await save_key(scene, record)
    scene.keys_used.append(plaintext)
    return plaintext, record


async def save_key(scene: Scene, record: ApiKeyRecord) -> None:
    """Upsert (and NOTIFY, as the operator does)."""
    store = await _store(scene.dsn)
    try:
        await store.upsert_api_key(record)
    finally:
        await store.close()


@pytest.fixture(scope="module")
async def scene(service: ServiceProcess, stores: Stores) -> AsyncIterator[Scene]:
    assert stores.postgres is not None
    dsn = stores.postgres.dsn
    a, b = await provision_tenant(dsn), await provision_tenant(dsn)
    api, probe = Api(service), await StoreProbe.open(stores)
    try:
        for tenant, customers in (
            (a, {"cus_a": 1_000_000, "cus_a2": 300_000, "shared": 50_000}),
            (b, {"cus_b": 1_000_000, "shared": 70_000}),
        ):
            for customer_id, balance in customers.items():
                await create_customer(api, tenant, customer_id, balance)
        await settle(api, b, "cus_b", "req-b-done", 400)
        await settle(api, a, "cus_a2", "req-a2-done", 300)
        scene = Scene(
            service, api, probe, dsn, a, b,
            b_open_token=await open_hold(api, b, "cus_b", "req-b-open", 1_000),
            a_same_token=await open_hold(api, a, "shared", "r-same", 100),
            b_same_token=await open_hold(api, b, "shared", "r-same", 100),
        )  # fmt: skip
        scene.keys_used += [*a.keys.values(), *b.keys.values(), *GARBAGE_KEYS]
        yield scene
    finally:
        await api.close()
        await probe.close()


async def settle(api: Api, tenant: Tenant, customer_id: str, request_id: str, cost: int) -> None:
    token = await open_hold(api, tenant, customer_id, request_id, cost)
    final = await api.rest(
        "finalize",
        {"customer_id": customer_id, "request_id": request_id, "status": "COMPLETED_SUCCESS",
         "total_actual_cost_grains": str(cost), "request_token": token},
        tenant.keys["enforcer"],
    )  # fmt: skip
    assert ok_json(final)["charged_grains"] == str(cost)


async def send(
    api: Api, transport: str, call: str, fields: dict[str, Any], key: str | None,
    authorization: str | None = None,
) -> dict[str, Any] | Failure:  # fmt: skip
    """The answer as proto3 JSON (both transports alike), or the failure."""
    if transport == "rest":
        response = await api.rest(call, fields, key, authorization=authorization)
        if response.status_code == 200:
            return ok_json(response)
        failure = rest_failure(response)
        assert HTTP_STATUS.get(failure.code) == response.status_code, failure
        return replace(failure, http_status=None)
    result = await api.grpc(call, fields, key, authorization=authorization)
    if isinstance(result, Failure):
        return result
    assert isinstance(result, Message)
    return json_format.MessageToDict(
        result, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def refused(result: dict[str, Any] | Failure, code: str, reason: str) -> Failure:
    assert isinstance(result, Failure), result
    assert (result.code, result.reason) == (code, reason), result
    return result


def normalised(failure: Failure, *ids: str) -> Failure:
    message = failure.message
    for value in ids:
        message = message.replace(value, "<id>")
    return replace(failure, message=message)


def minted_token(tenant: Tenant, customer_id: str, request_id: str, nonce: str = "n0nce") -> str:
    """A request token with a valid HMAC for (tenant, customer, request) and any nonce:
    stands for a token of an earlier hold, or a forger who knows the secret."""
    return RequestTokens(TEST_TOKEN_SECRET).issue(tenant.name, customer_id, request_id, nonce)


# -- tenancy ----------------------------------------------------------------------------------


def _cross_tenant_cases(scene: Scene) -> list[tuple[str, str, Any, str]]:
    """(case, call, fields for a customer id, expected reason)."""
    nf, bad_token = "CUSTOMER_NOT_FOUND", "INVALID_REQUEST_TOKEN"
    a = scene.a
    return [
        ("get balance", "get_balance", lambda c: {"customer_id": c}, nf),
        ("get customer", "get_customer", lambda c: {"customer_id": c}, nf),
        ("check", "check",
         lambda c: {"customer_id": c, "request_id": "req-probe", "estimated_grains": "100"}, nf),
        ("deduct with a token minted for A", "deduct",
         lambda c: {"customer_id": c, "request_id": "req-b-open", "tokens_consumed": 10,
                    "model": "gpt-4", "request_token": minted_token(a, c, "req-b-open")}, nf),
        ("deduct with B's own token", "deduct",
         lambda c: {"customer_id": c, "request_id": "req-b-open", "tokens_consumed": 10,
                    "model": "gpt-4", "request_token": scene.b_open_token}, bad_token),
        ("finalize without a token", "finalize",
         lambda c: {"customer_id": c, "request_id": "req-b-open",
                    "status": "COMPLETED_SUCCESS", "total_actual_cost_grains": "5"}, nf),
        ("finalize with a token minted for A", "finalize",
         lambda c: {"customer_id": c, "request_id": "req-b-open", "status": "FAILED_ERROR",
                    "request_token": minted_token(a, c, "req-b-open")}, nf),
        ("finalize with B's own token", "finalize",
         lambda c: {"customer_id": c, "request_id": "req-b-open", "status": "FAILED_ERROR",
                    "request_token": scene.b_open_token}, bad_token),
        ("credit", "credit",
         lambda c: {"customer_id": c, "amount_grains": "100", "transaction_id": "tx-x"}, nf),
        ("debit", "debit",
         lambda c: {"customer_id": c, "amount_grains": "100", "transaction_id": "tx-y"}, nf),
        ("list requests", "list_requests", lambda c: {"customer_id": c}, nf),
        ("verify integrity", "verify_integrity", lambda c: {"customer_id": c}, nf),
    ]  # fmt: skip


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_another_tenants_customer_is_an_unknown_customer(
    scene: Scene, transport: str
) -> None:
    before = await scene.probe.snapshot(scene.b)
    for case, call, fields, reason in _cross_tenant_cases(scene):
        for role in ("admin", "enforcer", "reader"):
            if role == "reader" and call not in (
                "get_balance", "get_customer", "list_requests", "verify_integrity",
            ):  # fmt: skip
                continue
            if role == "enforcer" and call in ("credit", "debit"):
                continue
            key = scene.a.keys[role]
            on_b = await send(scene.api, transport, call, fields("cus_b"), key)
            on_ghost = await send(scene.api, transport, call, fields(GHOST), key)
            code = "NOT_FOUND" if reason == "CUSTOMER_NOT_FOUND" else "PERMISSION_DENIED"
            failure = refused(on_b, code, reason)
            assert normalised(failure, "cus_b") == normalised(refused(on_ghost, code, reason),
                                                              GHOST), (case, role)  # fmt: skip
            if reason == "CUSTOMER_NOT_FOUND":
                assert (failure.field, failure.message) == (
                    "customer_id", "customer 'cus_b' not found",
                ), case  # fmt: skip
            else:
                assert failure.field == "request_token", case
    # B's settled request is as unknown to A as one that never existed.
    for role in ("admin", "reader"):
        key = scene.a.keys[role]
        known = await send(scene.api, transport, "get_request", {"request_id": "req-b-done"}, key)
        ghost = await send(scene.api, transport, "get_request", {"request_id": "req-ghost"}, key)
        failure = refused(known, "NOT_FOUND", "REQUEST_NOT_FOUND")
        assert normalised(failure, "req-b-done") == normalised(
            refused(ghost, "NOT_FOUND", "REQUEST_NOT_FOUND"), "req-ghost"
        )
        with_customer = await send(
            scene.api, transport, "get_request",
            {"request_id": "req-b-done", "customer_id": "cus_b"}, key,
        )  # fmt: skip
        assert refused(with_customer, "NOT_FOUND", "REQUEST_NOT_FOUND") == failure
    # A lists its own customers only; its "shared" is its own, not B's.
    listed = await send(scene.api, transport, "list_customers", {}, scene.a.keys["reader"])
    assert isinstance(listed, dict)
    assert [(c["customer_id"], c["balance"]) for c in listed["customers"]] == [
        ("cus_a", "1000000"), ("cus_a2", "299700"), ("shared", "50000"),
    ]  # fmt: skip
    integrity = await send(scene.api, transport, "verify_integrity", {}, scene.a.keys["reader"])
    assert isinstance(integrity, dict)
    assert [c["customer_id"] for c in integrity["customers"]] == ["cus_a", "cus_a2", "shared"]
    # A's sync rebuilds A's accounts only.
    synced = await send(scene.api, transport, "sync_all", {}, scene.a.keys["admin"])
    assert isinstance(synced, dict)
    assert synced["customers_synced"] == "3"
    # Nothing of B's moved: same stores, same numbers through B's own key.
    assert await scene.probe.snapshot(scene.b) == before
    assert await rest_balance(scene.api, scene.b, "cus_b") == (999_600, 1_000, 998_600)
    assert await rest_balance(scene.api, scene.b, "shared") == (70_000, 100, 69_900)


# -- roles ------------------------------------------------------------------------------------


def _mutations(customer_id: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("check", {"customer_id": customer_id, "request_id": "req-role",
                   "estimated_grains": "100"}),
        ("deduct", {"customer_id": customer_id, "request_id": "req-role",
                    "request_token": "v1.x.y", "tokens_consumed": 1}),
        ("finalize", {"customer_id": customer_id, "request_id": "req-role",
                      "status": "COMPLETED_SUCCESS"}),
        ("create_customer", {"customer_id": "cus_by_role", "initial_balance_grains": "9"}),
        ("credit", {"customer_id": customer_id, "amount_grains": "100"}),
        ("debit", {"customer_id": customer_id, "amount_grains": "100"}),
        ("sync_all", {}),
    ]  # fmt: skip


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_reader_reads_but_cannot_move_money(scene: Scene, transport: str) -> None:
    reader = scene.a.keys["reader"]
    before = await scene.probe.snapshot(scene.a)
    for call, fields in _mutations("cus_a"):
        failure = refused(
            await send(scene.api, transport, call, fields, reader),
            "PERMISSION_DENIED", "PERMISSION_DENIED",
        )  # fmt: skip
        assert "reader key cannot perform" in failure.message, call
    assert await scene.probe.snapshot(scene.a) == before
    balance = await send(scene.api, transport, "get_balance", {"customer_id": "cus_a2"}, reader)
    assert balance == {"balance": "299700", "reserved": "0", "available": "299700"}
    customer = await send(scene.api, transport, "get_customer", {"customer_id": "cus_a2"}, reader)
    assert isinstance(customer, dict)
    assert (customer["customer_id"], customer["balance"], customer["lifetime_spent_grains"]) == (
        "cus_a2", "299700", "300",
    )  # fmt: skip
    requests = await send(scene.api, transport, "list_requests", {"customer_id": "cus_a2"}, reader)
    assert isinstance(requests, dict)
    assert [(r["request_id"], r["actual_cost_grains"]) for r in requests["requests"]] == [
        ("req-a2-done", "300")
    ]
    request = await send(scene.api, transport, "get_request", {"request_id": "req-a2-done"}, reader)
    assert isinstance(request, dict)
    assert request["customer_id"] == "cus_a2"
    integrity = await send(
        scene.api, transport, "verify_integrity", {"customer_id": "cus_a2"}, reader
    )
    assert isinstance(integrity, dict)
    assert integrity["ok"] is True


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_enforcer_enforces_but_cannot_administer(scene: Scene, transport: str) -> None:
    enforcer = scene.a.keys["enforcer"]
    before = await scene.probe.snapshot(scene.a)
    for call, fields in _mutations("cus_a")[3:]:  # create_customer, credit, debit, sync_all
        failure = refused(
            await send(scene.api, transport, call, fields, enforcer),
            "PERMISSION_DENIED", "PERMISSION_DENIED",
        )  # fmt: skip
        assert "enforcer key cannot perform admin calls" in failure.message, call
    assert await scene.probe.snapshot(scene.a) == before
    # ... and the four balance calls work with exact numbers.
    request_id = f"req-enforcer-{transport}"
    start = await send(scene.api, transport, "get_balance", {"customer_id": "cus_a"}, enforcer)
    assert isinstance(start, dict)
    check = await send(
        scene.api, transport, "check",
        {"customer_id": "cus_a", "request_id": request_id, "estimated_grains": "1000",
         "buffer_multiplier": 1.0, "metadata": {"model": "cheap"}},
        enforcer,
    )  # fmt: skip
    assert isinstance(check, dict)
    assert (check["approved"], check["reserved_grains"]) == (
        True,
        "1000",
    )
    deduct = await send(
        scene.api, transport, "deduct",
        {"customer_id": "cus_a", "request_id": request_id, "request_token": check["request_token"],
         "tokens_consumed": 100, "is_completion": True},
        enforcer,
    )  # fmt: skip
    assert isinstance(deduct, dict)
    assert (deduct["success"], deduct["consumed_grains"]) == (
        True,
        "200",
    )
    final = await send(
        scene.api, transport, "finalize",
        {"customer_id": "cus_a", "request_id": request_id, "status": "COMPLETED_SUCCESS",
         "request_token": check["request_token"], "actual_completion_tokens": 150},
        enforcer,
    )  # fmt: skip
    assert isinstance(final, dict)
    assert (final["charged_grains"], final["refunded_grains"]) == ("300", "700")
    end = await send(scene.api, transport, "get_balance", {"customer_id": "cus_a"}, enforcer)
    assert isinstance(end, dict)
    assert int(end["balance"]) == int(start["balance"]) - 300


# -- keys -------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_missing_garbage_revoked_and_expired_keys_are_unauthenticated(
    scene: Scene, transport: str
) -> None:
    expired, _ = await add_key(
        scene, scene.a, Role.ADMIN, expires_at=datetime.now(UTC) - timedelta(minutes=1)
    )
    revoked, record = await add_key(scene, scene.a, Role.ADMIN)
    assert isinstance(
        await send(scene.api, transport, "get_balance", {"customer_id": "cus_a"}, revoked), dict
    )
    await save_key(scene, replace(record, revoked_at=datetime.now(UTC)))
    await _wait_refused(scene, transport, revoked)
    before = await scene.probe.snapshot(scene.a)
    headers = [
        ("no authorization", None),
        ("empty authorization", ""),
        ("bearer without a key", "Bearer"),
        ("basic scheme", f"Basic {scene.a.keys['admin']}"),
        ("the key without a scheme", scene.a.keys["admin"]),
        *((f"garbage key {k!r}", f"Bearer {k}") for k in GARBAGE_KEYS),
        ("expired key", f"Bearer {expired}"),
        ("revoked key", f"Bearer {revoked}"),
    ]
    for case, authorization in headers:
        for call, fields in (
            ("get_balance", {"customer_id": "cus_a"}),
            *_mutations("cus_a"),
            ("list_customers", {}),
        ):
            result = await send(
                scene.api, transport, call, fields, None, authorization=authorization
            )
            failure = refused(result, "UNAUTHENTICATED", "UNAUTHENTICATED")
            assert failure.field is None, (case, call)
    assert await scene.probe.snapshot(scene.a) == before


async def _wait_refused(scene: Scene, transport: str, key: str) -> None:
    """Revocation reaches the service by NOTIFY (or the key cache's 5 s maximum age)."""
    for _ in range(100):
        result = await send(scene.api, transport, "get_balance", {"customer_id": "cus_a"}, key)
        if isinstance(result, Failure):
            refused(result, "UNAUTHENTICATED", "UNAUTHENTICATED")
            return
        await asyncio.sleep(0.1)
    raise AssertionError("a revoked key still works after 10 s")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_key_limited_to_customers_sees_only_them(scene: Scene, transport: str) -> None:
    key, _ = await add_key(scene, scene.a, Role.ADMIN, customers=frozenset({"cus_a"}))
    ok = await send(scene.api, transport, "get_balance", {"customer_id": "cus_a"}, key)
    assert isinstance(ok, dict)
    before = await scene.probe.snapshot(scene.a)
    for case, call, fields, _ in _cross_tenant_cases(scene):
        # The allow-list is checked before the request token: always CUSTOMER_NOT_FOUND.
        hidden = await send(scene.api, transport, call, fields("cus_a2"), key)
        ghost = await send(scene.api, transport, call, fields(GHOST), key)
        reason = "CUSTOMER_NOT_FOUND"
        assert normalised(refused(hidden, "NOT_FOUND", reason), "cus_a2") == normalised(
            refused(ghost, "NOT_FOUND", reason), GHOST
        ), case
    request = await send(scene.api, transport, "get_request", {"request_id": "req-a2-done"}, key)
    refused(request, "NOT_FOUND", "REQUEST_NOT_FOUND")
    listed = await send(scene.api, transport, "list_customers", {}, key)
    assert isinstance(listed, dict)
    assert [c["customer_id"] for c in listed["customers"]] == ["cus_a"]
    integrity = await send(scene.api, transport, "verify_integrity", {}, key)
    assert isinstance(integrity, dict)
    assert [c["customer_id"] for c in integrity["customers"]] == ["cus_a"]
    assert await scene.probe.snapshot(scene.a) == before


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_get_request_finds_the_settlement_a_limited_key_may_see(
    scene: Scene, transport: str
) -> None:
    """Two customers of one tenant settle the same request id, cus_old first. Without a
    customer id GetRequest answers the newest settlement the key may see: a key allowed
    only on cus_old reads cus_old's (it used to take the newest of all, cus_new's, with
    LIMIT 1 and then hide it: REQUEST_NOT_FOUND)."""
    tenant = await provision_tenant(scene.dsn)  # its own tenant: the shared one is counted
    for customer_id in ("cus_old", "cus_new"):
        await create_customer(scene.api, tenant, customer_id, 100_000)
    await settle(scene.api, tenant, "cus_old", "req-dup", 300)
    await settle(scene.api, tenant, "cus_new", "req-dup", 500)
    old_only, _ = await add_key(scene, tenant, Role.READER, customers=frozenset({"cus_old"}))
    new_only, _ = await add_key(scene, tenant, Role.READER, customers=frozenset({"cus_new"}))

    async def read(key: str, **narrow: str) -> dict[str, Any] | Failure:
        fields = {"request_id": "req-dup", **narrow}
        return await send(scene.api, transport, "get_request", fields, key)

    def seen(result: dict[str, Any] | Failure) -> tuple[str, str, str, str, str]:
        assert isinstance(result, dict), result
        return (result["request_id"], result["customer_id"], result["status"],
                result["actual_cost_grains"], result["refunded_grains"])  # fmt: skip

    old, new = ("req-dup", "cus_old", "completed", "300", "0"), (
        "req-dup", "cus_new", "completed", "500", "0",
    )  # fmt: skip
    assert seen(await read(old_only)) == old
    assert seen(await read(new_only)) == new
    assert seen(await read(tenant.keys["reader"])) == new  # no allow-list: the newest
    assert seen(await read(tenant.keys["reader"], customer_id="cus_old")) == old
    assert seen(await read(old_only, customer_id="cus_old")) == old
    hidden = refused(await read(old_only, customer_id="cus_new"), "NOT_FOUND", "REQUEST_NOT_FOUND")
    assert (hidden.field, hidden.message) == ("request_id", "no settled request 'req-dup'")


# -- request tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_wrong_request_token_is_rejected_and_moves_nothing(
    scene: Scene, transport: str
) -> None:
    a, enforcer = scene.a, scene.a.keys["enforcer"]
    r1, r2 = f"tok-1-{transport}", f"tok-2-{transport}"
    t1 = await open_hold(scene.api, a, "cus_a", r1, 1_000)
    t2 = await open_hold(scene.api, a, "cus_a", r2, 1_000)
    tampered = t1[:-1] + ("A" if t1[-1] != "A" else "B")
    wrong = {
        "another request's token": ("cus_a", r1, t2),
        "a tampered token": ("cus_a", r1, tampered),
        "a token of an earlier hold": ("cus_a", r1, minted_token(a, "cus_a", r1)),
        "not a token": ("cus_a", r1, "not-a-token"),
        "another tenant's token": ("shared", "r-same", scene.b_same_token),
    }
    before = await scene.probe.snapshot(a)
    balance_before = await rest_balance(scene.api, a, "cus_a")
    for case, (customer_id, request_id, token) in wrong.items():
        common = {"customer_id": customer_id, "request_id": request_id, "request_token": token}
        deduct = await send(
            scene.api, transport, "deduct",
            {**common, "tokens_consumed": 10, "model": "gpt-4", "is_completion": True},
            enforcer,
        )  # fmt: skip
        final = await send(
            scene.api, transport, "finalize",
            {**common, "status": "COMPLETED_SUCCESS", "total_actual_cost_grains": "10"},
            enforcer,
        )  # fmt: skip
        for result in (deduct, final):
            failure = refused(result, "PERMISSION_DENIED", "INVALID_REQUEST_TOKEN")
            assert failure.field == "request_token", (case, failure)
    assert await scene.probe.snapshot(a) == before
    assert await rest_balance(scene.api, a, "cus_a") == balance_before
    hold = await scene.probe.redis.hgetall(hold_key(a.name, "cus_a", r1))
    assert (hold[b"amount"], hold[b"consumed"], hold[b"status"]) == (b"1000", b"0", b"open")
    # The right token works.
    deduct = await send(
        scene.api, transport, "deduct",
        {"customer_id": "cus_a", "request_id": r1, "request_token": t1, "tokens_consumed": 10,
         "is_completion": True},
        enforcer,
    )  # fmt: skip
    assert isinstance(deduct, dict)
    assert deduct["consumed_grains"] == "600"
    for request_id, token in ((r1, t1), (r2, t2)):
        final = await send(
            scene.api, transport, "finalize",
            {"customer_id": "cus_a", "request_id": request_id, "request_token": token,
             "status": "COMPLETED_SUCCESS"},
            enforcer,
        )  # fmt: skip
        assert isinstance(final, dict)
        assert final["success"] is True


# -- the dev key and key material ---------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_dev_key_is_refused_outside_dev_mode(scene: Scene, transport: str) -> None:
    conn = await asyncpg.connect(scene.dsn)
    digest = hash_key(DEV_API_KEY)
    inserted = None
    try:
        inserted = await conn.fetchval(
            """INSERT INTO api_keys (key_hash, key_id, tenant, name, role)
               VALUES ($1, $2, $3, 'dev key planted by e2e', 'admin')
               ON CONFLICT (key_hash) DO NOTHING RETURNING key_id""",
            digest, f"dev-{transport}", scene.a.name,
        )  # fmt: skip
        await conn.execute("SELECT pg_notify('beam_api_keys', 'dev')")
        assert await conn.fetchval("SELECT count(*) FROM api_keys WHERE key_hash = $1", digest)
        scene.keys_used.append(DEV_API_KEY)
        for call, fields in (("get_balance", {"customer_id": "cus_a"}), ("list_customers", {})):
            result = await send(scene.api, transport, call, fields, DEV_API_KEY)
            failure = refused(result, "UNAUTHENTICATED", "UNAUTHENTICATED")
            assert failure.message == "the dev key is refused outside dev mode"
    finally:
        if inserted:
            await conn.execute(
                "DELETE FROM api_keys WHERE key_hash = $1 AND key_id = $2", digest, inserted
            )
        await conn.close()


async def test_no_plaintext_key_in_the_log_or_the_database(scene: Scene) -> None:
    """Runs last: every key this module used, valid or not, searched for in the service log
    and in every column of every PostgreSQL table (as its row's text)."""
    secrets = set(scene.keys_used)
    for key in scene.keys_used:
        parts = key.split("_", 3)
        if key.startswith("beam_sk_") and len(parts) == 4:
            secrets.add(parts[3])  # the secret part alone (key_id is a public handle)
    assert len(secrets) >= 10
    log = scene.service.log_text()
    assert log, "the service log is empty: the search would prove nothing"
    assert not [s for s in secrets if s in log]
    conn = await asyncpg.connect(scene.dsn)
    try:
        tables = await conn.fetch(
            """SELECT quote_ident(table_schema) || '.' || quote_ident(table_name) AS name
               FROM information_schema.tables
               WHERE table_type = 'BASE TABLE'
                 AND table_schema NOT IN ('pg_catalog', 'information_schema')"""
        )
        assert {"public.api_keys", "public.transactions"} <= {t["name"] for t in tables}
        found = []
        for table in tables:
            rows = await conn.fetch(f"SELECT t::text AS row FROM {table['name']} t")  # noqa: S608
            for row in rows:
                found += [(table["name"], s) for s in secrets if s in row["row"]]
        assert found == []
        hashes = await conn.fetch("SELECT key_hash FROM api_keys WHERE tenant = $1", scene.a.name)
        assert hash_key(scene.a.keys["admin"]) in {r["key_hash"] for r in hashes}
    finally:
        await conn.close()
