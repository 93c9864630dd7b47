"""Every way out of a guarded stream closes the upstream and bills what was streamed (issue 16).

The real ``openai`` and ``anthropic`` SDKs stream from the fake providers
(tests/client/providers.py) through ``g.openai(...)`` / ``g.anthropic(...)``, with
``create(stream=True)`` and with the SDKs' stream helpers (Chat Completions, the Responses
API, Messages), guarded by a real ``beam serve``.
The fake would generate 1,000 tokens; after 100 it waits for the client to hang up (at
most ``PAUSE_SECONDS``) before it goes on. The consumer leaves after those 100 tokens: it
``break``s, raises, is cancelled, abandons the generator the guard runs in
(``GeneratorExit``), is interrupted (``KeyboardInterrupt``), or its SDK gives up waiting
(``APITimeoutError``). Every exit must leave the fake with exactly the 100 tokens it
generated and the connection closed by the client, and the ledger with exactly those 100
tokens and the prompt: on the "cheap" model (1 grain per input token, 2 per output token),
25 + 100 x 2 = 225 grains for OpenAI (the prompt estimate, as the stream ended before its
usage chunk), 30 + 100 x 2 = 230 for Anthropic (the prompt its ``message_start``
reported). Before the fix an exit other than Beam's stop left the upstream open: the fake
generated all 1,000 tokens and the ledger held 100.

The app keeps its stream object and its SDK client alive past the guarded block, as a
long-lived app does: then nothing but the adapter (or a stream helper's own ``with``)
closes the upstream. (A dropped Anthropic stream closes itself; an OpenAI one waits for
the cyclic garbage collector.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from beam_client import AsyncBeamClient, BeamClient, RequestStatus

from tests.client.conftest import Admin
from tests.client.providers import APIS, RESPONSES, Api, FakeProvider, Reply
from tests.support.stack import ServiceProcess, Tenant

pytestmark = pytest.mark.timeout(60)

BALANCE = 100_000
PROMPT_ESTIMATE = 25  # the app's estimate, and OpenAI's count of the prompt
ANTHROPIC_PROMPT = 30  # Anthropic's count (message_start)
TOKENS_READ = 100  # the consumer leaves after this many content tokens
PAUSE_SECONDS = 5.0
SDK_TIMEOUT_SECONDS = 2.5  # the SDK's read timeout in the "timeout" exit (< PAUSE_SECONDS)

STATUS = {
    "break": RequestStatus.COMPLETED_SUCCESS,
    "raise": RequestStatus.FAILED_ERROR,
    "generator_exit": RequestStatus.FAILED_TIMEOUT,
    "cancel": RequestStatus.FAILED_TIMEOUT,
    "cancel_in_body": RequestStatus.FAILED_TIMEOUT,
    "keyboard_interrupt": RequestStatus.FAILED_TIMEOUT,
    "timeout": RequestStatus.FAILED_TIMEOUT,
}
SETTLED_STATUS = {
    RequestStatus.COMPLETED_SUCCESS: "completed",
    RequestStatus.FAILED_ERROR: "failed",
    RequestStatus.FAILED_TIMEOUT: "timeout",
}
# "cancel": cancelled while waiting for the next chunk (inside the adapter); "cancel_in_body":
# while the app awaits something else between two chunks (the adapter is suspended).
ASYNC_EXITS = ["break", "raise", "generator_exit", "cancel", "cancel_in_body", "timeout"]
SYNC_EXITS = ["break", "raise", "generator_exit", "keyboard_interrupt", "timeout"]


class ConsumerFailed(Exception):
    """The app's own error, raised while it reads the stream."""


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    reply = Reply(
        tokens=1000,
        prompt_tokens=PROMPT_ESTIMATE,
        pause_after=TOKENS_READ,
        pause_seconds=PAUSE_SECONDS,
    )
    with FakeProvider(default=reply) as provider:
        yield provider


def prompt_of(api: Api) -> int:
    return ANTHROPIC_PROMPT if api.provider == "anthropic" else PROMPT_ESTIMATE


async def assert_billed_as_streamed(
    api: Api, exit_: str, guard: Any, fake: FakeProvider, admin: Admin, customer: str
) -> None:
    call = await fake.call(0)
    assert (call.generated, call.closed_by_client, call.outcome) == (
        TOKENS_READ,
        True,
        "closed_by_client",
    )
    assert guard.status is STATUS[exit_]
    charge = prompt_of(api) + TOKENS_READ * 2  # 225 (OpenAI) or 230 (Anthropic)
    assert guard.result is not None
    assert guard.result.charged_grains == charge
    assert await admin.balance(customer) == (BALANCE - charge, 0, BALANCE - charge)
    settled = await admin.request(guard.request_id, customer)
    assert (settled["status"], settled["actual_cost_grains"]) == (
        SETTLED_STATUS[STATUS[exit_]],
        str(charge),
    )
    assert (settled["prompt_tokens"], settled["completion_tokens"]) == (
        str(prompt_of(api)),
        str(TOKENS_READ),
    )


# -- async ---------------------------------------------------------------------------------


@pytest.mark.parametrize("exit_", ASYNC_EXITS)
@pytest.mark.parametrize("api", APIS + RESPONSES, ids=str)
async def test_every_async_exit_closes_the_upstream_and_bills_what_was_streamed(
    api: Api, exit_: str, client: AsyncBeamClient, admin: Admin, fake: FakeProvider
) -> None:
    customer = await admin.customer(BALANCE)
    if api.provider == "anthropic":
        fake.default.prompt_tokens = ANTHROPIC_PROMPT
    timeout = SDK_TIMEOUT_SECONDS if exit_ == "timeout" else PAUSE_SECONDS * 4
    guards: list[Any] = []
    opened: list[Any] = []  # the app keeps its stream: only closing it ends the upstream
    reached = asyncio.Event()

    async with api.async_client(fake, timeout) as sdk:

        async def read(stop_at: int | None) -> None:
            """The app: reads the guarded stream, leaves after ``stop_at`` tokens."""
            async with client.guard(
                customer, model="cheap", prompt_tokens=PROMPT_ESTIMATE, max_tokens=1000
            ) as g:
                guards.append(g)
                async with api.astream(sdk, "cheap", 1000) as stream:
                    opened.append(stream)
                    tokens = 0
                    async for item in api.meter(g, stream):
                        tokens += api.is_token(item)
                        if tokens == stop_at:
                            if exit_ == "break":
                                break
                            if exit_ == "raise":
                                raise ConsumerFailed("the app failed mid-stream")
                            reached.set()  # the test cancels the task now
                            if exit_ == "cancel_in_body":
                                await asyncio.Event().wait()  # e.g. a slow websocket send

        async def answer() -> AsyncIterator[Any]:
            """A generator the guard runs in (a web response's body)."""
            async with client.guard(
                customer, model="cheap", prompt_tokens=PROMPT_ESTIMATE, max_tokens=1000
            ) as g:
                guards.append(g)
                async with api.astream(sdk, "cheap", 1000) as stream:
                    opened.append(stream)
                    async for item in api.meter(g, stream):
                        if api.is_token(item):
                            yield item

        if exit_ in ("break", "raise"):
            if exit_ == "raise":
                with pytest.raises(ConsumerFailed):
                    await read(TOKENS_READ)
            else:
                await read(TOKENS_READ)
        elif exit_ == "generator_exit":
            body = answer()
            for _ in range(TOKENS_READ):
                await anext(body)
            await body.aclose()  # the web client went away
        elif exit_ in ("cancel", "cancel_in_body"):
            task = asyncio.create_task(read(TOKENS_READ))
            await asyncio.wait_for(reached.wait(), PAUSE_SECONDS * 4)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:  # "timeout": the fake pauses longer than the SDK waits
            with pytest.raises(api.timeout_error):
                await read(None)

        (g,) = guards
        await assert_billed_as_streamed(api, exit_, g, fake, admin, customer)


# -- sync ----------------------------------------------------------------------------------


@pytest.mark.parametrize("exit_", SYNC_EXITS)
@pytest.mark.parametrize("api", APIS + RESPONSES, ids=str)
async def test_every_sync_exit_closes_the_upstream_and_bills_what_was_streamed(
    api: Api,
    exit_: str,
    service: ServiceProcess,
    tenant: Tenant,
    admin: Admin,
    fake: FakeProvider,
) -> None:
    customer = await admin.customer(BALANCE)
    if api.provider == "anthropic":
        fake.default.prompt_tokens = ANTHROPIC_PROMPT
    timeout = SDK_TIMEOUT_SECONDS if exit_ == "timeout" else PAUSE_SECONDS * 4
    guards: list[Any] = []
    opened: list[Any] = []  # the app keeps its stream: only closing it ends the upstream

    def run() -> str:
        """The app, in blocking code; returns how its reading ended."""
        # The SDK client outlives the request, as in an app: only the adapter closes the
        # upstream (or, with a stream helper, the helper's own ``with``).
        with (
            BeamClient(service.grpc_target, tenant.keys["enforcer"]) as beam,
            api.sync_client(fake, timeout) as sdk,
        ):

            def read(stop_at: int | None) -> None:
                with beam.guard(
                    customer, model="cheap", prompt_tokens=PROMPT_ESTIMATE, max_tokens=1000
                ) as g:
                    guards.append(g)
                    with api.stream(sdk, "cheap", 1000) as stream:
                        opened.append(stream)
                        tokens = 0
                        for item in api.meter(g, stream):
                            tokens += api.is_token(item)
                            if tokens == stop_at:
                                if exit_ == "break":
                                    break
                                if exit_ == "raise":
                                    raise ConsumerFailed("the app failed mid-stream")
                                raise KeyboardInterrupt  # Ctrl-C while streaming

            def answer() -> Iterator[Any]:
                with beam.guard(
                    customer, model="cheap", prompt_tokens=PROMPT_ESTIMATE, max_tokens=1000
                ) as g:
                    guards.append(g)
                    with api.stream(sdk, "cheap", 1000) as stream:
                        opened.append(stream)
                        for item in api.meter(g, stream):
                            if api.is_token(item):
                                yield item

            ended = "left"
            try:
                if exit_ == "generator_exit":
                    body = answer()
                    for _ in range(TOKENS_READ):
                        next(body)
                    body.close()
                else:
                    read(None if exit_ == "timeout" else TOKENS_READ)
            except KeyboardInterrupt:
                ended = "interrupted"
            except ConsumerFailed:
                ended = "failed"
            except api.timeout_error:
                ended = "timed out"
            # Done with the fake while the SDK client (its connections) is still open, as a
            # long-lived client in an app would be.
            fake.wait_call(0)
            return ended

    ended = await asyncio.to_thread(run)
    assert (
        ended
        == {
            "break": "left",
            "generator_exit": "left",
            "raise": "failed",
            "keyboard_interrupt": "interrupted",
            "timeout": "timed out",
        }[exit_]
    )
    (g,) = guards
    await assert_billed_as_streamed(api, exit_, g, fake, admin, customer)


@pytest.mark.parametrize("api", [Api("openai"), Api("anthropic")], ids=str)
async def test_aclosing_closes_a_wrapper_the_app_keeps_before_the_guard_settles(
    api: Api, client: AsyncBeamClient, admin: Admin, fake: FakeProvider
) -> None:
    customer = await admin.customer(BALANCE)
    if api.provider == "anthropic":
        fake.default.prompt_tokens = ANTHROPIC_PROMPT
    async with api.async_client(fake) as sdk:
        async with (
            client.guard(
                customer, model="cheap", prompt_tokens=PROMPT_ESTIMATE, max_tokens=1000
            ) as g,
            api.astream(sdk, "cheap", 1000) as stream,
        ):
            tokens = 0
            # The app keeps its wrapper (``chunks``): only aclosing() closes it here.
            async with contextlib.aclosing(api.meter(g, stream)) as chunks:
                async for item in chunks:
                    tokens += api.is_token(item)
                    if tokens == TOKENS_READ:
                        break
            # Closed at aclosing's exit, before the guard's: the provider stopped at 100.
            call = await fake.call(0)
            assert (call.generated, call.closed_by_client) == (TOKENS_READ, True)
            assert g.status is None  # not settled yet
        await assert_billed_as_streamed(api, "break", g, fake, admin, customer)
