"""The test bed itself: the local control plane and pod runner behave like a real cluster.

Job controller (completion, podFailurePolicy, backoffLimit), garbage collection, PodSecurity
admission, RBAC for ServiceAccount tokens, CRD CEL validation, and the pod runner's kubelet
duties (env, volumes, termination message, graceful deletion).
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fixtures.cluster import ApplyYaml, Cluster, KubectlError, ServiceAccountKubeconfig, wait_for
from kubernetes import client

POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def job_manifest(*, name: str, code: str, backoff_limit: int = 0, extra_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff_limit,
            **(extra_spec or {}),
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": POD_SECURITY,
                    "containers": [
                        {
                            "name": "main",
                            "image": "python:3.11-slim",
                            "command": ["python", "-c", code],
                            "securityContext": CONTAINER_SECURITY,
                        }
                    ],
                }
            },
        },
    }


def job_condition(cluster: Cluster, *, namespace: str, name: str) -> dict[str, Any] | None:
    """The Job's Complete or Failed condition (True) once it has one, with its counts."""
    job = cluster.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}") or {}
    status = job.get("status", {})
    for cond in status.get("conditions") or []:
        if cond["type"] in ("Complete", "Failed") and cond["status"] == "True":
            return {"type": cond["type"], "reason": cond.get("reason"), "failed": status.get("failed", 0),
                    "succeeded": status.get("succeeded", 0)}
    return None


def job_pods(cluster: Cluster, *, namespace: str, name: str) -> list[dict[str, Any]]:
    pods = cluster.get(f"/api/v1/namespaces/{namespace}/pods?labelSelector=job-name%3D{name}") or {}
    return list(pods.get("items", []))


def pod(cluster: Cluster, *, namespace: str, name: str) -> dict[str, Any]:
    return cluster.get(f"/api/v1/namespaces/{namespace}/pods/{name}") or {}


def phase(cluster: Cluster, *, namespace: str, name: str) -> str | None:
    got: str | None = pod(cluster, namespace=namespace, name=name).get("status", {}).get("phase")
    return got


def finished(cluster: Cluster, *, namespace: str, name: str) -> dict[str, Any] | None:
    """The pod once it is Succeeded or Failed with its container's terminated state written."""
    got = pod(cluster, namespace=namespace, name=name)
    statuses = got.get("status", {}).get("containerStatuses") or []
    if got.get("status", {}).get("phase") in ("Succeeded", "Failed") and statuses and "terminated" in statuses[0]["state"]:
        return got
    return None


def terminated(got: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = got["status"]["containerStatuses"][0]["state"]["terminated"]
    return state


def claim(name: str) -> dict[str, Any]:
    """A PersistentVolumeClaim (the pod runner mounts .cluster/volumes/<ns>/<name> for it)."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Mi"}}},
    }


def test_job_completes(cluster: Cluster, namespace: str, apply_yaml: ApplyYaml) -> None:
    apply_yaml(job_manifest(name="ok", code="raise SystemExit(0)"), namespace=namespace)
    cond = wait_for(lambda: job_condition(cluster, namespace=namespace, name="ok"), timeout=60, message="Job ok ends")
    assert cond["type"] == "Complete"
    assert cond["succeeded"] == 1


def test_pod_failure_policy_fails_job_without_retry(cluster: Cluster, namespace: str, apply_yaml: ApplyYaml) -> None:
    policy = {
        "podFailurePolicy": {
            "rules": [{"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [3]}}]
        }
    }
    apply_yaml(
        job_manifest(name="exit3", code="raise SystemExit(3)", backoff_limit=4, extra_spec=policy), namespace=namespace
    )
    cond = wait_for(
        lambda: job_condition(cluster, namespace=namespace, name="exit3"), timeout=60, message="Job exit3 ends"
    )
    assert cond["type"] == "Failed"
    assert cond["reason"] == "PodFailurePolicy"
    assert cond["failed"] == 1
    pods = job_pods(cluster, namespace=namespace, name="exit3")
    assert len(pods) == 1
    assert terminated(pods[0])["exitCode"] == 3


def test_failing_job_is_retried_up_to_backoff_limit(cluster: Cluster, namespace: str, apply_yaml: ApplyYaml) -> None:
    # The Job controller waits 10 s before the first retry; backoffLimit 1 keeps this short.
    apply_yaml(job_manifest(name="exit1", code="raise SystemExit(1)", backoff_limit=1), namespace=namespace)
    cond = wait_for(
        lambda: job_condition(cluster, namespace=namespace, name="exit1"), timeout=90, message="Job exit1 ends"
    )
    assert cond["type"] == "Failed"
    assert cond["reason"] == "BackoffLimitExceeded"
    assert cond["failed"] == 2
    pods = job_pods(cluster, namespace=namespace, name="exit1")
    assert len(pods) == 2
    assert all(p["status"]["phase"] == "Failed" for p in pods)


def test_deleting_owner_garbage_collects_dependents(cluster: Cluster, namespace: str, apply_yaml: ApplyYaml) -> None:
    def config_map(name: str, **meta: Any) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, **meta}, "data": {"k": name}}

    [owner] = apply_yaml(config_map("owner"), namespace=namespace)
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    apply_yaml([config_map("dependent", ownerReferences=[ref]), config_map("bystander")], namespace=namespace)
    cluster.kubectl_run("delete", "configmap", "owner", "-n", namespace, "--cascade=background")

    def names() -> set[str]:
        items = (cluster.get(f"/api/v1/namespaces/{namespace}/configmaps") or {}).get("items", [])
        return {cm["metadata"]["name"] for cm in items}

    wait_for(lambda: "dependent" not in names(), timeout=30, message="the dependent is garbage-collected")
    assert "bystander" in names()


def _pod(name: str, *, privileged: bool) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "main",
        "image": "python:3.11-slim",
        "command": ["python", "-c", "print('hi')"],
        "securityContext": {"privileged": True} if privileged else CONTAINER_SECURITY,
    }
    spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    if not privileged:
        spec["securityContext"] = POD_SECURITY
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def test_pod_security_restricted(cluster: Cluster, namespace: str, apply_yaml: ApplyYaml) -> None:
    with pytest.raises(KubectlError) as rejected:
        apply_yaml(_pod("privileged", privileged=True), namespace=namespace)
    assert 'violates PodSecurity "restricted:latest"' in rejected.value.stderr
    assert "privileged" in rejected.value.stderr

    apply_yaml(_pod("compliant", privileged=False), namespace=namespace)

    done = wait_for(lambda: finished(cluster, namespace=namespace, name="compliant"), timeout=60,
                    message="the compliant pod runs")
    assert done["status"]["phase"] == "Succeeded"
    assert cluster.pod_log(namespace=namespace, pod="compliant", container="main").strip() == "hi"


def _status(call: Any) -> int:
    """The HTTP status of a kubernetes client call (200 when it succeeds)."""
    try:
        call()
    except client.ApiException as err:
        return int(err.status)
    return 200


def test_service_account_rbac(
    cluster: Cluster, namespace: str, service_account_kubeconfig: ServiceAccountKubeconfig
) -> None:
    from kubernetes import config

    kubeconfig = service_account_kubeconfig(namespace=namespace, name="reader")
    cluster.kubectl_run("create", "configmap", "existing", "--from-literal=k=v", "-n", namespace)
    cm = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="new"), data={"a": "b"})
    with config.new_client_from_config(config_file=str(kubeconfig)) as sa_api:  # type: ignore[no-untyped-call]
        core = client.CoreV1Api(sa_api)
        assert _status(lambda: core.list_namespaced_config_map(namespace)) == 403
        assert _status(lambda: core.read_namespaced_config_map("existing", namespace)) == 403

        cluster.kubectl_run("create", "role", "read-cm", "--verb=get,list", "--resource=configmaps", "-n", namespace)
        cluster.kubectl_run(
            "create", "rolebinding", "read-cm", "--role=read-cm", f"--serviceaccount={namespace}:reader",
            "-n", namespace,
        )
        wait_for(
            lambda: _status(lambda: core.list_namespaced_config_map(namespace)) == 200,
            timeout=30, message="the Role lets the ServiceAccount list configmaps",
        )
        assert core.read_namespaced_config_map("existing", namespace).data == {"k": "v"}
        assert _status(lambda: core.create_namespaced_config_map(namespace, cm)) == 403
        assert _status(lambda: core.delete_namespaced_config_map("existing", namespace)) == 403
        assert _status(lambda: core.list_namespaced_secret(namespace)) == 403
    denied = cluster.kubectl_run("delete", "configmap", "existing", "-n", namespace, kubeconfig=kubeconfig, check=False)
    assert denied.returncode != 0
    assert f'User "system:serviceaccount:{namespace}:reader" cannot delete resource "configmaps"' in denied.stderr


def test_crd_cel_rule_rejects_with_its_message(cluster: Cluster, namespace: str, apply_yaml: ApplyYaml) -> None:
    plural = f"widgets{secrets.token_hex(3)}"
    group = "testbed.finetune.dev"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": plural[:-1], "kind": f"Widget{plural[-6:].upper()}x"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"min": {"type": "integer"}, "max": {"type": "integer"}},
                                    "x-kubernetes-validations": [
                                        {"rule": "self.min <= self.max", "message": "min must not exceed max"}
                                    ],
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    apply_yaml(crd)
    try:
        cluster.kubectl_run("wait", "--for=condition=Established", f"crd/{plural}.{group}", "--timeout=30s")
        kind = f"Widget{plural[-6:].upper()}x"

        def widget(name: str, lo: int, hi: int) -> dict[str, Any]:
            return {"apiVersion": f"{group}/v1", "kind": kind, "metadata": {"name": name}, "spec": {"min": lo, "max": hi}}

        with pytest.raises(KubectlError) as rejected:
            apply_yaml(widget("bad", 5, 1), namespace=namespace)
        assert "min must not exceed max" in rejected.value.stderr
        created = apply_yaml(widget("good", 1, 5), namespace=namespace)
        assert created[0]["spec"] == {"min": 1, "max": 5}
    finally:
        cluster.kubectl_run("delete", "crd", f"{plural}.{group}", "--wait=false", check=False)


def test_pod_runner_env_volumes_and_termination_message(
    cluster: Cluster, namespace: str, apply_yaml: ApplyYaml
) -> None:
    code = "\n".join([
        "import os, pathlib",
        "assert os.environ['TOKEN'] == 's3cret', os.environ['TOKEN']",
        "assert os.environ['GREETING'] == 'hello'",
        "assert os.environ['DERIVED'] == 'hello-world'",
        "assert os.environ['POD_NAME'] == 'runner' and os.environ['POD_IP'] == '127.0.0.1'",
        "assert os.environ['POD_NS'] == os.environ['EXPECT_NS']",
        "assert pathlib.Path('/srv/testbed/cfg/greeting').read_text() == 'hello'",
        "assert pathlib.Path('/srv/testbed/sec/token').read_text() == 's3cret'",
        "assert os.getcwd() == '/work'",
        "pathlib.Path('/srv/testbed/data/out.txt').write_text('persisted')",
        "pathlib.Path('/srv/testbed/scratch/tmp.txt').write_text('x')",
        "try:",
        "    pathlib.Path('/srv/testbed/cfg/new').write_text('no')",
        "    raise SystemExit('configMap volume is writable')",
        "except OSError:",
        "    pass",
        "assert sorted(os.listdir('/var/run/secrets/kubernetes.io/serviceaccount')) == ['ca.crt', 'namespace', 'token']",
        "pathlib.Path('/dev/termination-log').write_text('all checks passed')",
    ])
    manifest = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"greeting": "hello"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sec"}, "stringData": {"token": "s3cret"}},
        claim("data"),
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "runner"},
            "spec": {
                "restartPolicy": "Never",
                "securityContext": POD_SECURITY,
                "volumes": [
                    {"name": "cfg", "configMap": {"name": "cfg"}},
                    {"name": "sec", "secret": {"secretName": "sec"}},
                    {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                    {"name": "scratch", "emptyDir": {}},
                ],
                "containers": [
                    {
                        "name": "main",
                        "image": "python:3.11-slim",
                        "command": ["python", "-c", code],
                        "workingDir": "/work",
                        "securityContext": CONTAINER_SECURITY,
                        "env": [
                            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "token"}}},
                            {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}},
                            {"name": "DERIVED", "value": "$(GREETING)-world"},
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                            {"name": "EXPECT_NS", "value": namespace},
                        ],
                        "volumeMounts": [
                            {"name": "cfg", "mountPath": "/srv/testbed/cfg"},
                            {"name": "sec", "mountPath": "/srv/testbed/sec", "readOnly": True},
                            {"name": "data", "mountPath": "/srv/testbed/data"},
                            {"name": "scratch", "mountPath": "/srv/testbed/scratch"},
                        ],
                    }
                ],
            },
        },
    ]
    apply_yaml(manifest, namespace=namespace)

    got = wait_for(lambda: finished(cluster, namespace=namespace, name="runner"), timeout=60,
                   message="pod runner finishes")
    log = cluster.pod_log(namespace=namespace, pod="runner", container="main")
    assert got["status"]["phase"] == "Succeeded", log
    state = terminated(got)
    assert (state["exitCode"], state["reason"], state["message"]) == (0, "Completed", "all checks passed")
    assert got["status"]["podIP"] == "127.0.0.1"
    assert state["startedAt"]
    ready = {c["type"]: c["status"] for c in got["status"]["conditions"]}
    assert ready["PodScheduled"] == "True" and ready["Initialized"] == "True" and ready["Ready"] == "False"
    assert (cluster.dir / "volumes" / namespace / "data" / "out.txt").read_text() == "persisted"
    # The mounts lived in the container's own mount namespace: this process sees none of them.
    assert not Path("/srv/testbed/cfg/greeting").exists()
    assert not Path("/srv/testbed/data/out.txt").exists()


def test_pod_runner_fallback_to_logs_and_graceful_delete(
    cluster: Cluster, namespace: str, apply_yaml: ApplyYaml
) -> None:
    def make_pod(name: str, code: str, **extra: Any) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 2,
                "securityContext": POD_SECURITY,
                "containers": [
                    {"name": "main", "image": "python:3.11-slim", "command": ["python", "-u", "-c", code],
                     "securityContext": CONTAINER_SECURITY, **extra}
                ],
            },
        }

    apply_yaml(
        [
            make_pod("crash", "import sys; print('disk on fire'); sys.exit(7)",
                terminationMessagePolicy="FallbackToLogsOnError"),
            # Ignores SIGTERM, so only SIGKILL after the 2 s grace period ends it.
            make_pod("stubborn", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                            "print('up', flush=True); time.sleep(600)"),
        ],
        namespace=namespace,
    )
    state = terminated(wait_for(lambda: finished(cluster, namespace=namespace, name="crash"), timeout=60,
                                message="crash fails"))
    assert (state["exitCode"], state["reason"]) == (7, "Error")
    assert "disk on fire" in state["message"]

    wait_for(lambda: phase(cluster, namespace=namespace, name="stubborn") == "Running", timeout=60,
             message="stubborn runs")
    wait_for(lambda: "up" in cluster.pod_log(namespace=namespace, pod="stubborn", container="main"),
             timeout=30, message="stubborn printed")
    started = time.monotonic()
    cluster.kubectl_run("delete", "pod", "stubborn", "-n", namespace, "--wait=false")
    wait_for(lambda: not pod(cluster, namespace=namespace, name="stubborn"), timeout=30,
             message="the deleted pod is removed after SIGKILL")
    # SIGTERM is ignored, so only the SIGKILL after the 2 s grace period ends it.
    assert time.monotonic() - started >= 2.0


def test_pod_runner_init_containers_pull_errors_and_unschedulable(
    cluster: Cluster, namespace: str, apply_yaml: ApplyYaml
) -> None:
    def make_pod(name: str, *, image: str = "python:3.11-slim", gpus: int = 0, init: bool = False) -> dict[str, Any]:
        main: dict[str, Any] = {
            "name": "main", "image": image, "securityContext": CONTAINER_SECURITY,
            "command": ["python", "-c", "import pathlib; print(pathlib.Path('/shared/msg').read_text())"],
            "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
        }
        if gpus:
            main["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
        spec: dict[str, Any] = {
            "restartPolicy": "Never", "securityContext": POD_SECURITY, "containers": [main],
            "volumes": [{"name": "shared", "emptyDir": {}}],
        }
        if init:
            spec["initContainers"] = [{
                "name": "prepare", "image": image, "securityContext": CONTAINER_SECURITY,
                "command": ["python", "-c", "import pathlib; pathlib.Path('/shared/msg').write_text('from init')"],
                "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
            }]
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}

    apply_yaml(
        [
            make_pod("with-init", init=True, gpus=2),
            make_pod("bad-image", image="registry.invalid/nothing:1"),
            make_pod("too-big", gpus=100),
        ],
        namespace=namespace,
    )
    done = wait_for(lambda: finished(cluster, namespace=namespace, name="with-init"), timeout=60,
                    message="with-init finishes")
    assert done["status"]["phase"] == "Succeeded"
    assert done["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert cluster.pod_log(namespace=namespace, pod="with-init", container="main").strip() == "from init"

    def waiting_reason() -> str | None:
        statuses = pod(cluster, namespace=namespace, name="bad-image").get("status", {}).get("containerStatuses") or []
        reason: str | None = statuses[0]["state"].get("waiting", {}).get("reason") if statuses else None
        return reason if reason in ("ErrImagePull", "ImagePullBackOff") else None

    wait_for(waiting_reason, timeout=30, message="bad-image waits on its image")
    assert phase(cluster, namespace=namespace, name="bad-image") == "Pending"

    def unschedulable() -> dict[str, Any] | None:
        conds = pod(cluster, namespace=namespace, name="too-big").get("status", {}).get("conditions") or []
        return next((c for c in conds if c["type"] == "PodScheduled" and c["status"] == "False"), None)

    cond = wait_for(unschedulable, timeout=30, message="too-big is Unschedulable")
    assert cond["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in cond["message"]
    assert not pod(cluster, namespace=namespace, name="too-big")["spec"].get("nodeName")


def test_pod_runner_simulated_mode(cluster: Cluster, namespace: str, apply_yaml: ApplyYaml) -> None:
    """A second pod runner in simulated mode, for its own node: Jobs complete without running anything."""
    node = f"sim-{secrets.token_hex(3)}"
    runner = subprocess.Popen(
        [sys.executable, str(cluster.root / "hack" / "podrunner.py"),
         f"--kubeconfig={cluster.dir / 'podrunner.kubeconfig'}", f"--cluster-dir={cluster.dir}",
         f"--node-name={node}", "--simulate=0.5", "--no-bind"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        jobs = []
        for i in range(10):
            job = job_manifest(name=f"sim{i}", code="raise SystemExit(1)")  # would fail if it really ran
            job["spec"]["template"]["spec"]["nodeName"] = node
            jobs.append(job)
        apply_yaml(jobs, namespace=namespace)

        def all_done() -> bool:
            conds = [job_condition(cluster, namespace=namespace, name=f"sim{i}") for i in range(10)]
            return all(c is not None for c in conds)

        wait_for(all_done, timeout=60, message="simulated jobs finish")
        for i in range(10):
            cond = job_condition(cluster, namespace=namespace, name=f"sim{i}")
            assert cond is not None and cond["type"] == "Complete"
        [sim_pod] = job_pods(cluster, namespace=namespace, name="sim0")
        assert sim_pod["spec"]["nodeName"] == node
        assert terminated(sim_pod)["containerID"].startswith("simulated://")
        assert not cluster.pod_log(namespace=namespace, pod=sim_pod["metadata"]["name"], container="main")
    finally:
        runner.terminate()
        runner.wait(timeout=30)
        cluster.request("DELETE", f"/api/v1/nodes/{node}")


def test_pod_runner_volume_over_a_parent_of_other_sources(cluster: Cluster, apply_yaml: ApplyYaml, tmp_path: Path) -> None:
    """An emptyDir at /tmp must not hide a hostPath source (or the checkout) that lives under /tmp."""
    source = Path("/tmp") / f"fto-overmount-{secrets.token_hex(4)}"
    source.mkdir()
    (source / "hello.txt").write_text("from the host")
    ns = f"overmount-{secrets.token_hex(3)}"
    apply_yaml({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    try:
        wait_for(lambda: cluster.get(f"/api/v1/namespaces/{ns}/serviceaccounts/default"), timeout=60,
                 message="default ServiceAccount")
        code = "import pathlib,sys; sys.exit(0 if pathlib.Path('/data/hello.txt').read_text() == 'from the host' else 7)"
        apply_yaml(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "overmount"},
                "spec": {
                    "restartPolicy": "Never",
                    "volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "data", "hostPath": {"path": str(source)}}],
                    "containers": [
                        {
                            "name": "main",
                            "image": "python:3.11-slim",
                            "command": ["python", "-c", code],
                            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                                             {"name": "data", "mountPath": "/data", "readOnly": True}],
                        }
                    ],
                },
            },
            namespace=ns,
        )
        got = wait_for(lambda: finished(cluster, namespace=ns, name="overmount"), timeout=90, message="pod finished")
        state = terminated(got)
        assert state["exitCode"] == 0, state
    finally:
        cluster.kubectl_run("delete", "namespace", ns, "--wait=false", check=False)
        for f in source.iterdir():
            f.unlink()
        source.rmdir()


def test_pod_runner_renews_projected_tokens_like_the_kubelet(
    cluster: Cluster, namespace: str, apply_yaml: ApplyYaml, tmp_path: Path
) -> None:
    """A projected serviceAccountToken is minted again when due (80 % of its lifetime); the new
    file replaces the old one atomically and is a valid token bound to the same pod."""
    from finetune_testbed.podrunner.api import Api
    from finetune_testbed.podrunner.runner import PodRunner
    from finetune_testbed.podrunner.state import PodRun

    # A pod object for the runner to mint for (its image "fails to pull", so nothing runs it).
    (pod,) = apply_yaml({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "holder"},
        "spec": {"automountServiceAccountToken": False, "containers": [{
            "name": "c", "image": "registry.invalid/none:0",
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                "runAsNonRoot": True, "runAsUser": 1000,
                                "seccompProfile": {"type": "RuntimeDefault"}}}]},
    }, namespace=namespace)  # fmt: skip
    runner = PodRunner(
        api=Api(kubeconfig=str(cluster.kubeconfig)), cluster_dir=tmp_path, node_name="renewal-test",
        capacity={}, simulate=None, kubelet_port=0, bind=False,
    )  # fmt: skip
    run = PodRun(uid=pod["metadata"]["uid"], pod=pod, dir=tmp_path / "run")
    source = {"audience": "renewal.test", "expirationSeconds": 600, "path": "token"}
    volume = {"name": "t", "projected": {"sources": [{"serviceAccountToken": source}]}}
    folder, _ = runner.volume_source(run, volume)
    first = (folder / "token").read_text()
    ((path, _, due),) = run.tokens
    assert path == folder / "token" and due - time.monotonic() == pytest.approx(480, abs=30)
    runner.renew_tokens(run, time.monotonic())  # not due yet: unchanged
    assert (folder / "token").read_text() == first
    runner.renew_tokens(run, due + 1)
    second = (folder / "token").read_text()
    assert second != first
    status, review = cluster.request("POST", "/apis/authentication.k8s.io/v1/tokenreviews", body={
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
        "spec": {"token": second, "audiences": ["renewal.test"]}})  # fmt: skip
    assert status == 201 and review["status"]["authenticated"] is True
    assert review["status"]["user"]["extra"]["authentication.kubernetes.io/pod-name"] == ["holder"]
    assert run.tokens[0][2] - time.monotonic() == pytest.approx(480, abs=30)  # the next renewal


def test_pod_runner_reports_why_a_pod_cannot_start_as_a_cluster_would(
    cluster: Cluster, namespace: str, apply_yaml: ApplyYaml
) -> None:
    """The kubelet's waiting reasons and messages, and the scheduler's for a missing claim (then it runs)."""

    def make_pod(name: str, *, image: str = "python:3.11-slim", volumes: list[dict[str, Any]] = (),  # type: ignore[assignment]
                 env: list[dict[str, Any]] = ()) -> dict[str, Any]:  # type: ignore[assignment]
        return {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {
                "restartPolicy": "Never", "securityContext": POD_SECURITY, "volumes": list(volumes),
                "containers": [{
                    "name": "main", "image": image, "securityContext": CONTAINER_SECURITY,
                    "command": ["python", "-c", "pass"], "env": list(env),
                    "volumeMounts": [{"name": v["name"], "mountPath": f"/srv/{v['name']}"} for v in volumes],
                }],
            },
        }  # fmt: skip

    apply_yaml(
        [
            make_pod("cm-volume", volumes=[{"name": "cfg", "configMap": {"name": "absent-cm"}}]),
            make_pod("secret-env", env=[{"name": "T", "valueFrom": {"secretKeyRef": {"name": "absent-sec", "key": "t"}}}]),
            make_pod("bad-name", image="ghcr.io/Finetune/Trainer:1"),
            make_pod("no-claim", volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "absent-pvc"}}]),
        ],
        namespace=namespace,
    )

    def waiting(name: str) -> tuple[str, str] | None:
        statuses = pod(cluster, namespace=namespace, name=name).get("status", {}).get("containerStatuses") or []
        state = statuses[0]["state"].get("waiting") if statuses else None
        if not state or state.get("reason") in (None, "ContainerCreating", "PodInitializing"):
            return None
        return str(state["reason"]), str(state.get("message", ""))

    expected = {
        "cm-volume": ("CreateContainerConfigError", 'configmap "absent-cm" not found'),
        "secret-env": ("CreateContainerConfigError", 'secret "absent-sec" not found'),
        "bad-name": ("InvalidImageName", 'couldn\'t parse image name "ghcr.io/Finetune/Trainer:1": invalid reference format'),
    }
    for name, (reason, words) in expected.items():
        got = wait_for(lambda name=name: waiting(name), timeout=30, message=f"{name} waits")  # type: ignore[misc]
        assert got[0] == reason and words in got[1], got
        assert phase(cluster, namespace=namespace, name=name) == "Pending"

    def unscheduled() -> dict[str, Any] | None:
        conds = pod(cluster, namespace=namespace, name="no-claim").get("status", {}).get("conditions") or []
        return next((c for c in conds if c["type"] == "PodScheduled" and c["status"] == "False"), None)

    cond = wait_for(unscheduled, timeout=30, message="no-claim is unschedulable")
    assert cond["reason"] == "Unschedulable"
    assert cond["message"].startswith('0/1 nodes are available: persistentvolumeclaim "absent-pvc" not found.')
    assert not pod(cluster, namespace=namespace, name="no-claim")["spec"].get("nodeName")

    apply_yaml(claim("absent-pvc"), namespace=namespace)  # the scheduler looks again: now it fits
    done = wait_for(lambda: finished(cluster, namespace=namespace, name="no-claim"), timeout=60,
                    message="no-claim runs once its claim exists")  # fmt: skip
    assert done["status"]["phase"] == "Succeeded"
