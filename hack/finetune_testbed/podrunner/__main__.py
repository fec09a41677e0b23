"""`python -m finetune_testbed.podrunner`: the pod runner (hack/podrunner.py is the same)."""

from finetune_testbed.podrunner.cli import main

raise SystemExit(main())
