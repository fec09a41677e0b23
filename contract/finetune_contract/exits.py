"""The trainer's exit codes and the status reasons they stand for (API.md, "Exit codes").

The trainer exits with them (`finetune_trainer.__main__`, `finetune_trainer.errors`); the
operator turns them into the Job's pod failure policy (`NON_RETRYABLE_EXIT_CODES` fail the Job
at once, `EXIT_TERMINATED` is not counted in a Kueue-managed Job) and into the FineTuneJob's
status reason (`EXIT_REASONS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = [
    "EXIT_DATA_ERROR",
    "EXIT_DIVERGED",
    "EXIT_ERROR",
    "EXIT_INVALID_SPEC",
    "EXIT_OK",
    "EXIT_REASONS",
    "EXIT_TERMINATED",
    "NON_RETRYABLE_EXIT_CODES",
    "REASON_DATA_ERROR",
    "REASON_DIVERGED",
    "REASON_ERROR",
    "REASON_INVALID_SPEC",
    "REASON_SUCCEEDED",
    "REASON_TERMINATED",
]

EXIT_OK = 0  # trained and saved
EXIT_ERROR = 1  # an unexpected error: the Job may retry it
EXIT_INVALID_SPEC = 2  # the spec cannot be trained as written
EXIT_DATA_ERROR = 3  # the images are not usable
EXIT_DIVERGED = 4  # the loss became NaN or infinite
# 128 + SIGTERM: the pod is going away (suspend, Kueue preemption, a node drain); the trainer
# saved its state and resumes from its checkpoints in the next pod.
EXIT_TERMINATED = 143

REASON_SUCCEEDED = "Succeeded"
REASON_ERROR = "Error"
REASON_INVALID_SPEC = "InvalidSpec"
REASON_DATA_ERROR = "DataError"
REASON_DIVERGED = "Diverged"
REASON_TERMINATED = "Terminated"

# The failures retrying cannot fix, by exit code: the Job fails at once with this reason.
EXIT_REASONS: Mapping[int, str] = MappingProxyType(
    {
        EXIT_INVALID_SPEC: REASON_INVALID_SPEC,
        EXIT_DATA_ERROR: REASON_DATA_ERROR,
        EXIT_DIVERGED: REASON_DIVERGED,
    }
)
NON_RETRYABLE_EXIT_CODES: tuple[int, ...] = tuple(EXIT_REASONS)
