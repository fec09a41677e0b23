"""The operator's configuration: command-line flags, most with an environment fallback.

A flag wins over its environment variable (`ENVIRONMENT`), which wins over the default.
`--priority` and `--verbose` have no environment variable. The default `--run-as-user` is
65532, the uid the images run as (the Dockerfile's `USER`, deploy/base and the Helm chart).
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_RUN_AS_USER", "DEFAULT_TRAINER_IMAGE", "ENVIRONMENT", "OperatorConfig", "parse_args"]

DEFAULT_TRAINER_IMAGE = "ghcr.io/finetune-dev/finetune-trainer:0.1.0"
DEFAULT_RUN_AS_USER = 65532  # the images' uid: the Dockerfile's USER 65532:65532
PREFIX = "finetune.dev"

# flag -> the environment variable read when the flag is not given
ENVIRONMENT = {
    "--namespace": "FINETUNE_NAMESPACES",
    "--trainer-image": "FINETUNE_TRAINER_IMAGE",
    "--trainer-command": "FINETUNE_TRAINER_COMMAND",
    "--progress-host": "FINETUNE_PROGRESS_HOST",
    "--progress-port": "FINETUNE_PROGRESS_PORT",
    "--progress-url": "FINETUNE_PROGRESS_URL",
    "--metrics-host": "FINETUNE_METRICS_HOST",
    "--metrics-port": "FINETUNE_METRICS_PORT",
    "--health-port": "FINETUNE_HEALTH_PORT",
    "--pending-timeout": "FINETUNE_PENDING_TIMEOUT",
    "--status-window": "FINETUNE_STATUS_WINDOW",
    "--run-as-user": "FINETUNE_RUN_AS_USER",
    "--peering": "FINETUNE_PEERING",
}


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
    run_as_user: int = DEFAULT_RUN_AS_USER
    status_window_s: float = 1.0
    peering: str | None = None
    priority: int | None = None
    verbose: bool = False


def parse_args(
    argv: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None
) -> OperatorConfig:
    """Flags win over the environment (`ENVIRONMENT`), which wins over the defaults."""
    env = os.environ if environ is None else environ

    def fallback(flag: str, default: str) -> str:
        return env.get(ENVIRONMENT[flag], default)

    def said(flag: str, text: str = "") -> str:
        return f"{text}{'; ' if text else ''}env {ENVIRONMENT[flag]}"

    p = argparse.ArgumentParser(prog="finetune-operator", description="Runs FineTuneJobs as batch/v1 Jobs.")
    p.add_argument(
        "--namespace",
        action="append",
        default=None,
        help=said("--namespace", "namespace to watch (repeatable; default all)") + ", comma-separated",
    )
    def env_flag(
        flag: str, default: str, *, kind: Callable[[str], Any] = str, text: str = "", optional: bool = False
    ) -> None:
        """A flag whose default is its environment variable's value, else `default`; `optional`: "" reads None."""
        value = fallback(flag, default)
        p.add_argument(
            flag, type=kind, default=None if optional and not value else kind(value), help=said(flag, text)
        )

    env_flag("--trainer-image", DEFAULT_TRAINER_IMAGE)
    env_flag(
        "--trainer-command",
        "finetune-train",
        text="program (and leading args) the trainer container runs before `--config FILE`; for tests",
    )
    env_flag("--progress-host", "0.0.0.0")
    env_flag("--progress-port", "8081", kind=int)
    env_flag(
        "--progress-url", "", text="the progress URL trainer pods are given; unset: no progress reports", optional=True
    )
    env_flag("--metrics-host", "0.0.0.0")
    env_flag("--metrics-port", "8080", kind=int)
    env_flag("--health-port", "8082", kind=int)
    env_flag(
        "--pending-timeout",
        "600",
        kind=float,
        text="seconds a pod may wait on its image or on scheduling before the job fails (0: forever)",
    )
    env_flag(
        "--status-window",
        "1.0",
        kind=float,
        text="seconds over which non-final status changes of a job are coalesced into one write (0: none)",
    )
    env_flag(
        "--run-as-user",
        str(DEFAULT_RUN_AS_USER),
        kind=int,
        text=f"uid and gid of the trainer pods (default {DEFAULT_RUN_AS_USER}, the images' uid)",
    )
    env_flag(
        "--peering",
        "",
        text="Kopf peering object for running several replicas (needs deploy/base/peering.yaml)",
        optional=True,
    )
    p.add_argument(
        "--priority", type=int, default=None, help="Kopf peering priority (default: random; no env)"
    )
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging (no env)")
    args = p.parse_args(argv)
    namespaces = args.namespace
    if namespaces is None:
        namespaces = [n.strip() for n in fallback("--namespace", "").split(",") if n.strip()]
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
