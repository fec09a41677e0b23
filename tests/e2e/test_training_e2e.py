"""End to end: a real two-phase training through the operator, the Job controller and the pod runner.

On the local control plane (its pod runner in container mode: tests/e2e/conftest.py), the real
operator (`finetune-operator`, as its own
ServiceAccount under deploy/base/rbac.yaml) runs a FineTuneJob that fine-tunes a VGG16
(random weights, 32x32 inputs) on generated images. While it trains, `kubectl get ftj` must
show STAGE, EPOCH, PROGRESS, VAL-ACC and ETA moving through both stages; a real Prometheus
(Debian's, on loopback, rules of the monitoring component loaded) scrapes the operator and
the trainer, and afterwards PromQL returns the job's validation accuracy. The job ends
Succeeded with model.keras in its output volume. In container mode the trainer runs from
`localhost/finetune-trainer:dev` (`make images`) through the Job controller, under the
restricted securityContext the operator writes: its uid, a read-only root, no capabilities.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_helpers import (
    ScrapeTarget,
    free_port,
    parse_table,
    running_prometheus,
    wait_until,
)
from finetune_testbed.imagesets import write_square_folder
from fixtures import jobs
from fixtures.cluster import ApplyYaml, Cluster, ServiceAccountKubeconfig
from fixtures.operator import OperatorProcess, install_crd_and_rbac

pytestmark = pytest.mark.timeout(420)

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "components" / "monitoring"
JOB = "flowers-e2e"
HEAD_EPOCHS, FINE_TUNE_EPOCHS = 8, 4
GRAFANA_MACROS = {
    "$__rate_interval": "1m",
    "$__range": "10m",
    "$__interval": "1s",
    "$namespace": ".*",
    "$job": ".*",
}


def fine_tune_job(*, metrics_port: int) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": JOB},
        "spec": {
            "model": {
                "base": "VGG16",
                "weights": "none",
                "inputShape": [32, 32, 3],
                "head": {"units": [32], "dropout": 0.2},
            },
            "data": {"train": "/data/train", "validation": "/data/val", "augmentation": {"enabled": False}},
            "training": {
                "batchSize": 16,
                "head": {"epochs": HEAD_EPOCHS, "learningRate": 3.0e-4},
                "fineTune": {"epochs": FINE_TUNE_EPOCHS, "learningRate": 1.0e-4, "unfreezeLast": 4},
                "earlyStopping": {"patience": 20, "restoreBestWeights": True},
                "mixedPrecision": "off",
                "seed": 7,
            },
            "output": {"path": f"/models/{JOB}"},
            "runtime": {
                "gpus": 0,
                "backoffLimit": 0,
                **jobs.claim_volumes(data="e2e-data", models="e2e-models"),
                # Pods share the machine's network here: a port of its own, not 9090 (Prometheus's).
                "env": [{"name": "FINETUNE_METRICS_PORT", "value": str(metrics_port)}],
            },
        },
    }


def diagnostics(cluster: Cluster, *, namespace: str, tmp_path: Path, status: dict[str, Any]) -> str:
    """What to read when the job did not succeed: its status, the trainer's and the operator's logs."""
    pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", f"finetune.dev/job={JOB}")["items"]
    logs = [
        cluster.pod_log(namespace=namespace, pod=p["metadata"]["name"], container="trainer")[-3000:]
        for p in pods
    ]
    operator_log = (tmp_path / "operator.log").read_text(errors="replace")[-3000:]
    return f"status: {status}\ntrainer: {logs}\noperator: {operator_log}"


def number(cell: str) -> float | None:
    match = re.fullmatch(r"(-?[0-9.]+)(%|s)?", cell)
    return float(match.group(1)) if match else None


@pytest.fixture
def volumes(cluster: Cluster, namespace: str) -> Iterator[Path]:
    """The namespace's PVC folders (.cluster/volumes/<ns>/<claim>); removed after (a VGG16 run leaves ~300 MB)."""
    path = cluster.dir / "volumes" / namespace
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.e2e
def test_two_phase_training_shows_progress_and_is_scraped(
    cluster: Cluster,
    namespace: str,
    volumes: Path,
    apply_yaml: ApplyYaml,
    service_account_kubeconfig: ServiceAccountKubeconfig,
    tmp_path: Path,
    pods_mode: str,
    trainer_image: str,
) -> None:
    write_square_folder(volumes / "e2e-data" / "train", per_class=100, seed=1)
    write_square_folder(volumes / "e2e-data" / "val", per_class=20, seed=2)
    (volumes / "e2e-models").mkdir(parents=True, exist_ok=True)

    install_crd_and_rbac(cluster)
    operator_kubeconfig = service_account_kubeconfig(namespace="finetune-system", name="finetune-operator")
    trainer_metrics_port = free_port()
    rule_groups = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())["spec"]["groups"]

    with (
        OperatorProcess(
            kubeconfig=operator_kubeconfig,
            namespace=namespace,
            log=tmp_path / "operator.log",
            command=(str(ROOT / ".venv" / "bin" / "finetune-operator"),),
            extra_args=(f"--trainer-image={trainer_image}",),
            ready_on="metrics",
        ) as operator,
        running_prometheus(
            workdir=tmp_path / "prometheus",
            targets=[
                # As the ServiceMonitor (honorLabels) and the PodMonitor (pod label -> name) would.
                ScrapeTarget(
                    job="finetune-operator",
                    port=operator.metrics_port,
                    labels={"namespace": "finetune-system"},
                    honor_labels=True,
                ),
                ScrapeTarget(
                    job="finetune-trainer",
                    port=trainer_metrics_port,
                    labels={"namespace": namespace, "name": JOB, "pod": f"{JOB}-trainer"},
                ),
            ],
            rule_groups=rule_groups,
        ) as prometheus,
    ):
        started = time.time()
        claims = [
            {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
             "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}
            for claim in ("e2e-data", "e2e-models")
        ]  # fmt: skip
        apply_yaml([*claims, fine_tune_job(metrics_port=trainer_metrics_port)], namespace=namespace)

        # Poll the printer columns the way a user watches them, until the job is over.
        rows: list[dict[str, str]] = []

        def finished() -> dict[str, str] | None:
            done = cluster.kubectl_run("get", "ftj", JOB, "-n", namespace, check=False)
            if done.returncode != 0:
                return None
            (row,) = parse_table(done.stdout)
            row.pop("AGE", None)
            if not rows or row != rows[-1]:
                rows.append(row)
            return row if row["PHASE"] in ("Succeeded", "Failed") else None

        last = wait_until(finished, timeout=300, interval=0.5, what=f"FineTuneJob {JOB} to finish")
        ended = time.time()
        ftj = cluster.kubectl_json("get", "ftj", JOB, "-n", namespace)
        status = ftj["status"]
        assert last["PHASE"] == "Succeeded", diagnostics(
            cluster, namespace=namespace, tmp_path=tmp_path, status=status
        )

        # -- kubectl get ftj moved through both stages --------------------------------------
        print("kubectl get ftj, every change seen:", *(" ".join(r.values()) for r in rows), sep="\n  ")
        running = [r for r in rows if r["PHASE"] == "Running" and r["STAGE"]]
        stages = [r["STAGE"] for r in running]
        assert "head" in stages and "fine-tune" in stages, rows
        assert stages.index("fine-tune") > stages.index("head"), rows
        epochs = {r["EPOCH"] for r in running}
        assert len(epochs) >= 3, rows
        assert all(re.fullmatch(r"\d+/\d+", e) for e in epochs), epochs
        assert {e.split("/")[1] for e in epochs} <= {str(HEAD_EPOCHS), str(FINE_TUNE_EPOCHS)}
        progress = [p for p in (number(r["PROGRESS"]) for r in running) if p is not None]
        assert len(set(progress)) >= 3 and progress == sorted(progress), rows
        val_acc = {number(r["VAL-ACC"]) for r in running if number(r["VAL-ACC"]) is not None}
        assert len(val_acc) >= 2, rows
        etas = {r["ETA"] for r in running if r["ETA"]}
        assert len(etas) >= 2, rows
        assert number(last["PROGRESS"]) == 100, last

        # -- the trainer ran from its image, as the Job's securityContext says ----------------
        (trainer_pod,) = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", f"finetune.dev/job={JOB}")["items"]
        (trainer_status,) = trainer_pod["status"]["containerStatuses"]
        if pods_mode == "container":
            assert trainer_status["containerID"].startswith("podman://"), trainer_status
            assert trainer_status["imageID"].startswith("localhost/finetune-trainer@sha256:"), trainer_status
            assert trainer_pod["spec"]["containers"][0]["image"] == trainer_image
            assert trainer_pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True

        # -- the model is in the output volume ------------------------------------------------
        assert (volumes / "e2e-models" / JOB / "model.keras").is_file()
        assert status["modelPath"] == f"/models/{JOB}/model.keras"
        best = float(status["bestValAccuracy"])
        assert 0.0 <= best <= 1.0

        # -- Prometheus scraped both; PromQL answers with the job's validation accuracy --------
        selector = f'namespace="{namespace}", name="{JOB}", split="validation"'
        operator_acc = wait_until(
            lambda: prometheus.query(f'finetune_job_accuracy{{{selector}, stage="fine-tune"}}'),
            timeout=30,
            what="the operator's finetune_job_accuracy in Prometheus",
        )
        (sample,) = operator_acc
        assert float(sample["value"][1]) == pytest.approx(status["metrics"]["val_accuracy"], abs=1e-3)
        best_seen = prometheus.query(f"max(max_over_time(finetune_job_accuracy{{{selector}}}[10m]))")
        assert float(best_seen[0]["value"][1]) == pytest.approx(best, abs=1e-3)

        # The trainer's own /metrics, scraped while it ran (its series went stale when it exited).
        trainer_acc = prometheus.query(f"max_over_time(finetune_trainer_accuracy{{{selector}}}[10m])")
        assert {s["metric"]["stage"] for s in trainer_acc} == {"head", "fine-tune"}, trainer_acc
        sent = prometheus.query(
            f'max_over_time(finetune_trainer_progress_reports_total{{namespace="{namespace}", result="sent"}}[10m])'
        )
        assert sent and float(sent[0]["value"][1]) >= HEAD_EPOCHS, sent
        curve = prometheus.query_range(
            f'finetune_job_accuracy{{{selector}, stage="fine-tune"}}', start=started, end=ended, step=1
        )
        assert curve and len({v for _, v in curve[0]["values"]}) >= 2, curve

        # The dashboard's running-jobs table listed the job in each stage while it trained, and
        # drops it once it succeeded.
        table = f'max by (namespace, name, stage) (finetune_job_stage{{namespace="{namespace}", name="{JOB}"}} == 1)'
        listed = prometheus.query_range(table, start=started, end=ended, step=1)
        assert {s["metric"]["stage"] for s in listed} == {"head", "fine-tune"}, listed
        wait_until(
            lambda: not prometheus.query(table), timeout=15, what="the job to leave the running-jobs table"
        )

        # Every alert rule evaluates cleanly against the real series; none fires for a good run.
        rules = prometheus.rules()
        assert rules and all(r["health"] == "ok" for r in rules), [
            (r["name"], r.get("lastError")) for r in rules
        ]
        assert not [r["name"] for r in rules if r.get("state") == "firing"]
        # Every dashboard query is accepted by this Prometheus, and each column of the
        # running-jobs table had the job, by stage, while it trained.
        dashboard = json.loads((MONITORING / "dashboard.json").read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for macro, value in GRAFANA_MACROS.items():
                    expr = expr.replace(macro, value)
                prometheus.query(expr)
                if panel["title"] == "Running jobs":
                    series = prometheus.query_range(expr, start=started, end=ended, step=1)
                    seen = {
                        (s["metric"].get("namespace"), s["metric"].get("name"), s["metric"].get("stage"))
                        for s in series
                    }
                    assert (namespace, JOB, "fine-tune") in seen, (target["refId"], seen)
