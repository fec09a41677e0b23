"""Admission on the real API server: the CRD refuses what the operator could not handle, naming the field.

Every bad manifest is sent with `kubectl apply --dry-run=server` (strict field validation,
kubectl's default) to the local control plane with the committed CRD installed; the test
asserts the refusal and that it names the field. Good manifests (examples/) still pass. No
operator runs here: this is the API server's own validation of the CRD's schema and CEL rules.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures.cluster import Cluster, KubectlError
from fixtures.operator import install_crd_and_rbac

ROOT = Path(__file__).resolve().parents[2]


def ftj(name: str = "adm", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": {"base": "MobileNetV2", "weights": "none", "inputShape": [32, 32, 3]},
        "data": {"train": "/data/train", "validationSplit": 0.2},
        "training": {"head": {"epochs": 1}, "fineTune": {"epochs": 1}},
        "output": {"path": "/models/out"},
        "runtime": {"gpus": 0},
    }
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": body}


def nested(depth: int) -> str:
    """A placeholder `to_json` turns into {"a": {"a": ... 1}} DEPTH levels deep (json.dumps stops at 1,000)."""
    return f"__NESTED_{depth}__"


def to_json(manifest: dict[str, Any]) -> str:
    return re.sub(
        r'"__NESTED_(\d+)__"', lambda m: '{"a":' * int(m.group(1)) + "1" + "}" * int(m.group(1)), json.dumps(manifest)
    )


@pytest.fixture(scope="module")
def crd_installed(cluster: Cluster) -> Cluster:
    install_crd_and_rbac(cluster)
    return cluster


@pytest.fixture
def ns(crd_installed: Cluster, namespace: str) -> str:
    return namespace


def dry_run(cluster: Cluster, namespace: str, manifest: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    # JSON, not YAML: a 2,000-level document stays within every YAML parser's limits this way.
    return cluster.kubectl_run("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=to_json(manifest))


def refusal(cluster: Cluster, namespace: str, manifest: dict[str, Any]) -> str:
    with pytest.raises(KubectlError) as err:
        dry_run(cluster, namespace, manifest)
    return err.value.stderr


# ----- good manifests -----


@pytest.mark.parametrize("example", ["finetunejob.yaml", "quickstart.yaml"])
def test_examples_are_admitted(crd_installed: Cluster, ns: str, example: str) -> None:
    documents = [d for d in yaml.safe_load_all((ROOT / "examples" / example).read_text()) if d]
    jobs = [d for d in documents if d.get("kind") == "FineTuneJob"]
    assert jobs, example
    for job in jobs:
        job["metadata"].pop("namespace", None)
        assert "created (server dry run)" in dry_run(crd_installed, ns, job).stdout


def test_keras_options_and_kubernetes_fields_are_admitted(crd_installed: Cluster, ns: str) -> None:
    manifest = ftj(
        model={"baseOptions": {"alpha": 0.35, "include_preprocessing": False, "pooling": "avg"}},
        runtime={
            "gpus": 0,
            "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": 2, "nvidia.com/gpu": 1}},
            "env": [
                {"name": "A", "value": "x" * 4096},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token", "optional": True}}},
            ],
            "volumes": [
                {"name": "data", "persistentVolumeClaim": {"claimName": "data", "readOnly": True}},
                {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
                {"name": "cfg", "configMap": {"name": "cfg", "items": [{"key": "a.yaml", "path": "a.yaml"}]}},
                {"name": "tok", "projected": {"sources": [{"serviceAccountToken": {"path": "t", "audience": "x"}}]}},
            ],
            "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True, "subPath": "train"}],
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
                 "tolerationSeconds": 300},
                {"operator": "Exists"},
                {"key": "", "operator": "Exists", "effect": ""},
            ],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100", "h100"]}]}
                        ]
                    }
                },
                "podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {"weight": 50, "podAffinityTerm": {
                            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "finetune-trainer"}},
                            "topologyKey": "kubernetes.io/hostname",
                        }}
                    ]
                },
            },
            "nodeSelector": {"kubernetes.io/arch": "amd64"},
        },
    )  # fmt: skip
    assert "created (server dry run)" in dry_run(crd_installed, ns, manifest).stdout


# ----- bad manifests: refused, naming the field -----


def _runtime(**fields: Any) -> dict[str, Any]:
    return ftj(runtime={"gpus": 0, **fields})


BAD: list[tuple[str, str, dict[str, Any]]] = [
    # free-form fields are gone: deep nesting, unknown keywords, wrong types
    ("deep-base-options", "spec.model.baseOptions.a", ftj(model={"baseOptions": nested(2000)})),
    ("deep-option-value", "spec.model.baseOptions.alpha", ftj(model={"baseOptions": {"alpha": nested(50)}})),
    ("unknown-base-option", "spec.model.baseOptions.alhpa", ftj(model={"baseOptions": {"alhpa": 0.35}})),
    ("bad-pooling", "spec.model.baseOptions.pooling", ftj(model={"baseOptions": {"pooling": "mean"}})),
    ("deep-resources", "spec.runtime.resources.a", _runtime(resources=nested(500))),
    ("deep-affinity", "spec.runtime.affinity.a", _runtime(affinity=nested(500))),
    # sizes
    ("1mb-env", "spec.runtime.env[0].value", _runtime(env=[{"name": "BIG", "value": "x" * 1_000_000}])),
    (
        "env-total",
        "spec.runtime.env",
        _runtime(env=[{"name": f"V{i}", "value": "x" * 4000} for i in range(8)]),
    ),
    ("env-items", "spec.runtime.env", _runtime(env=[{"name": f"V{i}", "value": "1"} for i in range(1000)])),
    ("10k-train", "spec.data.train", ftj(data={"train": "/" + "d" * 10_000, "validationSplit": 0.2})),
    ("10k-weights", "spec.model.weights", ftj(model={"weights": "w" * 10_000})),
    ("10k-image", "spec.runtime.image", _runtime(image="i" * 10_000)),
    ("huge-units", "spec.model.head.units", ftj(model={"head": {"units": [8] * 10_000}})),
    ("many-volumes", "spec.runtime.volumes", _runtime(volumes=[{"name": f"v{i}", "emptyDir": {}} for i in range(100)])),
    ("control-chars", "spec.runtime.env[0].value", _runtime(env=[{"name": "A", "value": "a\x01b"}])),
    ("long-label", "spec.runtime.nodeSelector", _runtime(nodeSelector={"k" * 400: "v"})),
    # unknown fields at several levels
    ("unknown-spec", "spec.bogus", ftj(bogus=1)),
    ("unknown-env", "spec.runtime.env[0].bogus", _runtime(env=[{"name": "A", "bogus": 1}])),
    (
        "unknown-pvc",
        "spec.runtime.volumes[0].persistentVolumeClaim.bogus",
        _runtime(volumes=[{"name": "d", "persistentVolumeClaim": {"claimName": "d", "bogus": True}}]),
    ),
    ("unknown-affinity", "spec.runtime.affinity.nodeAffinity.bogus", _runtime(affinity={"nodeAffinity": {"bogus": 1}})),
    ("unknown-limit-field", "spec.runtime.resources.bogus", _runtime(resources={"bogus": {}})),
    ("legacy-volume", "spec.runtime.volumes[0].gitRepo", _runtime(volumes=[{"name": "g", "gitRepo": {"repository": "x"}}])),
    # Kubernetes rules, at admission
    ("bad-quantity", "spec.runtime.resources.limits.cpu", _runtime(resources={"limits": {"cpu": "lots"}})),
    (
        "two-sources",
        "spec.runtime.volumes[0]",
        _runtime(volumes=[{"name": "v", "emptyDir": {}, "persistentVolumeClaim": {"claimName": "c"}}]),
    ),
    ("bad-volume-name", "spec.runtime.volumes[0].name", _runtime(volumes=[{"name": "Not_A_Name", "emptyDir": {}}])),
    ("env-two-sources", "spec.runtime.env[0].valueFrom", _runtime(env=[{"name": "A", "valueFrom": {
        "fieldRef": {"fieldPath": "metadata.name"}, "secretKeyRef": {"name": "s", "key": "k"}}}])),
    ("toleration-operator", "spec.runtime.tolerations[0].operator", _runtime(tolerations=[{"key": "k", "operator": "Maybe"}])),
    ("toleration-effect", "spec.runtime.tolerations[0].effect", _runtime(tolerations=[{"key": "k", "effect": "Sometimes"}])),
    (
        "toleration-seconds",
        "spec.runtime.tolerations[0]",
        _runtime(tolerations=[{"key": "k", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 5}]),
    ),
    ("toleration-exists-value", "spec.runtime.tolerations[0]", _runtime(tolerations=[{"key": "k", "operator": "Exists", "value": "v"}])),
    ("toleration-key", "spec.runtime.tolerations[0].key", _runtime(tolerations=[{"key": "-bad key", "operator": "Exists"}])),
    ("toleration-no-key", "spec.runtime.tolerations[0]", _runtime(tolerations=[{"operator": "Equal", "value": "v"}])),
    ("toleration-seconds-type", "spec.runtime.tolerations[0].tolerationSeconds", _runtime(
        tolerations=[{"key": "k", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": "soon"}])),
]  # fmt: skip


@pytest.mark.parametrize(("field", "manifest"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_manifests_are_refused_naming_the_field(
    crd_installed: Cluster, ns: str, field: str, manifest: dict[str, Any]
) -> None:
    message = refusal(crd_installed, ns, manifest)
    assert field in message, message


def test_spec_is_immutable_down_to_env_values(crd_installed: Cluster, ns: str) -> None:
    """The immutability rule sees every field now: before, env items were free-form and invisible to CEL."""
    manifest = _runtime(env=[{"name": "A", "value": "1"}])
    crd_installed.kubectl_run("apply", "-n", ns, "-f", "-", input=json.dumps(manifest))
    changed = copy.deepcopy(manifest)
    changed["spec"]["runtime"]["env"][0]["value"] = "2"
    message = refusal(crd_installed, ns, changed)
    assert "spec is immutable" in message, message
    changed = copy.deepcopy(manifest)
    changed["spec"]["suspend"] = True
    assert "configured (server dry run)" in dry_run(crd_installed, ns, changed).stdout
