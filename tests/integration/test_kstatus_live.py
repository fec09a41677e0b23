"""Live FineTuneJobs as Flux (kstatus) and Argo CD read them, on the local control plane.

The real operator (a subprocess, as its ServiceAccount, with the fake trainer of
test_operator.py and a long pending timeout) watches one restricted namespace. Each
FineTuneJob is classified, version by version as the API server hands them out, by the
real kstatus library and by the shipped Argo CD Lua in gopher-lua (gitops-status from
hack/gotools; tests/unit/deploy/gitops_status.py), as the README's table says:

- a job whose pod cannot start yet (a quota of zero pods; an unschedulable pod) is never
  Current once the operator has written a status, and Argo CD shows Progressing;
- Running is InProgress / Progressing; Suspended is Current / Suspended (and has no Ready
  condition); resumed, it is InProgress again;
- Succeeded is Current / Healthy; Failed is Failed / Degraded;
- a job the operator has not seen (it is stopped) is Current under kstatus (its rule for an
  object with no status) and Progressing under Argo CD, until the operator's first status.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from fixtures.cluster import Cluster, wait_for
from fixtures.jobs import ftj, operator_in_namespace
from fixtures.operator import OperatorProcess
from unit.deploy.gitops_status import Classified, Watch, classify_live, start_watch

WAIT = 60.0


@dataclass
class Live:
    cluster: Cluster
    namespace: str
    operator: OperatorProcess

    def kubectl(self, *args: str, input: str | None = None) -> str:
        return self.cluster.kubectl_run(*args, "-n", self.namespace, input=input).stdout

    def apply(self, manifest: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))

    def status(self, name: str) -> dict[str, Any]:
        proc = self.cluster.kubectl_run("get", "ftj", name, "-n", self.namespace, "-o", "json", check=False)
        return dict(json.loads(proc.stdout).get("status") or {}) if proc.returncode == 0 else {}

    def wait_phase(self, name: str, phase: str, timeout: float = WAIT) -> dict[str, Any]:
        found = wait_for(
            lambda: (s := self.status(name)).get("phase") == phase and s,
            timeout=timeout,
            message=f"{name} {phase}",
        )
        return dict(found)

    def verdict(self, name: str) -> Classified:
        (got,) = classify_live(kubeconfig=self.cluster.kubeconfig, namespace=self.namespace, names=[name])
        return got

    def watch(self, name: str, *, seconds: float, until: str | None = None) -> Watch:
        return start_watch(
            kubeconfig=self.cluster.kubeconfig,
            namespace=self.namespace,
            name=name,
            seconds=seconds,
            until=until,
        )


@pytest.fixture(scope="module")
def live(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("kstatus-live")
    # A long pending timeout: a pod that cannot start stays Pending for the whole test.
    with operator_in_namespace(cluster, tmp=tmp, prefix="ftj-ks", pending_timeout=600) as (namespace, operator):
        yield Live(cluster=cluster, namespace=namespace, operator=operator)


def _split(seen: list[Classified]) -> tuple[list[Classified], list[Classified]]:
    """(versions before the operator's first status, versions from it on)."""
    first = next((i for i, c in enumerate(seen) if c.observed_generation), len(seen))
    return seen[:first], seen[first:]


def test_a_job_whose_pod_cannot_start_is_never_current_and_then_succeeds(live: Live) -> None:
    live.apply(
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": "no-pods"},
            "spec": {"hard": {"pods": "0"}},
        }
    )
    wait_for(
        lambda: json.loads(live.kubectl("get", "resourcequota", "no-pods", "-o", "json")).get("status", {}).get("hard"),
        timeout=30, message="the quota is in force",
    )  # fmt: skip
    held = live.watch("held", seconds=8)
    try:
        live.apply(ftj("held", env={"FAKE_SLEEP": "2"}))
        seen, _ = held.result()
    finally:
        held.stop()
        live.kubectl("delete", "resourcequota", "no-pods")
    assert seen, "the watch saw no version of ftj/held"
    assert live.status("held")["phase"] == "Pending"
    # Before the operator's first status the CRD's default (observedGeneration 0) shows;
    # from creation on, no version is Current while no pod can start.
    unseen, written = _split(seen)
    assert written, seen
    assert all(c.observed_generation == 0 for c in unseen), unseen
    assert {c.kstatus.status for c in seen} == {"InProgress"}, seen
    assert {c.argocd.status for c in seen if c.argocd} == {"Progressing"}, seen
    if unseen:
        print(f"ftj/held: seen without a status at {unseen[0].seen}, first status seen at {written[0].seen}")
    # Pods may exist now: Pending -> Running -> Succeeded; nothing before Succeeded is Current.
    done = live.watch("held", seconds=WAIT, until="Current")
    seen, reached = done.result()
    assert reached, seen
    *before, last = seen
    assert all(c.kstatus.status == "InProgress" for c in before), before
    assert all(c.argocd is not None and c.argocd.status == "Progressing" for c in before), before
    assert live.status("held")["phase"] == "Succeeded"
    assert last.argocd is not None
    assert (last.kstatus.status, last.argocd.status) == ("Current", "Healthy"), last
    assert last.argocd.message == "Model saved to /models/fake/model.keras"


def test_an_unschedulable_pod_is_never_current(live: Live) -> None:
    watch = live.watch("nowhere", seconds=6)
    try:
        live.apply(ftj("nowhere", nodeSelector={"example.com/no-such-node": "true"}))
        seen, _ = watch.result()
    finally:
        watch.stop()
    status = live.status("nowhere")
    assert status["phase"] == "Pending", status
    _, written = _split(seen)
    assert written and {c.kstatus.status for c in written} == {"InProgress"}, seen
    now = live.verdict("nowhere")
    assert now.argocd is not None
    assert (now.kstatus.status, now.argocd.status) == ("InProgress", "Progressing")
    live.kubectl("delete", "ftj", "nowhere", "--wait=false")


def test_running_suspended_resumed(live: Live) -> None:
    live.apply(ftj("long", env={"FAKE_SLEEP": "300"}))
    live.wait_phase("long", "Running")
    running = live.verdict("long")
    assert running.argocd is not None
    assert (running.kstatus.status, running.argocd.status) == ("InProgress", "Progressing")

    live.kubectl("patch", "ftj", "long", "--type=merge", "-p", json.dumps({"spec": {"suspend": True}}))
    suspended = live.watch("long", seconds=WAIT, until="argocd:Suspended").result()[0][-1]
    assert suspended.argocd is not None
    assert (suspended.kstatus.status, suspended.argocd.status) == ("Current", "Suspended"), suspended
    status = live.status("long")
    assert status["phase"] == "Suspended"
    assert "Ready" not in {c["type"] for c in status["conditions"]}

    live.kubectl("patch", "ftj", "long", "--type=merge", "-p", json.dumps({"spec": {"suspend": False}}))
    live.wait_phase("long", "Running")
    resumed = live.verdict("long")
    assert resumed.argocd is not None
    assert (resumed.kstatus.status, resumed.argocd.status) == ("InProgress", "Progressing")
    ready = {c["type"]: c["status"] for c in live.status("long")["conditions"]}["Ready"]
    assert ready == "False"
    live.kubectl("delete", "ftj", "long", "--wait=false")


def test_failed_is_failed_and_degraded(live: Live) -> None:
    live.apply(
        ftj("dataerr", env={"FAKE_EXIT": "3", "FAKE_REASON": "DataError", "FAKE_MESSAGE": "no images"})
    )
    seen, reached = live.watch("dataerr", seconds=WAIT, until="Failed").result()
    assert reached, seen
    last = seen[-1]
    assert last.argocd is not None
    assert (last.kstatus.status, last.argocd.status) == ("Failed", "Degraded"), last
    assert last.argocd.message.startswith("DataError: ") and "no images" in last.argocd.message
    assert "no images" in last.kstatus.message
    _, written = _split(seen)
    assert "Current" not in {c.kstatus.status for c in written}, seen


def test_a_job_the_operator_has_not_seen_reads_in_progress_to_kstatus_and_progressing_to_argo(live: Live) -> None:
    """The README's `none` row, live: the CRD defaults observedGeneration to 0, below the generation."""
    live.operator.stop()
    try:
        live.apply(ftj("unseen", env={"FAKE_SLEEP": "0"}))
        unseen = live.verdict("unseen")
        assert live.status("unseen") == {"observedGeneration": 0}
        assert unseen.argocd is not None
        assert (unseen.kstatus.status, unseen.argocd.status) == ("InProgress", "Progressing")
        assert "latest observed generation is 0" in unseen.kstatus.message
    finally:
        live.operator.start()
    live.wait_phase("unseen", "Succeeded")
    done = live.verdict("unseen")
    assert done.argocd is not None
    assert (done.kstatus.status, done.argocd.status) == ("Current", "Healthy")
