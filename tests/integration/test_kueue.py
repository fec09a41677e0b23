"""FineTuneJobs under the real Kueue (v0.14.8, hack/cluster.py runs it with its webhooks).

The operator runs as its ServiceAccount under deploy/base/rbac.yaml, in a restricted namespace:

- a ClusterQueue with quota for one job and three FineTuneJobs: a watch on the Jobs never sees
  two of them unsuspended and unfinished at once; all Succeed; while one runs, the others are
  Pending/Queued with the QuotaReserved message of their own Workload (Kueue's words);
- a high-priority job preempts a running low-priority one (the real trainer): the low one is
  Pending/Preempted with a Preempted event, then resumes from its checkpoint (at most one
  epoch trained twice), Succeeds with `attempts: 2`, and its Job counted no failed pod;
- spec.suspend of a Kueue-managed job deactivates its Workload (spec.active false) and
  resuming activates it again; the job Succeeds; the audit log shows no write of
  `spec.suspend` to a Kueue-managed Job by the operator;
- a LocalQueue that does not exist: Pending/Queued with Kueue's "LocalQueue ... doesn't
  exist", no pod, no reconcile error, the operator alive;
- on a control plane of its own without Kueue (FTO_KUEUE=0, no Kueue CRDs) the operator starts,
  runs a plain job to Succeeded, and a job with a queue label waits with a message that says
  Kueue's Workload API is not served: no crash loop.
"""

from __future__ import annotations

import csv
import datetime
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_testbed.imagesets import write_square_folder
from fixtures import jobs
from fixtures.cluster import Cluster, ServiceAccountKubeconfig, private_cluster, wait_for
from fixtures.jobs import fake_trainer_operator, mint_kubeconfig, operator_in_namespace, restricted_namespace
from fixtures.kueue import (
    PRIORITY_LABEL,
    QUEUE_LABEL,
    KueueObjects,
    job_writes,
    require_kueue,
    workload_condition,
    workload_for_job,
)
from fixtures.operator import OperatorProcess, install_crd_and_rbac
from kubernetes import client, watch

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[2]
WAIT = 120.0
OPERATOR_USER = "system:serviceaccount:finetune-system:finetune-operator"
ONE_CPU = {"requests": {"cpu": "1"}}  # the ClusterQueues below have quota for one


@dataclass
class Env:
    cluster: Cluster
    namespace: str
    operator: OperatorProcess

    def apply(self, manifest: dict[str, Any], *, namespace: str | None = None) -> None:
        self.cluster.kubectl_run("apply", "-n", namespace or self.namespace, "-f", "-", input=yaml.safe_dump(manifest))

    def ftj(self, name: str, *, namespace: str | None = None) -> dict[str, Any]:
        got = self.cluster.get(
            f"/apis/finetune.dev/v1alpha1/namespaces/{namespace or self.namespace}/finetunejobs/{name}"
        )
        return got or {}

    def status(self, name: str, *, namespace: str | None = None) -> dict[str, Any]:
        return dict(self.ftj(name, namespace=namespace).get("status") or {})

    def job(self, name: str, *, namespace: str | None = None) -> dict[str, Any] | None:
        return self.cluster.get(f"/apis/batch/v1/namespaces/{namespace or self.namespace}/jobs/{name}")

    def events(self, name: str, *, namespace: str | None = None) -> list[str]:
        got = self.cluster.get(
            f"/api/v1/namespaces/{namespace or self.namespace}/events"
            f"?fieldSelector=involvedObject.kind%3DFineTuneJob,involvedObject.name%3D{name}"
        )
        return [e["reason"] for e in (got or {}).get("items") or []]

    def wait_phase(self, name: str, phase: str, *, timeout: float = WAIT, namespace: str | None = None) -> dict[str, Any]:
        return wait_for(
            lambda: (s := self.status(name, namespace=namespace)).get("phase") == phase and s,
            timeout=timeout,
            message=f"ftj/{name} {phase}",
        )


@pytest.fixture(scope="module")
def env(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require_kueue(cluster)
    tmp = tmp_path_factory.mktemp("kueue")
    with operator_in_namespace(cluster, tmp=tmp, prefix="ftj-kueue", pending_timeout=120) as (namespace, operator):
        yield Env(cluster=cluster, namespace=namespace, operator=operator)


@pytest.fixture
def kueue(cluster: Cluster) -> Iterator[KueueObjects]:
    """A test's own ResourceFlavor, ClusterQueue, LocalQueue and priority classes (unique names)."""
    with KueueObjects(cluster) as objects:
        yield objects


def fake(name: str, *, queue: str, sleep: float, **labels: str) -> dict[str, Any]:
    manifest = jobs.ftj(name, output=f"/tmp/out-{name}", env={"FAKE_SLEEP": str(sleep)}, resources=ONE_CPU)
    manifest["metadata"]["labels"] = {QUEUE_LABEL: queue, **labels}
    return manifest


@dataclass
class JobWatch:
    """Every Job event of a namespace, from a watch: the most Jobs ever unsuspended and unfinished at once."""

    cluster: Cluster
    namespace: str
    most: int = 0
    seen: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> JobWatch:
        api = self.cluster.api_client()
        batch = client.BatchV1Api(api)
        listed = batch.list_namespaced_job(self.namespace)
        state: dict[str, bool] = {}
        started = threading.Event()

        def loop() -> None:
            stream = watch.Watch()
            try:
                started.set()
                for event in stream.stream(batch.list_namespaced_job, self.namespace,
                                           resource_version=listed.metadata.resource_version, timeout_seconds=900):  # fmt: skip
                    job = event["object"]
                    done = {c.type for c in job.status.conditions or [] if c.status == "True"} & {
                        "Complete", "SuccessCriteriaMet", "Failed", "FailureTarget"}  # fmt: skip
                    state[job.metadata.name] = event["type"] != "DELETED" and not job.spec.suspend and not done
                    self.seen.add(job.metadata.name)
                    self.most = max(self.most, sum(state.values()))
                    if self._stop.is_set():
                        break
            finally:
                stream.stop()
                api.close()

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        started.wait(10)
        return self

    def stop(self) -> None:
        self._stop.set()


def test_one_at_a_time_within_quota_the_others_queued_with_kueues_message(env: Env, kueue: KueueObjects) -> None:
    queue = kueue.queue(namespace=env.namespace, cpu="1", memory="1Gi")
    names = ["q-a", "q-b", "q-c"]
    watcher = JobWatch(env.cluster, env.namespace).start()
    try:
        for name in names:
            env.apply(fake(name, queue=queue.local_queue, sleep=4))

        # While one runs, another is Queued with the QuotaReserved message of its own Workload.
        def queued_with_kueues_words() -> tuple[str, str] | None:
            for name in names:
                shown = env.status(name)
                job = env.job(name)
                if shown.get("reason") != "Queued" or job is None:
                    continue
                wl = workload_for_job(env.cluster, namespace=env.namespace, job=name, uid=job["metadata"]["uid"])
                cond = workload_condition(wl, "QuotaReserved") or {}
                if cond.get("status") == "False" and cond.get("message") and shown.get("message") == cond["message"]:
                    return name, str(cond["message"])
            return None

        name, message = wait_for(queued_with_kueues_words, timeout=WAIT, message="a job Queued with Kueue's message")
        assert "insufficient" in message and "cpu" in message, message
        assert env.status(name)["phase"] == "Pending"

        for name in names:
            done = env.wait_phase(name, "Succeeded", timeout=WAIT)
            assert done["attempts"] == 1
        assert watcher.seen == set(names)
    finally:
        watcher.stop()
    assert watcher.most == 1, f"{watcher.most} Jobs ran at once"


def test_suspend_and_resume_go_through_the_workload_never_the_jobs_suspend(env: Env, kueue: KueueObjects) -> None:
    since = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
    queue = kueue.queue(namespace=env.namespace, cpu="1", memory="1Gi")
    name = "susp"
    env.apply(fake(name, queue=queue.local_queue, sleep=30))
    wait_for(lambda: env.status(name).get("phase") == "Running", timeout=WAIT, message=f"ftj/{name} Running")
    job = env.job(name)
    assert job is not None
    uid = job["metadata"]["uid"]

    def workload() -> dict[str, Any] | None:
        return workload_for_job(env.cluster, namespace=env.namespace, job=name, uid=uid)

    env.cluster.kubectl_run("patch", "ftj", name, "-n", env.namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    wait_for(lambda: (workload() or {}).get("spec", {}).get("active") is False, timeout=WAIT,
             message="Workload inactive")  # fmt: skip
    suspended = env.wait_phase(name, "Suspended")
    assert "deactivated" in suspended["message"]
    # Kueue suspends its Job and the Job controller deletes the pod.
    wait_for(lambda: (env.job(name) or {}).get("spec", {}).get("suspend") is True, timeout=WAIT,
             message="Kueue suspended the Job")  # fmt: skip
    wait_for(lambda: (env.job(name) or {}).get("status", {}).get("active", 0) == 0, timeout=WAIT,
             message="the pod is gone")  # fmt: skip

    env.cluster.kubectl_run("patch", "ftj", name, "-n", env.namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    wait_for(lambda: (workload() or {}).get("spec", {}).get("active") is True, timeout=WAIT, message="Workload active")
    done = env.wait_phase(name, "Succeeded", timeout=WAIT)
    assert done["attempts"] == 2  # the pod that was stopped, and the one that finished
    assert (env.job(name) or {})["status"].get("failed", 0) == 0  # exit 143 is ignored: no backoffLimit spent
    wait_for(lambda: {"Suspended", "Resumed", "Succeeded"} <= set(env.events(name)), timeout=10,
             message="Suspended, Resumed, Succeeded events")  # fmt: skip

    writes = job_writes(env.cluster.dir / "audit.log", user=OPERATOR_USER, namespace=env.namespace, since=since)
    assert [w for w in writes if w.writes_suspend] == [], writes


def test_a_missing_local_queue_waits_with_kueues_message_and_no_crash_loop(env: Env) -> None:
    errors = env.operator.metric("finetune_reconcile_errors_total")
    name = "noqueue"
    env.apply(fake(name, queue="does-not-exist", sleep=0))
    shown = wait_for(
        lambda: (s := env.status(name)).get("message") == "LocalQueue does-not-exist doesn't exist" and s,
        timeout=WAIT,
        message="Kueue's message for a missing LocalQueue",
    )
    assert (shown["phase"], shown["reason"]) == ("Pending", "Queued")
    job = env.job(name)
    assert job is not None and job["spec"]["suspend"] is True and not job["status"].get("active")
    assert env.operator.alive()
    assert env.operator.metric("finetune_reconcile_errors_total") == errors
    assert "Traceback" not in env.operator.log.read_text()


# ----- preemption, with the real trainer -----

# Long enough that Kueue's preemption lands mid-phase: with augmentation an epoch runs the whole
# network over freshly augmented images (about half a second here), so "low" is still training
# when "high" is admitted; without it, phase 2 trains on cached activations in a few ms an epoch
# and could finish before the preemption arrives.
FINE_TUNE_EPOCHS = 40


def claim(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }  # fmt: skip


def real(name: str, *, queue: str, priority: str, fine_tune_epochs: int) -> dict[str, Any]:
    """A tiny real training (MobileNetV2 alpha 0.35, random weights, 32x32 images) asking for one cpu."""
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "labels": {QUEUE_LABEL: queue, PRIORITY_LABEL: priority}},
        "spec": {
            "model": {"base": "MobileNetV2", "weights": "none", "inputShape": [32, 32, 3],
                      "baseOptions": {"alpha": 0.35}, "head": {"units": [16], "dropout": 0.2}},
            "data": {"train": "/data/train", "validation": "/data/val", "augmentation": {"enabled": True}},
            "training": {
                "batchSize": 8,
                "head": {"epochs": 1, "learningRate": 1.0e-3},
                "fineTune": {"epochs": fine_tune_epochs, "learningRate": 1.0e-5, "unfreezeLast": 10},
                "earlyStopping": {"patience": 100},
                "reduceLROnPlateau": {"patience": 100},
                "mixedPrecision": "off",
                "seed": 7,
            },
            "output": {"path": f"/models/{name}"},
            "runtime": {
                "gpus": 0,
                "backoffLimit": 0,  # a preemption that counted as a failure would fail the job at once
                "resources": ONE_CPU,
                **jobs.claim_volumes(data="kueue-data", models="kueue-models"),
            },
        },
    }  # fmt: skip


def fine_tune_rows(out: Path) -> list[int]:
    try:
        with (out / "history.csv").open(newline="") as fh:
            return [int(r["epoch"]) for r in csv.DictReader(fh) if r["stage"] == "fine-tune"]
    except (OSError, ValueError, KeyError):
        return []


def test_high_priority_preempts_low_which_resumes_from_its_checkpoint(
    env: Env, kueue: KueueObjects, service_account_kubeconfig: ServiceAccountKubeconfig, tmp_path: Path
) -> None:
    cluster = env.cluster
    install_crd_and_rbac(cluster)
    namespace = restricted_namespace(cluster, prefix="ftj-preempt")
    volumes = cluster.dir / "volumes" / namespace
    write_square_folder(volumes / "kueue-data" / "train", per_class=16, seed=1)
    write_square_folder(volumes / "kueue-data" / "val", per_class=4, seed=2)
    (volumes / "kueue-models").mkdir(parents=True, exist_ok=True)
    queue = kueue.queue(namespace=namespace, cpu="1", memory="4Gi")
    low = kueue.priority_class("low", value=10)
    high = kueue.priority_class("high", value=1000)
    kubeconfig = service_account_kubeconfig(namespace="finetune-system", name="finetune-operator", create=False)
    operator = OperatorProcess(kubeconfig=kubeconfig, namespace=namespace, log=tmp_path / "operator.log",
                               command=(str(ROOT / ".venv" / "bin" / "finetune-operator"),))  # fmt: skip
    try:
        with operator:
            env.apply(claim("kueue-data"), namespace=namespace)
            env.apply(claim("kueue-models"), namespace=namespace)
            env.apply(real("low", queue=queue.local_queue, priority=low, fine_tune_epochs=FINE_TUNE_EPOCHS),
                      namespace=namespace)  # fmt: skip
            out = volumes / "kueue-models" / "low"
            wait_for(lambda: len(fine_tune_rows(out)) >= 2, timeout=400, interval=0.5,
                     message="low: two fine-tune epochs recorded")  # fmt: skip
            env.apply(real("high", queue=queue.local_queue, priority=high, fine_tune_epochs=1), namespace=namespace)

            preempted = wait_for(lambda: (s := env.status("low", namespace=namespace)).get("reason") == "Preempted" and s,
                                 timeout=WAIT, message="low: Preempted")  # fmt: skip
            assert preempted["phase"] == "Pending"
            assert "preempted by Kueue" in preempted["message"], preempted
            wait_for(lambda: "Preempted" in env.events("low", namespace=namespace), timeout=10,
                     message="a Preempted event")  # fmt: skip
            assert env.wait_phase("high", "Succeeded", timeout=400, namespace=namespace)["attempts"] == 1
            # The first pod of low is long gone, its successor not started before high is done: the rows now
            # are the epochs the preempted run recorded.
            reached = len(fine_tune_rows(out))
            done = wait_for(
                lambda: (s := env.status("low", namespace=namespace)).get("phase") in ("Succeeded", "Failed") and s,
                timeout=500,
                interval=0.5,
                message="low finishes",
            )
            assert operator.alive()
        assert done["phase"] == "Succeeded", (done, (tmp_path / "operator.log").read_text()[-3000:])
        assert done["attempts"] == 2, done  # the preempted pod and the one that finished
        assert {"Preempted", "Resumed", "Succeeded"} <= set(env.events("low", namespace=namespace))
        job = env.job("low", namespace=namespace) or {}
        assert job["status"].get("failed", 0) == 0  # exit 143 is ignored: preemption spends no backoffLimit
        metrics = json.loads((out / "metrics.json").read_text())
        head, fine = metrics["stages"]["head"], metrics["stages"]["fine-tune"]
        assert head["completedInEarlierRun"] is True  # phase 1 was not run again
        assert fine_tune_rows(out) == list(range(1, FINE_TUNE_EPOCHS + 1))  # each epoch once in the history
        print(f"low: preempted after {reached} fine-tune epochs, resumed at epoch {fine['resumedFromEpoch']}")
        assert 2 <= reached < FINE_TUNE_EPOCHS
        assert fine["epochsThisRun"] == FINE_TUNE_EPOCHS - fine["resumedFromEpoch"]
        assert 0 <= reached - fine["resumedFromEpoch"] <= 1  # at most one epoch trained twice
    finally:
        jobs.delete_namespace(cluster, namespace)


def test_without_kueue_the_operator_runs_plain_jobs_and_says_why_a_queued_one_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FTO_KUEUE", "0")
    monkeypatch.setenv("FTO_JOBSET", "0")
    with private_cluster(cluster_dir=tmp_path / "cluster") as bare:
        assert bare.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/workloads.kueue.x-k8s.io") is None
        install_crd_and_rbac(bare)
        namespace = restricted_namespace(bare, prefix="ftj-nokueue")
        operator = fake_trainer_operator(kubeconfig=mint_kubeconfig(bare, path=tmp_path / "kubeconfig"),
                                         namespace=namespace, log=tmp_path / "operator.log", pending_timeout=60)  # fmt: skip
        env = Env(cluster=bare, namespace=namespace, operator=operator)
        with operator:
            env.apply(jobs.ftj("plain", output="/tmp/out-plain", env={"FAKE_SLEEP": "0"}))
            env.apply(fake("queued", queue="team-a", sleep=0))
            assert env.wait_phase("plain", "Succeeded")["attempts"] == 1
            shown = wait_for(lambda: (s := env.status("queued")).get("reason") == "Queued" and s, timeout=WAIT,
                             message="queued: Queued")  # fmt: skip
            assert "Workload API (kueue.x-k8s.io/v1beta1) is not served" in shown["message"], shown
            assert (env.job("queued") or {})["spec"]["suspend"] is True
            assert operator.alive() and operator.metric("finetune_reconcile_errors_total") == 0
        log = operator.log.read_text()
        assert "Traceback" not in log, log[-3000:]
