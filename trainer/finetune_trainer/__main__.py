"""`finetune-train --config FILE [--output DIR] [--progress-url URL]`: one training run.

Exit codes (API.md; defined once in `finetune_contract.exits`): 0 trained and saved, 2 invalid
configuration, 3 data error, 4 diverged, anything else an unexpected error the Job may retry:
1 an unexpected error, 143 (128 + SIGTERM, what a shell reports) terminated by SIGTERM
(suspend, preemption, node drain), reason `Terminated`. Every exit prints a one-line reason on stderr and writes a JSON
`TerminationSummary` to the termination-message path.

SIGTERM: the handler is installed before anything slow happens; it raises `train.Terminated`
(a BaseException, so no `except Exception` in an observer or a callback swallows it), held back
only while a finished epoch's or stage's state is being saved (see `train`). The process then
exits within a second or two (the current batch, the epoch-end saves, a bounded flush of the
progress reporter) with the summary written. A SIGTERM after training has ended no longer
interrupts: the summary is written and the process exits as it would have.
TensorFlow is imported only once the config is valid, so a bad config fails in a second.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from finetune_contract import exits
from finetune_contract.protocol import ENV_PROGRESS_URL, TerminationSummary
from finetune_contract.spec import TrainerSpec

from finetune_trainer import distribute, errors, report, train
from finetune_trainer.config import ConfigError, load_config, load_runtime
from finetune_trainer.observer import TrainingObserver

__all__ = ["main", "parse_args"]

log = logging.getLogger("finetune_trainer")

_Terminated = train.Terminated  # a BaseException: never swallowed by `except Exception`


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line of finetune-train."""
    parser = argparse.ArgumentParser(
        prog="finetune-train", description="Two-phase Keras fine-tuning from a FineTuneJob manifest."
    )
    parser.add_argument("--config", required=True, help="FineTuneJob manifest (YAML or JSON; whole resource or spec)")
    parser.add_argument("--output", help="output folder (overrides spec.output.path)")
    parser.add_argument("--progress-url", help=f"progress endpoint (overrides ${ENV_PROGRESS_URL})")
    return parser.parse_args(argv)


class _Handler:
    """The SIGTERM handler: terminates training while armed; afterwards only notes the signal."""

    def __init__(self) -> None:
        self.armed = True
        self.received: int | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        if self.armed:
            train.terminate(signum)


def _build_observers(progress_url: str | None) -> list[TrainingObserver]:
    try:
        return list(report.build_observers(progress_url=progress_url))
    except Exception:
        log.warning("progress reporting and /metrics are off: building the observers failed", exc_info=True)
        return []


def _finish(*, code: int, reason: str, message: str, metrics: dict[str, float] | None = None,
            model_path: str | None = None) -> int:
    summary = TerminationSummary(
        exit_code=code, reason=reason, message=message, metrics=metrics or {}, model_path=model_path
    )
    try:
        report.write_termination_message(summary=summary)
    except Exception:
        log.warning("could not write the termination message", exc_info=True)
    if code != exits.EXIT_OK:
        print(f"finetune-train: {reason}: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Runs finetune-train; returns the exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        spec: TrainerSpec = load_config(path=args.config)
        runtime = load_runtime(path=args.config)  # workers, gpus: the distribution strategy
    except ConfigError as exc:
        return _finish(code=exits.EXIT_INVALID_SPEC, reason=exits.REASON_INVALID_SPEC, message=str(exc))
    output = args.output or spec.output.path
    if args.output:
        spec = spec.model_copy(update={"output": spec.output.model_copy(update={"path": str(Path(args.output))})})

    handler = _Handler()
    previous: Any = None
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (tests calling main in a thread)
        previous = None
    try:
        return _train(spec=spec, output=output, progress_url=args.progress_url, handler=handler, runtime=runtime)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _train(*, spec: TrainerSpec, output: str, progress_url: str | None, handler: _Handler,
           runtime: dict[str, Any] | None = None) -> int:
    """Runs training under the armed handler; disarms it before the summary is written."""
    try:
        try:
            observers = _build_observers(progress_url or os.environ.get(ENV_PROGRESS_URL) or None)
            distribution = distribute.plan(runtime=runtime, env=os.environ)
            result = train.run(spec=spec, output_dir=output, observers=observers, distribution=distribution)
        finally:
            handler.armed = False
    except errors.TrainerError as exc:
        return _finish(code=exc.exit_code, reason=exc.reason, message=str(exc))
    except _Terminated as exc:
        return _finish(code=exits.EXIT_TERMINATED, reason=exits.REASON_TERMINATED,
                       message=f"{exc}; checkpoints/ holds every finished epoch, a new pod resumes from them")
    except Exception as exc:
        traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return _finish(code=exits.EXIT_ERROR, reason=exits.REASON_ERROR, message=f"{type(exc).__name__}: {first}"[:1000])
    return _finish(
        code=exits.EXIT_OK,
        reason=exits.REASON_SUCCEEDED,
        message=f"trained and saved to {result.model_path}",
        metrics=result.metrics,
        model_path=str(result.model_path),
    )


if __name__ == "__main__":
    raise SystemExit(main())
