"""The kubelet's duties: start containers (processes or podman), restarts with back-off, exits, termination messages, graceful deletion."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from finetune_testbed.podrunner import container as containers
from finetune_testbed.podrunner import podnet
from finetune_testbed.podrunner.common import EXEC_HELPER, Obj, expand_vars, log, now_rfc3339, pod_key
from finetune_testbed.podrunner.images import default_command, image_name_error, image_pull_error
from finetune_testbed.podrunner.state import ConfigError, ContainerRun, PodRun
from finetune_testbed.podrunner.status import PodStatus


class Kubelet(PodStatus):
    """The kubelet's duties: start containers (processes or podman), restarts with back-off, exits, termination messages, graceful deletion."""

    def start_container(self, run: PodRun, c: ContainerRun) -> None:
        image = c.spec.get("image", "")
        name_error = image_name_error(image)
        if name_error is not None:
            c.waiting = ("InvalidImageName", name_error)
            c.next_retry = time.monotonic() + 5.0
            return
        pull_error = image_pull_error(image)
        if pull_error is not None:
            reason = "ImagePullBackOff" if c.waiting and c.waiting[0] == "ErrImagePull" else "ErrImagePull"
            c.waiting = (reason, pull_error)
            c.next_retry = time.monotonic() + 5.0
            return
        if self.podman is not None:
            self.start_in_container(run, c)
            return
        try:
            self.prepare(run)
            env = self.container_env(run.pod, c.spec)
        except ConfigError as err:
            c.waiting = ("CreateContainerConfigError", str(err))
            c.next_retry = time.monotonic() + 2.0
            return
        command = [expand_vars(a, env) for a in (c.spec.get("command") or default_command(image))]
        args = [expand_vars(a, env) for a in c.spec.get("args") or []]
        if not command:
            c.waiting = ("CreateContainerError", f'no command for image "{image}": images are not pulled here')
            c.next_retry = time.monotonic() + 5.0
            return
        start_error = c.dir / "start-error"
        start_error.unlink(missing_ok=True)
        spec = {
            "argv": command + args,
            "env": env,
            "workingDir": c.spec.get("workingDir") or str(run.dir / "work"),
            "mounts": run.mounts[c.name],
            "startErrorPath": str(start_error),
        }
        spec_path = c.dir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        os.chmod(spec_path, 0o600)
        mode = "ab" if c.restart_count else "wb"
        with open(c.log_path, mode) as logf:
            prefix = [] if run.address is None or self.net is None else self.net.exec_prefix(
                uid=run.uid, hostname=podnet.pod_hostname(pod=run.pod)
            )
            c.proc = subprocess.Popen(
                [*prefix, sys.executable, "-I", str(EXEC_HELPER), str(spec_path)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                env={"PATH": env["PATH"]},
            )
        (self.dir / "pids" / "pods" / f"{run.uid}_{c.name}.pid").write_text(f"{c.proc.pid}\n")
        self.live_logs.add(c.log_path)
        c.container_id = f"local://{run.uid}/{c.name}/{c.proc.pid}"
        c.started_at = now_rfc3339()
        c.finished_at = c.exit_code = c.reason = c.message = None
        c.waiting = None
        log.info("started %s/%s pid %d", pod_key(run.pod), c.name, c.proc.pid)

    def start_in_container(self, run: PodRun, c: ContainerRun) -> None:
        """Container mode: `podman run` from the image, attached, its output into the log file."""
        assert self.podman is not None
        image = str(c.spec.get("image", ""))
        info = self.podman.image(image)
        if info is None:
            previous = c.waiting[0] if c.waiting else None
            c.waiting = containers.missing_image_waiting(
                image=image, policy=containers.pull_policy(c.spec), previous=previous
            )
            c.next_retry = time.monotonic() + 5.0
            return
        name = containers.container_name(
            namespace=run.namespace, pod=run.name, uid=run.uid, container=c.name, attempt=c.restart_count
        )
        cidfile, conmon_pidfile = c.dir / "cid", c.dir / "conmon.pid"
        try:
            self.prepare(run)
            env = self.container_env(run.pod, c.spec)
            argv, imported = containers.run_argv(
                podman=self.podman.binary, name=name, image=image, pod=run.pod, container=c.spec, info=info,
                env=env, mounts=run.mounts[c.name], cidfile=cidfile, conmon_pidfile=conmon_pidfile,
                seccomp_dir=self.podman.seccomp_dir, cluster_label=self.podman.cluster_label, expand=expand_vars,
                network=f"ns:/run/netns/{run.address.netns}" if run.address is not None else "host",
            )  # fmt: skip
        except (ConfigError, containers.ContainerConfigError) as err:
            c.waiting = ("CreateContainerConfigError", str(err))
            c.next_retry = time.monotonic() + 2.0
            return
        for stale in (cidfile, conmon_pidfile):
            stale.unlink(missing_ok=True)
        self.podman.remove(name, wait=True)  # a container of that name left by a killed pod runner
        mode = "ab" if c.restart_count else "wb"
        with open(c.log_path, mode) as logf:
            c.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                start_new_session=True, close_fds=True, env=self.podman.env(imported),
            )  # fmt: skip
        (self.dir / "pids" / "pods" / f"{run.uid}_{c.name}.pid").write_text(f"{c.proc.pid}\n")
        self.live_logs.add(c.log_path)
        c.podman_name, c.image_id, c.stop_signal = name, info.image_id, info.stop_signal
        c.container_id, c.host_pid, c.kill_escalated = None, None, False
        c.started_at = now_rfc3339()
        c.finished_at = c.exit_code = c.reason = c.message = None
        c.waiting = None
        log.info("started %s/%s in container %s", pod_key(run.pod), c.name, name)

    def container_started(self, run: PodRun, c: ContainerRun) -> bool:
        """Container mode: picks up the container's id and host pid once podman has them; True
        when that changed what the status shows. The pid file then holds the container's init
        (its process group leader), so `hack/cluster.py down` can kill it as it kills processes."""
        if c.proc is None or (c.container_id is not None and c.host_pid is not None):
            return False
        changed = False
        if c.container_id is None:
            with contextlib.suppress(OSError):
                cid = (c.dir / "cid").read_text().strip()
                if cid:
                    c.container_id = f"podman://{cid}"
                    changed = True
        if c.host_pid is None:
            pid = containers.container_pid(c.dir / "conmon.pid")
            if pid is not None:
                c.host_pid = pid
                (self.dir / "pids" / "pods" / f"{run.uid}_{c.name}.pid").write_text(f"{pid}\n")
        return changed

    def signal_container(self, c: ContainerRun, *, kill: bool) -> None:
        """SIGTERM (the image's STOPSIGNAL) or SIGKILL to a container or a process."""
        if c.proc is None or c.proc.poll() is not None:
            return
        if self.podman is not None and c.podman_name is not None:
            self.podman.signal(c.podman_name, "KILL" if kill else c.stop_signal)
            if kill and c.kill_escalated:  # podman could not reach it: end the client, remove it
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                self.podman.remove(c.podman_name)
            c.kill_escalated = kill
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(c.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)

    def forget_pid(self, run: PodRun, c: ContainerRun) -> None:
        self.live_logs.discard(c.log_path)
        (self.dir / "pids" / "pods" / f"{run.uid}_{c.name}.pid").unlink(missing_ok=True)

    def collect_exit(self, run: PodRun, c: ContainerRun) -> None:
        assert c.proc is not None
        code = c.proc.returncode
        if code < 0:
            code = 128 - code  # killed by signal N -> 128+N
        c.exit_code = code
        c.finished_at = now_rfc3339()
        self.forget_pid(run, c)
        start_error = c.dir / "start-error"
        if self.podman is not None and c.podman_name is not None:
            self.collect_container_exit(c, code)
        elif code == 128 and start_error.exists():
            c.reason, c.message = "StartError", start_error.read_text()
        else:
            c.reason = "Completed" if code == 0 else "Error"
            c.message = self.termination_message(c)
        c.proc = None

    def collect_container_exit(self, c: ContainerRun, code: int) -> None:
        """Container mode: the runtime's account of the exit (start errors, OOM), then removal."""
        assert self.podman is not None and c.podman_name is not None
        state = (self.podman.inspect(c.podman_name) or {}).get("State") or {}
        if c.container_id is None:
            with contextlib.suppress(OSError):
                cid = (c.dir / "cid").read_text().strip()
                c.container_id = f"podman://{cid}" if cid else None
        try:
            tail = c.log_path.read_bytes()[-4096:].decode(errors="replace")
        except OSError:
            tail = ""
        error = str(state.get("Error") or "") or (
            containers.runtime_error(tail) if code in containers.PODMAN_ERROR_CODES else None
        )
        never_ran = not state or str(state.get("StartedAt", "")).startswith("0001-")
        if error and (never_ran or code in containers.PODMAN_ERROR_CODES):
            c.exit_code, c.reason, c.message = 128, "StartError", error
        else:
            if state and isinstance(state.get("ExitCode"), int):
                c.exit_code = code = int(state["ExitCode"])
            c.reason = "OOMKilled" if state.get("OOMKilled") else ("Completed" if code == 0 else "Error")
            c.message = self.termination_message(c)
        self.podman.remove(c.podman_name)

    def termination_message(self, c: ContainerRun) -> str | None:
        try:
            data = (c.dir / "termination-log").read_bytes()[:4096]
        except OSError:
            data = b""
        if (
            not data.strip()
            and c.exit_code
            and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        ):
            try:
                tail = c.log_path.read_bytes()[-2048:]
            except OSError:
                tail = b""
            data = b"\n".join(tail.splitlines()[-80:])
        text = data.decode(errors="replace")
        return text or None

    def terminate(self, run: PodRun, *, grace: int) -> None:
        run.terminating = True
        run.kill_deadline = time.monotonic() + max(0, grace)
        for c in run.init + run.main:
            self.signal_container(c, kill=False)
        log.info("terminating %s (grace %ss)", pod_key(run.pod), grace)

    def restart_policy(self, run: PodRun) -> str:
        return str(run.pod["spec"].get("restartPolicy", "Always"))

    def advance(self, run: PodRun, now: float) -> bool:
        """Moves a pod along: init containers one by one, then the main ones; True if it changed."""
        policy = self.restart_policy(run)
        if run.stage == "init":
            for c in run.init:
                if c.exit_code == 0 and c.proc is None:
                    continue
                if c.proc is not None:
                    return False
                if c.exit_code is not None:  # failed
                    if policy == "Never":
                        self.finish(run, deleted=False)
                        return False
                    if not self.backoff(c, now):
                        return False
                if now < c.next_retry:
                    return False
                before = c.waiting
                self.start_container(run, c)
                return c.proc is not None or c.waiting != before
            run.stage = "main"
        if run.stage == "main":
            changed = False
            for c in run.main:
                if c.proc is not None:
                    continue
                if c.exit_code is not None:
                    wants_restart = policy == "Always" or (policy == "OnFailure" and c.exit_code != 0)
                    if not wants_restart or not self.backoff(c, now):
                        continue
                if now < c.next_retry:
                    continue
                before = c.waiting
                self.start_container(run, c)
                changed = changed or c.proc is not None or c.waiting != before
            if all(c.proc is None and c.exit_code is not None and c.restart_at is None for c in run.main):
                policy_done = policy == "Never" or (
                    policy == "OnFailure" and all(c.exit_code == 0 for c in run.main)
                )
                if policy_done:
                    self.finish(run, deleted=False)
                    return False
            return changed
        return False

    def backoff(self, c: ContainerRun, now: float) -> bool:
        """Restart bookkeeping (CrashLoopBackOff); True when the container may start now."""
        if c.restart_at is None:
            c.last_terminated = self.terminated_state(c)
            delay = min(30.0, 1.0 * 2**c.restart_count)
            c.restart_at = now + delay
            c.waiting = ("CrashLoopBackOff", f"back-off {delay:.0f}s restarting failed container={c.name}")
            return False
        if now < c.restart_at:
            return False
        c.restart_at = None
        c.restart_count += 1
        return True

    def finish(self, run: PodRun, *, deleted: bool) -> None:
        run.stage = "done"
        self.write_status(run)
        if deleted:
            self.delete_now(run.pod)
        self.runs.pop(run.uid, None)
        self.done.add(run.uid)
        log.info("finished %s: %s", pod_key(run.pod), self.phase(run))
        shutil.rmtree(run.dir / "volumes", ignore_errors=True)
        if self.net is not None:
            self.net.detach(uid=run.uid)

    def fail_orphan(self, pod: Obj) -> None:
        """A pod this node ran before the pod runner restarted: its processes are gone."""
        uid = pod["metadata"]["uid"]
        self.done.add(uid)
        finished = now_rfc3339()
        statuses = []
        for c in pod["spec"]["containers"]:
            statuses.append({
                "name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False,
                "restartCount": 0, "started": False,
                "state": {"terminated": {"exitCode": 137, "reason": "Error", "finishedAt": finished,
                                         "message": "the pod runner restarted; the container process is gone"}},
            })
        status = self.pod_status_base(phase="Failed", start_time=pod.get("status", {}).get("startTime") or finished,
                                      ready=False, initialized=True, completed=True)
        status["containerStatuses"] = statuses
        status["message"] = "the pod runner restarted while the pod ran"
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        self.writers.submit(uid, lambda: self._patch_status(ns, name, status))

    def delete_now(self, pod: Obj) -> None:
        ns, name, uid = pod["metadata"]["namespace"], pod["metadata"]["name"], pod["metadata"]["uid"]
        if uid in self.deleting:
            return
        self.deleting.add(uid)
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        self.writers.submit(
            uid,
            lambda: self.api.request(
                "DELETE", f"/api/v1/namespaces/{ns}/pods/{name}", body=body, ok=(404, 409)
            ),
        )

    def new_run(self, pod: Obj) -> PodRun:
        uid = pod["metadata"]["uid"]
        pdir = self.dir / "pods" / uid
        run = PodRun(uid=uid, pod=pod, dir=pdir, start_time=now_rfc3339())
        ns, name = run.namespace, run.name
        for group, specs in (("init", pod["spec"].get("initContainers") or []), ("main", pod["spec"]["containers"])):
            for c in specs:
                cdir = pdir / "containers" / c["name"]
                entry = ContainerRun(
                    name=c["name"], spec=c, dir=cdir, log_path=self.dir / "logs" / f"{ns}_{name}_{c['name']}.log"
                )
                (run.init if group == "init" else run.main).append(entry)
        run.stage = "init" if run.init else "main"
        self.write_status(run)
        return run
