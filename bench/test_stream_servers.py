"""bench/stream_servers.py works as the guard row assumes (no timing asserted): the paced
provider speaks Chat Completions SSE to the real openai SDK over keep-alive, and the delaying
proxy forwards gRPC both ways and counts each RPC once, however the bytes are split.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import stream_servers as ss
from empty_servers import EmptyBalanceService, pb, pb_grpc
from openai import AsyncOpenAI


def frame(kind: int, stream: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload
    )


def test_frame_counter_counts_new_client_streams_across_splits() -> None:
    data = (
        ss.PREFACE
        + frame(0x4, 0, b"\x00" * 6)  # SETTINGS
        + frame(ss.HEADERS_FRAME, 1, b"h" * 40, flags=0x4)  # RPC 1
        + frame(0x0, 1, b"d" * 100, flags=0x1)  # its DATA
        + frame(0x8, 0, b"\x00\x00\x10\x00")  # WINDOW_UPDATE
        + frame(ss.HEADERS_FRAME, 3, b"h" * 12)  # RPC 2
        + frame(0x9, 3, b"c" * 5, flags=0x4)  # CONTINUATION of its headers: not another RPC
        + frame(ss.HEADERS_FRAME, 3, b"t" * 8, flags=0x1)  # same stream again: not another RPC
        + frame(ss.HEADERS_FRAME, 5, b"h" * 20)  # RPC 3
    )
    for size in (1, 7, 9, 64, len(data)):
        counters = ss.Counters()
        counter = ss.FrameCounter(counters)
        for start in range(0, len(data), size):
            counter.feed(data[start : start + size])
        assert counters.rpcs == 3, size
        assert not counter.buffer


@pytest.fixture
async def provider() -> AsyncIterator[str]:
    proxy = ss.DelayProxy(("127.0.0.1", 9), 0.0)  # not used by these requests
    server = await asyncio.start_server(
        ss.PacedProvider(200_000.0, 25, proxy).handle, "127.0.0.1", 0
    )
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()


async def test_provider_streams_to_the_openai_sdk(provider: str) -> None:
    client = AsyncOpenAI(base_url=f"{provider}/v1", api_key="bench", max_retries=0, timeout=30)
    try:
        for max_tokens in (50, 7):  # two requests over one keep-alive connection
            stream = await client.chat.completions.create(
                model="gpt-4", messages=[{"role": "user", "content": "hi"}],
                max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
            )  # fmt: skip
            texts, finish, usage = [], None, None
            async for chunk in stream:
                if chunk.choices:
                    texts.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
                usage = chunk.usage or usage
            assert "".join(texts) == "tok " * max_tokens
            assert finish == "length"
            assert usage is not None
            assert (usage.prompt_tokens, usage.completion_tokens) == (25, max_tokens)
    finally:
        await client.close()


async def test_proxy_forwards_grpc_and_counts_rpcs() -> None:
    server = grpc.aio.server()
    pb_grpc.add_BalanceServiceServicer_to_server(EmptyBalanceService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    proxy = ss.DelayProxy(("127.0.0.1", port), 0.02)
    listening = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    target = f"127.0.0.1:{listening.sockets[0].getsockname()[1]}"
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.BalanceServiceStub(channel)  # type: ignore[no-untyped-call]
            for _ in range(3):
                answer = await stub.GetBalance(pb.GetBalanceRequest(customer_id="c1"), timeout=10)
                assert answer.available == 999_940_000
            check = await stub.CheckBalance(pb.CheckBalanceRequest(customer_id="c1"), timeout=10)
            assert check.approved
        assert proxy.counters.rpcs == 4
        assert proxy.counters.connections == 1
        assert proxy.counters.bytes_down > 0
    finally:
        listening.close()
        await server.stop(None)
