"""Pure builders: a FineTuneJob -> the manifest (a dict) of its batch Job, or of its JobSet.

No I/O here; the handlers send what these return. The Job is owned by the FineTuneJob
(ownerReferences), so deleting the FineTuneJob deletes it and its pods. With
`runtime.workers > 1` a JobSet (`build_jobset`) takes the Job's place: the same trainer pod
(`build_pod_template`, made from a `TrainerPod`) for every worker, restarted as a group.

The Job (or JobSet) is the only object the operator creates. The spec the trainer reads (`--config`)
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

from finetune_contract import protocol
from finetune_contract.exits import EXIT_TERMINATED, NON_RETRYABLE_EXIT_CODES
from finetune_contract.protocol import ENV_WORKER_HOSTS, ENV_WORKER_INDEX
from finetune_contract.spec import JOB_LABEL

from finetune_operator import api, settings

__all__ = [
    "CONFIG_DIR",
    "CONFIG_FILE",
    "JOBSET_API_VERSION",
    "JOBSET_GROUP",
    "JOBSET_VERSION",
    "JOB_NAME_LABEL",
    "KUEUE_LABELS",
    "KUEUE_QUEUE_LABEL",
    "NON_RETRYABLE_EXIT_CODES",
    "SPEC_ANNOTATION",
    "WORKER_PORT",
    "Owner",
    "TrainerPod",
    "build_job",
    "build_jobset",
    "jobset_name_refusal",
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
JOB_NAME_LABEL = JOB_LABEL
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# The labels Kueue reads on a Job it manages (its "Labels and Annotations" reference, "Used on:
# Kueue-managed Jobs"): copied from the FineTuneJob to the Job when the user sets them.
KUEUE_LABELS = (
    KUEUE_QUEUE_LABEL,  # the LocalQueue: the Job is Kueue's to admit
    "kueue.x-k8s.io/priority-class",  # a WorkloadPriorityClass: the Workload's priority (preemption)
    "kueue.x-k8s.io/max-exec-time-seconds",  # the Workload's spec.maximumExecutionTimeSeconds
    "kueue.x-k8s.io/prebuilt-workload-name",  # a Workload the user made for the Job
)
# The trainer's exit codes (NON_RETRYABLE_EXIT_CODES, EXIT_TERMINATED) are the contract's:
# finetune_contract.exits.
MANAGED_BY = "finetune-operator"
# Multi-worker training (runtime.workers > 1): a JobSet, its workers' env as the trainer reads it
# (finetune_contract.protocol), and the port they talk gRPC on (TFJob's default).
JOBSET_GROUP, JOBSET_VERSION = "jobset.x-k8s.io", "v1alpha2"  # the one place the JobSet API is named
JOBSET_API_VERSION = f"{JOBSET_GROUP}/{JOBSET_VERSION}"
WORKER_PORT = 2222
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
REPLICATED_JOB = "worker"  # the JobSet's one replicatedJob: pods <name>-worker-0-<index>-<suffix>
MAX_POD_NAME = 63  # JobSet's webhook refuses a JobSet whose pod names could be longer (DNS-1035 label)


def jobset_name_refusal(*, name: str, workers: int) -> str | None:
    """Why JobSet would refuse a JobSet NAME of `workers` pods (its longest pod name is too long), or None.

    JobSet's webhook checks `<name>-worker-0-<workers-1>-abcde` against 63 characters.
    """
    longest = f"{name}-{REPLICATED_JOB}-0-{workers - 1}-abcde"
    if len(longest) <= MAX_POD_NAME:
        return None
    most = MAX_POD_NAME - (len(longest) - len(name))
    return (
        f"metadata.name: at most {most} characters with runtime.workers {workers} "
        f"(JobSet names the pods {name[:8]}...-{REPLICATED_JOB}-0-<index>-<suffix>, {MAX_POD_NAME} at most)"
    )


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


@dataclass(frozen=True, kw_only=True)
class TrainerPod:
    """What the trainer pod of a FineTuneJob is made from: the same for its Job and for each JobSet worker.

    `raw_spec` is the FineTuneJob's spec as the API server holds it, handed to the trainer
    as it is (default: `spec` dumped back, for callers that have only the parsed model).
    """

    owner: Owner
    spec: api.FineTuneJobSpec
    default_image: str
    progress_url: str | None
    trainer_command: Sequence[str] = ("finetune-train",)
    run_as_user: int = settings.DEFAULT_RUN_AS_USER
    raw_spec: Mapping[str, Any] | None = None


def _metadata(*, owner: Owner) -> dict[str, Any]:
    """The Job's (or JobSet's) metadata: named like the FineTuneJob, owned by it, its labels and Kueue labels."""
    return {
        "name": owner.name,
        "namespace": owner.namespace,
        "labels": {**labels(owner=owner), **kueue_labels(owner.labels)},
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


def _pod_failure_rules(*, ignore_terminated: bool) -> list[dict[str, Any]]:
    """The trainer's pod failure policy: exit codes 2-4 fail at once, disruptions never count.

    `ignore_terminated`: exit code 143 (SIGTERM: the pod was deleted because its Job was
    suspended or preempted, the trainer saved its state) is ignored too.
    """
    return [
        {
            "action": "FailJob",
            "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "In", "values": list(NON_RETRYABLE_EXIT_CODES)},
        },
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        *(
            [
                {
                    "action": "Ignore",
                    "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "In", "values": [EXIT_TERMINATED]},
                }
            ]
            if ignore_terminated
            else []
        ),
    ]


def build_pod_template(
    *,
    pod: TrainerPod,
    extra_env: Sequence[Mapping[str, Any]] = (),
    extra_ports: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The trainer pod template (metadata and spec) of a FineTuneJob: the same for a Job and for each JobSet worker.

    `extra_env` (the operator's own, e.g. a worker's place in its group) wins over a
    `runtime.env` variable of the same name; `extra_ports` come after the metrics port.
    """
    owner, spec, run_as_user = pod.owner, pod.spec, pod.run_as_user
    runtime = spec.runtime
    raw_spec = pod.raw_spec
    if raw_spec is None:
        raw_spec = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    ours = {str(e.get("name")) for e in extra_env}
    user_env = [e for e in runtime.env if str(e.get("name")) not in ours]
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": runtime.image or pod.default_image,
        "imagePullPolicy": "IfNotPresent",
        "command": [*pod.trainer_command, "--config", CONFIG_FILE],
        "env": _env(owner=owner, progress_url=pod.progress_url, extra=[*user_env, *extra_env]),
        "ports": [
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            *(copy.deepcopy(dict(p)) for p in extra_ports),
        ],
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
    return {
        "metadata": {
            "labels": labels(owner=owner),
            "annotations": {SPEC_ANNOTATION: spec_document(owner=owner, spec=raw_spec)},
        },
        "spec": pod_spec,
    }


def build_job(*, pod: TrainerPod) -> dict[str, Any]:
    """The batch/v1 Job that runs the trainer pod `pod`, named like the FineTuneJob.

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
    queued = KUEUE_QUEUE_LABEL in pod.owner.labels
    job_spec: dict[str, Any] = {
        "backoffLimit": pod.spec.runtime.backoff_limit,
        "completions": 1,
        "parallelism": 1,
        "suspend": pod.spec.suspend or queued,
        **_job_spec(pod=pod, template=build_pod_template(pod=pod), ignore_terminated=queued),
    }
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _metadata(owner=pod.owner), "spec": job_spec}


def _job_spec(*, pod: TrainerPod, template: dict[str, Any], ignore_terminated: bool) -> dict[str, Any]:
    """What a Job and a JobSet's child Job share: the pod failure policy, the template, the deadline."""
    shared: dict[str, Any] = {
        "podFailurePolicy": {"rules": _pod_failure_rules(ignore_terminated=ignore_terminated)},
        "template": template,
    }
    if pod.spec.runtime.active_deadline_seconds is not None:
        shared["activeDeadlineSeconds"] = pod.spec.runtime.active_deadline_seconds
    return shared


def worker_hosts(*, name: str, workers: int, port: int = WORKER_PORT) -> list[str]:
    """`host:port` of every worker of JobSet NAME, index order: the stable names JobSet gives its pods.

    With `network.enableDNSHostnames` each pod's hostname is `<jobset>-<replicatedJob>-<jobIndex>-<podIndex>`
    and its subdomain the JobSet's headless Service (named like the JobSet), so within the
    namespace it resolves as `<hostname>.<jobset>`; there is one Job (index 0) of `workers` pods.
    """
    return [f"{name}-{REPLICATED_JOB}-0-{index}.{name}:{port}" for index in range(workers)]


def build_jobset(*, pod: TrainerPod) -> dict[str, Any]:
    """The JobSet (jobset.x-k8s.io/v1alpha2) of a FineTuneJob with `runtime.workers > 1`, named like it.

    One replicatedJob `worker` of one Indexed Job with `workers` pods, each the trainer pod of
    `build_pod_template` plus its place in the group: `FINETUNE_WORKER_HOSTS` (every worker's
    stable name under the JobSet's headless Service, `worker_hosts`, port `WORKER_PORT`) and
    `FINETUNE_WORKER_INDEX` (the pod's completion index, from its
    `batch.kubernetes.io/job-completion-index` annotation); worker 0 is the chief. Every pod
    gets the progress URL and token (one template for all), but only the chief reports.
    `publishNotReadyAddresses`: the workers dial each other while they start, before any is Ready.

    Failures restart the group, never one worker: the child Job has `backoffLimit: 0`, so any
    pod failure fails it, and the JobSet then recreates every worker (`BlockingRecreate`:
    the old pods are gone before the new ones start, so two generations never meet) up to
    `failurePolicy.maxRestarts = runtime.backoffLimit` times, then fails (ReachedMaxRestarts).
    The trainer's non-retryable exit codes (2, 3, 4) fail the child Job through its pod
    failure policy (reason PodFailurePolicy), and the JobSet rule `FailJobSet` on that reason
    fails the group at once; so does the child Job's DeadlineExceeded (JobSet has no deadline of
    its own: `runtime.activeDeadlineSeconds` bounds each group attempt). Exit code 143 (SIGTERM)
    is always ignored here: suspending a JobSet (spec.suspend, or Kueue's preemption) suspends
    its child Job, whose pods are deleted and exit 143; a single worker that exits 143 by
    itself is replaced, and its peers, whose collectives then fail, restart the group (counted).

    Kueue: as for `build_job`, the Kueue labels go on the JobSet, which is created suspended
    when queue-labelled and from then on is Kueue's (its jobset integration admits the group as
    one Workload). `runtime.ttlSecondsAfterFinished` is applied by the operator, as for a Job.
    """
    owner, runtime = pod.owner, pod.spec.runtime
    workers = runtime.workers
    index_env = {
        "name": ENV_WORKER_INDEX,
        "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}},
    }
    hosts_env = {"name": ENV_WORKER_HOSTS, "value": ",".join(worker_hosts(name=owner.name, workers=workers))}
    template = build_pod_template(
        pod=pod,
        extra_env=[hosts_env, index_env],
        extra_ports=[{"name": "worker", "containerPort": WORKER_PORT, "protocol": "TCP"}],
    )
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": workers,
        "parallelism": workers,
        "backoffLimit": 0,  # one failed worker fails the Job: the JobSet restarts the group
        **_job_spec(pod=pod, template=template, ignore_terminated=True),
    }
    jobset_spec: dict[str, Any] = {
        "replicatedJobs": [
            {
                "name": REPLICATED_JOB,
                "replicas": 1,
                "template": {"metadata": {"labels": labels(owner=owner)}, "spec": job_spec},
            }
        ],
        "network": {"enableDNSHostnames": True, "subdomain": owner.name, "publishNotReadyAddresses": True},
        "successPolicy": {"operator": "All"},
        "failurePolicy": {
            "maxRestarts": runtime.backoff_limit,
            "restartStrategy": "BlockingRecreate",
            "rules": [
                {"name": "NonRetryableExit", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]},
                {"name": "DeadlineExceeded", "action": "FailJobSet", "onJobFailureReasons": ["DeadlineExceeded"]},
            ],
        },
        "suspend": pod.spec.suspend or KUEUE_QUEUE_LABEL in owner.labels,
    }
    metadata = _metadata(owner=owner)
    return {"apiVersion": JOBSET_API_VERSION, "kind": "JobSet", "metadata": metadata, "spec": jobset_spec}
