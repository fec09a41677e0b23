"""Kopf registrations: watch FineTuneJobs, their Jobs and pods; reconcile each job level-based.

Thin on purpose: builders make the manifests, `status` decides the status, `progress` folds
the trainer's reports, `actions` makes the API calls. What lives here is their ordering:

- Kopf indexes keep a compact view of every FineTuneJob, owned Job, trainer pod and Kueue
  Workload of a Job in
  memory. Kopf calls no handler before every index has its initial listing, so after a
  restart an existing Job is seen (and adopted) before anything could create a second one.
- Every event only enqueues its FineTuneJob's key into the reconcile `engine` (one worker per
  key; a key enqueued while it runs is reconciled once more afterwards; a failed reconcile
  is retried with backoff; timers for looking again). A spec only the operator can reject
  becomes Failed/InvalidSpec, once.
- The `Operator` (this state and the reconcile) lives in Kopf's memo: `make_memo` carries the
  configuration into `kopf.run`, the startup handler makes the Operator there, and every
  handler takes it from its `memo` (no module-global state).
- Writes are few: the Job at creation (the spec the trainer reads rides in it, see
  `builders`), a status patch only when the operator-owned fields change (the first one at
  once, later ones coalesced over `--status-window`), a Job patch on suspend/resume (for a
  Job with a Kueue queue label, a patch of its Workload's `spec.active` instead), a Job
  delete when `runtime.ttlSecondsAfterFinished` is up. The trainer's progress credential is
  a projected ServiceAccount token the kubelet makes: no Secret to write.
- A FineTuneJob deleted and created again under the same name gets a Job of its own: what
  the earlier one left (its Job, its pods) is never adopted. The operator waits until they
  are gone (deleting a Job whose FineTuneJob no longer exists itself), then creates the new
  Job; a Job of that name owned by anything else fails the job with JobNameConflict.
- Finished means finished: the operator applies `ttlSecondsAfterFinished` itself, deleting
  the Job only after it recorded the outcome (a TTL controller could delete it while the
  operator is down, and the outcome with it). A Job that vanishes after a pod ran, before
  the outcome is recorded, fails the job with JobDeleted rather than training again.
  No Kopf handler state is written (on.event handlers keep none); Kopf's storages are still
  set to annotations under `finetune.dev` so that nothing of Kopf's ever lands in `status`.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from finetune_operator import actions, api, builders, engine, kube, metrics, status, tokens
from finetune_operator import settings as config_mod

# The status field's JSON name, from the model (not a string kept in step by hand).
_ETA_SECONDS = api.FineTuneJobStatus.model_fields["eta_seconds"].alias or "eta_seconds"

__all__ = ["Operator", "make_memo", "operator_of"]

logger = logging.getLogger("finetune_operator")

MANAGED = {"app.kubernetes.io/managed-by": builders.MANAGED_BY}
GROUP, VERSION, PLURAL = api.API_GROUP, api.API_VERSION, api.PLURAL
KUEUE_GROUP, KUEUE_VERSION = actions.KUEUE_GROUP, actions.KUEUE_VERSION
JOBSET_GROUP, JOBSET_VERSION = actions.JOBSET_GROUP, actions.JOBSET_VERSION
JOBSET_UID_LABEL = "jobset.sigs.k8s.io/jobset-uid"  # JobSet's label on its Jobs and pods


def _kind(job: status.JobView) -> actions.Kind:
    return "JobSet" if job.is_jobset else "Job"

Key = tuple[str, str]


# The status fields the reconciler compares with what it derives (the rest is the hub's):
# those the model says the operator writes (api.WrittenBy).
_KEPT_STATUS = status.OWNED_FIELDS


@dataclass(frozen=True)
class FtjView:
    """What the reconciler needs of a FineTuneJob, kept small: a thousand of them live in memory."""

    uid: str
    generation: int
    created: str | None
    labels: Mapping[str, str]
    spec_json: str  # the spec as compact JSON: a tenth of the memory of the nested dicts
    suspend: bool
    output_path: str
    status: Mapping[str, Any]
    deleting: bool
    ttl_s: int | None = None  # spec.runtime.ttlSecondsAfterFinished
    resource_version: str = ""  # metadata.resourceVersion, shown once a pass over it completed

    @property
    def spec(self) -> dict[str, Any]:
        return dict(json.loads(self.spec_json))


def ftj_view(body: Mapping[str, Any]) -> FtjView:
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    current = body.get("status") or {}
    labels = meta.get("labels") or {}
    ttl = (spec.get("runtime") or {}).get("ttlSecondsAfterFinished")
    return FtjView(
        uid=str(meta.get("uid", "")),
        generation=int(meta.get("generation") or 1),
        created=meta.get("creationTimestamp"),
        labels=builders.kueue_labels(labels),
        spec_json=json.dumps(spec, separators=(",", ":")),
        suspend=bool(spec.get("suspend")),
        output_path=str((spec.get("output") or {}).get("path", "")),
        status={k: current[k] for k in _KEPT_STATUS if k in current},
        deleting=bool(meta.get("deletionTimestamp")),
        resource_version=str(meta.get("resourceVersion") or ""),
        ttl_s=ttl if isinstance(ttl, int) and not isinstance(ttl, bool) and ttl >= 0 else None,
    )


class Operator:
    """The operator's in-memory state and its reconcile; the queueing is the `engine`'s."""

    def __init__(
        self,
        *,
        config: config_mod.OperatorConfig | None = None,
        client: kube.KubeClient | None = None,
        clock: engine.Clock | None = None,
    ) -> None:
        self.config = config if config is not None else config_mod.OperatorConfig()
        self.client = client if client is not None else kube.KubeClient(pool_size=64)
        self.actions = actions.KubeActions(client=self.client)
        self.hub: Any = None  # progress.ProgressHub, once started
        self.ftjs: Any = None  # the Kopf indexes, captured from the first handler call
        self.jobs: Any = None
        self.jobsets: Any = None  # JobSets (runtime.workers > 1); Kopf serves none without JobSet's CRD
        self.pods: Any = None
        self.workloads: Any = None
        self.kueue_installed: bool | None = None  # whether the cluster serves Kueue's Workload API (looked up once)
        self._active_sent: dict[str, bool] = {}  # FineTuneJob uid -> spec.active last written to its Workload
        self._counted: dict[str, frozenset[str]] = {}  # FineTuneJob uid -> pods counted in attempts
        self._written: dict[str, dict[str, Any]] = {}  # FineTuneJob uid -> owned status fields last written
        self._registered: set[str] = set()  # FineTuneJob uids registered with the hub
        self._finished: set[str] = set()
        self._created: dict[str, status.JobView] = {}  # FineTuneJob uid -> its Job, until the index shows it
        self._announced: set[str] = set()  # FineTuneJob uids whose JobCreated event this process posted
        self._parsed: dict[str, tuple[int, api.FineTuneJobSpec | None, str | None]] = {}
        self._waits: dict[Key, int] = {}  # jobs waiting for an earlier FineTuneJob's objects: looks so far
        self._expired: dict[str, str] = {}  # FineTuneJob uid -> the uid of its Job deleted for its TTL
        self._last_write: dict[str, float] = {}  # FineTuneJob uid -> clock time of the last status write
        self.engine: engine.Engine[Key] = engine.Engine(
            reconcile=self.reconcile, clock=clock, concurrency=64, on_failure=self._failed
        )
        self.clock = self.engine.clock

    # ----- queueing -----

    def capture(self, kwargs: Mapping[str, Any]) -> None:
        self.ftjs, self.jobs, self.pods = kwargs["ftj_index"], kwargs["job_index"], kwargs["pod_index"]
        self.workloads = kwargs.get("workload_index")
        self.jobsets = kwargs.get("jobset_index")

    def enqueue(self, key: Key, *, delay: float = 0.0) -> None:
        """Reconcile the job now (once more, if a reconcile of it runs), or after `delay` s at the latest."""
        self.engine.enqueue(key, delay=delay)

    @staticmethod
    def _failed(key: Key, exc: Exception, delay: float) -> None:
        metrics.reconcile_error(handler="reconcile")
        logger.error("reconcile %s/%s failed (retry in %.0fs): %s", *key, delay, exc)

    # ----- reading the indexes -----

    def _ftj(self, key: Key) -> FtjView | None:
        if self.ftjs is None or key not in self.ftjs:
            return None
        views = list(self.ftjs[key])
        # One, normally. Two only when a watch missed a deletion (410 Gone) and a FineTuneJob of the
        # same name was created since: the newer is the one that exists.
        return max(views, key=lambda v: v.created or "") if views else None

    def _job(self, key: Key, owner_uid: str) -> status.JobView | None:
        """The FineTuneJob's Job, or its JobSet (runtime.workers > 1)."""
        for index in (self.jobs, self.jobsets):
            if index is not None and key in index:
                found: status.JobView | None = next((view for uid, view in index[key] if uid == owner_uid), None)
                if found is not None:
                    return found
        return None

    def _children(self, key: Key, jobset_uid: str) -> list[status.JobView]:
        """The child Jobs of a JobSet (they carry the FineTuneJob's labels; their controller is the JobSet)."""
        if self.jobs is None or key not in self.jobs:
            return []
        return [view for uid, view in self.jobs[key] if uid == jobset_uid]

    def _pods(self, key: Key, job_uid: str) -> list[status.PodView]:
        if self.pods is None or key not in self.pods:
            return []
        return [view for uid, view in self.pods[key] if uid == job_uid]

    def _workload(self, key: Key, job_uid: str) -> status.WorkloadView | None:
        """Kueue's Workload of the Job (its controller ownerReference), when the index has one."""
        if self.workloads is None or key not in self.workloads:
            return None
        return next((view for uid, view in self.workloads[key] if uid == job_uid), None)

    # ----- the reconcile -----

    async def reconcile(self, key: Key) -> None:
        ftj = self._ftj(key)
        if ftj is None or ftj.deleting:
            return
        await self._reconcile(key, ftj)
        metrics.job_reconciled(namespace=key[0], name=key[1], resource_version=ftj.resource_version)

    async def _reconcile(self, key: Key, ftj: FtjView) -> None:
        namespace, name = key
        owner = builders.Owner(namespace=namespace, name=name, uid=ftj.uid, labels=ftj.labels)
        previous = {**ftj.status, **self._written.get(ftj.uid, {})}
        now = datetime.datetime.now(datetime.UTC)
        if previous.get("phase"):
            # Every pass, not only on a change: after a restart finetune_jobs is right at once.
            metrics.set_phase(namespace=namespace, name=name, phase=str(previous["phase"]))
        terminal = previous.get("phase") in status.TERMINAL and previous.get("observedGeneration") == ftj.generation
        if terminal:
            self._finish(key, ftj.uid)
            await self._expire(key, ftj, previous, now=now)
            return

        job = self._job(key, ftj.uid)
        if job is None:
            # Created by an earlier pass, not yet in the index: never create it twice.
            job = self._created.get(ftj.uid)
        else:
            self._created.pop(ftj.uid, None)
        parsed, refusal = self._parse(name, ftj)
        if refusal is not None and job is None:
            outcome = status.invalid_spec(generation=ftj.generation, message=refusal, previous=previous, now=now)
            await self._apply(key, ftj, outcome, previous)
            return
        assert parsed is not None or job is not None
        if job is None and parsed is not None:
            if int(previous.get("attempts") or 0) > 0:
                # A pod of ours ran, and the Job is gone before its outcome was recorded: whatever
                # happened is lost, and training again would run the job twice.
                outcome = status.invalid_spec(
                    generation=ftj.generation,
                    message="the batch Job was deleted before the operator recorded its outcome; "
                    f"the model may be under {ftj.output_path}. Delete and create the FineTuneJob to train again",
                    previous=previous,
                    now=now,
                    reason="JobDeleted",
                )
                await self._apply(key, ftj, outcome, previous)
                return
            found = await self._make_job(key, ftj, owner=owner, parsed=parsed, previous=previous, now=now)
            if found is None:
                return
            job = found
            previous = {**ftj.status, **self._written.get(ftj.uid, {})}  # with the first status, if just written
        assert job is not None
        self._waits.pop(key, None)
        if ftj.uid not in self._announced:
            # The Job was made by an earlier run that may have died before its JobCreated event
            # went out; the event's fixed name makes a second post a no-op (409).
            self.actions.post_job_created(owner=owner, kind=_kind(job))
            self._announced.add(ftj.uid)

        if ftj.uid not in self._registered and self.hub is not None:
            from finetune_operator.progress import stage_plan

            total = parsed.training.total_epochs if parsed is not None else 0
            plan = stage_plan(parsed.training) if parsed is not None else None
            self.hub.register(namespace=namespace, name=name, uid=ftj.uid, total_epochs=total, stage_epochs=plan)
            self._registered.add(ftj.uid)

        suspend = ftj.suspend
        kueue = job.queue_name is not None  # Kueue's Job: its spec.suspend and pod template are never written
        if kueue and self.kueue_installed is None:
            await self._look_for_kueue()
        workload = self._workload(key, job.uid) if kueue else None
        finished = "Complete" in job.conditions or "Failed" in job.conditions
        if not finished and kueue:
            await self._kueue_activate(key, ftj, workload, active=not suspend)
        elif not finished and job.suspend != suspend:
            await self.actions.patch_job(owner=owner, suspend=suspend, kind=_kind(job))

        pods = self._pods(key, job.uid)
        creation_failure = None
        if not suspend and status.creation_stalled(job, pods, now=now, timeout_s=self.config.pending_timeout_s):
            # Looked up once: the job turns Failed on this pass.
            child = f"{name}-{builders.REPLICATED_JOB}-0" if job.is_jobset else None
            creation_failure = await self.actions.creation_failure(owner=owner, job_name=child)
        outcome = status.derive(
            generation=ftj.generation,
            suspend=suspend,
            output_path=ftj.output_path,
            previous=previous,
            job=job,
            pods=pods,
            counted_pods=self._counted.get(ftj.uid),
            now=now,
            pending_timeout_s=self.config.pending_timeout_s,
            creation_failure=creation_failure,
            workload=workload,
            kueue_installed=self.kueue_installed is not False,
            workers=parsed.runtime.workers if parsed is not None else job.workers,
            child_jobs=self._children(key, job.uid) if job.is_jobset else (),
        )
        wait = self._coalesce_wait(ftj.uid, outcome, previous)
        if wait > 0:
            # Nothing is stored: the next pass derives the same transition (and its events) again.
            self.enqueue(key, delay=wait)
            return
        if outcome.stop_job and kueue:
            # Kueue stops its own Job: deactivating the Workload makes it suspend the Job (and delete the pod).
            if workload is None or not await self.actions.set_workload_active(
                namespace=namespace, name=workload.name, active=False
            ):
                logger.warning("%s/%s failed, but its Workload is not known: the Job is left to Kueue", *key)
        elif outcome.stop_job:
            await self.actions.patch_job(owner=owner, suspend=True, kind=_kind(job))
        await self._apply(key, ftj, outcome, previous)
        # Only once the attempts they add are written: a failed write derives them again.
        self._counted[ftj.uid] = outcome.counted_pods
        for _ in range(outcome.retried):
            metrics.job_retried(namespace=namespace)
        # A pod that waits may become stuck without any further event: look again at the deadline.
        if self.config.pending_timeout_s > 0 and outcome.status.get("phase") in ("Pending", "Running"):
            waiting = [p for p in pods if p.phase == "Pending" and not p.started and not p.deleted]
            if waiting or not pods:
                self.enqueue(key, delay=self.config.pending_timeout_s + 1.0)

    async def _look_for_kueue(self) -> None:
        """Whether the cluster serves Kueue's Workload API, looked up (API discovery) for the first Kueue job.

        Kopf resolves the Workload watch once, at start: a Kueue installed later needs a restart.
        """
        try:
            self.kueue_installed = await self.actions.kueue_served()
        except Exception as exc:  # only a status message depends on it: looked up again next time
            logger.warning("could not look up Kueue's Workload API: %s", exc)
            return
        if not self.kueue_installed:
            logger.warning(
                "Kueue's Workload API (kueue.x-k8s.io/v1beta1) is not served: jobs with a queue label stay queued"
            )

    async def _kueue_activate(
        self, key: Key, ftj: FtjView, workload: status.WorkloadView | None, *, active: bool
    ) -> None:
        """spec.suspend of a Kueue-managed job -> `spec.active` of its Workload (never the Job's spec.suspend).

        Level-based: written whenever the Workload differs from what the spec asks, except that
        a Workload Kueue deactivated itself (`status.workload_reactivatable`) is not activated
        again. A Workload Kueue has not made yet is looked at again on its first event (and,
        for a suspend, after a few seconds at the latest).
        """
        if workload is None:
            if not active and self.kueue_installed is not False:
                self.enqueue(key, delay=5.0)
            return
        if workload.active == active:
            self._active_sent.pop(ftj.uid, None)
            return
        if active and not status.workload_reactivatable(workload):
            return
        if self._active_sent.get(ftj.uid) == active:
            return  # written already; the watch has not shown it yet
        if await self.actions.set_workload_active(namespace=key[0], name=workload.name, active=active):
            self._active_sent[ftj.uid] = active

    async def _make_job(
        self,
        key: Key,
        ftj: FtjView,
        *,
        owner: builders.Owner,
        parsed: api.FineTuneJobSpec,
        previous: Mapping[str, Any],
        now: datetime.datetime,
    ) -> status.JobView | None:
        """Creates the job's Job once nothing of an earlier FineTuneJob of this name is in the way.

        The indexes say whether anything might be (another Job of this name, a pod of one);
        the API decides (`actions.obstacle`), so an index entry a watch failed to remove
        never holds a job back. None when there is no Job to go on with on this pass: the
        status says why (Pending/Replacing and a look again later, or Failed).
        """
        kind = actions.kind_of(parsed)
        if kind == "JobSet":
            check = await self.actions.check_output_volume(namespace=key[0], parsed=parsed)
            if check.kind == "refuse":
                outcome = status.invalid_spec(generation=ftj.generation, message=check.message, previous=previous, now=now)
                await self._apply(key, ftj, outcome, previous)
                return None
            if check.kind == "wait":
                await self._wait_for_volume(
                    key, ftj, check.message, workers=parsed.runtime.workers, previous=previous, now=now
                )
                return None
        found = actions.Obstacle("clear")
        if self._leftovers(key, ftj.uid):
            found = await self.actions.obstacle(owner=owner, kind=kind)
        if found.kind == "clear":
            first: asyncio.Task[None] | None = None
            if ftj.uid not in self._last_write and not previous.get("phase"):
                # The first status goes out with the Job, not after it: Pending/Waiting is true of
                # both moments (derive gives the same once the Job exists), so it costs no write more.
                early = status.derive(
                    generation=ftj.generation, suspend=ftj.suspend, output_path=ftj.output_path,
                    previous=previous, job=None, pods=[], counted_pods=self._counted.get(ftj.uid), now=now,
                    pending_timeout_s=self.config.pending_timeout_s, workers=parsed.runtime.workers,
                )  # fmt: skip
                first = asyncio.get_running_loop().create_task(self._apply(key, ftj, early, previous))
            try:
                made = await self.actions.create_job(
                    owner=owner, spec=ftj.spec, parsed=parsed, config=self.config
                )
            finally:
                if first is not None:
                    await first
            previous = {**ftj.status, **self._written.get(ftj.uid, {})}
            if isinstance(made, status.JobView):
                self._created[ftj.uid] = made
                self._announced.add(ftj.uid)  # create_job posted JobCreated
                return made
            if isinstance(made, actions.Refused):
                outcome = status.invalid_spec(
                    generation=ftj.generation, message=made.message, previous=previous, now=now
                )
                await self._apply(key, ftj, outcome, previous)
                return None
            found = await self.actions.obstacle(owner=owner, kind=kind)
            if found.kind == "clear":  # the other Job went away just now
                found = actions.Obstacle("wait", "the batch Job of an earlier FineTuneJob of this name went away")
        if found.kind == "adopt" and found.job is not None:
            self._created[ftj.uid] = found.job
            return found.job
        if found.kind == "conflict":
            outcome = status.invalid_spec(
                generation=ftj.generation, message=found.why, previous=previous, now=now, reason="JobNameConflict"
            )
            await self._apply(key, ftj, outcome, previous)
            return None
        why = found.why
        looks = self._waits.get(key, 0)
        if looks == 0:
            logger.info("%s/%s: %s", *key, why)
        self._waits[key] = looks + 1
        outcome = status.derive(
            generation=ftj.generation,
            suspend=ftj.suspend,
            output_path=ftj.output_path,
            previous=previous,
            job=None,
            pods=[],
            counted_pods=self._counted.get(ftj.uid),
            now=now,
            pending_timeout_s=self.config.pending_timeout_s,
            blocked=why or "waiting for the objects of an earlier FineTuneJob of this name to go",
            workers=parsed.runtime.workers,
        )
        if status.diff(desired=outcome.status, current=previous):
            await self._apply(key, ftj, outcome, previous)
        # Their deletion events bring the job back sooner; this is the bound.
        self.enqueue(key, delay=engine.backoff(engine.WAIT_DELAYS, looks))
        return None

    async def _wait_for_volume(
        self, key: Key, ftj: FtjView, why: str, *, workers: int, previous: Mapping[str, Any], now: datetime.datetime
    ) -> None:
        """A multi-worker job whose output claim does not exist yet: Pending/WaitingForVolume, looked at again.

        Claims are often applied with the FineTuneJob, so a missing one is waited for, as the
        scheduler waits for a single-worker pod's; past the pending timeout (from the
        FineTuneJob's creation) the job fails with VolumeError, as such a pod's does.
        """
        created = status.parse_time(ftj.created) or now
        timeout = self.config.pending_timeout_s
        if timeout > 0 and (now - created).total_seconds() >= timeout:
            outcome = status.invalid_spec(
                generation=ftj.generation, message=f"{why}: not there after {timeout:g}s", previous=previous, now=now,
                reason="VolumeError",
            )  # fmt: skip
            await self._apply(key, ftj, outcome, previous)
            return
        looks = self._waits.get(key, 0)
        self._waits[key] = looks + 1
        outcome = status.derive(
            generation=ftj.generation, suspend=ftj.suspend, output_path=ftj.output_path, previous=previous, job=None,
            pods=[], counted_pods=self._counted.get(ftj.uid), now=now, pending_timeout_s=timeout,
            blocked=why, blocked_reason="WaitingForVolume", workers=workers,
        )  # fmt: skip
        if status.diff(desired=outcome.status, current=previous):
            await self._apply(key, ftj, outcome, previous)
        delay = engine.backoff(engine.WAIT_DELAYS, looks)
        if timeout > 0:
            delay = min(delay, max(1.0, timeout - (now - created).total_seconds() + 0.5))
        self.enqueue(key, delay=delay)

    def _leftovers(self, key: Key, uid: str) -> bool:
        """Whether the indexes hold a Job of this name that is not the FineTuneJob's, or a pod of one."""
        if self.jobs is not None and key in self.jobs and any(owner != uid for owner, _ in self.jobs[key]):
            return True
        return self.pods is not None and key in self.pods and any(True for _ in self.pods[key])

    async def _expire(self, key: Key, ftj: FtjView, recorded: Mapping[str, Any], *, now: datetime.datetime) -> None:
        """Applies runtime.ttlSecondsAfterFinished: deletes the Job once the outcome is recorded and the time is up.

        The Job carries no TTL of its own, so it stays (with its pods and their exit codes)
        while the operator is away; the clock starts at the recorded completionTime.
        """
        if ftj.ttl_s is None:
            return
        job = self._job(key, ftj.uid) or self._created.get(ftj.uid)
        if job is None or self._expired.get(ftj.uid) == job.uid:
            return
        finished = status.parse_time(recorded.get("completionTime")) or now
        left = (finished - now).total_seconds() + ftj.ttl_s
        if left > 0:
            self.enqueue(key, delay=left + 0.5)
            return
        await self.actions.delete_job(namespace=key[0], name=key[1], uid=job.uid, kind=_kind(job))
        self._expired[ftj.uid] = job.uid
        self._created.pop(ftj.uid, None)

    def _coalesce_wait(self, uid: str, outcome: status.Outcome, previous: Mapping[str, Any]) -> float:
        """Seconds to hold back a non-final status write, so that quick transitions share one write.

        The first write is never held back (a new job shows Pending and Reconciling=True at
        once, so that kstatus never reads it as Current); later ones wait `status_window_s`
        from the previous write. Succeeded and Failed are written at once.
        """
        if outcome.status.get("phase") in status.TERMINAL:
            return 0.0
        if not status.diff(desired=outcome.status, current=previous):
            return 0.0
        last = self._last_write.get(uid)
        if last is None:
            return 0.0
        return max(0.0, last + self.config.status_window_s - self.clock.time())

    def _parse(self, name: str, ftj: FtjView) -> tuple[api.FineTuneJobSpec | None, str | None]:
        """`operator_refusal`, once per generation of a job."""
        cached = self._parsed.get(ftj.uid)
        if cached is None or cached[0] != ftj.generation:
            cached = (ftj.generation, *api.operator_refusal(name=name, spec=ftj.spec))
            self._parsed[ftj.uid] = cached
        return cached[1], cached[2]

    async def _apply(self, key: Key, ftj: FtjView, outcome: status.Outcome, previous: Mapping[str, Any]) -> None:
        namespace, name = key
        patch = status.diff(desired=outcome.status, current=previous)
        if patch and _ETA_SECONDS in outcome.status and outcome.status[_ETA_SECONDS] is None:
            # The hub may have written an estimate this view has not seen yet: clear it anyway.
            patch[_ETA_SECONDS] = None
        if patch:
            await self.actions.patch_status(namespace=namespace, name=name, status=patch, source="reconcile")
            self._written.setdefault(ftj.uid, {}).update(patch)
            self._last_write[ftj.uid] = self.clock.time()
        phase = outcome.status.get("phase")
        metrics.set_phase(namespace=namespace, name=name, phase=phase)
        if phase != previous.get("phase") and phase in status.TERMINAL:
            duration = None
            created = status.parse_time(ftj.created)
            if created is not None:
                duration = (datetime.datetime.now(datetime.UTC) - created).total_seconds()
            metrics.job_finished(
                namespace=namespace,
                name=name,
                phase=str(phase),
                reason=None if phase == "Succeeded" else outcome.status.get("reason"),
                duration_s=duration,
            )
        for event in outcome.events:
            self.actions.post_event(namespace=namespace, name=name, uid=ftj.uid, event=event)
        if phase in status.TERMINAL:
            self._finish(key, ftj.uid)
            await self._expire(key, ftj, {**previous, **outcome.status}, now=datetime.datetime.now(datetime.UTC))

    def _finish(self, key: Key, uid: str) -> None:
        if uid in self._finished:
            return
        self._finished.add(uid)
        if self.hub is not None:
            self.hub.finish(namespace=key[0], name=key[1])

    def forget(self, key: Key, uid: str) -> None:
        """The FineTuneJob is gone: drop its memory, its hub state and its metric series.

        A reconcile of it in flight finishes first; what that pass recorded is dropped again
        after it (`engine.Engine.forget`).
        """

        def drop() -> None:
            for table in (
                self._counted, self._written, self._last_write, self._parsed, self._created, self._expired,
                self._active_sent,
            ):  # fmt: skip
                table.pop(uid, None)
            self._waits.pop(key, None)
            self._registered.discard(uid)
            self._announced.discard(uid)
            self._finished.discard(uid)
            if self.hub is not None:
                self.hub.forget(namespace=key[0], name=key[1])
            metrics.set_phase(namespace=key[0], name=key[1], phase=None)
            metrics.forget_job(namespace=key[0], name=key[1])

        self.engine.forget(key, cleanup=drop)

    async def close(self) -> None:
        """Stops the engine's workers and timers, the progress hub and the API client."""
        await self.engine.close()
        if self.hub is not None:
            await self.hub.stop()
        await self.client.close()


class WatchOnlyDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """Kopf's annotation diff-base storage, minus the per-event deep copy of every body.

    Kopf builds an object's "essence" (a deep copy of it) on every event to detect changes
    for on.create/on.update handlers. This operator registers none (only indexes and
    on.event), so the essence is never read; building it was a third of the operator's CPU.
    """

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        return {}


def make_memo(*, config: config_mod.OperatorConfig) -> kopf.Memo:
    """Kopf's operator-wide memo for `kopf.run(memo=...)`: the configuration the startup handler reads."""
    return kopf.Memo(config=config)


def operator_of(memo: Any) -> Operator:
    """The Operator the startup handler put into Kopf's memo (each object's memo is a copy of it)."""
    op = memo.get("operator")
    if not isinstance(op, Operator):
        raise RuntimeError("no Operator in Kopf's memo: the startup handler has not run")
    return op


# ----- Kopf registrations -----


@kopf.on.login()
async def login(memo: kopf.Memo, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """Kopf's login and re-login (after a 401 of its own): the kubeconfig or in-cluster token,
    read again each time (a rotated token file is picked up); our client swaps to it and
    closes its old session. The client re-logs in the same way after a 401 of its own.
    Kopf runs it after the startup handlers, so the Operator is in the memo."""

    async def fresh() -> kopf.ConnectionInfo | None:
        return await asyncio.to_thread(kopf.login_via_client, **kwargs)

    info = await fresh()
    if info is not None:
        await operator_of(memo).client.connect(info=info, relogin=fresh)
    return info


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Kopf's settings, the Operator (into the memo, unless one is there), the progress hub and metrics."""
    if not isinstance(memo.get("operator"), Operator):
        memo.operator = Operator(config=memo.get("config"))
    op = operator_of(memo)
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=config_mod.PREFIX)
    settings.persistence.diffbase_storage = WatchOnlyDiffBaseStorage(
        prefix=config_mod.PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{config_mod.PREFIX}/finalizer"
    settings.posting.enabled = False  # the operator posts its own, meaningful events
    settings.scanning.disabled = True  # no CRD/namespace watching: needs no RBAC for them
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.error_backoffs = [1, 2, 5, 10]
    # Server-side filtering: only the operator's own Jobs and pods ever reach this process.
    selector = ",".join(f"{k}={v}" for k, v in MANAGED.items())
    settings.watching.label_selectors["batch", "v1", "jobs"] = selector
    settings.watching.label_selectors["", "v1", "pods"] = selector
    settings.watching.label_selectors[JOBSET_GROUP, JOBSET_VERSION, "jobsets"] = selector
    settings.batching.idle_timeout = 1.0  # per-object workers (and their queues) go away sooner: less memory
    if op.config.peering:
        settings.peering.name = op.config.peering
        settings.peering.mandatory = True
        settings.peering.clusterwide = not op.config.namespaces
    from finetune_operator import progress

    hub = progress.ProgressHub(
        patch_status=op.actions.patch_status,
        authenticate=tokens.TokenChecker(client=op.client),
        resolve=op.actions.resolve_job,
    )
    port = await hub.start(host=op.config.progress_host, port=op.config.progress_port)

    op.hub = hub
    metrics_port = metrics.start_metrics_server(host=op.config.metrics_host, port=op.config.metrics_port)
    logger.info(
        "finetune-operator: progress endpoint on port %s (advertised %s), metrics on port %s",
        port,
        op.config.progress_url or "-",
        metrics_port,
    )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    op = memo.get("operator")
    if isinstance(op, Operator):
        await op.close()


@kopf.index(GROUP, VERSION, PLURAL)
async def ftj_index(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Key, FtjView]:
    return {(namespace or "", name): ftj_view(body)}


@kopf.index("batch", "v1", "jobs", labels=MANAGED)
async def job_index(
    namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[Key, tuple[str, status.JobView]]:
    return {(namespace or "", name): (actions.controller_uid(body), status.job_view(body))}


# JobSets of multi-worker jobs, like Jobs. Without JobSet's CRD Kopf serves nothing here (one warning
# at start) and single-worker jobs run as before.
@kopf.index(JOBSET_GROUP, JOBSET_VERSION, "jobsets", labels=MANAGED)
async def jobset_index(
    namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[Key, tuple[str, status.JobView]]:
    return {(namespace or "", name): (actions.controller_uid(body), status.jobset_view(body))}


@kopf.index("", "v1", "pods", labels={**MANAGED, builders.JOB_NAME_LABEL: kopf.PRESENT})
async def pod_index(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Key, tuple[str, status.PodView]]:
    # A JobSet's worker: keyed by its JobSet (its controller, the child Job, is recreated on each group restart).
    owner = str(labels.get(JOBSET_UID_LABEL) or "") or actions.controller_uid(body)
    return {(namespace or "", labels[builders.JOB_NAME_LABEL]): (owner, status.pod_view(body))}


def _workload_job(body: Mapping[str, Any]) -> tuple[str, str] | None:
    """(name, uid) of the batch Job or JobSet a Kueue Workload belongs to (its controller ownerReference)."""
    for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
        owned = (ref.get("kind"), ref.get("apiVersion"))
        if ref.get("controller") and owned in (("Job", "batch/v1"), ("JobSet", f"{JOBSET_GROUP}/{JOBSET_VERSION}")):
            return str(ref.get("name", "")), str(ref.get("uid", ""))
    return None


# Kueue's Workloads, watched (in the operator's namespaces) rather than read when the Job changes:
# what Kueue decides shows on the Workload first (a changed QuotaReserved message, an inactive
# Workload) and often never on the Job, so reading it on Job events would miss it or need polling;
# one watch costs no request per job. Without Kueue's CRDs Kopf serves nothing here (one warning at
# start) and everything else runs as before.
@kopf.index(KUEUE_GROUP, KUEUE_VERSION, "workloads")
async def workload_index(
    namespace: str | None, body: kopf.Body, **_: Any
) -> dict[Key, tuple[str, status.WorkloadView]] | None:
    job = _workload_job(body)
    if job is None:
        return None
    return {(namespace or "", job[0]): (job[1], status.workload_view(body))}


@kopf.on.event(GROUP, VERSION, PLURAL)
async def ftj_event(
    event: kopf.RawEvent, namespace: str | None, name: str, uid: str, memo: kopf.Memo, **kwargs: Any
) -> None:
    op = operator_of(memo)
    op.capture(kwargs)
    if event.get("type") == "DELETED":
        op.forget((namespace or "", name), uid)
        return
    op.enqueue((namespace or "", name))


@kopf.on.event("batch", "v1", "jobs", labels={**MANAGED, builders.JOB_NAME_LABEL: kopf.PRESENT})
async def job_event(namespace: str | None, labels: kopf.Labels, memo: kopf.Memo, **kwargs: Any) -> None:
    op = operator_of(memo)
    op.capture(kwargs)
    op.enqueue((namespace or "", labels[builders.JOB_NAME_LABEL]))


@kopf.on.event(JOBSET_GROUP, JOBSET_VERSION, "jobsets", labels={**MANAGED, builders.JOB_NAME_LABEL: kopf.PRESENT})
async def jobset_event(namespace: str | None, labels: kopf.Labels, memo: kopf.Memo, **kwargs: Any) -> None:
    op = operator_of(memo)
    op.capture(kwargs)
    op.enqueue((namespace or "", labels[builders.JOB_NAME_LABEL]))


@kopf.on.event("", "v1", "pods", labels={**MANAGED, builders.JOB_NAME_LABEL: kopf.PRESENT})
async def pod_event(namespace: str | None, labels: kopf.Labels, memo: kopf.Memo, **kwargs: Any) -> None:
    op = operator_of(memo)
    op.capture(kwargs)
    op.enqueue((namespace or "", labels[builders.JOB_NAME_LABEL]))


@kopf.on.event(KUEUE_GROUP, KUEUE_VERSION, "workloads")
async def workload_event(namespace: str | None, body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    job = _workload_job(body)
    if job is None:
        return
    op = operator_of(memo)
    op.capture(kwargs)
    op.enqueue((namespace or "", job[0]))
