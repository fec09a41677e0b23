"""The generated CRD: committed file up to date, structural, documented, with the models' rules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from finetune_operator import crd

ROOT = Path(__file__).resolve().parents[3]
COMMITTED = ROOT / "crds" / "finetune.dev_finetunejobs.yaml"


def schema() -> dict[str, Any]:
    version = crd.build_crd()["spec"]["versions"][0]
    return dict(version["schema"]["openAPIV3Schema"])


def walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for key, child in (node.get("properties") or {}).items():
        out += walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        out += walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += walk(node["additionalProperties"], f"{path}{{}}")
    return out


def test_committed_crd_is_up_to_date() -> None:
    assert COMMITTED.read_text(encoding="utf-8") == crd.render_crd(), "run `make crds` and commit the result"


def test_cli_writes_the_same_file(tmp_path: Path) -> None:
    out = tmp_path / "crd.yaml"
    subprocess.run([sys.executable, "-m", "finetune_operator.crd", "--output", str(out)], check=True)
    assert out.read_text(encoding="utf-8") == COMMITTED.read_text(encoding="utf-8")


def test_structural_no_refs_titles_or_anyof() -> None:
    text = yaml.safe_dump(schema())
    for forbidden in ("$ref", "$defs", "title:", "anyOf", "prefixItems", "const:", "type: 'null'", "propertyNames"):
        assert forbidden not in text, forbidden
    for path, node in walk(schema()):
        assert "type" in node, f"{path} has no type"
        if node["type"] == "object" and "properties" in node:
            assert "additionalProperties" not in node, path


def test_every_field_is_described() -> None:
    missing = [
        path
        for path, node in walk(schema())
        if path.startswith((".spec", ".status")) and not path.endswith(("[]", "{}")) and not node.get("description")
    ]
    assert missing == []


def test_defaults_ranges_enums_and_nullable() -> None:
    spec = schema()["properties"]["spec"]["properties"]
    head = spec["training"]["properties"]["head"]["properties"]
    assert head["epochs"]["minimum"] == 0 and head["epochs"]["default"] == 20
    lr = head["learningRate"]
    assert (lr["minimum"], lr["exclusiveMinimum"], lr["maximum"], lr["exclusiveMaximum"]) == (0.0, True, 1.0, True)
    assert spec["training"]["properties"]["mixedPrecision"]["enum"] == ["auto", "off", "mixed_float16", "mixed_bfloat16"]
    shape = spec["model"]["properties"]["inputShape"]
    assert (shape["minItems"], shape["maxItems"], shape["items"]["type"]) == (3, 3, "integer")
    assert shape["default"] == [224, 224, 3]
    runtime = spec["runtime"]["properties"]
    assert runtime["gpus"]["minimum"] == 0 and runtime["workers"]["minimum"] == 1
    assert runtime["activeDeadlineSeconds"]["nullable"] is True and "default" not in runtime["activeDeadlineSeconds"]
    assert runtime["resources"]["x-kubernetes-preserve-unknown-fields"] is True
    assert spec["runtime"]["default"] == {} and spec["training"]["default"] == {}
    assert spec["suspend"]["default"] is False
    assert set(schema()["properties"]["spec"]["required"]) == {"data", "output"}


def test_cel_rules_carried_through() -> None:
    root = schema()
    data = root["properties"]["spec"]["properties"]["data"]
    assert "has(self.validation) != has(self.validationSplit)" in data["x-kubernetes-validations"][0]["rule"]
    rules = [r["rule"] for r in root["x-kubernetes-validations"]]
    immutable = next(r for r in rules if "oldSelf" in r)
    for part in ("model", "data", "training", "output", "runtime"):
        assert f"self.spec.{part} == oldSelf.spec.{part}" in immutable
    assert "suspend" not in immutable


def test_cel_cost_bounds_on_every_spec_string_list_and_map() -> None:
    for path, node in walk(schema()["properties"]["spec"]):
        if node["type"] == "string" and "enum" not in node:
            assert "maxLength" in node, path
        if node["type"] == "array":
            assert "maxItems" in node, path
        if node["type"] == "object" and "properties" not in node:
            assert "maxProperties" in node, path


def test_resource_names_columns_and_status_subresource() -> None:
    spec = crd.build_crd()["spec"]
    assert spec["names"]["shortNames"] == ["ftj"] and spec["names"]["categories"] == ["finetune"]
    version = spec["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"].upper() for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["PHASE", "STAGE", "EPOCH", "PROGRESS", "VAL-ACC", "ETA", "AGE"]
    status = schema()["properties"]["status"]["properties"]
    for column in version["additionalPrinterColumns"]:
        field = column["jsonPath"].split(".")
        if field[1] == "status":
            assert field[2] in status, column
    conditions = status["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert set(conditions["items"]["required"]) >= {"type", "status", "lastTransitionTime", "reason"}
