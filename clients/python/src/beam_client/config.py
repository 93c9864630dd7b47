"""Where Beam is and how to reach it: ``BEAM_GRPC_TARGET`` and ``BEAM_API_KEY``.

``BEAM_GRPC_TARGET`` names Beam's **gRPC** endpoint (the CLI reads ``BEAM_REST_URL``, the
REST endpoint, so one shell can set both):

=====================================  ==========================================
``beam.beam-system.svc:9090``          plaintext (host:port; a bare host means port 9090)
``grpc://beam.beam-system.svc:9090``   plaintext
``grpcs://beam.example.com``           TLS (port 443 unless given), system root CAs
=====================================  ==========================================

An ``http://`` or ``https://`` value (a REST URL, the CLI's) is refused with a message
saying which form to use: the client speaks gRPC, which Beam serves on another port.
Unset, the target is ``localhost:9090`` (``beam dev``). Without ``BEAM_API_KEY`` the
``beam dev`` key is used against a loopback target only, as the CLI does; any other
target without a key is a :class:`~beam_client.errors.ConfigurationError`.

``BEAM_SERVER`` is the deprecated name the client and the CLI once shared (a gRPC target
here, a REST URL there). It is read only when ``BEAM_GRPC_TARGET`` is unset, with one
warning on the ``beam_client`` logger; a REST URL in it is refused, naming
``BEAM_GRPC_TARGET``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from beam_client.errors import ConfigurationError

TARGET_ENV = "BEAM_GRPC_TARGET"
# Deprecated: the CLI's REST URL and this client's gRPC target once shared this name.
DEPRECATED_SERVER_ENV = "BEAM_SERVER"
API_KEY_ENV = "BEAM_API_KEY"
DEFAULT_TARGET = "localhost:9090"
DEFAULT_GRPC_PORT = 9090
DEFAULT_TLS_PORT = 443
# The well-known key of `beam dev` (refused by any service not in dev mode).
DEV_API_KEY = "beam_test_key_1234567890"
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})

logger = logging.getLogger("beam_client")
_warned_deprecated = False


@dataclass(frozen=True)
class Target:
    """A gRPC target (``host:port``) and whether to use TLS."""

    address: str
    tls: bool

    @property
    def host(self) -> str:
        host = self.address.rsplit(":", 1)[0] if _has_port(self.address) else self.address
        return host.strip("[]")


def parse_target(value: str, name: str = TARGET_ENV) -> Target:
    """A gRPC target's value as a :class:`Target` (see the module docstring); ``name`` is
    where it came from, for the messages."""
    text = value.strip()
    if not text:
        raise ConfigurationError(f"{name} is empty")
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    scheme = scheme.lower()
    if scheme in ("http", "https"):
        raise ConfigurationError(
            f"{name}={value!r} is a REST URL (the CLI's, BEAM_REST_URL); beam_client "
            "speaks gRPC: set BEAM_GRPC_TARGET to host:port, grpc://host:port or "
            "grpcs://host:port (Beam's gRPC port, 9090 by default)"
        )
    if scheme not in ("", "grpc", "grpcs"):
        raise ConfigurationError(
            f"{name}={value!r}: unknown scheme {scheme!r} "
            "(use host:port, grpc://host:port or grpcs://host:port)"
        )
    rest = rest.rstrip("/")
    if not rest or "/" in rest or "?" in rest or "@" in rest:
        raise ConfigurationError(f"{name}={value!r}: expected host or host:port")
    tls = scheme == "grpcs"
    if not rest.startswith("[") and rest.count(":") > 1:  # a bare IPv6 address
        rest = f"[{rest}]"
    if not _has_port(rest):
        rest = f"{rest}:{DEFAULT_TLS_PORT if tls else DEFAULT_GRPC_PORT}"
    port = rest.rsplit(":", 1)[1]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(f"{name}={value!r}: bad port {port!r}")
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
    if target:
        parsed = parse_target(target, "target")
    elif env.get(TARGET_ENV):
        parsed = parse_target(env[TARGET_ENV])
    elif env.get(DEPRECATED_SERVER_ENV):
        _warn_deprecated()
        parsed = parse_target(env[DEPRECATED_SERVER_ENV], DEPRECATED_SERVER_ENV)
    else:
        parsed = parse_target(DEFAULT_TARGET)
    key = api_key or env.get(API_KEY_ENV) or ""
    if not key:
        if parsed.host not in LOOPBACK_HOSTS:
            raise ConfigurationError(
                f"no API key for {parsed.address}: set {API_KEY_ENV} or pass api_key="
            )
        key = DEV_API_KEY
    return parsed, key


def _warn_deprecated() -> None:
    global _warned_deprecated
    if not _warned_deprecated:
        _warned_deprecated = True
        logger.warning(
            "%s is deprecated for beam_client: set %s (the gRPC target) instead; the CLI "
            "reads BEAM_REST_URL",
            DEPRECATED_SERVER_ENV,
            TARGET_ENV,
        )
