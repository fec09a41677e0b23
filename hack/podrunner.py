"""`python hack/podrunner.py --kubeconfig=... --cluster-dir=...`: the local pod runner, which plays
the kubelet (and the scheduler) for one Node; hack/cluster.py starts it. See finetune_testbed.podrunner
(hack/finetune_testbed/podrunner/) for what it does and how it is split."""

from finetune_testbed.podrunner.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
