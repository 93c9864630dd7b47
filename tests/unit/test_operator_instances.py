"""Two releases never reconcile the same object: every handler is filtered by the
operator's instance label (beam_operator.handlers.instance_labels). No cluster needed."""

from __future__ import annotations

import kopf
import pytest

from beam.config import OperatorSettings
from beam_operator.handlers import INSTANCE_LABEL
from beam_operator.main import build_registry


@pytest.mark.parametrize(("instance", "expected"), [("", kopf.ABSENT), ("second", "second")])
def test_every_handler_is_filtered_by_the_instance_label(instance: str, expected: object) -> None:
    settings = OperatorSettings(
        environment="dev",
        operator_instance=instance,  # type: ignore[arg-type]
    )
    registry = build_registry(settings)
    handlers = [*registry._changing.get_all_handlers(), *registry._spawning.get_all_handlers()]
    assert len(handlers) >= 9  # resume, create, update per kind; deletes; timers
    assert {h.labels[INSTANCE_LABEL] for h in handlers if h.labels} == {expected}
    assert all(h.labels for h in handlers)


def test_an_instance_name_must_be_a_label_value() -> None:
    with pytest.raises(ValueError, match="operator_instance"):
        OperatorSettings(environment="dev", operator_instance="Not A Label")  # type: ignore[arg-type]
