"""The operator image, installed the way deploy/base installs it, trains a job to Succeeded.

On a control plane of this module's own with the pod runner in container mode
(FTO_PODS=container), `kubectl kustomize deploy/base` is applied as a user would apply it:
CRD, namespace, RBAC, Kopf peering, Service, NetworkPolicy and the Deployment. The
Deployment's pod (ReplicaSet, made by the real controller manager) runs
`localhost/finetune-operator:dev` with the Deployment's own args, securityContext and
ServiceAccount, whose projected token is the only credential it gets (in-cluster config).
Only what cannot stay on a machine where every pod shares the host's network is changed:
the three ports (free ones) and the progress URL (loopback, no Service DNS here), and the
images (the local builds). A small FineTuneJob then runs the trainer image, as the
operator's Job says, to Succeeded.

The images come from `make images` (hack/build-images.sh); when they are missing this module
builds them (cached by content: seconds once built, minutes cold).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_testbed.imagesets import write_square_folder
from fixtures import jobs
from fixtures.cluster import PrivateCluster, private_cluster, wait_for
from fixtures.operator import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "hack" / "containers" / "containers.conf"
OPERATOR_IMAGE = "localhost/finetune-operator:dev"
TRAINER_IMAGE = "localhost/finetune-trainer:dev"
JOB = "tiny"


def image_present(image: str) -> bool:
    env = {**os.environ, "CONTAINERS_CONF": str(CONF)}
    return subprocess.run(["podman", "image", "exists", image], env=env, capture_output=True, check=False).returncode == 0


@pytest.fixture(scope="module")
def images() -> None:
    if os.geteuid() != 0 or not (ROOT / "hack" / "build-images.sh").exists():
        pytest.skip("the images are built and run as root with podman (hack/build-images.sh)")
    if not (image_present(OPERATOR_IMAGE) and image_present(TRAINER_IMAGE)):
        built = subprocess.run(
            [str(ROOT / "hack" / "build-images.sh")], capture_output=True, text=True, timeout=2400, check=False
        )
        assert built.returncode == 0, built.stderr[-3000:]
    assert image_present(OPERATOR_IMAGE) and image_present(TRAINER_IMAGE)


@pytest.fixture(scope="module")
def ccluster(tmp_path_factory: pytest.TempPathFactory, images: None) -> Iterator[PrivateCluster]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FTO_PODS", "container")
        with private_cluster(cluster_dir=tmp_path_factory.mktemp("operator-image-cluster")) as found:
            yield found


def installed_objects(cluster: PrivateCluster, *, ports: dict[str, int]) -> list[dict[str, Any]]:
    """deploy/base rendered, the Deployment adapted to a host-network node (see the docstring)."""
    rendered = cluster.kubectl_run("kustomize", str(ROOT / "deploy" / "base"))
    objects = [o for o in yaml.safe_load_all(rendered.stdout) if o]
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    container["image"] = OPERATOR_IMAGE
    renames = {"8080": ports["metrics"], "8081": ports["progress"], "8082": ports["health"]}
    args = []
    for arg in container["args"]:
        if arg.startswith("--progress-url="):
            arg = f"--progress-url=http://127.0.0.1:{ports['progress']}/v1/progress"
        elif re.fullmatch(r"--[a-z-]+-port=80(80|81|82)", arg):
            key, value = arg.split("=")
            arg = f"{key}={renames[value]}"
        args.append(arg)
    container["args"] = args
    for port in container["ports"]:
        port["containerPort"] = renames[str(port["containerPort"])]
    for env in container["env"]:
        if env["name"] == "FINETUNE_TRAINER_IMAGE":
            env["value"] = TRAINER_IMAGE
    return objects


def tiny_job() -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": JOB},
        "spec": {
            "model": {"base": "VGG16", "weights": "none", "inputShape": [32, 32, 3], "head": {"units": [8]}},
            "data": {"train": "/data/train", "validation": "/data/val", "augmentation": {"enabled": False}},
            "training": {
                "batchSize": 8,
                "head": {"epochs": 1, "learningRate": 1.0e-3},
                "fineTune": {"epochs": 1, "learningRate": 1.0e-4, "unfreezeLast": 2},
                "mixedPrecision": "off",
                "seed": 1,
            },
            "output": {"path": f"/models/{JOB}"},
            "runtime": {
                "gpus": 0,
                "backoffLimit": 0,
                **jobs.claim_volumes(data="data", models="models"),
                "env": [{"name": "FINETUNE_METRICS_PORT", "value": str(free_port())}],
            },
        },
    }


def apply(cluster: PrivateCluster, objects: list[dict[str, Any]], *, namespace: str | None = None) -> None:
    args = ["apply", "--server-side", "--force-conflicts", "-f", "-"]
    if namespace:
        args += ["-n", namespace]
    cluster.kubectl_run(*args, input=yaml.safe_dump_all(objects))


def test_operator_image_installed_from_deploy_base_runs_a_job_to_succeeded(
    ccluster: PrivateCluster,
) -> None:
    ports = {"metrics": free_port(), "progress": free_port(), "health": free_port()}
    objects = installed_objects(ccluster, ports=ports)
    crds = [o for o in objects if o["kind"] == "CustomResourceDefinition"]
    apply(ccluster, crds)
    for crd in crds:
        ccluster.kubectl_run("wait", "--for=condition=Established", "--timeout=60s", f"crd/{crd['metadata']['name']}")
    apply(ccluster, [o for o in objects if o["kind"] != "CustomResourceDefinition"])

    def operator_running() -> dict[str, Any] | None:
        pods = ccluster.kubectl_json(
            "get", "pods", "-n", "finetune-system", "-l", "app.kubernetes.io/name=finetune-operator"
        )["items"]
        for p in pods:
            statuses = p.get("status", {}).get("containerStatuses") or []
            if statuses and "running" in statuses[0]["state"] and statuses[0].get("containerID"):
                return dict(p)
        return None

    operator_pod = wait_for(operator_running, timeout=180, message="the operator's pod running")
    (op_status,) = operator_pod["status"]["containerStatuses"]
    assert op_status["containerID"].startswith("podman://"), op_status
    assert op_status["imageID"].startswith("localhost/finetune-operator@sha256:"), op_status
    assert operator_pod["spec"]["serviceAccountName"] == "finetune-operator"
    op_name = operator_pod["metadata"]["name"]

    ns = "image-test"
    ccluster.kubectl_run("create", "namespace", ns)
    ccluster.kubectl_run("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
    volumes = ccluster.dir / "volumes" / ns
    write_square_folder(volumes / "data" / "train", per_class=8, seed=3, classes=("red", "blue"))
    write_square_folder(volumes / "data" / "val", per_class=4, seed=4, classes=("red", "blue"))
    claims = [
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
         "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}
        for claim in ("data", "models")
    ]  # fmt: skip
    apply(ccluster, [*claims, tiny_job()], namespace=ns)

    def phase() -> str | None:
        obj = ccluster.get(f"/apis/finetune.dev/v1alpha1/namespaces/{ns}/finetunejobs/{JOB}") or {}
        value = (obj.get("status") or {}).get("phase")
        return str(value) if value in ("Succeeded", "Failed") else None

    try:
        final = wait_for(phase, timeout=900, interval=1.0, message=f"FineTuneJob {ns}/{JOB} finished")
    finally:
        operator_log = ccluster.kubectl_run(
            "logs", "-n", "finetune-system", op_name, "--tail=40", check=False
        ).stdout
    job = ccluster.get(f"/apis/finetune.dev/v1alpha1/namespaces/{ns}/finetunejobs/{JOB}") or {}
    trainer_pods = ccluster.kubectl_json("get", "pods", "-n", ns)["items"]
    trainer_logs = [
        ccluster.kubectl_run("logs", "-n", ns, p["metadata"]["name"], "--tail=30", check=False).stdout
        for p in trainer_pods
    ]
    assert final == "Succeeded", json.dumps(
        {"status": job.get("status"), "operator": operator_log, "trainer": trainer_logs}, indent=1
    )
    (trainer,) = trainer_pods
    (tr_status,) = trainer["status"]["containerStatuses"]
    assert tr_status["containerID"].startswith("podman://"), tr_status
    assert tr_status["imageID"].startswith("localhost/finetune-trainer@sha256:"), tr_status
    assert trainer["spec"]["containers"][0]["image"] == TRAINER_IMAGE
    assert trainer["spec"]["securityContext"]["runAsUser"] == 65532  # the Deployment's --run-as-user
    assert (volumes / "models" / JOB / "model.keras").is_file()
    assert job["status"]["modelPath"] == f"/models/{JOB}/model.keras"
    # It ran as uid 65532 with no passwd entry all along, without a crash (Kopf's identity
    # once came from getpass.getuser(): KeyError, CrashLoopBackOff).
    again = ccluster.get(f"/api/v1/namespaces/finetune-system/pods/{op_name}") or {}
    assert again["status"]["containerStatuses"][0]["restartCount"] == 0, operator_log
