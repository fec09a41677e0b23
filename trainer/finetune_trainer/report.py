"""Reporting: progress reports to the operator, the trainer's /metrics, the termination message.

(Skeleton: the termination message works; progress reporting and /metrics are to come.)
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from finetune_trainer.observer import TrainingObserver
from finetune_trainer.protocol import TERMINATION_MESSAGE_MAX_BYTES, TerminationSummary

__all__ = ["DEFAULT_TERMINATION_PATH", "build_observers", "write_termination_message"]

DEFAULT_TERMINATION_PATH = "/dev/termination-log"
ENV_TERMINATION_PATH = "FINETUNE_TERMINATION_LOG"


def write_termination_message(*, summary: TerminationSummary, path: str | None = None) -> None:
    """Writes the JSON summary (at most 4 KiB) where the kubelet reads the termination message.

    The path is `path`, else $FINETUNE_TERMINATION_LOG, else /dev/termination-log when its
    folder exists (in a pod); a local run without either writes nothing. Never raises.
    """
    target = path or os.environ.get(ENV_TERMINATION_PATH) or DEFAULT_TERMINATION_PATH
    if target == DEFAULT_TERMINATION_PATH and not Path(target).exists():
        return
    data = summary.model_dump_json(by_alias=True)
    if len(data.encode()) > TERMINATION_MESSAGE_MAX_BYTES:
        room = max(0, len(summary.message) - (len(data.encode()) - TERMINATION_MESSAGE_MAX_BYTES) - 16)
        data = summary.model_copy(update={"message": summary.message[:room] + "..."}).model_dump_json(by_alias=True)
    data = data.encode()[:TERMINATION_MESSAGE_MAX_BYTES].decode(errors="ignore")
    with contextlib.suppress(OSError):
        Path(target).write_text(data, encoding="utf-8")


def build_observers(*, progress_url: str | None) -> list[TrainingObserver]:
    """The observers a run reports to: the operator's progress endpoint and /metrics, when configured."""
    del progress_url
    return []
