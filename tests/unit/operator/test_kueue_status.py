"""Kueue, the pure parts: the Job a queue label makes, and what the status says of each Workload state.

The Workload bodies are shaped as Kueue v0.14's controllers write them (reasons and message
formats from apis/kueue/v1beta1/workload_types.go, pkg/scheduler and pkg/controller/core):
QuotaReserved=False with the scheduler's or the workload controller's message while waiting,
Evicted/Preempted=True after a preemption (reset to False with "Previously: ..." on a new
quota reservation), Evicted reason Deactivated for spec.active false, DeactivatedDueTo<Cause>
when Kueue deactivates a Workload itself.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from finetune_operator import api, builders, handlers, status

NOW = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
EARLY = "2026-01-01T11:00:00Z"
QUEUE = "team-a"
INSUFFICIENT = (
    "couldn't assign flavors to pod set main: insufficient unused quota for cpu in flavor default-flavor, "
    "1 more needed"
)
PREEMPTED_BY = "Preempted to accommodate a workload (UID: 1f2e, JobUID: 9a8b) due to prioritization in the ClusterQueue"


def cond(kind: str, state: str, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": kind, "status": state, "reason": reason, "message": message, "lastTransitionTime": EARLY}


def workload(*conditions: dict[str, Any], active: bool | None = True, name: str = "job-flowers-3c1a2") -> dict[str, Any]:
    spec: dict[str, Any] = {"queueName": QUEUE}
    if active is not None:
        spec["active"] = active
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta1",
        "kind": "Workload",
        "metadata": {
            "name": name,
            "namespace": "ml",
            "uid": "wl-uid",
            "labels": {"kueue.x-k8s.io/job-uid": "job-uid"},
            "ownerReferences": [
                {"apiVersion": "batch/v1", "kind": "Job", "name": "flowers", "uid": "job-uid", "controller": True}
            ],
        },
        "spec": spec,
        "status": {"conditions": list(conditions)},
    }


def kueue_job(*, suspend: bool = True, active: int = 0, queue: str | None = QUEUE) -> dict[str, Any]:
    labels = {builders.KUEUE_QUEUE_LABEL: queue} if queue is not None else {}
    return {
        "metadata": {"uid": "job-uid", "labels": labels, "creationTimestamp": EARLY},
        "spec": {"suspend": suspend},
        "status": {"active": active, "startTime": None if suspend else EARLY},
    }


def running_pod(name: str = "p1") -> dict[str, Any]:
    return {
        "metadata": {"uid": f"uid-{name}", "name": name, "creationTimestamp": EARLY},
        "status": {"phase": "Running", "startTime": EARLY,
                   "containerStatuses": [{"name": "trainer", "state": {"running": {"startedAt": EARLY}}}]},
    }  # fmt: skip


def preempted_pod(name: str = "p1") -> dict[str, Any]:
    term = {"exitCode": 143, "message": "", "startedAt": EARLY, "finishedAt": "2026-01-01T11:10:00Z"}
    return {
        "metadata": {"uid": f"uid-{name}", "name": name, "creationTimestamp": EARLY},
        "status": {"phase": "Failed", "startTime": EARLY,
                   "containerStatuses": [{"name": "trainer", "state": {"terminated": term}}]},
    }  # fmt: skip


def derive(job_body: dict[str, Any], wl: dict[str, Any] | None, *, pods: list[dict[str, Any]] = (),  # type: ignore[assignment]
           previous: dict[str, Any] | None = None, suspend: bool = False, installed: bool = True,
           counted: frozenset[str] | None = frozenset()) -> status.Outcome:  # fmt: skip
    return status.derive(
        generation=1,
        suspend=suspend,
        output_path="/models/x",
        previous=previous or {},
        job=status.job_view(job_body),
        pods=[status.pod_view(p) for p in pods],
        counted_pods=counted,
        now=NOW,
        pending_timeout_s=300.0,
        workload=status.workload_view(wl) if wl is not None else None,
        kueue_installed=installed,
    )


# ----- the Job -----


def job_for(labels: dict[str, str], *, suspend: bool = False) -> dict[str, Any]:
    owner = builders.Owner(namespace="ml", name="flowers", uid="uid-1", labels=labels)
    spec = api.FineTuneJobSpec.model_validate(
        {"data": {"train": "/data/train", "validationSplit": 0.2}, "output": {"path": "/models/flowers"}, "suspend": suspend}
    )
    return builders.build_job(pod=builders.TrainerPod(owner=owner, spec=spec, default_image="img", progress_url=None))


def test_a_queue_label_creates_the_job_suspended_with_every_kueue_label() -> None:
    labels = {
        "kueue.x-k8s.io/queue-name": "team-a",
        "kueue.x-k8s.io/priority-class": "high",
        "kueue.x-k8s.io/max-exec-time-seconds": "3600",
        "kueue.x-k8s.io/prebuilt-workload-name": "wl",
        "kueue.x-k8s.io/job-uid": "not-a-job-label",  # a Workload's label, never copied
        "team": "a",
    }
    job = job_for(labels)
    assert job["spec"]["suspend"] is True
    job_labels = job["metadata"]["labels"]
    assert {k: v for k, v in job_labels.items() if k.startswith("kueue.x-k8s.io/")} == {
        k: labels[k] for k in builders.KUEUE_LABELS
    }
    assert "team" not in job_labels
    # The pod template carries no Kueue label: Kueue merges its ResourceFlavor's into it itself.
    assert not any(k.startswith("kueue.x-k8s.io/") for k in job["spec"]["template"]["metadata"]["labels"])


def test_without_a_queue_label_suspend_follows_the_spec() -> None:
    assert job_for({"kueue.x-k8s.io/priority-class": "high"})["spec"]["suspend"] is False
    assert job_for({}, suspend=True)["spec"]["suspend"] is True


def test_sigterm_exit_is_ignored_by_the_pod_failure_policy() -> None:
    rules = job_for({"kueue.x-k8s.io/queue-name": "q"})["spec"]["podFailurePolicy"]["rules"]
    ignored = [r["onExitCodes"]["values"] for r in rules if r["action"] == "Ignore" and "onExitCodes" in r]
    assert ignored == [[143]]
    # FailJob for the trainer's own verdicts comes first: rules are matched in order.
    assert rules[0]["action"] == "FailJob" and 143 not in rules[0]["onExitCodes"]["values"]


def test_sigterm_exit_counts_toward_backoff_without_kueue() -> None:
    # Without a queue there is no preemption: a trainer exiting 143 by itself must not be retried forever.
    rules = job_for({})["spec"]["podFailurePolicy"]["rules"]
    assert not [r for r in rules if r["action"] == "Ignore" and "onExitCodes" in r]


def test_ftj_view_keeps_only_kueue_labels() -> None:
    body = {"metadata": {"uid": "u", "labels": {"kueue.x-k8s.io/priority-class": "low", "app": "x"}}, "spec": {}}
    assert dict(handlers.ftj_view(body).labels) == {"kueue.x-k8s.io/priority-class": "low"}


def test_the_workload_index_keys_by_the_owning_job() -> None:
    assert handlers._workload_job(workload()) == ("flowers", "job-uid")
    foreign = workload()
    foreign["metadata"]["ownerReferences"][0]["kind"] = "JobSet"
    assert handlers._workload_job(foreign) is None


# ----- what Kueue decided -> status -----


def test_waiting_for_quota_is_queued_with_kueues_message() -> None:
    wl = workload(cond("QuotaReserved", "False", "Pending", INSUFFICIENT))
    out = derive(kueue_job(), wl)
    assert (out.status["phase"], out.status["reason"], out.status["message"]) == ("Pending", "Queued", INSUFFICIENT)
    reconciling = next(c for c in out.status["conditions"] if c["type"] == "Reconciling")
    assert (reconciling["status"], reconciling["reason"]) == ("True", "Queued")
    assert out.events == ()  # waiting in a queue is no news


def test_a_missing_local_queue_is_queued_with_kueues_message() -> None:
    wl = workload(cond("QuotaReserved", "False", "Inadmissible", "LocalQueue nope doesn't exist"))
    out = derive(kueue_job(queue="nope"), wl)
    assert (out.status["reason"], out.status["message"]) == ("Queued", "LocalQueue nope doesn't exist")


@pytest.mark.parametrize(
    ("wl", "installed", "reason", "words"),
    [
        (None, True, "Queued", "waiting for Kueue to create the Workload"),
        (None, False, "Queued", "is not served by this cluster"),
        (workload(), True, "Queued", "waiting for Kueue to admit Workload job-flowers-3c1a2"),
        (workload(cond("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue cq"),
                  cond("Admitted", "False", "NoChecks", "The workload has not all checks ready")),
         True, "Queued", "The workload has not all checks ready"),
        (workload(cond("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue cq"),
                  cond("Admitted", "True", "Admitted", "The workload is admitted")),
         True, "Admitted", "admitted by Kueue"),
    ],
)  # fmt: skip
def test_every_wait_names_what_it_waits_for(
    wl: dict[str, Any] | None, installed: bool, reason: str, words: str
) -> None:
    out = derive(kueue_job(), wl, installed=installed)
    assert out.status["phase"] == "Pending" and out.status["reason"] == reason
    assert words in out.status["message"]


def test_preemption_is_pending_preempted_with_an_event_then_running_again_with_resumed() -> None:
    running = {"phase": "Running", "reason": "Training", "attempts": 1, "message": "phase 1/2, epoch 2/3"}
    evicted = workload(
        cond("QuotaReserved", "False", "Pending", INSUFFICIENT),
        cond("Evicted", "True", "Preempted", "Preempted to accommodate a higher priority Workload"),
        cond("Preempted", "True", "InClusterQueue", PREEMPTED_BY),
        cond("Requeued", "True", "Preempted", "Preempted to accommodate a higher priority Workload"),
    )
    out = derive(kueue_job(suspend=True), evicted, pods=[preempted_pod()], previous=running,
                 counted=frozenset({"uid-p1"}))  # fmt: skip
    assert (out.status["phase"], out.status["reason"]) == ("Pending", "Preempted")
    assert PREEMPTED_BY in out.status["message"] and INSUFFICIENT in out.status["message"]
    assert [(e.type, e.reason) for e in out.events] == [("Warning", "Preempted")]
    assert out.status["attempts"] == 1 and out.retried == 0 and not out.stop_job
    # Still waiting: the same status, no second event.
    again = derive(kueue_job(suspend=True), evicted, pods=[preempted_pod()], previous=out.status,
                   counted=frozenset({"uid-p1"}))  # fmt: skip
    assert again.status["reason"] == "Preempted" and again.events == ()

    # Re-admitted: Kueue resets Evicted and Preempted to False, unsuspends the Job, a new pod runs.
    admitted = workload(
        cond("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue cq"),
        cond("Admitted", "True", "Admitted", "The workload is admitted"),
        cond("Evicted", "False", "QuotaReserved", "Previously: Preempted to accommodate a higher priority Workload"),
        cond("Preempted", "False", "QuotaReserved", f"Previously: {PREEMPTED_BY}"),
    )
    # Kueue reserves quota and admits before it unsuspends the Job: still Preempted until a pod runs.
    readmitted = derive(kueue_job(suspend=True), admitted, pods=[preempted_pod()], previous=again.status,
                        counted=frozenset({"uid-p1"}))  # fmt: skip
    assert (readmitted.status["phase"], readmitted.status["reason"]) == ("Pending", "Preempted")
    assert "admitted by Kueue" in readmitted.status["message"] and readmitted.events == ()
    back = derive(kueue_job(suspend=False, active=1), admitted, pods=[preempted_pod(), running_pod("p2")],
                  previous=readmitted.status, counted=frozenset({"uid-p1"}))  # fmt: skip
    assert (back.status["phase"], back.status["reason"], back.status["attempts"]) == ("Running", "Training", 2)
    assert [e.reason for e in back.events] == ["Resumed"]
    assert "after Preempted" in back.events[0].message


def test_other_evictions_show_kueues_reason_and_warn() -> None:
    wl = workload(
        cond("QuotaReserved", "False", "Pending", "ClusterQueue cq is inactive"),
        cond("Evicted", "True", "PodsReadyTimeout", "Exceeded the PodsReady timeout ml/job-flowers-3c1a2"),
    )
    out = derive(kueue_job(), wl, previous={"phase": "Running", "reason": "Training", "attempts": 1})
    assert (out.status["phase"], out.status["reason"]) == ("Pending", "PodsReadyTimeout")
    assert "Exceeded the PodsReady timeout" in out.status["message"]
    assert [(e.type, e.reason) for e in out.events] == [("Warning", "Evicted")]


def test_a_malformed_eviction_reason_never_reaches_status() -> None:
    wl = workload(cond("Evicted", "True", "not a reason!", "x\x00y"))
    out = derive(kueue_job(), wl)
    assert out.status["reason"] == "Evicted" and "\x00" not in out.status["message"]


def test_spec_suspend_shows_suspended_and_after_resume_the_deactivation_is_no_eviction() -> None:
    deactivated = workload(
        cond("QuotaReserved", "False", "Pending", "The workload is deactivated"),
        cond("Evicted", "True", "Deactivated", "The workload is deactivated"),
        active=False,
    )
    out = derive(kueue_job(), deactivated, suspend=True, previous={"phase": "Running", "reason": "Training"})
    assert (out.status["phase"], out.status["reason"]) == ("Suspended", "Suspended")
    assert "Workload job-flowers-3c1a2 deactivated" in out.status["message"]
    assert [e.reason for e in out.events] == ["Suspended"]
    # spec.suspend false: the operator set spec.active true again; Kueue keeps Evicted=True
    # (Deactivated) until quota is reserved again. That is waiting, not an eviction.
    reactivated = workload(
        cond("QuotaReserved", "False", "Pending", INSUFFICIENT),
        cond("Evicted", "True", "Deactivated", "The workload is deactivated"),
        cond("Requeued", "True", "Reactivated", "The workload was reactivated"),
    )
    back = derive(kueue_job(), reactivated, previous=out.status)
    assert (back.status["phase"], back.status["reason"], back.status["message"]) == ("Pending", "Queued", INSUFFICIENT)
    assert [e.reason for e in back.events] == ["Resumed"]


def test_kueues_own_deactivation_is_never_undone() -> None:
    by_kueue = workload(
        cond("Evicted", "True", "DeactivatedDueToMaximumExecutionTimeExceeded",
             "The workload is deactivated due to exceeding the maximum execution time"),
        active=False,
    )  # fmt: skip
    assert not status.workload_reactivatable(status.workload_view(by_kueue))
    target = workload(cond("DeactivationTarget", "True", "RequeuingLimitExceeded", "exceeding the maximum"))
    assert not status.workload_reactivatable(status.workload_view(target))
    by_user = workload(cond("Evicted", "True", "Deactivated", "The workload is deactivated"), active=False)
    assert status.workload_reactivatable(status.workload_view(by_user))
    out = derive(kueue_job(), by_kueue)
    assert out.status["reason"] == "DeactivatedDueToMaximumExecutionTimeExceeded"
    assert "maximum execution time" in out.status["message"]


def test_a_stuck_kueue_job_is_stopped_by_its_workload_not_its_job() -> None:
    # The pod of an admitted Job cannot pull its image: Failed, and the job must be stopped; the
    # handler deactivates the Workload for a Job with a queue label (here: the flag it acts on).
    stuck = running_pod()
    stuck["status"] = {"phase": "Pending", "containerStatuses": [
        {"name": "trainer", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "no"}}}]}  # fmt: skip
    out = derive(kueue_job(suspend=False, active=1), workload(cond("Admitted", "True", "Admitted")), pods=[stuck])
    assert (out.status["phase"], out.status["reason"], out.stop_job) == ("Failed", "ImagePullError", True)


def test_a_job_without_queue_label_keeps_the_old_wording() -> None:
    out = derive(kueue_job(queue=None), None)
    assert (out.status["reason"], out.status["message"]) == (
        "Queued",
        "the batch Job is suspended (e.g. waiting for admission by Kueue)",
    )
    assert status.job_view(kueue_job()).queue_name == QUEUE
