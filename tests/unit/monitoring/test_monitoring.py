"""The monitoring component: alert rules pass promtool, the dashboard's PromQL parses, and
every metric either names is one the operator or a trainer really serves.

"Really serves" means: the operator's `finetune_operator.metrics` and the trainer's
`report.TrainerMetrics` are exercised the way the operator and a training run drive them,
their HTTP /metrics endpoints are scraped, and the exposition is parsed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_contract.protocol import STAGES
from finetune_testbed import tools
from finetune_trainer import report
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[3]
COMPONENT = ROOT / "deploy" / "components" / "monitoring"
RULES_TEST = Path(__file__).with_name("rules_test.yaml")

# Labels Prometheus itself puts on scraped series (target labels; the PodMonitor adds `name`).
TARGET_LABELS = frozenset({"namespace", "pod", "container", "job", "instance", "service", "endpoint", "name"})
# Grafana's macros and this dashboard's variables, as a query would see them.
GRAFANA_MACROS = {
    "$__rate_interval": "1m",
    "$__range": "6h",
    "$__interval": "30s",
    "$namespace": ".*",
    "$job": ".*",
}

METRIC_RE = re.compile(r"\b(finetune_[a-z0-9_]+)\b(?:\s*\{([^}]*)\})?")
MATCHER_RE = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool missing: install Debian's prometheus package (make deps-debian)"
    return path


def rule_groups() -> list[dict[str, Any]]:
    doc = yaml.safe_load((COMPONENT / "prometheusrule.yaml").read_text())
    assert doc["kind"] == "PrometheusRule"
    groups: list[dict[str, Any]] = doc["spec"]["groups"]
    return groups


def rule_exprs() -> list[str]:
    return [rule["expr"] for group in rule_groups() for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((COMPONENT / "dashboard.json").read_text())
    return data


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    return exprs


def as_promql(expr: str) -> str:
    """A dashboard expression with Grafana's macros and variables filled in."""
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    return expr


def run(args: list[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False))
    shutil.copy(RULES_TEST, tmp_path / "rules_test.yaml")
    return tmp_path


class TestRules:
    def test_promtool_check_rules(self, rules_dir: Path) -> None:
        done = run([promtool(), "check", "rules", "rules.yaml"], cwd=rules_dir)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "SUCCESS: 7 rules found" in done.stdout

    def test_promtool_test_rules(self, rules_dir: Path) -> None:
        done = run([promtool(), "test", "rules", "rules_test.yaml"], cwd=rules_dir)
        assert done.returncode == 0, done.stdout + done.stderr

    def test_the_alerts_the_issue_asks_for_exist_and_are_tested(self) -> None:
        alerts = {rule["alert"] for group in rule_groups() for rule in group["rules"]}
        asked = {
            "FineTuneJobFailed",
            "FineTuneJobProgressStalled",
            "FineTuneJobDiverged",
            "FineTuneJobsHighRetryRate",
        }
        assert asked <= alerts
        tested = {
            case["alertname"]
            for test in yaml.safe_load(RULES_TEST.read_text())["tests"]
            for case in test.get("alert_rule_test", [])
        }
        assert tested == alerts
        for group in rule_groups():
            for rule in group["rules"]:
                assert rule["labels"]["severity"] in {"warning", "critical"}
                assert rule["annotations"]["summary"] and rule["annotations"]["description"]


class TestDashboard:
    def test_every_query_is_valid_promql(self, tmp_path: Path) -> None:
        # promtool parses each expression as a recording rule: a typo fails here, not in Grafana.
        rules = [
            {"record": f"dashboard:query:{i}", "expr": as_promql(e)} for i, e in enumerate(dashboard_exprs())
        ]
        rules = [r for r in rules if not str(r["expr"]).startswith("label_values(")]
        (tmp_path / "dashboard-rules.yaml").write_text(
            yaml.safe_dump({"groups": [{"name": "d", "rules": rules}]})
        )
        done = run([promtool(), "check", "rules", "dashboard-rules.yaml"], cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr

    def test_has_the_panels_the_issue_asks_for(self) -> None:
        panels = {p["title"]: p for p in dashboard()["panels"]}
        for title in (
            "FineTuneJobs by phase",
            "Running jobs",
            "Loss per job and stage",
            "Accuracy per job and stage",
            "Images per second",
            "Failures by reason",
        ):
            assert title in panels, title
        table = panels["Running jobs"]
        columns = table["transformations"][1]["options"]["renameByName"]
        assert {"Stage", "Epoch", "Progress", "ETA", "Val accuracy"} <= set(columns.values())
        assert "finetune_jobs{" in panels["FineTuneJobs by phase"]["targets"][0]["expr"]
        assert "finetune_jobs_failed_total" in panels["Failures by reason"]["targets"][0]["expr"]
        for title in ("Loss per job and stage", "Accuracy per job and stage"):
            assert "{{stage}}" in panels[title]["targets"][0]["legendFormat"]

    def test_panels_are_well_formed(self) -> None:
        panels = dashboard()["panels"]
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids))
        for p in panels:
            assert p["gridPos"]["x"] >= 0 and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
            if p["type"] != "row":
                assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
                assert p["targets"], p["title"]
                refs = [t["refId"] for t in p["targets"]]
                assert len(refs) == len(set(refs))
        assert dashboard()["uid"] == "finetune-operator"


def kustomize() -> list[str]:
    """`kustomize build`: v5.7.1, what `kubectl kustomize` of Kubernetes v1.34 runs (hack/build-kustomize.sh, cached)."""
    try:
        return [str(tools.built_tool(script="build-kustomize.sh", binary="kustomize")), "build"]
    except tools.ToolBuildError as exc:
        pytest.fail(str(exc))


class TestComponent:
    def test_renders_with_kustomize(self, tmp_path: Path) -> None:
        command = kustomize()
        (tmp_path / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "components": [os.path.relpath(COMPONENT, tmp_path)],
                }
            )
        )
        done = run([*command, str(tmp_path)])
        assert done.returncode == 0, done.stderr
        objects = {d["kind"]: d for d in yaml.safe_load_all(done.stdout)}
        assert set(objects) == {"ConfigMap", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
        for obj in objects.values():
            assert obj["metadata"]["namespace"] == "finetune-system"
        config_map = objects["ConfigMap"]
        assert config_map["metadata"]["name"] == "finetune-operator-dashboard"
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(config_map["data"]["finetune-operator.json"]) == dashboard()

    def test_service_monitor_selects_the_operators_metrics_port(self) -> None:
        monitor = yaml.safe_load((COMPONENT / "servicemonitor.yaml").read_text())
        service = yaml.safe_load((ROOT / "deploy" / "base" / "service.yaml").read_text())
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert selector.items() <= service["metadata"]["labels"].items()
        assert service["metadata"]["namespace"] in monitor["spec"]["namespaceSelector"]["matchNames"]
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in ports and ports[endpoint["port"]]["port"] == 8080
        # The operator's per-job series carry the job's namespace; it must not become exported_namespace.
        assert endpoint["honorLabels"] is True

    def test_pod_monitor_selects_trainer_pods_by_the_metrics_port(self) -> None:
        monitor = yaml.safe_load((COMPONENT / "podmonitor.yaml").read_text())
        assert monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "finetune-trainer"}
        assert monitor["spec"]["namespaceSelector"] == {"any": True}
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] == "metrics"
        assert {r["targetLabel"] for r in endpoint["relabelings"]} == {"name"}

    def test_pod_monitor_matches_the_pods_the_operator_builds(self) -> None:
        builders = pytest.importorskip("finetune_operator.builders")
        api = pytest.importorskip("finetune_operator.api")
        owner = builders.Owner(namespace="ml", name="flowers", uid="u-1", labels={})
        spec = api.FineTuneJobSpec.model_validate(
            {"data": {"train": "/data/train", "validationSplit": 0.2}, "output": {"path": "/models/x"}}
        )
        job = builders.build_job(
            pod=builders.TrainerPod(owner=owner, spec=spec, default_image="trainer:test", progress_url=None)
        )
        pod = job["spec"]["template"]
        monitor = yaml.safe_load((COMPONENT / "podmonitor.yaml").read_text())
        assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        ports = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] in ports
        env = {e["name"]: e.get("value") for c in pod["spec"]["containers"] for e in c["env"]}
        assert env["FINETUNE_METRICS_PORT"] == str(ports[endpoint["port"]])
        # Prometheus spells pod label L as __meta_kubernetes_pod_label_<L with [^a-zA-Z0-9_] -> _>.
        (relabel,) = endpoint["relabelings"]
        (source,) = relabel["sourceLabels"]
        label = source.removeprefix("__meta_kubernetes_pod_label_")
        matching = [
            k for k, v in pod["metadata"]["labels"].items() if re.sub(r"[^a-zA-Z0-9_]", "_", k) == label
        ]
        assert [pod["metadata"]["labels"][k] for k in matching] == ["flowers"]


def scrape(port: int) -> str:
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return str(response.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def exposed(text: str) -> dict[str, set[str]]:
    """Sample name -> label names, from a /metrics exposition."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


@pytest.fixture(scope="module")
def operator_exposition() -> Iterator[dict[str, set[str]]]:
    """The operator's real /metrics after one job ran through both stages, one failed, one retried."""
    metrics = pytest.importorskip("finetune_operator.metrics")
    ns = "d2-monitoring-coverage"
    metrics.job_created(namespace=ns)
    metrics.set_phase(namespace=ns, name="flowers", phase="Running")
    metrics.job_retried(namespace=ns)
    for stage, epoch, ratio in (("head", 2, 0.4), ("fine-tune", 1, 0.8)):
        metrics.observe_progress(
            namespace=ns,
            name="flowers",
            stage=stage,
            epoch=epoch,
            progress_ratio=ratio,
            metrics={"loss": 0.5, "accuracy": 0.8, "val_loss": 0.6, "val_accuracy": 0.7},
            images_per_second=100.0,
            eta_seconds=30.0,
            timestamp=time.time(),
        )
    # finetune_progress_reports_total and finetune_status_writes_total exist from the start;
    # a handler label of its own keeps other tests' counts untouched.
    metrics.reconcile_error(handler="d2-monitoring-coverage")
    metrics.job_finished(namespace=ns, name="flowers", phase="Succeeded", reason=None, duration_s=90.0)
    metrics.job_finished(namespace=ns, name="broken", phase="Failed", reason="DataError", duration_s=5.0)
    port = metrics.start_metrics_server(host="127.0.0.1", port=0)
    yield exposed(scrape(port))
    metrics.forget_job(namespace=ns, name="flowers")


@pytest.fixture(scope="module")
def trainer_exposition() -> Iterator[dict[str, set[str]]]:
    """A trainer's real /metrics after a two-stage run that sent, failed and dropped reports."""
    metrics = report.TrainerMetrics()
    port = metrics.serve(port=0, host="127.0.0.1")
    for stage in STAGES:
        metrics.on_stage_start(stage=stage, stage_epochs=1, epochs_done=0, total_epochs=2)
        metrics.on_batch_end(stage=stage, epoch=1, batch=0, batches=1, batch_seconds=0.1)
        metrics.on_epoch_end(
            stage=stage,
            epoch=1,
            stage_epochs=1,
            epochs_done=1,
            total_epochs=2,
            metrics={"loss": 0.5, "accuracy": 0.8, "val_loss": 0.6, "val_accuracy": 0.7},
            best_val_accuracy=0.7,
            images_per_second=100.0,
            epoch_seconds=1.0,
        )
    for result in report.REPORT_RESULTS:
        metrics.count_report(result)
    yield exposed(scrape(port))
    metrics.close()


def named_metrics(exprs: list[str]) -> dict[str, set[str]]:
    """finetune_* metric name -> label names its selectors match on, over all expressions."""
    names: dict[str, set[str]] = {}
    for expr in exprs:
        for match in METRIC_RE.finditer(expr):
            labels = names.setdefault(match.group(1), set())
            labels.update(MATCHER_RE.findall(match.group(2) or ""))
    return names


class TestMetricNames:
    @pytest.mark.parametrize("source", ["dashboard", "rules"])
    def test_every_metric_named_is_served(
        self,
        source: str,
        operator_exposition: dict[str, set[str]],
        trainer_exposition: dict[str, set[str]],
    ) -> None:
        named = named_metrics(dashboard_exprs() if source == "dashboard" else rule_exprs())
        assert len(named) >= (20 if source == "dashboard" else 8)
        served = {**operator_exposition, **trainer_exposition}
        missing = sorted(set(named) - set(served))
        assert not missing, f"{source} names metrics nobody serves: {missing}"
        for name, labels in named.items():
            unknown = labels - served[name] - TARGET_LABELS
            assert not unknown, f"{source}: {name} has no label {sorted(unknown)}"

    def test_both_sides_are_covered(
        self, operator_exposition: dict[str, set[str]], trainer_exposition: dict[str, set[str]]
    ) -> None:
        named = set(named_metrics(dashboard_exprs() + rule_exprs()))
        assert {n for n in named if n.startswith("finetune_trainer_")} <= set(trainer_exposition)
        assert {n for n in named if not n.startswith("finetune_trainer_")} <= set(operator_exposition)
        # Every finetune_* metric family served shows up somewhere on the dashboard or in an alert.
        families = {
            _family(n) for n in (*operator_exposition, *trainer_exposition) if n.startswith("finetune_")
        }
        families.discard(None)
        assert families - {_family(n) for n in named} == set()


def _family(sample_name: str) -> str | None:
    """The family a sample belongs to (None for prometheus_client's *_created timestamps)."""
    if sample_name.endswith("_created"):
        return None
    return re.sub(r"_(total|bucket|sum|count)$", "", sample_name)


def test_stage_is_current_only_while_running() -> None:
    """The running-jobs table and the stalled alert read finetune_job_stage == 1 as "training now"."""
    metrics = pytest.importorskip("finetune_operator.metrics")
    ns, name = "d2-stage-semantics", "job"

    def stage(value: str) -> float | None:
        sample: float | None = metrics.REGISTRY.get_sample_value(
            "finetune_job_stage", {"namespace": ns, "name": name, "stage": value}
        )
        return sample

    metrics.set_phase(namespace=ns, name=name, phase="Running")
    metrics.observe_progress(
        namespace=ns,
        name=name,
        stage="fine-tune",
        epoch=1,
        progress_ratio=0.5,
        metrics={},
        images_per_second=None,
        eta_seconds=None,
        timestamp=time.time(),
    )
    try:
        assert (stage("head"), stage("fine-tune")) == (0, 1)
        metrics.set_phase(namespace=ns, name=name, phase="Succeeded")
        assert (stage("head"), stage("fine-tune")) == (0, 0)
    finally:
        metrics.forget_job(namespace=ns, name=name)
    assert stage("fine-tune") is None
