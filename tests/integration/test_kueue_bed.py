"""The test bed's Kueue is the real one: plain batch Jobs (no operator) against Kueue v0.14.8's
controller manager and webhooks, as hack/cluster.py runs them.

- a Job labelled for a LocalQueue is suspended by Kueue's webhook on create, gets a
  Workload, is admitted and unsuspended when its ClusterQueue has quota, and completes;
- two Jobs for a quota of one run one at a time, the second waiting with Kueue's message;
- a Job naming a LocalQueue that does not exist stays suspended, Kueue saying why;
- the audit log keeps the body of Job updates and patches (who wrote spec.suspend: Kueue);
- (a private cluster) Kueue's failurePolicy-Fail webhooks exist only while Kueue serves.
"""

from __future__ import annotations

import base64
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.cluster import Cluster, private_cluster, wait_for
from fixtures.kueue import (
    QUEUE_LABEL,
    WEBHOOK_CONFIGS,
    KueueObjects,
    job_writes,
    require_kueue,
    unsuspended_jobs,
    workload_admitted,
    workload_condition,
    workload_for_job,
)

POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
KUEUE_USER = "kueue-controller-manager"  # hack/cluster.py's client certificate for Kueue


@pytest.fixture
def kueue(cluster: Cluster) -> Iterator[KueueObjects]:
    require_kueue(cluster)
    with KueueObjects(cluster) as objects:
        yield objects


def job_manifest(*, name: str, queue: str | None, seconds: float = 0.0, cpu: str = "1") -> dict[str, Any]:
    """A Job (suspend: false as written) whose one pod sleeps `seconds` and requests `cpu`."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {QUEUE_LABEL: queue} if queue else {}},
        "spec": {
            "suspend": False,
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": POD_SECURITY,
                    "containers": [
                        {
                            "name": "main",
                            "image": "python:3.11-slim",
                            "command": ["python", "-c", f"import time; time.sleep({seconds}); print('done')"],
                            "resources": {"requests": {"cpu": cpu, "memory": "64Mi"}},
                            "securityContext": CONTAINER_SECURITY,
                        }
                    ],
                }
            },
        },
    }


def create_job(cluster: Cluster, *, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """POSTs the Job and returns it as the API server stored it (after the webhooks)."""
    return cluster.create(f"/apis/batch/v1/namespaces/{namespace}/jobs", manifest)


def get_job(cluster: Cluster, *, namespace: str, name: str) -> dict[str, Any]:
    return cluster.must_get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")


def complete(job: dict[str, Any]) -> bool:
    return any(
        c["type"] == "Complete" and c["status"] == "True" for c in job.get("status", {}).get("conditions") or []
    )


def test_labelled_job_is_suspended_then_admitted_and_completes(
    cluster: Cluster, namespace: str, kueue: KueueObjects
) -> None:
    queue = kueue.queue(namespace=namespace, cpu="1", memory="1Gi")
    created = create_job(cluster, namespace=namespace, manifest=job_manifest(name="one", queue=queue.local_queue))
    # Kueue's mutating webhook rewrote suspend: false to true before the Job was stored.
    assert created["spec"]["suspend"] is True
    uid = created["metadata"]["uid"]

    wl = wait_for(
        lambda: workload_for_job(cluster, namespace=namespace, job="one", uid=uid),
        timeout=30, message="a Workload owned by Job one",
    )
    assert wl["spec"]["queueName"] == queue.local_queue
    def admitted_workload() -> dict[str, Any] | None:
        w = workload_for_job(cluster, namespace=namespace, job="one", uid=uid)
        return w if workload_admitted(w) else None

    def completed_job() -> dict[str, Any] | None:
        j = get_job(cluster, namespace=namespace, name="one")
        return j if complete(j) else None

    admitted = wait_for(admitted_workload, timeout=30, message="Workload of Job one Admitted")
    assert admitted["status"]["admission"]["clusterQueue"] == queue.cluster_queue
    assert (workload_condition(admitted, "QuotaReserved") or {}).get("status") == "True"
    done = wait_for(completed_job, timeout=60, message="Job one Complete")
    assert done["spec"]["suspend"] is False
    assert "done" in cluster.pod_log(
        namespace=namespace,
        pod=cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "job-name=one")["items"][0]["metadata"]["name"],
        container="main",
    )
    # Kueue (not the test) unsuspended it, and the audit log kept that request's body.
    writes = [w for w in job_writes(cluster.dir / "audit.log", user=KUEUE_USER, namespace=namespace) if w.name == "one"]
    assert any(w.writes_suspend and w.code < 400 for w in writes), writes


def test_quota_of_one_runs_two_jobs_one_at_a_time(cluster: Cluster, namespace: str, kueue: KueueObjects) -> None:
    queue = kueue.queue(namespace=namespace, cpu="1", memory="1Gi")
    for name in ("first", "second"):
        create_job(cluster, namespace=namespace, manifest=job_manifest(name=name, queue=queue.local_queue, seconds=3))

    waiting_messages: set[str] = set()
    deadline = time.monotonic() + 120
    while True:
        running = unsuspended_jobs(cluster, namespace=namespace)
        assert len(running) <= 1, f"both Jobs unsuspended and unfinished at once: {running}"
        jobs = {n: get_job(cluster, namespace=namespace, name=n) for n in ("first", "second")}
        for name, job in jobs.items():
            if job["spec"]["suspend"]:
                cond = workload_condition(workload_for_job(cluster, namespace=namespace, job=name), "QuotaReserved")
                if cond and cond["status"] == "False":
                    waiting_messages.add(cond.get("message", ""))
        if all(complete(j) for j in jobs.values()):
            break
        assert time.monotonic() < deadline, f"not both Complete after 120 s: {[j.get('status') for j in jobs.values()]}"
        time.sleep(0.2)

    # One started only after the other finished (startTime is set when a Job is unsuspended).
    spans = sorted((j["status"]["startTime"], j["status"]["completionTime"]) for j in jobs.values())
    assert spans[1][0] >= spans[0][1], spans
    # Kueue's own words: "couldn't assign flavors to pod set main: insufficient unused quota for cpu ..."
    assert any("insufficient unused quota for cpu" in m for m in waiting_messages), waiting_messages


def test_job_naming_a_missing_local_queue_stays_suspended(
    cluster: Cluster, namespace: str, kueue: KueueObjects
) -> None:
    queue = kueue.queue(namespace=namespace)  # a queue exists, just not the one the Job names
    created = create_job(cluster, namespace=namespace, manifest=job_manifest(name="lost", queue="no-such-queue"))
    assert created["spec"]["suspend"] is True

    def kueue_says_why() -> dict[str, Any] | None:
        cond = workload_condition(workload_for_job(cluster, namespace=namespace, job="lost"), "QuotaReserved")
        return cond if cond and cond["status"] == "False" and "no-such-queue" in cond.get("message", "") else None

    cond = wait_for(kueue_says_why, timeout=30, message="Kueue's reason on the Workload of Job lost")
    assert "doesn't exist" in cond["message"], cond
    assert cond["reason"] == "Inadmissible", cond
    # Kueue has decided (the condition above) and the Job stays suspended, with no pod ...
    assert get_job(cluster, namespace=namespace, name="lost")["spec"]["suspend"] is True
    assert cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "job-name=lost")["items"] == []
    # ... until the queue it names appears: only then is it admitted and started (startTime is set
    # when Kueue unsuspends the Job), so it did not start at any moment before.
    kueue.local_queue(namespace=namespace, cluster_queue=queue.cluster_queue, name="no-such-queue")
    made = cluster.kubectl_json("get", "localqueues.kueue.x-k8s.io", "no-such-queue", "-n", namespace)

    def completed() -> dict[str, Any] | None:
        j = get_job(cluster, namespace=namespace, name="lost")
        return j if complete(j) else None

    job = wait_for(completed, timeout=60, message="Job lost Complete once its LocalQueue exists")
    assert job["status"]["startTime"] >= made["metadata"]["creationTimestamp"], (job["status"], made["metadata"])


def test_unlabelled_job_is_left_alone(cluster: Cluster, namespace: str, kueue: KueueObjects) -> None:
    created = create_job(cluster, namespace=namespace, manifest=job_manifest(name="free", queue=None))
    assert created["spec"]["suspend"] is False
    wait_for(
        lambda: complete(get_job(cluster, namespace=namespace, name="free")), timeout=60, message="Job free Complete"
    )
    assert workload_for_job(cluster, namespace=namespace, job="free") is None


def test_webhooks_exist_only_while_kueue_serves(tmp_path: Path) -> None:
    """On a private cluster: a Kueue that died leaves its failurePolicy-Fail webhooks failing
    every Job create until `up` restarts it; stopping Kueue removes them first."""
    if os.environ.get("FTO_KUEUE", "1") == "0":
        pytest.skip("Kueue is off (FTO_KUEUE=0)")
    probe = job_manifest(name="probe", queue="some-queue")
    with private_cluster(cluster_dir=tmp_path / "cluster") as own:
        require_kueue(own)
        assert create_job(own, namespace="default", manifest=probe)["spec"]["suspend"] is True
        pid = int((own.dir / "pids" / "kueue.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not Path(f"/proc/{pid}/cmdline").exists() or _zombie(pid), timeout=10, message="kueue gone")
        code, answer = own.request("POST", "/apis/batch/v1/namespaces/default/jobs", body={**probe, "metadata": {
            "name": "probe-2", "labels": probe["metadata"]["labels"]}})
        assert code == 500 and "mjob.kb.io" in answer.get("message", ""), (code, answer)

        own.up()  # deletes the stale webhooks, starts Kueue, installs them once it answers
        require_kueue(own)
        again = {**probe, "metadata": {"name": "probe-3", "labels": probe["metadata"]["labels"]}}
        assert create_job(own, namespace="default", manifest=again)["spec"]["suspend"] is True

        own.stop_component("kueue")
        for kind, name in (("mutating", WEBHOOK_CONFIGS[0]), ("validating", WEBHOOK_CONFIGS[1])):
            assert own.get(f"/apis/admissionregistration.k8s.io/v1/{kind}webhookconfigurations/{name}") is None
        # No Kueue, no webhook: a labelled Job is stored as written (nobody suspends it).
        free = {**probe, "metadata": {"name": "probe-4", "labels": probe["metadata"]["labels"]}}
        assert create_job(own, namespace="default", manifest=free)["spec"]["suspend"] is False


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True


def test_installed_webhooks_are_kueues_own_by_loopback_url(cluster: Cluster, kueue: KueueObjects) -> None:
    """The release's webhook configurations, each clientConfig a loopback `url` with our CA,
    Kueue's namespaceSelectors kept (its Pod webhooks skip kube-system and kueue-system)."""
    ca = (cluster.dir / "pki" / "ca.crt").read_bytes()
    hooks: dict[str, dict[str, Any]] = {}
    for kind, name in (("mutating", WEBHOOK_CONFIGS[0]), ("validating", WEBHOOK_CONFIGS[1])):
        config = cluster.get(f"/apis/admissionregistration.k8s.io/v1/{kind}webhookconfigurations/{name}")
        assert config is not None
        hooks.update({w["name"]: w for w in config["webhooks"]})
    assert {"mjob.kb.io", "vjob.kb.io", "mpod.kb.io", "mworkload.kb.io", "vclusterqueue.kb.io"} <= set(hooks)
    for hook in hooks.values():
        assert hook["clientConfig"]["url"].startswith("https://127.0.0.1:"), hook["name"]
        assert base64.b64decode(hook["clientConfig"]["caBundle"]) == ca, hook["name"]
    assert hooks["mjob.kb.io"]["failurePolicy"] == "Fail"
    assert hooks["mjob.kb.io"]["clientConfig"]["url"].endswith("/mutate-batch-v1-job")
    assert hooks["mpod.kb.io"]["namespaceSelector"]["matchExpressions"] == [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", "kueue-system"]}
    ]
