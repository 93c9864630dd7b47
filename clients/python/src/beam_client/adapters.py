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

When a Deduct answers stop (``guard.should_stop``), the adapter yields the chunk it has
(those tokens were delivered), closes the upstream stream (``aclose()`` or ``close()``) and
ends. The provider's final usage then never arrives; the settlement uses what is known: the
prompt as reported (Anthropic reports it first) or estimated, and the counted completion
tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from beam_client.aio import AsyncGuard
    from beam_client.sync import Guard

Counter = Callable[[str], int]


def estimate_tokens(text: str) -> int:
    """About 4 characters a token, rounded up; 0 for empty text, else at least 1."""
    return (len(text) + 3) // 4 if text else 0


def _get(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
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
    if isinstance(kind, str) and kind.startswith("response."):
        return _openai_responses_step(kind, chunk, reader)
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
    stopped = False
    try:
        async for chunk in stream:
            meaning = step(chunk, reader)
            if meaning.usage:
                guard.usage(**meaning.usage)
            if meaning.tokens and not await guard.add(meaning.tokens):
                stopped = True
            yield chunk
            if stopped or guard.should_stop:
                stopped = True
                break
    finally:
        if stopped:
            await _aclose(stream)


def _meter_sync(
    guard: Guard,
    stream: Iterable[Any],
    step: Callable[[Any, _Reader], _Step],
    count_tokens: Counter | None,
) -> Iterator[Any]:
    reader = _Reader(count_tokens or estimate_tokens)
    stopped = False
    try:
        for chunk in stream:
            meaning = step(chunk, reader)
            if meaning.usage:
                guard.usage(**meaning.usage)
            if meaning.tokens and not guard.add(meaning.tokens):
                stopped = True
            yield chunk
            if stopped or guard.should_stop:
                stopped = True
                break
    finally:
        if stopped:
            close = getattr(stream, "close", None)
            if callable(close):
                close()


async def _aclose(stream: Any) -> None:
    for name in ("aclose", "close"):
        close = getattr(stream, name, None)
        if callable(close):
            result = close()
            if inspect.isawaitable(result):
                await result
            return


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
