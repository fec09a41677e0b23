"""The pod runner's container mode: each container of a pod runs from its image with podman + runc.

Used by hack/podrunner.py (`--pods=container`, what `FTO_PODS=container` selects). What a
kubelet with a CRI runtime does, as far as this machine allows:

- the image must be in podman's local store (nothing is pulled: there is no registry here).
  Missing with `imagePullPolicy: Never` -> Waiting ErrImageNeverPull; otherwise ErrImagePull,
  then ImagePullBackOff, as a failed pull reads. `Always` uses the local image (it cannot be
  pulled again). The status carries `imageID` (the repo digest podman records) and
  `containerID: podman://<id>`.
- `command` replaces the image's ENTRYPOINT (and drops its CMD), `args` replace CMD;
  `$(VAR)` expands from the container's declared env only; `workingDir` replaces WORKDIR.
  The image's ENV stays unless the pod sets the same name; no PATH or HOME is added (HOME is
  what the image's /etc/passwd says for the uid, else `/`, as runc sets it).
- the securityContext (container over pod): runAsUser/runAsGroup -> `--user`, fsGroup and
  supplementalGroups -> `--group-add` (fsGroup also owns emptyDir and claim volumes: see
  `apply_fs_group`; no /etc/passwd entry is made up for the uid, as podman would), runAsNonRoot checked against the uid or the image's USER like the
  kubelet (CreateContainerConfigError), readOnlyRootFilesystem -> `--read-only` without
  podman's extra tmpfs mounts, capabilities -> `--cap-drop`/`--cap-add`, privileged,
  allowPrivilegeEscalation: false -> no-new-privileges, seccomp RuntimeDefault -> podman's
  default profile, Unconfined (or no profile at all: the kubelet's default) -> unconfined,
  Localhost -> <cluster>/seccomp/<profile>.
- host network (pods share the machine's loopback, as in process mode), or with
  `--pod-network=netns` the pod's own namespace (`--network ns:/run/netns/<ns>`, podnet.py);
  hostname = the pod's;
  every volume a bind mount at its mountPath, read-only where asked; the termination message
  a bind-mounted file (mode 0666, as the kubelet makes it) read after exit.
- stdout and stderr go straight to the container's log file (podman's passthrough driver),
  where `kubectl logs` reads them as in process mode.
- stop: the image's STOPSIGNAL (else SIGTERM), SIGKILL after the grace period.
- a container that cannot start (its entrypoint is missing, the OCI runtime refuses it)
  ends Terminated with reason StartError and exit code 128, the runtime's message in it.

Not done: resource limits (cgroups are not enforced, as in process mode), user namespaces,
AppArmor/SELinux options, image pulls.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
# B1's containers.conf (default_ulimits = [], which these hosts need); written beside the
# cluster when the checkout has none.
CONTAINERS_CONF = ROOT / "hack" / "containers" / "containers.conf"
CONTAINERS_CONF_TEXT = "[containers]\n# The sandbox refuses to raise rlimits.\ndefault_ulimits = []\n"
LABEL_CLUSTER = "dev.finetune.podrunner.cluster"
# Exit codes of `podman run` itself: its own error, the command cannot be invoked, not found.
PODMAN_ERROR_CODES = (125, 126, 127)
# Names the podman process reads from its own environment: passed by value, never inherited.
PODMAN_OWN_ENV = frozenset({"PATH", "HOME", "TMPDIR", "CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF",
                            "CONTAINERS_REGISTRIES_CONF", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME",
                            "XDG_DATA_HOME", "LANG", "LC_ALL"})  # fmt: skip
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")

Obj = dict[str, Any]


class ContainerConfigError(Exception):
    """The container cannot be created as specified (the kubelet's CreateContainerConfigError)."""


@dataclass(frozen=True)
class ImageInfo:
    """What podman's store says about one local image."""

    id: str
    repo_digests: tuple[str, ...]
    user: str
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    stop_signal: str

    @property
    def image_id(self) -> str:
        """The status' imageID: a repo digest (`name@sha256:...`) as the kubelet reports, else the id."""
        return self.repo_digests[0] if self.repo_digests else f"sha256:{self.id}"


# --- pure builders ------------------------------------------------------------------------------


def pull_policy(container: Mapping[str, Any]) -> str:
    """The effective imagePullPolicy (the API server's default: Always for :latest or no tag)."""
    policy = container.get("imagePullPolicy")
    if policy:
        return str(policy)
    image = str(container.get("image", "")).split("@", 1)[0]
    last = image.rsplit("/", 1)[-1]
    return "Always" if ":" not in last or last.endswith(":latest") else "IfNotPresent"


def missing_image_waiting(*, image: str, policy: str, previous: str | None) -> tuple[str, str]:
    """(reason, message) of a container whose image is not in the local store, as a kubelet says it."""
    if policy == "Never":
        return "ErrImageNeverPull", f'Container image "{image}" is not present with pull policy of Never'
    if previous in ("ErrImagePull", "ImagePullBackOff"):
        return "ImagePullBackOff", f'Back-off pulling image "{image}"'
    return "ErrImagePull", (
        f'failed to pull and unpack image "{image}": the local pod runner pulls nothing '
        "(no registry here); build it into podman's store (make images)"
    )


def effective_security(pod_spec: Mapping[str, Any], container: Mapping[str, Any]) -> Obj:
    """The container's securityContext over the pod's, for the fields both have."""
    pod_sc = dict(pod_spec.get("securityContext") or {})
    c_sc = dict(container.get("securityContext") or {})
    merged: Obj = {}
    for key in ("runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile"):
        if key in c_sc:
            merged[key] = c_sc[key]
        elif key in pod_sc:
            merged[key] = pod_sc[key]
    for key in ("readOnlyRootFilesystem", "allowPrivilegeEscalation", "capabilities", "privileged"):
        if key in c_sc:
            merged[key] = c_sc[key]
    for key in ("fsGroup", "supplementalGroups"):
        if key in pod_sc:
            merged[key] = pod_sc[key]
    return merged


def _image_uid(user: str) -> str:
    return user.split(":", 1)[0]


def non_root_error(*, security: Mapping[str, Any], image_user: str, pod: str, container: str) -> str | None:
    """The kubelet's runAsNonRoot check (verifyRunAsNonRoot), or None when it passes."""
    if not security.get("runAsNonRoot"):
        return None
    where = f'(pod: "{pod}", container: {container})'
    if security.get("runAsUser") is not None:
        if int(security["runAsUser"]) == 0:
            return f"container's runAsUser breaks non-root policy {where}"
        return None
    uid = _image_uid(image_user)
    if uid in ("", "root", "0"):
        return f"container has runAsNonRoot and image will run as root {where}"
    if not uid.isdigit():
        return (
            f"container has runAsNonRoot and image has non-numeric user ({uid}), "
            f"cannot verify user is non-root {where}"
        )
    return None


def user_arg(*, security: Mapping[str, Any], image_user: str) -> str | None:
    """`--user` for runAsUser/runAsGroup, None to keep the image's USER."""
    uid, gid = security.get("runAsUser"), security.get("runAsGroup")
    if uid is None and gid is None:
        return None
    if uid is None:
        uid = _image_uid(image_user) or "0"
    return f"{uid}:{gid}" if gid is not None else str(uid)


def security_args(*, security: Mapping[str, Any], seccomp_dir: Path) -> list[str]:
    """podman flags for the securityContext (see the module docstring)."""
    out: list[str] = []
    if security.get("privileged"):
        out.append("--privileged")
    if security.get("readOnlyRootFilesystem"):
        out += ["--read-only", "--read-only-tmpfs=false"]
    caps = security.get("capabilities") or {}
    for cap in caps.get("drop") or []:
        out += ["--cap-drop", str(cap)]
    for cap in caps.get("add") or []:
        out += ["--cap-add", str(cap)]
    if security.get("allowPrivilegeEscalation") is False:
        out += ["--security-opt", "no-new-privileges"]
    profile = security.get("seccompProfile") or {}
    kind = profile.get("type")
    if kind == "Localhost":
        local = (seccomp_dir / str(profile.get("localhostProfile", ""))).resolve()
        if seccomp_dir.resolve() not in local.parents:
            raise ContainerConfigError(f"seccomp profile {profile.get('localhostProfile')!r} is outside {seccomp_dir}")
        if not local.is_file():
            raise ContainerConfigError(f"cannot load seccomp profile {local}: no such file")
        out += ["--security-opt", f"seccomp={local}"]
    elif kind != "RuntimeDefault" and not security.get("privileged"):
        out += ["--security-opt", "seccomp=unconfined"]  # Unconfined, or none (the kubelet's default)
    for gid in [security.get("fsGroup"), *(security.get("supplementalGroups") or [])]:
        if gid is not None:
            out += ["--group-add", str(int(gid))]
    return out


def mount_args(mounts: Sequence[Mapping[str, Any]]) -> list[str]:
    """`--mount type=bind,...` per volume mount (the termination-message file included)."""
    out: list[str] = []
    for m in mounts:
        source, target = str(m["source"]), str(m["target"])
        if any(ch in source + target for ch in ",\n"):
            raise ContainerConfigError(f"mount path with a comma or newline is not supported here: {target!r}")
        spec = f"type=bind,source={source},destination={target}"
        if m.get("readOnly"):
            spec += ",ro=true"
        out += ["--mount", spec]
    return out


def container_name(*, namespace: str, pod: str, uid: str, container: str, attempt: int) -> str:
    """The dockershim convention, unique per attempt: k8s_<container>_<pod>_<ns>_<uid>_<attempt>."""
    return f"k8s_{container}_{pod}_{namespace}_{uid}_{attempt}"


def run_argv(
    *,
    podman: str,
    name: str,
    image: str,
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    info: ImageInfo,
    env: Mapping[str, str],
    mounts: Sequence[Mapping[str, Any]],
    cidfile: Path,
    conmon_pidfile: Path,
    seccomp_dir: Path,
    cluster_label: str,
    expand: Any,
    network: str = "host",
) -> tuple[list[str], dict[str, str]]:
    """`podman run` for one container, and the variables its environment must carry.

    `network`: "host", or `ns:/run/netns/<name>` for the pod's own namespace (podnet.py,
    which also puts its /etc/hosts among `mounts`).

    Env values travel in podman's own environment (`--env NAME` imports it), not in its argv,
    where every local user could read them. `expand` is the `$(VAR)` expansion.
    """
    meta = pod["metadata"]
    security = effective_security(pod["spec"], container)
    problem = non_root_error(
        security=security, image_user=info.user, pod=meta["name"], container=container["name"]
    )
    if problem is not None:
        raise ContainerConfigError(problem)
    command = [expand(a, env) for a in container.get("command") or []]
    args = [expand(a, env) for a in container.get("args") or []]
    if not command and not info.entrypoint and not args and not info.cmd:
        raise ContainerConfigError("failed to generate container spec: no command specified")
    argv = [
        podman, "run", "--runtime", "runc", "--name", name,
        "--network", network, "--hostname", str(pod["spec"].get("hostname") or meta["name"])[:63],
        "--log-driver", "passthrough", "--pull", "never", "--passwd=false",
        "--cidfile", str(cidfile), "--conmon-pidfile", str(conmon_pidfile),
        "--label", f"{LABEL_CLUSTER}={cluster_label}",
        "--label", f"io.kubernetes.pod.namespace={meta['namespace']}",
        "--label", f"io.kubernetes.pod.name={meta['name']}",
        "--label", f"io.kubernetes.pod.uid={meta['uid']}",
        "--label", f"io.kubernetes.container.name={container['name']}",
    ]  # fmt: skip
    user = user_arg(security=security, image_user=info.user)
    if user is not None:
        argv += ["--user", user]
    argv += security_args(security=security, seccomp_dir=seccomp_dir)
    imported: dict[str, str] = {}
    for key, value in env.items():
        if not _ENV_NAME.fullmatch(key):
            continue  # the kubelet refuses these at validation; nothing to pass
        if key in PODMAN_OWN_ENV or "\x00" in value:
            argv += ["--env", f"{key}={value.replace(chr(0), '')}"]
        else:
            argv += ["--env", key]
            imported[key] = value
    if container.get("workingDir"):
        argv += ["--workdir", str(container["workingDir"])]
    argv += mount_args(mounts)
    if command:
        argv += ["--entrypoint", json.dumps(command)]
    argv.append(image)
    argv += args
    return argv, imported


def apply_fs_group(path: Path, *, gid: int, policy: str | None) -> None:
    """What the kubelet does to a volume that supports ownership (emptyDir, claims): group
    `gid`, group read/write, setgid folders. `OnRootMismatch` skips a volume whose root
    already has that group and those bits."""
    st = path.stat()
    if policy == "OnRootMismatch" and st.st_gid == gid and st.st_mode & 0o2070 == 0o2070:
        return
    for folder, dirs, files in os.walk(path):
        for entry in [folder, *(os.path.join(folder, f) for f in files)]:
            with contextlib.suppress(OSError):
                info = os.lstat(entry)
                if os.path.islink(entry):
                    continue
                os.chown(entry, -1, gid)
                extra = 0o2070 if os.path.isdir(entry) else 0o060
                os.chmod(entry, (info.st_mode & 0o7777) | extra)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]


def runtime_error(log_tail: str) -> str | None:
    """The runtime's own error line (`Error: ...`) at the end of a log, if `podman run` failed."""
    for line in reversed(log_tail.splitlines()[-5:]):
        if line.startswith("Error: "):
            return line[len("Error: ") :]
    return None


# --- podman ---------------------------------------------------------------------------------------


class Podman:
    """The podman CLI against the local store, with the containers.conf these hosts need."""

    def __init__(self, *, cluster_dir: Path, binary: str | None = None) -> None:
        found = binary or shutil.which("podman") or "/usr/bin/podman"
        self.binary = found
        self.cluster_label = str(cluster_dir)
        self.seccomp_dir = cluster_dir / "seccomp"
        conf = CONTAINERS_CONF
        if not conf.is_file():
            conf = cluster_dir / "containers.conf"
            conf.write_text(CONTAINERS_CONF_TEXT)
        self.conf = conf
        self._images: dict[str, tuple[float, ImageInfo]] = {}
        self._background: list[subprocess.Popen[bytes]] = []

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        out = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "CONTAINERS_CONF": str(self.conf)}
        if extra:
            out.update(extra)
            out["CONTAINERS_CONF"] = str(self.conf)
        return out

    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.binary, *args], capture_output=True, text=True, timeout=timeout, check=False, env=self.env()
        )

    def version(self) -> str:
        got = self._run("version", "--format", "{{.Client.Version}}", timeout=30)
        return got.stdout.strip() if got.returncode == 0 else "unknown"

    def image(self, image: str, *, max_age: float = 5.0) -> ImageInfo | None:
        """The local image, or None when podman's store has no such image (cached a few seconds)."""
        now = time.monotonic()
        cached = self._images.get(image)
        if cached is not None and now - cached[0] < max_age:
            return cached[1]
        got = self._run("image", "inspect", image, timeout=60)
        if got.returncode != 0:
            self._images.pop(image, None)
            return None
        data = json.loads(got.stdout)[0]
        config = data.get("Config") or {}
        info = ImageInfo(
            id=str(data["Id"]),
            repo_digests=tuple(data.get("RepoDigests") or ()),
            user=str(config.get("User") or ""),
            entrypoint=tuple(config.get("Entrypoint") or ()),
            cmd=tuple(config.get("Cmd") or ()),
            stop_signal=str(config.get("StopSignal") or "SIGTERM"),
        )
        self._images[image] = (now, info)
        return info

    def background(self, *args: str) -> None:
        """Runs `podman ARGS` without waiting (kill, rm); reaped by `reap`."""
        self.reap()
        self._background.append(
            subprocess.Popen(
                [self.binary, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, env=self.env(), start_new_session=True,
            )
        )  # fmt: skip

    def reap(self) -> None:
        self._background = [p for p in self._background if p.poll() is None]

    def signal(self, name: str, sig: str) -> None:
        self.background("kill", "--signal", sig, name)

    def inspect(self, name: str) -> Obj | None:
        got = self._run("container", "inspect", name, timeout=60)
        if got.returncode != 0:
            return None
        found: Obj = json.loads(got.stdout)[0]
        return found

    def remove(self, name: str, *, wait: bool = False) -> None:
        if wait:
            self._run("rm", "--force", "--time", "0", name, timeout=60)
        else:
            self.background("rm", "--force", "--time", "0", name)

    def ours(self) -> list[str]:
        """Names of the containers this cluster's pod runner made (running or not)."""
        got = self._run(
            "ps", "--all", "--filter", f"label={LABEL_CLUSTER}={self.cluster_label}", "--format", "{{.Names}}"
        )
        return [n for n in got.stdout.split() if n] if got.returncode == 0 else []

    def wait_background(self, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for p in self._background:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))
        self.reap()


def stop_signal_number(name: str) -> int:
    """SIGTERM, "TERM", "15" -> the signal's number (SIGTERM when unknown)."""
    text = name.upper()
    if text.isdigit():
        return int(text)
    if not text.startswith("SIG"):
        text = "SIG" + text
    return int(getattr(signal, text, signal.SIGTERM))


def container_pid(conmon_pidfile: Path) -> int | None:
    """The container's init process on the host: conmon's child."""
    try:
        conmon = int(conmon_pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        children = Path(f"/proc/{conmon}/task/{conmon}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None
