"""kstatus' rules for a resource without type-specific rules, in Python (for the tests).

A port of sigs.k8s.io/cli-utils/pkg/kstatus/status `Compute` for custom resources, which is
what Flux's health checks, `kpt live status` and `kubectl wait`-style tools apply:

1. metadata.deletionTimestamp set                         -> Terminating
2. status.observedGeneration present and != generation    -> InProgress (LatestGenerationNotObserved)
3. a condition Reconciling=True                           -> InProgress
   a condition Stalled=True                               -> Failed
4. otherwise                                              -> Current

kstatus itself never reads `Ready`; Flux's own convention adds it beside Reconciling and
Stalled (Ready=True exactly when Current and done). `ready_consistent` checks that
convention: a Ready condition, when present, describes the observed generation, and is
True only on a Current resource.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

KStatus = Literal["InProgress", "Failed", "Current", "Terminating"]


@dataclass(frozen=True)
class Result:
    status: KStatus
    message: str


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return None


def compute(obj: dict[str, Any]) -> Result:
    """The kstatus status of `obj` (a whole resource, status included)."""
    metadata = obj.get("metadata") or {}
    status = obj.get("status") or {}
    if metadata.get("deletionTimestamp"):
        return Result("Terminating", "Resource scheduled for deletion")
    generation = metadata.get("generation")
    observed = status.get("observedGeneration")
    if generation is not None and observed is not None and observed != generation:
        return Result(
            "InProgress",
            f"{obj.get('kind')} generation is {generation}, but latest observed generation is {observed}",
        )
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Reconciling" and cond.get("status") == "True":
            return Result("InProgress", str(cond.get("message", "")))
        if cond.get("type") == "Stalled" and cond.get("status") == "True":
            return Result("Failed", str(cond.get("message", "")))
    return Result("Current", "Resource is current")


def ready_consistent(obj: dict[str, Any]) -> bool:
    """Ready (when present) is set from the current generation and is True only if kstatus says Current."""
    ready = _condition(obj, "Ready")
    if ready is None:
        return True
    generation = (obj.get("metadata") or {}).get("generation")
    if ready.get("observedGeneration") is not None and ready.get("observedGeneration") != generation:
        return compute(obj).status == "InProgress"
    return ready.get("status") != "True" or compute(obj).status == "Current"
