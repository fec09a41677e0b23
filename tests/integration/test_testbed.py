"""The test bed itself: the local control plane and pod runner behave like a real cluster.

Job controller (completion, podFailurePolicy, backoffLimit), garbage collection, PodSecurity
admission, RBAC for ServiceAccount tokens, CRD CEL validation, and the pod runner's kubelet
duties (env, volumes, termination message, graceful deletion).
"""

from __future__ import annotations

import secrets
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
    """The Job's Complete or Failed condition (True) once it has one."""
    with cluster.api_client() as api:
        job = client.BatchV1Api(api).read_namespaced_job_status(name, namespace)
    for cond in job.status.conditions or []:
        if cond.type in ("Complete", "Failed") and cond.status == "True":
            return {"type": cond.type, "reason": cond.reason, "failed": job.status.failed or 0,
                    "succeeded": job.status.succeeded or 0}
    return None


def job_pods(cluster: Cluster, *, namespace: str, name: str) -> list[Any]:
    with cluster.api_client() as api:
        return list(
            client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
        )


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
    terminated = pods[0].status.container_statuses[0].state.terminated
    assert terminated.exit_code == 3


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
    assert all(p.status.phase == "Failed" for p in pods)


def test_deleting_owner_garbage_collects_dependents(cluster: Cluster, namespace: str) -> None:
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        owner = core.create_namespaced_config_map(
            namespace, {"metadata": {"name": "owner"}, "data": {"a": "1"}}
        )
        ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
        core.create_namespaced_config_map(
            namespace, {"metadata": {"name": "dependent", "ownerReferences": [ref]}, "data": {"b": "2"}}
        )
        core.create_namespaced_config_map(namespace, {"metadata": {"name": "bystander"}, "data": {"c": "3"}})
        core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")

        def names() -> set[str]:
            return {cm.metadata.name for cm in core.list_namespaced_config_map(namespace).items}

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

    def phase() -> str | None:
        with cluster.api_client() as api:
            got = client.CoreV1Api(api).read_namespaced_pod("compliant", namespace).status.phase
        return got if got in ("Succeeded", "Failed") else None

    assert wait_for(phase, timeout=60, message="the compliant pod runs") == "Succeeded"
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
    cm = {"metadata": {"name": "new"}, "data": {"a": "b"}}
    with config.new_client_from_config(config_file=str(kubeconfig)) as sa_api:
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
        kind = crd["spec"]["names"]["kind"]

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
        "assert pathlib.Path('/etc/cfg/greeting').read_text() == 'hello'",
        "assert pathlib.Path('/etc/sec/token').read_text() == 's3cret'",
        "assert os.getcwd() == '/work'",
        "pathlib.Path('/data/out.txt').write_text('persisted')",
        "pathlib.Path('/scratch/tmp.txt').write_text('x')",
        "try:",
        "    pathlib.Path('/etc/cfg/new').write_text('no')",
        "    raise SystemExit('configMap volume is writable')",
        "except OSError:",
        "    pass",
        "assert sorted(os.listdir('/var/run/secrets/kubernetes.io/serviceaccount')) == ['ca.crt', 'namespace', 'token']",
        "pathlib.Path('/dev/termination-log').write_text('all checks passed')",
    ])
    manifest = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"greeting": "hello"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sec"}, "stringData": {"token": "s3cret"}},
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
                            {"name": "cfg", "mountPath": "/etc/cfg"},
                            {"name": "sec", "mountPath": "/etc/sec", "readOnly": True},
                            {"name": "data", "mountPath": "/data"},
                            {"name": "scratch", "mountPath": "/scratch"},
                        ],
                    }
                ],
            },
        },
    ]
    apply_yaml(manifest, namespace=namespace)

    def terminated() -> Any:
        with cluster.api_client() as api:
            pod = client.CoreV1Api(api).read_namespaced_pod("runner", namespace)
        statuses = pod.status.container_statuses or []
        if statuses and statuses[0].state.terminated is not None and pod.status.phase in ("Succeeded", "Failed"):
            return pod
        return None

    pod = wait_for(terminated, timeout=60, message="pod runner finishes")
    log = cluster.pod_log(namespace=namespace, pod="runner", container="main")
    assert pod.status.phase == "Succeeded", log
    state = pod.status.container_statuses[0].state.terminated
    assert (state.exit_code, state.reason, state.message) == (0, "Completed", "all checks passed")
    assert pod.status.pod_ip == "127.0.0.1"
    assert state.started_at is not None
    assert (cluster.dir / "volumes" / namespace / "data" / "out.txt").read_text() == "persisted"


def test_pod_runner_fallback_to_logs_and_graceful_delete(
    cluster: Cluster, namespace: str, apply_yaml: ApplyYaml
) -> None:
    def pod(name: str, code: str, **extra: Any) -> dict[str, Any]:
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
            pod("crash", "import sys; print('disk on fire'); sys.exit(7)",
                terminationMessagePolicy="FallbackToLogsOnError"),
            # Ignores SIGTERM, so only SIGKILL after the 2 s grace period ends it.
            pod("stubborn", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                            "print('up', flush=True); time.sleep(600)"),
        ],
        namespace=namespace,
    )
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)

        def crashed() -> Any:
            p = core.read_namespaced_pod("crash", namespace)
            return p if p.status.phase == "Failed" else None

        state = wait_for(crashed, timeout=60, message="crash fails").status.container_statuses[0].state.terminated
        assert (state.exit_code, state.reason) == (7, "Error")
        assert "disk on fire" in state.message

        wait_for(
            lambda: core.read_namespaced_pod("stubborn", namespace).status.phase == "Running",
            timeout=60, message="stubborn runs",
        )
        wait_for(lambda: "up" in cluster.pod_log(namespace=namespace, pod="stubborn", container="main"),
                 timeout=30, message="stubborn printed")
        core.delete_namespaced_pod("stubborn", namespace)

        def gone() -> bool:
            try:
                core.read_namespaced_pod("stubborn", namespace)
                return False
            except client.ApiException as err:
                return err.status == 404

        wait_for(gone, timeout=30, message="the deleted pod is removed after SIGKILL")
