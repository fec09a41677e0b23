"""The pod runner's container mode (FTO_PODS=container): pods run from their images with podman + runc.

A control plane of this module's own (private_cluster, pod runner in container mode) runs pods
from tiny images made here (`podman import` of a root filesystem holding the host's sh,
coreutils and their libraries: seconds, no registry). What is checked is what a kubelet does
and a local process does not: the uid/gid/groups of the securityContext, a read-only root,
dropped capabilities, no-new-privileges and seccomp in force, the image's ENTRYPOINT/CMD
against command/args, the image's USER against runAsNonRoot, a missing image or entrypoint,
the termination message as a bind-mounted file, `containerID: podman://...`, and a deleted
pod's containers stopped (SIGTERM, then SIGKILL after the grace period).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures.cluster import PrivateCluster, private_cluster, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "hack" / "containers" / "containers.conf"
TOOLS = ("sh", "cat", "id", "touch", "sleep", "ls", "env")
RESTRICTED_SC: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    if CONF.is_file():
        env["CONTAINERS_CONF"] = str(CONF)
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=check, env=env, timeout=120)


PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"


def rootfs_files() -> dict[str, Path]:
    """Path in the image -> host file: the tools and every library they load."""
    files: dict[str, Path] = {}
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, f"{tool} missing on this host"
        files[f"bin/{tool}"] = Path(os.path.realpath(found))
        libs = subprocess.run(["ldd", found], capture_output=True, text=True, check=False).stdout
        for lib in re.findall(r"(/\S+)", libs):
            files[lib.lstrip("/")] = Path(os.path.realpath(lib))
    return files


def build_tiny_image(*, workdir: Path, tag: str, changes: list[str]) -> str:
    """An image of the host's sh and coreutils (with their libraries), named by its content:
    built once per machine and kept (3.5 MB)."""
    files = rootfs_files()
    digest = hashlib.sha256()
    for dest, source in sorted(files.items()):
        digest.update(dest.encode() + b"\0" + hashlib.sha256(source.read_bytes()).digest())
    digest.update((PASSWD + GROUP + json.dumps(changes)).encode())
    name = f"localhost/fto-podrunner-test-{tag}:{digest.hexdigest()[:12]}"
    if podman("image", "exists", name, check=False).returncode == 0:
        return name
    rootfs = workdir / f"rootfs-{tag}"
    for dest, source in files.items():
        (rootfs / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, rootfs / dest)
    (rootfs / "etc").mkdir(exist_ok=True)
    (rootfs / "etc" / "passwd").write_text(PASSWD)
    (rootfs / "etc" / "group").write_text(GROUP)
    (rootfs / "tmp").mkdir(exist_ok=True)
    os.chmod(rootfs / "tmp", 0o1777)
    tarball = workdir / f"rootfs-{tag}.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.add(rootfs, arcname=".")
    argv = ["import"]
    for change in changes:
        argv += ["--change", change]
    podman(*argv, str(tarball), name)
    return name


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if shutil.which("podman") is None or os.geteuid() != 0:
        pytest.skip("container mode needs podman and root (make deps-debian)")
    work = tmp_path_factory.mktemp("tiny-image")
    entry = ['ENTRYPOINT ["/bin/sh", "-c", "echo entry:$0:$1"]', 'CMD ["from-cmd-1", "from-cmd-2"]']
    return {
        "plain": build_tiny_image(workdir=work, tag="plain", changes=["ENV IMAGE_VAR=from-image", *entry]),
        "named-user": build_tiny_image(workdir=work, tag="named-user", changes=["USER nobody", *entry]),
        "root-user": build_tiny_image(workdir=work, tag="root-user", changes=["USER 0", *entry]),
    }


@pytest.fixture(scope="module")
def ccluster(tmp_path_factory: pytest.TempPathFactory, images: dict[str, str]) -> Iterator[PrivateCluster]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FTO_PODS", "container")
        with private_cluster(cluster_dir=tmp_path_factory.mktemp("container-cluster")) as found:
            assert (found.dir / "podrunner-mode").read_text().strip() == "container"
            yield found


@pytest.fixture
def ns(ccluster: PrivateCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    name = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:40].strip("-") + "-" + os.urandom(3).hex()
    ccluster.kubectl_run("create", "namespace", name)
    ccluster.kubectl_run("label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted")
    wait_for(
        lambda: ccluster.get(f"/api/v1/namespaces/{name}/serviceaccounts/default"),
        timeout=30, message=f"ServiceAccount {name}/default",
    )  # fmt: skip
    yield name
    ccluster.kubectl_run("delete", "namespace", name, "--wait=false", check=False)


def apply(cluster: PrivateCluster, ns: str, obj: dict[str, Any]) -> dict[str, Any]:
    out = cluster.kubectl_run("apply", "-n", ns, "-f", "-", "-o", "json", input=yaml.safe_dump(obj))
    return dict(json.loads(out.stdout))


def pod(name: str, containers: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 5, "containers": containers, **spec},
    }


def get_pod(cluster: PrivateCluster, ns: str, name: str) -> dict[str, Any] | None:
    return cluster.get(f"/api/v1/namespaces/{ns}/pods/{name}")


def finished(cluster: PrivateCluster, ns: str, name: str, *, timeout: float = 90) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        got = get_pod(cluster, ns, name)
        return got if got and got.get("status", {}).get("phase") in ("Succeeded", "Failed") else None

    return wait_for(done, timeout=timeout, message=f"pod {ns}/{name} to finish")


def status_of(pod_obj: dict[str, Any], container: str) -> dict[str, Any]:
    (found,) = [s for s in pod_obj["status"]["containerStatuses"] if s["name"] == container]
    return dict(found)


def our_containers(*, label: str) -> list[str]:
    out = podman("ps", "--all", "--filter", f"label={label}", "--format", "{{.Names}} {{.State}}").stdout
    return [line for line in out.splitlines() if line.strip()]


PROBE = r"""
echo "id: $(id)"
echo "home: $HOME"
echo "path: $PATH"
echo "image-var: $IMAGE_VAR"
while read -r key value; do
  case "$key" in CapEff:|CapBnd:|NoNewPrivs:|Seccomp:) echo "status $key $value";; esac
done < /proc/self/status
touch /written-to-root && echo "root: writable" || echo "root: read-only"
touch /scratch/file && ls -ln /scratch/file
touch /scratch-ro/x 2>/dev/null && echo "readOnly mount: writable" || echo "readOnly mount: read-only"
test -s /var/run/secrets/kubernetes.io/serviceaccount/token && echo "token: present"
echo "the message, from the container" > /dev/termination-log
"""


def test_restricted_pod_runs_in_its_image_as_the_kubelet_runs_it(
    ccluster: PrivateCluster, ns: str, images: dict[str, str]
) -> None:
    """uid/gid/fsGroup, read-only root, no capabilities, no-new-privileges, seccomp filter,
    the image's ENV and no host PATH, volumes and the token read-only, the termination message,
    containerID and imageID, the log served to `kubectl logs`."""
    sc = {**RESTRICTED_SC, "runAsUser": 1234, "runAsGroup": 2345, "readOnlyRootFilesystem": True}
    apply(ccluster, ns, pod(
        "probe",
        [{"name": "probe", "image": images["plain"], "imagePullPolicy": "Never",
          "command": ["/bin/sh", "-c", PROBE], "securityContext": sc,
          "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"},
                           {"name": "scratch", "mountPath": "/scratch-ro", "readOnly": True}]}],
        securityContext={"fsGroup": 3456, "seccompProfile": {"type": "RuntimeDefault"}},
        volumes=[{"name": "scratch", "emptyDir": {}}],
    ))  # fmt: skip
    got = finished(ccluster, ns, "probe")
    log = ccluster.kubectl_run("logs", "-n", ns, "probe").stdout
    assert got["status"]["phase"] == "Succeeded", (got["status"], log)
    st = status_of(got, "probe")
    assert re.fullmatch(r"podman://[0-9a-f]{64}", st["containerID"]), st
    assert st["state"]["terminated"]["containerID"] == st["containerID"]
    assert re.fullmatch(r"localhost/fto-podrunner-test-plain@sha256:[0-9a-f]{64}", st["imageID"]), st
    assert st["state"]["terminated"]["message"].strip() == "the message, from the container"
    assert "id: uid=1234 gid=2345 groups=2345,3456" in log, log
    assert "home: /\n" in log, log  # uid 1234 has no passwd entry: HOME is "/", on the read-only root
    assert "image-var: from-image" in log and ".venv" not in log.split("path: ")[1].splitlines()[0], log
    assert "root: read-only" in log and "Read-only file system" in log, log
    assert "status CapEff: 0000000000000000" in log and "status CapBnd: 0000000000000000" in log, log
    assert "status NoNewPrivs: 1" in log and "status Seccomp: 2" in log, log
    assert re.search(r"-rw\S* +1 +1234 +3456 .*/scratch/file", log), log  # setgid emptyDir of fsGroup
    assert "readOnly mount: read-only" in log and "token: present" in log, log
    node = ccluster.get("/api/v1/nodes/local-node")
    assert node is not None and node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("podman://")


def test_command_and_args_against_the_images_entrypoint_and_cmd(
    ccluster: PrivateCluster, ns: str, images: dict[str, str]
) -> None:
    """command replaces ENTRYPOINT and drops CMD; args replace CMD; neither keeps both."""
    sc = {**RESTRICTED_SC, "runAsUser": 1000}
    image = images["plain"]
    apply(ccluster, ns, pod("entry", [
        {"name": "defaults", "image": image, "imagePullPolicy": "Never", "securityContext": sc},
        {"name": "args", "image": image, "imagePullPolicy": "Never", "securityContext": sc,
         "args": ["arg-1", "$(GREETING)"], "env": [{"name": "GREETING", "value": "hello"}]},
        {"name": "command", "image": image, "imagePullPolicy": "Never", "securityContext": sc,
         "command": ["/bin/sh", "-c", "echo command-only:$0"]},
    ]))  # fmt: skip
    got = finished(ccluster, ns, "entry")
    assert got["status"]["phase"] == "Succeeded", got["status"]
    logs = {c: ccluster.pod_log(namespace=ns, pod="entry", container=c).strip() for c in ("defaults", "args", "command")}
    assert logs == {
        "defaults": "entry:from-cmd-1:from-cmd-2",
        "args": "entry:arg-1:hello",
        "command": "command-only:/bin/sh",
    }, logs


def test_missing_image_waits_like_a_kubelet(ccluster: PrivateCluster, ns: str) -> None:
    """Never -> ErrImageNeverPull; IfNotPresent -> ErrImagePull, then ImagePullBackOff."""
    sc = {**RESTRICTED_SC, "runAsUser": 1000}
    apply(ccluster, ns, pod("missing", [
        {"name": "never", "image": "localhost/fto-no-such-image:0", "imagePullPolicy": "Never", "securityContext": sc},
        {"name": "ifnotpresent", "image": "localhost/fto-no-such-image:0", "imagePullPolicy": "IfNotPresent",
         "securityContext": sc},
    ]))  # fmt: skip

    def reasons() -> dict[str, str] | None:
        got = get_pod(ccluster, ns, "missing") or {}
        seen = {
            s["name"]: (s["state"].get("waiting") or {}).get("reason", "")
            for s in got.get("status", {}).get("containerStatuses") or []
        }
        return seen if seen.get("ifnotpresent") == "ImagePullBackOff" else None

    seen = wait_for(reasons, timeout=60, message="ImagePullBackOff")
    assert seen == {"never": "ErrImageNeverPull", "ifnotpresent": "ImagePullBackOff"}
    got = get_pod(ccluster, ns, "missing")
    assert got is not None and got["status"]["phase"] == "Pending"
    never = status_of(got, "never")["state"]["waiting"]["message"]
    assert never == 'Container image "localhost/fto-no-such-image:0" is not present with pull policy of Never'


def test_image_user_is_checked_against_run_as_non_root(
    ccluster: PrivateCluster, ns: str, images: dict[str, str]
) -> None:
    """runAsNonRoot without runAsUser: the image's USER decides, as the kubelet checks it."""
    # PodSecurity restricted needs runAsNonRoot; these pods go to a baseline namespace.
    ccluster.kubectl_run("label", "--overwrite", "namespace", ns, "pod-security.kubernetes.io/enforce=baseline")
    apply(ccluster, ns, pod("users", [
        {"name": "named", "image": images["named-user"], "imagePullPolicy": "Never",
         "securityContext": {"runAsNonRoot": True}},
        {"name": "root", "image": images["root-user"], "imagePullPolicy": "Never",
         "securityContext": {"runAsNonRoot": True}},
    ]))  # fmt: skip

    def waiting() -> dict[str, str] | None:
        got = get_pod(ccluster, ns, "users") or {}
        seen = {
            s["name"]: (s["state"].get("waiting") or {}).get("message", "")
            for s in got.get("status", {}).get("containerStatuses") or []
            if (s["state"].get("waiting") or {}).get("reason") == "CreateContainerConfigError"
        }
        return seen if len(seen) == 2 else None

    seen = wait_for(waiting, timeout=60, message="CreateContainerConfigError for both containers")
    assert seen["named"].startswith("container has runAsNonRoot and image has non-numeric user (nobody)"), seen
    assert seen["root"].startswith("container has runAsNonRoot and image will run as root"), seen


def test_missing_entrypoint_is_a_start_error(ccluster: PrivateCluster, ns: str, images: dict[str, str]) -> None:
    apply(ccluster, ns, pod("noexec", [
        {"name": "c", "image": images["plain"], "imagePullPolicy": "Never", "command": ["/usr/bin/python3", "-V"],
         "securityContext": {**RESTRICTED_SC, "runAsUser": 1000}},
    ]))  # fmt: skip
    got = finished(ccluster, ns, "noexec")
    term = status_of(got, "c")["state"]["terminated"]
    assert got["status"]["phase"] == "Failed"
    assert term["reason"] == "StartError" and term["exitCode"] == 128, term
    assert "/usr/bin/python3" in term["message"] and "no such file" in term["message"].lower(), term


def test_deleted_pod_stops_its_containers(ccluster: PrivateCluster, ns: str, images: dict[str, str]) -> None:
    """SIGTERM first (a trap sees it), SIGKILL after the grace period (for one that ignores it);
    no container of the pod is left in podman's store."""
    sc = {**RESTRICTED_SC, "runAsUser": 1000}
    trap = 'trap "echo got SIGTERM; exit 0" TERM; echo started; while :; do sleep 1; done'
    created = apply(ccluster, ns, pod("stopper", [
        {"name": "polite", "image": images["plain"], "imagePullPolicy": "Never", "securityContext": sc,
         "command": ["/bin/sh", "-c", trap]},
        # PID 1 without a handler: SIGTERM does nothing, so only SIGKILL ends it.
        {"name": "stubborn", "image": images["plain"], "imagePullPolicy": "Never", "securityContext": sc,
         "command": ["/bin/sleep", "600"]},
    ], terminationGracePeriodSeconds=3))  # fmt: skip
    uid = created["metadata"]["uid"]

    def running() -> bool:
        got = get_pod(ccluster, ns, "stopper") or {}
        statuses = got.get("status", {}).get("containerStatuses") or []
        return len(statuses) == 2 and all("running" in s["state"] and s.get("containerID") for s in statuses)

    wait_for(running, timeout=60, message="both containers running")
    wait_for(lambda: "started" in ccluster.pod_log(namespace=ns, pod="stopper", container="polite"),
             timeout=30, message="the trap installed")  # fmt: skip
    assert len(our_containers(label=f"io.kubernetes.pod.uid={uid}")) == 2
    ccluster.kubectl_run("delete", "pod", "-n", ns, "stopper", "--wait=false")
    wait_for(lambda: get_pod(ccluster, ns, "stopper") is None, timeout=60, message="the pod object removed")
    wait_for(lambda: not our_containers(label=f"io.kubernetes.pod.uid={uid}"), timeout=30,
             message="the pod's containers removed")  # fmt: skip
    assert "got SIGTERM" in ccluster.pod_log(namespace=ns, pod="stopper", container="polite")
