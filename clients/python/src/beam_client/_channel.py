"""Channel options and credentials shared by the async and the sync client."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

from beam_client import __version__

# Reconnect quickly after Beam comes back (gRPC's default back-off grows to 120 s), so a
# replica restart costs a retry or two, not minutes of UNAVAILABLE.
DEFAULT_OPTIONS: dict[str, Any] = {
    "grpc.primary_user_agent": f"beam-client-python/{__version__}",
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
}


def channel_options(extra: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return list({**DEFAULT_OPTIONS, **extra}.items())


def credentials(root_certificates: bytes | None) -> grpc.ChannelCredentials:
    """TLS with the system's root CAs, or with ``root_certificates`` (PEM) when given."""
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)
