"""The generated CRD: committed file up to date, structural, documented, with the models' rules."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_operator import api, crd

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
    for forbidden in (
        "$ref", "$defs", "title:", "prefixItems", "const:", "type: 'null'", "propertyNames", "patternProperties",
    ):  # fmt: skip
        assert forbidden not in text, forbidden
    for path, node in walk(schema()):
        if node.get("x-kubernetes-int-or-string"):  # a Quantity: the one allowed anyOf
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}] and "type" not in node, path
            continue
        assert "type" in node and "anyOf" not in node, f"{path} has no type"
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
    assert runtime["resources"]["properties"]["limits"]["additionalProperties"]["x-kubernetes-int-or-string"] is True
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
        if node.get("type", "string") == "string" and "enum" not in node:
            assert "maxLength" in node, path
        if node.get("type") == "array":
            assert "maxItems" in node, path
        if node.get("type") == "object" and "properties" not in node:
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


def test_nothing_under_spec_is_free_form() -> None:
    """Every field has a schema: nothing preserves unknown fields, so nothing can nest without bound."""
    text = yaml.safe_dump(schema()["properties"]["spec"])
    assert "x-kubernetes-preserve-unknown-fields" not in text
    depth = max(path.count(".") + path.count("[]") + path.count("{}") for path, _ in walk(schema()["properties"]["spec"]))
    assert depth <= 16


def test_kubernetes_types_come_from_the_kubernetes_schemas() -> None:
    runtime = schema()["properties"]["spec"]["properties"]["runtime"]["properties"]
    env = runtime["env"]["items"]
    assert env["required"] == ["name"] and set(env["properties"]) == {"name", "value", "valueFrom"}
    assert set(env["properties"]["valueFrom"]["properties"]) >= {"configMapKeyRef", "secretKeyRef", "fieldRef"}
    toleration = runtime["tolerations"]["items"]["properties"]
    assert toleration["operator"]["enum"] == ["Exists", "Equal", ""] and toleration["tolerationSeconds"]["type"] == "integer"
    volume = runtime["volumes"]["items"]
    assert set(volume["properties"]) == {"name", *crd.VOLUME_SOURCES}
    assert volume["properties"]["persistentVolumeClaim"]["required"] == ["claimName"]
    affinity = runtime["affinity"]["properties"]
    assert set(affinity) == {"nodeAffinity", "podAffinity", "podAntiAffinity"}
    assert set(runtime["volumeMounts"]["items"]["required"]) == {"mountPath", "name"}


def test_base_options_are_the_keras_keyword_arguments() -> None:
    options = schema()["properties"]["spec"]["properties"]["model"]["properties"]["baseOptions"]
    assert options["type"] == "object" and "additionalProperties" not in options
    kinds = {k: v["type"] for k, v in options["properties"].items()}
    assert kinds == {
        "alpha": "number", "depth_multiplier": "integer", "dropout": "number", "dropout_rate": "number",
        "minimalistic": "boolean", "include_preprocessing": "boolean", "pooling": "string", "name": "string",
    }  # fmt: skip
    assert options["properties"]["pooling"]["enum"] == ["avg", "max"]


# ----- the worst case admission lets through -----
#
# The spec travels to the trainer as a pod-template annotation of the batch Job (compact JSON,
# ensure_ascii=False), and annotations may total 256 KiB. The largest spec admission accepts is
# computed from the CRD alone: every string at its maxLength, every list at maxItems, every map
# at maxProperties, recursively; one field of an "at most one of" group (the CEL rules of
# crd.one_of_rule); the total of a list's strings where a CEL total_length_rule caps it; map keys
# at the length their CEL key rule allows. A character takes 1 byte when the string's pattern
# is ASCII-only (crd.ASCII_PATTERNS), 4 under crd.TEXT_PATTERNS (UTF-8, no control characters)
# and 6 otherwise (a control character is written \u0001).

SPEC_BUDGET = 200 * 1024
INTEGER = len(str(-(2**63)))
NUMBER = len(json.dumps(-1.2345678901234567e308))


def _char_bytes(pattern: str | None) -> int:
    if pattern in crd.ASCII_PATTERNS:
        return 1
    return 4 if pattern in crd.TEXT_PATTERNS else 6


def _string(node: dict[str, Any]) -> int:
    if "enum" in node:
        return max(len(json.dumps(v, ensure_ascii=False).encode()) for v in node["enum"])
    if node.get("format") == "date-time":
        return len('"2026-12-01T21:30:06.123456789+00:00"')
    return 2 + node["maxLength"] * _char_bytes(node.get("pattern"))


def _key(node: dict[str, Any], path: str) -> int:
    for rule in node.get("x-kubernetes-validations", []):
        found = re.fullmatch(r"self\.all\(k, size\(k\) <= (\d+)( && k\.matches\(r'(.*)'\))?\)", rule["rule"])
        if found:
            return 2 + int(found.group(1)) * _char_bytes(found.group(3))
    raise AssertionError(f"{path}: a map without a CEL rule bounding its keys")


def worst_case(node: dict[str, Any], path: str = "") -> int:
    """The largest JSON (in bytes) that `node` admits."""
    if node.get("x-kubernetes-int-or-string"):
        return max(INTEGER, _string(node))
    kind = node["type"]
    if kind == "string":
        return _string(node)
    if kind in ("integer", "number", "boolean"):
        return {"integer": INTEGER, "number": NUMBER, "boolean": len("false")}[kind]
    if kind == "array":
        item = worst_case(node["items"], f"{path}[]")
        for rule in node.get("x-kubernetes-validations", []):
            found = re.fullmatch(r"self\.map\(x, has\(x\.(\w+)\) \? size\(x\.\1\) : 0\)\.sum\(\) <= (\d+)", rule["rule"])
            if found:
                field = node["items"]["properties"][found.group(1)]
                per_char = _char_bytes(field.get("pattern"))
                chars = min(int(found.group(2)), node["maxItems"] * field["maxLength"])
                return 2 + node["maxItems"] * (item - field["maxLength"] * per_char + 1) + chars * per_char
        return 2 + node["maxItems"] * (item + 1)
    assert kind == "object", path
    if "properties" not in node:
        value = worst_case(node["additionalProperties"], f"{path}{{}}")
        return 2 + node["maxProperties"] * (_key(node, path) + 1 + value + 1)
    sizes = {k: len(k) + 3 + worst_case(v, f"{path}.{k}") + 1 for k, v in node["properties"].items()}
    alternatives: set[str] = set()
    for rule in node.get("x-kubernetes-validations", []):
        fields = tuple(re.findall(r"\(has\(self\.(\w+)\) \? 1 : 0\)", rule["rule"]))
        if fields and rule["rule"] == crd.one_of_rule(fields):
            alternatives |= set(fields)
    fixed = sum(size for k, size in sizes.items() if k not in alternatives)
    return 2 + fixed + max((sizes[k] for k in alternatives), default=0)


def test_worst_case_calculation_counts_what_it_should() -> None:
    assert worst_case({"type": "string", "maxLength": 10}) == 62
    assert worst_case({"type": "string", "maxLength": 10, "pattern": crd.DNS_LABEL["pattern"]}) == 12
    assert worst_case({"type": "array", "maxItems": 3, "items": {"type": "boolean"}}) == 2 + 3 * 6
    one_of = {
        "type": "object",
        "properties": {"a": {"type": "boolean"}, "b": {"type": "string", "maxLength": 100}},
        "x-kubernetes-validations": [{"rule": crd.one_of_rule(("a", "b"))}],
    }
    assert worst_case(one_of) == 2 + len("b") + 3 + 602 + 1
    with pytest.raises(AssertionError, match="keys"):
        worst_case({"type": "object", "maxProperties": 2, "additionalProperties": {"type": "boolean"}})


def test_worst_case_spec_fits_in_the_job_annotation() -> None:
    spec = schema()["properties"]["spec"]
    size = worst_case(spec, ".spec")
    print(f"worst-case serialized spec: {size} bytes ({size / 1024:.1f} KiB) of a {SPEC_BUDGET // 1024} KiB budget")
    assert size <= SPEC_BUDGET, {k: worst_case(v, f".spec.{k}") for k, v in spec["properties"].items()}
    assert size + len(json.dumps({"metadata": {"name": "x" * api.MAX_NAME_LENGTH, "namespace": "y" * 63}})) < 256 * 1024


def test_every_map_bounds_its_keys_and_every_list_its_total() -> None:
    for path, node in walk(schema()["properties"]["spec"]):
        if node.get("type") == "object" and "properties" not in node:
            _key(node, path)
    env = schema()["properties"]["spec"]["properties"]["runtime"]["properties"]["env"]
    assert env["x-kubernetes-validations"] == [api.total_length_rule(field="value", total=api.MAX_ENV_VALUES)]


def test_crd_fits_in_a_client_side_apply() -> None:
    """`kubectl apply -k deploy/base` (client-side) keeps the whole CRD in an annotation of 256 KiB at most."""
    size = len(json.dumps(crd.build_crd(), separators=(",", ":")))
    assert size < 128 * 1024, size
