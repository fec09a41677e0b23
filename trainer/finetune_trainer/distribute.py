"""Distributed training: which tf.distribute strategy a run trains under, and who is the chief.

The spec's `runtime` (read from the same manifest file, operator-only keys the trainer reads
only to choose a strategy) and the pod's environment decide:

- `runtime.workers > 1`: `tf.distribute.MultiWorkerMirroredStrategy`. Each worker reads its
  index from `FINETUNE_WORKER_INDEX` (falling back to `JOB_COMPLETION_INDEX`, which an Indexed
  Job sets, also inside a JobSet whose one replicated Job runs the workers as its completion
  indexes; JobSet's `JOBSET_JOB_INDEX` is the Job's index, not the pod's) and the workers' `host:port` addresses, in index order, from `FINETUNE_WORKER_HOSTS`
  (comma-separated). `TF_CONFIG` is built from them (`build_tf_config`) and set before the
  strategy starts. Every worker uses all the GPUs its pod sees (none: its CPU).
- one worker and `runtime.gpus > 1` with more than one GPU visible:
  `tf.distribute.MirroredStrategy` over the first `runtime.gpus` visible GPUs.
- otherwise (one GPU, or a CPU): no strategy, today's path (Keras' default strategy).

`training.batchSize` is the global batch: the images of one optimizer step over all replicas
(workers x devices), as Keras' distributed-training guide passes it to `fit` and as a TFJob
user computes `GLOBAL_BATCH_SIZE`; each replica gets `batchSize / replicas`. So the same spec
takes the same number of steps per epoch, and the same learning rate applies, whatever the
replica count; learning rates are never scaled. A batch smaller than the replica count is
refused (InvalidSpec).

Worker 0 is the chief: it writes the outputs (model, metrics, history, report, checkpoints)
and sends progress. The others write to a scratch directory (a temp dir, removed at exit),
after copying the chief's `checkpoints/` from the output volume into it, so every worker
resumes from the same state.json, stage weights and epoch checkpoint; a barrier (a
collective every worker joins) holds the chief back until every copy is taken. The output
volume must therefore be shared by all workers (a ReadWriteMany volume): a worker that sees no
chief checkpoints on a resumed group would start over while the chief resumes, and the group
would stall.

Everything else runs unchanged inside the strategy's scope: both phases (phase 2 recompiles
inside it), the feature caches (every worker computes the same full cache from the same images:
called directly, or by `predict`, which under MultiWorkerMirroredStrategy gathers every
worker's shard back in order), resume, the epoch
callbacks (their metrics are reduced over the replicas, so every worker makes the same early
stopping decision) and exit codes.

Importing this module is cheap: TensorFlow is imported only by `start`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from finetune_contract.protocol import ENV_WORKER_HOSTS, ENV_WORKER_INDEX

from finetune_trainer.errors import InvalidSpecError

__all__ = [
    "ENV_WORKER_HOSTS",
    "ENV_WORKER_INDEX",
    "Context",
    "Plan",
    "build_tf_config",
    "clear_session",
    "plan",
    "start",
]

log = logging.getLogger(__name__)

INDEX_FALLBACKS = ("JOB_COMPLETION_INDEX",)  # an Indexed Job's own env var
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?):([0-9]{1,5})$")

Kind = Literal["default", "mirrored", "multi-worker"]


def build_tf_config(*, hosts: Sequence[str], index: int) -> dict[str, Any]:
    """TF_CONFIG of worker `index` in a cluster of `hosts` (host:port each, index order)."""
    if not hosts:
        raise ValueError("at least one worker host is needed")
    for host in hosts:
        match = _HOST_PORT.match(host)
        if match is None or not 0 < int(match.group(3)) < 65536:
            raise ValueError(f"worker address {host!r} is not host:port")
    if len(set(hosts)) != len(hosts):
        raise ValueError("worker addresses repeat")
    if not 0 <= index < len(hosts):
        raise ValueError(f"worker index {index} is not in 0..{len(hosts) - 1}")
    return {"cluster": {"worker": list(hosts)}, "task": {"type": "worker", "index": index}}


@dataclass(frozen=True)
class Plan:
    """How one process trains: its workers and its share of devices (no TensorFlow needed)."""

    workers: int = 1
    index: int = 0
    hosts: tuple[str, ...] = ()
    gpus: int = 1  # runtime.gpus: the GPUs of this worker to use (0: the CPU)
    devices: tuple[str, ...] | None = None  # explicit devices for MirroredStrategy (tests: logical CPUs)

    @property
    def is_chief(self) -> bool:
        """Worker 0 writes the outputs and sends progress."""
        return self.index == 0


def _int_of(value: Any, *, name: str, default: int, minimum: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidSpecError(f"spec.runtime.{name}: must be an integer >= {minimum}, got {value!r}")
    return value


def plan(*, runtime: Mapping[str, Any] | None, env: Mapping[str, str]) -> Plan:
    """The plan for the spec's `runtime` (gpus, workers) and this pod's environment."""
    runtime = runtime or {}
    workers = _int_of(runtime.get("workers"), name="workers", default=1, minimum=1)
    gpus = _int_of(runtime.get("gpus"), name="gpus", default=1, minimum=0)
    if workers == 1:
        return Plan(gpus=gpus)
    raw_hosts = env.get(ENV_WORKER_HOSTS, "")
    hosts = tuple(h.strip() for h in raw_hosts.split(",") if h.strip())
    if len(hosts) != workers:
        raise InvalidSpecError(
            f"spec.runtime.workers is {workers} but ${ENV_WORKER_HOSTS} names {len(hosts)} workers ({raw_hosts!r})"
        )
    raw_index = next((env[k] for k in (ENV_WORKER_INDEX, *INDEX_FALLBACKS) if env.get(k, "").strip()), None)
    if raw_index is None or not raw_index.strip().isdigit():
        raise InvalidSpecError(f"multi-worker training needs this worker's index in ${ENV_WORKER_INDEX}, got {raw_index!r}")
    index = int(raw_index)
    try:
        build_tf_config(hosts=hosts, index=index)
    except ValueError as exc:
        raise InvalidSpecError(f"${ENV_WORKER_HOSTS}/${ENV_WORKER_INDEX}: {exc}") from exc
    return Plan(workers=workers, index=index, hosts=hosts, gpus=gpus)


@dataclass
class Context:
    """A started plan: its strategy, and where this worker writes."""

    plan: Plan
    kind: Kind
    strategy: Any  # tf.distribute.Strategy; None or the default strategy for "default"
    replicas: int
    scratch: Path | None = None
    _scope: Any = field(default=None, repr=False)

    @property
    def is_chief(self) -> bool:
        """Whether this process writes the outputs and sends progress."""
        return self.plan.is_chief

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """The strategy's scope (nothing for the default path): build and compile models inside it.

        Inside it, clear Keras' session with `clear_session()` of this module, never
        keras.backend.clear_session() itself: that replaces the graph the scope lives in.
        """
        global _ACTIVE
        if self.kind == "default":
            yield
            return
        previous, _ACTIVE = _ACTIVE, self
        self._enter()
        try:
            yield
        finally:
            self._exit()
            _ACTIVE = previous

    def _enter(self) -> None:
        self._scope = self.strategy.scope()
        self._scope.__enter__()

    def _exit(self) -> None:
        scope, self._scope = self._scope, None
        if scope is not None:
            scope.__exit__(None, None, None)

    def output_dir(self, out: Path) -> Path:
        """Where this worker writes: `out` for the chief, the scratch dir (see `start`) for the others."""
        return out if self.scratch is None else self.scratch

    def describe(self) -> dict[str, Any]:
        """The distribution, for metrics.json."""
        return {
            "strategy": {"default": None, "mirrored": "MirroredStrategy", "multi-worker": "MultiWorkerMirroredStrategy"}[
                self.kind
            ],
            "workers": self.plan.workers,
            "replicas": self.replicas,
        }


def _multi_worker_strategy() -> Any:
    """MultiWorkerMirroredStrategy whose `reduce` also takes nested structures.

    Two gaps of Keras 3's TensorFlow trainer under CollectiveAllReduceStrategy, closed here:
    - it reduces a whole (x, y, sample_weight) batch with one `strategy.reduce` call before
      the first step (`_maybe_symbolic_build`), which MirroredStrategy maps over the structure
      and this strategy does not ("Attempt to convert a value (PerReplica...)"): each leaf
      is reduced, the same all-reduce per tensor;
    - it means scalar metrics with `axis=0` (`reduce_per_replica`), which fails on a rank-0
      tensor ("Invalid reduction dimension 0"): for scalars `axis=None` is the same mean.
    """
    import tensorflow as tf

    def scalars(value: Any) -> bool:  # a tensor, or per-replica tensors (one local device: a tensor)
        parts = value.values if isinstance(value, tf.distribute.DistributedValues) else (value,)
        return bool(parts) and all(getattr(getattr(v, "shape", None), "rank", None) == 0 for v in parts)

    class Strategy(tf.distribute.MultiWorkerMirroredStrategy):  # type: ignore[misc]
        def reduce(self, reduce_op: Any, value: Any, axis: Any) -> Any:
            if isinstance(value, (tuple, list, dict)):
                return tf.nest.map_structure(lambda leaf: self.reduce(reduce_op, leaf, axis), value)
            if axis is not None and scalars(value):
                axis = None
            return super().reduce(reduce_op, value, axis)

    return Strategy()


_ACTIVE: Context | None = None  # the context whose scope is entered (Context.scope)


def clear_session() -> None:
    """keras.backend.clear_session(), keeping the active strategy's scope (left, cleared, entered again)."""
    import keras

    active = _ACTIVE
    if active is None:
        keras.backend.clear_session()
        return
    active._exit()
    try:
        keras.backend.clear_session()
    finally:
        active._enter()


def _local_gpus() -> list[str]:
    import tensorflow as tf

    return [device.name for device in tf.config.list_logical_devices("GPU")]


def _copy_checkpoints(*, source: Path, target: Path) -> None:
    """The chief's checkpoints/ on the shared volume, copied into this worker's scratch dir."""
    src = source / "checkpoints"
    if src.is_dir():
        shutil.copytree(src, target / "checkpoints", dirs_exist_ok=True)
        log.info("worker: resuming from the chief's checkpoints in %s", src)


def _barrier(strategy: Any) -> None:
    """Returns once every worker has reached it (an all-reduce of one number)."""
    import tensorflow as tf

    total = strategy.reduce(
        tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(1.0)), axis=None
    )
    log.info("all %d replicas reached the start barrier", int(total))


def start(*, plan: Plan, output_dir: Path, batch_size: int) -> Context:
    """Creates the plan's strategy (sets TF_CONFIG for several workers); non-chiefs get a scratch dir.

    Call it before anything else touches TensorFlow's devices (after the thread pools are
    sized) and before the chief writes into `output_dir`.
    """
    if plan.workers > 1:
        import tensorflow as tf

        os.environ["TF_CONFIG"] = json.dumps(build_tf_config(hosts=plan.hosts, index=plan.index))
        strategy = _multi_worker_strategy()
        context = Context(plan=plan, kind="multi-worker", strategy=strategy, replicas=strategy.num_replicas_in_sync)
        if not plan.is_chief:
            scratch = Path(tempfile.mkdtemp(prefix=f"finetune-worker-{plan.index}-"))
            atexit.register(shutil.rmtree, scratch, True)
            _copy_checkpoints(source=output_dir, target=scratch)
            context.scratch = scratch
        _barrier(strategy)
        log.info("worker %d of %d (%s), %d replicas in sync", plan.index, plan.workers,
                 "chief" if plan.is_chief else "scratch " + str(context.scratch), context.replicas)
    elif plan.devices is None and plan.gpus <= 1:
        # One device: today's path, and TensorFlow's devices stay untouched (thread pools can still be sized).
        context = Context(plan=plan, kind="default", strategy=None, replicas=1)
    else:
        devices = list(plan.devices) if plan.devices is not None else _local_gpus()[: plan.gpus]
        if plan.devices is None and plan.gpus > len(devices):
            log.warning("spec.runtime.gpus is %d but %d GPUs are visible: using %d", plan.gpus, len(devices), len(devices))
        if len(devices) > 1:
            import tensorflow as tf

            strategy = tf.distribute.MirroredStrategy(devices=devices)
            context = Context(plan=plan, kind="mirrored", strategy=strategy, replicas=strategy.num_replicas_in_sync)
            log.info("MirroredStrategy over %s", ", ".join(devices))
        else:
            import tensorflow as tf

            context = Context(plan=plan, kind="default", strategy=tf.distribute.get_strategy(), replicas=1)
    if batch_size < context.replicas:
        raise InvalidSpecError(
            f"spec.training.batchSize: {batch_size} is the global batch and must be at least the "
            f"{context.replicas} replicas it is split over"
        )
    return context
