"""The operator's configuration: command-line flags, each with an environment fallback."""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["DEFAULT_TRAINER_IMAGE", "OperatorConfig", "parse_args"]

DEFAULT_TRAINER_IMAGE = "ghcr.io/finetune-dev/finetune-trainer:0.1.0"
PREFIX = "finetune.dev"


@dataclass(frozen=True)
class OperatorConfig:
    """Everything the operator is told at start."""

    namespaces: tuple[str, ...] = ()
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    trainer_command: tuple[str, ...] = ("finetune-train",)
    progress_host: str = "0.0.0.0"
    progress_port: int = 8081
    progress_url: str | None = None
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 8080
    health_port: int = 8082
    pending_timeout_s: float = 600.0
    run_as_user: int = 1000
    status_window_s: float = 1.0
    peering: str | None = None
    priority: int | None = None
    verbose: bool = False
    extra: Mapping[str, str] = field(default_factory=dict)


def parse_args(argv: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None) -> OperatorConfig:
    """Flags win over the environment, which wins over the defaults."""
    env = os.environ if environ is None else environ
    p = argparse.ArgumentParser(prog="finetune-operator", description="Runs FineTuneJobs as batch/v1 Jobs.")
    p.add_argument(
        "--namespace",
        action="append",
        default=None,
        help="namespace to watch (repeatable; default all; env FINETUNE_NAMESPACES, comma-separated)",
    )
    p.add_argument("--trainer-image", default=env.get("FINETUNE_TRAINER_IMAGE", DEFAULT_TRAINER_IMAGE))
    p.add_argument(
        "--trainer-command",
        default=env.get("FINETUNE_TRAINER_COMMAND", "finetune-train"),
        help="program (and leading args) the trainer container runs before `--config FILE`; for tests",
    )
    p.add_argument("--progress-host", default=env.get("FINETUNE_PROGRESS_HOST", "0.0.0.0"))
    p.add_argument("--progress-port", type=int, default=int(env.get("FINETUNE_PROGRESS_PORT", "8081")))
    p.add_argument(
        "--progress-url",
        default=env.get("FINETUNE_PROGRESS_URL") or None,
        help="the progress URL trainer pods are given (env FINETUNE_PROGRESS_URL); unset: no progress reports",
    )
    p.add_argument("--metrics-host", default=env.get("FINETUNE_METRICS_HOST", "0.0.0.0"))
    p.add_argument("--metrics-port", type=int, default=int(env.get("FINETUNE_METRICS_PORT", "8080")))
    p.add_argument("--health-port", type=int, default=int(env.get("FINETUNE_HEALTH_PORT", "8082")))
    p.add_argument(
        "--pending-timeout",
        type=float,
        default=float(env.get("FINETUNE_PENDING_TIMEOUT", "600")),
        help="seconds a pod may wait on its image or on scheduling before the job fails (0: forever)",
    )
    p.add_argument(
        "--status-window",
        type=float,
        default=float(env.get("FINETUNE_STATUS_WINDOW", "1.0")),
        help="seconds over which non-final status changes of a job are coalesced into one write (0: none)",
    )
    p.add_argument("--run-as-user", type=int, default=int(env.get("FINETUNE_RUN_AS_USER", "1000")))
    p.add_argument(
        "--peering",
        default=env.get("FINETUNE_PEERING") or None,
        help="Kopf peering object for running several replicas (needs deploy/base/peering.yaml)",
    )
    p.add_argument("--priority", type=int, default=None, help="Kopf peering priority (default: random)")
    p.add_argument("--verbose", "-v", action="store_true")
    args = p.parse_args(argv)
    namespaces = args.namespace
    if namespaces is None:
        namespaces = [n.strip() for n in env.get("FINETUNE_NAMESPACES", "").split(",") if n.strip()]
    return OperatorConfig(
        namespaces=tuple(namespaces),
        trainer_image=args.trainer_image,
        trainer_command=tuple(shlex.split(args.trainer_command)),
        progress_host=args.progress_host,
        progress_port=args.progress_port,
        progress_url=args.progress_url,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        pending_timeout_s=args.pending_timeout,
        run_as_user=args.run_as_user,
        status_window_s=args.status_window,
        peering=args.peering,
        priority=args.priority,
        verbose=args.verbose,
    )
