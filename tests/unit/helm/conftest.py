"""Fixtures of the Helm chart tests: helm and kubectl (built from source, cached), kustomize renders."""

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
    """`kustomize("overlays/prod")`: the objects `kubectl kustomize deploy/<which>` prints (cached)."""
    kubectl = built_tool(script="build-control-plane.sh", binary="kubectl")
    cache: dict[str, list[dict[str, Any]]] = {}

    def render(which: str) -> list[dict[str, Any]]:
        if which not in cache:
            result = run([str(kubectl), "kustomize", str(ROOT / "deploy" / which)], timeout=120)
            assert result.returncode == 0, f"kubectl kustomize deploy/{which} failed:\n{result.stderr}"
            cache[which] = parse(result.stdout)
        return cache[which]

    return render
