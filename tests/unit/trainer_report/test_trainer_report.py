"""The trainer's reporting: progress reports to the operator, /metrics, the termination message.

A real HTTP server on loopback stands in for the operator's progress endpoint; it records what
arrives, or answers 500/401, or never answers at all. Training callbacks must return at once
whatever it does.
"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from finetune_contract.protocol import PROGRESS_PATH, ProgressReport, TerminationSummary
from finetune_testbed.net import free_port
from finetune_testbed.polling import wait_until
from finetune_trainer import report
from prometheus_client.parser import text_string_to_metric_families

TOKEN = "s3cret-token"


@dataclass
class Endpoint:
    """A recording progress endpoint."""

    url: str
    status: int = 202
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reports(self) -> list[ProgressReport]:
        with self.lock:
            return [ProgressReport.model_validate_json(body) for _, _, body in self.requests]

    def count(self) -> int:
        with self.lock:
            return len(self.requests)


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    ep = Endpoint(url="")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with ep.lock:
                ep.requests.append((self.path, dict(self.headers.items()), body))
            self.send_response(ep.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    ep.url = f"http://127.0.0.1:{server.server_port}{PROGRESS_PATH}"
    yield ep
    server.shutdown()
    server.server_close()


@pytest.fixture
def hanging_url() -> Iterator[str]:
    """An endpoint that accepts connections (in the kernel's backlog) and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}{PROGRESS_PATH}"
    sock.close()


def epoch_end(observer: Any, *, stage: str = "head", epoch: int = 1, **metrics: float) -> None:
    observer.on_epoch_end(
        stage=stage,
        epoch=epoch,
        stage_epochs=3,
        epochs_done=epoch if stage == "head" else 3 + epoch,
        total_epochs=5,
        metrics=metrics
        or {"loss": 1.0 / epoch, "accuracy": 0.5, "val_loss": 1.1, "val_accuracy": 0.4 + epoch / 10},
        best_val_accuracy=0.4 + epoch / 10,
        images_per_second=123.0,
        epoch_seconds=2.5,
    )


def two_phase_run(observer: Any) -> None:
    """What train.py calls for a head stage of 3 planned epochs and a fine-tune stage of 2."""
    observer.on_stage_start(stage="head", stage_epochs=3, epochs_done=0, total_epochs=5)
    for epoch in (1, 2, 3):
        observer.on_batch_end(stage="head", epoch=epoch, batch=0, batches=4, batch_seconds=0.02)
        epoch_end(observer, stage="head", epoch=epoch)
    observer.on_stage_end(stage="head", epochs_run=3, stopped_early=False, epochs_done=3, total_epochs=5)
    observer.on_stage_start(stage="fine-tune", stage_epochs=2, epochs_done=3, total_epochs=5)
    observer.on_batch_end(stage="fine-tune", epoch=1, batch=0, batches=4, batch_seconds=0.04)
    observer.on_epoch_end(
        stage="fine-tune",
        epoch=1,
        stage_epochs=2,
        epochs_done=4,
        total_epochs=5,
        metrics={"loss": 0.3, "accuracy": 0.9, "val_loss": 0.35, "val_accuracy": 0.85},
        best_val_accuracy=0.85,
        images_per_second=99.0,
        epoch_seconds=3.0,
    )
    observer.on_stage_end(stage="fine-tune", epochs_run=1, stopped_early=True, epochs_done=5, total_epochs=5)
    observer.on_finish(result="succeeded", metrics={"val_accuracy": 0.85}, message="saved")


def reporter(url: str, **kwargs: Any) -> report.ProgressReporter:
    return report.ProgressReporter(url=url, token=TOKEN, namespace="ml", name="flowers", uid="u-1", **kwargs)


class TestProgressReporter:
    def test_sends_every_event_in_order_with_the_jobs_token(self, endpoint: Endpoint) -> None:
        results: list[str] = []
        two_phase_run(reporter(endpoint.url, on_result=results.append))

        reports = endpoint.reports()
        assert [(r.event, r.stage, r.epoch) for r in reports] == [
            ("stage-start", "head", 0),
            ("epoch-end", "head", 1),
            ("epoch-end", "head", 2),
            ("epoch-end", "head", 3),
            ("stage-end", "head", 3),
            ("stage-start", "fine-tune", 0),
            ("epoch-end", "fine-tune", 1),
            ("stage-end", "fine-tune", 1),
            ("final", "fine-tune", 1),
        ]
        assert results == ["sent"] * len(reports)
        for path, headers, body in endpoint.requests:
            assert path == PROGRESS_PATH
            assert headers["Authorization"] == f"Bearer {TOKEN}"
            assert headers["Content-Type"] == "application/json"
            assert "stageEpochs" in json.loads(body)  # camelCase on the wire
        assert {(r.namespace, r.name, r.uid) for r in reports} == {("ml", "flowers", "u-1")}
        head_epoch2 = reports[2]
        assert head_epoch2.metrics["val_accuracy"] == pytest.approx(0.6)
        assert (head_epoch2.epochs_done, head_epoch2.total_epochs, head_epoch2.stage_epochs) == (2, 5, 3)
        assert head_epoch2.images_per_second == 123.0
        assert head_epoch2.message == "phase 1/2, epoch 2/3"
        final = reports[-1]
        assert (final.result, final.epochs_done, final.message) == ("succeeded", 5, "saved")
        assert final.best_val_accuracy == pytest.approx(0.85)

    def test_a_url_naming_only_the_host_gets_the_protocol_path(self, endpoint: Endpoint) -> None:
        base = endpoint.url.removesuffix(PROGRESS_PATH)
        r = reporter(base)
        r.on_stage_start(stage="head", stage_epochs=1, epochs_done=0, total_epochs=1)
        r.close(timeout_s=5)
        assert [path for path, _, _ in endpoint.requests] == [PROGRESS_PATH]

    def test_heartbeats_inside_a_long_epoch_at_most_every_ten_seconds(self, endpoint: Endpoint) -> None:
        now = [1000.0]
        r = reporter(endpoint.url, monotonic=lambda: now[0])
        r.on_stage_start(stage="head", stage_epochs=3, epochs_done=0, total_epochs=3)
        for batch in range(250):  # 25 s of 0.1 s batches, no epoch end
            now[0] += 0.1
            r.on_batch_end(stage="head", epoch=1, batch=batch, batches=None, batch_seconds=0.1)
        r.close(timeout_s=5)
        events = [x.event for x in endpoint.reports()]
        assert events == ["stage-start", "heartbeat", "heartbeat"]

    def test_an_epoch_end_restarts_the_heartbeat_interval(self, endpoint: Endpoint) -> None:
        now = [0.0]
        r = reporter(endpoint.url, monotonic=lambda: now[0])
        r.on_stage_start(stage="head", stage_epochs=3, epochs_done=0, total_epochs=3)
        now[0] = 9.0
        epoch_end(r, epoch=1)
        now[0] = 15.0  # 15 s after the stage start, 6 s after the epoch end
        r.on_batch_end(stage="head", epoch=2, batch=0, batches=None, batch_seconds=0.1)
        now[0] = 19.5
        r.on_batch_end(stage="head", epoch=2, batch=1, batches=None, batch_seconds=0.1)
        r.close(timeout_s=5)
        reports = endpoint.reports()
        assert [x.event for x in reports] == ["stage-start", "epoch-end", "heartbeat"]
        assert reports[-1].epoch == 1  # a heartbeat says the epochs completed so far

    def test_non_finite_metrics_are_left_out_of_the_report(self, endpoint: Endpoint) -> None:
        r = reporter(endpoint.url)
        epoch_end(r, loss=float("nan"), accuracy=0.5, val_loss=float("inf"), val_accuracy=0.25)
        r.close(timeout_s=5)
        assert endpoint.reports()[0].metrics == {"accuracy": 0.5, "val_accuracy": 0.25}

    def test_server_errors_are_retried_a_bounded_number_of_times(self, endpoint: Endpoint) -> None:
        endpoint.status = 500
        results: list[str] = []
        r = reporter(endpoint.url, attempts=3, backoff_s=0.01, on_result=results.append)
        r.on_stage_start(stage="head", stage_epochs=1, epochs_done=0, total_epochs=1)
        r.close(timeout_s=5)
        assert endpoint.count() == 3
        assert results == ["failed"]

    def test_a_failing_endpoint_never_slows_training(self, endpoint: Endpoint) -> None:
        endpoint.status = 500
        results: list[str] = []
        r = reporter(
            endpoint.url, flush_timeout_s=1.0, on_result=results.append
        )  # default 0.5 s, 1 s backoff
        slowest = 0.0
        for epoch in range(1, 31):
            t0 = time.monotonic()
            epoch_end(r, epoch=epoch)
            r.on_batch_end(stage="head", epoch=epoch, batch=0, batches=1, batch_seconds=0.01)
            slowest = max(slowest, time.monotonic() - t0)
        t0 = time.monotonic()
        r.on_finish(result="failed", metrics={}, message="x")
        assert slowest < 0.05, slowest
        assert time.monotonic() - t0 < 1.5
        assert "sent" not in results and "failed" in results

    @pytest.mark.parametrize("status", [400, 401, 403, 409, 410, 413])
    def test_refusals_are_not_retried(self, endpoint: Endpoint, status: int) -> None:
        endpoint.status = status
        results: list[str] = []
        r = reporter(endpoint.url, attempts=3, backoff_s=0.01, on_result=results.append)
        r.on_stage_start(stage="head", stage_epochs=1, epochs_done=0, total_epochs=1)
        r.close(timeout_s=5)
        assert endpoint.count() == 1
        assert results == ["failed"]

    def test_a_hanging_endpoint_never_slows_training(self, hanging_url: str) -> None:
        results: list[str] = []
        r = reporter(hanging_url, heartbeat_s=0.0, flush_timeout_s=1.0, on_result=results.append)
        slowest = 0.0
        started = time.monotonic()
        r.on_stage_start(stage="head", stage_epochs=100, epochs_done=0, total_epochs=100)
        for epoch in range(1, 101):
            for batch in range(5):
                t0 = time.monotonic()
                r.on_batch_end(stage="head", epoch=epoch, batch=batch, batches=5, batch_seconds=0.01)
                slowest = max(slowest, time.monotonic() - t0)
            t0 = time.monotonic()
            epoch_end(r, epoch=epoch)
            slowest = max(slowest, time.monotonic() - t0)
        training = time.monotonic() - started
        t0 = time.monotonic()
        r.on_finish(result="succeeded", metrics={}, message="")
        finishing = time.monotonic() - t0

        # 600 callbacks while every POST waits 2 s for an answer that never comes.
        assert slowest < 0.05, slowest
        assert training < 1.0, training
        assert finishing < 1.5, finishing  # on_finish waits at most flush_timeout_s
        assert "sent" not in results
        assert results.count("dropped") >= 600 - 16 - 1  # the queue stays bounded

    def test_a_refused_connection_is_counted_and_training_goes_on(self) -> None:
        results: list[str] = []
        r = reporter(
            f"http://127.0.0.1:{free_port()}{PROGRESS_PATH}", backoff_s=0.01, on_result=results.append
        )
        t0 = time.monotonic()
        epoch_end(r, epoch=1)
        assert time.monotonic() - t0 < 0.05
        r.close(timeout_s=5)
        assert results == ["failed"]

    def test_reports_after_the_finish_are_dropped(self, endpoint: Endpoint) -> None:
        results: list[str] = []
        r = reporter(endpoint.url, on_result=results.append)
        r.on_finish(result="failed", metrics={}, message="boom")
        epoch_end(r, epoch=2)
        assert [x.event for x in endpoint.reports()] == ["final"]
        assert results == ["sent", "dropped"]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def trainer_metrics() -> Iterator[tuple[report.TrainerMetrics, int]]:
    metrics = report.TrainerMetrics()
    port = metrics.serve(port=0, host="127.0.0.1")
    yield metrics, port
    metrics.close()


class TestTrainerMetrics:
    def test_serves_stage_epoch_loss_accuracy_throughput_and_batch_time(
        self, trainer_metrics: tuple[report.TrainerMetrics, int]
    ) -> None:
        metrics, port = trainer_metrics
        two_phase_run(metrics)
        metrics.count_report("sent")
        metrics.count_report("sent")
        metrics.count_report("dropped")
        got = samples(scrape(port))

        assert got[("finetune_trainer_stage", (("stage", "fine-tune"),))] == 1
        assert got[("finetune_trainer_stage", (("stage", "head"),))] == 0
        assert got[("finetune_trainer_epoch", (("stage", "head"),))] == 3
        assert got[("finetune_trainer_epoch", (("stage", "fine-tune"),))] == 1
        assert got[
            ("finetune_trainer_accuracy", (("split", "validation"), ("stage", "head")))
        ] == pytest.approx(0.7)
        assert got[
            ("finetune_trainer_accuracy", (("split", "train"), ("stage", "fine-tune")))
        ] == pytest.approx(0.9)
        assert got[
            ("finetune_trainer_loss", (("split", "validation"), ("stage", "fine-tune")))
        ] == pytest.approx(0.35)
        assert got[("finetune_trainer_images_per_second", (("stage", "head"),))] == 123.0
        assert got[("finetune_trainer_batch_seconds_count", (("stage", "head"),))] == 3
        assert got[("finetune_trainer_batch_seconds_sum", (("stage", "fine-tune"),))] == pytest.approx(0.04)
        assert got[("finetune_trainer_progress_reports_total", (("result", "sent"),))] == 2
        assert got[("finetune_trainer_progress_reports_total", (("result", "dropped"),))] == 1
        assert got[("finetune_trainer_progress_reports_total", (("result", "failed"),))] == 0

    def test_a_nan_loss_shows_as_nan(self, trainer_metrics: tuple[report.TrainerMetrics, int]) -> None:
        metrics, port = trainer_metrics
        epoch_end(metrics, loss=float("nan"), accuracy=0.1)
        value = samples(scrape(port))[("finetune_trainer_loss", (("split", "train"), ("stage", "head")))]
        assert value != value

    def test_exposition_passes_promtool_lint(
        self, trainer_metrics: tuple[report.TrainerMetrics, int]
    ) -> None:
        promtool = shutil.which("promtool")
        assert promtool, "promtool missing: install Debian's prometheus package (make deps-debian)"
        metrics, port = trainer_metrics
        two_phase_run(metrics)
        done = subprocess.run(
            [promtool, "check", "metrics"], input=scrape(port), capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stdout + done.stderr


class TestBuildObservers:
    @pytest.fixture(autouse=True)
    def clean_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in (
            "FINETUNE_PROGRESS_URL",
            "FINETUNE_PROGRESS_TOKEN",
            "FINETUNE_PROGRESS_TOKEN_FILE",
            "FINETUNE_JOB_NAMESPACE",
            "FINETUNE_JOB_NAME",
            "FINETUNE_JOB_UID",
            "FINETUNE_METRICS_PORT",
        ):
            monkeypatch.delenv(name, raising=False)

    def job_env(self, monkeypatch: pytest.MonkeyPatch, url: str) -> None:
        monkeypatch.setenv("FINETUNE_PROGRESS_URL", url)
        monkeypatch.setenv("FINETUNE_PROGRESS_TOKEN", TOKEN)
        monkeypatch.setenv("FINETUNE_JOB_NAMESPACE", "ml")
        monkeypatch.setenv("FINETUNE_JOB_NAME", "flowers")
        monkeypatch.setenv("FINETUNE_JOB_UID", "u-9")

    def test_nothing_configured_means_no_observers(self) -> None:
        assert report.build_observers(progress_url=None) == []

    def test_env_gives_a_reporter_and_metrics_that_count_its_reports(
        self, monkeypatch: pytest.MonkeyPatch, endpoint: Endpoint
    ) -> None:
        self.job_env(monkeypatch, endpoint.url)
        port = free_port()
        monkeypatch.setenv("FINETUNE_METRICS_PORT", str(port))
        observers = report.build_observers(progress_url=None)
        metrics = next(o for o in observers if isinstance(o, report.TrainerMetrics))
        try:
            assert {type(o) for o in observers} == {report.TrainerMetrics, report.ProgressReporter}
            for observer in observers:
                observer.on_stage_start(stage="head", stage_epochs=1, epochs_done=0, total_epochs=1)
                observer.on_finish(result="succeeded", metrics={}, message="")
            assert [(r.uid, r.event) for r in endpoint.reports()] == [
                ("u-9", "stage-start"),
                ("u-9", "final"),
            ]
            got = samples(scrape(port))
            assert got[("finetune_trainer_progress_reports_total", (("result", "sent"),))] == 2
        finally:
            metrics.close()

    def test_the_flag_overrides_the_env_url(
        self, monkeypatch: pytest.MonkeyPatch, endpoint: Endpoint
    ) -> None:
        self.job_env(monkeypatch, f"http://127.0.0.1:{free_port()}/nowhere")
        (observer,) = report.build_observers(progress_url=endpoint.url)
        observer.on_finish(result="succeeded", metrics={}, message="")
        assert [r.event for r in endpoint.reports()] == ["final"]

    def test_a_url_without_a_token_reports_nothing_and_says_why(
        self, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        self.job_env(monkeypatch, "http://127.0.0.1:1/v1/progress")
        monkeypatch.delenv("FINETUNE_PROGRESS_TOKEN")
        assert report.build_observers(progress_url=None) == []
        assert "FINETUNE_PROGRESS_TOKEN" in caplog.text

    def test_the_token_file_is_read_at_every_report(
        self, monkeypatch: pytest.MonkeyPatch, endpoint: Endpoint, tmp_path: Path
    ) -> None:
        # In a pod the token is a projected ServiceAccount token that the kubelet rotates.
        self.job_env(monkeypatch, endpoint.url)
        monkeypatch.delenv("FINETUNE_PROGRESS_TOKEN")
        token_file = tmp_path / "token"
        token_file.write_text("first\n")
        monkeypatch.setenv("FINETUNE_PROGRESS_TOKEN_FILE", str(token_file))
        (observer,) = report.build_observers(progress_url=None)
        assert isinstance(observer, report.ProgressReporter)
        observer.on_stage_start(stage="head", stage_epochs=1, epochs_done=0, total_epochs=1)
        wait_until(lambda: endpoint.count() == 1, timeout=5.0, what="one report at the endpoint", interval=0.01)
        token_file.write_text("rotated\n")
        observer.on_finish(result="succeeded", metrics={}, message="")
        assert [h["Authorization"] for _, h, _ in endpoint.requests] == ["Bearer first", "Bearer rotated"]

    def test_a_taken_metrics_port_is_skipped(self, monkeypatch: pytest.MonkeyPatch) -> None:
        with socket.socket() as taken:
            taken.bind(("0.0.0.0", 0))
            taken.listen(1)
            monkeypatch.setenv("FINETUNE_METRICS_PORT", str(taken.getsockname()[1]))
            assert report.build_observers(progress_url=None) == []

    @pytest.mark.parametrize("value", ["0", "", "http", "70000"])
    def test_no_port_no_metrics(self, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
        monkeypatch.setenv("FINETUNE_METRICS_PORT", value)
        assert report.build_observers(progress_url=None) == []


class TestTerminationMessage:
    def test_writes_the_summary_as_json(self, tmp_path: Path) -> None:
        target = tmp_path / "termination-log"
        summary = TerminationSummary(
            exit_code=4, reason="Diverged", message="NaN loss", metrics={"loss": 9.0}
        )
        report.write_termination_message(summary=summary, path=str(target))
        assert TerminationSummary.model_validate_json(target.read_text()) == summary
        assert '"exitCode":4' in target.read_text()

    def test_a_long_message_is_cut_to_four_kib(self, tmp_path: Path) -> None:
        target = tmp_path / "termination-log"
        summary = TerminationSummary(exit_code=3, reason="DataError", message="x" * 10_000)
        report.write_termination_message(summary=summary, path=str(target))
        data = target.read_bytes()
        assert len(data) <= 4096
        parsed = TerminationSummary.model_validate_json(data)
        assert parsed.reason == "DataError"
        assert parsed.message.endswith("...")

    def test_env_path_is_used(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        target = tmp_path / "from-env"
        monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(target))
        report.write_termination_message(
            summary=TerminationSummary(exit_code=0, reason="Succeeded", message="")
        )
        assert TerminationSummary.model_validate_json(target.read_text()).reason == "Succeeded"
