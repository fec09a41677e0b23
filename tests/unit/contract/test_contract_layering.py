"""The contract package and the one-way imports around it.

`finetune_contract` (spec models, progress protocol, exit codes) is what the operator and the
trainer share: it imports only pydantic and the standard library; the operator never imports
the trainer, TensorFlow or Keras; the trainer never imports the operator, Kopf or a Kubernetes
client. Checked on the source (every import statement, the lazy ones in functions included)
and, for the contract, on what importing it really loads. The exit codes the trainer exits
with are the ones the operator's pod failure policy and status read.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from finetune_contract import exits, protocol, spec
from finetune_operator import api, builders
from finetune_trainer import errors
from fixtures.imports import loaded_packages

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = {
    "finetune_contract": ROOT / "contract" / "finetune_contract",
    "finetune_operator": ROOT / "operator" / "finetune_operator",
    "finetune_trainer": ROOT / "trainer" / "finetune_trainer",
}
KUBERNETES_CLIENTS = {"kopf", "kubernetes", "kubernetes_asyncio", "kr8s", "lightkube"}
ML = {"tensorflow", "keras", "tf_keras", "tensorboard"}
FORBIDDEN = {
    "finetune_operator": ML | {"finetune_trainer"},
    "finetune_trainer": KUBERNETES_CLIENTS | {"finetune_operator"},
}
CONTRACT_ALLOWED = {"pydantic", "typing_extensions", "finetune_contract"}


def _imports(package: Path) -> dict[str, set[str]]:
    """Top-level module names each source file of the package imports, by file name."""
    found: dict[str, set[str]] = {}
    for file in sorted(package.glob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), filename=str(file))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[file.name] = names
    return found


def test_the_packages_are_where_the_checks_look() -> None:
    for name, folder in PACKAGES.items():
        assert (folder / "__init__.py").is_file(), folder
        assert len(_imports(folder)) >= 3, name
    assert {"spec.py", "protocol.py", "exits.py"} <= _imports(PACKAGES["finetune_contract"]).keys()


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_each_side_imports_only_the_contract_of_the_other(package: str) -> None:
    found = _imports(PACKAGES[package])
    bad = {file: sorted(names & FORBIDDEN[package]) for file, names in found.items() if names & FORBIDDEN[package]}
    assert bad == {}
    assert any("finetune_contract" in names for names in found.values())


def test_the_contract_imports_only_pydantic_and_the_standard_library() -> None:
    found = _imports(PACKAGES["finetune_contract"])
    bad = {
        file: sorted(extra)
        for file, names in found.items()
        if (extra := names - CONTRACT_ALLOWED - set(sys.stdlib_module_names))
    }
    assert bad == {}


def test_importing_the_contract_loads_neither_side_nor_their_dependencies() -> None:
    loaded = loaded_packages(
        "finetune_contract", "finetune_contract.spec", "finetune_contract.protocol", "finetune_contract.exits"
    )
    assert "pydantic" in loaded  # the check sees real imports
    assert loaded & (ML | KUBERNETES_CLIENTS | {"aiohttp", "numpy", "yaml", "finetune_operator", "finetune_trainer"}) == set()


def test_the_trainers_errors_exit_with_the_contracts_codes_and_reasons() -> None:
    classes = [errors.InvalidSpecError, errors.DataError, errors.DivergedError]
    assert {c.exit_code: c.reason for c in classes} == dict(exits.EXIT_REASONS)
    assert (errors.TrainerError.exit_code, errors.TrainerError.reason) == (exits.EXIT_ERROR, exits.REASON_ERROR)
    assert exits.EXIT_ERROR not in exits.NON_RETRYABLE_EXIT_CODES
    assert exits.EXIT_TERMINATED == 128 + 15


def test_the_operator_fails_the_job_on_exactly_the_non_retryable_codes() -> None:
    owner = builders.Owner(namespace="ml", name="a", uid="u-1", labels={"kueue.x-k8s.io/queue-name": "q"})
    parsed = api.FineTuneJobSpec.model_validate(
        {"data": {"train": "/d", "validationSplit": 0.2}, "output": {"path": "/m"}}
    )
    pod = builders.TrainerPod(owner=owner, spec=parsed, default_image="img:1", progress_url=None)
    job = builders.build_job(pod=pod)
    rules = job["spec"]["podFailurePolicy"]["rules"]
    fail = [r["onExitCodes"]["values"] for r in rules if r["action"] == "FailJob"]
    ignored = [r["onExitCodes"]["values"] for r in rules if r["action"] == "Ignore" and "onExitCodes" in r]
    assert fail == [sorted(exits.EXIT_REASONS)]
    assert ignored == [[exits.EXIT_TERMINATED]]


def test_the_api_group_and_kind_are_the_contracts() -> None:
    assert (api.API_GROUP, api.API_VERSION, api.KIND) == (spec.API_GROUP, spec.API_VERSION, spec.KIND)
    assert issubclass(api.FineTuneJobSpec, spec.TrainerSpec)
    assert protocol.STAGES == ("head", "fine-tune")
