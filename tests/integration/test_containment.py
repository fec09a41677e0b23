"""Containment: the deepest object the API server stores costs the operator only that object.

With a CRD of its own that keeps unknown fields (ours no longer can be nested), the test shows
that the real API server stores JSON up to 10,000 levels deep and refuses deeper; that Python's
`json.loads` fails on such a listing at its default recursion limit (what crash-looped Kopf's
watch) and decodes and re-encodes it once `finetune_operator.__main__.allow_api_server_nesting`
has run, as it does before Kopf starts; and that `operator_refusal` then answers with the
field (the job would end Failed/InvalidSpec) rather than raising. It does not run Kopf itself:
Kopf decodes every listed and watched object with this same `json.loads`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from fixtures.cluster import Cluster

SPEC = {
    "model": {"base": "MobileNetV2", "weights": "none", "inputShape": [32, 32, 3], "baseOptions": {"alpha": "DEEP"}},
    "data": {"train": "/data/train", "validationSplit": 0.2},
    "output": {"path": "/models/out"},
}

NESTING_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "nestings.containment.finetune.dev"},
    "spec": {
        "group": "containment.finetune.dev",
        "scope": "Namespaced",
        "names": {"kind": "Nesting", "plural": "nestings", "singular": "nesting", "listKind": "NestingList"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
            }
        ],
    },
}

DECODE = """
import json, sys
from finetune_operator import __main__ as main, api
text = sys.stdin.read()
try:
    json.loads(text)
    print("decoded-without-raising-the-limit")
except RecursionError:
    print("recursion-error-at-default-limit")
main.allow_api_server_nesting()
listing = json.loads(text)
item = listing["items"][0]
parsed, refusal = api.operator_refusal(name=item["metadata"]["name"], spec=item["spec"])
assert parsed is None, parsed
json.dumps(listing)  # Kopf's patches and logs serialise what it lists
print("refusal:", refusal)
"""


@pytest.fixture
def nesting_crd(cluster: Cluster) -> Iterator[Cluster]:
    cluster.kubectl_run("apply", "-f", "-", input=json.dumps(NESTING_CRD))
    cluster.kubectl_run("wait", "--for=condition=Established", "crd/nestings.containment.finetune.dev", "--timeout=60s")
    yield cluster
    cluster.kubectl_run("delete", "crd", "nestings.containment.finetune.dev", "--wait=false", check=False)


def test_deepest_object_the_api_server_stores_decodes_and_is_refused(nesting_crd: Cluster, namespace: str) -> None:
    """What it proves: the API server keeps objects close to 10,000 levels deep and refuses deeper
    ones; the operator's startup setting lets Python decode (and re-encode) such a listing, and
    operator_refusal answers with a reason instead of raising. It does not run Kopf itself."""
    path = f"/apis/containment.finetune.dev/v1/namespaces/{namespace}/nestings"

    def create(depth: int) -> subprocess.CompletedProcess[str]:
        obj = {"apiVersion": "containment.finetune.dev/v1", "kind": "Nesting", "metadata": {"name": f"d{depth}"}}
        # Written as text: json.dumps itself stops at 1,000 levels.
        text = json.dumps({**obj, "spec": SPEC}).replace('"DEEP"', '{"a":' * depth + "1" + "}" * depth)
        return nesting_crd.kubectl_run("create", "--raw", path, "-f", "-", input=text, check=False)

    # The object's root, spec, model and baseOptions come on top of the nested part: 10,000 in all.
    too_deep = create(10_000 - 3)
    assert too_deep.returncode != 0 and "exceeded max depth" in too_deep.stderr, too_deep.stderr[:500]
    created = create(10_000 - 4)
    assert created.returncode == 0, created.stderr[:500]
    listing = nesting_crd.kubectl_run("get", "--raw", path).stdout  # as Kopf lists it; text, not parsed here
    proc = subprocess.run(
        [sys.executable, "-c", DECODE], input=listing, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "recursion-error-at-default-limit" in proc.stdout, proc.stdout
    assert "refusal: spec.model.baseOptions.alpha" in proc.stdout, proc.stdout
