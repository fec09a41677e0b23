"""Fixtures of the deploy/ tests: the pinned kustomize and the rendered kustomize overlays."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import DEPLOY, Render, run_tool
from finetune_testbed import tools


@pytest.fixture(scope="session")
def kustomize() -> Path:
    """kustomize v5.7.1, the release `kubectl kustomize` of Kubernetes v1.34 embeds
    (hack/build-kustomize.sh; cached after one build of a minute or two)."""
    try:
        return tools.built_tool(script="build-kustomize.sh", binary="kustomize")
    except tools.ToolBuildError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def render(kustomize: Path) -> Render:
    """`render("overlays/prod")`: the objects `kustomize build deploy/<which>` prints (cached)."""
    cache: dict[str, list[dict[str, Any]]] = {}

    def _render(which: str) -> list[dict[str, Any]]:
        if which not in cache:
            result = run_tool([str(kustomize), "build", str(DEPLOY / which)], timeout=120)
            assert result.returncode == 0, f"kustomize build deploy/{which} failed:\n{result.stderr}"
            cache[which] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        return cache[which]

    return _render
