"""Fixtures of the deploy/ tests: the pinned kubectl and the rendered kustomize overlays."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import DEPLOY, ROOT, Render, run_tool


@pytest.fixture(scope="session")
def kubectl() -> Path:
    """kubectl of the pinned Kubernetes release (hack/build-control-plane.sh; cached after one build)."""
    result = run_tool([str(ROOT / "hack" / "build-control-plane.sh")], timeout=3600)
    if result.returncode != 0:
        pytest.fail(f"hack/build-control-plane.sh failed:\n{result.stderr[-4000:]}")
    path = Path(result.stdout.strip().splitlines()[-1]) / "kubectl"
    if not path.is_file():
        pytest.fail(f"hack/build-control-plane.sh printed {path.parent}, which has no kubectl")
    return path


@pytest.fixture(scope="session")
def render(kubectl: Path) -> Render:
    """`render("overlays/prod")`: the objects `kubectl kustomize deploy/<which>` prints (cached)."""
    cache: dict[str, list[dict[str, Any]]] = {}

    def _render(which: str) -> list[dict[str, Any]]:
        if which not in cache:
            result = run_tool([str(kubectl), "kustomize", str(DEPLOY / which)], timeout=120)
            assert result.returncode == 0, f"kubectl kustomize deploy/{which} failed:\n{result.stderr}"
            cache[which] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        return cache[which]

    return _render
