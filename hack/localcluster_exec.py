"""Starts one container process for the pod runner, in a mount namespace of its own.

Usage (by hack/podrunner.py only): `python -I localcluster_exec.py SPEC.json`. The spec says
what to bind where, the working directory, the environment and the argv. This process
unshares its mount namespace (so its mounts are invisible to every other process), makes
the mounts private, bind-mounts each volume at its mountPath (read-only where asked), then
execs the container's command in place, so the pod runner's pid is the container's pid.

If anything fails before exec, the reason goes to `startErrorPath` and the exit code is 128
(what a container runtime reports as StartError).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import sys
from pathlib import Path
from typing import Any

CLONE_NEWNS = 0x00020000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

# The repository (its .venv runs the container's command) must stay visible at its own path
# even when a volume is mounted over a folder above it (an emptyDir at /tmp over a checkout
# in /tmp/...).
REPO_ROOT = Path(__file__).resolve().parent.parent
STAGING_ROOT = Path("/run/fto-exec")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class StartError(Exception):
    """The container could not be started; the message is reported in its status."""


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise StartError(f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, flags: int) -> None:
    _check(
        _libc.mount(
            source.encode() if source is not None else None,
            target.encode(),
            None,
            ctypes.c_ulong(flags),
            None,
        ),
        f"mount {source or ''} -> {target}",
    )


def _ensure_target(path: Path, *, is_file: bool) -> None:
    """The mount point must exist; like a container runtime, create it (empty) if it does not."""
    if is_file:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    else:
        path.mkdir(parents=True, exist_ok=True)


def _is_under(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def set_up(spec: dict[str, Any]) -> None:
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS) (the pod runner must run as root)")
    _mount(None, "/", MS_REC | MS_PRIVATE)
    mounts = sorted(spec["mounts"], key=lambda m: len(Path(m["target"]).parts))
    # Stage every source (and the repository) first: a mount over a parent folder of a
    # later source (or of the repository) would otherwise hide it.
    staging = STAGING_ROOT / str(os.getpid())
    staged: list[Path] = []

    def stage(source: Path) -> Path:
        place = staging / str(len(staged))
        _ensure_target(place, is_file=source.is_file())
        _mount(str(source), str(place), MS_BIND | MS_REC)
        staged.append(place)
        return place

    sources: list[Path] = []
    for m in mounts:
        source = Path(m["source"])
        if not source.exists():
            raise StartError(f"volume source {source} for {m['target']} does not exist")
        sources.append(stage(source))
    shadowed = any(_is_under(REPO_ROOT, Path(m["target"])) for m in mounts)
    repo_stage = stage(REPO_ROOT) if shadowed else None
    for m, source in zip(mounts, sources, strict=True):
        target = Path(m["target"])
        _ensure_target(target, is_file=source.is_file())
        _mount(str(source), str(target), MS_BIND | MS_REC)
        if m.get("readOnly"):
            _mount(None, str(target), MS_BIND | MS_REMOUNT | MS_RDONLY | MS_REC | MS_NOSUID | MS_NODEV)
    if repo_stage is not None:
        _ensure_target(REPO_ROOT, is_file=False)
        _mount(str(repo_stage), str(REPO_ROOT), MS_BIND | MS_REC)
    for place in reversed(staged):
        _libc.umount2(str(place).encode(), MNT_DETACH)
        with contextlib.suppress(OSError):
            place.unlink() if place.is_file() else place.rmdir()
    with contextlib.suppress(OSError):
        staging.rmdir()
    workdir = Path(spec["workingDir"])
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        os.chdir(workdir)
    except OSError as err:
        raise StartError(f"working directory {workdir}: {err.strerror}") from None


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text())
    start_error = Path(spec["startErrorPath"])
    try:
        set_up(spec)
        env: dict[str, str] = spec["env"]
        args: list[str] = spec["argv"]
        if not args:
            raise StartError("the container has no command (images are not pulled; set command)")
        try:
            os.execvpe(args[0], args, env)
        except OSError as err:
            raise StartError(f'exec: "{args[0]}": {err.strerror}') from None
    except StartError as err:
        start_error.write_text(str(err))
        print(f"pod runner: cannot start container: {err}", file=sys.stderr)
        return 128
    return 128  # not reached: execvpe replaces this process


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
