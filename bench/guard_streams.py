"""The guard row's app: one stream at a time through the real openai SDK, guarded or not.

bench/run.py's ``guard`` scenario calls :func:`measure` with ``beam serve`` running and
bench/stream_servers.py serving the paced provider and the delaying proxy. Each round runs
four units, in an order that rotates from round to round, each the stream unguarded
(``direct``: ``AsyncOpenAI`` straight to the provider), a pause, then one of:

- ``guard``: the same stream in ``async with beam.guard(...) as g:`` / ``g.openai(stream)``,
  Beam's gRPC port direct;
- ``guard_slow``: the same through a second client whose target is the delaying proxy;
- a lone CheckBalance on either path, *in place*: where a guard makes its own Check (the
  Check p50 the first-token target is measured against, in the same run);

then ``--guard-checks`` CheckBalance calls back to back on each path. Why both: on an idle
path every process an RPC wakes (the gRPC threads, Beam's event loop, Redis, PostgreSQL)
adds its wake-up latency, which a Check right after another never pays and a guard's Check,
after the app streamed for a third of a second, always does. One app, one event loop, one
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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg
import httpx
import redis.asyncio as aioredis
import report as rp
from beam_client import AsyncBeamClient
from openai import AsyncOpenAI

MODEL = "gpt-4"  # priced by the bench's price list
PROMPT_TOKENS = 25  # the guard's estimate and the provider's usage alike
MESSAGES = [{"role": "user", "content": "Count to a thousand."}]
PAUSE_SECONDS = 0.05  # between two runs: what one run left behind settles
WAKEUP_PAUSES = (0.0, PAUSE_SECONDS, 0.35)  # the app idle before a probe call (0: back to back)
WAKEUP_CALLS = 15
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
    redis_url: str = ""  # the stores beam serve uses: the wake-up probe pings them
    postgres_dsn: str = ""


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

    async def wakeup(self, bench: rp.GuardBench) -> None:
        """The same call back to back and after the app idled (WAKEUP_PAUSES), medians of
        WAKEUP_CALLS: what waking the processes of an idle path costs, store by store and
        through Beam (why a guard's Check is slower than Checks back to back)."""
        redis = aioredis.Redis.from_url(self.setup.redis_url)
        postgres = await asyncpg.connect(self.setup.postgres_dsn)
        beam = self.beam[rp.GUARD]
        customer = next(self.customers)
        probes: dict[str, Callable[[], Awaitable[object]]] = {
            "Redis PING": redis.ping,
            "PostgreSQL SELECT 1": lambda: postgres.fetchval("SELECT 1"),
            "Beam GetBalance (gRPC)": lambda: beam.get_balance(customer),
            "Beam CheckBalance (gRPC)": lambda: self.check(rp.GUARD),
        }
        try:
            for name, call in probes.items():
                for _ in range(3):
                    await call()
                for pause in WAKEUP_PAUSES:
                    values = []
                    for _ in range(WAKEUP_CALLS):
                        await asyncio.sleep(pause)
                        start = time.perf_counter()
                        await call()
                        values.append(_ms(start, time.perf_counter()))
                    bench.wakeup_ms.setdefault(name, {})[f"{pause * 1000:g}"] = values
        finally:
            await redis.aclose()
            await postgres.close()

    async def round(self, index: int, bench: rp.GuardBench | None) -> None:
        """Four units (the order rotates with ``index``): an unguarded stream, the pause, then
        a guarded stream or a lone Check on one path; then the Checks back to back."""
        units = [(rp.GUARD, True), (rp.GUARD_SLOW, True), (rp.GUARD, False),
                 (rp.GUARD_SLOW, False)]  # fmt: skip
        shift = index % len(units)
        runs = []
        in_place: dict[str, list[float]] = {rp.GUARD: [], rp.GUARD_SLOW: []}
        for path, stream in units[shift:] + units[:shift]:
            await asyncio.sleep(PAUSE_SECONDS)
            runs.append(await self.direct(index))
            await asyncio.sleep(PAUSE_SECONDS)
            if stream:
                runs.append(await self.guarded(path, index))
            else:
                in_place[path].append(await self.check(path))
        checks: dict[str, list[float]] = {rp.GUARD: [], rp.GUARD_SLOW: []}
        for _ in range(self.setup.checks_per_round):
            for kind in checks:
                checks[kind].append(await self.check(kind))
        self.setup.log(f"(guard round {index}) " + _summary(runs, checks, in_place))
        if bench is not None:
            bench.runs += runs
            for kind, values in checks.items():
                bench.check_ms.setdefault(kind, []).extend(values)
            for kind, values in in_place.items():
                bench.check_in_place_ms.setdefault(kind, []).extend(values)


def _summary(
    runs: Sequence[rp.StreamRun],
    checks: dict[str, list[float]],
    in_place: dict[str, list[float]],
) -> str:
    parts = [
        f"{r.kind}: first token {r.first_token_ms:.1f} ms, stream {r.stream_ms:.1f} ms, "
        f"{r.tokens} tokens" + (f", {r.rpcs} RPCs" if r.rpcs is not None else "")
        for r in runs
    ]
    parts += [f"Check {kind} in place {v[0]:.1f} ms" for kind, v in in_place.items() if v]
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
        if setup.redis_url and setup.postgres_dsn:
            await app.wakeup(bench)
    finally:
        await app.close()
    return bench


def measure(setup: Setup) -> rp.GuardBench:
    return asyncio.run(_measure(setup))
