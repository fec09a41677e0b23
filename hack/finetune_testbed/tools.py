"""The Go tools hack/build-*.sh build from the Go module proxy and cache outside the work tree
(kustomize, helm, gitops-status, the control plane, Kueue, JobSet): each script prints its
bin folder on its last line."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["ToolBuildError", "build", "built_tool"]

HACK = Path(__file__).resolve().parent.parent


class ToolBuildError(RuntimeError):
    """A build script failed, or its bin folder lacks the binary; the message says which and why."""


def build(script: str, *, timeout: float = 3600.0, capture_stderr: bool = True) -> Path:
    """Runs hack/`script` (cached: seconds once built) and returns the bin folder it prints.
    With `capture_stderr` False its messages go to this process's stderr as they come."""
    path = HACK / script
    try:
        proc = subprocess.run(
            [str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE if capture_stderr else None,
            text=True, timeout=timeout, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolBuildError(f"hack/{script} could not run: {exc}") from exc
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        detail = f":\n{proc.stderr[-4000:]}" if proc.stderr else "; see its messages above"
        raise ToolBuildError(f"hack/{script} failed (exit {proc.returncode}){detail}")
    return Path(lines[-1])


def built_tool(*, script: str, binary: str, timeout: float = 3600.0) -> Path:
    """`binary` from the bin folder hack/`script` prints (it builds it on the first call)."""
    path = build(script, timeout=timeout) / binary
    if not path.is_file():
        raise ToolBuildError(f"hack/{script} printed {path.parent}, which has no {binary}")
    return path
