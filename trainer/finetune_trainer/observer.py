"""How training tells the world what it is doing, without knowing who listens.

`train.py` calls these hooks (through a Keras callback adapter) at each stage start, epoch
end, now and then inside a long epoch, at each stage end, and once at the end; `report.py`
implements them to send progress reports to the operator and to serve the trainer's own
Prometheus `/metrics`. Epoch numbers are 1-based counts of completed epochs within a stage.
An observer must never raise into training nor block it for long.
"""

from __future__ import annotations

from typing import Literal, Protocol

from finetune_contract.protocol import Stage

__all__ = ["TrainingObserver"]


class TrainingObserver(Protocol):
    """Receives training events; every method must return quickly and never raise."""

    def on_stage_start(self, *, stage: Stage, stage_epochs: int, epochs_done: int, total_epochs: int) -> None:
        """A stage (phase) starts; `epochs_done` counts planned epochs already done before it."""

    def on_epoch_end(
        self,
        *,
        stage: Stage,
        epoch: int,
        stage_epochs: int,
        epochs_done: int,
        total_epochs: int,
        metrics: dict[str, float],
        best_val_accuracy: float | None,
        images_per_second: float | None,
        epoch_seconds: float,
    ) -> None:
        """An epoch ended; `metrics` holds loss, accuracy, val_loss, val_accuracy (and lr when known)."""

    def on_batch_end(
        self, *, stage: Stage, epoch: int, batch: int, batches: int | None, batch_seconds: float
    ) -> None:
        """A training batch ended (for heartbeats inside long epochs and batch-time metrics)."""

    def on_stage_end(
        self, *, stage: Stage, epochs_run: int, stopped_early: bool, epochs_done: int, total_epochs: int
    ) -> None:
        """A stage ended; an early-stopped stage counts in full in `epochs_done`."""

    def on_finish(
        self, *, result: Literal["succeeded", "failed"], metrics: dict[str, float], message: str
    ) -> None:
        """Training is over (saved, or failed with `message`); flush anything pending."""
