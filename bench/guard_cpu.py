"""The guard's own CPU per chunk, without the network: where the guard row's app CPU goes.

``python bench/guard_cpu.py [--streams 30]`` runs ``--streams`` streams of
1,000 pre-parsed ``openai`` ``ChatCompletionChunk`` objects (plus the usage chunk), read
plainly and through ``async with beam.guard(...)`` / ``g.openai(stream)``, alternating,
and prints the median process time of each per stream. Beam's answers are canned: the
client's private ``AsyncBeamClient._call`` is replaced by one that answers at once (a Check
granting the 1,000 tokens, Deducts covering 1,500, a Finalize), so what is left is the
guard's core and its adapter on every chunk — the part of the guard row's extra app CPU
that is not the RPCs. Where that time goes: ``python -m cProfile -s tottime
bench/guard_cpu.py --streams 10 | head -40`` from the repository's root (run as a script,
bench/profile.py would shadow the standard library's ``profile``, which cProfile imports).
It reaches into a private method: adjust it when ``beam_client`` changes.
Run it pinned (``taskset -c 1``) and read it as the bench's other CPU figures: at the
machine's load of the moment.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

from beam_client import AsyncBeamClient, _wire
from openai.types.chat import ChatCompletionChunk

TOKENS = 1000


def _chunk(delta: dict[str, Any] | None, usage: dict[str, int] | None = None) -> Any:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": None}]
    return ChatCompletionChunk.model_validate(
        {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1,
         "model": "gpt-4", "choices": choices, "usage": usage}
    )  # fmt: skip


CHUNKS = [_chunk({"content": "tok "}) for _ in range(TOKENS)]
CHUNKS.append(
    _chunk(None, {"prompt_tokens": 25, "completion_tokens": TOKENS, "total_tokens": 1025})
)


class Stream:
    """The chunks as an SDK stream (``aclose`` included: the adapter closes it)."""

    def __init__(self) -> None:
        self._chunks = iter(CHUNKS)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        try:
            return next(self._chunks)
        except StopIteration:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        pass


async def _canned(self: AsyncBeamClient, method: str, request: Any, *args: Any, **kw: Any) -> Any:
    self.counters.bump("calls")
    answer = _wire.METHODS[method][1]
    if method == "CheckBalance":
        return answer(approved=True, remaining_balance=10**12, request_token="t",  # noqa: S106
                      reserved_grains=100_000, max_affordable_completion_tokens=10**9,
                      granted_completion_tokens=TOKENS)  # fmt: skip
    if method == "DeductTokens":
        covered = TOKENS * 3 // 2
        return answer(success=True, remaining_balance=10**12, consumed_grains=1,
                      reserved_grains=100_000, covered_completion_tokens=covered)  # fmt: skip
    return answer(success=True)


async def plain() -> int:
    tokens = 0
    async for chunk in Stream():
        if chunk.choices and chunk.choices[0].delta.content:
            tokens += 1
    return tokens


async def guarded(beam: AsyncBeamClient) -> int:
    tokens = 0
    async with beam.guard("c2", model="gpt-4", prompt_tokens=25, max_tokens=TOKENS) as g:
        async for chunk in g.openai(Stream()):  # type: ignore[arg-type]
            if chunk.choices and chunk.choices[0].delta.content:
                tokens += 1
    return tokens


async def main(streams: int) -> None:
    AsyncBeamClient._call = _canned  # type: ignore[method-assign,assignment]
    beam = AsyncBeamClient("127.0.0.1:1", "bench", outbox_path=":memory:")
    await plain()
    await guarded(beam)  # warm-up
    cpu_ms: dict[str, list[float]] = {"plain": [], "guarded": []}
    for _ in range(streams):
        for name in cpu_ms:
            start = time.process_time()
            if name == "plain":
                assert await plain() == TOKENS
            else:
                assert await guarded(beam) == TOKENS
            cpu_ms[name].append((time.process_time() - start) * 1000)
    calls = beam.stats()["calls"]
    for name, values in cpu_ms.items():
        print(f"{name}: {statistics.median(values):.2f} ms CPU per {TOKENS:,}-chunk stream "
              f"(median of {streams}; lowest {min(values):.2f})")  # fmt: skip
    print(f"RPCs per guarded stream (canned): {calls / (streams + 1):g}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=30)
    args = parser.parse_args()
    asyncio.run(main(args.streams))
