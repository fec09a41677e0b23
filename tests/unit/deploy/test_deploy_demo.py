"""The pieces `make demo` relies on, without a cluster: the example, its data set, what it installs.

The demo itself (hack/demo.py) is the end-to-end check; these keep its inputs honest in
seconds: the quickstart manifest is one the trainer accepts as is, its volumes are the ones
quickstart-storage.yaml claims, the generated data set has the layout the trainer reads,
and the objects the demo installs from deploy/base are the API and the operator's RBAC.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from deploy_helpers import ROOT, Render
from finetune_trainer import config

EXAMPLE = ROOT / "examples" / "quickstart.yaml"
STORAGE = ROOT / "examples" / "quickstart-storage.yaml"


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("finetune_demo", ROOT / "hack" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["finetune_demo"] = module
    spec.loader.exec_module(module)
    return module


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
