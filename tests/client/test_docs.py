"""Every example of docs/INTEGRATION.md runs, as written, against a real `beam serve`.

Each fenced block of the guide is preceded by ``<!-- example: NAME -->``; every block has a
test here (checked first), which runs it with ``BEAM_GRPC_TARGET`` / ``BEAM_API_KEY`` pointing at
the session's service (an enforcer key of a fresh tenant, whose customer ``cus_42`` has
10 000 000 grains and ``cus_broke`` 5), with the ``openai`` and ``anthropic`` modules
replaced by stand-ins that stream chunks of the SDKs' shapes (tests/client/fakes.py), and
checks what it printed and charged, to the grain. Python blocks run with top-level await,
as the guide shows them. The package README's example is the guide's five-line block.

Prices (tests/support/stack.py): gpt-4o-mini 150000 / 600000 / 75000 (cached) grains per
million tokens; claude-haiku-4-5 is added with the dev price list's 1000000 / 5000000 /
100000.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from beam_client import AsyncBeamClient, BeamClient, Target, estimate_tokens, parse_target

from beam.adapters.postgres_store import PostgresStore
from beam.config import ServiceSettings
from beam.core.pricing import parse_price_entries
from beam_dev import servers as devservers
from tests.client.conftest import Admin
from tests.client.fakes import Provider, fake_anthropic_module, fake_openai_module
from tests.support.stack import TEST_TOKEN_SECRET, ServiceProcess, Stores, Tenant

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "INTEGRATION.md"
EXAMPLE = re.compile(r"<!-- example: ([\w-]+) -->\n```(\w+)\n(.*?)\n```\n", re.S)
RICH = 10_000_000


def examples(path: Path = GUIDE) -> dict[str, tuple[str, str]]:
    """name -> (language, code)."""
    found: dict[str, tuple[str, str]] = {}
    for name, language, code in EXAMPLE.findall(path.read_text()):
        assert name not in found, f"two examples named {name}"
        found[name] = (language, code)
    return found


def cost(
    prompt: int,
    completion: int,
    cached: int = 0,
    prices: tuple[int, int, int] = (150_000, 600_000, 75_000),
) -> int:
    """ceil of the per-million prices, as Beam computes it (gpt-4o-mini by default)."""
    exact = (prompt - cached) * prices[0] + completion * prices[1] + cached * prices[2]
    return -(-exact // 1_000_000)


def test_every_block_of_the_guide_is_an_example_with_a_test() -> None:
    text = GUIDE.read_text()
    opening_fences = re.findall(r"^```\w+$", text, re.M)
    found = examples()
    assert len(opening_fences) == len(found), "a fenced block without <!-- example: NAME -->"
    tested = {
        name.removeprefix("test_example_").replace("_", "-")
        for name in globals()
        if name.startswith("test_example_")
    }
    assert set(found) - tested == set()


def test_the_package_readme_shows_the_five_line_example() -> None:
    readme = (ROOT / "clients" / "python" / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)\n```", readme, re.S)
    assert blocks == [examples()["five-lines"][1]]


# -- running an example -----------------------------------------------------------------------


@dataclass
class Docs:
    """The world an example runs in."""

    service: ServiceProcess
    tenant: Tenant
    admin: Admin
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture[str]
    namespaces: list[dict[str, Any]] = field(default_factory=list)

    def providers(self, provider: Provider) -> None:
        self.monkeypatch.setitem(sys.modules, "openai", fake_openai_module(provider))
        self.monkeypatch.setitem(sys.modules, "anthropic", fake_anthropic_module(provider))

    async def run(self, name: str, *, threaded: bool = False) -> dict[str, Any]:
        """Run the example; returns its namespace (its clients closed)."""
        language, code = examples()[name]
        assert language == "python"
        namespace: dict[str, Any] = {"__name__": f"docs_example_{name.replace('-', '_')}"}
        if threaded:  # blocking code: off the event loop, as an app's thread would run it
            compiled = compile(code, f"INTEGRATION.md[{name}]", "exec")
            await asyncio.to_thread(exec, compiled, namespace)
        else:
            compiled = compile(
                code, f"INTEGRATION.md[{name}]", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
            )
            result = eval(compiled, namespace)  # noqa: S307
            if inspect.iscoroutine(result):
                await result
        self.namespaces.append(namespace)
        await self.close_clients()
        return namespace

    async def close_clients(self) -> None:
        """Close the examples' clients (again, after a test called into an example)."""
        for namespace in self.namespaces:
            for value in namespace.values():
                if isinstance(value, AsyncBeamClient):
                    await value.close()
                elif isinstance(value, BeamClient):
                    value.close()

    def printed(self) -> str:
        return self.capsys.readouterr().out

    async def charged(self, customer: str = "cus_42") -> int:
        balance, reserved, _ = await self.admin.balance(customer)
        assert reserved == 0
        return RICH - balance


@pytest.fixture
async def docs(
    service: ServiceProcess,
    tenant: Tenant,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> AsyncIterator[Docs]:
    admin = Admin(service, tenant)
    await admin.customer(RICH, "cus_42")
    await admin.customer(5, "cus_broke")
    monkeypatch.setenv("BEAM_GRPC_TARGET", service.grpc_target)
    monkeypatch.setenv("BEAM_API_KEY", tenant.keys["enforcer"])
    docs = Docs(service, tenant, admin, monkeypatch, capsys)
    yield docs
    await docs.close_clients()


async def add_claude_price(stores: Stores, docs: Docs) -> None:
    """claude-haiku-4-5 at the dev price list's prices, once the service has loaded it."""
    assert stores.postgres is not None
    store = await PostgresStore.connect(
        ServiceSettings(
            database_url=stores.postgres.dsn,
            request_token_secret=TEST_TOKEN_SECRET,
            database_pool_min=1,
            database_pool_max=1,
        )
    )
    entry = {
        "model": "claude-haiku-4-5",
        "inputGrainsPerMillion": 1_000_000,
        "outputGrainsPerMillion": 5_000_000,
        "cachedInputGrainsPerMillion": 100_000,
    }
    try:
        await store.save_prices(
            docs.tenant.name, parse_price_entries(docs.tenant.name, [entry]), "tests"
        )
    finally:
        await store.close()
    probe = await docs.admin.customer(1000)
    async with AsyncBeamClient() as beam:
        for attempt in range(100):
            try:
                await beam.check_balance(
                    probe, f"probe-{attempt}", model="claude-haiku-4-5", max_tokens=1
                )
                return
            except Exception:  # UNKNOWN_MODEL until the NOTIFY arrives
                await asyncio.sleep(0.05)
    raise AssertionError("the service never loaded the new price")


# -- the examples -------------------------------------------------------------------------------


def test_example_install() -> None:
    _, code = examples()["install"]
    lines = [line.split("#")[0].strip() for line in code.splitlines()]
    assert lines[0] == "pip install ./clients/python"  # what test_install.py runs
    server = lines[1].removeprefix("export BEAM_GRPC_TARGET=")
    assert parse_target(server) == Target("beam.beam-system.svc:9090", tls=False)
    assert lines[2].startswith("export BEAM_API_KEY=beam_sk_")


async def test_example_five_lines(docs: Docs) -> None:
    provider = Provider(prompt_tokens=24, reply_tokens=180)
    docs.providers(provider)
    await docs.run("five-lines")
    assert docs.printed() == "tok " * 180
    assert provider.calls[0]["max_tokens"] == 300
    assert await docs.charged() == cost(24, 180) == 112  # 3.6 + 108, rounded up once


async def test_example_openai(docs: Docs) -> None:
    provider = Provider(prompt_tokens=31, reply_tokens=90)
    docs.providers(provider)
    namespace = await docs.run("openai")
    assert docs.printed() == "tok " * 90 + "\n[out of credit: 5 grains available]\n"
    assert len(provider.calls) == 1  # the customer who cannot pay never reaches the provider
    assert provider.calls[0]["max_tokens"] == 500  # g.max_tokens_for_provider: all granted
    assert await docs.charged() == cost(31, 90) == 59
    assert await docs.admin.balance("cus_broke") == (5, 0, 5)

    # Its third branch: a customer whose money runs out mid-answer. 500 grains pay for the
    # hold (306 estimated x 1.5 = 459), so all 500 tokens asked are granted; this provider
    # ignores max_tokens and would go on forever. The guard reserves ahead of the stream:
    # if a background Deduct's answer raised the hold's coverage before the stream reached
    # the grant, the stream goes on, billed, until Beam says stop for money (killed, the
    # example says so); if not, it ends at exactly the grant, as a provider honouring
    # max_tokens would (completed, not out of credit). Either way it is charged the prompt
    # estimate and the tokens delivered, and the balance never goes below zero.
    await docs.admin.customer(500, "cus_small")
    provider.endless = True  # the example's client is bound to this provider
    answer = await namespace["answer"]("cus_small", "Tell me everything.")
    delivered = answer.count("tok ")
    (settled,) = await docs.admin.request_list("cus_small")
    if delivered == 500:
        assert answer == "tok " * 500
        assert (settled["status"], settled["completion_tokens"]) == ("completed", "500")
    else:
        assert delivered > 500
        assert answer == "tok " * delivered + " [stopped: out of credit]"
        assert (settled["status"], settled["completion_tokens"]) == ("killed", str(delivered))
    charged = int(settled["actual_cost_grains"])
    assert charged == cost(40, delivered) <= 500
    assert (settled["overage_grains"], await docs.admin.balance("cus_small")) == (
        "0",
        (500 - charged, 0, 500 - charged),
    )


async def test_example_anthropic(docs: Docs, stores: Stores) -> None:
    await add_claude_price(stores, docs)
    provider = Provider(prompt_tokens=1200, cached_tokens=1000, reply_tokens=250)
    docs.providers(provider)
    await docs.run("anthropic")
    # (200 x 1000000 + 1000 x 100000 + 250 x 5000000) / 1e6 = 200 + 100 + 1250
    expected = cost(1200, 250, 1000, prices=(1_000_000, 5_000_000, 100_000))
    assert expected == 1550
    assert docs.printed() == "tok " * 250 + "\nCOMPLETED_SUCCESS: charged 1550 grains\n"
    assert provider.calls[0]["max_tokens"] == 400
    assert await docs.charged() == 1550


async def test_example_manual(docs: Docs) -> None:
    await docs.run("manual")
    words = ("Beam ", "keeps ", "the ", "bill ", "prepaid. ") * 40
    assert docs.printed() == "".join(words) + f"\ncharged {cost(12, 200)} grains\n"
    assert await docs.charged() == cost(12, 200) == 122


async def test_example_sync(docs: Docs) -> None:
    provider = Provider(prompt_tokens=15, reply_tokens=42)
    docs.providers(provider)
    await docs.run("sync", threaded=True)
    assert docs.printed() == "tok " * 42 + "\nCOMPLETED_SUCCESS: charged 28 grains\n"
    assert await docs.charged() == cost(15, 42) == 28


async def test_example_fastapi(docs: Docs) -> None:
    provider = Provider(prompt_tokens=9, reply_tokens=150)
    docs.providers(provider)
    app = (await docs.run("fastapi"))["app"]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://app"
    ) as http:
        answer = await http.post("/chat/cus_42", json={"message": "hello there", "max_tokens": 200})
        assert (answer.status_code, answer.text) == (200, "tok " * 150)
        refused = await http.post("/chat/cus_broke", json={"message": "hello there"})
        assert (refused.status_code, refused.json()) == (402, {"detail": "insufficient balance"})
    assert len(provider.calls) == 1
    assert await docs.charged() == cost(9, 150) == 92

    # Beam unreachable: 503 before any byte, the provider is not called.
    docs.monkeypatch.setenv("BEAM_GRPC_TARGET", f"127.0.0.1:{devservers.free_port()}")
    app = (await docs.run("fastapi"))["app"]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://app"
    ) as http:
        unavailable = await http.post("/chat/cus_42", json={"message": "hello"})
    assert (unavailable.status_code, unavailable.json()) == (
        503,
        {"detail": "billing is unavailable; try again"},
    )
    assert len(provider.calls) == 1


async def test_the_fastapi_example_settles_when_the_client_goes_away(docs: Docs) -> None:
    """The guide's claim: a client that disconnects mid-stream still settles the request
    (FAILED_TIMEOUT, at the tokens sent so far). Driven as an ASGI server would."""
    provider = Provider(endless=True, delay=0.005)
    docs.providers(provider)
    app = (await docs.run("fastapi"))["app"]
    message = "tell me a very long story"
    chunks, gone = await asgi_post_then_disconnect(
        app, "/chat/cus_42", {"message": message}, after_chunks=30
    )
    assert chunks >= 30
    assert gone
    # The settlement runs on after the response task was cancelled; wait for it (bounded).
    requests: list[dict[str, Any]] = []
    for _ in range(200):
        requests = await docs.admin.request_list("cus_42")
        if requests:
            break
        await asyncio.sleep(0.05)
    assert len(requests) == 1
    (settled,) = requests
    prompt, completion = int(settled["prompt_tokens"]), int(settled["completion_tokens"])
    assert settled["status"] == "timeout"
    assert prompt == estimate_tokens(message) + 8
    assert completion >= 30
    assert settled["actual_cost_grains"] == str(cost(prompt, completion))
    assert await docs.charged() == cost(prompt, completion)


async def asgi_post_then_disconnect(
    app: Any, path: str, body: dict[str, Any], after_chunks: int
) -> tuple[int, bool]:
    """POST through the ASGI interface; the client disconnects after ``after_chunks``."""
    disconnect = asyncio.Event()
    delivered = False
    chunks = 0

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal chunks
        if message["type"] == "http.response.body" and message.get("body"):
            chunks += 1
            if chunks >= after_chunks:
                disconnect.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
        "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"host", b"app"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000), "server": ("app", 80),
    }  # fmt: skip
    await asyncio.wait_for(app(scope, receive, send), 30)
    return chunks, disconnect.is_set()


def test_example_in_cluster() -> None:
    language, code = examples()["in-cluster"]
    assert language == "yaml"
    env = {item["name"]: item for item in yaml.safe_load(code)["env"]}
    assert parse_target(env["BEAM_GRPC_TARGET"]["value"]) == Target(
        "beam.beam-system.svc:9090", tls=False
    )
    secret = env["BEAM_API_KEY"]["valueFrom"]["secretKeyRef"]
    # The operator's Secret of the example enforcer key: "<BeamApiKey name>-key", key api-key.
    keys = [d for d in yaml.safe_load_all((ROOT / "examples" / "apikey.yaml").read_text()) if d]
    enforcer = next(d for d in keys if d["spec"]["role"] == "enforcer")
    assert secret == {"name": f"{enforcer['metadata']['name']}-key", "key": "api-key"}
    assert enforcer["metadata"]["namespace"] == "acme"
    # The chart's Service: named after the release ("beam"), gRPC on 9090.
    values = yaml.safe_load((ROOT / "charts" / "beam" / "values.yaml").read_text())
    assert values["service"]["service"]["ports"]["grpc"] == 9090
    readme = (ROOT / "README.md").read_text()
    assert "helm install beam charts/beam --namespace beam-system" in readme


async def test_example_estimates(docs: Docs) -> None:
    await docs.run("estimates")
    contract = "The supplier shall deliver the goods within thirty days. " * 20
    prompt = estimate_tokens(contract) + 8
    hold = -(-cost(prompt, 800) * 12 // 10)  # ceil(estimate x 1.2)
    charged = cost(prompt, 100)
    lines = docs.printed().splitlines()
    assert re.fullmatch(
        rf"held {hold} grains for {prompt} \+ 800 tokens; affordable now: \d+ completion tokens",
        lines[0],
    )
    assert lines[1] == f"charged {charged}, refunded {hold - charged}"
    assert await docs.charged() == charged


async def test_example_failure_policy(docs: Docs) -> None:
    # Beam reachable: a hold, nothing let through, charged 50 x 0.15 + 120 x 0.6 = 79.5.
    await docs.run("failure-policy")
    assert docs.printed() == "held 0 []\n"
    assert await docs.charged() == cost(50, 120) == 80
    # Beam unreachable: let through without a hold, recorded with its usage.
    docs.monkeypatch.setenv("BEAM_GRPC_TARGET", f"127.0.0.1:{devservers.free_port()}")
    namespace = await docs.run("failure-policy")
    assert docs.printed().startswith("without a hold 1 [LetThrough(")
    (record,) = namespace["to_bill"]
    assert (record.customer_id, record.status) == ("cus_42", "COMPLETED_SUCCESS")
    assert (record.prompt_tokens, record.completion_tokens) == (50, 120)
    assert record.allowance_grains == cost(50, 300)  # the worst case: max_tokens
    assert await docs.charged() == 80  # nothing more


async def test_example_retries(docs: Docs) -> None:
    await docs.run("retries")
    assert docs.printed() == f"Balance(balance={RICH}, reserved=0, available={RICH})\n"


async def test_example_idempotency(docs: Docs) -> None:
    await docs.run("idempotency")
    assert docs.printed() == f"charged {cost(100, 50)} grains once\n"
    assert await docs.charged() == cost(100, 50) == 45
