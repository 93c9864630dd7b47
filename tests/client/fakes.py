"""Fake LLM providers: streams of objects shaped like the OpenAI and Anthropic SDKs' chunks.

Nothing here imports an SDK; the objects have the attributes the SDKs' objects have, so the
client's duck-typed adapters read them as they would read the real ones. A stream is
scripted by a list of text pieces and the usage the provider reports at its end, and
records whether it was closed (the adapter closes it when Beam says stop). ``endless``
pieces model a provider that would go on forever: only a stop ends it.

``fake_openai_module`` / ``fake_anthropic_module`` are importable stand-ins for the SDK
packages (``AsyncOpenAI().chat.completions.create(..., stream=True)``,
``AsyncAnthropic().messages.create(..., stream=True)``), used to run the documentation's
examples as written.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import types
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace as NS
from typing import Any

# -- chunk shapes --------------------------------------------------------------------------


def openai_chunk(text: str) -> NS:
    return NS(
        id="chatcmpl-1",
        object="chat.completion.chunk",
        choices=[
            NS(index=0, delta=NS(role=None, content=text, tool_calls=None), finish_reason=None)
        ],
        usage=None,
    )


def openai_usage_chunk(prompt: int, completion: int, cached: int = 0) -> NS:
    return NS(
        id="chatcmpl-1",
        object="chat.completion.chunk",
        choices=[],
        usage=NS(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=NS(cached_tokens=cached),
        ),
    )


def anthropic_events_head(input_tokens: int, cache_read: int = 0, cache_write: int = 0) -> list[NS]:
    return [
        NS(
            type="message_start",
            message=NS(
                id="msg_1",
                role="assistant",
                usage=NS(
                    input_tokens=input_tokens,
                    cache_read_input_tokens=cache_read,
                    cache_creation_input_tokens=cache_write,
                    output_tokens=1,
                ),
            ),
        ),
        NS(type="content_block_start", index=0, content_block=NS(type="text", text="")),
    ]


def anthropic_text(text: str) -> NS:
    return NS(type="content_block_delta", index=0, delta=NS(type="text_delta", text=text))


def anthropic_events_tail(output_tokens: int) -> list[NS]:
    return [
        NS(type="content_block_stop", index=0),
        NS(
            type="message_delta",
            delta=NS(stop_reason="end_turn"),
            usage=NS(output_tokens=output_tokens),
        ),
        NS(type="message_stop"),
    ]


# -- streams -------------------------------------------------------------------------------


@dataclass
class Script:
    """What a fake provider streams: head events, text pieces, tail events."""

    head: list[Any] = field(default_factory=list)
    pieces: Iterable[str] = ()
    tail: list[Any] = field(default_factory=list)
    chunk: Any = openai_chunk


class FakeStream:
    """An async and sync iterable of chunks that records what was read and whether closed."""

    def __init__(self, script: Script, delay: float = 0.0) -> None:
        self.script = script
        self.delay = delay
        self.closed = False
        self.pieces_sent = 0

    def _events(self) -> Iterator[Any]:
        yield from self.script.head
        for piece in self.script.pieces:
            if self.closed:
                return
            self.pieces_sent += 1
            yield self.script.chunk(piece)
        yield from self.script.tail

    async def __aiter__(self) -> AsyncIterator[Any]:
        for event in self._events():
            if self.closed:
                return
            await asyncio.sleep(self.delay)
            yield event

    def __iter__(self) -> Iterator[Any]:
        for event in self._events():
            if self.closed:
                return
            yield event

    async def aclose(self) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True


def openai_stream(
    pieces: Iterable[str], usage: tuple[int, ...] | None, delay: float = 0.0
) -> FakeStream:
    """Chat Completions chunks, then (if ``usage``) the include_usage chunk."""
    tail = [openai_usage_chunk(*usage)] if usage is not None else []
    return FakeStream(Script(pieces=pieces, tail=tail), delay)


def anthropic_stream(
    pieces: Iterable[str],
    input_tokens: int,
    output_tokens: int,
    cache_read: int = 0,
    delay: float = 0.0,
) -> FakeStream:
    return FakeStream(
        Script(
            head=anthropic_events_head(input_tokens, cache_read),
            pieces=pieces,
            tail=anthropic_events_tail(output_tokens),
            chunk=anthropic_text,
        ),
        delay,
    )


def endless(piece: str = "tok ") -> Iterator[str]:
    """A provider that never stops on its own (one ~1-token piece at a time)."""
    return itertools.repeat(piece)


# -- importable SDK stand-ins (for the documentation's examples) ----------------------------


@dataclass
class Provider:
    """What the fake SDKs answer: ``reply_tokens`` one-token pieces (at most the call's
    ``max_tokens``), then usage of ``prompt_tokens`` (of which ``cached_tokens``) and the
    pieces sent. ``endless``: ignores max_tokens and never ends (only a stop ends it) and
    never reports usage. ``delay``: seconds before each chunk."""

    prompt_tokens: int = 120
    cached_tokens: int = 0
    reply_tokens: int = 300
    endless: bool = False
    delay: float = 0.0
    calls: list[dict[str, Any]] = field(default_factory=list)
    streams: list[FakeStream] = field(default_factory=list)

    def _pieces(self, kwargs: dict[str, Any]) -> tuple[Iterable[str], int]:
        self.calls.append(kwargs)
        if self.endless:
            return endless(), 0
        count = min(self.reply_tokens, kwargs.get("max_tokens") or self.reply_tokens)
        return ["tok "] * count, count

    def openai(self, kwargs: dict[str, Any]) -> FakeStream:
        pieces, count = self._pieces(kwargs)
        include_usage = bool((kwargs.get("stream_options") or {}).get("include_usage"))
        tail = []
        if include_usage and not self.endless:
            tail = [openai_usage_chunk(self.prompt_tokens, count, self.cached_tokens)]
        stream = FakeStream(Script(pieces=pieces, tail=tail), self.delay)
        self.streams.append(stream)
        return stream

    def anthropic(self, kwargs: dict[str, Any]) -> FakeStream:
        pieces, count = self._pieces(kwargs)
        head = anthropic_events_head(self.prompt_tokens - self.cached_tokens, self.cached_tokens)
        tail = [] if self.endless else anthropic_events_tail(count)
        stream = FakeStream(Script(head, pieces, tail, chunk=anthropic_text), self.delay)
        self.streams.append(stream)
        return stream


def fake_openai_module(provider: Provider) -> types.ModuleType:
    module = types.ModuleType("openai")

    class _Completions:
        def __init__(self, is_async: bool) -> None:
            self.is_async = is_async

        def create(self, **kwargs: Any) -> Any:
            assert kwargs.get("stream") is True
            stream = provider.openai(kwargs)
            if not self.is_async:
                return stream

            async def answer() -> FakeStream:
                return stream

            return answer()

    class AsyncOpenAI:
        def __init__(self, **_: Any) -> None:
            self.chat = NS(completions=_Completions(is_async=True))

    class OpenAI:
        def __init__(self, **_: Any) -> None:
            self.chat = NS(completions=_Completions(is_async=False))

    module.AsyncOpenAI = AsyncOpenAI  # type: ignore[attr-defined]
    module.OpenAI = OpenAI  # type: ignore[attr-defined]
    return module


def fake_anthropic_module(provider: Provider) -> types.ModuleType:
    module = types.ModuleType("anthropic")

    class _Messages:
        async def create(self, **kwargs: Any) -> FakeStream:
            assert kwargs.get("stream") is True
            return provider.anthropic(kwargs)

    class AsyncAnthropic:
        def __init__(self, **_: Any) -> None:
            self.messages = _Messages()

    module.AsyncAnthropic = AsyncAnthropic  # type: ignore[attr-defined]
    return module


# -- a provider paced by the guard (deterministic Deduct timing) -----------------------------


class Paced:
    """A stream that waits, between chunks, until the guard has no Deduct in flight: every
    answer lands before the next token (as with a provider slower than Beam), so which
    Deduct stops a stream is exact. Bounded: a Deduct that never ends fails the test."""

    def __init__(self, stream: FakeStream, guard: Any, max_wait_seconds: float = 20.0) -> None:
        self.stream = stream
        self.guard = guard
        self.max_wait_seconds = max_wait_seconds

    async def __aiter__(self) -> AsyncIterator[Any]:
        async for chunk in self.stream:
            for _ in range(int(self.max_wait_seconds / 0.002)):
                if not self.guard.deduct_in_flight:
                    break
                await asyncio.sleep(0.002)
            else:
                raise AssertionError("a Deduct stayed in flight")
            yield chunk

    async def aclose(self) -> None:
        await self.stream.aclose()

    @property
    def closed(self) -> bool:
        return self.stream.closed

    @property
    def pieces_sent(self) -> int:
        return self.stream.pieces_sent


class PacedSync:
    """:class:`Paced` for blocking code (the guard's Deducts run on the client's workers)."""

    def __init__(self, stream: FakeStream, guard: Any, max_wait_seconds: float = 20.0) -> None:
        self.stream = stream
        self.guard = guard
        self.max_wait_seconds = max_wait_seconds

    def __iter__(self) -> Iterator[Any]:
        for chunk in self.stream:
            for _ in range(int(self.max_wait_seconds / 0.002)):
                if not self.guard.deduct_in_flight:
                    break
                time.sleep(0.002)
            else:
                raise AssertionError("a Deduct stayed in flight")
            yield chunk

    def close(self) -> None:
        self.stream.close()

    @property
    def closed(self) -> bool:
        return self.stream.closed

    @property
    def pieces_sent(self) -> int:
        return self.stream.pieces_sent
