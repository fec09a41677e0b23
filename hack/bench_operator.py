"""`make bench` section `operator`: N FineTuneJobs at once through the operator, pods simulated.

It starts a control plane of its own (`hack/cluster.py up --simulate-pods S` in a temporary
folder, on free ports, so a test cluster in `.cluster/` is left alone), installs the CRD and
deploy/base/rbac.yaml, runs `finetune-operator` as its ServiceAccount, creates N
FineTuneJobs as fast as 16 client threads can, and prints:

  - seconds until every batch Job exists, and Jobs created per second       [>= 40 /s]
  - seconds from each FineTuneJob's creation to its Job's and to its first status (p50, p95)
  - seconds until every FineTuneJob is Succeeded
  - API requests of the operator per job, by verb and resource, from the apiserver's audit
    log (user system:serviceaccount:finetune-system:finetune-operator); writes per job
    excluding Events and progress reports                                   [<= 5]
  - the operator's peak RSS (VmHWM)                                         [<= 150 MB at 1000 jobs]

Usage: `python hack/bench.py operator` or `python hack/bench_operator.py [--jobs N] [--simulate S]`.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from finetune_testbed import operator_proc
from finetune_testbed.net import free_port

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_PY = ROOT / "hack" / "cluster.py"
USER = "system:serviceaccount:finetune-system:finetune-operator"
NAMESPACE = "bench"


def _stamp(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _ftj(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "model": {"base": "MobileNetV2", "weights": "none", "inputShape": [32, 32, 3]},
            "data": {"train": "/data/train", "validationSplit": 0.2},
            "output": {"path": f"/models/{name}"},
            "runtime": {"gpus": 0},
        },
    }


class Bench:
    def __init__(self, *, jobs: int, simulate: float, keep: bool, profile: Path | None = None) -> None:
        self.profile = profile
        self.jobs = jobs
        self.simulate = simulate
        self.keep = keep
        self.dir = Path(tempfile.mkdtemp(prefix="fto-bench-"))
        self.env = {
            **os.environ,
            "FTO_APISERVER_PORT": str(free_port()),
            "FTO_ETCD_PORT": str(free_port()),
            "FTO_ETCD_PEER_PORT": str(free_port()),
            "FTO_KCM_PORT": str(free_port()),
            "FTO_KUBELET_PORT": str(free_port()),
        }
        self.kubeconfig = self.dir / "kubeconfig"
        self.kubectl_bin = self.dir / "bin" / "kubectl"
        self.operator: subprocess.Popen[bytes] | None = None

    def kubectl(self, *args: str, input: str | None = None) -> str:
        proc = subprocess.run(
            [str(self.kubectl_bin), f"--kubeconfig={self.kubeconfig}", *args],
            input=input, capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def up(self) -> None:
        subprocess.run(
            [sys.executable, str(CLUSTER_PY), "up", f"--dir={self.dir}", f"--simulate-pods={self.simulate}"],
            env=self.env, check=True, capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        self.kubectl("apply", "--server-side", "-f", str(ROOT / "crds" / "finetune.dev_finetunejobs.yaml"))
        for attempt in range(5):
            try:
                self.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.finetune.dev", "--timeout=60s")
                break
            except RuntimeError:
                # A CRD just created may have no status.conditions yet: kubectl wait then errs at once.
                if attempt == 4:
                    raise
                time.sleep(1.0)
        self.kubectl("create", "namespace", "finetune-system")
        self.kubectl("create", "namespace", NAMESPACE)
        self.kubectl("apply", "-f", str(ROOT / "deploy" / "base" / "rbac.yaml"))
        operator_proc.write_service_account_kubeconfig(
            kubectl=self.kubectl_bin, admin_kubeconfig=self.kubeconfig, path=self.dir / "operator.kubeconfig",
            namespace="finetune-system", name="finetune-operator", duration="2h",
        )  # fmt: skip

    def start_operator(self) -> None:
        profile = ["-m", "cProfile", "-o", str(self.profile)] if self.profile else []
        self.operator = operator_proc.start(
            args=["--namespace", NAMESPACE, "--progress-port", "0", "--metrics-port", "0", "--pending-timeout", "0"],
            kubeconfig=self.dir / "operator.kubeconfig", health_port=free_port(),
            log=self.dir / "operator.log", python_args=profile, env=self.env, timeout_s=60,
        )  # fmt: skip

    def create_all(self) -> float:
        from kubernetes import client, config

        api = config.new_client_from_config(config_file=str(self.kubeconfig))
        api.configuration.connection_pool_maxsize = 16
        custom = client.CustomObjectsApi(api)

        def create(i: int) -> None:
            custom.create_namespaced_custom_object(
                "finetune.dev", "v1alpha1", NAMESPACE, "finetunejobs", _ftj(f"bench-{i:05d}"), _preload_content=False
            )

        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(create, range(self.jobs)))
        return time.monotonic() - start

    def count(self, *args: str, field: str) -> int:
        data = json.loads(self.kubectl("get", *args, "-n", NAMESPACE, "-o", "json"))
        if field == "jobs":
            return len(data["items"])
        return sum(1 for i in data["items"] if (i.get("status") or {}).get("phase") == "Succeeded")

    def audit(self, *, since_offset: int) -> collections.Counter[tuple[str, str]]:
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.created_at: dict[str, float] = {}
        self.job_at: dict[str, float] = {}
        self.first_status_at: dict[str, float] = {}
        with (self.dir / "audit.log").open("rb") as f:
            f.seek(since_offset)
            for line in f:
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if event.get("stage") != "ResponseComplete":
                        continue
                    ref = event.get("objectRef") or {}
                    if event.get("verb") == "create" and event.get("responseStatus", {}).get("code") == 201:
                        at = _stamp(event["stageTimestamp"])
                        if ref.get("resource") == "finetunejobs":
                            self.created_at[str(ref.get("name"))] = at
                        elif ref.get("resource") == "jobs":
                            self.job_at[str(ref.get("name"))] = at
                    if event.get("user", {}).get("username") != USER:
                        continue
                    if (
                        event.get("verb") == "patch"
                        and ref.get("resource") == "finetunejobs"
                        and ref.get("subresource") == "status"
                        and event.get("responseStatus", {}).get("code") == 200
                    ):
                        self.first_status_at.setdefault(str(ref.get("name")), _stamp(event["stageTimestamp"]))
                    resource = ref.get("resource", "?") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
                    counts[(event.get("verb", "?"), resource)] += 1
        return counts

    def cpu_seconds(self, pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def apiserver_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.dir / "pids" / "kube-apiserver.pid").read_text().strip())
        return None

    def peak_rss_mb(self) -> float:
        assert self.operator is not None
        for line in Path(f"/proc/{self.operator.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def run(self) -> int:
        print(f"bench operator: {self.jobs} FineTuneJobs, pods simulated ({self.simulate:g} s each)", flush=True)
        self.up()
        self.start_operator()
        time.sleep(1.0)
        offset = (self.dir / "audit.log").stat().st_size
        assert self.operator is not None
        api_pid = self.apiserver_pid()
        cpu0 = self.cpu_seconds(self.operator.pid)
        api0 = self.cpu_seconds(api_pid) if api_pid else 0.0
        t0 = time.monotonic()
        create_s = self.create_all()
        t_jobs = t_done = None
        deadline = t0 + max(120.0, self.jobs * 1.0)
        while time.monotonic() < deadline:
            if t_jobs is None and self.count("jobs", field="jobs") >= self.jobs:
                t_jobs = time.monotonic() - t0
            if t_jobs is not None and self.count("ftj", field="phase") >= self.jobs:
                t_done = time.monotonic() - t0
                break
            time.sleep(0.25)
        cpu = self.cpu_seconds(self.operator.pid) - cpu0
        api_cpu = (self.cpu_seconds(api_pid) - api0) if api_pid else float("nan")
        time.sleep(2.0)  # let the last audit lines land
        rss = self.peak_rss_mb()
        print(f"  CPU seconds during the run: operator {cpu:.1f}, kube-apiserver {api_cpu:.1f} "
              f"(machine: {os.cpu_count()} cores, shared)")
        counts = self.audit(since_offset=offset)
        self.report(create_s=create_s, t_jobs=t_jobs, t_done=t_done, counts=counts, rss=rss)
        return 0 if t_done is not None else 1

    def report(
        self,
        *,
        create_s: float,
        t_jobs: float | None,
        t_done: float | None,
        counts: collections.Counter[tuple[str, str]],
        rss: float,
    ) -> None:
        n = self.jobs
        print(f"  FineTuneJobs created by the client in {create_s:.1f} s ({n / create_s:.0f}/s)")
        if t_jobs is None:
            print("  not every Job appeared in time")
            return
        if self.job_at and self.created_at:
            # From the audit log: first FineTuneJob created -> last Job created (no polling error).
            t_jobs = max(self.job_at.values()) - min(self.created_at.values())
        rate = n / t_jobs
        print(f"  {'figure':46} {'value':>10} {'target':>10} {'ratio':>7}")
        print(f"  {'seconds until every Job exists':46} {t_jobs:10.1f}")
        print(f"  {'Jobs created per second':46} {rate:10.1f} {'>= 40':>10} {rate / 40:7.2f}")
        lags = sorted(self.job_at[n] - self.created_at[n] for n in self.job_at if n in self.created_at)
        if lags:
            p50, p95 = lags[len(lags) // 2], lags[min(len(lags) - 1, int(len(lags) * 0.95))]
            print(f"  {'FineTuneJob created -> its Job created, p50 s':46} {p50:10.2f}")
            print(f"  {'FineTuneJob created -> its Job created, p95 s':46} {p95:10.2f}")
        firsts = sorted(self.first_status_at[n] - self.created_at[n] for n in self.first_status_at if n in self.created_at)
        if firsts:
            p50, p95 = firsts[len(firsts) // 2], firsts[min(len(firsts) - 1, int(len(firsts) * 0.95))]
            print(f"  {'FineTuneJob created -> its first status, p50 s':46} {p50:10.2f}")
            print(f"  {'FineTuneJob created -> its first status, p95 s':46} {p95:10.2f}")
        done = f"{t_done:10.1f}" if t_done is not None else "   timeout"
        print(f"  {'seconds until every FineTuneJob Succeeded':46} {done}")
        writes = sum(v for (verb, res), v in counts.items() if verb in ("create", "patch", "update", "delete")
                     and res != "events")  # fmt: skip
        events = sum(v for (verb, res), v in counts.items() if res == "events")
        print(f"  {'API writes per job (no Events, no progress)':46} {writes / n:10.2f} {'<= 5':>10} {5 / max(writes / n, 1e-9):7.2f}")
        print(f"  {'Events per job':46} {events / n:10.2f}")
        target = "<= 150" if n >= 1000 else "(150@1000)"
        print(f"  {'operator peak RSS, MB':46} {rss:10.1f} {target:>10} {150 / rss:7.2f}")
        print("  operator API requests per job, by verb and resource:")
        for (verb, res), v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"    {verb:8} {res:32} {v / n:8.3f}  ({v})")

    def close(self) -> None:
        if self.operator is not None and self.operator.poll() is None:
            self.operator.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.operator.wait(timeout=15)
            if self.operator.poll() is None:
                self.operator.kill()
        subprocess.run(
            [sys.executable, str(CLUSTER_PY), "down", f"--dir={self.dir}"], env=self.env, capture_output=True, check=False
        )
        if self.keep:
            print(f"  kept {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_operator", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("BENCH_OPERATOR_JOBS", "200")))
    parser.add_argument("--simulate", type=float, default=2.0, help="seconds each simulated pod runs")
    parser.add_argument("--keep", action="store_true", help="keep the temporary cluster folder (logs, audit)")
    parser.add_argument("--profile", type=Path, default=None, help="write a cProfile of the operator here")
    args, _ = parser.parse_known_args(argv)
    bench = Bench(jobs=args.jobs, simulate=args.simulate, keep=args.keep, profile=args.profile)
    try:
        return bench.run()
    finally:
        bench.close()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
