"""A stage's epoch checkpoint, written in the background: Keras' BackupAndRestore off the critical path.

`make_checkpoint` returns an EpochCheckpoint, a Keras callback that does what
`BackupAndRestore(backup_dir, double_checkpoint=True, delete_checkpoint=False)` does, with the
disk writes moved out of the training loop:

- At each epoch end it copies the model's weights and the optimizer's variables to numpy on the
  main thread (a few milliseconds) and hands them to one writer thread, which writes them with
  the epoch into `checkpoint.npz` while the next epoch trains. At most one epoch's save is in
  flight: a save waits for the previous one, and re-raises its error.
- Writes are atomic: the arrays go to a temporary file (fsynced), the current checkpoint is
  hard-linked to `checkpoint.prev.npz`, and the new one is renamed over `checkpoint.npz`. A
  crash at any point leaves a whole checkpoint; one that is unreadable afterwards (a torn disk,
  a truncated copy) is skipped for the previous one, as double_checkpoint does.
- `defer(write)` queues a companion write (the EarlyStopping/ReduceLROnPlateau state) to run
  after this epoch's weights are on disk, and only if they got there: a companion file for
  epoch N is never on disk while the weights are older than N.
- At train begin it restores the newest readable checkpoint and resumes at its epoch (the
  model's `_initial_epoch`, as BackupAndRestore sets it); unlike BackupAndRestore it also clears
  that mark when there is nothing to resume and at train end, so that a later `fit` of the same
  model (the next stage) is not started at an earlier stage's epoch.
- `flush()` waits for the queued writes and re-raises a write error; `close()` does the same
  and stops the thread. `on_train_end` flushes; whoever runs `fit` must call `close()` when it
  unwinds (an error, a termination), before anything reads the files or removes the folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CHECKPOINT_FILE", "PREVIOUS_FILE", "CheckpointMismatchError", "make_checkpoint", "read_checkpoint", "saved_epoch"]

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.npz"
PREVIOUS_FILE = "checkpoint.prev.npz"
FORMAT_VERSION = 1
_META = "meta"

# What an unreadable checkpoint file raises while it is read (a torn or truncated write).
_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


class CheckpointMismatchError(ValueError):
    """A readable checkpoint that does not fit the model (another architecture or optimizer)."""


def write_checkpoint(*, directory: Path, epoch: int, weights: list[np.ndarray], optimizer: list[np.ndarray]) -> None:
    """Writes one checkpoint atomically; the one it replaces stays as the previous one."""
    directory.mkdir(parents=True, exist_ok=True)
    current, previous = directory / CHECKPOINT_FILE, directory / PREVIOUS_FILE
    tmp = directory / (CHECKPOINT_FILE + ".tmp")
    meta = json.dumps({"version": FORMAT_VERSION, "epoch": epoch, "weights": len(weights), "optimizer": len(optimizer)})
    arrays: dict[str, Any] = {_META: np.array(meta)}
    arrays.update({f"w{i}": a for i, a in enumerate(weights)})
    arrays.update({f"o{i}": a for i, a in enumerate(optimizer)})
    with tmp.open("wb") as fh:
        np.savez(fh, allow_pickle=False, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    if current.exists():
        keep = directory / (PREVIOUS_FILE + ".tmp")
        keep.unlink(missing_ok=True)
        try:
            os.link(current, keep)
        except OSError:  # a file system without hard links
            keep.write_bytes(current.read_bytes())
        os.replace(keep, previous)
    os.replace(tmp, current)
    with contextlib.suppress(OSError):  # the renames themselves durable, where the platform allows
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_checkpoint(path: Path) -> tuple[int, list[np.ndarray], list[np.ndarray]]:
    """(epoch, weights, optimizer variables) of one checkpoint file; raises what an unreadable file raises."""
    with np.load(path, allow_pickle=False) as saved:
        meta = json.loads(str(saved[_META]))
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: checkpoint format {meta.get('version')}, expected {FORMAT_VERSION}")
        weights = [saved[f"w{i}"] for i in range(int(meta["weights"]))]
        optimizer = [saved[f"o{i}"] for i in range(int(meta["optimizer"]))]
        return int(meta["epoch"]), weights, optimizer


def saved_epoch(directory: Path) -> int | None:
    """The epoch count the newest readable checkpoint under `directory` holds (None: none)."""
    for name in (CHECKPOINT_FILE, PREVIOUS_FILE):
        try:
            return read_checkpoint(directory / name)[0]
        except _UNREADABLE:
            continue
    return None


class _Writer:
    """One daemon thread running queued writes in order; after a failure it skips the rest until flushed."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.seconds = 0.0  # time spent writing (in the thread, off the training loop)

    def submit(self, job: Callable[[], None]) -> None:
        if self._thread is None or not self._thread.is_alive():
            # Daemon: an idle writer never keeps the interpreter alive; every path that leaves
            # training joins it first (close), so no write is cut off by the exit.
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()
        self._queue.put(job)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    started = time.monotonic()
                    try:
                        job()
                    except BaseException as exc:  # re-raised on the main thread by flush()
                        self._error = exc
                    self.seconds += time.monotonic() - started
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        """Waits for every queued write; raises the first one's error (once)."""
        self._queue.join()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._thread = None


def _to_numpy(variables: list[Any]) -> list[np.ndarray]:
    # np.array copies: the arrays stay as they are while the next epoch updates the variables.
    return [np.array(v.numpy(), copy=True) for v in variables]


def _make_class() -> type:
    import keras

    class EpochCheckpoint(keras.callbacks.Callback):  # type: ignore[misc]
        """BackupAndRestore's resume semantics with the writes in a background thread (module docstring)."""

        def __init__(self, *, directory: str | Path) -> None:
            super().__init__()
            self.directory = Path(directory)
            self.restored_epoch: int | None = None  # the epoch count train begin resumed at (None: fresh)
            self.snapshot_seconds = 0.0  # main-thread time: copies to numpy and waits for the previous write
            self._writer = _Writer(name=f"checkpoint-{self.directory.name}")

        @property
        def write_seconds(self) -> float:
            """Time the writer thread spent writing (off the training loop)."""
            return self._writer.seconds

        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            if not self.model.built:
                raise ValueError(f"EpochCheckpoint: the model {self.model.name} must be built before fit()")
            self.restored_epoch = None
            self.model._initial_epoch = None  # a mark an earlier fit of this model left stays no longer
            loaded = self._load()
            if loaded is None:
                return
            epoch, weights, optimizer = loaded
            self._restore(weights=weights, optimizer=optimizer)
            self.model._initial_epoch = epoch  # what fit starts from (BackupAndRestore's mechanism)
            self.restored_epoch = epoch
            log.info("resumed from %s at epoch %d", self.directory, epoch)

        def _load(self) -> tuple[int, list[np.ndarray], list[np.ndarray]] | None:
            current, previous = self.directory / CHECKPOINT_FILE, self.directory / PREVIOUS_FILE
            if not current.exists() and not previous.exists():
                return None
            try:
                return read_checkpoint(current)
            except _UNREADABLE as exc:
                if not previous.exists():
                    raise
                log.warning("checkpoint %s unreadable (%s); resuming from the previous one", current, exc)
            loaded = read_checkpoint(previous)  # unreadable too: raised, as BackupAndRestore does
            current.unlink(missing_ok=True)  # the next save must not keep the broken file as "previous"
            return loaded

        def _restore(self, *, weights: list[np.ndarray], optimizer: list[np.ndarray]) -> None:
            variables = list(self.model.weights)
            self._check(what="weights", variables=variables, arrays=weights)
            opt = self.model.optimizer
            if opt is not None and optimizer:
                if not opt.built:
                    opt.build(self.model.trainable_variables)  # its variables exist before they are set
                self._check(what="optimizer variables", variables=list(opt.variables), arrays=optimizer)
            for variable, array in zip(variables, weights, strict=True):
                variable.assign(array)
            if opt is not None and optimizer:
                for variable, array in zip(opt.variables, optimizer, strict=True):
                    variable.assign(array)

        def _check(self, *, what: str, variables: list[Any], arrays: list[np.ndarray]) -> None:
            shapes = [tuple(v.shape) for v in variables]
            saved = [tuple(a.shape) for a in arrays]
            if shapes != saved:
                raise CheckpointMismatchError(
                    f"checkpoint in {self.directory} does not fit the model: {len(saved)} {what} saved "
                    f"against {len(shapes)} in the model, or other shapes"
                )

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            started = time.monotonic()
            self._writer.flush()  # at most one epoch in flight; an earlier write's error surfaces here
            weights = _to_numpy(list(self.model.weights))
            opt = self.model.optimizer
            optimizer = _to_numpy(list(opt.variables)) if opt is not None else []
            directory, done = self.directory, epoch + 1
            self._writer.submit(
                lambda: write_checkpoint(directory=directory, epoch=done, weights=weights, optimizer=optimizer)
            )
            self.snapshot_seconds += time.monotonic() - started

        def defer(self, write: Callable[[], None]) -> None:
            """Runs `write` in the writer after the epoch's checkpoint, only if that reached the disk."""
            self._writer.submit(write)

        def flush(self) -> None:
            """Waits for the queued writes; re-raises a write error."""
            self._writer.flush()

        def close(self) -> None:
            """flush(), then stops the writer thread (a later save starts a new one)."""
            try:
                self._writer.flush()
            finally:
                self._writer.stop()

        def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
            self.model._initial_epoch = None
            self.flush()

    return EpochCheckpoint


_CLASS: type | None = None


def make_checkpoint(*, directory: str | Path) -> Any:
    """An EpochCheckpoint callback (its class is made on first use: importing this module imports no Keras)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _make_class()
    return _CLASS(directory=directory)
