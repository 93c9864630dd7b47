"""The client's pure parts: targets and keys, back-off, statuses, chunk reading, estimates."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
from beam_client import (
    ConfigurationError,
    FailOpen,
    MemoryOutbox,
    ModelPrice,
    OutboxEntry,
    RequestStatus,
    RetryPolicy,
    SQLiteOutbox,
    parse_target,
)
from beam_client._guard import status_for
from beam_client.adapters import _Reader, anthropic_step, estimate_tokens, openai_step
from beam_client.config import DEV_API_KEY, Target, resolve
from beam_client.outbox import next_attempt_at, open_outbox

from tests.client.fakes import (
    anthropic_events_head,
    anthropic_events_tail,
    anthropic_text,
    openai_chunk,
    openai_usage_chunk,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("beam.beam-system.svc:9090", Target("beam.beam-system.svc:9090", tls=False)),
        ("beam.beam-system.svc", Target("beam.beam-system.svc:9090", tls=False)),
        ("grpc://localhost:19090", Target("localhost:19090", tls=False)),
        ("grpc://localhost:19090/", Target("localhost:19090", tls=False)),
        ("grpcs://beam.example.com", Target("beam.example.com:443", tls=True)),
        ("GRPCS://beam.example.com:8443", Target("beam.example.com:8443", tls=True)),
        ("[::1]:9090", Target("[::1]:9090", tls=False)),
        ("::1", Target("[::1]:9090", tls=False)),
        (" 10.0.0.7:9090 ", Target("10.0.0.7:9090", tls=False)),
    ],
)
def test_beam_server_forms(value: str, expected: Target) -> None:
    assert parse_target(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("http://localhost:8080", "REST URL"),
        ("https://beam.example.com", "REST URL"),
        ("unix:///tmp/beam.sock", "unknown scheme"),
        ("grpc://", "expected host"),
        ("grpc://host:9090/path", "expected host"),
        ("host:http", "bad port"),
        ("host:0", "bad port"),
        ("", "empty"),
    ],
)
def test_bad_beam_server_values_are_refused_clearly(value: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_target(value)


def test_target_and_key_come_from_arguments_then_the_environment_then_defaults() -> None:
    env = {"BEAM_GRPC_TARGET": "grpcs://beam.example.com", "BEAM_API_KEY": "beam_sk_a_b"}
    assert resolve(None, None, env) == (Target("beam.example.com:443", True), "beam_sk_a_b")
    assert resolve("other:1", "k", env) == (Target("other:1", False), "k")
    # Nothing set: beam dev on localhost, with the dev key (as the CLI does).
    assert resolve(None, None, {}) == (Target("localhost:9090", False), DEV_API_KEY)
    assert resolve("127.0.0.1:9", None, {})[1] == DEV_API_KEY
    # The dev key is never sent elsewhere.
    with pytest.raises(ConfigurationError, match="BEAM_API_KEY"):
        resolve("beam.beam-system.svc:9090", None, {})


def test_back_off_is_bounded_and_jittered_down() -> None:
    policy = RetryPolicy(max_attempts=6, initial_backoff=0.1, max_backoff=0.5, jitter=0.2)
    for attempt, ceiling in enumerate([0.1, 0.2, 0.4, 0.5, 0.5], start=1):
        for _ in range(50):
            assert ceiling * 0.8 - 1e-9 <= policy.backoff(attempt) <= ceiling + 1e-9
    assert policy.worst_case_wait() == pytest.approx(1.7)
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


class ReadTimeout(Exception):  # like httpx.ReadTimeout
    pass


@pytest.mark.parametrize(
    ("error", "stop_reason", "status"),
    [
        (None, "", RequestStatus.COMPLETED_SUCCESS),
        (None, "INSUFFICIENT_BALANCE", RequestStatus.KILLED_INSUFFICIENT_BALANCE),
        (None, "MAX_REQUEST_GRAINS_EXCEEDED", RequestStatus.KILLED_INSUFFICIENT_BALANCE),
        (RuntimeError("x"), "INSUFFICIENT_BALANCE", RequestStatus.KILLED_INSUFFICIENT_BALANCE),
        (None, "HOLD_EXPIRED", RequestStatus.FAILED_TIMEOUT),
        (None, "BEAM_UNAVAILABLE", RequestStatus.FAILED_ERROR),
        (None, "HOLD_NOT_FOUND", RequestStatus.FAILED_ERROR),
        (None, "FAIL_OPEN_MAX_TOKENS", RequestStatus.COMPLETED_SUCCESS),
        (RuntimeError("x"), "", RequestStatus.FAILED_ERROR),
        (asyncio.CancelledError(), "", RequestStatus.FAILED_TIMEOUT),
        (TimeoutError(), "", RequestStatus.FAILED_TIMEOUT),
        (KeyboardInterrupt(), "", RequestStatus.FAILED_TIMEOUT),
        (ReadTimeout(), "", RequestStatus.FAILED_TIMEOUT),
    ],
)
def test_the_status_follows_how_the_block_ended(
    error: BaseException | None, stop_reason: str, status: RequestStatus
) -> None:
    assert status_for(error, stop_reason) is status


def test_estimate_tokens() -> None:
    assert [estimate_tokens(t) for t in ("", "a", "abcd", "abcde", "x" * 40)] == [0, 1, 1, 2, 10]


def test_openai_chat_chunks_count_content_and_the_usage_chunk_sets_usage() -> None:
    reader = _Reader(estimate_tokens)
    assert openai_step(openai_chunk("Hello world!"), reader).tokens == 3
    role_only = NS(choices=[NS(delta=NS(role="assistant", content=None))], usage=None)
    assert openai_step(role_only, reader).tokens == 0
    tool = NS(
        choices=[NS(delta=NS(content=None, tool_calls=[NS(function=NS(arguments='{"a": 1}'))]))],
        usage=None,
    )
    assert openai_step(tool, reader).tokens == 2
    final = openai_step(openai_usage_chunk(100, 42, 64), reader)
    assert (final.tokens, final.usage) == (
        0,
        {"prompt_tokens": 100, "completion_tokens": 42, "cached_prompt_tokens": 64},
    )
    # Plain dicts (parsed server-sent events) read the same.
    as_dict = {"choices": [{"delta": {"content": "abcdefgh"}}], "usage": None}
    assert openai_step(as_dict, reader).tokens == 2


def test_a_chunk_carrying_a_cumulative_count_is_counted_as_it_says() -> None:
    reader = _Reader(estimate_tokens)
    chunks = [
        NS(
            choices=[NS(delta=NS(content="x" * 40))], usage=NS(prompt_tokens=9, completion_tokens=3)
        ),
        NS(choices=[NS(delta=NS(content="y"))], usage=NS(prompt_tokens=9, completion_tokens=7)),
    ]
    assert [openai_step(c, reader).tokens for c in chunks] == [3, 4]


def test_openai_responses_events() -> None:
    reader = _Reader(estimate_tokens)
    delta = NS(type="response.output_text.delta", delta="abcdefgh")
    assert openai_step(delta, reader).tokens == 2
    done = NS(
        type="response.completed",
        response=NS(
            usage=NS(input_tokens=50, output_tokens=20, input_tokens_details=NS(cached_tokens=10))
        ),
    )
    assert openai_step(done, reader).usage == {
        "prompt_tokens": 50,
        "completion_tokens": 20,
        "cached_prompt_tokens": 10,
    }
    assert openai_step(NS(type="response.created"), reader).tokens == 0


def test_anthropic_events() -> None:
    reader = _Reader(estimate_tokens)
    start, block = anthropic_events_head(30, cache_read=500, cache_write=70)
    assert anthropic_step(start, reader).usage == {
        "prompt_tokens": 600,
        "cached_prompt_tokens": 500,
    }
    assert anthropic_step(block, reader).tokens == 0
    assert anthropic_step(anthropic_text("abcdefgh"), reader).tokens == 2
    thinking = NS(type="content_block_delta", delta=NS(type="thinking_delta", thinking="abcd"))
    assert anthropic_step(thinking, reader).tokens == 1
    tool = {
        "type": "content_block_delta",
        "delta": {"type": "input_json_delta", "partial_json": "{}"},
    }
    assert anthropic_step(tool, reader).tokens == 1
    _, delta, stop = anthropic_events_tail(88)
    assert anthropic_step(delta, reader).usage == {"completion_tokens": 88}
    assert anthropic_step(stop, reader) == anthropic_step(NS(type="ping"), reader)


def test_worst_case_of_a_model_price() -> None:
    mini = ModelPrice(150_000, 600_000, 75_000)
    # (60 x 150000 + 40 x 75000 + 10 x 600000) / 1e6 = 9 + 3 + 6 = 18
    assert mini.worst_case(prompt_tokens=100, cached_prompt_tokens=40, max_tokens=10) == 18
    # No cached price: cached tokens at the input price; rounded up once.
    assert ModelPrice(1, 1).worst_case(1, 1, 1) == 1
    assert ModelPrice(1, 1).worst_case(0, 0, 0) == 0


# -- the fail-open allowances (pure) -----------------------------------------------------


def _admit(policy: FailOpen, customer: str, max_tokens: int = 100) -> bool:
    record = policy.admit(
        customer_id=customer, request_id=f"r-{customer}", model="cheap", prompt_tokens=10,
        cached_prompt_tokens=0, max_tokens=max_tokens, estimated_grains=0,
    )  # fmt: skip
    return record is not None


CHEAP = ModelPrice(input_grains_per_million=1_000_000, output_grains_per_million=2_000_000)


def test_fail_open_allowances_per_customer_and_per_process() -> None:
    policy = FailOpen(
        max_calls=5, max_calls_per_customer=2, max_grains_per_customer=500,
        prices={"cheap": CHEAP},
    )  # fmt: skip
    # Worst case 10 + 100 x 2 = 210 grains: two per customer fit in 500 and 2 calls.
    assert [_admit(policy, "a") for _ in range(3)] == [True, True, False]
    # Another customer has its own allowance; 200 tokens (410 grains) fit once.
    assert _admit(policy, "b", max_tokens=200)
    assert not _admit(policy, "b", max_tokens=200)
    assert _admit(policy, "c")
    assert _admit(policy, "d")
    assert not _admit(policy, "e")  # the process allowance of 5 calls is spent
    assert policy.stats()["fail_open_calls"] == 5
    assert policy.stats()["fail_open_refusals"] == 3


def test_fail_open_allowance_window_refills(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("beam_client.policy.time.time", lambda: now[0])
    policy = FailOpen(max_calls=2, window_seconds=60)
    assert [_admit(policy, "a") for _ in range(3)] == [True, True, False]
    now[0] += 59
    assert not _admit(policy, "a")
    now[0] += 2  # the first two admissions are out of the window
    assert [_admit(policy, "a") for _ in range(3)] == [True, True, False]
    # The counters of what was let through keep growing; only the allowance refills.
    assert policy.stats()["fail_open_calls"] == 4


def test_fail_open_mid_stream_extension_is_what_the_grains_left_pay_for() -> None:
    policy = FailOpen(max_calls=3, max_grains=301, prices={"cheap": CHEAP})
    grant = policy.extend(
        customer_id="a", request_id="r1", model="cheap", covered_tokens=400, max_tokens=1000
    )
    # 301 grains at 2 a token: 150 tokens past the 400 covered (300 grains spent).
    assert grant is not None
    assert (grant.allowance_tokens, grant.allowance_grains, grant.mid_stream) == (150, 300, True)
    # 1 grain left: nothing more past the hold, but the call is recorded.
    second = policy.extend(
        customer_id="a", request_id="r2", model="cheap", covered_tokens=10, max_tokens=1000
    )
    assert second is not None
    assert second.allowance_tokens == 0
    # A calls-only allowance: up to max_tokens; no max_tokens, no bound: refused.
    calls_only = FailOpen(max_calls=1)
    third = calls_only.extend(
        customer_id="a", request_id="r3", model="x", covered_tokens=40, max_tokens=100
    )
    assert third is not None
    assert third.allowance_tokens == 60
    unbounded = FailOpen(max_calls=1)
    assert (
        unbounded.extend(
            customer_id="a", request_id="r4", model="x", covered_tokens=0, max_tokens=0
        )
        is None
    )


# -- the outbox (a real SQLite file) ------------------------------------------------------


def test_the_sqlite_outbox_keeps_entries_across_opens_scoped_and_bounded(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    box = SQLiteOutbox(path, max_entries=3)
    entries = [
        OutboxEntry("scope-a", "cus_1", f"req_{i}", b"payload-%d" % i, "finalize", 0, 0.0, i)
        for i in range(3)
    ]
    assert all(box.put(e) for e in entries)
    assert not box.put(OutboxEntry("scope-a", "cus_1", "req_9", b"x", "finalize", 0, 0.0, 9))
    assert box.put(entries[0])  # replacing an entry is not growing the outbox
    box.reschedule(entries[1], 3, 500.0)
    box.close()

    again = SQLiteOutbox(path)  # as a restarted process would
    assert again.count("scope-a") == 3
    assert again.count("scope-b") == 0  # another Beam or key sees nothing of it
    due = again.due("scope-a", now=100.0, limit=10)
    assert [e.request_id for e in due] == ["req_0", "req_2"]  # req_1 waits until 500
    assert due[0].payload == b"payload-0"
    assert [e.attempts for e in again.due("scope-a", now=1000.0, limit=10)] == [0, 3, 0]
    again.remove("scope-a", "cus_1", "req_0")
    assert again.count("scope-a") == 2
    again.close()


def test_the_outbox_back_off_is_bounded() -> None:
    delays = [next_attempt_at(0.0, attempts) for attempts in range(1, 8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_an_unwritable_outbox_path_falls_back_to_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    box = open_outbox(str(blocker / "outbox.sqlite3"))
    assert isinstance(box, MemoryOutbox)
    assert isinstance(open_outbox(":memory:"), MemoryOutbox)
