"""Reporting: progress reports to the operator, the trainer's /metrics, the termination message.

Three listeners of a training run, none of which may slow or stop it:

- `ProgressReporter` sends `protocol.ProgressReport`s to the operator's progress endpoint at
  every stage start and end, every epoch end, the final result, and (as a heartbeat) at most
  every 10 s inside a long epoch. The training thread only puts a report on a small bounded
  queue; a background thread POSTs it with a short timeout and a few retries. A full queue
  drops the oldest report (the newest carries the whole state anyway).
- `TrainerMetrics` keeps the trainer's Prometheus metrics in a registry of its own and serves
  them on $FINETUNE_METRICS_PORT for a PodMonitor.
- `write_termination_message` writes the JSON summary the operator reads when the pod ends.

Only the standard library talks HTTP here (urllib), so the trainer image needs nothing more.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

from finetune_contract.protocol import (
    ENV_JOB_NAME,
    ENV_JOB_NAMESPACE,
    ENV_JOB_UID,
    ENV_METRICS_PORT,
    ENV_PROGRESS_TOKEN,
    ENV_PROGRESS_TOKEN_FILE,
    ENV_PROGRESS_URL,
    MAX_METRIC_MAGNITUDE,
    PROGRESS_PATH,
    STAGES,
    TERMINATION_MESSAGE_MAX_BYTES,
    ProgressReport,
    Stage,
    TerminationSummary,
)
from finetune_contract.protocol import Event as ReportEvent
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from finetune_trainer.observer import TrainingObserver

__all__ = [
    "DEFAULT_TERMINATION_PATH",
    "REPORT_RESULTS",
    "ProgressReporter",
    "ReportResult",
    "TrainerMetrics",
    "build_observers",
    "write_termination_message",
]

log = logging.getLogger(__name__)

DEFAULT_TERMINATION_PATH = "/dev/termination-log"
ENV_TERMINATION_PATH = "FINETUNE_TERMINATION_LOG"

ReportResult = Literal["sent", "failed", "dropped"]
REPORT_RESULTS: tuple[ReportResult, ...] = ("sent", "failed", "dropped")

# Epoch metrics as Keras names them -> (kind, split) of the Prometheus series.
_SPLIT_METRICS: Mapping[str, tuple[Literal["loss", "accuracy"], Literal["train", "validation"]]] = {
    "loss": ("loss", "train"),
    "accuracy": ("accuracy", "train"),
    "val_loss": ("loss", "validation"),
    "val_accuracy": ("accuracy", "validation"),
}
_BATCH_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_FAILURE_LOG_INTERVAL_S = 60.0


def write_termination_message(*, summary: TerminationSummary, path: str | None = None) -> None:
    """Writes the JSON summary (at most 4 KiB) where the kubelet reads the termination message.

    The path is `path`, else $FINETUNE_TERMINATION_LOG, else /dev/termination-log when its
    folder exists (in a pod); a local run without either writes nothing. Never raises.
    """
    target = path or os.environ.get(ENV_TERMINATION_PATH) or DEFAULT_TERMINATION_PATH
    if target == DEFAULT_TERMINATION_PATH and not Path(target).exists():
        return
    data = summary.model_dump_json(by_alias=True)
    if len(data.encode()) > TERMINATION_MESSAGE_MAX_BYTES:
        room = max(0, len(summary.message) - (len(data.encode()) - TERMINATION_MESSAGE_MAX_BYTES) - 16)
        data = summary.model_copy(update={"message": summary.message[:room] + "..."}).model_dump_json(
            by_alias=True
        )
    data = data.encode()[:TERMINATION_MESSAGE_MAX_BYTES].decode(errors="ignore")
    with contextlib.suppress(OSError):
        Path(target).write_text(data, encoding="utf-8")


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics a report can carry: NaN, inf and absurd magnitudes (a diverging run) are left out."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        with contextlib.suppress(TypeError, ValueError):
            number = float(value)
            if math.isfinite(number) and abs(number) <= MAX_METRIC_MAGNITUDE:
                out[str(key)[:64]] = number
    return dict(list(out.items())[:32])


def _progress_endpoint(url: str) -> str:
    """The URL as given, with the protocol's path added when it names only a host."""
    parts = urllib.parse.urlsplit(url)
    if parts.path in ("", "/"):
        return urllib.parse.urlunsplit(parts._replace(path=PROGRESS_PATH))
    return url


class ProgressReporter:
    """Sends progress reports to the operator from a background thread (see the module doc)."""

    def __init__(
        self,
        *,
        url: str,
        token: str = "",
        token_file: Path | None = None,
        namespace: str,
        name: str,
        uid: str = "",
        heartbeat_s: float = 10.0,
        timeout_s: float = 2.0,
        attempts: int = 3,
        backoff_s: float = 0.5,
        queue_size: int = 16,
        flush_timeout_s: float = 5.0,
        on_result: Callable[[ReportResult], None] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = _progress_endpoint(url)
        if not token and token_file is None:
            raise ValueError("a progress token or token file is required")
        self._token, self._token_file = token, token_file
        self._namespace, self._name, self._uid = namespace, name, uid
        self._heartbeat_s = heartbeat_s
        self._timeout_s = timeout_s
        self._attempts = max(1, attempts)
        self._backoff_s = backoff_s
        self._flush_timeout_s = flush_timeout_s
        self._on_result = on_result
        self._clock = clock
        self._monotonic = monotonic
        # The endpoint is inside the cluster: a proxy from the environment would only be in the way.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        # What the next report says; only the training thread writes these.
        self._stage: Stage = STAGES[0]
        self._epoch = 0
        self._stage_epochs = 0
        self._epochs_done = 0
        self._stage_base = 0  # planned epochs done when the current stage started
        self._total_epochs = 0
        self._metrics: dict[str, float] = {}
        self._best_val_accuracy: float | None = None
        self._images_per_second: float | None = None
        self._epoch_seconds: float | None = None
        self._last_enqueued = monotonic()

        self._queue: collections.deque[bytes] = collections.deque()
        self._queue_size = max(1, queue_size)
        self._cond = threading.Condition()
        self._closing = False
        self._last_failure_log = -math.inf
        self._thread = threading.Thread(target=self._run, name="finetune-progress-reporter", daemon=True)
        self._thread.start()

    # -- TrainingObserver --------------------------------------------------------------------

    def on_stage_start(self, *, stage: Stage, stage_epochs: int, epochs_done: int, total_epochs: int) -> None:
        self._stage, self._stage_epochs, self._epoch = stage, stage_epochs, 0
        self._epochs_done, self._total_epochs = epochs_done, total_epochs
        self._stage_base = epochs_done
        self._submit(event="stage-start")

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
        self._stage, self._epoch, self._stage_epochs = stage, epoch, stage_epochs
        self._epochs_done, self._total_epochs = epochs_done, total_epochs
        self._metrics = _finite(metrics)
        if best_val_accuracy is not None and math.isfinite(best_val_accuracy):
            self._best_val_accuracy = best_val_accuracy
        if images_per_second is not None and math.isfinite(images_per_second) and images_per_second >= 0:
            self._images_per_second = images_per_second
        if math.isfinite(epoch_seconds) and epoch_seconds >= 0:
            self._epoch_seconds = epoch_seconds
        self._submit(event="epoch-end")

    def on_batch_end(
        self, *, stage: Stage, epoch: int, batch: int, batches: int | None, batch_seconds: float
    ) -> None:
        # Called for every batch: one clock read and a comparison unless a heartbeat is due.
        if self._monotonic() - self._last_enqueued >= self._heartbeat_s:
            self._submit(event="heartbeat")

    def on_stage_end(
        self, *, stage: Stage, epochs_run: int, stopped_early: bool, epochs_done: int, total_epochs: int
    ) -> None:
        self._stage, self._epoch = stage, epochs_run
        self._epochs_done, self._total_epochs = epochs_done, total_epochs
        self._submit(event="stage-end", message="stopped early" if stopped_early else "")

    def on_finish(
        self, *, result: Literal["succeeded", "failed"], metrics: dict[str, float], message: str
    ) -> None:
        if metrics:
            self._metrics = _finite(metrics)
        if result == "succeeded":
            self._epochs_done = self._total_epochs
        self._submit(event="final", result=result, message=message)
        self.close(timeout_s=self._flush_timeout_s)

    # -- the queue ---------------------------------------------------------------------------

    def close(self, *, timeout_s: float) -> None:
        """Sends what is queued, waiting at most `timeout_s`; later reports are dropped."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=max(0.0, timeout_s))
        with self._cond:
            left = len(self._queue)
            self._queue.clear()
        for _ in range(left):
            self._count("dropped")

    def _message(self) -> str:
        two = self._stage == "fine-tune" or self._stage_base + self._stage_epochs < self._total_epochs
        phases = 2 if two else 1
        phase = STAGES.index(self._stage) + 1 if phases == 2 else 1
        return f"phase {phase}/{phases}, epoch {self._epoch}/{self._stage_epochs}"

    def _submit(
        self,
        *,
        event: ReportEvent,
        result: Literal["succeeded", "failed"] | None = None,
        message: str | None = None,
    ) -> None:
        try:
            report = ProgressReport(
                namespace=self._namespace,
                name=self._name,
                uid=self._uid,
                event=event,
                stage=self._stage,
                epoch=max(0, self._epoch),
                stage_epochs=max(0, self._stage_epochs),
                epochs_done=max(0, self._epochs_done),
                total_epochs=max(0, self._total_epochs),
                metrics=self._metrics,
                best_val_accuracy=self._best_val_accuracy,
                images_per_second=self._images_per_second,
                epoch_seconds=self._epoch_seconds,
                timestamp=self._clock(),
                result=result,
                message=(message if message is not None else self._message())[:1024],
            )
            body = report.model_dump_json(by_alias=True).encode()
        except Exception:  # a bad value must not reach training
            log.debug("progress report not built", exc_info=True)
            return
        self._last_enqueued = self._monotonic()
        dropped = False
        with self._cond:
            if self._closing:
                dropped = True
            else:
                if len(self._queue) >= self._queue_size:
                    self._queue.popleft()
                    dropped = True
                self._queue.append(body)
                self._cond.notify()
        if dropped:
            self._count("dropped")

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                body = self._queue.popleft()
            self._deliver(body)

    def _deliver(self, body: bytes) -> None:
        for attempt in range(1, self._attempts + 1):
            retryable, why = self._post(body)
            if why is None:
                self._count("sent")
                return
            with self._cond:
                superseded = bool(self._queue)
            if not retryable or superseded or attempt == self._attempts:
                self._count("failed")
                self._log_failure(why)
                return
            time.sleep(self._backoff_s * 2 ** (attempt - 1))

    def _post(self, body: bytes) -> tuple[bool, str | None]:
        """(retryable, why it failed); why is None when the operator accepted the report."""
        try:
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self._current_token()}"}
        except OSError as exc:
            return True, f"token file unreadable: {exc}"
        request = urllib.request.Request(self._url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self._timeout_s) as response:
                response.read(4096)
            return False, None
        except urllib.error.HTTPError as exc:
            with contextlib.suppress(Exception):
                exc.read(4096)
                exc.close()
            return exc.code in _RETRYABLE_STATUS, f"HTTP {exc.code} {exc.reason}"
        except Exception as exc:  # refused, reset, timed out, DNS: all worth another try
            return True, f"{type(exc).__name__}: {exc}"

    def _current_token(self) -> str:
        """The fixed token, or the token file's content now (the kubelet rotates projected tokens)."""
        if self._token_file is None:
            return self._token
        return self._token_file.read_text().strip()

    def _count(self, result: ReportResult) -> None:
        if self._on_result is not None:
            with contextlib.suppress(Exception):
                self._on_result(result)

    def _log_failure(self, why: str) -> None:
        now = time.monotonic()
        if now - self._last_failure_log >= _FAILURE_LOG_INTERVAL_S:
            self._last_failure_log = now
            log.warning("progress report to %s failed (%s); training goes on", self._url, why)


class TrainerMetrics:
    """The trainer's Prometheus metrics, in a registry of its own, served by `serve`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._stage = Gauge(
            "finetune_trainer_stage",
            "1 for the training stage now running, 0 for the others.",
            ["stage"],
            registry=self.registry,
        )
        self._epoch = Gauge(
            "finetune_trainer_epoch", "Epochs completed within the stage.", ["stage"], registry=self.registry
        )
        self._loss = Gauge(
            "finetune_trainer_loss",
            "Loss at the last epoch end, by split (train|validation).",
            ["stage", "split"],
            registry=self.registry,
        )
        self._accuracy = Gauge(
            "finetune_trainer_accuracy",
            "Accuracy at the last epoch end, by split (train|validation).",
            ["stage", "split"],
            registry=self.registry,
        )
        self._images_per_second = Gauge(
            "finetune_trainer_images_per_second",
            "Training throughput of the last epoch, images per second.",
            ["stage"],
            registry=self.registry,
        )
        self._batch_seconds = Histogram(
            "finetune_trainer_batch_seconds",
            "Wall seconds per training batch.",
            ["stage"],
            buckets=_BATCH_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self._reports = Counter(
            "finetune_trainer_progress_reports",
            "Progress reports to the operator, by result (sent|failed|dropped).",
            ["result"],
            registry=self.registry,
        )
        for result in REPORT_RESULTS:
            self._reports.labels(result=result)
        self._server: object | None = None
        self._shutdown: Callable[[], None] | None = None

    def serve(self, *, port: int, host: str = "0.0.0.0") -> int:
        """Serves /metrics on host:port (0 picks a free port); returns the bound port. Raises OSError."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        self._shutdown = server.shutdown
        return int(server.server_port)

    def close(self) -> None:
        """Stops serving (tests; a pod just exits)."""
        if self._shutdown is not None:
            self._shutdown()
            self._shutdown = None

    def count_report(self, result: ReportResult) -> None:
        """Counts one progress report by result; `ProgressReporter(on_result=...)` calls it."""
        self._reports.labels(result=result).inc()

    # -- TrainingObserver --------------------------------------------------------------------

    def on_stage_start(self, *, stage: Stage, stage_epochs: int, epochs_done: int, total_epochs: int) -> None:
        for known in STAGES:
            self._stage.labels(stage=known).set(1.0 if known == stage else 0.0)
        self._epoch.labels(stage=stage).set(0)

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
        try:
            self._epoch.labels(stage=stage).set(epoch)
            for key, (kind, split) in _SPLIT_METRICS.items():
                if key in metrics:
                    gauge = self._loss if kind == "loss" else self._accuracy
                    gauge.labels(stage=stage, split=split).set(float(metrics[key]))
            if images_per_second is not None:
                self._images_per_second.labels(stage=stage).set(images_per_second)
        except Exception:
            log.debug("trainer metrics not updated", exc_info=True)

    def on_batch_end(
        self, *, stage: Stage, epoch: int, batch: int, batches: int | None, batch_seconds: float
    ) -> None:
        with contextlib.suppress(Exception):
            self._batch_seconds.labels(stage=stage).observe(batch_seconds)

    def on_stage_end(
        self, *, stage: Stage, epochs_run: int, stopped_early: bool, epochs_done: int, total_epochs: int
    ) -> None:
        self._epoch.labels(stage=stage).set(epochs_run)

    def on_finish(
        self, *, result: Literal["succeeded", "failed"], metrics: dict[str, float], message: str
    ) -> None:
        """Nothing to flush: Prometheus pulls."""


def _metrics_port() -> int:
    raw = os.environ.get(ENV_METRICS_PORT, "").strip()
    try:
        port = int(raw) if raw else 0
    except ValueError:
        log.warning("%s=%r is not a port number; /metrics not served", ENV_METRICS_PORT, raw)
        return 0
    return port if 0 < port < 65536 else 0


def build_observers(*, progress_url: str | None) -> list[TrainingObserver]:
    """The observers a run reports to: the operator's progress endpoint and /metrics, when configured.

    /metrics is served when $FINETUNE_METRICS_PORT is a port; a port already taken is logged
    and skipped. Progress goes to `progress_url` (else $FINETUNE_PROGRESS_URL) when the job's
    token ($FINETUNE_PROGRESS_TOKEN_FILE, or a fixed $FINETUNE_PROGRESS_TOKEN) and identity ($FINETUNE_JOB_NAMESPACE, _NAME, _UID) are known.
    """
    observers: list[TrainingObserver] = []
    metrics: TrainerMetrics | None = None
    port = _metrics_port()
    if port:
        metrics = TrainerMetrics()
        try:
            metrics.serve(port=port)
            observers.append(metrics)
        except OSError as exc:
            log.warning("trainer /metrics not served on port %d: %s", port, exc)
            metrics = None

    url = progress_url or os.environ.get(ENV_PROGRESS_URL, "").strip()
    token = os.environ.get(ENV_PROGRESS_TOKEN, "").strip()
    token_file = os.environ.get(ENV_PROGRESS_TOKEN_FILE, "").strip()
    namespace = os.environ.get(ENV_JOB_NAMESPACE, "").strip()
    name = os.environ.get(ENV_JOB_NAME, "").strip()
    if url and (token or token_file) and namespace and name:
        observers.append(
            ProgressReporter(
                url=url,
                token=token,
                token_file=Path(token_file) if token_file else None,
                namespace=namespace,
                name=name,
                uid=os.environ.get(ENV_JOB_UID, "").strip(),
                on_result=metrics.count_report if metrics is not None else None,
            )
        )
    elif url:
        missing = [
            env
            for env, value in (
                (f"{ENV_PROGRESS_TOKEN_FILE} (or {ENV_PROGRESS_TOKEN})", token or token_file),
                (ENV_JOB_NAMESPACE, namespace),
                (ENV_JOB_NAME, name),
            )
            if not value
        ]
        log.warning("progress URL given but %s unset; progress is not reported", ", ".join(missing))
    return observers
