"""`kubectl finetune`'s command line without a cluster: imports, flags, kubeconfig and context, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from finetune_operator import plugin
from finetune_operator import plugin_format as fmt
from fixtures.imports import loaded_packages

HEAVY = ("tensorflow", "keras", "kopf")


def test_the_plugin_imports_neither_tensorflow_keras_nor_kopf() -> None:
    loaded = loaded_packages("finetune_operator.plugin", timeout=60)
    assert {"kubernetes", "rich", "finetune_operator"} <= loaded
    assert loaded.isdisjoint(HEAVY), loaded & set(HEAVY)


def test_help_lists_the_commands_and_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        plugin.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for command in ("list", "watch", "describe", "logs", "suspend", "resume"):
        assert command in text
    assert "5  the FineTuneJob CRD is not installed" in text


def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        plugin.main(["watch"])
    assert done.value.code == fmt.EXIT_USAGE == 2
    assert "error:" in capsys.readouterr().err


def test_connection_flags_before_and_after_the_command() -> None:
    before = plugin.parser().parse_args(["-n", "a", "--context", "c", "list"])
    after = plugin.parser().parse_args(["list", "-n", "b", "--kubeconfig", "/k"])
    assert (before.namespace, before.context, before.kubeconfig) == ("a", "c", None)
    assert (after.namespace, after.context, after.kubeconfig) == ("b", None, "/k")


def kubeconfig(path: Path) -> Path:
    def ctx(name: str, namespace: str | None) -> dict[str, object]:
        inner: dict[str, str] = {"cluster": name, "user": "u"}
        if namespace:
            inner["namespace"] = namespace
        return {"name": name, "context": inner}

    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "one", "cluster": {"server": "https://127.0.0.1:1"}},
                    {"name": "two", "cluster": {"server": "https://127.0.0.1:2"}},
                ],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [ctx("one", "ml"), ctx("two", None)],
                "current-context": "one",
            }
        )
    )
    return path


def test_connect_takes_the_context_and_its_namespace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = kubeconfig(tmp_path / "config")
    current = plugin.connect(kubeconfig=str(path), context=None, namespace=None)
    assert (current.api.configuration.host, current.namespace) == ("https://127.0.0.1:1", "ml")
    other = plugin.connect(kubeconfig=str(path), context="two", namespace=None)
    assert (other.api.configuration.host, other.namespace) == ("https://127.0.0.1:2", "default")
    assert plugin.connect(kubeconfig=str(path), context="two", namespace="x").namespace == "x"
    monkeypatch.setenv("KUBECONFIG", str(path))
    assert plugin.connect(kubeconfig=None, context=None, namespace=None).namespace == "ml"


def test_a_missing_context_or_kubeconfig_exits_7(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = kubeconfig(tmp_path / "config")
    assert plugin.main(["--kubeconfig", str(path), "--context", "nope", "list"]) == fmt.EXIT_CONNECTION
    assert 'context "nope" not found' in capsys.readouterr().err
    env = {k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST",)}
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_operator.plugin", "list"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**env, "KUBECONFIG": str(tmp_path / "missing"), "HOME": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == fmt.EXIT_CONNECTION, proc.stderr
    assert proc.stderr.startswith("error: no usable kubeconfig")


def test_an_unreachable_api_server_exits_7(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = kubeconfig(tmp_path / "config")  # https://127.0.0.1:1: nothing listens there
    assert plugin.main(["--kubeconfig", str(path), "describe", "x"]) == fmt.EXIT_CONNECTION
    assert "cannot reach the API server at https://127.0.0.1:1" in capsys.readouterr().err


def test_kubeconfig_files_joined_with_a_colon_are_merged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = tmp_path / "clusters"
    first.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Config",
                                     "clusters": [{"name": "one", "cluster": {"server": "https://127.0.0.1:3"}}],
                                     "users": [{"name": "u", "user": {"token": "t"}}]}))  # fmt: skip
    second = tmp_path / "contexts"
    second.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "current-context": "c",
                                      "contexts": [{"name": "c", "context": {"cluster": "one", "user": "u",
                                                                              "namespace": "merged"}}]}))  # fmt: skip
    monkeypatch.setenv("KUBECONFIG", f"{first}{os.pathsep}{second}")
    kube = plugin.connect(kubeconfig=None, context=None, namespace=None)
    assert (kube.api.configuration.host, kube.namespace) == ("https://127.0.0.1:3", "merged")
