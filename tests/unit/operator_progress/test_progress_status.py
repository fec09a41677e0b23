"""The pure part of the hub: a report -> the progress fields of status (percent, ETA, message)."""

from __future__ import annotations

import pytest
from finetune_contract import protocol
from finetune_operator import api
from finetune_operator.progress import build_status, progress_status
from progress_helpers import report


def status_for(
    body: dict[str, object], *, total: int = 10, recent: list[float] | None = None, best: float | None = None
) -> dict[str, object]:
    return build_status(
        report=protocol.ProgressReport.model_validate(body),
        total_epochs=total,
        recent_epoch_seconds=recent or [],
        best_val_accuracy=best,
        now=1_700_000_000.0,
    )


def test_progress_eta_and_message_mid_fine_tune() -> None:
    body = report(stage="fine-tune", epoch=4, stage_epochs=10, epochs_done=24, total_epochs=30)
    status = status_for(body, total=30, recent=[4.0, 6.0], best=0.9123456)
    assert status["progress"] == 80
    assert status["etaSeconds"] == 30  # 6 planned epochs left x 5 s mean
    assert status["message"] == "phase 2/2, epoch 4/10"
    assert status["stage"] == "fine-tune"
    assert status["epoch"] == 4
    assert status["epochs"] == "4/10"  # the EPOCH printer column
    assert status["totalEpochs"] == 30
    assert status["bestValAccuracy"] == 0.9123
    assert status["imagesPerSecond"] == 120.0
    assert status["lastProgressTime"] == "2023-11-14T22:13:20Z"
    assert status["metrics"] == {"loss": 0.5, "accuracy": 0.8, "val_loss": 0.6, "val_accuracy": 0.75}


@pytest.mark.parametrize(
    ("done", "total", "progress"),
    [(0, 10, 0), (1, 3, 33), (2, 3, 66), (3, 3, 100), (12, 10, 100)],
)
def test_progress_is_the_floor_percent_of_planned_epochs(done: int, total: int, progress: int) -> None:
    assert status_for(report(epochs_done=done, total_epochs=total), total=total)["progress"] == progress


def test_early_stopping_jumps_progress_and_eta_uses_what_is_left() -> None:
    # Head stage stopped early after 2 of 5 epochs: the trainer counts the stage in full.
    body = report(event="stage-end", stage="head", epoch=2, stage_epochs=5, epochs_done=5, total_epochs=10)
    status = status_for(body, recent=[3.0, 3.0])
    assert status["progress"] == 50
    assert status["etaSeconds"] == 15


def test_no_eta_until_an_epoch_duration_is_known() -> None:
    status = status_for(report(event="stage-start", epoch=0, epochs_done=0, epoch_seconds=None))
    assert "etaSeconds" not in status
    assert "bestValAccuracy" not in status


def test_final_success_is_100_percent_and_no_eta() -> None:
    body = report(
        event="final", stage="fine-tune", epoch=3, stage_epochs=5, epochs_done=8, result="succeeded"
    )
    status = status_for(body, recent=[10.0])
    assert status["progress"] == 100
    assert status["etaSeconds"] == 0
    assert "message" not in status  # the operator writes the outcome


def test_non_finite_metrics_never_reach_status() -> None:
    # The wire refuses them; a report that bypassed validation still writes none.
    with pytest.raises(ValueError, match="finite"):
        report(metrics={"loss": float("nan"), "accuracy": 0.5})
    valid = protocol.ProgressReport.model_validate(report())
    forced = valid.model_copy(update={"metrics": {"loss": float("nan"), "val_loss": float("inf"), "accuracy": 0.5}})
    status = build_status(report=forced, total_epochs=10, recent_epoch_seconds=[], best_val_accuracy=None, now=0.0)
    assert status["metrics"] == {"accuracy": 0.5}


def test_plan_from_the_report_when_the_job_has_none() -> None:
    status = status_for(report(epochs_done=2, total_epochs=4), total=0)
    assert status["totalEpochs"] == 4
    assert status["progress"] == 50


def test_the_hubs_status_is_the_typed_model_and_only_its_own_fields() -> None:
    """The write is `api.FineTuneJobStatus` dumped (`api.status_patch`): JSON names of model fields only,
    none of them the operator's (phase, conditions, ...); the final status leaves out the shared ones."""
    body = report(stage="head", epoch=2, stage_epochs=5, epochs_done=2, total_epochs=10)
    typed = progress_status(
        report=protocol.ProgressReport.model_validate(body),
        total_epochs=10,
        recent_epoch_seconds=[3.0],
        best_val_accuracy=None,
        now=1_700_000_000.0,
    )
    assert isinstance(typed, api.FineTuneJobStatus)
    written = status_for(body, recent=[3.0])
    assert written == api.status_patch(typed, writer="progress")
    assert set(written) <= set(api.status_fields(writer="progress"))
    assert not set(written) & set(api.status_fields(writer="operator", only=True))
    assert {"progress", "etaSeconds", "message"} <= set(written)
    assert set(api.shared_status_fields()) == {"progress", "etaSeconds", "message"}  # what finish() strips
    with pytest.raises(ValueError, match="phase"):
        api.status_patch(typed.model_copy(update={"phase": "Running"}), writer="progress")
