"""`kubectl finetune` against the local control plane: the console script on real objects.

One operator (the fake trainer, as its ServiceAccount under deploy/base/rbac.yaml) watches a
restricted namespace for the module; the plugin runs as a subprocess with the admin
kubeconfig (or a ServiceAccount's, for the RBAC errors):

- `kubectl finetune list` found by kubectl itself on PATH; `list -A`;
- `watch` exits 0 on a Succeeded job and 1 on a Failed one, 3 on its timeout, with plain
  lines and the final metrics when stdout is a pipe;
- `describe` (failure reason, the trainer's message, conditions, attempts, events, output),
  `logs` (the latest attempt, `--attempt N`, `-f`), `suspend`/`resume` (spec.suspend and the
  phase the operator gives it);
- the errors: no such job (4), RBAC (6, naming the verb and the resource), no CRD (5, on a
  private control plane without it);
- the live view in a real terminal: tmux, `capture-pane` while the job trains through both
  stages (the second driven by progress reports with the pod's own token), then the final
  metrics and exit code 0.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures import jobs
from fixtures.cluster import Cluster, ServiceAccountKubeconfig, private_cluster, wait_for
from fixtures.jobs import operator_in_namespace, post_progress, progress_token
from fixtures.operator import OperatorProcess
from kubernetes import client

WAIT = 60.0
BIN = Path(sys.executable).parent
PLUGIN = BIN / "kubectl-finetune"
GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
EXIT_FAILED, EXIT_TIMEOUT, EXIT_NOT_FOUND, EXIT_NO_CRD, EXIT_FORBIDDEN = 1, 3, 4, 5, 6


@dataclass
class Env:
    cluster: Cluster
    namespace: str
    operator: OperatorProcess
    api: Any

    def plugin(
        self, *args: str, kubeconfig: Path | None = None, timeout: float = WAIT, namespaced: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """`kubectl-finetune ARGS -n NS` with KUBECONFIG (admin unless given); stdout is a pipe."""
        argv = [str(PLUGIN), *args, *(("-n", self.namespace) if namespaced else ())]
        environ = {**os.environ, "KUBECONFIG": str(kubeconfig or self.cluster.kubeconfig)}
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, env=environ)

    def apply(self, manifest: dict[str, Any]) -> None:
        self.cluster.kubectl_run("apply", "-n", self.namespace, "-f", "-", input=yaml.safe_dump(manifest))

    def ftj(self, name: str) -> dict[str, Any]:
        return dict(
            client.CustomObjectsApi(self.api).get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        )

    def wait_phase(self, name: str, phase: str, timeout: float = WAIT) -> dict[str, Any]:
        return wait_for(
            lambda: (s := self.ftj(name).get("status") or {}).get("phase") == phase and s,
            timeout=timeout,
            message=f"ftj/{name} phase {phase}",
        )


def manifest(name: str, *, env: dict[str, str] | None = None, head: int = 1, fine: int = 1, **runtime: Any) -> dict[str, Any]:
    body = jobs.ftj(name, output=f"/tmp/out-{name}", env=env, **runtime)
    body["spec"]["training"] = {"head": {"epochs": head}, "fineTune": {"epochs": fine}}
    return body


@pytest.fixture(scope="module")
def env(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    assert PLUGIN.exists(), f"{PLUGIN}: run `make setup` (the cli extra installs the console script)"
    tmp = tmp_path_factory.mktemp("plugin")
    with operator_in_namespace(cluster, tmp=tmp, prefix="ftj-plugin", pending_timeout=60) as (namespace, operator):
        api = cluster.api_client()
        try:
            yield Env(cluster=cluster, namespace=namespace, operator=operator, api=api)
        finally:
            with contextlib.suppress(Exception):
                api.close()


@pytest.fixture(scope="module")
def succeeded(env: Env) -> str:
    """A job that reported val_accuracy 0.75 (the fake trainer's one report) and Succeeded."""
    env.apply(manifest("done", env={"FAKE_REPORT": "1", "FAKE_MESSAGE": "hello from the trainer"}))
    env.wait_phase("done", "Succeeded")
    return "done"


@pytest.fixture(scope="module")
def failed(env: Env) -> str:
    """A job whose trainer exited 3 (DataError) with its own message."""
    env.apply(
        manifest("broken", env={"FAKE_EXIT": "3", "FAKE_REASON": "DataError", "FAKE_MESSAGE": "no images in /data/train"})
    )
    env.wait_phase("broken", "Failed")
    return "broken"


# ----- list -----


def test_kubectl_finds_the_plugin_and_lists_the_jobs(env: Env, succeeded: str) -> None:
    proc = subprocess.run(
        [str(env.cluster.kubectl), "finetune", "list", "-n", env.namespace],
        capture_output=True, text=True, timeout=WAIT, check=False,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "KUBECONFIG": str(env.cluster.kubeconfig)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "STAGE", "EPOCH", "PROGRESS", "VAL-ACC", "ETA", "AGE"]
    row = next(r.split() for r in rows if r.startswith(f"{succeeded} "))
    assert row[:3] == [succeeded, "Succeeded", "head"]
    assert row[4:7] == ["##########", "100%", "0.75"], row


def test_list_all_namespaces(env: Env, succeeded: str) -> None:
    proc = env.plugin("list", "-A", namespaced=False)
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split()[:2] == ["NAMESPACE", "NAME"]
    assert any(r.split()[:3] == [env.namespace, succeeded, "Succeeded"] for r in rows), proc.stdout


# ----- watch -----


def test_watch_exits_0_on_succeeded_with_plain_lines_and_the_final_metrics(env: Env) -> None:
    env.apply(manifest("watched", env={"FAKE_REPORT": "1", "FAKE_SLEEP": "3"}))
    proc = env.plugin("watch", "watched", "--timeout", "90", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert all("█" not in line and "\x1b" not in line for line in lines)  # a pipe gets plain lines
    progress = [line for line in lines if " ftj/watched " in line]
    assert any(" Running " in line and "stage=head" in line and "epoch=1/1" in line for line in progress), lines
    assert " Succeeded " in progress[-1]
    assert "ftj/watched Succeeded" in lines, lines
    summary = lines[lines.index("ftj/watched Succeeded") :]
    assert any(line.startswith("  final metrics:") and "val_accuracy=0.75" in line for line in summary), summary
    assert any(line.startswith("  attempts:") and line.split()[-1] == "1" for line in summary)


def test_watch_exits_1_on_failed_with_the_reason(env: Env, failed: str) -> None:
    proc = env.plugin("watch", failed, "--timeout", "60")
    assert proc.returncode == EXIT_FAILED, proc.stdout + proc.stderr
    assert f"ftj/{failed} Failed: DataError" in proc.stdout
    assert "no images in /data/train" in proc.stdout


def test_watch_times_out_with_exit_3(env: Env) -> None:
    env.apply(jobs.waiting_ftj("stuck"))  # its pod waits on an unpullable image: it never ends in time
    started = time.monotonic()
    proc = env.plugin("watch", "stuck", "--timeout", "3")
    elapsed = time.monotonic() - started
    assert proc.returncode == EXIT_TIMEOUT, proc.stdout + proc.stderr
    assert "timed out after 3s waiting for ftj/stuck to finish" in proc.stderr
    assert elapsed < 20, elapsed  # the watch ends on its deadline, not on the server's default
    env.cluster.kubectl_run("delete", "ftj", "stuck", "-n", env.namespace, "--wait=false")


# ----- describe, logs -----


def test_describe_a_failed_job(env: Env, failed: str) -> None:
    status = env.ftj(failed)["status"]
    proc = env.plugin("describe", failed)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert f"Name:          {failed}" in text and f"Namespace:     {env.namespace}" in text
    assert "Phase:         Failed (DataError)" in text
    assert "Failure:       DataError" in text and "no images in /data/train" in text.split("Trainer says:")[1].splitlines()[0]
    assert f"Output:        /tmp/out-{failed}" in text and "Model path:    (not saved yet)" in text
    conditions = text.split("Conditions:")[1].split("Attempts:")[0]
    for cond in status["conditions"]:
        assert any(line.split()[:2] == [cond["type"], cond["status"]] for line in conditions.splitlines()), cond
    attempt = next(line for line in text.split("Attempts:")[1].splitlines() if failed in line).split()
    assert attempt[0] == "1" and attempt[2] == "Failed" and attempt[-2:] == ["3", "Error"]
    events = text.split("Events:")[1]
    assert "JobCreated" in events and "Failed" in events


def test_describe_a_succeeded_job_says_where_the_model_is(env: Env, succeeded: str) -> None:
    model = env.ftj(succeeded)["status"]["modelPath"]
    proc = env.plugin("describe", succeeded)
    assert proc.returncode == 0, proc.stderr
    assert f"Model path:    {model}" in proc.stdout
    assert "val_accuracy=0.75" in proc.stdout


def test_logs_of_the_latest_attempt(env: Env, succeeded: str) -> None:
    proc = env.plugin("logs", succeeded)
    assert proc.returncode == 0, proc.stderr
    assert "hello from the trainer" in proc.stdout


def test_logs_follow_streams_until_the_trainer_ends(env: Env) -> None:
    env.apply(manifest("follow", env={"FAKE_SLEEP": "4", "FAKE_MESSAGE": "the end of follow"}))
    env.wait_phase("follow", "Running")
    started = time.monotonic()
    proc = env.plugin("logs", "follow", "-f")
    assert proc.returncode == 0, proc.stderr
    assert "the end of follow" in proc.stdout  # printed only when the trainer exits
    assert time.monotonic() - started < WAIT


def test_logs_of_an_earlier_attempt(env: Env) -> None:
    body = manifest("retried", env={"FAKE_EXIT": "1"}, backoffLimit=1)
    body["spec"]["runtime"]["env"] = [
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "FAKE_EXIT", "value": "1"},
        {"name": "FAKE_MESSAGE", "value": "failed in $(POD)"},
    ]
    env.apply(body)
    status = env.wait_phase("retried", "Failed")
    assert status["attempts"] == 2
    pods = client.CoreV1Api(env.api).list_namespaced_pod(env.namespace, label_selector="finetune.dev/job=retried").items
    first, second = sorted((p.metadata.creation_timestamp, p.metadata.name) for p in pods)
    latest = env.plugin("logs", "retried")
    assert latest.returncode == 0 and f"failed in {second[1]}" in latest.stdout, latest.stdout + latest.stderr
    earlier = env.plugin("logs", "retried", "--attempt", "1")
    assert earlier.returncode == 0 and f"failed in {first[1]}" in earlier.stdout, earlier.stdout + earlier.stderr
    missing = env.plugin("logs", "retried", "--attempt", "7")
    assert missing.returncode == EXIT_NOT_FOUND
    assert "has no pod of attempt 7 now (attempts with a pod: 1, 2)" in missing.stderr


# ----- suspend, resume -----


def test_suspend_and_resume(env: Env) -> None:
    env.apply(manifest("pausable", env={"FAKE_SLEEP": "300"}))
    env.wait_phase("pausable", "Running")
    proc = env.plugin("suspend", "pausable")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "finetunejob.finetune.dev/pausable suspended"
    assert env.ftj("pausable")["spec"]["suspend"] is True
    env.wait_phase("pausable", "Suspended")
    proc = env.plugin("resume", "pausable")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "finetunejob.finetune.dev/pausable resumed"
    assert env.ftj("pausable")["spec"]["suspend"] is False
    env.wait_phase("pausable", "Running")
    env.cluster.kubectl_run("delete", "ftj", "pausable", "-n", env.namespace, "--wait=false")


# ----- errors -----


def test_no_such_job(env: Env) -> None:
    for command in ("describe", "watch", "logs", "suspend", "resume"):
        proc = env.plugin(command, "nope")
        assert proc.returncode == EXIT_NOT_FOUND, (command, proc.stderr)
        assert proc.stderr.strip() == f'error: finetunejob "nope" not found in namespace {env.namespace}', command


def test_forbidden_names_the_verb_and_the_resource(
    env: Env, succeeded: str, service_account_kubeconfig: ServiceAccountKubeconfig
) -> None:
    """A ServiceAccount of the namespace that may only read FineTuneJobs: patch and pods/log are refused."""
    reader = f"reader-{secrets.token_hex(3)}"
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": reader},
            "rules": [{"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch"]},
                      {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]}  # fmt: skip
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": reader},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": reader},
               "subjects": [{"kind": "ServiceAccount", "name": reader, "namespace": env.namespace}]}  # fmt: skip
    env.apply(role)
    env.apply(binding)
    kubeconfig = service_account_kubeconfig(namespace=env.namespace, name=reader)
    nobody = service_account_kubeconfig(namespace=env.namespace, name=f"nobody-{secrets.token_hex(3)}")
    ns = env.namespace

    allowed = env.plugin("list", kubeconfig=kubeconfig)
    assert allowed.returncode == 0 and succeeded in allowed.stdout, allowed.stderr
    # RBAC takes a moment to reach the authorizer's cache: the allowed read shows it has.
    cases = [
        (kubeconfig, ("suspend", succeeded), f"error: forbidden: cannot patch finetunejobs.finetune.dev in namespace {ns} ("),
        (kubeconfig, ("logs", succeeded), f"error: forbidden: cannot get pods/log in namespace {ns} ("),
        (kubeconfig, ("list", "-A"), "error: forbidden: cannot list finetunejobs.finetune.dev at the cluster scope ("),
        (nobody, ("list",), f"error: forbidden: cannot list finetunejobs.finetune.dev in namespace {ns} ("),
        (nobody, ("describe", succeeded), f"error: forbidden: cannot get finetunejobs.finetune.dev in namespace {ns} ("),
    ]
    for config, args, expected in cases:
        proc = env.plugin(*args, kubeconfig=config, namespaced=args != ("list", "-A"))
        assert proc.returncode == EXIT_FORBIDDEN, (args, proc.stdout, proc.stderr)
        assert proc.stderr.startswith(expected), (args, proc.stderr)
    assert env.ftj(succeeded)["spec"].get("suspend") in (None, False)  # nothing was patched


def test_no_crd_installed(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A control plane of its own, where nobody installed the CRD (the shared one has it)."""
    with private_cluster(cluster_dir=tmp_path_factory.mktemp("nocrd") / "cluster") as bare:
        environ = {**os.environ, "KUBECONFIG": str(bare.kubeconfig)}
        expected = "error: the FineTuneJob CRD is not installed in this cluster (finetune.dev/v1alpha1)"
        for args in (("list",), ("list", "-A"), ("describe", "x"), ("watch", "x"), ("suspend", "x")):
            proc = subprocess.run([str(PLUGIN), *args], capture_output=True, text=True, timeout=WAIT, check=False, env=environ)
            assert proc.returncode == EXIT_NO_CRD, (args, proc.stderr)
            assert proc.stderr.strip() == expected, args


# ----- the live view in a real terminal -----


def report(env: Env, *, name: str, stage: str, epoch: int, done: int, total: int, stage_epochs: int) -> int:
    from finetune_contract import protocol

    body = protocol.ProgressReport.model_validate(
        {"namespace": env.namespace, "name": name, "event": "epoch-end", "stage": stage, "epoch": epoch,
         "stageEpochs": stage_epochs, "epochsDone": done, "totalEpochs": total,
         "metrics": {"loss": 0.31, "accuracy": 0.9, "val_loss": 0.35, "val_accuracy": 0.875},
         "bestValAccuracy": 0.875, "imagesPerSecond": 123.4, "epochSeconds": 2.0, "timestamp": time.time()}
    ).model_dump(mode="json", by_alias=True)  # fmt: skip
    return post_progress(env.operator.progress_url, body, token=progress_token(env.cluster, namespace=env.namespace, name=name))


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (make deps-debian)")
def test_watch_draws_live_bars_in_a_terminal(env: Env, tmp_path: Path) -> None:
    name = "live"
    env.apply(manifest(name, env={"FAKE_REPORT": "1", "FAKE_SLEEP": "20"}, head=2, fine=2))
    socket = f"fto-plugin-{secrets.token_hex(4)}"
    exit_file = tmp_path / "exit"
    term_env = {**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    command = (
        f"{PLUGIN} watch {name} -n {env.namespace} --kubeconfig {env.cluster.kubeconfig} --timeout 120;"
        f" echo WATCH-EXIT=$? > {exit_file}; echo WATCH-DONE; sleep 600"
    )

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", "-L", socket, "-f", "/dev/null", *args], capture_output=True, text=True,
                              timeout=30, check=True, env=term_env).stdout  # fmt: skip

    def screen() -> str:
        return tmux("capture-pane", "-p", "-t", "watch")

    def showing(*needles: str, row: str = "") -> str | None:
        """The pane's text once it shows every needle (all on the line holding `row`, when given)."""
        text = screen()
        where = next((line for line in text.splitlines() if row in line), "") if row else text
        return text if all(n in where for n in needles) else None

    tmux("new-session", "-d", "-s", "watch", "-x", "120", "-y", "30", command)
    try:
        # Phase 1: the fake trainer's own report, head epoch 1/2 (25%).
        head = wait_for(
            lambda: showing("epoch 1/2", "50%  running", row="phase 1/2 head"),
            timeout=WAIT, message="the head stage's bar in the pane",
        )  # fmt: skip
        head_row = next(line for line in head.splitlines() if "phase 1/2 head" in line)
        assert "█" * 10 + "░" * 10 in head_row, head
        assert "overall " + "█" * 5 + "░" * 15 + "  25%" in head
        assert "val_accuracy=0.75" in head
        # The progress report can land before the pod's Running reaches the Job's status: the
        # phase follows the Job, so it turns Running on its own, within the wait.
        wait_for(lambda: showing("Running", "val_accuracy=0.75"), timeout=WAIT, message="Running in the pane")
        # Phase 2: a report with the pod's own token moves it to fine-tune epoch 1/2 (75% overall).
        assert report(env, name=name, stage="fine-tune", epoch=1, done=3, total=4, stage_epochs=2) == 202  # Accepted
        fine = wait_for(
            lambda: showing("epoch 1/2", "50%  running", row="phase 2/2 fine-tune"),
            timeout=WAIT, message="the fine-tune stage's bar in the pane",
        )  # fmt: skip
        lines = fine.splitlines()
        head_row = next(line for line in lines if "phase 1/2 head" in line)
        assert "█" * 20 in head_row and "epoch 2/2" in head_row and "100%  done" in head_row, fine
        assert "█" * 10 + "░" * 10 in next(line for line in lines if "phase 2/2 fine-tune" in line)
        assert "overall " + "█" * 15 + "░" * 5 + "  75%" in fine
        assert "val_accuracy=0.875" in fine and "123.4 images/s" in fine
        # The end: the fake trainer exits 0; the view says so and prints the final metrics.
        end = wait_for(lambda: showing("WATCH-DONE"), timeout=90, message="the watch ends")
        assert exit_file.read_text().strip() == "WATCH-EXIT=0", end
        assert f"ftj/{name} Succeeded" in end
        assert "final metrics:    accuracy=0.9 loss=0.31 val_accuracy=0.875 val_loss=0.35" in end
        assert "attempts:         1" in end
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True, timeout=30, check=False)
    assert env.ftj(name)["status"]["phase"] == "Succeeded"
