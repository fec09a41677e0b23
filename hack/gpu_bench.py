"""ResNet50 training throughput, float32 against mixed precision, on whatever Keras 3 backend is set.

Standalone (only `keras` and `numpy`), so it runs where TensorFlow is absent:

    KERAS_BACKEND=jax python hack/gpu_bench.py [--batch 64] [--steps 30] [--warmup 5] [--image-size 224]

Synthetic data lives on the device; each policy builds a fresh ResNet50 (weights=None, its
own softmax head in float32), runs warm-up steps (compilation), then timed steps. Prints one
JSON line per policy and a last line with the mixed/fp32 ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

import numpy as np


def _device() -> str:
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax  # type: ignore[import-not-found]

            device = jax.devices()[0]
            return f"{device.platform}:{getattr(device, 'device_kind', device)}"
        if backend == "torch":
            import torch  # type: ignore[import-not-found]

            return f"cuda:{torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu"
        if backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            return f"gpu:{gpus[0].name}" if gpus else "cpu"
    except Exception as exc:  # a missing accelerator library is not fatal for a CPU smoke run
        return f"unknown ({type(exc).__name__})"
    return "unknown"


def _model(*, image_size: int, classes: int) -> Any:
    import keras

    base = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(image_size, image_size, 3))
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.GlobalAveragePooling2D()(base(inputs))
    outputs = keras.layers.Dense(classes, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs)


def measure(*, policy: str, batch: int, steps: int, warmup: int, image_size: int, classes: int) -> dict[str, Any]:
    """Images per second of training steps under one dtype policy."""
    import keras

    keras.backend.clear_session()
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(0)
    model = _model(image_size=image_size, classes=classes)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
        loss="sparse_categorical_crossentropy",
    )
    rng = np.random.default_rng(0)
    x = keras.ops.convert_to_tensor(rng.uniform(0, 255, (batch, image_size, image_size, 3)).astype("float32"))
    y = keras.ops.convert_to_tensor(rng.integers(0, classes, (batch,)).astype("int32"))
    started = time.perf_counter()
    loss = float("nan")
    for _ in range(warmup):
        loss = float(model.train_on_batch(x, y))
    warmup_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        loss = float(model.train_on_batch(x, y))  # float(): waits for the step to finish
    elapsed = time.perf_counter() - started
    keras.config.set_dtype_policy("float32")
    return {
        "backend": keras.backend.backend(),
        "device": _device(),
        "policy": policy,
        "model": "ResNet50",
        "image_size": image_size,
        "classes": classes,
        "batch": batch,
        "warmup_steps": warmup,
        "warmup_seconds": round(warmup_s, 3),
        "steps": steps,
        "seconds": round(elapsed, 3),
        "step_ms": round(1000 * elapsed / steps, 2),
        "images_per_second": round(batch * steps / elapsed, 1),
        "final_loss": loss,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpu_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per policy")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument(
        "--policies", default="float32,mixed_float16", help="comma list, e.g. float32,mixed_float16,mixed_bfloat16"
    )
    args = parser.parse_args(argv)
    results = []
    for policy in [p.strip() for p in args.policies.split(",") if p.strip()]:
        result = measure(
            policy=policy,
            batch=args.batch,
            steps=args.steps,
            warmup=args.warmup,
            image_size=args.image_size,
            classes=args.classes,
        )
        results.append(result)
        print(json.dumps(result), flush=True)
    by_policy = {r["policy"]: r["images_per_second"] for r in results}
    summary: dict[str, Any] = {"python": platform.python_version()}
    if "float32" in by_policy:
        for policy, ips in by_policy.items():
            if policy != "float32":
                summary[f"ratio_{policy}_over_float32"] = round(ips / by_policy["float32"], 3)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
