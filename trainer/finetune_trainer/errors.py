"""Failures the trainer knows how to explain, each with its exit code and status reason.

The codes and reasons are the contract's (`finetune_contract.exits`, API.md). `__main__` turns
these errors into them and the termination message; anything else is an unexpected error
(exit 1, reason Error), which the Job retries.
"""

from __future__ import annotations

from typing import ClassVar

from finetune_contract import exits

__all__ = [
    "DataError",
    "DivergedError",
    "InvalidSpecError",
    "TrainerError",
]


class TrainerError(Exception):
    """A failure retrying cannot fix; its message is one line naming the field, path or class."""

    exit_code: ClassVar[int] = exits.EXIT_ERROR
    reason: ClassVar[str] = exits.REASON_ERROR


class InvalidSpecError(TrainerError):
    """The spec cannot be trained as written: unknown base, bad options, weights file missing or unfit."""

    exit_code = exits.EXIT_INVALID_SPEC
    reason = exits.REASON_INVALID_SPEC


class DataError(TrainerError):
    """The images are not usable: missing folder, no images, class mismatch, too many unreadable files."""

    exit_code = exits.EXIT_DATA_ERROR
    reason = exits.REASON_DATA_ERROR


class DivergedError(TrainerError):
    """The loss became NaN or infinite."""

    exit_code = exits.EXIT_DIVERGED
    reason = exits.REASON_DIVERGED
