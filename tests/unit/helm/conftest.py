"""Fixtures of the Helm chart tests: helm and kustomize (built from source, cached), kustomize renders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helm_helpers import ROOT, built_tool, parse, run


@pytest.fixture(scope="session")
def helm() -> Path:
    """helm (hack/build-helm.sh: helm.sh/helm/v3 from the Go module proxy, cached after one build)."""
    return built_tool(script="build-helm.sh", binary="helm")


@pytest.fixture(scope="session")
def kustomize() -> Callable[[str], list[dict[str, Any]]]:
    """`kustomize("overlays/prod")`: the objects `kustomize build deploy/<which>` prints (cached):
    kustomize v5.7.1, what `kubectl kustomize` of Kubernetes v1.34 runs (hack/build-kustomize.sh)."""
    binary = built_tool(script="build-kustomize.sh", binary="kustomize")
    cache: dict[str, list[dict[str, Any]]] = {}

    def render(which: str) -> list[dict[str, Any]]:
        if which not in cache:
            result = run([str(binary), "build", str(ROOT / "deploy" / which)], timeout=120)
            assert result.returncode == 0, f"kustomize build deploy/{which} failed:\n{result.stderr}"
            cache[which] = parse(result.stdout)
        return cache[which]

    return render
