"""The pieces `make demo` relies on, without a cluster: the example, its data set, what it installs.

The demo itself (hack/demo.py) is the end-to-end check; these keep its inputs honest in
seconds: the quickstart manifest is one the trainer accepts as is, its volumes are the ones
quickstart-storage.yaml claims, the generated data set has the layout the trainer reads,
and the objects the demo installs from deploy/base are the API and the operator's RBAC, and the
operator the demo starts watches every namespace and is stopped by `hack/cluster.py down`
(tests/integration/test_demo_operator.py runs the same against a live control plane).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import psutil  # type: ignore[import-untyped]
import pytest
import yaml
from deploy_helpers import ROOT, Render
from finetune_trainer import config

EXAMPLE = ROOT / "examples" / "quickstart.yaml"
STORAGE = ROOT / "examples" / "quickstart-storage.yaml"


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    from finetune_testbed import demo

    return demo


def test_quickstart_is_one_finetunejob_the_trainer_accepts() -> None:
    documents = [d for d in yaml.safe_load_all(EXAMPLE.read_text(encoding="utf-8")) if d]
    assert [d["kind"] for d in documents] == ["FineTuneJob"], (
        "finetune-train --config reads a single document"
    )
    spec = config.load_config(path=EXAMPLE)
    assert spec.model.weights == "none", "the quickstart must not download weights"
    assert spec.training.total_epochs <= 12
    assert spec.model.input_shape[0] * spec.model.input_shape[1] <= 64 * 64


def test_quickstart_volumes_are_the_claims_it_mounts() -> None:
    job = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    claims = {d["metadata"]["name"] for d in yaml.safe_load_all(STORAGE.read_text(encoding="utf-8")) if d}
    runtime = job["spec"]["runtime"]
    used = {v["persistentVolumeClaim"]["claimName"] for v in runtime["volumes"]}
    assert used == claims
    mounts = {m["mountPath"] for m in runtime["volumeMounts"]}
    for path in (
        job["spec"]["data"]["train"],
        job["spec"]["data"]["validation"],
        job["spec"]["output"]["path"],
    ):
        assert any(path.startswith(m + "/") for m in mounts), f"{path} is on no mounted volume"


def test_generated_data_set_has_the_trainer_layout(demo: ModuleType, tmp_path: Path) -> None:
    from PIL import Image

    count = demo.make_dataset(root=tmp_path, train=3, val=2)
    assert count == 3 * (3 + 2)
    for split, per_class in (("train", 3), ("val", 2)):
        classes = sorted(p.name for p in (tmp_path / split).iterdir())
        assert classes == sorted(demo.CLASSES)
        for name in classes:
            images = sorted((tmp_path / split / name).glob("*.png"))
            assert len(images) == per_class
            with Image.open(images[0]) as image:
                assert image.size == (32, 32) and image.mode == "RGB"


def test_demo_installs_the_api_and_the_operator_rbac_only(demo: ModuleType, render: Render) -> None:
    installed = {o["kind"] for o in render("base") if o["kind"] in demo.INSTALL_KINDS}
    assert {
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
    } <= installed
    assert "Deployment" not in demo.INSTALL_KINDS, "the demo runs the operator as a local process"


def test_the_rbac_the_demo_installs_lets_its_operator_watch_every_namespace(demo: ModuleType, render: Render) -> None:
    # The demo's operator runs without --namespace (the next test reads its command line): that
    # needs the FineTuneJob, Job and pod rules of a ClusterRole bound cluster-wide to its account.
    objects = [o for o in render("base") if o["kind"] in demo.INSTALL_KINDS]
    account = {"kind": "ServiceAccount", "name": demo.OPERATOR_ACCOUNT, "namespace": demo.OPERATOR_NAMESPACE}
    roles = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ClusterRole"}
    bound = [
        roles[b["roleRef"]["name"]]
        for b in objects
        if b["kind"] == "ClusterRoleBinding" and account in b["subjects"] and b["roleRef"]["name"] in roles
    ]
    watchable = {
        (group, resource)
        for role in bound
        for rule in role["rules"]
        if {"list", "watch"} <= set(rule["verbs"])
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert {("finetune.dev", "finetunejobs"), ("batch", "jobs"), ("", "pods")} <= watchable


def operators_of(cluster_dir: Path) -> list[int]:
    """finetune_operator processes whose KUBECONFIG lies in `cluster_dir`."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if "finetune_operator" not in (proc.info["cmdline"] or []):
                continue
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get("KUBECONFIG", "").startswith(str(cluster_dir)):
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_cluster_down_stops_the_operator_the_demo_started(
    demo: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The demo's own start_operator, with a kubeconfig whose API server is not there: Kopf
    # starts, answers /healthz and keeps retrying, which is all this needs (no control plane).
    cluster_dir = tmp_path / "cluster"
    monkeypatch.setattr(demo, "CLUSTER_DIR", cluster_dir)
    kubeconfig = cluster_dir / "operator.kubeconfig"
    kubeconfig.parent.mkdir(parents=True)
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{demo.operator_proc.free_port()}"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        ),
        encoding="utf-8",
    )
    ports = {name: demo.operator_proc.free_port() for name in ("progress", "metrics", "health")}
    process = demo.start_operator(
        kubeconfig=kubeconfig, ports=ports, log=cluster_dir / "logs" / "demo-operator.log", pods="process"
    )
    try:
        pidfile = cluster_dir / "pids" / "attached" / "demo-operator.pid"
        assert pidfile.read_text(encoding="utf-8").split() == [str(process.pid), "finetune_operator"]
        assert "--namespace" not in " ".join(psutil.Process(process.pid).cmdline())
        assert operators_of(cluster_dir) == [process.pid]
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, str(ROOT / "hack" / "cluster.py"), "down", f"--dir={cluster_dir}"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        # down waits for the SIGTERMed operator: it is gone when down returns, not by itself later.
        assert process.wait(timeout=1) is not None
        assert time.monotonic() - started < 20
        assert operators_of(cluster_dir) == []
        assert not pidfile.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_down_leaves_a_process_that_took_over_a_stale_pid_alone(demo: ModuleType, tmp_path: Path) -> None:
    # A pid file whose process is gone and whose pid now belongs to something else (here: a
    # sleeping Python without the needle in its command line) must not get that process killed.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        layout = demo.control_plane.Layout(dir=tmp_path)
        layout.attached.mkdir(parents=True)
        (layout.attached / "demo-operator.pid").write_text(f"{other.pid} finetune_operator\n", encoding="utf-8")
        assert demo.control_plane.stop_attached(layout=layout) == []
        assert other.poll() is None
        assert not (layout.attached / "demo-operator.pid").exists()
    finally:
        other.kill()
        other.wait(timeout=10)
