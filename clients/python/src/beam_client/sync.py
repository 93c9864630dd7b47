"""The blocking face: :class:`BeamClient` and its streaming guard :class:`Guard`.

The same calls, retries, counters and guard as :mod:`beam_client.aio`, for code without an
event loop (a thread per request, a worker, a script); a client may be shared by threads.
Only the waiting lives here; every decision is :class:`beam_client._guard.GuardCore`'s. A
guard's Deducts run on a small worker pool of the client (at most one in flight per
guard), so ``g.add(n)`` never blocks on Beam; a daemon thread replays the outbox.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from types import TracebackType
from typing import Any

import grpc

from beam_client import _wire
from beam_client._channel import channel_options, credentials
from beam_client._guard import (
    DEFAULT_DEDUCT_EVERY,
    DeductPlan,
    GuardCore,
    Settlement,
    finalize_failed,
)
from beam_client.adapters import anthropic_stream_sync, openai_stream_sync
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

# Threads sending guards' Deducts (per client; a guard has at most one Deduct in flight).
DEDUCT_WORKERS = 8


class BeamClient:
    """Beam's BalanceService over gRPC, blocking. Arguments as :class:`AsyncBeamClient`.

    The outbox's replay starts with the channel, on first use (settlements a previous
    process left are posted then), in a daemon thread; ``close()`` stops it.
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
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stubs: dict[str, Any] = {}
        self._workers: ThreadPoolExecutor | None = None
        self._let_through: dict[tuple[str, str], LetThrough] = {}
        self._stop_replay = threading.Event()
        self._wake = threading.Event()
        self._replaying = threading.Lock()
        self.counters = Counters()
        self._replayer: threading.Thread | None = None

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
        min_completion_tokens: int = 0,
        estimated_grains: int = 0,
        buffer_multiplier: float = 0.0,
        custom_properties: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> CheckResult:
        """Open a hold (``approved=False`` is returned, not raised); ``min_completion_tokens``
        as :meth:`AsyncBeamClient.check_balance`."""
        request = _wire.check_request(
            customer_id, request_id, model=model, prompt_tokens=prompt_tokens,
            cached_prompt_tokens=cached_prompt_tokens, max_tokens=max_tokens,
            estimated_grains=estimated_grains, buffer_multiplier=buffer_multiplier,
            custom_properties=custom_properties, min_completion_tokens=min_completion_tokens,
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
        reserve_ahead_tokens: int = 0,
        prompt_tokens: int = 0,
        cached_prompt_tokens: int = 0,
        timeout: float | None = None,
    ) -> DeductResult:
        """Charge ``tokens`` to the hold; ``sequence_number`` >= 1 makes a retry charge once
        (the other arguments as :meth:`AsyncBeamClient.deduct_tokens`)."""
        request = _wire.deduct_request(
            customer_id, request_id, request_token, tokens=tokens,
            sequence_number=sequence_number, model=model, is_completion=is_completion,
            is_cached_prompt=is_cached_prompt, reserve_ahead_tokens=reserve_ahead_tokens,
            prompt_tokens=prompt_tokens, cached_prompt_tokens=cached_prompt_tokens,
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
        min_tokens: int | None = None,
        request_id: str | None = None,
        estimated_grains: int = 0,
        buffer_multiplier: float = 0.0,
        custom_properties: Mapping[str, str] | None = None,
        deduct_every: int | None = None,
        deduct_every_max: int | None = None,
        failure_policy: FailurePolicy | None = None,
    ) -> Guard:
        """A guard for one LLM call: ``with client.guard(...) as g:`` (see :class:`Guard`)."""
        return Guard(
            self, customer_id, model=model, prompt_tokens=prompt_tokens,
            max_tokens=max_tokens, cached_prompt_tokens=cached_prompt_tokens,
            min_tokens=min_tokens, request_id=request_id, estimated_grains=estimated_grains,
            buffer_multiplier=buffer_multiplier, custom_properties=custom_properties,
            deduct_every=self.deduct_every if deduct_every is None else deduct_every,
            deduct_every_max=deduct_every_max or self.deduct_every_max,
            failure_policy=failure_policy or self.failure_policy, counters=self.counters,
        )  # fmt: skip

    def stats(self) -> dict[str, int]:
        """Counters of this client (:mod:`beam_client.stats`) and of its failure policy."""
        return {
            **self.counters.snapshot(),
            **self.failure_policy.stats(),
            "outbox_pending": self.outbox.count(self._scope),
        }

    def replay_outbox(self) -> int:
        """Post the settlements waiting in the outbox now; how many Beam acknowledged."""
        return self._replay_pass(force=True)

    def close(self) -> None:
        """Stop the outbox's replay and the Deduct workers, close the channel. Settlements
        not acknowledged are in the outbox: the next client on it replays them."""
        self._stop_replay.set()
        self._wake.set()
        replayer = self._replayer
        if replayer is not None and replayer is not threading.current_thread():
            replayer.join(timeout=self.finalize_timeout + 1)
        with self._lock:
            workers, self._workers = self._workers, None
            channel, self._channel, self._stubs = self._channel, None, {}
        if workers is not None:
            workers.shutdown(wait=False, cancel_futures=True)
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
                self._start_replay()
            if method not in self._stubs:
                request_type, response_type = _wire.METHODS[method]
                self._stubs[method] = self._channel.unary_unary(
                    _wire.SERVICE + method,
                    request_serializer=request_type.SerializeToString,
                    response_deserializer=response_type.FromString,
                )
            return self._stubs[method]

    def _call(
        self,
        method: str,
        request: Any,
        timeout: float | None,
        retry: RetryPolicy | None = None,
        on_first_failure: Callable[[], None] | None = None,
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
            if attempt == 1 and on_first_failure is not None:
                on_first_failure()
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

    def _submit(self, work: Callable[[], None]) -> Future[None]:
        with self._lock:
            if self._workers is None:
                self._workers = ThreadPoolExecutor(DEDUCT_WORKERS, "beam-deduct")
            return self._workers.submit(work)

    # -- settlements and the outbox ------------------------------------------------------

    def _settle(self, request: Any, *, queue_now: bool, record: LetThrough | None) -> Settlement:
        if record is not None:
            self._remember(record)
        if queue_now:
            return Settlement(None, None, self._queue(request, "let_through", 0.0))
        queued = False

        def persist() -> None:
            nonlocal queued
            delay = self.finalize_retry.worst_case_wait() + self.finalize_timeout
            queued = self._queue(request, "finalize", delay)

        try:
            answer = self._call(
                "FinalizeRequest", request, self.finalize_timeout, self.finalize_retry, persist
            )
        except (KeyboardInterrupt, SystemExit):
            if not queued:  # interrupted mid-settlement: keep it for the replay
                self._queue(request, "finalize", 0.0)
            raise
        except BeamError as error:
            finalize_failed(self.counters, request, error, queued)
            if queued:  # the retries are over: the replay's turn, at once
                entry = new_entry(self._scope, request, "finalize")
                self.outbox.reschedule(entry, 0, time.time())
                self._wake.set()
            return Settlement(None, error, queued)
        self.counters.bump("finalizes")
        if queued:
            self.outbox.remove(self._scope, request.customer_id, request.request_id)
        return Settlement(_wire.finalize_result(answer), None)

    def _queue(self, request: Any, kind: Any, delay: float) -> bool:
        entry = new_entry(self._scope, request, kind, delay=delay)
        try:
            stored = self.outbox.put(entry)
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
        self._wake.set()
        return True

    def _remember(self, record: LetThrough) -> None:
        with self._lock:
            self._let_through[(record.customer_id, record.request_id)] = record
            while len(self._let_through) > 10_000:  # bounded: forget the oldest
                del self._let_through[next(iter(self._let_through))]

    def _start_replay(self) -> None:
        """Start the replay thread with the channel (on first use: after a fork too)."""
        if self._stop_replay.is_set():
            return
        if self._replayer is None or not self._replayer.is_alive():
            self._replayer = threading.Thread(
                target=self._replay_forever, name="beam-outbox-replay", daemon=True
            )
            self._replayer.start()

    def _replay_forever(self) -> None:
        """Replay at start, then every few seconds or when woken, until ``close()``."""
        first = True  # at start, all of it: what is there was left by an earlier process
        while not self._stop_replay.is_set():
            try:
                self._replay_pass(force=first)
            except Exception:
                log.exception("replaying the outbox failed; trying again later")
            first = False
            self._wake.wait(REPLAY_INTERVAL_SECONDS)
            self._wake.clear()

    def _replay_pass(self, force: bool = False) -> int:
        """One pass over the due entries (one pass at a time)."""
        with self._replaying:
            return self._replay_due(force)

    def _replay_due(self, force: bool) -> int:
        """Post the due entries, oldest first; stop at the first that finds Beam away."""
        now = time.time()
        acknowledged = 0
        for entry in self.outbox.due(self._scope, float("inf") if force else now, REPLAY_BATCH):
            if self._stop_replay.is_set() and not force:
                break
            request = _wire.queued_finalize(entry.payload, entry.kind == "let_through")
            try:
                answer = self._call("FinalizeRequest", request, self.finalize_timeout, ONE_ATTEMPT)
            except BeamError as error:
                if replay_decision(error) == "retry":
                    attempts = entry.attempts + 1
                    self.outbox.reschedule(entry, attempts, next_attempt_at(now, attempts))
                    break
                self._drop(entry, error)
                continue
            self.outbox.remove(entry.scope, entry.customer_id, entry.request_id)
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
            with self._lock:
                record = self._let_through.pop((entry.customer_id, entry.request_id), None)
            if record is not None:
                record.reconciled = True
        log.warning(
            "queued settlement of request %s of customer %s acknowledged: charged %d grains",
            entry.request_id, entry.customer_id, result.charged_grains,
        )  # fmt: skip


class Guard(GuardCore):
    """One guarded LLM call in blocking code (made by :meth:`BeamClient.guard`).

    As :class:`~beam_client.aio.AsyncGuard`: ``g.add(tokens)`` counts and returns at once
    (Deducts go out on the client's workers, at most one in flight); the Finalize runs in
    ``__exit__``, retried (bounded), and waits in the outbox if Beam does not acknowledge
    it; an interrupt (``KeyboardInterrupt``) settles as ``FAILED_TIMEOUT``.
    """

    def __init__(self, client: BeamClient, customer_id: str, **kwargs: Any) -> None:
        super().__init__(customer_id, **kwargs)
        self._client = client
        self._lock = threading.Lock()  # the core is shared with the Deduct worker
        self._deducting: Future[None] | None = None

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
        with self._lock:
            plan = self._begin_close(error)  # the Finalize is built now, as it stands
        if plan is None:
            return
        self._idle()  # a Deduct in flight ends first; its outcome cannot change the plan
        settlement = self._client._settle(
            plan.request, queue_now=plan.queue_now, record=plan.record
        )
        self._settled(settlement)

    def abandon(self) -> None:
        """Settle now if still open, as abandoned (``FAILED_TIMEOUT``); idempotent."""
        self.close(TimeoutError("abandoned"))

    def add(self, tokens: int) -> bool:
        """Count ``tokens`` completion tokens; never blocks on Beam (a due Deduct goes out
        on a worker). Returns ``not should_stop``: stop reading the stream when ``False``.
        """
        with self._lock:
            plan = self._plan_add(tokens)
        if plan is not None:
            self._start(plan)
        return not self.should_stop

    def flush(self) -> bool:
        """Deduct the pending tokens now, whatever their number, and wait for the answer."""
        self._idle()
        with self._lock:
            plan = self._plan_flush()
        if plan is not None:
            self._start(plan)
            self._idle()
        return not self.should_stop

    def openai(
        self, stream: Iterable[Any], count_tokens: Callable[[str], int] | None = None
    ) -> Iterator[Any]:
        """Wrap an OpenAI stream (see :func:`beam_client.adapters.openai_stream_sync`)."""
        return openai_stream_sync(self, stream, count_tokens)

    def anthropic(
        self, stream: Iterable[Any], count_tokens: Callable[[str], int] | None = None
    ) -> Iterator[Any]:
        """Wrap an Anthropic stream (see :func:`beam_client.adapters.anthropic_stream_sync`)."""
        return anthropic_stream_sync(self, stream, count_tokens)

    def _start(self, plan: DeductPlan) -> None:
        try:
            self._deducting = self._client._submit(lambda: self._deduct(plan))
        except RuntimeError as error:  # the client was closed
            with self._lock:
                self._deduct_failed(plan, BeamError("CANCELLED", "", str(error)))

    def _idle(self) -> None:
        """Wait for the Deduct in flight (bounded by its deadline and retries)."""
        future = self._deducting
        if future is None:
            return
        budget = (self._client.timeout + 1) * self._client.retry.max_attempts
        try:
            future.result(timeout=budget + self._client.retry.worst_case_wait())
        except (FutureTimeout, Exception):
            return

    def _deduct(self, plan: DeductPlan) -> None:
        """Send ``plan``, then each Deduct the answers make due (one at a time; each carries
        tokens counted since the previous, so the chain ends with the stream)."""
        next_plan: DeductPlan | None = plan
        while next_plan is not None:
            current = next_plan
            try:
                answer = self._client._call("DeductTokens", self._deduct_request(current), None)
            except BeamError as error:
                with self._lock:
                    self._deduct_failed(current, error)
                return
            except Exception as error:  # a bug or a broken channel: the stream stops
                with self._lock:
                    self._deduct_failed(current, BeamError("UNKNOWN", "", repr(error)))
                return
            with self._lock:
                next_plan = self._deducted(current, _wire.deduct_result(answer))
