"""Bad input, table-driven, on every field of every call, over REST and gRPC.

Each row names a call, what is wrong with the request, and the answer it must get: HTTP 400
(REST) or INVALID_ARGUMENT (gRPC) with the exact reason code, the right field in `field` /
`beam-field`, and a message that starts with that field. Every row also proves that
nothing was written: the tenant's PostgreSQL rows and every Redis key under its hash tags
are byte-for-byte the same before and after, and so is the balance GetBalance reports.
The service log must not gain a traceback.

The base request of each call is valid and *would* move money (open a hold, grow the
1-grain hold `req_open`, settle it, credit, debit, create a customer), so a row whose bad
field were ignored would show up as a write. Rows that a transport cannot express (a wrong
JSON type over gRPC, an empty path segment over REST) exist only for the other one; the
coverage test at the end checks that every field of every request message is in the table
for both transports.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from beam.constants import MAX_GRAINS, hold_key
from tests.e2e.conftest import (
    CALLS,
    Api,
    Failure,
    StoreProbe,
    StoreSnapshot,
    create_customer,
    ok_json,
    open_hold,
    rest_balance,
    rest_failure,
)
from tests.support.stack import ServiceProcess, Stores, Tenant, provision_tenant

MISSING = "MISSING_FIELD"
INVALID = "INVALID_FIELD"
RANGE = "OUT_OF_RANGE"
UNKNOWN = "UNKNOWN_FIELD"
MALFORMED = "MALFORMED_BODY"
TOO_LARGE = "BODY_TOO_LARGE"

BODY_LIMIT = 65_536  # the service's default max_body_bytes
INT32_OVER = "2147483648"
INT32_UNDER = "-2147483649"
INT64_OVER = "9223372036854775808"
LONG_ID = "a" * 129


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


DROP: Any = _Drop()  # remove the field from the request


@dataclass(frozen=True)
class Verbatim:
    """JSON text put into the body as is (tokens json.dumps cannot write)."""

    text: str


@dataclass(frozen=True)
class Raw:
    """A whole request body (bytes, or built from the valid base fields)."""

    content: bytes | Callable[[dict[str, Any]], bytes]
    chunked: bool = False
    query: str = ""

    def build(self, base: dict[str, Any]) -> bytes:
        return self.content(base) if callable(self.content) else self.content


Changes = dict[str, Any]


@dataclass(frozen=True)
class Row:
    call: str
    case: str
    field: str
    reason: str
    rest: Changes | Raw | None  # None: not expressible over REST
    grpc: Changes | Raw | None  # None: not expressible over gRPC

    def id(self, transport: str) -> str:
        return f"{self.call}:{self.case}:{transport}"


def both(call: str, case: str, field_: str, reason: str, changes: Changes) -> Row:
    return Row(call, case, field_, reason, changes, changes)


def rest_only(call: str, case: str, field_: str, reason: str, changes: Changes | Raw) -> Row:
    return Row(call, case, field_, reason, changes, None)


def grpc_only(call: str, case: str, field_: str, reason: str, changes: Changes | Raw) -> Row:
    return Row(call, case, field_, reason, None, changes)


# -- row generators -------------------------------------------------------------------------


_EXISTING_IDS = {"customer_id": "cus_main", "request_id": "req_done"}  # in the world fixture


def id_rows(call: str, name: str, *, required: bool = True, in_path: bool = False) -> list[Row]:
    """An identifier: missing/empty (when required), too long, bad characters, wrong type."""
    # An existing id plus "\n": re.match with "$" accepted it, and so would a route's "$"
    # after Starlette's ``path`` convertor (it would read "req_done").
    newline_id = _EXISTING_IDS.get(name, "cus_1") + "\n"
    rows = []
    if required:
        rows.append(
            Row(call, f"{name} empty", name, MISSING, None if in_path else {name: ""}, {name: ""})
        )
        if not in_path:
            rows.append(both(call, f"{name} missing", name, MISSING, {name: DROP}))
    rows += [
        both(call, f"{name} 129 characters", name, RANGE, {name: LONG_ID}),
        both(call, f"{name} with a space", name, INVALID, {name: "bad id"}),
        both(call, f"{name} starting with a dot", name, INVALID, {name: ".hidden"}),
        both(call, f"{name} with NUL", name, INVALID, {name: "a\x00b"}),
        both(call, f"{name} non-ASCII", name, INVALID, {name: "kund\u00e9"}),
        both(call, f"{name} with a trailing newline", name, INVALID, {name: newline_id}),
    ]
    if not in_path and CALLS[call].http_method == "POST":
        rows.append(
            rest_only(call, f"{name} unpaired surrogate", name, INVALID,
                      {name: Verbatim('"\\ud800"')})
        )  # fmt: skip
    return rows


def grains_rows(call: str, name: str, *, low: int) -> list[Row]:
    """An int64 amount in grains: below its floor, above 2**53-1, above int64, not a number."""
    rows = [
        both(call, f"{name} negative", name, RANGE, {name: -1}),
        both(call, f"{name} 2**53", name, RANGE, {name: MAX_GRAINS + 1}),
        both(call, f"{name} int64 max", name, RANGE, {name: 2**63 - 1}),
        both(call, f"{name} int64 min", name, RANGE, {name: -(2**63)}),
        rest_only(call, f"{name} over int64", name, RANGE, {name: INT64_OVER}),
        rest_only(call, f"{name} fractional", name, INVALID, {name: 1.5}),
        rest_only(call, f"{name} 1e400", name, RANGE, {name: Verbatim("1e400")}),
    ]
    if low > 0:
        rows.append(both(call, f"{name} zero", name, RANGE, {name: 0}))
        rows.append(both(call, f"{name} missing", name, RANGE, {name: DROP}))
    return rows


def int32_rows(call: str, name: str, *, low: int = 0) -> list[Row]:
    """A token count or limit (int32): negative, below its floor, int32 overflow."""
    rows = [
        both(call, f"{name} -1", name, RANGE, {name: -1}),
        both(call, f"{name} int32 min", name, RANGE, {name: -(2**31)}),
        rest_only(call, f"{name} int32 overflow", name, RANGE, {name: INT32_OVER}),
        rest_only(call, f"{name} int32 underflow", name, RANGE, {name: INT32_UNDER}),
    ]
    if low > 0:
        rows.append(both(call, f"{name} zero", name, RANGE, {name: 0}))
    return rows


def text_rows(call: str, name: str, limit: int) -> list[Row]:
    return [
        both(call, f"{name} {limit + 1} characters", name, RANGE, {name: "d" * (limit + 1)}),
        both(call, f"{name} with NUL", name, INVALID, {name: "top\x00up"}),
    ]


def wrong_type_rows(call: str) -> list[Row]:
    """Every field of a JSON body given a JSON type its proto3 JSON mapping does not take."""
    rows: list[Row] = []
    spec = CALLS[call]
    for name, kind in _fields(spec.request_type().DESCRIPTOR):
        for label, value in _WRONG_VALUES[kind]:
            changes: Changes | Raw = {name: value}
            if name in spec.path_fields:  # in the body, next to the valid one in the URL
                changes = Raw(lambda base, n=name, v=value: to_json({**base, n: v}))
            rows.append(rest_only(call, f"{name} {label}", name, INVALID, changes))
    return rows


_WRONG_VALUES: dict[str, list[tuple[str, Any]]] = {
    "string": [("as a number", 123), ("as an object", {"id": "x"}), ("as a list", ["x"])],
    "number": [("as true", True), ("as letters", "abc"), ("as an object", {"n": 1})],
    "bool": [("as the string true", "true"), ("as 1", 1), ("as an empty string", "")],
    "enum": [("as true", True), ("as an object", {"s": 1}), ("lowercase", "completed_success")],
    "message": [("as a string", "gpt-4"), ("as a list", []), ("as a number", 5)],
    "map": [("as a list", []), ("as a string", "k=v")],
}


def _fields(descriptor: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted name, JSON kind) of every field, nested messages included."""
    t = FieldDescriptor
    for f in descriptor.fields:
        name = f"{prefix}{f.name}"
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            yield name, "map"
        elif f.type == t.TYPE_MESSAGE:
            yield name, "message"
            yield from _fields(f.message_type, f"{name}.")
        elif f.type == t.TYPE_STRING:
            yield name, "string"
        elif f.type == t.TYPE_BOOL:
            yield name, "bool"
        elif f.type == t.TYPE_ENUM:
            yield name, "enum"
        else:
            yield name, "number"


# Which string field to inflate past the size limit, per call.
_INFLATE = {
    "check": "request_id", "deduct": "request_token", "finalize": "request_token",
    "get_balance": "customer_id", "create_customer": "display_name",
    "get_customer": "customer_id", "list_customers": "after_customer_id",
    "credit": "description", "debit": "description", "list_requests": "customer_id",
    "get_request": "request_id", "verify_integrity": "customer_id",
}  # fmt: skip
# The first string field's number (for a raw string field with bad UTF-8).
_STRING_FIELD_NUMBER = {call: 1 for call in CALLS} | {"list_customers": 2}


def _len_delimited(number: int, payload: bytes) -> bytes:
    out, size = bytearray([(number << 3) | 2]), len(payload)
    while True:
        byte, size = size & 0x7F, size >> 7
        out.append(byte | 0x80 if size else byte)
        if not size:
            return bytes(out) + payload


def body_rows(call: str) -> list[Row]:
    """The body as a whole: size, syntax, shape, unknown fields; raw bytes over gRPC."""
    post = CALLS[call].http_method == "POST"
    big = "x" * (BODY_LIMIT + 1)
    inflate = _INFLATE.get(call)

    def too_large(base: dict[str, Any]) -> bytes:
        if not post:
            return b"x" * (BODY_LIMIT + 1)
        return to_json({**base, inflate or "padding": big})

    rows = [
        rest_only(call, "body over the limit", "body", TOO_LARGE, Raw(too_large)),
        rest_only(call, "chunked body over the limit", "body", TOO_LARGE,
                  Raw(too_large, chunked=True)),
        grpc_only(call, "message over the limit", "body", TOO_LARGE,
                  {inflate: big} if inflate else Raw(_len_delimited(15, big.encode()))),
        grpc_only(call, "not protobuf", "body", MALFORMED, Raw(b"\xff\xff\xff\xff")),
        grpc_only(call, "truncated message", "body", MALFORMED, Raw(b"\x0a\x05ab")),
    ]  # fmt: skip
    if call != "sync_all":
        bad_utf8 = _len_delimited(_STRING_FIELD_NUMBER[call], b"\xc3\x28")
        rows.append(grpc_only(call, "string with bad UTF-8", "body", MALFORMED, Raw(bad_utf8)))
    if post:
        rows += [
            rest_only(call, "malformed JSON", "body", MALFORMED, Raw(b'{"customer_id": ')),
            rest_only(call, "JSON array body", "body", MALFORMED, Raw(b"[1, 2]")),
            rest_only(call, "JSON string body", "body", MALFORMED, Raw(b'"check"')),
            rest_only(call, "JSON number body", "body", MALFORMED, Raw(b"42")),
            rest_only(call, "JSON null body", "body", MALFORMED, Raw(b"null")),
            rest_only(call, "invalid UTF-8", "body", MALFORMED, Raw(b'{"customer_id": "\xff"}')),
            rest_only(call, "bare NaN token", "body", MALFORMED, Raw(b'{"x": NaN}')),
            rest_only(call, "nesting 20000 deep", "body", MALFORMED,
                      Raw(b"[" * 20_000 + b"]" * 20_000)),
            rest_only(call, "unknown field", "bogus", UNKNOWN, {"bogus": 1}),
        ]  # fmt: skip
    else:
        rows.append(rest_only(call, "unknown query parameter", "bogus", UNKNOWN, {"bogus": "1"}))
    return rows


# -- the table ------------------------------------------------------------------------------


def _check_rows() -> list[Row]:
    c = "check"
    return [
        *id_rows(c, "customer_id"),
        *id_rows(c, "request_id"),
        *grains_rows(c, "estimated_grains", low=0),
        both(c, "estimated_grains and metadata.model missing", "estimated_grains", MISSING,
             {"estimated_grains": DROP, "metadata.model": DROP}),
        both(c, "buffer_multiplier 0.5", "buffer_multiplier", RANGE, {"buffer_multiplier": 0.5}),
        both(c, "buffer_multiplier 0.999999", "buffer_multiplier", RANGE,
             {"buffer_multiplier": 0.999999}),
        both(c, "buffer_multiplier 100.000001", "buffer_multiplier", RANGE,
             {"buffer_multiplier": 100.000001}),
        both(c, "buffer_multiplier -1", "buffer_multiplier", RANGE, {"buffer_multiplier": -1.0}),
        Row(c, "buffer_multiplier NaN", "buffer_multiplier", RANGE,
            {"buffer_multiplier": "NaN"}, {"buffer_multiplier": float("nan")}),
        Row(c, "buffer_multiplier Infinity", "buffer_multiplier", RANGE,
            {"buffer_multiplier": "Infinity"}, {"buffer_multiplier": float("inf")}),
        Row(c, "buffer_multiplier -Infinity", "buffer_multiplier", RANGE,
            {"buffer_multiplier": "-Infinity"}, {"buffer_multiplier": float("-inf")}),
        rest_only(c, "buffer_multiplier 1e400", "buffer_multiplier", RANGE,
                  {"buffer_multiplier": Verbatim("1e400")}),
        both(c, "metadata.model with a space", "metadata.model", INVALID,
             {"metadata.model": "gpt 4"}),
        both(c, "metadata.model 129 characters", "metadata.model", RANGE,
             {"metadata.model": LONG_ID}),
        *int32_rows(c, "metadata.max_tokens"),
        both(c, "metadata.max_tokens missing while estimating", "metadata.max_tokens", MISSING,
             {"estimated_grains": DROP, "metadata.max_tokens": DROP}),
        *int32_rows(c, "metadata.prompt_tokens"),
        *int32_rows(c, "metadata.cached_prompt_tokens"),
        both(c, "metadata.cached_prompt_tokens above prompt_tokens",
             "metadata.cached_prompt_tokens", RANGE, {"metadata.cached_prompt_tokens": 11}),
        *int32_rows(c, "metadata.min_completion_tokens"),
        both(c, "metadata.min_completion_tokens above max_tokens",
             "metadata.min_completion_tokens", RANGE, {"metadata.min_completion_tokens": 101}),
        both(c, "metadata.min_completion_tokens with estimated_grains",
             "metadata.min_completion_tokens", INVALID, {"metadata.min_completion_tokens": 10}),
        both(c, "metadata.custom_properties 17 entries", "metadata.custom_properties", RANGE,
             {"metadata.custom_properties": {f"k{i}": "v" for i in range(17)}}),
        both(c, "metadata.custom_properties key 257 bytes", "metadata.custom_properties", RANGE,
             {"metadata.custom_properties": {"k" * 257: "v"}}),
        both(c, "metadata.custom_properties empty key", "metadata.custom_properties", RANGE,
             {"metadata.custom_properties": {"": "v"}}),
        both(c, "metadata.custom_properties value 257 bytes",
             "metadata.custom_properties[team]", RANGE,
             {"metadata.custom_properties": {"team": "v" * 257}}),
        both(c, "metadata.custom_properties value 129 two-byte characters",
             "metadata.custom_properties[team]", RANGE,
             {"metadata.custom_properties": {"team": "\u00e9" * 129}}),
        rest_only(c, "metadata.custom_properties value a number",
                  "metadata.custom_properties[team]", INVALID,
                  {"metadata.custom_properties": {"team": 7}}),
        rest_only(c, "metadata unknown field", "metadata.bogus", UNKNOWN, {"metadata.bogus": 1}),
        rest_only(c, "empty body", "customer_id", MISSING, Raw(b"")),
        rest_only(c, "empty object", "customer_id", MISSING, Raw(b"{}")),
    ]  # fmt: skip


def _deduct_rows() -> list[Row]:
    c = "deduct"
    return [
        *id_rows(c, "customer_id"),
        *id_rows(c, "request_id"),
        both(c, "request_token missing", "request_token", MISSING, {"request_token": DROP}),
        both(c, "request_token empty", "request_token", MISSING, {"request_token": ""}),
        both(c, "request_token 257 characters", "request_token", RANGE,
             {"request_token": "v1." + "t" * 254}),
        *int32_rows(c, "tokens_consumed", low=1),
        both(c, "tokens_consumed missing", "tokens_consumed", RANGE, {"tokens_consumed": DROP}),
        *int32_rows(c, "prompt_tokens"),
        *int32_rows(c, "cached_prompt_tokens"),
        *int32_rows(c, "reserve_ahead_tokens"),
        rest_only(c, "tokens_consumed fractional", "tokens_consumed", INVALID,
                  {"tokens_consumed": 1.5}),
        both(c, "model with a space", "model", INVALID, {"model": "gpt 4"}),
        both(c, "model 129 characters", "model", RANGE, {"model": LONG_ID}),
        both(c, "is_cached_prompt with is_completion", "is_cached_prompt", INVALID,
             {"is_completion": True, "is_cached_prompt": True}),
        both(c, "sequence_number -1", "sequence_number", RANGE, {"sequence_number": -1}),
        both(c, "sequence_number above 10**9", "sequence_number", RANGE,
             {"sequence_number": 10**9 + 1}),
        both(c, "sequence_number int64 max", "sequence_number", RANGE,
             {"sequence_number": 2**63 - 1}),
        rest_only(c, "sequence_number over int64", "sequence_number", RANGE,
                  {"sequence_number": INT64_OVER}),
        rest_only(c, "empty body", "customer_id", MISSING, Raw(b"")),
    ]  # fmt: skip


def _finalize_rows() -> list[Row]:
    c = "finalize"
    statuses = "COMPLETED_SUCCESS"
    return [
        *id_rows(c, "customer_id"),
        *id_rows(c, "request_id"),
        both(c, "status missing", "status", MISSING, {"status": DROP}),
        # let_through is a label any Finalize may carry: it excuses nothing.
        both(c, "let_through with the status missing", "status", MISSING,
             {"let_through": True, "status": DROP}),
        Row(c, "status unspecified", "status", MISSING,
            {"status": "REQUEST_STATUS_UNSPECIFIED"}, {"status": 0}),
        Row(c, "status unknown number", "status", INVALID, {"status": 99}, {"status": 99}),
        rest_only(c, "status unknown name", "status", INVALID, {"status": "DONE"}),
        rest_only(c, "status with a suffix", "status", INVALID, {"status": statuses + "X"}),
        *int32_rows(c, "actual_prompt_tokens"),
        *int32_rows(c, "actual_completion_tokens"),
        *int32_rows(c, "actual_cached_prompt_tokens"),
        both(c, "actual_cached_prompt_tokens above actual_prompt_tokens",
             "actual_cached_prompt_tokens", RANGE, {"actual_cached_prompt_tokens": 11}),
        *grains_rows(c, "total_actual_cost_grains", low=0),
        both(c, "model with a space", "model", INVALID, {"model": "gpt 4"}),
        both(c, "model 129 characters", "model", RANGE, {"model": LONG_ID}),
        both(c, "request_token 257 characters", "request_token", RANGE,
             {"request_token": "v1." + "t" * 254}),
        rest_only(c, "empty body", "customer_id", MISSING, Raw(b"")),
    ]  # fmt: skip


def _admin_rows() -> list[Row]:
    rows = [
        *id_rows("get_balance", "customer_id", in_path=True),
        rest_only("get_balance", "customer_id in the query differs", "customer_id", INVALID,
                  Raw(b"", query="customer_id=cus_other")),
        *id_rows("create_customer", "customer_id"),
        *text_rows("create_customer", "display_name", 256),
        *text_rows("create_customer", "platform_user_id", 256),
        *grains_rows("create_customer", "initial_balance_grains", low=0),
        both("create_customer", "buffer_strategy unknown", "buffer_strategy", INVALID,
             {"buffer_strategy": "reckless"}),
        both("create_customer", "buffer_strategy in capitals", "buffer_strategy", INVALID,
             {"buffer_strategy": "BALANCED"}),
        rest_only("create_customer", "state is not an input", "state", UNKNOWN,
                  {"state": "ACTIVE"}),
        rest_only("create_customer", "empty body", "customer_id", MISSING, Raw(b"")),
        *id_rows("get_customer", "customer_id", in_path=True),
        *int32_rows("list_customers", "limit"),
        both("list_customers", "limit 1001", "limit", RANGE, {"limit": 1001}),
        rest_only("list_customers", "limit letters", "limit", INVALID, {"limit": "ten"}),
        rest_only("list_customers", "limit fractional", "limit", INVALID, {"limit": "1.5"}),
        *id_rows("list_customers", "after_customer_id", required=False),
        *id_rows("list_requests", "customer_id", in_path=True),
        *int32_rows("list_requests", "limit"),
        both("list_requests", "limit 1001", "limit", RANGE, {"limit": 1001}),
        rest_only("list_requests", "limit letters", "limit", INVALID, {"limit": "ten"}),
        *id_rows("get_request", "request_id", in_path=True),
        *id_rows("get_request", "customer_id", required=False),
        *id_rows("verify_integrity", "customer_id", required=False),
    ]  # fmt: skip
    for call in ("credit", "debit"):
        rows += [
            *id_rows(call, "customer_id", in_path=True),
            rest_only(call, "customer_id in the body differs", "customer_id", INVALID,
                      Raw(lambda base: to_json({**base, "customer_id": "cus_other"}))),
            *grains_rows(call, "amount_grains", low=1),
            rest_only(call, "amount_grains letters", "amount_grains", INVALID,
                      {"amount_grains": "lots"}),
            *text_rows(call, "description", 512),
            *id_rows(call, "transaction_id", required=False),
            rest_only(call, "empty body", "amount_grains", RANGE, Raw(b"")),
        ]  # fmt: skip
    return rows


ROWS: list[Row] = [
    *_check_rows(),
    *_deduct_rows(),
    *_finalize_rows(),
    *_admin_rows(),
    *(row for call, spec in CALLS.items() if spec.http_method == "POST"
      for row in wrong_type_rows(call)),
    *(row for call in CALLS for row in body_rows(call)),
]  # fmt: skip
REST_ROWS = [r for r in ROWS if r.rest is not None]
GRPC_ROWS = [r for r in ROWS if r.grpc is not None]


# -- building requests ----------------------------------------------------------------------


def apply_json(base: dict[str, Any], changes: Changes) -> dict[str, Any]:
    data = copy.deepcopy(base)
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = data
        for name in parents:
            node = node.setdefault(name, {})
        if value is DROP:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return data


def apply_proto(message: Message, changes: Changes) -> None:
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = message
        for name in parents:
            node = getattr(node, name)
        if value is DROP:
            node.ClearField(leaf)
        elif isinstance(value, dict):
            target = getattr(node, leaf)
            target.clear()
            target.update(value)
        else:
            setattr(node, leaf, value)


def to_json(data: dict[str, Any]) -> bytes:
    verbatim: dict[str, str] = {}

    def swap(node: Any) -> Any:
        if isinstance(node, Verbatim):
            marker = f"@@verbatim-{len(verbatim)}@@"
            verbatim[json.dumps(marker)] = node.text
            return marker
        if isinstance(node, dict):
            return {k: swap(v) for k, v in node.items()}
        return node

    text = json.dumps(swap(data))
    for marker, raw in verbatim.items():
        text = text.replace(marker, raw)
    return text.encode()


async def _chunks(content: bytes, size: int = 8192) -> AsyncIterator[bytes]:
    for start in range(0, len(content), size):
        yield content[start : start + size]


# -- the world every row runs against ---------------------------------------------------------


@dataclass
class World:
    service: ServiceProcess
    tenant: Tenant
    api: Api
    probe: StoreProbe
    token: str
    bases: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.tenant.keys["admin"]

    async def state(self) -> tuple[StoreSnapshot, tuple[int, int, int]]:
        return await self.probe.snapshot(self.tenant), await rest_balance(
            self.api, self.tenant, "cus_main"
        )

    async def send_rest(self, row: Row) -> httpx.Response:
        base = self.bases[row.call]
        if isinstance(row.rest, Raw):
            method, path, _ = self.api.rest_request(row.call, base)
            content: Any = row.rest.build(base)
            if row.rest.chunked:
                content = _chunks(content)
            if row.rest.query:
                path = f"{path}?{row.rest.query}"
            return await self.api.rest_raw(method, path, self.key, content)
        assert row.rest is not None
        method, path, rest = self.api.rest_request(row.call, apply_json(base, row.rest))
        if method == "GET":
            return await self.api.http.get(path, params=rest, headers=_auth(self.key))
        return await self.api.rest_raw(method, path, self.key, to_json(rest))

    async def send_grpc(self, row: Row) -> Message | Failure:
        if isinstance(row.grpc, Raw):
            return await self.api.grpc(row.call, row.grpc.build({}), self.key)
        assert row.grpc is not None
        message = self.api.grpc_message(row.call, self.bases[row.call])
        apply_proto(message, row.grpc)
        return await self.api.grpc(row.call, message, self.key)


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
async def world(service: ServiceProcess, stores: Stores) -> AsyncIterator[World]:
    assert stores.postgres is not None
    tenant = await provision_tenant(stores.postgres.dsn)
    api = Api(service)
    probe = await StoreProbe.open(stores)
    try:
        await create_customer(api, tenant, "cus_main", 1_000_000)
        await create_customer(api, tenant, "cus_other", 500_000)
        done_token = await open_hold(api, tenant, "cus_main", "req_done", 2_000)
        settled = await api.rest(
            "finalize",
            {"customer_id": "cus_main", "request_id": "req_done", "status": "COMPLETED_SUCCESS",
             "total_actual_cost_grains": "1500", "request_token": done_token},
            tenant.keys["enforcer"],
        )  # fmt: skip
        assert ok_json(settled)["charged_grains"] == "1500"
        # A 1-grain hold: any deduct that got through would have to grow it.
        token = await open_hold(api, tenant, "cus_main", "req_open", 1)
        world = World(service, tenant, api, probe, token)
        world.bases = _bases(token)
        yield world
    finally:
        await api.close()
        await probe.close()


def _bases(token: str) -> dict[str, dict[str, Any]]:
    """A valid request of every call; each would change something if it were accepted."""
    main = {"customer_id": "cus_main"}
    return {
        "check": {**main, "request_id": "req_new", "estimated_grains": "1000",
                  "buffer_multiplier": 1.5,
                  "metadata": {"model": "gpt-4", "max_tokens": 100, "prompt_tokens": 10,
                               "custom_properties": {"team": "search"}}},
        "deduct": {**main, "request_id": "req_open", "request_token": token,
                   "tokens_consumed": 10, "model": "gpt-4", "is_completion": True,
                   "sequence_number": "1", "is_cached_prompt": False},
        "finalize": {**main, "request_id": "req_open", "status": "COMPLETED_SUCCESS",
                     "actual_prompt_tokens": 10, "actual_completion_tokens": 20,
                     "actual_cached_prompt_tokens": 0, "total_actual_cost_grains": "0",
                     "model": "gpt-4", "request_token": token},
        "get_balance": dict(main),
        "create_customer": {"customer_id": "cus_created", "display_name": "Created",
                            "platform_user_id": "user-1", "initial_balance_grains": "5000",
                            "buffer_strategy": "balanced"},
        "get_customer": dict(main),
        "list_customers": {"limit": 10},
        "credit": {**main, "amount_grains": "700", "description": "top-up",
                   "transaction_id": "tx-credit-1"},
        "debit": {**main, "amount_grains": "700", "description": "fee",
                  "transaction_id": "tx-debit-1"},
        "list_requests": {**main, "limit": 5},
        "get_request": {"request_id": "req_done", **main},
        "verify_integrity": dict(main),
        "sync_all": {},
    }  # fmt: skip


def _assert_refused(failure: Failure, row: Row) -> None:
    assert (failure.code, failure.reason, failure.field) == (
        "INVALID_ARGUMENT", row.reason, row.field,
    ), failure  # fmt: skip
    assert failure.message.startswith(f"{row.field}: "), failure.message


# -- the tests --------------------------------------------------------------------------------


async def test_every_base_request_is_valid(world: World) -> None:
    """The rows mean something only if the unchanged requests are accepted: reads answer
    200 (the writing calls are proven valid by the lifecycle and admin tests, and by the
    fixture, which made the same calls for other ids)."""
    for call in ("get_balance", "get_customer", "list_customers", "list_requests",
                 "get_request", "verify_integrity"):  # fmt: skip
        ok_json(await world.api.rest(call, world.bases[call], world.key))
        assert not isinstance(await world.api.grpc(call, world.bases[call], world.key), Failure)


@pytest.mark.parametrize("row", REST_ROWS, ids=[r.id("rest") for r in REST_ROWS])
async def test_rest_refuses_bad_input(world: World, row: Row) -> None:
    before = await world.state()
    log_offset = world.service.log_path.stat().st_size
    response = await world.send_rest(row)
    assert response.status_code == 400, response.text
    _assert_refused(rest_failure(response), row)
    assert await world.state() == before
    assert "Traceback" not in _log_since(world.service, log_offset)


@pytest.mark.parametrize("row", GRPC_ROWS, ids=[r.id("grpc") for r in GRPC_ROWS])
async def test_grpc_refuses_bad_input(world: World, row: Row) -> None:
    before = await world.state()
    log_offset = world.service.log_path.stat().st_size
    result = await world.send_grpc(row)
    assert isinstance(result, Failure), result
    _assert_refused(result, row)
    assert await world.state() == before
    assert "Traceback" not in _log_since(world.service, log_offset)


async def _refusal(world: World, transport: str, call: str, fields: dict[str, Any]) -> Failure:
    if transport == "rest":
        response = await world.api.rest(call, fields, world.key)
        failure = rest_failure(response)
        assert failure.http_status == response.status_code
        return failure
    result = await world.api.grpc(call, fields, world.key)
    assert isinstance(result, Failure), result
    return result


@pytest.mark.parametrize("transport", ["rest", "grpc"])
async def test_a_non_ascii_request_token_is_refused_not_an_internal_error(
    world: World, transport: str
) -> None:
    """A token whose MAC (or nonce) is not ASCII made hmac.compare_digest raise TypeError:
    a 500. It is a token that does not match: 403 INVALID_REQUEST_TOKEN, nothing moved."""
    version, nonce, mac = world.token.split(".")
    tokens = [
        f"{version}.{nonce}.\u00e9{mac[1:]}",
        f"{version}.{nonce}." + "\u00e9" * len(mac),
        f"{version}.n\u00f6nce.{mac}",
    ]
    before = await world.state()
    log_offset = world.service.log_path.stat().st_size
    http_status = 403 if transport == "rest" else None
    for token in tokens:
        for call in ("deduct", "finalize"):
            fields = {**world.bases[call], "request_token": token}
            failure = await _refusal(world, transport, call, fields)
            assert failure == Failure(
                "PERMISSION_DENIED", "INVALID_REQUEST_TOKEN", "request_token",
                "request_token does not match this customer and request", http_status,
            ), (call, token)  # fmt: skip
    assert await world.state() == before
    assert "Traceback" not in _log_since(world.service, log_offset)


@pytest.mark.parametrize("transport", ["rest", "grpc"])
async def test_a_customer_id_with_a_trailing_newline_creates_no_customer(
    world: World, transport: str
) -> None:
    """CreateCustomer with "cus_1\\n": 400 INVALID_FIELD on customer_id, and no customer
    "cus_1\\n" (nor "cus_1") afterwards."""
    before = await world.state()
    fields = {**world.bases["create_customer"], "customer_id": "cus_1\n"}
    failure = await _refusal(world, transport, "create_customer", fields)
    assert failure == Failure(
        "INVALID_ARGUMENT", INVALID, "customer_id",
        "customer_id: must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
        400 if transport == "rest" else None,
    )  # fmt: skip
    assert await world.state() == before
    found = await world.probe.conn.fetch(
        "SELECT customer_id FROM customers WHERE tenant = $1 AND customer_id LIKE 'cus\\_1%'",
        world.tenant.name,
    )
    assert found == []
    missing = await world.api.rest("get_customer", {"customer_id": "cus_1"}, world.key)
    assert (missing.status_code, rest_failure(missing).reason) == (404, "CUSTOMER_NOT_FOUND")


async def test_nothing_moved_across_all_rows(world: World) -> None:
    """After every row: the exact balances of the fixture, the 1-grain hold untouched (it
    consumed nothing), no customer created, one settled request, no new ledger rows."""
    assert await rest_balance(world.api, world.tenant, "cus_main") == (998_500, 1, 998_499)
    assert await rest_balance(world.api, world.tenant, "cus_other") == (500_000, 0, 500_000)
    hold = await world.probe.redis.hgetall(hold_key(world.tenant.name, "cus_main", "req_open"))
    assert (hold[b"amount"], hold[b"consumed"], hold[b"status"]) == (b"1", b"0", b"open")
    assert await world.probe.ledger_rows(world.tenant, "cus_main") == 2
    assert await world.probe.ledger_rows(world.tenant, "cus_other") == 1
    customers = await world.probe.conn.fetch(
        "SELECT customer_id FROM customers WHERE tenant = $1 ORDER BY 1", world.tenant.name
    )
    assert [r["customer_id"] for r in customers] == ["cus_main", "cus_other"]
    assert "Traceback" not in world.service.log_text()


async def test_the_base_requests_are_accepted(world: World) -> None:
    """Each row differs from an accepted request in its bad field only: the unchanged
    requests of the writing calls succeed over REST, and their retries over gRPC replay."""
    order = ("check", "deduct", "finalize", "create_customer", "credit", "debit",
             "verify_integrity", "sync_all")  # fmt: skip
    for call in order:
        ok_json(await world.api.rest(call, world.bases[call], world.key))
        assert not isinstance(await world.api.grpc(call, world.bases[call], world.key), Failure)
    # check opened 1500 (1000 x 1.5); deduct grew req_open to 600 before finalize settled it
    # at 10 prompt + 20 completion gpt-4 tokens = 1500; credit +700, debit -700.
    assert await rest_balance(world.api, world.tenant, "cus_main") == (997_000, 1_500, 995_500)


def _log_since(service: ServiceProcess, offset: int) -> str:
    with service.log_path.open("rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def test_the_table_covers_every_field_of_every_call() -> None:
    """Every field of every request message has rows on both transports (gRPC cannot send a
    wrong type, so its booleans are covered by the rows that combine them)."""
    for call, spec in CALLS.items():
        for name, _kind in _fields(spec.request_type().DESCRIPTOR):
            for transport, rows in (("rest", REST_ROWS), ("grpc", GRPC_ROWS)):
                touched = {
                    path
                    for r in rows
                    if r.call == call
                    for changes in [r.rest if transport == "rest" else r.grpc]
                    if isinstance(changes, dict)
                    for path in changes
                }
                covered = any(p == name or p.startswith(f"{name}.") for p in touched)
                if transport == "grpc" and name == "metadata":
                    covered = any(p.startswith("metadata.") for p in touched)
                assert covered, f"{call}.{name} has no {transport} row"
        assert any(r.call == call and r.field == "body" for r in REST_ROWS)
        assert any(r.call == call and r.field == "body" for r in GRPC_ROWS)
