"""Failures the trainer knows how to explain, each with its exit code and status reason.

`__main__` turns them into the documented exit codes (API.md) and the termination message;
anything else is an unexpected error (exit 1, reason Error), which the Job retries.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "EXIT_DATA_ERROR",
    "EXIT_DIVERGED",
    "EXIT_ERROR",
    "EXIT_INVALID_SPEC",
    "EXIT_OK",
    "DataError",
    "DivergedError",
    "InvalidSpecError",
    "TrainerError",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INVALID_SPEC = 2
EXIT_DATA_ERROR = 3
EXIT_DIVERGED = 4


class TrainerError(Exception):
    """A failure retrying cannot fix; its message is one line naming the field, path or class."""

    exit_code: ClassVar[int] = EXIT_ERROR
    reason: ClassVar[str] = "Error"


class InvalidSpecError(TrainerError):
    """The spec cannot be trained as written: unknown base, bad options, weights file missing or unfit."""

    exit_code = EXIT_INVALID_SPEC
    reason = "InvalidSpec"


class DataError(TrainerError):
    """The images are not usable: missing folder, no images, class mismatch, too many unreadable files."""

    exit_code = EXIT_DATA_ERROR
    reason = "DataError"


class DivergedError(TrainerError):
    """The loss became NaN or infinite."""

    exit_code = EXIT_DIVERGED
    reason = "Diverged"
