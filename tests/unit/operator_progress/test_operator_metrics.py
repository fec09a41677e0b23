"""Operator metrics: names and labels, jobs by phase, per-job series removed on forget, the server."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from finetune_operator import metrics

get = metrics.REGISTRY.get_sample_value


def test_jobs_by_phase_zero_filled_and_removed_with_the_last_job() -> None:
    metrics.set_phase(namespace="p1", name="a", phase="Pending")
    metrics.set_phase(namespace="p1", name="b", phase="Running")
    assert get("finetune_jobs", {"namespace": "p1", "phase": "Pending"}) == 1
    assert get("finetune_jobs", {"namespace": "p1", "phase": "Running"}) == 1
    assert get("finetune_jobs", {"namespace": "p1", "phase": "Failed"}) == 0
    metrics.set_phase(namespace="p1", name="a", phase="Running")
    assert get("finetune_jobs", {"namespace": "p1", "phase": "Pending"}) == 0
    assert get("finetune_jobs", {"namespace": "p1", "phase": "Running"}) == 2
    metrics.set_phase(namespace="p1", name="a", phase=None)
    metrics.forget_job(namespace="p1", name="b")
    for phase in metrics.PHASES:
        assert get("finetune_jobs", {"namespace": "p1", "phase": phase}) is None


def test_totals_and_duration_histogram() -> None:
    metrics.job_created(namespace="p2")
    metrics.job_retried(namespace="p2")
    metrics.job_finished(namespace="p2", name="a", phase="Succeeded", reason=None, duration_s=42.0)
    metrics.job_finished(namespace="p2", name="b", phase="Failed", reason="Diverged", duration_s=5.0)
    metrics.job_finished(namespace="p2", name="c", phase="Failed", reason=None, duration_s=None)
    assert get("finetune_jobs_created_total", {"namespace": "p2"}) == 1
    assert get("finetune_jobs_retried_total", {"namespace": "p2"}) == 1
    assert get("finetune_jobs_succeeded_total", {"namespace": "p2"}) == 1
    assert get("finetune_jobs_failed_total", {"namespace": "p2", "reason": "Diverged"}) == 1
    assert get("finetune_jobs_failed_total", {"namespace": "p2", "reason": "Unknown"}) == 1
    assert get("finetune_job_duration_seconds_count", {"namespace": "p2", "result": "succeeded"}) == 1
    assert get("finetune_job_duration_seconds_sum", {"namespace": "p2", "result": "failed"}) == 5.0
    with pytest.raises(ValueError, match="Succeeded or Failed"):
        metrics.job_finished(namespace="p2", name="d", phase="Running", reason=None, duration_s=1.0)


def test_per_job_series_created_then_removed_by_forget() -> None:
    metrics.observe_progress(
        namespace="p3",
        name="a",
        stage="fine-tune",
        epoch=3,
        progress_ratio=0.8,
        metrics={"loss": 0.2, "accuracy": 0.9, "val_loss": 0.3, "val_accuracy": 0.85},
        images_per_second=400.0,
        eta_seconds=30.0,
        timestamp=1.7e9,
    )
    metrics.observe_progress(
        namespace="p3",
        name="other",
        stage="head",
        epoch=1,
        progress_ratio=0.1,
        metrics={},
        images_per_second=None,
        eta_seconds=None,
        timestamp=1.7e9,
    )
    labels = {"namespace": "p3", "name": "a"}
    assert get("finetune_job_progress_ratio", labels) == 0.8
    assert get("finetune_job_stage", {**labels, "stage": "fine-tune"}) == 1
    assert get("finetune_job_stage", {**labels, "stage": "head"}) == 0
    assert get("finetune_job_accuracy", {**labels, "stage": "fine-tune", "split": "validation"}) == 0.85
    assert get("finetune_job_loss", {**labels, "stage": "fine-tune", "split": "train"}) == 0.2

    metrics.forget_job(namespace="p3", name="a")
    exposition = _exposition()
    assert 'name="a",namespace="p3"' not in exposition
    assert 'namespace="p3",name="a"' not in exposition
    assert get("finetune_job_progress_ratio", {"namespace": "p3", "name": "other"}) == 0.1
    metrics.forget_job(namespace="p3", name="other")
    assert 'namespace="p3"' not in _exposition()


def test_counters_exist_at_zero_for_every_result_and_source() -> None:
    for result in metrics.REPORT_RESULTS:
        assert get("finetune_progress_reports_total", {"result": result}) is not None
    for source in ("reconcile", "progress"):
        assert get("finetune_status_writes_total", {"source": source}) is not None
    before = get("finetune_status_writes_total", {"source": "reconcile"}) or 0
    metrics.status_write(source="reconcile")
    metrics.reconcile_error(handler="on_create")
    assert get("finetune_status_writes_total", {"source": "reconcile"}) == before + 1
    assert (get("finetune_reconcile_errors_total", {"handler": "on_create"}) or 0) >= 1


def test_metrics_server_serves_metrics_and_healthz() -> None:
    port = metrics.start_metrics_server(host="127.0.0.1", port=0)
    assert port > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for name in (
        "finetune_progress_reports_total",
        "finetune_status_writes_total",
        "process_cpu_seconds_total",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        assert resp.status == 200
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=5)
    assert err.value.code == 404


def _exposition() -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.REGISTRY).decode()


# The cross-team contract: name -> label names (the dashboard and the alerting rules use these).
CONTRACT = {
    "finetune_jobs": {"namespace", "phase"},
    "finetune_jobs_created_total": {"namespace"},
    "finetune_jobs_succeeded_total": {"namespace"},
    "finetune_jobs_failed_total": {"namespace", "reason"},
    "finetune_jobs_retried_total": {"namespace"},
    "finetune_job_progress_ratio": {"namespace", "name"},
    "finetune_job_epoch": {"namespace", "name", "stage"},
    "finetune_job_stage": {"namespace", "name", "stage"},
    "finetune_job_loss": {"namespace", "name", "stage", "split"},
    "finetune_job_accuracy": {"namespace", "name", "stage", "split"},
    "finetune_job_images_per_second": {"namespace", "name"},
    "finetune_job_eta_seconds": {"namespace", "name"},
    "finetune_job_last_progress_timestamp_seconds": {"namespace", "name"},
    "finetune_job_duration_seconds_bucket": {"namespace", "result", "le"},
    "finetune_progress_reports_total": {"result"},
    "finetune_status_writes_total": {"source"},
    "finetune_reconcile_errors_total": {"handler"},
}


def test_every_contract_metric_is_exposed_with_its_labels() -> None:
    metrics.set_phase(namespace="p4", name="a", phase="Running")
    metrics.job_created(namespace="p4")
    metrics.job_retried(namespace="p4")
    metrics.job_finished(namespace="p4", name="b", phase="Succeeded", reason=None, duration_s=1.0)
    metrics.job_finished(namespace="p4", name="c", phase="Failed", reason="DataError", duration_s=1.0)
    metrics.reconcile_error(handler="reconcile")
    metrics.observe_progress(
        namespace="p4",
        name="a",
        stage="head",
        epoch=1,
        progress_ratio=0.1,
        metrics={"loss": 1.0, "accuracy": 0.5, "val_loss": 1.1, "val_accuracy": 0.4},
        images_per_second=10.0,
        eta_seconds=60.0,
        timestamp=1.7e9,
    )
    exposed: dict[str, set[str]] = {}
    for family in metrics.REGISTRY.collect():
        for sample in family.samples:
            exposed.setdefault(sample.name, set()).update(sample.labels)
    for name, labels in CONTRACT.items():
        assert name in exposed, name
        assert exposed[name] == labels, (name, exposed[name])
    metrics.forget_job(namespace="p4", name="a")
