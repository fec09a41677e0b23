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

Kubernetes types (`runtime.resources`, `env`, `volumes`, `volumeMounts`, `tolerations`,
`affinity`, marked with `api.KUBERNETES_TYPE`) get the OpenAPI schema of that type from the
Kubernetes release `KUBERNETES_VERSION` (the JSON schemas kubernetes-validate ships), made
structural and bounded: every string gets Kubernetes' own limit and pattern where it has one
(names, label keys and values, quantities) or a bound of ours; lists and maps a size; map keys
a CEL rule; "one of" groups (volume sources, env sources) a CEL rule; Kubernetes rules that are
cheap to state (toleration operators and effects) a CEL rule or an enum. So admission names an
unknown or wrong field at any depth, nothing nests without bound, and the worst case of the
whole spec stays small enough for the batch Job's pod-template annotation (a unit test adds it
up from this schema). Volume sources are those a trainer uses (`VOLUME_SOURCES`); descriptions
are the first sentence of Kubernetes' own.

CEL cost: the API server refuses a CRD whose rules might cost too much in the worst case, and
it sizes unbounded strings, lists and maps by the request size limit. The spec-immutability
rule compares whole sub-trees, so every string, list and map under `spec` gets a bound
(`maxLength`, `maxItems`, `maxProperties`) where the models did not give one.
"""

from __future__ import annotations

import argparse
import copy
import importlib.resources
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from finetune_contract.spec import PATH_PATTERN
from pydantic import BaseModel

from finetune_operator import api

__all__ = [
    "ASCII_PATTERNS",
    "KUBERNETES_VERSION",
    "TEXT_PATTERNS",
    "VOLUME_SOURCES",
    "build_crd",
    "main",
    "one_of_rule",
    "render_crd",
]

DEFAULT_MAX_LENGTH = 4096
DEFAULT_MAX_ITEMS = 64
DEFAULT_MAX_PROPERTIES = 64

_DROP = {"title", "$defs", "$schema", "examples", "propertyNames"}

# The object's CEL rules live on the model (api.FineTuneJob); these names stay for callers.
MAX_NAME_LENGTH = api.MAX_NAME_LENGTH
NAME_LENGTH_RULE = api.NAME_LENGTH_RULE
IMMUTABLE_SPEC_RULE = api.IMMUTABLE_SPEC_RULE


# ----- Kubernetes types, from the OpenAPI schemas of the Kubernetes release below -----

# kubernetes-validate ships the JSON schemas of each release (a dev/test dependency: it is read
# only when the CRD is generated). The local control plane runs this minor version.
KUBERNETES_VERSION = "1.34.0"
_CORE = "io.k8s.api.core.v1."
_META = "io.k8s.apimachinery.pkg.apis.meta.v1."
_QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"
# controller-gen's schema of a resource.Quantity: an int or a string of this form.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
DNS_LABEL = {"maxLength": 63, "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}
DNS_SUBDOMAIN = {
    "maxLength": 253,
    "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
}
LABEL_KEY = {"maxLength": 317, "pattern": api.LABEL_KEY_PATTERN}
LABEL_KEY_OR_EMPTY = {"maxLength": 317, "pattern": f"^({api.LABEL_KEY_PATTERN[1:-1]})?$"}
LABEL_VALUE = {"maxLength": 63, "pattern": api.LABEL_VALUE_PATTERN}
ENV_NAME = {"maxLength": 128, "pattern": r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"}
CONFIG_KEY = {"maxLength": 253, "pattern": r"^[-._a-zA-Z0-9]+$"}
# Paths in the pod (mounts, projected files, NFS and host paths) and image references:
# printable ASCII except quotes and backslashes.
ASCII_TEXT_PATTERN = r"^[ !#-\[\]-~]*$"
PATH = {"maxLength": 256, "pattern": ASCII_TEXT_PATTERN}
FILE_PATH = {"maxLength": 128, "pattern": ASCII_TEXT_PATTERN}  # a file inside a volume
# Free text (env values, annotations, CSI attributes): no control characters but tab and newlines.
TEXT_PATTERN = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"
# Patterns whose strings are ASCII without quotes, backslashes or control characters: one
# byte per character in JSON. TEXT_PATTERN strings take at most 4 (UTF-8), others 6 (\u0001).
ASCII_PATTERNS = frozenset(
    {DNS_LABEL["pattern"], DNS_SUBDOMAIN["pattern"], LABEL_KEY["pattern"], LABEL_KEY_OR_EMPTY["pattern"],
     LABEL_VALUE["pattern"],
     ENV_NAME["pattern"], CONFIG_KEY["pattern"], ASCII_TEXT_PATTERN,
     api.IMAGE_PATTERN, api.DNS_SUBDOMAIN_OR_EMPTY_PATTERN, QUANTITY_PATTERN}
)  # fmt: skip
TEXT_PATTERNS = frozenset({TEXT_PATTERN, PATH_PATTERN})

# The volume sources a trainer pod may use: Pod Security `restricted`'s list plus nfs, hostPath
# and image. The in-tree cloud and legacy drivers (deprecated or removed) are left out.
VOLUME_SOURCES = (
    "persistentVolumeClaim", "emptyDir", "configMap", "secret", "projected", "downwardAPI",
    "csi", "nfs", "hostPath", "image",
)  # fmt: skip
PROJECTIONS = ("configMap", "secret", "downwardAPI", "serviceAccountToken")
_ENUMS = {
    "Toleration.operator": ["Exists", "Equal", ""],  # empty means Equal
    "Toleration.effect": ["NoSchedule", "PreferNoSchedule", "NoExecute", ""],  # empty matches every effect
    "LabelSelectorRequirement.operator": ["In", "NotIn", "Exists", "DoesNotExist"],
    "NodeSelectorRequirement.operator": ["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"],
    "VolumeMount.mountPropagation": ["None", "HostToContainer", "Bidirectional"],
    "VolumeMount.recursiveReadOnly": ["Disabled", "IfPossible", "Enabled"],
    "HostPathVolumeSource.type": [
        "", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice", "BlockDevice",
    ],
    "ImageVolumeSource.pullPolicy": ["Always", "Never", "IfNotPresent"],
}  # fmt: skip
# String bounds by "Type.field" ("[]" an item, "{}" a map value, "{key}" a map key); every other
# string gets DEFAULT_KUBERNETES_STRING. Kubernetes' own limits where it has one.
DEFAULT_KUBERNETES_STRING = {"maxLength": 253}
_STRINGS: dict[str, dict[str, Any]] = {
    "Volume.name": DNS_LABEL,
    "VolumeMount.name": DNS_LABEL,
    "FileKeySelector.volumeName": DNS_LABEL,
    "ResourceFieldSelector.containerName": DNS_LABEL,
    "PersistentVolumeClaimVolumeSource.claimName": DNS_SUBDOMAIN,
    "ConfigMapVolumeSource.name": DNS_SUBDOMAIN,
    "SecretVolumeSource.secretName": DNS_SUBDOMAIN,
    "ConfigMapProjection.name": DNS_SUBDOMAIN,
    "SecretProjection.name": DNS_SUBDOMAIN,
    "ConfigMapKeySelector.name": DNS_SUBDOMAIN,
    "SecretKeySelector.name": DNS_SUBDOMAIN,
    "LocalObjectReference.name": DNS_SUBDOMAIN,
    "PodAffinityTerm.namespaces[]": DNS_LABEL,
    "PodAffinityTerm.topologyKey": LABEL_KEY,
    "PodAffinityTerm.matchLabelKeys[]": LABEL_KEY,
    "PodAffinityTerm.mismatchLabelKeys[]": LABEL_KEY,
    "LabelSelectorRequirement.key": LABEL_KEY,
    "LabelSelectorRequirement.values[]": LABEL_VALUE,
    "LabelSelector.matchLabels{key}": LABEL_KEY,
    "LabelSelector.matchLabels{}": LABEL_VALUE,
    "NodeSelectorRequirement.key": LABEL_KEY,
    "NodeSelectorRequirement.values[]": LABEL_VALUE,
    "Toleration.key": LABEL_KEY_OR_EMPTY,  # empty (with operator Exists) tolerates every taint
    "Toleration.value": LABEL_VALUE,
    "ResourceRequirements.limits{key}": LABEL_KEY,
    "ResourceRequirements.requests{key}": LABEL_KEY,
    "VolumeResourceRequirements.limits{key}": LABEL_KEY,
    "VolumeResourceRequirements.requests{key}": LABEL_KEY,
    "CSIVolumeSource.volumeAttributes{key}": {"maxLength": 128, "pattern": ASCII_TEXT_PATTERN},
    "CSIVolumeSource.volumeAttributes{}": {"maxLength": 256, "pattern": ASCII_TEXT_PATTERN},
    "EnvVar.name": ENV_NAME,
    "EnvVar.value": {"maxLength": 4096, "pattern": TEXT_PATTERN},
    "ConfigMapKeySelector.key": CONFIG_KEY,
    "SecretKeySelector.key": CONFIG_KEY,
    "FileKeySelector.key": ENV_NAME,
    "VolumeMount.mountPath": PATH,
    "VolumeMount.subPath": PATH,
    "VolumeMount.subPathExpr": PATH,
    "KeyToPath.key": CONFIG_KEY,
    "KeyToPath.path": FILE_PATH,
    "DownwardAPIVolumeFile.path": FILE_PATH,
    "ClusterTrustBundleProjection.path": PATH,
    "ServiceAccountTokenProjection.path": FILE_PATH,
    "PodCertificateProjection.credentialBundlePath": PATH,
    "PodCertificateProjection.certificateChainPath": PATH,
    "PodCertificateProjection.keyPath": PATH,
    "FileKeySelector.path": FILE_PATH,
    "NFSVolumeSource.path": PATH,
    "HostPathVolumeSource.path": PATH,
    "ImageVolumeSource.reference": PATH,
    "ObjectFieldSelector.fieldPath": {"maxLength": 128, "pattern": ASCII_TEXT_PATTERN},
    "ObjectFieldSelector.apiVersion": {"maxLength": 16, "pattern": ASCII_TEXT_PATTERN},
    "ResourceFieldSelector.resource": {"maxLength": 32, "pattern": ASCII_TEXT_PATTERN},
    "ResourceClaim.name": DNS_LABEL,
    "ResourceClaim.request": DNS_LABEL,
    "EmptyDirVolumeSource.medium": {"maxLength": 64, "pattern": ASCII_TEXT_PATTERN},
    "CSIVolumeSource.driver": DNS_SUBDOMAIN,
    "CSIVolumeSource.fsType": {"maxLength": 64, "pattern": ASCII_TEXT_PATTERN},
    "NFSVolumeSource.server": {"maxLength": 253, "pattern": ASCII_TEXT_PATTERN},
    "ServiceAccountTokenProjection.audience": {"maxLength": 253, "pattern": ASCII_TEXT_PATTERN},

}
# List and map sizes by "Type.field"; every other gets DEFAULT_KUBERNETES_ITEMS.
DEFAULT_KUBERNETES_ITEMS = 8
_SIZES: dict[str, int] = {
    "ResourceRequirements.claims": 4,
    "ProjectedVolumeSource.sources": 2,
    "ConfigMapProjection.items": 4,
    "SecretProjection.items": 4,
    "DownwardAPIProjection.items": 4,
    "DownwardAPIVolumeSource.items": 4,
    "NodeSelector.nodeSelectorTerms": 2,
    "NodeSelectorTerm.matchExpressions": 4,
    "NodeSelectorTerm.matchFields": 1,
    "NodeSelectorRequirement.values": 4,
    "NodeAffinity.preferredDuringSchedulingIgnoredDuringExecution": 2,
    "PodAffinity.requiredDuringSchedulingIgnoredDuringExecution": 1,
    "PodAffinity.preferredDuringSchedulingIgnoredDuringExecution": 1,
    "PodAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution": 1,
    "PodAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution": 1,
    "LabelSelector.matchLabels": 4,
    "LabelSelector.matchExpressions": 2,
    "LabelSelectorRequirement.values": 4,
    "PodAffinityTerm.namespaces": 4,
    "PodAffinityTerm.matchLabelKeys": 2,
    "PodAffinityTerm.mismatchLabelKeys": 2,
}
# "At most one of" groups: Kubernetes refuses a second volume source, env source or projection.
_ONE_OF = {
    "Volume": VOLUME_SOURCES,
    "EnvVarSource": ("configMapKeyRef", "secretKeyRef", "fieldRef", "resourceFieldRef", "fileKeyRef"),
    "VolumeMount": ("subPath", "subPathExpr"),
    "VolumeProjection": PROJECTIONS,
}  # fmt: skip
_RULES: dict[str, list[dict[str, str]]] = {
    "Toleration": [
        {
            "rule": "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
            "message": "operator must be Exists when key is empty",
        },
        {
            "rule": "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
            "message": "value must be empty when operator is Exists",
        },
        {
            "rule": "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            "message": "tolerationSeconds needs effect NoExecute",
        },
    ],
}
# Volume sources and projections beyond the ones above are left out.
_KEEP = {"Volume": ("name", *VOLUME_SOURCES), "VolumeProjection": PROJECTIONS}


def one_of_rule(fields: tuple[str, ...]) -> str:
    """The CEL rule "at most one of FIELDS is set" (the worst-case size test reads this form)."""
    return " + ".join(f"(has(self.{f}) ? 1 : 0)" for f in fields) + " <= 1"


def map_key_rule(bound: dict[str, Any]) -> dict[str, str]:
    """The CEL rule bounding a map's keys (structural schemas cannot): size and pattern."""
    rule = f"self.all(k, size(k) <= {bound['maxLength']}"
    message = f"keys must be at most {bound['maxLength']} characters"
    if "pattern" in bound:
        rule += f" && k.matches(r'{bound['pattern']}')"
        message += " and match " + bound["pattern"]
    return {"rule": rule + ")", "message": message}


def _short(text: str | None) -> str | None:
    """The first sentence of a Kubernetes description (the CRD stays small; the API reference has the rest)."""
    if not text:
        return None
    first = re.split(r"(?<=[a-z0-9)])\.\s", text.strip(), maxsplit=1)[0].strip()
    return first if first.endswith(".") else first + "."


def _kubernetes_definitions() -> dict[str, Any]:
    folder = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    text = (folder / f"v{KUBERNETES_VERSION}-local-strict" / "_definitions.json").read_text(encoding="utf-8")
    return dict(json.loads(text)["$defs"])


def kubernetes_schema(name: str, *, defs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The structural, bounded CRD schema of Kubernetes type NAME (e.g. io.k8s.api.core.v1.EnvVar)."""
    defs = defs if defs is not None else _kubernetes_definitions()
    return _k8s_node(defs[name], defs=defs, type_name=name.rsplit(".", 1)[-1], at="", depth=0)


def _k8s_type(node: dict[str, Any]) -> str | None:
    kinds = node.get("type")
    if isinstance(kinds, list):
        kinds = [k for k in kinds if k != "null"]
        return str(kinds[0]) if kinds else None
    return str(kinds) if kinds else None


def _k8s_node(node: dict[str, Any], *, defs: dict[str, Any], type_name: str, at: str, depth: int) -> dict[str, Any]:
    """One Kubernetes JSON schema node -> a structural CRD node; `at` is "Type.field" of the node."""
    if depth > 16:
        raise ValueError(f"Kubernetes type nests too deep at {at}")
    if "$ref" in node:
        ref = node["$ref"].rsplit("/", 1)[-1]
        if ref == _QUANTITY:
            out: dict[str, Any] = {
                "anyOf": [{"type": "integer"}, {"type": "string"}],
                "x-kubernetes-int-or-string": True,
                "pattern": QUANTITY_PATTERN,
                "maxLength": 64,
            }
        else:
            out = _k8s_node(defs[ref], defs=defs, type_name=ref.rsplit(".", 1)[-1], at="", depth=depth + 1)
        if node.get("description"):
            out["description"] = _short(node["description"])
        return out
    kind = _k8s_type(node)
    out = {"type": kind} if kind else {}
    if node.get("description"):
        out["description"] = _short(node["description"])
    if node.get("format") in ("int32", "int64") and kind == "integer":
        out["format"] = node["format"]
    for key in ("x-kubernetes-list-type", "x-kubernetes-list-map-keys"):
        if key in node:
            out[key] = node[key]
    if kind == "object" and "properties" in node:
        keep = _KEEP.get(type_name)
        props = {
            k: _k8s_node(v, defs=defs, type_name=type_name, at=f"{type_name}.{k}", depth=depth + 1)
            for k, v in node["properties"].items()
            if keep is None or k in keep
        }
        out["properties"] = props
        required = [r for r in node.get("required", []) if r in props]
        if required:
            out["required"] = required
        rules = list(_RULES.get(type_name, []))
        if type_name in _ONE_OF:
            fields = _ONE_OF[type_name]
            rules.append({"rule": one_of_rule(fields), "message": f"at most one of {', '.join(fields)}"})
        if rules:
            out["x-kubernetes-validations"] = rules
    elif kind == "object":
        values = node.get("additionalProperties") or {"type": "string"}
        out["additionalProperties"] = _k8s_node(values, defs=defs, type_name=type_name, at=f"{at}{{}}", depth=depth + 1)
        out["maxProperties"] = _SIZES.get(at, DEFAULT_KUBERNETES_ITEMS)
        out["x-kubernetes-validations"] = [map_key_rule(_STRINGS.get(f"{at}{{key}}", LABEL_KEY))]
    elif kind == "array":
        out["items"] = _k8s_node(node["items"], defs=defs, type_name=type_name, at=f"{at}[]", depth=depth + 1)
        out["maxItems"] = _SIZES.get(at, DEFAULT_KUBERNETES_ITEMS)
    elif kind == "string":
        if at in _ENUMS:
            out["enum"] = list(_ENUMS[at])
        else:
            out.update(_STRINGS.get(at, DEFAULT_KUBERNETES_STRING))
    return out


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
    if api.KUBERNETES_TYPE in node:
        out = kubernetes_schema(node[api.KUBERNETES_TYPE])
        out.update({k: v for k, v in node.items() if k in ("description", "default")})
        return out
    if "patternProperties" in node or "propertyNames" in node:
        # A map whose keys have a pattern or a bound: a CEL rule says it (structural schemas cannot).
        patterns = node.pop("patternProperties", {})
        if len(patterns) > 1:
            raise ValueError(f"several key patterns cannot be expressed: {patterns}")
        key = dict(node.pop("propertyNames", {}))
        for pattern, values in patterns.items():
            key["pattern"] = pattern
            node["additionalProperties"] = values
        key.setdefault("maxLength", DEFAULT_MAX_LENGTH)
        node.setdefault("x-kubernetes-validations", []).append(map_key_rule(key))
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
    """The `kubectl get` columns: the fields marked with `api.PrinterColumn`, in their order."""
    marked: list[tuple[api.PrinterColumn, str]] = []
    for model, prefix in ((api.FineTuneJob, ""), (api.FineTuneJobStatus, "status.")):
        for name, field in model.model_fields.items():
            for meta in field.metadata:
                if isinstance(meta, api.PrinterColumn):
                    path = f".{prefix}{field.alias or name}" + (f".{meta.path}" if meta.path else "")
                    marked.append((meta, path))
    columns = []
    for column, path in sorted(marked, key=lambda found: found[0].order):
        out: dict[str, Any] = {"name": column.name, "type": column.type, "jsonPath": path}
        if column.priority:
            out["priority"] = column.priority
        if column.description:
            out["description"] = column.description
        columns.append(out)
    return columns


def _object_rules() -> list[Any]:
    """The CEL rules of the whole object, from the model (api.FineTuneJob's x-kubernetes-validations)."""
    extra = api.FineTuneJob.model_config.get("json_schema_extra")
    if not isinstance(extra, dict):
        raise TypeError("api.FineTuneJob carries its CEL rules in json_schema_extra")
    return list(copy.deepcopy(extra["x-kubernetes-validations"]))  # type: ignore[arg-type]


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition as a dict."""
    spec = model_schema(api.FineTuneJobSpec)
    spec["description"] = api.FineTuneJobSpec.__doc__
    _bound_sizes(spec)
    status = model_schema(api.FineTuneJobStatus)
    status["description"] = api.FineTuneJobStatus.__doc__
    # Defaulted on every read, so a job the operator has not written yet shows
    # observedGeneration 0 < generation from its creation on: kstatus (Flux) then reads it
    # as InProgress, never Current, and Argo CD's health as Progressing.
    status["default"] = {}
    status["properties"]["observedGeneration"]["default"] = 0
    fields = api.FineTuneJob.model_fields
    root = {
        "type": "object",
        "description": api.FineTuneJob.__doc__,
        "required": [fields[name].alias or name for name, field in fields.items() if field.is_required()],
        "properties": {
            "apiVersion": {"type": "string", "description": fields["api_version"].description},
            "kind": {"type": "string", "description": fields["kind"].description},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": _object_rules(),
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
