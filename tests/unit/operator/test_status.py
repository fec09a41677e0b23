"""The status mapping: Job and pod states (as Kubernetes writes them) -> phase, reason, conditions, events."""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest
from finetune_operator import status

NOW = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
EARLY = "2026-01-01T11:00:00Z"


def job(*, suspend: bool = False, active: int = 0, failed: int = 0, succeeded: int = 0,
        conditions: list[tuple[str, str, str]] = (), start: str | None = EARLY) -> dict[str, Any]:  # type: ignore[assignment]
    return {
        "metadata": {"uid": "job-uid"},
        "spec": {"suspend": suspend},
        "status": {
            "active": active,
            "failed": failed,
            "succeeded": succeeded,
            "startTime": start,
            "completionTime": "2026-01-01T11:30:00Z" if any(c[0] == "Complete" for c in conditions) else None,
            "conditions": [
                {"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": "2026-01-01T11:31:00Z"}
                for t, r, m in conditions
            ],
        },
    }


def summary(code: int, reason: str, message: str, model_path: str | None = None) -> str:
    return json.dumps({"exitCode": code, "reason": reason, "message": message, "metrics": {}, "modelPath": model_path})


def pod(name: str = "p1", *, phase: str = "Running", exit_code: int | None = None, message: str = "",
        waiting: str | None = None, unschedulable: bool = False, created: str = EARLY,
        finished: str = "2026-01-01T11:20:00Z") -> dict[str, Any]:
    state: dict[str, Any]
    if exit_code is not None:
        state = {"terminated": {"exitCode": exit_code, "message": message, "startedAt": EARLY, "finishedAt": finished}}
    elif waiting is not None:
        state = {"waiting": {"reason": waiting, "message": "pull failed"}}
    elif phase == "Running":
        state = {"running": {"startedAt": EARLY}}
    else:
        state = {}
    conditions = []
    if unschedulable:
        conditions.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                           "message": "0/1 nodes: insufficient nvidia.com/gpu"})
    return {
        "metadata": {"uid": f"uid-{name}", "name": name, "creationTimestamp": created},
        "status": {
            "phase": phase,
            "startTime": EARLY if phase != "Pending" else None,
            "conditions": conditions,
            "containerStatuses": [{"name": "trainer", "state": state}] if state else [],
        },
    }


def derive(job_body: dict[str, Any] | None, pods: list[dict[str, Any]], *, previous: dict[str, Any] | None = None,
           suspend: bool = False, counted: frozenset[str] | None = frozenset(),
           pending_timeout_s: float = 300.0, creation_failure: str | None = None) -> status.Outcome:
    return status.derive(
        generation=2,
        suspend=suspend,
        output_path="/models/x/",
        previous=previous or {},
        job=status.job_view(job_body) if job_body is not None else None,
        pods=[status.pod_view(p) for p in pods],
        counted_pods=counted,
        now=NOW,
        pending_timeout_s=pending_timeout_s,
        creation_failure=creation_failure,
    )


CASES = [
    # id, job, pods, previous phase, suspend -> phase, reason, message fragment
    ("no-job-yet", None, [], None, False, "Pending", "Creating", "creating"),
    ("pod-pending", job(active=1), [pod(phase="Pending")], None, False, "Pending", "Waiting", "waiting"),
    ("pod-running", job(active=1), [pod()], "Pending", False, "Running", "Training", "p1 running"),
    ("succeeded", job(succeeded=1, conditions=[("Complete", "", "")]),
     [pod(phase="Succeeded", exit_code=0, message=summary(0, "Succeeded", "ok", "/models/x/model.keras"))],
     "Running", False, "Succeeded", "Succeeded", "/models/x/model.keras"),
    ("data-error", job(failed=1, conditions=[("Failed", "PodFailurePolicy", "Container trainer exited with 3")]),
     [pod(phase="Failed", exit_code=3, message=summary(3, "DataError", "no images in /data/train"))],
     "Running", False, "Failed", "DataError", "no images in /data/train"),
    ("invalid-spec-from-trainer", job(failed=1, conditions=[("Failed", "PodFailurePolicy", "")]),
     [pod(phase="Failed", exit_code=2, message=summary(2, "InvalidSpec", "spec.model.base: unknown"))],
     "Running", False, "Failed", "InvalidSpec", "spec.model.base: unknown"),
    ("diverged", job(failed=1, conditions=[("Failed", "PodFailurePolicy", "")]),
     [pod(phase="Failed", exit_code=4, message=summary(4, "Diverged", "loss is NaN at epoch 3"))],
     "Running", False, "Failed", "Diverged", "NaN"),
    ("diverged-without-summary", job(failed=1, conditions=[("Failed", "PodFailurePolicy", "")]),
     [pod(phase="Failed", exit_code=4, message="Traceback ... (logs)")],
     "Running", False, "Failed", "Diverged", "Traceback"),
    ("backoff-limit", job(failed=3, conditions=[("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")]),
     [pod("a", phase="Failed", exit_code=1, message="boom a", finished="2026-01-01T11:10:00Z"),
      pod("b", phase="Failed", exit_code=1, message="boom b", finished="2026-01-01T11:20:00Z")],
     "Running", False, "Failed", "BackoffLimitExceeded", "boom b"),
    ("deadline", job(failed=1, conditions=[("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")]),
     [], "Running", False, "Failed", "DeadlineExceeded", "deadline"),
    ("image-pull", job(active=1), [pod(phase="Pending", waiting="ImagePullBackOff")], "Pending", False,
     "Failed", "ImagePullError", "ImagePullBackOff"),
    ("unschedulable", job(active=1), [pod(phase="Pending", unschedulable=True)], "Pending", False,
     "Failed", "Unschedulable", "insufficient nvidia.com/gpu"),
    ("pod-creation-failed", job(), [], "Pending", False,
     "Failed", "PodCreationFailed", "could not create its pod"),
    ("suspended", job(suspend=True, conditions=[("Suspended", "JobSuspended", "")]), [], "Running", True,
     "Suspended", "Suspended", "spec.suspend"),
    ("queued-by-kueue", job(suspend=True), [], None, False, "Pending", "Queued", "suspended"),
    ("retrying-between-pods", job(active=1, failed=1),
     [pod("a", phase="Failed", exit_code=1), pod("b", phase="Pending")], "Running", False,
     "Running", "Retrying", "waiting for the next pod"),
]


@pytest.mark.parametrize(
    ("job_body", "pods", "prev", "suspend", "phase", "reason", "fragment"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_status_table(job_body: dict[str, Any] | None, pods: list[dict[str, Any]], prev: str | None,
                      suspend: bool, phase: str, reason: str, fragment: str) -> None:
    out = derive(job_body, pods, previous={"phase": prev} if prev else None, suspend=suspend, pending_timeout_s=60)
    s = out.status
    assert (s["phase"], s["reason"]) == (phase, reason)
    assert fragment in s["message"]
    conds = {c["type"]: c for c in s["conditions"]}
    assert list(conds) == ["Ready", "Running", "Complete", "Failed", "Suspended", "Reconciling", "Stalled"]
    assert all(c["observedGeneration"] == 2 for c in conds.values())
    assert conds["Ready"]["status"] == ("True" if phase == "Succeeded" else "False")
    assert conds["Complete"]["status"] == ("True" if phase == "Succeeded" else "False")
    assert conds["Failed"]["status"] == ("True" if phase == "Failed" else "False")
    assert conds["Running"]["status"] == ("True" if phase == "Running" else "False")
    assert conds["Suspended"]["status"] == ("True" if phase == "Suspended" else "False")
    # kstatus' pair: Reconciling while on the way, Stalled once failed for good.
    assert conds["Reconciling"]["status"] == ("True" if phase in ("Pending", "Running") else "False")
    assert conds["Stalled"]["status"] == ("True" if phase == "Failed" else "False")
    assert conds["Reconciling"]["reason"] == reason
    if phase == "Failed":
        assert conds["Stalled"]["reason"] == reason and fragment in conds["Stalled"]["message"]
    if phase == "Failed":
        assert conds["Failed"]["reason"] == reason and fragment in conds["Failed"]["message"]
        assert s["completionTime"]
    assert s["observedGeneration"] == 2


def test_success_sets_model_path_progress_and_completion() -> None:
    out = derive(job(succeeded=1, conditions=[("Complete", "", "")]),
                 [pod(phase="Succeeded", exit_code=0, message="not json")])
    s = out.status
    assert s["modelPath"] == "/models/x/model.keras"
    assert (s["progress"], s["etaSeconds"]) == (100, 0)
    assert s["completionTime"] == "2026-01-01T11:30:00Z"
    assert [e.reason for e in out.events] == ["Succeeded"]


def test_stuck_pending_needs_the_timeout_and_stops_the_job() -> None:
    young = pod(phase="Pending", waiting="ErrImagePull", created="2026-01-01T11:59:30Z")
    assert derive(job(active=1), [young], pending_timeout_s=60).status["phase"] == "Pending"
    old = derive(job(active=1), [pod(phase="Pending", waiting="ErrImagePull")], pending_timeout_s=60)
    assert old.status["phase"] == "Failed" and old.stop_job
    never = derive(job(active=1), [pod(phase="Pending", waiting="ErrImagePull")], pending_timeout_s=0)
    assert never.status["phase"] == "Pending" and not never.stop_job


def test_a_job_that_never_makes_a_pod_fails_after_the_timeout_quoting_its_event() -> None:
    refused = 'pods "x-abc" is forbidden: violates PodSecurity "restricted:latest": hostPath volumes'
    out = derive(job(), [], previous={"phase": "Pending"}, pending_timeout_s=60, creation_failure=refused)
    assert (out.status["phase"], out.status["reason"]) == ("Failed", "PodCreationFailed")
    assert refused in out.status["message"] and out.stop_job
    assert [(e.type, e.reason) for e in out.events] == [("Warning", "Failed")]
    assert "PodCreationFailed" in out.events[0].message and "PodSecurity" in out.events[0].message
    view = status.job_view(job())
    assert status.creation_stalled(view, [], now=NOW, timeout_s=60)
    # Not yet: the Job started within the timeout (or no timeout at all).
    young = job(start="2026-01-01T11:59:30Z")
    assert derive(young, [], pending_timeout_s=60).status["phase"] == "Pending"
    assert not status.creation_stalled(view, [], now=NOW, timeout_s=0)
    # Not this rule: the Job has pods (counted or listed), finished, or is suspended.
    assert not status.creation_stalled(status.job_view(job(active=1)), [], now=NOW, timeout_s=60)
    assert not status.creation_stalled(view, [status.pod_view(pod(phase="Pending"))], now=NOW, timeout_s=60)
    assert not status.creation_stalled(status.job_view(job(suspend=True)), [], now=NOW, timeout_s=60)
    assert not status.creation_stalled(
        status.job_view(job(failed=1, conditions=[("Failed", "DeadlineExceeded", "")])), [], now=NOW, timeout_s=60
    )
    # Without a startTime the Job's creation counts.
    unstarted = {**job(start=None), "metadata": {"uid": "job-uid", "creationTimestamp": EARLY}}
    assert status.creation_stalled(status.job_view(unstarted), [], now=NOW, timeout_s=60)
    fresh = {**job(start=None), "metadata": {"uid": "job-uid", "creationTimestamp": "2026-01-01T11:59:50Z"}}
    assert not status.creation_stalled(status.job_view(fresh), [], now=NOW, timeout_s=60)


def test_final_phases_are_sticky() -> None:
    previous = {"phase": "Failed", "reason": "DataError", "observedGeneration": 2, "attempts": 1}
    out = derive(job(active=1), [pod()], previous=previous)
    assert out.status == previous and out.events == ()


def test_attempts_count_new_pods_and_retries() -> None:
    first = derive(job(active=1), [pod("a")], previous={"phase": "Pending"})
    assert first.status["attempts"] == 1 and [e.reason for e in first.events] == ["Started"]
    second = derive(
        job(active=1, failed=1),
        [pod("a", phase="Failed", exit_code=1), pod("b")],
        previous={**first.status},
        counted=first.counted_pods,
    )
    assert second.status["attempts"] == 2
    assert second.retried == 1 and "Retrying" in [e.reason for e in second.events]
    again = derive(job(active=1, failed=1), [pod("a", phase="Failed", exit_code=1), pod("b")],
                   previous={**second.status}, counted=second.counted_pods)
    assert again.status["attempts"] == 2 and again.events == ()


def test_after_a_restart_visible_pods_are_taken_as_counted() -> None:
    out = derive(job(active=1), [pod("a")], previous={"phase": "Running", "attempts": 3}, counted=None)
    assert out.status["attempts"] == 3 and out.counted_pods == frozenset({"uid-a"}) and out.retried == 0


def test_after_a_restart_pods_gone_meanwhile_still_count_through_the_jobs_counters() -> None:
    # While the operator was down, attempts 2 and 3 failed and their pods were garbage-collected;
    # the fourth runs. The Job controller's counters still have them.
    out = derive(job(active=1, failed=3), [pod("d")], previous={"phase": "Running", "attempts": 1}, counted=None)
    assert out.status["attempts"] == 4 and out.counted_pods == frozenset({"uid-d"})
    # Without a restart the counters are not needed: pods are counted as they are seen.
    seen = derive(job(active=1, failed=3), [pod("d")], previous={"phase": "Running", "attempts": 4},
                  counted=frozenset({"uid-d"}))
    assert seen.status["attempts"] == 4


def test_resume_is_an_event_and_a_new_attempt() -> None:
    suspended = derive(job(suspend=True, conditions=[("Suspended", "", "")]), [], previous={"phase": "Running",
                       "attempts": 1}, suspend=True, counted=frozenset({"uid-a"}))
    assert [e.reason for e in suspended.events] == ["Suspended"]
    resumed = derive(job(active=1), [pod("b")], previous={**suspended.status}, counted=suspended.counted_pods)
    assert resumed.status["attempts"] == 2
    assert [e.reason for e in resumed.events] == ["Resumed"]


def test_condition_transition_times_are_kept_while_unchanged() -> None:
    first = derive(job(active=1), [pod()], previous={"phase": "Pending"})
    later = status.derive(
        generation=2, suspend=False, output_path="/m", previous=first.status,
        job=status.job_view(job(active=1)), pods=[status.pod_view(pod())], counted_pods=first.counted_pods,
        now=NOW + datetime.timedelta(minutes=5), pending_timeout_s=0,
    )
    assert later.status["conditions"] == first.status["conditions"]
    assert status.diff(desired=later.status, current=first.status) == {}


def test_invalid_spec_outcome() -> None:
    out = status.invalid_spec(generation=1, message="spec.model.base: unknown", previous={}, now=NOW)
    assert (out.status["phase"], out.status["reason"]) == ("Failed", "InvalidSpec")
    assert [(e.type, e.reason) for e in out.events] == [("Warning", "Failed")]
    again = status.invalid_spec(generation=1, message="x", previous=out.status, now=NOW)
    assert again.events == ()


def test_diff_is_a_minimal_merge_patch() -> None:
    assert status.diff(desired={"a": 1, "b": [1]}, current={"a": 1, "b": [2], "c": 3}) == {"b": [1]}


def test_while_running_the_message_is_the_progress_hubs() -> None:
    first = derive(job(active=1), [pod()], previous={"phase": "Pending"})
    hub = {**first.status, "message": "phase 1/2, epoch 3/10"}
    later = derive(job(active=1), [pod()], previous=hub, counted=first.counted_pods)
    assert later.status["message"] == "phase 1/2, epoch 3/10"
    assert status.diff(desired=later.status, current=hub) == {}
