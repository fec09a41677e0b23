"""The operator's own Kubernetes API calls, apart from Kopf's watches.

`KubeActions` makes every write the reconciler and the progress hub need (the Job of a
FineTuneJob, suspend and resume, deleting a Job once its time is up or when an earlier
FineTuneJob of the same name left it, status merge patches, events) and the few reads (what
stands in the way of a new Job, the FailedCreate event of a Job that makes no pod, a
FineTuneJob a standby replica does not know), all through one pooled `kube.KubeClient`.
Kueue-managed jobs: the Job's `spec.suspend` is Kueue's, so suspend and resume set `spec.active`
of its Workload instead (`set_workload_active`). `handlers` decides what to write and when;
this module knows how.

Deletes always carry a precondition on the Job's uid: the operator only ever deletes the very
Job it looked at, never a newer one that took its name meanwhile.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from finetune_operator import api, builders, kube, metrics, settings, status

if TYPE_CHECKING:
    from finetune_operator.progress import Registration

__all__ = [
    "Conflict",
    "KubeActions",
    "Obstacle",
    "Refused",
    "Standing",
    "VolumeCheck",
    "collection",
    "controller_uid",
    "kind_of",
    "output_claim",
    "standing",
]

logger = logging.getLogger("finetune_operator")

GROUP, VERSION, PLURAL = api.API_GROUP, api.API_VERSION, api.PLURAL
KUEUE_GROUP, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta1"
JOBSET_GROUP, JOBSET_VERSION = builders.JOBSET_GROUP, builders.JOBSET_VERSION
Kind = Literal["Job", "JobSet"]


def collection(*, namespace: str, kind: Kind) -> str:
    """The API path of a namespace's Jobs or JobSets."""
    if kind == "JobSet":
        return f"/apis/{JOBSET_GROUP}/{JOBSET_VERSION}/namespaces/{namespace}/jobsets"
    return f"/apis/batch/v1/namespaces/{namespace}/jobs"


def kind_of(parsed: api.FineTuneJobSpec | None) -> Kind:
    """A JobSet for runtime.workers > 1, else a batch Job."""
    return "JobSet" if parsed is not None and parsed.runtime.workers > 1 else "Job"


def output_claim(spec: api.FineTuneJobSpec) -> tuple[str | None, str | None]:
    """(claim name, refusal): the PersistentVolumeClaim that holds output.path, or why none can.

    Every worker of a multi-worker job must see the chief's output path (BackupAndRestore's
    checkpoints, which the other workers copy when the group restarts), so it must lie on a
    volume mounted from a PersistentVolumeClaim (its access modes are checked by the caller).
    """
    out = spec.output.path.rstrip("/") or "/"
    mounts = [
        m for m in spec.runtime.volume_mounts
        if out == str(m.get("mountPath", "")).rstrip("/") or out.startswith(str(m.get("mountPath", "")).rstrip("/") + "/")
    ]  # fmt: skip
    if not mounts:
        return None, (
            f"spec.output.path: {out} is on no volume of spec.runtime.volumeMounts; with runtime.workers > 1 "
            "every worker must see it: mount a ReadWriteMany PersistentVolumeClaim there"
        )
    mount = max(mounts, key=lambda m: len(str(m.get("mountPath", ""))))
    name = str(mount.get("name", ""))
    volume = next((v for v in spec.runtime.volumes if v.get("name") == name), None)
    claim = (volume or {}).get("persistentVolumeClaim") or {}
    if not claim.get("claimName"):
        what = next((k for k in (volume or {}) if k != "name"), "no volume")
        return None, (
            f"spec.output.path: {out} is on volume {name} ({what}), which the workers do not share; with "
            "runtime.workers > 1 it must be a ReadWriteMany PersistentVolumeClaim"
        )
    if mount.get("readOnly") or claim.get("readOnly"):
        return None, f"spec.output.path: {out} is on volume {name}, mounted read-only"
    return str(claim["claimName"]), None


@dataclass(frozen=True)
class VolumeCheck:
    """What `KubeActions.check_output_volume` found: ok, refuse (InvalidSpec) or wait (the claim is missing)."""

    kind: Literal["ok", "refuse", "wait"]
    message: str = ""


def controller_uid(body: Mapping[str, Any]) -> str:
    """The uid of the object's controller (its ownerReference with `controller: true`), or ""."""
    for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid", ""))
    return ""


def _controller(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return dict(ref)
    return None


Standing = Literal["ours", "stale", "going", "foreign"]


def standing(body: Mapping[str, Any], *, owner: builders.Owner) -> Standing:
    """How a Job named like the FineTuneJob stands towards it.

    - `ours`: its controller is this FineTuneJob (same uid): adopt it.
    - `going`: someone else's, already being deleted: wait for it to go.
    - `stale`: its controller is a FineTuneJob of this very name but another uid. Names are
      unique, so that FineTuneJob no longer exists (deleted and created again): the garbage
      collector will delete the Job; the operator may delete it right away.
    - `foreign`: anything else (no controller, another kind, another name): a real conflict.
    """
    ref = _controller(body)
    if ref is not None and str(ref.get("uid", "")) == owner.uid:
        return "ours"
    if (body.get("metadata") or {}).get("deletionTimestamp"):
        return "going"
    if (
        ref is not None
        and str(ref.get("apiVersion", "")).split("/", 1)[0] == api.API_GROUP
        and ref.get("kind") == api.KIND
        and ref.get("name") == owner.name
    ):
        return "stale"
    return "foreign"


def _describe_owner(body: Mapping[str, Any]) -> str:
    ref = _controller(body)
    if ref is None:
        return "it has no controller"
    return f"its controller is {ref.get('kind')} {ref.get('name')} (uid {ref.get('uid')})"


@dataclass(frozen=True)
class Refused:
    """The API server refused the Job for good (400, 413, 422): the job fails with this message."""

    message: str


@dataclass(frozen=True)
class Conflict:
    """A Job of that name exists and is not this FineTuneJob's (409)."""


@dataclass(frozen=True)
class Obstacle:
    """What `KubeActions.obstacle` found where a FineTuneJob's Job must go."""

    kind: Literal["clear", "adopt", "wait", "conflict"]
    why: str = ""
    job: status.JobView | None = None  # with `adopt`


class KubeActions:
    """The operator's API writes and reads, on one client (see the module doc)."""

    def __init__(self, *, client: kube.KubeClient) -> None:
        self.client = client
        self._host = socket.gethostname()
        self._tasks: set[asyncio.Task[None]] = set()

    async def create_job(
        self,
        *,
        owner: builders.Owner,
        spec: Mapping[str, Any],
        parsed: api.FineTuneJobSpec,
        config: settings.OperatorConfig,
    ) -> status.JobView | Refused | Conflict:
        """Creates the Job (or adopts it, when an earlier run of the operator made it).

        `Conflict` when a Job of that name belongs to something else (see `standing`),
        `Refused` when the API server will never take it.
        """
        ns = owner.namespace
        kind = kind_of(parsed)
        build = builders.build_jobset if kind == "JobSet" else builders.build_job
        view = status.jobset_view if kind == "JobSet" else status.job_view
        pod = builders.TrainerPod(
            owner=owner,
            spec=parsed,
            default_image=config.trainer_image,
            progress_url=config.progress_url,
            trainer_command=config.trainer_command,
            run_as_user=config.run_as_user,
            raw_spec=spec,
        )
        manifest = build(pod=pod)
        path = collection(namespace=ns, kind=kind)
        try:
            body = await self.client.create(path, manifest)
        except kube.ApiError as exc:
            if exc.status == 409:
                try:
                    body = await self.client.get(f"{path}/{owner.name}")
                except kube.ApiError as again:
                    if again.status == 404:
                        return Conflict()  # gone meanwhile: the caller looks again
                    raise
                if standing(body, owner=owner) != "ours":
                    return Conflict()
                logger.info("adopted the existing %s %s/%s", kind, ns, owner.name)
                return view(body)
            if exc.status in (400, 403, 413, 422) and (exc.status != 403 or "admission webhook" in exc.message):
                # 403 from an admission webhook: JobSet's validation refused it.
                return Refused(f"the {'JobSet' if kind == 'JobSet' else 'batch Job'} was refused: {exc.message}")
            if exc.status == 404 and kind == "JobSet":
                return Refused(
                    "runtime.workers > 1 needs JobSet (jobset.x-k8s.io/v1alpha2, v0.10 or later), "
                    "which this cluster does not serve"
                )
            raise
        metrics.job_created(namespace=ns)
        self.post_job_created(owner=owner, kind=kind)
        return view(body)

    async def check_output_volume(self, *, namespace: str, parsed: api.FineTuneJobSpec) -> VolumeCheck:
        """Whether the output path of a multi-worker job is on a ReadWriteMany claim every worker mounts.

        Refused (InvalidSpec) when it is not on a PersistentVolumeClaim or the claim's access
        modes lack ReadWriteMany; `wait` while the claim does not exist (it is often applied
        together with the FineTuneJob; the pending timeout bounds the wait).
        """
        claim, refusal = output_claim(parsed)
        if refusal is not None or claim is None:
            return VolumeCheck("refuse", refusal or "")
        try:
            body = await self.client.get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
        except kube.ApiError as exc:
            if exc.status == 404:
                return VolumeCheck("wait", f"waiting for PersistentVolumeClaim {claim} (it holds spec.output.path)")
            raise
        modes = {*((body.get("spec") or {}).get("accessModes") or []), *((body.get("status") or {}).get("accessModes") or [])}
        if "ReadWriteMany" not in modes:
            return VolumeCheck("refuse", (
                f"spec.output.path is on PersistentVolumeClaim {claim}, whose access modes "
                f"({', '.join(sorted(modes)) or 'none'}) lack ReadWriteMany: with runtime.workers > 1 every "
                "worker mounts it (the chief's checkpoints are read by all)"
            ))  # fmt: skip
        return VolumeCheck("ok")

    def post_job_created(self, *, owner: builders.Owner, kind: Kind = "Job") -> None:
        """The JobCreated event, under a name fixed by the FineTuneJob's uid: posted twice, it exists once."""
        what = "JobSet" if kind == "JobSet" else "batch Job"
        self.post_event(
            namespace=owner.namespace,
            name=owner.name,
            uid=owner.uid,
            event=status.Event("Normal", "JobCreated", f"created {what} {owner.name}"),
            event_name=f"{owner.name}.jobcreated.{owner.uid}",
        )

    async def obstacle(self, *, owner: builders.Owner, kind: Kind = "Job") -> Obstacle:
        """What, read from the API (not the watch caches), stands where the job's Job must go.

        `adopt` (with the Job) when the Job is this FineTuneJob's; `conflict` when a Job of
        that name is someone else's; `wait` while a Job or a live pod of an earlier
        FineTuneJob of this name is still there (a stale Job is deleted on the way, its pods
        follow it through the garbage collector); `clear` when nothing is.
        """
        ns, name = owner.namespace, owner.name
        try:
            body: dict[str, Any] | None = await self.client.get(f"{collection(namespace=ns, kind=kind)}/{name}")
        except kube.ApiError as exc:
            if exc.status != 404:
                raise
            body = None
        if body is not None:
            state = standing(body, owner=owner)
            if state == "ours":
                return Obstacle("adopt", job=(status.jobset_view if kind == "JobSet" else status.job_view)(body))
            if state == "foreign":
                return Obstacle("conflict", (
                    f"a batch Job named {name} already exists and is not owned by this FineTuneJob "
                    f"({_describe_owner(body)}); delete it or rename the FineTuneJob"
                ))  # fmt: skip
            uid = str((body.get("metadata") or {}).get("uid", ""))
            if state == "stale":
                await self.delete_job(namespace=ns, name=name, uid=uid, kind=kind)
            return Obstacle(
                "wait", f"waiting for batch Job {name} (uid {uid}) of an earlier FineTuneJob of this name to be deleted"
            )
        selector = f"{builders.JOB_NAME_LABEL}={name},app.kubernetes.io/managed-by={builders.MANAGED_BY}"
        pods = await self.client.request("GET", f"/api/v1/namespaces/{ns}/pods", params={"labelSelector": selector})
        live = sorted(
            str((p.get("metadata") or {}).get("name", ""))
            for p in pods.get("items") or []
            if isinstance(p, dict) and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        )
        if live:
            return Obstacle("wait", f"waiting for pod {live[0]} of an earlier FineTuneJob of this name to stop")
        return Obstacle("clear")

    async def delete_job(self, *, namespace: str, name: str, uid: str, kind: Kind = "Job") -> None:
        """Deletes exactly this Job (precondition on its uid); its pods go through the garbage collector.

        A Job already gone, or replaced by another of the same name, is left alone.
        """
        options = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "propagationPolicy": "Background",
            "preconditions": {"uid": uid},
        }
        try:
            await self.client.request("DELETE", f"{collection(namespace=namespace, kind=kind)}/{name}", body=options)
        except kube.ApiError as exc:
            if exc.status not in (404, 409):
                raise
            return
        logger.info("deleted %s %s/%s (uid %s)", kind, namespace, name, uid)

    async def creation_failure(self, *, owner: builders.Owner, job_name: str | None = None) -> str | None:
        """The message of the newest FailedCreate event of the job's batch Job (the Job controller's reason).

        `job_name`: that Job's name when it is not the FineTuneJob's (a JobSet's child Job).
        """
        selector = f"involvedObject.kind=Job,involvedObject.name={job_name or owner.name},reason=FailedCreate"
        try:
            body = await self.client.request(
                "GET", f"/api/v1/namespaces/{owner.namespace}/events", params={"fieldSelector": selector}
            )
        except kube.ApiError as exc:
            logger.warning("could not list the events of Job %s/%s: %s", owner.namespace, owner.name, exc)
            return None
        items = [e for e in body.get("items") or [] if isinstance(e, dict)]
        if not items:
            return None

        def stamp(event: Mapping[str, Any]) -> str:
            return str(
                event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp")
                or (event.get("metadata") or {}).get("creationTimestamp") or ""
            )

        newest = max(items, key=stamp)
        return str(newest.get("message") or "") or None

    async def patch_job(self, *, owner: builders.Owner, suspend: bool, kind: Kind = "Job") -> None:
        """spec.suspend of the job's Job or JobSet (a JobSet suspends its child Jobs itself)."""
        await self.client.merge_patch(
            f"{collection(namespace=owner.namespace, kind=kind)}/{owner.name}", {"spec": {"suspend": suspend}}
        )

    async def set_workload_active(self, *, namespace: str, name: str, active: bool) -> bool:
        """`spec.active` of a Kueue Workload (what `spec.suspend` of a Kueue-managed job writes).

        False when the Workload is gone (404): the caller looks again on its next event.
        """
        try:
            await self.client.merge_patch(
                f"/apis/{KUEUE_GROUP}/{KUEUE_VERSION}/namespaces/{namespace}/workloads/{name}",
                {"spec": {"active": active}},
            )
        except kube.ApiError as exc:
            if exc.status == 404:
                return False
            raise
        logger.info("%s Workload %s/%s", "activated" if active else "deactivated", namespace, name)
        return True

    async def kueue_served(self) -> bool:
        """Whether the cluster serves Kueue's Workload API (API discovery: open to every user)."""
        try:
            body = await self.client.get(f"/apis/{KUEUE_GROUP}/{KUEUE_VERSION}")
        except kube.ApiError as exc:
            if exc.status in (404, 503):
                return False
            raise
        return any(r.get("name") == "workloads" for r in body.get("resources") or [] if isinstance(r, Mapping))

    async def patch_status(
        self, *, namespace: str, name: str, status: dict[str, Any], source: str = "progress"
    ) -> None:
        """JSON merge patch of a FineTuneJob's status subresource (the progress hub calls it too)."""
        await self.client.merge_patch(
            f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status", {"status": status}
        )
        metrics.status_write(source=source)

    async def resolve_job(self, *, namespace: str, name: str) -> Registration | None:
        """A job's progress credentials read from the API, for a report this replica's hub does not know.

        With several replicas only the active one reconciles (and registers) jobs, but reports
        reach every replica. None when the FineTuneJob is gone, being deleted, finished or
        refused.
        """
        from finetune_operator.progress import Registration, stage_plan

        try:
            body = await self.client.get(f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}")
            meta = body.get("metadata") or {}
            uid = str(meta.get("uid") or "")
            if not uid or meta.get("deletionTimestamp"):
                return None
            if (body.get("status") or {}).get("phase") in status.TERMINAL:
                return None
        except kube.ApiError as exc:
            if exc.status == 404:
                return None
            raise
        parsed, _ = api.operator_refusal(name=name, spec=body.get("spec") or {})
        if parsed is None:
            return None
        return Registration(
            uid=uid, total_epochs=parsed.training.total_epochs, stage_epochs=stage_plan(parsed.training)
        )

    def post_event(
        self, *, namespace: str, name: str, uid: str, event: status.Event, event_name: str | None = None
    ) -> None:
        """Posts a core/v1 Event on the FineTuneJob, in the background (an event never blocks a reconcile).

        With `event_name` the Event has that name, and one that exists already (409) counts as posted.
        """
        stamp = status.rfc3339(datetime.datetime.now(datetime.UTC))
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": (
                {"name": event_name, "namespace": namespace}
                if event_name
                else {"generateName": f"{name}.", "namespace": namespace}
            ),
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": api.KIND,
                "name": name,
                "namespace": namespace,
                "uid": uid,
            },
            "type": event.type,
            "reason": event.reason,
            "message": event.message[:1024],
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
            "source": {"component": "finetune-operator"},
            "reportingComponent": "finetune.dev/operator",
            "reportingInstance": self._host,
        }

        async def send() -> None:
            try:
                await self.client.create(f"/api/v1/namespaces/{namespace}/events", body)
            except kube.ApiError as exc:
                if not (event_name and exc.status == 409):
                    logger.warning("could not post event %s on %s/%s: %s", event.reason, namespace, name, exc)
            except Exception as exc:
                logger.warning("could not post event %s on %s/%s: %s", event.reason, namespace, name, exc)

        task = asyncio.get_running_loop().create_task(send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
