"""The trainer's real `ProgressReporter` against the real hub: the two ends of the wire agree."""

from __future__ import annotations

import asyncio
import logging

import pytest
from finetune_trainer.report import ProgressReporter
from progress_helpers import MakeLive


def _train(reporter: ProgressReporter) -> None:
    """What train.py tells its observers for a 2 + 2 epoch run (called off the event loop)."""
    reporter.on_stage_start(stage="head", stage_epochs=2, epochs_done=0, total_epochs=4)
    for epoch in (1, 2):
        reporter.on_epoch_end(
            stage="head",
            epoch=epoch,
            stage_epochs=2,
            epochs_done=epoch,
            total_epochs=4,
            metrics={
                "loss": 1.0 / epoch,
                "accuracy": 0.5,
                "val_loss": 1.1,
                "val_accuracy": 0.4 + 0.1 * epoch,
            },
            best_val_accuracy=0.4 + 0.1 * epoch,
            images_per_second=50.0,
            epoch_seconds=3.0,
        )
    reporter.on_stage_end(stage="head", epochs_run=2, stopped_early=False, epochs_done=2, total_epochs=4)
    reporter.on_stage_start(stage="fine-tune", stage_epochs=2, epochs_done=2, total_epochs=4)
    reporter.on_epoch_end(
        stage="fine-tune",
        epoch=1,
        stage_epochs=2,
        epochs_done=3,
        total_epochs=4,
        metrics={"loss": 0.3, "accuracy": 0.9, "val_loss": 0.4, "val_accuracy": 0.85},
        best_val_accuracy=0.85,
        images_per_second=40.0,
        epoch_seconds=4.0,
    )
    reporter.on_finish(result="succeeded", metrics={"val_accuracy": 0.87}, message="")


async def test_a_real_trainer_run_lands_in_status(make_live: MakeLive) -> None:
    live = await make_live(min_write_interval_s=0.0)
    live.register(namespace="ml", name="flowers", uid="u1", token="s3cret", total_epochs=4)
    results: list[object] = []
    reporter = ProgressReporter(
        url=live.url, token="s3cret", namespace="ml", name="flowers", uid="u1", on_result=results.append
    )
    await asyncio.to_thread(_train, reporter)

    writes = await live.recorder.wait_for(1, namespace="ml", name="flowers")
    deadline = asyncio.get_running_loop().time() + 10
    while writes[-1].get("progress") != 100 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
        writes = live.recorder.for_job("ml", "flowers")
    final = writes[-1]
    assert final["progress"] == 100
    assert final["etaSeconds"] == 0
    assert final["stage"] == "fine-tune"
    assert final["metrics"]["val_accuracy"] == 0.87
    assert final["bestValAccuracy"] >= 0.85
    assert any(w.get("stage") == "head" and w.get("epoch") == 2 for w in writes)
    assert set(results) == {"sent"}, results


async def test_a_trainer_with_the_wrong_token_changes_nothing(make_live: MakeLive) -> None:
    live = await make_live(min_write_interval_s=0.0)
    live.register(namespace="ml", name="flowers", uid="u1", token="s3cret", total_epochs=4)
    live.register(namespace="ml", name="other", uid="u2", token="other-token", total_epochs=4)
    results: list[object] = []
    forged = ProgressReporter(
        url=live.url, token="guess", namespace="ml", name="flowers", on_result=results.append
    )
    cross = ProgressReporter(url=live.url, token="other-token", namespace="ml", name="flowers")
    await asyncio.to_thread(_train, forged)
    await asyncio.to_thread(_train, cross)
    assert results, "the reporter reports its outcomes"
    assert "sent" not in results, results
    assert live.recorder.for_job("ml", "flowers") == []


async def test_a_huge_header_is_a_400_and_one_warning_without_traceback(
    make_live: MakeLive, caplog: pytest.LogCaptureFixture
) -> None:
    live = await make_live()
    live.register(namespace="ml", name="flowers", uid="u1", token="s3cret", total_epochs=4)
    caplog.set_level(logging.DEBUG, logger="finetune_operator.progress")
    resp = await live.post({}, token="x" * 10_000)
    assert resp.status == 400
    records = [r for r in caplog.records if r.name.startswith("finetune_operator.progress.http")]
    assert records, "aiohttp's error log went elsewhere"
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in records), records
    assert "LineTooLong" in records[0].getMessage()
    # The endpoint still answers.
    resp = await live.post({}, token="s3cret")
    assert resp.status == 400  # an empty body, but it got that far
