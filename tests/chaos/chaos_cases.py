"""The chaos tier's generated bad FineTuneJobs: a deterministic, seeded generator (no I/O).

`admission_cases(seed=...)` returns a few hundred `Case`s, each one valid base manifest
with one hostile change: wrong types, raw NaN and out-of-range numbers, huge and negative
values, 10k-character strings, unicode and control characters, unknown fields at every
level, deep nesting, huge arrays, bad quantities, bad tolerations, references to missing
ConfigMaps/Secrets/PVCs/PriorityClasses, hostile base names and paths, oversized objects.
The same seed gives the same cases, byte for byte, so a CI failure reproduces locally.

Each case says which field path a refusal at admission must name (`names`); `None` marks
a request the API server's JSON decoder refuses before any schema runs (a raw `NaN` or
`1e309` literal): those are refused with 400 and name no field, which is all the API
server can do. Every admitted case must end `Failed` with a specific reason.

The base manifest is valid and passes the chaos trainer's pre-flight (the data folder is
on the `data` claim the test creates), so an admitted case that still trains would end
`Succeeded`, and the test says so: nothing hostile passes only because a path is missing.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["DATA_CLAIM", "Case", "Raw", "admission_cases", "base_manifest", "categories", "deep_json", "path_text"]

DATA_CLAIM = "data"
API_VERSION = "finetune.dev/v1alpha1"

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Raw:
    """A JSON text put into the body as it is (a literal json.dumps cannot write, or too deep for it)."""

    text: str


@dataclass(frozen=True)
class Case:
    """One generated manifest: `body` is the exact JSON request body."""

    name: str  # metadata.name (for cases that attack metadata.name, the name in the body differs)
    category: str
    note: str
    body: bytes
    names: str | None  # the field path a refusal must name; None: refused by the JSON decoder (400)


def base_manifest(name: str) -> dict[str, Any]:
    """A valid FineTuneJob that the chaos trainer's pre-flight passes (data on the `data` claim)."""
    return {
        "apiVersion": API_VERSION,
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"base": "MobileNetV2", "weights": "none", "inputShape": [32, 32, 3], "head": {"units": [8]}},
            "data": {"train": "/data/train", "validationSplit": 0.2},
            "training": {
                "batchSize": 4,
                "head": {"epochs": 1, "learningRate": 0.001},
                "fineTune": {"epochs": 1, "learningRate": 0.0001, "unfreezeLast": 2},
                "earlyStopping": {"patience": 1},
                "reduceLROnPlateau": {"patience": 1},
            },
            "output": {"path": "/tmp/chaos-out"},
            "runtime": {
                "gpus": 0,
                "backoffLimit": 0,
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": DATA_CLAIM, "readOnly": True}}],
                "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
                "env": [{"name": "CHAOS_CASE", "value": name}],
            },
        },
    }


def path_text(path: Path) -> str:
    """`("spec", "runtime", "env", 0, "name")` -> `spec.runtime.env[0].name`, as the API server writes it."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _set(doc: dict[str, Any], path: Path, value: Any) -> None:
    node: Any = doc
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(part, int):
            node = node[part]
            continue
        if part not in node or not isinstance(node[part], dict | list):
            node[part] = [] if isinstance(nxt, int) else {}
        node = node[part]
    last = path[-1]
    if isinstance(last, int):
        while len(node) <= last:
            node.append({})
        node[last] = value
    else:
        node[last] = value


def _serialise(doc: Any) -> bytes:
    raws: list[str] = []

    def mark(node: Any) -> Any:
        if isinstance(node, Raw):
            raws.append(node.text)
            return f"\u0001RAW{len(raws) - 1}\u0001"
        if isinstance(node, dict):
            return {k: mark(v) for k, v in node.items()}
        if isinstance(node, list):
            return [mark(v) for v in node]
        return node

    text = json.dumps(mark(doc), ensure_ascii=False, allow_nan=False)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\u0001RAW{i}\u0001"), raw)
    return text.encode("utf-8", errors="surrogatepass")


def deep_json(depth: int, *, kind: str = "object") -> Raw:
    """`{"a":{"a":...1...}}` (or `[[...]]`) `depth` levels deep, as text (json.dumps stops near 1000)."""
    if kind == "list":
        return Raw("[" * depth + "1" + "]" * depth)
    return Raw('{"a":' * depth + "1" + "}" * depth)


# ----- hostile values -----

UNICODE = (
    "\u202eevil\u202c",  # right-to-left override
    "caf\u00e9-\u4e2d\u6587-\U0001f4a5",  # accents, CJK, emoji
    "\u200b\u200d\ufeff",  # zero-width characters
    "\uff36\uff27\uff27\uff11\uff16",  # fullwidth VGG16
    "a\u0000b",  # NUL
    "\u001b[31mred\u001b[0m\u0007",  # ANSI escape and bell
    "line\nbreak",
    "tab\there",
    "\ud800",  # a lone surrogate (written as invalid UTF-8 bytes)
)


def _long(rng: random.Random, n: int = 10_000) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz\u00e9\u4e2d/._-"
    return "".join(rng.choice(alphabet) for _ in range(n))


def _ints(*, lo: int, hi: int | None, huge_bad: bool) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = [
        ("below-minimum", lo - 1),
        ("very-negative", -(2**62)),
        ("float", lo + 0.5),
        ("string", str(lo + 1)),
        ("string-NaN", "NaN"),
        ("bool", True),
        ("list", [lo + 1]),
        ("object", {"value": lo + 1}),
        ("int64-overflow", Raw(str(2**64))),
        ("1e30", Raw("1" + "0" * 30)),
        ("raw-NaN", Raw("NaN")),
    ]
    if hi is not None:
        out.append(("above-maximum", hi + 1))
    if huge_bad:
        out.append(("huge", 2**62))
    return out


def _floats(*, lo: float, hi: float) -> list[tuple[str, Any]]:
    return [
        ("below-range", lo - 1.0),
        ("above-range", hi + 1.0),
        ("1e308", 1e308),
        ("-1e308", -1e308),
        ("raw-1e309", Raw("1e309")),
        ("raw-NaN", Raw("NaN")),
        ("raw-Infinity", Raw("-Infinity")),
        ("string-NaN", "NaN"),
        ("string-Infinity", "Infinity"),
        ("string-number", "0.5"),
        ("bool", False),
        ("list", [0.5]),
    ]


def _strings(rng: random.Random, *, long_bad: bool, control_bad: bool) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = [
        ("int", 42),
        ("list", ["x"]),
        ("object", {"x": 1}),
        ("bool", True),
    ]
    if long_bad:
        out.append(("10k-chars", _long(rng)))
    if control_bad:
        out += [("NUL", "/x\u0000y"), ("control", "/x\u001b[2J\u0007"), ("newline", "/x\ny")]
    return out


# (path under spec, lo, hi, a huge value (2**62) is bad). Huge is bad where no training can use it:
# 2**62 epochs never end (and their ETA overflows status.etaSeconds' int64), a seed above 2**32 - 1
# is refused by NumPy only once the trainer runs. A huge patience ("never"), unfreezeLast ("all
# layers") or batch size (one batch) still means something, so those are not generated.
INT_FIELDS: tuple[tuple[Path, int, int | None, bool], ...] = (
    (("training", "batchSize"), 1, None, False),
    (("training", "head", "epochs"), 0, None, True),
    (("training", "fineTune", "epochs"), 0, None, True),
    (("training", "fineTune", "unfreezeLast"), 0, None, False),
    (("training", "earlyStopping", "patience"), 0, None, False),
    (("training", "reduceLROnPlateau", "patience"), 0, None, False),
    (("training", "seed"), 0, None, True),
    (("runtime", "gpus"), 0, 64, False),
    (("runtime", "workers"), 1, 64, False),
    (("runtime", "backoffLimit"), 0, 100, False),
    (("runtime", "activeDeadlineSeconds"), 1, None, False),
    (("runtime", "ttlSecondsAfterFinished"), 0, None, False),
)

FLOAT_FIELDS: tuple[tuple[Path, float, float], ...] = (
    (("model", "head", "dropout"), 0.0, 1.0),
    (("data", "validationSplit"), 0.0, 1.0),
    (("data", "augmentation", "rotation"), 0.0, 180.0),
    (("data", "augmentation", "zoom"), 0.0, 1.0),
    (("data", "augmentation", "widthShift"), 0.0, 1.0),
    (("data", "augmentation", "heightShift"), 0.0, 1.0),
    (("training", "head", "learningRate"), 0.0, 1.0),
    (("training", "fineTune", "learningRate"), 0.0, 1.0),
    (("training", "reduceLROnPlateau", "factor"), 0.0, 1.0),
)

# (path under spec, a 10k string is bad, control characters are bad)
STRING_FIELDS: tuple[tuple[Path, bool, bool], ...] = (
    (("model", "base"), True, True),
    (("model", "weights"), True, True),
    (("data", "train"), True, False),
    (("output", "path"), True, True),
    (("runtime", "image"), True, True),
    (("runtime", "priorityClassName"), True, True),
)

ENUM_FIELDS: tuple[tuple[Path, tuple[Any, ...]], ...] = (
    (("training", "mixedPrecision"), ("fp8", "MIXED_FLOAT16", "mixed_float16 ", "mixed_float16\u0000", 16)),
    (("training", "reduceLROnPlateau", "monitor"), ("val_acc", "VAL_LOSS", "val_loss\n", "", 0)),
)

BOOL_FIELDS: tuple[Path, ...] = (
    ("data", "augmentation", "enabled"),
    ("data", "augmentation", "horizontalFlip"),
    ("training", "earlyStopping", "restoreBestWeights"),
    ("suspend",),
)

# Every object level of the schema, and items of the Kubernetes-typed lists.
OBJECT_LEVELS: tuple[Path, ...] = (
    ("metadata",),
    ("spec",),
    ("spec", "model"),
    ("spec", "model", "head"),
    ("spec", "data"),
    ("spec", "data", "augmentation"),
    ("spec", "training"),
    ("spec", "training", "head"),
    ("spec", "training", "fineTune"),
    ("spec", "training", "earlyStopping"),
    ("spec", "training", "reduceLROnPlateau"),
    ("spec", "output"),
    ("spec", "runtime"),
    ("spec", "runtime", "resources"),
    ("spec", "runtime", "volumes", 0),
    ("spec", "runtime", "volumes", 0, "persistentVolumeClaim"),
    ("spec", "runtime", "volumeMounts", 0),
    ("spec", "runtime", "env", 0),
    ("spec", "runtime", "affinity"),
)

HOSTILE_BASES = (
    "../../etc/passwd",
    "__import__",
    "os.system",
    "VGG16; rm -rf /",
    "$(reboot)",
    "Sequential",
    "Model",
    "layers",
    "preprocess_input",
    "VGG16\n",
    "vgg16 ",
    "\uff36\uff27\uff27\uff11\uff16",
    "A" * 65,
    "",
)

HOSTILE_DATA_PATHS = ("../../../../etc", "/proc/self", "/dev/zero", "/data/train/../../../../etc/shadow", "relative/train")


def admission_cases(*, seed: int) -> list[Case]:
    """The generated bad manifests, in a seeded order; names are c000, c001, ..."""
    rng = random.Random(seed)
    mutations: list[tuple[str, str, Callable[[dict[str, Any]], None], str | None]] = []

    def add(category: str, note: str, change: Callable[[dict[str, Any]], None], names: str | None) -> None:
        mutations.append((category, note, change, names))

    def setter(path: Path, value: Any) -> Callable[[dict[str, Any]], None]:
        return lambda doc: _set(doc, path, copy.deepcopy(value))

    def decoder_refusal(value: Any) -> bool:
        return isinstance(value, Raw) and value.text in ("NaN", "-Infinity", "1e309")

    for path, lo, hi, huge_bad in INT_FIELDS:
        full = ("spec", *path)
        for label, value in _ints(lo=lo, hi=hi, huge_bad=huge_bad):
            category = "huge-int" if label == "huge" else "int"
            names = None if decoder_refusal(value) else path_text(full)
            add(category, f"{path_text(full)} = {label}", setter(full, value), names)

    for path, lo, hi in FLOAT_FIELDS:
        full = ("spec", *path)
        for label, value in _floats(lo=lo, hi=hi):
            names = None if decoder_refusal(value) else path_text(full)

            def change(doc: dict[str, Any], full: Path = full, value: Any = value) -> None:
                _set(doc, full, copy.deepcopy(value))

            add("float", f"{path_text(full)} = {label}", change, names)

    for path, long_bad, control_bad in STRING_FIELDS:
        full = ("spec", *path)
        for label, value in _strings(rng, long_bad=long_bad, control_bad=control_bad):
            add("string", f"{path_text(full)} = {label}", setter(full, value), path_text(full))
    for text in UNICODE:
        add("unicode", f"spec.model.base = {text!r}", setter(("spec", "model", "base"), text), "spec.model.base")
        add("unicode", f"spec.runtime.image = {text!r}", setter(("spec", "runtime", "image"), text),
            "spec.runtime.image")  # fmt: skip

    for path, values in ENUM_FIELDS:
        full = ("spec", *path)
        for value in values:
            add("enum", f"{path_text(full)} = {value!r}", setter(full, value), path_text(full))
    for path in BOOL_FIELDS:
        full = ("spec", *path)
        for value in ("true", 1, "yes", []):
            add("bool", f"{path_text(full)} = {value!r}", setter(full, value), path_text(full))

    # Lists of the spec: wrong lengths, element types and sizes.
    shape = ("spec", "model", "inputShape")
    for label, value in (
        ("empty", []), ("two", [32, 32]), ("four", [32, 32, 3, 1]), ("zero", [0, 32, 3]),
        ("negative", [-32, 32, 3]), ("float", [32.5, 32, 3]), ("string", ["32", 32, 3]),
        ("10k-items", [32] * 10_000), ("huge-side", [2**31, 2**31, 3]), ("object", {"h": 32}),
    ):  # fmt: skip
        add("huge-int" if label.startswith("huge") else "list", f"spec.model.inputShape = {label}",
            setter(shape, value), path_text(shape))  # fmt: skip
    units = ("spec", "model", "head", "units")
    for label, value in (("zero", [0]), ("negative", [-8]), ("10k-items", [1] * 10_000), ("huge", [2**40]),
                         ("string", ["8"]), ("nested", [[8]])):  # fmt: skip
        add("huge-int" if label.startswith("huge") else "list", f"spec.model.head.units = {label}",
            setter(units, value), path_text(units))  # fmt: skip

    # Unknown fields at every level (kubectl's default, fieldValidation=Strict, must refuse them).
    add("unknown-field", "top-level bogus", setter(("bogus",), 1), "bogus")
    for level in OBJECT_LEVELS:
        for key in ("bogusField", "\u00fcnknown\u00e9"):
            add("unknown-field", f"{path_text(level)}.{key}", setter((*level, key), 1), path_text((*level, key)))

    # Deep nesting inside the free-form and Kubernetes-typed objects (depths Python can still decode;
    # the thousands of levels that crash decoders are test_chaos_admission's separate test).
    for depth in (64, 200):
        for path in (("spec", "model", "baseOptions", "a"), ("spec", "runtime", "affinity", "nodeAffinity"),
                     ("spec", "runtime", "resources", "limits"), ("spec", "runtime", "env", 0, "valueFrom")):  # fmt: skip
            add("deep", f"{path_text(path)} nested {depth} deep", setter(path, deep_json(depth)), path_text(path))
        add("deep", f"spec.model.baseOptions.a = list nested {depth} deep",
            setter(("spec", "model", "baseOptions", "a"), deep_json(depth, kind="list")),
            "spec.model.baseOptions")  # fmt: skip

    # Huge arrays and maps.
    runtime = ("spec", "runtime")
    for field, item in (
        ("volumes", lambda i: {"name": f"v{i}", "emptyDir": {}}),
        ("volumeMounts", lambda i: {"name": "data", "mountPath": f"/m{i}"}),
        ("env", lambda i: {"name": f"E{i}", "value": "x"}),
        ("tolerations", lambda i: {"key": f"k{i}", "operator": "Exists"}),
    ):
        add("huge-array", f"spec.runtime.{field} with 10k items",
            setter((*runtime, field), [item(i) for i in range(10_000)]), f"spec.runtime.{field}")  # fmt: skip
    add("huge-array", "spec.runtime.nodeSelector with 10k entries",
        setter((*runtime, "nodeSelector"), {f"k{i}": "v" for i in range(10_000)}), "spec.runtime.nodeSelector")  # fmt: skip
    add("huge-array", "spec.model.baseOptions with 10k keys",
        setter(("spec", "model", "baseOptions"), {f"k{i}": i for i in range(10_000)}), "spec.model.baseOptions")  # fmt: skip
    add("huge-array", "spec.runtime.resources.limits with 10k keys",
        setter((*runtime, "resources", "limits"), {f"example.com/r{i}": "1" for i in range(10_000)}),
        "spec.runtime.resources.limits")  # fmt: skip

    # Objects too large for what the operator creates from them (the Job, its pod).
    add("size", "spec.runtime.env values totalling 1 MB",
        setter((*runtime, "env"), [{"name": f"BIG{i}", "value": "x" * 16_000} for i in range(64)]),
        "spec.runtime.env")  # fmt: skip
    add("size", "spec.runtime.env: one 1 MB value",
        setter((*runtime, "env", 0), {"name": "BIG", "value": "x" * 1_000_000}), "spec.runtime.env[0].value")  # fmt: skip
    add("size", "spec.model.baseOptions: a 1 MB string",
        setter(("spec", "model", "baseOptions", "blob"), "x" * 1_000_000), "spec.model.baseOptions")  # fmt: skip
    add("size", "metadata.annotations over 256 KiB",
        setter(("metadata", "annotations", "example.com/blob"), "x" * 300_000), "metadata.annotations")  # fmt: skip
    add("size", "metadata.labels: a hostile key",
        setter(("metadata", "labels", "bad key!"), "v"), "metadata.labels")  # fmt: skip
    add("size", "metadata.labels: a 10k value",
        setter(("metadata", "labels", "app"), _long(rng)), "metadata.labels")  # fmt: skip

    # Bad quantities.
    limits = (*runtime, "resources", "limits")
    requests = (*runtime, "resources", "requests")
    for label, value in (("word", "lots"), ("negative", "-1"), ("1e1000", "1e1000"), ("unit", "1Qi"),
                         ("infinity", "\u221e"), ("empty", ""), ("hex", "0x10"), ("dots", "1.5.5"),
                         ("number-1e308", 1e308), ("negative-number", -5), ("10k", "9" * 10_000)):  # fmt: skip
        add("quantity", f"spec.runtime.resources.limits.cpu = {label}", setter((*limits, "cpu"), value),
            "spec.runtime.resources.limits")  # fmt: skip
    add("quantity", "spec.runtime.resources.requests.memory = -1Gi", setter((*requests, "memory"), "-1Gi"),
        "spec.runtime.resources.requests")  # fmt: skip
    add("quantity", "requests.cpu above limits.cpu",
        setter((*runtime, "resources"), {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}),
        "spec.runtime.resources")  # fmt: skip
    add("quantity", "nvidia.com/gpu = 0.5", setter((*limits, "nvidia.com/gpu"), "0.5"), "spec.runtime.resources")
    add("quantity", "resource name with a space", setter((*limits, "my gpu"), "1"), "spec.runtime.resources")

    # Bad tolerations.
    tol = (*runtime, "tolerations")
    for label, value, names in (
        ("operator Bogus", [{"key": "k", "operator": "Bogus"}], "spec.runtime.tolerations[0].operator"),
        ("effect Sometimes", [{"key": "k", "operator": "Exists", "effect": "Sometimes"}],
         "spec.runtime.tolerations[0].effect"),
        ("key with spaces", [{"key": "bad key!", "operator": "Exists"}], "spec.runtime.tolerations[0].key"),
        ("Exists with a value", [{"key": "k", "operator": "Exists", "value": "v"}], "spec.runtime.tolerations[0]"),
        ("tolerationSeconds a string", [{"key": "k", "operator": "Exists", "effect": "NoExecute",
                                          "tolerationSeconds": "soon"}], "spec.runtime.tolerations[0].tolerationSeconds"),
        ("tolerationSeconds with NoSchedule", [{"key": "k", "operator": "Exists", "effect": "NoSchedule",
                                                "tolerationSeconds": 5}], "spec.runtime.tolerations[0]"),
        ("a string item", ["k=v:NoSchedule"], "spec.runtime.tolerations[0]"),
        ("an object, not a list", {"key": "k"}, "spec.runtime.tolerations"),
        ("empty key with Equal", [{"operator": "Equal", "value": "v"}], "spec.runtime.tolerations[0]"),
        ("value 10k", [{"key": "k", "operator": "Equal", "value": _long(rng)}], "spec.runtime.tolerations[0].value"),
    ):  # fmt: skip
        add("toleration", f"spec.runtime.tolerations: {label}", setter(tol, value), names)

    # References to objects that do not exist.
    missing: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = [
        ("env from a missing Secret", {"name": "S", "valueFrom": {"secretKeyRef": {"name": "no-such-secret", "key": "k"}}}, None),
        ("env from a missing ConfigMap", {"name": "C", "valueFrom": {"configMapKeyRef": {"name": "no-such-cm", "key": "k"}}}, None),
        ("volume of a missing ConfigMap", {}, {"name": "cm", "configMap": {"name": "no-such-cm"}}),
        ("volume of a missing Secret", {}, {"name": "sec", "secret": {"secretName": "no-such-secret"}}),
        ("projected missing ConfigMap", {}, {"name": "proj", "projected": {"sources": [{"configMap": {"name": "no-such-cm"}}]}}),
        ("a missing PVC", {}, {"name": "extra", "persistentVolumeClaim": {"claimName": "no-such-claim"}}),
    ]  # fmt: skip
    for label, env, volume in missing:
        def change(doc: dict[str, Any], env: dict[str, Any] = env, volume: dict[str, Any] | None = volume) -> None:
            rt = doc["spec"]["runtime"]
            if env:
                rt["env"].append(env)
            if volume:
                rt["volumes"].append(volume)
                rt["volumeMounts"].append({"name": volume["name"], "mountPath": f"/mnt/{volume['name']}"})

        add("missing-ref", label, change, "spec.runtime")
    add("missing-ref", "the data PVC replaced by a missing one",
        setter((*runtime, "volumes", 0, "persistentVolumeClaim", "claimName"), "no-such-claim"), "spec.runtime")  # fmt: skip
    add("missing-ref", "a missing PriorityClass", setter((*runtime, "priorityClassName"), "no-such-class"),
        "spec.runtime.priorityClassName")  # fmt: skip
    add("missing-ref", "a mount of a volume that does not exist",
        setter((*runtime, "volumeMounts", 1), {"name": "ghost", "mountPath": "/ghost"}), "spec.runtime.volumeMounts")  # fmt: skip

    # Hostile volumes and mounts.
    for label, change_path, value, names in (
        ("hostPath /", ("volumes", 1), {"name": "host", "hostPath": {"path": "/"}}, "spec.runtime.volumes"),
        ("two sources in one volume", ("volumes", 0), {"name": "data", "emptyDir": {}, "persistentVolumeClaim": {"claimName": DATA_CLAIM}},
         "spec.runtime.volumes[0]"),
        ("mountPath empty", ("volumeMounts", 0), {"name": "data", "mountPath": ""}, "spec.runtime.volumeMounts[0]"),
        ("mount over the config", ("volumeMounts", 1), {"name": "data", "mountPath": "/etc/finetune"},
         "spec.runtime.volumeMounts"),
        ("subPath with ..", ("volumeMounts", 0), {"name": "data", "mountPath": "/data", "subPath": "../../etc"},
         "spec.runtime.volumeMounts[0].subPath"),
        ("volume name not a DNS label", ("volumes", 0), {"name": "Bad_Name", "emptyDir": {}}, "spec.runtime.volumes[0].name"),
        ("env name with a space", ("env", 0), {"name": "BAD NAME", "value": "x"}, "spec.runtime.env[0].name"),
        ("env with value and valueFrom", ("env", 0), {"name": "E", "value": "x", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
         "spec.runtime.env[0]"),
        ("env without a name", ("env", 0), {"value": "x"}, "spec.runtime.env[0]"),
        ("env fieldRef to a secret path", ("env", 0), {"name": "E", "valueFrom": {"fieldRef": {"fieldPath": "spec.secrets"}}},
         "spec.runtime.env[0]"),
        ("nodeSelector hostile key", ("nodeSelector",), {"bad key/\u00e9": "v"}, "spec.runtime.nodeSelector"),
        ("nodeSelector value 10k", ("nodeSelector",), {"k": _long(rng, 1000)}, "spec.runtime.nodeSelector"),
        ("affinity of the wrong shape", ("affinity",), {"nodeAffinity": ["x"]}, "spec.runtime.affinity.nodeAffinity"),
        ("affinity with a bad operator", ("affinity",), {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "k", "operator": "Maybe"}]}]}}}, "spec.runtime.affinity"),
    ):  # fmt: skip
        add("runtime-object", label, setter((*runtime, *change_path), value), names)

    # Hostile base names and paths.
    for value in HOSTILE_BASES:
        add("base-name", f"spec.model.base = {value[:40]!r}", setter(("spec", "model", "base"), value), "spec.model.base")
    for value in HOSTILE_DATA_PATHS:
        add("path", f"spec.data.train = {value!r}", setter(("spec", "data", "train"), value), "spec.data.train")

        def validation(doc: dict[str, Any], value: str = value) -> None:
            doc["spec"]["data"].pop("validationSplit", None)
            doc["spec"]["data"]["validation"] = value

        add("path", f"spec.data.validation = {value!r}", validation, "spec.data.validation")
    for value in ("", "/models/\u0000x", _long(rng, 5000)):
        add("path", f"spec.output.path = {value[:30]!r}", setter(("spec", "output", "path"), value), "spec.output.path")

    # Cross-field rules and whole-object types.
    def both(doc: dict[str, Any]) -> None:
        doc["spec"]["data"]["validation"] = "/data/train"

    def neither(doc: dict[str, Any]) -> None:
        doc["spec"]["data"].pop("validationSplit")

    add("shape", "data.validation and data.validationSplit", both, "spec.data")
    add("shape", "neither data.validation nor data.validationSplit", neither, "spec.data")
    for label, path, value, names in (
        ("spec a list", ("spec",), [], "spec"), ("spec a string", ("spec",), "spec", "spec"),
        ("spec.model a number", ("spec", "model"), 7, "spec.model"), ("spec.data a list", ("spec", "data"), [], "spec.data"),
        ("spec.runtime a string", ("spec", "runtime"), "fast", "spec.runtime"),
        ("spec.training.head a list", ("spec", "training", "head"), [1], "spec.training.head"),
        ("spec.runtime.env an object", ("spec", "runtime", "env"), {"A": "b"}, "spec.runtime.env"),
        ("spec.runtime.volumes a string", ("spec", "runtime", "volumes"), "data", "spec.runtime.volumes"),
    ):  # fmt: skip
        add("shape", label, setter(path, value), names)

    # metadata.name itself.
    for label, value in (("uppercase", "BadName"), ("unicode", "n\u00e4me"), ("60 chars", "x" * 60),
                         ("10k chars", "x" * 10_000), ("dots and slashes", "a/b")):  # fmt: skip
        add("name", f"metadata.name = {label}", setter(("metadata", "name"), value), "metadata.name")

    order = list(range(len(mutations)))
    rng.shuffle(order)
    cases: list[Case] = []
    for index, m in enumerate(order):
        category, note, change, names = mutations[m]
        name = f"c{index:03d}"
        doc = base_manifest(name)
        change(doc)
        cases.append(Case(name=name, category=category, note=note, body=_serialise(doc), names=names))
    return cases


def categories(cases: list[Case]) -> Iterator[str]:
    """The categories of `cases`, each once, in first-seen order."""
    seen: set[str] = set()
    for case in cases:
        if case.category not in seen:
            seen.add(case.category)
            yield case.category
