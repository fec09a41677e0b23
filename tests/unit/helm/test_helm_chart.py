"""deploy/helm/finetune-operator: lint, the same objects as deploy/, every object valid, values honoured.

- `helm lint --strict` passes with the default values, values-prod.yaml and
  values-everything.yaml (every option on), with no warning or error.
- `helm template` with the default values renders exactly the objects of
  `kubectl kustomize deploy/base`, and with values-prod.yaml those of deploy/overlays/prod,
  field by field. What the comparison ignores, and why:
    * Helm's own labels (helm.sh/chart, app.kubernetes.io/managed-by,
      app.kubernetes.io/instance; the prod overlay's app.kubernetes.io/instance is its
      stand-in for the release label);
    * on CRDs, kustomize's common labels (part-of, version): Helm installs crds/ as plain
      files, never templated, so they are the generated file byte for byte;
    * on prod's own objects (PodDisruptionBudget, the monitoring component), the chart's
      part-of/version labels: kustomize's base `labels:` never reach objects added above
      the base; the chart labels every object alike;
    * the Namespace: Helm stores its release record in the namespace before it creates
      anything, so a chart cannot create its own release namespace on `helm install`; it is
      rendered (identical to deploy/base's) with namespace.create=true, which the test checks.
  So a rule added to deploy/base/rbac.yaml (or any other change to deploy/) without the chart
  fails here, and the reverse.
- Every object of the three renders validates: built-in kinds with kubernetes-validate
  (Kubernetes 1.34 schemas, strict), Kopf's peering kinds against their CRD in the render,
  the Prometheus Operator's kinds (no schema offline) for the fields it requires.
- The chart's copies (the CRD, the alert rules, the dashboard) are their sources byte for byte.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from finetune_operator.crd import render_crd
from helm_helpers import CHART, EVERYTHING, KUBERNETES_VERSION, PROD, ROOT, helm_template, key, run

Kustomize = Callable[[str], list[dict[str, Any]]]

HELM_LABELS = frozenset({"helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/instance"})
KUSTOMIZE_COMMON = frozenset({"app.kubernetes.io/part-of", "app.kubernetes.io/version"})
MONITORING_KINDS = frozenset({"ServiceMonitor", "PodMonitor", "PrometheusRule"})
MONITORING_REQUIRED_SPEC = {
    "ServiceMonitor": ("selector", "endpoints"),
    "PodMonitor": ("selector", "podMetricsEndpoints"),
    "PrometheusRule": ("groups",),
}
VALUES = {"default": (), "prod": (PROD,), "everything": (EVERYTHING,)}


def _drop_labels(meta: dict[str, Any], drop: frozenset[str] | set[str]) -> None:
    labels = {k: v for k, v in (meta.get("labels") or {}).items() if k not in drop}
    if labels:
        meta["labels"] = labels
    else:
        meta.pop("labels", None)


def _normalized(obj: dict[str, Any], *, drop: frozenset[str] | set[str]) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    _drop_labels(out["metadata"], drop)
    template = out.get("spec", {}).get("template") if isinstance(out.get("spec"), dict) else None
    if isinstance(template, dict) and "metadata" in template:
        _drop_labels(template["metadata"], drop)
    return out


def _assert_same_objects(
    chart: list[dict[str, Any]],
    kustomize: list[dict[str, Any]],
    *,
    overlay_objects: frozenset[str] = frozenset(),
) -> None:
    """Chart and kustomize render the same objects, less the differences the module docstring lists.

    `overlay_objects`: kinds that kustomize adds above deploy/base (they lack its common labels).
    """
    theirs = {key(o): o for o in kustomize if o["kind"] != "Namespace"}
    ours = {key(o): o for o in chart}
    assert sorted(ours) == sorted(theirs), "the chart renders other objects than kustomize"
    problems = []
    for name, expected in theirs.items():
        kind = expected["kind"]
        drop_theirs: set[str] = {"app.kubernetes.io/instance"}
        drop_ours: set[str] = set(HELM_LABELS)
        if kind == "CustomResourceDefinition":
            drop_theirs |= KUSTOMIZE_COMMON
        if kind in overlay_objects:
            drop_ours |= KUSTOMIZE_COMMON - set(expected["metadata"].get("labels", {}))
        theirs_n, ours_n = _normalized(expected, drop=drop_theirs), _normalized(ours[name], drop=drop_ours)
        if theirs_n != ours_n:  # == on the parsed objects: kustomize writes the CRD's 1.0 as 1
            want, got = yaml.safe_dump(theirs_n, sort_keys=True), yaml.safe_dump(ours_n, sort_keys=True)
            diff = "\n".join(
                difflib.unified_diff(want.splitlines(), got.splitlines(), "kustomize", "helm", lineterm="")
            )
            problems.append(f"{name}:\n{diff}")
    assert not problems, "\n\n".join(problems)


def _validate(obj: dict[str, Any], *, crds: dict[tuple[str, str], dict[str, Any]]) -> None:
    where = "{} {}/{}".format(*key(obj))
    if (obj["apiVersion"], obj["kind"]) in crds:
        jsonschema.Draft4Validator(crds[(obj["apiVersion"], obj["kind"])]).validate(obj)
        return
    if obj["kind"] in MONITORING_KINDS:
        # The Prometheus Operator's CRDs are not in the render nor in kubernetes-validate.
        assert obj["apiVersion"] == "monitoring.coreos.com/v1", where
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        assert obj["metadata"].get("namespace"), f"{where}: no namespace"
        for field in MONITORING_REQUIRED_SPEC[obj["kind"]]:
            assert obj["spec"].get(field), f"{where}: spec.{field} missing"
        return
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{where}: {exc.message} at {'.'.join(str(p) for p in exc.path)}")


def _crd_schemas(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for crd in (o for o in objects if o["kind"] == "CustomResourceDefinition"):
        for version in crd["spec"]["versions"]:
            schemas[(f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])] = version[
                "schema"
            ]["openAPIV3Schema"]
    return schemas


def _one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    hits = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def _container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(_one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0])


@pytest.mark.parametrize("which", sorted(VALUES))
def test_helm_lint_is_clean(helm: Path, which: str) -> None:
    args = [str(helm), "lint", "--strict", str(CHART), "--namespace", "finetune-system"]
    for path in VALUES[which]:
        args += ["--values", str(path)]
    result = run(args, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


def test_default_values_render_deploy_base(helm: Path, kustomize: Kustomize) -> None:
    _assert_same_objects(helm_template(helm), kustomize("base"))


def test_prod_values_render_deploy_overlays_prod(helm: Path, kustomize: Kustomize) -> None:
    _assert_same_objects(
        helm_template(helm, values=[PROD]),
        kustomize("overlays/prod"),
        overlay_objects=frozenset({"PodDisruptionBudget", "ConfigMap", *MONITORING_KINDS}),
    )


def test_namespace_create_renders_deploy_base_namespace(helm: Path, kustomize: Kustomize) -> None:
    assert not [o for o in helm_template(helm) if o["kind"] == "Namespace"]
    ours = _one(helm_template(helm, sets=["namespace.create=true"]), "Namespace")
    theirs = _one(kustomize("base"), "Namespace")
    assert _normalized(ours, drop=HELM_LABELS) == theirs


def test_chart_rbac_rules_are_deploy_base_rules(helm: Path) -> None:
    """The ClusterRoles' rules are deploy/base's own, read from its files (not through kustomize)."""
    base = [
        doc
        for name in ("rbac.yaml", "peering.yaml")
        for doc in yaml.safe_load_all((ROOT / "deploy" / "base" / name).read_text(encoding="utf-8"))
        if doc and doc["kind"] == "ClusterRole"
    ]
    assert {r["metadata"]["name"] for r in base} == {"finetune-operator", "finetune-operator-peering"}
    rendered = helm_template(helm, release="platform", namespace="ml-platform")
    for role in base:
        name = role["metadata"]["name"].replace("finetune-operator", "platform-finetune-operator")
        assert _one(rendered, "ClusterRole", name)["rules"] == role["rules"], f"ClusterRole {name}"


@pytest.mark.parametrize("which", sorted(VALUES))
def test_every_rendered_object_validates(helm: Path, which: str) -> None:
    objects = helm_template(helm, values=VALUES[which])
    crds = _crd_schemas(objects)
    assert ("finetune.dev/v1alpha1", "FineTuneJob") in crds, "the FineTuneJob CRD is not in the render"
    assert ("kopf.dev/v1", "ClusterKopfPeering") in crds and ("kopf.dev/v1", "KopfPeering") in crds
    for obj in objects:
        _validate(obj, crds=crds)
    names = [key(o) for o in objects]
    assert len(names) == len(set(names)), "an object is rendered twice"


def test_chart_crd_is_the_generated_crd() -> None:
    """crds/ and the chart's crds/ hold the generator's output (`make crds` writes both)."""
    generated = render_crd()
    assert (CHART / "crds" / "finetune.dev_finetunejobs.yaml").read_text(encoding="utf-8") == generated
    assert (ROOT / "crds" / "finetune.dev_finetunejobs.yaml").read_text(encoding="utf-8") == generated


@pytest.mark.parametrize(
    "source",
    [
        "deploy/base/rbac.yaml",
        "deploy/base/peering.yaml",
        "deploy/components/monitoring/dashboard.json",
        "deploy/components/monitoring/prometheusrule.yaml",
    ],
)
def test_chart_files_are_their_sources(source: str) -> None:
    """The chart's files/ (the ClusterRoles' rules, the alerts, the dashboard) are copies that
    `make helm-files` refreshes: a change to the source without the copy fails here."""
    copy_ = CHART / "files" / Path(source).name
    assert copy_.read_bytes() == (ROOT / source).read_bytes(), f"{source} changed: run `make helm-files`"


def test_chart_peering_crds_are_deploy_base_peering_crds() -> None:
    def crds(path: Path) -> list[dict[str, Any]]:
        docs = yaml.safe_load_all(path.read_text(encoding="utf-8"))
        return [d for d in docs if d and d["kind"] == "CustomResourceDefinition"]

    ours = crds(CHART / "crds" / "kopf.dev_peerings.yaml")
    assert ours and ours == crds(ROOT / "deploy" / "base" / "peering.yaml")


def test_everything_values_reach_the_objects(helm: Path) -> None:
    objects = helm_template(helm, values=[EVERYTHING])
    values = yaml.safe_load(EVERYTHING.read_text(encoding="utf-8"))
    deployment = _one(objects, "Deployment", "finetune-operator")
    pod = deployment["spec"]["template"]["spec"]
    container = _container(objects)
    assert deployment["spec"]["replicas"] == 3
    assert container["image"] == f"{values['image']['repository']}@{values['image']['digest']}"
    assert container["imagePullPolicy"] == "IfNotPresent"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FINETUNE_TRAINER_IMAGE"] == "registry.example.com/platform/finetune-trainer:0.1.0-gpu"
    assert env["EXTRA"] == "1"
    args = container["args"]
    for arg in (
        "--progress-port=9081",
        "--metrics-port=9080",
        "--health-port=9082",
        "--progress-url=https://finetune-progress.example.com/v1/progress",
        "--run-as-user=10001",
        "--peering=finetune-operator",
        "--namespace=team-vision",
        "--namespace=team-retail",
        "--pending-timeout=600",
        "--verbose",
    ):
        assert arg in args, f"{arg} not in {args}"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "metrics": 9080,
        "progress": 9081,
        "health": 9082,
    }
    assert container["resources"] == values["resources"]
    for field in ("affinity", "tolerations", "nodeSelector", "topologySpreadConstraints", "imagePullSecrets"):
        assert pod[field] == values[field], field
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert deployment["spec"]["strategy"] == values["strategy"]
    assert deployment["spec"]["template"]["metadata"]["annotations"] == values["podAnnotations"]
    account = _one(objects, "ServiceAccount")
    assert account["metadata"]["annotations"] == values["serviceAccount"]["annotations"]
    # Watched namespaces: one KopfPeering in each (what a namespaced Kopf operator peers on), no cluster one.
    assert not [o for o in objects if o["kind"] == "ClusterKopfPeering"]
    assert {o["metadata"]["namespace"] for o in objects if o["kind"] == "KopfPeering"} == {
        "team-vision",
        "team-retail",
    }
    assert _one(objects, "PodDisruptionBudget")["spec"]["minAvailable"] == 2
    policy = _one(objects, "NetworkPolicy")["spec"]
    assert (
        policy["ingress"][1]["from"][0]["namespaceSelector"]
        == values["networkPolicy"]["metricsNamespaceSelector"]
    )
    assert {p["port"] for p in _one(objects, "Service")["spec"]["ports"]} == {9080, 9081}
    for kind in MONITORING_KINDS | {"ConfigMap"}:
        monitoring = _one(objects, kind)
        assert monitoring["metadata"]["labels"]["release"] == "kube-prometheus-stack", kind
    assert _one(objects, "ConfigMap")["metadata"]["namespace"] == "grafana"
    endpoint = _one(objects, "ServiceMonitor")["spec"]["endpoints"][0]
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("15s", "5s")
    assert (
        _one(objects, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    )


def test_switches_turn_objects_off_and_on(helm: Path) -> None:
    default = {o["kind"] for o in helm_template(helm)}
    assert "NetworkPolicy" in default and "PodDisruptionBudget" not in default
    assert not default & (MONITORING_KINDS | {"ConfigMap"})
    assert "NetworkPolicy" not in {
        o["kind"] for o in helm_template(helm, sets=["networkPolicy.enabled=false"])
    }
    partial = {
        o["kind"]
        for o in helm_template(helm, sets=["monitoring.enabled=true", "monitoring.dashboard.enabled=false"])
    }
    assert partial >= MONITORING_KINDS and "ConfigMap" not in partial
    assert "--peering=finetune-operator" not in _container(helm_template(helm))["args"]
    assert (
        "--peering=finetune-operator"
        in _container(helm_template(helm, sets=["peering.enabled=true"]))["args"]
    )


def test_another_release_name_and_namespace_name_every_object(helm: Path) -> None:
    objects = helm_template(helm, release="ml", namespace="ml-platform")
    for obj in objects:
        if obj["kind"] == "CustomResourceDefinition":
            continue
        assert obj["metadata"]["name"].startswith("ml-finetune-"), key(obj)
        assert obj["metadata"].get("namespace", "ml-platform") == "ml-platform", key(obj)
    subjects = [s for o in objects if o["kind"] == "ClusterRoleBinding" for s in o["subjects"]]
    assert subjects and all(
        s == {"kind": "ServiceAccount", "name": "ml-finetune-operator", "namespace": "ml-platform"}
        for s in subjects
    )
    assert (
        _one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
        == "ml-finetune-operator"
    )
    assert (
        "--progress-url=http://ml-finetune-operator.ml-platform.svc:8081/v1/progress"
        in _container(objects)["args"]
    )
    assert _one(objects, "ClusterKopfPeering")["metadata"]["name"] == "ml-finetune-operator"
