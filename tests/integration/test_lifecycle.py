"""The GitOps lifecycle on the local control plane: first status, replace, TTL, what a stopped job shows.

One operator (a subprocess, as its ServiceAccount under deploy/base/rbac.yaml, the fake
trainer of test_operator.py) watches one restricted namespace for the module:

- a new FineTuneJob shows `observedGeneration`, `Pending` and `Reconciling=True` within about
  a second, while no pod can exist yet (a ResourceQuota of zero pods holds the pod back);
- deleted and created again under the same name while the old one trains, with the old
  Job's garbage collection held back by a finalizer, the new FineTuneJob waits
  (`Pending/Replacing`, never Failed, nothing adopted) and then trains its own spec: the
  spec file mounted in the new pod is the new FineTuneJob's;
- `ttlSecondsAfterFinished` running out while the operator is stopped does not lose the
  outcome nor train the job again; the operator deletes the Job after recording it;
- a Job deleted by hand after its pod ran fails the job (JobDeleted) instead of training twice;
- `etaSeconds` is gone once a job is Suspended or Failed.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from finetune_contract import protocol
from fixtures import jobs
from fixtures.cluster import Cluster, wait_for
from fixtures.jobs import operator_in_namespace, post_progress
from fixtures.operator import OperatorProcess
from kubernetes import client

WAIT = 60.0
GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"


@dataclass
class Env:
    cluster: Cluster
    namespace: str
    operator: OperatorProcess
    api: Any  # kubernetes.client.ApiClient as the admin

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl_run(*args, "-n", self.namespace, check=check, input=input)

    def apply(self, manifest: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))

    def ftj(self, name: str) -> dict[str, Any] | None:
        try:
            body = client.CustomObjectsApi(self.api).get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name
            )
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(body)

    def status(self, name: str) -> dict[str, Any]:
        return dict((self.ftj(name) or {}).get("status") or {})

    def wait_phase(self, name: str, phase: str, timeout: float = WAIT) -> dict[str, Any]:
        return wait_for(
            lambda: (s := self.status(name)).get("phase") == phase and s,
            timeout=timeout,
            message=f"ftj/{name} phase {phase}",
        )

    def jobs(self, name: str) -> list[dict[str, Any]]:
        found = client.BatchV1Api(self.api).list_namespaced_job(
            self.namespace, label_selector=f"finetune.dev/job={name}", _preload_content=False
        )
        return list(json.loads(found.data)["items"])

    def pods(self, name: str) -> list[dict[str, Any]]:
        found = client.CoreV1Api(self.api).list_namespaced_pod(
            self.namespace, label_selector=f"finetune.dev/job={name}", _preload_content=False
        )
        return list(json.loads(found.data)["items"])

    def events(self, name: str, *, uid: str | None = None) -> list[str]:
        found = client.CoreV1Api(self.api).list_namespaced_event(
            self.namespace,
            field_selector=f"involvedObject.kind=FineTuneJob,involvedObject.name={name}",
            _preload_content=False,
        )
        items = json.loads(found.data)["items"]
        return [e["reason"] for e in items if uid is None or e["involvedObject"].get("uid") == uid]


def ftj(name: str, *, env: dict[str, str] | None = None, **runtime: Any) -> dict[str, Any]:
    """`fixtures.jobs.ftj` writing to /tmp/out-NAME."""
    return jobs.ftj(name, output=f"/tmp/out-{name}", env=env, **runtime)


@pytest.fixture(scope="module")
def env(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("lifecycle")
    with operator_in_namespace(cluster, tmp=tmp, prefix="ftj-life", pending_timeout=60) as (namespace, operator):
        api = cluster.api_client()
        try:
            yield Env(cluster=cluster, namespace=namespace, operator=operator, api=api)
        finally:
            with contextlib.suppress(Exception):
                api.close()


def conditions(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status.get("conditions") or []}


def post_report(env: Env, *, name: str, uid: str, pod: str, **fields: Any) -> int:
    """POST one progress report with the pod's own projected token; returns the HTTP status."""
    body = protocol.ProgressReport.model_validate(
        {"namespace": env.namespace, "name": name, "event": "epoch-end", "stage": "head", "epoch": 1,
         "stageEpochs": 1, "epochsDone": 1, "totalEpochs": 2, "metrics": {"loss": 0.5},
         "timestamp": time.time(), **fields}
    ).model_dump(mode="json", by_alias=True)  # fmt: skip
    token = env.cluster.pod_token(namespace=env.namespace, pod=pod, audience=protocol.progress_audience(uid))
    return post_progress(env.operator.progress_url, body, token=token)


def running_pod(env: Env, name: str, *, job_uid: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        for pod in env.pods(name):
            owners = {r["uid"] for r in pod["metadata"].get("ownerReferences") or []}
            statuses = pod["status"].get("containerStatuses") or []
            if job_uid in owners and any("running" in (s.get("state") or {}) for s in statuses):
                return pod
        return None

    return wait_for(probe, timeout=WAIT, message=f"a running pod of Job {job_uid}")


# ----- the first status -----


def test_a_new_job_is_pending_and_reconciling_within_a_second_before_any_pod(env: Env) -> None:
    """With a quota of zero pods no pod can exist; the status must not wait for one."""
    env.apply({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}})
    wait_for(
        lambda: json.loads(env.kubectl("get", "resourcequota", "no-pods", "-o", "json").stdout).get("status", {}).get("hard"),
        timeout=30, message="the quota is in force",
    )  # fmt: skip
    custom = client.CustomObjectsApi(env.api)
    try:
        start = time.monotonic()
        created = custom.create_namespaced_custom_object(GROUP, VERSION, env.namespace, PLURAL, ftj("first"))
        generation = created["metadata"]["generation"]
        status = wait_for(
            lambda: (s := env.status("first")).get("phase") and s, timeout=10, message="ftj/first has a status",
            interval=0.05,
        )  # fmt: skip
        latency = time.monotonic() - start
        print(f"first status {latency:.2f} s after the create call")
        assert latency < 2.0, f"first status took {latency:.2f} s"  # "about a second", on a shared 2-core machine
        assert (status["phase"], status["observedGeneration"]) == ("Pending", generation)
        conds = conditions(status)
        assert conds["Reconciling"] == "True" and conds["Ready"] == "False"
        assert env.pods("first") == []
        assert len(env.jobs("first")) == 1  # the Job is there; the quota keeps its pod out
    finally:
        env.kubectl("delete", "resourcequota", "no-pods")
    # Once pods may exist, it runs as usual.
    done = env.wait_phase("first", "Succeeded")
    assert done["attempts"] == 1


# ----- delete and create again under the same name -----


def test_delete_and_recreate_while_the_old_job_trains_runs_the_new_spec(env: Env) -> None:
    hold = "test.finetune.dev/hold"
    env.apply(ftj("again", env={"FAKE_SLEEP": "300", "SPEC": "old"}))
    old = env.ftj("again")
    assert old is not None
    env.wait_phase("again", "Running")
    (old_job,) = env.jobs("again")
    old_job_uid = old_job["metadata"]["uid"]
    env.kubectl("patch", "job", "again", "--type=merge", "-p", json.dumps({"metadata": {"finalizers": [hold]}}))
    try:
        env.kubectl("delete", "ftj", "again", "--wait=true", "--timeout=60s")
        new_manifest = ftj("again", env={"FAKE_SLEEP": "2", "SPEC": "new"})
        env.apply(new_manifest)
        new = env.ftj("again")
        assert new is not None and new["metadata"]["uid"] != old["metadata"]["uid"]
        new_uid = new["metadata"]["uid"]
        # The garbage collector deletes the old Job; the finalizer holds it (and its running pod) there.
        wait_for(
            lambda: any(j["metadata"].get("deletionTimestamp") for j in env.jobs("again")),
            timeout=WAIT, message="the old Job marked for deletion",
        )  # fmt: skip
        waiting = wait_for(
            lambda: (s := env.status("again")).get("reason") == "Replacing" and s,
            timeout=WAIT, message="ftj/again Pending/Replacing",
        )  # fmt: skip
        assert waiting["phase"] == "Pending" and conditions(waiting)["Reconciling"] == "True"
        assert "earlier FineTuneJob" in waiting["message"]
        assert [j["metadata"]["uid"] for j in env.jobs("again")] == [old_job_uid]  # nothing new, nothing adopted
        assert "attempts" not in waiting or waiting["attempts"] == 0
    finally:
        env.kubectl("patch", "job", "again", "--type=json", "-p", '[{"op":"remove","path":"/metadata/finalizers"}]',
                    check=False)  # fmt: skip

    def new_job() -> dict[str, Any] | None:
        return next((j for j in env.jobs("again") if j["metadata"]["uid"] != old_job_uid), None)

    job = wait_for(new_job, timeout=WAIT, message="the new FineTuneJob's own Job")
    assert job["metadata"]["ownerReferences"][0]["uid"] == new_uid
    pod = running_pod(env, "again", job_uid=job["metadata"]["uid"])
    # What the trainer reads: the spec file the pod runner (our kubelet) mounted from the pod's annotation.
    mounted = env.cluster.dir / "pods" / pod["metadata"]["uid"] / "volumes" / "finetune-config" / "job.json"
    document = json.loads(wait_for(lambda: mounted.is_file() and mounted.read_text(), timeout=10,
                                   message=f"{mounted}"))  # fmt: skip
    assert document["metadata"]["uid"] == new_uid
    assert document["spec"]["runtime"]["env"] == new_manifest["spec"]["runtime"]["env"]
    # The old pod was gone before the new Job was made.
    assert all(
        p["metadata"]["uid"] == pod["metadata"]["uid"] or p["status"].get("phase") in ("Succeeded", "Failed")
        for p in env.pods("again")
    )
    status = env.wait_phase("again", "Succeeded")
    assert status["attempts"] == 1
    assert env.events("again", uid=new_uid).count("JobCreated") == 1
    assert "Failed" not in env.events("again", uid=new_uid)


# ----- finished means finished -----


def test_a_ttl_that_passes_while_the_operator_is_stopped_never_reruns_the_job(env: Env) -> None:
    ttl = 2
    env.apply(ftj("brief", env={"FAKE_SLEEP": "3"}, ttlSecondsAfterFinished=ttl))
    env.wait_phase("brief", "Running")
    env.operator.stop()
    try:
        job = wait_for(
            lambda: next(
                (j for j in env.jobs("brief") if any(c["type"] == "Complete" and c["status"] == "True"
                                                     for c in j["status"].get("conditions") or [])),
                None,
            ),
            timeout=WAIT, message="job/brief Complete while the operator is stopped",
        )  # fmt: skip
        done_at = job["status"]["completionTime"]
        # Let the TTL run out (and then some) with nobody to record the outcome.
        expired = time.time() + ttl + 3
        wait_for(lambda: time.time() > expired, timeout=ttl + 10, message="the TTL ran out", interval=0.5)
        assert [j["metadata"]["uid"] for j in env.jobs("brief")] == [job["metadata"]["uid"]], "the Job must stay"
        assert env.status("brief")["phase"] == "Running"
    finally:
        env.operator.start()
    status = env.wait_phase("brief", "Succeeded")
    assert status["modelPath"] == "/models/fake/model.keras" and status["attempts"] == 1
    # The operator applies the TTL after recording the outcome ...
    wait_for(lambda: env.jobs("brief") == [], timeout=WAIT, message="job/brief deleted after its TTL")
    assert status["completionTime"] >= done_at[:19]
    # ... and never makes a second Job: once the old Job's pods are gone too (the last change the
    # operator watches), a reconcile pass over a version of the job written after that (the
    # annotation) has completed, and it made none.
    wait_for(lambda: env.pods("brief") == [], timeout=WAIT, message="job/brief's pods gone")
    env.kubectl("annotate", "finetunejob", "brief", "test.finetune.dev/nudge=after-ttl", "--overwrite")
    nudged = int((env.ftj("brief") or {})["metadata"]["resourceVersion"])
    labels = {"namespace": env.namespace, "name": "brief"}
    wait_for(
        lambda: (env.operator.sample("finetune_job_reconciled_resource_version", labels) or 0) >= nudged,
        timeout=WAIT, message="a reconcile pass of ftj/brief over its version after the Job's deletion",
    )  # fmt: skip
    assert env.jobs("brief") == [], "a second Job was created"
    # A pass counts each Job it creates as it creates it: the restarted operator made none at all
    # (a Job made and deleted again between two looks at the list counts too).
    created = env.operator.sample("finetune_jobs_created_total", {"namespace": env.namespace})
    assert (created or 0) == 0, f"the restarted operator created {created} Job(s)"
    assert env.status("brief")["phase"] == "Succeeded"
    assert env.events("brief").count("JobCreated") == 1


def test_a_job_deleted_after_its_pod_ran_fails_instead_of_training_twice(env: Env) -> None:
    env.apply(ftj("lost", env={"FAKE_SLEEP": "300"}))
    env.wait_phase("lost", "Running")
    env.kubectl("delete", "job", "lost", "--cascade=background", "--wait=true", "--timeout=60s")
    status = env.wait_phase("lost", "Failed")
    assert status["reason"] == "JobDeleted" and "recorded its outcome" in status["message"]
    assert conditions(status)["Failed"] == "True"
    assert env.jobs("lost") == []
    assert env.events("lost").count("JobCreated") == 1


# ----- etaSeconds once the job stops training -----


def test_eta_is_cleared_when_suspended_and_when_failed(env: Env) -> None:
    for name, env_vars in (("eta-pause", {"FAKE_SLEEP": "300"}), ("eta-fail", {"FAKE_SLEEP": "8", "FAKE_EXIT": "1"})):
        env.apply(ftj(name, env=env_vars, backoffLimit=0))
    for name in ("eta-pause", "eta-fail"):
        env.wait_phase(name, "Running")
        body = env.ftj(name)
        assert body is not None
        (job,) = env.jobs(name)
        pod = running_pod(env, name, job_uid=job["metadata"]["uid"])
        assert post_report(env, name=name, uid=body["metadata"]["uid"], pod=pod["metadata"]["name"],
                           epochSeconds=5.0) == 202  # fmt: skip
        wait_for(lambda n=name: env.status(n).get("etaSeconds") == 5, timeout=WAIT, message=f"ftj/{name} ETA 5")
    env.kubectl("patch", "ftj", "eta-pause", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    suspended = env.wait_phase("eta-pause", "Suspended")
    failed = env.wait_phase("eta-fail", "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    for status in (suspended, failed):
        assert "etaSeconds" not in status, status


def test_operator_never_crashed(env: Env) -> None:
    assert env.operator.alive()
    log = env.operator.log.read_text()
    assert "Traceback" not in log, log[-3000:]
