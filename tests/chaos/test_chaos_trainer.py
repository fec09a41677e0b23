"""Chaos: real trainers killed mid phase 2 resume in a new pod and succeed, repeating at most one epoch.

On the local control plane, the real operator (as its ServiceAccount) runs two FineTuneJobs
with the real `finetune-train` (MobileNetV2 alpha 0.35, random weights, 32x32 generated
images) through the Job controller and the pod runner. Once each has recorded two phase-2
epochs, the trainer process the pod runner started gets SIGKILL (a lost node: no cleanup) or
SIGTERM (a drain or preemption: the handler saves and exits 143). The Job makes a new pod,
which skips phase 1, resumes phase 2 from the checkpoint and succeeds: `attempts: 2`, every
epoch once in history.csv, at most one epoch trained twice (none after SIGTERM).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from finetune_testbed.imagesets import spec_dict, write_square_folder
from fixtures import jobs
from fixtures.cluster import ApplyYaml, Cluster, ServiceAccountKubeconfig, wait_for
from fixtures.operator import OperatorProcess, install_crd_and_rbac

pytestmark = pytest.mark.timeout(480)

ROOT = Path(__file__).resolve().parents[2]
FINE_TUNE_EPOCHS = 12
EXIT_BOUND_S = 20.0  # SIGTERM -> trainer gone


def claim(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }  # fmt: skip


def fine_tune_job(name: str) -> dict[str, Any]:
    spec = spec_dict(train=Path("/data/train"), validation=Path("/data/val"), output=Path(f"/models/{name}"),
                     base="MobileNetV2", units=(32,), batch_size=8, head_epochs=1, head_lr=1e-3,
                     fine_epochs=FINE_TUNE_EPOCHS, fine_lr=1e-5, unfreeze_last=10, patience=100, plateau_patience=100)
    runtime = {"gpus": 0, "backoffLimit": 2, **jobs.claim_volumes(data="chaos-data", models="chaos-models")}
    return jobs.training_job(name, spec=spec, runtime=runtime)


def fine_tune_rows(out: Path) -> list[int]:
    try:
        with (out / "history.csv").open(newline="") as fh:
            return [int(r["epoch"]) for r in csv.DictReader(fh) if r["stage"] == "fine-tune"]
    except (OSError, ValueError, KeyError):
        return []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie the pod runner has not reaped yet is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return False


@dataclass
class Hit:
    """One trainer process killed: with what, when, and the epochs it had recorded by its death."""

    name: str
    sig: signal.Signals
    pod: str = ""
    pid: int = 0
    sent: float = 0.0
    gone_after_s: float = 0.0
    reached: int = 0


def running_trainer(cluster: Cluster, *, namespace: str, name: str) -> tuple[str, int] | None:
    """(pod name, trainer pid) of the job's running pod, from the pod runner's pid file."""
    pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", f"finetune.dev/job={name}")["items"]
    for pod in pods:
        if pod.get("status", {}).get("phase") != "Running":
            continue
        pidfile = cluster.dir / "pids" / "pods" / f"{pod['metadata']['uid']}_trainer.pid"
        if pidfile.is_file():
            return pod["metadata"]["name"], int(pidfile.read_text().strip())
    return None


@pytest.mark.chaos
def test_killed_and_terminated_trainers_resume_in_a_new_pod(
    cluster: Cluster,
    namespace: str,
    apply_yaml: ApplyYaml,
    service_account_kubeconfig: ServiceAccountKubeconfig,
    tmp_path: Path,
) -> None:
    volumes = cluster.dir / "volumes" / namespace
    write_square_folder(volumes / "chaos-data" / "train", per_class=24, seed=1)
    write_square_folder(volumes / "chaos-data" / "val", per_class=8, seed=2)
    (volumes / "chaos-models").mkdir(parents=True, exist_ok=True)
    install_crd_and_rbac(cluster)
    kubeconfig = service_account_kubeconfig(namespace="finetune-system", name="finetune-operator")
    hits = {"sigkill": Hit("sigkill", signal.SIGKILL), "sigterm": Hit("sigterm", signal.SIGTERM)}
    started = time.monotonic()
    try:
        with OperatorProcess(kubeconfig=kubeconfig, namespace=namespace, log=tmp_path / "operator.log",
                             command=(str(ROOT / ".venv" / "bin" / "finetune-operator"),)) as operator:  # fmt: skip
            apply_yaml([claim("chaos-data"), claim("chaos-models"), *(fine_tune_job(n) for n in hits)],
                       namespace=namespace)  # fmt: skip

            # Each trainer, once it has recorded two phase-2 epochs, gets its signal.
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and any(not h.sent for h in hits.values()):
                for hit in hits.values():
                    if hit.sent or len(fine_tune_rows(volumes / "chaos-models" / hit.name)) < 2:
                        continue
                    found = running_trainer(cluster, namespace=namespace, name=hit.name)
                    if found is None:
                        continue
                    hit.pod, hit.pid = found
                    hit.sent = time.monotonic()
                    os.kill(hit.pid, hit.sig)
                time.sleep(0.05)
            assert all(h.sent for h in hits.values()), f"phase 2 never got going: {hits}"
            for hit in hits.values():
                wait_for(lambda hit=hit: not alive(hit.pid), timeout=EXIT_BOUND_S + 10,
                         message=f"{hit.name}: trainer {hit.pid} gone", interval=0.05)  # fmt: skip
                hit.gone_after_s = time.monotonic() - hit.sent
                hit.reached = len(fine_tune_rows(volumes / "chaos-models" / hit.name))

            def finished(name: str) -> dict[str, Any] | None:
                got = cluster.kubectl_json("get", "ftj", name, "-n", namespace).get("status") or {}
                return got if got.get("phase") in ("Succeeded", "Failed") else None

            statuses = {n: wait_for(lambda n=n: finished(n), timeout=300, message=f"{n} finishes") for n in hits}
            assert operator.alive()
    finally:
        print("\nchaos:", {n: (h.pod, h.sig.name, f"gone {h.gone_after_s:.2f}s", f"reached {h.reached}")
                           for n, h in hits.items()}, f"total {time.monotonic() - started:.0f}s")  # fmt: skip

    for name, hit in hits.items():
        status = statuses[name]
        out = volumes / "chaos-models" / name
        assert status["phase"] == "Succeeded", (status, (tmp_path / "operator.log").read_text()[-3000:])
        assert status["attempts"] == 2, status
        assert 2 <= hit.reached < FINE_TUNE_EPOCHS
        metrics = json.loads((out / "metrics.json").read_text())
        head, fine = metrics["stages"]["head"], metrics["stages"]["fine-tune"]
        assert head["completedInEarlierRun"] is True  # phase 1 was not run again
        repeated = hit.reached - fine["resumedFromEpoch"]
        print(f"{name}: resumed phase 2 at epoch {fine['resumedFromEpoch']}, {repeated} epoch(s) trained twice")
        assert 0 <= repeated <= (1 if hit.sig == signal.SIGKILL else 0)
        assert fine["epochsRun"] == FINE_TUNE_EPOCHS
        assert fine["epochsThisRun"] == FINE_TUNE_EPOCHS - fine["resumedFromEpoch"]
        assert fine_tune_rows(out) == list(range(1, FINE_TUNE_EPOCHS + 1))  # each epoch once
        assert (out / "model.keras").is_file()

        first = cluster.kubectl_json("get", "pod", hit.pod, "-n", namespace)  # the Job keeps failed pods
        term = first["status"]["containerStatuses"][0]["state"]["terminated"]
        if hit.sig == signal.SIGTERM:
            assert hit.gone_after_s < EXIT_BOUND_S
            summary = json.loads(term["message"])
            assert (term["exitCode"], summary["exitCode"], summary["reason"]) == (143, 143, "Terminated")
        else:
            assert term["exitCode"] == 137  # 128 + SIGKILL: no summary, only the log's tail (FallbackToLogsOnError)
            assert not str(term.get("message", "")).lstrip().startswith("{")
