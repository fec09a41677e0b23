"""Starting `finetune-operator` outside a cluster, as its ServiceAccount: shared by hack/ tools.

`make demo` (hack/demo.py) and `make bench` (hack/bench_operator.py) run the operator as a
local process against the local control plane, under the RBAC of deploy/ like a real
deployment: `write_service_account_kubeconfig` mints a TokenRequest token for the operator's
ServiceAccount and writes a kubeconfig holding only that token; `start` launches the
operator and returns once its health endpoint answers; given a `pidfile` (make demo passes
`.cluster/pids/attached/demo-operator.pid`), it records the process there the moment it
starts, so that `hack/cluster.py down` stops it with the control plane even when whoever
started it is gone. (The tests have their own launcher, tests/fixtures/operator.py, with
pytest's fixtures around it.)
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from finetune_testbed import kubeconfigs
from finetune_testbed.net import free_port

__all__ = ["NEEDLE", "OperatorStartError", "free_port", "start", "write_service_account_kubeconfig"]

ROOT = Path(__file__).resolve().parents[2]
# In the operator's command line (`python -m finetune_operator ...`): a pid file holds
# "PID NEEDLE", and whoever stops it by pid checks the needle first (the pid may be reused).
NEEDLE = "finetune_operator"


class OperatorStartError(RuntimeError):
    """The operator exited, or did not answer its health endpoint in time."""


def write_service_account_kubeconfig(
    *, kubectl: Path, admin_kubeconfig: Path, path: Path, namespace: str, name: str, duration: str = "24h"
) -> Path:
    """Writes `path`: a kubeconfig that authenticates as ServiceAccount namespace/name (TokenRequest)."""
    try:
        token = kubeconfigs.mint_token(
            kubectl=kubectl, admin_kubeconfig=admin_kubeconfig, namespace=namespace, name=name, duration=duration
        )
    except kubeconfigs.KubeconfigError as exc:
        raise OperatorStartError(str(exc)) from exc
    config = kubeconfigs.token_kubeconfig(
        cluster=kubeconfigs.admin_cluster(admin_kubeconfig),
        user=kubeconfigs.service_account_user(namespace=namespace, name=name), token=token, context="operator",
    )
    return kubeconfigs.write(path, config)


def start(
    *,
    args: Sequence[str],
    kubeconfig: Path,
    health_port: int,
    log: Path,
    python_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout_s: float = 90.0,
    pidfile: Path | None = None,
) -> subprocess.Popen[bytes]:
    """`python [python_args] -m finetune_operator --health-port=P ARGS` with KUBECONFIG set, in
    its own session, logging to `log`; returns once /healthz answers (OperatorStartError if not).

    `pidfile`, when given, gets "PID finetune_operator" as soon as the process exists (the
    format hack/cluster.py's `down` reads under .cluster/pids/attached/)."""
    argv = [sys.executable, *python_args, "-m", "finetune_operator", f"--health-port={health_port}", *args]
    environ = {**os.environ, **(env or {}), "KUBECONFIG": str(kubeconfig)}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(
            argv, cwd=ROOT, env=environ, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    if pidfile is not None:
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        pidfile.write_text(f"{process.pid} {NEEDLE}\n", encoding="utf-8")
    health = f"http://127.0.0.1:{health_port}/healthz"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise OperatorStartError(f"finetune-operator exited with {process.returncode}; see {log}")
        with contextlib.suppress(OSError), urllib.request.urlopen(health, timeout=2) as answer:
            if answer.status == 200:
                return process
        time.sleep(0.3)
    process.terminate()
    raise OperatorStartError(f"finetune-operator did not answer {health} within {timeout_s:g} s; see {log}")
