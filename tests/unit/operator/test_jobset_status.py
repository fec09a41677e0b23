"""Pure status derivation of a multi-worker FineTuneJob from its JobSet (as JobSet v0.10.1 writes
it), the JobSet's child Jobs and its worker pods: workers ready/total, one attempt per group start,
the failed worker's reason, Succeeded/Failed from the JobSet's conditions, suspend and Kueue."""

from __future__ import annotations

import datetime
import json
from typing import Any

from finetune_operator import status

NOW = datetime.datetime(2026, 12, 2, 5, 0, 0, tzinfo=datetime.UTC)
T0 = "2026-12-02T04:50:00Z"


def jobset(*, conditions: list[dict[str, Any]] | None = None, restarts: int = 0, suspend: bool = False,
           workers: int = 2, active: int = 1, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
        "metadata": {"name": "flowers", "namespace": "ml", "uid": "js-1", "creationTimestamp": T0,
                     "labels": labels or {}},
        "spec": {"suspend": suspend, "replicatedJobs": [
            {"name": "worker", "replicas": 1, "template": {"spec": {"parallelism": workers, "completions": workers}}}]},
        "status": {"restarts": restarts, "conditions": conditions or [],
                   "replicatedJobsStatus": [{"name": "worker", "active": active, "ready": 0, "succeeded": 0,
                                             "failed": 0, "suspended": 0}]},
    }  # fmt: skip


def cond(kind: str, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": "2026-12-02T04:59:00Z"}


def pod(index: int, *, uid: str | None = None, phase: str = "Running", ready: bool = True, exit_code: int | None = None,
        message: str = "", finished: str = "2026-12-02T04:58:00Z", attempt: int = 0) -> status.PodView:
    state: dict[str, Any] = {"running": {"startedAt": "2026-12-02T04:51:00Z"}}
    if exit_code is not None:
        state = {"terminated": {"exitCode": exit_code, "message": message, "startedAt": "2026-12-02T04:51:00Z",
                                "finishedAt": finished}}  # fmt: skip
    body = {
        "metadata": {"uid": uid or f"p{attempt}-{index}", "name": f"flowers-worker-0-{index}-x{attempt}",
                     "creationTimestamp": T0, "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
        "status": {"phase": phase, "startTime": T0, "containerStatuses": [{"name": "trainer", "state": state}],
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }  # fmt: skip
    return status.pod_view(body)


def child(reason: str) -> status.JobView:
    return status.job_view({"metadata": {"uid": "c"}, "spec": {}, "status": {
        "conditions": [{"type": "Failed", "status": "True", "reason": reason, "message": "m"}]}})  # fmt: skip


def derive(view: status.JobView | None, pods: list[status.PodView], *, previous: dict[str, Any] | None = None,
           counted: frozenset[str] | None = frozenset(), suspend: bool = False, children: tuple[status.JobView, ...] = (),
           workers: int = 2, **kw: Any) -> status.Outcome:
    return status.derive(
        generation=1, suspend=suspend, output_path="/models/flowers", previous=previous or {}, job=view, pods=pods,
        counted_pods=counted, now=NOW, pending_timeout_s=0, workers=workers, child_jobs=children, **kw,
    )  # fmt: skip


def summary(reason: str, message: str, code: int) -> str:
    return json.dumps({"reason": reason, "message": message, "exitCode": code})


def test_jobset_view_reads_the_groups_state() -> None:
    view = status.jobset_view(jobset(restarts=2, workers=3, labels={"kueue.x-k8s.io/queue-name": "q"},
                                     conditions=[cond("StartupPolicyCompleted", "InOrderStartupPolicyCompleted")]))  # fmt: skip
    assert (view.kind, view.is_jobset, view.workers, view.restarts, view.failed, view.active) == ("JobSet", True, 3, 2, 2, 1)
    assert view.conditions == {}  # startup-policy conditions say nothing about the pods
    assert view.queue_name == "q"
    done = status.jobset_view(jobset(conditions=[cond("Completed", "AllJobsCompleted")]))
    assert "Complete" in done.conditions and done.succeeded == 1 and done.completion_time == "2026-12-02T04:59:00Z"
    failed = status.jobset_view(jobset(restarts=1, conditions=[cond("Failed", "ReachedMaxRestarts")]))
    assert failed.failed == 2


def test_pod_view_reads_the_worker_index_and_readiness() -> None:
    p = pod(1, ready=False)
    assert (p.worker_index, p.ready) == (1, False)
    assert pod(0).ready is True


def test_running_workers_ready_and_one_attempt_for_the_group() -> None:
    view = status.jobset_view(jobset())
    out = derive(view, [pod(0), pod(1, ready=False)], previous={"phase": "Pending", "attempts": 0})
    assert out.status["phase"] == "Running" and out.status["reason"] == "Training"
    assert out.status["workers"] == {"ready": 1, "total": 2}
    assert out.status["attempts"] == 1  # two pods, one group start
    assert "1" in out.status["message"] and "2/2 workers running" in out.status["message"]
    assert out.status["startTime"] == "2026-12-02T04:51:00Z"
    assert [e.reason for e in out.events] == ["Started"]


def test_a_group_restart_is_the_second_attempt_and_a_retry() -> None:
    view = status.jobset_view(jobset(restarts=1))
    first = frozenset({"p0-0", "p0-1"})
    pods = [pod(0, attempt=1), pod(1, attempt=1)]
    out = derive(view, pods, previous={"phase": "Running", "attempts": 1, "reason": "Retrying"}, counted=first)
    assert out.status["attempts"] == 2
    assert out.retried == 1
    assert any(e.reason == "Retrying" for e in out.events)


def test_after_an_operator_restart_status_restarts_bounds_attempts() -> None:
    view = status.jobset_view(jobset(restarts=2))
    out = derive(view, [pod(0, attempt=2), pod(1, attempt=2)], previous={"phase": "Running", "attempts": 1}, counted=None)
    assert out.status["attempts"] == 3


def test_a_worker_that_is_not_the_chief_never_counts_an_attempt() -> None:
    view = status.jobset_view(jobset())
    # Worker 1 replaced within the same group (a disruption the child Job ignored): no new attempt.
    out = derive(view, [pod(0), pod(1, uid="replacement")], previous={"phase": "Running", "attempts": 1},
                 counted=frozenset({"p0-0", "p0-1"}))  # fmt: skip
    assert out.status["attempts"] == 1 and out.retried == 0


def test_succeeded_when_the_jobset_completed_with_the_chiefs_model_path() -> None:
    view = status.jobset_view(jobset(conditions=[cond("Completed", "AllJobsCompleted")]))
    chief = pod(0, phase="Succeeded", exit_code=0, message=json.dumps(
        {"reason": "Succeeded", "message": "ok", "exitCode": 0, "modelPath": "/models/flowers/model.keras"}))  # fmt: skip
    other = pod(1, phase="Succeeded", exit_code=0, finished="2026-12-02T04:58:30Z",
                message=json.dumps({"reason": "Succeeded", "message": "ok", "exitCode": 0, "modelPath": "/tmp/scratch/model.keras"}))  # fmt: skip
    out = derive(view, [chief, other], previous={"phase": "Running", "attempts": 1})
    assert out.status["phase"] == "Succeeded"
    assert out.status["modelPath"] == "/models/flowers/model.keras"  # the chief's, never a worker's scratch
    assert out.status["workers"] == {"ready": 0, "total": 2}
    assert out.status["completionTime"] == "2026-12-02T04:59:00Z"


def test_a_non_retryable_exit_of_one_worker_fails_the_group_with_its_reason() -> None:
    view = status.jobset_view(jobset(conditions=[cond(
        "Failed", "FailJobSetFailurePolicyAction", "applying FailJobSet failure policy action (first failed job: flowers-worker-0)")]))  # fmt: skip
    failed = pod(1, phase="Failed", exit_code=3, message=summary("DataError", "no images under /data/train", 3))
    killed = pod(0, phase="Failed", exit_code=143, finished="2026-12-02T04:58:30Z")
    out = derive(view, [killed, failed], previous={"phase": "Running", "attempts": 1}, children=(child("PodFailurePolicy"),))
    assert out.status["phase"] == "Failed"
    assert out.status["reason"] == "DataError"
    assert out.status["message"].startswith("worker 1 (pod flowers-worker-0-1-x0): no images under /data/train")
    assert [e.reason for e in out.events] == ["Failed"]


def test_the_failed_workers_message_is_untrusted() -> None:
    view = status.jobset_view(jobset(conditions=[cond("Failed", "FailJobSetFailurePolicyAction")]))
    nasty = summary("Not a reason!", "line1\n\x1b[31mred\x00" + "x" * 5000, 2)
    out = derive(view, [pod(0, phase="Failed", exit_code=2, message=nasty)], previous={"phase": "Running"})
    assert out.status["reason"] == "InvalidSpec"  # the summary's reason is refused: the exit code's
    text = out.status["message"]
    assert "\x1b" not in text and "\x00" not in text and "\n" not in text and len(text) <= status.MAX_MESSAGE_LENGTH


def test_a_deadline_fails_the_group_as_deadline_exceeded() -> None:
    view = status.jobset_view(jobset(conditions=[cond("Failed", "FailJobSetFailurePolicyAction")]))
    out = derive(view, [pod(0, phase="Failed", exit_code=143), pod(1, phase="Failed", exit_code=143)],
                 previous={"phase": "Running"}, children=(child("DeadlineExceeded"),))  # fmt: skip
    assert (out.status["reason"], out.status["phase"]) == ("DeadlineExceeded", "Failed")


def test_max_restarts_is_backoff_limit_exceeded_naming_the_last_failed_worker() -> None:
    view = status.jobset_view(jobset(restarts=2, conditions=[cond("Failed", "ReachedMaxRestarts")]))
    pods = [pod(0, attempt=2, phase="Failed", exit_code=143, finished="2026-12-02T04:58:40Z"),
            pod(1, attempt=2, phase="Failed", exit_code=1, message="Traceback: boom")]  # fmt: skip
    out = derive(view, pods, previous={"phase": "Running", "attempts": 3})
    assert out.status["reason"] == "BackoffLimitExceeded"
    message = out.status["message"]
    assert message.startswith("3 attempts of the worker group failed (2 restarts), backoff limit reached")
    assert "worker 1" in message and "exit code 1" in message and "Traceback: boom" in message


def test_suspended_by_spec_and_queued_by_kueue_as_for_a_job() -> None:
    view = status.jobset_view(jobset(suspend=True, active=0))
    out = derive(view, [], previous={"phase": "Running"}, suspend=True)
    assert (out.status["phase"], out.status["reason"]) == ("Suspended", "Suspended")
    assert out.status["workers"] == {"ready": 0, "total": 2}
    queued = status.jobset_view(jobset(suspend=True, active=0, labels={"kueue.x-k8s.io/queue-name": "q"}))
    wl = status.WorkloadView(uid="w", name="jobset-flowers-abc", conditions={
        "QuotaReserved": ("False", "Pending", "couldn't assign flavors to pod set worker: insufficient quota")})  # fmt: skip
    out = derive(queued, [], previous={}, workload=wl)
    assert (out.status["phase"], out.status["reason"]) == ("Pending", "Queued")
    assert "insufficient quota" in out.status["message"]
    plain = derive(status.jobset_view(jobset(suspend=True, active=0)), [], previous={})
    assert plain.status["message"] == "the JobSet is suspended (e.g. waiting for admission by Kueue)"


def test_before_the_jobset_exists_workers_total_comes_from_the_spec() -> None:
    out = derive(None, [], previous={}, workers=4)
    assert out.status["phase"] == "Pending"
    assert out.status["workers"] == {"ready": 0, "total": 4}


def test_one_worker_jobs_have_no_workers_field() -> None:
    view = status.job_view({"metadata": {"uid": "j"}, "spec": {}, "status": {"active": 1}})
    out = status.derive(generation=1, suspend=False, output_path="/m", previous={}, job=view, pods=[pod(0)],
                        counted_pods=frozenset(), now=NOW, pending_timeout_s=0)  # fmt: skip
    assert "workers" not in out.status
