"""`make bench` section "distribute": step time and images/s of 1 vs 2 workers on this CPU.

Both runs are the real `finetune-train` CLI on the same generated images, spec, seed and
global batch; the 2-worker run is two processes under MultiWorkerMirroredStrategy on
127.0.0.1 (the env the operator sets: FINETUNE_WORKER_HOSTS, FINETUNE_WORKER_INDEX). On one
machine's CPUs two workers share the same cores, so what this shows is the overhead of the
all-reduce and the coordination, not a speed-up. Figures per phase come from the chief's
metrics.json (train seconds of the epochs, images/s of the training passes).

    python hack/bench_distribute.py [--images-per-class N] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from finetune_testbed.net import free_ports

ROOT = Path(__file__).resolve().parent.parent
BATCH = 16


def _command() -> list[str]:
    script = Path(sys.executable).with_name("finetune-train")
    return [str(script)] if script.exists() else [sys.executable, "-m", "finetune_trainer"]


def _spec(*, train: Path, val: Path, output: Path, epochs: int, workers: int) -> dict[str, Any]:
    from finetune_testbed.imagesets import spec_dict

    spec = spec_dict(train=train, validation=val, output=output, head_epochs=epochs, fine_epochs=epochs,
                     batch_size=BATCH, augmentation=True)
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "bench"},
            "spec": {**spec, "runtime": {"gpus": 0, "workers": workers}}}


def _env() -> dict[str, str]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    for key in ("FINETUNE_PROGRESS_URL", "FINETUNE_METRICS_PORT", "TF_CONFIG"):
        env.pop(key, None)
    return env


def _run(*, tmp: Path, name: str, train: Path, val: Path, epochs: int, workers: int) -> dict[str, Any]:
    out = tmp / name
    config = tmp / f"{name}.json"
    config.write_text(json.dumps(_spec(train=train, val=val, output=out, epochs=epochs, workers=workers)))
    hosts = ",".join(f"127.0.0.1:{p}" for p in free_ports(workers))
    started = time.monotonic()
    procs = []
    for index in range(workers):
        env = {**_env(), "FINETUNE_TERMINATION_LOG": str(tmp / f"{name}-{index}.term")}
        if workers > 1:
            env.update(FINETUNE_WORKER_HOSTS=hosts, FINETUNE_WORKER_INDEX=str(index))
        procs.append(subprocess.Popen([*_command(), "--config", str(config)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True, env=env))
    for proc in procs:
        _, err = proc.communicate(timeout=1200)
        if proc.returncode != 0:
            raise RuntimeError(f"{name}: a worker exited {proc.returncode}: {err[-2000:]}")
    wall = time.monotonic() - started
    metrics = json.loads((out / "metrics.json").read_text())
    n_train = metrics["images"]["train"]
    steps = -(-n_train // BATCH)
    phases = {}
    for stage, summary in metrics["stages"].items():
        epochs_run = max(1, int(summary.get("epochsThisRun") or 0))
        train_s = float(summary.get("trainSeconds") or 0.0)
        phases[stage] = {"stepMs": round(1000 * train_s / (epochs_run * steps), 1),
                         "imagesPerSecond": summary.get("imagesPerSecond")}
    return {"workers": workers, "wallSeconds": round(wall, 1), "phases": phases,
            "valAccuracy": metrics["final"]["val_accuracy"]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_distribute")
    parser.add_argument("--images-per-class", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    from finetune_testbed.imagesets import write_image_folder

    with tempfile.TemporaryDirectory(prefix="bench-distribute-") as name:
        tmp = Path(name)
        train = write_image_folder(tmp / "train", per_class=args.images_per_class, seed=21)
        val = write_image_folder(tmp / "val", per_class=max(4, args.images_per_class // 3), seed=22)
        rows = [_run(tmp=tmp, name=f"w{w}", train=train, val=val, epochs=args.epochs, workers=w) for w in (1, 2)]
    print(f"MobileNetV2(alpha 0.35) 32x32, weights none, augmentation on, global batch {BATCH}, "
          f"{args.epochs}+{args.epochs} epochs, {os.cpu_count()} CPUs shared by both workers")
    print(f"{'workers':>8} {'phase':>10} {'step ms':>9} {'images/s':>9} {'wall s':>7} {'val acc':>8}")
    for row in rows:
        for stage, phase in row["phases"].items():
            print(f"{row['workers']:>8} {stage:>10} {phase['stepMs']:>9} {phase['imagesPerSecond']!s:>9} "
                  f"{row['wallSeconds']:>7} {row['valAccuracy']:>8.3f}")
    print(json.dumps({"distribute": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
