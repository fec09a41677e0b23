"""Pure builders: a FineTuneJob -> the manifests (dicts) of its batch Job and ConfigMap.

No I/O here; the handlers send what these return. Every object is owned by the FineTuneJob
(ownerReferences), so deleting the FineTuneJob deletes them all.

The trainer's progress credential needs no object of its own: the pod gets a projected
ServiceAccount token, bound to the pod, whose audience is unique to the FineTuneJob
(`protocol.progress_audience(uid)`); the kubelet makes and rotates it, the operator checks it
with a TokenReview. It opens nothing in the Kubernetes API (the API server accepts only its
own audiences) and `automountServiceAccountToken` stays false.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finetune_trainer import protocol

from finetune_operator import api

__all__ = [
    "CONFIG_DIR",
    "CONFIG_FILE",
    "CONTAINER_NAME",
    "JOB_NAME_LABEL",
    "KUEUE_QUEUE_LABEL",
    "METRICS_PORT",
    "NON_RETRYABLE_EXIT_CODES",
    "PROGRESS_TOKEN_FILE",
    "Owner",
    "build_config_map",
    "build_job",
    "config_map_name",
    "labels",
]

CONTAINER_NAME = "trainer"
CONFIG_DIR = "/etc/finetune"
CONFIG_FILE = f"{CONFIG_DIR}/job.yaml"
METRICS_PORT = 9090
PROGRESS_TOKEN_DIR = "/var/run/secrets/finetune.dev/progress"
PROGRESS_TOKEN_FILE = f"{PROGRESS_TOKEN_DIR}/token"
PROGRESS_TOKEN_SECONDS = 3600  # the kubelet refreshes it at 80 % of this
GPU_RESOURCE = "nvidia.com/gpu"
JOB_NAME_LABEL = "finetune.dev/job"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
NON_RETRYABLE_EXIT_CODES = (2, 3, 4)  # invalid spec, data error, diverged: API.md's exit codes
MANAGED_BY = "finetune-operator"


@dataclass(frozen=True)
class Owner:
    """The FineTuneJob the objects belong to."""

    namespace: str
    name: str
    uid: str
    labels: Mapping[str, str]

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> Owner:
        meta = body["metadata"]
        return cls(
            namespace=meta["namespace"], name=meta["name"], uid=meta["uid"], labels=dict(meta.get("labels") or {})
        )

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{api.API_GROUP}/{api.API_VERSION}",
            "kind": api.KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def labels(*, owner: Owner) -> dict[str, str]:
    """The labels of every object made for a FineTuneJob (the operator selects its Jobs and pods by them)."""
    return {
        "app.kubernetes.io/name": "finetune-trainer",
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/part-of": "finetune-operator",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        JOB_NAME_LABEL: owner.name,
    }


def config_map_name(name: str) -> str:
    return f"{name}-config"


def _metadata(*, owner: Owner, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner=owner),
        "ownerReferences": [owner.reference()],
    }


def build_config_map(*, owner: Owner, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The ConfigMap holding the FineTuneJob manifest the trainer reads with `--config`."""
    manifest = {
        "apiVersion": f"{api.API_GROUP}/{api.API_VERSION}",
        "kind": api.KIND,
        "metadata": {"name": owner.name, "namespace": owner.namespace},
        "spec": dict(spec),
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner=owner, name=config_map_name(owner.name)),
        # JSON is YAML: the trainer reads it with yaml.safe_load, and json.dumps is far cheaper.
        "data": {"job.yaml": json.dumps(manifest, indent=2) + "\n"},
        "immutable": True,
    }


def _env(*, owner: Owner, progress_url: str | None, extra: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": protocol.ENV_JOB_NAMESPACE, "value": owner.namespace},
        {"name": protocol.ENV_JOB_NAME, "value": owner.name},
        {"name": protocol.ENV_JOB_UID, "value": owner.uid},
        {"name": protocol.ENV_PROGRESS_TOKEN_FILE, "value": PROGRESS_TOKEN_FILE},
        {"name": protocol.ENV_METRICS_PORT, "value": str(METRICS_PORT)},
        # The root filesystem is read-only: Keras and friends keep their caches under /tmp.
        {"name": "HOME", "value": "/tmp"},
        {"name": "KERAS_HOME", "value": "/tmp/.keras"},
    ]
    if progress_url:
        env.insert(0, {"name": protocol.ENV_PROGRESS_URL, "value": progress_url})
    names = {str(e.get("name")) for e in extra}
    return [e for e in env if e["name"] not in names] + [copy.deepcopy(dict(e)) for e in extra]


def _resources(runtime: api.RuntimeSpec) -> dict[str, Any]:
    resources = copy.deepcopy(dict(runtime.resources))
    if runtime.gpus > 0:
        resources.setdefault("limits", {})[GPU_RESOURCE] = runtime.gpus
        if GPU_RESOURCE in resources.get("requests", {}):
            resources["requests"][GPU_RESOURCE] = runtime.gpus
    return resources


def build_job(
    *,
    owner: Owner,
    spec: api.FineTuneJobSpec,
    default_image: str,
    progress_url: str | None,
    trainer_command: Sequence[str] = ("finetune-train",),
    run_as_user: int = 1000,
) -> dict[str, Any]:
    """The batch/v1 Job that runs the trainer, named like the FineTuneJob."""
    runtime = spec.runtime
    job_labels = labels(owner=owner)
    if KUEUE_QUEUE_LABEL in owner.labels:
        job_labels[KUEUE_QUEUE_LABEL] = owner.labels[KUEUE_QUEUE_LABEL]
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": runtime.image or default_image,
        "imagePullPolicy": "IfNotPresent",
        "command": [*trainer_command, "--config", CONFIG_FILE],
        "env": _env(owner=owner, progress_url=progress_url, extra=runtime.env),
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "resources": _resources(runtime),
        "volumeMounts": [
            {"name": "finetune-config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "finetune-progress-token", "mountPath": PROGRESS_TOKEN_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            *(copy.deepcopy(dict(m)) for m in runtime.volume_mounts),
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": run_as_user,
            "runAsGroup": run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": run_as_user,
            "runAsGroup": run_as_user,
            "fsGroup": run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {
                "name": "finetune-config",
                "configMap": {"name": config_map_name(owner.name), "defaultMode": 0o444},
            },
            {
                "name": "finetune-progress-token",
                "projected": {
                    "defaultMode": 0o444,
                    "sources": [
                        {
                            "serviceAccountToken": {
                                "audience": protocol.progress_audience(owner.uid),
                                "expirationSeconds": PROGRESS_TOKEN_SECONDS,
                                "path": "token",
                            }
                        }
                    ],
                },
            },
            {"name": "tmp", "emptyDir": {}},
            *(copy.deepcopy(dict(v)) for v in runtime.volumes),
        ],
    }
    if runtime.node_selector:
        pod_spec["nodeSelector"] = dict(runtime.node_selector)
    if runtime.tolerations:
        pod_spec["tolerations"] = [copy.deepcopy(dict(t)) for t in runtime.tolerations]
    if runtime.affinity:
        pod_spec["affinity"] = copy.deepcopy(dict(runtime.affinity))
    if runtime.priority_class_name:
        pod_spec["priorityClassName"] = runtime.priority_class_name
    job_spec: dict[str, Any] = {
        "backoffLimit": runtime.backoff_limit,
        "completions": 1,
        "parallelism": 1,
        "suspend": spec.suspend,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER_NAME,
                        "operator": "In",
                        "values": list(NON_RETRYABLE_EXIT_CODES),
                    },
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]
        },
        "template": {"metadata": {"labels": labels(owner=owner)}, "spec": pod_spec},
    }
    if runtime.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = runtime.active_deadline_seconds
    if runtime.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = runtime.ttl_seconds_after_finished
    metadata = _metadata(owner=owner, name=owner.name)
    metadata["labels"] = job_labels
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}
