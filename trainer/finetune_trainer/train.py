"""The training stages' callbacks and loop, resume after a lost pod, and the outputs.

Phase 1 ("head") trains the new head on the frozen base; phase 2 ("fine-tune") unfreezes the
base's last layers (BatchNorm excepted), recompiles at a low learning rate and trains on.
Each phase uses EarlyStopping, ReduceLROnPlateau, a NaN guard (TerminateOnNaN, turned into
exit 4), an epoch checkpoint under `checkpoints/<stage>/` (checkpoint.py: BackupAndRestore's
resume, written by a background thread while the next epoch trains), TensorBoard and an adapter
that feeds the `TrainingObserver`s and writes `history.csv` as it goes.

Resume: `checkpoints/state.json` records the spec's fingerprint, the finished stages (their
final weights beside it) and the history so far; a rerun skips finished stages and
the epoch checkpoint continues the unfinished one at the epoch it had reached. EarlyStopping's and
ReduceLROnPlateau's counters, best values and the learning rate are saved each epoch beside the
backup (`checkpoints/<stage>/callbacks.json`, the best weights in `early-stopping-best.npz`,
written by the checkpoint's writer after that epoch's weights, never before them) and
put back before the resumed epoch starts, so a resumed stage stops and restores where an
uninterrupted one would.

Stages (stages.py): `_run` plans the stages and runs each the same way: set what trains,
plan its inputs, fit, finish; a stage finished in an earlier run is restored instead.
Fast paths (the same layers and the same math, only less repeated work): whatever the frozen
part of the network below a stage's first trainable layer computes from images that never
change is computed once (stages.plan_inputs).
- Phase 1: the base and its pooling are frozen. Without augmentation the pooled features of
  every image are extracted once and the head's own layers train on them, so the full model
  holds the trained head; with augmentation training images change every epoch, validation
  images do not, so validation runs the head on cached features.
- Phase 2: the base is cut just below its first unfrozen layer (model.split_below_trainable);
  the frozen prefix's output is cached for validation, and without augmentation for training
  too, as far as the cache budget allows.

Termination (SIGTERM: suspend, preemption, node drain): `terminate()` is what the signal
handler calls. It raises `Terminated`, a BaseException, so that no `except Exception` on the
way (observer fan-outs, Keras callbacks) can swallow it, at once, unless training is inside
an epoch's end or a stage's end (history, the epoch checkpoint, the callbacks' state, the final
weights), where it is held until that state is saved consistently; a termination or error that
unwinds a stage first waits for the checkpoint's writes in flight. The epoch in progress is
lost; every finished epoch is on disk, so a rerun repeats at most one epoch.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from finetune_contract.protocol import STAGES, Stage
from finetune_contract.spec import TrainerSpec

from finetune_trainer import checkpoint as checkpoint_lib
from finetune_trainer import data as data_lib
from finetune_trainer import distribute as distribute_lib
from finetune_trainer import evaluation as evaluation_lib
from finetune_trainer import export as export_lib
from finetune_trainer import features as features_lib
from finetune_trainer import model as model_lib
from finetune_trainer import stages as stages_lib
from finetune_trainer.errors import DivergedError, InvalidSpecError
from finetune_trainer.observer import TrainingObserver

__all__ = ["HISTORY_FIELDS", "RunResult", "Terminated", "cpu_has_bf16", "resolve_policy", "run", "shielded", "terminate"]

log = logging.getLogger(__name__)

HISTORY_FIELDS = ("stage", "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds")
STATE_VERSION = 1
_SLOW_OBSERVER_S = 1.0


class Terminated(BaseException):
    """A termination signal arrived; not an Exception, so no `except Exception` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


class _Shield:
    """Holds a termination back while the state of a finished epoch or stage is being saved."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None

    def enter(self) -> None:
        self.depth += 1

    def exit(self) -> None:
        self.depth = max(0, self.depth - 1)
        if self.depth == 0 and self.pending is not None:
            signum, self.pending = self.pending, None
            raise Terminated(signum)

    def reset(self) -> None:
        """Leaves every section (after an error inside one); a held termination stays pending."""
        self.depth = 0


_SHIELD = _Shield()


def terminate(signum: int) -> None:
    """Called by the signal handler (main thread): raises Terminated now, or when the saving ends."""
    if _SHIELD.depth > 0:
        if _SHIELD.pending is None:
            log.info("%s: finishing the epoch's checkpoint first", signal.Signals(signum).name)
        _SHIELD.pending = signum
        return
    raise Terminated(signum)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """A section whose writes a termination must not cut in half (it is raised at the end)."""
    _SHIELD.enter()
    ok = False
    try:
        yield
        ok = True
    finally:
        if ok:
            _SHIELD.exit()
        else:
            _SHIELD.depth = max(0, _SHIELD.depth - 1)


@dataclass(frozen=True)
class RunResult:
    """What a successful run produced."""

    output_dir: Path
    model_path: Path
    metrics: dict[str, float]  # final metrics (for the termination message)
    summary: dict[str, Any]  # the content of metrics.json


def resolve_policy(setting: str) -> str:
    """The Keras dtype policy for spec.training.mixedPrecision: auto is mixed_float16 on a GPU only.

    On a CPU auto stays float32 even where bfloat16 is native (avx512_bf16, amx_bf16):
    mixed_bfloat16 ran VGG16 2.5x faster here but learned measurably worse in `make bench`
    (val accuracy 0.63 against 0.97 in float32 on the same images), so it is only chosen
    explicitly.
    """
    if setting == "off":
        return "float32"
    if setting == "auto":
        import tensorflow as tf

        return "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"
    return setting


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU does bfloat16 arithmetic natively (its flags in /proc/cpuinfo)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags = set(value.split())
            return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return False


def _configure_threads() -> int:
    """TensorFlow's thread pools sized to the CPUs the container may use (not the host's cores)."""
    import tensorflow as tf

    cpus = data_lib.cpu_limit()
    with contextlib.suppress(RuntimeError):  # already initialised (a second run in one process)
        tf.config.threading.set_intra_op_parallelism_threads(cpus)
        tf.config.threading.set_inter_op_parallelism_threads(max(2, cpus))
    return cpus


class _Observers:
    """Fans each hook out to every observer; an observer that raises or dawdles never stops training."""

    def __init__(self, observers: Sequence[TrainingObserver]) -> None:
        self._observers = list(observers)
        self._complained: set[tuple[int, str]] = set()

    def call(self, hook: str, **kwargs: Any) -> None:
        for index, observer in enumerate(self._observers):
            started = time.monotonic()
            try:
                getattr(observer, hook)(**kwargs)
            except Exception:
                if (index, hook) not in self._complained:
                    self._complained.add((index, hook))
                    log.warning("observer %s.%s failed (ignored)", type(observer).__name__, hook, exc_info=True)
            elapsed = time.monotonic() - started
            if elapsed > _SLOW_OBSERVER_S and (index, "slow") not in self._complained:
                self._complained.add((index, "slow"))
                log.warning("observer %s.%s took %.1fs", type(observer).__name__, hook, elapsed)


@dataclass
class _State:
    """The resume state in checkpoints/state.json."""

    path: Path
    fingerprint: str
    completed: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, *, path: Path, fingerprint: str) -> tuple[_State, bool]:
        """The saved state when it belongs to this spec (and True), else a fresh one."""
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return cls(path=path, fingerprint=fingerprint), False
        if saved.get("version") != STATE_VERSION or saved.get("fingerprint") != fingerprint:
            return cls(path=path, fingerprint=fingerprint), False
        return cls(
            path=path,
            fingerprint=fingerprint,
            completed=dict(saved.get("completed", {})),
            history=list(saved.get("history", [])),
        ), True

    def save(self) -> None:
        _write_json(
            self.path,
            {
                "version": STATE_VERSION,
                "fingerprint": self.fingerprint,
                "completed": self.completed,
                "history": self.history,
            },
        )


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_history(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    os.replace(tmp, path)


def _fingerprint(spec: TrainerSpec) -> str:
    body = spec.model_dump(mode="json", exclude={"output"})
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@dataclass
class _Run:
    """Everything the phases share."""

    spec: TrainerSpec
    out: Path
    observers: _Observers
    state: _State
    verbose: int | str
    total_epochs: int
    n_train: int
    best_val_accuracy: float | None = None

    def record(self, row: dict[str, Any]) -> None:
        self.state.history.append(row)
        acc = _finite(row.get("val_accuracy"))
        if acc is not None and (self.best_val_accuracy is None or acc > self.best_val_accuracy):
            self.best_val_accuracy = acc
        self.state.save()
        _write_history(self.out / "history.csv", self.state.history)

    def trim(self, *, stage: str, keep_epochs: int) -> None:
        """Drops rows of `stage` beyond the epoch a restored backup starts from."""
        before = len(self.state.history)
        self.state.history = [
            r for r in self.state.history if r["stage"] != stage or int(r["epoch"]) <= keep_epochs
        ]
        if len(self.state.history) != before:
            self.state.save()
            _write_history(self.out / "history.csv", self.state.history)


def _add_timing(
    summary: dict[str, Any], *, extraction: float, extracted: int, validation_images: int, cpu_started: float
) -> None:
    """A stage's timing in metrics.json: wall and CPU seconds, and images/s of each part.

    `extracted`: images whose frozen features were computed once before training (0: none).
    """
    summary["durationSeconds"] = round(summary["durationSeconds"] + extraction, 3)
    summary["extractionSeconds"] = round(extraction, 3)
    summary["cpuSeconds"] = round(time.process_time() - cpu_started, 3)
    profile = summary.setdefault("profileSeconds", {})
    profile["extraction"] = round(extraction, 3)
    epochs = max(1, int(summary.get("epochsThisRun") or 0))

    def rate(images: int, seconds: float | None) -> float | None:
        return round(images / seconds, 2) if images and seconds else None

    summary["imagesPerSecondByPart"] = {
        "train": summary.get("imagesPerSecond"),
        "validation": rate(validation_images * epochs, profile.get("validation")),
        "extraction": rate(extracted, extraction),
    }


def _make_stage_callback(run: _Run, *, stage: Stage, stage_epochs: int, epochs_before: int, steps: int) -> Any:
    import keras

    class StageCallback(keras.callbacks.Callback):  # type: ignore[misc]
        """Feeds the observers, keeps history.csv, times epochs."""

        def __init__(self) -> None:
            super().__init__()
            self.first_epoch: int | None = None
            self.epoch = 0
            self.epoch_started = 0.0
            self.last_batch = 0.0
            self.train_seconds = 0.0
            self.epochs_this_run = 0

        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            if self.first_epoch is None:
                self.first_epoch = epoch
                run.trim(stage=stage, keep_epochs=epoch)
            self.epoch = epoch
            self.epoch_started = self.last_batch = time.monotonic()

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            now = time.monotonic()
            run.observers.call(
                "on_batch_end",
                stage=stage,
                epoch=self.epoch + 1,
                batch=batch + 1,
                batches=steps,
                batch_seconds=now - self.last_batch,
            )
            self.last_batch = now

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            logs = dict(logs or {})
            seconds = time.monotonic() - self.epoch_started
            train_seconds = max(self.last_batch - self.epoch_started, 1e-9)
            self.train_seconds += train_seconds
            self.epochs_this_run += 1
            lr = _finite(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            metrics = {k: v for k in ("loss", "accuracy", "val_loss", "val_accuracy") if (v := _finite(logs.get(k))) is not None}
            if lr is not None:
                metrics["learning_rate"] = lr
            run.record({"stage": stage, "epoch": epoch + 1, **metrics, "seconds": round(seconds, 4)})
            run.observers.call(
                "on_epoch_end",
                stage=stage,
                epoch=epoch + 1,
                stage_epochs=stage_epochs,
                epochs_done=min(epochs_before + epoch + 1, run.total_epochs),
                total_epochs=run.total_epochs,
                metrics=metrics,
                best_val_accuracy=run.best_val_accuracy,
                images_per_second=run.n_train / train_seconds,
                epoch_seconds=seconds,
            )

    return StageCallback()


@dataclass
class _Clock:
    """Wall seconds of an epoch's end, per part: the ticks between the epoch-end callbacks."""

    progress: Any  # the StageCallback: when the epoch's last training batch ended
    seconds: dict[str, float] = field(default_factory=dict)
    mark: float = 0.0


PROFILE_PARTS = ("validation", "callbacks", "checkpoint", "tensorboard")


def _make_tick(clock: _Clock, *, part: str | None) -> Any:
    """Charges the time since the previous tick to `part` (None: the first tick, the epoch-end start).

    The first tick charges what fit did between the last training batch and the epoch-end
    callbacks (its own validation pass) to "validation".
    """
    import keras

    class Tick(keras.callbacks.Callback):  # type: ignore[misc]
        """Times the callbacks before it, back to the previous tick."""

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            now = time.monotonic()
            if part is None:
                spent, name = now - clock.progress.last_batch, "validation"
            else:
                spent, name = now - clock.mark, part
            clock.seconds[name] = clock.seconds.get(name, 0.0) + max(0.0, spent)
            clock.mark = now

    return Tick()


def _make_shield_callback(*, begin: bool) -> Any:
    """Opens (begin) or closes the shielded section around the epoch-end callbacks."""
    import keras

    class EpochEndShield(keras.callbacks.Callback):  # type: ignore[misc]
        """A termination during the epoch-end saves waits for the last of them."""

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            if begin:
                _SHIELD.enter()
            else:
                _SHIELD.exit()

    return EpochEndShield()


def _make_flush_callback(backup: Any) -> Any:
    """Waits, at an epoch's end, for the previous epoch's checkpoint write before anything else.

    The history row of epoch N+1 is written before its own checkpoint is handed to the writer,
    so a pod lost between the two resumes from epoch N's: only the epoch in progress is
    trained again, as with a checkpoint written on the spot. The write of epoch N still runs
    while epoch N+1 trains; this waits only where it took longer than that epoch.
    """
    import keras

    class CheckpointFlush(keras.callbacks.Callback):  # type: ignore[misc]
        """The previous epoch's weights reach the disk before this epoch's history row."""

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            backup.flush()

    return CheckpointFlush()


def _make_nan_guard() -> Any:
    import keras

    class NaNGuard(keras.callbacks.TerminateOnNaN):  # type: ignore[misc]
        """TerminateOnNaN that remembers where the loss went bad."""

        def __init__(self) -> None:
            super().__init__()
            self.epoch = 0
            self.diverged: tuple[int, int, float] | None = None

        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self.epoch = epoch

        def on_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            loss = (logs or {}).get("loss")
            if loss is not None and self.diverged is None and not math.isfinite(float(loss)):
                self.diverged = (self.epoch + 1, batch + 1, float(loss))
                self.model.stop_training = True

    return NaNGuard()


CALLBACK_STATE_FILE = "callbacks.json"
BEST_WEIGHTS_FILE = "early-stopping-best.npz"


def _make_callback_state(*, directory: Path, early: Any, reduce: Any, writer: Any = None) -> Any:
    """A companion callback that saves and restores EarlyStopping's and ReduceLROnPlateau's state.

    It must come after both callbacks (their `on_train_begin` resets them first) and after the
    epoch checkpoint (so the state it saves belongs to the epoch the backup holds); it puts the
    state back at the first epoch's start, only when that is the epoch the state was saved for.
    `writer`: the epoch checkpoint; the state is taken at the epoch end and written by its
    writer after that epoch's weights (None: written at once).
    """
    import keras

    class CallbackState(keras.callbacks.Callback):  # type: ignore[misc]
        """Persists the stopping/plateau state at each epoch end; restores it on resume."""

        def __init__(self) -> None:
            super().__init__()
            self.saved: dict[str, Any] | None = None
            self.restored_from: int | None = None
            self._first = True
            self._best_epoch_saved: int | None = None

        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            self._first = True
            try:
                self.saved = json.loads((directory / CALLBACK_STATE_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self.saved = None

        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            if not self._first:
                return
            self._first = False
            saved, self.saved = self.saved, None
            if not saved or epoch == 0:
                return
            if saved.get("epoch") != epoch:
                log.warning("callback state is for epoch %s, the backup resumes at %d: not restored", saved.get("epoch"), epoch)
                return
            best_weights = None
            if saved["early"].get("has_best_weights"):
                try:
                    with np.load(directory / BEST_WEIGHTS_FILE) as stored:
                        best_weights = [stored[f"arr_{i}"] for i in range(len(stored.files))]
                except (OSError, ValueError):
                    log.warning("early-stopping best weights unreadable: not restored")
                    return
            _set_state(early, saved["early"])
            early.best_weights = best_weights
            self._best_epoch_saved = early.best_epoch if best_weights is not None else None
            _set_state(reduce, saved["reduce"])
            if saved.get("learning_rate") is not None:
                self.model.optimizer.learning_rate = saved["learning_rate"]
            self.restored_from = epoch
            log.info("resumed EarlyStopping (wait %d, best %s) and ReduceLROnPlateau (wait %d, best %s)",
                     early.wait, early.best, reduce.wait, reduce.best)

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            has_best = early.best_weights is not None
            best = early.best_weights if has_best and early.best_epoch != self._best_epoch_saved else None
            if best is not None:
                self._best_epoch_saved = early.best_epoch
            state = {
                "epoch": epoch + 1,
                "early": {**_get_state(early, ("wait", "best", "best_epoch", "stopped_epoch")),
                          "has_best_weights": has_best},
                "reduce": _get_state(reduce, ("wait", "best", "cooldown_counter")),
                "learning_rate": _finite(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
            }

            def write() -> None:  # from values taken now (EarlyStopping replaces its list, never mutates it)
                directory.mkdir(parents=True, exist_ok=True)
                if best is not None:
                    tmp = directory / (BEST_WEIGHTS_FILE + ".tmp.npz")
                    np.savez(tmp, *best)
                    os.replace(tmp, directory / BEST_WEIGHTS_FILE)
                _write_json(directory / CALLBACK_STATE_FILE, state)

            if writer is None:
                write()
            else:
                writer.defer(write)

    return CallbackState()


def _get_state(callback: Any, names: Sequence[str]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for name in names:
        value = getattr(callback, name, None)
        state[name] = value if value is None or isinstance(value, int) else float(value)
    return state


def _set_state(callback: Any, state: dict[str, Any]) -> None:
    for name, value in state.items():
        if name != "has_best_weights":
            setattr(callback, name, value)


def _compile(model: Any, *, learning_rate: float) -> None:
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def _fit_stage(run: _Run, *, stage: stages_lib.TrainingStage, inputs: stages_lib.StageInputs, steps: int) -> dict[str, Any]:
    """One stage: compile, fit with its callbacks, check for divergence; returns its summary."""
    import keras

    spec = run.spec.training
    name, epochs, learning_rate = stage.name, stage.epochs, stage.learning_rate
    validation = inputs.validation
    backup_dir = run.out / "checkpoints" / name
    early = keras.callbacks.EarlyStopping(
        monitor="val_loss",
        patience=spec.early_stopping.patience,
        restore_best_weights=spec.early_stopping.restore_best_weights,
        verbose=1,
    )
    reduce = keras.callbacks.ReduceLROnPlateau(
        monitor=spec.reduce_lr_on_plateau.monitor,
        factor=spec.reduce_lr_on_plateau.factor,
        patience=spec.reduce_lr_on_plateau.patience,
        verbose=1,
    )
    nan_guard = _make_nan_guard()
    progress = _make_stage_callback(run, stage=name, stage_epochs=epochs, epochs_before=stage.epochs_before, steps=steps)
    cached = validation if isinstance(validation, features_lib.CachedValidation) else None
    clock = _Clock(progress=progress)
    backup = checkpoint_lib.make_checkpoint(directory=backup_dir)  # the weights written in the background
    callbacks = [
        _make_tick(clock, part=None),
        *([features_lib.make_cached_validation_callback(cached), _make_tick(clock, part="validation")] if cached is not None else []),
        _make_shield_callback(begin=True),  # from here to the end: the epoch's state, saved whole
        _make_flush_callback(backup),  # the previous epoch's checkpoint on disk before this epoch's row
        _make_tick(clock, part="checkpoint"),
        nan_guard,
        early,
        reduce,
        progress,
        _make_tick(clock, part="callbacks"),
        backup,
        _make_callback_state(directory=backup_dir, early=early, reduce=reduce, writer=backup),
        _make_tick(clock, part="checkpoint"),
        keras.callbacks.TensorBoard(
            log_dir=str(run.out / "tensorboard" / name), write_graph=False, profile_batch=0
        ),
        _make_tick(clock, part="tensorboard"),
        _make_shield_callback(begin=False),
    ]
    model = inputs.model
    _compile(model, learning_rate=learning_rate)
    started = time.monotonic()
    try:
        model.fit(
            inputs.train,
            validation_data=None if cached is not None else validation,
            epochs=epochs,
            callbacks=callbacks,
            verbose=run.verbose,
            **inputs.fit_kwargs,
        )
    except BaseException:
        _SHIELD.reset()  # an error inside the epoch-end section must not hold later signals forever
        with shielded():  # the finished epochs' writes complete first (a SIGTERM meanwhile waits)
            try:
                backup.close()
            except Exception:
                log.warning("checkpoint write failed while the stage unwound", exc_info=True)
        raise
    _SHIELD.reset()
    backup.close()  # fit's on_train_end waited for the writes; this stops the writer thread
    duration = time.monotonic() - started
    if nan_guard.diverged is not None:
        shutil.rmtree(backup_dir, ignore_errors=True)  # never resume from NaN weights
        epoch, batch, loss = nan_guard.diverged
        raise DivergedError(
            f"training diverged: loss became {loss} in stage {name}, epoch {epoch}, batch {batch} "
            f"(learning rate {learning_rate:g}); lower {stage.rate_field}"
        )
    rows = [r for r in run.state.history if r["stage"] == name]
    val_accs = [a for r in rows if (a := _finite(r.get("val_accuracy"))) is not None]
    val_losses = [v for r in rows if (v := _finite(r.get("val_loss"))) is not None]
    epochs_run = len(rows)
    first = progress.first_epoch or 0
    return {
        "epochsPlanned": epochs,
        "epochsRun": epochs_run,
        "stoppedEarly": epochs_run < epochs,
        "learningRate": learning_rate,
        "finalLearningRate": _finite(keras.ops.convert_to_numpy(model.optimizer.learning_rate)),
        "bestValAccuracy": max(val_accs) if val_accs else None,
        "bestValLoss": min(val_losses) if val_losses else None,
        "durationSeconds": round(duration, 3),
        "trainSeconds": round(progress.train_seconds, 3),
        "imagesPerSecond": round(run.n_train * progress.epochs_this_run / progress.train_seconds, 2)
        if progress.train_seconds > 0
        else None,
        "resumedFromEpoch": first,
        "epochsThisRun": progress.epochs_this_run,
        "checkpointWriteSeconds": round(backup.write_seconds, 3),  # in the background, beside training
        "profileSeconds": {
            "train": round(progress.train_seconds, 3),
            **{part: round(clock.seconds.get(part, 0.0), 3) for part in PROFILE_PARTS},
        },
    }


def _finish_stage(
    run: _Run, *, stage: stages_lib.TrainingStage, network: model_lib.Network, summary: dict[str, Any]
) -> None:
    """Marks a stage done: its final weights and summary saved, its backup dropped."""
    checkpoints = run.out / "checkpoints"
    with shielded():
        weights = network.model.get_weights()
        tmp = checkpoints / f"{stage.name}-final.tmp.npz"
        np.savez(tmp, *weights)
        os.replace(tmp, checkpoints / f"{stage.name}-final.npz")
        run.state.completed[stage.name] = summary
        run.state.save()
        shutil.rmtree(checkpoints / stage.name, ignore_errors=True)
    run.observers.call(
        "on_stage_end",
        stage=stage.name,
        epochs_run=int(summary["epochsRun"]),
        stopped_early=bool(summary["stoppedEarly"]),
        epochs_done=stage.epochs_through,
        total_epochs=run.total_epochs,
    )


def _restore_stage(*, out: Path, stage: Stage, network: model_lib.Network) -> None:
    with np.load(out / "checkpoints" / f"{stage}-final.npz") as saved:
        network.model.set_weights([saved[f"arr_{i}"] for i in range(len(saved.files))])


def _resume_state(*, out: Path, spec: TrainerSpec) -> _State:
    """The saved state of an earlier run of this spec, or a fresh one with every stale stage file gone."""
    state, resumed = _State.load(path=out / "checkpoints" / "state.json", fingerprint=_fingerprint(spec))
    if resumed:
        log.info("resuming: stages already done: %s", ", ".join(state.completed) or "none")
        return state
    for stale in (*STAGES, *(f"{name}-final.npz" for name in STAGES)):
        target = out / "checkpoints" / stale
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
    state.save()
    return state


def _prepare_output(out: Path) -> None:
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / "tensorboard").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidSpecError(f"spec.output.path: cannot create {out}: {exc.strerror or exc}") from exc


def run(
    *,
    spec: TrainerSpec,
    output_dir: str | Path | None = None,
    observers: Sequence[TrainingObserver] = (),
    verbose: int | str | None = None,
    distribution: distribute_lib.Plan | None = None,
) -> RunResult:
    """Trains both phases as `spec` says and writes every output; raises TrainerError subclasses.

    `distribution`: the workers and devices to train on (distribute.py); None: one device.
    Only the chief sends progress; the other workers write into scratch space.
    """
    hooks = _Observers(observers)
    try:
        _configure_threads()  # before the strategy initialises TensorFlow's devices
        out = Path(output_dir if output_dir is not None else spec.output.path)
        dist = distribute_lib.start(plan=distribution or distribute_lib.Plan(), output_dir=out,
                                    batch_size=spec.training.batch_size)
        hooks = hooks if dist.is_chief else _Observers(())
        with dist.scope():
            result = _run(spec=spec, output_dir=dist.output_dir(out), hooks=hooks, verbose=verbose)
    except BaseException as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hooks.call("on_finish", result="failed", metrics={}, message=message[:1000])
        raise
    hooks.call("on_finish", result="succeeded", metrics=result.metrics, message=f"model saved to {result.model_path}")
    return result


def _run(
    *, spec: TrainerSpec, output_dir: str | Path | None, hooks: _Observers, verbose: int | str | None
) -> RunResult:
    import keras

    started = time.monotonic()
    out = Path(output_dir if output_dir is not None else spec.output.path)
    training = spec.training
    model_lib.application(name=spec.model.base)  # an unknown base fails before any data is read
    cpus = _configure_threads()
    policy = resolve_policy(training.mixed_precision)
    log.info("precision policy %s (mixedPrecision: %s), %d CPUs", policy, training.mixed_precision, cpus)
    distribute_lib.clear_session()  # keeps a strategy's scope
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(training.seed)
    _prepare_output(out)

    image_size = (spec.model.input_shape[0], spec.model.input_shape[1])
    decode_started = time.monotonic()
    splits = data_lib.load_splits(data=spec.data, image_size=image_size, seed=training.seed)
    decode_seconds = time.monotonic() - decode_started
    log.info(
        "classes %s: %d training and %d validation images (%d skipped, %s)",
        list(splits.class_names),
        len(splits.train),
        len(splits.validation),
        len(splits.skipped),
        "in memory" if splits.in_memory else "streamed",
    )
    network = model_lib.build_network(spec=spec.model, num_classes=len(splits.class_names))

    state = _resume_state(out=out, spec=spec)

    run_ctx = _Run(
        spec=spec,
        out=out,
        observers=hooks,
        state=state,
        verbose=verbose if verbose is not None else (1 if sys.stdout.isatty() else 2),
        total_epochs=training.total_epochs,
        n_train=len(splits.train),
    )
    run_ctx.best_val_accuracy = max(
        (acc for row in state.history if (acc := _finite(row.get("val_accuracy"))) is not None), default=None
    )
    _write_history(out / "history.csv", state.history)

    batch = training.batch_size
    augmentation = data_lib.build_augmentation(spec=spec.data.augmentation, seed=training.seed)
    steps = max(1, -(-len(splits.train) // batch))
    budget = data_lib.cache_budget()
    # The final validation predictions: from the last trained stage's cached inputs where it
    # has them (the model that maps them to probabilities), else the full model on images.
    predictor: tuple[Any, np.ndarray] | None = None
    summaries: dict[str, dict[str, Any]] = {}
    for stage in stages_lib.plan_stages(spec=spec):
        if stage.name in state.completed:
            _restore_stage(out=out, stage=stage.name, network=network)
            summaries[stage.name] = {**state.completed[stage.name], "completedInEarlierRun": True}
            predictor = None
            continue
        hooks.call("on_stage_start", stage=stage.name, stage_epochs=stage.epochs, epochs_done=stage.epochs_before,
                   total_epochs=run_ctx.total_epochs)
        cpu_started = time.process_time()
        trainable = stage.prepare(network)
        log.info("%s: training %s", stage.name, ", ".join(trainable) or "no layers with weights")
        inputs = stages_lib.plan_inputs(stage=stage, network=network, splits=splits, augmentation=augmentation,
                                        batch_size=batch, seed=training.seed, budget=budget)
        summary = _fit_stage(run_ctx, stage=stage, inputs=inputs, steps=steps)
        _add_timing(
            summary,
            extraction=inputs.extraction_seconds,
            extracted=inputs.extracted,
            validation_images=len(splits.validation),
            cpu_started=cpu_started,
        )
        summary["fastPath"] = inputs.fast_path
        summary["cachedBelow"] = inputs.cached_below
        summary["trainableLayers"] = trainable
        _finish_stage(run_ctx, stage=stage, network=network, summary=summary)
        summaries[stage.name] = summary
        predictor = inputs.predictor

    return _save_outputs(
        run_ctx,
        network=network,
        splits=splits,
        stages=summaries,
        val=predictor or data_lib.make_dataset(
            images=splits.validation, batch_size=batch, shuffle=False, seed=training.seed
        ),
        policy=policy,
        started=started,
        decode_seconds=decode_seconds,
    )


def _save_outputs(
    run: _Run,
    *,
    network: model_lib.Network,
    splits: data_lib.Splits,
    stages: dict[str, dict[str, Any]],
    val: Any,
    policy: str,
    started: float,
    decode_seconds: float = 0.0,
) -> RunResult:
    """model.keras, saved_model/, classes.json, metrics.json (history.csv is already written)."""
    out = run.out
    model = network.model
    # Evaluated by hand: compiling an untrained-as-a-whole model (the fast paths) would save
    # an empty optimizer into model.keras that warns on every load.
    probs = export_lib.predict_validation(model=model, val=val, batch_size=run.spec.training.batch_size)
    labels = splits.validation.labels
    evaluation = export_lib.validation_metrics(probs=probs, labels=labels)
    model_path = export_lib.write_model(model=model, out=out)
    _write_json(out / "classes.json", list(splits.class_names))

    last = run.state.history[-1] if run.state.history else {}
    final: dict[str, float] = {
        k: v for k in ("loss", "accuracy") if (v := _finite(last.get(k))) is not None
    }
    final["val_loss"] = float(evaluation["loss"])
    final["val_accuracy"] = float(evaluation["accuracy"])
    best = run.best_val_accuracy
    metrics_json: dict[str, Any] = {
        "classes": list(splits.class_names),
        "final": final,
        "best": {"val_accuracy": best},
        "stages": stages,
        "epochsRun": {stage: s["epochsRun"] for stage, s in stages.items()},
        "images": {"train": len(splits.train), "validation": len(splits.validation)},
        "skippedFiles": len(splits.skipped),
        "skipped": [{"path": p, "error": why} for p, why in splits.skipped[:50]],
        "mixedPrecision": policy,
        "mixedPrecisionSetting": run.spec.training.mixed_precision,
        "cpuNativeBfloat16": cpu_has_bf16(),
        "decodeSeconds": round(decode_seconds, 3),
        "decodeImagesPerSecond": round((len(splits.train) + len(splits.validation)) / decode_seconds, 2)
        if decode_seconds > 0
        else None,
        "cpus": data_lib.cpu_limit(),
        "durationSeconds": round(time.monotonic() - started, 3),
        "modelPath": str(model_path),
    }
    metrics_json.update(evaluation_lib.evaluate_and_report(  # report.html; never raises
        out=out, y_true=labels, y_pred=probs.argmax(axis=1), class_names=splits.class_names,
        history=run.state.history, metrics=metrics_json, spec=run.spec.model_dump(mode="json", by_alias=True)))
    _write_json(out / "metrics.json", metrics_json)
    summary_metrics = dict(final)
    if best is not None:
        summary_metrics["best_val_accuracy"] = best
    log.info("saved %s (val_accuracy %.4f)", model_path, final["val_accuracy"])
    return RunResult(output_dir=out, model_path=model_path, metrics=summary_metrics, summary=metrics_json)

