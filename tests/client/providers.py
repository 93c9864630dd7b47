"""Fake OpenAI and Anthropic servers on loopback HTTP, for driving the real SDKs.

:class:`FakeProvider` is an HTTP/1.1 server (asyncio, in a thread of its own, so sync and
async SDK clients can both call it) that speaks the providers' wire formats:

- ``POST /v1/chat/completions`` (OpenAI Chat Completions): with ``stream: true``, server-sent
  events ``data: {chunk}`` (a role chunk, one chunk per content token, a ``finish_reason``
  chunk, the usage chunk when ``stream_options.include_usage`` asked for it — with
  ``prompt_tokens_details.cached_tokens`` — and ``data: [DONE]``); else one JSON
  ``chat.completion``;
- ``POST /v1/responses`` (OpenAI Responses): with ``stream: true``, ``event: response.*``
  pairs (``response.created`` ... one ``response.output_text.delta`` per token ...
  ``response.completed``, whose usage has ``input_tokens_details.cached_tokens``); else one
  JSON ``response``;
- ``POST /v1/messages`` (Anthropic Messages): with ``stream: true``, ``event:``/``data:``
  pairs ``message_start`` (usage ``input_tokens`` excluding ``cache_read_input_tokens``),
  ``content_block_start``, ``ping``, one ``content_block_delta`` per token,
  ``content_block_stop``, ``message_delta`` (cumulative ``usage.output_tokens``),
  ``message_stop``; else one JSON ``message``.

Each request takes the next queued :class:`Reply` (or the default one): how many content
tokens to generate (at most the request's ``max_tokens``), the usage to report, and a
scripted fault — the connection dropped mid-stream, an error event, usage left out. Every
token is one ``piece`` ("tok ", which the client's adapters count as exactly 1 token).

What the tests compare with Beam's ledger is :attr:`Call.generated`: the content tokens the
provider generated (wrote) before the stream ended or the client closed the connection —
the provider's cost. A reply with ``pause_after=n`` generates ``n`` tokens and then waits
(at most ``pause_seconds``) for the client to close the connection before it goes on, the
way a provider would go on generating for a client that never hung up; so a client that
closes on time leaves exactly ``n`` tokens generated, and one that does not leaves all of
them. Everything is bounded: request size, tokens per reply, calls per server, waits.

:class:`Api` drives the real ``openai`` / ``anthropic`` SDK clients against it (``base_url``
pointing at the fake, ``max_retries=0``): ``create(stream=True)`` or the SDK's stream helper
(``chat.completions.stream``, ``responses.stream``, ``messages.stream``), async or sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import anthropic
import openai

MAX_CALLS = 256  # per server
MAX_TOKENS_PER_REPLY = 100_000
MAX_REQUEST_BYTES = 1 << 20
WAIT_SECONDS = 20.0  # the longest any test waits for the server

Fault = Literal["drop", "error"]
Outcome = Literal["", "completed", "closed_by_client", "dropped", "error_event", "json"]


@dataclass
class Reply:
    """What the fake answers to one request."""

    tokens: int = 20  # content tokens to generate, at most the request's max_tokens
    prompt_tokens: int = 25  # the prompt as the provider counts it (cached included)
    cached_tokens: int = 0  # of prompt_tokens, read from the provider's prompt cache
    piece: str = "tok "  # the text of each content token
    usage: bool = True  # report usage (OpenAI also needs include_usage asked for)
    fault: Fault | None = None  # after fault_after tokens: drop the connection / error event
    fault_after: int = 0
    pause_after: int | None = None  # after this many tokens, wait for the client to hang up
    pause_seconds: float = 5.0  # ... at most this long, then go on generating
    delay_seconds: float = 0.0  # between tokens
    honor_max_tokens: bool = True  # False: a provider that streams past the request's max

    def __post_init__(self) -> None:
        assert 0 <= self.tokens <= MAX_TOKENS_PER_REPLY
        assert 0 <= self.cached_tokens <= self.prompt_tokens
        assert 0 <= self.pause_seconds <= WAIT_SECONDS


@dataclass
class Call:
    """One request the fake served, and what it cost the provider."""

    path: str
    body: dict[str, Any]
    reply: Reply
    generated: int = 0  # content tokens written before the end or the client's hang-up
    closed_by_client: bool = False  # the client closed the connection before the end
    outcome: Outcome = ""
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def max_tokens(self) -> int | None:
        """The request's max_tokens (max_completion_tokens), if it has one."""
        body = self.body
        value = (
            body.get("max_completion_tokens")
            or body.get("max_output_tokens")
            or body.get("max_tokens")
        )
        return value if isinstance(value, int) else None

    @property
    def to_generate(self) -> int:
        """Tokens the reply generates if nobody stops it."""
        limit = self.max_tokens if self.reply.honor_max_tokens else None
        return min(self.reply.tokens, limit or self.reply.tokens)


class ClientGone(Exception):
    """The client closed the connection."""


class FakeProvider:
    """An OpenAI + Anthropic fake on 127.0.0.1 (``start()``/``stop()``, or ``with``)."""

    def __init__(self, default: Reply | None = None) -> None:
        self.default = default or Reply()
        self.calls: list[Call] = []
        self._replies: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fake-provider", daemon=True
        )
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0

    # -- what the tests use --------------------------------------------------------------

    @property
    def openai_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def anthropic_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def queue(self, *replies: Reply) -> None:
        """Answer the next requests with ``replies``, in order (then the default)."""
        with self._lock:
            self._replies.extend(replies)

    def wait_call(self, index: int = 0, timeout: float = WAIT_SECONDS) -> Call:
        """The ``index``-th call, once the fake is done with it (blocking)."""
        deadline = time.monotonic() + timeout
        while len(self.calls) <= index:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no call #{index} within {timeout}s")
            time.sleep(0.005)
        call = self.calls[index]
        if not call.done.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"call #{index} not done within {timeout}s: {call}")
        return call

    async def call(self, index: int = 0, wait_seconds: float = WAIT_SECONDS) -> Call:
        """As :meth:`wait_call`, for async tests."""
        return await asyncio.to_thread(self.wait_call, index, wait_seconds)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> FakeProvider:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self._loop
        )
        self._server = started.result(WAIT_SECONDS)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._handlers):
                task.cancel()
            if self._handlers:
                await asyncio.wait(self._handlers, timeout=WAIT_SECONDS)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(WAIT_SECONDS)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(WAIT_SECONDS)
        self._loop.close()

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP ----------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_SECONDS)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            return  # a connection that never sent a request
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        headers = dict(
            (name.strip().lower(), value.strip())
            for name, value in (line.split(":", 1) for line in header_lines if line)
        )
        length = int(headers.get("content-length", "0"))
        assert method == "POST", method
        assert 0 <= length <= MAX_REQUEST_BYTES, length
        body = json.loads(await reader.readexactly(length)) if length else {}
        with self._lock:
            assert len(self.calls) < MAX_CALLS, "the fake serves at most MAX_CALLS calls"
            reply = self._replies.popleft() if self._replies else self.default
            call = Call(path, body, reply)
            self.calls.append(call)
        # The client sends nothing more: a read that ends means it hung up.
        hangup = asyncio.ensure_future(reader.read(1))
        try:
            if path.endswith("/chat/completions"):
                wire: _Wire = _OpenAI(call)
            elif path.endswith("/responses"):
                wire = _OpenAIResponses(call)
            elif path.endswith("/messages"):
                wire = _Anthropic(call)
            else:
                await _respond_json(writer, 404, {"error": {"message": f"no route {path}"}})
                return
            if body.get("stream"):
                await self._stream(wire, call, writer, hangup)
            else:
                call.generated = call.to_generate
                await _respond_json(writer, 200, wire.message())
                call.outcome = "json"
        except (ClientGone, ConnectionError):
            call.closed_by_client = True
            call.outcome = "closed_by_client"
        finally:
            hangup.cancel()
            if hangup.done() and not hangup.cancelled():
                hangup.exception()  # a reset connection: retrieved, so never logged
            call.done.set()

    async def _stream(
        self, wire: _Wire, call: Call, writer: asyncio.StreamWriter, hangup: asyncio.Future[bytes]
    ) -> None:
        reply = call.reply
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"connection: close\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        for event in wire.head():
            await _send(writer, event, hangup)
        total = call.to_generate
        for _ in range(total):
            if reply.fault is not None and call.generated == reply.fault_after:
                break
            if reply.pause_after is not None and call.generated == reply.pause_after:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(hangup), reply.pause_seconds)
            await asyncio.sleep(reply.delay_seconds)  # also lets a hang-up be seen
            if hangup.done():
                raise ClientGone
            await _send(writer, wire.token(), hangup)
            call.generated += 1
        if reply.fault == "drop":
            call.outcome = "dropped"
            writer.transport.abort()  # mid-body: the chunked message never ends
            return
        if reply.fault == "error":
            await _send(writer, wire.error(), hangup)
            call.outcome = "error_event"
        else:
            for event in wire.tail(truncated=total < reply.tokens):
                await _send(writer, event, hangup)
            call.outcome = "completed"
        writer.write(b"0\r\n\r\n")
        await writer.drain()


async def _send(writer: asyncio.StreamWriter, event: bytes, hangup: asyncio.Future[bytes]) -> None:
    """One SSE event as one HTTP chunk."""
    if hangup.done():
        raise ClientGone
    writer.write(b"%x\r\n%s\r\n" % (len(event), event))
    await writer.drain()


async def _respond_json(writer: asyncio.StreamWriter, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    reason = {200: "OK", 404: "Not Found"}[status]
    writer.write(
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\nconnection: close\r\n\r\n".encode()
        + data
    )
    await writer.drain()


# -- wire formats ------------------------------------------------------------------------


class _Wire:
    def __init__(self, call: Call) -> None:
        self.call = call
        self.reply = call.reply
        self.model = str(call.body.get("model", "model"))

    def head(self) -> list[bytes]:
        raise NotImplementedError

    def token(self) -> bytes:
        raise NotImplementedError

    def tail(self, *, truncated: bool) -> list[bytes]:
        raise NotImplementedError

    def error(self) -> bytes:
        raise NotImplementedError

    def message(self) -> dict[str, Any]:
        raise NotImplementedError


def _data(payload: dict[str, Any] | str, event: str | None = None) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {data}\n\n".encode()


class _OpenAI(_Wire):
    """Chat Completions: ``data: {chunk}`` events, then ``data: [DONE]``."""

    created = 1_767_225_600

    @property
    def include_usage(self) -> bool:
        options = self.call.body.get("stream_options") or {}
        return bool(options.get("include_usage"))

    def _chunk(self, choices: list[dict[str, Any]], usage: Any = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_fake",
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = usage  # null on every chunk but the last, as OpenAI sends it
        return _data(chunk)

    def _choice(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def _usage(self) -> dict[str, Any]:
        reply = self.reply
        return {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": self.call.generated,
            "total_tokens": reply.prompt_tokens + self.call.generated,
            "prompt_tokens_details": {"cached_tokens": reply.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        }

    def head(self) -> list[bytes]:
        return [self._chunk([self._choice({"role": "assistant", "content": "", "refusal": None})])]

    def token(self) -> bytes:
        return self._chunk([self._choice({"content": self.reply.piece})])

    def tail(self, *, truncated: bool) -> list[bytes]:
        events = [self._chunk([self._choice({}, "length" if truncated else "stop")])]
        if self.include_usage and self.reply.usage:
            events.append(self._chunk([], self._usage()))
        return [*events, _data("[DONE]")]

    def error(self) -> bytes:
        return _data(
            {
                "error": {
                    "message": "The server had an error while processing your request.",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            }
        )

    def message(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": self.reply.piece * self.call.generated,
                        "refusal": None,
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
        }
        if self.reply.usage:
            body["usage"] = self._usage()
        return body


class _OpenAIResponses(_Wire):
    """The Responses API: ``event: response.*`` + ``data: {...}`` pairs; the usage in
    ``response.completed`` (``input_tokens``, ``input_tokens_details.cached_tokens``)."""

    created = 1_767_225_600
    item_id = "msg_fake"

    def __init__(self, call: Call) -> None:
        super().__init__(call)
        self.sequence = 0

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return _data(payload, event=kind)

    def _text(self) -> str:
        return self.reply.piece * self.call.generated

    def _item(self, status: str) -> dict[str, Any]:
        content = []
        if status == "completed":
            content = [{"type": "output_text", "text": self._text(), "annotations": []}]
        return {
            "id": self.item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def _response(self, status: str) -> dict[str, Any]:
        reply = self.reply
        usage = None
        if status == "completed" and reply.usage:
            usage = {
                "input_tokens": reply.prompt_tokens,
                "input_tokens_details": {"cached_tokens": reply.cached_tokens},
                "output_tokens": self.call.generated,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": reply.prompt_tokens + self.call.generated,
            }
        return {
            "id": "resp_fake",
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": [self._item("completed")] if status == "completed" else [],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": usage,
        }

    def _part(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "output_index": 0, "content_index": 0}

    def head(self) -> list[bytes]:
        return [
            self._event("response.created", response=self._response("in_progress")),
            self._event("response.in_progress", response=self._response("in_progress")),
            self._event(
                "response.output_item.added", output_index=0, item=self._item("in_progress")
            ),
            self._event(
                "response.content_part.added",
                **self._part(),
                part={"type": "output_text", "text": "", "annotations": []},
            ),
        ]

    def token(self) -> bytes:
        return self._event(
            "response.output_text.delta", **self._part(), delta=self.reply.piece, logprobs=[]
        )

    def tail(self, *, truncated: bool) -> list[bytes]:
        text = self._text()
        part = {"type": "output_text", "text": text, "annotations": []}
        return [
            self._event("response.output_text.done", **self._part(), text=text, logprobs=[]),
            self._event("response.content_part.done", **self._part(), part=part),
            self._event("response.output_item.done", output_index=0, item=self._item("completed")),
            self._event("response.completed", response=self._response("completed")),
        ]

    def error(self) -> bytes:
        return self._event(
            "error", code="server_error", message="The server had an error.", param=None
        )

    def message(self) -> dict[str, Any]:
        return self._response("completed")


class _Anthropic(_Wire):
    """Messages: ``event: <type>`` + ``data: {...}`` pairs."""

    def _input(self) -> dict[str, int]:
        reply = self.reply
        return {
            "input_tokens": reply.prompt_tokens - reply.cached_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": reply.cached_tokens,
        }

    def _event(self, payload: dict[str, Any]) -> bytes:
        return _data(payload, event=str(payload["type"]))

    def head(self) -> list[bytes]:
        message = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**self._input(), "output_tokens": 1},
        }
        return [
            self._event({"type": "message_start", "message": message}),
            self._event(
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                }
            ),
            self._event({"type": "ping"}),
        ]

    def token(self) -> bytes:
        delta = {"type": "text_delta", "text": self.reply.piece}
        return self._event({"type": "content_block_delta", "index": 0, "delta": delta})

    def tail(self, *, truncated: bool) -> list[bytes]:
        delta: dict[str, Any] = {
            "type": "message_delta",
            "delta": {
                "stop_reason": "max_tokens" if truncated else "end_turn",
                "stop_sequence": None,
            },
        }
        if self.reply.usage:
            delta["usage"] = {**self._input(), "output_tokens": self.call.generated}
        return [
            self._event({"type": "content_block_stop", "index": 0}),
            self._event(delta),
            self._event({"type": "message_stop"}),
        ]

    def error(self) -> bytes:
        return self._event(
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        )

    def message(self) -> dict[str, Any]:
        return {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [{"type": "text", "text": self.reply.piece * self.call.generated}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {**self._input(), "output_tokens": self.call.generated},
        }


# -- the real SDKs against the fake --------------------------------------------------------


@dataclass(frozen=True)
class Api:
    """One way to stream from a provider with its real SDK: ``create(stream=True)``, or the
    SDK's stream helper (``chat.completions.stream`` / ``messages.stream``)."""

    provider: Literal["openai", "anthropic"]
    helper: bool = False
    responses: bool = False  # OpenAI's Responses API instead of Chat Completions

    def __str__(self) -> str:
        name = "openai-responses" if self.responses else self.provider
        return f"{name}-{'helper' if self.helper else 'create'}"

    def async_client(self, fake: FakeProvider, timeout: float = WAIT_SECONDS) -> Any:
        if self.provider == "openai":
            return openai.AsyncOpenAI(
                api_key="sk-fake", base_url=fake.openai_url, max_retries=0, timeout=timeout
            )
        return anthropic.AsyncAnthropic(
            api_key="sk-ant-fake", base_url=fake.anthropic_url, max_retries=0, timeout=timeout
        )

    def sync_client(self, fake: FakeProvider, timeout: float = WAIT_SECONDS) -> Any:
        if self.provider == "openai":
            return openai.OpenAI(
                api_key="sk-fake", base_url=fake.openai_url, max_retries=0, timeout=timeout
            )
        return anthropic.Anthropic(
            api_key="sk-ant-fake", base_url=fake.anthropic_url, max_retries=0, timeout=timeout
        )

    @property
    def timeout_error(self) -> type[Exception]:
        return openai.APITimeoutError if self.provider == "openai" else anthropic.APITimeoutError

    def _request(self, model: str, max_tokens: int) -> dict[str, Any]:
        messages = [{"role": "user", "content": "Count to a thousand."}]
        if self.responses:
            return dict(model=model, input=messages, max_output_tokens=max_tokens)
        if self.provider == "openai":
            options = {"include_usage": True}
            return dict(
                model=model, messages=messages, max_tokens=max_tokens, stream_options=options
            )
        return dict(model=model, messages=messages, max_tokens=max_tokens)

    @contextlib.asynccontextmanager
    async def astream(self, sdk: Any, model: str, max_tokens: int) -> AsyncIterator[Any]:
        """The stream, as an app opens it: a helper inside its ``async with``; a
        ``create(stream=True)`` stream left to whoever reads it (the adapter closes it)."""
        request = self._request(model, max_tokens)
        api = self._resource(sdk)
        if self.helper:
            async with api.stream(**request) as stream:
                yield stream
        else:
            yield await api.create(stream=True, **request)

    @contextlib.contextmanager
    def stream(self, sdk: Any, model: str, max_tokens: int) -> Iterator[Any]:
        request = self._request(model, max_tokens)
        api = self._resource(sdk)
        if self.helper:
            with api.stream(**request) as stream:
                yield stream
        else:
            yield api.create(stream=True, **request)

    def _resource(self, sdk: Any) -> Any:
        if self.responses:
            return sdk.responses
        return sdk.chat.completions if self.provider == "openai" else sdk.messages

    def meter(self, guard: Any, stream: Any) -> Any:
        """``g.openai(stream)`` or ``g.anthropic(stream)`` (either face)."""
        return guard.openai(stream) if self.provider == "openai" else guard.anthropic(stream)

    def is_token(self, item: Any) -> bool:
        """Whether ``item`` (what the adapter yields) is a content token of the fake's."""
        if self.provider == "anthropic":
            return bool(item.type == "content_block_delta")
        if self.responses:
            return bool(item.type == "response.output_text.delta")
        if self.helper:
            if item.type != "chunk":
                return False
            item = item.chunk
        return bool(item.choices and item.choices[0].delta.content)


APIS = [Api("openai"), Api("openai", helper=True), Api("anthropic"), Api("anthropic", helper=True)]
RESPONSES = [Api("openai", responses=True), Api("openai", helper=True, responses=True)]
