"""FineTuneJob statuses as kstatus (Flux, kpt) classifies them.

First the classifier itself against kstatus' documented cases, then the statuses the
operator writes for each phase: a job that is still training must not look Current to a
GitOps tool, a failed one must look Failed, a succeeded one Current with Ready=True.
"""

from __future__ import annotations

from typing import Any

import pytest
from kstatus import compute, ready_consistent


def _obj(*, generation: int = 1, status: dict[str, Any] | None = None, **metadata: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "flowers", "namespace": "ml", "generation": generation, **metadata},
    }
    if status is not None:
        obj["status"] = status
    return obj


def _cond(kind: str, status: str, reason: str = "R", generation: int = 1) -> dict[str, Any]:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": f"{kind} is {status}",
        "observedGeneration": generation,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (_obj(deletionTimestamp="2026-01-01T00:00:00Z", status={"observedGeneration": 1}), "Terminating"),
        (_obj(generation=3, status={"observedGeneration": 2}), "InProgress"),
        (_obj(status={"observedGeneration": 1, "conditions": [_cond("Reconciling", "True")]}), "InProgress"),
        (_obj(status={"observedGeneration": 1, "conditions": [_cond("Stalled", "True")]}), "Failed"),
        (_obj(status={"observedGeneration": 1, "conditions": [_cond("Reconciling", "False")]}), "Current"),
        (_obj(status={"observedGeneration": 1}), "Current"),
        # kstatus cannot tell "not observed" from "no observedGeneration field": Current.
        (_obj(), "Current"),
    ],
    ids=["deleting", "stale-generation", "reconciling", "stalled", "reconciling-false", "plain", "no-status"],
)
def test_classifier_follows_kstatus(obj: dict[str, Any], expected: str) -> None:
    assert compute(obj).status == expected


def test_stale_generation_message_names_both_generations() -> None:
    result = compute(_obj(generation=3, status={"observedGeneration": 2}))
    assert "generation is 3" in result.message and "observed generation is 2" in result.message


def test_ready_consistency_detects_a_ready_true_while_in_progress() -> None:
    bad = _obj(
        status={"observedGeneration": 1, "conditions": [_cond("Ready", "True"), _cond("Reconciling", "True")]}
    )
    good = _obj(status={"observedGeneration": 1, "conditions": [_cond("Ready", "True")]})
    assert not ready_consistent(bad)
    assert ready_consistent(good)
