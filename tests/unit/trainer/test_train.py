"""Whole training runs in-process on tiny generated images: both phases, outputs, observers."""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from finetune_contract.spec import DataSpec, ModelSpec
from finetune_testbed.imagesets import spec_dict
from finetune_trainer import checkpoint as checkpoint_lib
from finetune_trainer import data as data_lib
from finetune_trainer import model as model_lib
from finetune_trainer import train
from finetune_trainer.config import parse_config

SHAPE = (32, 32, 3)


class Recorder:
    """A TrainingObserver that writes down every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, hook: str) -> Any:
        if not hook.startswith("on_"):
            raise AttributeError(hook)
        return lambda **kwargs: self.calls.append((hook, kwargs))

    def named(self, hook: str) -> list[dict[str, Any]]:
        return [kwargs for name, kwargs in self.calls if name == hook]


class Exploding:
    """A TrainingObserver that raises from every hook; training must not notice."""

    def __getattr__(self, hook: str) -> Any:
        def boom(**kwargs: Any) -> None:
            raise RuntimeError(f"observer bug in {hook}")

        return boom


def _history(out: Path) -> list[dict[str, str]]:
    with (out / "history.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VGG16 no-top weights file made by the test (random, seeded): stands in for pretrained weights."""
    keras.utils.set_random_seed(3)
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=SHAPE)
    path = tmp_path_factory.mktemp("weights") / "vgg16-notop.weights.h5"
    base.save_weights(path)
    return path


@pytest.fixture(scope="module")
def two_phase_run(
    image_sets: dict[str, Path], vgg_weights: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[train.RunResult, Recorder]:
    """One full two-phase run (fast path in phase 1) shared by the tests below."""
    out = tmp_path_factory.mktemp("run") / "model"
    spec = parse_config(
        spec_dict(
            train=image_sets["train"],
            validation=image_sets["val"],
            output=out,
            base="VGG16",
            weights=str(vgg_weights),
            head_epochs=25,
            head_lr=0.01,
            fine_epochs=2,
            fine_lr=1e-5,
            unfreeze_last=4,
            units=(64,),
            patience=25,
        )
    )
    recorder = Recorder()
    result = train.run(spec=spec, observers=[Exploding(), recorder], verbose=0)
    return result, recorder


def test_outputs_exist_and_the_model_reloads_and_learned(
    two_phase_run: tuple[train.RunResult, Recorder], image_sets: dict[str, Path]
) -> None:
    result, _ = two_phase_run
    out = result.output_dir
    for name in ("model.keras", "classes.json", "metrics.json", "history.csv"):
        assert (out / name).is_file(), name
    assert (out / "saved_model" / "saved_model.pb").is_file()
    assert any((out / "tensorboard" / "head").rglob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "state.json").is_file()
    assert json.loads((out / "classes.json").read_text()) == ["circle", "square", "stripes"]

    reloaded = keras.models.load_model(out / "model.keras")
    splits = data_lib.load_splits(
        data=DataSpec(train=str(image_sets["train"]), validation=str(image_sets["val"])), image_size=(32, 32), seed=0
    )
    assert splits.validation.images is not None
    probs = reloaded.predict(splits.validation.images.astype(np.float32), verbose=0)  # raw 0-255 RGB in
    accuracy = float(np.mean(probs.argmax(axis=1) == splits.validation.labels))
    assert accuracy >= 0.75, f"val accuracy {accuracy:.2f} not far above chance (0.33)"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final"]["val_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert result.metrics["val_accuracy"] == pytest.approx(accuracy, abs=1e-6)


def test_phases_train_the_right_layers_at_the_right_rates(
    two_phase_run: tuple[train.RunResult, Recorder], vgg_weights: Path
) -> None:
    result, _ = two_phase_run
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    head, fine = metrics["stages"]["head"], metrics["stages"]["fine-tune"]
    assert head["trainableLayers"] == ["head_dense_0", "predictions"]
    assert head["fastPath"] == "features" and head["learningRate"] == 0.01
    assert fine["fastPath"] == "prefix" and fine["cachedBelow"] == "block4_pool"
    assert fine["trainableLayers"] == ["block5_conv1", "block5_conv2", "block5_conv3"]
    assert fine["learningRate"] == 1e-5 and fine["epochsRun"] == 2
    rows = _history(result.output_dir)
    assert [r["stage"] for r in rows] == ["head"] * head["epochsRun"] + ["fine-tune"] * 2
    assert float(rows[0]["learning_rate"]) == pytest.approx(0.01)
    assert float(rows[-2]["learning_rate"]) == pytest.approx(1e-5)

    # The saved base: frozen layers kept the weights file's values, the unfrozen ones moved.
    original = keras.applications.VGG16(include_top=False, weights=None, input_shape=SHAPE)
    original.load_weights(vgg_weights)
    trained = keras.models.load_model(result.output_dir / "model.keras").get_layer("vgg16")
    for name in ("block1_conv1", "block4_conv3"):
        np.testing.assert_array_equal(trained.get_layer(name).get_weights()[0], original.get_layer(name).get_weights()[0])
    assert not np.array_equal(
        trained.get_layer("block5_conv3").get_weights()[0], original.get_layer("block5_conv3").get_weights()[0]
    )


def test_observers_see_every_stage_epoch_and_batch(two_phase_run: tuple[train.RunResult, Recorder]) -> None:
    result, recorder = two_phase_run
    head_epochs = result.summary["stages"]["head"]["epochsRun"]
    total = 25 + 2
    starts = recorder.named("on_stage_start")
    assert [(s["stage"], s["epochs_done"], s["total_epochs"]) for s in starts] == [("head", 0, total), ("fine-tune", 25, total)]
    epochs = recorder.named("on_epoch_end")
    assert len(epochs) == head_epochs + 2
    last = epochs[-1]
    assert (last["stage"], last["epoch"], last["epochs_done"]) == ("fine-tune", 2, total)
    assert set(last["metrics"]) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert last["images_per_second"] > 0 and last["best_val_accuracy"] is not None
    batches = recorder.named("on_batch_end")
    assert len(batches) == (head_epochs + 2) * 5  # 72 images, batch 16
    assert batches[-1]["batches"] == 5
    ends = recorder.named("on_stage_end")
    assert [(e["stage"], e["epochs_done"]) for e in ends] == [("head", 25), ("fine-tune", total)]
    finish = recorder.named("on_finish")
    assert len(finish) == 1 and finish[0]["result"] == "succeeded"


def test_augmented_run_with_split_and_no_phase_two(image_sets: dict[str, Path], tmp_path: Path) -> None:
    train_dir = tmp_path / "train"
    shutil.copytree(image_sets["train"], train_dir)
    for broken in (train_dir / "circle" / "000.png", train_dir / "square" / "005.png"):
        broken.write_bytes(broken.read_bytes()[:100])  # truncated: skipped with a warning, counted
    (train_dir / "stripes" / "notes.txt").write_text("ignored")
    spec = parse_config(
        spec_dict(
            train=train_dir,
            validation_split=0.25,
            output=tmp_path / "out",
            augmentation=True,
            head_epochs=2,
            unfreeze_last=0,
            fine_epochs=5,
        )
    )
    recorder = Recorder()
    result = train.run(spec=spec, observers=[recorder], verbose=0)
    assert list(result.summary["stages"]) == ["head"]
    assert result.summary["stages"]["head"]["fastPath"] == "validation-features"
    images = result.summary["images"]
    assert images["train"] + images["validation"] == 70 and 16 <= images["validation"] <= 18
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["skippedFiles"] == 2
    assert sorted(Path(item["path"]).name for item in metrics["skipped"]) == ["000.png", "005.png"]
    assert [r["stage"] for r in _history(tmp_path / "out")] == ["head", "head"]
    assert [s["stage"] for s in recorder.named("on_stage_start")] == ["head"]
    assert recorder.named("on_stage_end")[0]["total_epochs"] == 2
    # What each part of the stage cost, and the precision policy it ran in.
    head = metrics["stages"]["head"]
    parts = head["profileSeconds"]
    assert set(parts) == {"train", "validation", "callbacks", "checkpoint", "tensorboard", "extraction"}
    assert parts["train"] > 0 and parts["validation"] > 0 and parts["checkpoint"] > 0
    assert sum(parts.values()) <= head["durationSeconds"] + 0.5
    rates = head["imagesPerSecondByPart"]
    assert rates["train"] == head["imagesPerSecond"] > 0 and rates["validation"] > 0 and rates["extraction"] > 0
    assert metrics["mixedPrecision"] == "float32" and metrics["mixedPrecisionSetting"] == "off"
    assert isinstance(metrics["cpuNativeBfloat16"], bool)
    assert metrics["decodeImagesPerSecond"] > 0 and metrics["cpus"] >= 1


def test_fast_path_is_the_same_math(image_sets: dict[str, Path]) -> None:
    """Training the head on extracted features gives the losses of training the frozen full model."""
    splits = data_lib.load_splits(
        data=DataSpec(train=str(image_sets["train"]), validation=str(image_sets["val"])), image_size=(32, 32), seed=0
    )
    assert splits.train.images is not None
    x, y = splits.train.images.astype(np.float32), splits.train.labels
    losses = {}
    keras.mixed_precision.set_global_policy("float32")
    for mode in ("features", "full"):
        keras.utils.set_random_seed(11)
        spec = ModelSpec(base="VGG16", weights="none", input_shape=SHAPE, head={"units": [16], "dropout": 0.0})
        net = model_lib.build_network(spec=spec, num_classes=3)
        fitted = net.head if mode == "features" else net.model
        inputs = net.features.predict(x, verbose=0) if mode == "features" else x
        fitted.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
        losses[mode] = fitted.fit(inputs, y, batch_size=16, epochs=3, shuffle=False, verbose=0).history["loss"]
    np.testing.assert_allclose(losses["features"], losses["full"], rtol=1e-4)


def test_auto_mixed_precision_is_off_on_cpu_and_native_bf16_is_detected(tmp_path: Path) -> None:
    assert train.resolve_policy("auto") == "float32"  # bf16 learned worse in make bench: explicit only
    assert train.resolve_policy("off") == "float32"
    assert train.resolve_policy("mixed_bfloat16") == "mixed_bfloat16"
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_bf16\n")
    plain = tmp_path / "plain"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert train.cpu_has_bf16(amx) and train.cpu_has_bf16(arm) and not train.cpu_has_bf16(plain)
    assert not train.cpu_has_bf16(tmp_path / "missing")


class _Interrupted(Exception):
    """Stands in for a lost pod in the middle of a stage."""


def _fit_with_resume_state(backup: Path, *, epochs: int, interrupt_after: int | None = None) -> dict[str, Any]:
    """A tiny deterministic fit with the stage's stopping callbacks, BackupAndRestore and the saved state."""
    keras.utils.set_random_seed(5)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 8)).astype(np.float32), rng.integers(0, 2, 64)
    x_val, y_val = rng.normal(size=(32, 8)).astype(np.float32), rng.integers(0, 2, 32)  # unrelated: val_loss rises
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
    early = keras.callbacks.EarlyStopping(monitor="val_loss", patience=4, restore_best_weights=True)
    reduce = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2)
    seen: dict[str, Any] = {"epochs": [], "waits": {}}

    class Probe(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            seen.setdefault("first", (epoch, early.wait, early.best, reduce.wait, reduce.best,
                                      float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))))

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            seen["epochs"].append(epoch)
            seen["waits"][epoch] = (early.wait, early.best, reduce.wait, reduce.best,
                                    float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))
            if epoch == interrupt_after:
                raise _Interrupted

    callbacks = [
        early,
        reduce,
        keras.callbacks.BackupAndRestore(backup_dir=str(backup), double_checkpoint=True, delete_checkpoint=False),
        train._make_callback_state(directory=backup, early=early, reduce=reduce),
        Probe(),
    ]
    with contextlib.suppress(_Interrupted):
        model.fit(x, y, validation_data=(x_val, y_val), batch_size=64, epochs=epochs, shuffle=False,
                  callbacks=callbacks, verbose=0)
    seen["weights"] = model.get_weights()
    seen["best_epoch"] = early.best_epoch
    return seen


def test_resume_continues_early_stopping_and_plateau_state(tmp_path: Path) -> None:
    """A run killed mid-stage and resumed stops at the epoch, and keeps the best weights, of an uninterrupted one."""
    keras.mixed_precision.set_global_policy("float32")
    whole = _fit_with_resume_state(tmp_path / "whole", epochs=40)
    stopped = whole["epochs"][-1]
    assert stopped < 39, "early stopping never triggered; the check below would prove nothing"
    cut = next(e for e in range(stopped - 1, 0, -1) if whole["waits"][e][0] > 0)  # a cut with patience used up
    first = _fit_with_resume_state(tmp_path / "cut", epochs=40, interrupt_after=cut)
    assert first["epochs"][-1] == cut
    assert (tmp_path / "cut" / train.CALLBACK_STATE_FILE).is_file()
    assert (tmp_path / "cut" / train.BEST_WEIGHTS_FILE).is_file()

    resumed = _fit_with_resume_state(tmp_path / "cut", epochs=40)
    epoch, early_wait, early_best, reduce_wait, reduce_best, lr = resumed["first"]
    assert epoch == cut + 1
    assert (early_wait, early_best, reduce_wait, reduce_best) == pytest.approx(whole["waits"][cut][:4])
    assert early_wait > 0 and lr == pytest.approx(whole["waits"][cut][4])
    assert resumed["epochs"][-1] == stopped  # without the saved state it trains `wait` epochs longer
    assert resumed["best_epoch"] == whole["best_epoch"]
    for got, want in zip(resumed["weights"], whole["weights"], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


class CheckpointWitness:
    """A TrainingObserver that notes, as each epoch's history row is written, the epoch on disk."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.seen: list[tuple[str, int, int | None]] = []

    def on_epoch_end(self, *, stage: str, epoch: int, **_: Any) -> None:
        self.seen.append((stage, epoch, checkpoint_lib.saved_epoch(self.out / "checkpoints" / stage)))

    def __getattr__(self, hook: str) -> Any:
        if not hook.startswith("on_"):
            raise AttributeError(hook)
        return lambda **kwargs: None


def test_a_slow_checkpoint_write_never_lags_more_than_the_epoch_in_progress(
    image_sets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pod lost right after an epoch's history row resumes from the epoch before it at the latest."""
    real_write = checkpoint_lib.write_checkpoint

    def slow_write(**kwargs: Any) -> None:  # a slow disk: each write takes longer than an epoch here
        time.sleep(0.5)
        real_write(**kwargs)

    monkeypatch.setattr(checkpoint_lib, "write_checkpoint", slow_write)
    out = tmp_path / "model"
    spec = parse_config(spec_dict(train=image_sets["train"], validation=image_sets["val"], output=out,
                                  head_epochs=4, fine_epochs=3, patience=25))
    witness = CheckpointWitness(out)
    train.run(spec=spec, observers=[witness], verbose=0)
    assert [(stage, epoch) for stage, epoch, _ in witness.seen] == [
        ("head", 1), ("head", 2), ("head", 3), ("head", 4), ("fine-tune", 1), ("fine-tune", 2), ("fine-tune", 3)
    ]
    for stage, epoch, on_disk in witness.seen:
        assert (on_disk or 0) >= epoch - 1, (stage, epoch, on_disk, witness.seen)
