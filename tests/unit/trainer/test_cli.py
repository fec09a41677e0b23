"""`finetune-train` end to end: exit codes, one-line messages, termination messages, resume after a kill.

The exit-code cases run the real command in a subprocess; the remaining bad inputs call
`main()` in-process (same code path, without paying a TensorFlow import each).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import yaml
from finetune_testbed.imagesets import spec_dict, write_image_folder
from finetune_trainer import checkpoint
from finetune_trainer.__main__ import main

SHAPE = (32, 32, 3)


def _command() -> list[str]:
    script = Path(sys.executable).with_name("finetune-train")
    return [str(script)] if script.exists() else [sys.executable, "-m", "finetune_trainer"]


def _write_config(path: Path, spec: dict[str, Any], *, whole: bool = True) -> Path:
    document: dict[str, Any] = spec
    if whole:
        document = {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "t"},
            "spec": {**spec, "runtime": {"gpus": 0}},
        }
    path.write_text(yaml.safe_dump(document) if path.suffix != ".json" else json.dumps(document))
    return path


def _cli(tmp_path: Path, spec: dict[str, Any], *, timeout: float = 300) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    config = _write_config(tmp_path / "job.yaml", spec)
    termination = tmp_path / "termination.json"
    env = {**os.environ, "FINETUNE_TERMINATION_LOG": str(termination), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("FINETUNE_PROGRESS_URL", None)
    env.pop("FINETUNE_METRICS_PORT", None)
    proc = subprocess.run(
        [*_command(), "--config", str(config)], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    return proc, json.loads(termination.read_text())


def _last_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda s: s["training"]["head"].update(epochs=-1), "spec.training.head.epochs"),
        (lambda s: s["data"].update(validationSplit=0.2), "exactly one of data.validation and data.validationSplit"),
        (lambda s: s["data"].pop("validation"), "exactly one of data.validation and data.validationSplit"),
        (lambda s: s["model"].update(dropout=0.1), "spec.model.dropout"),
    ],
    ids=["negative-epochs", "both-validations", "no-validation", "unknown-field"],
)
def test_invalid_config_exits_2(
    change: Callable[[dict[str, Any]], Any], field: str, image_sets: dict[str, Path], tmp_path: Path
) -> None:
    spec = spec_dict(train=image_sets["train"], validation=image_sets["val"], output=tmp_path / "out")
    change(spec)
    proc, summary = _cli(tmp_path, spec, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert field in _last_line(proc.stderr)
    assert _last_line(proc.stderr).startswith("finetune-train: InvalidSpec: ")
    assert summary["exitCode"] == 2 and summary["reason"] == "InvalidSpec" and field in summary["message"]


def test_unknown_base_exits_2(image_sets: dict[str, Path], tmp_path: Path) -> None:
    spec = spec_dict(train=image_sets["train"], validation=image_sets["val"], output=tmp_path / "out", base="VGG17")
    proc, summary = _cli(tmp_path, spec)
    assert proc.returncode == 2, proc.stderr
    assert "spec.model.base: 'VGG17' is not a keras.applications model" in _last_line(proc.stderr)
    assert summary["reason"] == "InvalidSpec"


def test_missing_train_folder_exits_3(image_sets: dict[str, Path], tmp_path: Path) -> None:
    spec = spec_dict(train=tmp_path / "nowhere", validation=image_sets["val"], output=tmp_path / "out")
    proc, summary = _cli(tmp_path, spec)
    assert proc.returncode == 3, proc.stderr
    assert f"spec.data.train: folder {tmp_path / 'nowhere'} does not exist" in _last_line(proc.stderr)
    assert summary == {
        "exitCode": 3,
        "reason": "DataError",
        "message": f"spec.data.train: folder {tmp_path / 'nowhere'} does not exist",
        "metrics": {},
        "modelPath": None,
    }


def test_nan_loss_exits_4(image_sets: dict[str, Path], tmp_path: Path) -> None:
    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=SHAPE, alpha=0.35)
    norm = base.get_layer("Conv_1_bn")  # corrupt weights: a NaN beta makes every feature NaN
    gamma, beta, mean, variance = norm.get_weights()
    norm.set_weights([gamma, np.full_like(beta, np.nan), mean, variance])
    weights = tmp_path / "nan.weights.h5"
    base.save_weights(weights)
    spec = spec_dict(
        train=image_sets["train"], validation=image_sets["val"], output=tmp_path / "out", weights=str(weights), units=()
    )  # no hidden Dense: oneDNN's fused relu would turn the NaNs into zeros
    proc, summary = _cli(tmp_path, spec)
    assert proc.returncode == 4, proc.stderr
    assert "finetune-train: Diverged: training diverged: loss became nan in stage head, epoch 1, batch 1" in _last_line(
        proc.stderr
    )
    assert summary["reason"] == "Diverged"
    assert not (tmp_path / "out" / "checkpoints" / "head").exists()  # never resume from NaN weights


@pytest.mark.parametrize(
    ("breakage", "code", "expected"),
    [
        ("weights-missing", 2, "spec.model.weights: {tmp}/absent.weights.h5 is not a file"),
        ("weights-other-architecture", 2, "spec.model.weights: {tmp}/vgg.weights.h5 does not fit MobileNetV2"),
        ("empty-class", 3, "spec.data.train: class folder {tmp}/train/square has no images"),
        ("class-mismatch", 3, "missing from validation: stripes"),
        ("one-class", 3, "has only one class (circle)"),
        ("no-images", 3, "spec.data.train: {tmp}/train has no class sub-folders"),
        ("unreadable", 3, "spec.data: 6 of 36 image files are unreadable or truncated"),
    ],
)
def test_bad_inputs_exit_with_their_code(
    breakage: str, code: int, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train = write_image_folder(tmp_path / "train", per_class=8)
    val = write_image_folder(tmp_path / "val", per_class=2)
    weights = "none"
    if breakage == "weights-missing":
        weights = str(tmp_path / "absent.weights.h5")
    elif breakage == "weights-other-architecture":
        keras.applications.VGG16(include_top=False, weights=None, input_shape=SHAPE).save_weights(tmp_path / "vgg.weights.h5")
        weights = str(tmp_path / "vgg.weights.h5")
    elif breakage == "empty-class":
        shutil.rmtree(train / "square")
        (train / "square").mkdir()
        (train / "square" / "notes.txt").write_text("no images here")
    elif breakage == "class-mismatch":
        shutil.rmtree(val / "stripes")
    elif breakage == "one-class":
        shutil.rmtree(train / "square")
        shutil.rmtree(train / "stripes")
    elif breakage == "no-images":
        shutil.rmtree(train)
        train.mkdir()
    elif breakage == "unreadable":
        write_image_folder(train, per_class=10)  # 30 files, 6 of them truncated
        for i in range(6):
            image = train / "circle" / f"{i:03d}.png"
            image.write_bytes(image.read_bytes()[:60])
    spec = spec_dict(train=train, validation=val, output=tmp_path / "out", weights=weights)
    termination = tmp_path / "termination.json"
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(termination))
    config = _write_config(tmp_path / "job.json", spec, whole=False)
    assert main(["--config", str(config)]) == code
    summary = json.loads(termination.read_text())
    assert summary["exitCode"] == code
    assert summary["reason"] == ("InvalidSpec" if code == 2 else "DataError")
    assert expected.format(tmp=tmp_path) in summary["message"]


def _fine_tune_epochs(out: Path) -> list[int]:
    try:
        with (out / "history.csv").open(newline="") as fh:
            return [int(r["epoch"]) for r in csv.DictReader(fh) if r["stage"] == "fine-tune"]
    except (OSError, ValueError, KeyError):
        return []


def test_resume_after_a_kill_continues_phase_two(image_sets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = spec_dict(
        train=image_sets["train"],
        validation=image_sets["val"],
        output=out,
        head_epochs=1,
        fine_epochs=20,
        unfreeze_last=10,
        patience=100,
        batch_size=24,
    )
    spec["training"]["reduceLROnPlateau"] = {"patience": 100}
    config = _write_config(tmp_path / "job.yaml", spec)
    env = {**os.environ, "FINETUNE_TERMINATION_LOG": str(tmp_path / "term.json"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    first = subprocess.Popen(
        [*_command(), "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and first.poll() is None and len(_fine_tune_epochs(out)) < 2:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before it could be killed"
        assert len(_fine_tune_epochs(out)) >= 2, "phase 2 did not get going in time"
        first.kill()  # a lost node: no cleanup at all
    finally:
        if first.poll() is None:
            first.kill()
        first.wait(timeout=30)
    reached = len(_fine_tune_epochs(out))
    assert 2 <= reached < 20
    assert (out / "checkpoints" / "fine-tune" / checkpoint.CHECKPOINT_FILE).is_file()

    second = subprocess.run(
        [*_command(), "--config", str(config)], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert second.returncode == 0, second.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    head, fine = metrics["stages"]["head"], metrics["stages"]["fine-tune"]
    assert head["completedInEarlierRun"] is True  # phase 1 was not run again
    assert fine["resumedFromEpoch"] >= reached - 1 >= 1  # phase 2 continued where it stopped
    assert fine["epochsThisRun"] == 20 - fine["resumedFromEpoch"]
    assert fine["epochsRun"] == 20
    assert _fine_tune_epochs(out) == list(range(1, 21))  # each epoch once in history.csv
    assert not (out / "checkpoints" / "fine-tune").exists()
