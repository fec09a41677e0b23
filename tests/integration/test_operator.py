"""The operator on the local control plane, run as its ServiceAccount under deploy/base/rbac.yaml.

One operator process (a subprocess, `python -m finetune_operator`) watches one restricted
namespace for the whole module; the trainer command is the tiny `fake_trainer.py`, told by
`runtime.env` how to end. The last tests restart the operator mid-flight and run a second
operator with one RBAC rule removed (the least-privilege proof).
"""

from __future__ import annotations

import copy
import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_contract import protocol
from fixtures.cluster import Cluster, KubectlError, wait_for
from fixtures.jobs import (
    fake_trainer_operator,
    ftj,
    mint_kubeconfig,
    operator_in_namespace,
    post_progress,
    restricted_namespace,
)
from fixtures.operator import RBAC, OperatorProcess

ROOT = Path(__file__).resolve().parents[2]
WAIT = 60.0


@dataclass
class Env:
    cluster: Cluster
    namespace: str
    operator: OperatorProcess
    tmp: Path

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl_run(*args, "-n", self.namespace, check=check, input=input)

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        proc = self.kubectl("get", kind, name, "-o", "json", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def apply(self, manifest: dict[str, Any], *, dry_run: bool = False) -> subprocess.CompletedProcess[str]:
        args = ["apply", "-f", "-"] + (["--dry-run=server"] if dry_run else [])
        return self.kubectl(*args, input=yaml.safe_dump(manifest))

    def status(self, name: str) -> dict[str, Any]:
        body = self.get("ftj", name)
        return dict((body or {}).get("status") or {})

    def wait_phase(self, name: str, phase: str, timeout: float = WAIT) -> dict[str, Any]:
        return wait_for(
            lambda: (s := self.status(name)).get("phase") == phase and s,
            timeout=timeout,
            message=f"ftj/{name} phase {phase}",
        )

    def events(self, name: str) -> list[str]:
        out = self.kubectl(
            "get", "events", "--field-selector", f"involvedObject.kind=FineTuneJob,involvedObject.name={name}",
            "-o", "json",
        )  # fmt: skip
        return [e["reason"] for e in json.loads(out.stdout)["items"]]

    def jobs(self, name: str) -> list[dict[str, Any]]:
        out = self.kubectl("get", "jobs", "-l", f"finetune.dev/job={name}", "-o", "json")
        return list(json.loads(out.stdout)["items"])


@pytest.fixture(scope="module")
def env(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("operator")
    with operator_in_namespace(cluster, tmp=tmp, prefix="ftj-op") as (namespace, operator):
        yield Env(cluster=cluster, namespace=namespace, operator=operator, tmp=tmp)


# ----- admission -----

BAD = [
    ("spec.training.head.epochs", {"training": {"head": {"epochs": -1}}}),
    ("spec.training.head.learningRate", {"training": {"head": {"learningRate": 1.5}}}),
    ("spec.model.head.dropout", {"model": {"head": {"dropout": 1.0}}}),
    ("spec.training.batchSize", {"training": {"batchSize": 0}}),
    ("spec.model.inputShape", {"model": {"inputShape": [224, 224]}}),
    ("spec.model.inputShape[0]", {"model": {"inputShape": [0, 224, 3]}}),
    ("spec.runtime.gpus", {"runtime": {"gpus": -1}}),
    ("spec.runtime.workers", {"runtime": {"workers": 0}}),
    ("spec.training.mixedPrecision", {"training": {"mixedPrecision": "fp8"}}),
    ("spec.data", {"data": {"train": "/d", "validation": "/v", "validationSplit": 0.2}}),
    ("spec.data", {"data": {"train": "/d"}}),
    ("spec.output", {"output": None}),
    ("spec.bogus", {"bogus": 1}),
]


def merged(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict) and key != "data":
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def test_good_manifests_are_admitted(env: Env) -> None:
    example = yaml.safe_load((ROOT / "examples" / "finetunejob.yaml").read_text())
    assert "created (server dry run)" in env.apply(example, dry_run=True).stdout
    assert "created (server dry run)" in env.apply(ftj("good"), dry_run=True).stdout


@pytest.mark.parametrize(("field_name", "patch"), BAD, ids=[b[0] + "-" + str(i) for i, b in enumerate(BAD)])
def test_bad_manifests_are_rejected_naming_the_field(env: Env, field_name: str, patch: dict[str, Any]) -> None:
    manifest = ftj("bad")
    manifest["spec"] = merged(manifest["spec"], patch)
    with pytest.raises(KubectlError) as err:
        env.apply(manifest, dry_run=True)
    assert field_name in err.value.stderr, err.value.stderr


def test_long_names_are_rejected(env: Env) -> None:
    with pytest.raises(KubectlError) as err:
        env.apply(ftj("x" * 60), dry_run=True)
    assert "metadata.name" in err.value.stderr


# ----- reconciling -----


def test_job_shape_and_pod_admitted_by_pod_security(env: Env) -> None:
    manifest = ftj(
        "shape",
        env={"FAKE_SLEEP": "0"},
        resources={"requests": {"cpu": "100m"}},
        volumes=[{"name": "scratch", "emptyDir": {}}],
        volumeMounts=[{"name": "scratch", "mountPath": "/scratch"}],
        nodeSelector={"kubernetes.io/hostname": "local-node"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        backoffLimit=2,
        activeDeadlineSeconds=600,
        ttlSecondsAfterFinished=3600,
    )
    # A Kueue label passes through (a queue-name label would hold the Job for Kueue: test_kueue.py).
    manifest["metadata"]["labels"] = {"kueue.x-k8s.io/priority-class": "high"}
    env.apply(manifest)
    owner = env.get("ftj", "shape")
    assert owner is not None
    job = wait_for(lambda: env.get("job", "shape"), timeout=WAIT, message="job/shape")
    assert job["metadata"]["ownerReferences"][0]["uid"] == owner["metadata"]["uid"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
    assert job["spec"]["suspend"] is False
    assert job["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "finetune-operator"
    spec = job["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"]) == (2, 600)
    assert "ttlSecondsAfterFinished" not in spec  # the operator applies it, once the outcome is recorded
    assert spec["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2, 3, 4]
    pod_spec = spec["template"]["spec"]
    assert pod_spec["automountServiceAccountToken"] is False
    assert pod_spec["nodeSelector"] == {"kubernetes.io/hostname": "local-node"}
    container = pod_spec["containers"][0]
    assert container["command"][-2:] == ["--config", "/etc/finetune/job.json"]
    assert container["resources"]["requests"] == {"cpu": "100m"}
    # The spec rides in the Job (a pod-template annotation mounted by the downward API): no ConfigMap.
    manifest = json.loads(spec["template"]["metadata"]["annotations"]["finetune.dev/spec"])
    assert manifest["metadata"]["uid"] == owner["metadata"]["uid"] and manifest["spec"] == owner["spec"]
    assert env.get("configmap", "shape-config") is None
    # The progress credential is a projected token for this job's audience: no Secret is made.
    (token,) = [v for v in pod_spec["volumes"] if "projected" in v]
    audience = token["projected"]["sources"][0]["serviceAccountToken"]["audience"]
    assert audience == protocol.progress_audience(owner["metadata"]["uid"])
    assert env.get("secret", "shape-progress") is None
    # PodSecurity `restricted` admitted the pod, and the fake trainer read the mounted config.
    env.wait_phase("shape", "Succeeded")
    pods = json.loads(env.kubectl("get", "pods", "-l", "finetune.dev/job=shape", "-o", "json").stdout)["items"]
    assert len(pods) == 1 and pods[0]["status"]["phase"] == "Succeeded"


def test_success_is_succeeded_complete_ready(env: Env) -> None:
    env.apply(ftj("ok", env={"FAKE_SLEEP": "1"}))
    env.kubectl("wait", "--for=condition=Complete", "ftj/ok", f"--timeout={int(WAIT)}s")
    status = env.status("ok")
    conditions = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "Succeeded" and status["reason"] == "Succeeded"
    assert conditions["Ready"]["status"] == "True" and conditions["Complete"]["status"] == "True"
    assert conditions["Failed"]["status"] == "False"
    assert all(c["observedGeneration"] == 1 for c in conditions.values())
    assert status["modelPath"] == "/models/fake/model.keras"
    assert (status["attempts"], status["progress"], status["observedGeneration"]) == (1, 100, 1)
    assert status["startTime"] <= status["completionTime"]
    wait_for(lambda: {"JobCreated", "Succeeded"} <= set(env.events("ok")), timeout=10, message="events of ftj/ok")
    body = env.get("ftj", "ok")
    assert body is not None
    assert not any(k.startswith("kopf.zalando.org") for k in body["metadata"].get("annotations") or {})
    assert set(status) <= {
        "observedGeneration", "phase", "reason", "stage", "epoch", "epochs", "totalEpochs", "progress",
        "etaSeconds", "metrics", "bestValAccuracy", "imagesPerSecond", "attempts", "startTime",
        "completionTime", "lastProgressTime", "modelPath", "message", "conditions",
    }  # fmt: skip


def test_progress_reports_reach_the_status(env: Env) -> None:
    """The pod gets the progress URL and its job's token; the operator's hub folds the report in."""
    env.apply(ftj("reporting", env={"FAKE_REPORT": "1", "FAKE_SLEEP": "1"}))
    status = env.wait_phase("reporting", "Succeeded")
    assert (status["stage"], status["epochs"], status["bestValAccuracy"]) == ("head", "1/1", 0.75)
    assert status["progress"] == 100 and status["message"].startswith("model saved")


def test_data_error_fails_at_once_with_the_trainers_message(env: Env) -> None:
    env.apply(ftj("dataerr", env={"FAKE_EXIT": "3", "FAKE_REASON": "DataError",
                                  "FAKE_MESSAGE": "no images under /data/train"}, backoffLimit=3))  # fmt: skip
    status = env.wait_phase("dataerr", "Failed")
    assert status["reason"] == "DataError"
    assert "no images under /data/train" in status["message"]
    failed = {c["type"]: c for c in status["conditions"]}["Failed"]
    assert failed["status"] == "True" and failed["reason"] == "DataError"
    assert status["attempts"] == 1
    assert env.jobs("dataerr")[0]["status"].get("failed") == 1  # never retried despite backoffLimit 3
    wait_for(lambda: "Failed" in env.events("dataerr"), timeout=10, message="Failed event")


def test_unexpected_errors_are_retried_until_the_backoff_limit(env: Env) -> None:
    env.apply(ftj("flaky", env={"FAKE_EXIT": "1", "FAKE_MESSAGE": "segfault"}, backoffLimit=1))
    status = env.wait_phase("flaky", "Failed", timeout=90)
    assert status["reason"] == "BackoffLimitExceeded"
    assert status["attempts"] == 2
    assert "segfault" in status["message"]
    assert env.jobs("flaky")[0]["status"]["failed"] == 2


def test_unknown_base_model_fails_without_a_job_or_retry(env: Env) -> None:
    manifest = ftj("nonet")
    manifest["spec"]["model"]["base"] = "NoSuchNet"
    env.apply(manifest)
    status = env.wait_phase("nonet", "Failed")
    assert status["reason"] == "InvalidSpec" and "spec.model.base" in status["message"]
    wait_for(lambda: env.events("nonet") == ["Failed"], timeout=10, message="one Failed event")
    assert env.get("job", "nonet") is None
    assert env.operator.alive()


def test_a_job_the_api_server_refuses_fails_as_invalid_spec(env: Env) -> None:
    """Admission cannot see that a mount names no volume; the API server refuses the Job (422), once."""
    env.apply(ftj("badvolume", volumeMounts=[{"name": "no-such-volume", "mountPath": "/nowhere"}]))
    status = env.wait_phase("badvolume", "Failed")
    assert status["reason"] == "InvalidSpec"
    assert "volumeMounts" in status["message"] and "no-such-volume" in status["message"]
    assert env.get("job", "badvolume") is None
    assert env.operator.alive()


def test_image_pull_errors_fail_after_the_pending_timeout(env: Env) -> None:
    env.apply(ftj("noimage", image="registry.invalid/trainer:0"))
    status = env.wait_phase("noimage", "Failed")
    assert status["reason"] == "ImagePullError"
    wait_for(lambda: (env.get("job", "noimage") or {}).get("spec", {}).get("suspend") is True,
             timeout=10, message="the stuck Job suspended")  # fmt: skip


def test_unschedulable_pods_fail_after_the_pending_timeout(env: Env) -> None:
    env.apply(ftj("nowhere", nodeSelector={"example.com/no-such-node": "true"}))
    status = env.wait_phase("nowhere", "Failed")
    assert status["reason"] == "Unschedulable"
    assert "nowhere-" in status["message"]


def test_a_job_that_can_never_make_its_pod_fails_after_the_pending_timeout(env: Env) -> None:
    """PodSecurity `restricted` refuses the hostPath pod: the Job makes no pod, the ftj fails with the reason."""
    env.apply(ftj("hostpath", volumes=[{"name": "host", "hostPath": {"path": "/var/tmp"}}]))
    status = env.wait_phase("hostpath", "Failed")
    assert status["reason"] == "PodCreationFailed"
    assert "PodSecurity" in status["message"] and "hostPath" in status["message"]
    wait_for(lambda: (env.get("job", "hostpath") or {}).get("spec", {}).get("suspend") is True,
             timeout=10, message="the Job suspended")  # fmt: skip
    wait_for(lambda: "Failed" in env.events("hostpath"), timeout=10, message="a Failed event")


def test_suspend_and_resume(env: Env) -> None:
    env.apply(ftj("pausable", env={"FAKE_SLEEP": "3"}))
    env.wait_phase("pausable", "Running")
    env.kubectl("patch", "ftj", "pausable", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    env.wait_phase("pausable", "Suspended")
    job = env.get("job", "pausable")
    assert job is not None and job["spec"]["suspend"] is True
    suspended = {c["type"]: c for c in env.status("pausable")["conditions"]}["Suspended"]
    assert suspended["status"] == "True"
    env.kubectl("patch", "ftj", "pausable", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    status = env.wait_phase("pausable", "Succeeded")
    assert status["attempts"] == 2
    assert {"Suspended", "Resumed", "Succeeded"} <= set(env.events("pausable"))


def test_spec_edits_of_a_started_job_are_refused(env: Env) -> None:
    env.apply(ftj("frozen", env={"FAKE_SLEEP": "2"}))
    env.wait_phase("frozen", "Running")
    with pytest.raises(KubectlError) as err:
        env.kubectl("patch", "ftj", "frozen", "--type=merge", "-p", '{"spec":{"training":{"batchSize":8}}}')
    assert "immutable" in err.value.stderr and "spec" in err.value.stderr
    env.wait_phase("frozen", "Succeeded")


def test_deleting_the_finetunejob_collects_its_objects(env: Env) -> None:
    env.apply(ftj("doomed", env={"FAKE_SLEEP": "30"}))
    env.wait_phase("doomed", "Running")
    env.kubectl("delete", "ftj", "doomed", "--wait=true")

    def gone() -> bool:
        pods = json.loads(env.kubectl("get", "pods", "-l", "finetune.dev/job=doomed", "-o", "json").stdout)["items"]
        return env.get("job", "doomed") is None and not pods

    wait_for(gone, timeout=WAIT, message="Job and pods of ftj/doomed garbage-collected")


def test_operator_restart_mid_flight_adopts_and_converges(env: Env) -> None:
    env.apply(ftj("survivor", env={"FAKE_SLEEP": "6"}))
    env.wait_phase("survivor", "Running")
    env.operator.kill()
    env.operator.start()
    status = env.wait_phase("survivor", "Succeeded")
    assert len(env.jobs("survivor")) == 1
    assert status["attempts"] == 1
    assert env.events("survivor").count("JobCreated") == 1


def test_two_replicas_with_peering_make_one_job(env: Env) -> None:
    """With Kopf peering the lower-priority replica pauses; the job runs once."""
    cluster = env.cluster
    cluster.kubectl_run("apply", "-f", str(ROOT / "deploy" / "base" / "peering.yaml"), check=False)
    cluster.kubectl_run("wait", "--for=condition=Established", "crd/kopfpeerings.kopf.dev", "--timeout=30s")
    namespace = restricted_namespace(cluster, prefix="ftj-peer")
    cluster.kubectl_run("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "finetune-operator"}}))  # fmt: skip
    replicas = [
        fake_trainer_operator(
            kubeconfig=env.operator.kubeconfig,
            namespace=namespace,
            log=env.tmp / f"operator-peer-{prio}.log",
            extra=("--peering", "finetune-operator", "--priority", str(prio)),
        )
        for prio in (10, 20)
    ]
    try:
        for replica in replicas:
            replica.start()
        wait_for(lambda: "Pausing operations" in replicas[0].log.read_text(), timeout=WAIT,
                 message="the low-priority replica pauses")  # fmt: skip
        cluster.kubectl_run("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(ftj("peered")))
        wait_for(
            lambda: (cluster.kubectl_json("get", "ftj", "peered", "-n", namespace).get("status") or {}).get("phase")
            == "Succeeded",
            timeout=WAIT,
            message="ftj/peered Succeeded",
        )
        jobs = cluster.kubectl_json("get", "jobs", "-n", namespace, "-l", "finetune.dev/job=peered")["items"]
        assert len(jobs) == 1
        # The paused replica takes a valid report (the Service may send it there): it looks the job up
        # and checks the pod's token like the active one would.
        cluster.kubectl_run("apply", "-n", namespace, "-f", "-",
                            input=yaml.safe_dump(ftj("held", env={"FAKE_SLEEP": "120"})))  # fmt: skip
        wait_for(
            lambda: (cluster.kubectl_json("get", "ftj", "held", "-n", namespace).get("status") or {}).get("phase")
            == "Running",
            timeout=WAIT,
            message="ftj/held Running",
        )
        uid = cluster.kubectl_json("get", "ftj", "held", "-n", namespace)["metadata"]["uid"]
        pod = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "finetune.dev/job=held")["items"][0]
        token = cluster.pod_token(
            namespace=namespace, pod=pod["metadata"]["name"], audience=protocol.progress_audience(uid)
        )
        standby = f"http://127.0.0.1:{replicas[0].progress_port}/v1/progress"
        assert post_report(standby, namespace=namespace, name="held", token=token) == 202
        assert post_report(standby, namespace=namespace, name="held", token="made-up") == 401
        assert post_report(standby, namespace=namespace, name="no-such-job", token=token) == 404
        wait_for(
            lambda: (cluster.kubectl_json("get", "ftj", "held", "-n", namespace).get("status") or {}).get("epochs")
            == "1/1",
            timeout=WAIT,
            message="the standby's report reached ftj/held's status",
        )
        assert all(r.alive() for r in replicas)
    finally:
        for replica in replicas:
            replica.stop()
        cluster.kubectl_run("delete", "ns", namespace, "--wait=false", check=False)


def post_report(url: str, *, namespace: str, name: str, token: str) -> int:
    """POST one head-stage epoch-end report; returns the HTTP status."""
    body = protocol.ProgressReport.model_validate(
        {"namespace": namespace, "name": name, "event": "epoch-end", "stage": "head", "epoch": 1, "stageEpochs": 1,
         "epochsDone": 1, "totalEpochs": 2, "metrics": {"loss": 0.5}, "timestamp": time.time()}
    ).model_dump(mode="json", by_alias=True)  # fmt: skip
    return post_progress(url, body, token=token)


# ----- least privilege -----


def test_removing_an_rbac_rule_breaks_the_operator_as_expected(env: Env) -> None:
    """Without `create` on batch Jobs the operator reports 403 and retries; restored, it converges."""
    cluster = env.cluster
    docs = list(yaml.safe_load_all(RBAC.read_text()))
    role = copy.deepcopy(next(d for d in docs if d["kind"] == "ClusterRole"))
    binding = copy.deepcopy(next(d for d in docs if d["kind"] == "ClusterRoleBinding"))
    name = f"finetune-operator-less-{secrets.token_hex(2)}"
    full_rules = copy.deepcopy(role["rules"])
    for rule in role["rules"]:
        if rule["resources"] == ["jobs"]:
            rule["verbs"] = [v for v in rule["verbs"] if v != "create"]
    role["metadata"] = {"name": name}
    binding["metadata"] = {"name": name}
    binding["roleRef"]["name"] = name
    binding["subjects"][0]["name"] = name
    namespace = restricted_namespace(cluster, prefix="ftj-rbac")
    cluster.kubectl_run("apply", "-f", "-", input=yaml.safe_dump_all([role, binding]))
    operator = fake_trainer_operator(
        kubeconfig=mint_kubeconfig(cluster, name=name, path=env.tmp / f"kubeconfig-{name}"),
        namespace=namespace,
        log=env.tmp / f"operator-{name}.log",
    )
    operator.start()
    try:
        cluster.kubectl_run("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(ftj("denied")))
        wait_for(lambda: operator.metric("finetune_reconcile_errors_total") >= 2, timeout=WAIT,
                 message="reconcile errors counted")  # fmt: skip
        log = operator.log.read_text()
        assert "403" in log and "jobs" in log
        assert cluster.kubectl_run("get", "job", "denied", "-n", namespace, check=False).returncode != 0
        assert operator.alive()
        role["rules"] = full_rules
        cluster.kubectl_run("apply", "-f", "-", input=yaml.safe_dump(role))
        wait_for(
            lambda: (cluster.kubectl_json("get", "ftj", "denied", "-n", namespace).get("status") or {}).get("phase")
            == "Succeeded",
            timeout=90,
            message="ftj/denied Succeeded once the rule is back",
        )
    finally:
        operator.stop()
        cluster.kubectl_run("delete", "ns", namespace, "--wait=false", check=False)
        cluster.kubectl_run("delete", "clusterrole,clusterrolebinding", name, check=False)


def test_operator_never_crashed(env: Env) -> None:
    assert env.operator.alive()
    log = env.operator.log.read_text()
    assert "Traceback" not in log, log[-3000:]
