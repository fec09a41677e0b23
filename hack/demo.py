"""`python hack/demo.py [make-data DIR | start-operator]`: `make demo` (see finetune_testbed.demo,
beside this file in hack/finetune_testbed/demo.py, for what it does in order)."""

import sys

from finetune_testbed.demo import cli

if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
