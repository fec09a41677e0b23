"""Jobs whose pod can never start, and trainers whose termination message is hostile, end Failed.

The real operator (as its ServiceAccount, a 4 s pending timeout, the fake trainer) on the local
control plane, whose pod runner says what a kubelet and a scheduler would: a missing ConfigMap
or Secret (CreateContainerConfigError), an image reference that does not parse
(InvalidImageName), a missing PersistentVolumeClaim (unschedulable). Each job ends Failed with
its own reason and the kubelet's or scheduler's words within 60 s; a termination message whose
reason the CRD would refuse (2000 characters, spaces, a newline), with line breaks, still ends Failed
with a reason (before, every status write failed with 422 and the job showed Running).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fixtures.cluster import Cluster, wait_for
from fixtures.jobs import ftj, operator_in_namespace
from test_operator import Env

WAIT = 60.0


@pytest.fixture(scope="module")
def env(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("pod-failures")
    with operator_in_namespace(cluster, tmp=tmp, prefix="ftj-fail") as (namespace, operator):
        yield Env(cluster=cluster, namespace=namespace, operator=operator, tmp=tmp)


def _suspended(env: Env, name: str) -> bool:
    return (env.get("job", name) or {}).get("spec", {}).get("suspend") is True


CASES: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "cm-volume",
        {"volumes": [{"name": "settings", "configMap": {"name": "absent-settings"}}],
         "volumeMounts": [{"name": "settings", "mountPath": "/etc/settings"}]},
        "ContainerConfigError",
        'CreateContainerConfigError: configmap "absent-settings" not found',
    ),
    (
        "secret-env",
        {"env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "absent-creds", "key": "token"}}}]},
        "ContainerConfigError",
        'CreateContainerConfigError: secret "absent-creds" not found',
    ),
    (
        "bad-image",
        {"image": "ghcr.io/Finetune-Dev/Trainer:1"},
        "ImagePullError",
        "InvalidImageName: Failed to apply default image tag",
    ),
    (
        "no-claim",
        {"volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "absent-data"}}],
         "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
        "VolumeError",
        'persistentvolumeclaim "absent-data" not found',
    ),
]  # fmt: skip


def test_pods_that_can_never_start_fail_with_their_reason(env: Env) -> None:
    for name, runtime, _, _ in CASES:
        manifest = ftj(name, env={"FAKE_SLEEP": "0"})
        manifest["spec"]["runtime"].update(runtime)
        env.apply(manifest)
    for name, _, reason, words in CASES:
        status = env.wait_phase(name, "Failed", timeout=WAIT)
        assert status["reason"] == reason, status
        assert words in status["message"] and f"pod {name}-" in status["message"], status["message"]
        failed = {c["type"]: c for c in status["conditions"]}["Failed"]
        assert failed["status"] == "True" and failed["reason"] == reason
        assert status.get("attempts", 0) == 0  # the trainer never ran
        wait_for(lambda name=name: _suspended(env, name), timeout=10, message=f"{name}: the stuck Job suspended")  # type: ignore[misc]
        wait_for(lambda name=name: "Failed" in env.events(name), timeout=10, message=f"{name}: a Failed event")  # type: ignore[misc]
    assert env.operator.alive()


HOSTILE_REASON = ("Not A Valid Reason!! " * 100)[:2000] + "\nsecond line"
# Line breaks and tabs: the control characters admission lets through in an env value (the
# unit tests cover the rest).
HOSTILE_MESSAGE = "first\r\nsecond\tline\n" + "m" * 1500  # with the reason, within the kubelet's 4 KiB


def test_a_hostile_termination_message_still_ends_failed_with_a_reason(env: Env) -> None:
    env.apply(ftj("hostile", env={"FAKE_EXIT": "3", "FAKE_REASON": HOSTILE_REASON, "FAKE_MESSAGE": HOSTILE_MESSAGE}))
    env.apply(ftj("hostile-retry", env={"FAKE_EXIT": "7", "FAKE_REASON": HOSTILE_REASON, "FAKE_MESSAGE": HOSTILE_MESSAGE},
                  backoffLimit=0))  # fmt: skip
    status = env.wait_phase("hostile", "Failed", timeout=WAIT)
    assert status["reason"] == "DataError"  # the exit code's reason: the trainer's own was refused
    assert status["message"].startswith("first second line mmm") and len(status["message"]) <= 1024
    retried = env.wait_phase("hostile-retry", "Failed", timeout=WAIT)
    assert retried["reason"] == "BackoffLimitExceeded"
    assert retried["message"].startswith("1 attempt failed (no retries), backoff limit reached (exit code 7)")
    assert env.operator.alive()
