"""`python hack/cluster.py up|down|status`: the local control plane (see finetune_testbed.cluster,
beside this file in hack/finetune_testbed/cluster.py, for what it starts and where)."""

from finetune_testbed.cluster import main

if __name__ == "__main__":
    raise SystemExit(main())
