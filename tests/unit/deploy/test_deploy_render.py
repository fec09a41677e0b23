"""deploy/: each kustomization renders, every object validates, and the pieces fit together.

Objects of built-in kinds are validated with kubernetes-validate (offline OpenAPI schemas of
the pinned Kubernetes release, strict: unknown fields are errors). Objects whose kind a CRD
in the same render defines (Kopf's peering kinds) are validated against that CRD's
openAPIV3Schema. The Prometheus Operator's kinds are in neither place; they are named below
with the reason and checked for the fields the Prometheus Operator requires.
"""

from __future__ import annotations

import subprocess
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_helpers import DEPLOY, KUBERNETES_VERSION, OVERLAYS, ROOT, Render, find

# Kinds that kubernetes-validate has no schema for and whose CRD is not part of deploy/.
EXTERNAL_KINDS: dict[tuple[str, str], str] = {
    ("monitoring.coreos.com", "ServiceMonitor"): "Prometheus Operator CRD, installed with Prometheus",
    ("monitoring.coreos.com", "PodMonitor"): "Prometheus Operator CRD, installed with Prometheus",
    ("monitoring.coreos.com", "PrometheusRule"): "Prometheus Operator CRD, installed with Prometheus",
}
EXTERNAL_REQUIRED_SPEC = {
    "ServiceMonitor": ("selector", "endpoints"),
    "PodMonitor": ("selector", "podMetricsEndpoints"),
    "PrometheusRule": ("groups",),
}


def _group(obj: dict[str, Any]) -> str:
    api_version: str = obj["apiVersion"]
    return api_version.split("/")[0] if "/" in api_version else ""


def _crd_schemas(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for crd in (o for o in objects if o["kind"] == "CustomResourceDefinition"):
        for version in crd["spec"]["versions"]:
            key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
            schemas[key] = version["schema"]["openAPIV3Schema"]
    return schemas


def _validate(obj: dict[str, Any], *, crds: dict[tuple[str, str], dict[str, Any]]) -> None:
    where = f"{obj['kind']} {obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"
    if (obj["apiVersion"], obj["kind"]) in crds:
        jsonschema.Draft4Validator(crds[(obj["apiVersion"], obj["kind"])]).validate(obj)
        return
    if (_group(obj), obj["kind"]) in EXTERNAL_KINDS:
        assert obj["apiVersion"] == "monitoring.coreos.com/v1", where
        assert obj["metadata"].get("namespace"), f"{where}: no namespace"
        for key in EXTERNAL_REQUIRED_SPEC[obj["kind"]]:
            assert obj["spec"].get(key), f"{where}: spec.{key} missing"
        return
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{where}: {exc.message} at {'.'.join(str(p) for p in exc.path)}")


@pytest.mark.parametrize("which", OVERLAYS)
def test_every_rendered_object_validates(render: Render, which: str) -> None:
    objects = render(which)
    assert objects, f"deploy/{which} renders nothing"
    crds = _crd_schemas(objects)
    assert ("finetune.dev/v1alpha1", "FineTuneJob") in crds, "the FineTuneJob CRD is not in the render"
    for obj in objects:
        _validate(obj, crds=crds)
    names = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), "an object is rendered twice"


def test_quickstart_example_validates_against_the_crd(render: Render) -> None:
    crds = _crd_schemas(render("base"))
    docs = [
        d
        for d in yaml.safe_load_all((ROOT / "examples" / "quickstart.yaml").read_text(encoding="utf-8"))
        if d
    ]
    jobs = [d for d in docs if d["kind"] == "FineTuneJob"]
    assert jobs, "examples/quickstart.yaml has no FineTuneJob"
    for job in jobs:
        jsonschema.Draft4Validator(crds[(job["apiVersion"], job["kind"])]).validate(job)


def test_base_namespace_enforces_restricted(render: Render) -> None:
    labels = find(render("base"), kind="Namespace", name="finetune-system")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def _operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    pod = find(objects, kind="Deployment", name="finetune-operator")["spec"]["template"]["spec"]
    return dict(pod["containers"][0])


def test_operator_runs_as_its_service_account_under_restricted(render: Render) -> None:
    objects = render("base")
    deployment = find(objects, kind="Deployment", name="finetune-operator")
    pod = deployment["spec"]["template"]["spec"]
    account = find(objects, kind="ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"] == "finetune-operator"
    assert account["metadata"]["namespace"] == deployment["metadata"]["namespace"] == "finetune-system"
    assert pod["automountServiceAccountToken"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    container = _operator_container(objects)
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"]
    assert container["image"] == "ghcr.io/finetune-dev/finetune-operator:0.1.0"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert "readinessProbe" in container
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][kind].keys()


def test_cluster_role_is_bound_to_the_operator_without_wildcards(render: Render) -> None:
    objects = render("base")
    role = find(objects, kind="ClusterRole", name="finetune-operator")
    for rule in role["rules"]:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule.get(key, []), f"wildcard in {key}: {rule}"
    bindings = [
        o
        for o in objects
        if o["kind"] == "ClusterRoleBinding" and o["roleRef"]["name"] == "finetune-operator"
    ]
    assert bindings
    subjects = [s for b in bindings for s in b["subjects"]]
    assert {"kind": "ServiceAccount", "name": "finetune-operator", "namespace": "finetune-system"} in subjects


def test_service_and_network_policy_match_the_operator_ports(render: Render) -> None:
    objects = render("base")
    container = _operator_container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8080, "progress": 8081, "health": 8082}
    pod_labels = find(objects, kind="Deployment")["spec"]["template"]["metadata"]["labels"]

    service = find(objects, kind="Service", name="finetune-operator")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        ("progress", 8081, "progress"),
        ("metrics", 8080, "metrics"),
    }
    args = container["args"]
    assert "--progress-url=http://finetune-operator.finetune-system.svc:8081/v1/progress" in args

    policy = find(objects, kind="NetworkPolicy", name="finetune-operator")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    rules = {rule["ports"][0]["port"]: rule["from"][0] for rule in policy["ingress"]}
    assert set(rules) == {"progress", "metrics"} and set(rules) <= ports.keys()
    assert rules["progress"] == {
        "namespaceSelector": {},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "finetune-trainer"}},
    }
    assert rules["metrics"]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }


def test_operator_accepts_every_flag_the_deployment_passes(render: Render) -> None:
    """Each `--flag` in base and the overlays is in `finetune-operator --help`."""
    help_text = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "finetune-operator"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    for which in OVERLAYS:
        for arg in _operator_container(render(which))["args"]:
            flag = arg.split("=", 1)[0]
            assert flag in help_text, f"deploy/{which} passes {flag}, which finetune-operator does not accept"


def test_dev_overlay_is_one_replica_with_verbose_logging(render: Render) -> None:
    objects = render("overlays/dev")
    assert find(objects, kind="Deployment")["spec"]["replicas"] == 1
    assert "--verbose" in _operator_container(objects)["args"]


def test_prod_overlay_is_highly_available_and_monitored(render: Render) -> None:
    objects = render("overlays/prod")
    deployment = find(objects, kind="Deployment", name="finetune-operator")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]
    anti = pod["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    pdb = find(objects, kind="PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert 0 < pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    kinds = {o["kind"] for o in objects}
    assert {"ServiceMonitor", "PrometheusRule"} <= kinds, "the monitoring component is not in prod"
    service = find(objects, kind="Service", name="finetune-operator")
    monitor = find(objects, kind="ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert "metrics" in {e.get("port") for e in monitor["spec"]["endpoints"]}


def test_crds_kustomization_lists_the_generated_crd() -> None:
    kustomization = yaml.safe_load((ROOT / "crds" / "kustomization.yaml").read_text(encoding="utf-8"))
    generated = sorted(p.name for p in (ROOT / "crds").glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == generated
    assert (DEPLOY / "base" / "kustomization.yaml").is_file()


def test_replicas_beyond_one_use_kopf_peering(render: Render) -> None:
    """Two replicas without peering would both handle every job: prod must peer, with the RBAC for it."""
    for which in OVERLAYS:
        objects = render(which)
        deployment = find(objects, kind="Deployment", name="finetune-operator")
        if deployment["spec"].get("replicas", 1) <= 1:
            continue
        names = [
            a.split("=", 1)[1] for a in _operator_container(objects)["args"] if a.startswith("--peering=")
        ]
        assert names, f"deploy/{which} runs {deployment['spec']['replicas']} replicas without --peering"
        peering = find(objects, kind="ClusterKopfPeering", name=names[-1])
        assert peering["apiVersion"].startswith("kopf.dev/")
        crd_kinds = {o["spec"]["names"]["kind"] for o in objects if o["kind"] == "CustomResourceDefinition"}
        assert "ClusterKopfPeering" in crd_kinds
        bound = {
            b["roleRef"]["name"]
            for b in objects
            if b["kind"] == "ClusterRoleBinding"
            and {"kind": "ServiceAccount", "name": "finetune-operator", "namespace": "finetune-system"}
            in b["subjects"]
        }
        granted = {
            verb
            for role in objects
            if role["kind"] == "ClusterRole" and role["metadata"]["name"] in bound
            for rule in role["rules"]
            if "kopf.dev" in rule.get("apiGroups", []) and "clusterkopfpeerings" in rule.get("resources", [])
            for verb in rule["verbs"]
        }
        assert {"list", "watch", "patch"} <= granted, f"the ClusterRole lets Kopf peer with only {granted}"
