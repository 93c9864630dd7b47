"""The documentation runs verbatim against a fresh `beam dev`, twice.

One real `beam dev` (a subprocess on free ports, its own state directory) serves the module.
Every ```python block of docs/INTEGRATION.md is extracted as written and run twice, with
nothing but ``BEAM_GRPC_TARGET`` pointing at it (no key: the client uses the dev key on
loopback, as against `make dev`), against the customers `beam dev` seeds (``cus_42`` with
10 000 000 grains, ``cus_broke`` with 5). Where the guide's examples print or charge
something fixed, each run is checked to the grain; a block this module does not know is
still run twice and must leave no hold open. The provider calls are the real ``openai`` and
``anthropic`` SDKs, pointed by their own variables (``OPENAI_BASE_URL``,
``ANTHROPIC_BASE_URL``) at tests/client/providers.py's fake on loopback, which speaks their
wire formats; each example's call to it is checked (count, ``max_tokens`` asked).

The README's "Calling Beam from Python" block runs as a program, twice: the first run prints
what the README says a fresh `beam dev` prints, the second 87 grains less. `beam dev`'s
banner is checked by running its commands, and one shell with both ``BEAM_REST_URL`` and
``BEAM_GRPC_TARGET`` set serves the CLI and the client.

Prices (the dev price list): gpt-4o-mini 150000 / 600000 / 75000 (cached) grains per
million tokens, claude-haiku-4-5 1000000 / 5000000 / 100000.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import os
import re
import shlex
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from beam_client import AsyncBeamClient, Balance, BeamClient, estimate_tokens

from beam_dev import servers as devservers
from tests.client.providers import FakeProvider, Reply

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "INTEGRATION.md"
README = ROOT / "README.md"
BLOCK = re.compile(r"(?:<!-- example: ([\w-]+) -->\n)?```python\n(.*?)\n```\n", re.S)
CUSTOMER = "cus_42"  # what the guide's examples spend
BROKE = "cus_broke"  # 5 grains: refused by every example, never charged
RUN_SECONDS = 60


def python_blocks(path: Path = GUIDE) -> dict[str, str]:
    """name -> code of every ```python block, named by its ``<!-- example: NAME -->``."""
    found: dict[str, str] = {}
    for index, (name, code) in enumerate(BLOCK.findall(path.read_text())):
        key = name or f"block-{index}"
        assert key not in found, f"two blocks named {key}"
        found[key] = code
    return found


def cost(prompt: int, completion: int, cached: int = 0,
         prices: tuple[int, int, int] = (150_000, 600_000, 75_000)) -> int:  # fmt: skip
    """ceil of the per-million prices, as Beam computes it (gpt-4o-mini by default)."""
    exact = (prompt - cached) * prices[0] + completion * prices[1] + cached * prices[2]
    return -(-exact // 1_000_000)


# The estimates example's prompt: its contract, estimated, plus the chat framing.
CONTRACT_PROMPT = (
    estimate_tokens("The supplier shall deliver the goods within thirty days. " * 20) + 8
)


def estimates_printed(_balance: int) -> str:
    hold = -(-cost(CONTRACT_PROMPT, 800) * 12 // 10)  # ceil(estimate x 1.2)
    charged = cost(CONTRACT_PROMPT, 100)
    return (
        rf"held {hold} grains for {CONTRACT_PROMPT} \+ 800 tokens; affordable now: \d+ "
        rf"completion tokens\ncharged {charged}, refunded {hold - charged}\n"
    )


@dataclass(frozen=True)
class Expected:
    """What one run of an example prints (exactly, or a regex from the balance before it)
    and charges ``cus_42``; what the fake provider answers it (``reply``: tokens, prompt and
    cached tokens), and the ``max_tokens`` of each call it makes there."""

    charged: int | None
    printed: str | None = None
    printed_pattern: Callable[[int], str] | None = None
    reply: dict[str, int] = field(default_factory=dict)
    max_tokens: tuple[int, ...] | None = None


WORDS = "".join(("Beam ", "keeps ", "the ", "bill ", "prepaid. ") * 40)
EXPECTED = {
    "five-lines": Expected(
        cost(24, 180), "tok " * 180, reply={"prompt_tokens": 24, "tokens": 180}, max_tokens=(300,)
    ),
    # cus_broke is refused before the provider is called, and keeps its 5 grains.
    "openai": Expected(
        cost(31, 90),
        "tok " * 90 + "\n[out of credit: 5 grains available]\n",
        reply={"prompt_tokens": 31, "tokens": 90},
        max_tokens=(500,),  # all 500 granted; cus_broke never reaches the provider
    ),
    "anthropic": Expected(
        1550,  # 200 x 1 + 1000 x 0.1 + 250 x 5 (claude-haiku-4-5, 1000 cached)
        "tok " * 250 + "\nCOMPLETED_SUCCESS: charged 1550 grains\n",
        reply={"prompt_tokens": 1200, "cached_tokens": 1000, "tokens": 250},
        max_tokens=(400,),
    ),
    "manual": Expected(cost(12, 200), WORDS + f"\ncharged {cost(12, 200)} grains\n", max_tokens=()),
    "sync": Expected(
        cost(15, 42),
        "tok " * 42 + f"\nCOMPLETED_SUCCESS: charged {cost(15, 42)} grains\n",
        reply={"prompt_tokens": 15, "tokens": 42},
        max_tokens=(300,),
    ),
    "fastapi": Expected(
        cost(9, 150), "", reply={"prompt_tokens": 9, "tokens": 150}, max_tokens=(200,)
    ),
    "estimates": Expected(
        cost(CONTRACT_PROMPT, 100), printed_pattern=estimates_printed, max_tokens=()
    ),
    "failure-policy": Expected(cost(50, 120), "held 0 []\n", max_tokens=()),
    "retries": Expected(
        0,
        printed_pattern=lambda b: re.escape(f"Balance(balance={b}, reserved=0, available={b})\n"),
        max_tokens=(),
    ),
    "idempotency": Expected(cost(100, 50), f"charged {cost(100, 50)} grains once\n", max_tokens=()),
}


# -- beam dev -----------------------------------------------------------------------------------


@dataclass
class Dev:
    http_port: int
    grpc_port: int
    log: Path

    @property
    def grpc_target(self) -> str:
        return f"localhost:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://localhost:{self.http_port}"

    async def balance(self, customer_id: str) -> Balance:
        async with AsyncBeamClient(self.grpc_target) as beam:
            return await beam.get_balance(customer_id)


def clean_env() -> dict[str, str]:
    """This process's environment without any of Beam's variables (a fresh shell)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("BEAM_")}


@pytest.fixture(scope="module")
async def dev(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Dev]:
    """A fresh `beam dev` on free ports (not the defaults), with its own state directory."""
    tmp = tmp_path_factory.mktemp("beam-dev")
    http_port, grpc_port = devservers.free_port(), devservers.free_port()
    log = tmp / "beam-dev.log"
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "beam.cli.main", "dev", "--state-dir", str(tmp / "state"),
            "--http-port", str(http_port), "--grpc-port", str(grpc_port),
            stdout=out, stderr=out, env=clean_env(), start_new_session=True,
        )  # fmt: skip
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(1200):  # 120 s at most
                assert process.returncode is None, log.read_text()
                try:
                    ready = await http.get(f"http://127.0.0.1:{http_port}/ready", timeout=1)
                    if ready.is_success and "Try:" in log.read_text():
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"beam dev not ready:\n{log.read_text()[-3000:]}")
        yield Dev(http_port, grpc_port, log)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)  # Ctrl-C: beam dev stops its Redis, PostgreSQL
            try:
                await asyncio.wait_for(process.wait(), 60)
            except TimeoutError:
                process.kill()
                await process.wait()


async def run_program(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), RUN_SECONDS)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


# -- the guide's examples -------------------------------------------------------------------------


async def run_block(name: str, code: str) -> dict[str, Any]:
    """Run a block as written (top-level await; a block without ``await`` in a thread, as
    blocking code runs); its clients are closed after, so settlements have landed."""
    filename = f"INTEGRATION.md[{name}]"
    namespace: dict[str, Any] = {"__name__": f"docs_dev_{name.replace('-', '_')}"}
    if "await " not in code:
        await asyncio.to_thread(exec, compile(code, filename, "exec"), namespace)
    else:
        compiled = compile(code, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        result = eval(compiled, namespace)  # noqa: S307
        if inspect.iscoroutine(result):
            await asyncio.wait_for(result, RUN_SECONDS)
    return namespace


async def close_clients(namespace: dict[str, Any]) -> None:
    for value in namespace.values():
        if isinstance(value, AsyncBeamClient | openai.AsyncOpenAI | anthropic.AsyncAnthropic):
            await value.close()
        elif isinstance(value, BeamClient | openai.OpenAI | anthropic.Anthropic):
            value.close()


@pytest.fixture
def provider(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeProvider]:
    """The fake provider, where the SDKs' own variables send the examples' calls."""
    with FakeProvider() as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.openai_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-docs-test")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.anthropic_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-docs-test")
        yield fake


async def drive_fastapi(app: Any) -> None:
    """The example's app, served in-process: a customer who pays, one who cannot."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://app"
    ) as http:
        answer = await http.post(f"/chat/{CUSTOMER}", json={"message": "hello there",
                                                             "max_tokens": 200})  # fmt: skip
        assert (answer.status_code, answer.text) == (200, "tok " * 150)
        refused = await http.post(f"/chat/{BROKE}", json={"message": "hello there"})
        assert (refused.status_code, refused.json()) == (402, {"detail": "insufficient balance"})


def test_every_python_block_of_the_guide_is_found() -> None:
    text = GUIDE.read_text()
    assert len(python_blocks()) == len(re.findall(r"^```python$", text, re.M))
    assert set(EXPECTED) <= set(python_blocks()), "an expected example left the guide"


@pytest.mark.parametrize("name", list(python_blocks()))
async def test_the_guide_example_runs_twice_against_beam_dev(
    name: str,
    dev: Dev,
    provider: FakeProvider,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = python_blocks()[name]
    expected = EXPECTED.get(name, Expected(None))
    for variable in ("BEAM_API_KEY", "BEAM_SERVER", "BEAM_REST_URL"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("BEAM_GRPC_TARGET", dev.grpc_target)
    for run in (1, 2):
        provider.default = Reply(**expected.reply)
        calls = len(provider.calls)
        before = await dev.balance(CUSTOMER)
        capsys.readouterr()
        namespace = await run_block(name, code)
        if name == "fastapi":
            await drive_fastapi(namespace["app"])
        await close_clients(namespace)
        printed = capsys.readouterr().out
        if expected.printed is not None:
            assert printed == expected.printed, f"run {run}"
        if expected.printed_pattern is not None:
            assert re.fullmatch(expected.printed_pattern(before.balance), printed), printed
        after = await dev.balance(CUSTOMER)
        assert after.reserved == 0, f"run {run} left a hold open"
        if expected.charged is not None:
            assert before.balance - after.balance == expected.charged, f"run {run}"
        assert await dev.balance(BROKE) == Balance(5, 0, 5)
        if expected.max_tokens is not None:
            made = [(await provider.call(i)).max_tokens for i in range(calls, len(provider.calls))]
            assert tuple(made) == expected.max_tokens, f"run {run}"


# -- the README's example -------------------------------------------------------------------------


async def test_the_readme_example_runs_twice_against_beam_dev(dev: Dev) -> None:
    """First on test_customer_1 as `beam dev` seeds it (no guide example spends it)."""
    section = README.read_text().split("## Calling Beam from Python", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)\n```", section, re.S)
    shown = re.search(r"^# prints: (charged (\d+) grains; Balance\(balance=(\d+), .*)$", code, re.M)
    assert shown is not None
    first, charged, balance = shown.group(1), int(shown.group(2)), int(shown.group(3))
    assert (charged, balance) == (87, 99_999_913)
    left = balance - charged
    second = f"charged {charged} grains; Balance(balance={left}, reserved=0, available={left})"
    env = {**clean_env(), "BEAM_GRPC_TARGET": dev.grpc_target}  # only the port differs
    for expected in (first, second):
        code_, out, err = await run_program(env, sys.executable, "-c", code)
        assert (code_, out, err) == (0, expected + "\n", "")


# -- the banner, and one shell for the CLI and the client -----------------------------------------


BALANCE_PROGRAM = (
    "import sys\nfrom beam_client import BeamClient\n"
    "beam = BeamClient()\nprint(beam.get_balance(sys.argv[1]))\nbeam.close()\n"
)
CLI = (sys.executable, "-m", "beam.cli.main")


def banner_command(log: str, program: str) -> list[str]:
    """The banner's ``Try:`` line that runs ``program``, split as a shell would."""
    try_section = log.split("\nTry:\n", 1)[1]
    (line,) = [line for line in try_section.splitlines() if line.strip().startswith(program)]
    return shlex.split(line)


async def test_the_banner_commands_reach_this_beam_dev_on_its_ports(dev: Dev) -> None:
    log = dev.log.read_text()
    balance = await dev.balance("test_customer_1")
    b = balance.balance
    # curl, as printed.
    code, out, _ = await run_program(clean_env(), *banner_command(log, "curl"))
    assert (code, json.loads(out)) == (
        0, {"balance": str(b), "reserved": "0", "available": str(b)}
    )  # fmt: skip
    # The CLI, as printed (in a shell with no variables set): --server names this port.
    beam = banner_command(log, "beam ")
    assert beam[-2:] == ["--server", dev.http_url]
    code, out, err = await run_program(clean_env(), *CLI, *beam[1:])
    assert (code, err) == (0, "")
    assert out.splitlines()[1].split() == ["test_customer_1", str(b), "0", str(b)]
    # grpcurl's target is this gRPC port.
    assert f"}}' {dev.grpc_target} \\" in log
    # The export line: a shell with it runs the CLI and the client without flags.
    (export,) = [line for line in log.splitlines() if line.strip().startswith("export ")]
    assigned = dict(item.split("=", 1) for item in shlex.split(export)[1:])
    assert assigned == {"BEAM_REST_URL": dev.http_url, "BEAM_GRPC_TARGET": dev.grpc_target}
    await assert_one_shell_serves_both({**clean_env(), **assigned}, "test_customer_1", b)


async def test_one_shell_with_both_variables_serves_the_cli_and_the_client(dev: Dev) -> None:
    env = {
        **clean_env(),
        "BEAM_REST_URL": dev.http_url,
        "BEAM_GRPC_TARGET": dev.grpc_target,
        # A stale deprecated value (pointing nowhere) is ignored by both.
        "BEAM_SERVER": "http://127.0.0.1:9",
    }
    await assert_one_shell_serves_both(env, BROKE, 5)


async def assert_one_shell_serves_both(env: dict[str, str], customer: str, grains: int) -> None:
    code, out, err = await run_program(env, *CLI, "balance", "get", "--customer-id", customer,
                                       "--json")  # fmt: skip
    assert (code, json.loads(out), err) == (
        0, {"balance": str(grains), "reserved": "0", "available": str(grains)}, ""
    )  # fmt: skip
    code, out, err = await run_program(env, sys.executable, "-c", BALANCE_PROGRAM, customer)
    assert (code, out, err) == (
        0, f"Balance(balance={grains}, reserved=0, available={grains})\n", ""
    )  # fmt: skip
