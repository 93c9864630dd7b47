"""The client's pure parts: targets and keys, back-off, statuses, chunk reading, estimates."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace as NS

import pytest
from beam_client import ConfigurationError, ModelPrice, RequestStatus, RetryPolicy, parse_target
from beam_client._guard import status_for
from beam_client.adapters import _Reader, anthropic_step, estimate_tokens, openai_step
from beam_client.config import DEV_API_KEY, Target, resolve

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
