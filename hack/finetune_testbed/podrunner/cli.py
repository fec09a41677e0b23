"""`hack/podrunner.py` (or `python -m finetune_testbed.podrunner`): the command line of the pod runner."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path

from finetune_testbed.podrunner.api import Api
from finetune_testbed.podrunner.common import ROOT, log
from finetune_testbed.podrunner.logserver import LogServer
from finetune_testbed.podrunner.runner import PodRunner
from finetune_testbed.podrunner.scheduling import machine_capacity


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hack/podrunner.py", description="The local pod runner: plays the kubelet (and the scheduler) for one Node.")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--cluster-dir", type=Path, default=ROOT / ".cluster")
    parser.add_argument("--node-name", default="local-node")
    parser.add_argument("--simulate", type=float, default=None, metavar="SECONDS")
    parser.add_argument(
        "--pods", choices=["process", "container"], default="process",
        help="run containers as local processes (fast) or from their images with podman + runc",
    )
    parser.add_argument(
        "--pod-network", choices=["host", "netns"], default="host",
        help="share the machine's network (default) or give each pod a network namespace on a bridge (finetune_testbed.podrunner.podnet)",
    )
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--cpu", default="16", help="advertised CPU capacity (pods are not limited)")
    parser.add_argument("--memory", default="64Gi", help="advertised memory capacity")
    parser.add_argument("--max-pods", type=int, default=5000)
    parser.add_argument("--kubelet-port", type=int, default=10250, help="the `kubectl logs` endpoint (HTTPS)")
    parser.add_argument(
        "--no-bind", action="store_true", help="only run pods already bound to this node (a second runner)"
    )
    parser.add_argument("--tls-dir", type=Path, default=None, help="ca.crt, kubelet.crt/key for that endpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    if os.geteuid() != 0 and args.simulate is None:
        log.error("the pod runner needs root for mount namespaces (or use --simulate)")
        return 1
    runner = PodRunner(
        api=Api(kubeconfig=args.kubeconfig),
        cluster_dir=args.cluster_dir.resolve(),
        node_name=args.node_name,
        capacity=machine_capacity(gpus=args.gpus, cpu=args.cpu, memory=args.memory, pods=args.max_pods),
        simulate=args.simulate,
        kubelet_port=args.kubelet_port,
        bind=not args.no_bind,
        pods=args.pods,
        network=args.pod_network,
    )
    if args.tls_dir is not None:
        LogServer(
            logs_dir=runner.dir / "logs", tls_dir=args.tls_dir, port=args.kubelet_port, live=runner.live_logs
        ).start()

    def on_signal(signum: int, _frame: object) -> None:
        runner.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    runner.run()
    return 0
