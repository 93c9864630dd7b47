"""The API server itself enforces Beam's CRDs: bounds, keys, defaults and immutability.

These run against a real kube-apiserver (the `control_plane` fixture of tests/k8s/conftest.py)
because a schema is only worth what the server makes of it: structural-schema defaulting,
list-map key uniqueness, int64 bounds stored as float64, and CEL transition rules are all
evaluated server-side, and `kubectl --dry-run=client` checks none of them.

Each test that writes objects gets its own namespace, so cases cannot see each other. The
examples are the exception: they name the namespace `acme` themselves.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

pytestmark = pytest.mark.k8s

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = REPO_ROOT / "crds"
EXAMPLES_DIR = REPO_ROOT / "examples"

CRD_NAMES = ("beamcustomers.beam.dev", "beamapikeys.beam.dev", "beampricelists.beam.dev")
API_VERSION = "beam.dev/v1alpha1"
MAX_SAFE_INTEGER = 2**53 - 1
EXPLAIN_WAIT_SECONDS = 30.0
CREDIT_AMOUNT_IMMUTABLE = (
    "credit amountGrains is immutable once applied; add a new credit id instead"
)

Manifest = dict[str, Any]


class ControlPlane(Protocol):
    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]: ...


def succeeded(
    kube: ControlPlane, *args: str, input: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run kubectl expecting success; on failure show kubectl's stderr."""
    result = kube.kubectl(*args, input=input, check=False, timeout=timeout)
    assert result.returncode == 0, f"kubectl {' '.join(args)} failed:\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def crds_applied(control_plane: ControlPlane) -> subprocess.CompletedProcess[str]:
    """`kubectl apply -f crds/` and a bounded wait until every CRD is Established."""
    applied = succeeded(control_plane, "apply", "-f", str(CRD_DIR))
    succeeded(
        control_plane,
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        *(f"crd/{name}" for name in CRD_NAMES),
        timeout=90,
    )
    return applied


@pytest.fixture
def kube(control_plane: ControlPlane, crds_applied: object) -> ControlPlane:
    return control_plane


@pytest.fixture
def namespace(kube: ControlPlane) -> Iterator[str]:
    name = f"beam-crd-{uuid.uuid4().hex[:10]}"
    succeeded(kube, "create", "namespace", name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


# --- manifests -------------------------------------------------------------------------------


def customer(namespace: str, name: str = "cust", **spec: Any) -> Manifest:
    return {
        "apiVersion": API_VERSION,
        "kind": "BeamCustomer",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"customerId": "cus_1", **spec},
    }


def credit(credit_id: str, amount_grains: int, **extra: Any) -> dict[str, Any]:
    return {"id": credit_id, "amountGrains": amount_grains, **extra}


def api_key(namespace: str, name: str = "key", **spec: Any) -> Manifest:
    return {
        "apiVersion": API_VERSION,
        "kind": "BeamApiKey",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"role": "enforcer", **spec},
    }


def price(model: str, input_grains: int = 1000, output_grains: int = 2000) -> dict[str, Any]:
    return {
        "model": model,
        "inputGrainsPerMillion": input_grains,
        "outputGrainsPerMillion": output_grains,
    }


def price_list(namespace: str, name: str = "prices", **spec: Any) -> Manifest:
    return {
        "apiVersion": API_VERSION,
        "kind": "BeamPriceList",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"models": [price("gpt-4o")], **spec},
    }


def without_spec_field(manifest: Manifest, field: str) -> Manifest:
    del manifest["spec"][field]
    return manifest


def without_spec(manifest: Manifest) -> Manifest:
    del manifest["spec"]
    return manifest


# --- kubectl helpers -------------------------------------------------------------------------


def create(kube: ControlPlane, manifest: Manifest) -> None:
    succeeded(kube, "create", "-f", "-", input=json.dumps(manifest))


def rejected(kube: ControlPlane, *args: str, input: str | None = None) -> str:
    """Run kubectl expecting the API server to refuse; return its stderr."""
    result = kube.kubectl(*args, input=input, check=False)
    assert result.returncode != 0, f"kubectl {' '.join(args)} was accepted:\n{result.stdout}"
    return result.stderr


def assert_mentions(stderr: str, fragments: tuple[str, ...]) -> None:
    for fragment in fragments:
        assert fragment in stderr, f"{fragment!r} not in kubectl's error:\n{stderr}"


def get_json(kube: ControlPlane, namespace: str, resource: str) -> Manifest:
    out = succeeded(kube, "get", resource, "-n", namespace, "-o", "json").stdout
    document: Manifest = json.loads(out)
    return document


def header_of(table: str) -> list[str]:
    """Column names of `kubectl get` output, multi-word names joined with '_'."""
    header = table.splitlines()[0]
    return header.replace("KEY ID", "KEY_ID").replace("EFFECTIVE FROM", "EFFECTIVE_FROM").split()


# --- the CRDs install ------------------------------------------------------------------------


def test_crds_apply_and_become_established(
    kube: ControlPlane, crds_applied: subprocess.CompletedProcess[str]
) -> None:
    for name in CRD_NAMES:
        assert f"customresourcedefinition.apiextensions.k8s.io/{name}" in crds_applied.stdout
        conditions = json.loads(
            succeeded(kube, "get", "crd", name, "-o", "jsonpath={.status.conditions}").stdout
        )
        status = {c["type"]: c["status"] for c in conditions}
        assert status["Established"] == "True"
        assert status["NamesAccepted"] == "True"
        assert status.get("NonStructuralSchema") is None


def test_short_names_and_category_are_served(kube: ControlPlane) -> None:
    table = succeeded(kube, "api-resources", "--api-group=beam.dev", "-o", "wide").stdout
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    assert set(rows) == {"beamapikeys", "beamcustomers", "beampricelists"}
    assert "bc,beamcust" in rows["beamcustomers"]
    assert "bak" in rows["beamapikeys"]
    assert "bpl" in rows["beampricelists"]
    for row in rows.values():
        assert "beam.dev/v1alpha1" in row
        assert "true" in row  # namespaced
        assert "beam" in row[-1].split(",")  # categories


def explain(kube: ControlPlane, field: str) -> str:
    """`kubectl explain FIELD`, waiting (bounded) for the CRD's OpenAPI to be published.

    The API server publishes a new CRD's OpenAPI asynchronously, shortly after Established.
    """
    deadline = time.monotonic() + EXPLAIN_WAIT_SECONDS
    while True:
        result = kube.kubectl("explain", field, check=False)
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert result.returncode == 0, f"kubectl explain {field} failed:\n{result.stderr}"
    return result.stdout


def test_field_descriptions_reach_kubectl_explain(kube: ControlPlane) -> None:
    assert "Grains added to the balance" in explain(kube, "beamcustomers.spec.credits.amountGrains")
    assert "It can only increase" in explain(kube, "beamapikeys.spec.rotation.generation")
    explained = explain(kube, "bpl.spec.models.inputGrainsPerMillion")
    assert "Grains per million prompt (input) tokens" in explained


# --- the examples ----------------------------------------------------------------------------


@pytest.fixture
def examples_applied(kube: ControlPlane) -> Iterator[subprocess.CompletedProcess[str]]:
    existed = kube.kubectl("get", "namespace", "acme", check=False).returncode == 0
    applied = succeeded(kube, "apply", "-f", str(EXAMPLES_DIR))
    yield applied
    if not existed:  # never remove an `acme` that was there before (BEAM_TEST_KUBECONFIG)
        # Wait (bounded) so a later test applying the examples does not meet a Terminating
        # namespace.
        kube.kubectl(
            "delete",
            "-f",
            str(EXAMPLES_DIR),
            "--wait=true",
            "--timeout=90s",
            check=False,
            timeout=120,
        )


def test_examples_apply_and_print_their_columns(
    kube: ControlPlane, examples_applied: subprocess.CompletedProcess[str]
) -> None:
    out = examples_applied.stdout
    for applied in (
        "namespace/acme",
        "beampricelist.beam.dev/default",
        "beamcustomer.beam.dev/cust-acme-1",
        "beamapikey.beam.dev/acme-enforcer",
        "beamapikey.beam.dev/acme-admin",
    ):
        assert applied in out

    customers = succeeded(kube, "get", "beamcustomers", "-n", "acme").stdout
    assert header_of(customers) == ["NAME", "CUSTOMER", "BALANCE", "AVAILABLE", "READY", "AGE"]
    assert customers.splitlines()[1].split()[:2] == ["cust-acme-1", "cus_acme_1"]
    keys = succeeded(kube, "get", "bak", "-n", "acme").stdout
    assert header_of(keys) == ["NAME", "ROLE", "SECRET", "READY", "AGE"]
    assert {tuple(line.split()[:2]) for line in keys.splitlines()[1:]} == {
        ("acme-admin", "admin"),
        ("acme-enforcer", "enforcer"),
    }
    prices = succeeded(kube, "get", "bpl", "-n", "acme", "-o", "wide").stdout
    assert header_of(prices) == ["NAME", "MODELS", "READY", "EFFECTIVE_FROM", "AGE"]

    stored = get_json(kube, "acme", "beamcustomer/cust-acme-1")["spec"]
    assert stored["credits"] == [
        {"id": "welcome", "amountGrains": 10000000, "description": "Welcome credit"},
        {"id": "2026-11-topup", "amountGrains": 50000000, "description": "November 2026 top-up"},
    ]
    models = get_json(kube, "acme", "beampricelist/default")["spec"]["models"]
    assert {m["model"]: m["outputGrainsPerMillion"] for m in models}["gpt-4"] == 60000000
    assert len(models) == 7

    everything = succeeded(kube, "get", "beam", "-n", "acme", "-o", "name").stdout.split()
    assert len(everything) == 4  # the `beam` category spans all three kinds


# --- invalid objects are refused, naming the field -------------------------------------------


@dataclass(frozen=True)
class Invalid:
    build: Callable[[str], Manifest]
    fragments: tuple[str, ...]


INVALID_ON_CREATE = {
    "negative credit amount": Invalid(
        lambda ns: customer(ns, credits=[credit("welcome", -5)]),
        ("spec.credits[0].amountGrains", "greater than or equal to 1"),
    ),
    "zero credit amount": Invalid(
        lambda ns: customer(ns, credits=[credit("welcome", 0)]),
        ("spec.credits[0].amountGrains", "greater than or equal to 1"),
    ),
    "credit amount above 2^53-1": Invalid(
        lambda ns: customer(ns, credits=[credit("big", MAX_SAFE_INTEGER + 1)]),
        ("spec.credits[0].amountGrains", "less than or equal to"),
    ),
    "credit without amount": Invalid(
        lambda ns: customer(ns, credits=[{"id": "welcome"}]),
        ("spec.credits[0].amountGrains: Required value",),
    ),
    "credit id with a space": Invalid(
        lambda ns: customer(ns, credits=[credit("two words", 5)]),
        ("spec.credits[0].id", "should match"),
    ),
    "duplicate credit ids": Invalid(
        lambda ns: customer(ns, credits=[credit("welcome", 5), credit("welcome", 5)]),
        ("spec.credits[1]", "Duplicate value"),
    ),
    "1001 credits": Invalid(
        lambda ns: customer(ns, credits=[credit(f"c{i}", 1) for i in range(1001)]),
        ("spec.credits", "Too many: 1001", "at most 1000"),
    ),
    "missing customerId": Invalid(
        lambda ns: without_spec_field(customer(ns, displayName="Acme"), "customerId"),
        ("spec.customerId: Required value",),
    ),
    "missing spec": Invalid(
        lambda ns: without_spec(customer(ns)),
        ("spec: Required value",),
    ),
    "300-character customerId": Invalid(
        lambda ns: customer(ns, customerId="c" * 300),
        ("spec.customerId", "Too long", "128"),
    ),
    "customerId starting with a dash": Invalid(
        lambda ns: customer(ns, customerId="-cus"),
        ("spec.customerId", "should match"),
    ),
    "unknown buffer strategy": Invalid(
        lambda ns: customer(ns, bufferStrategy="yolo"),
        ('spec.bufferStrategy: Unsupported value: "yolo"',),
    ),
    "hold TTL above one day": Invalid(
        lambda ns: customer(ns, holdTtlSeconds=86401),
        ("spec.holdTtlSeconds", "less than or equal to 86400"),
    ),
    "zero per-request cap": Invalid(
        lambda ns: customer(ns, maxRequestGrains=0),
        ("spec.maxRequestGrains", "greater than or equal to 1"),
    ),
    "negative low-balance threshold": Invalid(
        lambda ns: customer(ns, lowBalanceThresholdGrains=-1),
        ("spec.lowBalanceThresholdGrains", "greater than or equal to 0"),
    ),
    "unknown spec field": Invalid(
        lambda ns: customer(ns, balanceGrains=5),
        ('unknown field "spec.balanceGrains"',),
    ),
    "unknown role": Invalid(
        lambda ns: api_key(ns, role="superuser"),
        ('spec.role: Unsupported value: "superuser"',),
    ),
    "missing role": Invalid(
        lambda ns: without_spec_field(api_key(ns), "role"),
        ("spec.role: Required value",),
    ),
    "duplicate customers on a key": Invalid(
        lambda ns: api_key(ns, customers=["cus_1", "cus_1"]),
        ("spec.customers[1]", "Duplicate value"),
    ),
    "secret name that is not a DNS subdomain": Invalid(
        lambda ns: api_key(ns, secretName="Key_Secret"),
        ("spec.secretName", "should match"),
    ),
    "expiry that is not a date-time": Invalid(
        lambda ns: api_key(ns, expiresAt="tomorrow"),
        ("spec.expiresAt", "date-time"),
    ),
    "grace period above 30 days": Invalid(
        lambda ns: api_key(ns, rotation={"gracePeriodSeconds": 2592001}),
        ("spec.rotation.gracePeriodSeconds", "less than or equal to 2592000"),
    ),
    "key name too long for its default Secret name": Invalid(
        lambda ns: api_key(ns, name=".".join(["k" * 62] * 4)),  # 251 characters
        ("metadata.name", "Too long", "249"),
    ),
    "negative price": Invalid(
        lambda ns: price_list(ns, models=[price("gpt-4o", input_grains=-1)]),
        ("spec.models[0].inputGrainsPerMillion", "greater than or equal to 0"),
    ),
    "price above 10^12 per million": Invalid(
        lambda ns: price_list(ns, models=[price("gpt-4o", output_grains=10**12 + 1)]),
        ("spec.models[0].outputGrainsPerMillion", "less than or equal to"),
    ),
    "duplicate model in a price list": Invalid(
        lambda ns: price_list(ns, models=[price("gpt-4o"), price("gpt-4o", 1, 1)]),
        ("spec.models[1]", "Duplicate value"),
    ),
    "price list without models": Invalid(
        lambda ns: price_list(ns, models=[]),
        ("spec.models", "at least 1 item"),
    ),
    "model name with a space": Invalid(
        lambda ns: price_list(ns, models=[price("gpt 4o")]),
        ("spec.models[0].model", "should match"),
    ),
}


@pytest.mark.parametrize("case", INVALID_ON_CREATE.values(), ids=INVALID_ON_CREATE.keys())
def test_invalid_object_is_refused_naming_the_field(
    kube: ControlPlane, namespace: str, case: Invalid
) -> None:
    manifest = case.build(namespace)
    stderr = rejected(kube, "create", "-f", "-", input=json.dumps(manifest))
    assert_mentions(stderr, case.fragments)
    resource = f"{manifest['kind'].lower()}/{manifest['metadata']['name']}"
    lookup = kube.kubectl("get", resource, "-n", namespace, check=False)
    assert "NotFound" in lookup.stderr


def test_valid_objects_at_their_bounds_are_accepted(kube: ControlPlane, namespace: str) -> None:
    create(
        kube,
        customer(
            namespace,
            customerId="C" * 128,
            displayName="d" * 256,
            platformUserId="p" * 256,
            holdTtlSeconds=86400,
            maxRequestGrains=MAX_SAFE_INTEGER,
            lowBalanceThresholdGrains=0,
            credits=[credit(f"c-{i}:x.y_z", MAX_SAFE_INTEGER) for i in range(1000)],
        ),
    )
    create(kube, api_key(namespace, name=".".join(["k" * 62] * 3 + ["k" * 60])))  # 249
    create(
        kube,
        price_list(
            namespace,
            models=[price(f"vendor/model-{i}@v1:latest", 10**12, 0) for i in range(500)],
        ),
    )
    stored = get_json(kube, namespace, "beamcustomer/cust")["spec"]
    assert len(stored["credits"]) == 1000
    assert stored["credits"][0]["amountGrains"] == MAX_SAFE_INTEGER  # exact, not rounded


def test_defaults_are_filled_in_by_the_api_server(kube: ControlPlane, namespace: str) -> None:
    create(kube, customer(namespace))
    create(kube, api_key(namespace, rotation={"generation": 1}))
    spec = get_json(kube, namespace, "beamcustomer/cust")["spec"]
    assert spec == {"customerId": "cus_1", "bufferStrategy": "conservative", "suspended": False}
    rotation = get_json(kube, namespace, "beamapikey/key")["spec"]["rotation"]
    assert rotation == {"generation": 1, "gracePeriodSeconds": 3600}


# --- updates: immutable fields ---------------------------------------------------------------


def replaced(
    kube: ControlPlane, namespace: str, resource: str, edit: Callable[[Manifest], None]
) -> str:
    """The stored object, edited, as `kubectl replace -f -` input."""
    current = get_json(kube, namespace, resource)
    edit(current)
    return json.dumps(current)


def set_customer_id(value: str) -> Callable[[Manifest], None]:
    def edit(manifest: Manifest) -> None:
        manifest["spec"]["customerId"] = value

    return edit


def test_changed_customer_id_is_refused_on_replace(kube: ControlPlane, namespace: str) -> None:
    create(kube, customer(namespace))
    body = replaced(kube, namespace, "beamcustomer/cust", set_customer_id("cus_2"))
    stderr = rejected(kube, "replace", "-f", "-", input=body)
    assert_mentions(stderr, ("spec.customerId", "customerId is immutable"))


@pytest.mark.parametrize(
    ("patch_type", "patch", "fragments"),
    [
        pytest.param(
            "merge",
            {"spec": {"customerId": "cus_2"}},
            ("spec.customerId", "customerId is immutable"),
            id="merge patch of customerId",
        ),
        pytest.param(
            "json",
            [{"op": "replace", "path": "/spec", "value": {"customerId": "cus_2"}}],
            ("spec.customerId", "customerId is immutable"),
            id="whole spec replaced with another customerId",
        ),
        pytest.param(
            "json",
            [{"op": "replace", "path": "/spec", "value": {"displayName": "Acme"}}],
            ("spec.customerId: Required value",),
            id="whole spec replaced without customerId",
        ),
        pytest.param(
            "json",
            [{"op": "remove", "path": "/spec"}],
            ("spec: Required value",),
            id="spec removed",
        ),
    ],
)
def test_changed_customer_id_is_refused_on_patch(
    kube: ControlPlane,
    namespace: str,
    patch_type: str,
    patch: object,
    fragments: tuple[str, ...],
) -> None:
    create(kube, customer(namespace))
    stderr = rejected(
        kube,
        "patch",
        "beamcustomer/cust",
        "-n",
        namespace,
        f"--type={patch_type}",
        "-p",
        json.dumps(patch),
    )
    assert_mentions(stderr, fragments)
    assert get_json(kube, namespace, "beamcustomer/cust")["spec"]["customerId"] == "cus_1"


def test_changed_credit_amount_is_refused_on_replace(kube: ControlPlane, namespace: str) -> None:
    create(kube, customer(namespace, credits=[credit("welcome", 10), credit("topup", 50)]))

    def edit(manifest: Manifest) -> None:
        manifest["spec"]["credits"][1]["amountGrains"] = 51

    body = replaced(kube, namespace, "beamcustomer/cust", edit)
    stderr = rejected(kube, "replace", "-f", "-", input=body)
    assert_mentions(stderr, ("spec.credits[1].amountGrains", CREDIT_AMOUNT_IMMUTABLE))


def test_changed_credit_amount_is_refused_on_server_side_apply(
    kube: ControlPlane, namespace: str
) -> None:
    apply = ("apply", "--server-side", "--field-manager=beam-test", "-f", "-")
    succeeded(kube, *apply, input=json.dumps(customer(namespace, credits=[credit("welcome", 10)])))
    changed = customer(namespace, credits=[credit("other", 7), credit("welcome", 11)])
    stderr = rejected(kube, *apply, input=json.dumps(changed))
    assert_mentions(stderr, ("spec.credits[1].amountGrains", CREDIT_AMOUNT_IMMUTABLE))


def test_credits_can_be_added_removed_reordered_and_redescribed(
    kube: ControlPlane, namespace: str
) -> None:
    create(kube, customer(namespace, credits=[credit("a", 1), credit("b", 2), credit("c", 3)]))
    patch = {
        "spec": {
            # b removed (the ledger keeps it), c moved first, a re-described, d added.
            "credits": [credit("c", 3), credit("a", 1, description="fixed note"), credit("d", 4)]
        }
    }
    succeeded(
        kube, "patch", "beamcustomer/cust", "-n", namespace, "--type=merge", "-p", json.dumps(patch)
    )
    stored = get_json(kube, namespace, "beamcustomer/cust")["spec"]["credits"]
    assert [(c["id"], c["amountGrains"]) for c in stored] == [("c", 3), ("a", 1), ("d", 4)]
    # A removed id may come back with another amount: the API server cannot see entries that
    # are gone. The guard there is the ledger's idempotency key (same id, other amount is a
    # conflict the operator reports), not the schema.
    patch = {"spec": {"credits": [credit("b", 20)]}}
    succeeded(
        kube, "patch", "beamcustomer/cust", "-n", namespace, "--type=merge", "-p", json.dumps(patch)
    )


def test_rotation_generation_only_increases(kube: ControlPlane, namespace: str) -> None:
    create(kube, api_key(namespace, rotation={"generation": 2}))
    patch_args = ("patch", "beamapikey/key", "-n", namespace, "--type=merge", "-p")
    stderr = rejected(kube, *patch_args, json.dumps({"spec": {"rotation": {"generation": 1}}}))
    assert_mentions(stderr, ("spec.rotation.generation", "can only increase"))
    succeeded(kube, *patch_args, json.dumps({"spec": {"rotation": {"generation": 3}}}))
    rotation = get_json(kube, namespace, "beamapikey/key")["spec"]["rotation"]
    assert rotation == {"generation": 3, "gracePeriodSeconds": 3600}


# --- status subresource ----------------------------------------------------------------------

READY = {
    "type": "Ready",
    "status": "True",
    "reason": "Reconciled",
    "message": "in the ledger",
    "lastTransitionTime": "2026-11-28T12:00:00Z",
    "observedGeneration": 1,
}


def patch_status(kube: ControlPlane, namespace: str, resource: str, status: Manifest) -> None:
    succeeded(
        kube,
        "patch",
        resource,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )


def test_status_is_a_subresource_shown_in_printer_columns(
    kube: ControlPlane, namespace: str
) -> None:
    create(kube, customer(namespace, customerId="cus_status"))
    create(kube, api_key(namespace))
    create(kube, price_list(namespace))
    patch_status(
        kube,
        namespace,
        "beamcustomer/cust",
        {"balance": -250, "reserved": 750, "available": -1000, "conditions": [READY]},
    )
    patch_status(
        kube,
        namespace,
        "beamapikey/key",
        {"secretName": "key-key", "keyId": "bk_1a2b", "conditions": [{**READY, "status": "False"}]},
    )
    patch_status(kube, namespace, "beampricelist/prices", {"modelCount": 1, "conditions": [READY]})

    row = succeeded(kube, "get", "bc", "cust", "-n", namespace, "--no-headers").stdout.split()
    assert row[:5] == ["cust", "cus_status", "-250", "-1000", "True"]
    row = succeeded(kube, "get", "bak", "key", "-n", namespace, "--no-headers").stdout.split()
    assert row[:4] == ["key", "enforcer", "key-key", "False"]
    row = succeeded(kube, "get", "bpl", "prices", "-n", namespace, "--no-headers").stdout.split()
    assert row[:3] == ["prices", "1", "True"]

    # Writing the main resource does not touch status, and vice versa.
    succeeded(
        kube,
        "patch",
        "beamcustomer/cust",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"suspended": True}, "status": {"balance": 1}}),
    )
    stored = get_json(kube, namespace, "beamcustomer/cust")
    assert stored["status"]["balance"] == -250
    assert stored["spec"]["suspended"] is True
    assert stored["metadata"]["generation"] == 2


@pytest.mark.parametrize(
    ("status", "fragments"),
    [
        pytest.param(
            {"conditions": [{**READY, "status": "Maybe"}]},
            ('status.conditions[0].status: Unsupported value: "Maybe"',),
            id="condition status outside True/False/Unknown",
        ),
        pytest.param(
            {"conditions": [{**READY, "reason": "not camel case"}]},
            ("status.conditions[0].reason", "should match"),
            id="condition reason with spaces",
        ),
        pytest.param(
            {"conditions": [READY, {**READY, "status": "False"}]},
            ("status.conditions[1]", "Duplicate value"),
            id="two conditions of one type",
        ),
        pytest.param(
            {"reserved": -1},
            ("status.reserved", "greater than or equal to 0"),
            id="negative reserved",
        ),
    ],
)
def test_invalid_status_is_refused(
    kube: ControlPlane, namespace: str, status: Manifest, fragments: tuple[str, ...]
) -> None:
    create(kube, customer(namespace))
    stderr = rejected(
        kube,
        "patch",
        "beamcustomer/cust",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )
    assert_mentions(stderr, fragments)


def test_unknown_status_field_is_pruned_with_a_warning(kube: ControlPlane, namespace: str) -> None:
    create(kube, customer(namespace))
    patched = succeeded(
        kube,
        "patch",
        "beamcustomer/cust",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"phase": "Ready", "balance": 5}}),
    )
    assert 'unknown field "status.phase"' in patched.stderr
    assert get_json(kube, namespace, "beamcustomer/cust")["status"] == {"balance": 5}
