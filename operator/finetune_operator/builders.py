"""Pure builders: a FineTuneJob -> the manifest (a dict) of its batch Job.

No I/O here; the handlers send what these return. The Job is owned by the FineTuneJob
(ownerReferences), so deleting the FineTuneJob deletes it and its pods.

The Job is the only object the operator creates. The spec the trainer reads (`--config`)
travels in the Job itself: the FineTuneJob manifest, as compact JSON, is the pod-template
annotation `finetune.dev/spec`, mounted as a file at `CONFIG_FILE` by a downwardAPI volume.
So a Job can only ever run the spec of the FineTuneJob that made it (a ConfigMap of the same
name left by an earlier FineTuneJob could be mounted by mistake; an annotation cannot), and it
costs one write less per job. JSON, not YAML: the trainer reads a `.json` file with
`json.loads`, which keeps every number exact (YAML 1.1 reads `1e-05` as a string). Like every
annotation it counts against the 256 KiB limit of an object's annotations; admission bounds
the spec so that it fits, and a Job the API server still refuses fails the job with a reason.

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
    "KUEUE_LABELS",
    "KUEUE_QUEUE_LABEL",
    "METRICS_PORT",
    "NON_RETRYABLE_EXIT_CODES",
    "PROGRESS_TOKEN_FILE",
    "SPEC_ANNOTATION",
    "TERMINATED_EXIT_CODE",
    "Owner",
    "build_job",
    "kueue_labels",
    "labels",
    "spec_document",
]

CONTAINER_NAME = "trainer"
CONFIG_DIR = "/etc/finetune"
CONFIG_FILE = f"{CONFIG_DIR}/job.json"
SPEC_ANNOTATION = "finetune.dev/spec"  # on the pod template: the manifest the trainer reads
METRICS_PORT = 9090
PROGRESS_TOKEN_DIR = "/var/run/secrets/finetune.dev/progress"
PROGRESS_TOKEN_FILE = f"{PROGRESS_TOKEN_DIR}/token"
PROGRESS_TOKEN_SECONDS = 3600  # the kubelet refreshes it at 80 % of this
GPU_RESOURCE = "nvidia.com/gpu"
JOB_NAME_LABEL = "finetune.dev/job"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# The labels Kueue reads on a Job it manages (its "Labels and Annotations" reference, "Used on:
# Kueue-managed Jobs"): copied from the FineTuneJob to the Job when the user sets them.
KUEUE_LABELS = (
    KUEUE_QUEUE_LABEL,  # the LocalQueue: the Job is Kueue's to admit
    "kueue.x-k8s.io/priority-class",  # a WorkloadPriorityClass: the Workload's priority (preemption)
    "kueue.x-k8s.io/max-exec-time-seconds",  # the Workload's spec.maximumExecutionTimeSeconds
    "kueue.x-k8s.io/prebuilt-workload-name",  # a Workload the user made for the Job
)
NON_RETRYABLE_EXIT_CODES = (2, 3, 4)  # invalid spec, data error, diverged: API.md's exit codes
# 128 + SIGTERM: the trainer saved its state because its pod is going away (Kueue preemption or
# spec.suspend, which delete the pod without a DisruptionTarget condition, a node drain): resumed
# later from its checkpoint, never a failure that counts toward backoffLimit.
TERMINATED_EXIT_CODE = 143
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


def kueue_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """The Kueue labels among a FineTuneJob's labels (`KUEUE_LABELS`), which its Job carries too."""
    return {key: str(labels[key]) for key in KUEUE_LABELS if key in labels}


def _metadata(*, owner: Owner, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner=owner),
        "ownerReferences": [owner.reference()],
    }


def spec_document(*, owner: Owner, spec: Mapping[str, Any]) -> str:
    """The FineTuneJob manifest the trainer reads with `--config`, as compact JSON (the annotation's value)."""
    manifest = {
        "apiVersion": f"{api.API_GROUP}/{api.API_VERSION}",
        "kind": api.KIND,
        "metadata": {"name": owner.name, "namespace": owner.namespace, "uid": owner.uid},
        "spec": dict(spec),
    }
    return json.dumps(manifest, separators=(",", ":"), ensure_ascii=False)


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
    raw_spec: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The batch/v1 Job that runs the trainer, named like the FineTuneJob.

    `raw_spec` is the FineTuneJob's spec as the API server holds it, handed to the trainer
    as it is (default: `spec` dumped back, for callers that have only the parsed model).
    `runtime.ttlSecondsAfterFinished` is not put on the Job: the operator deletes the Job
    itself once it has recorded the outcome (a TTL controller could delete it first).

    Kueue: the FineTuneJob's Kueue labels (`KUEUE_LABELS`) go on the Job; with a queue label
    the Job is created suspended, whatever `spec.suspend` says, and from then on it is Kueue's
    to start and stop (the operator never writes its `spec.suspend` or pod template again;
    `spec.suspend` of the FineTuneJob deactivates the Workload instead). In a Kueue-managed Job a
    pod that ends with exit code 143 (SIGTERM: preempted or deactivated, the trainer saved its
    state) is ignored by the pod failure policy: the v1.34 Job controller deletes a suspended
    Job's pods without a DisruptionTarget condition, so without this rule every preemption
    would count toward `backoffLimit`. Only there: elsewhere a trainer that exits 143 by itself
    would otherwise be retried without end.
    """
    runtime = spec.runtime
    if raw_spec is None:
        raw_spec = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    job_labels = {**labels(owner=owner), **kueue_labels(owner.labels)}
    queued = KUEUE_QUEUE_LABEL in job_labels
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
                "downwardAPI": {
                    "defaultMode": 0o444,
                    "items": [
                        {
                            "path": CONFIG_FILE.rsplit("/", 1)[1],
                            "fieldRef": {"fieldPath": f"metadata.annotations['{SPEC_ANNOTATION}']"},
                        }
                    ],
                },
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
        "suspend": spec.suspend or queued,
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
                *(
                    [
                        {
                            "action": "Ignore",
                            "onExitCodes": {
                                "containerName": CONTAINER_NAME,
                                "operator": "In",
                                "values": [TERMINATED_EXIT_CODE],
                            },
                        }
                    ]
                    if queued
                    else []
                ),
            ]
        },
        "template": {
            "metadata": {
                "labels": labels(owner=owner),
                "annotations": {SPEC_ANNOTATION: spec_document(owner=owner, spec=raw_spec)},
            },
            "spec": pod_spec,
        },
    }
    if runtime.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = runtime.active_deadline_seconds
    metadata = _metadata(owner=owner, name=owner.name)
    metadata["labels"] = job_labels
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}
