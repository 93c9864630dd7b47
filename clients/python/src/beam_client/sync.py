"""The blocking client (:class:`BeamClient`) and its streaming guard (:class:`Guard`).

The same calls, retries, counters and guard as :mod:`beam_client.aio`, for code without an
event loop (a thread per request, a worker, a script). A client may be shared by threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

import grpc

from beam_client import _wire
from beam_client._channel import channel_options, credentials
from beam_client._guard import DeductPlan, GuardCore, finalize_failed
from beam_client.config import Target, resolve
from beam_client.errors import BeamError, BeamUnavailable
from beam_client.policy import FailClosed, FailurePolicy
from beam_client.retry import DEFAULT_RETRY, FINALIZE_RETRY, RetryPolicy, is_retryable
from beam_client.stats import Counters
from beam_client.types import Balance, CheckResult, DeductResult, FinalizeResult, RequestStatus

log = logging.getLogger("beam_client")


class BeamClient:
    """Beam's BalanceService over gRPC, blocking. Arguments as :class:`AsyncBeamClient`."""

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
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stubs: dict[str, Any] = {}
        self.counters = Counters()

    def __repr__(self) -> str:
        return f"BeamClient({self.target.address!r}, tls={self.target.tls})"

    def check_balance(
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
        return _wire.check_result(self._call("CheckBalance", request, timeout))

    def deduct_tokens(
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
        """Charge ``tokens`` to the hold; ``sequence_number`` >= 1 makes a retry charge once."""
        request = _wire.deduct_request(
            customer_id, request_id, request_token, tokens=tokens,
            sequence_number=sequence_number, model=model, is_completion=is_completion,
            is_cached_prompt=is_cached_prompt,
        )  # fmt: skip
        return _wire.deduct_result(self._call("DeductTokens", request, timeout))

    def finalize_request(
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
        answer = self._call(
            "FinalizeRequest", request, timeout or self.finalize_timeout, self.finalize_retry
        )
        return _wire.finalize_result(answer)

    def get_balance(self, customer_id: str, *, timeout: float | None = None) -> Balance:
        request = _wire.METHODS["GetBalance"][0](customer_id=customer_id)
        return _wire.balance_result(self._call("GetBalance", request, timeout))

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
    ) -> Guard:
        """A guard for one LLM call: ``with client.guard(...) as g:`` (see :class:`Guard`)."""
        return Guard(
            self, customer_id, model=model, prompt_tokens=prompt_tokens,
            max_tokens=max_tokens, cached_prompt_tokens=cached_prompt_tokens,
            request_id=request_id, estimated_grains=estimated_grains,
            buffer_multiplier=buffer_multiplier, custom_properties=custom_properties,
            deduct_every=self.deduct_every if deduct_every is None else deduct_every,
            failure_policy=failure_policy or self.failure_policy, counters=self.counters,
        )  # fmt: skip

    def stats(self) -> dict[str, int]:
        """Counters of this client (:mod:`beam_client.stats`) and of its failure policy."""
        return {**self.counters.snapshot(), **self.failure_policy.stats()}

    def close(self) -> None:
        with self._lock:
            channel, self._channel, self._stubs = self._channel, None, {}
        if channel is not None:
            channel.close()

    def __enter__(self) -> BeamClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stub(self, method: str) -> Any:
        with self._lock:
            if self._channel is None:
                options = channel_options(self._channel_options)
                if self.target.tls:
                    self._channel = grpc.secure_channel(
                        self.target.address, credentials(self._root_certificates), options
                    )
                else:
                    self._channel = grpc.insecure_channel(self.target.address, options)
                self._stubs = {}
            if method not in self._stubs:
                request_type, response_type = _wire.METHODS[method]
                self._stubs[method] = self._channel.unary_unary(
                    _wire.SERVICE + method,
                    request_serializer=request_type.SerializeToString,
                    response_deserializer=response_type.FromString,
                )
            return self._stubs[method]

    def _call(
        self, method: str, request: Any, timeout: float | None, retry: RetryPolicy | None = None
    ) -> Any:
        policy = retry or self.retry
        deadline = timeout or self.timeout
        attempt = 0
        while True:
            attempt += 1
            self.counters.bump("calls")
            try:
                return self._stub(method)(request, timeout=deadline, metadata=self._metadata)
            except grpc.RpcError as rpc_error:
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
            time.sleep(wait)


class Guard(GuardCore):
    """One guarded LLM call in blocking code (made by :meth:`BeamClient.guard`).

    As :class:`~beam_client.aio.AsyncGuard`, with ``g.add(tokens)`` blocking while a
    Deduct is sent. The Finalize runs in ``__exit__``, retried until acknowledged
    (bounded); an interrupt (``KeyboardInterrupt``) settles as ``FAILED_TIMEOUT``.
    """

    def __init__(self, client: BeamClient, customer_id: str, **kwargs: Any) -> None:
        super().__init__(customer_id, **kwargs)
        self._client = client

    def open(self) -> Guard:
        """CheckBalance (once; later calls return at once). Raises when not approved."""
        if not self._begin_open():
            return self
        try:
            check = self._client.check_balance(
                self.customer_id, self.request_id, **self._check_args()
            )
        except BeamError as error:
            self._open_failed(error)
            return self
        self._opened(check)
        return self

    def __enter__(self) -> Guard:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(exc)

    def close(self, error: BaseException | None = None) -> None:
        """Settle now if open (as if the block ended with ``error``); idempotent."""
        if self._begin_close(error) != "finalize":
            return
        request = self._finalize_request()
        try:
            answer = self._client._call(
                "FinalizeRequest", request, self._client.finalize_timeout,
                self._client.finalize_retry,
            )  # fmt: skip
        except BeamError as failure:
            finalize_failed(self._client.counters, request, failure)
            self._settled(None, failure)
            return
        self._client.counters.bump("finalizes")
        self._settled(_wire.finalize_result(answer), None)

    def abandon(self) -> None:
        """Settle now if still open, as abandoned (``FAILED_TIMEOUT``); idempotent."""
        self.close(TimeoutError("abandoned"))

    def add(self, tokens: int) -> bool:
        """Count ``tokens`` completion tokens; Deduct when ``deduct_every`` are pending.

        Returns ``not should_stop``: stop reading the stream when it is ``False``.
        """
        self._send(self._plan_add(tokens))
        return not self.should_stop

    def flush(self) -> bool:
        """Deduct the pending tokens now, whatever their number."""
        self._send(self._plan_flush())
        return not self.should_stop

    def openai(
        self, stream: Iterable[Any], count_tokens: Callable[[str], int] | None = None
    ) -> Iterator[Any]:
        """Wrap an OpenAI stream (see :func:`beam_client.adapters.openai_stream_sync`)."""
        from beam_client.adapters import openai_stream_sync

        return openai_stream_sync(self, stream, count_tokens)

    def anthropic(
        self, stream: Iterable[Any], count_tokens: Callable[[str], int] | None = None
    ) -> Iterator[Any]:
        """Wrap an Anthropic stream (see :func:`beam_client.adapters.anthropic_stream_sync`)."""
        from beam_client.adapters import anthropic_stream_sync

        return anthropic_stream_sync(self, stream, count_tokens)

    def _send(self, plans: list[DeductPlan]) -> None:
        for plan in plans:
            if self.should_stop:
                return
            try:
                result = _wire.deduct_result(
                    self._client._call("DeductTokens", self._deduct_request(plan), None)
                )
            except BeamError as error:
                self._deduct_failed(error)
                return
            self._deducted(result)
