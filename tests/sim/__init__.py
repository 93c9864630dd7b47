"""A seeded, fault-injecting simulator that hunts money bugs on the real stores.

In the spirit of TigerBeetle's VOPR and Jepsen: one integer seed generates a schedule of
2-3 tenants x 2-3 customers doing Checks (fresh and reused request ids), Deducts
(retried, reordered, without sequence numbers), Finalizes (with and without usage and
token, replayed, late after expiry, for ids never checked), credits and debits (retried,
conflicting), with time jumping past hold TTLs, reaper passes, done markers expiring,
syncs, Redis losing its last writes, PostgreSQL restarting, calls cancelled, crashed
or failing at every fault point of ``beam.core.faults``, and settlements stalled (paused
after reserving, before committing) past their hold's deadline while the reaper runs.
The runner drives the real core (``Runtime``) against a real Redis and a real PostgreSQL
of its own, predicts every answer with a plain-Python model, and checks the money
invariants after every step:

1. PostgreSQL's balance is the sum of the ledger; the version counts its entries.
2. Redis's cached balance never leads PostgreSQL's, and equals it once the call was
   acknowledged (after a cancellation or failure: once the reaper has run).
3. ``held`` is the sum of the holds; ``verify_integrity`` is ok after quiescence.
4. A negative balance is covered by recorded overage.
5. Every acknowledged settlement, credit and debit is in PostgreSQL exactly once.
6. A settled request id never settles again and never buys new tokens.
7. No tenant reads or moves another's money.
8. A request labelled let through was finalized as let through (a label, never money:
   every Finalize may carry it, and 1-7 hold whatever it says).

Run one seed: ``python -m tests.sim --seed 42``; soak: ``python -m tests.sim --seeds 10000``
(``make soak``). A failing seed prints its schedule and the violated invariant.
"""

from tests.sim.runner import Result, Runner, Violation
from tests.sim.steps import Schedule, generate
from tests.sim.world import World

__all__ = ["Result", "Runner", "Schedule", "Violation", "World", "generate", "run_seed"]


async def run_seed(
    world: World,
    seed: int,
    *,
    bugs: frozenset[str] = frozenset(),
    steps: int | None = None,
    fault_rate: float | None = None,
) -> Result:
    schedule = generate(seed, steps=steps, fault_rate=fault_rate)
    return await Runner(world, schedule, bugs).run()
