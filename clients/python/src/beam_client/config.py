"""Where Beam is and how to reach it: ``BEAM_SERVER`` and ``BEAM_API_KEY``.

The variables have the CLI's names. ``BEAM_SERVER`` names Beam's **gRPC** endpoint:

=====================================  ==========================================
``beam.beam-system.svc:9090``          plaintext (host:port; a bare host means port 9090)
``grpc://beam.beam-system.svc:9090``   plaintext
``grpcs://beam.example.com``           TLS (port 443 unless given), system root CAs
=====================================  ==========================================

An ``http://`` or ``https://`` value (the CLI's REST endpoint) is refused with a message
saying which form to use: the client speaks gRPC, which Beam serves on another port.
Unset, the target is ``localhost:9090`` (``beam dev``). Without ``BEAM_API_KEY`` the
``beam dev`` key is used against a loopback target only, as the CLI does; any other
target without a key is a :class:`~beam_client.errors.ConfigurationError`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from beam_client.errors import ConfigurationError

SERVER_ENV = "BEAM_SERVER"
API_KEY_ENV = "BEAM_API_KEY"
DEFAULT_TARGET = "localhost:9090"
DEFAULT_GRPC_PORT = 9090
DEFAULT_TLS_PORT = 443
# The well-known key of `beam dev` (refused by any service not in dev mode).
DEV_API_KEY = "beam_test_key_1234567890"
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class Target:
    """A gRPC target (``host:port``) and whether to use TLS."""

    address: str
    tls: bool

    @property
    def host(self) -> str:
        host = self.address.rsplit(":", 1)[0] if _has_port(self.address) else self.address
        return host.strip("[]")


def parse_target(value: str) -> Target:
    """``BEAM_SERVER``'s value as a :class:`Target` (see the module docstring)."""
    text = value.strip()
    if not text:
        raise ConfigurationError(f"{SERVER_ENV} is empty")
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    scheme = scheme.lower()
    if scheme in ("http", "https"):
        raise ConfigurationError(
            f"{SERVER_ENV}={value!r} is a REST URL (the CLI's); beam_client speaks gRPC: "
            "use host:port, grpc://host:port or grpcs://host:port (Beam's gRPC port, 9090 "
            "by default)"
        )
    if scheme not in ("", "grpc", "grpcs"):
        raise ConfigurationError(
            f"{SERVER_ENV}={value!r}: unknown scheme {scheme!r} "
            "(use host:port, grpc://host:port or grpcs://host:port)"
        )
    rest = rest.rstrip("/")
    if not rest or "/" in rest or "?" in rest or "@" in rest:
        raise ConfigurationError(f"{SERVER_ENV}={value!r}: expected host or host:port")
    tls = scheme == "grpcs"
    if not rest.startswith("[") and rest.count(":") > 1:  # a bare IPv6 address
        rest = f"[{rest}]"
    if not _has_port(rest):
        rest = f"{rest}:{DEFAULT_TLS_PORT if tls else DEFAULT_GRPC_PORT}"
    port = rest.rsplit(":", 1)[1]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(f"{SERVER_ENV}={value!r}: bad port {port!r}")
    return Target(rest, tls)


def _has_port(address: str) -> bool:
    if address.startswith("["):  # [::1]:9090 or [::1]
        return "]:" in address
    return address.count(":") == 1


def resolve(
    target: str | None, api_key: str | None, environ: Mapping[str, str] | None = None
) -> tuple[Target, str]:
    """The target and key from the arguments, else the environment, else the defaults."""
    env = os.environ if environ is None else environ
    parsed = parse_target(target or env.get(SERVER_ENV) or DEFAULT_TARGET)
    key = api_key or env.get(API_KEY_ENV) or ""
    if not key:
        if parsed.host not in LOOPBACK_HOSTS:
            raise ConfigurationError(
                f"no API key for {parsed.address}: set {API_KEY_ENV} or pass api_key="
            )
        key = DEV_API_KEY
    return parsed, key
