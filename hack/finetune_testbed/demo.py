"""`make demo`: a FineTuneJob trained end to end on the local control plane, then torn down.

What it does, in order:

1. starts the local control plane and pod runner (`hack/cluster.py up`), unless one is up;
   the pod runner in container mode (FTO_PODS=container, the demo's default): the trainer
   runs from the image `make images` built (localhost/finetune-trainer:dev, TRAINER_IMAGE to
   change it) with podman + runc, under the Job's restricted securityContext. A control plane
   already up in process mode gets its pod runner restarted in container mode (and keeps it;
   a simulated one is left as it is).
   FTO_PODS=process runs the trainer as a local process from .venv instead (no image);
2. installs the CRD and deploy/'s RBAC (Namespace, ServiceAccount, ClusterRole, binding)
   from `kubectl kustomize deploy/base`: the same objects a real install gets, minus the
   operator's Deployment, because here the operator runs as a local process;
3. mints a token for ServiceAccount finetune-system/finetune-operator (TokenRequest) and runs
   `finetune-operator` with a kubeconfig holding only that token, so the operator has
   exactly deploy/'s RBAC; like the installed Deployment it watches every namespace (the
   ClusterRole is bound cluster-wide), and its pid is recorded in
   .cluster/pids/attached/demo-operator.pid, so `hack/cluster.py down` stops it;
4. applies examples/quickstart-storage.yaml (two PersistentVolumeClaims), generates a small
   three-class image data set into the `quickstart-data` volume, and applies
   examples/quickstart.yaml in namespace finetune-demo (PodSecurity `restricted`);
5. prints the job like `kubectl get ftj -w` until it is Succeeded or Failed, then the final
   `kubectl get ftj` line, where the model and its metrics are, and the operator's metrics;
6. stops the operator and, if it started it, the control plane (a control plane that was
   already up stays up; only the demo's namespace is deleted).

`hack/demo.py make-data DIR` writes only the data set (for a local `finetune-train` run).
`hack/demo.py start-operator` does steps 1-3 only and leaves the operator running.
DEMO_KEEP=1 skips step 6 and prints the KUBECONFIG and the operator's metrics URL instead;
`make cluster-down` stops the operator and the control plane. A later demo run stops an
operator an earlier one left before it starts its own.
DEMO_TIMEOUT (seconds, default 900) bounds the wait for the job. FTO_CLUSTER_DIR (default
.cluster) is where the control plane keeps its state, as for hack/cluster.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from finetune_testbed import cluster as control_plane
from finetune_testbed import operator_proc

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_DIR = Path(os.environ.get("FTO_CLUSTER_DIR", ROOT / ".cluster"))
PODS = os.environ.get("FTO_PODS") or "container"  # the demo runs the trainer image by default
TRAINER_IMAGE = os.environ.get("TRAINER_IMAGE", "localhost/finetune-trainer:dev")
CONTAINERS_CONF = ROOT / "hack" / "containers" / "containers.conf"
ADMIN_KUBECONFIG = CLUSTER_DIR / "kubeconfig"
KUBECTL = CLUSTER_DIR / "bin" / "kubectl"
VENV_BIN = ROOT / ".venv" / "bin"
NAMESPACE = "finetune-demo"
JOB = "quickstart"
OPERATOR_NAMESPACE = "finetune-system"
OPERATOR_ACCOUNT = "finetune-operator"
OPERATOR_PIDFILE = "demo-operator"  # .cluster/pids/attached/demo-operator.pid
EXAMPLE = ROOT / "examples" / "quickstart.yaml"
STORAGE = ROOT / "examples" / "quickstart-storage.yaml"
# What the demo installs from deploy/base: the API and the operator's identity and rights.
INSTALL_KINDS = frozenset(
    {
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ClusterKopfPeering",
        "KopfPeering",
    }
)
CLASSES = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200)}
TERMINAL = ("Succeeded", "Failed")


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and why."""


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


def kubectl(
    *args: str, kubeconfig: Path = ADMIN_KUBECONFIG, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Runs the control plane's kubectl; raises DemoError with its stderr when `check` and it fails."""
    result = subprocess.run(
        [str(KUBECTL), f"--kubeconfig={kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if check and result.returncode != 0:
        raise DemoError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def cluster(command: str) -> int:
    """`hack/cluster.py <command>` with this Python (FTO_PODS set to the demo's mode); its exit code."""
    return subprocess.run(
        [sys.executable, str(ROOT / "hack" / "cluster.py"), command], check=False,
        env={**os.environ, "FTO_PODS": PODS},
    ).returncode  # fmt: skip


def ensure_cluster(*, was_up: bool) -> str:
    """`hack/cluster.py up` in the demo's pod mode when the control plane is down or its pod
    runner runs in the other mode (only the pod runner is restarted then); a simulated pod
    runner someone started on purpose is left as it is. Returns the pod runner's mode."""
    mode_file = CLUSTER_DIR / "podrunner-mode"
    current = mode_file.read_text().strip() if was_up and mode_file.exists() else ""
    wanted = "container" if PODS == "container" else "real"
    if was_up and current.startswith("simulate="):
        return current
    if wanted == "container":
        require_trainer_image()
    if not was_up:
        say(f"starting the local control plane (hack/cluster.py up, pods: {PODS})")
    elif current != wanted:
        say(f"restarting the pod runner in {PODS} mode (hack/cluster.py up)")
    else:
        return current
    if cluster("up") != 0:
        raise DemoError(f"hack/cluster.py up failed (its logs are in {CLUSTER_DIR / 'logs'})")
    return wanted


def require_trainer_image() -> None:
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    try:
        found = subprocess.run(
            ["podman", "image", "exists", TRAINER_IMAGE], env=env, capture_output=True, timeout=60, check=False
        ).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        found = False
    if not found:
        raise DemoError(
            f"the trainer image {TRAINER_IMAGE} is not in podman's store: `make images` builds it "
            "(or FTO_PODS=process runs the trainer as a local process)"
        )
    say(f"trainer image {TRAINER_IMAGE} (pods run in containers: podman + runc)")


def cluster_is_up() -> bool:
    return (
        subprocess.run(
            [sys.executable, str(ROOT / "hack" / "cluster.py"), "status"], capture_output=True, check=False
        ).returncode
        == 0
    )


def install_api_and_rbac() -> None:
    """Applies the CRD, the operator's namespace and its RBAC, rendered from deploy/base."""
    rendered = subprocess.run(
        [str(KUBECTL), "kustomize", str(ROOT / "deploy" / "base")],
        capture_output=True,
        text=True,
        check=False,
    )
    if rendered.returncode != 0:
        raise DemoError(f"kubectl kustomize deploy/base failed: {rendered.stderr.strip()}")
    objects = [o for o in yaml.safe_load_all(rendered.stdout) if o and o["kind"] in INSTALL_KINDS]
    crds = [o for o in objects if o["kind"] == "CustomResourceDefinition"]
    # CRDs first, so custom kinds among the rest (Kopf's peering objects) have their API.
    kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=yaml.safe_dump_all(crds))
    for crd in crds:
        kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{crd['metadata']['name']}")
    rest = [o for o in objects if o["kind"] != "CustomResourceDefinition"]
    kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=yaml.safe_dump_all(rest))
    kinds = sorted({o["kind"] for o in objects})
    say(f"installed from deploy/base: {', '.join(kinds)}")


def service_account_kubeconfig(*, path: Path) -> None:
    """Writes a kubeconfig that authenticates as the operator's ServiceAccount (TokenRequest)."""
    try:
        operator_proc.write_service_account_kubeconfig(
            kubectl=KUBECTL, admin_kubeconfig=ADMIN_KUBECONFIG, path=path,
            namespace=OPERATOR_NAMESPACE, name=OPERATOR_ACCOUNT,
        )  # fmt: skip
    except operator_proc.OperatorStartError as exc:
        raise DemoError(str(exc)) from exc
    who = kubectl(
        "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}", kubeconfig=path, check=False
    )
    if who.returncode == 0:
        say(f"operator credentials: {who.stdout.strip()}")


def start_operator(
    *, kubeconfig: Path, ports: dict[str, int], log: Path, pods: str
) -> subprocess.Popen[bytes]:
    """Starts `finetune-operator` as the ServiceAccount, watching every namespace, and waits for
    its health endpoint; its pid goes to the cluster's attached pid files at once."""
    args = [
        # No --namespace: cluster-wide, as the installed Deployment runs (deploy/base/rbac.yaml
        # binds its ClusterRole cluster-wide), so a FineTuneJob in any namespace is reconciled.
        "--progress-host=127.0.0.1",
        f"--progress-port={ports['progress']}",
        f"--progress-url=http://127.0.0.1:{ports['progress']}/v1/progress",
        f"--metrics-port={ports['metrics']}",
    ]
    if pods == "container":  # the image the pod runner runs; otherwise the .venv's finetune-train
        args.append(f"--trainer-image={TRAINER_IMAGE}")
    env = {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        process = operator_proc.start(
            args=args, kubeconfig=kubeconfig, health_port=ports["health"], log=log, env=env,
            pidfile=operator_pidfile(),
        )  # fmt: skip
    except operator_proc.OperatorStartError as exc:
        raise DemoError(f"{exc}:\n{tail(log)}") from exc
    say(f"operator running (pid {process.pid}), log {log.relative_to(ROOT) if log.is_relative_to(ROOT) else log}")
    say("the operator watches every namespace (cluster-wide, as deploy/ installs it)")
    return process


def layout() -> control_plane.Layout:
    return control_plane.Layout(dir=CLUSTER_DIR.resolve())


def operator_pidfile() -> Path:
    return layout().attached / f"{OPERATOR_PIDFILE}.pid"


def stop_kept_operator() -> None:
    """Stops the operator an earlier `DEMO_KEEP=1` run left, so that only one handles the demo."""
    for pid in control_plane.stop_attached(layout=layout(), name=OPERATOR_PIDFILE):
        say(f"stopped the operator an earlier DEMO_KEEP=1 run left (pid {pid})")


def stop_operator(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    operator_pidfile().unlink(missing_ok=True)


def print_kept(*, process: subprocess.Popen[bytes], ports: dict[str, int]) -> None:
    """What a user needs to use, and later stop, an operator the demo leaves running."""
    print(f"    export KUBECONFIG={ADMIN_KUBECONFIG}", flush=True)
    print(f"    operator metrics: http://127.0.0.1:{ports['metrics']}/metrics", flush=True)
    print(
        f"    operator (pid {process.pid}) runs as ServiceAccount {OPERATOR_NAMESPACE}/{OPERATOR_ACCOUNT}"
        " and watches every namespace",
        flush=True,
    )
    print("    kubectl get ftj -A", flush=True)
    print("    stop: make cluster-down (the operator, then the control plane)", flush=True)


def start_operator_only() -> int:
    """`hack/demo.py start-operator`: control plane, API and RBAC, the operator; left running."""
    ports = {"progress": operator_proc.free_port(), "metrics": operator_proc.free_port(), "health": operator_proc.free_port()}
    try:
        pods = ensure_cluster(was_up=cluster_is_up())
        stop_kept_operator()
        install_api_and_rbac()
        operator_kubeconfig = CLUSTER_DIR / "operator.kubeconfig"
        service_account_kubeconfig(path=operator_kubeconfig)
        process = start_operator(
            kubeconfig=operator_kubeconfig, ports=ports, log=CLUSTER_DIR / "logs" / "demo-operator.log", pods=pods
        )
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr, flush=True)
        return 1
    print_kept(process=process, ports=ports)
    return 0


def tail(path: Path, *, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


def make_dataset(*, root: Path, train: int = 60, val: int = 15, size: int = 32, seed: int = 7) -> int:
    """Class-per-folder PNGs: noisy images of one dominant colour per class, easy to learn."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    count = 0
    for split, per_class in (("train", train), ("val", val)):
        for name, rgb in CLASSES.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                noise = rng.normal(0.0, 40.0, size=(size, size, 3))
                pixels = np.clip(np.asarray(rgb, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode="RGB").save(folder / f"{name}-{i:03d}.png")
                count += 1
    return count


def prepare_namespace() -> None:
    namespace = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": NAMESPACE,
            "labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            },
        },
    }
    kubectl("apply", "-f", "-", stdin=yaml.safe_dump(namespace))
    if kubectl("get", "ftj", JOB, "-n", NAMESPACE, "--ignore-not-found", "-o", "name").stdout.strip():
        say(f"deleting the FineTuneJob {JOB} left by an earlier run")
        kubectl("delete", "ftj", JOB, "-n", NAMESPACE, "--wait=true", "--timeout=60s")


def volume_dir(claim: str) -> Path:
    """Where the pod runner keeps a PersistentVolumeClaim's files."""
    return CLUSTER_DIR / "volumes" / NAMESPACE / claim


def apply_example() -> dict[str, Any]:
    """Applies the PVCs, fills the data volume, then applies the FineTuneJob; returns the job."""
    claims = [d for d in yaml.safe_load_all(STORAGE.read_text(encoding="utf-8")) if d]
    jobs = [d for d in yaml.safe_load_all(EXAMPLE.read_text(encoding="utf-8")) if d]
    kubectl("apply", "-n", NAMESPACE, "-f", "-", stdin=yaml.safe_dump_all(claims))
    data = volume_dir("quickstart-data")
    shutil.rmtree(data, ignore_errors=True)
    count = make_dataset(root=data)
    shutil.rmtree(volume_dir("quickstart-models") / JOB, ignore_errors=True)
    volume_dir("quickstart-models").mkdir(parents=True, exist_ok=True)
    say(f"generated {count} images ({len(CLASSES)} classes, 32x32) in {data}")
    kubectl("apply", "-n", NAMESPACE, "-f", "-", stdin=yaml.safe_dump_all(jobs))
    say(f"applied {EXAMPLE.relative_to(ROOT)}: FineTuneJob {NAMESPACE}/{JOB}")
    return dict(jobs[0])


def follow(*, timeout: float) -> str:
    """Streams `kubectl get ftj -w` until the job is Succeeded or Failed; returns that phase."""
    watcher = subprocess.Popen(
        [str(KUBECTL), f"--kubeconfig={ADMIN_KUBECONFIG}", "get", "ftj", JOB, "-n", NAMESPACE, "-w"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def pump() -> None:
        assert watcher.stdout is not None
        for line in watcher.stdout:
            print(f"    {line.rstrip()}", flush=True)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    phase = ""
    try:
        while time.monotonic() < deadline:
            phase = kubectl(
                "get", "ftj", JOB, "-n", NAMESPACE, "-o", "jsonpath={.status.phase}"
            ).stdout.strip()
            if phase in TERMINAL:
                time.sleep(1.5)  # let the watch print the final transition
                return phase
            time.sleep(1.0)
    finally:
        watcher.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            watcher.wait(timeout=5)
        thread.join(timeout=5)
    raise DemoError(f"FineTuneJob {JOB} is still {phase or 'without a phase'} after {timeout:.0f} s")


def report(*, job: dict[str, Any], metrics_port: int) -> None:
    print(flush=True)
    say("final state")
    print(kubectl("get", "ftj", JOB, "-n", NAMESPACE).stdout.rstrip(), flush=True)
    status = json.loads(kubectl("get", "ftj", JOB, "-n", NAMESPACE, "-o", "json").stdout).get("status", {})
    output = volume_dir("quickstart-models") / Path(job["spec"]["output"]["path"]).relative_to("/models")
    print(f"    model (in the pod): {status.get('modelPath')}", flush=True)
    print(f"    model (here):       {output / 'model.keras'}", flush=True)
    metrics_file = output / "metrics.json"
    if metrics_file.is_file():
        print(f"    metrics:            {metrics_file}", flush=True)
        summary = json.loads(metrics_file.read_text(encoding="utf-8"))
        final = summary.get("final") or summary.get("final_metrics") or {}
        if isinstance(final, dict) and final:
            shown = ", ".join(f"{k}={v:.3f}" for k, v in final.items() if isinstance(v, int | float))
            print(f"    final metrics:      {shown}", flush=True)
    if status.get("conditions"):
        for cond in status["conditions"]:
            print(f"    condition {cond['type']}={cond['status']} ({cond.get('reason', '')})", flush=True)
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        lines = [
            line
            for line in text.splitlines()
            if line.startswith(
                ("finetune_jobs_succeeded_total", "finetune_jobs_failed_total", "finetune_jobs{")
            )
        ]
        print(f"    operator metrics ({url}):", flush=True)
        for line in lines:
            print(f"      {line}", flush=True)
    except OSError as exc:
        print(f"    operator metrics: {url} did not answer ({exc})", flush=True)


def explain_failure(*, operator_log: Path) -> None:
    print(kubectl("describe", "ftj", JOB, "-n", NAMESPACE, check=False).stdout[-3000:], flush=True)
    pods = kubectl("get", "pods", "-n", NAMESPACE, "-o", "name", check=False).stdout.split()
    for pod in pods:
        print(f"--- logs of {pod}", flush=True)
        print(kubectl("logs", pod, "-n", NAMESPACE, "--tail=30", check=False).stdout, flush=True)
    print(f"--- operator log ({operator_log})\n{tail(operator_log)}", flush=True)


def main() -> int:
    keep = os.environ.get("DEMO_KEEP", "") not in ("", "0", "false")
    timeout = float(os.environ.get("DEMO_TIMEOUT", "900"))
    started = time.monotonic()
    was_up = cluster_is_up()
    operator: subprocess.Popen[bytes] | None = None
    operator_log = CLUSTER_DIR / "logs" / "demo-operator.log"
    ports = {"progress": operator_proc.free_port(), "metrics": operator_proc.free_port(), "health": operator_proc.free_port()}
    phase = ""
    try:
        pods = ensure_cluster(was_up=was_up)
        stop_kept_operator()
        install_api_and_rbac()
        operator_kubeconfig = CLUSTER_DIR / "operator.kubeconfig"
        service_account_kubeconfig(path=operator_kubeconfig)
        operator = start_operator(kubeconfig=operator_kubeconfig, ports=ports, log=operator_log, pods=pods)
        prepare_namespace()
        job = apply_example()
        say("training (kubectl get ftj -w):")
        phase = follow(timeout=timeout)
        report(job=job, metrics_port=ports["metrics"])
        if phase != "Succeeded":
            explain_failure(operator_log=operator_log)
        say(f"{phase} in {time.monotonic() - started:.0f} s")
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr, flush=True)
        phase = "error"
    except KeyboardInterrupt:
        phase = "interrupted"
        keep = False
    finally:
        if keep and operator is not None and operator.poll() is None:
            print(flush=True)
            say("DEMO_KEEP=1: left running")
            print_kept(process=operator, ports=ports)
        else:
            if operator is not None:
                stop_operator(operator)
            if not was_up:
                say("stopping the local control plane")
                cluster("down")
            elif cluster_is_up():
                kubectl("delete", "namespace", NAMESPACE, "--wait=false", "--ignore-not-found", check=False)
    return 0 if phase == "Succeeded" else 1


def cli(argv: list[str]) -> int | str:
    """`hack/demo.py [make-data DIR | start-operator]`: the exit code, or the usage message."""
    if argv[:1] == ["make-data"] and len(argv) == 2:
        # `hack/demo.py make-data DIR`: only the data set, e.g. for a local `finetune-train` run.
        print(f"{make_dataset(root=Path(argv[1]))} images in {argv[1]}/{{train,val}}/<class>/")
        return 0
    if argv == ["start-operator"]:
        return start_operator_only()
    if argv:
        return "usage: hack/demo.py [make-data DIR | start-operator]"
    return main()


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
