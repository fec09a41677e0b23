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
    ("no-job-yet", None, [], None, False, "Pending", "Waiting", "waiting for the trainer pod"),
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
    # A suspended job carries no Ready (kstatus would read Ready=False as InProgress): see _conditions.
    every = ["Ready", "Running", "Complete", "Failed", "Suspended", "Reconciling", "Stalled"]
    assert list(conds) == (every[1:] if phase == "Suspended" else every)
    assert all(c["observedGeneration"] == 2 for c in conds.values())
    if phase != "Suspended":
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


# ----- lifecycle: replacing, eta, reasons of operator-made failures -----


def test_a_job_waiting_for_an_earlier_ones_objects_is_pending_replacing_and_reconciling() -> None:
    why = "waiting for batch Job x (uid old) of an earlier FineTuneJob of this name to be deleted"
    out = status.derive(
        generation=1, suspend=False, output_path="/m", previous={}, job=None, pods=[], counted_pods=None,
        now=NOW, pending_timeout_s=60, blocked=why,
    )  # fmt: skip
    s = out.status
    assert (s["observedGeneration"], s["phase"], s["reason"], s["message"]) == (1, "Pending", "Replacing", why)
    conds = {c["type"]: c for c in s["conditions"]}
    assert conds["Reconciling"]["status"] == "True" and conds["Ready"]["status"] == "False"
    assert out.events == () and not out.stop_job
    # Once the Job is there, `blocked` no longer matters.
    made = status.derive(
        generation=1, suspend=False, output_path="/m", previous=s, job=status.job_view(job()), pods=[],
        counted_pods=frozenset(), now=NOW, pending_timeout_s=0, blocked=why,
    )  # fmt: skip
    assert (made.status["phase"], made.status["reason"]) == ("Pending", "Waiting")


@pytest.mark.parametrize(
    ("job_body", "suspend", "phase"),
    [
        (job(failed=1, conditions=[("Failed", "BackoffLimitExceeded", "")]), False, "Failed"),
        (job(suspend=True, conditions=[("Suspended", "JobSuspended", "")]), True, "Suspended"),
    ],
    ids=["failed", "suspended"],
)
def test_eta_is_cleared_when_the_job_stops_training(job_body: dict[str, Any], suspend: bool, phase: str) -> None:
    running = {"phase": "Running", "attempts": 1, "etaSeconds": 95, "progress": 40}
    out = derive(job_body, [pod(phase="Failed", exit_code=1)], previous=running, suspend=suspend,
                 counted=frozenset({"uid-p1"}))  # fmt: skip
    assert out.status["phase"] == phase
    patch = status.diff(desired=out.status, current=running)
    assert "etaSeconds" in patch and patch["etaSeconds"] is None  # a merge patch null removes it
    assert "etaSeconds" not in status.diff(desired=out.status, current={**running, **patch, "etaSeconds": None})
    # Running keeps the hub's estimate; Succeeded sets 0.
    still = derive(job(active=1), [pod()], previous=running, counted=frozenset({"uid-p1"}))
    assert "etaSeconds" not in status.diff(desired=still.status, current=running)


def test_operator_made_failures_carry_their_reason_and_clear_the_eta() -> None:
    out = status.invalid_spec(
        generation=3, message="a batch Job named x already exists", previous={"etaSeconds": 5}, now=NOW,
        reason="JobNameConflict",
    )  # fmt: skip
    s = out.status
    assert (s["phase"], s["reason"], s["observedGeneration"], s["etaSeconds"]) == ("Failed", "JobNameConflict", 3, None)
    conds = {c["type"]: c for c in s["conditions"]}
    assert conds["Failed"]["reason"] == "JobNameConflict" and conds["Stalled"]["status"] == "True"
    assert [e.message for e in out.events] == ["JobNameConflict: a batch Job named x already exists"]


# ----- untrusted termination messages, pods that can never start, wording -----

HOSTILE_REASONS = ["Not A Valid Reason!! ", "R" * 2000, "Bad\nReason", "", "9Lives", "Trailing_,", "Dätä", "Ok:"]
HOSTILE_MESSAGES = [
    "m" * 10_000,
    "bell\x07 nul\x00 esc\x1b[31m red \x7f del \x9b csi \udcff lone surrogate \ue000 private \u0378 unassigned",
    "line one\nline two\r\n\ttabbed",
    "",
]
HOSTILE_RAW = [
    "not json at all {",
    "{not json",
    "[1, 2, 3]",
    '"just a string"',
    "{" + '"a":{' * 5000 + "}" * 5001,  # deeper than the JSON decoder's recursion limit
    '{"exitCode": "three", "reason": "DataError", "message": "m"}',
    '{"exitCode": 3, "reason": ["DataError"], "message": {"x": 1}}',
    '{"exitCode": 3, "reason": "DataError", "message": "m", "metrics": {"loss": "NaN-ish"}}',
    "{" + " " * 20_000 + "}",
    "\udcff\x00{",
    "x" * 100_000,
]
REASON_RE = status.REASON_PATTERN


def _failed_pod(code: int, message: str) -> dict[str, Any]:
    return pod(phase="Failed", exit_code=code, message=message)


def _assert_valid(out: status.Outcome) -> None:
    """What the API server would take: the CRD's status model, reasons, bounded UTF-8 messages."""
    from finetune_operator import api

    api.FineTuneJobStatus.model_validate(out.status)
    assert REASON_RE.match(out.status["reason"]) and len(out.status["reason"]) <= status.MAX_REASON_LENGTH
    json.dumps(out.status, ensure_ascii=False).encode("utf-8")  # no lone surrogates
    for text in [out.status["message"], *(c["message"] for c in out.status["conditions"]), *(e.message for e in out.events)]:
        assert len(text) <= 2 * status.MAX_MESSAGE_LENGTH
        assert not any(ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0 for ch in text), repr(text[:80])


@pytest.mark.parametrize("reason", HOSTILE_REASONS)
@pytest.mark.parametrize("condition", ["PodFailurePolicy", "BackoffLimitExceeded"])
def test_a_hostile_summary_reason_falls_back_to_the_exit_codes(reason: str, condition: str) -> None:
    body = job(failed=1, conditions=[("Failed", condition, "")])
    out = derive(body, [_failed_pod(3, summary(3, reason, "no images in /data/train"))], previous={"phase": "Running"})
    _assert_valid(out)
    assert out.status["phase"] == "Failed"
    assert out.status["reason"] == ("DataError" if condition == "PodFailurePolicy" else "BackoffLimitExceeded")
    assert "no images in /data/train" in out.status["message"]


def test_a_valid_summary_reason_is_kept() -> None:
    body = job(failed=1, conditions=[("Failed", "PodFailurePolicy", "")])
    out = derive(body, [_failed_pod(3, summary(3, "ClassMismatch", "val lacks stripes"))], previous={"phase": "Running"})
    assert (out.status["reason"], out.status["message"]) == ("ClassMismatch", "val lacks stripes")


@pytest.mark.parametrize("message", HOSTILE_MESSAGES, ids=["10k", "controls", "newlines", "empty"])
@pytest.mark.parametrize("condition", ["PodFailurePolicy", "BackoffLimitExceeded"])
def test_a_hostile_summary_message_is_cleaned_and_bounded(message: str, condition: str) -> None:
    body = job(failed=1, conditions=[("Failed", condition, "")])
    out = derive(body, [_failed_pod(4, summary(4, "Diverged", message))], previous={"phase": "Running"})
    _assert_valid(out)
    assert out.status["phase"] == "Failed" and out.status["message"]
    if message.startswith("bell"):
        assert "bell nul esc[31m red del csi lone surrogate private unassigned" in out.status["message"]
    if message.startswith("line"):
        assert "line one line two tabbed" in out.status["message"]


@pytest.mark.parametrize("raw", HOSTILE_RAW, ids=range(len(HOSTILE_RAW)))
@pytest.mark.parametrize("condition", ["PodFailurePolicy", "BackoffLimitExceeded", "Complete"])
def test_a_termination_message_that_is_no_summary_still_gives_a_valid_status(raw: str, condition: str) -> None:
    if condition == "Complete":
        body, pods = job(succeeded=1, conditions=[("Complete", "", "")]), [pod(phase="Succeeded", exit_code=0, message=raw)]
    else:
        body, pods = job(failed=1, conditions=[("Failed", condition, "")]), [_failed_pod(3, raw)]
    out = derive(body, pods, previous={"phase": "Running"})
    _assert_valid(out)
    assert out.status["phase"] == ("Succeeded" if condition == "Complete" else "Failed")
    if condition == "PodFailurePolicy":
        assert out.status["reason"] == "DataError"


@pytest.mark.parametrize("code", range(256))
def test_every_exit_code_gives_a_valid_final_status(code: int) -> None:
    hostile = summary(code, HOSTILE_REASONS[code % len(HOSTILE_REASONS)], HOSTILE_MESSAGES[code % len(HOSTILE_MESSAGES)])
    for condition in ("PodFailurePolicy", "BackoffLimitExceeded"):
        out = derive(job(failed=1, conditions=[("Failed", condition, "")]), [_failed_pod(code, hostile)],
                     previous={"phase": "Running"})  # fmt: skip
        _assert_valid(out)
        assert out.status["phase"] == "Failed"
        if condition == "PodFailurePolicy":
            assert out.status["reason"] == status.EXIT_REASONS.get(code, "Failed")


def test_a_hostile_model_path_is_cleaned() -> None:
    body = job(succeeded=1, conditions=[("Complete", "", "")])
    raw = summary(0, "Succeeded", "ok", "/models/x/\x00model\n.keras" + "k" * 5000)
    out = derive(body, [pod(phase="Succeeded", exit_code=0, message=raw)], previous={"phase": "Running"})
    _assert_valid(out)
    assert out.status["modelPath"].startswith("/models/x/model .keras") and len(out.status["modelPath"]) <= 1024


@pytest.mark.parametrize(
    ("failed", "words"),
    [(1, "1 attempt failed (no retries)"), (2, "2 attempts failed (1 retry)"), (4, "4 attempts failed (3 retries)")],
)
def test_backoff_limit_message_counts_attempts_and_retries(failed: int, words: str) -> None:
    body = job(failed=failed, conditions=[("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")])
    out = derive(body, [_failed_pod(1, summary(1, "Error", "boom"))], previous={"phase": "Running"})
    assert out.status["message"] == f"{words}, backoff limit reached (exit code 1); last attempt: boom"
    assert "retried" not in out.status["message"]


def _waiting_pod(reason: str, message: str) -> dict[str, Any]:
    body = pod(phase="Pending")
    body["status"]["containerStatuses"] = [{"name": "trainer", "state": {"waiting": {"reason": reason, "message": message}}}]
    return body


def _unschedulable_pod(message: str) -> dict[str, Any]:
    body = pod(phase="Pending")
    body["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}]
    return body


@pytest.mark.parametrize(
    ("pod_body", "reason", "quoted"),
    [
        (_waiting_pod("CreateContainerConfigError", 'configmap "settings" not found'), "ContainerConfigError",
         'CreateContainerConfigError: configmap "settings" not found'),
        (_waiting_pod("CreateContainerConfigError", "couldn't find key token in Secret ns/creds"), "ContainerConfigError",
         "couldn't find key token in Secret ns/creds"),
        (_waiting_pod("CreateContainerError", "no command specified"), "PodStartError",
         "CreateContainerError: no command specified"),
        (_waiting_pod("RunContainerError", ""), "PodStartError", "RunContainerError: the container could not be created"),
        (_waiting_pod("InvalidImageName", 'couldn\'t parse image name "Bad Image": invalid reference format'),
         "ImagePullError", "invalid reference format"),
        (_unschedulable_pod('0/1 nodes are available: persistentvolumeclaim "data" not found. preemption: 0/1 nodes '
                            "are available: 1 Preemption is not helpful for scheduling."),
         "VolumeError", 'persistentvolumeclaim "data" not found'),
        (_unschedulable_pod("0/1 nodes are available: pod has unbound immediate PersistentVolumeClaims."),
         "VolumeError", "unbound immediate PersistentVolumeClaims"),
    ],
    ids=["configmap", "secret-key", "create", "run", "image-name", "pvc-missing", "pvc-unbound"],
)
def test_a_pod_that_can_never_start_fails_after_the_timeout_with_the_kubelets_words(
    pod_body: dict[str, Any], reason: str, quoted: str
) -> None:
    before = derive(job(active=1), [pod_body], previous={"phase": "Pending"}, pending_timeout_s=7200)
    assert (before.status["phase"], before.status["reason"]) == ("Pending", "Waiting")  # not before the timeout
    out = derive(job(active=1), [pod_body], previous={"phase": "Pending"}, pending_timeout_s=60)
    _assert_valid(out)
    assert (out.status["phase"], out.status["reason"]) == ("Failed", reason)
    assert quoted in out.status["message"] and out.stop_job
    assert out.events == (status.Event("Warning", "Failed", f"{reason}: {out.status['message']}"),)
