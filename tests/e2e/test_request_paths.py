"""Request ids in REST paths.

REQUEST_ID_PATTERN allows '/' (and ':' and '@') in a request id, so GetRequest's route
``/v1/requests/{request_id}`` must take the rest of the path, not one segment: an id like
"a/b" is settled, then read back over REST, percent-encoded or not, with exactly the
fields gRPC answers for it.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

import pytest
from google.protobuf import json_format

from tests.e2e.conftest import Api, create_customer, ok_json, open_hold
from tests.support.stack import Tenant

CUSTOMER = "cus_paths"
REQUEST_IDS = ("a/b", "org/team/req@1:x/")


@pytest.mark.parametrize("request_id", REQUEST_IDS)
async def test_a_request_id_with_a_slash_is_read_back_over_rest(
    api: Api, tenant: Tenant, request_id: str
) -> None:
    started_ms = int(time.time() * 1000)
    await create_customer(api, tenant, CUSTOMER, 1_000_000)
    token = await open_hold(api, tenant, CUSTOMER, request_id, 2_000)
    final = ok_json(
        await api.rest(
            "finalize",
            {"customer_id": CUSTOMER, "request_id": request_id, "status": "COMPLETED_SUCCESS",
             "actual_prompt_tokens": 10, "actual_completion_tokens": 20, "model": "gpt-4",
             "request_token": token},
            tenant.keys["enforcer"],
        )
    )  # fmt: skip
    # gpt-4: 10 x 30 + 20 x 60 = 1500 grains of the 2000 held.
    assert (final["charged_grains"], final["refunded_grains"]) == ("1500", "500")

    reader = tenant.keys["reader"]
    encoded = await api.rest("get_request", {"request_id": request_id}, reader)  # a%2Fb
    assert encoded.request.url.raw_path == f"/v1/requests/{quote(request_id, safe='')}".encode()
    answer = ok_json(encoded)
    settled_at = int(answer["settled_at_unix_ms"])
    created_at = int(answer["created_at_unix_ms"])
    assert started_ms <= created_at <= settled_at <= int(time.time() * 1000)
    assert answer == {
        "request_id": request_id, "customer_id": CUSTOMER, "model": "gpt-4",
        "status": "completed", "estimated_grains": "2000", "reserved_grains": "2000",
        "consumed_grains": "0", "actual_cost_grains": "1500", "refunded_grains": "500",
        "overage_grains": "0", "prompt_tokens": "10", "completion_tokens": "20",
        "created_at_unix_ms": str(created_at), "settled_at_unix_ms": str(settled_at),
        "let_through": False,
    }  # fmt: skip

    # Unencoded, and narrowed by customer: the same answer.
    plain = await api.http.get(
        f"/v1/requests/{request_id}", params={"customer_id": CUSTOMER},
        headers={"Authorization": f"Bearer {reader}"},
    )  # fmt: skip
    assert ok_json(plain) == answer
    # gRPC answers the same fields.
    message = await api.grpc("get_request", {"request_id": request_id}, reader)
    as_json: dict[str, Any] = json_format.MessageToDict(
        message,  # type: ignore[arg-type]
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    assert as_json == answer
    # A different request id under the same prefix is not this one.
    other = await api.rest("get_request", {"request_id": f"{request_id}x"}, reader)
    assert (other.status_code, other.json()["error"]["reason"]) == (404, "REQUEST_NOT_FOUND")
