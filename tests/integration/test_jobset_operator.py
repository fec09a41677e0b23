"""Multi-worker FineTuneJobs (runtime.workers > 1) through the real JobSet v0.10.1 controller and
its webhooks (hack/cluster.py), with the operator as its ServiceAccount under deploy/base/rbac.yaml
and the fake trainer (tests/integration/fake_trainer.py) in every worker pod:

- a 2-worker job on a ReadWriteMany claim gets a JobSet named like it (owned by it, suspend false),
  JobSet's headless Service, one Indexed Job of 2 pods whose env names both workers by their
  stable names and reads its index from the completion-index annotation; status.workers says
  2 in total, the job Succeeds with one attempt, the chief's model path;
- a worker exiting 3 (DataError) fails the group at once: Failed/DataError, one attempt, no restart;
- an output claim without ReadWriteMany is refused: Failed/InvalidSpec naming the claim, no JobSet;
- with a Kueue queue label the JobSet is created suspended and Kueue (v0.14.8, its JobSet
  integration) admits the group as ONE Workload of 2 pods; the job Succeeds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures import jobs
from fixtures.cluster import Cluster, wait_for
from fixtures.jobs import operator_in_namespace
from fixtures.kueue import QUEUE_LABEL, KueueObjects, require_kueue, workload_admitted, workloads

pytestmark = pytest.mark.timeout(600)

WAIT = 120.0
JOBSETS = "/apis/jobset.x-k8s.io/v1alpha2/namespaces/{ns}/jobsets"


class Env:
    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.cluster, self.namespace = cluster, namespace

    def apply(self, manifest: dict[str, Any]) -> None:
        self.cluster.kubectl_run("apply", "-n", self.namespace, "-f", "-", input=yaml.safe_dump(manifest))

    def get(self, path: str) -> dict[str, Any] | None:
        return self.cluster.get(path.format(ns=self.namespace))

    def status(self, name: str) -> dict[str, Any]:
        got = self.get(f"/apis/finetune.dev/v1alpha1/namespaces/{{ns}}/finetunejobs/{name}") or {}
        return dict(got.get("status") or {})

    def wait_phase(self, name: str, phase: str) -> dict[str, Any]:
        return wait_for(lambda: (s := self.status(name)).get("phase") == phase and s, timeout=WAIT,
                        message=f"ftj/{name} {phase} (now {self.status(name)})")  # fmt: skip

    def pods(self, name: str) -> list[dict[str, Any]]:
        items = self.cluster.kubectl_json("get", "pods", "-n", self.namespace, "-l", f"finetune.dev/job={name}")["items"]
        return list(items)


@pytest.fixture(scope="module")
def env(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if os.environ.get("FTO_JOBSET", "1").strip().lower() in ("0", "false", "no", "off"):
        pytest.skip("JobSet is off (FTO_JOBSET=0)")
    if cluster.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/jobsets.jobset.x-k8s.io") is None:
        pytest.fail(f"JobSet is not running on {cluster.dir}; `hack/cluster.py up` starts it")
    tmp: Path = tmp_path_factory.mktemp("jobset-op")
    with operator_in_namespace(cluster, tmp=tmp, prefix="ftj-jobset", pending_timeout=60) as (namespace, _):
        yield Env(cluster, namespace)


def claim(name: str, *modes: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
            "spec": {"accessModes": list(modes), "resources": {"requests": {"storage": "1Gi"}}}}  # fmt: skip


def two_workers(name: str, *, claim_name: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    return jobs.ftj(
        name, output=f"/models/{name}", env=env or {"FAKE_SLEEP": "2"}, workers=2, backoffLimit=1,
        volumes=[{"name": "models", "persistentVolumeClaim": {"claimName": claim_name}}],
        volumeMounts=[{"name": "models", "mountPath": "/models"}],
    )  # fmt: skip


def test_two_workers_run_as_one_jobset_under_a_headless_service_and_succeed(env: Env) -> None:
    env.apply(claim("shared", "ReadWriteMany"))
    env.apply(two_workers("pair", claim_name="shared", env={"FAKE_SLEEP": "8"}))
    js = wait_for(lambda: env.get(f"{JOBSETS}/pair"), timeout=WAIT, message="the JobSet of ftj/pair")
    ref = js["metadata"]["ownerReferences"][0]
    assert (ref["kind"], ref["name"], ref["controller"]) == ("FineTuneJob", "pair", True)
    assert js["spec"]["suspend"] is False
    assert js["spec"]["failurePolicy"]["maxRestarts"] == 1
    service = wait_for(lambda: env.get("/api/v1/namespaces/{ns}/services/pair"), timeout=WAIT, message="svc/pair")
    assert service["spec"]["clusterIP"] == "None"  # JobSet's headless Service: the workers' stable names
    assert env.cluster.get(f"/apis/batch/v1/namespaces/{env.namespace}/jobs/pair") is None  # no plain Job

    pods = wait_for(lambda: (p := env.pods("pair")) and len(p) == 2 and p, timeout=WAIT, message="2 worker pods")
    hosts = "pair-worker-0-0.pair:2222,pair-worker-0-1.pair:2222"
    indexes = set()
    for pod in pods:
        spec = pod["spec"]
        assert spec["subdomain"] == "pair"
        assert spec["hostname"].startswith("pair-worker-0-")
        env_vars = {e["name"]: e for e in spec["containers"][0]["env"]}
        assert env_vars["FINETUNE_WORKER_HOSTS"]["value"] == hosts
        assert env_vars["FINETUNE_WORKER_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
            "metadata.annotations['batch.kubernetes.io/job-completion-index']")  # fmt: skip
        indexes.add(pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"])
        assert spec["hostname"] == f"pair-worker-0-{pod['metadata']['annotations']['batch.kubernetes.io/job-completion-index']}"
    assert indexes == {"0", "1"}

    running = wait_for(lambda: (s := env.status("pair")).get("phase") == "Running" and s, timeout=WAIT, message="Running")
    assert running["workers"]["total"] == 2
    done = env.wait_phase("pair", "Succeeded")
    assert done["attempts"] == 1
    assert done["workers"] == {"ready": 0, "total": 2}
    assert done["modelPath"] == "/models/fake/model.keras"  # the chief's summary (the fake trainer's path)


def test_a_non_retryable_exit_fails_the_group_at_once(env: Env) -> None:
    env.apply(claim("shared", "ReadWriteMany"))
    env.apply(two_workers("bad-data", claim_name="shared",
                          env={"FAKE_EXIT": "3", "FAKE_REASON": "DataError", "FAKE_MESSAGE": "no images"}))  # fmt: skip
    failed = env.wait_phase("bad-data", "Failed")
    assert failed["reason"] == "DataError", failed
    assert "no images" in failed["message"] and "worker" in failed["message"]
    assert failed["attempts"] == 1
    js = env.get(f"{JOBSETS}/bad-data") or {}
    assert int((js.get("status") or {}).get("restarts") or 0) == 0  # failed at once, never restarted


def test_an_output_claim_without_read_write_many_is_refused(env: Env) -> None:
    env.apply(claim("single", "ReadWriteOnce"))
    env.apply(two_workers("lonely", claim_name="single"))
    failed = env.wait_phase("lonely", "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "single" in failed["message"] and "ReadWriteMany" in failed["message"]
    assert env.get(f"{JOBSETS}/lonely") is None


def test_kueue_admits_the_worker_group_as_one_workload(env: Env) -> None:
    require_kueue(env.cluster)
    env.apply(claim("shared", "ReadWriteMany"))
    with KueueObjects(env.cluster) as kueue:
        queue = kueue.queue(namespace=env.namespace, cpu="1", memory="1Gi")
        manifest = two_workers("queued", claim_name="shared")
        manifest["spec"]["runtime"]["resources"] = {"requests": {"cpu": "500m"}}
        manifest["metadata"]["labels"] = {QUEUE_LABEL: queue.local_queue}
        env.apply(manifest)
        js = wait_for(lambda: env.get(f"{JOBSETS}/queued"), timeout=WAIT, message="the JobSet of ftj/queued")
        assert js["metadata"]["labels"][QUEUE_LABEL] == queue.local_queue
        uid = js["metadata"]["uid"]

        def admitted() -> dict[str, Any] | None:
            mine = [w for w in workloads(env.cluster, namespace=env.namespace)
                    if any(r.get("uid") == uid for r in w["metadata"].get("ownerReferences") or [])]  # fmt: skip
            return mine[0] if mine and workload_admitted(mine[0]) else None

        wl = wait_for(admitted, timeout=WAIT, message="the Workload of JobSet queued Admitted")
        assert [ps["count"] for ps in wl["spec"]["podSets"]] == [2]
        done = env.wait_phase("queued", "Succeeded")
        assert done["attempts"] == 1 and done["workers"]["total"] == 2
        owned = [w for w in workloads(env.cluster, namespace=env.namespace)
                 if any(r.get("kind") == "Job" for r in w["metadata"].get("ownerReferences") or [])]  # fmt: skip
        assert owned == []  # no Workload of its own for the JobSet's child Job


def test_a_missing_output_claim_is_waited_for_then_the_group_runs(env: Env) -> None:
    """A claim applied after the job: Pending/WaitingForVolume (workers counted from the spec), then the JobSet."""
    env.apply(jobs.ftj(
        "early", output="/models/early", env={"FAKE_SLEEP": "1"}, workers=3, backoffLimit=1,
        volumes=[{"name": "models", "persistentVolumeClaim": {"claimName": "later"}}],
        volumeMounts=[{"name": "models", "mountPath": "/models"}],
    ))  # fmt: skip
    waiting = wait_for(lambda: (s := env.status("early")).get("reason") == "WaitingForVolume" and s,
                       timeout=WAIT, message=f"ftj/early WaitingForVolume (now {env.status('early')})")  # fmt: skip
    assert waiting["phase"] == "Pending"
    assert "later" in waiting["message"]
    assert waiting["workers"]["total"] == 3
    assert env.get(f"{JOBSETS}/early") is None
    env.apply(claim("later", "ReadWriteMany"))
    wait_for(lambda: env.get(f"{JOBSETS}/early"), timeout=WAIT, message="the JobSet of ftj/early once its claim exists")
    done = env.wait_phase("early", "Succeeded")
    assert done["workers"]["total"] == 3
