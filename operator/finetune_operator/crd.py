"""Renders the FineTuneJob CustomResourceDefinition from the pydantic models in `api.py`.

`python -m finetune_operator.crd --output crds/finetune.dev_finetunejobs.yaml` (`make crds`)
writes it; a unit test regenerates it and fails when the committed file differs.

Pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3.0 schema. The
conversion inlines every `$ref`, turns `anyOf [X, null]` into `X` + `nullable: true`,
`prefixItems` (tuples) into `items` + min/maxItems, `const` into `enum`, numeric
`exclusiveMinimum: n` into `minimum: n, exclusiveMinimum: true`, drops `title`, `$defs` and
`additionalProperties: false` (the API server prunes and, with strict field validation,
refuses unknown fields), and carries `x-kubernetes-*` keys through. Defaults that pydantic
leaves out (default factories) are filled in from the models.

No maintained library does this for pydantic v2: `kubecrd` targets dataclasses + apischema,
`crds-generator` its own Schema base class; neither handles nullable, CEL rules, tuples or
the CEL cost bounds below, so the converter lives here (about 150 lines).

CEL cost: the API server refuses a CRD whose rules might cost too much in the worst case, and
it sizes unbounded strings, lists and maps by the request size limit. The spec-immutability
rule compares whole sub-trees, so every string, list and map under `spec` gets a bound
(`maxLength`, `maxItems`, `maxProperties`) where the models did not give one.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from finetune_operator import api

__all__ = ["build_crd", "main", "model_schema", "render_crd"]

DEFAULT_MAX_LENGTH = 4096
DEFAULT_MAX_ITEMS = 64
DEFAULT_MAX_PROPERTIES = 64

_DROP = {"title", "$defs", "$schema", "examples", "propertyNames"}

MAX_NAME_LENGTH = 52  # the Job is named like the FineTuneJob; its pods add a suffix, labels allow 63

NAME_LENGTH_RULE = {
    "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
    "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters (it names the batch Job and its pods)",
}

IMMUTABLE_SPEC_RULE = {
    # From creation on: the operator hands the spec to the Job at once, so a later edit would
    # leave the FineTuneJob describing a training that is not the one running.
    "rule": (
        "self.spec.model == oldSelf.spec.model && self.spec.data == oldSelf.spec.data && "
        "self.spec.training == oldSelf.spec.training && self.spec.output == oldSelf.spec.output && "
        "self.spec.runtime == oldSelf.spec.runtime"
    ),
    "message": "spec is immutable once the job is created, except spec.suspend",
    "fieldPath": ".spec",
    "reason": "FieldValueForbidden",
}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inlines `$ref`s recursively (the field's own description wins over the model's)."""
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        local = {k: v for k, v in node.items() if k != "$ref"}
        target.update(local)
        return _resolve(target, defs)
    return {k: _resolve(v, defs) for k, v in node.items()}


def _convert(node: dict[str, Any]) -> dict[str, Any]:
    """One JSON Schema node (refs already inlined) -> a structural OpenAPI v3.0 node."""
    node = {k: v for k, v in node.items() if k not in _DROP}
    if "anyOf" in node:
        variants = [v for v in node.pop("anyOf") if v.get("type") != "null"]
        if len(variants) != 1:
            raise ValueError(f"unsupported anyOf with {len(variants)} non-null variants: {variants}")
        merged = {**variants[0], **node}
        merged["nullable"] = True
        if merged.get("default", ...) is None:
            del merged["default"]
        return _convert(merged)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "prefixItems" in node:
        items = [_convert(i) for i in node.pop("prefixItems")]
        if any(i != items[0] for i in items):
            raise ValueError("tuples of different item types cannot be expressed structurally")
        node["items"] = items[0]
        node.setdefault("minItems", len(items))
        node.setdefault("maxItems", len(items))
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        value = node.get(bound)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            node[plain] = value
            node[bound] = True
    if "enum" in node and "type" not in node:
        kinds = {type(v) for v in node["enum"]}
        node["type"] = {str: "string", int: "integer", bool: "boolean", float: "number"}[kinds.pop()]
    if node.get("type") == "object":
        extra = node.pop("additionalProperties", None)
        if "properties" in node:
            node["properties"] = {k: _convert(v) for k, v in node["properties"].items()}
        elif isinstance(extra, dict):
            node["additionalProperties"] = _convert(extra)
        elif extra is True or node.get("x-kubernetes-preserve-unknown-fields"):
            node["x-kubernetes-preserve-unknown-fields"] = True
        if not node.get("required"):
            node.pop("required", None)
    if node.get("type") == "array" and "items" in node:
        node["items"] = _convert(node["items"])
    return node


def _fill_defaults(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """Adds the defaults of default factories, which pydantic leaves out of the JSON schema.

    A nested model's default is `{}`: the API server then applies the nested defaults itself,
    so the CRD carries each default once, beside the field it belongs to.
    """
    for name, field in model.model_fields.items():
        key = field.alias or name
        prop = schema.get("properties", {}).get(key)
        if prop is None:
            continue
        annotation = field.annotation
        nested = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if nested is not None:
            _fill_defaults(prop, nested)
        if field.is_required() or "default" in prop:
            continue
        if nested is not None:
            prop["default"] = {}
        else:
            value = field.get_default(call_default_factory=True)
            if value is not None:
                prop["default"] = value if not isinstance(value, tuple) else list(value)


def _bound_sizes(node: dict[str, Any]) -> None:
    """Gives every string, list and map a size bound, so CEL cost estimates stay finite and small."""
    kind = node.get("type")
    if kind == "string" and "enum" not in node and "maxLength" not in node and node.get("format") != "date-time":
        node["maxLength"] = DEFAULT_MAX_LENGTH
    if kind == "array":
        node.setdefault("maxItems", DEFAULT_MAX_ITEMS)
        _bound_sizes(node["items"])
    if kind == "object":
        if "properties" in node:
            for child in node["properties"].values():
                _bound_sizes(child)
        else:
            node.setdefault("maxProperties", DEFAULT_MAX_PROPERTIES)
            if isinstance(node.get("additionalProperties"), dict):
                _bound_sizes(node["additionalProperties"])


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural schema of one model (refs inlined, defaults filled, no titles)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    converted = _convert(_resolve(raw, raw.get("$defs", {})))
    _fill_defaults(converted, model)
    return converted


def _printer_columns() -> list[dict[str, Any]]:
    return [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Phase of the job."},
        {"name": "Stage", "type": "string", "jsonPath": ".status.stage", "description": "Training stage now running."},
        {"name": "Epoch", "type": "string", "jsonPath": ".status.epochs", "description": "Epoch within the stage."},
        {
            "name": "Progress",
            "type": "integer",
            "jsonPath": ".status.progress",
            "description": "Percent of planned epochs done.",
        },
        {
            "name": "Val-Acc",
            "type": "number",
            "jsonPath": ".status.bestValAccuracy",
            "description": "Best validation accuracy.",
        },
        {"name": "ETA", "type": "integer", "jsonPath": ".status.etaSeconds", "description": "Seconds left."},
        {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1, "description": "Why."},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition as a dict."""
    spec = model_schema(api.FineTuneJobSpec)
    spec["description"] = api.FineTuneJobSpec.__doc__
    _bound_sizes(spec)
    status = model_schema(api.FineTuneJobStatus)
    status["description"] = api.FineTuneJobStatus.__doc__
    root = {
        "type": "object",
        "description": "A two-phase fine-tuning of a pretrained Keras image model, run as a batch Job.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of the object: finetune.dev/v1alpha1."},
            "kind": {"type": "string", "description": "Kind of the object: FineTuneJob."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": [NAME_LENGTH_RULE, IMMUTABLE_SPEC_RULE],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.API_GROUP}"},
        "spec": {
            "group": api.API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": list(api.CATEGORIES),
            },
            "versions": [
                {
                    "name": api.API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": _printer_columns(),
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


HEADER = "# Generated by `make crds` (python -m finetune_operator.crd) from operator/finetune_operator/api.py. Do not edit.\n"


def render_crd() -> str:
    """The CRD as the YAML text committed under crds/."""
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_operator.crd", description=__doc__.splitlines()[0])
    parser.add_argument("--output", "-o", help="file to write; default stdout")
    args = parser.parse_args(argv)
    text = render_crd()
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
