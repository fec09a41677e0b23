"""What Flux (kstatus) and Argo CD conclude about objects, asked of their own code.

A thin wrapper around `gitops-status` (hack/gotools, built once and cached by
hack/build-gotools.sh): kstatus is `sigs.k8s.io/cli-utils/pkg/kstatus/status.Compute`,
the Argo CD health is deploy/argocd/finetunejob-health.lua run in gopher-lua the way
Argo CD runs an argocd-cm override. No rule of either tool is re-implemented here.

- `classify(objects)`: objects given as dicts (as `kubectl get -o json` shows them);
- `classify_live(...)`: objects read from an API server by name;
- `watch_live(...)`: every version of one live object seen for a while (or until a status);
  `start_watch(...)` does the same in the background (start it, then create the object).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_testbed import tools

ROOT = Path(__file__).resolve().parents[3]
LUA = ROOT / "deploy" / "argocd" / "finetunejob-health.lua"
FINETUNEJOB_GVK = "finetune.dev/v1alpha1/FineTuneJob"
KSTATUS = frozenset({"InProgress", "Failed", "Current", "Terminating", "NotFound", "Unknown"})
ARGO_HEALTH = frozenset({"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"})


@dataclass(frozen=True)
class Verdict:
    """One tool's conclusion: its status word and message."""

    status: str
    message: str


@dataclass(frozen=True)
class Classified:
    """kstatus' and (when asked) Argo CD's verdict on one version of one object."""

    kind: str
    namespace: str
    name: str
    generation: int
    observed_generation: int | None  # status.observedGeneration; None: the object has none
    resource_version: str
    event: str
    seen: str  # when a watch delivered this version (RFC 3339), "" outside -watch
    kstatus: Verdict
    argocd: Verdict | None


class ToolError(RuntimeError):
    """gitops-status failed, or a verdict carried an error (a Lua error, a kstatus error)."""


@functools.cache
def binary() -> Path:
    """The gitops-status binary (hack/build-gotools.sh, built on first use: minutes cold, then cached)."""
    try:
        path = tools.built_tool(script="build-gotools.sh", binary="gitops-status")
    except tools.ToolBuildError as exc:
        raise ToolError(str(exc)) from exc
    if not os.access(path, os.X_OK):
        raise ToolError(f"hack/build-gotools.sh printed {path.parent}, whose gitops-status is not executable")
    return path


def _parse(stdout: str) -> list[Classified]:
    out = []
    for line in stdout.splitlines():
        raw = json.loads(line)
        ks, argo = raw["kstatus"], raw.get("argocd")
        for name, verdict in (("kstatus", ks), ("Argo CD", argo)):
            if verdict is not None and verdict.get("error"):
                raise ToolError(f"{name} on {raw.get('kind')}/{raw.get('name')}: {verdict['error']}")
        out.append(
            Classified(
                kind=raw["kind"],
                namespace=raw.get("namespace", ""),
                name=raw["name"],
                generation=int(raw.get("generation", 0)),
                observed_generation=raw.get("observedGeneration"),
                resource_version=raw.get("resourceVersion", ""),
                event=raw.get("event", ""),
                seen=raw.get("seen", ""),
                kstatus=Verdict(ks["status"], ks.get("message", "")),
                argocd=None if argo is None else Verdict(argo["status"], argo.get("message", "")),
            )
        )
    return out


def _run(
    args: Sequence[str], *, stdin: str | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary()), *args], input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )


def _lua_args(lua: Path | None) -> list[str]:
    return [] if lua is None else ["-lua", str(lua)]


def classify(objects: Iterable[Mapping[str, Any]], *, lua: Path | None = LUA) -> list[Classified]:
    """The verdicts on `objects` (whole objects, status included), in order."""
    body = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)})
    proc = _run(_lua_args(lua), stdin=body)
    result = _parse(proc.stdout) if proc.stdout else []
    if proc.returncode != 0:
        raise ToolError(f"gitops-status exited {proc.returncode}: {proc.stderr.strip()}")
    return result


def classify_files(paths: Sequence[Path], *, lua: Path | None = LUA) -> list[Classified]:
    """The verdicts on every object in the YAML/JSON files `paths`, in order."""
    proc = _run([*_lua_args(lua), *map(str, paths)])
    result = _parse(proc.stdout) if proc.stdout else []
    if proc.returncode != 0:
        raise ToolError(f"gitops-status exited {proc.returncode}: {proc.stderr.strip()}")
    return result


def classify_live(
    *,
    kubeconfig: Path,
    namespace: str,
    names: Sequence[str],
    gvk: str = FINETUNEJOB_GVK,
    lua: Path | None = LUA,
) -> list[Classified]:
    """The verdicts on the named objects as the API server holds them now."""
    args = [*_lua_args(lua), "-kubeconfig", str(kubeconfig), "-gvk", gvk, "-n", namespace, *names]
    proc = _run(args)
    if proc.returncode != 0:
        raise ToolError(f"gitops-status exited {proc.returncode}: {proc.stderr.strip()}")
    return _parse(proc.stdout)


def _watch_args(
    *,
    kubeconfig: Path,
    namespace: str,
    name: str,
    seconds: float,
    until: str | None,
    gvk: str,
    lua: Path | None,
) -> list[str]:
    args = [*_lua_args(lua), "-kubeconfig", str(kubeconfig), "-gvk", gvk, "-n", namespace]
    return [*args, "-watch", f"{seconds}s", *(["-until", until] if until else []), name]


def _watch_result(proc_rc: int, stdout: str, stderr: str, until: str | None) -> tuple[list[Classified], bool]:
    if proc_rc not in (0, 3) or (proc_rc == 3 and not until):
        raise ToolError(f"gitops-status exited {proc_rc}: {stderr.strip()}")
    return _parse(stdout), proc_rc == 0 and until is not None


def watch_live(
    *,
    kubeconfig: Path,
    namespace: str,
    name: str,
    seconds: float,
    until: str | None = None,
    gvk: str = FINETUNEJOB_GVK,
    lua: Path | None = LUA,
) -> tuple[list[Classified], bool]:
    """Every version of one object seen in `seconds` (the current one first, if it exists).

    With `until` (a kstatus status, or "argocd:<health>") the watch ends as soon as that
    verdict is seen; the flag says whether it was.
    """
    args = _watch_args(
        kubeconfig=kubeconfig, namespace=namespace, name=name, seconds=seconds, until=until, gvk=gvk, lua=lua
    )
    proc = _run(args, timeout=seconds + 60)
    return _watch_result(proc.returncode, proc.stdout, proc.stderr, until)


@dataclass
class Watch:
    """A `watch_live` running in the background; `result()` waits for it."""

    proc: subprocess.Popen[str]
    seconds: float
    until: str | None

    def result(self) -> tuple[list[Classified], bool]:
        try:
            stdout, stderr = self.proc.communicate(timeout=self.seconds + 60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            stdout, stderr = self.proc.communicate()
        return _watch_result(self.proc.returncode, stdout, stderr, self.until)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def start_watch(
    *,
    kubeconfig: Path,
    namespace: str,
    name: str,
    seconds: float,
    until: str | None = None,
    gvk: str = FINETUNEJOB_GVK,
    lua: Path | None = LUA,
) -> Watch:
    """`watch_live` in the background, returned once its watch is open."""
    args = _watch_args(
        kubeconfig=kubeconfig, namespace=namespace, name=name, seconds=seconds, until=until, gvk=gvk, lua=lua
    )
    proc = subprocess.Popen([str(binary()), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    first = proc.stderr.readline()  # "gitops-status: watching NAME", or an error and EOF
    watch = Watch(proc=proc, seconds=seconds, until=until)
    if not first.startswith("gitops-status: watching "):
        watch.stop()
        raise ToolError(f"gitops-status did not start watching: {first.strip()}")
    return watch
