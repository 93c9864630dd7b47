"""The client and the CLI read different variables for their two kinds of address.

The Python client reads ``BEAM_GRPC_TARGET`` (a gRPC target), the CLI ``BEAM_REST_URL`` (a
REST URL), so one shell can set both; ``BEAM_SERVER``, the name they once shared, is a
deprecated fallback for each, read only in that tool's form. ``beam dev``'s banner names
the ports it really serves. Pure: nothing here reaches a server (the shell serving both
against a real ``beam dev`` is tests/client/test_docs_dev.py).
"""

from __future__ import annotations

import logging

import pytest
from beam_client import ConfigurationError, Target
from beam_client import config as client_config
from beam_client.config import DEV_API_KEY, resolve
from click.testing import CliRunner

from beam.cli.main import main as cli
from beam.config import Environment, ServiceSettings
from beam_dev import command as dev_command

UNUSED = "127.0.0.1:9"  # the discard port: nothing listens there on loopback
BOTH = {"BEAM_GRPC_TARGET": "localhost:19090", "BEAM_REST_URL": "http://localhost:18080"}


# -- the client -------------------------------------------------------------------------------


def test_the_client_reads_its_grpc_target_from_beam_grpc_target() -> None:
    assert resolve(None, None, BOTH) == (Target("localhost:19090", False), DEV_API_KEY)
    # BEAM_GRPC_TARGET wins over the deprecated name, whatever the latter holds.
    env = {**BOTH, "BEAM_SERVER": "http://localhost:18080"}
    assert resolve(None, None, env)[0] == Target("localhost:19090", False)
    # An argument wins over both.
    assert resolve("grpcs://beam.example.com", "k", env) == (
        Target("beam.example.com:443", True),
        "k",
    )


def test_the_deprecated_beam_server_is_read_by_the_client_with_one_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_config, "_warned_deprecated", False)
    with caplog.at_level(logging.WARNING, logger="beam_client"):
        assert resolve(None, None, {"BEAM_SERVER": "localhost:19090"})[0] == Target(
            "localhost:19090", False
        )
        resolve(None, None, {"BEAM_SERVER": "localhost:19090"})
    assert [r.getMessage() for r in caplog.records] == [
        "BEAM_SERVER is deprecated for beam_client: set BEAM_GRPC_TARGET (the gRPC target) "
        "instead; the CLI reads BEAM_REST_URL"
    ]


@pytest.mark.parametrize("name", ["BEAM_GRPC_TARGET", "BEAM_SERVER"])
def test_a_rest_url_given_to_the_client_names_the_variable_to_set(name: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        resolve(None, None, {name: "http://localhost:8080"})
    assert str(refused.value) == (
        f"{name}='http://localhost:8080' is a REST URL (the CLI's, BEAM_REST_URL); "
        "beam_client speaks gRPC: set BEAM_GRPC_TARGET to host:port, grpc://host:port or "
        "grpcs://host:port (Beam's gRPC port, 9090 by default)"
    )


# -- the CLI ------------------------------------------------------------------------------------


def run_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """``beam balance get`` with only ``env`` among the address variables."""
    clean = {"BEAM_SERVER": None, "BEAM_REST_URL": None, "BEAM_GRPC_TARGET": None}
    result = CliRunner().invoke(
        cli, ["balance", "get", "--customer-id", "c", *args], env={**clean, **env}
    )
    return result.exit_code, result.stdout, result.stderr


def test_the_cli_reads_its_rest_url_from_beam_rest_url() -> None:
    code, out, err = run_cli({**BOTH, "BEAM_REST_URL": f"http://{UNUSED}"})
    assert (code, out) == (3, "")
    assert err.startswith(f"error: cannot reach http://{UNUSED}: ")
    # --server wins; BEAM_SERVER is not read when BEAM_REST_URL is set.
    code, _, err = run_cli(
        {"BEAM_REST_URL": "http://localhost:1", "BEAM_SERVER": "localhost:19090"},
        "--server", f"http://{UNUSED}",
    )  # fmt: skip
    assert (code, err.split(": ")[0:2]) == (3, ["error", f"cannot reach http://{UNUSED}"])
    code, _, err = run_cli({"BEAM_REST_URL": f"http://{UNUSED}", "BEAM_SERVER": "localhost:1"})
    assert (code, err.startswith(f"error: cannot reach http://{UNUSED}: ")) == (3, True)


def test_the_cli_reads_a_rest_url_in_the_deprecated_beam_server_with_a_warning() -> None:
    code, _, err = run_cli({"BEAM_SERVER": f"http://{UNUSED}"})
    assert code == 3
    first, second = err.splitlines()[:2]
    assert first == "warning: BEAM_SERVER is deprecated for the CLI; set BEAM_REST_URL"
    assert second.startswith(f"error: cannot reach http://{UNUSED}: ")


def test_the_cli_refuses_a_grpc_target_in_beam_server_naming_the_variable_to_set() -> None:
    assert run_cli({"BEAM_SERVER": "localhost:9090"}) == (
        2,
        "",
        "error: BEAM_SERVER='localhost:9090' is not a REST URL (a gRPC target, the Python "
        "client's; it reads BEAM_GRPC_TARGET now): set BEAM_REST_URL to Beam's REST "
        "endpoint, e.g. http://localhost:8080, or pass --server\n",
    )


def test_the_cli_help_names_its_variable() -> None:
    result = CliRunner().invoke(cli, ["balance", "get", "--help"])
    help_text = " ".join(result.stdout.split())
    assert "Beam's REST endpoint (env BEAM_REST_URL; default http://localhost:8080" in help_text
    assert "BEAM_SERVER is read when both are unset (deprecated)" in help_text


# -- beam dev's banner --------------------------------------------------------------------------


def banner(http_port: int, grpc_port: int) -> list[str]:
    settings = ServiceSettings(
        environment=Environment.DEV, http_port=http_port, grpc_port=grpc_port
    )
    return dev_command.banner(settings).splitlines()


def test_the_banner_on_the_default_ports_needs_no_flags_or_variables() -> None:
    lines = banner(8080, 9090)
    assert "  beam balance get --customer-id test_customer_1" in lines
    assert '-d \'{"customer_id": "test_customer_1"}\' localhost:9090 \\' in [
        line.strip() for line in lines
    ]
    assert not [line for line in lines if "export" in line or "--server" in line]


@pytest.mark.parametrize(("http_port", "grpc_port"), [(18080, 19090), (8080, 19090), (18080, 9090)])
def test_the_banner_off_the_default_ports_names_them_everywhere(
    http_port: int, grpc_port: int
) -> None:
    lines = banner(http_port, grpc_port)
    http, grpc = f"http://localhost:{http_port}", f"localhost:{grpc_port}"
    assert f"  REST  {http}   (OpenAPI docs: {http}/docs)" in lines
    assert f"  gRPC  {grpc}   (reflection on: grpcurl -plaintext {grpc} list)" in lines
    assert (
        f'  curl -H "Authorization: Bearer {DEV_API_KEY}" {http}/v1/balance/test_customer_1'
        in lines
    )
    get = "  beam balance get --customer-id test_customer_1"
    assert (get + ("" if http_port == 8080 else f" --server {http}")) in lines
    assert f'    -d \'{{"customer_id": "test_customer_1"}}\' {grpc} \\' in lines
    assert f"  export BEAM_REST_URL={http} BEAM_GRPC_TARGET={grpc}" in lines
    # Nothing in it names a port the instance does not serve.
    text = "\n".join(lines)
    for port in {8080, 9090} - {http_port, grpc_port}:
        assert f":{port}" not in text.replace(f":1{port}", "")
