"""The test bed's JobSet is the real one: plain JobSets (no operator) against the JobSet
controller manager v0.10.1 and its webhooks, as hack/cluster.py runs them, with the real Job
controller under it and the pod runner running the pods as processes.

- a JobSet of one replicatedJob (parallelism 2, completions 2) is defaulted by JobSet's webhook,
  gets its headless Service (network.enableDNSHostnames: stable pod hostnames under the
  JobSet's subdomain) and an Indexed Job, and Completes;
- failurePolicy maxRestarts 1: one pod exits 1 on the first attempt only (keyed on the
  `jobset.sigs.k8s.io/restart-attempt` label, read through the downward API), the whole group
  is recreated (a new Job, attempt 1, the other pod killed with it), and the JobSet Completes
  with status.restarts 1;
- (a private cluster) JobSet's failurePolicy-Fail webhooks exist only while JobSet serves;
- with Kueue's jobset.x-k8s.io/jobset integration on, a JobSet labelled for a LocalQueue is
  suspended on create and admitted as ONE Workload (one pod set of 2 pods), no Workload of
  its own for its Job, and Completes.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.cluster import Cluster, private_cluster, require_release, wait_for
from fixtures.kueue import QUEUE_LABEL, KueueObjects, require_kueue, workload_admitted, workloads

GROUP_PATH = "/apis/jobset.x-k8s.io/v1alpha2"
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
RESTART_ATTEMPT = "jobset.sigs.k8s.io/restart-attempt"
WEBHOOK_CONFIGS = ("jobset-mutating-webhook-configuration", "jobset-validating-webhook-configuration")
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}

# Pod 1 of attempt 0 fails after 2 s; pod 0 of attempt 0 would run for 120 s (the group restart
# kills it); on any later attempt both print their identity and succeed.
WORKER = """
import os, sys, time
attempt, index = os.environ["ATTEMPT"], os.environ["JOB_COMPLETION_INDEX"]
print(f"worker {index} attempt {attempt} host {os.environ.get('HOSTNAME')}", flush=True)
if os.environ.get("FAIL_FIRST") == "1" and attempt == "0":
    time.sleep(2 if index == "1" else 120)
    sys.exit(1 if index == "1" else 0)
"""


def require_jobset(cluster: Cluster) -> None:
    """Skips under FTO_JOBSET=0; fails when JobSet should run but its CRD or webhooks are missing."""
    require_release(
        cluster, title="JobSet", switch="FTO_JOBSET", crd="jobsets.jobset.x-k8s.io", webhook_configs=WEBHOOK_CONFIGS
    )


@pytest.fixture
def jobset_on(cluster: Cluster) -> Cluster:
    require_jobset(cluster)
    return cluster


def jobset_manifest(
    *, name: str, fail_first: bool = False, max_restarts: int = 0, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """One replicatedJob `workers` of 2 pods (an Indexed Job, backoffLimit 0) running WORKER."""
    container = {
        "name": "worker",
        "image": "python:3.11-slim",
        "command": ["python", "-c", WORKER],
        "env": [
            {"name": "FAIL_FIRST", "value": "1" if fail_first else "0"},
            {"name": "ATTEMPT", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{RESTART_ATTEMPT}']"}}},
        ],
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
        "securityContext": CONTAINER_SECURITY,
    }
    spec: dict[str, Any] = {
        "replicatedJobs": [
            {
                "name": "workers",
                "replicas": 1,
                "template": {
                    "spec": {
                        "parallelism": 2,
                        "completions": 2,
                        "backoffLimit": 0,
                        "template": {
                            "spec": {
                                "restartPolicy": "Never",
                                "securityContext": POD_SECURITY,
                                "containers": [container],
                            }
                        },
                    }
                },
            }
        ],
    }
    if max_restarts:
        spec["failurePolicy"] = {"maxRestarts": max_restarts}
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": spec,
    }


def create_jobset(cluster: Cluster, *, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """POSTs the JobSet and returns it as the API server stored it (after the webhooks)."""
    return cluster.create(f"{GROUP_PATH}/namespaces/{namespace}/jobsets", manifest)


def get_jobset(cluster: Cluster, *, namespace: str, name: str) -> dict[str, Any]:
    return cluster.must_get(f"{GROUP_PATH}/namespaces/{namespace}/jobsets/{name}")


def condition(obj: dict[str, Any], kind: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == "True" for c in obj.get("status", {}).get("conditions") or [])


def completed(cluster: Cluster, *, namespace: str, name: str) -> dict[str, Any] | None:
    """The JobSet once Completed; fails at once if it Failed instead."""
    js = get_jobset(cluster, namespace=namespace, name=name)
    assert not condition(js, "Failed"), js.get("status")
    return js if condition(js, "Completed") else None


def jobs_of(cluster: Cluster, *, namespace: str, name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.kubectl_json("get", "jobs", "-n", namespace, "-l", f"{JOBSET_NAME_LABEL}={name}")[
        "items"
    ]
    return items


def pods_of(cluster: Cluster, *, namespace: str, name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", f"{JOBSET_NAME_LABEL}={name}")[
        "items"
    ]
    return items


def test_jobset_of_two_pods_completes_with_its_headless_service(jobset_on: Cluster, namespace: str) -> None:
    cluster = jobset_on
    # JobSet's own webhook configurations, by loopback url; its pod webhooks only for pods of
    # JobSets (the release's kustomize patches), so every other pod create never reaches them.
    for kind, name in zip(("mutating", "validating"), WEBHOOK_CONFIGS, strict=True):
        config = cluster.get(f"/apis/admissionregistration.k8s.io/v1/{kind}webhookconfigurations/{name}")
        assert config is not None
        hooks = {h["name"]: h for h in config["webhooks"]}
        assert all(h["clientConfig"]["url"].startswith("https://127.0.0.1:") for h in hooks.values()), hooks
        pod_hook = hooks[f"{kind[0]}pod.kb.io"]
        assert pod_hook["objectSelector"] == {"matchExpressions": [{"key": JOBSET_NAME_LABEL, "operator": "Exists"}]}
    stored = create_jobset(cluster, namespace=namespace, manifest=jobset_manifest(name="pair"))
    # JobSet's mutating webhook defaulted what the manifest left out.
    assert stored["spec"]["network"]["enableDNSHostnames"] is True
    assert stored["spec"]["successPolicy"]["operator"] == "All"
    assert stored["spec"]["replicatedJobs"][0]["template"]["spec"]["completionMode"] == "Indexed"

    done = wait_for(lambda: completed(cluster, namespace=namespace, name="pair"), timeout=90, message="JobSet pair Completed")
    assert done["status"].get("restarts", 0) == 0
    rjs = {r["name"]: r for r in done["status"]["replicatedJobsStatus"]}
    assert rjs["workers"]["succeeded"] == 1, rjs

    (job,) = jobs_of(cluster, namespace=namespace, name="pair")
    assert job["metadata"]["name"] == "pair-workers-0"
    assert job["metadata"]["ownerReferences"][0]["kind"] == "JobSet"
    assert job["status"]["succeeded"] == 2, job["status"]

    # The headless Service that gives the pods stable names: <jobset>-<rjob>-<job>-<index>.<jobset>.
    svc = cluster.get(f"/api/v1/namespaces/{namespace}/services/pair")
    assert svc is not None, "JobSet's headless Service pair is missing"
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == {JOBSET_NAME_LABEL: "pair"}
    assert svc["spec"]["publishNotReadyAddresses"] is True
    pods = sorted(pods_of(cluster, namespace=namespace, name="pair"), key=lambda p: str(p["spec"].get("hostname")))
    assert [(p["spec"].get("hostname"), p["spec"].get("subdomain")) for p in pods] == [
        ("pair-workers-0-0", "pair"),
        ("pair-workers-0-1", "pair"),
    ]
    assert all(p["status"]["phase"] == "Succeeded" for p in pods), [p["status"]["phase"] for p in pods]
    logs = {cluster.pod_log(namespace=namespace, pod=p["metadata"]["name"], container="worker").strip() for p in pods}
    assert any("worker 0 attempt 0" in line for line in logs), logs
    assert any("worker 1 attempt 0" in line for line in logs), logs


def test_failure_policy_restarts_the_whole_group_once(jobset_on: Cluster, namespace: str) -> None:
    cluster = jobset_on
    create_jobset(cluster, namespace=namespace, manifest=jobset_manifest(name="flaky", fail_first=True, max_restarts=1))

    # Attempt 0's Job (pod 1 fails after 2 s, pod 0 would run 120 s).
    first = wait_for(
        lambda: [j for j in jobs_of(cluster, namespace=namespace, name="flaky") if j["metadata"]["labels"].get(RESTART_ATTEMPT) == "0"],
        timeout=30, message="Job of attempt 0",
    )
    first_uid = first[0]["metadata"]["uid"]

    done = wait_for(
        lambda: completed(cluster, namespace=namespace, name="flaky"), timeout=90, message="JobSet flaky Completed"
    )
    assert done["status"]["restarts"] == 1, done["status"]
    # The group was recreated: a new Job (same name, new uid) of attempt 1, both of its pods
    # succeeded well before attempt 0's pod 0 could have finished its 120 s on its own.
    (job,) = jobs_of(cluster, namespace=namespace, name="flaky")
    assert job["metadata"]["uid"] != first_uid
    assert job["metadata"]["labels"][RESTART_ATTEMPT] == "1"
    assert job["status"]["succeeded"] == 2, job["status"]
    pods = pods_of(cluster, namespace=namespace, name="flaky")
    final = [p for p in pods if p["metadata"]["labels"].get(RESTART_ATTEMPT) == "1"]
    assert len(final) == 2 and all(p["status"]["phase"] == "Succeeded" for p in final), [
        (p["metadata"]["name"], p["status"]["phase"]) for p in pods
    ]
    logs = {cluster.pod_log(namespace=namespace, pod=p["metadata"]["name"], container="worker").strip() for p in final}
    assert {line.split(" host ")[0] for line in logs} == {"worker 0 attempt 1", "worker 1 attempt 1"}, logs


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True


def test_webhooks_exist_only_while_jobset_serves(tmp_path: Path) -> None:
    """On a private cluster: a JobSet manager that died leaves its failurePolicy-Fail webhooks
    refusing every JobSet create until `up` restarts it; stopping it removes them first."""
    if os.environ.get("FTO_JOBSET", "1").strip().lower() in ("0", "false", "no", "off"):
        pytest.skip("JobSet is off (FTO_JOBSET=0)")
    with private_cluster(cluster_dir=tmp_path / "cluster") as own:
        require_jobset(own)
        assert create_jobset(own, namespace="default", manifest=jobset_manifest(name="probe-1"))["spec"]["network"]
        pid = int((own.dir / "pids" / "jobset.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: _gone(pid), timeout=10, message="jobset gone")
        code, answer = own.request(
            "POST", f"{GROUP_PATH}/namespaces/default/jobsets", body=jobset_manifest(name="probe-2")
        )
        assert code == 500 and "mjobset.kb.io" in answer.get("message", ""), (code, answer)

        own.up()  # deletes the stale webhooks, starts JobSet, installs them once it answers
        require_jobset(own)
        assert create_jobset(own, namespace="default", manifest=jobset_manifest(name="probe-3"))["spec"]["network"]

        own.stop_component("jobset")
        for kind, name in zip(("mutating", "validating"), WEBHOOK_CONFIGS, strict=True):
            assert own.get(f"/apis/admissionregistration.k8s.io/v1/{kind}webhookconfigurations/{name}") is None
        # No JobSet manager, no webhook: a JobSet is stored as written (nobody defaults it).
        assert "network" not in create_jobset(own, namespace="default", manifest=jobset_manifest(name="probe-4"))["spec"]


@pytest.fixture
def kueue(jobset_on: Cluster) -> Iterator[KueueObjects]:
    require_kueue(jobset_on)
    with KueueObjects(jobset_on) as objects:
        yield objects


def test_kueue_admits_a_labelled_jobset_as_one_workload(jobset_on: Cluster, namespace: str, kueue: KueueObjects) -> None:
    cluster = jobset_on
    queue = kueue.queue(namespace=namespace, cpu="1", memory="1Gi")
    stored = create_jobset(
        cluster, namespace=namespace, manifest=jobset_manifest(name="queued", labels={QUEUE_LABEL: queue.local_queue})
    )
    # Kueue's JobSet webhook suspended it before it was stored.
    assert stored["spec"]["suspend"] is True
    uid = stored["metadata"]["uid"]

    def admitted() -> dict[str, Any] | None:
        mine = [
            w for w in workloads(cluster, namespace=namespace)
            if any(r.get("kind") == "JobSet" and r.get("uid") == uid for r in w["metadata"].get("ownerReferences") or [])
        ]
        return mine[0] if mine and workload_admitted(mine[0]) else None

    wl = wait_for(admitted, timeout=60, message="the Workload of JobSet queued Admitted")
    assert wl["spec"]["queueName"] == queue.local_queue
    assert [(ps["name"], ps["count"]) for ps in wl["spec"]["podSets"]] == [("workers", 2)]
    assert wl["status"]["admission"]["clusterQueue"] == queue.cluster_queue

    done = wait_for(lambda: completed(cluster, namespace=namespace, name="queued"), timeout=90, message="JobSet queued Completed")
    assert done["spec"]["suspend"] is False
    (job,) = jobs_of(cluster, namespace=namespace, name="queued")
    assert job["status"]["succeeded"] == 2, job["status"]
    # ONE Workload for the group: none of its own for the JobSet's Job.
    all_workloads = workloads(cluster, namespace=namespace)
    assert [w["metadata"]["uid"] for w in all_workloads] == [wl["metadata"]["uid"]], [
        (w["metadata"]["name"], w["metadata"].get("ownerReferences")) for w in all_workloads
    ]
