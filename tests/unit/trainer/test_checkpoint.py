"""The background epoch checkpoint: resumes as BackupAndRestore does, surfaces write errors, survives torn writes.

Tiny Dense models, full determinism (no dropout, no shuffling), a handful of epochs: an
interrupted fit resumed from the files must end with the weights of an uninterrupted one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from finetune_trainer import checkpoint

EPOCHS = 5


class _Interrupted(Exception):
    """Stands in for a lost pod between two epochs."""


class _Crash(BaseException):
    """The process dying in the middle of a write."""


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(48, 6)).astype(np.float32), rng.integers(0, 3, 48)


def _model() -> Any:
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.BatchNormalization(), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="sparse_categorical_crossentropy")
    return model


class _Stop(keras.callbacks.Callback):  # type: ignore[misc]
    """Raises at the end of one epoch (after the callbacks before it in the list)."""

    def __init__(self, epoch: int | None) -> None:
        super().__init__()
        self.stop_at = epoch

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if epoch == self.stop_at:
            raise _Interrupted


def _fit(model: Any, callbacks: list[Any], *, epochs: int = EPOCHS) -> int:
    """Fits and returns how many epochs ran; an interruption ends it like a lost pod, closing the writer."""
    x, y = _data()
    ran: list[int] = []
    counter = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: ran.append(epoch))
    try:
        model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, callbacks=[counter, *callbacks], verbose=0)
    except _Interrupted:
        for callback in callbacks:
            if hasattr(callback, "close"):
                callback.close()  # what train._fit_stage does when fit unwinds
    return len(ran)


def _assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for left, right in zip(a, b, strict=True):
        np.testing.assert_allclose(left, right, rtol=1e-6, atol=1e-7)


def test_an_interrupted_fit_resumed_from_the_files_trains_the_uninterrupted_weights(tmp_path: Path) -> None:
    whole = _model()
    assert _fit(whole, [checkpoint.make_checkpoint(directory=tmp_path / "whole")]) == EPOCHS

    cut = _model()
    assert _fit(cut, [checkpoint.make_checkpoint(directory=tmp_path / "cut"), _Stop(1)]) == 2
    assert checkpoint.saved_epoch(tmp_path / "cut") == 2
    resumed, callback = _model(), checkpoint.make_checkpoint(directory=tmp_path / "cut")
    assert _fit(resumed, [callback]) == EPOCHS - 2  # epochs 3-5 only, like BackupAndRestore's initial_epoch
    assert callback.restored_epoch == 2
    _assert_same(resumed.get_weights(), whole.get_weights())
    _assert_same([v.numpy() for v in resumed.optimizer.variables], [v.numpy() for v in whole.optimizer.variables])

    keras_cut = _model()  # Keras' own BackupAndRestore, interrupted at the same epoch, ends the same
    keras_backup = str(tmp_path / "keras")
    assert _fit(keras_cut, [keras.callbacks.BackupAndRestore(keras_backup, delete_checkpoint=False), _Stop(1)]) == 2
    keras_resumed = _model()
    assert _fit(keras_resumed, [keras.callbacks.BackupAndRestore(keras_backup)]) == EPOCHS - 2
    _assert_same(resumed.get_weights(), keras_resumed.get_weights())


def test_a_later_fit_of_the_same_model_starts_at_epoch_zero(tmp_path: Path) -> None:
    """BackupAndRestore leaves the resumed epoch on the model; the next stage's fit would start there."""
    model = _model()
    _fit(model, [checkpoint.make_checkpoint(directory=tmp_path / "a"), _Stop(2)])
    assert _fit(model, [checkpoint.make_checkpoint(directory=tmp_path / "a")]) == EPOCHS - 3
    assert _fit(model, [checkpoint.make_checkpoint(directory=tmp_path / "b")]) == EPOCHS  # a fresh folder: all


def test_the_arrays_written_are_those_of_the_epoch_end_not_later(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer of epoch 1 is held until epoch 2 has trained a batch: the file still holds epoch 1's weights."""
    release = threading.Event()
    real = checkpoint.write_checkpoint

    def held(**kwargs: Any) -> None:
        if kwargs["epoch"] == 1:
            assert release.wait(timeout=60)
        real(**kwargs)

    monkeypatch.setattr(checkpoint, "write_checkpoint", held)
    seen: dict[str, Any] = {}

    def batch_end(batch: int, logs: Any) -> None:
        if "epoch1" in seen:
            release.set()

    def epoch_end(epoch: int, logs: Any) -> None:
        if epoch == 0:
            seen["epoch1"] = model.get_weights()

    model = _model()
    probe = keras.callbacks.LambdaCallback(on_train_batch_end=batch_end, on_epoch_end=epoch_end)
    callback = checkpoint.make_checkpoint(directory=tmp_path)
    _fit(model, [callback, probe, _Stop(1)])
    epoch, weights, _ = checkpoint.read_checkpoint(tmp_path / checkpoint.PREVIOUS_FILE)
    assert epoch == 1
    _assert_same(weights, seen["epoch1"])
    assert not np.allclose(weights[0], model.get_weights()[0])  # training did move on meanwhile


def test_a_deferred_write_runs_after_its_epoch_is_on_disk_and_saves_never_overlap(tmp_path: Path) -> None:
    callback = checkpoint.make_checkpoint(directory=tmp_path)
    on_disk_when_deferred_ran: list[int | None] = []
    on_disk_at_next_save: list[int | None] = []

    class Companion(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            callback.defer(lambda: on_disk_when_deferred_ran.append(checkpoint.saved_epoch(tmp_path)))

    class BeforeSave(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            on_disk_at_next_save.append(checkpoint.saved_epoch(tmp_path))

    class AfterSave(keras.callbacks.Callback):  # type: ignore[misc]
        """Right after the save was queued: the previous epoch's writes are all done."""

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            assert len(on_disk_when_deferred_ran) == epoch  # every earlier epoch's companion ran

    _fit(_model(), [BeforeSave(), callback, AfterSave(), Companion()])
    assert on_disk_when_deferred_ran == [1, 2, 3, 4, 5]  # each companion file after its own epoch's weights
    assert on_disk_at_next_save[0] is None and all(e is None or e <= i for i, e in enumerate(on_disk_at_next_save))


def test_a_write_error_surfaces_and_skips_the_companion_write(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    callback = checkpoint.make_checkpoint(directory=blocker / "stage")  # mkdir fails in the writer
    companion: list[int] = []

    class Companion(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            callback.defer(lambda: companion.append(epoch))

    with pytest.raises(OSError):
        _fit(_model(), [callback, Companion()])
    assert companion == []  # never written after weights that did not reach the disk
    callback.close()  # the error was raised once; closing afterwards is quiet


def test_a_torn_write_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = [np.arange(6, dtype=np.float32).reshape(2, 3)]
    checkpoint.write_checkpoint(directory=tmp_path, epoch=1, weights=weights, optimizer=[np.array(3, np.int64)])
    real_savez: Callable[..., None] = np.savez

    def torn(fh: Any, **arrays: Any) -> None:
        real_savez(fh, **arrays)
        fh.truncate(fh.tell() // 2)  # the process dies mid-write
        raise _Crash

    monkeypatch.setattr(np, "savez", torn)
    with pytest.raises(_Crash):
        checkpoint.write_checkpoint(directory=tmp_path, epoch=2, weights=[w + 1 for w in weights], optimizer=[])
    monkeypatch.undo()
    epoch, restored, optimizer = checkpoint.read_checkpoint(tmp_path / checkpoint.CHECKPOINT_FILE)
    assert epoch == 1 and checkpoint.saved_epoch(tmp_path) == 1
    _assert_same(restored, weights)
    assert int(optimizer[0]) == 3


def test_an_unreadable_checkpoint_resumes_from_the_previous_one(tmp_path: Path) -> None:
    """double_checkpoint's promise: the current file broken after the fact, the previous epoch is used."""
    whole = _model()
    _fit(whole, [checkpoint.make_checkpoint(directory=tmp_path / "whole")])
    cut = _model()
    _fit(cut, [checkpoint.make_checkpoint(directory=tmp_path / "cut"), _Stop(2)])
    current = tmp_path / "cut" / checkpoint.CHECKPOINT_FILE
    current.write_bytes(current.read_bytes()[:100])  # epoch 3's file truncated
    resumed, callback = _model(), checkpoint.make_checkpoint(directory=tmp_path / "cut")
    assert _fit(resumed, [callback]) == EPOCHS - 2  # epoch 2's checkpoint: epochs 3-5 again
    assert callback.restored_epoch == 2
    _assert_same(resumed.get_weights(), whole.get_weights())
    assert checkpoint.saved_epoch(tmp_path / "cut") == EPOCHS


def test_a_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    _fit(_model(), [checkpoint.make_checkpoint(directory=tmp_path), _Stop(0)])
    other = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="softmax")])
    other.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with pytest.raises(checkpoint.CheckpointMismatchError):
        _fit(other, [checkpoint.make_checkpoint(directory=tmp_path)])
