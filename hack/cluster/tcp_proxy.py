"""A plain TCP forwarder: pods reach the API server through it.

    python3 hack/cluster/tcp_proxy.py LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT

Why it exists: hack/controlplane/up.sh binds kube-apiserver to 127.0.0.1, which no pod can
reach (a pod's 127.0.0.1 is its own). In the cluster's private network namespace this forwarder
listens on the bridge address (10.244.0.1) and relays bytes to 127.0.0.1:<apiserver port>;
the `kubernetes` Service's EndpointSlice points at it, so in-cluster clients (the operator) use
https://10.96.0.1:443 as everywhere else. TLS passes through untouched: the API server's
certificate names 10.96.0.1 and kubernetes.default.svc.

Bounded: at most MAX_CONNECTIONS relayed at once (more wait in the listen backlog); a connection
that cannot reach the target within CONNECT_TIMEOUT_SECONDS is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

MAX_CONNECTIONS = 256
CONNECT_TIMEOUT_SECONDS = 5.0
CHUNK_BYTES = 64 * 1024


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(CHUNK_BYTES):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            writer.close()


async def main(listen_host: str, listen_port: int, target_host: str, target_port: int) -> None:
    slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def relay(
        client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        async with slots:
            try:
                target_reader, target_writer = await asyncio.wait_for(
                    asyncio.open_connection(target_host, target_port), CONNECT_TIMEOUT_SECONDS
                )
            except (OSError, TimeoutError):
                client_writer.close()
                return
            await asyncio.gather(
                pipe(client_reader, target_writer), pipe(target_reader, client_writer)
            )

    server = await asyncio.start_server(relay, listen_host, listen_port, backlog=MAX_CONNECTIONS)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
