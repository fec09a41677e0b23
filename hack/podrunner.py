"""The local pod runner: plays the kubelet (and the scheduler) for one Node.

Dev and test tooling, not the product. It registers Node `local-node` (Ready, with
`nvidia.com/gpu` capacity), renews its Lease and Ready condition, binds every pending pod
that fits to it, and runs each container's command as a local process:

- with the repo's `.venv/bin` first on PATH and the container's env (value and valueFrom
  secretKeyRef / configMapKeyRef / fieldRef / resourceFieldRef, envFrom), `$(VAR)` expanded;
- in a mount namespace of its own (hack/localcluster_exec.py): every volume bind-mounted at
  its mountPath (hostPath as is; a PVC as .cluster/volumes/<ns>/<claim>; emptyDir a per-pod
  folder; configMap/secret/projected/downwardAPI materialised as files, read-only; a projected
  serviceAccountToken minted by TokenRequest, bound to the pod, and minted again at 80 % of
  its lifetime as the kubelet does), the termination-message path a per-pod file, `readOnly`
  honoured;
- logging to .cluster/logs/<ns>_<pod>_<container>.log;
- pod IP 127.0.0.1 (pods share the machine's network, as with hostNetwork); or, with
  `--pod-network=netns` (FTO_POD_NETWORK=netns in hack/cluster.py), a network namespace per
  pod on a bridge, its own address, hostname and /etc/hosts: see hack/podnet.py.

Status is written like a kubelet's: Running with startedAt, then Succeeded/Failed with the
exit code, reason and termination message (FallbackToLogsOnError honoured). A deleted pod's
containers get SIGTERM, then SIGKILL after its grace period, then the pod object is removed.

Pods that cannot start get what a real cluster says: an image reference that does not parse
waits with InvalidImageName (the kubelet's message); a missing ConfigMap or Secret (env or
volume) with CreateContainerConfigError; a PersistentVolumeClaim that does not exist (or is
being deleted) keeps the pod unscheduled with the scheduler's `persistentvolumeclaim "x" not
found`, re-checked every few seconds so that a claim created later lets it start. Claims are
not bound to volumes here (no provisioner): a claim that exists is taken as bound.

`--pods=container` (what `FTO_PODS=container` selects in hack/cluster.py) runs each container
from its image with podman and runc instead, with the pod's securityContext applied, its
volumes as bind mounts and `containerID: podman://<id>` in the status; see
hack/podrunner_container.py for what it does and what it leaves out. The default,
`--pods=process`, is the fast mode above: the repo's own code, no image involved.

`--simulate SECONDS` runs nothing: every pod turns Running and then Succeeded (exit 0) after
SECONDS. Either way there is one watch, one loop thread and a few writer threads; no thread
per pod. Images are never pulled; an image whose registry host ends in `.invalid` "fails to
pull" (Waiting ErrImagePull/ImagePullBackOff) so pull errors can be tested.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import functools
import heapq
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by file path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import podnet  # hack/podnet.py: FTO_POD_NETWORK=netns
import podrunner_container as containers  # hack/podrunner_container.py, beside this file

ROOT = Path(__file__).resolve().parent.parent
EXEC_HELPER = Path(__file__).resolve().parent / "localcluster_exec.py"
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
# Images with no command: what their entrypoint is here (the project's own images).
IMAGE_ENTRYPOINTS = {
    "ghcr.io/finetune-dev/finetune-trainer": ["finetune-train"],
    "ghcr.io/finetune-dev/finetune-operator": ["finetune-operator"],
}
STRATEGIC = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"

log = logging.getLogger("podrunner")
Obj = dict[str, Any]


# --- small pure helpers ----------------------------------------------------------------------


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_quantity(value: str | int | float) -> Decimal:
    from kubernetes.utils.quantity import parse_quantity as parse

    return Decimal(parse(value))  # type: ignore[no-untyped-call]


def expand_vars(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: `$$` is a literal `$`, unknown references stay as written."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2 : end]
                    out.append(env.get(name, text[i : end + 1]))
                    i = end + 1
                    continue
        out.append(ch)
        i += 1
    return "".join(out)


def pod_key(pod: Obj) -> str:
    return f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"


def is_terminal(pod: Obj) -> bool:
    return pod.get("status", {}).get("phase") in ("Succeeded", "Failed")


def container_requests(pod: Obj) -> dict[str, Decimal]:
    """Effective pod requests the way the scheduler counts them (max(init), sum(main))."""

    def requests_of(c: Obj) -> dict[str, Decimal]:
        res = c.get("resources") or {}
        req = dict(res.get("limits") or {})  # limits default the requests
        req.update(res.get("requests") or {})
        return {k: parse_quantity(v) for k, v in req.items()}

    total: dict[str, Decimal] = {}
    for c in pod["spec"].get("containers", []):
        for k, v in requests_of(c).items():
            total[k] = total.get(k, Decimal(0)) + v
    for c in pod["spec"].get("initContainers") or []:
        for k, v in requests_of(c).items():
            total[k] = max(total.get(k, Decimal(0)), v)
    return total


def _match_expression(expr: Obj, labels: dict[str, str]) -> bool:
    key, op, values = expr.get("key", ""), expr.get("operator"), expr.get("values") or []
    if op == "In":
        return labels.get(key) in values
    if op == "NotIn":
        return labels.get(key) not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    if op in ("Gt", "Lt") and key in labels:
        try:
            a, b = int(labels[key]), int(values[0])
        except (ValueError, IndexError):
            return False
        return a > b if op == "Gt" else a < b
    return False


def unschedulable_reason(*, pod: Obj, node_labels: dict[str, str], allocatable: dict[str, str]) -> str | None:
    """Why `pod` cannot go to the node (a scheduler-style message), or None if it fits."""
    spec = pod["spec"]
    for key, value in (spec.get("nodeSelector") or {}).items():
        if node_labels.get(key) != value:
            return "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
    affinity = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    )
    if affinity:
        terms = affinity.get("nodeSelectorTerms") or []
        if terms and not any(
            all(_match_expression(e, node_labels) for e in (t.get("matchExpressions") or [])) for t in terms
        ):
            return "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
    for name, amount in container_requests(pod).items():
        have = parse_quantity(allocatable.get(name, "0"))
        if amount > have:
            return f"0/1 nodes are available: 1 Insufficient {name}."
    return None


# The image reference grammar of distribution/reference (what the kubelet parses).
_REF_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_REF_DOMAIN = re.compile(rf"{_REF_DOMAIN_COMPONENT}(?:\.{_REF_DOMAIN_COMPONENT})*(?::[0-9]+)?")
_REF_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_REF_TAG = re.compile(r"[\w][\w.-]{0,127}")
_REF_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")


def image_name_error(image: str) -> str | None:
    """The kubelet's InvalidImageName message when `image` is no valid reference, else None."""
    head = f'Failed to apply default image tag "{image}": couldn\'t parse image name "{image}": invalid reference format'
    name, _, digest = image.partition("@")
    if digest and not _REF_DIGEST.fullmatch(digest):
        return head
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _REF_TAG.fullmatch(tag):
            return head
    first, sep, rest = name.partition("/")
    if not sep or ("." not in first and ":" not in first and first != "localhost" and first.lower() == first):
        domain, path = "docker.io", name if sep else f"library/{name}"
    else:
        domain, path = first, rest
    if not name or len(name) > 255 or not _REF_DOMAIN.fullmatch(domain):
        return head
    components = path.split("/")
    if all(_REF_PATH_COMPONENT.fullmatch(c) for c in components):
        return None
    if all(_REF_PATH_COMPONENT.fullmatch(c.lower()) for c in components):
        return f"{head}: repository name ({path}) must be lowercase"
    return head


def image_pull_error(image: str) -> str | None:
    host = image.split("/", 1)[0] if "/" in image else ""
    if host.split(":", 1)[0].endswith(".invalid"):
        return f'failed to pull image "{image}": registry {host} cannot be resolved (local pod runner)'
    return None


def default_command(image: str) -> list[str]:
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    return list(IMAGE_ENTRYPOINTS.get(name, []))


def node_body(*, name: str, labels: dict[str, str]) -> Obj:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}, "spec": {}}


def node_status(
    *, capacity: dict[str, str], heartbeat: str, started: str, kubelet_port: int, runtime: str = "local://1"
) -> Obj:
    def cond(type_: str, status: str, reason: str, message: str) -> Obj:
        return {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": heartbeat,
            "lastTransitionTime": started,
        }

    return {
        "capacity": capacity,
        "allocatable": capacity,
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "pod runner has sufficient memory"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "pod runner has no disk pressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "pod runner has sufficient PID"),
            cond("Ready", "True", "KubeletReady", "local pod runner is posting ready status"),
        ],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": "local-node"}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
        "nodeInfo": {
            "machineID": "local",
            "systemUUID": "local",
            "bootID": "local",
            "kernelVersion": os.uname().release,
            "osImage": "local pod runner",
            "containerRuntimeVersion": runtime,
            "kubeletVersion": "v1.34.4",
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": "amd64",
        },
    }


# --- the API, as JSON ------------------------------------------------------------------------


class ApiError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, body: str, what: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {body[:300]}")
        self.status = status


class Api:
    """JSON requests and watches through the `kubernetes` package: the client the operator uses too.

    The operator runs the asyncio flavour (`kubernetes.aio`, in finetune_operator/kube.py); the
    pod runner's threads run the sync one, configured from the same kubeconfig loader (TLS,
    client certificates, exec and OIDC plugins and their token refresh). Bodies stay plain JSON
    (`ApiClient.param_serialize` and `call_api`, no model deserialisation), and the pod watch is
    `kubernetes.watch.Watch`'s (line splitting, ERROR events raised as `ApiException`). GET
    requests honour a Retry-After the server sends with a 429 or 5xx (client-go's rule,
    `client_go_retries`); other failures reach the caller, whose loop retries.
    """

    def __init__(self, *, kubeconfig: str) -> None:
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)  # type: ignore[no-untyped-call]
        cfg.connection_pool_maxsize = 32
        cfg.client_go_retries = True
        self.host = cfg.host.rstrip("/")
        self._client = client.ApiClient(cfg)
        self._core = client.CoreV1Api(self._client)

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: dict[str, Any] | None = None,
        ok: tuple[int, ...] = (),
        timeout: float = 30.0,
    ) -> Obj:
        method, url, headers, data, _ = self._client.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((params or {}).items()) or None,
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = self._client.call_api(method, url, header_params=headers, body=data, _request_timeout=timeout)
        raw: bytes = resp.read() or b""  # type: ignore[no-untyped-call]
        if resp.status >= 300 and resp.status not in ok:
            raise ApiError(resp.status, raw.decode(errors="replace"), f"{method} {path}")
        try:
            parsed: Obj = json.loads(raw) if raw else {}
        except ValueError:
            parsed = {}
        parsed.setdefault("_status", resp.status)
        return parsed

    def watch_pods(self, *, resource_version: str, timeout_s: int = 300) -> Iterator[Obj]:
        """Every pod's events from `resource_version` on, as plain dicts, until the server ends the watch.

        A 410 (HTTP, or an ERROR event) is raised as ApiError(410): list again.
        """
        from kubernetes import client, watch

        def list_pods(**kwargs: Any) -> Any:
            # No docstring, so Watch has no model to decode into: events carry the raw JSON.
            return self._core.list_pod_for_all_namespaces(**kwargs)

        stream = watch.Watch()  # type: ignore[no-untyped-call]
        try:
            yield from stream.stream(  # type: ignore[no-untyped-call]
                list_pods,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout_s,
                _request_timeout=timeout_s + 30,
            )
        except client.ApiException as err:
            raise ApiError(int(err.status or 0), str(err.reason or err.body or ""), "WATCH /api/v1/pods") from err
        finally:
            stream.stop()  # type: ignore[no-untyped-call]


class Writers:
    """A few writer threads; work for one pod always goes to the same thread, so in order."""

    def __init__(self, *, count: int) -> None:
        self._queues: list[queue.Queue[Callable[[], object] | None]] = [queue.Queue() for _ in range(count)]
        self._threads = [
            threading.Thread(target=self._run, args=(q,), name=f"writer-{i}", daemon=True)
            for i, q in enumerate(self._queues)
        ]
        for t in self._threads:
            t.start()

    def submit(self, key: str, fn: Callable[[], object]) -> None:
        self._queues[hash(key) % len(self._queues)].put(fn)

    def stop(self, *, timeout: float) -> None:
        for q in self._queues:
            q.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    @staticmethod
    def _run(q: queue.Queue[Callable[[], object] | None]) -> None:
        while True:
            fn = q.get()
            if fn is None:
                return
            for attempt in range(6):
                try:
                    fn()
                    break
                except ApiError as err:
                    if err.status in (404, 409, 422) or attempt == 5 or (err.status < 500 and err.status != 429):
                        log.warning("%s", err)
                        break
                except Exception as err:  # connection trouble: retry with backoff
                    if attempt == 5:
                        log.warning("giving up: %s", err)
                        break
                time.sleep(0.2 * 2**attempt)


class LogServer:
    """The slice of the kubelet API that `kubectl logs` needs: /containerLogs/<ns>/<pod>/<container>.

    HTTPS on loopback with the node's serving certificate; only clients with a certificate
    from the cluster CA (the apiserver) are served. `follow` streams until the container ends.
    """

    def __init__(self, *, logs_dir: Path, tls_dir: Path, port: int, live: set[Path]) -> None:
        import http.server
        import ssl

        logs, live_logs = logs_dir, live

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                url = urllib.parse.urlparse(self.path)
                parts = url.path.strip("/").split("/")
                if len(parts) != 4 or parts[0] != "containerLogs":
                    self.send_error(404, "only /containerLogs/<namespace>/<pod>/<container> is served")
                    return
                query = urllib.parse.parse_qs(url.query)
                path = logs / f"{parts[1]}_{parts[2]}_{parts[3]}.log"
                if not path.exists():
                    self.send_error(404, f"no log for container {parts[3]} of pod {parts[1]}/{parts[2]}")
                    return
                data = path.read_bytes()
                if "tailLines" in query:
                    lines = data.splitlines(keepends=True)
                    data = b"".join(lines[-int(query["tailLines"][0]) :]) if int(query["tailLines"][0]) else b""
                if "limitBytes" in query:
                    data = data[: int(query["limitBytes"][0])]
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(data)
                if query.get("follow", ["false"])[0] != "true":
                    return
                offset = path.stat().st_size
                try:
                    while True:
                        self.wfile.flush()
                        with open(path, "rb") as f:
                            f.seek(offset)
                            chunk = f.read()
                        offset += len(chunk)
                        if chunk:
                            self.wfile.write(chunk)
                        elif path not in live_logs:
                            return
                        else:
                            time.sleep(0.2)
                except (BrokenPipeError, ConnectionResetError):
                    return

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(tls_dir / "kubelet.crt"), str(tls_dir / "kubelet.key"))
        ctx.load_verify_locations(str(tls_dir / "ca.crt"))
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, name="log-server", daemon=True).start()


# --- per-pod state ---------------------------------------------------------------------------


@dataclass
class ContainerRun:
    """One container of a running pod."""

    name: str
    spec: Obj
    dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    message: str | None = None
    restart_count: int = 0
    waiting: tuple[str, str] | None = None  # (reason, message)
    restart_at: float | None = None
    last_terminated: Obj | None = None
    container_id: str | None = None
    # container mode
    podman_name: str | None = None
    image_id: str = ""
    stop_signal: str = "SIGTERM"
    host_pid: int | None = None
    kill_escalated: bool = False
    next_retry: float = 0.0  # a waiting container is tried again then (each on its own)


@dataclass
class PodRun:
    """What the runner knows about one pod it owns."""

    uid: str
    pod: Obj
    dir: Path
    init: list[ContainerRun] = field(default_factory=list)
    main: list[ContainerRun] = field(default_factory=list)
    stage: str = "init"  # init | main | done
    start_time: str = ""
    kill_deadline: float | None = None
    terminating: bool = False
    prepared: bool = False
    mounts: dict[str, list[Obj]] = field(default_factory=dict)
    last_written: str = ""
    tokens: list[tuple[Path, Obj, float]] = field(default_factory=list)  # file, source, monotonic renew time
    address: podnet.PodAddress | None = None  # --pod-network=netns

    @property
    def namespace(self) -> str:
        return str(self.pod["metadata"]["namespace"])

    @property
    def name(self) -> str:
        return str(self.pod["metadata"]["name"])


class ConfigError(Exception):
    """A container's configuration cannot be built yet (CreateContainerConfigError)."""


# --- the runner ------------------------------------------------------------------------------


class PodRunner:
    """Watches pods, binds and runs them, writes their status; see the module docstring."""

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

    # -- node --

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

    # -- watch --

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

    # -- main loop --

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

    # -- scheduling --

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

    # -- simulated mode --

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

    # -- real mode: preparing --

    def new_run(self, pod: Obj) -> PodRun:
        uid = pod["metadata"]["uid"]
        pdir = self.dir / "pods" / uid
        run = PodRun(uid=uid, pod=pod, dir=pdir, start_time=now_rfc3339())
        ns, name = run.namespace, run.name
        for group, specs in (("init", pod["spec"].get("initContainers") or []), ("main", pod["spec"]["containers"])):
            for c in specs:
                cdir = pdir / "containers" / c["name"]
                entry = ContainerRun(
                    name=c["name"], spec=c, dir=cdir, log_path=self.dir / "logs" / f"{ns}_{name}_{c['name']}.log"
                )
                (run.init if group == "init" else run.main).append(entry)
        run.stage = "init" if run.init else "main"
        self.write_status(run)
        return run

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

    def host_ip(self) -> str:
        """Where pods reach this machine: loopback (host network) or the bridge (netns)."""
        return self.net.gateway if self.net is not None else "127.0.0.1"

    def pod_ip(self, uid: str) -> str:
        address = self.net.pods.get(uid) if self.net is not None else None
        return address.ip if address is not None else "127.0.0.1"

    def field_value(self, pod: Obj, path: str) -> str:
        meta = pod["metadata"]
        simple = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": self.node,
            "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
            "status.hostIP": self.host_ip(),
            "status.hostIPs": self.host_ip(),
            "status.podIP": self.pod_ip(meta["uid"]),
            "status.podIPs": self.pod_ip(meta["uid"]),
        }
        if path in simple:
            return str(simple[path])
        for prefix, source in (("metadata.labels", "labels"), ("metadata.annotations", "annotations")):
            values = meta.get(source) or {}
            if path == prefix:
                return "\n".join(f'{k}="{v}"' for k, v in sorted(values.items()))
            if path.startswith(prefix + "['") and path.endswith("']"):
                return str(values.get(path[len(prefix) + 2 : -2], ""))
        raise ConfigError(f"unsupported fieldRef {path}")

    def resource_value(self, pod: Obj, ref: Obj, default_container: str) -> str:
        cname = ref.get("containerName") or default_container
        resource = ref["resource"]
        container: Obj = next((c for c in pod["spec"]["containers"] if c["name"] == cname), {})
        section, _, res = resource.partition(".")
        res_spec = container.get("resources") or {}
        value = (res_spec.get(section) or {}).get(res) or (res_spec.get("limits") or {}).get(res)
        if value is None:
            value = self.capacity.get(res, "0")
        divisor = parse_quantity(ref.get("divisor", "1"))
        amount = parse_quantity(value) / divisor
        return str(int(amount.to_integral_value(rounding="ROUND_CEILING")))

    def container_env(self, pod: Obj, c: Obj) -> dict[str, str]:
        """The container's environment: what the kubelet adds, then envFrom, then env.

        In process mode also PATH (the repo's .venv first), HOME and HOSTNAME, which a
        container gets from its image and runtime instead."""
        ns = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        if self.podman is None:
            env.update({
                "PATH": f"{ROOT / '.venv' / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME": os.environ.get("HOME", "/root"),
                "HOSTNAME": pod["metadata"]["name"],
            })  # fmt: skip
        env.update({
            "KUBERNETES_SERVICE_HOST": self.host_ip(),
            "KUBERNETES_SERVICE_PORT": str(self.api_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(self.api_port),
        })  # fmt: skip
        for source in c.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for kind, key in (("configmaps", "configMapRef"), ("secrets", "secretRef")):
                ref = source.get(key)
                if ref is None:
                    continue
                values = self.key_values(kind, ns, ref["name"])
                if values is None:
                    if ref.get("optional"):
                        continue
                    raise ConfigError(f'{kind[:-1]} "{ref["name"]}" not found')
                for k, v in values.items():
                    env[prefix + k] = v.decode(errors="replace")
        for item in c.get("env") or []:
            name = item["name"]
            if "valueFrom" not in item:
                env[name] = expand_vars(item.get("value", ""), env)
                continue
            vf = item["valueFrom"]
            if "fieldRef" in vf:
                env[name] = self.field_value(pod, vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:
                env[name] = self.resource_value(pod, vf["resourceFieldRef"], c["name"])
            else:
                kind, key = ("secrets", "secretKeyRef") if "secretKeyRef" in vf else ("configmaps", "configMapKeyRef")
                ref = vf[key]
                values = self.key_values(kind, ns, ref["name"])
                if values is None or ref["key"] not in values:
                    if ref.get("optional"):
                        continue
                    what = f'{kind[:-1]} "{ref["name"]}"'
                    raise ConfigError(
                        f"{what} not found" if values is None else f'couldn\'t find key {ref["key"]} in {what}'
                    )
                env[name] = values[ref["key"]].decode(errors="replace")
        return env

    def write_files(self, target: Path, files: dict[str, bytes], *, mode: int) -> None:
        target.mkdir(parents=True, exist_ok=True)
        for rel, data in files.items():
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            os.chmod(path, mode)

    def projected_items(self, values: dict[str, bytes], items: list[Obj] | None) -> dict[str, bytes]:
        if not items:
            return dict(values)
        out = {}
        for item in items:
            if item["key"] in values:
                out[item["path"]] = values[item["key"]]
            else:
                raise ConfigError(f"key {item['key']} not found")
        return out

    def downward_files(self, pod: Obj, items: list[Obj], container: str) -> dict[str, bytes]:
        out = {}
        for item in items:
            if "fieldRef" in item:
                out[item["path"]] = self.field_value(pod, item["fieldRef"]["fieldPath"]).encode()
            elif "resourceFieldRef" in item:
                out[item["path"]] = self.resource_value(pod, item["resourceFieldRef"], container).encode()
        return out

    def token(self, pod: Obj, source: Obj) -> bytes:
        sa = pod["spec"].get("serviceAccountName") or "default"
        ns = pod["metadata"]["namespace"]
        spec: Obj = {
            "expirationSeconds": int(source.get("expirationSeconds", 3607)),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod["metadata"]["name"],
                               "uid": pod["metadata"]["uid"]},
        }
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        got = self.api.request(
            "POST",
            f"/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token",
            body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        return str(got["status"]["token"]).encode()

    @staticmethod
    def renew_at(source: Obj) -> float:
        """When a projected token is minted again: at 80 % of its lifetime, like the kubelet."""
        return time.monotonic() + 0.8 * int(source.get("expirationSeconds", 3607))

    def renew_tokens(self, run: PodRun, now: float) -> None:
        """Mints the run's projected tokens again when due, replacing each file atomically."""
        for i, (path, source, due) in enumerate(run.tokens):
            if now < due:
                continue
            try:
                data = self.token(run.pod, source)
            except Exception as err:  # retried in a minute; the old token is still valid meanwhile
                log.warning("renewing the token of pod %s/%s: %s", run.namespace, run.name, err)
                run.tokens[i] = (path, source, now + 60.0)
                continue
            fresh = path.with_name(f".{path.name}.new")
            fresh.write_bytes(data)
            os.chmod(fresh, path.stat().st_mode & 0o777)
            fresh.replace(path)
            run.tokens[i] = (path, source, self.renew_at(source))

    def volume_source(self, run: PodRun, vol: Obj) -> tuple[Path, bool]:
        """Makes the volume's host folder; returns it and whether it is always read-only."""
        pod, ns = run.pod, run.namespace
        name = vol["name"]
        vdir = run.dir / "volumes" / name
        mode = int(vol.get("defaultMode", 0o644)) if isinstance(vol.get("defaultMode"), int) else 0o644
        if "hostPath" in vol:
            hp = vol["hostPath"]
            path = Path(hp["path"])
            kind = hp.get("type", "")
            if kind == "DirectoryOrCreate":
                path.mkdir(parents=True, exist_ok=True)
            elif kind == "FileOrCreate" and not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            if not path.exists():
                raise ConfigError(f"hostPath {path} does not exist")
            return path, False
        if "persistentVolumeClaim" in vol:
            claim = vol["persistentVolumeClaim"]
            path = self.dir / "volumes" / ns / claim["claimName"]
            path.mkdir(parents=True, exist_ok=True)
            self.own_volume(pod, path)
            return path, bool(claim.get("readOnly"))
        if "emptyDir" in vol or "ephemeral" in vol:
            vdir.mkdir(parents=True, exist_ok=True)
            if self.podman is not None:
                os.chmod(vdir, 0o777)  # as the kubelet makes an emptyDir
            self.own_volume(pod, vdir)
            return vdir, False
        if "configMap" in vol or "secret" in vol:
            is_secret = "secret" in vol
            src = vol["secret" if is_secret else "configMap"]
            ref = src.get("secretName" if is_secret else "name", "")
            values = self.key_values("secrets" if is_secret else "configmaps", ns, ref)
            if values is None:
                if not src.get("optional"):
                    raise ConfigError(f'{"secret" if is_secret else "configmap"} "{ref}" not found')
                values = {}
            mode = int(src.get("defaultMode", 0o644))
            self.write_files(vdir, self.projected_items(values, src.get("items")), mode=mode)
            return vdir, True
        if "downwardAPI" in vol:
            src = vol["downwardAPI"]
            files = self.downward_files(pod, src.get("items") or [], pod["spec"]["containers"][0]["name"])
            self.write_files(vdir, files, mode=int(src.get("defaultMode", 0o644)))
            return vdir, True
        if "projected" in vol:
            src = vol["projected"]
            projected: dict[str, bytes] = {}
            for s in src.get("sources") or []:
                if "serviceAccountToken" in s:
                    token_source = s["serviceAccountToken"]
                    projected[token_source["path"]] = self.token(pod, token_source)
                    run.tokens.append((vdir / token_source["path"], token_source, self.renew_at(token_source)))
                elif "configMap" in s or "secret" in s:
                    is_secret = "secret" in s
                    ref = s["secret" if is_secret else "configMap"]
                    values = self.key_values("secrets" if is_secret else "configmaps", ns, ref["name"])
                    if values is None:
                        if ref.get("optional"):
                            continue
                        raise ConfigError(f'{"secret" if is_secret else "configmap"} "{ref["name"]}" not found')
                    projected.update(self.projected_items(values, ref.get("items")))
                elif "downwardAPI" in s:
                    projected.update(
                        self.downward_files(pod, s["downwardAPI"].get("items") or [], pod["spec"]["containers"][0]["name"])
                    )
            self.write_files(vdir, projected, mode=int(src.get("defaultMode", 0o644)))
            return vdir, True
        raise ConfigError(f"volume {name}: unsupported volume type")

    def own_volume(self, pod: Obj, path: Path) -> None:
        """Container mode: the pod's fsGroup owns a volume that supports ownership (emptyDir,
        claims), as the kubelet applies it; a process runs as root and needs none of this."""
        sc = pod["spec"].get("securityContext") or {}
        if self.podman is None or sc.get("fsGroup") is None:
            return
        containers.apply_fs_group(path, gid=int(sc["fsGroup"]), policy=sc.get("fsGroupChangePolicy"))

    def prepare(self, run: PodRun) -> None:
        """Materialises every volume once per pod and computes each container's mounts."""
        if run.prepared:
            return
        sources: dict[str, tuple[Path, bool]] = {}
        for vol in run.pod["spec"].get("volumes") or []:
            sources[vol["name"]] = self.volume_source(run, vol)
        if self.net is not None and run.address is None:
            try:
                run.address = self.net.attach(pod=run.pod)
            except podnet.NetworkError as err:
                raise ConfigError(f"pod network: {err}") from err
        for c in run.init + run.main:
            c.dir.mkdir(parents=True, exist_ok=True)
            mounts: list[Obj] = []
            for vm in c.spec.get("volumeMounts") or []:
                if vm["name"] not in sources:
                    raise ConfigError(f"volume {vm['name']} is not defined in the pod")
                src, always_ro = sources[vm["name"]]
                if vm.get("subPath"):
                    src = src / vm["subPath"]
                    if not src.exists():
                        src.mkdir(parents=True, exist_ok=True)
                mounts.append({"source": str(src), "target": vm["mountPath"],
                               "readOnly": always_ro or bool(vm.get("readOnly"))})
            term = c.dir / "termination-log"
            term.write_bytes(b"")
            os.chmod(term, 0o666)  # the kubelet's mode: any uid in the container writes it
            target = c.spec.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
            mounts.append({"source": str(term), "target": target, "readOnly": False})
            if run.address is not None:
                mounts.append({"source": str(self.net_hosts(run)), "target": "/etc/hosts", "readOnly": True})
            run.mounts[c.name] = mounts
        run.prepared = True

    def net_hosts(self, run: PodRun) -> Path:
        assert self.net is not None
        return self.net.hosts_path(run.uid)

    # -- real mode: running --

    def start_container(self, run: PodRun, c: ContainerRun) -> None:
        image = c.spec.get("image", "")
        name_error = image_name_error(image)
        if name_error is not None:
            c.waiting = ("InvalidImageName", name_error)
            c.next_retry = time.monotonic() + 5.0
            return
        pull_error = image_pull_error(image)
        if pull_error is not None:
            reason = "ImagePullBackOff" if c.waiting and c.waiting[0] == "ErrImagePull" else "ErrImagePull"
            c.waiting = (reason, pull_error)
            c.next_retry = time.monotonic() + 5.0
            return
        if self.podman is not None:
            self.start_in_container(run, c)
            return
        try:
            self.prepare(run)
            env = self.container_env(run.pod, c.spec)
        except ConfigError as err:
            c.waiting = ("CreateContainerConfigError", str(err))
            c.next_retry = time.monotonic() + 2.0
            return
        command = [expand_vars(a, env) for a in (c.spec.get("command") or default_command(image))]
        args = [expand_vars(a, env) for a in c.spec.get("args") or []]
        if not command:
            c.waiting = ("CreateContainerError", f'no command for image "{image}": images are not pulled here')
            c.next_retry = time.monotonic() + 5.0
            return
        start_error = c.dir / "start-error"
        start_error.unlink(missing_ok=True)
        spec = {
            "argv": command + args,
            "env": env,
            "workingDir": c.spec.get("workingDir") or str(run.dir / "work"),
            "mounts": run.mounts[c.name],
            "startErrorPath": str(start_error),
        }
        spec_path = c.dir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        os.chmod(spec_path, 0o600)
        mode = "ab" if c.restart_count else "wb"
        with open(c.log_path, mode) as logf:
            prefix = [] if run.address is None or self.net is None else self.net.exec_prefix(
                uid=run.uid, hostname=podnet.pod_hostname(pod=run.pod)
            )
            c.proc = subprocess.Popen(
                [*prefix, sys.executable, "-I", str(EXEC_HELPER), str(spec_path)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                env={"PATH": env["PATH"]},
            )
        (self.dir / "pids" / "pods" / f"{run.uid}_{c.name}.pid").write_text(f"{c.proc.pid}\n")
        self.live_logs.add(c.log_path)
        c.container_id = f"local://{run.uid}/{c.name}/{c.proc.pid}"
        c.started_at = now_rfc3339()
        c.finished_at = c.exit_code = c.reason = c.message = None
        c.waiting = None
        log.info("started %s/%s pid %d", pod_key(run.pod), c.name, c.proc.pid)

    def start_in_container(self, run: PodRun, c: ContainerRun) -> None:
        """Container mode: `podman run` from the image, attached, its output into the log file."""
        assert self.podman is not None
        image = str(c.spec.get("image", ""))
        info = self.podman.image(image)
        if info is None:
            previous = c.waiting[0] if c.waiting else None
            c.waiting = containers.missing_image_waiting(
                image=image, policy=containers.pull_policy(c.spec), previous=previous
            )
            c.next_retry = time.monotonic() + 5.0
            return
        name = containers.container_name(
            namespace=run.namespace, pod=run.name, uid=run.uid, container=c.name, attempt=c.restart_count
        )
        cidfile, conmon_pidfile = c.dir / "cid", c.dir / "conmon.pid"
        try:
            self.prepare(run)
            env = self.container_env(run.pod, c.spec)
            argv, imported = containers.run_argv(
                podman=self.podman.binary, name=name, image=image, pod=run.pod, container=c.spec, info=info,
                env=env, mounts=run.mounts[c.name], cidfile=cidfile, conmon_pidfile=conmon_pidfile,
                seccomp_dir=self.podman.seccomp_dir, cluster_label=self.podman.cluster_label, expand=expand_vars,
                network=f"ns:/run/netns/{run.address.netns}" if run.address is not None else "host",
            )  # fmt: skip
        except (ConfigError, containers.ContainerConfigError) as err:
            c.waiting = ("CreateContainerConfigError", str(err))
            c.next_retry = time.monotonic() + 2.0
            return
        for stale in (cidfile, conmon_pidfile):
            stale.unlink(missing_ok=True)
        self.podman.remove(name, wait=True)  # a container of that name left by a killed pod runner
        mode = "ab" if c.restart_count else "wb"
        with open(c.log_path, mode) as logf:
            c.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                start_new_session=True, close_fds=True, env=self.podman.env(imported),
            )  # fmt: skip
        (self.dir / "pids" / "pods" / f"{run.uid}_{c.name}.pid").write_text(f"{c.proc.pid}\n")
        self.live_logs.add(c.log_path)
        c.podman_name, c.image_id, c.stop_signal = name, info.image_id, info.stop_signal
        c.container_id, c.host_pid, c.kill_escalated = None, None, False
        c.started_at = now_rfc3339()
        c.finished_at = c.exit_code = c.reason = c.message = None
        c.waiting = None
        log.info("started %s/%s in container %s", pod_key(run.pod), c.name, name)

    def container_started(self, run: PodRun, c: ContainerRun) -> bool:
        """Container mode: picks up the container's id and host pid once podman has them; True
        when that changed what the status shows. The pid file then holds the container's init
        (its process group leader), so `hack/cluster.py down` can kill it as it kills processes."""
        if c.proc is None or (c.container_id is not None and c.host_pid is not None):
            return False
        changed = False
        if c.container_id is None:
            with contextlib.suppress(OSError):
                cid = (c.dir / "cid").read_text().strip()
                if cid:
                    c.container_id = f"podman://{cid}"
                    changed = True
        if c.host_pid is None:
            pid = containers.container_pid(c.dir / "conmon.pid")
            if pid is not None:
                c.host_pid = pid
                (self.dir / "pids" / "pods" / f"{run.uid}_{c.name}.pid").write_text(f"{pid}\n")
        return changed

    def signal_container(self, c: ContainerRun, *, kill: bool) -> None:
        """SIGTERM (the image's STOPSIGNAL) or SIGKILL to a container or a process."""
        if c.proc is None or c.proc.poll() is not None:
            return
        if self.podman is not None and c.podman_name is not None:
            self.podman.signal(c.podman_name, "KILL" if kill else c.stop_signal)
            if kill and c.kill_escalated:  # podman could not reach it: end the client, remove it
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                self.podman.remove(c.podman_name)
            c.kill_escalated = kill
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(c.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)

    def forget_pid(self, run: PodRun, c: ContainerRun) -> None:
        self.live_logs.discard(c.log_path)
        (self.dir / "pids" / "pods" / f"{run.uid}_{c.name}.pid").unlink(missing_ok=True)

    def collect_exit(self, run: PodRun, c: ContainerRun) -> None:
        assert c.proc is not None
        code = c.proc.returncode
        if code < 0:
            code = 128 - code  # killed by signal N -> 128+N
        c.exit_code = code
        c.finished_at = now_rfc3339()
        self.forget_pid(run, c)
        start_error = c.dir / "start-error"
        if self.podman is not None and c.podman_name is not None:
            self.collect_container_exit(c, code)
        elif code == 128 and start_error.exists():
            c.reason, c.message = "StartError", start_error.read_text()
        else:
            c.reason = "Completed" if code == 0 else "Error"
            c.message = self.termination_message(c)
        c.proc = None

    def collect_container_exit(self, c: ContainerRun, code: int) -> None:
        """Container mode: the runtime's account of the exit (start errors, OOM), then removal."""
        assert self.podman is not None and c.podman_name is not None
        state = (self.podman.inspect(c.podman_name) or {}).get("State") or {}
        if c.container_id is None:
            with contextlib.suppress(OSError):
                cid = (c.dir / "cid").read_text().strip()
                c.container_id = f"podman://{cid}" if cid else None
        try:
            tail = c.log_path.read_bytes()[-4096:].decode(errors="replace")
        except OSError:
            tail = ""
        error = str(state.get("Error") or "") or (
            containers.runtime_error(tail) if code in containers.PODMAN_ERROR_CODES else None
        )
        never_ran = not state or str(state.get("StartedAt", "")).startswith("0001-")
        if error and (never_ran or code in containers.PODMAN_ERROR_CODES):
            c.exit_code, c.reason, c.message = 128, "StartError", error
        else:
            if state and isinstance(state.get("ExitCode"), int):
                c.exit_code = code = int(state["ExitCode"])
            c.reason = "OOMKilled" if state.get("OOMKilled") else ("Completed" if code == 0 else "Error")
            c.message = self.termination_message(c)
        self.podman.remove(c.podman_name)

    def termination_message(self, c: ContainerRun) -> str | None:
        try:
            data = (c.dir / "termination-log").read_bytes()[:4096]
        except OSError:
            data = b""
        if (
            not data.strip()
            and c.exit_code
            and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        ):
            try:
                tail = c.log_path.read_bytes()[-2048:]
            except OSError:
                tail = b""
            data = b"\n".join(tail.splitlines()[-80:])
        text = data.decode(errors="replace")
        return text or None

    def terminate(self, run: PodRun, *, grace: int) -> None:
        run.terminating = True
        run.kill_deadline = time.monotonic() + max(0, grace)
        for c in run.init + run.main:
            self.signal_container(c, kill=False)
        log.info("terminating %s (grace %ss)", pod_key(run.pod), grace)

    def restart_policy(self, run: PodRun) -> str:
        return str(run.pod["spec"].get("restartPolicy", "Always"))

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

    def advance(self, run: PodRun, now: float) -> bool:
        """Moves a pod along: init containers one by one, then the main ones; True if it changed."""
        policy = self.restart_policy(run)
        if run.stage == "init":
            for c in run.init:
                if c.exit_code == 0 and c.proc is None:
                    continue
                if c.proc is not None:
                    return False
                if c.exit_code is not None:  # failed
                    if policy == "Never":
                        self.finish(run, deleted=False)
                        return False
                    if not self.backoff(c, now):
                        return False
                if now < c.next_retry:
                    return False
                before = c.waiting
                self.start_container(run, c)
                return c.proc is not None or c.waiting != before
            run.stage = "main"
        if run.stage == "main":
            changed = False
            for c in run.main:
                if c.proc is not None:
                    continue
                if c.exit_code is not None:
                    wants_restart = policy == "Always" or (policy == "OnFailure" and c.exit_code != 0)
                    if not wants_restart or not self.backoff(c, now):
                        continue
                if now < c.next_retry:
                    continue
                before = c.waiting
                self.start_container(run, c)
                changed = changed or c.proc is not None or c.waiting != before
            if all(c.proc is None and c.exit_code is not None and c.restart_at is None for c in run.main):
                policy_done = policy == "Never" or (
                    policy == "OnFailure" and all(c.exit_code == 0 for c in run.main)
                )
                if policy_done:
                    self.finish(run, deleted=False)
                    return False
            return changed
        return False

    def backoff(self, c: ContainerRun, now: float) -> bool:
        """Restart bookkeeping (CrashLoopBackOff); True when the container may start now."""
        if c.restart_at is None:
            c.last_terminated = self.terminated_state(c)
            delay = min(30.0, 1.0 * 2**c.restart_count)
            c.restart_at = now + delay
            c.waiting = ("CrashLoopBackOff", f"back-off {delay:.0f}s restarting failed container={c.name}")
            return False
        if now < c.restart_at:
            return False
        c.restart_at = None
        c.restart_count += 1
        return True

    def finish(self, run: PodRun, *, deleted: bool) -> None:
        run.stage = "done"
        self.write_status(run)
        if deleted:
            self.delete_now(run.pod)
        self.runs.pop(run.uid, None)
        self.done.add(run.uid)
        log.info("finished %s: %s", pod_key(run.pod), self.phase(run))
        shutil.rmtree(run.dir / "volumes", ignore_errors=True)
        if self.net is not None:
            self.net.detach(uid=run.uid)

    def fail_orphan(self, pod: Obj) -> None:
        """A pod this node ran before the pod runner restarted: its processes are gone."""
        uid = pod["metadata"]["uid"]
        self.done.add(uid)
        finished = now_rfc3339()
        statuses = []
        for c in pod["spec"]["containers"]:
            statuses.append({
                "name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False,
                "restartCount": 0, "started": False,
                "state": {"terminated": {"exitCode": 137, "reason": "Error", "finishedAt": finished,
                                         "message": "the pod runner restarted; the container process is gone"}},
            })
        status = self.pod_status_base(phase="Failed", start_time=pod.get("status", {}).get("startTime") or finished,
                                      ready=False, initialized=True, completed=True)
        status["containerStatuses"] = statuses
        status["message"] = "the pod runner restarted while the pod ran"
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        self.writers.submit(uid, lambda: self._patch_status(ns, name, status))

    def delete_now(self, pod: Obj) -> None:
        ns, name, uid = pod["metadata"]["namespace"], pod["metadata"]["name"], pod["metadata"]["uid"]
        if uid in self.deleting:
            return
        self.deleting.add(uid)
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        self.writers.submit(
            uid,
            lambda: self.api.request(
                "DELETE", f"/api/v1/namespaces/{ns}/pods/{name}", body=body, ok=(404, 409)
            ),
        )

    # -- status --

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

    # -- shutdown --

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


def machine_capacity(*, gpus: int, cpu: str, memory: str, pods: int) -> dict[str, str]:
    return {
        "cpu": cpu,
        "memory": memory,
        "pods": str(pods),
        "ephemeral-storage": "100Gi",
        "nvidia.com/gpu": str(gpus),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hack/podrunner.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--cluster-dir", type=Path, default=ROOT / ".cluster")
    parser.add_argument("--node-name", default="local-node")
    parser.add_argument("--simulate", type=float, default=None, metavar="SECONDS")
    parser.add_argument(
        "--pods", choices=["process", "container"], default="process",
        help="run containers as local processes (fast) or from their images with podman + runc",
    )
    parser.add_argument(
        "--pod-network", choices=["host", "netns"], default="host",
        help="share the machine's network (default) or give each pod a network namespace on a bridge (hack/podnet.py)",
    )
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--cpu", default="16", help="advertised CPU capacity (pods are not limited)")
    parser.add_argument("--memory", default="64Gi", help="advertised memory capacity")
    parser.add_argument("--max-pods", type=int, default=5000)
    parser.add_argument("--kubelet-port", type=int, default=10250, help="the `kubectl logs` endpoint (HTTPS)")
    parser.add_argument(
        "--no-bind", action="store_true", help="only run pods already bound to this node (a second runner)"
    )
    parser.add_argument("--tls-dir", type=Path, default=None, help="ca.crt, kubelet.crt/key for that endpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    if os.geteuid() != 0 and args.simulate is None:
        log.error("the pod runner needs root for mount namespaces (or use --simulate)")
        return 1
    runner = PodRunner(
        api=Api(kubeconfig=args.kubeconfig),
        cluster_dir=args.cluster_dir.resolve(),
        node_name=args.node_name,
        capacity=machine_capacity(gpus=args.gpus, cpu=args.cpu, memory=args.memory, pods=args.max_pods),
        simulate=args.simulate,
        kubelet_port=args.kubelet_port,
        bind=not args.no_bind,
        pods=args.pods,
        network=args.pod_network,
    )
    if args.tls_dir is not None:
        LogServer(
            logs_dir=runner.dir / "logs", tls_dir=args.tls_dir, port=args.kubelet_port, live=runner.live_logs
        ).start()

    def on_signal(signum: int, _frame: object) -> None:
        runner.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    runner.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
