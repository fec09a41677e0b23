"""The runner: the node (registration, Lease and Ready heartbeats), the pod watch, scheduling (binding, claims), the loop."""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import subprocess
import threading
import time

from finetune_testbed.podrunner.api import ApiError
from finetune_testbed.podrunner.common import MERGE, STRATEGIC, Obj, is_terminal, log, now_micro, now_rfc3339
from finetune_testbed.podrunner.scheduling import node_body, node_status, unschedulable_reason
from finetune_testbed.podrunner.simulated import Simulated


class PodRunner(Simulated):
    """Watches pods, binds and runs them, writes their status; see the package docstring."""

    def register_node(self) -> None:
        self.api.request("POST", "/api/v1/nodes", body=node_body(name=self.node, labels=self.labels), ok=(409,))
        self.api.request(
            "PATCH", f"/api/v1/nodes/{self.node}", body={"metadata": {"labels": self.labels}}, content_type=MERGE
        )
        self.heartbeat()

    def heartbeat(self) -> None:
        status = node_status(
            capacity=self.capacity, heartbeat=now_rfc3339(), started=self.started, kubelet_port=self.kubelet_port,
            runtime=self.runtime_version,
        )
        self.api.request("PATCH", f"/api/v1/nodes/{self.node}/status", body={"status": status}, content_type=STRATEGIC)
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node}"
        spec = {"holderIdentity": self.node, "leaseDurationSeconds": 40, "renewTime": now_micro()}
        got = self.api.request("PATCH", path, body={"spec": spec}, content_type=MERGE, ok=(404,))
        if got["_status"] == 404:
            node = self.api.request("GET", f"/api/v1/nodes/{self.node}")
            lease = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": self.node,
                    "namespace": "kube-node-lease",
                    "ownerReferences": [
                        {"apiVersion": "v1", "kind": "Node", "name": self.node, "uid": node["metadata"]["uid"]}
                    ],
                },
                "spec": spec,
            }
            self.api.request(
                "POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", body=lease, ok=(409,)
            )

    def heartbeat_loop(self) -> None:
        while not self.stop.wait(10.0):
            try:
                self.heartbeat()
            except Exception as err:
                log.warning("heartbeat failed: %s", err)

    def watch_loop(self) -> None:
        rv = ""
        while not self.stop.is_set():
            try:
                if not rv:
                    listing = self.api.request("GET", "/api/v1/pods", timeout=120)
                    rv = listing["metadata"]["resourceVersion"]
                    seen = {p["metadata"]["uid"] for p in listing.get("items", [])}
                    self.events.put(("resync", {"uids": seen}))
                    for pod in listing.get("items", []):
                        self.events.put(("sync", pod))
                    self.events.put(("synced", {}))
                for event in self.api.watch_pods(resource_version=rv):
                    if self.stop.is_set():
                        return
                    kind, obj = event.get("type"), event.get("raw_object", {})
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    if kind == "BOOKMARK":
                        continue
                    self.events.put(("deleted" if kind == "DELETED" else "sync", obj))
            except ApiError as err:
                if err.status == 410:
                    rv = ""
                else:
                    log.warning("watch: %s", err)
                    self.stop.wait(1.0)
            except Exception as err:
                log.warning("watch: %s", err)
                rv = ""
                self.stop.wait(1.0)

    def run(self) -> None:
        for attempt in range(60):
            try:
                self.register_node()
                break
            except Exception as err:  # the API server may still be starting
                if attempt == 59:
                    raise
                log.warning("registering node %s: %s", self.node, err)
                self.stop.wait(1.0)
        threading.Thread(target=self.heartbeat_loop, name="heartbeat", daemon=True).start()
        threading.Thread(target=self.watch_loop, name="watch", daemon=True).start()
        if self.podman is not None:
            for name in self.podman.ours():  # left by a pod runner that was killed: their pods failed
                log.info("removing container %s, left by an earlier pod runner", name)
                self.podman.remove(name, wait=True)
        mode = "simulated" if self.simulate is not None else ("container" if self.podman else "process")
        log.info("node %s registered; %s mode", self.node, mode)
        while not self.stop.is_set():
            try:
                kind, obj = self.events.get(timeout=0.1)
            except queue.Empty:
                kind, obj = "", {}
            try:
                if kind == "sync":
                    self.on_pod(obj)
                elif kind == "deleted":
                    self.on_deleted(obj)
                elif kind == "resync":
                    known = {uid: run.pod for uid, run in self.runs.items()} | self.sim_pods
                    for uid, pod in known.items():
                        if uid not in obj["uids"]:
                            self.on_deleted(pod)
                elif kind == "synced":
                    self.synced = True
                self.tick()
            except Exception:
                log.exception("while handling %s", kind or "tick")
        self.shutdown()

    def on_pod(self, pod: Obj) -> None:
        meta, spec = pod["metadata"], pod.get("spec", {})
        uid = meta["uid"]
        node = spec.get("nodeName")
        if not node:
            if meta.get("deletionTimestamp") or is_terminal(pod):
                return
            if not self.bind or spec.get("schedulerName", "default-scheduler") != "default-scheduler":
                return
            self.schedule(pod)
            return
        if node != self.node:
            return
        self.binding.discard(uid)
        if self.simulate is not None:
            self.on_pod_simulated(pod)
            return
        run = self.runs.get(uid)
        if run is None:
            if uid in self.done:
                if meta.get("deletionTimestamp"):
                    self.delete_now(pod)
                return
            if meta.get("deletionTimestamp"):
                self.delete_now(pod)
                return
            if is_terminal(pod):
                return
            if pod.get("status", {}).get("phase") == "Running":
                self.fail_orphan(pod)
                return
            self.runs[uid] = self.new_run(pod)
            return
        run.pod = pod
        if meta.get("deletionTimestamp") and not run.terminating:
            grace = meta.get("deletionGracePeriodSeconds")
            self.terminate(run, grace=30 if grace is None else int(grace))

    def on_deleted(self, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        self.binding.discard(uid)
        self.unschedulable.discard(uid)
        self.volume_waits.pop(uid, None)
        self.done.discard(uid)
        self.deleting.discard(uid)
        self.sim_pods.pop(uid, None)
        run = self.runs.pop(uid, None)
        if run is not None:
            for c in run.init + run.main:
                if self.podman is not None and c.podman_name is not None:
                    self.podman.remove(c.podman_name)
                if c.proc is not None and c.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(c.proc.pid, signal.SIGKILL)
                    c.proc.wait()
                self.forget_pid(run, c)
            shutil.rmtree(run.dir, ignore_errors=True)

    def claim_problem(self, pod: Obj) -> str | None:
        """The scheduler's VolumeBinding check: every PersistentVolumeClaim must exist and stay."""
        ns = pod["metadata"]["namespace"]
        for vol in pod["spec"].get("volumes") or []:
            claim = (vol.get("persistentVolumeClaim") or {}).get("claimName")
            if not claim:
                continue
            found = self.lookup("persistentvolumeclaims", ns, claim)
            if found is None:
                return f'persistentvolumeclaim "{claim}" not found'
            if found["metadata"].get("deletionTimestamp"):
                return f'persistentvolumeclaim "{claim}" is being deleted'
        return None

    def schedule(self, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        if uid in self.binding or uid in self.unschedulable:
            return
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        claim = self.claim_problem(pod)
        if claim is not None:  # retried: the claim may be created later, as the scheduler does
            self.volume_waits[uid] = (pod, time.monotonic() + 3.0)
            message = (
                f"0/1 nodes are available: {claim}. preemption: 0/1 nodes are available: "
                "1 Preemption is not helpful for scheduling."
            )
            shown = [c for c in pod.get("status", {}).get("conditions") or [] if c.get("type") == "PodScheduled"]
            if not shown or shown[0].get("message") != message:
                cond = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
                        "lastTransitionTime": now_rfc3339()}  # fmt: skip
                self.writers.submit(uid, lambda: self._patch_status(ns, name, {"conditions": [cond]}))
            return
        self.volume_waits.pop(uid, None)
        reason = unschedulable_reason(pod=pod, node_labels=self.labels, allocatable=self.capacity)
        if reason is not None:
            self.unschedulable.add(uid)
            cond = {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": reason,
                "lastTransitionTime": now_rfc3339(),
            }
            self.writers.submit(uid, lambda: self._patch_status(ns, name, {"conditions": [cond]}))
            return
        self.binding.add(uid)
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "namespace": ns, "uid": uid},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node},
        }
        self.writers.submit(
            uid,
            lambda: self.api.request(
                "POST", f"/api/v1/namespaces/{ns}/pods/{name}/binding", body=body, ok=(404, 409)
            ),
        )

    def tick(self) -> None:
        now = time.monotonic()
        for uid, (pod, when) in list(self.volume_waits.items()):
            if now >= when:
                self.volume_waits.pop(uid, None)
                self.schedule(pod)
        if self.simulate is not None:
            self.tick_simulated()
            return
        for run in list(self.runs.values()):
            if run.tokens and run.stage != "done" and not run.terminating:
                self.renew_tokens(run, now)
            changed = False
            for c in run.init + run.main:
                if self.podman is not None:
                    changed = self.container_started(run, c) or changed
                if c.proc is not None and c.proc.poll() is not None:
                    self.collect_exit(run, c)
                    changed = True
            if run.terminating:
                if run.kill_deadline is not None and now >= run.kill_deadline:
                    for c in run.init + run.main:
                        self.signal_container(c, kill=True)
                    # Container mode: again after 5 s if podman did not reach it (see signal_container).
                    escalate = self.podman is not None and any(c.kill_escalated and c.proc for c in run.init + run.main)
                    run.kill_deadline = now + 5.0 if escalate else None
                if all(c.proc is None for c in run.init + run.main):
                    self.finish(run, deleted=True)
                continue
            changed = self.advance(run, now) or changed
            if changed:
                self.write_status(run)

    def shutdown(self) -> None:
        running = [(run, c) for run in self.runs.values() for c in run.init + run.main if c.proc is not None]
        for _, c in running:
            self.signal_container(c, kill=False)
        deadline = time.monotonic() + 10.0
        for run, c in running:
            assert c.proc is not None
            try:
                c.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                if self.podman is not None and c.podman_name is not None:
                    self.podman.remove(c.podman_name, wait=True)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                c.proc.wait()
            if self.podman is not None and c.podman_name is not None:
                self.podman.remove(c.podman_name)
            self.forget_pid(run, c)
        if self.podman is not None:
            self.podman.wait_background(timeout=10.0)
        if self.net is not None:
            self.net.shutdown()
        self.writers.stop(timeout=5.0)
        log.info("stopped")
