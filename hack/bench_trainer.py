"""Trainer benchmark: this trainer against the seed's ImageDataGenerator pipeline and the keras-io recipe.

On the same generated images and hyper-parameters, for each model (by default MobileNetV2
alpha 0.35 at 32x32 and 96x96, VGG16 at 64x64), runs interleaved in one process:
(a) the seed, literally: `ImageDataGenerator` (Keras 3 still ships it under keras.src.legacy)
    + `flow_from_directory`, a frozen base with a GlobalAveragePooling2D -> Dense(relu) ->
    Dropout -> Dense(softmax) head, then the last layers unfrozen and recompiled at a low
    learning rate; both phases with EarlyStopping and ReduceLROnPlateau;
(b) the keras-io transfer-learning recipe: `image_dataset_from_directory`, the augmentation
    as preprocessing layers inside the model, `model.fit` (augmentation on only);
(c) `finetune_trainer.train.run` with `mixedPrecision: auto` (and, augmentation off, once more
    with mixed_bfloat16 where the CPU has native bfloat16).
It prints per phase wall and CPU seconds, images/s, epochs, val accuracy, peak RSS and the
ratios, once with augmentation on and once off, then a profile of one phase-1 epoch of (c)
(decode, augmentation, base forward, head step, validation, callbacks, checkpoint,
TensorBoard) and phase 1's images/s as a share of the frozen base's pure inference on the
same augmented batches in the same precision (the ceiling of a pass that must run the base
over freshly augmented images).

Each model runs at its default size and at `--scale` (default 4) times as many images, where
the fixed costs (tracing, feature extraction, per-epoch saves) weigh less; every figure is
labelled with its training image count. `--checkpoints both` runs (c) a second time with Keras'
BackupAndRestore in place of the trainer's background checkpoint (bench only), so the lever's
before and after come from one command at one load.

    .venv/bin/python hack/bench_trainer.py [--quick] [--model mobilenet32|mobilenet96|vgg64 ...] [--per-class 30]
        [--scale 4] [--checkpoints background|keras|both] [--only on|off]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

_COLOURS = ((220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 200, 40))

MODELS: dict[str, dict[str, Any]] = {
    "mobilenet32": {"base": "MobileNetV2", "alpha": 0.35, "size": 32, "per_class": 40},
    "mobilenet96": {"base": "MobileNetV2", "alpha": 0.35, "size": 96, "per_class": 30},
    "vgg64": {"base": "VGG16", "alpha": None, "size": 64, "per_class": 16},
}


def _reset_peak_rss() -> None:
    """Clears the process' peak-RSS mark (Linux: 5 > /proc/self/clear_refs), so each run reports its own."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _draw(label: int, *, size: int, rng: np.random.Generator) -> np.ndarray:
    img = rng.normal(110, 30, (size, size, 3)).clip(0, 255)
    yy, xx = np.mgrid[0:size, 0:size]
    r = rng.uniform(0.15, 0.3) * size
    cy, cx = rng.uniform(r, size - r, 2)
    shape = label % 4
    if shape == 0:
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    elif shape == 1:
        mask = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
    elif shape == 2:
        mask = ((yy // max(2, size // 10)) % 2 == 0) & (np.abs(xx - cx) <= 1.5 * r)
    else:
        mask = np.abs((yy - cy) - (xx - cx)) <= r / 3
    img[mask] = np.array(_COLOURS[label % 4]) + rng.normal(0, 15, 3)
    return img.astype(np.uint8)


def generate(root: Path, *, classes: int, per_class: int, size: int, seed: int) -> Path:
    """class-per-folder JPEGs (slightly larger than the model input, as real photos are)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_draw(label, size=size + size // 4, rng=rng)).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def calibrated_weights(*, hp: dict[str, Any], images: Path, path: Path) -> str:
    """A no-top weights file for the base, standing in for pretrained weights (no downloads here).

    Random weights make BatchNorm networks (MobileNet, ResNet, EfficientNet) output almost
    nothing, so nothing could learn; one forward pass in training mode with momentum 0 sets
    every BatchNorm's moving statistics to real ones. Bases without BatchNorm get "none".
    """
    import keras
    from PIL import Image

    keras.backend.clear_session()
    keras.utils.set_random_seed(hp["seed"])
    application = getattr(keras.applications, hp["base"])
    base = application(weights=None, include_top=False, input_shape=(hp["size"], hp["size"], 3), **hp["base_options"])
    norms = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if not norms:
        return "none"
    files = sorted(images.rglob("*.jpg"))[:: max(1, len(list(images.rglob("*.jpg"))) // 64)][:64]
    batch = np.stack(
        [np.asarray(Image.open(f).convert("RGB").resize((hp["size"], hp["size"])), dtype=np.float32) for f in files]
    )
    preprocess_input = sys.modules[application.__module__].preprocess_input
    for layer in norms:
        layer.momentum = 0.0
    base(preprocess_input(batch.copy()), training=True)
    base.save_weights(path)
    return str(path)


def _spec(*, train: Path, val: Path, out: Path, hp: dict[str, Any], augment: bool, precision: str = "auto") -> Any:
    from finetune_trainer.config import parse_config

    return parse_config(
        {
            "model": {
                "base": hp["base"],
                "weights": hp["weights"],
                "inputShape": [hp["size"], hp["size"], 3],
                "baseOptions": hp["base_options"],
                "head": {"units": [hp["units"]], "dropout": hp["dropout"]},
            },
            "data": {"train": str(train), "validation": str(val), "augmentation": {"enabled": augment}},
            "training": {
                "batchSize": hp["batch"],
                "head": {"epochs": hp["head_epochs"], "learningRate": hp["head_lr"]},
                "fineTune": {"epochs": hp["fine_epochs"], "learningRate": hp["fine_lr"], "unfreezeLast": hp["unfreeze"]},
                "earlyStopping": {"patience": hp["patience"], "restoreBestWeights": True},
                "reduceLROnPlateau": {"monitor": "val_loss", "factor": 0.3, "patience": 3},
                "mixedPrecision": precision,
                "seed": hp["seed"],
            },
            "output": {"path": str(out)},
        }
    )


def _keras_checkpoint(*, directory: str | Path) -> Any:
    """The checkpoint lever's baseline: Keras' BackupAndRestore as the trainer used it, synchronous.

    It stands in for `checkpoint.make_checkpoint` (bench only, `--checkpoints keras|both`):
    the same files' content written on the training thread, companion writes at once.
    """
    import keras

    class KerasBackup(keras.callbacks.BackupAndRestore):  # type: ignore[misc]
        restored_epoch: int | None = None
        write_seconds = 0.0

        def defer(self, write: Any) -> None:
            write()

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    return KerasBackup(backup_dir=str(directory), double_checkpoint=True, delete_checkpoint=False)


@contextlib.contextmanager
def _checkpoints(kind: str) -> Any:
    """`background`: the trainer's own EpochCheckpoint; `keras`: BackupAndRestore in its place."""
    from finetune_trainer import checkpoint as checkpoint_lib

    saved = checkpoint_lib.make_checkpoint
    if kind == "keras":
        checkpoint_lib.make_checkpoint = _keras_checkpoint
    try:
        yield
    finally:
        checkpoint_lib.make_checkpoint = saved


def run_mine(
    *, train: Path, val: Path, out: Path, hp: dict[str, Any], augment: bool, precision: str = "auto",
    checkpoints: str = "background",
) -> dict[str, Any]:
    from finetune_trainer import train as trainer

    spec = _spec(train=train, val=val, out=out, hp=hp, augment=augment, precision=precision)
    _reset_peak_rss()
    started, cpu = time.monotonic(), time.process_time()
    with _checkpoints(checkpoints):
        result = trainer.run(spec=spec, output_dir=out, verbose=0)
    total, cpu = time.monotonic() - started, time.process_time() - cpu
    stages = result.summary["stages"]
    return {
        "phases": {
            name: {
                "seconds": s["durationSeconds"],
                "cpu": s["cpuSeconds"],
                "epochs": s["epochsRun"],
                "val_accuracy": s["bestValAccuracy"],
                "train_images_per_second": s["imagesPerSecond"],
                "profile": s.get("profileSeconds", {}),
                "checkpoint_write": s.get("checkpointWriteSeconds", 0.0),
            }
            for name, s in stages.items()
        },
        "val_accuracy": result.summary["final"]["val_accuracy"],
        "policy": result.summary["mixedPrecision"],
        "decode_seconds": result.summary.get("decodeSeconds"),
        "total": total,
        "total_cpu": cpu,
        "peak_rss_mb": _peak_rss_mb(),
        "checkpoints": checkpoints,
    }


def _augmentation_layers(keras: Any) -> Any:
    """The spec's default augmentation (rotation 20, zoom 0.2, shifts 0.1, flip) as keras-io would write it."""
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal"),
            keras.layers.RandomRotation(20 / 360, fill_mode="nearest"),
            keras.layers.RandomZoom(0.2, fill_mode="nearest"),
            keras.layers.RandomTranslation(0.1, 0.1, fill_mode="nearest"),
        ],
        name="data_augmentation",
    )


def run_keras_io(*, train: Path, val: Path, out: Path, hp: dict[str, Any]) -> dict[str, Any]:
    """keras-io's transfer-learning guide: image_dataset_from_directory, augmentation layers in the model, fit."""
    import keras
    import tensorflow as tf

    _reset_peak_rss()
    started, cpu = time.monotonic(), time.process_time()
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(hp["seed"])
    size = (hp["size"], hp["size"])
    train_ds = keras.utils.image_dataset_from_directory(
        str(train), image_size=size, batch_size=hp["batch"], seed=hp["seed"], verbose=False
    )
    val_ds = keras.utils.image_dataset_from_directory(
        str(val), image_size=size, batch_size=hp["batch"], shuffle=False, verbose=False
    )
    num_classes = len(train_ds.class_names)
    train_ds = train_ds.cache().prefetch(tf.data.AUTOTUNE)
    val_ds = val_ds.cache().prefetch(tf.data.AUTOTUNE)
    application = getattr(keras.applications, hp["base"])
    preprocess_input = sys.modules[application.__module__].preprocess_input
    base = application(weights=None, include_top=False, input_shape=(*size, 3), **hp["base_options"])
    if hp["weights"] != "none":
        base.load_weights(hp["weights"])
    base.trainable = False
    inputs = keras.Input(shape=(*size, 3))
    x = _augmentation_layers(keras)(inputs)
    x = keras.layers.Lambda(preprocess_input)(x)
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(hp["units"], activation="relu")(x)
    x = keras.layers.Dropout(hp["dropout"])(x)
    model = keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(x))

    def callbacks() -> list[Any]:
        return [
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=hp["patience"], restore_best_weights=True),
            keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=3),
        ]

    phases: dict[str, dict[str, Any]] = {}
    for phase, lr, epochs in (("head", hp["head_lr"], hp["head_epochs"]), ("fine-tune", hp["fine_lr"], hp["fine_epochs"])):
        if phase == "fine-tune":
            base.trainable = True
            for layer in base.layers[: -hp["unfreeze"]]:
                layer.trainable = False
        model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        t0, c0 = time.monotonic(), time.process_time()
        history = model.fit(train_ds, epochs=epochs, validation_data=val_ds, callbacks=callbacks(), verbose=0)
        phases[phase] = {
            "seconds": time.monotonic() - t0,
            "cpu": time.process_time() - c0,
            "epochs": len(history.history["loss"]),
            "val_accuracy": max(history.history["val_accuracy"]),
        }
    val_accuracy = float(model.evaluate(val_ds, verbose=0, return_dict=True)["accuracy"])
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model.keras")
    return {
        "phases": phases,
        "val_accuracy": val_accuracy,
        "total": time.monotonic() - started,
        "total_cpu": time.process_time() - cpu,
        "peak_rss_mb": _peak_rss_mb(),
    }


def run_baseline(*, train: Path, val: Path, out: Path, hp: dict[str, Any], augment: bool) -> dict[str, Any]:
    """The seed, literally: ImageDataGenerator + flow_from_directory, two phases."""
    import keras
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    _reset_peak_rss()
    started, cpu = time.monotonic(), time.process_time()
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(hp["seed"])
    application = getattr(keras.applications, hp["base"])
    preprocess_input = sys.modules[application.__module__].preprocess_input
    size = (hp["size"], hp["size"])
    if augment:
        train_gen = ImageDataGenerator(
            preprocessing_function=preprocess_input,
            rotation_range=20,
            zoom_range=0.2,
            width_shift_range=0.1,
            height_shift_range=0.1,
            horizontal_flip=True,
        )
    else:
        train_gen = ImageDataGenerator(preprocessing_function=preprocess_input)
    val_gen = ImageDataGenerator(preprocessing_function=preprocess_input)
    train_flow = train_gen.flow_from_directory(
        str(train), target_size=size, batch_size=hp["batch"], class_mode="categorical", seed=hp["seed"]
    )
    val_flow = val_gen.flow_from_directory(
        str(val), target_size=size, batch_size=hp["batch"], class_mode="categorical", shuffle=False
    )

    base = application(weights=None, include_top=False, input_shape=(*size, 3), **hp["base_options"])
    if hp["weights"] != "none":
        base.load_weights(hp["weights"])
    base.trainable = False
    x = keras.layers.GlobalAveragePooling2D()(base.output)
    x = keras.layers.Dense(hp["units"], activation="relu")(x)
    x = keras.layers.Dropout(hp["dropout"])(x)
    outputs = keras.layers.Dense(train_flow.num_classes, activation="softmax")(x)
    model = keras.Model(base.input, outputs)

    def callbacks() -> list[Any]:
        return [
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=hp["patience"], restore_best_weights=True),
            keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=3),
        ]

    phases: dict[str, dict[str, Any]] = {}
    model.compile(optimizer=keras.optimizers.Adam(hp["head_lr"]), loss="categorical_crossentropy", metrics=["accuracy"])
    t0, c0 = time.monotonic(), time.process_time()
    history = model.fit(train_flow, epochs=hp["head_epochs"], validation_data=val_flow, callbacks=callbacks(), verbose=0)
    phases["head"] = {
        "seconds": time.monotonic() - t0,
        "cpu": time.process_time() - c0,
        "epochs": len(history.history["loss"]),
        "val_accuracy": max(history.history["val_accuracy"]),
    }

    base.trainable = True
    for layer in base.layers[: -hp["unfreeze"]]:
        layer.trainable = False
    model.compile(optimizer=keras.optimizers.Adam(hp["fine_lr"]), loss="categorical_crossentropy", metrics=["accuracy"])
    t0, c0 = time.monotonic(), time.process_time()
    history = model.fit(train_flow, epochs=hp["fine_epochs"], validation_data=val_flow, callbacks=callbacks(), verbose=0)
    phases["fine-tune"] = {
        "seconds": time.monotonic() - t0,
        "cpu": time.process_time() - c0,
        "epochs": len(history.history["loss"]),
        "val_accuracy": max(history.history["val_accuracy"]),
    }
    val_accuracy = float(model.evaluate(val_flow, verbose=0, return_dict=True)["accuracy"])
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model.keras")
    return {
        "phases": phases,
        "val_accuracy": val_accuracy,
        "total": time.monotonic() - started,
        "total_cpu": time.process_time() - cpu,
        "peak_rss_mb": _peak_rss_mb(),
    }


def profile(
    *, train: Path, val: Path, hp: dict[str, Any], mine_aug: dict[str, Any], keras_checkpoints: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One phase-1 epoch of this trainer, stage by stage, and the frozen base's pure inference ceiling.

    decode: Pillow decoding and resizing of every image (once per run); augmentation: one epoch
    of the training pipeline with the fused transform, no model; the seed's ImageDataGenerator
    pipeline for the same epoch beside it; base forward: the frozen base and pooling over
    those same augmented batches (predict_on_batch, in the policy `auto` picks); head step: one
    epoch of the head alone on the pooled features. Validation, callbacks, checkpoint and
    TensorBoard are this trainer's own per-epoch figures from the augmentation-on run above.
    """
    import keras
    from finetune_trainer import data as data_lib
    from finetune_trainer import model as model_lib
    from finetune_trainer import train as trainer
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    spec = _spec(train=train, val=val, out=Path("/nonexistent"), hp=hp, augment=True)
    size = (hp["size"], hp["size"])
    t0 = time.monotonic()
    splits = data_lib.load_splits(data=spec.data, image_size=size, seed=hp["seed"])
    decode = time.monotonic() - t0
    n = len(splits.train)
    augmentation = data_lib.build_augmentation(spec=spec.data.augmentation, seed=hp["seed"])
    ds = data_lib.make_dataset(images=splits.train, batch_size=hp["batch"], shuffle=True, seed=1, augmentation=augmentation)
    list(ds)  # warm-up (traces the map functions)
    t0 = time.monotonic()
    batches = [(np.asarray(x), np.asarray(y)) for x, y in ds]
    augment_s = time.monotonic() - t0

    application = getattr(keras.applications, hp["base"])
    generator = ImageDataGenerator(
        preprocessing_function=sys.modules[application.__module__].preprocess_input,
        rotation_range=20, zoom_range=0.2, width_shift_range=0.1, height_shift_range=0.1, horizontal_flip=True,
    )
    flow = generator.flow_from_directory(str(train), target_size=size, batch_size=hp["batch"], seed=hp["seed"])
    t0 = time.monotonic()
    for _ in range(len(flow)):
        next(flow)
    seed_pipeline_s = time.monotonic() - t0

    policy = trainer.resolve_policy("auto")
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(policy)
    network = model_lib.build_network(spec=spec.model, num_classes=len(splits.class_names))
    features = network.features
    for x, _ in batches:  # warm-up: one trace per batch shape
        features.predict_on_batch(x)
    t0 = time.monotonic()
    pooled = [np.asarray(features.predict_on_batch(x), np.float32) for x, _ in batches]
    forward_s = time.monotonic() - t0
    x_feat, y_feat = np.concatenate(pooled), np.concatenate([y for _, y in batches])
    network.head.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    network.head.fit(x_feat, y_feat, batch_size=hp["batch"], epochs=1, verbose=0)  # warm-up (traces)
    t0 = time.monotonic()
    network.head.fit(x_feat, y_feat, batch_size=hp["batch"], epochs=1, verbose=0)
    head_s = time.monotonic() - t0
    keras.mixed_precision.set_global_policy("float32")

    head = mine_aug["phases"]["head"]
    epochs = max(1, head["epochs"])
    per_epoch = {k: v / epochs for k, v in head["profile"].items() if k not in ("extraction", "train")}
    stages = {
        "decode (once)": (decode, n + len(splits.validation)),
        "augmentation": (augment_s, n),
        "seed ImageDataGenerator": (seed_pipeline_s, n),
        "base forward": (forward_s, n),
        "head step": (head_s, n),
        "fit train step (incl. tracing)": (head["profile"].get("train", 0.0) / epochs, n),
        **{name: (seconds, len(splits.validation) if name == "validation" else 0) for name, seconds in per_epoch.items()},
        "checkpoint write (background)": (head.get("checkpoint_write", 0.0) / epochs, 0),
    }
    if keras_checkpoints:
        keras_head = keras_checkpoints["phases"]["head"]
        stages["checkpoint (BackupAndRestore)"] = (keras_head["profile"].get("checkpoint", 0.0) / max(1, keras_head["epochs"]), 0)
    print(f"\n-- one phase-1 epoch with augmentation ({n} images, policy {policy})")
    print(f"{'stage (per epoch unless once)':<30} {'seconds':>8} {'images/s':>9}")
    for name, (seconds, images) in stages.items():
        rate = f"{images / seconds:9.0f}" if images and seconds > 0 else f"{'':>9}"
        print(f"{name:<30} {seconds:8.3f} {rate}")
    inference = n / forward_s
    share = head["train_images_per_second"] / inference if head.get("train_images_per_second") else float("nan")
    print(
        f"ceiling: phase-1 training {head['train_images_per_second']:.0f} images/s with augmentation on is "
        f"{100 * share:.0f}% of the frozen base's pure inference ({inference:.0f} images/s, same batches, {policy})"
    )
    return {
        "policy": policy,
        "stages": {k: {"seconds": v[0], "images": v[1]} for k, v in stages.items()},
        "inference_images_per_second": inference,
        "phase1_share_of_inference": share,
    }


def _row(label: str, phase: dict[str, Any], n_train: int) -> str:
    ips = n_train * phase["epochs"] / phase["seconds"] if phase["seconds"] > 0 else float("nan")
    return (
        f"{label:<9} {phase['seconds']:>8.1f} {phase['cpu']:>8.1f} {ips:>9.1f} {phase['epochs']:>6} "
        f"{phase['val_accuracy']:>8.3f}"
    )


def _checkpoint_per_epoch(run: dict[str, Any]) -> str:
    """Checkpoint seconds per epoch of each phase: on the training thread, and written in the background."""
    parts = []
    for phase, p in run["phases"].items():
        epochs = max(1, p["epochs"])
        parts.append(f"{phase} {p['profile'].get('checkpoint', 0.0) / epochs:.3f} s on the loop"
                     f" + {p.get('checkpoint_write', 0.0) / epochs:.3f} s in the background")
    return ", ".join(parts)


def report(
    *, augment: bool, mine: dict[str, Any], base: dict[str, Any], n_train: int, keras_io: dict[str, Any] | None = None,
    float32: dict[str, Any] | None = None, mine_keras: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Prints one table and returns its figures.

    Wall seconds are what a user waits; CPU seconds (all threads of the process) are the
    work done, and are the steadier figure on a machine shared with other jobs.
    """
    print(f"\n-- augmentation {'on' if augment else 'off'} ({n_train} training images; this: {mine['policy']})")
    print(f"{'phase':<10} {'run':<9} {'wall s':>8} {'cpu s':>8} {'images/s':>9} {'epochs':>6} {'val acc':>8}")
    ratios: dict[str, float] = {}
    others = [("baseline", base), *([("keras-io", keras_io)] if keras_io else [])]
    for phase in ("head", "fine-tune"):
        if phase not in mine["phases"]:
            continue
        m = mine["phases"][phase]
        for label, other in others:
            print(f"{phase if label == 'baseline' else '':<10} {_row(label, other['phases'][phase], n_train)}")
        if mine_keras:
            print(f"{'':<10} {_row('this+B&R', mine_keras['phases'][phase], n_train)}")
        print(f"{'':<10} {_row('this', m, n_train)}")
        b = base["phases"][phase]
        ratios[f"{phase}_wall"] = b["seconds"] / m["seconds"]
        ratios[f"{phase}_cpu"] = b["cpu"] / m["cpu"]
        print(f"{'':<10} speed-up vs baseline {ratios[f'{phase}_wall']:.1f}x wall, {ratios[f'{phase}_cpu']:.1f}x cpu")
    ratios["end_to_end_wall"] = base["total"] / mine["total"]
    ratios["end_to_end_cpu"] = base["total_cpu"] / mine["total_cpu"]
    ratios["val_accuracy_points"] = 100 * (mine["val_accuracy"] - base["val_accuracy"])
    mine_runs = [*([("this+B&R", mine_keras)] if mine_keras else []), ("this", mine)]
    for label, other in [*others, *mine_runs, *([("this bf16", float32)] if float32 else [])]:
        print(
            f"{'total' if label == 'baseline' else '':<10} {label:<9} {other['total']:8.1f} {other['total_cpu']:8.1f} "
            f"val acc {other['val_accuracy']:.3f}  peak RSS {other.get('peak_rss_mb') or float('nan'):.0f} MB"
        )
    line = f"end to end: {ratios['end_to_end_wall']:.2f}x wall ({ratios['end_to_end_cpu']:.2f}x cpu) vs baseline"
    if keras_io:
        ratios["vs_keras_io_wall"] = keras_io["total"] / mine["total"]
        ratios["vs_keras_io_cpu"] = keras_io["total_cpu"] / mine["total_cpu"]
        line += f", {ratios['vs_keras_io_wall']:.2f}x wall ({ratios['vs_keras_io_cpu']:.2f}x cpu) vs keras-io"
    if float32:
        ratios["bf16_vs_fp32_val_accuracy_points"] = 100 * (float32["val_accuracy"] - mine["val_accuracy"])
        ratios["bf16_vs_fp32_wall"] = mine["total"] / float32["total"]
    print(f"{line}; val acc {ratios['val_accuracy_points']:+.1f} points vs baseline (this one also writes "
          "saved_model/, checkpoints/, tensorboard/)")
    for label, run in mine_runs:
        print(f"checkpoint per epoch, {label} ({run['checkpoints']}): {_checkpoint_per_epoch(run)}")
    if mine_keras:
        ratios["checkpoint_lever_wall"] = mine_keras["total"] / mine["total"]
        ratios["checkpoint_lever_cpu"] = mine_keras["total_cpu"] / mine["total_cpu"]
        ratios["keras_checkpoints_end_to_end_wall"] = base["total"] / mine_keras["total"]
        print(f"checkpoint lever: {ratios['checkpoint_lever_wall']:.2f}x wall ({ratios['checkpoint_lever_cpu']:.2f}x cpu) "
              f"end to end, background EpochCheckpoint vs Keras BackupAndRestore (with it: "
              f"{ratios['keras_checkpoints_end_to_end_wall']:.2f}x vs baseline)")
    return {"augment": augment, "ratios": ratios, "mine": mine, "baseline": base, "keras_io": keras_io, "float32": float32,
            "mine_keras_checkpoints": mine_keras}


def bench_model(*, name: str, args: argparse.Namespace, root: Path, per_class: int | None = None) -> dict[str, Any]:
    from finetune_trainer.train import cpu_has_bf16

    model = MODELS[name]
    hp = {
        "base": model["base"],
        "base_options": {"alpha": model["alpha"]} if model["alpha"] else {},
        "weights": "none",
        "size": model["size"],
        "units": 256,
        "dropout": 0.5,
        "batch": 32,
        "head_epochs": args.head_epochs,
        "head_lr": 1e-3 if model["base"] != "VGG16" else 1e-2,  # random VGG16 features are small: a bolder head rate
        "fine_epochs": args.fine_epochs,
        "fine_lr": 1e-5,
        "unfreeze": 4,
        "patience": 5,
        "seed": 1234,
    }
    per_class = per_class or args.per_class or model["per_class"]
    folder = root / f"{name}-{per_class}"
    train = generate(folder / "train", classes=args.classes, per_class=per_class, size=hp["size"], seed=1)
    val = generate(folder / "val", classes=args.classes, per_class=max(2, per_class // 4), size=hp["size"], seed=2)
    n_train = args.classes * per_class
    hp["weights"] = calibrated_weights(hp=hp, images=train, path=folder / "base.weights.h5")
    print(
        f"\n== {name}: {hp['base']}{hp['base_options'] or ''} weights={'calibrated' if hp['weights'] != 'none' else 'none'} "
        f"at {hp['size']}x{hp['size']}, {args.classes} classes, {n_train} train / "
        f"{args.classes * max(2, per_class // 4)} val images, batch {hp['batch']}, epochs {hp['head_epochs']}+{hp['fine_epochs']}",
        flush=True,
    )
    results: dict[str, Any] = {"model": name, "hp": hp, "n_train": n_train}
    for augment in (True, False):
        if args.only and (args.only == "on") != augment:
            continue
        tag = "aug" if augment else "noaug"
        # Interleaved: baseline, this, (keras-io), so that a load change hits every contender.
        base = run_baseline(train=train, val=val, out=folder / f"baseline-{tag}", hp=hp, augment=augment)
        mine = run_mine(train=train, val=val, out=folder / f"mine-{tag}", hp=hp, augment=augment)
        mine_keras = None
        if args.checkpoints in ("keras", "both"):  # after `this`: a first run's one-time costs never favour the lever
            mine_keras = run_mine(train=train, val=val, out=folder / f"mine-keras-{tag}", hp=hp, augment=augment,
                                  checkpoints="keras")
        keras_io = run_keras_io(train=train, val=val, out=folder / "keras-io", hp=hp) if augment else None
        float32 = None
        if not augment and cpu_has_bf16():  # what explicit mixed_bfloat16 gains, and whether it learns the same
            float32 = run_mine(
                train=train, val=val, out=folder / "mine-bf16", hp=hp, augment=False, precision="mixed_bfloat16"
            )
        results[tag] = report(augment=augment, mine=mine, base=base, n_train=n_train, keras_io=keras_io, float32=float32,
                              mine_keras=mine_keras)
        if augment:
            results["profile"] = profile(train=train, val=val, hp=hp, mine_aug=mine, keras_checkpoints=mine_keras)
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of one model")
    parser.add_argument("--model", action="append", choices=sorted(MODELS), help="repeatable; default: all three")
    parser.add_argument("--per-class", type=int, help="training images per class (validation: a quarter); default: per model, 16 to 40")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--head-epochs", type=int, default=4)
    parser.add_argument("--fine-epochs", type=int, default=2)
    parser.add_argument("--only", choices=("on", "off"), help="run only augmentation on or off")
    parser.add_argument("--scale", type=int, default=4,
                        help="also run each model with this many times its images (fixed costs amortised; 1: only the default size)")
    parser.add_argument("--checkpoints", choices=("background", "keras", "both"), default="background",
                        help="both: also run this trainer with Keras' BackupAndRestore in place of its background checkpoint "
                             "(the lever's before/after in one command)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.model = args.model or ["mobilenet32"]
        args.per_class, args.head_epochs, args.fine_epochs, args.scale = 12, 2, 1, 1
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        for name in args.model or ["mobilenet32", "mobilenet96", "vgg64"]:
            per_class = args.per_class or MODELS[name]["per_class"]
            for size in sorted({per_class, per_class * max(1, args.scale)}):
                results.append(bench_model(name=name, args=args, root=Path(tmp), per_class=size))
    print("\n-- summary (wall-clock ratios from this command; on a shared machine, compare ratios, not seconds)")
    print("(images: training images of that row; targets: >= 2x on, >= 4x off, >= 1.5x vs keras-io, >= 70% of inference)")
    lever = any("checkpoint_lever_wall" in r.get(t, {}).get("ratios", {}) for r in results for t in ("aug", "noaug"))
    print(f"{'model':<12} {'images':>6} {'aug on vs seed':>14} {'aug off vs seed':>15} {'vs keras-io':>11} {'ph1 / infer':>11} "
          f"{'val acc pts':>11}" + (f" {'ckpt lever on/off':>17}" if lever else ""))
    nan = float("nan")
    for r in results:
        on, off = r.get("aug", {}).get("ratios", {}), r.get("noaug", {}).get("ratios", {})
        share = r.get("profile", {}).get("phase1_share_of_inference", nan)
        print(
            f"{r['model']:<12} {r['n_train']:>6} {on.get('end_to_end_wall', nan):>13.2f}x {off.get('end_to_end_wall', nan):>14.2f}x "
            f"{on.get('vs_keras_io_wall', nan):>10.2f}x {100 * share:>10.0f}% "
            f"{on.get('val_accuracy_points', nan):>+5.1f}/{off.get('val_accuracy_points', nan):>+5.1f}"
            + (f" {on.get('checkpoint_lever_wall', nan):>7.2f}x/{off.get('checkpoint_lever_wall', nan):.2f}x" if lever else "")
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
