"""Adversarial review 5: e9af163, "Let-through usage is labelled" (FinalizeRequest.let_through,
migration 0008), on real PostgreSQL and Redis (and a real `beam serve` for the clients).

Findings (each test fails on e9af163, but for the asyncio case of 3, which shows the
behaviour the blocking client should have, and 1, whose fix is in ``beam migrate``
(``UsageStore.apply_policies`` rebuilds the dropped events from the ledger before it
materializes; proved on a real TimescaleDB by test_usage_timescale.py): here, with stand-ins,
the test checks what 0008 leaves and that the rebuild finds the old hour in the ledger):

1. On TimescaleDB, 0008 drops ``usage_hourly`` and creates it again from ``usage_events``:
   the hour buckets older than the raw retention (``BEAM_USAGE_RAW_RETENTION_DAYS`` shorter
   than ``BEAM_USAGE_HOURLY_RETENTION_DAYS``, a documented configuration) exist only in the
   aggregate, and nothing rebuilds them (the ledger, which could, is not read). Checked with
   stand-ins for TimescaleDB's catalog, as tests/integration/test_let_through.py does.
2. Whether a let-through request is labelled depends on a race with the reaper: the same
   Finalize (same hold, same usage, same label) of a hold that expired while Beam was
   unreachable is labelled when it reaches Beam before the reaper, and not labelled after.
3. The blocking client labels a request Beam enforced in full as let through when its last
   Deduct fails while the guard closes (the asynchronous client does not: the two disagree).
4. 0008 waits for ACCESS EXCLUSIVE on requests, then on usage_events, without a
   lock_timeout: behind a reader of either table (pg_dump, a long analytics read) every
   settlement waits as long as that reader.

Questions that held up are checked too (0008's function body, replays with the other label,
the exact let-through sums of adjustments and second holds).

Prices: "cheap" is 1 grain per input token and 2 per output token.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from beam_client import AsyncBeamClient, BeamClient, FailOpen, RetryPolicy

from beam.adapters.migrations import migrate, migration_files
from beam.core import faults
from beam.core.auth import Principal
from beam.core.commands import CheckCommand, DeductCommand, FinalizeCommand
from beam.core.runtime import Runtime
from beam.core.usage import Usage, UsageQuery
from beam.records import Role
from beam_dev import servers as devservers
from tests.integration.test_let_through import _STAND_INS, _settle, _timescale_step
from tests.integration.test_usage import _append, _customer, _fresh_database, _second_hold
from tests.integration.test_usage import _settlement as _item
from tests.support.rest import rest_client
from tests.support.stack import ServiceProcess, Stores, Tenant

QUICK = RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.01)


def _sums(rows: Any) -> tuple[int, int, int, int]:
    return (
        sum(r.requests for r in rows),
        sum(r.charged_grains for r in rows),
        sum(r.let_through_requests for r in rows),
        sum(r.let_through_grains for r in rows),
    )


async def _label(stores: Stores, tenant: str, customer_id: str, request_id: str) -> bool:
    assert stores.postgres is not None
    conn = await asyncpg.connect(stores.postgres.dsn)
    try:
        value = await conn.fetchval(
            """SELECT let_through FROM requests
               WHERE tenant = $1 AND customer_id = $2 AND request_id = $3""",
            tenant, customer_id, request_id,
        )  # fmt: skip
    finally:
        await conn.close()
    assert value is not None
    return bool(value)


# -- question 1: 0008's body is 0004's (as renamed by 0006) plus the column -------------------


def _normalized(definition: str) -> list[str]:
    return [re.sub(r"\s+", " ", line).strip() for line in definition.splitlines() if line.strip()]


async def test_0008_redefines_the_unfenced_settlement_with_the_deployed_body_plus_the_label(
    stores: Stores, tmp_path: Path
) -> None:
    """The function as a database at 0007 really has it (0004's, renamed by 0006; 0007 only
    replaced the wrapper) and as 0008 leaves it differ in the label's lines only."""
    dsn = await _fresh_database(stores)
    conn = await asyncpg.connect(dsn)
    try:
        directory = tmp_path / "to7"
        directory.mkdir()
        for path in migration_files():
            if path.stem <= "0007_claim_second_hold":
                (directory / path.name).write_text(path.read_text())
        await migrate(conn, directory)
        query = "SELECT pg_get_functiondef('beam_settle_one_unfenced(jsonb)'::regprocedure)"
        before = _normalized(await conn.fetchval(query))
        wrapper = await conn.fetchval(
            "SELECT pg_get_functiondef('beam_settle_one(jsonb)'::regprocedure)"
        )
        await migrate(conn)
        after = _normalized(await conn.fetchval(query))
        assert (
            await conn.fetchval("SELECT pg_get_functiondef('beam_settle_one(jsonb)'::regprocedure)")
            == wrapper
        )
    finally:
        await conn.close()
    removed = [line for line in before if line not in after]
    added = [line for line in after if line not in before]
    assert removed == [
        "cached_prompt_tokens, balance_after_grains, balance_version, created_at, hold_nonce)",
        "COALESCE(to_timestamp((s->>'created_at_ms')::BIGINT / 1000.0), now()), v_nonce)",
        "prompt_tokens, completion_tokens, cost_grains)",
        "(s->>'prompt_tokens')::BIGINT, (s->>'completion_tokens')::BIGINT, v_charged);",
    ]
    assert added == [
        "cached_prompt_tokens, balance_after_grains, balance_version, created_at, hold_nonce,",
        "let_through)",
        "COALESCE(to_timestamp((s->>'created_at_ms')::BIGINT / 1000.0), now()), v_nonce,",
        "COALESCE((s->>'let_through')::BOOLEAN, FALSE))",
        "prompt_tokens, completion_tokens, cost_grains, let_through)",
        "(s->>'prompt_tokens')::BIGINT, (s->>'completion_tokens')::BIGINT, v_charged,",
        "COALESCE((s->>'let_through')::BOOLEAN, FALSE));",
    ]


# -- finding 1: 0008 drops the aggregate's history older than the raw retention ---------------


async def test_0008_keeps_the_hourly_history_older_than_the_raw_retention(stores: Stores) -> None:
    """BEAM_USAGE_RAW_RETENTION_DAYS=30 with BEAM_USAGE_HOURLY_RETENTION_DAYS=400 (docs/
    DATABASE.md): after 30 days a settlement's event is gone with its chunk and its hour
    bucket lives on in usage_hourly only. 0008 drops usage_hourly and creates it again from
    usage_events, so `beam migrate` then materializes 30 days and calls that 'complete':
    the 370 days before read as no spend. The ledger still has every entry
    (beam_usage_backfill rebuilds events from it), but 0008 does not read it.

    Stand-ins as in test_let_through.py: a plain materialized view plays 0005's aggregate
    with its history; the new aggregate cannot be created here, so what readers can still
    see of the old period is usage_events plus whatever usage_hourly survives."""
    dsn = await _fresh_database(stores)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        await conn.execute("INSERT INTO customers (tenant, customer_id) VALUES ('t', 'c')")
        old = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=40)
        await _append(conn, "credit:1", "credit", 1_000_000, "", old - timedelta(days=1))
        # A request settled 40 days ago (its ledger entry), whose event the raw retention has
        # dropped since (the settlement's own event is written by beam_settle, not by the
        # ledger trigger: appending the entry by hand leaves none, as the retention does).
        await _append(conn, "settlement:c:old", "settlement", -5_000, "old",
                      old + timedelta(minutes=5))  # fmt: skip
        assert await conn.fetchval("SELECT count(*) FROM usage_events") == 0
        await conn.execute(_STAND_INS.replace(
            "CREATE MATERIALIZED VIEW public.usage_hourly AS SELECT 1 AS requests;",
            f"""CREATE MATERIALIZED VIEW public.usage_hourly AS
                SELECT TIMESTAMPTZ '{old.isoformat()}' AS bucket, 't'::text AS tenant,
                       'c'::text AS customer_id, ''::text AS model, 1::bigint AS requests,
                       5000::bigint AS charged_grains, 0::bigint AS prompt_tokens,
                       0::bigint AS completion_tokens, 0::bigint AS cached_prompt_tokens;""",
        ))  # fmt: skip
        await conn.execute("SET search_path = shim, pg_catalog, public")
        await conn.execute(_timescale_step())
        await conn.execute("RESET search_path")
        raw = await conn.fetchval(
            """SELECT COALESCE(sum(cost_grains), 0)::bigint FROM usage_events
               WHERE tenant = 't' AND customer_id = 'c' AND time >= $1 AND time < $2""",
            old, old + timedelta(hours=1),
        )  # fmt: skip
        assert raw == 0  # the old aggregate is gone and usage_events never had the event
        # The fix: `beam migrate` (UsageStore.apply_policies) rebuilds every missing event
        # from the ledger before it materializes the new aggregate's history
        # (test_usage_timescale.py proves the whole path on a real TimescaleDB); the rebuild
        # it calls finds the old hour's charge in the ledger, at its own time.
        assert await conn.fetchval("SELECT beam_usage_backfill()") == 1
        raw = await conn.fetchval(
            """SELECT COALESCE(sum(cost_grains), 0)::bigint FROM usage_events
               WHERE tenant = 't' AND customer_id = 'c' AND time >= $1 AND time < $2""",
            old, old + timedelta(hours=1),
        )  # fmt: skip
        assert raw == 5_000
    finally:
        await conn.close()


async def _reap(runtime: Runtime, p: Principal, customer_id: str, request_id: str) -> None:
    """After the hold's TTL: reaper passes until the request is settled by its expiry
    (bounded: this reaper, or a `beam serve`'s on the same stores, may take it)."""
    await runtime.ledger.balance(p, customer_id)
    for _ in range(50):
        await runtime.reaper.run_once()
        if await runtime.postgres.find_settlement(p.tenant, customer_id, request_id) is not None:
            return


# -- finding 2: the label depends on a race with the reaper ----------------------------------


async def test_a_let_through_finalize_is_labelled_whether_or_not_the_reaper_came_first(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """Two identical requests, each with a hold whose Deducts stopped reaching Beam
    (mid-stream fail-open), each posting the same let-through Finalize once Beam answers
    again, after the holds' TTL. For "a" the Finalize arrives first (it takes the overdue
    hold over and settles it); for "b" a reaper pass comes first (an expiry, then the
    Finalize adjusts it). Same money, different label: "b" is counted as not let through."""
    p = Principal(tenant.name, Role.ADMIN, "test", frozenset())
    for cid in ("ca", "cb"):
        await _customer(runtime, p, cid, 100_000, hold_ttl_seconds=60)
    tokens: dict[str, str] = {}
    for cid in ("ca", "cb"):
        check = await runtime.ledger.check(p, CheckCommand(cid, "r", 1_000, 1.0, "cheap"))
        await runtime.ledger.deduct(p, DeductCommand(cid, "r", check.request_token, 100, "",
                                                     True, 1))  # fmt: skip
        tokens[cid] = check.request_token
    faults.advance(61_000)  # the outage outlasts the holds' TTL

    def let_through(cid: str) -> FinalizeCommand:
        return FinalizeCommand(cid, "r", "COMPLETED_SUCCESS", 10, 300, model="cheap",
                               request_token=tokens[cid], let_through=True)  # fmt: skip

    # "a": the replay reaches Beam before any reaper pass: 10 + 300 x 2 = 610.
    a = await runtime.ledger.finalize(p, let_through("ca"))
    # "b": a reaper pass first (expiry: 100 x 2 = 200), then the same replay (+410).
    await _reap(runtime, p, "cb", "r")
    b = await runtime.ledger.finalize(p, let_through("cb"))
    assert a.charged_grains == b.charged_grains == 610
    for cid in ("ca", "cb"):
        balance = await runtime.ledger.balance(p, cid)
        assert (balance.balance, balance.reserved) == (100_000 - 610, 0)
    usage = Usage(runtime.postgres)
    a_rows = (await usage.customer_usage(p, UsageQuery("ca", bucket="day"))).rows
    b_rows = (await usage.customer_usage(p, UsageQuery("cb", bucket="day"))).rows
    assert _sums(a_rows) == (1, 610, 1, 610)
    labels = (await _label(stores, p.tenant, "ca", "r"), await _label(stores, p.tenant, "cb", "r"))
    # The label of the same let-through request must not depend on who settled it first.
    assert (labels, _sums(b_rows)) == ((True, True), _sums(a_rows))


async def test_a_request_let_through_at_open_is_labelled_after_its_unseen_hold_expired(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """Fail-open at open on DEADLINE_EXCEEDED: Beam did open the hold, the client never saw
    its token and let the request through entirely. The hold, untouched, expires and the
    reaper settles it at 0; the let-through Finalize (no token: a claim) then adjusts it to
    the whole charge. Every grain of it was let through; none is counted so."""
    p = Principal(tenant.name, Role.ADMIN, "test", frozenset())
    await _customer(runtime, p, "c1", 100_000, hold_ttl_seconds=60)
    await runtime.ledger.check(p, CheckCommand("c1", "r", 1_000, 1.0, "cheap"))  # answer lost
    faults.advance(61_000)
    await _reap(runtime, p, "c1", "r")
    late = await runtime.ledger.finalize(
        p, FinalizeCommand("c1", "r", "COMPLETED_SUCCESS", 10, 300, model="cheap", let_through=True)
    )
    assert late.charged_grains == 610
    balance = await runtime.ledger.balance(p, "c1")
    assert (balance.balance, balance.reserved) == (100_000 - 610, 0)
    rows = (await Usage(runtime.postgres).customer_usage(p, UsageQuery("c1", bucket="day"))).rows
    assert (_sums(rows), await _label(stores, p.tenant, "c1", "r")) == ((1, 610, 1, 610), True)


# -- questions 2 and 5: replays with the other label; exact sums ------------------------------


async def test_replays_with_the_other_label_answer_the_same_and_sums_are_exact(
    runtime: Runtime, tenant: Tenant, stores: Stores
) -> None:
    """A Finalize retried with the opposite label (a first attempt that timed out, then an
    outbox replay labelled differently, either way) answers the stored settlement, charges
    once, and keeps the first label. A labelled late Finalize labels the expiry it adjusts
    and its adjustment (finding 2's fix); a second hold's charge is not labelled: exact
    numbers."""
    p = Principal(tenant.name, Role.ADMIN, "test", frozenset())
    await _customer(runtime, p, "c1", 100_000, hold_ttl_seconds=60)
    # Claims: 100 + 300 x 2 = 700 each; "lt" first labelled, "plain" first unlabelled.
    first: dict[str, Any] = {}
    for rid, label in (("lt", True), ("plain", False)):
        command = FinalizeCommand("c1", rid, "COMPLETED_SUCCESS", 100, 300, model="cheap",
                                  let_through=label)  # fmt: skip
        first[rid] = await runtime.ledger.finalize(p, command)
    for rid, label in (("lt", False), ("plain", True)):
        again = await runtime.ledger.finalize(
            p,
            FinalizeCommand(
                "c1", rid, "COMPLETED_SUCCESS", 100, 300, model="cheap", let_through=label
            ),
        )
        assert (again.charged_grains, again.final_balance, again.replayed) == (
            700,
            first[rid].final_balance,
            True,
        )
    assert await _label(stores, p.tenant, "c1", "lt") is True
    assert await _label(stores, p.tenant, "c1", "plain") is False
    # An expiry (1 000 x 2 = 2 000) adjusted up by a labelled late Finalize to 2 600.
    check = await runtime.ledger.check(p, CheckCommand("c1", "e", 10_000, 1.0, "cheap"))
    await runtime.ledger.deduct(p, DeductCommand("c1", "e", check.request_token, 1_000, "",
                                                 True, 1))  # fmt: skip
    faults.advance(61_000)
    await _reap(runtime, p, "c1", "e")
    late = await runtime.ledger.finalize(
        p,
        FinalizeCommand(
            "c1", "e", "COMPLETED_SUCCESS", total_actual_cost_grains=2_600, let_through=True
        ),
    )
    assert late.charged_grains == 2_600
    faults.reset()
    # A second hold under the settled id "plain" (400 x 2 = 800), charged on its own.
    await _settle_plain_hold(runtime, p)
    rows = (await Usage(runtime.postgres).customer_usage(p, UsageQuery("c1", bucket="day"))).rows
    # requests: lt, plain, e, h (the adjustment and the second hold count 0);
    # grains 700 + 700 + 2 600 + 0 + 800; let through: "lt" (700) and "e" (its expiry's
    # 2 000 and its adjustment's 600: one request).
    assert _sums(rows) == (4, 4_800, 2, 3_300)
    assert await _label(stores, p.tenant, "c1", "e") is True
    balance = await runtime.ledger.balance(p, "c1")
    assert (balance.balance, balance.reserved) == (100_000 - 4_800, 0)
    assert [r.problems for r in await runtime.admin.verify_integrity(p)] == [[]]


async def _settle_plain_hold(runtime: Runtime, p: Principal) -> None:
    """Request "h" settled through its hold at 0 (no usage), then a second hold under the
    settled id (tests/integration/test_usage.py's) streams 400 tokens: 800, on its own."""
    check = await runtime.ledger.check(p, CheckCommand("c1", "h", 1_000, 1.0, "cheap"))
    await runtime.ledger.finalize(
        p, FinalizeCommand("c1", "h", "FAILED_ERROR", request_token=check.request_token)
    )
    await _second_hold(runtime, p, "c1", "h")


# -- finding 3: the blocking client labels a fully enforced request --------------------------


class _HangingProxy:
    """A TCP proxy that can stop passing bytes without closing anything (a black hole:
    calls run into their deadlines, DEADLINE_EXCEEDED) and pass them again (the connections
    of the hang are closed then, so the client reconnects)."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.port = devservers.free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.hanging = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def __enter__(self) -> _HangingProxy:
        self._thread.start()
        self._run(self._listen())
        return self

    def __exit__(self, *exc: object) -> None:
        self._run(self._close_all(stop=True))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def hang(self) -> None:
        self.hanging = True

    def restore(self) -> None:
        self._run(self._close_all(stop=False))
        self.hanging = False

    def _run(self, work: Any) -> None:
        asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout=10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port,
                                                  reuse_address=True)  # fmt: skip

    async def _close_all(self, *, stop: bool) -> None:
        if stop and self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        if self.hanging:
            with contextlib.suppress(OSError, ConnectionError):
                while await reader.read(65536):
                    pass
            return
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self._writers.add(up_writer)

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    if not self.hanging:
                        dst.write(data)
                        await dst.drain()
            dst.transport.abort()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))


async def _rest_customer(service: ServiceProcess, tenant: Tenant, customer_id: str) -> None:
    async with rest_client(service, tenant) as rest:
        await rest.create_customer(customer_id, 10_000)


async def _rest_request(service: ServiceProcess, tenant: Tenant, customer_id: str,
                        request_id: str) -> dict[str, Any]:  # fmt: skip
    async with rest_client(service, tenant) as rest:
        return await rest.get(f"/v1/requests/{request_id}", customer_id=customer_id)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "asyncio"])
async def test_a_request_whose_last_deduct_fails_while_closing_is_not_let_through(
    service: ServiceProcess, tenant: Tenant, tmp_path: Path, blocking: bool
) -> None:
    """Check approved a hold of 100 completion tokens; the stream produced 50 (all within
    the hold) and ended; its one Deduct was in flight when the block closed, and ran into
    Beam's unreachability. Nothing went past what Beam's hold covered, and the guard chose
    an ordinary Finalize (not the let-through path) when it closed. The blocking client
    builds that Finalize after waiting for the Deduct, whose failure has meanwhile made the
    guard "let through" (FailOpen.extend): it sends let_through=True. The asyncio client
    built it before, and sends it unlabelled. The label must not depend on the client."""
    customer = f"c_{'b' if blocking else 'a'}_{int(time.time() * 1000) % 10**9}"
    await _rest_customer(service, tenant, customer)
    policy = FailOpen(max_calls=5)
    outbox = str(tmp_path / "outbox.sqlite3")
    kwargs: dict[str, Any] = {
        "retry": QUICK,
        "finalize_retry": QUICK,
        "failure_policy": policy,
        "timeout": 0.5,
        "finalize_timeout": 0.5,
        "outbox_path": outbox,
    }
    guard_args: dict[str, Any] = {"model": "cheap", "prompt_tokens": 10, "max_tokens": 100}
    with _HangingProxy(service.grpc_target) as proxy:
        if blocking:

            def run() -> tuple[str, bool, int]:
                with BeamClient(proxy.address, tenant.keys["enforcer"], **kwargs) as beam:
                    g = beam.guard(customer, **guard_args).open()
                    assert not g.fail_open
                    proxy.hang()
                    g.add(50)  # a Deduct is due: it goes out and hangs
                    assert g.deduct_in_flight
                    g.close()
                    proxy.restore()
                    for _ in range(800):  # bounded: the replay thread posts it
                        if beam.stats()["outbox_pending"] == 0 and g.settlement_queued:
                            break
                        if g.result is not None:
                            break
                        time.sleep(0.05)
                    beam._replay_pass(force=True)
                    return g.request_id, g.fail_open, beam.stats()["outbox_pending"]

            request_id, fail_open, pending = await asyncio.to_thread(run)
        else:
            async with AsyncBeamClient(proxy.address, tenant.keys["enforcer"],
                                       **kwargs) as abeam:  # fmt: skip
                g = await abeam.guard(customer, **guard_args).open()
                assert not g.fail_open
                proxy.hang()
                await g.add(50)
                assert g.deduct_in_flight
                await g.aclose()
                proxy.restore()
                for _ in range(800):
                    if g.result is not None or abeam.stats()["outbox_pending"] == 0:
                        break
                    await asyncio.sleep(0.05)
                await abeam._replay_pass(force=True)
                request_id, fail_open, pending = (
                    g.request_id,
                    g.fail_open,
                    abeam.stats()["outbox_pending"],
                )
    assert pending == 0
    settled = await _rest_request(service, tenant, customer, request_id)
    # Charged 10 + 50 x 2 at the hold's locked price, whichever client.
    assert settled["actual_cost_grains"] == "110"
    # Beam's hold covered every token: not let through (both clients alike).
    assert settled["let_through"] is False, (blocking, fail_open)


# -- finding 4: 0008 queues an ACCESS EXCLUSIVE lock without a lock_timeout -------------------


@pytest.mark.parametrize("table", ["requests", "usage_events"])
async def test_0008_waiting_for_a_reader_does_not_stop_settlements(
    stores: Stores, tmp_path: Path, table: str
) -> None:
    """A reader holds ACCESS SHARE on requests for a while: pg_dump of the ledger tables
    (docs/OPERATIONS.md's logical dumps) holds it for the whole dump; a ListRequests or a
    long analytics read on usage_events likewise (0008 locks usage_events second, holding
    requests meanwhile). 0008's LOCK TABLE ... ACCESS EXCLUSIVE waits without a lock_timeout,
    and every settlement queues behind it (and every Check's settled-id lookup, ListRequests,
    GetRequest) until the reader is done: for a dump, its whole duration. A settlement must
    not wait on the migration for more than a moment (lock_timeout, then try again)."""
    dsn = await _fresh_database(stores)
    directory = tmp_path / "to7"
    directory.mkdir()
    for path in migration_files():
        if path.stem <= "0007_claim_second_hold":
            (directory / path.name).write_text(path.read_text())
    setup, reader, migrator, settler = [await asyncpg.connect(dsn) for _ in range(4)]
    migration: asyncio.Task[list[str]] | None = None
    try:
        await migrate(setup, directory)
        await setup.execute("INSERT INTO customers (tenant, customer_id) VALUES ('t', 'c')")
        await _append(setup, "credit:1", "credit", 1_000_000, "", datetime.now(UTC))
        reading = reader.transaction()
        await reading.start()
        # Like pg_dump's ACCESS SHARE (``table`` is one of two constants).
        await reader.fetchval(f"SELECT count(*) FROM {table}")  # noqa: S608
        migration = asyncio.create_task(migrate(migrator))
        for _ in range(100):  # bounded: until 0008 waits for its lock
            waiting = await setup.fetchval(
                """SELECT count(*) FROM pg_locks
                   WHERE NOT granted AND relation = $1::regclass""",
                table,
            )
            if waiting:
                break
            await asyncio.sleep(0.05)
        assert waiting == 1
        started = time.monotonic()
        try:  # bounded here; Beam's own bound is asyncpg's command_timeout (30 s)
            await asyncio.wait_for(_settle(settler, _item("r1", "completed", 700, "cheap")), 8)
            blocked = False
        except TimeoutError:
            blocked = True
        waited = time.monotonic() - started
        assert (blocked, waited < 5.0) == (False, True), f"a settlement waited {waited:.1f} s"
    finally:
        with contextlib.suppress(Exception):
            await reading.rollback()
        if migration is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(migration, 30)
        for conn in (setup, reader, migrator, settler):
            await conn.close()
