"""Helpers of the end-to-end tier: a real Prometheus on loopback, tiny image sets, `kubectl get` tables.

Prometheus is Debian's `/usr/bin/prometheus`, started per test with a temporary config and
storage folder, listening on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from finetune_testbed import polling
from finetune_testbed.net import free_port

__all__ = [
    "Prometheus",
    "ScrapeTarget",
    "free_port",
    "parse_table",
    "running_prometheus",
    "wait_until",
]


def wait_until(
    predicate: Callable[[], Any], *, timeout: float, interval: float = 0.2, what: str = "condition"
) -> Any:
    """Polls `predicate` until it returns something truthy; returns that, or fails after `timeout`."""
    try:
        return polling.wait_until(predicate, timeout=timeout, what=what, interval=interval)
    except polling.WaitTimeout:
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}") from None


def parse_table(text: str) -> list[dict[str, str]]:
    """Rows of `kubectl get` output, cut at the header's column starts (cells may be empty)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    header = lines[0]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    names = header.split()
    rows = []
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows.append(dict(zip(names, cells, strict=True)))
    return rows


@dataclass(frozen=True)
class ScrapeTarget:
    """One scrape job: a loopback port and the static labels a ServiceMonitor/PodMonitor would add."""

    job: str
    port: int
    labels: Mapping[str, str]
    honor_labels: bool = False


class Prometheus:
    """A running Prometheus and its HTTP API."""

    def __init__(self, *, url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.url = url
        self.process = process
        self.log_path = log_path

    def _get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(
                f"Prometheus {path} {dict(params or {})}: {exc.code} {exc.read()[:500]!r}"
            ) from exc
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; the vector's samples ({metric, value})."""
        data = self._get("/api/v1/query", {"query": expr})
        result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else []
        return result

    def query_range(self, expr: str, *, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        data = self._get(
            "/api/v1/query_range",
            {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step}"},
        )
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        targets: list[dict[str, Any]] = self._get("/api/v1/targets")["activeTargets"]
        return targets

    def rules(self) -> list[dict[str, Any]]:
        return [rule for group in self._get("/api/v1/rules")["groups"] for rule in group["rules"]]


@contextlib.contextmanager
def running_prometheus(
    *, workdir: Path, targets: Sequence[ScrapeTarget], rule_groups: Sequence[Mapping[str, Any]] = ()
) -> Iterator[Prometheus]:
    """Starts /usr/bin/prometheus on 127.0.0.1 scraping `targets` every second; stops it after."""
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    assert Path(binary).exists(), "prometheus missing: install Debian's prometheus package (make deps-debian)"
    workdir.mkdir(parents=True, exist_ok=True)
    rule_files = []
    if rule_groups:
        (workdir / "rules.yaml").write_text(yaml.safe_dump({"groups": list(rule_groups)}, sort_keys=False))
        rule_files.append(str(workdir / "rules.yaml"))
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": rule_files,
        "scrape_configs": [
            {
                "job_name": t.job,
                "honor_labels": t.honor_labels,
                "static_configs": [{"targets": [f"127.0.0.1:{t.port}"], "labels": dict(t.labels)}],
            }
            for t in targets
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    log_path = workdir / "prometheus.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    prometheus = Prometheus(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)

    def ready() -> bool:
        assert process.poll() is None, f"prometheus exited: {log_path.read_text()[-2000:]}"
        try:
            with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    try:
        wait_until(ready, timeout=60, what="prometheus to be ready")
        yield prometheus
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
