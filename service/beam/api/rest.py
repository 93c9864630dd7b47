"""REST (FastAPI): the same messages as gRPC in the proto3 JSON mapping.

Bodies are parsed by protobuf's own JSON parser into the very messages gRPC receives
(int64 accepted as numbers or strings, enums by name, unknown fields refused) and answers
are rendered by it (int64 as decimal strings), so REST and gRPC cannot drift. Request
schemas in the OpenAPI document (``/docs``) are generated from the proto descriptors.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException

from beam.admin.v1 import admin_pb2 as admin_pb
from beam.api.errors import as_beam_error, http_body
from beam.api.handlers import Handlers, too_large
from beam.balance.v1 import balance_pb2 as balance_pb
from beam.core.auth import Principal
from beam.errors import BeamError, Reason, invalid

Handler = Callable[[Principal, Any], Awaitable[Message]]


class _RestOfPath(Convertor[str]):
    """The rest of the URL path, '/' included: request ids may contain '/' (encoded as %2F
    or not), which Starlette's default ``str`` segment cannot match. Not Starlette's
    ``path`` convertor: its ``.*`` stops before a trailing newline, where the route's ``$``
    also matches, so ``req_1%0A`` would be read as ``req_1``."""

    regex = r"[\s\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("rest_of_path", _RestOfPath())


def render(message: Message) -> dict[str, Any]:
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    # Declaration order (balance, reserved, available), not "set fields first".
    return {f.name: data[f.name] for f in message.DESCRIPTOR.fields if f.name in data}


def parse_error(error: json_format.ParseError) -> BeamError:
    text = str(error)
    unknown = re.search(r'no field named "([^"]+)"', text)
    if unknown:
        return invalid(unknown.group(1), "unknown field", Reason.UNKNOWN_FIELD)
    path = ".".join(re.findall(r"Failed to parse (\w+) field", text)) or "body"
    detail = text.rsplit(":", 1)[-1].strip().rstrip(".") or "invalid value"
    reason = Reason.INVALID_FIELD
    if "out of range" in text.lower():
        reason, detail = Reason.OUT_OF_RANGE, f"out of range for its type ({detail})"
    if "Invalid enum value" in text or "enum" in text.lower():
        detail = "unknown enum value"
    return invalid(path, detail, reason)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (proto3 JSON spells it as the string {name!r})")


def check_shape(data: dict[str, Any], descriptor: Any, prefix: str = "") -> None:
    """Refuse JSON types protobuf's parser accepts loosely or blames on the wrong field.

    It takes ``true`` for a number and ``[]`` for a message, reads a string given for a
    message as a list of field names, and names unknown nested fields without their parent.
    Depth is bounded by the descriptors (and the body by its size limit).
    """
    for key, value in data.items():
        field = descriptor.fields_by_name.get(key) or descriptor.fields_by_camelcase_name.get(key)
        if field is None:
            raise invalid(f"{prefix}{key}", "unknown field", Reason.UNKNOWN_FIELD)
        if value is not None:
            _check_value(value, field, f"{prefix}{field.name}")


def _check_value(value: Any, field: FieldDescriptor, name: str) -> None:
    t = FieldDescriptor
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        if not isinstance(value, dict):
            raise invalid(name, "must be a JSON object")
        for key, item in value.items():
            _check_value(item, field.message_type.fields_by_name["value"], f"{name}[{key}]")
    elif field.is_repeated:
        if not isinstance(value, list):
            raise invalid(name, "must be a JSON array")
    elif field.type == t.TYPE_MESSAGE:
        if not isinstance(value, dict):
            raise invalid(name, "must be a JSON object")
        check_shape(value, field.message_type, f"{name}.")
    elif field.type == t.TYPE_BOOL:
        if not isinstance(value, bool):
            raise invalid(name, "must be true or false")
    elif field.type in (t.TYPE_STRING, t.TYPE_BYTES):
        if not isinstance(value, str):
            raise invalid(name, "must be a JSON string")
    elif field.type == t.TYPE_ENUM:
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise invalid(name, "must be an enum value name")
    elif isinstance(value, bool) or not isinstance(value, int | float | str):
        raise invalid(name, "must be a JSON number or a string")
    elif isinstance(value, float) and not math.isfinite(value):
        raise invalid(name, "must be a finite number", Reason.OUT_OF_RANGE)


def parse_body(raw: bytes, message_type: type[Message], path: dict[str, str]) -> Message:
    try:
        data = json.loads(raw, parse_constant=_reject_constant) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise BeamError(
            Reason.MALFORMED_BODY, f"body: not valid JSON ({error})", field="body"
        ) from None
    if not isinstance(data, dict):
        raise BeamError(Reason.MALFORMED_BODY, "body: must be a JSON object", field="body")
    for name, value in path.items():
        if name in data and str(data[name]) != value:
            raise invalid(name, "does not match the value in the URL path")
        data[name] = value
    check_shape(data, message_type.DESCRIPTOR)
    try:
        return json_format.ParseDict(data, message_type())
    except json_format.ParseError as error:
        raise parse_error(error) from None
    except (TypeError, ValueError, AttributeError) as error:
        raise BeamError(Reason.MALFORMED_BODY, f"body: {error}", field="body") from None


def json_schema(descriptor: Descriptor, depth: int = 0) -> dict[str, Any]:
    """The proto3 JSON shape of a message, for the OpenAPI document."""
    properties: dict[str, Any] = {}
    for field in descriptor.fields:
        properties[field.name] = _field_schema(field, depth)
    return {"type": "object", "properties": properties, "additionalProperties": False}


def _field_schema(field: FieldDescriptor, depth: int) -> dict[str, Any]:
    t = FieldDescriptor
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return {"type": "object", "additionalProperties": {"type": "string"}}
    if field.type == t.TYPE_MESSAGE:
        nested = cast(Descriptor, field.message_type)
        schema = json_schema(nested, depth + 1) if depth < 3 else {"type": "object"}
    elif field.type == t.TYPE_ENUM:
        values = field.enum_type.values if field.enum_type is not None else []
        schema = {"type": "string", "enum": [v.name for v in values]}
    elif field.type in (t.TYPE_INT64, t.TYPE_UINT64, t.TYPE_SINT64):
        schema = {"oneOf": [{"type": "string", "pattern": "^-?[0-9]+$"}, {"type": "integer"}]}
    elif field.type in (t.TYPE_INT32, t.TYPE_UINT32, t.TYPE_SINT32):
        schema = {"type": "integer", "format": "int32"}
    elif field.type in (t.TYPE_DOUBLE, t.TYPE_FLOAT):
        schema = {"type": "number"}
    elif field.type == t.TYPE_BOOL:
        schema = {"type": "boolean"}
    else:
        schema = {"type": "string"}
    if field.is_repeated:
        return {"type": "array", "items": schema}
    return schema


class RestApi:
    def __init__(self, handlers: Handlers, max_body_bytes: int) -> None:
        self.handlers = handlers
        self.max_body_bytes = max_body_bytes
        self.ready = True

    async def serve(
        self,
        request: Request,
        call: str,
        handler: Handler,
        message_type: type[Message],
        path: dict[str, str] | None = None,
        query: bool = False,
    ) -> Response:
        try:
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
                raise too_large(self.max_body_bytes)
            principal = await self.handlers.authenticate(request.headers.get("authorization"))
            raw = await _read_bounded(request, self.max_body_bytes)
            fields = dict(path or {})
            if query:
                for name, value in request.query_params.items():
                    if name in fields and fields[name] != value:
                        raise invalid(name, "does not match the value in the URL path")
                    fields[name] = value
            message = parse_body(raw, message_type, fields)
            response = await self.handlers.timed(call, "rest", handler, principal, message)
            return JSONResponse(render(response))
        except Exception as error:
            status, body = http_body(as_beam_error(error, call))
            return JSONResponse(body, status_code=status)


async def _read_bounded(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _body_doc(message_type: type[Message]) -> dict[str, Any]:
    schema = json_schema(cast(Descriptor, message_type.DESCRIPTOR))
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def create_app(
    api: RestApi, ready: Callable[[], Awaitable[dict[str, bool]]], *, serve_metrics: bool = True
) -> FastAPI:
    """The REST app. ``serve_metrics``: also serve ``GET /metrics`` (False when the process serves
    them on a port of their own, so the API port exposes no metrics)."""
    app = FastAPI(
        title="Beam",
        version="v1",
        description="Real-time enforcement of AI spending limits. Amounts are integer grains "
        "(1 grain = USD 0.000001); int64 values are JSON strings in answers.",
    )
    h = api.handlers

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = Reason.ROUTE_NOT_FOUND if exc.status_code == 404 else Reason.MALFORMED_BODY
        body = http_body(BeamError(reason, str(exc.detail)))[1]
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("path", "query"))
        status, body = http_body(invalid(where or "request", str(first.get("msg", "invalid"))))
        return JSONResponse(body, status_code=status)

    @app.get("/health", tags=["probes"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", tags=["probes"])
    async def ready_probe() -> JSONResponse:
        checks = await ready()
        ok = api.ready and all(checks.values())
        body = {"status": "ready" if ok else "not ready", **checks, "accepting": api.ready}
        return JSONResponse(body, status_code=200 if ok else 503)

    if serve_metrics:

        @app.get("/metrics", tags=["probes"])
        async def metrics() -> Response:
            return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    # -- balance ---------------------------------------------------------------------------

    @app.get("/v1/balance/{customer_id}", tags=["balance"])
    async def get_balance(customer_id: str, request: Request) -> Response:
        return await api.serve(
            request, "get_balance", h.get_balance, balance_pb.GetBalanceRequest,
            {"customer_id": customer_id}, query=True,
        )  # fmt: skip

    @app.post("/v1/balance/check", tags=["balance"],
              openapi_extra=_body_doc(balance_pb.CheckBalanceRequest))  # fmt: skip
    async def check(request: Request) -> Response:
        return await api.serve(request, "check", h.check, balance_pb.CheckBalanceRequest)

    @app.post("/v1/balance/deduct", tags=["balance"],
              openapi_extra=_body_doc(balance_pb.DeductTokensRequest))  # fmt: skip
    async def deduct(request: Request) -> Response:
        return await api.serve(request, "deduct", h.deduct, balance_pb.DeductTokensRequest)

    @app.post("/v1/balance/finalize", tags=["balance"],
              openapi_extra=_body_doc(balance_pb.FinalizeRequestRequest))  # fmt: skip
    async def finalize(request: Request) -> Response:
        return await api.serve(request, "finalize", h.finalize, balance_pb.FinalizeRequestRequest)

    _admin_routes(app, api)
    return app


def _admin_routes(app: FastAPI, api: RestApi) -> None:
    h = api.handlers

    @app.post("/v1/customers", tags=["customers"],
              openapi_extra=_body_doc(admin_pb.CreateCustomerRequest))  # fmt: skip
    async def create_customer(request: Request) -> Response:
        return await api.serve(
            request, "create_customer", h.create_customer, admin_pb.CreateCustomerRequest
        )

    @app.get("/v1/customers", tags=["customers"])
    async def list_customers(request: Request) -> Response:
        return await api.serve(
            request, "list_customers", h.list_customers, admin_pb.ListCustomersRequest, query=True
        )

    @app.get("/v1/customers/{customer_id}", tags=["customers"])
    async def get_customer(customer_id: str, request: Request) -> Response:
        return await api.serve(
            request, "get_customer", h.get_customer, admin_pb.GetCustomerRequest,
            {"customer_id": customer_id}, query=True,
        )  # fmt: skip

    @app.post("/v1/customers/{customer_id}/credits", tags=["customers"],
              openapi_extra=_body_doc(admin_pb.CreditBalanceRequest))  # fmt: skip
    async def credit(customer_id: str, request: Request) -> Response:
        return await api.serve(
            request, "credit", h.credit, admin_pb.CreditBalanceRequest, {"customer_id": customer_id}
        )

    @app.post("/v1/customers/{customer_id}/debits", tags=["customers"],
              openapi_extra=_body_doc(admin_pb.DebitBalanceRequest))  # fmt: skip
    async def debit(customer_id: str, request: Request) -> Response:
        return await api.serve(
            request, "debit", h.debit, admin_pb.DebitBalanceRequest, {"customer_id": customer_id}
        )

    @app.get("/v1/customers/{customer_id}/requests", tags=["requests"])
    async def list_requests(customer_id: str, request: Request) -> Response:
        return await api.serve(
            request, "list_requests", h.list_requests, admin_pb.ListRequestsRequest,
            {"customer_id": customer_id}, query=True,
        )  # fmt: skip

    @app.get("/v1/requests/{request_id:rest_of_path}", tags=["requests"])
    async def get_request(request_id: str, request: Request) -> Response:
        return await api.serve(
            request, "get_request", h.get_request, admin_pb.GetRequestRequest,
            {"request_id": request_id}, query=True,
        )  # fmt: skip

    @app.get("/v1/customers/{customer_id}/usage", tags=["usage"])
    async def get_usage(customer_id: str, request: Request) -> Response:
        return await api.serve(
            request, "get_usage", h.get_usage, admin_pb.GetUsageRequest,
            {"customer_id": customer_id}, query=True,
        )  # fmt: skip

    @app.get("/v1/usage/top-customers", tags=["usage"])
    async def get_top_customers(request: Request) -> Response:
        return await api.serve(
            request, "get_top_customers", h.get_top_customers, admin_pb.GetTopCustomersRequest,
            query=True,
        )  # fmt: skip

    @app.post("/v1/admin/verify-integrity", tags=["admin"],
              openapi_extra=_body_doc(admin_pb.VerifyIntegrityRequest))  # fmt: skip
    async def verify_integrity(request: Request) -> Response:
        return await api.serve(
            request, "verify_integrity", h.verify_integrity, admin_pb.VerifyIntegrityRequest
        )

    @app.post("/v1/admin/sync", tags=["admin"])
    async def sync_all(request: Request) -> Response:
        return await api.serve(request, "sync_all", h.sync_all, admin_pb.SyncAllRequest)
