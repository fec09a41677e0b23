"""FineTuneJob statuses as kstatus (Flux, kpt) classifies them.

First the classifier itself against kstatus' documented cases, then the statuses the
operator writes for each phase: a job that is still training must not look Current to a
GitOps tool, a failed one must look Failed, a succeeded one Current with Ready=True.
"""

from __future__ import annotations

import datetime
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


# --- statuses the operator writes (finetune_operator.status, its pure status logic) -------

NOW = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.UTC)
T0 = "2026-01-01T11:50:00Z"


def _derived(*, phase: str, generation: int = 1) -> dict[str, Any]:
    """A whole FineTuneJob whose status is what `status.derive` returns for `phase`."""
    from finetune_operator import status as status_logic

    job = status_logic.JobView(uid="j", suspend=False, active=1, start_time=T0)
    running = status_logic.PodView(
        uid="p1", name="flowers-abcde", phase="Running", created=T0, start_time=T0, running_since=T0
    )
    pods: list[status_logic.PodView] = [running]
    suspend = False
    if phase == "Pending":
        job, pods = status_logic.JobView(uid="j", suspend=False), []
    elif phase == "Succeeded":
        job = status_logic.JobView(uid="j", suspend=False, succeeded=1, conditions={"Complete": ("", "", T0)})
        pods = [
            status_logic.PodView(
                uid="p1", name="flowers-abcde", phase="Succeeded", running_since=T0, exit_code=0
            )
        ]
    elif phase == "Failed":
        job = status_logic.JobView(
            uid="j", suspend=False, failed=1, conditions={"Failed": ("PodFailurePolicy", "exit code 3", T0)}
        )
        pods = [
            status_logic.PodView(
                uid="p1", name="flowers-abcde", phase="Failed", running_since=T0, exit_code=3
            )
        ]
    elif phase == "Suspended":
        suspend, job, pods = True, status_logic.JobView(uid="j", suspend=True), []
    outcome = status_logic.derive(
        generation=generation,
        suspend=suspend,
        output_path="/models/flowers",
        previous={},
        job=job,
        pods=pods,
        counted_pods=frozenset(),
        now=NOW,
        pending_timeout_s=600.0,
    )
    assert outcome.status["phase"] == phase, outcome.status
    return _obj(generation=generation, status=outcome.status)


# What a GitOps tool should conclude: a job still training is not done (InProgress), a failed
# one is Failed, a finished one is Current; suspension is a reconciled, steady state.
EXPECTED = {
    "Pending": "InProgress",
    "Running": "InProgress",
    "Succeeded": "Current",
    "Failed": "Failed",
    "Suspended": "Current",
}


# kstatus never reads Ready/Running/Failed: it reads the abnormal-true conditions Reconciling
# (True while Pending/Running) and Stalled (True on Failed), which the operator writes.
@pytest.mark.parametrize("phase", list(EXPECTED))
def test_operator_status_classifies_as_expected(phase: str) -> None:
    obj = _derived(phase=phase)
    assert compute(obj).status == EXPECTED[phase], obj["status"]["conditions"]


@pytest.mark.parametrize("phase", list(EXPECTED))
def test_operator_ready_condition_is_consistent(phase: str) -> None:
    obj = _derived(phase=phase)
    ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
    assert ready["observedGeneration"] == obj["metadata"]["generation"] == obj["status"]["observedGeneration"]
    assert (ready["status"] == "True") == (phase == "Succeeded")
    assert ready_consistent(obj)


def test_a_spec_change_not_yet_observed_is_in_progress() -> None:
    obj = _derived(phase="Succeeded")
    obj["metadata"]["generation"] = 2
    assert compute(obj).status == "InProgress"
