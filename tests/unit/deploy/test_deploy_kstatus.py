"""FineTuneJob statuses as Flux (kstatus) and Argo CD read them, asked of the real tools.

kstatus is `sigs.k8s.io/cli-utils/pkg/kstatus/status` itself and the Argo CD health is the
shipped Lua in gopher-lua (both through hack/gotools' gitops-status; see gitops_status.py).
First the kstatus rules this project relies on, as the library applies them today (an
upgrade that changes one fails here); then the status `finetune_operator.status` writes in
each phase, classified by both tools; then the README's table, checked against the tools.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from typing import Any

import pytest
from deploy_helpers import ROOT
from finetune_operator import status as status_logic
from gitops_status import Classified, classify


def _obj(*, generation: int = 1, status: dict[str, Any] | None = None, **metadata: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "flowers", "namespace": "ml", "generation": generation, **metadata},
        "spec": {"output": {"path": "/models/flowers"}},
    }
    if status is not None:
        obj["status"] = status
    return obj


def _cond(kind: str, status: str, reason: str = "R") -> dict[str, Any]:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": f"{kind} is {status}",
        "observedGeneration": 1,
    }


# --- the library's rules for a kind it has no special code for ----------------------------

RULES: list[tuple[str, dict[str, Any], str]] = [
    (
        "deleting",
        _obj(deletionTimestamp="2026-01-01T00:00:00Z", status={"observedGeneration": 1}),
        "Terminating",
    ),
    ("stale-generation", _obj(generation=3, status={"observedGeneration": 2}), "InProgress"),
    ("observed-generation-zero", _obj(status={"observedGeneration": 0}), "InProgress"),
    (
        "reconciling",
        _obj(status={"observedGeneration": 1, "conditions": [_cond("Reconciling", "True")]}),
        "InProgress",
    ),
    ("stalled", _obj(status={"observedGeneration": 1, "conditions": [_cond("Stalled", "True")]}), "Failed"),
    # Reconciling/Stalled decide before Ready does:
    (
        "reconciling-beats-ready",
        _obj(
            status={
                "observedGeneration": 1,
                "conditions": [_cond("Ready", "True"), _cond("Reconciling", "True")],
            }
        ),
        "InProgress",
    ),
    (
        "stalled-beats-ready",
        _obj(
            status={"observedGeneration": 1, "conditions": [_cond("Ready", "True"), _cond("Stalled", "True")]}
        ),
        "Failed",
    ),
    # checkReadyCondition: for kinds without rules of their own, kstatus does read Ready.
    (
        "ready-false",
        _obj(status={"observedGeneration": 1, "conditions": [_cond("Ready", "False")]}),
        "InProgress",
    ),
    (
        "ready-unknown",
        _obj(status={"observedGeneration": 1, "conditions": [_cond("Ready", "Unknown")]}),
        "InProgress",
    ),
    ("ready-true", _obj(status={"observedGeneration": 1, "conditions": [_cond("Ready", "True")]}), "Current"),
    (
        "no-ready",
        _obj(status={"observedGeneration": 1, "conditions": [_cond("Reconciling", "False")]}),
        "Current",
    ),
    ("plain", _obj(status={"observedGeneration": 1}), "Current"),
    # An object nobody has written a status for is Current: the operator must write one at once.
    ("no-status", _obj(), "Current"),
]


def test_kstatus_rules_as_the_library_applies_them() -> None:
    got = classify([obj for _, obj, _ in RULES], lua=None)
    assert {name: c.kstatus.status for (name, _, _), c in zip(RULES, got, strict=True)} == {
        name: want for name, _, want in RULES
    }
    stale = got[1].kstatus.message
    assert "generation is 3" in stale and "observed generation is 2" in stale


# --- statuses the operator writes (finetune_operator.status, its pure status logic) -------

NOW = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.UTC)
T0 = "2026-01-01T11:50:00Z"


def _derived(*, phase: str, generation: int = 1, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """A whole FineTuneJob whose status is what `status.derive` returns for `phase`."""
    job = status_logic.JobView(uid="j", suspend=False, active=1, start_time=T0)
    running = status_logic.PodView(
        uid="p1", name="flowers-abcde", phase="Running", created=T0, start_time=T0, running_since=T0
    )
    pods: list[status_logic.PodView] = [running]
    suspend = False
    if phase == "Pending":
        job, pods = status_logic.JobView(uid="j", suspend=False), []
    elif phase == "Queued":  # Kueue holds the Job (suspended by Kueue, not by spec.suspend)
        job, pods = status_logic.JobView(uid="j", suspend=True), []
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
        previous=previous or {},
        job=job,
        pods=pods,
        counted_pods=frozenset(),
        now=NOW,
        pending_timeout_s=600.0,
    )
    assert outcome.status["phase"] == ("Pending" if phase == "Queued" else phase), outcome.status
    return _obj(generation=generation, status=outcome.status)


def _unobserved_spec_change() -> dict[str, Any]:
    obj = _derived(phase="Succeeded")
    obj["metadata"]["generation"] = 2
    return obj


def _deleting() -> dict[str, Any]:
    obj = _derived(phase="Running")
    obj["metadata"]["deletionTimestamp"] = "2026-01-01T12:05:00Z"
    return obj


# What each tool must say (README, "GitOps"): a job still on its way to a model is not done
# (InProgress / Progressing), a failed one Failed / Degraded, a trained one Current /
# Healthy; a suspended one has reached the state its spec asks for (Current / Suspended).
STATES: dict[str, tuple[Callable[[], dict[str, Any]], str, str]] = {
    # What the API server serves for a job it has just created: the CRD defaults
    # status.observedGeneration to 0, below the generation, before the operator writes.
    "none": (lambda: _obj(status={"observedGeneration": 0}), "InProgress", "Progressing"),
    "Pending": (lambda: _derived(phase="Pending"), "InProgress", "Progressing"),
    "Queued": (lambda: _derived(phase="Queued"), "InProgress", "Progressing"),
    "Running": (lambda: _derived(phase="Running"), "InProgress", "Progressing"),
    "Succeeded": (lambda: _derived(phase="Succeeded"), "Current", "Healthy"),
    "Failed": (lambda: _derived(phase="Failed"), "Failed", "Degraded"),
    "Suspended": (lambda: _derived(phase="Suspended"), "Current", "Suspended"),
    "resumed": (
        lambda: _derived(phase="Running", previous=_derived(phase="Suspended")["status"]),
        "InProgress",
        "Progressing",
    ),
    "unobserved": (_unobserved_spec_change, "InProgress", "Progressing"),
    "deleting": (_deleting, "Terminating", "Progressing"),
}


@pytest.fixture(scope="module")
def verdicts() -> dict[str, Classified]:
    got = classify([build() for build, _, _ in STATES.values()])
    return dict(zip(STATES, got, strict=True))


@pytest.mark.parametrize("state", list(STATES))
def test_operator_status_reads_as_decided(state: str, verdicts: dict[str, Classified]) -> None:
    _, kstatus, argocd = STATES[state]
    got = verdicts[state]
    assert got.argocd is not None
    assert (got.kstatus.status, got.argocd.status) == (kstatus, argocd), (got, STATES[state][0]())


@pytest.mark.parametrize("phase", ["Pending", "Running", "Succeeded", "Failed", "Suspended"])
def test_ready_is_true_only_on_a_trained_model(phase: str) -> None:
    conditions = {c["type"]: c for c in _derived(phase=phase)["status"]["conditions"]}
    ready = conditions.get("Ready")
    if phase == "Suspended":
        assert ready is None  # Ready=False would read InProgress (checkReadyCondition)
    else:
        assert ready is not None and ready["observedGeneration"] == 1
        assert (ready["status"] == "True") == (phase == "Succeeded")


def test_kstatus_message_says_why_a_job_is_not_done(verdicts: dict[str, Classified]) -> None:
    assert "waiting for the trainer pod" in verdicts["Pending"].kstatus.message
    assert "generation is 2, but latest observed generation is 1" in verdicts["unobserved"].kstatus.message


# --- the README's table is what the tools say ----------------------------------------------

README = ROOT / "README.md"
ROW = re.compile(
    r"^\|\s*`(?P<state>[A-Za-z]+)`[^|]*\|\s*`(?P<kstatus>[A-Za-z]+)`[^|]*\|\s*`(?P<argocd>[A-Za-z]+)`"
)


def _readme_table() -> dict[str, tuple[str, str]]:
    text = README.read_text(encoding="utf-8")
    start = text.index("<!-- gitops-status-table -->")
    end = text.index("<!-- /gitops-status-table -->")
    rows = {}
    for line in text[start:end].splitlines():
        if m := ROW.match(line):
            rows[m["state"]] = (m["kstatus"], m["argocd"])
    return rows


def test_readme_table_is_what_the_tools_say(verdicts: dict[str, Classified]) -> None:
    table = _readme_table()
    assert set(table) == set(STATES), "the README's table and STATES name different states"
    for state, (kstatus, argocd) in table.items():
        got = verdicts[state]
        assert got.argocd is not None
        assert (got.kstatus.status, got.argocd.status) == (kstatus, argocd), state
