"""The operator's own Kubernetes API calls, apart from Kopf's watches.

`KubeActions` makes every write the reconciler and the progress hub need (the ConfigMap and
Job of a FineTuneJob, suspend and resume, status merge patches, events) and the few reads
(adopting a Job after a conflict, the FailedCreate event of a Job that makes no pod, a
FineTuneJob a standby replica does not know), all through one pooled `kube.KubeClient`.
`handlers` decides what to write and when; this module knows how.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from finetune_operator import api, builders, kube, metrics, settings, status

if TYPE_CHECKING:
    from finetune_operator.progress import Registration

__all__ = ["KubeActions", "controller_uid"]

logger = logging.getLogger("finetune_operator")

GROUP, VERSION, PLURAL = api.API_GROUP, api.API_VERSION, api.PLURAL


def controller_uid(body: Mapping[str, Any]) -> str:
    """The uid of the object's controller (its ownerReference with `controller: true`), or ""."""
    for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid", ""))
    return ""


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
    ) -> status.JobView | str:
        """Creates (or adopts) the ConfigMap and the Job; returns the Job, or a refusal."""
        ns = owner.namespace
        manifest = builders.build_job(
            owner=owner,
            spec=parsed,
            default_image=config.trainer_image,
            progress_url=config.progress_url,
            trainer_command=config.trainer_command,
            run_as_user=config.run_as_user,
        )
        # The ConfigMap first, so that the Job's pod finds it.
        await self._create_or_exists(
            f"/api/v1/namespaces/{ns}/configmaps", builders.build_config_map(owner=owner, spec=spec)
        )
        path = f"/apis/batch/v1/namespaces/{ns}/jobs"
        try:
            body = await self.client.create(path, manifest)
        except kube.ApiError as exc:
            if exc.status == 409:
                body = await self.client.get(f"{path}/{owner.name}")
                if controller_uid(body) != owner.uid:
                    return f"a batch Job named {owner.name} already exists and is not owned by this FineTuneJob"
                logger.info("adopted the existing Job %s/%s", ns, owner.name)
                return status.job_view(body)
            if exc.status in (400, 422):
                return f"the batch Job was refused: {exc.message}"
            raise
        metrics.job_created(namespace=ns)
        self.post_event(
            namespace=ns,
            name=owner.name,
            uid=owner.uid,
            event=status.Event("Normal", "JobCreated", f"created batch Job {owner.name}"),
        )
        return status.job_view(body)

    async def _create_or_exists(self, path: str, body: Mapping[str, Any]) -> None:
        """Creates the object, unless it exists already (made by an earlier run of the operator)."""
        try:
            await self.client.create(path, body)
        except kube.ApiError as exc:
            if exc.status != 409:
                raise

    async def creation_failure(self, *, owner: builders.Owner) -> str | None:
        """The message of the newest FailedCreate event of the job's batch Job (the Job controller's reason)."""
        selector = f"involvedObject.kind=Job,involvedObject.name={owner.name},reason=FailedCreate"
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

    async def patch_job(self, *, owner: builders.Owner, suspend: bool) -> None:
        await self.client.merge_patch(
            f"/apis/batch/v1/namespaces/{owner.namespace}/jobs/{owner.name}", {"spec": {"suspend": suspend}}
        )

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

    def post_event(self, *, namespace: str, name: str, uid: str, event: status.Event) -> None:
        """Posts a core/v1 Event on the FineTuneJob, in the background (an event never blocks a reconcile)."""
        stamp = status.rfc3339(datetime.datetime.now(datetime.UTC))
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{name}.", "namespace": namespace},
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
            except Exception as exc:
                logger.warning("could not post event %s on %s/%s: %s", event.reason, namespace, name, exc)

        task = asyncio.get_running_loop().create_task(send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
