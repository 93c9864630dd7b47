"""The real SDKs' streams through the guard: usage, cached tokens, faults (issue 16).

The real ``openai`` and ``anthropic`` SDKs call the fake providers
(tests/client/providers.py), which speak the providers' wire formats, and the adapters meter
what the SDKs parse from them against a real ``beam serve``. The ledger must hold exactly
what the provider reports, or — where its usage never arrives — what it streamed: the
tokens the fake generated, each one "tok " (1 token by the adapters' rule).

Prices (tests/support/stack.py): "cheap" 1 grain per input token, 2 per output token;
"gpt-4o-mini" 150,000 / 600,000 / 75,000 (cached input) grains per million tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from beam_client import AsyncBeamClient, BeamClient, InsufficientBalance, RequestStatus

from tests.client.conftest import Admin
from tests.client.providers import APIS, RESPONSES, Api, FakeProvider, Reply
from tests.support.stack import ServiceProcess, Tenant

pytestmark = pytest.mark.timeout(60)

BALANCE = 1_000_000
FACES = ["async", "sync"]


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    with FakeProvider() as provider:
        yield provider


async def stream_through_guard(
    face: str,
    api: Api,
    fake: FakeProvider,
    *,
    client: AsyncBeamClient,
    service: ServiceProcess,
    tenant: Tenant,
    customer: str,
    model: str,
    prompt_tokens: int,
    max_tokens: int,
    buffer_multiplier: float = 0.0,
    cached_prompt_tokens: int = 0,
) -> tuple[Any, int, BaseException | None]:
    """The app: one guarded stream read to its end. (guard, tokens read, what it raised)."""
    options: dict[str, Any] = dict(
        model=model,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        buffer_multiplier=buffer_multiplier,
        cached_prompt_tokens=cached_prompt_tokens,
    )
    if face == "async":
        guards: list[Any] = []
        tokens = 0
        try:
            async with (
                api.async_client(fake) as sdk,
                client.guard(customer, **options) as g,
            ):
                guards.append(g)
                async with api.astream(sdk, model, max_tokens) as stream:
                    async for item in api.meter(g, stream):
                        tokens += api.is_token(item)
        except Exception as error:
            return guards[0], tokens, error
        return guards[0], tokens, None

    def run() -> tuple[Any, int, BaseException | None]:
        tokens = 0
        guard: Any = None
        with (
            BeamClient(service.grpc_target, tenant.keys["enforcer"]) as beam,
            api.sync_client(fake) as sdk,
        ):
            try:
                with (
                    beam.guard(customer, **options) as guard,
                    api.stream(sdk, model, max_tokens) as stream,
                ):
                    for item in api.meter(guard, stream):
                        tokens += api.is_token(item)
            except Exception as error:
                return guard, tokens, error
        return guard, tokens, None

    return await asyncio.to_thread(run)


async def assert_settled(
    admin: Admin, customer: str, guard: Any, status: str, charge: int, prompt: int, completion: int
) -> None:
    assert guard.result is not None
    assert guard.result.charged_grains == charge
    assert await admin.balance(customer) == (BALANCE - charge, 0, BALANCE - charge)
    settled = await admin.request(guard.request_id, customer)
    assert (settled["status"], settled["actual_cost_grains"]) == (status, str(charge))
    assert (settled["prompt_tokens"], settled["completion_tokens"]) == (
        str(prompt),
        str(completion),
    )


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("api", APIS + RESPONSES, ids=str)
async def test_a_stream_read_to_its_end_is_charged_the_providers_usage_with_cached_tokens(
    api: Api,
    face: str,
    fake: FakeProvider,
    client: AsyncBeamClient,
    service: ServiceProcess,
    tenant: Tenant,
    admin: Admin,
) -> None:
    customer = await admin.customer(BALANCE)
    # The provider counts a prompt of 1,200 tokens, 1,000 of them read from its cache
    # (OpenAI: prompt_tokens_details.cached_tokens; Responses: input_tokens_details;
    # Anthropic: input_tokens 200 + cache_read_input_tokens 1,000), and streams 130 tokens;
    # the app estimated 1,000.
    fake.queue(Reply(tokens=130, prompt_tokens=1200, cached_tokens=1000))
    g, tokens, error = await stream_through_guard(
        face, api, fake, client=client, service=service, tenant=tenant, customer=customer,
        model="gpt-4o-mini", prompt_tokens=1000, max_tokens=500,
    )  # fmt: skip
    assert error is None
    assert tokens == 130
    call = await fake.call(0)
    assert (call.generated, call.closed_by_client, call.outcome) == (130, False, "completed")
    assert call.max_tokens == 500
    assert g.status is RequestStatus.COMPLETED_SUCCESS
    assert (g.reported_usage.prompt_tokens, g.reported_usage.cached_prompt_tokens) == (1200, 1000)
    assert g.reported_usage.completion_tokens == 130
    # (200 x 150,000 + 1,000 x 75,000 + 130 x 600,000) / 1e6 = 30 + 75 + 78 = 183
    await assert_settled(admin, customer, g, "completed", 183, 1200, 130)


USAGE_MISSING = [Api("openai"), Api("openai", helper=True), Api("anthropic"), *RESPONSES]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("api", USAGE_MISSING, ids=str)
async def test_a_stream_without_usage_is_charged_the_tokens_it_streamed(
    api: Api,
    face: str,
    fake: FakeProvider,
    client: AsyncBeamClient,
    service: ServiceProcess,
    tenant: Tenant,
    admin: Admin,
) -> None:
    customer = await admin.customer(BALANCE)
    # No usage chunk (OpenAI), no usage in response.completed (Responses), no usage in
    # message_delta (Anthropic; its message_start still counts the prompt: 30).
    # Anthropic's messages.stream() helper cannot parse a message_delta without usage,
    # which the real API always sends: not run here.
    fake.queue(Reply(tokens=40, prompt_tokens=30, usage=False))
    g, tokens, error = await stream_through_guard(
        face, api, fake, client=client, service=service, tenant=tenant, customer=customer,
        model="cheap", prompt_tokens=25, max_tokens=500,
    )  # fmt: skip
    assert error is None
    assert tokens == 40
    call = await fake.call(0)
    assert (call.generated, call.outcome) == (40, "completed")
    assert g.status is RequestStatus.COMPLETED_SUCCESS
    # OpenAI: the prompt estimate 25 + 40 x 2 = 105; Anthropic: the reported 30 + 80 = 110.
    prompt = 30 if api.provider == "anthropic" else 25
    await assert_settled(admin, customer, g, "completed", prompt + 80, prompt, 40)


@pytest.mark.parametrize("fault", ["drop", "error"])
@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("api", APIS, ids=str)
async def test_a_stream_that_fails_mid_way_is_charged_what_it_streamed_as_failed(
    api: Api,
    face: str,
    fault: str,
    fake: FakeProvider,
    client: AsyncBeamClient,
    service: ServiceProcess,
    tenant: Tenant,
    admin: Admin,
) -> None:
    customer = await admin.customer(BALANCE)
    # After 40 of 300 tokens the provider drops the connection (the chunked body never
    # ends) or sends an error event (OpenAI: data: {"error": ...}; Anthropic: event: error,
    # overloaded_error).
    fake.queue(Reply(tokens=300, prompt_tokens=30, fault=fault, fault_after=40))  # type: ignore[arg-type]
    g, tokens, error = await stream_through_guard(
        face, api, fake, client=client, service=service, tenant=tenant, customer=customer,
        model="cheap", prompt_tokens=25, max_tokens=500,
    )  # fmt: skip
    sdk = openai if api.provider == "openai" else anthropic
    if fault == "drop":
        assert isinstance(error, sdk.APIConnectionError)
    elif api.provider == "openai":
        assert type(error) is openai.APIError
        assert str(error) == "The server had an error while processing your request."
    else:
        assert isinstance(error, anthropic.APIStatusError)
        assert "overloaded_error" in str(error)
    assert tokens == 40
    call = await fake.call(0)
    assert (call.generated, call.outcome) == (40, "dropped" if fault == "drop" else "error_event")
    assert g.status is RequestStatus.FAILED_ERROR
    # OpenAI: the prompt estimate 25 + 40 x 2 = 105; Anthropic: the reported 30 + 80 = 110.
    prompt = 30 if api.provider == "anthropic" else 25
    await assert_settled(admin, customer, g, "failed", prompt + 80, prompt, 40)


async def test_non_streaming_calls_report_the_providers_usage(
    fake: FakeProvider, client: AsyncBeamClient, admin: Admin
) -> None:
    customer = await admin.customer(BALANCE)
    fake.queue(
        Reply(tokens=70, prompt_tokens=1200, cached_tokens=1000),
        Reply(tokens=70, prompt_tokens=1200, cached_tokens=1000),
    )
    messages = [{"role": "user", "content": "Summarise the policy."}]
    async with (
        openai.AsyncOpenAI(api_key="sk-fake", base_url=fake.openai_url, max_retries=0) as sdk,
        client.guard(customer, model="gpt-4o-mini", prompt_tokens=1000, max_tokens=100) as g,
    ):
        completion = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=messages, max_tokens=100
        )
        usage = completion.usage
        assert usage is not None
        assert usage.prompt_tokens_details is not None
        g.usage(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_prompt_tokens=usage.prompt_tokens_details.cached_tokens,
        )
    async with (
        anthropic.AsyncAnthropic(
            api_key="sk-ant-fake", base_url=fake.anthropic_url, max_retries=0
        ) as sdk,
        client.guard(customer, model="gpt-4o-mini", prompt_tokens=1000, max_tokens=100) as g2,
    ):
        message = await sdk.messages.create(model="gpt-4o-mini", messages=messages, max_tokens=100)
        cached = message.usage.cache_read_input_tokens or 0
        g2.usage(
            prompt_tokens=message.usage.input_tokens + cached,
            completion_tokens=message.usage.output_tokens,
            cached_prompt_tokens=cached,
        )
    assert completion.choices[0].message.content == "tok " * 70
    assert message.content[0].type == "text"
    assert message.content[0].text == "tok " * 70
    assert [(c.generated, c.outcome) for c in fake.calls] == [(70, "json"), (70, "json")]
    # each: (200 x 150,000 + 1,000 x 75,000 + 70 x 600,000) / 1e6 = 30 + 75 + 42 = 147
    assert g.result is not None
    assert g2.result is not None
    assert (g.result.charged_grains, g2.result.charged_grains) == (147, 147)
    assert await admin.balance(customer) == (BALANCE - 294, 0, BALANCE - 294)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("api", APIS + RESPONSES, ids=str)
async def test_a_stream_that_reaches_max_tokens_is_charged_the_providers_final_usage(
    api: Api,
    face: str,
    fake: FakeProvider,
    client: AsyncBeamClient,
    service: ServiceProcess,
    tenant: Tenant,
    admin: Admin,
) -> None:
    customer = await admin.customer(BALANCE)
    # The provider would say 1,000 tokens; asked for 300, it stops there (finish_reason
    # "length", stop_reason "max_tokens") and reports its usage: a prompt of 1,200 tokens,
    # 1,000 cached. The hold (multiplier 1.0) covers exactly the 300 tokens granted, so the
    # guard stops there (MAX_TOKENS_REACHED); the adapter still reads the finish and usage
    # chunks that follow. OpenAI reports the prompt only at the end: the app's estimate
    # (1,000, none cached) holds until then. Anthropic reports it first, and the guard's
    # Deducts pass it on: there the estimate is exact, so the hold still covers 300.
    fake.queue(Reply(tokens=1000, prompt_tokens=1200, cached_tokens=1000))
    prompt, cached = (1200, 1000) if api.provider == "anthropic" else (1000, 0)
    g, tokens, error = await stream_through_guard(
        face, api, fake, client=client, service=service, tenant=tenant, customer=customer,
        model="gpt-4o-mini", prompt_tokens=prompt, cached_prompt_tokens=cached,
        max_tokens=300, buffer_multiplier=1.0,
    )  # fmt: skip
    assert error is None
    assert tokens == 300
    call = await fake.call(0)
    assert (call.generated, call.outcome) == (300, "completed")
    assert (g.stop_reason, g.status) == ("MAX_TOKENS_REACHED", RequestStatus.COMPLETED_SUCCESS)
    assert not g.out_of_credit  # the provider's own end, not a stop for money
    assert (g.reported_usage.prompt_tokens, g.reported_usage.cached_prompt_tokens) == (1200, 1000)
    assert g.reported_usage.completion_tokens == 300
    # (200 x 150,000 + 1,000 x 75,000 + 300 x 600,000) / 1e6 = 30 + 75 + 180 = 285; without
    # OpenAI's final usage it was the estimate: 1,000 x 0.15 + 300 x 0.6 = 330.
    await assert_settled(admin, customer, g, "completed", 285, 1200, 300)


@pytest.mark.parametrize("api", APIS + RESPONSES, ids=str)
async def test_a_provider_streaming_past_max_tokens_is_cut_there_closed_and_charged_for_it(
    api: Api, fake: FakeProvider, client: AsyncBeamClient, admin: Admin
) -> None:
    customer = await admin.customer(BALANCE)
    # Asked for 300 tokens (all the hold covers, at multiplier 1.0), the provider would stream
    # 5,000; after 301 it waits for the client to hang up (at most 5 s) before it goes on.
    # The adapter reads past the 300th token for the usage that would follow, finds the
    # 301st: closes without handing it on.
    fake.queue(
        Reply(
            tokens=5000, prompt_tokens=100, honor_max_tokens=False, pause_after=301,
            pause_seconds=5.0,
        )
    )  # fmt: skip
    async with api.async_client(fake) as sdk:
        async with client.guard(
            customer, model="cheap", prompt_tokens=100, max_tokens=300, buffer_multiplier=1.0
        ) as g:
            opened, tokens = [], 0
            async with api.astream(sdk, "cheap", 300) as stream:
                opened.append(stream)  # the app keeps its stream; the adapter closes it
                async for item in api.meter(g, stream):
                    tokens += api.is_token(item)
        call = await fake.call(0)
    assert (tokens, g.completion_tokens, g.stop_reason) == (300, 300, "MAX_TOKENS_REACHED")
    assert (call.generated, call.closed_by_client) == (301, True)
    assert g.status is RequestStatus.COMPLETED_SUCCESS
    # 100 + 300 x 2 = 700 (no usage arrived: the prompt estimate and the 300 tokens handed on)
    await assert_settled(admin, customer, g, "completed", 700, 100, 300)


@pytest.mark.parametrize("api", [Api("anthropic"), Api("anthropic", helper=True)], ids=str)
async def test_a_stream_beam_stops_for_money_is_closed_and_charged_what_it_streamed(
    api: Api, fake: FakeProvider, client: AsyncBeamClient, admin: Admin
) -> None:
    customer = await admin.customer(1000)
    # The app estimated a prompt of 100 tokens; the provider counts 600 (message_start) and
    # streams past max_tokens (5,000 tokens, 2 ms apart). On "cheap" the 1,000 grains pay
    # for 600 + 200 x 2: Beam stops the stream before that, the adapter closes it.
    fake.queue(Reply(tokens=5000, prompt_tokens=600, honor_max_tokens=False, delay_seconds=0.002))
    async with api.async_client(fake) as sdk:
        async with client.guard(
            customer, model="cheap", prompt_tokens=100, max_tokens=300, buffer_multiplier=1.0
        ) as g:
            opened = []
            async with api.astream(sdk, "cheap", 300) as stream:
                opened.append(stream)  # the app keeps its stream; the adapter closes it
                async for _ in api.meter(g, stream):
                    pass
        call = await fake.call(0)
    assert (g.should_stop, g.out_of_credit) == (True, True)
    assert g.stop_reason in ("INSUFFICIENT_BALANCE", "HOLD_COVERAGE")
    assert g.status is RequestStatus.KILLED_INSUFFICIENT_BALANCE
    counted = g.completion_tokens
    assert 0 < counted <= 200
    assert (call.closed_by_client, call.outcome) == (True, "closed_by_client")
    # The provider generated what was read, and at most the few tokens in flight when the
    # connection closed (a bound of 100 tokens: 200 ms of a stalled test machine; the
    # provider would stream 5,000).
    assert counted <= call.generated <= counted + 100
    # Charged what was streamed: the reported prompt and the tokens counted, 600 + counted x 2,
    # within the balance.
    charge = 600 + counted * 2
    assert g.result is not None
    assert g.result.charged_grains == charge
    assert await admin.balance(customer) == (1000 - charge, 0, 1000 - charge)
    assert 1000 - charge >= 0
    settled = await admin.request(g.request_id, customer)
    assert (settled["status"], settled["completion_tokens"]) == ("killed", str(counted))


@pytest.mark.parametrize("api", [Api("openai"), Api("anthropic", helper=True)], ids=str)
async def test_fifty_concurrent_under_estimated_streams_of_one_customer_never_overspend(
    api: Api, fake: FakeProvider, client: AsyncBeamClient, admin: Admin
) -> None:
    # Issue 16's finding 4 with the real SDKs: 50 concurrent streams of a customer with
    # 1,260 grains; the app asks for 50 tokens (or what the customer can afford), the
    # provider streams 200 regardless (2 ms apart).
    customer = await admin.customer(1260)
    fake.default = Reply(tokens=200, prompt_tokens=10, honor_max_tokens=False, delay_seconds=0.002)
    guards: list[Any] = []
    refused = 0

    async with api.async_client(fake) as sdk:

        async def one() -> None:
            nonlocal refused
            try:
                async with client.guard(
                    customer, model="cheap", prompt_tokens=10, max_tokens=50
                ) as g:
                    guards.append(g)
                    max_tokens = min(50, g.affordable_completion_tokens)
                    async with api.astream(sdk, "cheap", max_tokens) as stream:
                        async for _ in api.meter(g, stream):
                            pass
            except InsufficientBalance:
                refused += 1

        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(50))), 45)
        calls = [await fake.call(i) for i in range(len(fake.calls))]

    assert len(guards) + refused == 50
    assert len(calls) == len(guards) > 0  # a refused request never reaches the provider
    # Each stream was closed (cut by the guard) or ended, and charged what it streamed:
    # its prompt (10) and the tokens counted, 2 grains each.
    for call in calls:
        assert call.outcome in ("completed", "closed_by_client")
    charges = []
    for g in guards:
        assert g.result is not None
        assert g.result.charged_grains == 10 + 2 * g.completion_tokens
        charges.append(g.result.charged_grains)
    counted = sum(g.completion_tokens for g in guards)
    generated = sum(call.generated for call in calls)
    # At most the tokens in flight (a bound of 100 a stream, 200 ms of a stalled machine;
    # an upstream left open would reach 200 a stream, against at most 50 counted).
    assert counted <= generated <= counted + 100 * len(calls)
    balance, reserved, available = await admin.balance(customer)
    assert (reserved, available) == (0, balance)
    assert balance == 1260 - sum(charges) >= 0  # spent at most what the customer had
