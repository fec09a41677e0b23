"""Pure status logic: the state of a FineTuneJob's batch Job and pods -> its status and events.

`job_view`, `pod_view` and `workload_view` (Kueue's Workload of a Job) shrink Kubernetes
bodies to the few fields the logic reads (the operator keeps only these in memory);
`kueue_wait` says what Kueue decided about a Job it holds; `derive` computes the operator-owned status fields
(phase, reason, conditions, attempts, times, model path, message) and the events a
transition deserves. The progress fields (stage, epoch, ...) belong to the progress hub.
Every status it writes is an `api.FineTuneJobStatus` (typed: an unknown field is an error,
not a key the API server prunes) dumped as a merge patch by `api.status_patch`.
No I/O, no clock: `now` is passed in.
"""

from __future__ import annotations

import datetime
import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune_contract import protocol
from finetune_contract.exits import EXIT_REASONS, EXIT_TERMINATED
from pydantic import ValidationError

from finetune_operator import api

__all__ = [
    "Event",
    "JobView",
    "Outcome",
    "PodView",
    "WorkloadView",
    "creation_stalled",
    "derive",
    "diff",
    "invalid_spec",
    "job_view",
    "jobset_view",
    "parse_time",
    "pod_view",
    "rfc3339",
    "workload_reactivatable",
    "workload_view",
]

IMAGE_PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
# Container waiting reasons of a pod that can never start -> the FineTuneJob's reason.
START_FAILURE_REASONS = {
    "CreateContainerConfigError": "ContainerConfigError",  # a missing ConfigMap/Secret (env, volume)
    "CreateContainerError": "PodStartError",
    "RunContainerError": "PodStartError",
    "PreCreateHookError": "PodStartError",
    "PreStartHookError": "PodStartError",
}
# The scheduler's words for a pod whose PersistentVolumeClaim is missing, going or unbound.
_VOLUME_UNSCHEDULABLE = re.compile(r"persistentvolumeclaim|unbound immediate|volume node affinity", re.IGNORECASE)
# What the trainer's termination message may put into status (it is untrusted pod output):
# a reason as the CRD's Condition.reason admits (api.Condition), short, else the exit code's.
REASON_PATTERN = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
MAX_REASON_LENGTH = 64
MAX_MESSAGE_LENGTH = 1024
MAX_SUMMARY_CHARS = 16 * 1024  # the kubelet keeps 4 KiB of a termination message; more is not a summary
TERMINAL = frozenset({"Succeeded", "Failed"})
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
KILLED_EXIT_CODES = frozenset({137, EXIT_TERMINATED})  # SIGKILL, SIGTERM: a worker stopped with its group, not the one that failed
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Kueue's Evicted reasons (apis/kueue/v1beta1 workload_types.go): "Deactivated" when someone set
# spec.active to false (the operator, for spec.suspend); "DeactivatedDueTo<Cause>" when Kueue did
# itself (maximum execution time, requeuing limit, rejected admission check).
EVICTED_BY_DEACTIVATION = "Deactivated"
KUEUE_DEACTIVATION_PREFIX = "DeactivatedDueTo"
# Pending reasons of a job that has not been stopped: any other Pending reason of a Kueue-managed
# job is an eviction (Preempted, PodsReadyTimeout, ClusterQueueStopped, ...).
WAITING_REASONS = frozenset({"Waiting", "Queued", "Admitted", "Replacing", "WaitingForVolume"})
# The status fields `derive` writes (progress and etaSeconds only once the job has finished,
# message the hub's while it trains): from the model's WrittenBy, not a list of our own.
OWNED_FIELDS = api.status_fields(writer="operator")


def rfc3339(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclass(frozen=True)
class JobView:
    """What the status logic needs of a batch/v1 Job."""

    uid: str
    suspend: bool
    active: int = 0
    ready: int = 0
    failed: int = 0
    succeeded: int = 0
    start_time: str | None = None
    completion_time: str | None = None
    created: str | None = None  # metadata.creationTimestamp
    # condition type -> (reason, message, lastTransitionTime), only for conditions with status True
    conditions: Mapping[str, tuple[str, str, str]] = field(default_factory=dict)
    queue_name: str | None = None  # its kueue.x-k8s.io/queue-name label: Kueue manages it
    kind: str = "Job"  # or "JobSet" (runtime.workers > 1, `jobset_view`)
    workers: int = 1  # pods it runs at once (a JobSet: all its workers)
    restarts: int = 0  # a JobSet's status.restarts: group restarts after a failure

    @property
    def is_jobset(self) -> bool:
        return self.kind == "JobSet"


@dataclass(frozen=True)
class PodView:
    """What the status logic needs of a trainer pod."""

    uid: str
    name: str
    phase: str
    created: str | None = None
    start_time: str | None = None  # set once the kubelet (pod runner) has accepted the pod
    running_since: str | None = None  # the trainer container's state.running.startedAt
    finished_at: str | None = None
    exit_code: int | None = None
    termination_message: str = ""
    waiting_reason: str | None = None
    waiting_message: str = ""
    unschedulable_message: str | None = None
    deleted: bool = False
    worker_index: int | None = None  # its completion index (an Indexed Job's pod: a JobSet's worker)
    ready: bool = False  # its Ready condition is True

    @property
    def started(self) -> bool:
        """Whether the trainer ever ran in this pod (it counts as an attempt)."""
        return self.running_since is not None or self.exit_code is not None


def job_view(body: Mapping[str, Any]) -> JobView:
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    conditions = {
        str(c.get("type")): (str(c.get("reason") or ""), str(c.get("message") or ""), str(c.get("lastTransitionTime") or ""))
        for c in status.get("conditions") or []
        if c.get("status") == "True"
    }
    return JobView(
        uid=str(body.get("metadata", {}).get("uid", "")),
        suspend=bool(spec.get("suspend")),
        active=int(status.get("active") or 0),
        ready=int(status.get("ready") or 0),
        failed=int(status.get("failed") or 0),
        succeeded=int(status.get("succeeded") or 0),
        start_time=status.get("startTime"),
        completion_time=status.get("completionTime"),
        created=body.get("metadata", {}).get("creationTimestamp"),
        conditions=conditions,
        queue_name=_queue_name(body),
    )


def _queue_name(body: Mapping[str, Any]) -> str | None:
    value = ((body.get("metadata") or {}).get("labels") or {}).get(KUEUE_QUEUE_LABEL)
    return str(value) if value is not None else None


def pod_view(body: Mapping[str, Any]) -> PodView:
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    running_since = finished_at = None
    exit_code: int | None = None
    message = ""
    waiting_reason: str | None = None
    waiting_message = ""
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        last = (cs.get("lastState") or {}).get("terminated") or {}
        if "running" in state:
            running_since = (state["running"] or {}).get("startedAt") or status.get("startTime") or ""
        if "terminated" in state or last:
            term = state.get("terminated") or last
            try:
                exit_code = int(term.get("exitCode", 0))
            except (TypeError, ValueError):
                exit_code = 1
            message = str(term.get("message") or "")
            finished_at = term.get("finishedAt")
            running_since = running_since or term.get("startedAt") or finished_at or ""
        if "waiting" in state:
            waiting_reason = (state["waiting"] or {}).get("reason")
            waiting_message = str((state["waiting"] or {}).get("message") or "")
    unschedulable = None
    ready = False
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
            unschedulable = str(cond.get("message") or "no node fits the pod")
        if cond.get("type") == "Ready" and cond.get("status") == "True":
            ready = True
    index = str((meta.get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION) or "")
    return PodView(
        uid=str(meta.get("uid", "")),
        name=str(meta.get("name", "")),
        phase=str(status.get("phase") or "Pending"),
        created=meta.get("creationTimestamp"),
        start_time=status.get("startTime"),
        running_since=running_since,
        finished_at=finished_at,
        exit_code=exit_code,
        termination_message=message,
        waiting_reason=waiting_reason,
        waiting_message=waiting_message,
        unschedulable_message=unschedulable,
        deleted=bool(meta.get("deletionTimestamp")),
        worker_index=int(index) if index.isdigit() else None,
        ready=ready,
    )


# A JobSet's conditions the status logic reads, as a Job's (only these: JobSet's startup-policy
# conditions say nothing about the pods).
_JOBSET_CONDITIONS = {"Completed": "Complete", "Failed": "Failed", "Suspended": "Suspended"}


def jobset_view(body: Mapping[str, Any]) -> JobView:
    """A JobSet (jobset.x-k8s.io/v1alpha2) as the status logic reads a Job: its group's state.

    Completed -> Complete, Failed, Suspended (conditions that are True); `failed` counts the
    worker groups that failed (status.restarts, plus the last one once the JobSet Failed),
    `succeeded` is 1 once Completed, `active` the child Jobs with a pod running or pending,
    `workers` the pods of all replicated Jobs. JobSet has no start time of its own.
    """
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    conditions = {
        _JOBSET_CONDITIONS[str(c.get("type"))]: (
            str(c.get("reason") or ""), str(c.get("message") or ""), str(c.get("lastTransitionTime") or "")
        )
        for c in status.get("conditions") or []
        if c.get("status") == "True" and str(c.get("type")) in _JOBSET_CONDITIONS
    }  # fmt: skip
    workers = 0
    for rjob in spec.get("replicatedJobs") or []:
        job_spec = ((rjob or {}).get("template") or {}).get("spec") or {}
        workers += int(rjob.get("replicas") or 1) * int(job_spec.get("parallelism") or 1)
    groups = status.get("replicatedJobsStatus") or []
    restarts = int(status.get("restarts") or 0)
    return JobView(
        uid=str(meta.get("uid", "")),
        suspend=bool(spec.get("suspend")),
        active=sum(int(g.get("active") or 0) for g in groups),
        ready=sum(int(g.get("ready") or 0) for g in groups),
        failed=restarts + (1 if "Failed" in conditions else 0),
        succeeded=1 if "Complete" in conditions else 0,
        completion_time=conditions["Complete"][2] if "Complete" in conditions else None,
        created=meta.get("creationTimestamp"),
        conditions=conditions,
        queue_name=_queue_name(body),
        kind="JobSet",
        workers=max(workers, 1),
        restarts=restarts,
    )


@dataclass(frozen=True)
class WorkloadView:
    """What the status logic needs of Kueue's Workload of a Job (kueue.x-k8s.io/v1beta1)."""

    uid: str
    name: str
    active: bool = True  # spec.active (Kueue defaults it to true)
    # condition type -> (status, reason, message): every condition, False ones too (QuotaReserved=False
    # carries Kueue's reason for waiting)
    conditions: Mapping[str, tuple[str, str, str]] = field(default_factory=dict)

    def is_true(self, kind: str) -> bool:
        return self.conditions.get(kind, ("", "", ""))[0] == "True"


def workload_view(body: Mapping[str, Any]) -> WorkloadView:
    meta = body.get("metadata") or {}
    active = (body.get("spec") or {}).get("active")
    conditions = {
        str(c.get("type")): (str(c.get("status") or ""), str(c.get("reason") or ""), str(c.get("message") or ""))
        for c in (body.get("status") or {}).get("conditions") or []
        if isinstance(c, Mapping)
    }
    return WorkloadView(
        uid=str(meta.get("uid", "")),
        name=str(meta.get("name", "")),
        active=active is not False,
        conditions=conditions,
    )


@dataclass(frozen=True)
class KueueWait:
    """Why Kueue holds a Job it manages: the FineTuneJob's reason and message while Pending."""

    reason: str  # Queued, Admitted, Preempted, or Kueue's other eviction reason
    message: str
    evicted: bool = False  # Kueue took the Job's quota away (preemption, another eviction)


def workload_reactivatable(workload: WorkloadView) -> bool:
    """Whether the operator may set `spec.active: true` again on an inactive Workload.

    Not when Kueue deactivated it itself (Evicted reason `DeactivatedDueTo...`, or a
    DeactivationTarget condition: maximum execution time, requeuing limit, rejected admission
    check): that is Kueue's decision, which `spec.suspend: false` does not overrule.
    """
    if workload.is_true("DeactivationTarget"):
        return False
    status_, reason, _ = workload.conditions.get("Evicted", ("", "", ""))
    return not (status_ == "True" and reason.startswith(KUEUE_DEACTIVATION_PREFIX))


def kueue_wait(*, workload: WorkloadView | None, queue: str, installed: bool = True) -> KueueWait:
    """What Kueue decided about the suspended Job of a FineTuneJob, in Kueue's own words.

    Read from the Workload's conditions as Kueue's controllers set them: QuotaReserved=False
    with the scheduler's or the workload controller's message while waiting (insufficient
    quota, "LocalQueue q doesn't exist", ...); Evicted=True (reason Preempted, with the
    Preempted condition's detail, or another eviction reason) until quota is reserved again,
    which sets Evicted back to False; Admitted=True just before Kueue unsuspends the Job.
    An eviction by deactivation (reason `Deactivated`, what `spec.suspend` does) is no news
    once the Workload is active again: it then waits like any other. Messages are cleaned
    and bounded like the trainer's (`_short`).
    """
    if not installed:
        return KueueWait(
            "Queued",
            f"the batch Job waits for Kueue (LocalQueue {queue}), but Kueue's Workload API "
            "(kueue.x-k8s.io/v1beta1) is not served by this cluster",
        )
    if workload is None:
        return KueueWait("Queued", f"waiting for Kueue to create the Workload of the batch Job (LocalQueue {queue})")
    _, _, quota_message = workload.conditions.get("QuotaReserved", ("", "", ""))
    waiting = _short(quota_message) if not workload.is_true("QuotaReserved") else ""
    evicted_status, evicted_reason, evicted_message = workload.conditions.get("Evicted", ("", "", ""))
    if evicted_status == "True" and not (evicted_reason == EVICTED_BY_DEACTIVATION and workload.active):
        if evicted_reason == "Preempted":
            detail = workload.conditions.get("Preempted", ("", "", ""))
            why = detail[2] if detail[0] == "True" and detail[2] else evicted_message
            text = f"preempted by Kueue: {why or 'to make room for a workload of higher priority'}"
            return KueueWait("Preempted", _short(f"{text}; {waiting}" if waiting else text), evicted=True)
        if evicted_reason != EVICTED_BY_DEACTIVATION:
            reason = _reason(evicted_reason, "Evicted")
            text = f"evicted by Kueue ({evicted_reason}): {evicted_message or 'no message'}"
            return KueueWait(reason, _short(f"{text}; {waiting}" if waiting else text), evicted=True)
    if not workload.active:
        return KueueWait("Queued", f"Workload {workload.name} is inactive (spec.active: false)")
    if workload.is_true("Admitted"):
        return KueueWait("Admitted", f"admitted by Kueue (Workload {workload.name}); the batch Job starts")
    if workload.is_true("QuotaReserved"):
        _, _, admitted_message = workload.conditions.get("Admitted", ("", "", ""))
        text = admitted_message or f"{quota_message or 'quota reserved'}; waiting for admission checks"
        return KueueWait("Queued", _short(text))
    return KueueWait("Queued", waiting or f"waiting for Kueue to admit Workload {workload.name} (LocalQueue {queue})")


@dataclass(frozen=True)
class Event:
    """A Kubernetes event to post on the FineTuneJob."""

    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Outcome:
    """The result of `derive`: the operator-owned status fields, events, and bookkeeping.

    `status` is the merge patch of an `api.FineTuneJobStatus` (`api.status_patch`): JSON names,
    a None value clears its field.
    """

    status: dict[str, Any]
    events: tuple[Event, ...]
    counted_pods: frozenset[str]
    retried: int = 0  # new attempts that are retries (for the retried counter)
    stop_job: bool = False  # the operator failed the job itself (stuck Pending): suspend its Job


def _summary(pod: PodView | None) -> protocol.TerminationSummary | None:
    """The trainer's JSON termination summary, when the pod's message is one; cleaned for status.

    The message is pod output: anything that is not a JSON object of the summary's shape is no
    summary (None); a reason the CRD would refuse becomes "" (callers fall back to the exit
    code's); message and model path are cleaned and bounded (`_short`).
    """
    text = pod.termination_message.strip() if pod is not None else ""
    if not text.startswith("{") or len(text) > MAX_SUMMARY_CHARS:
        return None
    try:
        parsed = protocol.TerminationSummary.model_validate(json.loads(text))
    except (ValueError, ValidationError, RecursionError):
        return None
    model_path = _short(parsed.model_path) if parsed.model_path is not None else None
    return parsed.model_copy(
        update={"reason": _reason(parsed.reason, ""), "message": _short(parsed.message), "model_path": model_path or None}
    )


def _reason(text: str, fallback: str) -> str:
    """`text` when the CRD admits it as a reason (api.Condition.reason) and it is short, else `fallback`."""
    return text if len(text) <= MAX_REASON_LENGTH and REASON_PATTERN.match(text) else fallback


def _clean(text: str) -> str:
    """Printable text: control characters, lone surrogates and other unencodable code points go."""
    out = []
    for char in text:
        if char in "\n\r\t":
            out.append(" ")
        elif unicodedata.category(char) not in ("Cc", "Cs", "Co", "Cn"):
            out.append(char)
    return "".join(out)


def _last_finished(pods: Sequence[PodView]) -> PodView | None:
    done = [p for p in pods if p.exit_code is not None]
    return max(done, key=lambda p: (p.finished_at or "", p.created or "")) if done else None


def _short(text: str, limit: int = MAX_MESSAGE_LENGTH) -> str:
    """`text` fit for a status message: cleaned (`_clean`), trimmed, at most `limit` characters."""
    text = " ".join(_clean(text[: limit * 4]).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _failure(job: JobView, pods: Sequence[PodView]) -> tuple[str, str]:
    """(reason, message) of a failed Job, the trainer's own words first."""
    reason, message, _ = job.conditions.get("Failed") or job.conditions.get("FailureTarget") or ("Failed", "", "")
    last = _last_finished(pods)
    summary = _summary(last)
    if reason == "PodFailurePolicy":
        code = last.exit_code if last is not None else None
        named = EXIT_REASONS.get(code if code is not None else -1, "Failed")
        if summary is not None and summary.reason not in ("", "Error", "Succeeded"):
            return summary.reason, summary.message or f"trainer exited with code {code}"
        detail = summary.message if summary else (last.termination_message if last else message)
        return named, _short(detail) or f"trainer exited with code {code}"
    if reason == "BackoffLimitExceeded":
        detail = summary.message if summary else (last.termination_message if last else "")
        tail = f"; last attempt: {_short(detail, 512)}" if _short(detail) else ""
        exit_note = f" (exit code {last.exit_code})" if last is not None else ""
        return reason, _short(f"{_attempts_failed(job.failed)}, backoff limit reached{exit_note}{tail}")
    if reason == "DeadlineExceeded":
        return reason, _short(message) or "the job ran past runtime.activeDeadlineSeconds"
    return _reason(reason, "Failed"), _short(message) or "the batch Job failed"


def _failed_worker(pods: Sequence[PodView]) -> PodView | None:
    """The worker that failed its group: the last to end with a failure of its own.

    Workers stopped with their group (SIGTERM, SIGKILL: 143, 137) come after the others; a
    worker that succeeded never is the one.
    """
    failed = [p for p in pods if p.exit_code not in (None, 0)]
    if not failed:
        return None
    return max(failed, key=lambda p: (p.exit_code not in KILLED_EXIT_CODES, p.finished_at or "", p.created or ""))


def _group_failure(job: JobView, pods: Sequence[PodView], children: Sequence[JobView]) -> tuple[str, str]:
    """(reason, message) of a failed JobSet: its failed worker's own words first.

    JobSet fails the group at once (FailJobSetFailurePolicyAction) when a child Job failed
    through its pod failure policy (the trainer's exit code 2, 3 or 4) or ran past its
    deadline; after `maxRestarts` restarts it fails with ReachedMaxRestarts (BackoffLimitExceeded
    here, as for a Job). The worker's termination message is untrusted: `_summary`/`_short`.
    """
    reason, message, _ = job.conditions.get("Failed") or ("Failed", "", "")
    worker = _failed_worker(pods)
    summary = _summary(worker)
    child_reasons = {c.conditions["Failed"][0] for c in children if "Failed" in c.conditions}
    who = f"worker {worker.worker_index if worker.worker_index is not None else '?'} (pod {worker.name})" if worker else ""
    code = worker.exit_code if worker is not None else None
    detail = _short(summary.message if summary else (worker.termination_message if worker else ""), 512)
    if reason == "FailJobSetFailurePolicyAction":
        if code in EXIT_REASONS:
            named = EXIT_REASONS[code if code is not None else -1]
            if summary is not None and summary.reason not in ("", "Error", "Succeeded"):
                named = summary.reason
            return named, _short(f"{who}: {detail or f'trainer exited with code {code}'}")
        if "DeadlineExceeded" in child_reasons:
            return "DeadlineExceeded", "a worker group ran past runtime.activeDeadlineSeconds"
        return "Failed", _short(f"{message or 'the JobSet failed'}; {who} exit code {code}" if worker else message)
    if reason == "ReachedMaxRestarts":
        tail = f"; last failure: {who}, exit code {code}" if worker is not None else ""
        tail += f": {detail}" if worker is not None and detail else ""
        groups = job.restarts + 1
        restarts = "no restarts" if job.restarts == 0 else f"{job.restarts} restart{'' if job.restarts == 1 else 's'}"
        return "BackoffLimitExceeded", _short(
            f"{groups} attempt{'' if groups == 1 else 's'} of the worker group failed ({restarts}), "
            f"backoff limit reached{tail}"
        )
    return _reason(reason, "Failed"), _short(message) or "the JobSet failed"


def _attempts_failed(failed: int) -> str:
    """"1 attempt failed (no retries)", "3 attempts failed (2 retries)"."""
    if failed <= 0:
        return "no attempt failed"
    retries = failed - 1
    retried = "no retries" if retries == 0 else f"{retries} retr{'y' if retries == 1 else 'ies'}"
    return f"{failed} attempt{'' if failed == 1 else 's'} failed ({retried})"


def _stuck(pods: Sequence[PodView], *, now: datetime.datetime, timeout_s: float) -> tuple[str, str] | None:
    """(reason, message) when a pod has waited too long on something that will not come by itself.

    Its image (ImagePullError), its container's configuration: a missing ConfigMap or Secret
    (ContainerConfigError), a container the runtime cannot create or start (PodStartError),
    a missing or unbound PersistentVolumeClaim (VolumeError, the scheduler's words), or a node
    (Unschedulable); the message quotes the kubelet or the scheduler.
    """
    if timeout_s <= 0:
        return None
    for pod in pods:
        if pod.phase != "Pending" or pod.deleted or pod.started:
            continue
        created = parse_time(pod.created)
        if created is None or (now - created).total_seconds() < timeout_s:
            continue
        if pod.waiting_reason in IMAGE_PULL_REASONS:
            return "ImagePullError", _short(f"pod {pod.name}: {pod.waiting_reason}: {pod.waiting_message}")
        if pod.waiting_reason in START_FAILURE_REASONS:
            return START_FAILURE_REASONS[pod.waiting_reason], _short(
                f"pod {pod.name}: {pod.waiting_reason}: {pod.waiting_message or 'the container could not be created'}"
            )
        if pod.unschedulable_message is not None:
            if _VOLUME_UNSCHEDULABLE.search(pod.unschedulable_message):
                return "VolumeError", _short(f"pod {pod.name}: {pod.unschedulable_message}")
            return "Unschedulable", _short(f"pod {pod.name}: {pod.unschedulable_message}")
    return None


def creation_stalled(
    job: JobView | None, pods: Sequence[PodView], *, now: datetime.datetime, timeout_s: float
) -> bool:
    """Whether the Job controller has made no pod at all for longer than the pending timeout.

    E.g. PodSecurity admission or a ResourceQuota refuses the pod template: the Job exists,
    but no pod ever does. Counted from the Job's startTime (reset when a suspended Job is
    resumed), else its creation.
    """
    if job is None or timeout_s <= 0 or pods or job.suspend:
        return False
    if job.active or job.succeeded or job.failed or job.conditions:
        return False
    since = parse_time(job.start_time) or parse_time(job.created)
    return since is not None and (now - since).total_seconds() >= timeout_s


def _conditions(
    *, phase: api.Phase, reason: str, message: str, generation: int, previous: Sequence[Mapping[str, Any]], now: str
) -> list[api.Condition]:
    """The `metav1.Condition`s of `phase`, keeping each one's lastTransitionTime while unchanged.

    What GitOps tools read (README, "GitOps"): kstatus decides on Reconciling=True
    (InProgress: Pending, Running) and Stalled=True (Failed) first, and otherwise on Ready
    (checkReadyCondition: True -> Current, False -> InProgress). Ready means "the model is
    trained", so it is True only on Succeeded; a Suspended job, which has reached the state
    its spec asks for, carries no Ready condition at all, which kstatus reads as Current
    (Ready=False would keep a Flux `wait: true` waiting until its timeout) while
    `kubectl wait --for=condition=Ready` still waits for a model.
    """
    truth: dict[api.ConditionType, bool] = {
        "Ready": phase == "Succeeded",
        "Running": phase == "Running",
        "Complete": phase == "Succeeded",
        "Failed": phase == "Failed",
        "Suspended": phase == "Suspended",
        "Reconciling": phase in ("Pending", "Running"),
        "Stalled": phase == "Failed",
    }
    before = {str(c.get("type")): c for c in previous}
    out = []
    for kind in api.CONDITION_TYPES:
        if kind == "Ready" and phase == "Suspended":
            continue
        status: api.ConditionStatus = "True" if truth[kind] else "False"
        if truth[kind]:
            cond_reason, cond_message = reason, message
        elif kind in ("Ready", "Reconciling"):
            cond_reason, cond_message = reason, message or phase
        else:
            cond_reason, cond_message = f"Not{kind}", ""
        old = before.get(kind)
        since = old.get("lastTransitionTime") if old is not None and old.get("status") == status else None
        out.append(
            api.Condition(
                type=kind,
                status=status,
                observed_generation=generation,
                last_transition_time=str(since or now),
                reason=cond_reason,
                message=cond_message,
            )
        )
    return out


def invalid_spec(
    *, generation: int, message: str, previous: Mapping[str, Any], now: datetime.datetime, reason: str = "InvalidSpec"
) -> Outcome:
    """The status of a job the operator itself fails before any pod ran: Failed/`reason`.

    InvalidSpec (an unknown model.base, a Job the API server refuses), JobNameConflict (a
    Job of that name belongs to something else) or JobDeleted (its Job went away before the
    outcome was recorded). `etaSeconds` is cleared.
    """
    stamp = rfc3339(now)
    written = api.FineTuneJobStatus(
        observed_generation=generation,
        phase="Failed",
        reason=reason,
        message=message,
        completion_time=str(previous.get("completionTime") or stamp),
        eta_seconds=None,
        conditions=_conditions(
            phase="Failed",
            reason=reason,
            message=message,
            generation=generation,
            previous=previous.get("conditions") or [],
            now=stamp,
        ),
    )
    events = () if previous.get("phase") == "Failed" else (Event("Warning", "Failed", f"{reason}: {message}"),)
    return Outcome(status=api.status_patch(written, writer="operator"), events=events, counted_pods=frozenset())


def derive(
    *,
    generation: int,
    suspend: bool,
    output_path: str,
    previous: Mapping[str, Any],
    job: JobView | None,
    pods: Sequence[PodView],
    counted_pods: frozenset[str] | None,
    now: datetime.datetime,
    pending_timeout_s: float,
    creation_failure: str | None = None,
    blocked: str | None = None,
    blocked_reason: str = "Replacing",
    workload: WorkloadView | None = None,
    kueue_installed: bool = True,
    workers: int = 1,
    child_jobs: Sequence[JobView] = (),
) -> Outcome:
    """The operator-owned status of a FineTuneJob from its Job (or JobSet) and pods.

    `previous` is the FineTuneJob's current status. Succeeded and Failed are final: once
    written they never change. `counted_pods` are the pods already counted in `attempts`
    (None after an operator restart: the pods visible now are taken as counted, and the
    Job's failed and succeeded counters bound `attempts` from below).
    `creation_failure` is the message of the Job's newest FailedCreate event, when the caller
    looked it up (see `creation_stalled`). `blocked` says why there is no Job yet while
    objects of an earlier FineTuneJob of the same name are still going away (Pending/Replacing),
    or, with `blocked_reason` WaitingForVolume, while the claim a multi-worker job writes to is missing.
    Failed and Suspended clear `etaSeconds`.

    A Job with a queue label is Kueue's: while it is suspended, the job is Pending with what
    Kueue decided (`kueue_wait` on `workload`, its Workload, None while Kueue has made none;
    `kueue_installed` False when the cluster serves no Workload API), e.g. Queued with the
    insufficient-quota message, or Preempted (a Warning event) until Kueue admits it again,
    when it is Running again (a Resumed event).

    `workers > 1`: `job` is the JobSet (`jobset_view`), `pods` all its workers' and
    `child_jobs` its Jobs. `attempts` counts starts of the worker group, i.e. of its chief
    (worker 0): a group restart or a resume starts a new chief, a single worker never starts
    alone; after an operator restart the JobSet's `status.restarts` bounds it from below.
    `workers` {ready, total} is written; a failure names the worker that failed.
    """
    prev_phase = previous.get("phase")
    stamp = rfc3339(now)
    live = [p for p in pods if not p.deleted or p.exit_code is not None]
    group = workers > 1 or (job is not None and job.is_jobset)
    counting = [p for p in live if p.worker_index in (None, 0)] if group else live
    started = {p.uid for p in counting if p.started}
    attempts = int(previous.get("attempts") or 0)
    if counted_pods is None:
        counted = frozenset(started)
        attempts = max(attempts, len(started))
        if job is not None:
            # Pods that ended while the operator was away and are gone since (pod GC, a node
            # lost) are still in the Job controller's counters.
            in_flight = sum(1 for p in counting if p.started and p.exit_code is None)
            attempts = max(attempts, job.failed + job.succeeded + in_flight)
        new_pods = 0
    else:
        new_pods = len(started - counted_pods)
        counted = counted_pods | started
        attempts += new_pods
    if prev_phase in TERMINAL and previous.get("observedGeneration") == generation:
        return Outcome(status=dict(previous), events=(), counted_pods=counted)

    model_path: str | None = None
    completion: str | None = None
    stop_job = False
    phase: api.Phase
    if job is None and blocked:
        phase, reason, message = "Pending", blocked_reason, blocked
    elif job is None:
        # Written while the Job is being created, and still true once it is: one write for both.
        phase, reason, message = "Pending", "Waiting", "waiting for the trainer pod to start"
    elif "Complete" in job.conditions or "SuccessCriteriaMet" in job.conditions:
        phase, reason = "Succeeded", "Succeeded"
        summary = _summary(_last_finished([p for p in pods if p.worker_index in (None, 0)] if group else pods))
        model_path = (summary.model_path if summary else None) or f"{output_path.rstrip('/')}/model.keras"
        message = f"model saved to {model_path}"
        completion = job.completion_time or stamp
    elif "Failed" in job.conditions:
        phase = "Failed"
        reason, message = _group_failure(job, pods, child_jobs) if job.is_jobset else _failure(job, pods)
        completion = job.conditions["Failed"][2] or job.completion_time or stamp
    elif suspend or job.suspend or "Suspended" in job.conditions:
        if suspend:
            phase, reason, message = "Suspended", "Suspended", "suspended by spec.suspend"
            if job.queue_name is not None and workload is not None:
                message = f"suspended by spec.suspend (Workload {workload.name} deactivated)"
        elif job.queue_name is not None:
            held = kueue_wait(workload=workload, queue=job.queue_name, installed=kueue_installed)
            phase, reason, message = "Pending", held.reason, held.message
            last = previous.get("reason")
            if reason in WAITING_REASONS and prev_phase == "Pending" and last and last not in WAITING_REASONS:
                # Evicted, now queued or admitted again: the reason stays (Preempted) until it runs again.
                reason = str(last)
        else:
            what = "JobSet" if job.is_jobset else "batch Job"
            phase, reason, message = "Pending", "Queued", f"the {what} is suspended (e.g. waiting for admission by Kueue)"
    else:
        stuck = _stuck(live, now=now, timeout_s=pending_timeout_s)
        running = [p for p in live if p.phase == "Running" and p.running_since is not None and not p.deleted]
        if stuck is None and creation_stalled(job, pods, now=now, timeout_s=pending_timeout_s):
            why = f": {creation_failure.strip()}" if creation_failure and creation_failure.strip() else ""
            stuck = "PodCreationFailed", _short(f"the batch Job could not create its pod in {pending_timeout_s:g}s{why}")
        if stuck is not None:
            phase, (reason, message) = "Failed", stuck
            completion = stamp
            stop_job = True
        elif running and group:
            phase, reason = "Running", "Training"
            message = f"attempt {attempts}: {len(running)}/{max(workers, job.workers)} workers running"
        elif running:
            phase, reason = "Running", "Training"
            message = f"attempt {attempts}: pod {running[0].name} running"
        elif prev_phase == "Running" and attempts > 0:
            last = _last_finished(live)
            if last is not None and last.exit_code == 0:
                # The trainer is done; the Job controller has not marked the Job Complete yet.
                phase = "Running"
                reason = str(previous.get("reason") or "Training")
                message = str(previous.get("message") or "finishing")
            elif group:
                phase, reason = "Running", "Retrying"
                message = f"attempt {attempts} failed; the JobSet restarts all {max(workers, job.workers)} workers"
            else:
                phase, reason = "Running", "Retrying"
                message = f"attempt {attempts} failed; waiting for the next pod"
        else:
            phase, reason, message = "Pending", "Waiting", "waiting for the trainer pod to start"

    shown = message
    if phase == "Running" and prev_phase == "Running" and previous.get("message"):
        # While training, `message` is the progress hub's ("phase 2/2, epoch 4/10").
        shown = str(previous["message"])
    written = api.FineTuneJobStatus(
        observed_generation=generation,
        phase=phase,
        reason=reason,
        attempts=attempts,
        message=shown,
        conditions=_conditions(
            phase=phase,
            reason=reason,
            message=message,
            generation=generation,
            previous=previous.get("conditions") or [],
            now=stamp,
        ),
    )
    if group:
        ready = sum(1 for p in live if p.ready and p.phase == "Running" and not p.deleted)
        total = max(workers, job.workers if job is not None else 1)
        written.workers = api.WorkersStatus(ready=0 if phase in TERMINAL else ready, total=total)
    start = previous.get("startTime") or (job.start_time if job is not None and attempts else None)
    if group and not start and attempts:
        # JobSet keeps no start time: the first worker's.
        firsts = sorted(str(p.running_since or p.start_time) for p in counting if p.started and (p.running_since or p.start_time))
        start = firsts[0] if firsts else stamp
    if start:
        written.start_time = str(start)
    if completion:
        written.completion_time = completion
    if model_path:
        written.model_path = model_path
        written.progress = 100
        written.eta_seconds = 0
    elif phase in ("Failed", "Suspended"):
        written.eta_seconds = None  # no estimate holds for a job that is not training: null clears it

    events: list[Event] = []
    retried = 0
    prev_reason = previous.get("reason")
    if phase == "Pending" and reason != prev_reason and job is not None and job.queue_name is not None:
        if reason == "Preempted":
            events.append(Event("Warning", "Preempted", message))
        elif reason not in WAITING_REASONS:
            events.append(Event("Warning", "Evicted", f"{reason}: {message}"))
    if phase != prev_phase:
        if phase == "Running" and prev_phase == "Pending" and prev_reason not in (None, *WAITING_REASONS):
            # Back after a preemption (or another eviction by Kueue): the trainer resumes from its checkpoint.
            events.append(Event("Normal", "Resumed", f"admitted again after {prev_reason}; {message}"))
        elif phase == "Running" and prev_phase == "Suspended":
            events.append(Event("Normal", "Resumed", message))
        elif phase == "Running" and reason == "Training":
            events.append(Event("Normal", "Started", message))
        elif phase == "Suspended":
            events.append(Event("Normal", "Suspended", message))
        elif phase == "Pending" and prev_phase == "Suspended":
            events.append(Event("Normal", "Resumed", "resumed; waiting for the trainer pod"))
        elif phase == "Succeeded":
            events.append(Event("Normal", "Succeeded", message))
        elif phase == "Failed":
            events.append(Event("Warning", "Failed", f"{reason}: {message}"))
    if counted_pods is not None and new_pods and attempts > 1 and prev_phase in ("Running", "Pending") and job is not None and job.failed:
        retried = new_pods
        if phase == "Running":
            events.append(Event("Normal", "Retrying", f"attempt {attempts} started after {job.failed} failed"))
    return Outcome(
        status=api.status_patch(written, writer="operator"),
        events=tuple(events),
        counted_pods=counted,
        retried=retried,
        stop_job=stop_job,
    )


def diff(*, desired: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch that makes `current` show `desired` (only changed keys)."""
    return {k: v for k, v in desired.items() if current.get(k) != v}
