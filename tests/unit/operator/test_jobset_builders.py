"""The pure JobSet builder (runtime.workers > 1): one Indexed Job of `workers` trainer pods under a
headless Service, the same pod as the single-worker Job, restarted as a group within backoffLimit."""

from __future__ import annotations

import json
from typing import Any

import pytest
from finetune_operator import api, builders
from finetune_trainer import distribute

OWNER = builders.Owner(namespace="ml", name="flowers", uid="uid-1", labels={"team": "a"})
BASE_SPEC: dict[str, Any] = {
    "data": {"train": "/data/train", "validation": "/data/val"},
    "output": {"path": "/models/flowers"},
}


def parsed(runtime: dict[str, Any] | None = None, *, suspend: bool = False) -> api.FineTuneJobSpec:
    return api.FineTuneJobSpec.model_validate({**BASE_SPEC, "runtime": {"workers": 2, **(runtime or {})}, "suspend": suspend})


def jobset_for(runtime: dict[str, Any] | None = None, *, owner: builders.Owner = OWNER, suspend: bool = False) -> dict[str, Any]:
    return builders.build_jobset(
        pod=builders.TrainerPod(
            owner=owner, spec=parsed(runtime, suspend=suspend), default_image="img:default",
            progress_url="http://op:8081/v1/progress",
        ),
    )  # fmt: skip


def child_job(jobset: dict[str, Any]) -> dict[str, Any]:
    (rjob,) = jobset["spec"]["replicatedJobs"]
    return dict(rjob["template"])


def env_of(jobset: dict[str, Any]) -> dict[str, Any]:
    (container,) = child_job(jobset)["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_identity_owner_and_labels_like_the_job() -> None:
    js = jobset_for()
    meta = js["metadata"]
    assert (js["apiVersion"], js["kind"], meta["name"], meta["namespace"]) == (
        "jobset.x-k8s.io/v1alpha2", "JobSet", "flowers", "ml")  # fmt: skip
    job = builders.build_job(
        pod=builders.TrainerPod(owner=OWNER, spec=parsed(), default_image="img:default", progress_url=None)
    )
    assert meta["ownerReferences"] == job["metadata"]["ownerReferences"]
    assert meta["labels"] == job["metadata"]["labels"]
    # The child Job and its pods carry the FineTuneJob's labels: the operator's watches see them.
    assert child_job(js)["metadata"]["labels"] == builders.labels(owner=OWNER)
    assert child_job(js)["spec"]["template"]["metadata"]["labels"] == builders.labels(owner=OWNER)


def test_one_indexed_job_of_all_workers_under_a_headless_service() -> None:
    js = jobset_for({"workers": 3})
    (rjob,) = js["spec"]["replicatedJobs"]
    assert (rjob["name"], rjob["replicas"]) == ("worker", 1)
    spec = rjob["template"]["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    assert js["spec"]["network"] == {"enableDNSHostnames": True, "subdomain": "flowers", "publishNotReadyAddresses": True}


def test_the_pod_is_the_single_worker_jobs_pod_plus_its_place_in_the_group() -> None:
    spec = parsed({"env": [{"name": "A", "value": "1"}], "gpus": 2})
    pod = builders.TrainerPod(owner=OWNER, spec=spec, default_image="img:default", progress_url="http://p")
    job = builders.build_job(pod=pod)
    js = builders.build_jobset(pod=pod)
    single = job["spec"]["template"]
    worker = child_job(js)["spec"]["template"]
    assert worker["metadata"] == single["metadata"]  # the manifest the trainer reads, the labels
    assert {k: v for k, v in worker["spec"].items() if k != "containers"} == {
        k: v for k, v in single["spec"].items() if k != "containers"
    }
    (w,), (s,) = worker["spec"]["containers"], single["spec"]["containers"]
    assert {k: v for k, v in w.items() if k not in ("env", "ports")} == {k: v for k, v in s.items() if k not in ("env", "ports")}
    assert w["env"][: len(s["env"])] == s["env"]  # every pod gets the progress URL and token file (only the chief reports)
    assert w["ports"] == [*s["ports"], {"name": "worker", "containerPort": builders.WORKER_PORT, "protocol": "TCP"}]


def test_worker_env_is_what_the_trainer_reads() -> None:
    env = env_of(jobset_for({"workers": 2}))
    hosts = env[distribute.ENV_WORKER_HOSTS]
    assert hosts == "flowers-worker-0-0.flowers:2222,flowers-worker-0-1.flowers:2222"
    assert env[distribute.ENV_WORKER_INDEX] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    }
    # The trainer's own parser accepts it: worker 1 of 2, TF_CONFIG built from the names.
    plan = distribute.plan(runtime={"workers": 2, "gpus": 0}, env={distribute.ENV_WORKER_HOSTS: hosts,
                                                                   distribute.ENV_WORKER_INDEX: "1"})  # fmt: skip
    assert (plan.workers, plan.index, plan.is_chief) == (2, 1, False)
    assert distribute.build_tf_config(hosts=plan.hosts, index=1)["cluster"]["worker"][0] == "flowers-worker-0-0.flowers:2222"


def test_user_env_cannot_replace_the_workers_place() -> None:
    env_list = [{"name": distribute.ENV_WORKER_INDEX, "value": "0"}, {"name": "B", "value": "2"}]
    js = jobset_for({"env": env_list})
    (container,) = child_job(js)["spec"]["template"]["spec"]["containers"]
    names = [e["name"] for e in container["env"]]
    assert names.count(distribute.ENV_WORKER_INDEX) == 1
    assert env_of(js)[distribute.ENV_WORKER_INDEX] != "0"
    assert env_of(js)["B"] == "2"


def test_group_restarts_within_backoff_limit_and_non_retryable_exits_fail_at_once() -> None:
    js = jobset_for({"backoffLimit": 5})
    policy = js["spec"]["failurePolicy"]
    assert policy["maxRestarts"] == 5
    assert policy["restartStrategy"] == "BlockingRecreate"
    assert policy["rules"] == [
        {"name": "NonRetryableExit", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]},
        {"name": "DeadlineExceeded", "action": "FailJobSet", "onJobFailureReasons": ["DeadlineExceeded"]},
    ]
    spec = child_job(js)["spec"]
    assert spec["backoffLimit"] == 0  # any failed worker fails the child Job: the group restarts
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": list(builders.NON_RETRYABLE_EXIT_CODES)},
    }
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    # Suspending a JobSet deletes its pods (exit 143): never a failure, Kueue or not.
    assert {"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [143]}} in rules
    # Rule names as JobSet's webhook wants them.
    for rule in policy["rules"]:
        assert 1 <= len(rule["name"]) <= 128 and rule["name"][0].isalpha()


def test_deadline_suspend_and_the_ttl_is_the_operators() -> None:
    js = jobset_for({"activeDeadlineSeconds": 600, "ttlSecondsAfterFinished": 30}, suspend=True)
    assert js["spec"]["suspend"] is True
    assert child_job(js)["spec"]["activeDeadlineSeconds"] == 600
    assert "ttlSecondsAfterFinished" not in js["spec"]
    assert "ttlSecondsAfterFinished" not in child_job(js)["spec"]
    assert jobset_for()["spec"]["suspend"] is False
    assert "activeDeadlineSeconds" not in child_job(jobset_for())["spec"]


@pytest.mark.parametrize("suspend", [False, True])
def test_a_queue_label_creates_it_suspended_with_kueues_labels(suspend: bool) -> None:
    labels = {"kueue.x-k8s.io/queue-name": "team-q", "kueue.x-k8s.io/priority-class": "high", "other": "x"}
    owner = builders.Owner(namespace="ml", name="flowers", uid="u", labels=labels)
    js = jobset_for(owner=owner, suspend=suspend)
    assert js["spec"]["suspend"] is True
    assert js["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-q"
    assert js["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
    assert "other" not in js["metadata"]["labels"]
    # Kueue admits the JobSet, not its Job: the child Job carries no queue label.
    assert "kueue.x-k8s.io/queue-name" not in child_job(js)["metadata"]["labels"]


def test_the_trainer_reads_the_same_manifest() -> None:
    raw = {**BASE_SPEC, "runtime": {"workers": 2}}
    pod = builders.TrainerPod(owner=OWNER, spec=parsed(), default_image="i", progress_url=None, raw_spec=raw)
    js = builders.build_jobset(pod=pod)
    doc = json.loads(child_job(js)["spec"]["template"]["metadata"]["annotations"][builders.SPEC_ANNOTATION])
    assert doc["spec"] == raw
    assert doc["metadata"] == {"name": "flowers", "namespace": "ml", "uid": "uid-1"}


@pytest.mark.parametrize(
    ("name_length", "workers", "refused"),
    [(46, 10, False), (47, 10, True), (45, 11, False), (46, 11, True), (45, 64, False), (46, 64, True)],
)
def test_jobset_name_length_as_jobsets_webhook_counts_it(name_length: int, workers: int, refused: bool) -> None:
    name = "a" * name_length
    why = builders.jobset_name_refusal(name=name, workers=workers)
    assert (why is not None) == refused
    longest = f"{name}-worker-0-{workers - 1}-abcde"
    assert (len(longest) > 63) == refused
    if why is not None:
        assert why.startswith("metadata.name: at most ")
