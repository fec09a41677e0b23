"""The e2e tier's control plane: the pod runner in container mode, so the trainer image runs.

`cluster` is overridden here: a control plane of the tier's own (private_cluster: its own
folder and free ports, so the shared `.cluster` and its process-mode pod runner are left
alone). With FTO_PODS=container (the default for this tier) its pod runner runs every
container from its image with podman + runc; the images must be built first (`make images`,
which `make test-e2e` runs), and without them the tier fails at once, saying so.
FTO_PODS=process runs the same tier with local processes instead (no image involved).

`trainer_image` is the image the operator is told to run (`--trainer-image`), and
`pods_mode` the mode in force.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.cluster import Cluster, private_cluster

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "hack" / "containers" / "containers.conf"
TRAINER_IMAGE = os.environ.get("TRAINER_IMAGE", "localhost/finetune-trainer:dev")


def e2e_pods_mode() -> str:
    return os.environ.get("FTO_PODS") or "container"


def image_present(image: str) -> bool:
    env = {**os.environ, "CONTAINERS_CONF": str(CONF)}
    try:
        got = subprocess.run(["podman", "image", "exists", image], env=env, capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return got.returncode == 0


@pytest.fixture(scope="session")
def pods_mode() -> str:
    return e2e_pods_mode()


@pytest.fixture(scope="session")
def trainer_image(pods_mode: str) -> str:
    if pods_mode != "container":
        return "ghcr.io/finetune-dev/finetune-trainer:0.1.0"  # process mode: the repo's .venv runs it
    if not image_present(TRAINER_IMAGE):
        pytest.fail(f"{TRAINER_IMAGE} is not in podman's store: `make images` builds it (make test-e2e does)")
    return TRAINER_IMAGE


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, pods_mode: str, trainer_image: str) -> Iterator[Cluster]:
    """A control plane of the tier's own, its pod runner in `pods_mode`; KUBECONFIG points at it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FTO_PODS", pods_mode)
        with private_cluster(cluster_dir=tmp_path_factory.mktemp(f"e2e-{pods_mode}-cluster")) as found:
            mp.setenv("KUBECONFIG", str(found.kubeconfig))
            yield found
