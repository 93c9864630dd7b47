"""Schedules: the seeded, replayable list of steps the simulator runs.

A schedule is generated from one integer seed and nothing else, so ``--seed N`` replays it
exactly. Steps name tenants and customers by index and requests by short shared names
(``r0``..``r5``): every tenant has customers ``c0``.. and uses the same request ids, so a
step that moved another tenant's money would show up at once. A step carries no tokens
or other run-time values; the runner resolves them (a Deduct's "current" token is the
last token a Check returned for that request), so a schedule with steps removed (while
shrinking) still runs.

Time moves in quanta of ``QUANTUM_MS`` (5 min) and the hold TTL is 3 quanta. Real time
that passes while a schedule runs (seconds) is far below a quantum, so "is this hold
overdue?" has the same answer for the stores (real clock + offset) and for the model
(offset only); see ``tests/sim/model.py``.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from beam.core import faults

QUANTUM_MS = 300_000
HOLD_TTL_SECONDS = 900  # 3 quanta; the Runtime's default hold TTL in the simulator
REQUEST_IDS = ("r0", "r1", "r2", "r3", "r4", "r5")
MAX_REQUESTS_PER_CUSTOMER = 5  # far below the 8 overdue holds one script call expires
STATUSES = ("COMPLETED_SUCCESS", "KILLED_INSUFFICIENT_BALANCE", "FAILED_ERROR", "FAILED_TIMEOUT")

# Which fault points each operation can pass (the hook cancels or crashes the call there).
OP_POINTS: dict[str, tuple[str, ...]] = {
    "check": (faults.CHECK_OPENED,),
    "finalize": (faults.FINALIZE_BEGUN, faults.FINALIZE_COMMITTED, faults.ADJUST_COMMITTED),
    "credit": (faults.CREDIT_COMMITTED,),
    "debit": (faults.DEBIT_OPENED, faults.DEBIT_COMMITTED),
    "reaper": (faults.REAPER_COMMITTED,),
}
FAULT_KINDS = ("cancel", "crash", "error")
# A stall: the call pauses where its settlement has reserved but not yet committed (its
# process paused, or its commit queued for a pool connection) past its hold's deadline,
# while the reaper runs; then it resumes. ``ADJUST_QUEUED`` is the simulator's own point
# (tests/sim/world.py): a late Finalize's adjustment about to be committed.
ADJUST_QUEUED = "sim.adjust.queued"
STALL_POINTS: dict[str, tuple[str, ...]] = {
    "finalize": (faults.FINALIZE_BEGUN, faults.FINALIZE_BEGUN, ADJUST_QUEUED),
    "debit": (faults.DEBIT_OPENED,),
}

# Steps that act on one customer (everything else acts on the whole system).
CUSTOMER_STEPS = frozenset({"check", "deduct", "finalize", "credit", "debit", "balance"})


@dataclass(frozen=True)
class Fault:
    """Inject ``kind`` when the call reaches ``point`` for the ``nth`` time.

    cancel: the caller's task is cancelled there (a client deadline); crash: the process
    dies there (``faults.SimulatedCrash``, then a restart); error: a store call fails there
    (``BeamError(STORE_UNAVAILABLE)`` raised at the point); stall: the call pauses there
    (a settlement that reserved and has not committed), the clock passes its hold's
    deadline, ``reaps`` reaper passes run (then, with ``during``, the client's retry of the
    call, or a resync), and the call resumes: its commit must be refused (fenced)."""

    kind: str
    point: str
    nth: int = 1
    retry: bool = False  # after a cancel, an error or a stall, the client retries once
    reaps: int = 0  # stall: reaper passes while the call is paused
    # stall: "retry" = the client's retry runs while the call is paused; "sync" = a resync
    # from PostgreSQL (SyncAll) runs while its hold settles, and again after the reaper
    during: str = ""

    def describe(self) -> str:
        nth = f"#{self.nth}" if self.nth != 1 else ""
        retry = "+retry" if self.retry else ""
        stall = f"+reaps{self.reaps}" if self.kind == "stall" else ""
        during = f"+{self.during}-while-paused" if self.during else ""
        return f"{self.kind}@{self.point}{nth}{stall}{during}{retry}"


@dataclass(frozen=True)
class Step:
    kind: str
    tenant: int = -1
    customer: int = -1
    args: dict[str, Any] = field(default_factory=dict)
    fault: Fault | None = None
    subs: tuple[Step, ...] = ()  # a burst: calls for distinct customers, all at once

    def describe(self) -> str:
        who = f" t{self.tenant}/c{self.customer}" if self.customer >= 0 else ""
        if self.customer < 0 and self.tenant >= 0:
            who = f" t{self.tenant}"
        args = " ".join(f"{k}={v}" for k, v in self.args.items())
        fault = f" [{self.fault.describe()}]" if self.fault else ""
        subs = "".join(f"\n        | {sub.describe()}" for sub in self.subs)
        return f"{self.kind}{who} {args}".rstrip() + fault + subs

    def customers(self) -> set[tuple[int, int]]:
        """The customers a customer step (or a burst) acts on."""
        if self.subs:
            return {(s.tenant, s.customer) for s in self.subs}
        return {(self.tenant, self.customer)} if self.kind in CUSTOMER_STEPS else set()

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Step:
        return Step(
            d["kind"], d["tenant"], d["customer"], dict(d["args"]),
            Fault(**d["fault"]) if d["fault"] else None,
            tuple(Step.from_dict(sub) for sub in d.get("subs", ())),
        )  # fmt: skip


@dataclass(frozen=True)
class Schedule:
    seed: int
    tenants: int
    customers: int
    balances: tuple[tuple[int, ...], ...]  # [tenant][customer] opening balance
    steps: tuple[Step, ...]
    options: dict[str, Any] = field(default_factory=dict)  # generate()'s non-default options

    def with_steps(self, steps: list[Step]) -> Schedule:
        return replace(self, steps=tuple(steps))

    def replay_command(self, bugs: frozenset[str] = frozenset()) -> str:
        if self.options.get("edited"):
            words = ["python -m tests.sim", "--replay FILE (this schedule's JSON)"]
            return " ".join(words + [f"--bug {b}" for b in sorted(bugs)])
        words = ["python -m tests.sim", f"--seed {self.seed}"]
        if self.options.get("steps") is not None:
            words.append(f"--steps {self.options['steps']}")
        if self.options.get("fault_rate") is not None:
            words.append(f"--fault-rate {self.options['fault_rate']}")
        words += [f"--mask {m}" for m in self.options.get("mask", [])]
        words += [f"--bug {b}" for b in sorted(bugs)]
        return " ".join(words)

    def masked(self, masks: frozenset[str]) -> Schedule:
        """Without the faults ``masks`` names (``kind@point``, e.g. ``crash@credit.committed``;
        ``*`` matches any kind or point) and without the steps it names (a step kind, e.g.
        ``redis_restart``): to look past a known finding."""

        def hidden(fault: Fault | None) -> bool:
            if fault is None:
                return False
            return bool(
                {f"{fault.kind}@{fault.point}", f"*@{fault.point}", f"{fault.kind}@*"} & masks
            )

        def strip(step: Step) -> Step:
            subs = tuple(strip(sub) for sub in step.subs)
            return replace(step, fault=None if hidden(step.fault) else step.fault, subs=subs)

        steps = [strip(s) for s in self.steps if s.kind not in masks]
        masked = self.with_steps(steps)
        return replace(masked, options={**self.options, "mask": sorted(masks)}) if masks else masked

    def describe(self) -> str:
        lines = [
            f"seed {self.seed}: {self.tenants} tenants x {self.customers} customers, "
            f"opening balances {[list(b) for b in self.balances]}"
        ]
        lines += [f"  {i:3d} {s.describe()}" for i, s in enumerate(self.steps)]
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> Schedule:
        data = json.loads(text)
        steps = tuple(Step.from_dict(s) for s in data["steps"])
        balances = tuple(tuple(b) for b in data["balances"])
        return Schedule(
            data["seed"], data["tenants"], data["customers"], balances, steps,
            data.get("options", {}),
        )  # fmt: skip


@dataclass
class _Request:
    """What the generator remembers of one request id of one customer."""

    check: dict[str, Any] | None = None  # the last Check's parameters
    seq: int = 0  # the last sequence number used


@dataclass
class _Gen:
    rng: random.Random
    tenants: int
    customers: int
    fault_rate: float
    requests: dict[tuple[int, int], dict[str, _Request]] = field(default_factory=dict)
    seqs: dict[tuple[int, int, str], _Request] = field(default_factory=dict)  # Deducts
    # per tenant: transaction id -> (customer, kind, amount)
    txids: dict[int, dict[str, tuple[int, str, int]]] = field(default_factory=dict)
    txid_counter: int = 0
    # The streaming guard's fields (a Check that may shorten, Deducts that reserve ahead
    # with the prompt on board) come from a second stream of the seed, so the schedules
    # of seeds recorded before they existed stay what they were.
    guard_rng: random.Random = field(default_factory=random.Random)
    # The let-through label on a Finalize (a fail-open client's replay): a third stream, for
    # the same reason. A label, never money: every invariant must hold whatever it says.
    label_rng: random.Random = field(default_factory=random.Random)

    def pick_customer(self) -> tuple[int, int]:
        return self.rng.randrange(self.tenants), self.rng.randrange(self.customers)

    def known(self, t: int, c: int) -> dict[str, _Request]:
        """Request ids this customer has Checked (a Check is the only way in)."""
        return self.requests.setdefault((t, c), {})

    def fresh_rid(self, t: int, c: int) -> str | None:
        known = self.known(t, c)
        if len(known) >= MAX_REQUESTS_PER_CUSTOMER:
            return None
        unused = [r for r in REQUEST_IDS if r not in known]
        return self.rng.choice(unused) if unused else None

    def used_rid(self, t: int, c: int) -> str | None:
        known = self.known(t, c)
        return self.rng.choice(sorted(known)) if known else None

    def checked_target(self, customer: tuple[int, int] | None, odds: float) -> tuple[int, int, str]:
        """Usually (``odds``) a customer and one of its Checked request ids; otherwise any
        customer and any request id (never Checked, or another customer's: the call must
        fail without moving money)."""
        rng = self.rng
        if rng.random() < odds:
            if customer is None:
                candidates = sorted(k for k, v in self.requests.items() if v)
                customer = rng.choice(candidates) if candidates else None
            if customer is not None and self.known(*customer):
                rid = self.used_rid(*customer)
                assert rid is not None
                return customer[0], customer[1], rid
        t, c = customer or self.pick_customer()
        return t, c, rng.choice(REQUEST_IDS)

    def fault(self, op: str) -> Fault | None:
        if op not in OP_POINTS or self.rng.random() >= self.fault_rate:
            return None
        if op in STALL_POINTS and self.rng.random() < 0.2:
            return Fault(
                "stall",
                self.rng.choice(STALL_POINTS[op]),
                retry=self.rng.random() < 0.5,
                reaps=self.rng.choice((1, 1, 2, 3)),
                during=self.during(),
            )
        kind = self.rng.choices(FAULT_KINDS, weights=(6, 3, 2))[0]
        points = OP_POINTS[op]
        if self.rng.random() < 0.1:
            points = faults.ALL_POINTS  # a point this call is not expected to pass
        nth = 1 if op != "reaper" else self.rng.choice((1, 1, 2))
        retry = op != "reaper" and kind != "crash" and self.rng.random() < 0.5
        return Fault(kind, self.rng.choice(points), nth, retry)

    def during(self) -> str:
        """What else happens while a stalled call is paused."""
        roll = self.rng.random()
        return "retry" if roll < 0.3 else "sync" if roll < 0.45 else ""

    # -- one step of each kind -----------------------------------------------------------

    def check(self, customer: tuple[int, int] | None = None) -> Step:
        t, c = customer or self.pick_customer()
        rng = self.rng
        fresh = rng.random() < 0.6
        rid = (self.fresh_rid(t, c) if fresh else self.used_rid(t, c)) or self.used_rid(t, c)
        rid = rid or rng.choice(REQUEST_IDS)
        request = self.known(t, c).setdefault(rid, _Request())
        if request.check is not None and rng.random() < 0.7:
            args = dict(request.check)  # a retry (or a reuse of a settled id)
        else:
            args = self.check_params()
        request.check = dict(args)
        return Step("check", t, c, {"rid": rid, **args}, self.fault("check"))

    def check_params(self) -> dict[str, Any]:
        rng = self.rng
        mult = rng.choice((1.0, 1.0, 0.0, 1.2, 1.5, 2.0, 1.0000001))
        if rng.random() < 0.8:
            est = rng.choice((1, 7, 100, 500, 1_000, 2_500, rng.randint(1, 5_000)))
            model = rng.choice(("cheap", "cheap", "cheap", ""))
            return {"est": est, "mult": mult, "model": model, "max_tokens": 0, "prompt": 0}
        # Beam estimates from the model's prices: prompt x 1 + max_tokens x 2 grains.
        args: dict[str, Any] = {
            "est": 0,
            "mult": mult,
            "model": "cheap",
            "max_tokens": rng.randint(1, 1_500),
            "prompt": rng.randint(0, 500),
        }
        if self.guard_rng.random() < 0.5:  # shorten rather than refuse, down to min
            args["min"] = self.guard_rng.randint(1, args["max_tokens"])
        return args

    def deduct(self, customer: tuple[int, int] | None = None) -> Step:
        t, c, rid = self.checked_target(customer, 0.95)
        rng = self.rng
        request = self.seqs.setdefault((t, c, rid), _Request())
        roll = rng.random()
        if roll < 0.5:
            request.seq += 1
            seq = request.seq
        elif roll < 0.65:
            seq = request.seq  # a retry of the last one (0 if none yet)
        elif roll < 0.8:
            seq = 0  # no sequence number: not idempotent
        elif roll < 0.9:
            seq = rng.randint(1, max(1, request.seq))  # an old one, reordered
        else:
            request.seq += rng.randint(2, 4)  # a gap (an earlier one is still in flight)
            seq = request.seq
        args = {
            "rid": rid,
            "tokens": rng.choice((1, 10, 50, 50, 100, 400, rng.randint(1, 3_000))),
            "kind": rng.choice(("out", "out", "out", "in", "cached")),
            "seq": seq,
            "model": rng.choice(("cheap", "cheap", "cheap", "")),
            "token": rng.choices(("current", "stale", "other", "forged"), (85, 6, 6, 3))[0],
        }
        guard = self.guard_rng
        if guard.random() < 0.5:  # a streaming guard: reserve ahead, the prompt on board
            args["ahead"] = guard.choice((1, 50, 200, guard.randint(1, 2_000)))
            if guard.random() < 0.3:
                args["prompt_in"] = guard.randint(0, 300)
                args["prompt_cached"] = guard.choice((0, 0, guard.randint(1, 100)))
        return Step("deduct", t, c, args)

    def finalize(self, customer: tuple[int, int] | None = None) -> Step:
        t, c, rid = self.checked_target(customer, 0.9)
        rng = self.rng
        usage = rng.random()
        args: dict[str, Any] = {"rid": rid, "status": rng.choice(STATUSES)}
        args["cost"] = (
            rng.choice((1, 250, 1_000, 3_000, rng.randint(1, 20_000))) if (usage < 0.4) else 0
        )
        if 0.4 <= usage < 0.75:
            args["prompt"] = rng.randint(0, 800)
            args["completion"] = rng.randint(0 if args["prompt"] else 1, 2_000)
        else:
            args["prompt"] = args["completion"] = 0
        args["model"] = rng.choice(("cheap", "cheap", ""))
        args["token"] = rng.choices(("current", "none", "stale", "other"), (60, 30, 5, 5))[0]
        if self.label_rng.random() < 0.25:
            args["let_through"] = True
        return Step("finalize", t, c, args, self.fault("finalize"))

    def ledger_entry(
        self, kind: str, *, fresh: bool = False, customer: tuple[int, int] | None = None
    ) -> Step:
        t, c = customer or self.pick_customer()
        rng = self.rng
        mine = self.txids.setdefault(t, {})
        roll = 0.45 if fresh else rng.random()
        amount = rng.choice((1, 100, 1_000, 5_000, rng.randint(1, 30_000)))
        if mine and roll < 0.3:  # a retry: same transaction id, customer, kind and amount
            txid = rng.choice(sorted(mine))
            c, kind, amount = mine[txid]
        elif mine and roll < 0.4:  # a conflicting reuse (other amount, customer or kind)
            txid = rng.choice(sorted(mine))
        elif roll < 0.5 and not fresh:
            txid = ""  # Beam generates one: not retry-safe
        else:
            self.txid_counter += 1
            txid = f"tx{self.txid_counter}"
            mine[txid] = (c, kind, amount)
        return Step(kind, t, c, {"amount": amount, "txid": txid}, self.fault(kind))

    def burst(self) -> Step:
        """2-8 calls for distinct customers at once (ledger entries with fresh ids only, so
        their order cannot matter); at most one of them gets a fault."""
        rng = self.rng
        customers = [(t, c) for t in range(self.tenants) for c in range(self.customers)]
        chosen = rng.sample(customers, rng.randint(2, min(8, len(customers))))
        subs = []
        for t, c in chosen:
            kind = rng.choices(
                ("check", "deduct", "finalize", "credit", "debit", "balance"), (4, 3, 8, 1, 2, 1)
            )[0]
            if kind in ("credit", "debit"):
                step = self.ledger_entry(kind, fresh=True, customer=(t, c))
            elif kind == "balance":
                step = Step("balance", t, c)
            else:
                step = getattr(self, kind)((t, c))
            subs.append(replace(step, fault=None))
        if rng.random() < self.fault_rate:
            at = rng.randrange(len(subs))
            fault = self.fault(subs[at].kind) if subs[at].kind in OP_POINTS else None
            if fault is not None and fault.kind != "stall":  # a stall pauses one call alone
                subs[at] = replace(subs[at], fault=replace(fault, retry=False))
        return Step("burst", subs=tuple(subs))

    def system(self, kind: str) -> Step:
        rng = self.rng
        if kind == "advance":
            return Step("advance", args={"ms": QUANTUM_MS * rng.choice((1, 1, 2, 4))})
        if kind == "reaper":
            return Step("reaper", fault=self.fault("reaper"))
        if kind == "expire_done":
            if rng.random() < 0.5:
                t, c = self.pick_customer()
                return Step("expire_done", t, c)
            return Step("expire_done")
        if kind == "sync":
            return Step("sync", rng.randrange(self.tenants) if rng.random() < 0.6 else -1)
        return Step(kind)


# Relative weights of step kinds; a schedule picks one "profile" to vary the mix.
_BASE_WEIGHTS = {
    "check": 24,
    "deduct": 22,
    "finalize": 18,
    "credit": 4,
    "debit": 5,
    "balance": 3,
    "advance": 6,
    "reaper": 6,
    "expire_done": 4,
    "sync": 2,
    "snapshot": 2,
    "redis_restart": 1.5,
    "pg_restart": 0.04,
    "burst": 5,
}
_PROFILES: tuple[dict[str, float], ...] = (
    {},
    {"advance": 12, "reaper": 10, "expire_done": 8},  # late Finalizes, reused ids
    {"snapshot": 5, "redis_restart": 4},  # lost Redis writes
    {"credit": 10, "debit": 12},  # ledger entries and their idempotency
)


def generate(seed: int, *, steps: int | None = None, fault_rate: float | None = None) -> Schedule:
    rng = random.Random(seed)
    fault_rate_arg = fault_rate
    tenants = rng.choice((2, 3))
    customers = rng.choice((2, 3))
    balances = tuple(
        tuple(
            rng.choice((0, 500, 5_000, 20_000, 50_000, 100_000, 100_000, rng.randint(1, 100_000)))
            for _ in range(customers)
        )
        for _ in range(tenants)
    )
    if fault_rate is None:
        fault_rate = rng.choice((0.0, 0.1, 0.25, 0.5))
    gen = _Gen(
        rng, tenants, customers, fault_rate, guard_rng=random.Random(f"{seed}:guard"),
        label_rng=random.Random(f"{seed}:label"),
    )  # fmt: skip
    weights = dict(_BASE_WEIGHTS)
    weights.update(rng.choice(_PROFILES))
    kinds = list(weights)
    count = steps if steps is not None else rng.randint(20, 60)
    out: list[Step] = []
    for _ in range(count):
        kind = rng.choices(kinds, weights=[weights[k] for k in kinds])[0]
        if kind in ("deduct", "finalize") and not any(gen.requests.values()):
            kind = "check"  # nothing was Checked yet: there is nothing to stream or settle
        if kind == "check":
            out.append(gen.check())
        elif kind == "deduct":
            out.append(gen.deduct())
        elif kind == "finalize":
            out.append(gen.finalize())
        elif kind in ("credit", "debit"):
            out.append(gen.ledger_entry(kind))
        elif kind == "balance":
            t, c = gen.pick_customer()
            out.append(Step("balance", t, c))
        elif kind == "burst":
            out.append(gen.burst())
        else:
            out.append(gen.system(kind))
    options = {"steps": steps, "fault_rate": fault_rate_arg}
    return Schedule(
        seed, tenants, customers, balances, tuple(out),
        {k: v for k, v in options.items() if v is not None},
    )  # fmt: skip
