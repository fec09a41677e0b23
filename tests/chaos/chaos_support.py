"""What both chaos tests need around the real control plane and the real operator.

- `raw_request`: one admin API call with an exact body (bytes no serialiser rewrites:
  raw `NaN`, invalid UTF-8, nesting too deep for `json.dumps`), answering (status, Status
  message); never raises on 4xx/5xx.
- `operator_kubeconfig`: a TokenRequest kubeconfig of a ServiceAccount in finetune-system
  bound to the operator's ClusterRole (deploy/base/rbac.yaml), so its API calls can be told
  apart from other operators' in the audit log.
- `StatusRecorder`: polls one namespace's FineTuneJobs (a LIST a second, decoded with a raised
  recursion limit: some objects nest thousands of levels) and remembers, per name, when a
  terminal phase was first seen and every status.
- `operator_problems`: exits and tracebacks of an operator, from its process and log.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from fixtures.cluster import Cluster
from fixtures.jobs import mint_kubeconfig
from fixtures.operator import OPERATOR_NS, OperatorProcess

__all__ = [
    "FTJ_PATH",
    "StatusRecorder",
    "deep_loads",
    "operator_kubeconfig",
    "operator_problems",
    "raw_request",
    "remove_operator_identity",
]

FTJ_PATH = "/apis/finetune.dev/v1alpha1/namespaces/{namespace}/finetunejobs"
TERMINAL = ("Succeeded", "Failed")


def deep_loads(data: bytes | str) -> Any:
    """json.loads of text that may nest a few thousand levels deep."""
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(max(previous, 30_000))
    try:
        return json.loads(data)
    finally:
        sys.setrecursionlimit(previous)


def raw_request(
    api: Any, method: str, path: str, *, body: bytes | None = None, content_type: str = "application/json",
    timeout: float = 60.0,
) -> tuple[int, str, bytes]:
    """(HTTP status, the Status message or "", raw body) of one call through `api` (an admin ApiClient)."""
    headers = {"Content-Type": content_type, "Accept": "application/json"}
    resp = api.rest_client.pool_manager.request(
        method, api.configuration.host + path, body=body, headers=headers, preload_content=True, timeout=timeout
    )
    data = bytes(resp.data)
    message = ""
    if resp.status >= 300:
        try:
            parsed = json.loads(data)
            message = str(parsed.get("message", "")) if isinstance(parsed, dict) else data.decode(errors="replace")
        except ValueError:
            message = data.decode(errors="replace")
    return int(resp.status), message, data


def operator_kubeconfig(cluster: Cluster, *, name: str, path: Path) -> Path:
    """A kubeconfig of ServiceAccount finetune-system/NAME, bound to ClusterRole finetune-operator."""
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "finetune-operator"},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": OPERATOR_NS}],
    }
    cluster.kubectl_run("apply", "-f", "-", input=yaml.safe_dump(binding))
    return mint_kubeconfig(cluster, name=name, path=path)


def remove_operator_identity(cluster: Cluster, *, name: str) -> None:
    cluster.kubectl_run("delete", "clusterrolebinding", name, "--ignore-not-found", check=False)
    cluster.kubectl_run("delete", "sa", name, "-n", OPERATOR_NS, "--ignore-not-found", check=False)


@dataclass
class StatusRecorder:
    """Every distinct status of a namespace's FineTuneJobs, and when each first turned terminal."""

    api: Any
    namespace: str
    interval: float = 1.0
    statuses: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    terminal_at: dict[str, float] = field(default_factory=dict)  # time.monotonic()
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def poll_once(self) -> None:
        code, message, data = raw_request(self.api, "GET", FTJ_PATH.format(namespace=self.namespace))
        seen_at = time.monotonic()
        if code != 200:
            self.errors.append(f"LIST: HTTP {code}: {message[:200]}")
            return
        items = deep_loads(data).get("items") or []
        with self._lock:
            for item in items:
                name = str(item["metadata"]["name"])
                status = item.get("status") or {}
                history = self.statuses.setdefault(name, [])
                if not history or history[-1] != status:
                    history.append(status)
                if status.get("phase") in TERMINAL and name not in self.terminal_at:
                    self.terminal_at[name] = seen_at

    def latest(self, name: str) -> dict[str, Any]:
        with self._lock:
            history = self.statuses.get(name) or [{}]
            return dict(history[-1])

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as exc:  # a poll failing is recorded, the next one tries again
                self.errors.append(f"{type(exc).__name__}: {exc}"[:300])
            self._stop.wait(self.interval)

    @contextlib.contextmanager
    def running(self) -> Iterator[StatusRecorder]:
        thread = threading.Thread(target=self.run, daemon=True, name=f"status-{self.namespace}")
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(timeout=30)


def operator_problems(operator: OperatorProcess) -> list[str]:
    """Why the operator is not fine: it exited, or its log holds a traceback (with the lines after it)."""
    problems: list[str] = []
    if not operator.alive():
        code = operator.proc.returncode if operator.proc is not None else None
        problems.append(f"operator exited with {code}")
    log = operator.log.read_text(errors="replace") if operator.log.exists() else ""
    lines = log.splitlines()
    for index, line in enumerate(lines):
        if "Traceback" in line:
            problems.append("traceback in the operator log:\n" + "\n".join(lines[max(0, index - 2) : index + 25]))
            if len(problems) > 5:
                break
    return problems
