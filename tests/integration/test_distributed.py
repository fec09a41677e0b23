"""Multi-worker FineTuneJobs (runtime.workers: 2) with the real trainer, through the real JobSet.

A control plane of this module's own (private_cluster: the real JobSet v0.10.1 controller and
its webhooks, no Kueue) whose pod runner gives each pod a network namespace on the bridge
(FTO_POD_NETWORK=netns, hack/finetune_testbed/podrunner/podnet.py): the workers find each other by the headless
Service's names and talk gRPC (MultiWorkerMirroredStrategy), and reach the operator's
progress endpoint at the bridge address. Pods run as processes (the default; FTO_DIST_PODS=
container runs them in the trainer image of `make images`). The operator runs as its
ServiceAccount under deploy/base/rbac.yaml in a restricted namespace. Tiny generated image
sets, `weights: none`, a fixed seed:

- a 2-worker job Succeeds with both workers training in step (each pod's log: its index and
  the replicas in sync), only the chief writing the outputs (the other's model went to
  scratch space), `status.workers` 2/2 while it runs, and its final val accuracy within 2
  points of a 1-worker job of the same spec, seed and global batch, run beside it;
- worker 1 SIGKILLed in phase 2 (once the chief's history.csv has a fine-tune epoch): the JobSet
  recreates the group (restarts 1), the new workers resume from the chief's checkpoint on the
  shared (ReadWriteMany) volume, the job Succeeds with `attempts: 2`, phase 1 is not run
  again and at most one epoch is trained twice (history.csv and metrics.json).

The three jobs are submitted together when the module starts (the machine has 2 cores: they
share them); the kill test comes first, so its phase 2 is caught while it runs. Measured on
the 2 shared cores, cluster start included: 4 min 52 s with process pods, 3 min 9 s with
container pods (FTO_DIST_PODS=container, a quieter moment: containers cost no more here).

Only the chief (worker 0) sends progress; the last test shows its reports reach the status
(the progress endpoint accepts a pod of a child Job of the FineTuneJob's JobSet).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_contract import protocol
from finetune_testbed import imagesets  # the generated image sets of the trainer's tests
from finetune_testbed.podrunner import podnet  # hack/finetune_testbed/podrunner/podnet.py
from fixtures import jobs
from fixtures.cluster import PrivateCluster, private_cluster, wait_for
from fixtures.operator import OperatorProcess, free_port, install_crd_and_rbac

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables") is None,
        reason="pod networking needs root, ip and iptables",
    ),
]

GATEWAY = "10.244.0.1"  # the bridge's host address: where pods reach loopback services
MODE = os.environ.get("FTO_DIST_PODS", "process")
CONTAINER_IMAGE = "localhost/finetune-trainer:dev"
CONTAINERS_CONF = ROOT / "hack" / "containers" / "containers.conf"
GROUP = "/apis/jobset.x-k8s.io/v1alpha2"
RESTART_ATTEMPT = "jobset.sigs.k8s.io/restart-attempt"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
ACCURACY_POINTS = 2.0
HEAD_EPOCHS = 12
KILL_FINE_EPOCHS = 4
WAIT = 420.0  # one job on a loaded 2-core machine: TensorFlow's start, both phases


@dataclass(frozen=True)
class Bed:
    cluster: PrivateCluster
    namespace: str
    operator: OperatorProcess
    volumes: Path  # <cluster>/volumes/<namespace>: each claim's folder
    # Every distinct status.workers of each job (record_workers).
    workers_seen: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    stages_seen: dict[str, set[str]] = field(default_factory=dict)  # status.stage values seen, by job

    def status(self, name: str) -> dict[str, Any]:
        got = self.cluster.get(f"/apis/finetune.dev/v1alpha1/namespaces/{self.namespace}/finetunejobs/{name}")
        return dict((got or {}).get("status") or {})

    def jobset(self, name: str) -> dict[str, Any] | None:
        return self.cluster.get(f"{GROUP}/namespaces/{self.namespace}/jobsets/{name}")

    def pods(self, name: str) -> list[dict[str, Any]]:
        got = self.cluster.get(
            f"/api/v1/namespaces/{self.namespace}/pods?labelSelector=finetune.dev/job%3D{name}"
        )
        return list((got or {}).get("items") or [])

    def log(self, pod: dict[str, Any]) -> str:
        return self.cluster.pod_log(
            namespace=self.namespace, pod=pod["metadata"]["name"], container="trainer"
        )

    def finished(self, name: str, *, timeout: float = WAIT) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            shown = self.status(name)
            return shown if shown.get("phase") in ("Succeeded", "Failed") else None

        return wait_for(done, timeout=timeout, interval=0.5, message=f"ftj/{name} finished")

    def diagnose(self, name: str) -> str:
        """What to read when a job went wrong: its status, its pods' log tails, the operator's."""
        parts = [f"status: {self.status(name)}"]
        for pod in self.pods(name):
            parts.append(
                f"--- pod {pod['metadata']['name']}: {pod.get('status', {}).get('phase')}\n{self.log(pod)[-2500:]}"
            )
        parts.append(f"--- operator\n{self.operator.log.read_text()[-2500:]}")
        return "\n".join(parts)


def bridge_free() -> bool:
    owner = podnet.read_owner(podnet.OWNER_DIR / "fto0.owner")
    return owner is None or not podnet.pod_runner_alive(owner[0])


def claim(name: str, mode: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
        "spec": {"accessModes": [mode], "resources": {"requests": {"storage": "1Gi"}}},
    }  # fmt: skip


def ftj(name: str, *, workers: int, fine_tune_epochs: int, head_epochs: int = HEAD_EPOCHS) -> dict[str, Any]:
    """VGG16 on 32x32 images, random weights: phase 1 long enough on the cached features that
    the random base's features separate the classes; phase 2 `fine_tune_epochs`. Global batch 16."""
    runtime: dict[str, Any] = {
        "gpus": 0,
        "workers": workers,
        "backoffLimit": 2,
        "resources": {"requests": {"cpu": "100m"}},
        **jobs.claim_volumes(data="dist-data", models="dist-models"),
    }
    if MODE == "container":
        runtime["image"] = CONTAINER_IMAGE
    spec = imagesets.spec_dict(train=Path("/data/train"), validation=Path("/data/val"), output=Path(f"/models/{name}"),
                               base="VGG16", units=(64,), batch_size=16, head_epochs=head_epochs, head_lr=0.01,
                               fine_epochs=fine_tune_epochs, fine_lr=1e-5, unfreeze_last=4, patience=100, plateau_patience=100)
    return jobs.training_job(name, spec=spec, runtime=runtime)


def history_rows(out: Path) -> list[tuple[str, int]]:
    try:
        with (out / "history.csv").open(newline="") as fh:
            return [(r["stage"], int(r["epoch"])) for r in csv.DictReader(fh)]
    except (OSError, ValueError, KeyError):
        return []


def fine_tune_rows(out: Path) -> list[int]:
    return [epoch for stage, epoch in history_rows(out) if stage == "fine-tune"]


def worker_index(pod: dict[str, Any]) -> int:
    return int(pod["metadata"]["annotations"][COMPLETION_INDEX])


def attempt_of(pod: dict[str, Any]) -> int:
    return int(pod["metadata"]["labels"].get(RESTART_ATTEMPT, "-1"))


def termination_message(pod: dict[str, Any]) -> dict[str, Any]:
    (state,) = [s["state"] for s in pod["status"]["containerStatuses"] if s["name"] == "trainer"]
    return dict(json.loads(state["terminated"]["message"]))


def sigkill(bed: Bed, pod: dict[str, Any]) -> None:
    """SIGKILL to every process of the pod's trainer container (as the OOM killer or a crash would)."""
    uid = pod["metadata"]["uid"]
    if MODE == "container":
        env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
        names = subprocess.run(
            ["podman", "ps", "--filter", f"label=io.kubernetes.pod.uid={uid}", "--format", "{{.Names}}"],
            capture_output=True, text=True, check=True, env=env, timeout=60,
        ).stdout.split()  # fmt: skip
        assert len(names) == 1, names
        subprocess.run(["podman", "kill", "--signal", "KILL", names[0]], check=True, env=env, timeout=60,
                       capture_output=True)  # fmt: skip
        return
    pid = int((bed.cluster.dir / "pids" / "pods" / f"{uid}_trainer.pid").read_text())
    os.killpg(pid, signal.SIGKILL)  # the container's process group: the trainer and whatever it runs


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    if MODE == "container":
        env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
        if shutil.which("podman") is None or subprocess.run(
            ["podman", "image", "exists", CONTAINER_IMAGE], env=env, check=False, timeout=60
        ).returncode != 0:  # fmt: skip
            pytest.skip(f"FTO_DIST_PODS=container needs podman and {CONTAINER_IMAGE} (make images)")
    # One bridge per host: another module's netns cluster must be gone first (10 min at most).
    wait_for(bridge_free, timeout=600, interval=2.0, message="the pod bridge fto0 free of another cluster")
    tmp = tmp_path_factory.mktemp("distributed")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {
            "FTO_POD_NETWORK": "netns",
            "FTO_PODS": MODE,
            "FTO_KUEUE": "0",
            "FTO_JOBSET": "1",
        }.items():
            mp.setenv(key, value)
        with private_cluster(cluster_dir=tmp / "cluster") as cluster:
            install_crd_and_rbac(cluster)
            namespace = jobs.restricted_namespace(cluster, prefix="ftj-dist")
            volumes = cluster.dir / "volumes" / namespace
            # As the trainer's own 2-worker test: 3 x 30 validation images, 2 points are about 2 images.
            imagesets.write_image_folder(volumes / "dist-data" / "train", per_class=32, seed=11)
            imagesets.write_image_folder(volumes / "dist-data" / "val", per_class=30, seed=12)
            (volumes / "dist-models").mkdir(parents=True, exist_ok=True)
            port = free_port()
            operator = OperatorProcess(
                kubeconfig=jobs.mint_kubeconfig(cluster, path=tmp / "kubeconfig"),
                namespace=namespace,
                log=tmp / "operator.log",
                command=(str(ROOT / ".venv" / "bin" / "finetune-operator"),),
                progress_port=port,
                # The pods' loopback is their own: they reach the operator at the bridge address.
                extra_args=("--progress-url", f"http://{GATEWAY}:{port}{protocol.PROGRESS_PATH}"),
            )
            with operator:
                found = Bed(cluster=cluster, namespace=namespace, operator=operator, volumes=volumes)
                for manifest in (claim("dist-data", "ReadOnlyMany"), claim("dist-models", "ReadWriteMany"),
                                 ftj("resumed", workers=2, fine_tune_epochs=KILL_FINE_EPOCHS, head_epochs=2),
                                 ftj("pair", workers=2, fine_tune_epochs=1),
                                 ftj("single", workers=1, fine_tune_epochs=1)):  # fmt: skip
                    cluster.kubectl_run("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))
                stop = threading.Event()
                watcher = threading.Thread(target=record_workers, args=(found, stop), daemon=True)
                watcher.start()
                try:
                    yield found
                finally:
                    stop.set()
                    watcher.join(timeout=10)


def record_workers(bed: Bed, stop: threading.Event) -> None:
    """Every distinct status.workers of the module's jobs, polled (0.3 s) until `stop`: the 2-worker
    jobs may finish before their test looks."""
    while not stop.wait(0.3):
        for name in ("pair", "resumed", "single"):
            with contextlib.suppress(Exception):  # a transient API error: the next poll sees it
                status = bed.status(name)
                shown = status.get("workers")
                seen = bed.workers_seen.setdefault(name, [])
                if shown is not None and (not seen or seen[-1] != shown):
                    seen.append(dict(shown))
                if status.get("stage"):
                    bed.stages_seen.setdefault(name, set()).add(str(status["stage"]))


def test_worker_killed_in_phase_two_restarts_the_group_which_resumes_from_the_checkpoint(bed: Bed) -> None:
    started = time.monotonic()
    name = "resumed"
    out = bed.volumes / "dist-models" / name

    def first_attempt_in_phase_two() -> dict[str, Any] | None:
        if bed.status(name).get("phase") in ("Succeeded", "Failed"):
            pytest.fail(f"ftj/{name} finished before phase 2 could be interrupted:\n{bed.diagnose(name)}")
        if not fine_tune_rows(out):
            return None  # the chief's history.csv: a phase-2 epoch recorded (and checkpointed)
        workers = [p for p in bed.pods(name) if attempt_of(p) == 0 and p["status"].get("phase") == "Running"]
        return next((p for p in workers if worker_index(p) == 1), None)

    victim = wait_for(first_attempt_in_phase_two, timeout=WAIT, interval=0.2,
                      message=f"ftj/{name}: worker 1 running in phase 2 after a recorded fine-tune epoch")  # fmt: skip
    sigkill(bed, victim)
    killed_at = time.monotonic() - started

    # JobSet recreates the whole group (BlockingRecreate: the old pods are gone before the new
    # ones start): the epochs recorded now are the ones the interrupted group finished.
    def second_attempt() -> list[dict[str, Any]] | None:
        pods = bed.pods(name)
        newer = [p for p in pods if attempt_of(p) == 1]
        return newer if len(newer) == 2 and not [p for p in pods if attempt_of(p) == 0] else None

    wait_for(second_attempt, timeout=WAIT, message=f"ftj/{name}: the group recreated (restart attempt 1)")
    reached = len(fine_tune_rows(out))
    done = bed.finished(name)
    assert done["phase"] == "Succeeded", bed.diagnose(name)
    assert done["attempts"] == 2, done  # one attempt per group: the killed one and the one that finished
    jobset = bed.jobset(name) or {}
    assert jobset.get("status", {}).get("restarts") == 1, jobset.get("status")
    metrics = json.loads((out / "metrics.json").read_text())
    head, fine = metrics["stages"]["head"], metrics["stages"]["fine-tune"]
    assert head["completedInEarlierRun"] is True  # phase 1 was not run again
    assert fine_tune_rows(out) == list(range(1, KILL_FINE_EPOCHS + 1))  # each epoch once in the history
    assert 1 <= reached < KILL_FINE_EPOCHS, reached
    assert fine["epochsThisRun"] == KILL_FINE_EPOCHS - fine["resumedFromEpoch"]
    assert 0 <= reached - fine["resumedFromEpoch"] <= 1, (reached, fine)  # at most one epoch trained twice
    # The restarted worker 1 took the chief's checkpoints from the shared volume.
    (again,) = [p for p in bed.pods(name) if attempt_of(p) == 1 and worker_index(p) == 1]
    assert "resuming from the chief's checkpoints" in bed.log(again), bed.log(again)[-3000:]
    print(f"{MODE} pods: worker 1 killed {killed_at:.0f}s in, after {reached} fine-tune epochs; resumed at epoch "
          f"{fine['resumedFromEpoch']}; Succeeded after {time.monotonic() - started:.0f}s")  # fmt: skip


def test_two_workers_train_together_and_match_one_worker(bed: Bed) -> None:
    started = time.monotonic()
    pair, single = bed.finished("pair"), bed.finished("single")
    assert pair["phase"] == "Succeeded", bed.diagnose("pair")
    assert single["phase"] == "Succeeded", bed.diagnose("single")
    seen = bed.workers_seen.get("pair", [])
    assert {"ready": 2, "total": 2} in seen and all(w["total"] == 2 for w in seen), seen  # while both ran
    assert not bed.workers_seen.get("single"), bed.workers_seen  # a plain Job shows no workers
    assert pair["attempts"] == 1 and single["attempts"] == 1, (pair, single)
    assert bed.jobset("pair") is not None and bed.jobset("single") is None  # one worker stays a plain Job
    pods = sorted(bed.pods("pair"), key=worker_index)
    assert [worker_index(p) for p in pods] == [0, 1], [p["metadata"]["name"] for p in pods]
    out = bed.volumes / "dist-models" / "pair"
    # Both workers trained in step under MultiWorkerMirroredStrategy, each knowing its place.
    for index, pod in enumerate(pods):
        log = bed.log(pod)
        role = "chief" if index == 0 else "scratch "
        assert re.search(rf"worker {index} of 2 \({role}.*\), 2 replicas in sync", log), log[-3000:]
        epochs = re.findall(r"^\s*\d+/\d+ - .*\bloss: .*val_loss", log, flags=re.MULTILINE)
        assert len(epochs) == HEAD_EPOCHS + 1, f"worker {index} did not train every epoch:\n{log[-3000:]}"
    # Only the chief wrote the outputs; worker 1's model went to its scratch space.
    chief, other = termination_message(pods[0]), termination_message(pods[1])
    assert chief["modelPath"] == "/models/pair/model.keras" and (out / "model.keras").is_file(), chief
    assert not other["modelPath"].startswith("/models/") and "finetune-worker-1-" in other["modelPath"], other
    assert [row for row in history_rows(out)] == [
        *(("head", e) for e in range(1, HEAD_EPOCHS + 1)),
        ("fine-tune", 1),
    ]
    two = json.loads((out / "metrics.json").read_text())["final"]["val_accuracy"]
    one = json.loads((bed.volumes / "dist-models" / "single" / "metrics.json").read_text())["final"][
        "val_accuracy"
    ]
    assert one > 0.5, f"the 1-worker run learned nothing (val accuracy {one}): the comparison means nothing"
    print(
        f"{MODE} pods: 2 workers vs 1, val accuracy {two:.4f} vs {one:.4f} (waited {time.monotonic() - started:.0f}s)"
    )
    assert abs(two - one) * 100 <= ACCURACY_POINTS, (two, one)


def test_the_chiefs_progress_reaches_the_status(bed: Bed) -> None:
    """Worker 0 sends progress: the 2-worker job's status shows the stages as the 1-worker one's does."""
    for name in ("pair", "single"):
        assert bed.finished(name)["phase"] == "Succeeded", bed.diagnose(name)
    assert "fine-tune" in bed.stages_seen.get("single", set()), bed.stages_seen
    assert "fine-tune" in bed.stages_seen.get("pair", set()), bed.stages_seen
