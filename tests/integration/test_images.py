"""The images `make images` builds, run with podman as a kubelet would run them.

`localhost/finetune-operator:dev` and `localhost/finetune-trainer:dev` (hack/build-images.sh,
built here when missing). Each container runs as the pod would: read-only root and nothing
writable that the pod does not mount (`--read-only-tmpfs=false`: podman would otherwise put
tmpfs on /tmp, /var/tmp and /run), no /etc/passwd entry made up for the uid
(`--passwd=false`: a kubelet makes none), every capability dropped, no new privileges, no
network. What a container catches that a process on the host does not, one test each:

- the operator image carries no TensorFlow or Keras (its site-packages, listed in the image);
- the entrypoints exist and start (`--help`);
- the image's user is the uid deploy/base runs the pods as;
- bytecode compiled at build time: the read-only root keeps Python from caching it, and
  importing the trainer's stack from source takes 3-4 times as long (64 s against 18 s on two
  busy cores) on every start;
- HOME and the caches Keras, matplotlib and XDG users write (`~/.keras`, ...) lie in the /tmp
  emptyDir the Job mounts: the root is read-only, the uid has no home, and TensorFlow will not
  even import without a writable temporary folder;
- a tiny training (`weights: none`, generated images) under the Job's own securityContext uid,
  environment, command and mounts succeeds, writes its model where the Job's output is mounted
  and needs no system library the image lacks (TensorFlow, Pillow, matplotlib for report.html).

Skipped only where podman is missing (`make deps-debian` installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_operator import api, builders
from finetune_testbed.imagesets import write_square_folder

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "hack" / "containers" / "containers.conf"
OPERATOR_IMAGE = os.environ.get("OPERATOR_IMAGE", "localhost/finetune-operator:dev")
TRAINER_IMAGE = os.environ.get("TRAINER_IMAGE", "localhost/finetune-trainer:dev")
SITE_PACKAGES = "/opt/venv/lib/python3.11/site-packages"
# A kubelet's container: see the module docstring.
AS_A_POD = [
    "--rm", "--pull", "never", "--network", "none", "--read-only", "--read-only-tmpfs=false",
    "--passwd=false", "--cap-drop", "all", "--security-opt", "no-new-privileges",
]


def podman(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONTAINERS_CONF": str(CONF)}
    return subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


def run_python(image: str, code: str, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -c code` in `image` as a pod would run it (the image's own user unless `extra` says)."""
    return podman("run", *AS_A_POD, *extra, "--entrypoint", "python", image, "-c", code, timeout=timeout)


@pytest.fixture(scope="module", autouse=True)
def images() -> None:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (make deps-debian installs it)")
    if not all(podman("image", "exists", image).returncode == 0 for image in (OPERATOR_IMAGE, TRAINER_IMAGE)):
        built = subprocess.run(
            [str(ROOT / "hack" / "build-images.sh")], capture_output=True, text=True, timeout=1500, check=False
        )
        assert built.returncode == 0, built.stderr[-3000:]
    for image in (OPERATOR_IMAGE, TRAINER_IMAGE):
        assert podman("image", "exists", image).returncode == 0, f"{image} is not in podman's store"


def image_config(image: str) -> dict[str, Any]:
    inspected = podman("image", "inspect", image)
    assert inspected.returncode == 0, inspected.stderr
    config: dict[str, Any] = json.loads(inspected.stdout)[0]["Config"]
    return config


def test_operator_image_has_no_tensorflow() -> None:
    listed = run_python(OPERATOR_IMAGE, f"import os; print('\\n'.join(sorted(os.listdir({SITE_PACKAGES!r}))))")
    assert listed.returncode == 0, listed.stderr
    names = {line.lower() for line in listed.stdout.split()}
    assert {"kopf", "kubernetes", "aiohttp", "finetune_operator"} <= names  # the listing is the real one
    heavy = sorted(n for n in names if n.startswith(("tensorflow", "tf_keras", "keras", "tensorboard", "jax", "torch")))
    assert heavy == []


@pytest.mark.parametrize(
    ("image", "usage"),
    [(OPERATOR_IMAGE, "usage: finetune-operator"), (TRAINER_IMAGE, "usage: finetune-train")],
)
def test_entrypoints_answer_help(image: str, usage: str) -> None:
    helped = podman("run", *AS_A_POD, image, "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith(usage)


def test_images_run_as_the_deployments_uid() -> None:
    (deployment,) = [
        d for d in yaml.safe_load_all((ROOT / "deploy" / "base" / "deployment.yaml").read_text())
        if d and d["kind"] == "Deployment"
    ]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    uid = pod["securityContext"]["runAsUser"]
    assert f"--run-as-user={uid}" in container["args"]  # the trainer pods' uid, too
    for image in (OPERATOR_IMAGE, TRAINER_IMAGE):
        assert image_config(image)["User"] == f"{uid}:{uid}"
        ran = run_python(image, "import os; print(os.getuid(), os.getgid())")
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.split() == [str(uid), str(uid)]


@pytest.mark.parametrize("image", [OPERATOR_IMAGE, TRAINER_IMAGE])
def test_bytecode_is_compiled_at_build_time(image: str) -> None:
    counted = run_python(
        image,
        "import importlib.util, os\n"
        f"sources = [os.path.join(d, f) for d, _, fs in os.walk({SITE_PACKAGES!r}) for f in fs if f.endswith('.py')]\n"
        "missing = [s for s in sources if not os.path.exists(importlib.util.cache_from_source(s))]\n"
        "print(len(sources), len(missing), *missing[:5])",
    )
    assert counted.returncode == 0, counted.stderr
    sources, missing, *examples = counted.stdout.split()
    assert int(sources) > 1000
    assert (int(missing), examples) == (0, [])


def job_for(*, spec: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The Job the operator makes for `spec` (no progress URL) and the config file it hands the trainer."""
    owner = builders.Owner(namespace="images", name="tiny", uid="0a1b2c3d-images", labels={})
    job = builders.build_job(
        pod=builders.TrainerPod(
            owner=owner, spec=api.FineTuneJobSpec.model_validate(spec), default_image=TRAINER_IMAGE,
            progress_url=None, raw_spec=spec,
        ),
    )
    return job, builders.spec_document(owner=owner, spec=spec)


def test_trainer_caches_lie_in_the_jobs_tmp() -> None:
    job, _ = job_for(spec={"data": {"train": "/data/train", "validationSplit": 0.2}, "output": {"path": "/out"}})
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    writable = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in empty_dirs and not m.get("readOnly")]
    assert writable == ["/tmp"]
    job_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    image_env = dict(e.split("=", 1) for e in image_config(TRAINER_IMAGE)["Env"])
    for name in ("HOME", "KERAS_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR"):
        assert image_env[name].startswith("/tmp"), (name, image_env[name])
        assert job_env.get(name, image_env[name]).startswith("/tmp"), (name, job_env[name])


def test_tiny_training_as_the_job_runs_it(tmp_path: Path) -> None:
    spec: dict[str, Any] = {
        "model": {"base": "MobileNetV2", "weights": "none", "inputShape": [32, 32, 3],
                  "baseOptions": {"alpha": 0.35}, "head": {"units": [16], "dropout": 0.2}},
        "data": {"train": "/data/train", "validation": "/data/val", "augmentation": {"enabled": False}},
        "training": {"batchSize": 8, "head": {"epochs": 1, "learningRate": 1e-3},
                     "fineTune": {"epochs": 1, "learningRate": 1e-5, "unfreezeLast": 2},
                     "mixedPrecision": "off", "seed": 7},
        "output": {"path": "/out"},
    }
    job, document = job_for(spec=spec)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = container["securityContext"]
    uid, gid = security["runAsUser"], security["runAsGroup"]

    write_square_folder(tmp_path / "data" / "train", per_class=6, seed=1)
    write_square_folder(tmp_path / "data" / "val", per_class=3, seed=2)
    config = tmp_path / "config"
    config.mkdir()
    (config / Path(builders.CONFIG_FILE).name).write_text(document)
    tmp = tmp_path / "emptydir-tmp"
    tmp.mkdir(mode=0o777)
    tmp.chmod(0o777)  # an emptyDir's mode
    out = tmp_path / "out"
    out.mkdir()
    os.chown(out, uid, gid)  # a volume the pod's fsGroup may write
    termination = tmp_path / "termination-log"
    termination.touch(mode=0o666)
    termination.chmod(0o666)

    mounts = {str(tmp): "/tmp", str(out): "/out", str(termination): container["terminationMessagePath"]}
    read_only = {str(config): builders.CONFIG_DIR, str(tmp_path / "data"): "/data"}
    args = [f"--volume={src}:{dst}" for src, dst in mounts.items()]
    args += [f"--volume={src}:{dst}:ro" for src, dst in read_only.items()]
    args += [f"--env={e['name']}={e['value']}" for e in container["env"] if "value" in e]
    command = container["command"]
    ran = podman(
        "run", *AS_A_POD, f"--user={uid}:{gid}", *args, "--entrypoint", command[0], TRAINER_IMAGE, *command[1:],
        timeout=1200,
    )
    assert ran.returncode == 0, ran.stderr[-4000:]
    summary = json.loads(termination.read_text())
    assert (summary["exitCode"], summary["reason"], summary["modelPath"]) == (0, "Succeeded", "/out/model.keras")
    for name in ("model.keras", "classes.json", "metrics.json", "report.html"):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_uid == uid
    assert "Matplotlib created a temporary cache directory" not in ran.stderr  # MPLCONFIGDIR is writable
    assert (tmp / ".keras").is_dir()  # Keras's home, in the emptyDir
