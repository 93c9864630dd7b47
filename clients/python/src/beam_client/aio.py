"""The asyncio face: :class:`AsyncBeamClient` and its streaming guard :class:`AsyncGuard`.

Only the waiting lives here (gRPC calls, retries' sleeps, background tasks, the outbox's
file I/O in a thread); every decision is :class:`beam_client._guard.GuardCore`'s. A guard's
Deducts run in a task of their own, so ``await g.add(n)`` never waits for Beam: it returns
without suspending. Settlements run in tasks the caller's cancellation cannot stop; one
that Beam does not acknowledge waits in the outbox (:mod:`beam_client.outbox`) and a
background task replays it until Beam does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from beam_client import _wire
from beam_client._channel import channel_options, credentials
from beam_client._guard import (
    DEFAULT_DEDUCT_EVERY,
    DeductPlan,
    GuardCore,
    Settlement,
    finalize_failed,
)
from beam_client.adapters import anthropic_stream, openai_stream
from beam_client.config import Target, resolve
from beam_client.errors import BeamError, BeamUnavailable
from beam_client.outbox import (
    REPLAY_BATCH,
    REPLAY_INTERVAL_SECONDS,
    Outbox,
    OutboxEntry,
    new_entry,
    next_attempt_at,
    open_outbox,
    replay_decision,
    scope_for,
)
from beam_client.policy import FailClosed, FailurePolicy, LetThrough
from beam_client.retry import (
    DEFAULT_RETRY,
    FINALIZE_RETRY,
    ONE_ATTEMPT,
    RetryPolicy,
    is_retryable,
)
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
    :class:`~beam_client.policy.FailClosed`). ``outbox`` (or ``outbox_path``, else
    ``BEAM_OUTBOX_PATH``) is where unacknowledged settlements wait (:mod:`beam_client.outbox`).

    The channel opens on first use, in the running event loop, and the outbox's replay
    starts with it (settlements a previous process left are posted then). ``close()`` (or
    ``async with``) waits for settlements still running, then stops the replay and closes
    the channel.
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
        deduct_every: int = DEFAULT_DEDUCT_EVERY,
        deduct_every_max: int | None = None,
        outbox: Outbox | None = None,
        outbox_path: str | None = None,
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
        self.deduct_every_max = deduct_every_max
        self.outbox: Outbox = outbox if outbox is not None else open_outbox(outbox_path)
        self._scope = scope_for(self.target.address, self._api_key)
        self._root_certificates = root_certificates
        self._channel_options = dict(channel_options or {})
        self._metadata = (("authorization", f"Bearer {self._api_key}"),)
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stubs: dict[str, Any] = {}
        self._settlements: set[asyncio.Task[Any]] = set()
        self._deducts: set[asyncio.Task[Any]] = set()
        self._replayer: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._replaying: asyncio.Lock | None = None
        self._let_through: dict[tuple[str, str], LetThrough] = {}
        self._closed = False
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
        min_completion_tokens: int = 0,
        estimated_grains: int = 0,
        buffer_multiplier: float = 0.0,
        custom_properties: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> CheckResult:
        """Open a hold. ``approved=False`` is returned, not raised (the guard raises).

        ``min_completion_tokens`` > 0: when the hold for ``max_tokens`` is more than the
        customer can pay, Beam holds for the most completion tokens it can pay for (at
        least this many) and answers them in ``granted_completion_tokens``.
        """
        request = _wire.check_request(
            customer_id, request_id, model=model, prompt_tokens=prompt_tokens,
            cached_prompt_tokens=cached_prompt_tokens, max_tokens=max_tokens,
            estimated_grains=estimated_grains, buffer_multiplier=buffer_multiplier,
            custom_properties=custom_properties, min_completion_tokens=min_completion_tokens,
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
        reserve_ahead_tokens: int = 0,
        prompt_tokens: int = 0,
        cached_prompt_tokens: int = 0,
        timeout: float | None = None,
    ) -> DeductResult:
        """Charge ``tokens`` to the hold. ``sequence_number`` (>= 1, one per Deduct of the
        request) is required: it is what makes a retry charge once. ``reserve_ahead_tokens``
        grows the hold for completion tokens still to come (stop now if it cannot);
        ``prompt_tokens`` / ``cached_prompt_tokens`` charge the prompt with this call."""
        request = _wire.deduct_request(
            customer_id, request_id, request_token, tokens=tokens,
            sequence_number=sequence_number, model=model, is_completion=is_completion,
            is_cached_prompt=is_cached_prompt, reserve_ahead_tokens=reserve_ahead_tokens,
            prompt_tokens=prompt_tokens, cached_prompt_tokens=cached_prompt_tokens,
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
        let_through: bool = False,
        timeout: float | None = None,
    ) -> FinalizeResult:
        """Settle the request with the provider's usage (retried with ``finalize_retry``).
        ``let_through``: the app let the request through while Beam was unreachable; Beam
        labels its usage so (GetRequest, usage analytics) and charges it like any other."""
        request = _wire.finalize_request(
            customer_id, request_id, status=status, request_token=request_token, model=model,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            cached_prompt_tokens=cached_prompt_tokens, total_cost_grains=total_cost_grains,
            let_through=let_through,
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
        min_tokens: int | None = None,
        request_id: str | None = None,
        estimated_grains: int = 0,
        buffer_multiplier: float = 0.0,
        custom_properties: Mapping[str, str] | None = None,
        deduct_every: int | None = None,
        deduct_every_max: int | None = None,
        failure_policy: FailurePolicy | None = None,
    ) -> AsyncGuard:
        """A guard for one LLM call: ``async with client.guard(...) as g:`` (see AsyncGuard).

        Beam estimates the hold from ``model``, ``prompt_tokens``, ``cached_prompt_tokens``
        and ``max_tokens`` unless ``estimated_grains`` is given; ``buffer_multiplier`` 0
        uses the customer's buffer strategy. A customer who cannot pay for ``max_tokens``
        gets a shorter hold, down to ``min_tokens`` (default 50, or ``max_tokens`` if smaller;
        0: all or nothing): pass ``g.max_tokens_for_provider`` to the provider.
        ``request_id`` defaults to a fresh one; pass your own to make a retried request
        (another process, a job retry) the same request.
        """
        return AsyncGuard(
            self, customer_id, model=model, prompt_tokens=prompt_tokens,
            max_tokens=max_tokens, cached_prompt_tokens=cached_prompt_tokens,
            min_tokens=min_tokens, request_id=request_id, estimated_grains=estimated_grains,
            buffer_multiplier=buffer_multiplier, custom_properties=custom_properties,
            deduct_every=self.deduct_every if deduct_every is None else deduct_every,
            deduct_every_max=deduct_every_max or self.deduct_every_max,
            failure_policy=failure_policy or self.failure_policy, counters=self.counters,
        )  # fmt: skip

    # -- counters and lifecycle ----------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters of this client (:mod:`beam_client.stats`) and of its failure policy."""
        return {
            **self.counters.snapshot(),
            **self.failure_policy.stats(),
            "settlements_in_flight": len(self._settlements),
            "outbox_pending": self.outbox.count(self._scope),
        }

    async def replay_outbox(self) -> int:
        """Post the settlements waiting in the outbox now; how many Beam acknowledged."""
        return await self._replay_pass(force=True)

    async def close(self) -> None:
        """Wait for settlements still running (each is in the outbox from its first failed
        attempt, so what Beam has not acknowledged is persisted), stop the outbox's replay
        and close the channel. The next client on the same outbox replays what is left."""
        if self._settlements:
            await asyncio.gather(*self._settlements, return_exceptions=True)
        for task in list(self._deducts):
            task.cancel()
        if self._replayer is not None:
            replayer, self._replayer = self._replayer, None
            replayer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await replayer
        if self._channel is not None:
            channel, self._channel, self._stubs = self._channel, None, {}
            await channel.close()

    async def __aenter__(self) -> AsyncBeamClient:
        self._start_replay()
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
            self._start_replay()
        if method not in self._stubs:
            request_type, response_type = _wire.METHODS[method]
            self._stubs[method] = self._channel.unary_unary(
                _wire.SERVICE + method,
                request_serializer=request_type.SerializeToString,
                response_deserializer=response_type.FromString,
            )
        return self._stubs[method]

    async def _call(
        self,
        method: str,
        request: Any,
        timeout: float | None,
        retry: RetryPolicy | None = None,
        on_first_failure: Callable[[], Awaitable[None]] | None = None,
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
            if attempt == 1 and on_first_failure is not None:
                await on_first_failure()
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

    def _background(
        self, tasks: set[asyncio.Task[Any]], work: Coroutine[Any, Any, Any]
    ) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    def _settle(
        self,
        request: Any,
        *,
        queue_now: bool,
        after: asyncio.Task[Any] | None,
        record: LetThrough | None,
    ) -> asyncio.Task[Settlement]:
        """FinalizeRequest in a task of its own: the caller's cancellation cannot stop it.

        ``after``: the guard's Deduct still in flight, awaited first. ``queue_now``: Beam
        was unreachable (a let-through request): straight to the outbox.
        """

        async def settle() -> Settlement:
            try:
                if after is not None and not after.done():
                    await asyncio.wait({after})  # its outcome is the guard's already
                if record is not None:
                    self._remember(record)
                if queue_now:
                    return Settlement(None, None, await self._queue(request, "let_through", 0.0))
                return await self._finalize(request)
            except asyncio.CancelledError:
                # Only a loop shutting down cancels a settlement: keep it for the replay.
                self._queue_now(request, "let_through" if queue_now else "finalize")
                raise

        task: asyncio.Task[Settlement] = self._background(self._settlements, settle())
        return task

    async def _finalize(self, request: Any) -> Settlement:
        queued = False

        async def persist() -> None:
            nonlocal queued
            # Due once the retries below are over: the replay takes it from there.
            delay = self.finalize_retry.worst_case_wait() + self.finalize_timeout
            queued = await self._queue(request, "finalize", delay)

        try:
            answer = await self._call(
                "FinalizeRequest", request, self.finalize_timeout, self.finalize_retry, persist
            )
        except BeamError as error:
            finalize_failed(self.counters, request, error, queued)
            if queued:  # the retries are over: the replay's turn, at once
                entry = new_entry(self._scope, request, "finalize")
                await asyncio.to_thread(self.outbox.reschedule, entry, 0, time.time())
                self._wake_replay()
            return Settlement(None, error, queued)
        except Exception as error:
            failure = BeamError("UNKNOWN", "", f"{type(error).__name__}: {error}")
            finalize_failed(self.counters, request, failure, queued)
            return Settlement(None, failure, queued)
        self.counters.bump("finalizes")
        if queued:
            await asyncio.to_thread(
                self.outbox.remove, self._scope, request.customer_id, request.request_id
            )
        return Settlement(_wire.finalize_result(answer), None)

    async def _queue(self, request: Any, kind: Any, delay: float) -> bool:
        entry = new_entry(self._scope, request, kind, delay=delay)
        try:
            stored = await asyncio.to_thread(self.outbox.put, entry)
        except Exception:
            log.exception("the outbox could not store request %s", entry.request_id)
            stored = False
        if not stored:
            self.counters.bump("outbox_full")
            return False
        self.counters.bump("finalizes_queued")
        log.warning(
            "settlement of request %s of customer %s queued in the outbox (%s)",
            entry.request_id, entry.customer_id, kind,
        )  # fmt: skip
        self._wake_replay()
        return True

    def _queue_now(self, request: Any, kind: Any) -> None:
        """Persist a settlement at once, blocking (a loop shutting down cannot wait)."""
        try:
            if self.outbox.put(new_entry(self._scope, request, kind)):
                self.counters.bump("finalizes_queued")
                return
        except Exception:
            log.exception("the outbox could not store request %s", request.request_id)
        self.counters.bump("outbox_full")

    def _remember(self, record: LetThrough) -> None:
        self._let_through[(record.customer_id, record.request_id)] = record
        while len(self._let_through) > 10_000:  # bounded: forget the oldest
            del self._let_through[next(iter(self._let_through))]

    # -- the outbox's replay -------------------------------------------------------------

    def _start_replay(self) -> None:
        """Start the replay task in the running loop, once per loop (idempotent)."""
        loop = asyncio.get_running_loop()
        replayer = self._replayer
        if replayer is not None and not replayer.done() and replayer.get_loop() is loop:
            return
        self._wake, self._replaying = asyncio.Event(), asyncio.Lock()
        self._replayer = loop.create_task(self._replay_forever(), name="beam-client-replay")

    def _wake_replay(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _replay_forever(self) -> None:
        """Replay at start, then every few seconds or when woken, until ``close()``."""
        wake = self._wake
        assert wake is not None
        first = True  # at start, all of it: what is there was left by an earlier process
        while True:
            try:
                await self._replay_pass(force=first)
            except Exception:
                log.exception("replaying the outbox failed; trying again later")
            first = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REPLAY_INTERVAL_SECONDS):
                    await wake.wait()
            wake.clear()

    async def _replay_pass(self, force: bool = False) -> int:
        """One pass over the due entries (one pass at a time)."""
        self._start_replay()
        assert self._replaying is not None
        async with self._replaying:
            return await self._replay_due(force)

    async def _replay_due(self, force: bool) -> int:
        """Post the due entries, oldest first; stop at the first that finds Beam away."""
        now = time.time()
        due = await asyncio.to_thread(
            self.outbox.due, self._scope, float("inf") if force else now, REPLAY_BATCH
        )
        acknowledged = 0
        for entry in due:
            request = _wire.queued_finalize(entry.payload, entry.kind == "let_through")
            try:
                answer = await self._call(
                    "FinalizeRequest", request, self.finalize_timeout, ONE_ATTEMPT
                )
            except BeamError as error:
                if replay_decision(error) == "retry":
                    attempts = entry.attempts + 1
                    await asyncio.to_thread(
                        self.outbox.reschedule, entry, attempts, next_attempt_at(now, attempts)
                    )
                    break
                await asyncio.to_thread(self._drop, entry, error)
                continue
            await asyncio.to_thread(
                self.outbox.remove, entry.scope, entry.customer_id, entry.request_id
            )
            self._replayed(entry, _wire.finalize_result(answer))
            acknowledged += 1
        return acknowledged

    def _drop(self, entry: OutboxEntry, error: BeamError) -> None:
        self.outbox.remove(entry.scope, entry.customer_id, entry.request_id)
        self.counters.bump("outbox_dropped")
        log.error(
            "Beam refused the queued settlement of request %s of customer %s; dropped: %s",
            entry.request_id, entry.customer_id, error,
        )  # fmt: skip

    def _replayed(self, entry: OutboxEntry, result: FinalizeResult) -> None:
        self.counters.bump("outbox_replayed")
        if entry.kind == "let_through":
            self.counters.bump("let_through_posted")
            record = self._let_through.pop((entry.customer_id, entry.request_id), None)
            if record is not None:
                record.reconciled = True
        log.warning(
            "queued settlement of request %s of customer %s acknowledged: charged %d grains",
            entry.request_id, entry.customer_id, result.charged_grains,
        )  # fmt: skip


class AsyncGuard(GuardCore):
    """One guarded LLM call (made by :meth:`AsyncBeamClient.guard`).

    ``async with`` (or ``await g.open()``) runs CheckBalance: the hold opens (shortened to
    what the customer can pay, down to ``min_tokens``), or
    :class:`~beam_client.errors.InsufficientBalance` (or another
    :class:`~beam_client.errors.RequestRejected`) is raised. Then ``await g.add(tokens)``
    for each piece of the stream: it counts and returns at once (it never waits for Beam);
    Deducts go out in the background, at most one at a time, the first one with the prompt
    (see :mod:`beam_client._guard`), and ``add`` answers ``False`` once ``g.should_stop``.
    On exit exactly one FinalizeRequest settles the request, with ``g.usage(...)`` (or the
    adapter's usage) and a status from how the block ended
    (:func:`beam_client._guard.status_for`). It runs in its own task, so cancelling the
    caller cannot stop it, and is retried (bounded by ``finalize_retry``); one that Beam
    does not acknowledge waits in the client's outbox and is replayed until it is.
    """

    def __init__(self, client: AsyncBeamClient, customer_id: str, **kwargs: Any) -> None:
        super().__init__(customer_id, **kwargs)
        self._client = client
        self._deducting: asyncio.Task[None] | None = None

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
        """Count ``tokens`` completion tokens; never waits (a due Deduct goes out in the
        background). Returns ``not should_stop``: stop reading the stream when ``False``.
        """
        plan = self._plan_add(tokens)
        if plan is not None:
            self._start(plan)
        return not self.should_stop

    async def flush(self) -> bool:
        """Deduct the pending tokens now, whatever their number, and wait for the answer."""
        await self._idle()
        plan = self._plan_flush()
        if plan is not None:
            self._start(plan)
            await self._idle()
        return not self.should_stop

    def openai(
        self, stream: AsyncIterable[Any], count_tokens: Callable[[str], int] | None = None
    ) -> AsyncIterator[Any]:
        """Wrap an OpenAI stream (see :func:`beam_client.adapters.openai_stream`)."""
        return openai_stream(self, stream, count_tokens)

    def anthropic(
        self, stream: AsyncIterable[Any], count_tokens: Callable[[str], int] | None = None
    ) -> AsyncIterator[Any]:
        """Wrap an Anthropic stream (see :func:`beam_client.adapters.anthropic_stream`)."""
        return anthropic_stream(self, stream, count_tokens)

    def _start(self, plan: DeductPlan) -> None:
        self._deducting = self._client._background(self._client._deducts, self._deduct(plan))

    async def _idle(self) -> None:
        if self._deducting is not None and not self._deducting.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._deducting)

    async def _deduct(self, plan: DeductPlan) -> None:
        """Send ``plan``, then each Deduct the answers make due (one at a time; each carries
        tokens counted since the previous, so the chain ends with the stream)."""
        next_plan: DeductPlan | None = plan
        while next_plan is not None:
            current = next_plan
            try:
                answer = await self._client._call(
                    "DeductTokens", self._deduct_request(current), None
                )
            except BeamError as error:
                self._deduct_failed(current, error)
                return
            except Exception as error:  # a bug or a broken channel: the stream stops
                self._deduct_failed(current, BeamError("UNKNOWN", "", repr(error)))
                return
            next_plan = self._deducted(current, _wire.deduct_result(answer))

    async def _close(self, error: BaseException | None) -> None:
        plan = self._begin_close(error)
        if plan is None:
            return
        task = self._client._settle(
            plan.request, queue_now=plan.queue_now, after=self._deducting, record=plan.record
        )
        task.add_done_callback(self._task_settled)
        # Shielded: a second cancellation of the caller ends this wait, not the settlement
        # (the client keeps the task; close() waits for it; the callback records it).
        with contextlib.suppress(BeamError):
            await asyncio.shield(task)
        self._task_settled(task)

    def _task_settled(self, task: asyncio.Task[Settlement]) -> None:
        if self._state == "closed":
            return
        if task.cancelled():
            self._settled(
                Settlement(None, BeamError("CANCELLED", "", "the settlement task was cancelled"))
            )
        elif (failure := task.exception()) is not None:
            error = failure if isinstance(failure, BeamError) else BeamError("UNKNOWN", "", "")
            self._settled(Settlement(None, error))
        else:
            self._settled(task.result())
