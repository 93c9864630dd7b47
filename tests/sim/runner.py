"""Runs one schedule against the real stores and checks every invariant after every step.

Each call runs as its own asyncio task, with a hook on ``beam.core.faults`` points: the
step's fault (if any) cancels that task at its point (a client deadline), raises
``SimulatedCrash`` there (``kill -9``; the runner then restarts the "process": a new
Runtime and a reaper pass) or raises ``BeamError(STORE_UNAVAILABLE)`` there (a store call
failing); a stall pauses the call there while the runner moves the clock past its hold's
deadline and runs the reaper (``while_stalled``), then lets it go on. Work the core
finishes in the background after a cancellation is awaited before the next step. The
first violated invariant ends the schedule.

Invariants (numbered as in tests/sim/__init__.py):

1. PostgreSQL: a customer's balance is the sum of its ledger, its version the number of
   entries.
2. Redis's cached balance and version equal PostgreSQL's, except for a customer a fault
   left "dirty" (a cancelled or failed call): Redis may then lag, never lead, until the
   reaper has run (a failed call: the reaper after the settlement's grace period).
3. ``held`` is the sum of the holds, always; ``verify_integrity`` is ok after reaper and
   sync steps (dirty customers aside) and for everyone after quiescence.
4. A balance below zero is covered by recorded overage.
5. Every acknowledged settlement, credit and debit is in PostgreSQL, once, as answered.
6. A settled request id is never opened, charged or settled again; its only later entry
   is one adjustment (after an expiry); a Deduct on it never succeeds.
7. A call for one customer changes no other customer (tenants share customer and request
   ids), in either store.

A stalled call stays followed by the model: its resumed commit must be refused
(``STORE_UNAVAILABLE``, nothing charged) unless the ledger already has what it would
commit (a replay); the client's retry then settles once (``Model.finalize_stalled``).

Plus the model (``answer``, ``model``): every answer and every balance of a customer the
model is certain about is exactly what the rules predict.

Where the simulator is deliberately lenient (each one is the core's documented behaviour):

* A crash restart takes one quantum (5 min) of simulated time, so a settlement the dead
  process left half-done is past its 2 s repair grace when the restart's reaper runs.
* A reaper pass after a cancelled one may resume its SCAN mid-way; it is not held to
  reach every customer. A settling hold a pass abandons is recorded by the next pass.
* When the simulator fails a Check's settled-id lookup (a store error at
  ``check.opened``), the core may approve a settled id from Redis alone; that hold's
  consumption must then be charged once as its own ``...#<nonce>`` entry (checked at the
  end), and Deducts on it may succeed. Any other Check approved for a settled id, or
  Deduct that buys tokens for one, is a violation of invariant 6.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any

from beam import constants
from beam.core import faults
from beam.core.auth import Principal
from beam.core.commands import CheckCommand, DeductCommand, FinalizeCommand, LedgerCommand
from beam.core.runtime import Runtime
from beam.errors import BeamError, Reason
from beam.records import Customer, Role
from tests.sim.model import Mismatch, Model, Settled, Txn, cost_of, nonce_of, show
from tests.sim.steps import (
    HOLD_TTL_SECONDS,
    QUANTUM_MS,
    Fault,
    Schedule,
    Step,
)
from tests.sim.world import World, stop_runtime

OP_TIMEOUT_SECONDS = 60.0
DRAIN_TIMEOUT_SECONDS = 30.0
QUIESCE_PASSES = 4

Key = tuple[int, int]


# Per customer (5 keys: account, open, expiring, settling sets, hold-key prefix):
# {exists, balance, version, held, {{set, member, score, amount, consumed, status}, ...}}.
_OBSERVE_LUA = """
local out = {}
for i = 1, #KEYS, 5 do
  local a = redis.call('HMGET', KEYS[i], 'balance', 'version', 'held')
  local holds = {}
  for j, where in ipairs({'open', 'exp', 'stl'}) do
    local set = KEYS[i + j]
    if set ~= '' then
      local flat = redis.call('ZRANGE', set, 0, -1, 'WITHSCORES')
      for k = 1, #flat, 2 do
        local h = redis.call('HMGET', KEYS[i + 4] .. flat[k], 'amount', 'consumed', 'status')
        table.insert(holds, {where, flat[k], flat[k + 1], h[1] or '0', h[2] or '0', h[3] or ''})
      end
    end
  end
  table.insert(out, {redis.call('EXISTS', KEYS[i]), a[1] or '0', a[2] or '0', a[3] or '0',
    holds})
end
return out
"""


class Violation(Exception):
    def __init__(self, step: int, invariant: str, detail: str) -> None:
        super().__init__(f"step {step}: invariant {invariant}: {detail}")
        self.step = step
        self.invariant = invariant
        self.detail = detail


@dataclass
class Result:
    schedule: Schedule
    violation: Violation | None
    steps_run: int = 0
    bugs: frozenset[str] = frozenset()
    faults_fired: int = 0
    points: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    stats: Counter[str] = field(default_factory=Counter)  # calls by kind and answer

    @property
    def ok(self) -> bool:
        return self.violation is None

    def report(self) -> str:
        if self.violation is None:
            return f"seed {self.schedule.seed}: ok ({self.steps_run} steps)"
        v = self.violation
        where = "quiescence" if v.step >= len(self.schedule.steps) else f"step {v.step}"
        return (
            f"seed {self.schedule.seed}: VIOLATION of invariant {v.invariant} at {where}\n"
            f"  {v.detail}\n"
            f"schedule (replay: {self.schedule.replay_command(self.bugs)}):\n"
            f"{self.schedule.describe()}"
        )


# Which call of the step a task works for (tasks the core spawns inherit it), so the hook
# knows whose fault a point belongs to when several calls run at once.
_CALL: ContextVar[int] = ContextVar("sim_call", default=-1)


@dataclass
class _Hook:
    """The fault hook's state for the calls in flight."""

    faults: dict[int, Fault] = field(default_factory=dict)  # call -> its fault
    targets: dict[int, asyncio.Task[Any]] = field(default_factory=dict)
    counts: Counter[int] = field(default_factory=Counter)
    fired: set[int] = field(default_factory=set)
    dead: bool = False  # after a crash: the process is gone, nothing of it may run on
    points: Counter[str] = field(default_factory=Counter)
    stalled: asyncio.Event = field(default_factory=asyncio.Event)  # a call paused (stall)
    resume: asyncio.Event = field(default_factory=asyncio.Event)  # ... may go on

    def arm(self, faults_by_call: dict[int, Fault]) -> None:
        self.faults, self.targets = faults_by_call, {}
        self.counts, self.fired = Counter(), set()

    def save(self) -> tuple[Any, ...]:
        return self.faults, self.targets, self.counts, self.fired

    def restore(self, saved: tuple[Any, ...]) -> None:
        self.faults, self.targets, self.counts, self.fired = saved

    async def __call__(self, name: str) -> None:
        self.points[name] += 1
        if self.dead:
            raise faults.SimulatedCrash(name)
        call = _CALL.get()
        fault = self.faults.get(call)
        if fault is None or call in self.fired or name != fault.point:
            return
        self.counts[call] += 1
        if self.counts[call] < fault.nth:
            return
        self.fired.add(call)
        if fault.kind == "crash":
            self.dead = True
            raise faults.SimulatedCrash(name)
        if fault.kind == "error":
            raise BeamError(Reason.STORE_UNAVAILABLE, f"injected store failure at {name}")
        if fault.kind == "stall":
            self.stalled.set()
            await self.resume.wait()  # the runner runs the reaper meanwhile
            return
        self.targets[call].cancel()
        await asyncio.sleep(0)  # the cancellation lands here when this is the caller's task


@dataclass
class _Outcome:
    value: Any = None  # an answer or a BeamError
    cancelled: bool = False
    crashed: bool = False  # the process died before this call answered
    fired: bool = False  # this call's fault was injected

    @property
    def answered(self) -> bool:
        return not self.cancelled and not self.crashed and not isinstance(self.value, BeamError)


@dataclass
class _Call:
    """One call of a step: what runs, whom a fault would leave uncertain, and what to
    check once it answered (the model, the money oracles)."""

    step: Step
    work: Callable[[], Awaitable[Any]]
    affected: list[Key]
    conclude: Callable[[_Outcome], Awaitable[None]]


@dataclass
class _Pg:
    balance: int
    version: int
    overage: int
    lifetime: int
    ledger_sum: int
    entries: int
    last_version: int


@dataclass
class _Rd:
    exists: bool
    balance: int = 0
    version: int = 0
    held: int = 0
    # hold id -> (set, amount, consumed, status, score)
    holds: dict[str, tuple[str, int, int, str, float]] = field(default_factory=dict)


@dataclass
class _Obs:
    pg: dict[Key, _Pg]
    rd: dict[Key, _Rd]
    settled: dict[Key, dict[str, dict[str, Any]]]  # request rows
    bad_entries: list[str]


class Runner:
    def __init__(
        self,
        world: World,
        schedule: Schedule,
        bugs: frozenset[str] = frozenset(),
        trace: Callable[[str], object] | None = None,
    ):
        self.trace = trace
        self.world = world
        self.schedule = schedule
        self.bugs = bugs
        self.tenants = [f"sim{schedule.seed}t{i}" for i in range(schedule.tenants)]
        self.cids = [f"c{i}" for i in range(schedule.customers)]
        self.keys = [(t, c) for t in range(schedule.tenants) for c in range(schedule.customers)]
        self.model = Model(schedule.balances, ttl_ms=self._ttl_ms())
        self.hook = _Hook()
        self.rt: Runtime | None = None
        self.obs: _Obs | None = None
        # Customers whose Redis may lag PostgreSQL: key -> (kind, model time of the fault)
        self.dirty: dict[Key, tuple[str, int]] = {}
        self.index = -1
        self.stats: Counter[str] = Counter()
        self.faults_fired = 0
        self.fired_in_step = False
        self.recovered_in_step = False
        self.reaper_cut = False  # the last reaper pass was cancelled half-way
        # Tasks that ran before this schedule (other tests' in a shared event loop): not
        # this schedule's work, never drained nor cancelled by it.
        self.outside: set[asyncio.Task[Any]] = set()
        # Holds opened for a settled id while the settled-id lookup failed:
        # (tenant, customer, nonce) -> request id. Their consumption must be charged alone.
        self.degraded: dict[tuple[int, int, str], str] = {}
        # What Finalizes carrying such a hold's token reported it cost (the provider's
        # usage wins over what its Deducts consumed, as for any hold).
        self.degraded_reported: dict[tuple[int, int, str], set[int]] = {}

    @staticmethod
    def _ttl_ms() -> int:
        return HOLD_TTL_SECONDS * 1000

    def principal(self, t: int) -> Principal:
        return Principal(self.tenants[t], Role.ADMIN, "sim", frozenset())

    def fail(self, invariant: str, detail: str) -> Violation:
        return Violation(self.index, invariant, detail)

    # -- the schedule ---------------------------------------------------------------------

    async def run(self) -> Result:
        started = time.monotonic()
        violation: Violation | None = None
        steps_run = 0
        self.outside = set(asyncio.all_tasks())
        try:
            await self.setup()
            for index, step in enumerate(self.schedule.steps):
                self.index = index
                self.fired_in_step = self.recovered_in_step = False
                await self.execute(step)
                steps_run += 1
                await self.check(step)
            self.index = len(self.schedule.steps)
            await self.quiesce()
        except Violation as found:
            violation = found
        except Mismatch as mismatch:
            violation = Violation(self.index, mismatch.invariant, mismatch.detail)
        finally:
            await self.teardown()
        return Result(
            self.schedule,
            violation,
            steps_run,
            self.bugs,
            self.faults_fired,
            self.hook.points,
            time.monotonic() - started,
            self.stats,
        )

    async def setup(self) -> None:
        faults.reset()
        restarts = any(step.kind == "redis_restart" for step in self.schedule.steps)
        await self.world.wipe(self.tenants, snapshot=restarts)
        faults.set_bugs(set(self.bugs))
        faults.install(self.hook)
        self.rt = await self.world.runtime()
        for t, tenant in enumerate(self.tenants):
            for c, cid in enumerate(self.cids):
                await self.rt.admin.create_customer(
                    self.principal(t),
                    Customer(tenant, cid, cid),
                    self.schedule.balances[t][c],
                )
        self.obs = await self.observe()
        self.check_stores(None, self.obs)

    async def teardown(self) -> None:
        await self._drain(self.outside)
        await stop_runtime(self.rt)
        self.rt = None
        faults.reset()

    # -- one step -------------------------------------------------------------------------

    async def execute(self, step: Step) -> None:
        handler = getattr(self, f"_{step.kind}")
        await handler(step)

    async def call(
        self, step: Step, work: Callable[[], Awaitable[Any]], affected: list[Key] | None = None
    ) -> _Outcome:
        async def nothing(_: _Outcome) -> None:
            return None

        (outcome,) = await self.run_calls([_Call(step, work, affected or [], nothing)])
        return outcome

    async def run_calls(self, calls: list[_Call]) -> list[_Outcome]:
        """Run the calls at once, each as its own task with its fault armed; wait for
        whatever they left running (a settlement the core finishes after a cancellation).
        A fired fault leaves its call's ``affected`` customers uncertain (and dirty); a
        crash kills every call still in flight (none of them answered) and restarts."""
        before = set(asyncio.all_tasks())
        hook = self.hook
        hook.arm({i: c.step.fault for i, c in enumerate(calls) if c.step.fault is not None})
        finished_alive: set[int] = set()  # answered before any crash

        async def run(i: int, work: Callable[[], Awaitable[Any]]) -> Any:
            _CALL.set(i)
            return await work()

        def finished(i: int) -> Callable[[asyncio.Task[Any]], None]:
            def done(_: asyncio.Task[Any]) -> None:
                if not hook.dead:
                    finished_alive.add(i)

            return done

        stall = [c.step for c in calls if c.step.fault is not None and c.step.fault.kind == "stall"]
        if stall and len(calls) > 1:
            raise self.fail("internal error", "a stall pauses one call alone, not a burst")
        if stall:  # (the calls run while a call is paused have none)
            hook.stalled, hook.resume = asyncio.Event(), asyncio.Event()
        tasks: list[asyncio.Task[Any]] = []
        for i, c in enumerate(calls):
            task = asyncio.create_task(run(i, c.work), name=f"sim-{self.index}-{i}")
            task.add_done_callback(finished(i))
            hook.targets[i] = task
            tasks.append(task)
        try:
            if stall:
                await self.while_stalled(stall[0], tasks[0])
            _, pending = await asyncio.wait(tasks, timeout=OP_TIMEOUT_SECONDS)
            if pending:
                for task in pending:
                    task.cancel()
                kinds = [calls[tasks.index(t)].step.kind for t in pending]
                raise self.fail("liveness", f"{kinds} did not answer in {OP_TIMEOUT_SECONDS}s")
        finally:
            if stall:
                hook.resume.set()  # never leave a paused call behind (a violation mid-stall)
            fired = set(hook.fired)
            hook.arm({})
        crashed = hook.dead
        outcomes = []
        for i, (c, task) in enumerate(zip(calls, tasks, strict=True)):
            outcome = _Outcome(fired=i in fired)
            if self.trace is not None:
                self.trace(self._traced(c.step, task, outcome.fired))
            if task.cancelled():
                outcome.cancelled = True
            else:
                error = task.exception()
                # Answered after the process died: the answer never reached the client (the
                # value is kept: what the call did is still evidence for the journal).
                outcome.crashed = crashed and i not in finished_alive
                if isinstance(error, faults.SimulatedCrash):
                    outcome.crashed = True
                elif isinstance(error, BeamError):
                    outcome.value = error
                elif error is not None:
                    raise self.fail(
                        "internal error", f"{c.step.kind} raised {type(error).__name__}: {error}"
                    ) from error
                else:
                    outcome.value = task.result()
            if outcome.cancelled and not outcome.fired:
                raise self.fail("internal error", f"{c.step.kind} was cancelled by nobody")
            self.stats[f"{c.step.kind} {self._category(outcome)}"] += 1
            outcomes.append(outcome)
        self.faults_fired += len(fired)
        self.fired_in_step |= bool(fired)
        for i, (c, outcome) in enumerate(zip(calls, outcomes, strict=True)):
            if crashed and not (outcome.answered and i in finished_alive):
                self.after_fault(c.affected, "crash")
            elif outcome.fired:
                fault = c.step.fault
                assert fault is not None
                if fault.kind != "stall":  # the model follows a stall (it is refused)
                    self.after_fault(c.affected, fault.kind)
        await self._drain(before)
        for call, outcome in zip(calls, outcomes, strict=True):
            await call.conclude(outcome)  # before a restart: it happened before the crash
        if crashed:
            await self.restart_after_crash()
        return outcomes

    @staticmethod
    def _category(outcome: _Outcome) -> str:
        """What kind of answer a call got (the soak's coverage report)."""
        value = outcome.value
        if outcome.crashed:
            return "crashed"
        if outcome.cancelled:
            return "cancelled"
        if isinstance(value, BeamError):
            return value.reason.value
        for name in ("approved", "success"):
            if hasattr(value, name):
                ok = getattr(value, name)
                code = getattr(value, "rejection_reason", "") or getattr(value, "error_code", "")
                replay = " replayed" if getattr(value, "replayed", False) else ""
                return ("ok" if ok else f"refused {code}") + replay
        if getattr(value, "replayed", False):
            return "ok replayed"
        return "ok"

    def _traced(self, step: Step, task: asyncio.Task[Any], fired: bool) -> str:
        if task.cancelled():
            what = "cancelled"
        elif task.exception() is not None:
            error = task.exception()
            what = show(error) if isinstance(error, BeamError) else type(error).__name__
        else:
            what = repr(task.result())
        fault = (
            f" [{step.fault.describe()} {'FIRED' if fired else 'not reached'}]"
            if (step.fault)
            else ""
        )
        who = f" t{step.tenant}/c{step.customer}" if step.customer >= 0 else ""
        return f"  {self.index:3d} {step.kind}{who}{fault} -> {what}"

    async def _drain(self, before: set[asyncio.Task[Any]]) -> None:
        current = asyncio.current_task()
        left = [t for t in asyncio.all_tasks() if t not in before and t is not current]
        left = [t for t in left if not t.done()]
        if not left:
            return
        if self.hook.dead:
            for task in left:
                task.cancel()
        _, pending = await asyncio.wait(left, timeout=DRAIN_TIMEOUT_SECONDS)
        if pending and not self.hook.dead:
            names = sorted(f"{t.get_name()} {t.get_coro().__qualname__}" for t in pending)
            raise self.fail("liveness", f"background work still running: {names}")

    def after_fault(self, keys: list[Key], kind: str) -> None:
        """A call was cut short: these customers' state is unknown until re-anchored, and
        (unless a restart repairs them) their Redis may lag until the reaper has run."""
        for key in keys:
            self.model.mark_uncertain(key)
            if kind == "crash":
                continue  # the restart repairs
            if kind == "cancel" and self.dirty.get(key, ("",))[0] == "error":
                continue  # an earlier failure's repair is still due: keep its rule
            self.dirty[key] = (kind, self.model.now)  # a later failure restarts the clock

    # -- recovery after a crash -----------------------------------------------------------

    async def restart_after_crash(self) -> None:
        """kill -9 of the service process, then a restart: a new Runtime and a reaper pass.
        The restart takes a while (one quantum of simulated time): settlements the dead
        process left half-done are past their grace period by then."""
        await stop_runtime(self.rt)
        self.rt = None
        self.hook.dead = False
        self.advance(QUANTUM_MS)
        try:
            self.rt = await self.world.runtime()
            for _ in range(2):
                await self.rt.reaper.run_once()
        except BeamError as error:
            raise self.fail("recovery", f"restart after a crash failed: {show(error)}") from error
        await self.model_reaped()
        self.dirty.clear()
        self.recovered_in_step = True
        self.reaper_cut = False

    def advance(self, ms: int) -> None:
        faults.advance(ms)
        self.model.now += ms

    # -- steps ----------------------------------------------------------------------------

    def token(self, t: int, c: int, rid: str, source: str) -> str:
        issued = self.model.tokens
        mine = issued.get((t, c, rid), [])
        if source == "none":
            return ""
        if source == "current" and mine:
            return mine[-1]
        if source == "stale" and mine:
            return mine[-2] if len(mine) > 1 else mine[-1]
        if source in ("other", "stale", "current"):
            for (ot, oc, orid), tokens in sorted(issued.items()):
                if orid == rid and (ot, oc) != (t, c) and tokens:
                    return tokens[-1]  # another tenant's (or customer's) token, same id
        return "v1.AAAAAAAAAAAAAAAA.forged"

    async def customer_step(self, step: Step) -> None:
        """One customer's call, and (after a cancel or an error) the client's retry."""
        for attempt in self.attempts(step):
            await self.run_calls([self.prepare(attempt)])
        await self.after_customer_step(step)

    async def after_customer_step(self, step: Step) -> None:
        txid = step.args.get("txid") if step.kind in ("credit", "debit") else None
        if txid and self.uncertain(step.tenant, step.customer):
            await self.resolve_txid(step.tenant, txid)

    async def _burst(self, step: Step) -> None:
        """Calls for distinct customers at once: they share the Redis connection pool and
        PostgreSQL's group commit; each customer's outcome must be what it is alone."""
        await self.run_calls([self.prepare(sub) for sub in step.subs])
        for sub in step.subs:
            await self.after_customer_step(sub)

    _check = _deduct = _finalize = _credit = _debit = _balance = customer_step

    def prepare(self, step: Step) -> _Call:
        return getattr(self, f"prepare_{step.kind}")(step)  # type: ignore[no-any-return]

    def prepare_check(self, step: Step) -> _Call:
        t, c, a = step.tenant, step.customer, step.args
        rid = a["rid"]
        command = CheckCommand(
            customer_id=self.cids[c],
            request_id=rid,
            estimated_grains=a["est"],
            buffer_multiplier=a["mult"],
            model=a["model"],
            max_tokens=a["max_tokens"],
            prompt_tokens=a["prompt"],
            min_completion_tokens=a.get("min", 0),
        )
        settled_before = rid in self.settled_ids(t, c)

        async def conclude(outcome: _Outcome) -> None:
            value = outcome.value
            approved = outcome.answered and value.approved
            if outcome.fired or outcome.crashed or approved:
                self.model.journal[t, c].held.add(rid)
            tokens = self.model.tokens.setdefault((t, c, rid), [])
            degraded = (
                outcome.fired
                and step.fault is not None
                and (step.fault.kind, step.fault.point) == ("error", faults.CHECK_OPENED)
            )
            if approved and settled_before and value.request_token not in tokens and degraded:
                # The settled-id lookup failed (a store error injected there) and the core
                # chose to go on from Redis: tolerated only if whatever this hold consumes
                # is charged on its own (checked at quiescence: ``degraded_holds``).
                self.degraded[t, c, nonce_of(value.request_token)] = rid
                self.stats["check degraded approval of a settled id"] += 1
            elif approved and settled_before and value.request_token not in tokens:
                raise self.fail(
                    "6 settled id reused",
                    f"Check {rid}: the id was settled (PostgreSQL) and a new hold was "
                    f"opened: {show(value)}",
                )
            if not outcome.fired and not outcome.crashed and not self.uncertain(t, c):
                self.model.check(t, c, a, value)
            if approved and value.request_token not in tokens:
                tokens.append(value.request_token)

        return _Call(step, lambda: self.live.ledger.check(self.p(t), command), [(t, c)], conclude)

    def prepare_deduct(self, step: Step) -> _Call:
        t, c, a = step.tenant, step.customer, step.args
        token = self.token(t, c, a["rid"], a["token"])
        command = DeductCommand(
            customer_id=self.cids[c],
            request_id=a["rid"],
            request_token=token,
            tokens_consumed=a["tokens"],
            model=a["model"],
            is_completion=a["kind"] == "out",
            sequence_number=a["seq"],
            is_cached_prompt=a["kind"] == "cached",
            reserve_ahead_tokens=a.get("ahead", 0),
            prompt_tokens=a.get("prompt_in", 0),
            cached_prompt_tokens=a.get("prompt_cached", 0),
        )
        settled_before = a["rid"] in self.settled_ids(t, c)
        journal = self.model.journal[t, c]
        # A repeated sequence number answers the stored outcome and charges nothing.
        replay = a["seq"] > 0 and a["seq"] in journal.sequences.get(a["rid"], set())

        async def conclude(outcome: _Outcome) -> None:
            value = outcome.value
            if value is not None and not isinstance(value, BeamError):
                journal.consumed[a["rid"]] = max(
                    journal.consumed.get(a["rid"], 0), value.consumed_grains
                )
                by_hold = journal.consumed_by
                by_hold[nonce_of(token)] = max(
                    by_hold.get(nonce_of(token), 0), value.consumed_grains
                )
                if a["seq"]:
                    journal.sequences.setdefault(a["rid"], set()).add(a["seq"])
                degraded = (t, c, nonce_of(token)) in self.degraded
                if settled_before and value.success and outcome.answered and not replay:
                    if degraded:
                        self.stats["deduct on a degraded hold"] += 1
                        return
                    raise self.fail(
                        "6 settled id reused",
                        f"Deduct {a['rid']}: the id was settled (PostgreSQL) and the Deduct "
                        f"bought tokens: {show(value)}",
                    )
            if not outcome.crashed and not self.uncertain(t, c):
                self.model.deduct(t, c, a, token, value)

        return _Call(step, lambda: self.live.ledger.deduct(self.p(t), command), [(t, c)], conclude)

    def prepare_finalize(self, step: Step) -> _Call:
        t, c, a = step.tenant, step.customer, step.args
        token = self.token(t, c, a["rid"], a["token"])
        command = FinalizeCommand(
            customer_id=self.cids[c],
            request_id=a["rid"],
            status=a["status"],
            actual_prompt_tokens=a["prompt"],
            actual_completion_tokens=a["completion"],
            total_actual_cost_grains=a["cost"],
            model=a["model"],
            request_token=token,
            let_through=a.get("let_through", False),
        )
        self.model.journal[t, c].finalized.add(a["rid"])
        if command.let_through:
            self.model.journal[t, c].let_through.add(a["rid"])
        if token and (t, c, nonce_of(token)) in self.degraded:
            model = a["model"] or "cheap"  # a degraded hold of the sim always has prices
            reported = a["cost"] or (
                cost_of(model, a["prompt"], a["completion"], 0)
                if a["prompt"] or a["completion"]
                else 0
            )
            if reported:
                self.degraded_reported.setdefault((t, c, nonce_of(token)), set()).add(reported)
        # The hold nonce its settlement would name (a stall before it is recorded).
        hold = self.model.custs[t, c].holds.get(a["rid"])
        nonce = nonce_of(hold.token) if hold is not None else nonce_of(token) if token else ""
        stall = step.fault.point if step.fault and step.fault.kind == "stall" else None

        async def conclude(outcome: _Outcome) -> None:
            if outcome.fired and stall and not outcome.crashed and not self.uncertain(t, c):
                self.model.finalize_stalled(
                    t, c, a, token, outcome.value, nonce if stall == faults.FINALIZE_BEGUN else None
                )
            elif not outcome.fired and not outcome.crashed and not self.uncertain(t, c):
                self.model.finalize(t, c, a, token, outcome.value)
            if outcome.answered:
                await self.acknowledged_settlement(t, c, a["rid"], outcome.value)

        return _Call(
            step, lambda: self.live.ledger.finalize(self.p(t), command), [(t, c)], conclude
        )

    def prepare_credit(self, step: Step) -> _Call:
        return self.prepare_entry(step, "credit")

    def prepare_debit(self, step: Step) -> _Call:
        return self.prepare_entry(step, "debit")

    def prepare_entry(self, step: Step, kind: str) -> _Call:
        t, c, a = step.tenant, step.customer, step.args
        command = LedgerCommand(
            customer_id=self.cids[c],
            amount_grains=a["amount"],
            description=f"sim {kind}",
            transaction_id=a["txid"],
        )
        journal = self.model.journal[t, c]
        (journal.credits if kind == "credit" else journal.debits).add((a["txid"], a["amount"]))

        async def work() -> Any:
            admin = self.live.admin
            call = admin.credit if kind == "credit" else admin.debit
            return await call(self.p(t), command)

        stall = step.fault is not None and step.fault.kind == "stall"

        async def conclude(outcome: _Outcome) -> None:
            if outcome.fired and stall and not outcome.crashed and not self.uncertain(t, c):
                self.model.entry_stalled(t, c, kind, a, outcome.value)
            elif not outcome.fired and not outcome.crashed and not self.uncertain(t, c):
                self.model.entry(t, c, kind, a, outcome.value)
            if outcome.answered:
                await self.acknowledged_entry(t, c, kind, a, outcome.value)

        return _Call(step, work, [(t, c)], conclude)

    def prepare_balance(self, step: Step) -> _Call:
        t, c = step.tenant, step.customer

        async def conclude(outcome: _Outcome) -> None:
            if not outcome.crashed and not self.uncertain(t, c):
                self.model.balance(t, c, outcome.value)

        return _Call(
            step, lambda: self.live.ledger.balance(self.p(t), self.cids[c]), [(t, c)], conclude
        )

    async def resolve_txid(self, t: int, txid: str) -> None:
        """Transaction ids are unique per tenant, so the model of every customer of the
        tenant needs to know whether a call it could not follow committed this one: the
        ledger says."""
        pg = self.world.pg
        assert pg is not None
        row = await pg.fetchrow(
            """SELECT customer_id, transaction_type, amount_grains, balance_after_grains,
                      balance_version FROM transactions
               WHERE tenant = $1 AND transaction_id = $2""",
            self.tenants[t],
            txid,
        )
        if row is not None:
            self.model.txns[t][txid] = Txn(
                self.cids.index(row["customer_id"]), row["transaction_type"],
                row["amount_grains"], row["balance_after_grains"], row["balance_version"],
            )  # fmt: skip

    async def _advance(self, step: Step) -> None:
        self.advance(step.args["ms"])

    # -- a call stalled past its hold's deadline ------------------------------------------

    async def while_stalled(self, step: Step, task: asyncio.Task[Any]) -> None:
        """The call paused where its settlement reserved and has not committed: the clock
        passes its hold's deadline (read from Redis: 2 min for a claim or a debit, the
        hold's TTL for a request hold), the reaper runs (it must fence and abandon the
        hold), maybe the client's retry runs, every invariant is checked, and the call
        resumes (``run_calls`` waits for it: its commit must be refused)."""
        hook = self.hook
        fault = step.fault
        assert fault is not None
        waiter = asyncio.ensure_future(hook.stalled.wait())
        try:
            await asyncio.wait(
                [task, waiter], timeout=OP_TIMEOUT_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiter.cancel()
        if not hook.stalled.is_set():
            return  # the call never reached the point (or is stuck: run_calls reports it)
        saved = hook.save()
        hook.arm({})
        try:
            await self._stall(step, fault)
        finally:
            hook.restore(saved)
        hook.resume.set()
        await asyncio.wait([task], timeout=OP_TIMEOUT_SECONDS)
        if task.done():
            outcome = _Outcome(fired=True, cancelled=task.cancelled())
            if not task.cancelled():
                outcome.value = task.exception() or task.result()
            self.stats[f"{step.kind} resumed past its deadline: {self._category(outcome)}"] += 1

    async def _stall(self, step: Step, fault: Fault) -> None:
        key = (step.tenant, step.customer)
        name = self.names([key])[0]
        obs = await self.observe()
        settling = {h: v for h, v in obs.rd[key].holds.items() if v[0] == "stl"}
        if obs.rd[key].exists and not settling:
            raise self.fail(
                "2 reserve first",
                f"{step.kind} of {name} paused at {fault.point}, about to commit, and no "
                f"settling hold reserves it (holds: {sorted(obs.rd[key].holds)})",
            )
        self.stats[f"stall at {fault.point}"] += 1
        if fault.during == "sync":  # SyncAll while the hold reserves the charge
            await self.stall_sync(step, settling=True)
        deadline = max((v[4] for v in settling.values()), default=faults.now_ms())
        quanta = max(1, -(-(int(deadline) - faults.now_ms() + 1) // QUANTUM_MS))
        self.advance(quanta * QUANTUM_MS)
        rid = step.args.get("rid", "")
        # A request hold the Finalize took over: the first pass abandons it (back to
        # expiring), the next one records its expiry.
        abandoning = frozenset({(*key, rid)}) if rid in self.model.custs[key].holds else frozenset()
        # After a cancelled pass, the next one may only finish that pass's SCAN (and reach
        # nobody): one more pass, so that the paused call's hold is reached.
        first = 1 if self.reaper_cut else 0
        for n in range(max(1, fault.reaps) + first):
            self.obs = await self.observe()
            await self._reaper(Step("reaper"), abandoning if n == first else frozenset())
        obs = await self.observe()
        late = [
            h for h, v in obs.rd[key].holds.items() if v[0] == "stl" and v[4] <= faults.now_ms()
        ]
        if late and key not in self.dirty:
            raise self.fail(
                "3 reaper",
                f"{name}: settling holds {late} past their deadline after a reaper pass",
            )
        if fault.during == "retry":
            await self.run_calls([self.prepare(replace(step, fault=None))])
        if fault.during == "sync":  # ... and after the reaper abandoned the hold
            await self.stall_sync(step)
        self.obs = obs = await self.observe()  # the step's own changes are checked from here
        self.check_stores(None, obs)
        await self.check_model(obs)
        await self.check_integrity()

    async def stall_sync(self, step: Step, *, settling: bool = False) -> None:
        """A resync while a call is paused; the model knows no settling hold (it grew to
        the charge): while one reserves, only the stores' invariants are checked."""
        await self._sync(Step("sync", step.tenant))
        obs = await self.observe()
        self.check_stores(None, obs)
        if not settling:
            await self.check_model(obs)

    async def _reaper(
        self, step: Step, abandoning: frozenset[tuple[int, int, str]] = frozenset()
    ) -> None:
        now = faults.now_ms()
        with_holds = [k for k in self.keys if self.has_holds(k)]
        resumed = self.reaper_cut
        if resumed:
            # The pass before was cut short; this one may resume its SCAN where it stopped
            # (so it need not reach every customer): the model cannot say whom it reaps.
            for key in with_holds:
                self.model.mark_uncertain(key)
        injected = step.fault is not None and step.fault.kind == "error"
        outcome = await self.call(
            step, lambda: self.live.reaper.run_once(), [] if injected else with_holds
        )
        self.reaper_cut = outcome.fired and outcome.cancelled
        if outcome.fired and not injected:
            return  # cancelled or crashed: its customers are uncertain (and dirty) now
        if not outcome.answered:
            raise self.fail(
                "3 reaper",
                f"a reaper pass failed as a whole: {show(outcome.value)} (one hold's "
                "failure must not stop the pass for the other customers)",
            )
        if resumed:
            return
        assert self.obs is not None
        settling = {  # abandoned by this pass (past their deadline): the next one records them
            k: {h for h, (where, *_) in self.obs.rd[k].holds.items() if where == "stl"}
            for k in self.keys
        }
        obs = await self.observe()
        left = [k for k in self.keys if self.overdue(obs.rd[k], now, settling[k])]
        if outcome.fired:  # one hold failed: only its customer may have holds left over
            if len(left) > 1:
                raise self.fail(
                    "3 reaper",
                    f"one failing hold left overdue holds of {len(left)} customers "
                    f"{self.names(left)}: the pass stopped for the others",
                )
            self.after_fault(left, "cancel")  # its expiry may be committed, not released
        for key in list(self.dirty):
            kind, since = self.dirty[key]
            if kind == "cancel" or self.model.now - since >= QUANTUM_MS:
                del self.dirty[key]
        if outcome.fired:
            for key in left:
                self.dirty.setdefault(key, ("cancel", self.model.now))
        await self.model_reaped(abandoning)
        still = [
            k
            for k in self.keys
            if k not in self.dirty and self.overdue(obs.rd[k], now, settling[k])
        ]
        if still:
            raise self.fail(
                "3 reaper", f"overdue holds left after a reaper pass: {self.names(still)}"
            )

    async def _expire_done(self, step: Step) -> None:
        """The done markers' 24 h TTL passes (for one customer, or everyone)."""
        keys = [(step.tenant, step.customer)] if step.customer >= 0 else self.keys
        rd = self.world.rd
        assert rd is not None
        for t, c in keys:
            pattern = constants.done_key(self.tenants[t], self.cids[c], "*")
            async for key in rd.scan_iter(match=pattern, count=500):
                await rd.delete(key)

    async def _sync(self, step: Step) -> None:
        tenant = self.tenants[step.tenant] if step.tenant >= 0 else None
        outcome = await self.call(step, lambda: self.live.admin.sync_tenant(tenant))
        if isinstance(outcome.value, BeamError):
            raise self.fail("internal error", f"sync failed: {show(outcome.value)}")

    async def _snapshot(self, step: Step) -> None:
        await self.world.redis_snapshot()

    async def _redis_restart(self, step: Step) -> None:
        """Redis dies and comes back from its last snapshot: every later write is lost.
        The service restarts too; at start-up it must notice and resync from PostgreSQL."""
        await stop_runtime(self.rt)
        self.rt = None
        await self.world.redis_restart()
        await self.restart_runtime()
        for key in self.keys:
            self.model.mark_uncertain(key)
        self.dirty.clear()
        await self.degraded_after_restart()

    async def degraded_after_restart(self) -> None:
        """Follow what Redis really kept: a hold opened for a settled id (its lookup failed)
        that the snapshot predates is gone with its consumption, like any open hold on
        Redis data loss (docs/ARCHITECTURE.md); one that survived is expected to be charged
        the consumption Redis kept (later Deducts may add to it)."""
        rd = self.world.rd
        assert rd is not None
        for (t, c, nonce), rid in list(self.degraded.items()):
            key = constants.hold_key(self.tenants[t], self.cids[c], rid)
            kept, consumed = await rd.hmget(key, "nonce", "consumed")
            if kept != nonce:  # the simulator's client decodes replies
                del self.degraded[t, c, nonce]
                self.stats["degraded hold lost in a redis restart"] += 1
                continue
            self.model.journal[t, c].consumed_by[nonce] = int(consumed or 0)

    async def _pg_restart(self, step: Step) -> None:
        await stop_runtime(self.rt)
        self.rt = None
        await self.world.postgres_restart()
        await self.restart_runtime()

    async def restart_runtime(self) -> None:
        try:
            self.rt = await self.world.runtime()
        except BeamError as error:
            raise self.fail("recovery", f"a new Runtime failed: {show(error)}") from error

    def attempts(self, step: Step) -> list[Step]:
        """The call, and (after a cancel or an error that the client sees) its retry."""
        if step.fault is None or not step.fault.retry:
            return [step]
        return [step, Step(step.kind, step.tenant, step.customer, step.args)]

    # -- helpers --------------------------------------------------------------------------

    @property
    def live(self) -> Runtime:
        assert self.rt is not None
        return self.rt

    def p(self, t: int) -> Principal:
        return self.principal(t)

    def uncertain(self, t: int, c: int) -> bool:
        return not self.model.custs[t, c].certain

    def names(self, keys: list[Key]) -> list[str]:
        return [f"{self.tenants[t]}/{self.cids[c]}" for t, c in keys]

    def settled_ids(self, t: int, c: int) -> set[str]:
        assert self.obs is not None
        return set(self.obs.settled.get((t, c), {}))

    def has_holds(self, key: Key) -> bool:
        assert self.obs is not None
        return bool(self.obs.rd[key].holds) or bool(self.model.custs[key].holds)

    @staticmethod
    def overdue(rd: _Rd, now: int, exempt: set[str] | None = None) -> bool:
        return any(
            (where == "exp" or (where == "open" and score <= now)) and hold not in (exempt or ())
            for hold, (where, _, _, _, score) in rd.holds.items()
        )

    async def model_reaped(self, abandoning: frozenset[tuple[int, int, str]] = frozenset()) -> None:
        """Apply a reaper pass to the model, then learn the order the reaper settled in
        (each expiry's balance and version) from PostgreSQL."""
        touched = self.model.reap(abandoning)
        if not touched:
            return
        settled = await self.request_rows()
        for key in touched:
            cust = self.model.custs[key]
            for rid, info in cust.settled.items():
                row = settled.get(key, {}).get(rid)
                if info.balance_after is None and row is not None:
                    info.balance_after = row["balance_after_grains"]
                    info.version = row["balance_version"]

    # -- acknowledged money must be in the ledger (invariant 5) ---------------------------

    async def acknowledged_settlement(self, t: int, c: int, rid: str, answer: Any) -> None:
        pg = self.world.pg
        assert pg is not None
        row = await pg.fetchrow(
            """SELECT status, actual_cost_grains FROM requests
               WHERE tenant = $1 AND customer_id = $2 AND request_id = $3""",
            self.tenants[t],
            self.cids[c],
            rid,
        )
        where = f"Finalize {rid} acknowledged (charged {answer.charged_grains})"
        if row is None:
            raise self.fail("5 exactly once", f"{where}: no settlement in PostgreSQL")
        if row["actual_cost_grains"] == answer.charged_grains:
            return
        adjusted = await pg.fetchval(
            """SELECT sum(amount_grains) FROM transactions WHERE tenant = $1
               AND customer_id = $2 AND transaction_id = $3""",
            self.tenants[t],
            self.cids[c],
            f"adjustment:{self.cids[c]}:{rid}",
        )
        expected = -(answer.charged_grains - row["actual_cost_grains"])
        if row["status"] != "expired" or adjusted != expected:
            raise self.fail(
                "5 exactly once",
                f"{where}: PostgreSQL charged {row['actual_cost_grains']} "
                f"({row['status']}) with adjustment {adjusted}",
            )

    async def acknowledged_entry(
        self, t: int, c: int, kind: str, a: dict[str, Any], answer: Any
    ) -> None:
        pg = self.world.pg
        assert pg is not None
        rows = await pg.fetch(
            """SELECT customer_id, transaction_type, amount_grains FROM transactions
               WHERE tenant = $1 AND transaction_id = $2""",
            self.tenants[t],
            answer.transaction_id,
        )
        signed = a["amount"] if kind == "credit" else -a["amount"]
        got = [(r["customer_id"], r["transaction_type"], r["amount_grains"]) for r in rows]
        if got != [(self.cids[c], kind, signed)]:
            raise self.fail(
                "5 exactly once",
                f"{kind} {answer.transaction_id} of {signed} acknowledged; PostgreSQL has {got}",
            )

    # -- observing the stores -------------------------------------------------------------

    async def request_rows(self) -> dict[Key, dict[str, dict[str, Any]]]:
        pg = self.world.pg
        assert pg is not None
        rows = await pg.fetch("SELECT * FROM requests WHERE tenant = ANY($1::text[])", self.tenants)
        out: dict[Key, dict[str, dict[str, Any]]] = {}
        for r in rows:
            key = (self.tenants.index(r["tenant"]), self.cids.index(r["customer_id"]))
            out.setdefault(key, {})[r["request_id"]] = dict(r)
        return out

    async def observe(self) -> _Obs:
        pg, rd = self.world.pg, self.world.rd
        assert pg is not None
        assert rd is not None
        rows = await pg.fetch(
            """SELECT c.tenant, c.customer_id, c.current_balance_grains, c.balance_version,
                      c.overage_grains, c.lifetime_spent_grains,
                      COALESCE(SUM(t.amount_grains), 0)::bigint AS ledger_sum,
                      COUNT(t.id)::bigint AS entries,
                      COALESCE(MAX(t.balance_version), 0)::bigint AS last_version
               FROM customers c LEFT JOIN transactions t
                 ON t.tenant = c.tenant AND t.customer_id = c.customer_id
               WHERE c.tenant = ANY($1::text[])
               GROUP BY c.tenant, c.customer_id""",
            self.tenants,
        )
        pgs: dict[Key, _Pg] = {}
        for r in rows:
            key = (self.tenants.index(r["tenant"]), self.cids.index(r["customer_id"]))
            pgs[key] = _Pg(
                r["current_balance_grains"], r["balance_version"], r["overage_grains"],
                r["lifetime_spent_grains"], r["ledger_sum"], r["entries"], r["last_version"],
            )  # fmt: skip
        # A request id with two settling entries, or an adjustment without an expiry.
        bad = await pg.fetch(
            """SELECT tenant, customer_id, reference_id,
                      count(*) FILTER (WHERE transaction_type IN ('settlement', 'expiry')
                                       AND transaction_id NOT LIKE '%#%') AS settles,
                      count(*) FILTER (WHERE transaction_type = 'adjustment') AS adjusts,
                      count(*) FILTER (WHERE transaction_type = 'expiry'
                                       AND transaction_id NOT LIKE '%#%') AS expiries
               FROM transactions
               WHERE tenant = ANY($1::text[]) AND reference_id IS NOT NULL
               GROUP BY tenant, customer_id, reference_id
               HAVING count(*) FILTER (WHERE transaction_type IN ('settlement', 'expiry')
                                       AND transaction_id NOT LIKE '%#%') > 1
                   OR count(*) FILTER (WHERE transaction_type = 'adjustment') >
                      count(*) FILTER (WHERE transaction_type = 'expiry'
                                       AND transaction_id NOT LIKE '%#%')""",
            self.tenants,
        )
        bad_entries = [
            f"{r['tenant']}/{r['customer_id']} request {r['reference_id']}: "
            f"{r['settles']} settlements, {r['adjusts']} adjustments, {r['expiries']} expiries"
            for r in bad
        ]
        settled = await self.request_rows()
        return _Obs(pgs, await self._observe_redis(rd), settled, bad_entries)

    async def _observe_redis(self, rd: Any) -> dict[Key, _Rd]:
        """Every customer's account and holds in one round trip (a read-only script of the
        simulator's; nothing else runs between steps)."""
        settling = getattr(constants, "settling_holds_key", None)
        keys: list[str] = []
        for t, c in self.keys:
            tenant, cid = self.tenants[t], self.cids[c]
            keys += [
                constants.account_key(tenant, cid),
                constants.open_holds_key(tenant, cid),
                constants.expiring_holds_key(tenant, cid),
                settling(tenant, cid) if settling is not None else "",
                constants.hold_key(tenant, cid, ""),
            ]
        reply = await rd.eval(_OBSERVE_LUA, len(keys), *keys)
        out: dict[Key, _Rd] = {}
        for key, (exists, balance, version, held, holds) in zip(self.keys, reply, strict=True):
            rd_ = _Rd(bool(exists), int(balance), int(version), int(held))
            for where, member, score, amount, consumed, status in holds:
                rd_.holds[member] = (where, int(amount), int(consumed), status, float(score))
            out[key] = rd_
        return out

    # -- the invariants after every step --------------------------------------------------

    async def check(self, step: Step) -> None:
        previous = self.obs
        obs = await self.observe()
        self.obs = obs
        self.check_stores(previous, obs, step)
        await self.check_model(obs)
        if step.kind in ("reaper", "sync", "redis_restart", "pg_restart") or self.fired_in_step:
            await self.check_integrity()
        await self.reanchor(obs)

    def check_stores(self, previous: _Obs | None, obs: _Obs, step: Step | None = None) -> None:
        for key in self.keys:
            name = self.names([key])[0]
            pg, rd = obs.pg.get(key), obs.rd[key]
            if pg is None:
                raise self.fail("1 ledger", f"{name}: customer missing from PostgreSQL")
            if (pg.ledger_sum, pg.entries, pg.last_version) != (pg.balance, pg.version, pg.version):
                raise self.fail(
                    "1 ledger",
                    f"{name}: balance {pg.balance} version {pg.version}, but the ledger sums "
                    f"to {pg.ledger_sum} over {pg.entries} entries (last version "
                    f"{pg.last_version})",
                )
            if pg.balance < 0 and pg.overage < -pg.balance:
                raise self.fail(
                    "4 overage",
                    f"{name}: balance {pg.balance} but only {pg.overage} overage recorded",
                )
            if rd.exists:
                # Always, faults or not: a charge the ledger committed and Redis has not
                # adopted yet is still reserved by its hold (expiring or settling), so
                # Redis never offers money the ledger no longer has.
                reserved = sum(
                    amount for where, amount, _, _, _ in rd.holds.values() if where != "open"
                )
                if rd.balance - reserved > pg.balance:
                    raise self.fail(
                        "2 redis ahead",
                        f"{name}: Redis balance {rd.balance} (version {rd.version}) minus "
                        f"the {reserved} its expiring and settling holds reserve is above "
                        f"PostgreSQL's {pg.balance} (version {pg.version}): Redis offers "
                        f"{rd.balance - reserved - pg.balance} grains the ledger spent",
                    )
                if rd.version > pg.version:
                    raise self.fail(
                        "2 redis ahead",
                        f"{name}: Redis version {rd.version} (balance {rd.balance}) is ahead "
                        f"of PostgreSQL's {pg.version} (balance {pg.balance})",
                    )
                if key not in self.dirty and (rd.balance, rd.version) != (pg.balance, pg.version):
                    raise self.fail(
                        "2 redis = postgres",
                        f"{name}: Redis balance {rd.balance} (version {rd.version}) != "
                        f"PostgreSQL {pg.balance} (version {pg.version})",
                    )
                total = sum(amount for _, amount, _, _, _ in rd.holds.values())
                if rd.held != total:
                    raise self.fail("3 held", f"{name}: held {rd.held} != sum of its holds {total}")
            elif rd.holds:
                raise self.fail("3 held", f"{name}: holds {sorted(rd.holds)} without an account")
        if obs.bad_entries:
            raise self.fail("6 settled twice", "; ".join(obs.bad_entries))
        targets = step.customers() if step is not None else set()
        if previous is None or step is None or not targets:
            return
        if self.recovered_in_step:
            return  # the restart's reaper pass may settle anyone's overdue holds
        for key in self.keys:
            if key in targets:
                continue
            before_pg, after_pg = previous.pg[key], obs.pg[key]
            before_rd, after_rd = previous.rd[key], obs.rd[key]
            moved_pg = (before_pg.balance, before_pg.version) != (
                after_pg.balance,
                after_pg.version,
            )
            moved_rd = (before_rd.balance, before_rd.version, before_rd.held) != (
                after_rd.balance, after_rd.version, after_rd.held,
            ) or set(before_rd.holds) != set(after_rd.holds)  # fmt: skip
            if moved_pg or moved_rd:
                raise self.fail(
                    "7 isolation",
                    f"{step.kind} for {self.names(sorted(targets))} changed "
                    f"{self.names([key])[0]}: PostgreSQL {before_pg.balance}->"
                    f"{after_pg.balance}, Redis balance {before_rd.balance}->"
                    f"{after_rd.balance} held {before_rd.held}->{after_rd.held}",
                )

    async def check_model(self, obs: _Obs) -> None:
        for key in self.keys:
            cust = self.model.custs[key]
            if not cust.certain:
                continue
            name = self.names([key])[0]
            pg = obs.pg[key]
            expected = (cust.balance, cust.version, cust.overage, cust.lifetime)
            got = (pg.balance, pg.version, pg.overage, pg.lifetime)
            if got != expected:
                raise self.fail(
                    "model",
                    f"{name}: PostgreSQL (balance, version, overage, lifetime spent) = {got}, "
                    f"the model says {expected}",
                )
            rows = obs.settled.get(key, {})
            if set(rows) != set(cust.settled):
                raise self.fail(
                    "model",
                    f"{name}: settled requests {sorted(rows)} in PostgreSQL, the model says "
                    f"{sorted(cust.settled)}",
                )
            for rid, info in cust.settled.items():
                row = rows[rid]
                if (row["status"], row["actual_cost_grains"]) != (info.status, info.charged):
                    raise self.fail(
                        "model",
                        f"{name}: request {rid} settled {row['status']} at "
                        f"{row['actual_cost_grains']}, the model says {info.status} at "
                        f"{info.charged}",
                    )
            rd = obs.rd[key]
            if not rd.exists or key in self.dirty:
                continue
            client_holds = {h for h in rd.holds if not h.startswith("#")}
            if client_holds != set(cust.holds):
                raise self.fail(
                    "model",
                    f"{name}: Redis holds {sorted(client_holds)}, the model says "
                    f"{sorted(cust.holds)}",
                )
            for rid, hold in cust.holds.items():
                _, amount, consumed, _, _ = rd.holds[rid]
                due = hold.status == "open" and hold.expires <= self.model.now
                allowed = {hold.amount, hold.consumed} if due else {hold.amount}
                if amount not in allowed or consumed != hold.consumed:
                    raise self.fail(
                        "model",
                        f"{name}: hold {rid} is (amount {amount}, consumed {consumed}) in "
                        f"Redis, the model says ({sorted(allowed)}, {hold.consumed})",
                    )

    async def check_integrity(self) -> None:
        for t, tenant in enumerate(self.tenants):
            reports = await self.live.admin.verify_integrity(self.p(t))
            for report in reports:
                c = self.cids.index(report.customer_id)
                if not report.ok and (t, c) not in self.dirty:
                    raise self.fail(
                        "3 integrity",
                        f"verify_integrity {tenant}/{report.customer_id}: {report.problems}",
                    )

    # -- re-anchoring an uncertain customer from PostgreSQL -------------------------------

    async def reanchor(self, obs: _Obs) -> None:
        for key in self.keys:
            cust = self.model.custs[key]
            if cust.certain or key in self.dirty or obs.rd[key].holds:
                continue
            await self._reanchor(key, obs)

    async def _reanchor(self, key: Key, obs: _Obs) -> None:
        """No hold is left: the customer's whole state is in PostgreSQL. Every entry the
        model did not predict must come from a call that was made; then the model takes
        the ledger's state and is certain again."""
        t, c = key
        pg = self.world.pg
        assert pg is not None
        cust = self.model.custs[key]
        journal = self.model.journal[key]
        name = self.names([key])[0]
        entries = await pg.fetch(
            """SELECT transaction_id, transaction_type, amount_grains, reference_id,
                      balance_after_grains, balance_version
               FROM transactions WHERE tenant = $1 AND customer_id = $2
               ORDER BY balance_version""",
            self.tenants[t],
            self.cids[c],
        )
        known = self.model.txns[t]
        rows = obs.settled.get(key, {})
        for e in entries:
            txid, kind, amount, ref = (
                e["transaction_id"], e["transaction_type"], e["amount_grains"], e["reference_id"],
            )  # fmt: skip
            if kind in ("credit", "debit"):
                calls = journal.credits if kind == "credit" else journal.debits
                signed = amount if kind == "credit" else -amount
                generated = txid.startswith(f"{kind}:") and ("", signed) in calls
                if (txid, signed) not in calls and not generated and txid not in known:
                    raise self.fail(
                        "5 exactly once", f"{name}: {kind} {txid} of {amount} that no call made"
                    )
            elif kind == "settlement":
                if ref not in journal.finalized:
                    raise self.fail(
                        "6 settled id reused",
                        f"{name}: settlement of {ref} ({amount}) that no Finalize made",
                    )
            elif kind == "expiry":
                most = max(journal.consumed.get(ref, 0), 0)
                if ref not in journal.held and not ref.startswith("#"):
                    raise self.fail(
                        "6 settled id reused", f"{name}: expiry of {ref} that no Check opened"
                    )
                if -amount > most:
                    raise self.fail(
                        "5 exactly once",
                        f"{name}: expiry of {ref} charged {-amount}, more than the "
                        f"{most} its Deducts ever reported consumed",
                    )
            elif kind == "adjustment" and (
                ref not in journal.finalized or rows.get(ref, {}).get("status") != "expired"
            ):
                raise self.fail(
                    "6 settled id reused",
                    f"{name}: adjustment of {ref} ({amount}) without an expiry and a late Finalize",
                )
        labelled = await pg.fetch(
            """SELECT request_id FROM requests
               WHERE tenant = $1 AND customer_id = $2 AND let_through""",
            self.tenants[t],
            self.cids[c],
        )
        for row in labelled:
            if row["request_id"] not in journal.let_through:
                raise self.fail(
                    "8 label traced",
                    f"{name}: request {row['request_id']} labelled let through, "
                    "but no Finalize said so",
                )
        pgrow = obs.pg[key]
        cust.balance, cust.version = pgrow.balance, pgrow.version
        cust.overage, cust.lifetime = pgrow.overage, pgrow.lifetime
        cust.holds.clear()
        cust.settled = {
            rid: Settled(
                r["status"],
                r["actual_cost_grains"],
                r["overage_grains"],
                r["refunded_grains"],
                r.get("hold_nonce", "") or "",
                r["model"],
                r["balance_after_grains"],
                r["balance_version"],
            )
            for rid, r in rows.items()
        }
        cust.adjusted = {}
        cust.second_charged = {
            e["transaction_id"].rpartition("#")[2] for e in entries if "#" in e["transaction_id"]
        }
        for e in entries:
            if e["transaction_type"] == "adjustment" and "#" not in e["transaction_id"]:
                cust.adjusted[e["reference_id"]] = (
                    -e["amount_grains"], e["balance_after_grains"], e["balance_version"],
                )  # fmt: skip
        for txid in [x for x, txn in known.items() if txn.customer == c]:
            del known[txid]
        for e in entries:
            if e["transaction_type"] in ("credit", "debit", "adjustment"):
                known[e["transaction_id"]] = Txn(
                    c, e["transaction_type"], e["amount_grains"], e["balance_after_grains"],
                    e["balance_version"],
                )  # fmt: skip
        cust.certain = True

    async def degraded_holds(self) -> None:
        """A hold opened for a settled id (its lookup failed) is charged what it consumed,
        once, on its own (``<type>:<customer>:<request>#<nonce>``): no token is free."""
        pg = self.world.pg
        assert pg is not None
        for (t, c, nonce), rid in self.degraded.items():
            consumed = self.model.journal[t, c].consumed_by.get(nonce, 0)
            rows = await pg.fetch(
                """SELECT transaction_id, amount_grains FROM transactions
                   WHERE tenant = $1 AND customer_id = $2 AND transaction_id LIKE $3""",
                self.tenants[t],
                self.cids[c],
                f"%:{self.cids[c]}:{rid}#{nonce}",
            )
            charged = -sum(r["amount_grains"] for r in rows)
            reported = self.degraded_reported.get((t, c, nonce), set())
            if len(rows) > 1 or (charged < consumed and charged not in reported):
                raise self.fail(
                    "6 settled id reused",
                    f"{self.names([(t, c)])[0]}: a hold opened for settled {rid} (its lookup "
                    f"failed) consumed {consumed} but was charged {charged} "
                    f"({[r['transaction_id'] for r in rows]})",
                )

    # -- the end of a schedule ------------------------------------------------------------

    async def quiesce(self) -> None:
        """Let every hold expire and the reaper settle it, then everything must agree:
        integrity ok everywhere, Redis = PostgreSQL, no hold left, the model = the ledger."""
        self.advance(QUANTUM_MS * 4)
        if self.reaper_cut:
            for key in [k for k in self.keys if self.has_holds(k)]:
                self.model.mark_uncertain(key)
        for _ in range(QUIESCE_PASSES):
            outcome = await self.call(Step("reaper"), lambda: self.live.reaper.run_once())
            if isinstance(outcome.value, BeamError):
                raise self.fail("3 reaper", f"a reaper pass failed: {show(outcome.value)}")
            self.reaper_cut = False
            self.dirty.clear()
            await self.model_reaped()
        obs = await self.observe()
        self.obs = obs
        self.check_stores(None, obs)
        left = {self.names([k])[0]: sorted(obs.rd[k].holds) for k in self.keys if obs.rd[k].holds}
        if left:
            raise self.fail("3 reaper", f"holds left after quiescence: {left}")
        await self.reanchor(obs)
        await self.check_model(obs)
        await self.check_integrity()
        await self.degraded_holds()
        await self.live.admin.sync_tenant(None)
        obs = await self.observe()
        self.check_stores(None, obs)
        await self.check_model(obs)
        await self.check_integrity()
