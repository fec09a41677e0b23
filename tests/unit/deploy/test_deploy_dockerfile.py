"""The Dockerfile, without a Docker engine: hadolint, then its structure read stage by stage.

Checks what a build would otherwise be needed for: both targets exist, each final stage runs
as a numeric non-root user with the right entrypoint, every base image is pinned, the
operator image installs only the `operator` extra (and that extra, resolved from uv.lock,
holds no TensorFlow or Keras), and the image names agree with deploy/ and the operator.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from deploy_helpers import DEPLOY, HADOLINT, ROOT, run_tool, uv_tool

DOCKERFILE = ROOT / "Dockerfile"
OPERATOR_IMAGE = "ghcr.io/finetune-dev/finetune-operator:0.1.0"
TRAINER_IMAGE = "ghcr.io/finetune-dev/finetune-trainer:0.1.0"


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


def _arg_defaults(args: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in args if "=" in a)


def parse(text: str) -> list[Stage]:
    """Stages of a Dockerfile: continuation lines joined, comments dropped; a FROM's `${ARG}` is
    the default of the ARG declared before the first FROM (the base a plain build uses)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    global_args: list[str] = []
    for line in logical:
        keyword, _, arg = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and not stages:
            global_args.append(arg.strip())
        elif keyword == "FROM":
            for name, default in _arg_defaults(global_args).items():
                arg = arg.replace("${" + name + "}", default)
            parts = arg.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else ""
            stages.append(Stage(base=parts[0], name=name))
        elif stages:
            stages[-1].instructions.append((keyword, arg.strip()))
    return stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    parsed = parse(DOCKERFILE.read_text(encoding="utf-8"))
    return {s.name: s for s in parsed}


def test_hadolint_is_clean() -> None:
    result = run_tool([*uv_tool(package=HADOLINT, command="hadolint"), "--format", "json", str(DOCKERFILE)])
    assert result.stdout.strip(), f"hadolint printed nothing (rc {result.returncode}): {result.stderr}"
    findings = json.loads(result.stdout)
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert result.returncode == 0


def test_both_targets_exist(stages: dict[str, Stage]) -> None:
    assert {"operator", "trainer"} <= stages.keys()


def test_every_base_image_is_pinned(stages: dict[str, Stage]) -> None:
    names = set(stages)
    for stage in stages.values():
        if stage.base in names:
            continue
        image, _, tag = stage.base.rpartition(":")
        assert image and tag, f"{stage.base}: no tag"
        assert tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), (
            f"{stage.base}: tag is not a full version"
        )


@pytest.mark.parametrize(
    ("target", "entrypoint", "base_prefix"),
    [
        ("operator", "finetune-operator", "python:3.11."),
        ("trainer", "finetune-train", "tensorflow/tensorflow:"),
    ],
)
def test_target_runs_non_root(
    stages: dict[str, Stage], target: str, entrypoint: str, base_prefix: str
) -> None:
    stage = stages[target]
    assert stage.base.startswith(base_prefix)
    users = stage.all("USER")
    assert users, f"target {target} sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0, f"target {target}: USER {users[-1]} is not a numeric non-root uid"
    assert not gid or (gid.isdigit() and int(gid) > 0)
    assert stage.instructions[-1][0] in {"ENTRYPOINT", "EXPOSE", "CMD"}
    assert json.loads(stage.all("ENTRYPOINT")[-1]) == [entrypoint]


def _exported_extras(stages: dict[str, Stage]) -> dict[str, list[str]]:
    """`uv export` commands in the build stage, keyed by their output file, as argv lists (the
    stage's ARGs at their defaults)."""
    commands: dict[str, list[str]] = {}
    defaults = _arg_defaults(stages["build"].all("ARG"))
    for run in stages["build"].all("RUN"):
        for part in run.split("&&"):
            argv = [defaults.get(a[1:], a) if a.startswith("$") else a for a in shlex.split(part)]
            if len(argv) >= 2 and Path(argv[0]).name == "uv" and argv[1] == "export":
                commands[Path(argv[argv.index("-o") + 1]).name] = argv
    return commands


def test_operator_target_installs_the_operator_extra_only(stages: dict[str, Stage]) -> None:
    exports = _exported_extras(stages)
    operator_export = exports["operator.txt"]
    assert operator_export[operator_export.index("--extra") + 1] == "operator"
    assert operator_export.count("--extra") == 1
    assert "--frozen" in operator_export
    operator_stages = [st for name, st in stages.items() if name.startswith("operator")]
    copied = " ".join(arg for st in operator_stages for arg in st.all("COPY"))
    installs = " ".join(arg for st in operator_stages for arg in st.all("RUN"))
    assert "trainer.txt" not in copied
    assert "operator.txt" in copied and "/tmp/req/operator.txt" in installs and "trainer.txt" not in installs
    assert "tensorflow" not in installs.lower()


def test_operator_extra_resolves_without_tensorflow() -> None:
    """The locked operator requirements (what the operator image installs) hold no TensorFlow or Keras."""
    argv = ["uv", "export", "--frozen", "--no-dev", "--no-emit-project", "--extra", "operator", "--no-hashes"]
    result = run_tool(argv, timeout=120)
    assert result.returncode == 0, result.stderr
    names = {re.split(r"[=<>;\s]", line, maxsplit=1)[0].lower() for line in result.stdout.splitlines()}
    names.discard("")
    assert {"kopf", "kubernetes", "aiohttp", "prometheus-client"} <= names
    heavy = {n for n in names if n.startswith(("tensorflow", "keras", "tf-", "nvidia-", "jax"))}
    assert heavy == set()


def test_trainer_target_keeps_the_base_tensorflow(stages: dict[str, Stage]) -> None:
    exports = _exported_extras(stages)
    trainer_export = exports["trainer.txt"]
    assert trainer_export[trainer_export.index("--extra") + 1] == "trainer"
    assert trainer_export[trainer_export.index("--no-emit-package") + 1] == "tensorflow"
    assert "/tmp/req/trainer.txt" in " ".join(stages["trainer"].all("RUN"))


def test_image_names_agree_with_deploy_and_the_operator() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert f"--target operator -t {OPERATOR_IMAGE}" in text
    assert f"--target trainer  -t {TRAINER_IMAGE}" in text
    deployment = yaml.safe_load((DEPLOY / "base" / "deployment.yaml").read_text(encoding="utf-8"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == OPERATOR_IMAGE
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FINETUNE_TRAINER_IMAGE"] == TRAINER_IMAGE
    sources = "\n".join(
        p.read_text(encoding="utf-8") for p in (ROOT / "operator" / "finetune_operator").glob("*.py")
    )
    assert TRAINER_IMAGE in sources, (
        "the operator's default --trainer-image differs from the trainer image's name"
    )


def test_dockerignore_lets_in_only_what_the_build_copies() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "uv.lock", "README.md", "contract", "operator", "trainer"}
