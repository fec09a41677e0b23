"""The operator `DEMO_KEEP=1 make demo` leaves behaves like an installed one, and `make cluster-down` stops it.

`hack/demo.py start-operator` is the demo's own path up to a running operator (control
plane, deploy/'s CRD and RBAC, a ServiceAccount token, the operator as a local process, its
pid under .cluster/pids/attached/), without the example and its training. On a control
plane of this module's own (simulated pods, free ports, a temporary folder):

- a FineTuneJob in a namespace the demo knows nothing about is reconciled to Succeeded:
  the operator watches every namespace, as the installed Deployment does;
- `hack/cluster.py down` leaves no finetune_operator process of that cluster behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from fixtures.cluster import PrivateCluster, private_cluster, wait_for

ROOT = Path(__file__).resolve().parents[2]
ELSEWHERE = "team-elsewhere"


@pytest.fixture(scope="module")
def pc() -> Iterator[PrivateCluster]:
    with (
        tempfile.TemporaryDirectory(prefix="fto-demo-") as tmp,
        private_cluster(cluster_dir=Path(tmp), simulate_pods=1.0) as cluster,
    ):
        yield cluster


def operators_of(cluster_dir: Path) -> list[int]:
    """Running finetune_operator processes whose KUBECONFIG lies in `cluster_dir`."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if "finetune_operator" not in (proc.info["cmdline"] or []) or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get("KUBECONFIG", "").startswith(str(cluster_dir)):
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def a_job_elsewhere() -> dict[str, Any]:
    job = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text(encoding="utf-8"))
    job["metadata"] = {"name": "elsewhere", "namespace": ELSEWHERE}
    return dict(job)


def test_kept_demo_operator_watches_every_namespace_and_cluster_down_stops_it(pc: PrivateCluster) -> None:
    env = {**os.environ, **pc.env}
    started = subprocess.run(
        [sys.executable, str(ROOT / "hack" / "demo.py"), "start-operator"],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT, env=env,
    )  # fmt: skip
    assert started.returncode == 0, started.stdout + started.stderr
    assert "watches every namespace" in started.stdout
    assert "make cluster-down" in started.stdout
    operators = operators_of(pc.dir)
    assert len(operators) == 1, operators
    pidfile = pc.dir / "pids" / "attached" / "demo-operator.pid"
    assert pidfile.read_text(encoding="utf-8").split()[0] == str(operators[0])

    # A second run replaces the operator the first one left: still exactly one.
    again = subprocess.run(
        [sys.executable, str(ROOT / "hack" / "demo.py"), "start-operator"],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT, env=env,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"pid {operators[0]}" in again.stdout, again.stdout
    operators = operators_of(pc.dir)
    assert len(operators) == 1, operators

    pc.kubectl_run("create", "namespace", ELSEWHERE)
    # The quickstart's claims first: the pod runner starts no pod whose claims are missing.
    pc.kubectl_run("apply", "-n", ELSEWHERE, "-f", str(ROOT / "examples" / "quickstart-storage.yaml"))
    pc.kubectl_run("apply", "-f", "-", input=yaml.safe_dump(a_job_elsewhere()))

    def phase() -> str | None:
        obj = pc.get(f"/apis/finetune.dev/v1alpha1/namespaces/{ELSEWHERE}/finetunejobs/elsewhere") or {}
        value = (obj.get("status") or {}).get("phase")
        return str(value) if value in ("Succeeded", "Failed") else None

    assert wait_for(phase, timeout=120, message=f"FineTuneJob {ELSEWHERE}/elsewhere finished") == "Succeeded"

    pc.down()
    assert operators_of(pc.dir) == []
    assert not pidfile.exists()
