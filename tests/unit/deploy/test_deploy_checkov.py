"""checkov (run isolated with `uv tool run`) on what deploy/ installs, a trainer Job and the Dockerfile.

No check may fail. A check that is deliberately not met carries its reason where checkov
reads it: a `checkov.io/skipN: CKV_...=reason` annotation on the manifest (which, unlike a
YAML comment, survives `kubectl kustomize`). The trainer Job is made by the operator's own
builder, so its justifications live here, in TRAINER_JOB_SKIPS, and are applied as the same
annotations before the scan. In the Dockerfile, checkov reads `# checkov:skip=` comments.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import CHECKOV, OVERLAYS, ROOT, Render, find, run_tool, uv_tool

TRAINER_JOB_SKIPS = {
    "CKV_K8S_43": "Images are released by tag; a digest exists only once the image is pushed (set runtime.image).",
    "CKV_K8S_15": (
        "IfNotPresent: trainer images are several GB and version-tagged (never :latest); pulling one again "
        "for every job buys nothing."
    ),
}


def checkov(
    *, directory: Path | None = None, file: Path | None = None, framework: str = "kubernetes"
) -> dict[str, Any]:
    """checkov's JSON report of the `framework` files in `directory` (or of one `file`)."""
    target = ["--directory", str(directory)] if directory is not None else ["--file", str(file)]
    argv = [
        *uv_tool(package=CHECKOV, command="checkov"),
        *target,
        "--framework",
        framework,
        "--skip-download",
        "--output",
        "json",
    ]
    result = run_tool(argv, timeout=600)
    assert result.stdout.strip().startswith(("{", "[")), (
        f"checkov failed (rc {result.returncode}):\n{result.stderr[-3000:]}"
    )
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    matching = [r for r in reports if r.get("check_type") == framework]
    assert matching, f"checkov scanned no {framework} file in {directory or file}"
    return dict(matching[0])


def assert_clean(report: dict[str, Any]) -> None:
    results = report["results"]
    failed = [f"{c['check_id']} {c['check_name']} ({c['resource']})" for c in results["failed_checks"]]
    assert failed == [], "checkov failed checks:\n" + "\n".join(failed)
    assert report["summary"]["passed"] > 0, "checkov passed nothing: it scanned nothing"
    for skipped in results["skipped_checks"]:
        reason = (skipped.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason) > 20, f"{skipped['check_id']} on {skipped['resource']} is skipped without a reason"


@pytest.fixture(scope="module")
def rendered_dir(render: Render, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("rendered")
    for which in OVERLAYS:
        (directory / f"{which.replace('/', '-')}.yaml").write_text(
            yaml.safe_dump_all(render(which)), encoding="utf-8"
        )
    return directory


def test_checkov_on_deploy(rendered_dir: Path) -> None:
    report = checkov(directory=rendered_dir)
    assert_clean(report)
    skipped = {c["check_id"] for c in report["results"]["skipped_checks"]}
    assert skipped <= {"CKV_K8S_38", "CKV_K8S_43"}, f"new skipped checks: {skipped}"


def _operator_run_as_user(objects: list[dict[str, Any]]) -> int:
    container = find(objects, kind="Deployment")["spec"]["template"]["spec"]["containers"][0]
    values = [a.split("=", 1)[1] for a in container["args"] if a.startswith("--run-as-user=")]
    assert values, "deploy/base does not set --run-as-user"
    return int(values[-1])


def test_checkov_on_a_trainer_job(render: Render, tmp_path: Path) -> None:
    """The Job the operator would make for examples/quickstart.yaml, as deploy/base configures it."""
    from finetune_operator import api, builders

    documents = [
        d
        for d in yaml.safe_load_all((ROOT / "examples" / "quickstart.yaml").read_text(encoding="utf-8"))
        if d
    ]
    resource = next(d for d in documents if d["kind"] == "FineTuneJob")
    owner = builders.Owner(
        namespace="ml",
        name=resource["metadata"]["name"],
        uid="00000000-0000-0000-0000-000000000001",
        labels={},
    )
    job = builders.build_job(
        pod=builders.TrainerPod(
            owner=owner,
            spec=api.FineTuneJobSpec.model_validate(resource["spec"]),
            default_image="ghcr.io/finetune-dev/finetune-trainer:0.1.0",
            progress_url="http://finetune-operator.finetune-system.svc:8081/v1/progress",
            run_as_user=_operator_run_as_user(render("base")),
        ),
    )
    annotations = job["metadata"].setdefault("annotations", {})
    for i, (check, reason) in enumerate(sorted(TRAINER_JOB_SKIPS.items()), start=1):
        annotations[f"checkov.io/skip{i}"] = f"{check}={reason}"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job), encoding="utf-8")
    # The policy users apply next to their jobs (README): trainer pods are not left without one.
    policy = yaml.safe_load((ROOT / "examples" / "trainer-networkpolicy.yaml").read_text(encoding="utf-8"))
    policy["metadata"]["namespace"] = "ml"
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy), encoding="utf-8")
    report = checkov(directory=tmp_path)
    assert_clean(report)
    assert {c["check_id"] for c in report["results"]["skipped_checks"]} <= TRAINER_JOB_SKIPS.keys()


def test_checkov_on_the_dockerfile() -> None:
    report = checkov(file=ROOT / "Dockerfile", framework="dockerfile")
    assert_clean(report)
    assert {c["check_id"] for c in report["results"]["skipped_checks"]} <= {"CKV_DOCKER_2"}
