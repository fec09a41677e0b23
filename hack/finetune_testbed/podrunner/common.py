"""The pod runner's constants and small pure helpers (times, quantities, $(VAR) expansion, pod keys)."""

from __future__ import annotations

import datetime
import logging
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]

EXEC_HELPER = ROOT / "hack" / "localcluster_exec.py"  # run by path with python -I: the standard library only

SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"

DEFAULT_TERMINATION_PATH = "/dev/termination-log"

# Images with no command: what their entrypoint is here (the project's own images).
IMAGE_ENTRYPOINTS = {
    "ghcr.io/finetune-dev/finetune-trainer": ["finetune-train"],
    "ghcr.io/finetune-dev/finetune-operator": ["finetune-operator"],
}

STRATEGIC = "application/strategic-merge-patch+json"

MERGE = "application/merge-patch+json"

log = logging.getLogger("podrunner")

Obj = dict[str, Any]

def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_quantity(value: str | int | float) -> Decimal:
    from kubernetes.utils.quantity import parse_quantity as parse

    return Decimal(parse(value))  # type: ignore[no-untyped-call]


def expand_vars(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: `$$` is a literal `$`, unknown references stay as written."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2 : end]
                    out.append(env.get(name, text[i : end + 1]))
                    i = end + 1
                    continue
        out.append(ch)
        i += 1
    return "".join(out)


def pod_key(pod: Obj) -> str:
    return f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"


def is_terminal(pod: Obj) -> bool:
    return pod.get("status", {}).get("phase") in ("Succeeded", "Failed")


def container_requests(pod: Obj) -> dict[str, Decimal]:
    """Effective pod requests the way the scheduler counts them (max(init), sum(main))."""

    def requests_of(c: Obj) -> dict[str, Decimal]:
        res = c.get("resources") or {}
        req = dict(res.get("limits") or {})  # limits default the requests
        req.update(res.get("requests") or {})
        return {k: parse_quantity(v) for k, v in req.items()}

    total: dict[str, Decimal] = {}
    for c in pod["spec"].get("containers", []):
        for k, v in requests_of(c).items():
            total[k] = total.get(k, Decimal(0)) + v
    for c in pod["spec"].get("initContainers") or []:
        for k, v in requests_of(c).items():
            total[k] = max(total.get(k, Decimal(0)), v)
    return total
