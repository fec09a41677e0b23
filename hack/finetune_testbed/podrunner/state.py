"""Per-pod state of the runner: a pod's run and its containers' runs."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from finetune_testbed.podrunner import podnet
from finetune_testbed.podrunner.common import Obj


@dataclass
class ContainerRun:
    """One container of a running pod."""

    name: str
    spec: Obj
    dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    message: str | None = None
    restart_count: int = 0
    waiting: tuple[str, str] | None = None  # (reason, message)
    restart_at: float | None = None
    last_terminated: Obj | None = None
    container_id: str | None = None
    # container mode
    podman_name: str | None = None
    image_id: str = ""
    stop_signal: str = "SIGTERM"
    host_pid: int | None = None
    kill_escalated: bool = False
    next_retry: float = 0.0  # a waiting container is tried again then (each on its own)


@dataclass
class PodRun:
    """What the runner knows about one pod it owns."""

    uid: str
    pod: Obj
    dir: Path
    init: list[ContainerRun] = field(default_factory=list)
    main: list[ContainerRun] = field(default_factory=list)
    stage: str = "init"  # init | main | done
    start_time: str = ""
    kill_deadline: float | None = None
    terminating: bool = False
    prepared: bool = False
    mounts: dict[str, list[Obj]] = field(default_factory=dict)
    last_written: str = ""
    tokens: list[tuple[Path, Obj, float]] = field(default_factory=list)  # file, source, monotonic renew time
    address: podnet.PodAddress | None = None  # --pod-network=netns

    @property
    def namespace(self) -> str:
        return str(self.pod["metadata"]["namespace"])

    @property
    def name(self) -> str:
        return str(self.pod["metadata"]["name"])


class ConfigError(Exception):
    """A container's configuration cannot be built yet (CreateContainerConfigError)."""
