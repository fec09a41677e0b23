"""The pod runner's state and the API objects it reads."""

from __future__ import annotations

import base64
import queue
import threading
import urllib.parse
from pathlib import Path

from finetune_testbed.podrunner import container as containers
from finetune_testbed.podrunner import podnet
from finetune_testbed.podrunner.api import Api, Writers
from finetune_testbed.podrunner.common import Obj, now_rfc3339
from finetune_testbed.podrunner.state import PodRun


class RunnerBase:
    """The pod runner's state and the API objects it reads."""

    def __init__(
        self,
        *,
        api: Api,
        cluster_dir: Path,
        node_name: str,
        capacity: dict[str, str],
        simulate: float | None,
        kubelet_port: int,
        bind: bool = True,
        pods: str = "process",
        network: str = "host",
    ) -> None:
        self.api = api
        self.net = podnet.PodNetwork(cluster_dir=cluster_dir) if network == "netns" and simulate is None else None
        self.podman = containers.Podman(cluster_dir=cluster_dir) if pods == "container" else None
        self.runtime_version = f"podman://{self.podman.version()}" if self.podman is not None else "local://1"
        self.kubelet_port = kubelet_port
        self.live_logs: set[Path] = set()
        self.dir = cluster_dir
        self.node = node_name
        self.capacity = capacity
        self.simulate = simulate
        self.bind = bind
        self.labels = {
            "kubernetes.io/hostname": node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "node.kubernetes.io/instance-type": "local",
            "nvidia.com/gpu.present": "true",
        }
        self.events: queue.Queue[tuple[str, Obj]] = queue.Queue()
        self.stop = threading.Event()
        self.writers = Writers(count=8)
        self.runs: dict[str, PodRun] = {}
        self.done: set[str] = set()
        self.binding: set[str] = set()
        self.deleting: set[str] = set()
        self.unschedulable: set[str] = set()
        self.volume_waits: dict[str, tuple[Obj, float]] = {}  # uid -> (pod, when to look again)
        self.sim_heap: list[tuple[float, str]] = []
        self.sim_pods: dict[str, Obj] = {}
        self.api_port = urllib.parse.urlparse(api.host).port or 443
        self.started = now_rfc3339()
        self.synced = False
        (self.dir / "pods").mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.dir / "pids" / "pods").mkdir(parents=True, exist_ok=True)
        if self.net is not None:
            self.net.setup()

    def lookup(self, kind: str, namespace: str, name: str) -> Obj | None:
        got = self.api.request("GET", f"/api/v1/namespaces/{namespace}/{kind}/{name}", ok=(404,))
        return None if got["_status"] == 404 else got

    def key_values(self, kind: str, namespace: str, name: str) -> dict[str, bytes] | None:
        obj = self.lookup(kind, namespace, name)
        if obj is None:
            return None
        if kind == "secrets":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        out = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return out
