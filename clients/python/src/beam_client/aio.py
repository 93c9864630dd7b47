"""The asyncio client (:class:`AsyncBeamClient`) and its streaming guard (:class:`AsyncGuard`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from beam_client import _wire
from beam_client._channel import channel_options, credentials
from beam_client._guard import GuardCore, finalize_failed
from beam_client.config import Target, resolve
from beam_client.errors import BeamError, BeamUnavailable
from beam_client.policy import FailClosed, FailurePolicy
from beam_client.retry import DEFAULT_RETRY, FINALIZE_RETRY, RetryPolicy, is_retryable
from beam_client.stats import Counters
from beam_client.types import Balance, CheckResult, DeductResult, FinalizeResult, RequestStatus

log = logging.getLogger("beam_client")


class AsyncBeamClient:
    """Beam's BalanceService over gRPC, for asyncio code.

    ``target`` and ``api_key`` default to ``BEAM_SERVER`` and ``BEAM_API_KEY`` (see
    :mod:`beam_client.config`). ``timeout`` is the deadline of each attempt of Check, Deduct
    and GetBalance, ``finalize_timeout`` of each FinalizeRequest attempt; ``retry`` and
    ``finalize_retry`` bound the attempts (:mod:`beam_client.retry`). ``failure_policy`` is
    what guards do when Beam cannot be reached (:mod:`beam_client.policy`; default
    :class:`~beam_client.policy.FailClosed`).

    The channel opens on first use, in the running event loop. ``close()`` (or ``async
    with``) waits for settlements still running in the background, then closes it.
    """

    def __init__(
        self,
        target: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 3.0,
        finalize_timeout: float = 10.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        finalize_retry: RetryPolicy = FINALIZE_RETRY,
        failure_policy: FailurePolicy | None = None,
        deduct_every: int = 50,
        root_certificates: bytes | None = None,
        channel_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.target: Target
        self.target, self._api_key = resolve(target, api_key)
        self.timeout = timeout
        self.finalize_timeout = finalize_timeout
        self.retry = retry
        self.finalize_retry = finalize_retry
        self.failure_policy = failure_policy or FailClosed()
        self.deduct_every = deduct_every
        self._root_certificates = root_certificates
        self._channel_options = dict(channel_options or {})
        self._metadata = (("authorization", f"Bearer {self._api_key}"),)
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stubs: dict[str, Any] = {}
        self._settlements: set[asyncio.Task[Any]] = set()
        self.counters = Counters()

    def __repr__(self) -> str:
        return f"AsyncBeamClient({self.target.address!r}, tls={self.target.tls})"

    # -- the four calls ------------------------------------------------------------------

    async def check_balance(
        self,
        customer_id: str,
        request_id: str,
        *,
        model: str = "",
        prompt_tokens: int = 0,
        cached_prompt_tokens: int = 0,
        max_tokens: int = 0,
        estimated_grains: int = 0,
        buffer_multiplier: float = 0.0,
        custom_properties: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> CheckResult:
        """Open a hold. ``approved=False`` is returned, not raised (the guard raises)."""
        request = _wire.check_request(
            customer_id, request_id, model=model, prompt_tokens=prompt_tokens,
            cached_prompt_tokens=cached_prompt_tokens, max_tokens=max_tokens,
            estimated_grains=estimated_grains, buffer_multiplier=buffer_multiplier,
            custom_properties=custom_properties,
        )  # fmt: skip
        answer = await self._call("CheckBalance", request, timeout)
        return _wire.check_result(answer)

    async def deduct_tokens(
        self,
        customer_id: str,
        request_id: str,
        request_token: str,
        tokens: int,
        *,
        sequence_number: int,
        is_completion: bool = True,
        is_cached_prompt: bool = False,
        model: str = "",
        timeout: float | None = None,
    ) -> DeductResult:
        """Charge ``tokens`` to the hold. ``sequence_number`` (>= 1, one per Deduct of the
        request) is required: it is what makes a retry charge once."""
        request = _wire.deduct_request(
            customer_id, request_id, request_token, tokens=tokens,
            sequence_number=sequence_number, model=model, is_completion=is_completion,
            is_cached_prompt=is_cached_prompt,
        )  # fmt: skip
        return _wire.deduct_result(await self._call("DeductTokens", request, timeout))

    async def finalize_request(
        self,
        customer_id: str,
        request_id: str,
        *,
        status: RequestStatus,
        request_token: str = "",
        model: str = "",
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cached_prompt_tokens: int = 0,
        total_cost_grains: int = 0,
        timeout: float | None = None,
    ) -> FinalizeResult:
        """Settle the request with the provider's usage (retried with ``finalize_retry``)."""
        request = _wire.finalize_request(
            customer_id, request_id, status=status, request_token=request_token, model=model,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            cached_prompt_tokens=cached_prompt_tokens, total_cost_grains=total_cost_grains,
        )  # fmt: skip
        answer = await self._call(
            "FinalizeRequest", request, timeout or self.finalize_timeout, self.finalize_retry
        )
        return _wire.finalize_result(answer)

    async def get_balance(self, customer_id: str, *, timeout: float | None = None) -> Balance:
        request = _wire.METHODS["GetBalance"][0](customer_id=customer_id)
        return _wire.balance_result(await self._call("GetBalance", request, timeout))

    # -- the guard -----------------------------------------------------------------------

    def guard(
        self,
        customer_id: str,
        *,
        model: str,
        prompt_tokens: int = 0,
        max_tokens: int = 0,
        cached_prompt_tokens: int = 0,
        request_id: str | None = None,
        estimated_grains: int = 0,
        buffer_multiplier: float = 0.0,
        custom_properties: Mapping[str, str] | None = None,
        deduct_every: int | None = None,
        failure_policy: FailurePolicy | None = None,
    ) -> AsyncGuard:
        """A guard for one LLM call: ``async with client.guard(...) as g:`` (see AsyncGuard).

        Beam estimates the hold from ``model``, ``prompt_tokens``, ``cached_prompt_tokens``
        and ``max_tokens`` unless ``estimated_grains`` is given; ``buffer_multiplier`` 0
        uses the customer's buffer strategy. ``request_id`` defaults to a fresh one; pass
        your own to make a retried request (another process, a job retry) the same request.
        """
        return AsyncGuard(
            self, customer_id, model=model, prompt_tokens=prompt_tokens,
            max_tokens=max_tokens, cached_prompt_tokens=cached_prompt_tokens,
            request_id=request_id, estimated_grains=estimated_grains,
            buffer_multiplier=buffer_multiplier, custom_properties=custom_properties,
            deduct_every=self.deduct_every if deduct_every is None else deduct_every,
            failure_policy=failure_policy or self.failure_policy, counters=self.counters,
        )  # fmt: skip

    # -- counters and lifecycle ----------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters of this client (:mod:`beam_client.stats`) and of its failure policy."""
        return {
            **self.counters.snapshot(),
            **self.failure_policy.stats(),
            "settlements_in_flight": len(self._settlements),
        }

    async def close(self) -> None:
        """Wait for settlements still running, then close the channel."""
        if self._settlements:
            await asyncio.gather(*self._settlements, return_exceptions=True)
        if self._channel is not None:
            channel, self._channel, self._stubs = self._channel, None, {}
            await channel.close()

    async def __aenter__(self) -> AsyncBeamClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- plumbing ------------------------------------------------------------------------

    def _stub(self, method: str) -> Any:
        loop = asyncio.get_running_loop()
        if self._channel is None or self._loop is not loop:
            # A grpc.aio channel belongs to the loop it was made in.
            options = channel_options(self._channel_options)
            if self.target.tls:
                self._channel = grpc.aio.secure_channel(
                    self.target.address, credentials(self._root_certificates), options
                )
            else:
                self._channel = grpc.aio.insecure_channel(self.target.address, options)
            self._loop, self._stubs = loop, {}
        if method not in self._stubs:
            request_type, response_type = _wire.METHODS[method]
            self._stubs[method] = self._channel.unary_unary(
                _wire.SERVICE + method,
                request_serializer=request_type.SerializeToString,
                response_deserializer=response_type.FromString,
            )
        return self._stubs[method]

    async def _call(
        self, method: str, request: Any, timeout: float | None, retry: RetryPolicy | None = None
    ) -> Any:
        policy = retry or self.retry
        deadline = timeout or self.timeout
        attempt = 0
        while True:
            attempt += 1
            self.counters.bump("calls")
            try:
                return await self._stub(method)(request, timeout=deadline, metadata=self._metadata)
            except grpc.aio.AioRpcError as rpc_error:
                error = _wire.error_from_call(rpc_error)
            if not is_retryable(error):
                self.counters.bump("errors")
                raise error
            if attempt >= policy.max_attempts:
                self.counters.bump("unavailable")
                log.warning("%s gave up after %d attempts: %s", method, attempt, error)
                raise BeamUnavailable(
                    error.code, error.reason, error.message, error.field, attempts=attempt
                )
            self.counters.bump("retries")
            wait = policy.backoff(attempt)
            log.info("%s attempt %d failed (%s); retrying in %.2fs", method, attempt, error, wait)
            await asyncio.sleep(wait)

    def _settle(self, request: Any) -> asyncio.Task[FinalizeResult]:
        """FinalizeRequest in a task of its own: the caller's cancellation cannot stop it."""

        async def settle() -> FinalizeResult:
            try:
                answer = await self._call(
                    "FinalizeRequest", request, self.finalize_timeout, self.finalize_retry
                )
            except BeamError as error:
                finalize_failed(self.counters, request, error)
                raise
            except Exception as error:
                failure = BeamError("UNKNOWN", "", f"{type(error).__name__}: {error}")
                finalize_failed(self.counters, request, failure)
                raise failure from error
            self.counters.bump("finalizes")
            return _wire.finalize_result(answer)

        task = asyncio.get_running_loop().create_task(settle())
        self._settlements.add(task)
        task.add_done_callback(self._settlements.discard)
        return task


class AsyncGuard(GuardCore):
    """One guarded LLM call (made by :meth:`AsyncBeamClient.guard`).

    ``async with`` (or ``await g.open()``) runs CheckBalance: the hold opens, or
    :class:`~beam_client.errors.InsufficientBalance` (or another
    :class:`~beam_client.errors.RequestRejected`) is raised. Then ``await g.add(tokens)``
    for each piece of the stream: every ``deduct_every`` tokens (default 50) one
    DeductTokens goes out with the next sequence number (the first one also reports the
    prompt), and ``add`` answers ``False`` once ``g.should_stop``. On exit exactly one
    FinalizeRequest settles the request, with ``g.usage(...)`` (or the adapter's usage) and
    a status from how the block ended (:func:`beam_client._guard.status_for`). It runs in
    its own task, so cancelling the caller cannot stop it, and is retried until Beam
    acknowledges it (bounded by the client's ``finalize_retry``). A Finalize that is never
    acknowledged is logged and counted, and not raised; the hold then expires and is
    charged what the Deducts reported.
    """

    def __init__(self, client: AsyncBeamClient, customer_id: str, **kwargs: Any) -> None:
        super().__init__(customer_id, **kwargs)
        self._client = client

    async def open(self) -> AsyncGuard:
        """CheckBalance (once; later calls return at once). Raises when not approved."""
        if not self._begin_open():
            return self
        try:
            check = await self._client.check_balance(
                self.customer_id, self.request_id, **self._check_args()
            )
        except BeamError as error:
            self._open_failed(error)
            return self
        self._opened(check)
        return self

    async def __aenter__(self) -> AsyncGuard:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close(exc)

    async def aclose(self, error: BaseException | None = None) -> None:
        """Settle now if open, as if the block ended with ``error``; idempotent.

        For a guard driven by hand (``open``, ``add``, ``usage``, ``aclose``).
        """
        await self._close(error)

    async def abandon(self) -> None:
        """Settle now if still open, as abandoned (``FAILED_TIMEOUT``); idempotent.

        For work that will not finish: e.g. a web response whose client went away before
        its stream started. Charged what was reported or counted so far (nothing if
        nothing was).
        """
        await self._close(asyncio.CancelledError())

    async def add(self, tokens: int) -> bool:
        """Count ``tokens`` completion tokens; Deduct when ``deduct_every`` are pending.

        Returns ``not should_stop``: stop reading the stream when it is ``False``.
        """
        await self._send(self._plan_add(tokens))
        return not self.should_stop

    async def flush(self) -> bool:
        """Deduct the pending tokens now, whatever their number."""
        await self._send(self._plan_flush())
        return not self.should_stop

    def openai(
        self, stream: AsyncIterable[Any], count_tokens: Callable[[str], int] | None = None
    ) -> AsyncIterator[Any]:
        """Wrap an OpenAI stream (see :func:`beam_client.adapters.openai_stream`)."""
        from beam_client.adapters import openai_stream

        return openai_stream(self, stream, count_tokens)

    def anthropic(
        self, stream: AsyncIterable[Any], count_tokens: Callable[[str], int] | None = None
    ) -> AsyncIterator[Any]:
        """Wrap an Anthropic stream (see :func:`beam_client.adapters.anthropic_stream`)."""
        from beam_client.adapters import anthropic_stream

        return anthropic_stream(self, stream, count_tokens)

    async def _send(self, plans: list[Any]) -> None:
        for plan in plans:
            if self.should_stop:
                return
            try:
                result = _wire.deduct_result(
                    await self._client._call("DeductTokens", self._deduct_request(plan), None)
                )
            except BeamError as error:
                self._deduct_failed(error)
                return
            self._deducted(result)

    async def _close(self, error: BaseException | None) -> None:
        if self._begin_close(error) != "finalize":
            return
        task = self._client._settle(self._finalize_request())
        task.add_done_callback(self._task_settled)
        # Shielded: a second cancellation of the caller ends this wait, not the settlement
        # (the client keeps the task; close() waits for it; the callback records it).
        with contextlib.suppress(BeamError):
            await asyncio.shield(task)
        self._task_settled(task)

    def _task_settled(self, task: asyncio.Task[FinalizeResult]) -> None:
        if self.result is not None or self.finalize_error is not None:
            return
        if task.cancelled():
            self._settled(None, BeamError("CANCELLED", "", "the settlement task was cancelled"))
        elif (failure := task.exception()) is not None:
            assert isinstance(failure, BeamError)
            self._settled(None, failure)
        else:
            self._settled(task.result(), None)
