"""The operator's startup lets Python decode the deepest JSON the API server serves (10,000 levels).

Kopf decodes each listed and watched object with `json.loads`; at Python's default recursion
limit a deep object raised RecursionError there and ended the watch. Run in a subprocess so
the raised limit stays out of this test process. tests/integration/test_containment.py shows
the same against the real API server's own depth limit.
"""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import json, sys
from finetune_operator import __main__ as main
depth = main.API_SERVER_MAX_DEPTH
text = '{"spec":' * (depth - 1) + '{"a":1}' + '}' * (depth - 1)
try:
    json.loads(text)
except RecursionError:
    print("default-limit-fails")
limit = main.allow_api_server_nesting()
assert limit > depth, limit
obj = json.loads(text)
assert json.dumps(obj, separators=(',', ':')) == text  # Kopf re-encodes what it patches and logs
print("decoded", limit)
"""


def test_the_deepest_api_server_object_decodes_after_startup() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["default-limit-fails", "decoded", "15000"], proc.stdout
