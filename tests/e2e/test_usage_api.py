"""GetUsage and GetTopCustomers through a running `beam serve`, on REST and gRPC, and the
`beam usage` command.

REST answers the proto3 JSON of the gRPC messages (int64 as strings, timestamps in RFC
3339); bad ranges, buckets and groupings are 400 INVALID_ARGUMENT with the field named, on
both transports; another tenant's customer, or one outside a key's allow-list, is
CUSTOMER_NOT_FOUND exactly like an unknown one; reader keys may call both.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

import grpc
import httpx
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from beam.adapters.postgres_store import PostgresStore
from beam.admin.v1 import admin_pb2 as admin
from beam.config import ServiceSettings
from beam.core.auth import generate_key
from beam.records import ApiKeyRecord, Role
from tests.e2e.conftest import (
    Api,
    Failure,
    create_customer,
    ok_json,
    open_hold,
    rest_balance,
    rest_failure,
)
from tests.e2e.test_cli import beam, client, parse_table
from tests.support.stack import TEST_TOKEN_SECRET, ServiceProcess, Stores, Tenant, provision_tenant

USAGE_FIELDS = ["start", "model", "requests", "charged_grains", "prompt_tokens",
                "completion_tokens", "cached_prompt_tokens", "let_through_requests",
                "let_through_grains"]  # fmt: skip


async def _settle(api: Api, tenant: Tenant, customer_id: str, request_id: str,
                  **usage: Any) -> None:  # fmt: skip
    token = await open_hold(api, tenant, customer_id, request_id, 60_000, usage.pop("model"))
    body = {"customer_id": customer_id, "request_id": request_id,
            "status": "COMPLETED_SUCCESS", "request_token": token, **usage}  # fmt: skip
    ok_json(await api.rest("finalize", body, tenant.keys["enforcer"]))


async def usage_rest(api: Api, key: str, customer_id: str, **params: Any) -> httpx.Response:
    return await api.http.get(
        f"/v1/customers/{quote(customer_id, safe='')}/usage",
        params=params,
        headers={"Authorization": f"Bearer {key}"},
    )


async def usage_grpc(api: Api, key: str, method: str, request: Message,
                     response_type: type[Message]) -> Message | Failure:  # fmt: skip
    call = api.channel.unary_unary(
        f"/beam.admin.v1.AdminService/{method}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_type.FromString,
    )
    try:
        return await call(request, metadata=(("authorization", f"Bearer {key}"),), timeout=30)  # type: ignore[no-any-return]
    except grpc.aio.AioRpcError as error:
        trailers = dict(error.trailing_metadata() or ())
        return Failure(
            error.code().name, str(trailers.get("beam-reason", "")),
            str(trailers["beam-field"]) if "beam-field" in trailers else None,
            error.details() or "",
        )  # fmt: skip


def as_json(message: Message) -> dict[str, Any]:
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    assert isinstance(data, dict)
    return data


@pytest.fixture
async def spent(api: Api, tenant: Tenant) -> dict[str, str]:
    """Customer u1: two requests on two models (one with cached tokens); u2: one request."""
    await create_customer(api, tenant, "u1", 10_000_000)
    await create_customer(api, tenant, "u2", 10_000_000)
    await _settle(api, tenant, "u1", "r1", model="gpt-4", actual_prompt_tokens=234,
                  actual_completion_tokens=487, total_actual_cost_grains=48_700)  # fmt: skip
    await _settle(api, tenant, "u1", "r2", model="gpt-4o-mini", actual_prompt_tokens=10_000,
                  actual_completion_tokens=2_000, actual_cached_prompt_tokens=4_000)  # fmt: skip
    await _settle(api, tenant, "u2", "r1", model="cheap", actual_prompt_tokens=100,
                  actual_completion_tokens=100)  # fmt: skip
    now = int(time.time() * 1000)
    return {"start": str(now - 3_600_000), "end": str(now + 60_000)}


async def test_usage_over_rest_and_grpc_in_proto3_json(
    api: Api, tenant: Tenant, spent: dict[str, str]
) -> None:
    reader = tenant.keys["reader"]
    response = await usage_rest(api, reader, "u1", bucket="hour", group_by="model", **spent)
    data = ok_json(response)
    assert list(data) == ["buckets", "start", "end", "bucket"]
    assert data["bucket"] == "hour"
    assert data["start"].endswith(":00:00Z")
    assert data["end"].endswith(":00:00Z")
    for bucket in data["buckets"]:
        assert list(bucket) == USAGE_FIELDS
        assert bucket["start"].endswith(":00:00Z")
    by_model = {b["model"]: b for b in data["buckets"]}
    assert sum(int(b["charged_grains"]) for b in data["buckets"]) == 48_700 + 2_400
    assert {m: (b["requests"], b["charged_grains"], b["prompt_tokens"],
                b["completion_tokens"], b["cached_prompt_tokens"])
            for m, b in by_model.items()} == {
        "gpt-4": ("1", "48700", "234", "487", "0"),
        "gpt-4o-mini": ("1", "2400", "10000", "2000", "4000"),
    }  # fmt: skip
    # gRPC answers the same message.
    request = admin.GetUsageRequest(customer_id="u1", bucket="hour", group_by="model", **spent)
    answer = await usage_grpc(api, reader, "GetUsage", request, admin.GetUsageResponse)
    assert isinstance(answer, admin.GetUsageResponse)
    assert as_json(answer) == data
    # Not grouped: one row per bucket; minute buckets; the default range and bucket.
    minute = ok_json(await usage_rest(api, reader, "u1", bucket="minute", **spent))
    assert {b["model"] for b in minute["buckets"]} == {""}
    assert sum(int(b["charged_grains"]) for b in minute["buckets"]) == 51_100
    assert sum(int(b["requests"]) for b in minute["buckets"]) == 2
    default = ok_json(await usage_rest(api, reader, "u1"))
    assert default["bucket"] == "hour"
    assert sum(int(b["charged_grains"]) for b in default["buckets"]) == 51_100


async def test_top_customers_by_spend(api: Api, tenant: Tenant, spent: dict[str, str]) -> None:
    response = await api.http.get(
        "/v1/usage/top-customers", params={**spent, "limit": "5"},
        headers={"Authorization": f"Bearer {tenant.keys['reader']}"},
    )  # fmt: skip
    data = ok_json(response)
    assert list(data) == ["customers", "start", "end"]
    assert [(c["customer_id"], c["charged_grains"], c["requests"]) for c in data["customers"]] == [
        ("u1", "51100", "2"), ("u2", "300", "1"),
    ]  # fmt: skip
    request = admin.GetTopCustomersRequest(limit=5, **spent)
    answer = await usage_grpc(
        api, tenant.keys["reader"], "GetTopCustomers", request, admin.GetTopCustomersResponse
    )
    assert isinstance(answer, admin.GetTopCustomersResponse)
    assert as_json(answer) == data


async def test_an_empty_period_answers_empty(api: Api, tenant: Tenant) -> None:
    await create_customer(api, tenant, "idle", 1_000)
    data = ok_json(await usage_rest(
        api, tenant.keys["reader"], "idle", start="2001-01-01T00:00:00Z",
        end="2001-01-01T06:00:00+00:00", bucket="hour",
    ))  # fmt: skip
    assert data == {"buckets": [], "start": "2001-01-01T00:00:00Z",
                    "end": "2001-01-01T06:00:00Z", "bucket": "hour"}  # fmt: skip


BAD = [
    ({"bucket": "week"}, "INVALID_FIELD", "bucket"),
    ({"bucket": "HOUR"}, "INVALID_FIELD", "bucket"),
    ({"group_by": "customer"}, "INVALID_FIELD", "group_by"),
    ({"start": "yesterday"}, "INVALID_FIELD", "start"),
    ({"start": "2026-01-01T00:00:00"}, "INVALID_FIELD", "start"),  # no zone
    ({"end": "2026-13-01T00:00:00Z"}, "INVALID_FIELD", "end"),
    ({"start": "-5"}, "INVALID_FIELD", "start"),
    ({"start": "99999999999999999"}, "OUT_OF_RANGE", "start"),
    ({"start": "1960-01-01T00:00:00Z"}, "OUT_OF_RANGE", "start"),
    ({"start": "x" * 65}, "OUT_OF_RANGE", "start"),
    ({"start": "2026-01-02T00:00:00Z", "end": "2026-01-01T00:00:00Z"}, "OUT_OF_RANGE", "end"),
    ({"start": "1767225600000", "end": "1767225600000"}, "OUT_OF_RANGE", "end"),
    ({"start": "2026-01-01T00:00:00Z", "end": "2026-01-03T00:00:00Z", "bucket": "minute"},
     "OUT_OF_RANGE", "start"),
    ({"start": "2020-01-01T00:00:00Z", "end": "2026-01-01T00:00:00Z", "bucket": "hour"},
     "OUT_OF_RANGE", "start"),
]  # fmt: skip


@pytest.mark.parametrize(("params", "reason", "field"), BAD)
async def test_bad_ranges_buckets_and_groupings_are_400_naming_the_field(
    api: Api, tenant: Tenant, params: dict[str, str], reason: str, field: str
) -> None:
    await create_customer(api, tenant, "u_bad", 1_000)
    key = tenant.keys["reader"]
    failure = rest_failure(await usage_rest(api, key, "u_bad", **params))
    assert (failure.http_status, failure.code, failure.reason, failure.field) == (
        400, "INVALID_ARGUMENT", reason, field,
    )  # fmt: skip
    assert failure.message.startswith(f"{field}: ")
    request = admin.GetUsageRequest(customer_id="u_bad", **params)
    answer = await usage_grpc(api, key, "GetUsage", request, admin.GetUsageResponse)
    assert isinstance(answer, Failure)
    assert (answer.code, answer.reason, answer.field) == ("INVALID_ARGUMENT", reason, field)


async def test_bad_top_customer_queries_are_400(api: Api, tenant: Tenant) -> None:
    key = tenant.keys["reader"]
    for params, reason, field in (
        ({"limit": "101"}, "OUT_OF_RANGE", "limit"),
        ({"limit": "-1"}, "OUT_OF_RANGE", "limit"),
        ({"start": "2020-01-01T00:00:00Z", "end": "2026-01-01T00:00:00Z"}, "OUT_OF_RANGE",
         "start"),
        ({"end": "soon"}, "INVALID_FIELD", "end"),
        ({"customer_id": "u1"}, "UNKNOWN_FIELD", "customer_id"),
    ):  # fmt: skip
        response = await api.http.get(
            "/v1/usage/top-customers", params=params, headers={"Authorization": f"Bearer {key}"}
        )
        failure = rest_failure(response)
        assert (failure.http_status, failure.reason, failure.field) == (400, reason, field)
    unknown = rest_failure(await usage_rest(api, key, "u1", since="1h"))
    assert (unknown.reason, unknown.field) == ("UNKNOWN_FIELD", "since")


async def _key(stores: Stores, tenant: Tenant, role: Role, customers: frozenset[str]) -> str:
    assert stores.postgres is not None
    plaintext, key_id, digest = generate_key()
    store = await PostgresStore.connect(ServiceSettings(
        database_url=stores.postgres.dsn,  # type: ignore[arg-type]
        request_token_secret=TEST_TOKEN_SECRET,  # type: ignore[arg-type]
        database_pool_min=1, database_pool_max=1,
    ))  # fmt: skip
    try:
        await store.upsert_api_key(
            ApiKeyRecord(digest, key_id, tenant.name, role, "usage-e2e", customers=customers)
        )
    finally:
        await store.close()
    return plaintext


async def test_another_tenants_customer_is_customer_not_found(
    api: Api, tenant: Tenant, stores: Stores, spent: dict[str, str]
) -> None:
    assert stores.postgres is not None
    other = await provision_tenant(stores.postgres.dsn)
    limited = await _key(stores, tenant, Role.READER, frozenset({"u2"}))
    unknown = rest_failure(await usage_rest(api, tenant.keys["reader"], "nobody"))
    for key, customer_id in ((other.keys["admin"], "u1"), (limited, "u1"),
                             (tenant.keys["reader"], "nobody")):  # fmt: skip
        failure = rest_failure(await usage_rest(api, key, customer_id, **spent))
        assert (failure.http_status, failure.reason, failure.field) == (
            404, "CUSTOMER_NOT_FOUND", "customer_id",
        )  # fmt: skip
        assert failure.message == unknown.message.replace("nobody", customer_id)
        request = admin.GetUsageRequest(customer_id=customer_id, **spent)
        answer = await usage_grpc(api, key, "GetUsage", request, admin.GetUsageResponse)
        assert isinstance(answer, Failure)
        assert (answer.code, answer.reason) == ("NOT_FOUND", "CUSTOMER_NOT_FOUND")
    # Top customers: another tenant sees none of ours; a limited key sees its customers only.
    for key, expected in ((other.keys["reader"], []), (limited, ["u2"])):
        data = ok_json(await api.http.get(
            "/v1/usage/top-customers", params=spent, headers={"Authorization": f"Bearer {key}"},
        ))  # fmt: skip
        assert [c["customer_id"] for c in data["customers"]] == expected
    # Still refused without a key.
    assert (await api.http.get("/v1/customers/u1/usage")).status_code == 401


async def test_beam_usage_command_table_chart_and_json(
    service: ServiceProcess, api: Api, tenant: Tenant, spent: dict[str, str]
) -> None:
    reader = client(service, tenant.keys["reader"])
    run = await beam("usage", "--customer-id", "u1", "--since", "1h", "--bucket", "minute",
                     "--by-model", *reader)  # fmt: skip
    assert run.code == 0, run
    head, table_text, chart = _sections(run.stdout)
    assert head.startswith("usage ")
    assert head.endswith(" by minute (UTC)")
    rows = parse_table(table_text)
    assert sorted((r["model"], r["charged_grains"], r["cached_prompt_tokens"]) for r in rows) == [
        ("gpt-4", "48700", "0"), ("gpt-4o-mini", "2400", "4000"),
    ]  # fmt: skip
    assert "51,100" in chart
    assert "total: 51,100 grains, 2 requests" in run.stdout
    data = (await beam("usage", "--customer-id", "u1", "--since", "1h", "--bucket", "minute",
                       "--json", *reader)).json()  # fmt: skip
    assert sum(int(b["charged_grains"]) for b in data["buckets"]) == 51_100
    top = await beam("usage", "--top", "2", "--since", "1d", *reader)
    assert top.code == 0, top
    _, top_table, top_chart = _sections(top.stdout)
    assert [(r["customer_id"], r["charged_grains"]) for r in parse_table(top_table)] == [
        ("u1", "51100"), ("u2", "300"),
    ]  # fmt: skip
    assert "u1" in top_chart
    assert "51,100" in top_chart
    # Usage errors (2) and API errors (1) as for every client command.
    assert (await beam("usage", *reader)).code == 2
    assert (await beam("usage", "--customer-id", "u1", "--since", "soon", *reader)).code == 2
    missing = await beam("usage", "--customer-id", "nobody", *reader)
    assert (missing.code, missing.stderr.split(":")[:2]) == (1, ["error", " CUSTOMER_NOT_FOUND"])


def _sections(stdout: str) -> tuple[str, str, str]:
    """(heading line, table, chart and total) of `beam usage`'s output."""
    head, rest = stdout.split("\n", 1)
    table_text, chart = rest.split("\n\n", 1)
    return head, table_text, chart


# -- let-through usage (issue 16, item 5) --------------------------------------------------


async def _finalize(api: Api, transport: str, key: str, body: dict[str, Any]) -> dict[str, Any]:
    """FinalizeRequest over ``transport``, as proto3 JSON."""
    if transport == "rest":
        return ok_json(await api.rest("finalize", body, key))
    answer = await api.grpc("finalize", body, key)
    assert isinstance(answer, Message), answer
    return as_json(answer)


@pytest.mark.parametrize("transport", ["rest", "grpc"])
async def test_let_through_usage_is_labelled_on_the_request_and_in_usage(
    api: Api, tenant: Tenant, transport: str
) -> None:
    """A Finalize that says let_through (the app let the request through while Beam was
    unreachable) is charged like any other; its request says let_through, and usage counts
    it, and its grains, apart (within requests and charged_grains). A replay changes
    nothing, whatever label it carries."""
    enforcer, reader = tenant.keys["enforcer"], tenant.keys["reader"]
    await create_customer(api, tenant, "lt1", 1_000_000)
    await create_customer(api, tenant, "lt2", 1_000_000)
    started = int(time.time() * 1000)
    # An ordinary request: a hold, then its Finalize. gpt-4: 10 x 30 + 20 x 60 = 1500.
    token = await open_hold(api, tenant, "lt1", "normal", 60_000)
    normal = await _finalize(api, transport, enforcer, {
        "customer_id": "lt1", "request_id": "normal", "status": "COMPLETED_SUCCESS",
        "actual_prompt_tokens": 10, "actual_completion_tokens": 20, "model": "gpt-4",
        "request_token": token,
    })  # fmt: skip
    assert normal["charged_grains"] == "1500"
    # Let through: no Check reached Beam, so no hold and no token (settled as a claim).
    # cheap: 100 x 1 + 300 x 2 = 700.
    let_through = {
        "customer_id": "lt1", "request_id": "let-1", "status": "COMPLETED_SUCCESS",
        "actual_prompt_tokens": 100, "actual_completion_tokens": 300, "model": "cheap",
        "let_through": True,
    }  # fmt: skip
    first = await _finalize(api, transport, enforcer, let_through)
    assert (first["charged_grains"], first["refunded_grains"], first["replayed"]) == (
        "700", "0", False,
    )  # fmt: skip
    # lt2: let through, at the provider's exact cost.
    other = await _finalize(api, transport, enforcer, {
        "customer_id": "lt2", "request_id": "let-2", "status": "COMPLETED_SUCCESS",
        "actual_prompt_tokens": 5, "actual_completion_tokens": 7, "model": "gpt-4o-mini",
        "total_actual_cost_grains": 4321, "let_through": True,
    })  # fmt: skip
    assert other["charged_grains"] == "4321"
    # Replays (the outbox posts until acknowledged; a retry may not carry the label): the
    # stored settlement answers, nothing is charged or counted again.
    for body in (let_through, {**let_through, "let_through": False}):
        again = await _finalize(api, transport, enforcer, body)
        assert again == {**first, "replayed": True}

    # The ledger: each charge once.
    assert await rest_balance(api, tenant, "lt1") == (1_000_000 - 2200, 0, 1_000_000 - 2200)
    assert await rest_balance(api, tenant, "lt2") == (1_000_000 - 4321, 0, 1_000_000 - 4321)
    # The requests: labelled, on both transports.
    for request_id, customer_id, labelled, cost in (
        ("normal", "lt1", False, "1500"), ("let-1", "lt1", True, "700"),
        ("let-2", "lt2", True, "4321"),
    ):  # fmt: skip
        fields = {"request_id": request_id, "customer_id": customer_id}
        data = ok_json(await api.rest("get_request", fields, reader))
        assert (data["let_through"], data["actual_cost_grains"]) == (labelled, cost)
        message = await api.grpc("get_request", fields, reader)
        assert isinstance(message, admin.Request)
        assert as_json(message) == data
    listed = ok_json(await api.rest("list_requests", {"customer_id": "lt1"}, reader))
    assert sorted((r["request_id"], r["let_through"]) for r in listed["requests"]) == [
        ("let-1", True), ("normal", False),
    ]  # fmt: skip

    # Usage: the let-through request and its grains, within requests and charged_grains.
    span = {"start": str(started - 60_000), "end": str(int(time.time() * 1000) + 60_000)}
    for bucket in ("minute", "hour", "day"):
        data = ok_json(await usage_rest(api, reader, "lt1", bucket=bucket, **span))
        totals = [
            sum(int(b[f]) for b in data["buckets"])
            for f in ("requests", "charged_grains", "let_through_requests", "let_through_grains")
        ]
        assert totals == [2, 2200, 1, 700], bucket
    data = ok_json(await usage_rest(api, reader, "lt1", bucket="day", group_by="model", **span))
    assert {b["model"]: (b["requests"], b["charged_grains"], b["let_through_requests"],
                         b["let_through_grains"]) for b in data["buckets"]} == {
        "cheap": ("1", "700", "1", "700"), "gpt-4": ("1", "1500", "0", "0"),
    }  # fmt: skip
    request = admin.GetUsageRequest(customer_id="lt1", bucket="day", group_by="model", **span)
    answer = await usage_grpc(api, reader, "GetUsage", request, admin.GetUsageResponse)
    assert isinstance(answer, admin.GetUsageResponse)
    assert as_json(answer) == data
    # Top customers likewise.
    top = ok_json(await api.http.get(
        "/v1/usage/top-customers", params=span, headers={"Authorization": f"Bearer {reader}"},
    ))  # fmt: skip
    assert [(c["customer_id"], c["requests"], c["charged_grains"], c["let_through_requests"],
             c["let_through_grains"]) for c in top["customers"]] == [
        ("lt2", "1", "4321", "1", "4321"), ("lt1", "2", "2200", "1", "700"),
    ]  # fmt: skip
    request_top = admin.GetTopCustomersRequest(start=span["start"], end=span["end"])
    answer_top = await usage_grpc(
        api, reader, "GetTopCustomers", request_top, admin.GetTopCustomersResponse
    )
    assert isinstance(answer_top, admin.GetTopCustomersResponse)
    assert as_json(answer_top) == top


async def test_beam_usage_and_requests_show_let_through(
    service: ServiceProcess, api: Api, tenant: Tenant
) -> None:
    await create_customer(api, tenant, "lt_cli", 1_000_000)
    token = await open_hold(api, tenant, "lt_cli", "normal", 60_000)
    await _finalize(api, "rest", tenant.keys["enforcer"], {
        "customer_id": "lt_cli", "request_id": "normal", "status": "COMPLETED_SUCCESS",
        "total_actual_cost_grains": 1000, "request_token": token,
    })  # fmt: skip
    await _finalize(api, "rest", tenant.keys["enforcer"], {
        "customer_id": "lt_cli", "request_id": "let-1", "status": "COMPLETED_SUCCESS",
        "model": "cheap", "actual_prompt_tokens": 100, "actual_completion_tokens": 300,
        "let_through": True,
    })  # fmt: skip
    reader = client(service, tenant.keys["reader"])
    run = await beam("usage", "--customer-id", "lt_cli", "--since", "1h", "--bucket", "day",
                     "--by-model", *reader)  # fmt: skip
    assert run.code == 0, run
    _, table_text, _ = _sections(run.stdout)
    assert sorted((r["model"], r["requests"], r["charged_grains"], r["let_through_requests"],
                   r["let_through_grains"]) for r in parse_table(table_text)) == [
        ("cheap", "1", "700", "1", "700"), ("gpt-4", "1", "1000", "0", "0"),
    ]  # fmt: skip
    assert "total: 1,700 grains, 2 requests (let through: 1 request, 700 grains)" in run.stdout
    top = await beam("usage", "--top", "5", "--since", "1d", *reader)
    _, top_table, _ = _sections(top.stdout)
    assert [(r["customer_id"], r["let_through_requests"], r["let_through_grains"])
            for r in parse_table(top_table)] == [("lt_cli", "1", "700")]  # fmt: skip
    listed = await beam("requests", "list", "--customer-id", "lt_cli", *reader)
    assert sorted((r["request_id"], r["let_through"]) for r in listed.table()) == [
        ("let-1", "True"), ("normal", "False"),
    ]  # fmt: skip
    shown = await beam("requests", "show", "--request-id", "let-1", *reader)
    fields = dict(line.strip().split(None, 1) for line in shown.stdout.strip().splitlines())
    assert fields["let_through"] == "True"
