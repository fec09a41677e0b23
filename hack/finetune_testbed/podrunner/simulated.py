"""Simulated mode (--simulate SECONDS): every pod Running, then Succeeded, nothing run."""

from __future__ import annotations

import functools
import heapq
import time

from finetune_testbed.podrunner.common import Obj, is_terminal, now_rfc3339
from finetune_testbed.podrunner.kubelet import Kubelet


class Simulated(Kubelet):
    """Simulated mode (--simulate SECONDS): every pod Running, then Succeeded, nothing run."""

    def on_pod_simulated(self, pod: Obj) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        if meta.get("deletionTimestamp"):
            self.sim_pods.pop(uid, None)
            self.delete_now(pod)
            return
        if is_terminal(pod) or uid in self.sim_pods or uid in self.done:
            return
        assert self.simulate is not None
        self.sim_pods[uid] = pod
        heapq.heappush(self.sim_heap, (time.monotonic() + self.simulate, uid))
        started = now_rfc3339()
        statuses = [
            {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": "",
                "containerID": f"simulated://{uid}/{c['name']}",
                "ready": True,
                "started": True,
                "restartCount": 0,
                "state": {"running": {"startedAt": started}},
            }
            for c in pod["spec"]["containers"]
        ]
        status = self.pod_status_base(phase="Running", start_time=started, ready=True, initialized=True)
        status["containerStatuses"] = statuses
        pod["_started"] = started
        ns, name = meta["namespace"], meta["name"]
        self.writers.submit(uid, lambda: self._patch_status(ns, name, status))

    def tick_simulated(self) -> None:
        now = time.monotonic()
        while self.sim_heap and self.sim_heap[0][0] <= now:
            _, uid = heapq.heappop(self.sim_heap)
            pod = self.sim_pods.pop(uid, None)
            if pod is None:
                continue
            self.done.add(uid)
            finished = now_rfc3339()
            started = pod.get("_started", finished)
            statuses = [
                {
                    "name": c["name"],
                    "image": c.get("image", ""),
                    "imageID": "",
                    "containerID": f"simulated://{uid}/{c['name']}",
                    "ready": False,
                    "started": False,
                    "restartCount": 0,
                    "state": {
                        "terminated": {
                            "exitCode": 0,
                            "reason": "Completed",
                            "startedAt": started,
                            "finishedAt": finished,
                            "containerID": f"simulated://{uid}/{c['name']}",
                        }
                    },
                }
                for c in pod["spec"]["containers"]
            ]
            status = self.pod_status_base(
                phase="Succeeded", start_time=started, ready=False, initialized=True, completed=True
            )
            status["containerStatuses"] = statuses
            ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
            self.writers.submit(uid, functools.partial(self._patch_status, ns, name, status))
