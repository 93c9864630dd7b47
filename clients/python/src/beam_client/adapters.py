"""Adapters that meter OpenAI and Anthropic streams through a guard, duck-typed.

No SDK is imported: a chunk is read by attribute (the SDKs' objects) or by key (plain
dicts, e.g. parsed server-sent events), so any object of the documented shape works.

Each adapter wraps the stream and yields its chunks unchanged, and for each chunk:

- content (text, reasoning, refusal, tool-call arguments) is counted as completion tokens
  with ``guard.add``: ``count_tokens(text)`` per piece (default :func:`estimate_tokens`,
  about 4 characters a token, at least 1), or — when the chunk itself carries a cumulative
  ``completion_tokens``/``output_tokens`` count — as the chunk says;
- usage sets the guard's usage for the settlement:

  ========================  ==================================================================
  OpenAI Chat Completions   the final chunk's ``usage.prompt_tokens``, ``completion_tokens``,
                            ``prompt_tokens_details.cached_tokens`` (ask for it with
                            ``stream_options={"include_usage": True}``)
  OpenAI Responses          ``response.completed``'s ``response.usage.input_tokens``,
                            ``output_tokens``, ``input_tokens_details.cached_tokens``
  Anthropic Messages        ``message_start``'s ``message.usage.input_tokens`` (+
                            ``cache_read_input_tokens`` + ``cache_creation_input_tokens``;
                            cached = ``cache_read_input_tokens``) and ``message_delta``'s
                            cumulative ``usage.output_tokens``
  ========================  ==================================================================

The SDKs' stream helpers are read too: OpenAI's ``client.chat.completions.stream(...)``
yields ``chunk`` events (each carries the raw chunk, read as above) and derived events
(``content.delta`` and the like, which repeat a chunk's content and are not counted again);
Anthropic's ``client.messages.stream(...)`` yields the raw events (read as above) and
derived ``text``/``thinking``/``input_json`` events (not counted again).

When the guard says stop (``guard.should_stop``: a Deduct answered stop, or the guard cut
the stream where its hold's coverage ends), the adapter yields the chunk it has (those
tokens were delivered) and ends. When the stream reached exactly the tokens granted
(``stop_reason`` ``MAX_TOKENS_REACHED``: the provider's own end), the adapter goes on
reading what carries no content — the finish chunk and the provider's final usage (OpenAI's
usage chunk, the Responses API's ``response.completed``, Anthropic's ``message_delta``),
which a provider sends right after — so the settlement has the provider's exact counts
(prompt, cached tokens); it ends at the stream's end or at the first content past the grant
(not handed on, not counted).

**Every exit closes the upstream.** However the wrapper ends — the stream finished, Beam
said stop, the consumer ``break``s out, raises, is cancelled, or abandons the generator it
runs in (``GeneratorExit``), or the upstream itself fails — the adapter closes the upstream
stream (``aclose()`` or ``close()``; the SDKs' streams then close the HTTP response, and with
it the provider's generation), so the provider never generates tokens nobody is billed for.
The charge is what was streamed: every chunk is counted before it is yielded, so the
settlement holds the tokens the consumer was handed (the provider's own count where it
reported one), and the status is the guard's (:func:`beam_client._guard.status_for`). Where
the provider's final usage never arrived, the settlement uses what is known: the prompt as
reported (Anthropic reports it first) or estimated, and the counted completion tokens.

A sync wrapper is closed at once when the consumer leaves it (CPython closes a generator
nobody refers to). An async generator is closed by the event loop soon after it is dropped
(asyncio finalizes it in a task of its own); to close it at a point of your choosing, or if
you keep a reference to the wrapper, use ``async with contextlib.aclosing(g.openai(stream))
as chunks:``. Closing never raises: a failure to close is logged (logger ``beam_client``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from beam_client._guard import STOP_MAX_TOKENS_REACHED

if TYPE_CHECKING:
    from beam_client.aio import AsyncGuard
    from beam_client.sync import Guard

Counter = Callable[[str], int]

log = logging.getLogger("beam_client")


def estimate_tokens(text: str) -> int:
    """About 4 characters a token, rounded up; 0 for empty text, else at least 1."""
    return (len(text) + 3) // 4 if text else 0


_CLASS_HAS: dict[tuple[type, str], bool] = {}


def _class_has(cls: type, name: str) -> bool:
    """Whether a model class has ``name`` (a property, say): asked once per class and name
    (pydantic's metaclass answers a miss through an exception). Bounded: the SDKs' classes
    times the few names the adapters read."""
    key = (cls, name)
    found = _CLASS_HAS.get(key)
    if found is None:
        if len(_CLASS_HAS) >= 4096:
            _CLASS_HAS.clear()
        found = _CLASS_HAS[key] = hasattr(cls, name)
    return found


def _get(obj: Any, name: str) -> Any:
    """``obj.name`` or ``obj[name]``; None when absent. On the hot path of every chunk: the
    SDKs' objects are pydantic models, whose missing attributes cost an exception inside
    ``__getattr__``; their fields and extras are read directly instead."""
    if obj is None:
        return None
    cls = type(obj)
    if cls is dict:
        return obj.get(name)
    fields = getattr(cls, "__pydantic_fields__", None)
    if fields is not None:
        if name in fields:
            return obj.__dict__.get(name)
        extra = getattr(obj, "__pydantic_extra__", None)
        if extra and name in extra:
            return extra[name]
        if not _class_has(cls, name):  # not a property or other class attribute either
            return None
    elif isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass
class _Step:
    """What one chunk means: completion tokens it delivered, usage fields it reports."""

    tokens: int = 0
    usage: dict[str, int] = field(default_factory=dict)


@dataclass
class _Reader:
    count: Counter
    counted: int = 0  # completion tokens counted so far by this reader

    def step(self, texts: list[str], cumulative: int | None) -> int:
        """Tokens to add for ``texts``: the cumulative count's increase when the chunk
        carries one, else ``count`` of each piece."""
        if not texts:
            return 0
        if cumulative is not None:
            tokens = max(0, cumulative - self.counted)
        else:
            tokens = sum(self.count(text) for text in texts)
        self.counted += tokens
        return tokens


def _strings(*values: Any) -> list[str]:
    return [v for v in values if isinstance(v, str) and v]


# -- OpenAI ------------------------------------------------------------------------------


def openai_step(chunk: Any, reader: _Reader) -> _Step:
    """One OpenAI Chat Completions chunk (or Responses API event)."""
    kind = _get(chunk, "type")
    if isinstance(kind, str):
        if kind.startswith("response."):
            return _openai_responses_step(kind, chunk, reader)
        if kind == "chunk":  # the stream helper's event around each raw chunk
            return openai_step(_get(chunk, "chunk"), reader)
        return _Step()  # the helper's derived events repeat a chunk's content
    step = _Step()
    usage = _get(chunk, "usage")
    completion = _int(_get(usage, "completion_tokens"))
    if usage is not None:
        prompt = _int(_get(usage, "prompt_tokens"))
        cached = _int(_get(_get(usage, "prompt_tokens_details"), "cached_tokens"))
        for name, value in (
            ("prompt_tokens", prompt),
            ("completion_tokens", completion),
            ("cached_prompt_tokens", cached),
        ):
            if value is not None:
                step.usage[name] = value
    texts: list[str] = []
    for choice in _get(chunk, "choices") or ():
        delta = _get(choice, "delta")
        texts += _strings(
            _get(delta, "content"),
            _get(delta, "reasoning_content"),
            _get(delta, "refusal"),
            _get(choice, "text"),  # legacy Completions
        )
        for call in _get(delta, "tool_calls") or ():
            texts += _strings(_get(_get(call, "function"), "arguments"))
    step.tokens = reader.step(texts, completion)
    return step


def _openai_responses_step(kind: str, event: Any, reader: _Reader) -> _Step:
    step = _Step()
    if kind.endswith(".delta"):
        step.tokens = reader.step(_strings(_get(event, "delta")), None)
    elif kind in ("response.completed", "response.incomplete", "response.failed"):
        usage = _get(_get(event, "response"), "usage")
        for name, value in (
            ("prompt_tokens", _int(_get(usage, "input_tokens"))),
            ("completion_tokens", _int(_get(usage, "output_tokens"))),
            (
                "cached_prompt_tokens",
                _int(_get(_get(usage, "input_tokens_details"), "cached_tokens")),
            ),
        ):
            if value is not None:
                step.usage[name] = value
    return step


# -- Anthropic ---------------------------------------------------------------------------


def anthropic_step(event: Any, reader: _Reader) -> _Step:
    """One Anthropic Messages stream event."""
    kind = _get(event, "type")
    step = _Step()
    if kind == "message_start":
        step.usage = _anthropic_input(_get(_get(event, "message"), "usage"))
    elif kind == "content_block_delta":
        delta = _get(event, "delta")
        texts = _strings(_get(delta, "text"), _get(delta, "thinking"), _get(delta, "partial_json"))
        step.tokens = reader.step(texts, None)
    elif kind == "message_delta":
        usage = _get(event, "usage")
        step.usage = _anthropic_input(usage)  # newer APIs repeat the input counts here
        output = _int(_get(usage, "output_tokens"))
        if output is not None:
            step.usage["completion_tokens"] = output
    return step


def _anthropic_input(usage: Any) -> dict[str, int]:
    fresh = _int(_get(usage, "input_tokens"))
    if fresh is None:
        return {}
    read = _int(_get(usage, "cache_read_input_tokens")) or 0
    written = _int(_get(usage, "cache_creation_input_tokens")) or 0
    return {"prompt_tokens": fresh + read + written, "cached_prompt_tokens": read}


# -- the wrappers ------------------------------------------------------------------------


async def _meter(
    guard: AsyncGuard,
    stream: AsyncIterable[Any],
    step: Callable[[Any, _Reader], _Step],
    count_tokens: Counter | None,
) -> AsyncIterator[Any]:
    reader = _Reader(count_tokens or estimate_tokens)
    draining = False  # past the tokens granted: only what carries no content is read
    try:
        async for chunk in stream:
            meaning = step(chunk, reader)
            if draining and meaning.tokens:
                break  # content past the grant: not handed on, not counted
            if meaning.usage:
                guard.usage(**meaning.usage)
            if meaning.tokens:
                await guard.add(meaning.tokens)
            yield chunk
            if guard.should_stop:
                if not _drains(guard):
                    break
                draining = True
    finally:
        # Every exit, not only a stop: an upstream left open goes on generating, unbilled.
        await _aclose(stream)


def _meter_sync(
    guard: Guard,
    stream: Iterable[Any],
    step: Callable[[Any, _Reader], _Step],
    count_tokens: Counter | None,
) -> Iterator[Any]:
    reader = _Reader(count_tokens or estimate_tokens)
    draining = False
    try:
        for chunk in stream:
            meaning = step(chunk, reader)
            if draining and meaning.tokens:
                break
            if meaning.usage:
                guard.usage(**meaning.usage)
            if meaning.tokens:
                guard.add(meaning.tokens)
            yield chunk
            if guard.should_stop:
                if not _drains(guard):
                    break
                draining = True
    finally:
        _close(stream)


def _drains(guard: AsyncGuard | Guard) -> bool:
    """Whether a stopped stream is still read for what follows without content (the finish
    and usage chunks): only when it reached exactly the tokens granted, the provider's own
    end. Any other stop ends the wrapper at once."""
    return guard.stop_reason == STOP_MAX_TOKENS_REACHED


# Closes in flight, shielded from a second cancellation of their caller (kept referenced).
_closing: set[asyncio.Future[Any]] = set()


async def _aclose(stream: Any) -> None:
    """Close an async upstream; shielded, so cancelling the consumer again cannot leave it
    half closed. A failure is logged, not raised: it must not hide how the stream ended."""
    for name in ("aclose", "close"):
        close = getattr(stream, name, None)
        if not callable(close):
            continue
        try:
            result = close()
            if inspect.isawaitable(result):
                closing = asyncio.ensure_future(result)
                _closing.add(closing)
                closing.add_done_callback(_closing.discard)
                await asyncio.shield(closing)
        except Exception as error:
            log.warning("closing the upstream stream %r failed: %r", stream, error)
        return


def _close(stream: Any) -> None:
    close = getattr(stream, "close", None)
    if not callable(close):
        return
    try:
        close()
    except Exception as error:
        log.warning("closing the upstream stream %r failed: %r", stream, error)


def openai_stream(
    guard: AsyncGuard, stream: AsyncIterable[Any], count_tokens: Counter | None = None
) -> AsyncIterator[Any]:
    """Meter an OpenAI async stream (Chat Completions chunks or Responses events)."""
    return _meter(guard, stream, openai_step, count_tokens)


def anthropic_stream(
    guard: AsyncGuard, stream: AsyncIterable[Any], count_tokens: Counter | None = None
) -> AsyncIterator[Any]:
    """Meter an Anthropic Messages async stream of events."""
    return _meter(guard, stream, anthropic_step, count_tokens)


def openai_stream_sync(
    guard: Guard, stream: Iterable[Any], count_tokens: Counter | None = None
) -> Iterator[Any]:
    """Meter an OpenAI stream in blocking code."""
    return _meter_sync(guard, stream, openai_step, count_tokens)


def anthropic_stream_sync(
    guard: Guard, stream: Iterable[Any], count_tokens: Counter | None = None
) -> Iterator[Any]:
    """Meter an Anthropic Messages stream in blocking code."""
    return _meter_sync(guard, stream, anthropic_step, count_tokens)
