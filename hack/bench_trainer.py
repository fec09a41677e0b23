"""Trainer benchmark: this trainer against the seed's literal ImageDataGenerator pipeline.

On the same generated images and hyper-parameters, runs (a) `finetune_trainer.train.run` and
(b) a baseline written the way the seed script was: `ImageDataGenerator` (Keras 3 still ships
it under keras.src.legacy) + `flow_from_directory`, a frozen base with a
GlobalAveragePooling2D -> Dense(relu) -> Dropout -> Dense(softmax) head, then the last
layers unfrozen and recompiled at a low learning rate; both with EarlyStopping,
ReduceLROnPlateau. It prints per phase: wall seconds, images/s, epochs run, val accuracy,
and the speed-up, once with augmentation on and once off.

    .venv/bin/python hack/bench_trainer.py [--quick] [--base VGG16] [--size 64] [--per-class 80]
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(ROOT / "trainer"))

_COLOURS = ((220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 200, 40))


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


def run_mine(*, train: Path, val: Path, out: Path, hp: dict[str, Any], augment: bool) -> dict[str, Any]:
    from finetune_trainer import train as trainer
    from finetune_trainer.config import parse_config

    spec = parse_config(
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
                "mixedPrecision": "auto",
                "seed": hp["seed"],
            },
            "output": {"path": str(out)},
        }
    )
    started, cpu = time.monotonic(), time.process_time()
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
            }
            for name, s in stages.items()
        },
        "val_accuracy": result.summary["final"]["val_accuracy"],
        "total": total,
        "total_cpu": cpu,
    }


def run_baseline(*, train: Path, val: Path, out: Path, hp: dict[str, Any], augment: bool) -> dict[str, Any]:
    """The seed, literally: ImageDataGenerator + flow_from_directory, two phases."""
    import keras
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

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
    }


def _row(label: str, phase: dict[str, Any], n_train: int) -> str:
    ips = n_train * phase["epochs"] / phase["seconds"] if phase["seconds"] > 0 else float("nan")
    return (
        f"{label:<9} {phase['seconds']:>8.1f} {phase['cpu']:>8.1f} {ips:>9.1f} {phase['epochs']:>6} "
        f"{phase['val_accuracy']:>8.3f}"
    )


def report(*, augment: bool, mine: dict[str, Any], base: dict[str, Any], n_train: int) -> dict[str, Any]:
    """Prints one table and returns its figures.

    Wall seconds are what a user waits; CPU seconds (all threads of the process) are the
    work done, and are the steadier figure on a machine shared with other jobs.
    """
    print(f"\n-- augmentation {'on' if augment else 'off'} ({n_train} training images)")
    print(f"{'phase':<10} {'run':<9} {'wall s':>8} {'cpu s':>8} {'images/s':>9} {'epochs':>6} {'val acc':>8}")
    ratios: dict[str, float] = {}
    for phase in ("head", "fine-tune"):
        if phase not in mine["phases"]:
            continue
        b, m = base["phases"][phase], mine["phases"][phase]
        print(f"{phase:<10} {_row('baseline', b, n_train)}")
        print(f"{'':<10} {_row('this', m, n_train)}")
        ratios[f"{phase}_wall"] = b["seconds"] / m["seconds"]
        ratios[f"{phase}_cpu"] = b["cpu"] / m["cpu"]
        ratios[f"{phase}_wall_per_epoch"] = (b["seconds"] / b["epochs"]) / (m["seconds"] / m["epochs"])
        print(
            f"{'':<10} speed-up  {ratios[f'{phase}_wall']:.1f}x wall, {ratios[f'{phase}_cpu']:.1f}x cpu, "
            f"{ratios[f'{phase}_wall_per_epoch']:.1f}x wall per epoch"
        )
    ratios["end_to_end_wall"] = base["total"] / mine["total"]
    ratios["end_to_end_cpu"] = base["total_cpu"] / mine["total_cpu"]
    ratios["val_accuracy_points"] = 100 * (mine["val_accuracy"] - base["val_accuracy"])
    print(
        f"{'total':<10} baseline {base['total']:.1f}s wall / {base['total_cpu']:.1f}s cpu, "
        f"this {mine['total']:.1f}s / {mine['total_cpu']:.1f}s -> {ratios['end_to_end_wall']:.1f}x wall, "
        f"{ratios['end_to_end_cpu']:.1f}x cpu (this one also writes saved_model/, checkpoints/, tensorboard/)"
    )
    print(
        f"{'val acc':<10} baseline {base['val_accuracy']:.3f}, this {mine['val_accuracy']:.3f} "
        f"({ratios['val_accuracy_points']:+.1f} points)"
    )
    return {"augment": augment, "ratios": ratios, "mine": mine, "baseline": base}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in about a minute")
    parser.add_argument("--base", default="VGG16")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--alpha", type=float, help="MobileNet width multiplier (baseOptions.alpha)")
    parser.add_argument("--per-class", type=int, default=60, help="training images per class (validation: a quarter)")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--head-epochs", type=int, default=20, help="the spec's default")
    parser.add_argument("--fine-epochs", type=int, default=5)
    parser.add_argument("--only", choices=("on", "off"), help="run only augmentation on or off")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.per_class, args.head_epochs, args.fine_epochs = 32, 24, 4, 1
    hp = {
        "base": args.base,
        "base_options": {"alpha": args.alpha} if args.alpha else {},
        "weights": "none",
        "size": args.size,
        "units": 256,
        "dropout": 0.5,
        "batch": 32,
        "head_epochs": args.head_epochs,
        "head_lr": 1e-3 if args.base != "VGG16" else 1e-2,  # random VGG16 features are small: a bolder head rate
        "fine_epochs": args.fine_epochs,
        "fine_lr": 1e-5,
        "unfreeze": 4,
        "patience": 5,
        "seed": 1234,
    }
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        root = Path(tmp)
        train = generate(root / "train", classes=args.classes, per_class=args.per_class, size=args.size, seed=1)
        val = generate(root / "val", classes=args.classes, per_class=max(2, args.per_class // 4), size=args.size, seed=2)
        n_train = args.classes * args.per_class
        hp["weights"] = calibrated_weights(hp=hp, images=train, path=root / "base.weights.h5")
        print(
            f"bench trainer: {hp['base']}{hp['base_options'] or ''} weights={'calibrated' if hp['weights'] != 'none' else 'none'} at {args.size}x{args.size}, {args.classes} classes, "
            f"{n_train} train / {args.classes * max(2, args.per_class // 4)} val images, batch {hp['batch']}, "
            f"epochs {hp['head_epochs']}+{hp['fine_epochs']}",
            flush=True,
        )
        for augment in (True, False):
            if args.only and (args.only == "on") != augment:
                continue
            tag = "aug" if augment else "noaug"
            base = run_baseline(train=train, val=val, out=root / f"baseline-{tag}", hp=hp, augment=augment)
            mine = run_mine(train=train, val=val, out=root / f"mine-{tag}", hp=hp, augment=augment)
            results.append(report(augment=augment, mine=mine, base=base, n_train=n_train))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
