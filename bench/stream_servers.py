"""The guard row's two loopback servers, in one process of their own (bench/run.py starts it):

- **a paced OpenAI provider**: ``POST /v1/chat/completions`` with ``stream: true`` answers
  Chat Completions server-sent events (a role chunk, one chunk per content token — the text
  ``"tok "``, which the client's adapter counts as exactly one token — a ``finish_reason``
  chunk, the usage chunk when ``stream_options.include_usage`` asked for it, ``data:
  [DONE]``), ``max_tokens`` content tokens at ``--rate`` tokens/s. Token *i* is due
  ``i / rate`` seconds after the request arrived, on an absolute schedule: a late wake-up
  sends every token already due in one write, so the stream lasts ``(n - 1) / rate``
  seconds however the timer fires, and a client that reads slower than that finishes later
  (that lag is what the bench measures). HTTP/1.1 keep-alive, chunked bodies, as the SDK's
  httpx pool expects. ``GET /ready`` answers 200; ``GET /stats`` the proxy's counters.
- **a delaying TCP proxy** in front of Beam's gRPC port: bytes client → Beam are forwarded at
  once, bytes Beam → client ``--delay-ms`` after they arrived (each read is written when its
  own delay is up, in order, so delays do not add up: a Beam 20 ms further away). It counts
  the RPCs that pass: HTTP/2 HEADERS frames that open a new client stream (a stream id
  above the connection's highest so far), read from the client's bytes.

Not a general server: the bench's client is the only peer. Everything is bounded (request
size, tokens per reply, the proxy's queue by the socket buffers behind it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from typing import Any

MAX_REQUEST_BYTES = 1 << 20
MAX_TOKENS = 100_000
HEAD_TIMEOUT_SECONDS = 300.0  # an idle keep-alive connection is closed after this
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS_FRAME = 0x1
CREATED = 1_767_225_600


# -- the proxy ----------------------------------------------------------------------------


class Counters:
    def __init__(self) -> None:
        self.connections = 0
        self.rpcs = 0
        self.bytes_up = 0
        self.bytes_down = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class FrameCounter:
    """Counts new client streams in one HTTP/2 connection's client → server bytes."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.buffer = bytearray()
        self.preface_seen = False
        self.highest_stream = 0

    def feed(self, data: bytes) -> None:
        self.buffer += data
        if not self.preface_seen:
            if len(self.buffer) < len(PREFACE):
                return
            assert bytes(self.buffer[: len(PREFACE)]) == PREFACE, "not HTTP/2 (prior knowledge)"
            del self.buffer[: len(PREFACE)]
            self.preface_seen = True
        offset = 0
        while len(self.buffer) - offset >= 9:
            length = int.from_bytes(self.buffer[offset : offset + 3], "big")
            if len(self.buffer) - offset < 9 + length:
                break
            kind = self.buffer[offset + 3]
            stream = int.from_bytes(self.buffer[offset + 5 : offset + 9], "big") & 0x7FFFFFFF
            if kind == HEADERS_FRAME and stream > self.highest_stream:
                self.highest_stream = stream
                self.counters.rpcs += 1
            offset += 9 + length
        del self.buffer[:offset]


class DelayProxy:
    def __init__(self, upstream: tuple[str, int], delay_seconds: float) -> None:
        self.upstream = upstream
        self.delay = delay_seconds
        self.counters = Counters()

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.counters.connections += 1
        try:
            beam_r, beam_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            return
        up = asyncio.create_task(self._up(client_r, beam_w))
        down = asyncio.create_task(self._down(beam_r, client_w))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            for writer in (client_w, beam_w):
                writer.close()

    async def _up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = FrameCounter(self.counters)
        while data := await reader.read(65536):
            frames.feed(data)
            self.counters.bytes_up += len(data)
            writer.write(data)
            await writer.drain()

    async def _down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Each read is written ``delay`` after it arrived, in order (a pipe of that latency)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def write_when_due() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    return
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        writing = asyncio.create_task(write_when_due())
        try:
            while True:
                data = await reader.read(65536)
                self.counters.bytes_down += len(data)
                queue.put_nowait((loop.time() + self.delay, data))
                if not data:
                    break
            await writing
        finally:
            writing.cancel()


# -- the provider -------------------------------------------------------------------------


def _event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    event = f"data: {data}\n\n".encode()
    return b"%x\r\n%s\r\n" % (len(event), event)  # one SSE event, one HTTP chunk


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    return _event(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "system_fingerprint": "fp_bench",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
    )


def _usage_chunk(model: str, prompt_tokens: int, completion_tokens: int) -> bytes:
    return _event(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "choices": [],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
            },
        }
    )


class PacedProvider:
    def __init__(self, rate: float, prompt_tokens: int, proxy: DelayProxy) -> None:
        self.rate = rate
        self.prompt_tokens = prompt_tokens
        self.proxy = proxy
        self.streams = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            while await self._one(reader, writer):
                pass
        writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serves one request; False when the connection is done."""
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_SECONDS)
        arrived = asyncio.get_running_loop().time()
        request_line, *lines = head.decode("latin-1").split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        headers = {
            name.strip().lower(): value.strip()
            for name, value in (line.split(":", 1) for line in lines if ":" in line)
        }
        length = int(headers.get("content-length", "0"))
        assert 0 <= length <= MAX_REQUEST_BYTES, length
        body = json.loads(await reader.readexactly(length)) if length else {}
        if method == "GET" and path in ("/ready", "/stats"):
            payload = {"streams": self.streams, **self.proxy.counters.as_dict()}
            await _json(writer, 200, payload)
            return True
        if method != "POST" or not path.endswith("/chat/completions") or not body.get("stream"):
            await _json(writer, 404, {"error": {"message": f"not served: {method} {path}"}})
            return True
        await self._stream(body, writer, arrived)
        return True

    async def _stream(
        self, body: dict[str, Any], writer: asyncio.StreamWriter, start: float
    ) -> None:
        self.streams += 1
        loop = asyncio.get_running_loop()
        model = str(body.get("model", "model"))
        tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        assert isinstance(tokens, int), tokens
        assert 0 < tokens <= MAX_TOKENS, tokens
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
            + _chunk(model, {"role": "assistant", "content": "", "refusal": None})
        )
        token = _chunk(model, {"content": "tok "})
        sent = 0
        while sent < tokens:
            due_now = min(tokens, int((loop.time() - start) * self.rate) + 1)
            if due_now > sent:
                writer.write(token * (due_now - sent))
                sent = due_now
                await writer.drain()
            if sent < tokens:
                await asyncio.sleep(max(0.0, start + sent / self.rate - loop.time()))
        tail = _chunk(model, {}, "length")
        if usage:
            tail += _usage_chunk(model, self.prompt_tokens, tokens)
        writer.write(tail + _event("[DONE]") + b"0\r\n\r\n")
        await writer.drain()


async def _json(writer: asyncio.StreamWriter, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    reason = {200: "OK", 404: "Not Found"}[status]
    writer.write(
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\n\r\n".encode()
        + data
    )
    await writer.drain()


async def serve(args: argparse.Namespace) -> None:
    host, port = args.upstream.rsplit(":", 1)
    proxy = DelayProxy((host, int(port)), args.delay_ms / 1000)
    provider = PacedProvider(args.rate, args.prompt_tokens, proxy)
    servers = [
        await asyncio.start_server(provider.handle, "127.0.0.1", args.provider_port),
        await asyncio.start_server(proxy.handle, "127.0.0.1", args.proxy_port),
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider-port", type=int, required=True)
    parser.add_argument("--proxy-port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="Beam's gRPC address, host:port")
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=3000.0, help="tokens per second")
    parser.add_argument("--prompt-tokens", type=int, default=25, help="usage's prompt_tokens")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
