"""The pure builders: the Job made for a FineTuneJob (the spec it carries included), for every runtime option."""

from __future__ import annotations

import json
from typing import Any

import pytest
from finetune_operator import api, builders

OWNER = builders.Owner(namespace="ml", name="flowers", uid="uid-1", labels={"team": "a"})
BASE_SPEC: dict[str, Any] = {
    "data": {"train": "/data/train", "validation": "/data/val"},
    "output": {"path": "/models/flowers"},
}


def job_for(runtime: dict[str, Any] | None = None, *, progress_url: str | None = "http://op:8081/v1/progress",
            owner: builders.Owner = OWNER, suspend: bool = False) -> dict[str, Any]:
    spec = api.FineTuneJobSpec.model_validate({**BASE_SPEC, "runtime": runtime or {}, "suspend": suspend})
    pod = builders.TrainerPod(owner=owner, spec=spec, default_image="img:default", progress_url=progress_url)
    return builders.build_job(pod=pod)


def container(job: dict[str, Any]) -> dict[str, Any]:
    containers = job["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(job: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(job)["env"]}


def test_job_identity_owner_and_labels() -> None:
    job = job_for()
    meta = job["metadata"]
    assert (job["apiVersion"], job["kind"], meta["name"], meta["namespace"]) == ("batch/v1", "Job", "flowers", "ml")
    assert meta["ownerReferences"] == [
        {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "flowers", "uid": "uid-1",
         "controller": True, "blockOwnerDeletion": True}
    ]
    for labels in (meta["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert labels["app.kubernetes.io/instance"] == "flowers"
        assert labels["app.kubernetes.io/managed-by"] == "finetune-operator"
        assert labels[builders.JOB_NAME_LABEL] == "flowers"
    assert "kueue.x-k8s.io/queue-name" not in meta["labels"]


def test_kueue_queue_label_is_copied() -> None:
    owner = builders.Owner(namespace="ml", name="flowers", uid="u", labels={"kueue.x-k8s.io/queue-name": "gpu-q"})
    assert job_for(owner=owner)["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-q"


def test_pod_failure_policy_and_retries() -> None:
    spec = job_for({"backoffLimit": 7})["spec"]
    assert spec["backoffLimit"] == 7
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2, 3, 4]},
    }
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert spec["template"]["spec"]["restartPolicy"] == "Never"


def test_deadline_and_suspend_pass_through_and_the_ttl_is_the_operators() -> None:
    plain = job_for()["spec"]
    assert "activeDeadlineSeconds" not in plain and "ttlSecondsAfterFinished" not in plain
    assert plain["suspend"] is False
    spec = job_for({"activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 600}, suspend=True)["spec"]
    assert (spec["activeDeadlineSeconds"], spec["suspend"]) == (3600, True)
    # The operator deletes the Job itself once the outcome is recorded: no TTL controller may do it first.
    assert "ttlSecondsAfterFinished" not in spec


def test_restricted_pod_security() -> None:
    job = job_for()
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert isinstance(pod["securityContext"]["runAsUser"], int) and pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(job)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in container(job)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/tmp"]["name"]] == {"name": "tmp", "emptyDir": {}}
    assert container(job)["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_command_spec_mount_and_image() -> None:
    job = job_for()
    c = container(job)
    assert c["command"] == ["finetune-train", "--config", "/etc/finetune/job.json"]
    assert c["image"] == "img:default"
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/finetune")
    assert mount["readOnly"] is True
    volume = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    # The spec file is the pod's own annotation (downward API): no ConfigMap to create or to mix up.
    assert volume["downwardAPI"] == {
        "defaultMode": 0o444,
        "items": [{"path": "job.json", "fieldRef": {"fieldPath": "metadata.annotations['finetune.dev/spec']"}}],
    }
    assert not any("configMap" in v for v in job["spec"]["template"]["spec"]["volumes"])
    assert container(job_for({"image": "my/trainer:2"}))["image"] == "my/trainer:2"
    custom = builders.build_job(
        pod=builders.TrainerPod(
            owner=OWNER,
            spec=api.FineTuneJobSpec.model_validate(BASE_SPEC),
            default_image="i",
            progress_url=None,
            trainer_command=("python", "fake.py"),
        ),
    )
    assert container(custom)["command"] == ["python", "fake.py", "--config", "/etc/finetune/job.json"]


def test_progress_environment_and_metrics_port() -> None:
    job = job_for()
    env = env_of(job)
    assert env["FINETUNE_PROGRESS_URL"] == "http://op:8081/v1/progress"
    assert env["FINETUNE_PROGRESS_TOKEN_FILE"] == "/var/run/secrets/finetune.dev/progress/token"
    assert "FINETUNE_PROGRESS_TOKEN" not in env
    assert (env["FINETUNE_JOB_NAMESPACE"], env["FINETUNE_JOB_NAME"], env["FINETUNE_JOB_UID"]) == ("ml", "flowers", "uid-1")
    assert env["FINETUNE_METRICS_PORT"] == "9090"
    assert container(job)["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    assert "FINETUNE_PROGRESS_URL" not in env_of(job_for(progress_url=None))


def test_user_env_is_appended_and_overrides() -> None:
    env = container(job_for({"env": [{"name": "A", "value": "1"}, {"name": "HOME", "value": "/work"}]}))["env"]
    names = [e["name"] for e in env]
    assert names.count("HOME") == 1 and {"name": "HOME", "value": "/work"} in env
    assert {"name": "A", "value": "1"} in env


@pytest.mark.parametrize(
    ("runtime", "limits", "requests"),
    [
        ({}, {"nvidia.com/gpu": 1}, None),
        ({"gpus": 0}, None, None),
        ({"gpus": 0, "resources": {"limits": {"cpu": "2"}}}, {"cpu": "2"}, None),
        (
            {"gpus": 2, "resources": {"requests": {"cpu": "1", "nvidia.com/gpu": 9}, "limits": {"memory": "4Gi"}}},
            {"memory": "4Gi", "nvidia.com/gpu": 2},
            {"cpu": "1", "nvidia.com/gpu": 2},
        ),
    ],
)
def test_gpu_limits_merge_into_resources(
    runtime: dict[str, Any], limits: dict[str, Any] | None, requests: dict[str, Any] | None
) -> None:
    resources = container(job_for(runtime))["resources"]
    assert resources.get("limits") == limits
    assert resources.get("requests") == requests


def test_volumes_mounts_and_scheduling_options() -> None:
    runtime = {
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "pvc"}}],
        "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
        "nodeSelector": {"gpu": "a100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}},
        "priorityClassName": "high",
    }
    job = job_for(runtime)
    pod = job["spec"]["template"]["spec"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "pvc"}} in pod["volumes"]
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in container(job)["volumeMounts"]
    assert pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["tolerations"] == runtime["tolerations"]
    assert pod["affinity"] == runtime["affinity"]
    assert pod["priorityClassName"] == "high"
    plain = job_for()["spec"]["template"]["spec"]
    assert not {"nodeSelector", "tolerations", "affinity", "priorityClassName"} & plain.keys()


def test_the_pod_template_carries_the_manifest_the_trainer_reads() -> None:
    from finetune_trainer import config

    spec = {
        **BASE_SPEC,
        "model": {"base": "MobileNetV2", "baseOptions": {"alpha": 1e-05}},
        "training": {"fineTune": {"learningRate": 1e-05}},
        "runtime": {"gpus": 0, "env": [{"name": "NOTE", "value": "naïve ✓"}]},
        "suspend": False,
    }
    parsed = api.FineTuneJobSpec.model_validate(spec)
    pod = builders.TrainerPod(owner=OWNER, spec=parsed, default_image="i", progress_url=None, raw_spec=spec)
    job = builders.build_job(pod=pod)
    text = job["spec"]["template"]["metadata"]["annotations"]["finetune.dev/spec"]
    assert text == builders.spec_document(owner=OWNER, spec=spec)
    document = json.loads(text)  # what the trainer reads from /etc/finetune/job.json
    assert (document["kind"], document["metadata"]) == ("FineTuneJob", {"name": "flowers", "namespace": "ml", "uid": "uid-1"})
    assert document["spec"] == spec  # exactly: 1e-05 stays a float (YAML 1.1 would read a string)
    assert "naïve ✓" in text  # not escaped: the 256 KiB annotation limit counts bytes
    assert config.parse_config(document).training.fine_tune.learning_rate == 1e-05
    assert job["spec"]["template"]["metadata"]["labels"] == builders.labels(owner=OWNER)
    # Without the raw spec (callers holding only the model), the parsed spec is handed over.
    dumped = json.loads(job_for()["spec"]["template"]["metadata"]["annotations"]["finetune.dev/spec"])
    assert config.parse_config(dumped).output.path == "/models/flowers"


def test_the_progress_token_is_a_projected_token_for_this_job_only() -> None:
    job = job_for()
    pod = job["spec"]["template"]["spec"]
    mount = next(m for m in container(job)["volumeMounts"] if m["mountPath"] == "/var/run/secrets/finetune.dev/progress")
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    (source,) = volume["projected"]["sources"]
    assert source == {
        "serviceAccountToken": {"audience": "progress.finetune.dev/uid-1", "expirationSeconds": 3600, "path": "token"}
    }
    # Nothing the Kubernetes API accepts: no automounted token, no Secret.
    assert pod["automountServiceAccountToken"] is False
    assert not any("secret" in v for v in pod["volumes"])
    other = builders.build_job(
        pod=builders.TrainerPod(
            owner=builders.Owner(namespace="ml", name="flowers", uid="uid-2", labels={}),
            spec=api.FineTuneJobSpec.model_validate(BASE_SPEC),
            default_image="i",
            progress_url=None,
        ),
    )
    other_volume = next(v for v in other["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert other_volume["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "progress.finetune.dev/uid-2"


def test_builders_do_not_mutate_the_spec() -> None:
    runtime = {"resources": {"limits": {"cpu": "1"}}, "gpus": 1}
    spec = api.FineTuneJobSpec.model_validate({**BASE_SPEC, "runtime": runtime})
    builders.build_job(pod=builders.TrainerPod(owner=OWNER, spec=spec, default_image="i", progress_url=None))
    assert spec.runtime.resources == {"limits": {"cpu": "1"}}
