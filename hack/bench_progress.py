"""`make bench` section `progress`: the operator's progress endpoint under load.

Figures (the issue's targets in brackets):

  (a) status writes per running job per second under a steady stream of reports  [<= 0.2]
  (b) p95 latency from a trainer's epoch end (the report's timestamp) to the status write
      having completed, with epochs more than 5 s apart                            [<= 2 s]
  (c) the report rate the endpoint sustains with 100 concurrent jobs, and the CPU of the
      process serving it: at a realistic 1 report/s per job, and flat out (rate limit off)

  (d) the same for the real `finetune-operator` process (Kopf, its handlers, the hub) with
      100 FineTuneJobs, whose own status writes trigger its watches: CPU idle, at 1 report/s
      per job, and flat out against the default per-job rate limit (apiserver only)

For (a)-(c) each job has a fixed token that the hub's `authenticate` compares in constant time
(what the operator's TokenReview check costs once its verdict is cached: the first report of a
pod and token pays one TokenReview and two reads, every later one a hash and a dict lookup);
(d) runs the real check, with tokens bound to the jobs' pods as the kubelet would mint them.

For (a)-(c) the hub runs in a subprocess of its own (this file with `--serve`), exactly as the operator
runs it (`ProgressHub` inside an asyncio loop), so its CPU is measured apart from the load
generator. Its `patch_status` writes to the real apiserver of the local control plane
(`.cluster/kubeconfig`, a merge patch of the FineTuneJob status subresource, through the
kubernetes client in a thread like the operator) when the cluster is up and the CRD can be
installed; otherwise it records writes in memory. The output says which. Both processes
share the same (small) machine, so the flat-out rate is a floor, not a ceiling.

Usage: `python hack/bench.py progress` or
`python hack/bench_progress.py [--quick] [--recorder] [--kubeconfig FILE]`.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import itertools
import json
import logging
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from finetune_testbed.net import free_port

ROOT = Path(__file__).resolve().parent.parent

# The local control plane's admin kubeconfig ($FTO_CLUSTER_DIR moves .cluster/; --kubeconfig wins).
KUBECONFIG = Path(os.environ.get("FTO_CLUSTER_DIR", str(ROOT / ".cluster"))) / "kubeconfig"
PatchStatus = Callable[..., Awaitable[None]]


# ---------------------------------------------------------------- the hub process (--serve)


def _apiserver_patch_status(kubeconfig: str) -> PatchStatus:
    from finetune_operator import api
    from kubernetes import client, config

    cfg = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    cfg.connection_pool_maxsize = 32
    objects = client.CustomObjectsApi(client.ApiClient(cfg))

    async def patch_status(*, namespace: str, name: str, status: dict[str, Any]) -> None:
        await asyncio.to_thread(
            objects.patch_namespaced_custom_object_status,
            api.API_GROUP,
            api.API_VERSION,
            namespace,
            api.PLURAL,
            name,
            {"status": status},
        )

    return patch_status


async def _serve(args: argparse.Namespace) -> None:
    from finetune_operator.progress import ProgressHub

    logging.basicConfig(level=logging.ERROR)  # failed writes are counted and summarised, not logged each
    jobs = json.loads(Path(args.jobs_file).read_text())
    writes: list[list[Any]] = []
    inner: PatchStatus | None = (
        _apiserver_patch_status(args.kubeconfig) if args.backend == "apiserver" else None
    )

    failures = [0]
    reasons: dict[str, int] = {}

    async def patch_status(*, namespace: str, name: str, status: dict[str, Any]) -> None:
        started = time.time()
        if inner is not None:
            try:
                await inner(namespace=namespace, name=name, status=status)
            except Exception as exc:
                failures[0] += 1
                why = (
                    f"{type(exc).__name__} {getattr(exc, 'status', '')} {getattr(exc, 'reason', '')}".strip()
                )
                reasons[why] = reasons.get(why, 0) + 1
                raise
        writes.append([namespace, name, status.get("stage"), status.get("epoch"), time.time(), started])

    from finetune_operator.tokens import Verdict

    tokens = {(j["namespace"], j["name"]): j.pop("token") for j in jobs}

    async def authenticate(*, token: str, namespace: str, name: str, uid: str) -> Verdict:
        if hmac.compare_digest(token.encode(), tokens.get((namespace, name), "").encode()):
            return Verdict("ok")
        return Verdict("unauthorized", "invalid token")

    hub = ProgressHub(
        patch_status=patch_status,
        authenticate=authenticate,
        min_write_interval_s=args.interval,
        rate_per_s=args.rate,
        burst=args.burst,
    )
    for job in jobs:
        hub.register(**job)
    port = await hub.start(host="127.0.0.1", port=0)
    print(f"PORT {port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    await hub.stop()
    Path(args.stats_file).write_text(
        json.dumps({"writes": writes, "failed": failures[0], "reasons": reasons})
    )


# ---------------------------------------------------------------- the load generator


# Planned epochs of each stage: more than any run of the bench sends, within protocol.MAX_EPOCHS
# (the hub refuses reports that do not fit the job's plan).
STAGE_EPOCHS = 100_000


@dataclass
class Job:
    namespace: str
    name: str
    uid: str
    token: str
    total_epochs: int = 2 * STAGE_EPOCHS


@dataclass
class Load:
    sent: list[tuple[str, str, str, int, float]] = field(default_factory=list)  # epoch-end reports
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)  # HTTP round trips


class HubProcess:
    """The hub in a subprocess; `stop()` returns its writes."""

    def __init__(self, *, jobs: list[Job], backend: str, interval: float, rate: float, burst: int) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="bench-progress-")
        jobs_file = Path(self._dir.name) / "jobs.json"
        jobs_file.write_text(
            json.dumps(
                [
                    {
                        "namespace": j.namespace,
                        "name": j.name,
                        "uid": j.uid,
                        "token": j.token,
                        "total_epochs": j.total_epochs,
                    }
                    for j in jobs
                ]
            )
        )
        self._stats = Path(self._dir.name) / "stats.json"
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--serve",
            f"--jobs-file={jobs_file}",
            f"--stats-file={self._stats}",
            f"--backend={backend}",
            f"--kubeconfig={KUBECONFIG}",
            f"--interval={interval}",
            f"--rate={rate}",
            f"--burst={burst}",
        ]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "contract"), str(ROOT / "operator"), str(ROOT / "trainer")])}
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"hub process did not start: {line!r}")
        self.port = int(line.split()[1])

    def cpu_seconds(self) -> float:
        import psutil

        times = psutil.Process(self.proc.pid).cpu_times()
        return float(times.user + times.system)

    def stop(self) -> list[list[Any]]:
        """Stops the hub; returns its completed writes (failed ones are added to `failed_writes`)."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        stats = json.loads(self._stats.read_text())
        self._dir.cleanup()
        HubProcess.failed_writes += int(stats["failed"])
        for why, n in stats["reasons"].items():
            HubProcess.failure_reasons[why] = HubProcess.failure_reasons.get(why, 0) + n
        writes: list[list[Any]] = stats["writes"]
        return writes

    failed_writes = 0
    failure_reasons: ClassVar[dict[str, int]] = {}


async def _drive(
    *,
    port: int,
    jobs: list[Job],
    plan: Callable[[Job, int], float | None],
    stage_switch: int,
    load: Load,
) -> None:
    """Each job sends epoch-end reports; `plan(job, i)` gives the pause before report i (None: stop)."""
    import aiohttp
    from finetune_contract import protocol

    url = f"http://127.0.0.1:{port}{protocol.PROGRESS_PATH}"
    connector = aiohttp.TCPConnector(limit=len(jobs) + 10)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(job: Job) -> None:
            i = 0
            headers = {"Authorization": f"Bearer {job.token}"}
            while (pause := plan(job, i)) is not None:
                if pause > 0:
                    await asyncio.sleep(pause)
                stage = "head" if i < stage_switch else "fine-tune"
                epoch = i + 1 if i < stage_switch else i + 1 - stage_switch
                now = time.time()
                body = {
                    "namespace": job.namespace,
                    "name": job.name,
                    "uid": job.uid,
                    "event": "epoch-end",
                    "stage": stage,
                    "epoch": epoch,
                    "stageEpochs": STAGE_EPOCHS,
                    "epochsDone": min(i + 1, job.total_epochs),
                    "totalEpochs": job.total_epochs,
                    "metrics": {"loss": 0.5, "accuracy": 0.8, "val_loss": 0.6, "val_accuracy": 0.7},
                    "imagesPerSecond": 100.0,
                    "epochSeconds": 5.5,
                    "timestamp": now,
                }
                t0 = time.monotonic()
                try:
                    async with session.post(url, json=body, headers=headers) as resp:
                        await resp.read()
                        status = resp.status
                except aiohttp.ClientError:
                    status = 0
                load.latencies.append(time.monotonic() - t0)
                load.statuses[status] = load.statuses.get(status, 0) + 1
                if status == 202:
                    load.sent.append((job.namespace, job.name, stage, epoch, now))
                i += 1

        await asyncio.gather(*(one(j) for j in jobs))


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _write_latencies(sent: list[tuple[str, str, str, int, float]], writes: list[list[Any]]) -> list[float]:
    """For each accepted epoch end, the time until a write showing it (or a later epoch) completed."""
    order = {"head": 0, "fine-tune": 1}
    by_job: dict[tuple[str, str], list[tuple[int, int, float]]] = {}
    for ns, name, stage, epoch, t, _ in writes:
        by_job.setdefault((ns, name), []).append((order.get(stage, 0), int(epoch or 0), float(t)))
    out = []
    for ns, name, stage, epoch, t_sent in sent:
        key = (order[stage], epoch)
        done = [t for s, e, t in by_job.get((ns, name), []) if (s, e) >= key and t >= t_sent]
        if done:
            out.append(min(done) - t_sent)
    return out


# ---------------------------------------------------------------- backends


class Backend:
    """Where status writes go: the local apiserver (FineTuneJobs made for the bench) or memory."""

    def __init__(self, *, force_recorder: bool, count: int) -> None:
        self.kind = "recorder"
        self.why = "forced by --recorder" if force_recorder else ""
        self.namespace = f"bench-progress-{uuid.uuid4().hex[:6]}"
        self.jobs = [
            Job(namespace=self.namespace, name=f"bench-{i:03d}", uid="", token=uuid.uuid4().hex)
            for i in range(count)
        ]
        self._objects: Any = None
        self._core: Any = None
        if not force_recorder:
            try:
                self._setup_apiserver()
                self.kind = "apiserver"
            except Exception as exc:
                self.why = f"local control plane not usable: {type(exc).__name__}: {str(exc)[:120]}"

    def _setup_apiserver(self) -> None:
        from finetune_operator import api, crd
        from kubernetes import client, config

        if not KUBECONFIG.exists():
            raise RuntimeError(f"{KUBECONFIG} missing (make cluster-up)")
        cfg = client.Configuration()
        config.load_kube_config(config_file=str(KUBECONFIG), client_configuration=cfg)
        cfg.retries = 0
        api_client = client.ApiClient(cfg)
        core: Any = client.CoreV1Api(api_client)  # dict bodies: the client accepts them, its stubs do not
        core.list_namespace(limit=1, _request_timeout=3)
        ext: Any = client.ApiextensionsV1Api(api_client)
        crd_name = f"{api.PLURAL}.{api.API_GROUP}"
        try:
            ext.read_custom_resource_definition(crd_name)
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            ext.create_custom_resource_definition(crd.build_crd())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = ext.read_custom_resource_definition(crd_name)
            conditions = {c.type: c.status for c in (got.status.conditions or [])}
            if conditions.get("Established") == "True":
                break
            time.sleep(0.2)
        core.create_namespace(
            {"metadata": {"name": self.namespace, "labels": {"finetune.dev/bench": "progress"}}}
        )
        objects: Any = client.CustomObjectsApi(api_client)
        spec = {
            "model": {"base": "MobileNetV2", "weights": "none"},
            "data": {"train": "/data/train", "validationSplit": 0.2},
            "output": {"path": "/models/bench"},
        }
        for job in self.jobs:
            body = {
                "apiVersion": f"{api.API_GROUP}/{api.API_VERSION}",
                "kind": api.KIND,
                "metadata": {"name": job.name, "namespace": job.namespace},
                "spec": spec,
            }
            made = objects.create_namespaced_custom_object(
                api.API_GROUP, api.API_VERSION, job.namespace, api.PLURAL, body
            )
            job.uid = made["metadata"]["uid"]
        self._core = core
        self._objects = objects

    def close(self) -> None:
        if self._core is not None:
            self._core.delete_namespace(self.namespace)


# ---------------------------------------------------------------- the figures


def part_a(backend: Backend, *, jobs: int, seconds: float) -> dict[str, Any]:
    chosen = backend.jobs[:jobs]
    hub = HubProcess(jobs=chosen, backend=backend.kind, interval=5.0, rate=2.0, burst=10)
    load = Load()
    n = int(seconds)  # one epoch end per job per second (stage changes, written at once by design, left out)
    t0 = time.time()
    asyncio.run(
        _drive(
            port=hub.port,
            jobs=chosen,
            plan=lambda job, i: (random.uniform(0, 1.0) if i == 0 else 1.0) if i < n else None,
            stage_switch=10**9,
            load=load,
        )
    )
    t_end = time.time()
    elapsed = t_end - t0
    # Leave out the flush of what is pending when the hub stops (the operator's shutdown).
    writes = [w for w in hub.stop() if w[5] <= t_end]
    per_job = len(writes) / len(chosen) / elapsed
    # Steady state: per job, (writes - 1) over the span from its first to its last write, and
    # the smallest gap between two writes of one job (the window says >= 5 s), by the time
    # each write was sent to the apiserver.
    times: dict[str, list[float]] = {}
    for _, name, _, _, _, started in writes:
        times.setdefault(name, []).append(float(started))
    rates: list[float] = []
    gaps: list[float] = []
    for ts in times.values():
        ts.sort()
        if len(ts) > 1:
            rates.append((len(ts) - 1) / (ts[-1] - ts[0]))
            gaps.extend(b - a for a, b in itertools.pairwise(ts))
    steady_rate = statistics.fmean(rates) if rates else math.nan
    return {
        "jobs": len(chosen),
        "seconds": elapsed,
        "reports": sum(load.statuses.values()),
        "accepted": load.statuses.get(202, 0),
        "writes": len(writes),
        "writes_per_job_s": per_job,
        "steady_writes_per_job_s": steady_rate,
        "min_gap_s": min(gaps) if gaps else math.nan,
    }


def part_b(backend: Backend, *, jobs: int, epochs: int) -> dict[str, Any]:
    chosen = backend.jobs[:jobs]
    hub = HubProcess(jobs=chosen, backend=backend.kind, interval=5.0, rate=2.0, burst=10)
    load = Load()
    asyncio.run(
        _drive(
            port=hub.port,
            jobs=chosen,
            plan=lambda job, i: (
                (random.uniform(0, 5.5) if i == 0 else random.uniform(5.2, 6.0)) if i < epochs else None
            ),
            stage_switch=max(1, epochs // 2),
            load=load,
        )
    )
    writes = hub.stop()
    lat = _write_latencies(load.sent, writes)
    return {
        "jobs": len(chosen),
        "samples": len(lat),
        "missing": len(load.sent) - len(lat),
        "p50": _percentile(lat, 0.50),
        "p95": _percentile(lat, 0.95),
        "max": max(lat) if lat else math.nan,
    }


def part_c(backend: Backend, *, jobs: int, seconds: float, flat_out: bool) -> dict[str, Any]:
    chosen = backend.jobs[:jobs]
    rate, burst = (1e9, 10**9) if flat_out else (2.0, 10)
    hub = HubProcess(jobs=chosen, backend=backend.kind, interval=5.0, rate=rate, burst=burst)
    load = Load()
    deadline = time.monotonic() + seconds

    def plan(job: Job, i: int) -> float | None:
        if time.monotonic() >= deadline:
            return None
        if flat_out:
            return 0.0
        return random.uniform(0, 1.0) if i == 0 else 1.0

    cpu0, t0 = hub.cpu_seconds(), time.monotonic()
    asyncio.run(_drive(port=hub.port, jobs=chosen, plan=plan, stage_switch=10**9, load=load))
    cpu1, t1 = hub.cpu_seconds(), time.monotonic()
    writes = hub.stop()
    wall = t1 - t0
    return {
        "jobs": len(chosen),
        "seconds": wall,
        "reports_per_s": sum(load.statuses.values()) / wall,
        "accepted_per_s": load.statuses.get(202, 0) / wall,
        "errors": {k: v for k, v in load.statuses.items() if k != 202},
        "cpu_percent": 100.0 * (cpu1 - cpu0) / wall,
        "reports_per_cpu_s": sum(load.statuses.values()) / max(cpu1 - cpu0, 1e-9),
        "http_p50_ms": 1000 * _percentile(load.latencies, 0.5),
        "http_p99_ms": 1000 * _percentile(load.latencies, 0.99),
        "writes_per_s": len(writes) / wall,
    }


def _scrape(url: str) -> dict[str, float]:
    """`name{labels}` -> value from a Prometheus text exposition."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def part_d(*, jobs: int, seconds: float, flat_seconds: float) -> dict[str, Any]:
    """The real `finetune-operator` process (Kopf, handlers, hub) with `jobs` FineTuneJobs whose
    pods wait on an image pull: its CPU idle, at 1 report/s per job, and flat out (default
    rate limit: at most 2 reports/s per job are accepted)."""
    import psutil
    from finetune_operator import api
    from kubernetes import client, config

    cfg = client.Configuration()
    config.load_kube_config(config_file=str(KUBECONFIG), client_configuration=cfg)
    api_client = client.ApiClient(cfg)
    core: Any = client.CoreV1Api(api_client)
    objects: Any = client.CustomObjectsApi(api_client)
    namespace = f"bench-operator-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": namespace, "labels": {"finetune.dev/bench": "progress"}}})
    progress_port, metrics_port, health_port = free_port(), free_port(), free_port()
    from finetune_testbed import operator_proc

    log = Path(tempfile.mkstemp(prefix="bench-operator-", suffix=".log")[1])
    proc = operator_proc.start(
        args=[
            f"--namespace={namespace}",
            "--progress-host=127.0.0.1",
            f"--progress-port={progress_port}",
            f"--progress-url=http://127.0.0.1:{progress_port}/v1/progress",
            "--metrics-host=127.0.0.1",
            f"--metrics-port={metrics_port}",
            "--pending-timeout=3600",
        ],
        kubeconfig=KUBECONFIG,
        health_port=health_port,
        log=log,
        env={"PYTHONPATH": os.pathsep.join([str(ROOT / "contract"), str(ROOT / "operator"), str(ROOT / "trainer")])},
    )
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    chosen = [
        Job(namespace=namespace, name=f"op-{i:03d}", uid="", token="") for i in range(jobs)
    ]
    try:
        for job in chosen:
            body = {
                "apiVersion": f"{api.API_GROUP}/{api.API_VERSION}",
                "kind": api.KIND,
                "metadata": {"name": job.name, "namespace": namespace},
                "spec": {
                    "model": {"base": "MobileNetV2", "weights": "none"},
                    "data": {"train": "/data/train", "validationSplit": 0.2},
                    "training": {"head": {"epochs": STAGE_EPOCHS}, "fineTune": {"epochs": STAGE_EPOCHS}},
                    "output": {"path": f"/models/{job.name}"},
                    "runtime": {"image": "registry.invalid/finetune-trainer:0", "gpus": 0},
                },
            }
            made = objects.create_namespaced_custom_object(
                api.API_GROUP, api.API_VERSION, namespace, api.PLURAL, body
            )
            job.uid = made["metadata"]["uid"]
        # Each job's token as the kubelet would project it: bound to the job's pod, for its audience.
        from finetune_contract import protocol

        deadline = time.monotonic() + 300
        pending = list(chosen)
        while pending and time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"operator exited {proc.returncode}; log: {log}")
            pods = {
                (p.metadata.labels or {}).get("finetune.dev/job"): p
                for p in core.list_namespaced_pod(namespace, label_selector="finetune.dev/job").items
            }
            for job in list(pending):
                pod = pods.get(job.name)
                if pod is None:
                    continue
                request = client.AuthenticationV1TokenRequest(
                    spec=client.V1TokenRequestSpec(
                        audiences=[protocol.progress_audience(job.uid)],
                        expiration_seconds=3600,
                        bound_object_ref=client.V1BoundObjectReference(
                            api_version="v1", kind="Pod", name=pod.metadata.name, uid=pod.metadata.uid
                        ),
                    )
                )
                answer = core.create_namespaced_service_account_token(
                    pod.spec.service_account_name or "default", namespace, request
                )
                job.token = answer.status.token
                pending.remove(job)
            time.sleep(0.5)
        if pending:
            raise RuntimeError(f"{len(pending)} jobs never got their pod; log: {log}")
        asyncio.run(_wait_registered(port=progress_port, jobs=chosen))
        ps = psutil.Process(proc.pid)

        def cpu() -> float:
            times = ps.cpu_times()
            return float(times.user + times.system)

        settle = 5.0
        c0, t0 = cpu(), time.monotonic()
        time.sleep(settle)
        idle = 100.0 * (cpu() - c0) / (time.monotonic() - t0)

        results: dict[str, Any] = {"jobs": jobs, "idle_cpu_percent": idle, "log": str(log)}
        for label, flat, span in (("steady", False, seconds), ("flat", True, flat_seconds)):
            before = _scrape(metrics_url)
            load = Load()
            stop_at = time.monotonic() + span

            def plan(job: Job, i: int, flat: bool = flat, stop_at: float = stop_at) -> float | None:
                if time.monotonic() >= stop_at:
                    return None
                return 0.0 if flat else (random.uniform(0, 1.0) if i == 0 else 1.0)

            c0, t0 = cpu(), time.monotonic()
            asyncio.run(_drive(port=progress_port, jobs=chosen, plan=plan, stage_switch=10**9, load=load))
            c1, t1 = cpu(), time.monotonic()
            after = _scrape(metrics_url)
            wall = t1 - t0
            writes_key = 'finetune_status_writes_total{source="progress"}'
            reconcile_key = 'finetune_status_writes_total{source="reconcile"}'
            results[label] = {
                "seconds": wall,
                "reports_per_s": sum(load.statuses.values()) / wall,
                "accepted_per_s": load.statuses.get(202, 0) / wall,
                "refused": {k: v for k, v in load.statuses.items() if k != 202},
                "cpu_percent": 100.0 * (c1 - c0) / wall,
                "progress_writes_per_s": (after.get(writes_key, 0) - before.get(writes_key, 0)) / wall,
                "reconcile_writes_per_s": (after.get(reconcile_key, 0) - before.get(reconcile_key, 0)) / wall,
                "http_p99_ms": 1000 * _percentile(load.latencies, 0.99),
            }
        return results
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        core.delete_namespace(namespace)
        api_client.close()


async def _wait_registered(*, port: int, jobs: list[Job], timeout: float = 120.0) -> None:
    """Until the hub knows every job: an expired report is refused with 400 instead of 404."""
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/progress"
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        for job in jobs:
            body = {
                "namespace": job.namespace,
                "name": job.name,
                "event": "heartbeat",
                "stage": "head",
                "epoch": 0,
                "stageEpochs": 1,
                "epochsDone": 0,
                "totalEpochs": 1,
                "timestamp": 0.0,
            }
            while True:
                async with session.post(
                    url, json=body, headers={"Authorization": f"Bearer {job.token}"}
                ) as resp:
                    if resp.status == 400:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{job.name} never registered with the operator's hub")
                await asyncio.sleep(0.2)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_progress", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (noisier figures)")
    parser.add_argument("--recorder", action="store_true", help="never write to the apiserver")
    parser.add_argument("--no-operator", action="store_true", help="skip (d), the real operator process")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--kubeconfig", help="the cluster to write status to (default: the local control plane's)"
    )
    for flag in ("--jobs-file", "--stats-file", "--backend"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    parser.add_argument("--interval", type=float, default=5.0, help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=2.0, help=argparse.SUPPRESS)
    parser.add_argument("--burst", type=int, default=10, help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args(argv)
    if args.serve:
        asyncio.run(_serve(args))
        return 0
    if args.kubeconfig:
        global KUBECONFIG
        KUBECONFIG = Path(args.kubeconfig)

    started = False
    if not args.recorder and not args.kubeconfig:
        cluster_py = [sys.executable, str(ROOT / "hack" / "cluster.py")]
        if subprocess.run([*cluster_py, "status"], capture_output=True, check=False, cwd=ROOT).returncode != 0:
            # (d) and the apiserver backend need the local control plane: bring it up for this run.
            up = subprocess.run([*cluster_py, "up"], capture_output=True, text=True, check=False, cwd=ROOT)
            started = up.returncode == 0
            if not started:
                print(f"local control plane did not start: {up.stderr.strip()[-300:]}", flush=True)
    try:
        return _run(args)
    finally:
        if started:
            subprocess.run([*cluster_py, "down"], capture_output=True, check=False, cwd=ROOT)


def _run(args: argparse.Namespace) -> int:
    quick = args.quick
    backend = Backend(force_recorder=args.recorder, count=100)
    where = (
        "local apiserver (merge patch of FineTuneJob status)"
        if backend.kind == "apiserver"
        else "in-memory recorder"
    )
    print(f"status writes go to: {where}" + (f" ({backend.why})" if backend.why else ""), flush=True)
    try:
        a = part_a(backend, jobs=10 if quick else 20, seconds=15 if quick else 30)
        b = part_b(backend, jobs=20 if quick else 40, epochs=3 if quick else 4)
        c1 = part_c(backend, jobs=100, seconds=8 if quick else 15, flat_out=False)
        c2 = part_c(backend, jobs=100, seconds=6 if quick else 10, flat_out=True)
    finally:
        backend.close()
    d: dict[str, Any] | None = None
    if backend.kind == "apiserver" and not args.no_operator:
        try:
            d = part_d(jobs=100, seconds=8 if quick else 15, flat_seconds=6 if quick else 10)
        except Exception as exc:
            print(f"(d) the real operator could not be measured: {type(exc).__name__}: {exc}", flush=True)

    ok_a = a["steady_writes_per_job_s"] <= 0.2 + 1e-6 and a["min_gap_s"] >= 5.0 - 1e-3
    ok_b = b["p95"] <= 2.0
    rows = [
        (
            "(a) status writes / running job / s",
            f"{a['steady_writes_per_job_s']:.3f} steady ({a['writes_per_job_s']:.3f} incl. 1st write)",
            "<= 0.2",
            "ok" if ok_a else "MISSED",
            f"{a['jobs']} jobs x 1 epoch-end/s for {a['seconds']:.0f}s; {a['writes']} writes, min gap {a['min_gap_s']:.2f}s",
        ),
        (
            "(b) epoch end -> status written, p95",
            f"{b['p95']:.3f} s (p50 {b['p50']:.3f}, max {b['max']:.3f})",
            "<= 2 s",
            "ok" if ok_b else "MISSED",
            f"{b['jobs']} jobs, epochs 5.2-6.0 s apart, {b['samples']} samples, {b['missing']} unmatched",
        ),
        (
            "(c) 100 jobs at 1 report/s each",
            f"{c1['accepted_per_s']:.0f} accepted/s, hub CPU {c1['cpu_percent']:.1f}%",
            "",
            "",
            f"HTTP p50 {c1['http_p50_ms']:.1f} ms p99 {c1['http_p99_ms']:.1f} ms; "
            f"{c1['writes_per_s']:.1f} writes/s; refused {c1['errors'] or 'none'}",
        ),
        (
            "(c) 100 jobs flat out (rate limit off)",
            f"{c2['accepted_per_s']:.0f} accepted/s, hub CPU {c2['cpu_percent']:.1f}%",
            "",
            "",
            f"HTTP p50 {c2['http_p50_ms']:.1f} ms p99 {c2['http_p99_ms']:.1f} ms; "
            f"{c2['writes_per_s']:.1f} writes/s; {c2['reports_per_cpu_s']:.0f} reports per hub CPU-second; "
            "the load generator shares the CPUs",
        ),
    ]
    if d is not None:
        for label, title in (
            ("steady", "(d) operator, 100 jobs x 1 report/s"),
            ("flat", "(d) operator, 100 jobs flat out"),
        ):
            row = d[label]
            rows.append(
                (
                    title,
                    f"{row['accepted_per_s']:.0f} accepted/s, operator CPU {row['cpu_percent']:.1f}%",
                    "",
                    "",
                    f"idle CPU {d['idle_cpu_percent']:.1f}%; {row['reports_per_s']:.0f} reports/s sent, refused "
                    f"{row['refused'] or 'none'}; {row['progress_writes_per_s']:.1f} progress + "
                    f"{row['reconcile_writes_per_s']:.1f} reconcile writes/s; HTTP p99 {row['http_p99_ms']:.0f} ms",
                )
            )
    if HubProcess.failed_writes:
        print(
            f"WARNING: {HubProcess.failed_writes} status writes failed ({HubProcess.failure_reasons}); "
            "figures are suspect"
        )
    width = max(len(r[0]) for r in rows)
    print(f"{'figure':{width}}  {'measured':52}  {'target':7}  {'':6}  notes")
    for name, value, target, verdict, note in rows:
        print(f"{name:{width}}  {value:52}  {target:7}  {verdict:6}  {note}")
    return 0 if ok_a and ok_b and not HubProcess.failed_writes else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
