"""Pod status as a kubelet writes it: phase, container statuses, the status patch."""

from __future__ import annotations

import json

from finetune_testbed.podrunner.common import STRATEGIC, Obj, now_rfc3339
from finetune_testbed.podrunner.state import ContainerRun, PodRun
from finetune_testbed.podrunner.volumes import Volumes


class PodStatus(Volumes):
    """Pod status as a kubelet writes it: phase, container statuses, the status patch."""

    def phase(self, run: PodRun) -> str:
        if run.stage == "done" or run.terminating:
            everything = run.init + run.main
            if any(c.exit_code not in (0, None) for c in everything) or any(c.exit_code is None for c in run.main):
                return "Failed"
            return "Succeeded"
        if run.stage == "main" and any(c.started_at for c in run.main):
            return "Running"
        return "Pending"

    @staticmethod
    def terminated_state(c: ContainerRun) -> Obj:
        term: Obj = {
            "exitCode": c.exit_code if c.exit_code is not None else 137,
            "reason": c.reason or "Error",
            "startedAt": c.started_at,
            "finishedAt": c.finished_at or now_rfc3339(),
        }
        if c.message:
            term["message"] = c.message
        if c.container_id:
            term["containerID"] = c.container_id
        return term

    def container_status(self, c: ContainerRun, *, uid: str) -> Obj:
        st: Obj = {
            "name": c.name,
            "image": c.spec.get("image", ""),
            "imageID": c.image_id,
            "restartCount": c.restart_count,
            "ready": False,
            "started": False,
        }
        if c.container_id:
            st["containerID"] = c.container_id
        if c.proc is not None:
            st["state"] = {"running": {"startedAt": c.started_at}}
            st["ready"] = st["started"] = True
        elif c.waiting is not None:
            st["state"] = {"waiting": {"reason": c.waiting[0], "message": c.waiting[1]}}
        elif c.exit_code is not None:
            st["state"] = {"terminated": self.terminated_state(c)}
        else:
            st["state"] = {"waiting": {"reason": "PodInitializing" if c.started_at is None else "ContainerCreating"}}
        if c.last_terminated is not None:
            st["lastState"] = {"terminated": c.last_terminated}
        return st

    def pod_status_base(
        self, *, phase: str, start_time: str, ready: bool, initialized: bool, completed: bool = False
    ) -> Obj:
        now = now_rfc3339()

        def cond(type_: str, ok: bool, reason: str | None = None) -> Obj:
            out: Obj = {"type": type_, "status": "True" if ok else "False", "lastTransitionTime": now}
            if reason and not ok:
                out["reason"] = reason
            return out

        why = "PodCompleted" if completed else "ContainersNotReady"
        return {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": start_time,
            "conditions": [
                cond("PodReadyToStartContainers", not completed),
                cond("Initialized", initialized, "ContainersNotInitialized"),
                cond("Ready", ready, why),
                cond("ContainersReady", ready, why),
                cond("PodScheduled", True),
            ],
        }

    def write_status(self, run: PodRun) -> None:
        phase = self.phase(run)
        ready = phase == "Running" and all(c.proc is not None for c in run.main)
        status = self.pod_status_base(
            phase=phase,
            start_time=run.start_time,
            ready=ready,
            initialized=run.stage != "init",
            completed=phase in ("Succeeded", "Failed"),
        )
        if self.net is not None:  # netns: no podIP until the pod has its address (lists merge by ip)
            status["hostIP"], status["hostIPs"] = self.host_ip(), [{"ip": self.host_ip()}]
            del status["podIP"], status["podIPs"]
            if run.address is not None:
                status["podIP"], status["podIPs"] = run.address.ip, [{"ip": run.address.ip}]
        status["containerStatuses"] = [self.container_status(c, uid=run.uid) for c in run.main]
        if run.init:
            status["initContainerStatuses"] = [self.container_status(c, uid=run.uid) for c in run.init]
        fingerprint = json.dumps(
            [phase, ready, status.get("podIP"),
             [(s["state"], s["restartCount"], s.get("containerID")) for s in status["containerStatuses"]],
             status.get("initContainerStatuses")],
            sort_keys=True,
        )
        if fingerprint == run.last_written:
            return
        run.last_written = fingerprint
        ns, name = run.namespace, run.name
        self.writers.submit(run.uid, lambda: self._patch_status(ns, name, status))

    def _patch_status(self, ns: str, name: str, status: Obj) -> None:
        self.api.request(
            "PATCH", f"/api/v1/namespaces/{ns}/pods/{name}/status", body={"status": status}, content_type=STRATEGIC
        )
