"""Prometheus metrics of the operator.

Every object lives on this module's own `REGISTRY` (a dedicated `CollectorRegistry`, not
prometheus_client's global default), which also carries the process, platform and GC
collectors; `start_metrics_server` serves exactly that registry. A dedicated registry keeps
the exposition free of whatever else a library registers globally and lets tests read the
values with `REGISTRY.get_sample_value(...)`.

Names follow Prometheus conventions and are fixed by the cross-team contract (the
dashboard and the alerting rules in deploy/ use them):

    finetune_jobs{namespace,phase}                              gauge, FineTuneJobs by phase
    finetune_jobs_created_total{namespace}                      counter
    finetune_jobs_succeeded_total{namespace}                    counter
    finetune_jobs_failed_total{namespace,reason}                counter
    finetune_jobs_retried_total{namespace}                      counter
    finetune_job_progress_ratio{namespace,name}                 gauge, 0..1
    finetune_job_epoch{namespace,name,stage}                    gauge, epochs done in the stage
    finetune_job_stage{namespace,name,stage}                    gauge, 1 = the current stage
    finetune_job_loss{namespace,name,stage,split}               gauge, split = train|validation
    finetune_job_accuracy{namespace,name,stage,split}           gauge
    finetune_job_images_per_second{namespace,name}              gauge
    finetune_job_eta_seconds{namespace,name}                    gauge
    finetune_job_last_progress_timestamp_seconds{namespace,name} gauge, unix time
    finetune_job_duration_seconds{namespace,result}             histogram, result = succeeded|failed
    finetune_progress_reports_total{result}                     counter
    finetune_status_writes_total{source}                        counter, source = reconcile|progress
    finetune_reconcile_errors_total{handler}                    counter
    finetune_progress_token_reviews_total{result}               counter, TokenReviews by verdict
    finetune_progress_token_checks_total{result}                counter, verified|rejected|unverified|throttled

Per-job series (`finetune_job_*{namespace,name,...}`) are removed by `forget_job` when the
FineTuneJob is deleted, so no stale series outlive their job. `finetune_jobs` is zero-filled
for every phase of each namespace that has at least one job; a namespace's series go away
with its last job.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from finetune_contract.protocol import STAGES
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

__all__ = [
    "PHASES",
    "REGISTRY",
    "REPORT_RESULTS",
    "TOKEN_REVIEW_RESULTS",
    "forget_job",
    "job_created",
    "job_finished",
    "job_retried",
    "observe_progress",
    "progress_report",
    "reconcile_error",
    "set_phase",
    "start_metrics_server",
    "status_write",
    "token_check",
    "token_review",
]

PHASES: tuple[str, ...] = ("Pending", "Running", "Suspended", "Succeeded", "Failed")
REPORT_RESULTS: tuple[str, ...] = (
    "accepted",
    "invalid",
    "unauthorized",
    "forbidden",
    "too_large",
    "rate_limited",
    "unknown_job",
    "finished",
    "unavailable",
)
STATUS_WRITE_SOURCES: tuple[str, ...] = ("reconcile", "progress")
TOKEN_REVIEW_RESULTS: tuple[str, ...] = ("ok", "unauthorized", "forbidden", "error")
# Before any review: the signature verified with the issuer's keys, rejected (401, no review),
# unverified (no keys could be fetched: the review decides), throttled (the review limit refused it).
TOKEN_CHECK_RESULTS: tuple[str, ...] = ("verified", "rejected", "unverified", "throttled")
SPLITS: tuple[str, ...] = ("train", "validation")

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

JOBS = Gauge("finetune_jobs", "FineTuneJobs by phase.", ["namespace", "phase"], registry=REGISTRY)
JOBS_CREATED = Counter(
    "finetune_jobs_created", "FineTuneJobs the operator started handling.", ["namespace"], registry=REGISTRY
)
JOBS_SUCCEEDED = Counter(
    "finetune_jobs_succeeded", "FineTuneJobs that reached Succeeded.", ["namespace"], registry=REGISTRY
)
JOBS_FAILED = Counter(
    "finetune_jobs_failed",
    "FineTuneJobs that reached Failed, by reason.",
    ["namespace", "reason"],
    registry=REGISTRY,
)
JOBS_RETRIED = Counter(
    "finetune_jobs_retried",
    "Trainer pods restarted after a retryable failure.",
    ["namespace"],
    registry=REGISTRY,
)
JOB_PROGRESS = Gauge(
    "finetune_job_progress_ratio",
    "Planned epochs done over planned epochs (0..1).",
    ["namespace", "name"],
    registry=REGISTRY,
)
JOB_EPOCH = Gauge(
    "finetune_job_epoch",
    "Epochs completed within the stage.",
    ["namespace", "name", "stage"],
    registry=REGISTRY,
)
JOB_STAGE = Gauge(
    "finetune_job_stage",
    "The training stage now running (1) or not (0).",
    ["namespace", "name", "stage"],
    registry=REGISTRY,
)
JOB_LOSS = Gauge(
    "finetune_job_loss",
    "Latest epoch loss per split.",
    ["namespace", "name", "stage", "split"],
    registry=REGISTRY,
)
JOB_ACCURACY = Gauge(
    "finetune_job_accuracy",
    "Latest epoch accuracy per split.",
    ["namespace", "name", "stage", "split"],
    registry=REGISTRY,
)
JOB_IMAGES_PER_SECOND = Gauge(
    "finetune_job_images_per_second",
    "Training throughput of the latest epoch.",
    ["namespace", "name"],
    registry=REGISTRY,
)
JOB_ETA = Gauge(
    "finetune_job_eta_seconds",
    "Estimated seconds until training ends.",
    ["namespace", "name"],
    registry=REGISTRY,
)
JOB_LAST_PROGRESS = Gauge(
    "finetune_job_last_progress_timestamp_seconds",
    "Unix time of the latest accepted progress report.",
    ["namespace", "name"],
    registry=REGISTRY,
)
JOB_RECONCILED = Gauge(
    "finetune_job_reconciled_resource_version",
    "metadata.resourceVersion of the FineTuneJob that the latest completed reconcile pass of it "
    "acted on (while the API server's versions are integers): a pass over that version has run.",
    ["namespace", "name"],
    registry=REGISTRY,
)
JOB_DURATION = Histogram(
    "finetune_job_duration_seconds",
    "Wall time from start to Succeeded or Failed.",
    ["namespace", "result"],
    buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400, math.inf),
    registry=REGISTRY,
)
PROGRESS_REPORTS = Counter(
    "finetune_progress_reports", "Progress reports received, by outcome.", ["result"], registry=REGISTRY
)
STATUS_WRITES = Counter(
    "finetune_status_writes", "Writes of FineTuneJob status, by source.", ["source"], registry=REGISTRY
)
RECONCILE_ERRORS = Counter(
    "finetune_reconcile_errors", "Errors raised by operator handlers.", ["handler"], registry=REGISTRY
)
TOKEN_REVIEWS = Counter(
    "finetune_progress_token_reviews",
    "Progress tokens checked with the API server (TokenReview, then the token's pod), by verdict.",
    ["result"],
    registry=REGISTRY,
)

for _result in REPORT_RESULTS:
    PROGRESS_REPORTS.labels(result=_result)
for _source in STATUS_WRITE_SOURCES:
    STATUS_WRITES.labels(source=_source)
TOKEN_CHECKS = Counter(
    "finetune_progress_token_checks",
    "New progress tokens checked by the operator before any TokenReview, by outcome.",
    ["result"],
    registry=REGISTRY,
)

for _result in TOKEN_REVIEW_RESULTS:
    TOKEN_REVIEWS.labels(result=_result)
for _result in TOKEN_CHECK_RESULTS:
    TOKEN_CHECKS.labels(result=_result)

# The per-job gauges, each with the label names after (namespace, name).
_PER_JOB: tuple[Gauge, ...] = (
    JOB_PROGRESS,
    JOB_EPOCH,
    JOB_STAGE,
    JOB_LOSS,
    JOB_ACCURACY,
    JOB_IMAGES_PER_SECOND,
    JOB_ETA,
    JOB_LAST_PROGRESS,
)

_lock = threading.Lock()
_phases: dict[tuple[str, str], str] = {}
_job_series: dict[tuple[str, str], set[tuple[Gauge, tuple[str, ...]]]] = {}


def job_created(*, namespace: str) -> None:
    """Count a FineTuneJob the operator started handling."""
    JOBS_CREATED.labels(namespace=namespace).inc()


def job_retried(*, namespace: str) -> None:
    """Count a retry (a new trainer pod after a retryable failure)."""
    JOBS_RETRIED.labels(namespace=namespace).inc()


def job_finished(
    *, namespace: str, name: str, phase: str, reason: str | None, duration_s: float | None
) -> None:
    """Count a job that reached `Succeeded` or `Failed` and observe its duration.

    The histogram's `result` label is the phase in lower case (`succeeded` or `failed`).
    """
    del name  # totals are per namespace; the per-job series are the gauges
    if phase == "Succeeded":
        JOBS_SUCCEEDED.labels(namespace=namespace).inc()
    elif phase == "Failed":
        JOBS_FAILED.labels(namespace=namespace, reason=reason or "Unknown").inc()
    else:
        raise ValueError(f"job_finished: phase must be Succeeded or Failed, not {phase!r}")
    if duration_s is not None and duration_s >= 0:
        JOB_DURATION.labels(namespace=namespace, result=phase.lower()).observe(duration_s)


def set_phase(*, namespace: str, name: str, phase: str | None) -> None:
    """Record the job's phase (None: the job is gone) and recount `finetune_jobs` for its namespace."""
    with _lock:
        key = (namespace, name)
        if phase is not None and _phases.get(key) == phase:
            return  # called on every reconcile: nothing changed, the counts are right
        if phase is None:
            _phases.pop(key, None)
        else:
            _phases[key] = phase
        if phase != "Running":
            # A job that is not training has no current stage: finetune_job_stage == 1 means
            # "training now" to the dashboard's running-jobs table and the stalled alert.
            for gauge, labels in _job_series.get(key, set()):
                if gauge is JOB_STAGE:
                    gauge.labels(*labels).set(0.0)
        counts: dict[str, int] = dict.fromkeys(PHASES, 0)
        for (ns, _), ph in _phases.items():
            if ns == namespace:
                counts[ph] = counts.get(ph, 0) + 1
        if not any(counts.values()):
            for ph in counts:
                _remove(JOBS, (namespace, ph))
            return
        for ph, n in counts.items():
            JOBS.labels(namespace=namespace, phase=ph).set(n)


def status_write(*, source: str) -> None:
    """Count one write of a FineTuneJob's status (`reconcile` or `progress`)."""
    STATUS_WRITES.labels(source=source).inc()


def reconcile_error(*, handler: str) -> None:
    """Count one error raised by a handler (or by the progress hub's status writes: `progress`)."""
    RECONCILE_ERRORS.labels(handler=handler).inc()


def progress_report(*, result: str) -> None:
    """Count one progress report by outcome (one of `REPORT_RESULTS`)."""
    PROGRESS_REPORTS.labels(result=result).inc()


def token_review(*, result: str) -> None:
    """Count one token check that reached the API server, by verdict (one of `TOKEN_REVIEW_RESULTS`)."""
    TOKEN_REVIEWS.labels(result=result).inc()


def token_check(*, result: str) -> None:
    """Count one new token's check before any review, by outcome (one of `TOKEN_CHECK_RESULTS`)."""
    TOKEN_CHECKS.labels(result=result).inc()


def observe_progress(
    *,
    namespace: str,
    name: str,
    stage: str,
    epoch: int,
    progress_ratio: float,
    metrics: Mapping[str, float],
    images_per_second: float | None,
    eta_seconds: float | None,
    timestamp: float,
) -> None:
    """Update the job's per-job series from one accepted progress report."""
    with _lock:
        series = _job_series.setdefault((namespace, name), set())

        def put(gauge: Gauge, labels: tuple[str, ...], value: float) -> None:
            gauge.labels(*labels).set(value)
            series.add((gauge, labels))

        put(JOB_PROGRESS, (namespace, name), min(max(progress_ratio, 0.0), 1.0))
        put(JOB_EPOCH, (namespace, name, stage), float(epoch))
        for each in _stages_with(stage):
            put(JOB_STAGE, (namespace, name, each), 1.0 if each == stage else 0.0)
        for split, prefix in (("train", ""), ("validation", "val_")):
            loss = metrics.get(f"{prefix}loss")
            if loss is not None and math.isfinite(loss):
                put(JOB_LOSS, (namespace, name, stage, split), loss)
            acc = metrics.get(f"{prefix}accuracy")
            if acc is not None and math.isfinite(acc):
                put(JOB_ACCURACY, (namespace, name, stage, split), acc)
        if images_per_second is not None:
            put(JOB_IMAGES_PER_SECOND, (namespace, name), images_per_second)
        if eta_seconds is not None:
            put(JOB_ETA, (namespace, name), eta_seconds)
        put(JOB_LAST_PROGRESS, (namespace, name), timestamp)


def job_reconciled(*, namespace: str, name: str, resource_version: str) -> None:
    """A reconcile pass of the job, over the body at `resource_version`, has completed."""
    if not resource_version.isdigit():
        return  # opaque to clients: only shown where the server happens to use integers
    with _lock:
        JOB_RECONCILED.labels(namespace, name).set(float(resource_version))
        _job_series.setdefault((namespace, name), set()).add((JOB_RECONCILED, (namespace, name)))


def forget_job(*, namespace: str, name: str) -> None:
    """Remove every per-job series of the job, and its phase from `finetune_jobs`."""
    with _lock:
        for gauge, labels in _job_series.pop((namespace, name), set()):
            _remove(gauge, labels)
    set_phase(namespace=namespace, name=name, phase=None)


def start_metrics_server(*, host: str, port: int) -> int:
    """Serve `/metrics` (this module's registry) and `/healthz` from a daemon thread; return the bound port."""
    metrics_app = make_wsgi_app(REGISTRY)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            result: Iterable[bytes] = metrics_app(environ, start_response)
            return result
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"ok\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found; try /metrics\n"]

    server = make_server(host, port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="finetune-metrics", daemon=True)
    thread.start()
    return int(server.server_port)


def _stages_with(stage: str) -> tuple[str, ...]:
    return STAGES if stage in STAGES else (*STAGES, stage)


def _remove(gauge: Gauge, labels: tuple[str, ...]) -> None:
    with contextlib.suppress(KeyError):
        gauge.remove(*labels)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""
