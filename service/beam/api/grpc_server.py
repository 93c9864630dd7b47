"""gRPC (grpcio asyncio): BalanceService, AdminService, health checking and reflection.

Each RPC authenticates from the ``authorization`` metadata, refuses what the deserializer
refused (over the size limit, undecodable), and delegates to ``Handlers``; errors leave
through ``beam.api.errors`` only. No server interceptor: each costs every call a coroutine
(docs/PERFORMANCE.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from beam.admin.v1 import admin_pb2 as admin_pb
from beam.admin.v1 import admin_pb2_grpc as admin_grpc
from beam.api.errors import as_beam_error, grpc_status
from beam.api.handlers import Handlers, too_large
from beam.balance.v1 import balance_pb2 as balance_pb
from beam.balance.v1 import balance_pb2_grpc as balance_grpc
from beam.core.auth import Principal
from beam.errors import BeamError, Reason, invalid

Handler = Callable[[Principal, Any], Awaitable[Message]]

_BALANCE = balance_pb.DESCRIPTOR.services_by_name["BalanceService"]
_ADMIN = admin_pb.DESCRIPTOR.services_by_name["AdminService"]

# The transport accepts more than the per-message limit so oversized messages reach our
# own check and get INVALID_ARGUMENT/BODY_TOO_LARGE like REST, not a bare transport error.
_TRANSPORT_MAX_BYTES = 4 * 1024 * 1024


class _Refused:
    """Request bytes refused before parsing (over the size limit, or not a valid message):
    the servicer answers with ``error`` after authenticating, like REST."""

    __slots__ = ("error",)

    def __init__(self, error: BeamError) -> None:
        self.error = error


def _tolerant(message: type[Message], max_message_bytes: int) -> Callable[[bytes], Any]:
    """The request deserializer: what grpcio would answer UNKNOWN (with a logged traceback)
    for undecodable bytes, and the size check, become a ``_Refused`` for the servicer. The
    size is the bytes' length, known here for free (no ``ByteSize()`` per call)."""
    parse = message.FromString

    def decode(data: bytes) -> Any:
        if len(data) > max_message_bytes:
            return _Refused(too_large(max_message_bytes))
        try:
            return parse(data)
        except DecodeError as error:
            return _Refused(
                invalid("body", f"not a valid protobuf message ({error})", Reason.MALFORMED_BODY)
            )

    return decode


def _add_servicer(
    server: grpc.aio.Server, service: ServiceDescriptor, servicer: object, max_message_bytes: int
) -> None:
    """Register ``servicer`` for every (unary) method of ``service`` with our deserializer.
    This replaces the generated ``add_*Servicer_to_server`` plus an interceptor: a server
    interceptor costs every call a coroutine and a handler lookup through it; a deserializer
    fixed at registration costs nothing per call."""
    handlers = {}
    for method in service.methods:
        request = GetMessageClass(method.input_type)
        response = GetMessageClass(method.output_type)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=_tolerant(request, max_message_bytes),
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None


class _Base:
    def __init__(self, handlers: Handlers) -> None:
        self.handlers = handlers

    async def _serve(
        self, call: str, handler: Handler, request: Any, context: grpc.aio.ServicerContext
    ) -> Message:
        try:
            principal = await self.handlers.authenticate(_authorization(context))
            if type(request) is _Refused:
                raise request.error
            return await self.handlers.timed(call, "grpc", handler, principal, request)
        except Exception as error:
            code, message, metadata = grpc_status(as_beam_error(error, call))
            context.set_trailing_metadata(metadata)
            await context.abort(code, message)
            raise AssertionError("abort returned") from None


class BalanceService(_Base, balance_grpc.BalanceServiceServicer):
    async def CheckBalance(self, request: Any, context: Any) -> Message:
        return await self._serve("check", self.handlers.check, request, context)

    async def DeductTokens(self, request: Any, context: Any) -> Message:
        return await self._serve("deduct", self.handlers.deduct, request, context)

    async def FinalizeRequest(self, request: Any, context: Any) -> Message:
        return await self._serve("finalize", self.handlers.finalize, request, context)

    async def GetBalance(self, request: Any, context: Any) -> Message:
        return await self._serve("get_balance", self.handlers.get_balance, request, context)


class AdminService(_Base, admin_grpc.AdminServiceServicer):
    async def CreateCustomer(self, request: Any, context: Any) -> Message:
        return await self._serve("create_customer", self.handlers.create_customer, request, context)

    async def GetCustomer(self, request: Any, context: Any) -> Message:
        return await self._serve("get_customer", self.handlers.get_customer, request, context)

    async def ListCustomers(self, request: Any, context: Any) -> Message:
        return await self._serve("list_customers", self.handlers.list_customers, request, context)

    async def CreditBalance(self, request: Any, context: Any) -> Message:
        return await self._serve("credit", self.handlers.credit, request, context)

    async def DebitBalance(self, request: Any, context: Any) -> Message:
        return await self._serve("debit", self.handlers.debit, request, context)

    async def ListRequests(self, request: Any, context: Any) -> Message:
        return await self._serve("list_requests", self.handlers.list_requests, request, context)

    async def GetRequest(self, request: Any, context: Any) -> Message:
        return await self._serve("get_request", self.handlers.get_request, request, context)

    async def VerifyIntegrity(self, request: Any, context: Any) -> Message:
        return await self._serve(
            "verify_integrity", self.handlers.verify_integrity, request, context
        )

    async def SyncAll(self, request: Any, context: Any) -> Message:
        return await self._serve("sync_all", self.handlers.sync_all, request, context)

    async def GetUsage(self, request: Any, context: Any) -> Message:
        return await self._serve("get_usage", self.handlers.get_usage, request, context)

    async def GetTopCustomers(self, request: Any, context: Any) -> Message:
        return await self._serve(
            "get_top_customers", self.handlers.get_top_customers, request, context
        )


def server_options(
    *,
    max_connection_age_seconds: float = 0,
    max_connection_age_grace_seconds: float = 0,
    reuse_port: bool = False,
) -> list[tuple[str, int]]:
    """Channel arguments of the server. A max connection age makes clients reconnect now and
    then (GOAWAY, in-flight calls get the grace), so connections spread over pods the
    autoscaler adds; HTTP/2 would otherwise keep every client on its first pod. reuse_port
    lets the workers of `beam serve --workers N` listen on one port (SO_REUSEPORT); off
    otherwise, so a second server on a busy port fails instead of sharing it."""
    options = [
        ("grpc.max_receive_message_length", _TRANSPORT_MAX_BYTES),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]
    if max_connection_age_seconds > 0:
        options.append(("grpc.max_connection_age_ms", int(max_connection_age_seconds * 1000)))
        options.append(
            ("grpc.max_connection_age_grace_ms", int(max_connection_age_grace_seconds * 1000))
        )
    return options


def create_server(
    handlers: Handlers,
    address: str,
    max_message_bytes: int,
    *,
    max_connection_age_seconds: float = 0,
    max_connection_age_grace_seconds: float = 0,
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    server = grpc.aio.server(
        options=server_options(
            max_connection_age_seconds=max_connection_age_seconds,
            max_connection_age_grace_seconds=max_connection_age_grace_seconds,
            reuse_port=reuse_port,
        ),
    )
    _add_servicer(server, _BALANCE, BalanceService(handlers), max_message_bytes)
    _add_servicer(server, _ADMIN, AdminService(handlers), max_message_bytes)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        _BALANCE.full_name,
        _ADMIN.full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port(address)
    return server, health_servicer, port


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
