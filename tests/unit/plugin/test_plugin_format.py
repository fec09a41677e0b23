"""`kubectl finetune`'s pure formatting (finetune_operator.plugin_format): bars, tables, the watch view, describe."""

from __future__ import annotations

import datetime
import io
import json
from typing import Any

import pytest
from finetune_operator import plugin_format as fmt
from rich.console import Console

NOW = datetime.datetime(2026, 12, 2, 1, 0, 0, tzinfo=datetime.UTC)


def job(name: str = "flowers", *, namespace: str = "ml", spec: dict[str, Any] | None = None, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace, "uid": "u-1", "creationTimestamp": "2026-12-02T00:48:00Z"},
        "spec": spec
        if spec is not None
        else {"training": {"head": {"epochs": 20}, "fineTune": {"epochs": 10, "unfreezeLast": 4}}, "output": {"path": "/models/f"}},
        "status": status,
    }


RUNNING = {
    "phase": "Running",
    "stage": "fine-tune",
    "epoch": 4,
    "epochs": "4/10",
    "totalEpochs": 30,
    "progress": 80,
    "etaSeconds": 95,
    "metrics": {"loss": 0.21, "accuracy": 0.93, "val_loss": 0.25, "val_accuracy": 0.91},
    "bestValAccuracy": 0.92,
    "imagesPerSecond": 410.5,
    "attempts": 1,
    "message": "phase 2/2, epoch 4/10",
}


def render(renderable: Any) -> str:
    out = io.StringIO()
    Console(file=out, width=120, color_system=None, force_terminal=False).print(renderable)
    return out.getvalue()


@pytest.mark.parametrize(
    ("percent", "expected"),
    [(0, "░" * 20), (25, "█" * 5 + "░" * 15), (100, "█" * 20), (150, "█" * 20), (-3, "░" * 20), (None, "░" * 20),
     (float("nan"), "░" * 20)],
)  # fmt: skip
def test_bar_fills_in_proportion_and_clamps(percent: float | None, expected: str) -> None:
    assert fmt.bar(percent) == expected


def test_bar_ascii_and_width() -> None:
    assert fmt.bar(50, width=10, ascii_only=True) == "#####-----"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (-1, "-"), (float("inf"), "-"), (0, "0s"), (59.9, "59s"), (95, "1m35s"), (3600 + 180, "1h03m"),
     (86400 * 3 + 3600 * 4, "3d04h")],
)  # fmt: skip
def test_duration(seconds: float | None, text: str) -> None:
    assert fmt.duration(seconds) == text


def test_clean_drops_terminal_escapes_and_joins_lines() -> None:
    assert fmt.clean("bad\x1b]0;title\x07\nline\x9b2J") == "bad]0;title line2J"
    assert fmt.clean("a\nb", one_line=False) == "a\nb"
    assert fmt.clean("x" * 50, limit=10) == "x" * 9 + "…"


def test_list_rows_show_phase_stage_epoch_bar_val_acc_eta_and_age() -> None:
    rows = fmt.list_rows([job(**RUNNING)], now=NOW, all_namespaces=False)
    assert rows[0] == ["NAME", "PHASE", "STAGE", "EPOCH", "PROGRESS", "VAL-ACC", "ETA", "AGE"]
    assert rows[1] == ["flowers", "Running", "fine-tune", "4/10", "████████░░  80%", "0.91", "1m35s", "12m00s"]


def test_list_rows_all_namespaces_sorted_and_a_job_without_status() -> None:
    rows = fmt.list_rows([job("b", namespace="y"), job("a", namespace="y"), job("z", namespace="x")], now=NOW,
                         all_namespaces=True, ascii_only=True)  # fmt: skip
    assert [r[:2] for r in rows] == [["NAMESPACE", "NAME"], ["x", "z"], ["y", "a"], ["y", "b"]]
    assert rows[1][2:] == ["Pending", "-", "-", "-", "-", "-", "12m00s"]


def test_list_falls_back_to_best_val_accuracy() -> None:
    rows = fmt.list_rows([job(phase="Succeeded", bestValAccuracy=0.875, progress=100)], now=NOW, all_namespaces=False,
                         ascii_only=True)  # fmt: skip
    assert rows[1][4:6] == ["########## 100%", "0.875"]


def test_render_plain_table_aligns_columns() -> None:
    text = fmt.render_plain_table([["NAME", "PHASE"], ["a-long-name", "Running"], ["b", "Failed"]])
    assert text.splitlines() == ["NAME          PHASE", "a-long-name   Running", "b             Failed"]


def test_stages_follow_the_status() -> None:
    head = fmt.stages(job(phase="Running", stage="head", epoch=5))
    assert [(s.name, s.done, s.planned, s.state) for s in head] == [("head", 5, 20, "running"), ("fine-tune", 0, 10, "waiting")]
    fine = fmt.stages(job(**RUNNING))
    assert [(s.state, s.percent) for s in fine] == [("done", 100.0), ("running", 40.0)]
    done = fmt.stages(job(phase="Succeeded", stage="fine-tune", epoch=3))  # early stopping: still done
    assert [s.state for s in done] == ["done", "done"]
    skipped = fmt.stages(job(spec={"training": {"head": {"epochs": 3}, "fineTune": {"unfreezeLast": 0}}}, phase="Pending"))
    assert [(s.state, s.planned) for s in skipped] == [("waiting", 3), ("skipped", 0)]


def test_watch_line_is_one_plain_line_with_the_figures() -> None:
    line = fmt.watch_line(job(**RUNNING), now=NOW)
    assert line == (
        "2026-12-02T01:00:00Z ftj/flowers Running stage=fine-tune epoch=4/10 progress=80% val_accuracy=0.91 eta=1m35s"
        " - phase 2/2, epoch 4/10"
    )
    failed = fmt.watch_line(job(phase="Failed", reason="DataError", message="no images\x1b[2J in /data"), now=NOW)
    assert "Failed (DataError)" in failed and "\x1b" not in failed and "\n" not in failed


def test_watch_state_ignores_what_does_not_change_the_job() -> None:
    a = job(**RUNNING)
    b = job(**RUNNING)
    b["metadata"]["resourceVersion"] = "99"
    assert fmt.watch_state(a) == fmt.watch_state(b)
    assert fmt.watch_state(a) != fmt.watch_state(job(**{**RUNNING, "epochs": "5/10"}))


def test_watch_renderable_draws_a_bar_per_stage_and_the_metrics() -> None:
    text = render(fmt.watch_renderable(job(**RUNNING), now=NOW))
    assert "ftj/flowers  Running" in text
    lines = text.splitlines()
    head = next(line for line in lines if "phase 1/2 head" in line)
    fine = next(line for line in lines if "phase 2/2 fine-tune" in line)
    assert "█" * 20 in head and "epoch 20/20" in head and "done" in head
    assert "█" * 8 + "░" * 12 in fine and "epoch 4/10" in fine and "running" in fine
    assert "val_accuracy=0.91" in text and "best val_accuracy=0.92" in text and "410.5 images/s" in text
    assert "ETA 1m35s" in text


def test_watch_renderable_shows_untrusted_text_literally() -> None:
    text = render(fmt.watch_renderable(job(phase="Failed", reason="DataError", message="[bold red]x[/] \x1b[31m"), now=NOW))
    assert "[bold red]x[/]" in text and "\x1b" not in text


def test_final_summary_has_outcome_metrics_timings_and_model() -> None:
    status = {**RUNNING, "phase": "Succeeded", "message": "trained", "startTime": "2026-12-02T00:50:00Z",
              "completionTime": "2026-12-02T00:52:05Z", "modelPath": "/models/f/model.keras"}  # fmt: skip
    text = fmt.final_summary(job(**status))
    assert text.splitlines()[0] == "ftj/flowers Succeeded"
    assert "final metrics:    accuracy=0.93 loss=0.21 val_accuracy=0.91 val_loss=0.25" in text
    assert "best val_accuracy: 0.92" in text and "duration:         2m05s" in text
    assert "model:            /models/f/model.keras" in text


def pod(name: str, created: str, *, running: str | None = None, exit_code: int | None = None, reason: str = "") -> dict[str, Any]:
    state: dict[str, Any] = {}
    if running:
        state = {"running": {"startedAt": running}}
    elif exit_code is not None:
        state = {"terminated": {"exitCode": exit_code, "reason": reason, "startedAt": created, "finishedAt": created}}
    else:
        state = {"waiting": {"reason": "ContainerCreating"}}
    return {
        "metadata": {"name": name, "creationTimestamp": created},
        "status": {"phase": "Running" if running else "Pending", "containerStatuses": [{"name": "trainer", "state": state}]},
    }


def test_attempts_count_back_from_the_newest_pod_that_ran() -> None:
    pods = [pod("p3", "2026-12-02T00:03:00Z", running="2026-12-02T00:03:01Z"),
            pod("p1", "2026-12-02T00:01:00Z", exit_code=1, reason="Error"),
            pod("p2", "2026-12-02T00:02:00Z", exit_code=137, reason="OOMKilled")]  # fmt: skip
    found = fmt.attempts(pods, counted=3)
    assert [(a.pod, a.number, a.exit_code) for a in found] == [("p1", 1, 1), ("p2", 2, 137), ("p3", 3, None)]
    # Suspend deleted the first pods: the one left is still attempt 3.
    assert [a.number for a in fmt.attempts(pods[:1], counted=3)] == [3]
    # A pod that has not run yet has no number; status lagging behind: the pods that ran count.
    pending = [*pods, pod("p4", "2026-12-02T00:04:00Z")]
    assert [a.number for a in fmt.attempts(pending, counted=0)] == [1, 2, 3, None]


def test_describe_names_the_failure_the_trainer_message_attempts_events_and_model() -> None:
    status = {"phase": "Failed", "reason": "DataError", "message": "no images in /data/train", "attempts": 1,
              "conditions": [{"type": "Failed", "status": "True", "reason": "DataError",
                              "message": "trainer: no images in /data/train", "lastTransitionTime": "2026-12-02T00:59:00Z"},
                             {"type": "Ready", "status": "False", "reason": "Failed", "message": ""}]}  # fmt: skip
    events = [{"type": "Warning", "reason": "Failed", "message": "DataError: no images", "lastTimestamp": "2026-12-02T00:59:00Z",
               "source": {"component": "finetune-operator"}},
              {"type": "Normal", "reason": "JobCreated", "message": "Job flowers", "lastTimestamp": "2026-12-02T00:58:00Z"}]  # fmt: skip
    text = fmt.describe(job(**status), pods=[pod("flowers-abc", "2026-12-02T00:58:01Z", exit_code=3, reason="Error")],
                        events=events, now=NOW)  # fmt: skip
    assert "Phase:         Failed (DataError)" in text
    assert "Failure:       DataError" in text and "Trainer says: trainer: no images in /data/train" in text
    assert "Model path:    (not saved yet)" in text and "Output:        /models/f" in text
    attempt_row = next(line for line in text.splitlines() if "flowers-abc" in line)
    assert attempt_row.split()[:3] == ["1", "flowers-abc", "Pending"] and " 3 " in attempt_row
    event_lines = [line for line in text.splitlines() if "JobCreated" in line or "DataError: no images" in line]
    assert "JobCreated" in event_lines[0] and "finetune-operator" in event_lines[1]  # oldest first


def test_api_error_message_names_the_verb_and_the_resource() -> None:
    body = json.dumps({"kind": "Status", "message": 'finetunejobs.finetune.dev "a" is forbidden: User "x" cannot patch'})
    code, text = fmt.api_error_message(status=403, body=body, verb="patch", resource=fmt.RESOURCE, namespace="x", name="a")
    assert code == fmt.EXIT_FORBIDDEN
    assert text.startswith("forbidden: cannot patch finetunejobs.finetune.dev in namespace x (")
    code, text = fmt.api_error_message(status=403, body="", verb="list", resource=fmt.RESOURCE, namespace=None)
    assert text == "forbidden: cannot list finetunejobs.finetune.dev at the cluster scope"
    assert fmt.api_error_message(status=404, body="", verb="get", resource=fmt.RESOURCE, namespace="ml", name="a") == (
        fmt.EXIT_NOT_FOUND, 'finetunejob "a" not found in namespace ml')  # fmt: skip
    assert fmt.api_error_message(status=401, body="", verb="get", resource="pods", namespace="ml")[0] == fmt.EXIT_FORBIDDEN
    code, text = fmt.api_error_message(status=500, body="boom\x1b[2J", verb="get", resource="pods/log", namespace="ml")
    assert code == fmt.EXIT_API_ERROR and text == "get pods/log in namespace ml failed: HTTP 500: boom[2J"


def test_exit_codes_are_distinct() -> None:
    codes = [fmt.EXIT_OK, fmt.EXIT_FAILED, fmt.EXIT_USAGE, fmt.EXIT_TIMEOUT, fmt.EXIT_NOT_FOUND, fmt.EXIT_NO_CRD,
             fmt.EXIT_FORBIDDEN, fmt.EXIT_CONNECTION, fmt.EXIT_API_ERROR]  # fmt: skip
    assert len(set(codes)) == len(codes)
