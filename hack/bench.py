"""`make bench`: runs every benchmark section and prints its figures.

Sections live beside this file as bench_<name>.py, each with a `main(argv)`; pass section
names to run only some (`make bench BENCH_ARGS="trainer"`). Every other argument goes to the
sections, values included: `make bench BENCH_ARGS="trainer --model mobilenet32 --checkpoints both"`
(the trainer's figures at its default size and at `--scale` times the images; `--checkpoints
both` measures the background checkpoint against Keras' BackupAndRestore in the same run).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

SECTIONS = ("trainer", "operator", "progress", "distribute")


def main(argv: list[str]) -> int:
    here = Path(__file__).resolve().parent  # on sys.path: the folder of the script Python runs
    chosen = [a for a in argv if a in SECTIONS] or list(SECTIONS)
    rest = [a for a in argv if a not in SECTIONS]
    rc = 0
    for name in chosen:
        if not (here / f"bench_{name}.py").exists():
            print(f"== bench {name}: not present", flush=True)
            continue
        print(f"== bench {name}", flush=True)
        module = importlib.import_module(f"bench_{name}")
        rc = max(rc, int(module.main(rest) or 0))
    return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
