"""Distribution strategies: the pure plan and TF_CONFIG, and the same trainer under strategies.

- MirroredStrategy over a CPU split into 2 logical devices (in a subprocess: the split must
  happen before TensorFlow initialises its devices) trains through train.run and its loss
  curve matches a one-device run of the same spec, seed and global batch.
- MultiWorkerMirroredStrategy: two real `finetune-train` processes on 127.0.0.1 (two free
  ports, the env the operator sets) both train, only the chief writes the outputs, and the
  val accuracy equals a one-worker run's within 2 points.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_testbed.imagesets import spec_dict, write_image_folder
from finetune_testbed.net import free_ports
from finetune_trainer import distribute
from finetune_trainer.config import load_runtime
from finetune_trainer.errors import InvalidSpecError

HOSTS = ("w0.job.ns.svc:2222", "w1.job.ns.svc:2222")
LOSS_TOLERANCE = 1e-4  # relative, per epoch: float sums in another order (2 replicas); measured ~1e-7
ACCURACY_POINTS = 2.0
HEAD_EPOCHS = 12


def test_tf_config_names_every_worker_and_this_task() -> None:
    assert distribute.build_tf_config(hosts=HOSTS, index=1) == {
        "cluster": {"worker": list(HOSTS)},
        "task": {"type": "worker", "index": 1},
    }
    assert distribute.build_tf_config(hosts=["127.0.0.1:1", "[::1]:65535"], index=0)["task"]["index"] == 0


@pytest.mark.parametrize(
    ("hosts", "index", "message"),
    [
        ((), 0, "at least one"),
        (HOSTS, 2, "not in 0..1"),
        (HOSTS, -1, "not in 0..1"),
        (("w0:2222", "w0:2222"), 0, "repeat"),
        (("w0", "w1:2222"), 0, "not host:port"),
        (("w0:0", "w1:2222"), 0, "not host:port"),
        (("w0:70000", "w1:2222"), 0, "not host:port"),
        (("-bad:1", "w1:2222"), 0, "not host:port"),
    ],
)
def test_tf_config_refuses_what_cannot_form_a_cluster(hosts: tuple[str, ...], index: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        distribute.build_tf_config(hosts=hosts, index=index)


def test_plan_one_worker_ignores_the_worker_env() -> None:
    plan = distribute.plan(runtime={"gpus": 4}, env={distribute.ENV_WORKER_HOSTS: ",".join(HOSTS)})
    assert plan == distribute.Plan(workers=1, index=0, hosts=(), gpus=4)
    assert plan.is_chief
    assert distribute.plan(runtime=None, env={}) == distribute.Plan()


def test_plan_several_workers_reads_index_and_hosts() -> None:
    env = {distribute.ENV_WORKER_HOSTS: " , ".join(HOSTS) + ",", distribute.ENV_WORKER_INDEX: "1"}
    plan = distribute.plan(runtime={"workers": 2, "gpus": 0}, env=env)
    assert (plan.workers, plan.index, plan.hosts, plan.gpus, plan.is_chief) == (2, 1, HOSTS, 0, False)
    # An Indexed Job's own variable serves when the operator's is absent.
    fallback = distribute.plan(
        runtime={"workers": 2}, env={distribute.ENV_WORKER_HOSTS: ",".join(HOSTS), "JOB_COMPLETION_INDEX": "0"}
    )
    assert fallback.index == 0 and fallback.is_chief


@pytest.mark.parametrize(
    ("runtime", "env", "message"),
    [
        ({"workers": 2}, {distribute.ENV_WORKER_INDEX: "0"}, "names 0 workers"),
        ({"workers": 3}, {distribute.ENV_WORKER_HOSTS: ",".join(HOSTS), distribute.ENV_WORKER_INDEX: "0"}, "names 2"),
        ({"workers": 2}, {distribute.ENV_WORKER_HOSTS: ",".join(HOSTS)}, "needs this worker's index"),
        ({"workers": 2}, {distribute.ENV_WORKER_HOSTS: ",".join(HOSTS), distribute.ENV_WORKER_INDEX: "x"}, "index"),
        ({"workers": 2}, {distribute.ENV_WORKER_HOSTS: ",".join(HOSTS), distribute.ENV_WORKER_INDEX: "2"}, "not in"),
        ({"workers": 0}, {}, "spec.runtime.workers"),
        ({"workers": True}, {}, "spec.runtime.workers"),
        ({"gpus": -1}, {}, "spec.runtime.gpus"),
    ],
)
def test_plan_refuses_an_incomplete_cluster(runtime: dict[str, Any], env: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidSpecError, match=message):
        distribute.plan(runtime=runtime, env=env)


def test_load_runtime_reads_the_manifest_runtime(tmp_path: Path) -> None:
    whole = tmp_path / "job.json"
    whole.write_text(json.dumps({"kind": "FineTuneJob", "spec": {"runtime": {"workers": 2, "gpus": 0}}}))
    assert load_runtime(path=whole) == {"workers": 2, "gpus": 0}
    bare = tmp_path / "spec.yaml"
    bare.write_text(yaml.safe_dump({"data": {"train": "x"}}))
    assert load_runtime(path=bare) == {}


def test_default_plan_on_a_cpu_has_no_strategy(tmp_path: Path) -> None:
    context = distribute.start(plan=distribute.Plan(gpus=0), output_dir=tmp_path, batch_size=1)
    assert (context.kind, context.replicas, context.is_chief, context.output_dir(tmp_path)) == (
        "default", 1, True, tmp_path
    )
    assert context.describe() == {"strategy": None, "workers": 1, "replicas": 1}


# The MirroredStrategy run: 2 logical CPUs; a one-device run and a 2-replica run of one spec.
_MIRRORED = textwrap.dedent(
    """
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from finetune_trainer import distribute, train
    from finetune_trainer.config import parse_config
    spec = parse_config(json.loads(sys.argv[1]))
    replicas = []  # a spy: the replicas of every model the phases compile
    compile_ = train._compile
    def spy(model, **kwargs):
        replicas.append(model.distribute_strategy.num_replicas_in_sync)
        compile_(model, **kwargs)
    train._compile = spy
    out = {}
    for name, plan in (("one", distribute.Plan(gpus=0)),
                       ("mirrored", distribute.Plan(devices=("/cpu:0", "/cpu:1")))):
        result = train.run(spec=spec, output_dir=sys.argv[2] + "/" + name, distribution=plan, verbose=0)
        out[name] = {"history": [{k: r.get(k) for k in ("stage", "epoch", "loss", "val_loss")}
                                 for r in json.load(open(sys.argv[2] + "/" + name + "/checkpoints/state.json"))["history"]],
                     "val_accuracy": result.metrics["val_accuracy"], "replicas": sorted(set(replicas))}
        replicas.clear()
    print("RESULT " + json.dumps(out))
    """
)


def _env() -> dict[str, str]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    for key in ("FINETUNE_PROGRESS_URL", "FINETUNE_METRICS_PORT", "TF_CONFIG",
                distribute.ENV_WORKER_HOSTS, distribute.ENV_WORKER_INDEX):
        env.pop(key, None)
    return env


def test_mirrored_strategy_on_two_logical_cpus_matches_one_device(image_sets: dict[str, Path], tmp_path: Path) -> None:
    spec = spec_dict(train=image_sets["train"], validation=image_sets["val"], output=tmp_path / "unused",
                     head_epochs=2, fine_epochs=1, batch_size=16)
    spec["model"]["head"]["dropout"] = 0.0  # dropout masks are drawn per replica: not comparable
    proc = subprocess.run([sys.executable, "-c", _MIRRORED, json.dumps(spec), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=_env(), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert (result["one"]["replicas"], result["mirrored"]["replicas"]) == ([1], [2])
    one, mirrored = result["one"]["history"], result["mirrored"]["history"]
    assert [(r["stage"], r["epoch"]) for r in one] == [("head", 1), ("head", 2), ("fine-tune", 1)]
    assert [(r["stage"], r["epoch"]) for r in mirrored] == [(r["stage"], r["epoch"]) for r in one]
    worst = max(abs(b[k] - a[k]) / abs(a[k]) for a, b in zip(one, mirrored, strict=True) for k in ("loss", "val_loss"))
    print(f"mirrored vs one device: worst relative loss difference {worst:.2e}; val accuracy "
          f"{result['mirrored']['val_accuracy']:.4f} vs {result['one']['val_accuracy']:.4f}")
    for a, b in zip(one, mirrored, strict=True):
        for key in ("loss", "val_loss"):
            assert b[key] == pytest.approx(a[key], rel=LOSS_TOLERANCE), (key, one, mirrored)
    assert abs(result["one"]["val_accuracy"] - result["mirrored"]["val_accuracy"]) * 100 <= ACCURACY_POINTS


def _command() -> list[str]:
    script = Path(sys.executable).with_name("finetune-train")
    return [str(script)] if script.exists() else [sys.executable, "-m", "finetune_trainer"]


def _config(path: Path, spec: dict[str, Any], *, workers: int) -> Path:
    path.write_text(json.dumps({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "t"},
                                "spec": {**spec, "runtime": {"gpus": 0, "workers": workers}}}))
    return path


@pytest.fixture(scope="module")
def larger_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Enough validation images (3 x 30) that 2 accuracy points are about 2 images."""
    root = tmp_path_factory.mktemp("mw-images")
    return {"train": write_image_folder(root / "train", per_class=32, seed=11),
            "val": write_image_folder(root / "val", per_class=30, seed=12)}


def test_two_workers_train_together_and_only_the_chief_writes(larger_sets: dict[str, Path], tmp_path: Path) -> None:
    # Phase 1 trains the head on features extracted once (cheap per epoch), long enough that the
    # random-weight base's features separate the classes; phase 2 is one epoch.
    spec = spec_dict(train=larger_sets["train"], validation=larger_sets["val"], output=tmp_path / "out",
                     base="VGG16", head_epochs=HEAD_EPOCHS, fine_epochs=1, batch_size=16, head_lr=0.01,
                     units=(64,), patience=HEAD_EPOCHS)
    hosts = ",".join(f"127.0.0.1:{port}" for port in free_ports(2))
    config = _config(tmp_path / "job.json", spec, workers=2)
    procs: list[subprocess.Popen[str]] = []
    terminations = [tmp_path / f"termination-{i}.json" for i in range(2)]
    for index in range(2):
        env = {**_env(), distribute.ENV_WORKER_HOSTS: hosts, distribute.ENV_WORKER_INDEX: str(index),
               "FINETUNE_TERMINATION_LOG": str(terminations[index])}
        procs.append(subprocess.Popen([*_command(), "--config", str(config)], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, env=env))
    # The one-worker reference runs while the pair trains (same spec, seed and global batch).
    single_config = _config(tmp_path / "single.json", {**spec, "output": {"path": str(tmp_path / "single")}}, workers=1)
    single = subprocess.run([*_command(), "--config", str(single_config)], capture_output=True, text=True,
                            timeout=600, env={**_env(), "FINETUNE_TERMINATION_LOG": str(tmp_path / "single.json.t")},
                            check=False)
    logs: list[str] = []
    deadline = time.monotonic() + 600
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
    assert single.returncode == 0, single.stderr[-3000:]
    for index, proc in enumerate(procs):
        assert proc.returncode == 0, f"worker {index}:\n{logs[index][-4000:]}"
    summaries = [json.loads(t.read_text()) for t in terminations]
    out = tmp_path / "out"
    # Both workers trained every epoch of both phases, in step (MultiWorkerMirroredStrategy).
    for index, log in enumerate(logs):
        assert "MultiWorkerMirroredStrategy" in log or "replicas in sync" in log, log[-2000:]
        epochs = re.findall(r"^\s*\d+/\d+ - .*\bloss: .*val_loss", log, flags=re.MULTILINE)
        assert len(epochs) == HEAD_EPOCHS + 1, f"worker {index} did not train every epoch:\n{log[-3000:]}"
    # Only the chief wrote the outputs; the other worker's went to scratch space, since removed.
    assert summaries[0]["modelPath"] == str(out / "model.keras") and (out / "model.keras").is_file()
    worker_model = Path(summaries[1]["modelPath"])
    assert not worker_model.is_relative_to(out) and "finetune-worker-1-" in str(worker_model)
    assert not worker_model.parent.exists()
    history = (out / "history.csv").read_text().splitlines()
    assert [line.split(",")[:2] for line in history[1:]] == [
        *(["head", str(e)] for e in range(1, HEAD_EPOCHS + 1)), ["fine-tune", "1"]
    ]
    metrics = json.loads((out / "metrics.json").read_text())
    reference = json.loads((tmp_path / "single" / "metrics.json").read_text())
    two, one = metrics["final"]["val_accuracy"], reference["final"]["val_accuracy"]
    assert one > 0.5, f"the reference run learned nothing (val accuracy {one}): the comparison means nothing"
    print(f"2 workers vs 1: val accuracy {two:.4f} vs {one:.4f} on {metrics['images']['validation']} images")
    assert abs(two - one) * 100 <= ACCURACY_POINTS, (two, one)
