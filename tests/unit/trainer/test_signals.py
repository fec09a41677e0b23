"""SIGTERM always reaches the trainer: not swallowed by observers, held only while an epoch is saved.

One real `finetune-train` subprocess gets SIGTERM mid phase 2 and must exit promptly with the
retryable code 143, a termination summary and its checkpoint; in-process runs send the signal
from inside an observer (where an `except Exception` fan-out would swallow an Exception) and
from inside the epoch-end saves (where it must wait for them).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_contract.exits import EXIT_TERMINATED, REASON_TERMINATED
from finetune_testbed.imagesets import spec_dict
from finetune_trainer import checkpoint, train
from finetune_trainer.config import parse_config

EXIT_BOUND_S = 20.0  # SIGTERM -> process gone, including TensorFlow's own shutdown


def _command() -> list[str]:
    script = Path(sys.executable).with_name("finetune-train")
    return [str(script)] if script.exists() else [sys.executable, "-m", "finetune_trainer"]


def _rows(out: Path, stage: str) -> list[int]:
    try:
        with (out / "history.csv").open(newline="") as fh:
            return [int(r["epoch"]) for r in csv.DictReader(fh) if r["stage"] == stage]
    except (OSError, ValueError, KeyError):
        return []


def _long_spec(images: dict[str, Path], out: Path) -> dict[str, Any]:
    spec = spec_dict(
        train=images["train"], validation=images["val"], output=out, head_epochs=1, fine_epochs=40,
        unfreeze_last=10, patience=100, batch_size=8,
    )
    spec["training"]["reduceLROnPlateau"] = {"patience": 100}
    return spec


class _SignalAt:
    """An observer that sends this process SIGTERM from one hook, at one fine-tune epoch."""

    def __init__(self, *, hook: str, epoch: int) -> None:
        self.hook, self.epoch, self.sent = hook, epoch, False

    def __getattr__(self, hook: str) -> Any:
        if not hook.startswith("on_"):
            raise AttributeError(hook)

        def call(**kwargs: Any) -> None:
            if hook == self.hook and kwargs.get("stage") == "fine-tune" and kwargs.get("epoch") == self.epoch and not self.sent:
                self.sent = True
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)  # the handler runs here, inside the observer, inside the fan-out

        return call


@pytest.fixture
def sigterm_handler() -> Iterator[None]:
    """The CLI's handler, installed in this process for the in-process runs."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: train.terminate(signum))
    yield
    signal.signal(signal.SIGTERM, previous)


def test_terminated_is_no_exception_and_passes_the_observer_fan_out() -> None:
    assert issubclass(train.Terminated, BaseException) and not issubclass(train.Terminated, Exception)

    class Raising:
        def on_stage_end(self, **kwargs: Any) -> None:
            raise train.Terminated(signal.SIGTERM)

    class Buggy:
        def on_stage_end(self, **kwargs: Any) -> None:
            raise RuntimeError("observer bug")

    train._Observers([Buggy()]).call("on_stage_end")  # an observer's own bug is swallowed...
    with pytest.raises(train.Terminated, match="terminated by SIGTERM"):  # ...a termination is not
        train._Observers([Buggy(), Raising()]).call("on_stage_end")


def test_a_termination_inside_the_saves_is_raised_when_they_end() -> None:
    saved = []
    with pytest.raises(train.Terminated), train.shielded():
        train.terminate(signal.SIGTERM)  # held: no exception here
        saved.append("state")
        with train.shielded():
            saved.append("weights")
        saved.append("history")  # the inner section's end does not raise either
    assert saved == ["state", "weights", "history"]
    with pytest.raises(train.Terminated):
        train.terminate(signal.SIGTERM)  # outside any section: at once


@pytest.mark.usefixtures("sigterm_handler")
def test_sigterm_inside_an_observer_stops_training(image_sets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = parse_config(_long_spec(image_sets, out))
    sender = _SignalAt(hook="on_batch_end", epoch=3)  # mid-epoch: epoch 3 is lost, 1-2 are kept
    with pytest.raises(train.Terminated):
        train.run(spec=spec, observers=[sender], verbose=0)
    assert sender.sent
    assert _rows(out, "fine-tune") == [1, 2]
    assert json.loads((out / "checkpoints" / "fine-tune" / train.CALLBACK_STATE_FILE).read_text())["epoch"] == 2
    assert checkpoint.saved_epoch(out / "checkpoints" / "fine-tune") == 2  # the write in flight was waited for


@pytest.mark.usefixtures("sigterm_handler")
def test_sigterm_during_the_epoch_end_waits_for_the_whole_epoch_to_be_saved(
    image_sets: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    spec = parse_config(_long_spec(image_sets, out))
    sender = _SignalAt(hook="on_epoch_end", epoch=2)  # between history and the backup: held
    with pytest.raises(train.Terminated):
        train.run(spec=spec, observers=[sender], verbose=0)
    assert _rows(out, "fine-tune") == [1, 2]
    state = json.loads((out / "checkpoints" / "fine-tune" / train.CALLBACK_STATE_FILE).read_text())
    assert state["epoch"] == 2  # the callbacks' state of the same epoch as the history
    assert checkpoint.saved_epoch(out / "checkpoints" / "fine-tune") == 2  # resumes at epoch index 2: epochs 1-2 are in it


def test_sigterm_mid_phase_two_exits_promptly_with_143_and_a_checkpoint(
    image_sets: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(_long_spec(image_sets, out)))
    termination = tmp_path / "termination.json"
    env = {**os.environ, "FINETUNE_TERMINATION_LOG": str(termination), "TF_CPP_MIN_LOG_LEVEL": "3"}
    for name in ("FINETUNE_PROGRESS_URL", "FINETUNE_METRICS_PORT"):
        env.pop(name, None)
    proc = subprocess.Popen([*_command(), "--config", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and len(_rows(out, "fine-tune")) < 2:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be terminated"
        assert len(_rows(out, "fine-tune")) >= 2, "phase 2 did not get going in time"
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=EXIT_BOUND_S + 10)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == EXIT_TERMINATED, stderr[-3000:]
    assert took < EXIT_BOUND_S, f"exited {took:.1f}s after SIGTERM"
    summary = json.loads(termination.read_text())
    assert summary["exitCode"] == EXIT_TERMINATED and summary["reason"] == REASON_TERMINATED
    assert "SIGTERM" in summary["message"]
    assert f"finetune-train: {REASON_TERMINATED}: terminated by SIGTERM" in stderr
    assert "Traceback" not in stderr
    reached = _rows(out, "fine-tune")
    assert 2 <= len(reached) < 40 and reached == list(range(1, len(reached) + 1))
    assert (out / "checkpoints" / "fine-tune" / checkpoint.CHECKPOINT_FILE).is_file()
    state = json.loads((out / "checkpoints" / "fine-tune" / train.CALLBACK_STATE_FILE).read_text())
    assert state["epoch"] == len(reached)  # what was recorded is what a resume starts from
