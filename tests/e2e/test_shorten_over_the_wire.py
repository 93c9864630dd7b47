"""The Check that shortens and the reserve-ahead Deduct on both transports (issue 16): the
same fields, the same answers, over REST (proto3 JSON) and gRPC.
gpt-4 (the test price list): 30 grains per input token, 60 per output token.
"""

from __future__ import annotations

from google.protobuf import json_format

from tests.e2e.conftest import Api, create_customer, ok_json
from tests.support.stack import Tenant


def _check(customer_id: str, request_id: str) -> dict[str, object]:
    # Full hold: (10 x 30 + 1000 x 60) x 1.0 = 60 300 grains; 30 000 are available.
    return {
        "customer_id": customer_id, "request_id": request_id, "buffer_multiplier": 1.0,
        "metadata": {"model": "gpt-4", "prompt_tokens": 10, "max_tokens": 1000,
                     "min_completion_tokens": 100},
    }  # fmt: skip


def _deduct(customer_id: str, request_id: str, token: str) -> dict[str, object]:
    return {
        "customer_id": customer_id, "request_id": request_id, "request_token": token,
        "tokens_consumed": 5, "is_completion": True, "sequence_number": 1,
        "prompt_tokens": 10, "reserve_ahead_tokens": 20,
    }  # fmt: skip


async def test_rest_and_grpc_shorten_and_reserve_ahead_alike(api: Api, tenant: Tenant) -> None:
    key = tenant.keys["enforcer"]
    answers = []
    for transport, customer_id in (("rest", "cus_wire_rest"), ("grpc", "cus_wire_grpc")):
        await create_customer(api, tenant, customer_id, 30_000)
        if transport == "rest":
            check = ok_json(await api.rest("check", _check(customer_id, "r1"), key))
        else:
            message = await api.grpc("check", _check(customer_id, "r1"), key)
            check = json_format.MessageToDict(message, preserving_proto_field_name=True)
        token = check.pop("request_token")
        check.pop("hold_expires_at_unix_ms")
        if transport == "rest":
            deduct = ok_json(await api.rest("deduct", _deduct(customer_id, "r1", token), key))
        else:
            message = await api.grpc("deduct", _deduct(customer_id, "r1", token), key)
            deduct = json_format.MessageToDict(message, preserving_proto_field_name=True)
        answers.append((check, deduct))
    rest, grpc = answers
    # (10 x 30 + t x 60) <= 30 000 gives t = 495 (29 700 + 300 = 30 000).
    assert rest[0] == {
        "approved": True, "remaining_balance": "0", "rejection_reason": "",
        "reserved_grains": "30000", "max_affordable_completion_tokens": "495",
        "replayed": False, "granted_completion_tokens": "495",
    }  # fmt: skip
    # Prompt 10 (300) + 5 completion (300) consumed; 25 completion tokens reserved ahead
    # fit in the 30 000 held: covered = (30 000 - 300) / 60 = 495.
    assert rest[1] == {
        "success": True, "remaining_balance": "0", "error_code": "",
        "consumed_grains": "600", "reserved_grains": "30000",
        "covered_completion_tokens": "495",
    }  # fmt: skip
    grpc_check = {k: v for k, v in grpc[0].items()}
    assert grpc_check == {k: v for k, v in rest[0].items() if v not in ("", False, "0")}
    assert grpc[1] == {k: v for k, v in rest[1].items() if v not in ("", False, "0")}
