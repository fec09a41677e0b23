"""The Helm chart on the local control plane: `helm install`, the chart's own Deployment runs
the operator, a FineTuneJob Succeeds, `helm uninstall` takes it all away.

What this covers, exactly:
- `helm install` of deploy/helm/finetune-operator into a namespace of its own (a release name
  other than the chart's, so every object is named `<release>-finetune-operator`, beside the
  deploy/base objects other tests apply), watching one other namespace.
- The chart's Deployment -> ReplicaSet -> Pod, run by the pod runner (hack/podrunner.py): it
  maps the chart's image ghcr.io/finetune-dev/finetune-operator to the `finetune-operator`
  command and runs it with the chart's args and env, in-cluster, with the token of the
  chart's ServiceAccount. So the operator talks to the API server under the chart's
  ClusterRoles only (the audit log shows its requests as that ServiceAccount), and the
  Kopf peering objects, ports, progress URL and watched namespace are the chart's values.
- A FineTuneJob in the watched namespace reaches Succeeded (the trainer is
  tests/integration/fake_trainer.py through `extraArgs: --trainer-command`: the pod runner
  runs commands, not images; the real trainer's training is tests/e2e's).
- `helm uninstall`: the operator pod goes (SIGTERM), and the chart's cluster-scoped objects with it.
Not covered here: image pulls, probes, NetworkPolicy enforcement, resource limits, Services/DNS
(the pod runner does none of these; the progress URL is the loopback port).
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures.cluster import Cluster, wait_for
from fixtures.jobs import FAKE_TRAINER, delete_namespace, ftj, restricted_namespace
from fixtures.operator import free_port

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "finetune-operator"


@pytest.fixture(scope="module")
def helm() -> Path:
    """helm from hack/build-helm.sh (built from the Go module proxy once, cached)."""
    result = subprocess.run(
        [str(ROOT / "hack" / "build-helm.sh")], capture_output=True, text=True, timeout=3600, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"hack/build-helm.sh failed:\n{result.stderr[-4000:]}")
    return Path(result.stdout.strip().splitlines()[-1]) / "helm"


def _helm(helm: Path, cluster: Cluster, *args: str, timeout: float = 180) -> str:
    result = subprocess.run(
        [str(helm), "--kubeconfig", str(cluster.kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return int(answer.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def _audit_events(cluster: Cluster, *, user: str) -> list[dict[str, Any]]:
    events = []
    with (cluster.dir / "audit.log").open(encoding="utf-8") as log:
        for line in log:
            if user in line:
                event = json.loads(line)
                if event.get("user", {}).get("username") == user:
                    events.append(event)
    return events


@pytest.fixture
def namespaces(cluster: Cluster) -> Iterator[tuple[str, str]]:
    """(release namespace, watched namespace), both PodSecurity restricted; deleted after."""
    release_ns = restricted_namespace(cluster, prefix="helm-release")
    jobs_ns = restricted_namespace(cluster, prefix="helm-jobs")
    try:
        yield release_ns, jobs_ns
    finally:
        delete_namespace(cluster, jobs_ns)
        delete_namespace(cluster, release_ns)


def test_helm_install_runs_a_job_under_the_charts_rbac(
    cluster: Cluster, helm: Path, namespaces: tuple[str, str], tmp_path: Path
) -> None:
    release_ns, jobs_ns = namespaces
    release = f"fto-{release_ns.rsplit('-', 1)[1]}"
    fullname = f"{release}-finetune-operator"
    ports = {"progress": free_port(), "metrics": free_port(), "health": free_port()}
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "ports": ports,
                # No Services/DNS here: trainer pods reach the operator's pod on the loopback port.
                "progressURL": f"http://127.0.0.1:{ports['progress']}/v1/progress",
                "watchNamespaces": [jobs_ns],
                "extraArgs": [f"--trainer-command=python {FAKE_TRAINER}", "--pending-timeout=120"],
            }
        ),
        encoding="utf-8",
    )
    _helm(helm, cluster, "install", release, str(CHART), "--namespace", release_ns, "--values", str(values))
    installed = True
    try:
        account = cluster.kubectl_json("get", "serviceaccount", fullname, "-n", release_ns)
        assert account["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        peering = cluster.kubectl_json("get", "kopfpeerings.kopf.dev", fullname, "-n", jobs_ns)
        assert peering["metadata"]["annotations"]["meta.helm.sh/release-name"] == release

        def operator_pod() -> dict[str, Any] | None:
            pods = cluster.kubectl_json(
                "get", "pods", "-n", release_ns, "-l", "app.kubernetes.io/name=finetune-operator"
            )["items"]
            running = [p for p in pods if p.get("status", {}).get("phase") == "Running"]
            return running[0] if running else None

        pod = wait_for(operator_pod, timeout=90, message=f"the chart's operator pod Running in {release_ns}")
        assert pod["spec"]["serviceAccountName"] == fullname
        wait_for(
            lambda: _healthy(f"http://127.0.0.1:{ports['progress']}/healthz"),
            timeout=90,
            message="the chart's operator answering /healthz on its progress port\n"
            + cluster.pod_log(namespace=release_ns, pod=pod["metadata"]["name"], container="operator")[
                -3000:
            ],
        )

        name = "helm-job"
        cluster.kubectl_run(
            "apply", "-n", jobs_ns, "-f", "-", input=yaml.safe_dump(ftj(name, env={"FAKE_SLEEP": "1"}))
        )

        def phase() -> str | None:
            job = cluster.get(f"/apis/finetune.dev/v1alpha1/namespaces/{jobs_ns}/finetunejobs/{name}") or {}
            value = (job.get("status") or {}).get("phase")
            return value if value in ("Succeeded", "Failed") else None

        final = wait_for(
            phase,
            timeout=180,
            message=f"ftj/{name} finished\n"
            + cluster.pod_log(namespace=release_ns, pod=pod["metadata"]["name"], container="operator")[
                -3000:
            ],
        )
        assert final == "Succeeded"

        # The operator worked as the chart's ServiceAccount: its status writes are in the audit log.
        user = f"system:serviceaccount:{release_ns}:{fullname}"
        events = _audit_events(cluster, user=user)
        writes = [
            e
            for e in events
            if e.get("verb") == "patch"
            and e.get("objectRef", {}).get("resource") == "finetunejobs"
            and e.get("objectRef", {}).get("subresource") == "status"
            and e.get("objectRef", {}).get("namespace") == jobs_ns
        ]
        assert writes, f"no FineTuneJob status write by {user} in the audit log"
        denied = [e for e in events if e.get("responseStatus", {}).get("code") == 403]
        assert not denied, f"the chart's RBAC refused: {[(e['verb'], e['objectRef']) for e in denied][:5]}"

        _helm(helm, cluster, "uninstall", release, "--namespace", release_ns, "--wait", "--timeout", "120s")
        installed = False
        wait_for(
            lambda: not cluster.kubectl_json("get", "pods", "-n", release_ns)["items"],
            timeout=90,
            message="the operator pod gone after helm uninstall",
        )
        for path in (
            f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{fullname}",
            f"/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{fullname}-peering",
            f"/apis/kopf.dev/v1/namespaces/{jobs_ns}/kopfpeerings/{fullname}",
        ):
            assert cluster.get(path) is None, f"{path} left after helm uninstall"
        # Helm never deletes CRDs it installed from crds/: FineTuneJobs survive an uninstall.
        assert cluster.get(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/finetunejobs.finetune.dev"
        )
    finally:
        if installed:
            subprocess.run(
                [str(helm), "--kubeconfig", str(cluster.kubeconfig), "uninstall", release, "-n", release_ns],
                capture_output=True,
                timeout=120,
                check=False,
            )
