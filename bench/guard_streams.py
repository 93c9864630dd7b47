"""The guard row's app: one stream at a time through the real openai SDK, guarded or not.

bench/run.py's ``guard`` scenario calls :func:`measure` with ``beam serve`` running and
bench/stream_servers.py serving the paced provider and the delaying proxy. Each round runs,
in an order that rotates from round to round:

- ``direct``: the stream unguarded (``AsyncOpenAI`` straight to the provider);
- ``guard``: the same stream in ``async with beam.guard(...) as g:`` / ``g.openai(stream)``,
  Beam's gRPC port direct;
- ``guard_slow``: the same through a second client whose target is the delaying proxy;

then times ``--guard-checks`` CheckBalance calls by themselves on each path (the Check p50
the first-token target is measured against, in the same run). One app, one event loop, one
client per path, kept across rounds, as an application keeps its channels; the first
``warm_up`` rounds are not recorded (connections, imports, the SDK's first parse).

The clock: ``time.perf_counter`` in the app, from just before the guard is entered (or the
provider called, unguarded) to the first content chunk, to the last chunk, and to the
guard's exit (its settlement acknowledged). RPCs per stream: the client's
``stats()["calls"]`` over the stream (retries included), and on the proxied path the HTTP/2
streams the proxy saw open. No assertion here: what was measured goes to the report.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
import report as rp
from beam_client import AsyncBeamClient
from openai import AsyncOpenAI

MODEL = "gpt-4"  # priced by the bench's price list
PROMPT_TOKENS = 25  # the guard's estimate and the provider's usage alike
MESSAGES = [{"role": "user", "content": "Count to a thousand."}]
PAUSE_SECONDS = 0.05  # between two runs: what one run left behind settles
RPC_KINDS = {"checks": ("checks_approved", "checks_rejected"), "deducts": ("deducts",),
             "finalizes": ("finalizes", "finalize_failures")}  # fmt: skip


@dataclass(frozen=True)
class Setup:
    beam_target: str  # host:port of beam serve's gRPC
    proxy_target: str  # host:port of the delaying proxy in front of it
    provider_url: str  # http://127.0.0.1:<port> (the paced provider; /stats: the proxy's)
    api_key: str
    customers: Sequence[str]
    tokens: int
    rate: float
    delay_ms: float
    rounds: int
    warm_up: int
    checks_per_round: int
    loadavg: Callable[[], str]
    log: Callable[[str], None]


class App:
    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.openai = AsyncOpenAI(
            base_url=f"{setup.provider_url}/v1", api_key="bench", max_retries=0, timeout=60
        )
        self.beam = {
            rp.GUARD: AsyncBeamClient(setup.beam_target, setup.api_key, outbox_path=":memory:"),
            rp.GUARD_SLOW: AsyncBeamClient(
                setup.proxy_target, setup.api_key, outbox_path=":memory:"
            ),
        }
        self.stats = httpx.AsyncClient(base_url=setup.provider_url, timeout=10)
        self.customers = itertools.cycle(setup.customers)
        self.requests = itertools.count()

    async def close(self) -> None:
        for client in self.beam.values():
            await client.close()
        await self.openai.close()
        await self.stats.aclose()

    async def proxy_rpcs(self) -> int:
        return int((await self.stats.get("/stats")).json()["rpcs"])

    async def _provider_stream(self, max_tokens: int) -> object:
        return await self.openai.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=max_tokens, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )  # fmt: skip

    async def direct(self, round_index: int) -> rp.StreamRun:
        cpu, load = time.process_time(), self.setup.loadavg()
        start = time.perf_counter()
        first, tokens = None, 0
        stream = await self._provider_stream(self.setup.tokens)
        async for chunk in stream:  # type: ignore[attr-defined]
            if chunk.choices and chunk.choices[0].delta.content:
                tokens += 1
                if first is None:
                    first = time.perf_counter()
        last = time.perf_counter()
        return rp.StreamRun(
            kind=rp.DIRECT, round=round_index, first_token_ms=_ms(start, first),
            last_chunk_ms=_ms(start, last), tokens=tokens,
            client_cpu_ms=(time.process_time() - cpu) * 1000, load_average=load,
        )  # fmt: skip

    async def guarded(self, kind: str, round_index: int) -> rp.StreamRun:
        beam = self.beam[kind]
        before, load = beam.stats(), self.setup.loadavg()
        at_proxy = await self.proxy_rpcs()
        cpu = time.process_time()
        start = time.perf_counter()
        first, tokens = None, 0
        async with beam.guard(next(self.customers), model=MODEL, prompt_tokens=PROMPT_TOKENS,
                              max_tokens=self.setup.tokens) as g:  # fmt: skip
            opened = time.perf_counter()
            stream = await self._provider_stream(g.max_tokens_for_provider)
            async for chunk in g.openai(stream):  # type: ignore[arg-type]
                if chunk.choices and chunk.choices[0].delta.content:
                    tokens += 1
                    if first is None:
                        first = time.perf_counter()
            last = time.perf_counter()
        done = time.perf_counter()
        cpu_ms = (time.process_time() - cpu) * 1000
        after = beam.stats()
        proxied = await self.proxy_rpcs() - at_proxy
        return rp.StreamRun(
            kind=kind, round=round_index, first_token_ms=_ms(start, first),
            last_chunk_ms=_ms(start, last), exit_ms=_ms(start, done),
            open_ms=_ms(start, opened), tokens=tokens, rpcs=after["calls"] - before["calls"],
            rpcs_at_proxy=proxied if kind == rp.GUARD_SLOW else None,
            rpc_kinds={
                name: sum(after[c] - before[c] for c in counters)
                for name, counters in RPC_KINDS.items()
            },
            status=g.status.name if g.status is not None else "",
            client_cpu_ms=cpu_ms, load_average=load,
        )  # fmt: skip

    async def check(self, kind: str) -> float:
        """One CheckBalance by itself, as the guard sends it (its hold is left to expire)."""
        start = time.perf_counter()
        answer = await self.beam[kind].check_balance(
            next(self.customers), f"bench-guard-check-{next(self.requests)}", model=MODEL,
            prompt_tokens=PROMPT_TOKENS, max_tokens=self.setup.tokens,
            min_completion_tokens=50,
        )  # fmt: skip
        elapsed = _ms(start, time.perf_counter())
        assert answer.approved, answer
        return elapsed

    async def round(self, index: int, bench: rp.GuardBench | None) -> None:
        """One run of each kind (the order rotates with ``index``), then the Checks."""
        order = [rp.DIRECT, rp.GUARD, rp.GUARD_SLOW]
        shift = index % len(order)
        runs = []
        for kind in order[shift:] + order[:shift]:
            await asyncio.sleep(PAUSE_SECONDS)
            if kind == rp.DIRECT:
                runs.append(await self.direct(index))
            else:
                runs.append(await self.guarded(kind, index))
        checks: dict[str, list[float]] = {rp.GUARD: [], rp.GUARD_SLOW: []}
        for _ in range(self.setup.checks_per_round):
            for kind in checks:
                checks[kind].append(await self.check(kind))
        self.setup.log(f"(guard round {index}) " + _summary(runs, checks))
        if bench is not None:
            bench.runs += runs
            for kind, values in checks.items():
                bench.check_ms.setdefault(kind, []).extend(values)


def _summary(runs: Sequence[rp.StreamRun], checks: dict[str, list[float]]) -> str:
    parts = [
        f"{r.kind}: first token {r.first_token_ms:.1f} ms, stream {r.stream_ms:.1f} ms, "
        f"{r.tokens} tokens" + (f", {r.rpcs} RPCs" if r.rpcs is not None else "")
        for r in runs
    ]
    parts += [f"Check {kind} p50 {rp.percentile(v, 50):.1f} ms" for kind, v in checks.items()]
    return "; ".join(parts)


def _ms(start: float, end: float | None) -> float:
    return (end - start) * 1000 if end is not None else float("nan")


async def _measure(setup: Setup) -> rp.GuardBench:
    bench = rp.GuardBench(tokens=setup.tokens, rate=setup.rate, delay_ms=setup.delay_ms)
    app = App(setup)
    try:
        for index in range(setup.warm_up):
            await app.round(-1 - index, None)
        for index in range(setup.rounds):
            bench.load_averages.append(setup.loadavg())
            await app.round(index, bench)
    finally:
        await app.close()
    return bench


def measure(setup: Setup) -> rp.GuardBench:
    return asyncio.run(_measure(setup))
