"""The operator's Kopf peering without a cluster: priorities, Kopf's settings, the switch to
standalone, and Kopf's peering CRDs as shipped in crds/.

tests/k8s/test_operator_peering.py runs two operators against a real API server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from click.testing import CliRunner

from beam.cli.main import main as beam
from beam.config import OperatorSettings
from beam_operator import main as operator_main
from beam_operator.main import configure_kopf
from beam_operator.peering import PRIORITY_LIMIT, Peering, priority_for

REPO_ROOT = Path(__file__).resolve().parents[2]
NOW_NS = 1_780_000_000_123_456_789  # 2026-05-28, in time.time_ns() units


def settings(**values: Any) -> OperatorSettings:
    return OperatorSettings.model_validate(values)


# --- the priority ----------------------------------------------------------------------------


def test_the_operator_that_started_last_has_the_highest_priority() -> None:
    earlier, later = priority_for(NOW_NS), priority_for(NOW_NS + 1_000)  # 1 µs apart
    assert later == earlier + 1
    assert earlier == 1_780_000_000_123_456  # the start in microseconds
    # Exact in a float64 (JSON) reader, far ahead: 2255-06-05 is still below the limit.
    assert priority_for(9_000_000_000_000_000_000) < PRIORITY_LIMIT == 2**53
    assert float(earlier) == earlier


def test_peering_follows_the_settings() -> None:
    clusterwide = Peering.of(settings(peering_name="rel-beam-ns-operator"), NOW_NS)
    assert clusterwide == Peering("rel-beam-ns-operator", True, priority_for(NOW_NS), 60)
    namespaced = Peering.of(settings(namespaces="acme,globex", peering_lifetime_seconds=15), NOW_NS)
    assert namespaced == Peering("beam", False, priority_for(NOW_NS), 15)
    assert Peering.of(settings(standalone=True), NOW_NS) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [("peering_name", "Not_A_Name"), ("peering_name", "x" * 254),
     ("peering_lifetime_seconds", 9), ("peering_lifetime_seconds", 3601)],
)  # fmt: skip
def test_peering_settings_are_bounded(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        settings(**{field: value})


def test_environment_names_the_peering(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEAM_PEERING_NAME", "rel-beam-ns-operator")
    monkeypatch.setenv("BEAM_PEERING_LIFETIME_SECONDS", "20")
    monkeypatch.setenv("BEAM_STANDALONE", "true")
    loaded = OperatorSettings()
    assert (loaded.peering_name, loaded.peering_lifetime_seconds, loaded.standalone) == (
        "rel-beam-ns-operator", 20, True,
    )  # fmt: skip


# --- Kopf's settings -------------------------------------------------------------------------


def test_kopf_peering_is_mandatory_with_this_processs_priority() -> None:
    kopf_settings = kopf.OperatorSettings()
    configure_kopf(kopf_settings, Peering("rel-beam-ns-operator", False, 42, 15))
    peering = kopf_settings.peering
    assert (peering.standalone, peering.mandatory) == (False, True)
    assert (peering.name, peering.clusterwide, peering.priority, peering.lifetime) == (
        "rel-beam-ns-operator", False, 42, 15,
    )  # fmt: skip


def test_without_a_peering_kopf_runs_standalone() -> None:
    kopf_settings = kopf.OperatorSettings()
    configure_kopf(kopf_settings)
    assert (kopf_settings.peering.standalone, kopf_settings.peering.mandatory) == (True, False)


def test_beam_operator_standalone_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(operator_main, "run", lambda *, standalone: calls.append(standalone))
    runner = CliRunner()
    assert runner.invoke(beam, ["operator", "--standalone"]).exit_code == 0
    assert runner.invoke(beam, ["operator"]).exit_code == 0
    assert calls == [True, False]


# --- Kopf's CRDs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file_name", "kind", "scope"),
    [("kopf.dev_clusterkopfpeerings.yaml", "ClusterKopfPeering", "Cluster"),
     ("kopf.dev_kopfpeerings.yaml", "KopfPeering", "Namespaced")],
)  # fmt: skip
def test_peering_crds_are_kopfs(file_name: str, kind: str, scope: str) -> None:
    (crd,) = [d for d in yaml.safe_load_all((REPO_ROOT / "crds" / file_name).read_text()) if d]
    plural = f"{kind.lower()}s"
    assert crd["metadata"]["name"] == f"{plural}.kopf.dev"
    spec = crd["spec"]
    assert (spec["group"], spec["scope"]) == ("kopf.dev", scope)
    assert spec["names"] == {"kind": kind, "plural": plural, "singular": kind.lower()}
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1", True, True)
    # Kopf patches status on the object itself: no status subresource, unknown keys kept.
    assert "subresources" not in version
    assert version["schema"]["openAPIV3Schema"] == {
        "type": "object",
        "properties": {"status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    }
