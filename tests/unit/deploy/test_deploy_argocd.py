"""The Argo CD health check of FineTuneJob, run as Argo CD runs an argocd-cm override.

gopher-lua (github.com/yuin/gopher-lua, Argo CD's own Lua VM) with only the package, base
and table libraries open, the live object as the global `obj`, a one-second deadline, and
the returned table read back as {status, message} (hack/gotools, cmd/gitops-status).
deploy/argocd/ ships Argo CD's test layout: health_test.yaml lists testdata/ inputs with the
exact health each must get; every case runs here. The argocd-cm snippet must carry the same
Lua as the .lua file, byte for byte.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import DEPLOY
from gitops_status import ARGO_HEALTH, LUA, ToolError, classify, classify_files

ARGOCD = DEPLOY / "argocd"
CM_FILE = ARGOCD / "argocd-cm-patch.yaml"
CM_KEY = "resource.customizations.health.finetune.dev_FineTuneJob"
HEALTH_TESTS = ARGOCD / "health_test.yaml"


def _cases() -> list[dict[str, Any]]:
    return list(yaml.safe_load(HEALTH_TESTS.read_text(encoding="utf-8"))["tests"])


CASES = _cases()


@pytest.fixture(scope="module")
def results() -> dict[str, tuple[str, str]]:
    """Every health_test.yaml input through the runner in one go: inputPath -> (status, message)."""
    paths = [ARGOCD / case["inputPath"] for case in CASES]
    got = classify_files(paths)
    assert len(got) == len(paths), "each testdata file must hold exactly one object"
    out = {}
    for case, c in zip(CASES, got, strict=True):
        assert c.argocd is not None
        out[case["inputPath"]] = (c.argocd.status, c.argocd.message)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c["inputPath"] for c in CASES])
def test_health_test_case(case: dict[str, Any], results: dict[str, tuple[str, str]]) -> None:
    want = case["healthStatus"]
    assert results[case["inputPath"]] == (want["status"], want.get("message", ""))


def test_health_test_yaml_covers_every_testdata_file_and_outcome() -> None:
    listed = {case["inputPath"] for case in CASES}
    on_disk = {f"testdata/{p.name}" for p in (ARGOCD / "testdata").glob("*.yaml")}
    assert listed == on_disk
    assert {case["healthStatus"]["status"] for case in CASES} == {
        "Progressing",
        "Healthy",
        "Degraded",
        "Suspended",
    }
    assert {case["healthStatus"]["status"] for case in CASES} <= ARGO_HEALTH


def test_argocd_cm_snippet_is_the_lua_file() -> None:
    cm = yaml.safe_load(CM_FILE.read_text(encoding="utf-8"))
    assert cm["kind"] == "ConfigMap"
    assert cm["metadata"]["name"] == "argocd-cm"
    assert cm["data"][CM_KEY] == LUA.read_text(encoding="utf-8")
    # Overrides get the full standard library only when asked to; we never ask.
    assert not any(key.startswith("resource.customizations.useOpenLibs") for key in cm["data"])


# --- the runner really is Argo CD's sandbox (so a pass here means a pass there) ------------

JOB: dict[str, Any] = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "x", "generation": 1},
}


def _run_script(tmp_path: Path, source: str, obj: dict[str, Any] | None = None) -> tuple[str, str]:
    script = tmp_path / "health.lua"
    script.write_text(source, encoding="utf-8")
    (got,) = classify([obj or JOB], lua=script)
    assert got.argocd is not None
    return got.argocd.status, got.argocd.message


@pytest.mark.parametrize("library", ["string", "math", "io", "os", "debug", "coroutine"])
def test_the_runner_opens_no_library_beyond_package_base_table(tmp_path: Path, library: str) -> None:
    with pytest.raises(ToolError, match=r"attempt to index a non-table object\(nil\)"):
        _run_script(tmp_path, f'local x = {library}.foo\nreturn {{status = "Healthy"}}')


def test_the_runner_has_base_table_and_package(tmp_path: Path) -> None:
    source = (
        "local t = {}\ntable.insert(t, tostring(obj.metadata.generation))\n"
        'assert(type(package.loaded) == "table")\nfor _, v in ipairs(t) do end\n'
        'return {status = "Healthy", message = table.concat(t, ",") .. " " .. obj.metadata.name}'
    )
    assert _run_script(tmp_path, source) == ("Healthy", "1 x")


def test_an_invalid_health_status_reads_unknown(tmp_path: Path) -> None:
    assert _run_script(tmp_path, 'return {status = "Fine"}') == (
        "Unknown",
        "Lua returned an invalid health status",
    )


def test_a_script_that_returns_no_table_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ToolError, match="expect table output from Lua script, not string"):
        _run_script(tmp_path, 'return "Healthy"')


def test_a_script_that_never_ends_is_stopped(tmp_path: Path) -> None:
    with pytest.raises(ToolError, match="context deadline exceeded"):
        _run_script(tmp_path, "while true do end")


def test_an_object_being_deleted_is_progressing_before_any_lua_runs(tmp_path: Path) -> None:
    deleting = {**JOB, "metadata": {**JOB["metadata"], "deletionTimestamp": "2026-01-01T00:00:00Z"}}
    assert _run_script(tmp_path, "error('never runs')", deleting) == ("Progressing", "Pending deletion")
