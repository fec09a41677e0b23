"""Helpers of the Helm chart tests: the chart's paths, helm and kustomize built from source, renders.

Nothing here skips: helm (hack/build-helm.sh) and kustomize (hack/build-kustomize.sh) are
built from the Go module proxy once per machine and cached; a build that fails fails the test
that needs it, with the reason.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_testbed import tools

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "deploy" / "helm" / "finetune-operator"
HERE = Path(__file__).resolve().parent
EVERYTHING = HERE / "values-everything.yaml"
PROD = CHART / "values-prod.yaml"
# The release and namespace that give deploy/base's names: fullname = release name when it
# contains the chart's name; deploy/base writes finetune-system into each manifest.
RELEASE = "finetune-operator"
NAMESPACE = "finetune-system"
KUBERNETES_VERSION = "1.34.0"  # kubernetes-validate's schemas, as tests/unit/deploy uses


def run(args: Sequence[str], *, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """Runs a command in the repository root, failing the test (never skipping) when it cannot start."""
    try:
        return subprocess.run(
            list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        pytest.fail(f"cannot run {args[0]}: {exc}")


def built_tool(*, script: str, binary: str) -> Path:
    """`binary` from the bin folder that hack/`script` prints (it builds it on the first call)."""
    try:
        return tools.built_tool(script=script, binary=binary)
    except tools.ToolBuildError as exc:
        pytest.fail(str(exc))


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: kustomize writes the CRD's 1.0e-05 as
    1e-05, which YAML 1.1 (PyYAML) reads as a string and the API server as a number."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def parse(text: str) -> list[dict[str, Any]]:
    """The objects of a multi-document YAML stream (empty documents dropped), floats as YAML 1.2 reads them."""
    return [doc for doc in yaml.load_all(text, Loader=_Yaml12Loader) if doc]


def key(obj: dict[str, Any]) -> tuple[str, str, str]:
    """(kind, namespace, name): what names one object in a render."""
    meta = obj["metadata"]
    return obj["kind"], meta.get("namespace", ""), meta["name"]


def helm_template(
    helm: Path,
    *,
    values: Sequence[Path] = (),
    sets: Sequence[str] = (),
    release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> list[dict[str, Any]]:
    """The objects `helm template --include-crds` renders (the chart's crds/ included)."""
    args = [str(helm), "template", release, str(CHART), "--namespace", namespace, "--include-crds"]
    for path in values:
        args += ["--values", str(path)]
    for item in sets:
        args += ["--set", item]
    result = run(args, timeout=120)
    assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
    return parse(result.stdout)
