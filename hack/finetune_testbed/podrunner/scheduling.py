"""Scheduling and the Node: node affinity and selectors, requests against allocatable, the Node object and its status."""

from __future__ import annotations

import os

from finetune_testbed.podrunner.common import Obj, container_requests, parse_quantity


def _match_expression(expr: Obj, labels: dict[str, str]) -> bool:
    key, op, values = expr.get("key", ""), expr.get("operator"), expr.get("values") or []
    if op == "In":
        return labels.get(key) in values
    if op == "NotIn":
        return labels.get(key) not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    if op in ("Gt", "Lt") and key in labels:
        try:
            a, b = int(labels[key]), int(values[0])
        except (ValueError, IndexError):
            return False
        return a > b if op == "Gt" else a < b
    return False


def unschedulable_reason(*, pod: Obj, node_labels: dict[str, str], allocatable: dict[str, str]) -> str | None:
    """Why `pod` cannot go to the node (a scheduler-style message), or None if it fits."""
    spec = pod["spec"]
    for key, value in (spec.get("nodeSelector") or {}).items():
        if node_labels.get(key) != value:
            return "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
    affinity = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    )
    if affinity:
        terms = affinity.get("nodeSelectorTerms") or []
        if terms and not any(
            all(_match_expression(e, node_labels) for e in (t.get("matchExpressions") or [])) for t in terms
        ):
            return "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
    for name, amount in container_requests(pod).items():
        have = parse_quantity(allocatable.get(name, "0"))
        if amount > have:
            return f"0/1 nodes are available: 1 Insufficient {name}."
    return None


def machine_capacity(*, gpus: int, cpu: str, memory: str, pods: int) -> dict[str, str]:
    return {
        "cpu": cpu,
        "memory": memory,
        "pods": str(pods),
        "ephemeral-storage": "100Gi",
        "nvidia.com/gpu": str(gpus),
    }


def node_body(*, name: str, labels: dict[str, str]) -> Obj:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}, "spec": {}}


def node_status(
    *, capacity: dict[str, str], heartbeat: str, started: str, kubelet_port: int, runtime: str = "local://1"
) -> Obj:
    def cond(type_: str, status: str, reason: str, message: str) -> Obj:
        return {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": heartbeat,
            "lastTransitionTime": started,
        }

    return {
        "capacity": capacity,
        "allocatable": capacity,
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "pod runner has sufficient memory"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "pod runner has no disk pressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "pod runner has sufficient PID"),
            cond("Ready", "True", "KubeletReady", "local pod runner is posting ready status"),
        ],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": "local-node"}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
        "nodeInfo": {
            "machineID": "local",
            "systemUUID": "local",
            "bootID": "local",
            "kernelVersion": os.uname().release,
            "osImage": "local pod runner",
            "containerRuntimeVersion": runtime,
            "kubeletVersion": "v1.34.4",
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": "amd64",
        },
    }
