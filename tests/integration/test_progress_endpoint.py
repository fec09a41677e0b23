"""The progress endpoint of the real operator, against the local control plane.

The operator runs as a subprocess (`python -m finetune_operator`, only in the test's
namespace), as its ServiceAccount under deploy/base/rbac.yaml, like the other operator tests. Each
FineTuneJob's trainer image is on a `.invalid` registry, so its pod waits in ErrImagePull and
no trainer ever reports: every report here is one the test sends itself to the operator's real
endpoint, with the token the kubelet would project into that pod (a TokenRequest bound to the
pod, for the job's audience), so the operator's TokenReview and pod-ownership checks are real. A watch records every version of the
jobs' status, so "changes no status" is checked against all writes, not a last snapshot.

The forged-token flood runs its own operator as a ServiceAccount of its own (bound by copies of
deploy/base/rbac.yaml's bindings), so the API server's audit log (.cluster/audit.log) counts
exactly that operator's TokenReviews, whatever else shares the cluster.
"""

from __future__ import annotations

import base64
import copy
import json
import secrets
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from finetune_contract import protocol
from finetune_operator import metrics
from fixtures.cluster import ApplyYaml, Cluster, ServiceAccountKubeconfig, wait_for
from fixtures.jobs import progress_token, trainer_pod, waiting_ftj
from fixtures.operator import OPERATOR_NS, RBAC, OperatorProcess, install_crd_and_rbac
from kubernetes import client, watch

GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
PROGRESS_FIELDS = ("stage", "epoch", "epochs", "progress", "etaSeconds", "metrics", "lastProgressTime")


@pytest.fixture(scope="module")
def installed(cluster: Cluster) -> None:
    """The CRD and the operator's RBAC (deploy/base/rbac.yaml), as the other operator tests install them."""
    install_crd_and_rbac(cluster)


@pytest.fixture
def operator(
    namespace: str,
    tmp_path: Path,
    installed: None,
    service_account_kubeconfig: ServiceAccountKubeconfig,
) -> Iterator[OperatorProcess]:
    """`python -m finetune_operator` for the test's namespace, as its ServiceAccount under deploy/'s RBAC."""
    kubeconfig = service_account_kubeconfig(namespace=OPERATOR_NS, name="finetune-operator", create=False)
    with OperatorProcess(
        kubeconfig=kubeconfig,
        namespace=namespace,
        log=tmp_path / "operator.log",
        extra_args=("--pending-timeout=600",),
        ready_on="metrics",
        ready_text="finetune_progress_reports_total",
    ) as op:
        yield op


@dataclass
class StatusWatch:
    """Every status the API server stored for the namespace's FineTuneJobs, in order."""

    seen: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def statuses(self, name: str) -> list[dict[str, Any]]:
        return list(self.seen.get(name, []))

    def latest(self, name: str) -> dict[str, Any]:
        got = self.seen.get(name) or [{}]
        return got[-1]


@pytest.fixture
def status_watch(cluster: Cluster, namespace: str) -> Iterator[StatusWatch]:
    recorded = StatusWatch()
    api_client = cluster.api_client()
    objects = client.CustomObjectsApi(api_client)

    def run() -> None:
        while not recorded.stop.is_set():
            w = watch.Watch()
            try:
                for event in w.stream(
                    objects.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    namespace,
                    PLURAL,
                    timeout_seconds=2,
                ):
                    obj = event["object"]
                    name = obj["metadata"]["name"]
                    status = obj.get("status") or {}
                    history = recorded.seen.setdefault(name, [])
                    if not history or history[-1] != status:
                        history.append(status)
                    if recorded.stop.is_set():
                        break
            except Exception:
                time.sleep(0.2)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield recorded
    finally:
        recorded.stop.set()
        thread.join(timeout=10)
        api_client.close()


def body(namespace: str, name: str, **overrides: Any) -> dict[str, Any]:
    report = {
        "namespace": namespace,
        "name": name,
        "event": "epoch-end",
        "stage": "head",
        "epoch": 1,
        "stageEpochs": 2,
        "epochsDone": 1,
        "totalEpochs": 5,
        "metrics": {"loss": 0.9, "accuracy": 0.6, "val_loss": 1.0, "val_accuracy": 0.55},
        "bestValAccuracy": 0.55,
        "imagesPerSecond": 100.0,
        "epochSeconds": 4.0,
        "timestamp": time.time(),
    }
    report.update(overrides)
    return report


def post(
    url: str, payload: Any, *, token: str | None, raw: bytes | None = None
) -> tuple[int, dict[str, str]]:
    data = raw if raw is not None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers)


def columns(cluster: Cluster, *, namespace: str, name: str) -> dict[str, str]:
    out = cluster.kubectl_run("get", "ftj", name, "-n", namespace).stdout.splitlines()
    header, row = out[0].split(), out[1].split()
    return dict(zip(header, row, strict=False))


def test_reports_move_kubectl_get_and_the_metrics(
    cluster: Cluster, namespace: str, apply_yaml: ApplyYaml, operator: OperatorProcess, status_watch: StatusWatch
) -> None:
    apply_yaml(waiting_ftj("flowers"), namespace=namespace)
    token = progress_token(cluster, namespace=namespace, name="flowers")
    url = operator.progress_url

    # The pod exists once the Job does, made after the operator registered the job with its hub.
    first = body(namespace, "flowers", event="stage-start", epoch=0, epochsDone=0)
    wait_for(lambda: post(url, first, token=token)[0] == 202, timeout=30, message="first report accepted")
    wait_for(
        lambda: columns(cluster, namespace=namespace, name="flowers").get("STAGE") == "head",
        timeout=30,
        message="STAGE head in kubectl get ftj",
    )
    # Epoch ends inside the 5 s window are coalesced: the latest one shows when it closes.
    assert post(url, body(namespace, "flowers", epoch=1, epochsDone=1), token=token)[0] == 202
    assert (
        post(url, body(namespace, "flowers", epoch=2, epochsDone=2, bestValAccuracy=0.61), token=token)[0]
        == 202
    )

    def head_done() -> dict[str, str] | None:
        row = columns(cluster, namespace=namespace, name="flowers")
        return row if row.get("EPOCH") == "2/2" else None

    row = wait_for(head_done, timeout=30, message="EPOCH 2/2 in kubectl get ftj")
    assert row["PROGRESS"] == "40"
    assert row["VAL-ACC"] == "0.61"
    status = status_watch.latest("flowers")
    assert status["etaSeconds"] == 12  # 3 planned epochs left x 4 s
    assert status["message"] == "phase 1/2, epoch 2/2"
    assert status["metrics"]["val_accuracy"] == 0.55

    # A stage change is written at once, even inside the window.
    started = time.monotonic()
    change = body(
        namespace, "flowers", event="stage-start", stage="fine-tune", epoch=0, stageEpochs=3, epochsDone=2
    )
    assert post(url, change, token=token)[0] == 202
    wait_for(
        lambda: status_watch.latest("flowers").get("stage") == "fine-tune",
        timeout=30,
        message="stage fine-tune in status",
    )
    assert time.monotonic() - started < 4.0
    assert columns(cluster, namespace=namespace, name="flowers")["EPOCH"] == "0/3"

    labels = {"namespace": namespace, "name": "flowers"}
    assert operator.sample("finetune_job_progress_ratio", labels) == 0.4
    assert operator.sample("finetune_job_stage", {**labels, "stage": "fine-tune"}) == 1.0
    assert (operator.sample("finetune_progress_reports_total", {"result": "accepted"}) or 0) >= 4

    cluster.kubectl_run("delete", "ftj", "flowers", "-n", namespace, "--wait=true")

    def job_series() -> list[str]:
        return [
            line
            for line in operator.metrics().splitlines()
            if f'namespace="{namespace}"' in line and 'name="flowers"' in line
        ]

    wait_for(
        lambda: not job_series(),
        timeout=30,
        message="no per-job series left after the FineTuneJob is deleted",
    )
    late = body(namespace, "flowers", epoch=1, stage="fine-tune", epochsDone=3)
    assert post(url, late, token=token)[0] == 404

    # Made again under the same name: a new uid, a new audience; the old token is another job's.
    wait_for(
        lambda: not cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "finetune.dev/job=flowers")["items"],
        timeout=60,
        message="the old flowers pod garbage-collected",
    )
    apply_yaml(waiting_ftj("flowers"), namespace=namespace)
    fresh = progress_token(cluster, namespace=namespace, name="flowers")
    again = body(namespace, "flowers", event="stage-start", epoch=0, epochsDone=0)
    wait_for(
        lambda: post(url, again, token=fresh)[0] == 202, timeout=30, message="the new flowers registered"
    )
    assert post(url, body(namespace, "flowers", epoch=1), token=token)[0] == 403


def test_bad_reports_are_refused_and_change_no_status(
    cluster: Cluster, namespace: str, apply_yaml: ApplyYaml, operator: OperatorProcess, status_watch: StatusWatch
) -> None:
    apply_yaml([waiting_ftj("alpha"), waiting_ftj("beta"), waiting_ftj("decoy")], namespace=namespace)
    token_a = progress_token(cluster, namespace=namespace, name="alpha")
    token_b = progress_token(cluster, namespace=namespace, name="beta")
    assert token_a != token_b
    url = operator.progress_url
    for name, token in (("alpha", token_a), ("beta", token_b)):
        # Registered with the hub once an expired report gets 400 rather than 404.
        probe = body(namespace, name, timestamp=0.0)

        def registered(probe: dict[str, Any] = probe, token: str = token) -> bool:
            return post(url, probe, token=token)[0] == 400

        wait_for(registered, timeout=30, message=f"{name} registered")
    before = {
        r: operator.sample("finetune_progress_reports_total", {"result": r}) or 0 for r in metrics.REPORT_RESULTS
    }
    reviews_before = {
        r: operator.sample("finetune_progress_token_reviews_total", {"result": r}) or 0
        for r in metrics.TOKEN_REVIEW_RESULTS
    }

    forged = post(url, body(namespace, "alpha", epoch=1), token=secrets.token_urlsafe(32))
    missing = post(url, body(namespace, "alpha", epoch=1), token=None)
    cross = post(url, body(namespace, "beta", epoch=1), token=token_a)
    oversized = post(
        url, None, token=token_a, raw=json.dumps(body(namespace, "alpha")).encode() + b" " * 65536
    )
    malformed = post(url, None, token=token_a, raw=b'{"namespace": "x", ')
    schema = post(url, body(namespace, "alpha", epoch=-1, stage="phase-9"), token=token_a)
    expired = post(url, body(namespace, "alpha", timestamp=time.time() - 3600), token=token_a)
    cross_unknown = post(url, body(namespace, "gamma"), token=token_b)
    unknown = post(url, body(namespace, "gamma"), token=secrets.token_urlsafe(32))
    # alpha's audience, but bound to beta's pod: the TokenReview passes, the pod is not alpha's.
    beta_pod = trainer_pod(cluster, namespace=namespace, name="beta")["metadata"]["name"]
    wrong_pod = post(url, body(namespace, "alpha", epoch=1), token=progress_token(
        cluster, namespace=namespace, name="alpha", pod=beta_pod))  # fmt: skip
    # A token whose pod is gone no longer passes the TokenReview.
    decoy = trainer_pod(cluster, namespace=namespace, name="decoy")["metadata"]["name"]
    orphan = progress_token(cluster, namespace=namespace, name="alpha", pod=decoy)
    cluster.kubectl_run("delete", "ftj", "decoy", "-n", namespace, "--wait=true")
    wait_for(
        lambda: cluster.get(f"/api/v1/namespaces/{namespace}/pods/{decoy}") is None,
        timeout=60,
        message="the decoy pod deleted",
    )
    gone = post(url, body(namespace, "alpha", epoch=1), token=orphan)
    codes = [forged, missing, cross, oversized, malformed, schema, expired, cross_unknown, unknown, wrong_pod, gone]
    assert [c[0] for c in codes] == [401, 401, 403, 413, 400, 400, 400, 404, 404, 403, 401]

    # Flooding: the burst is accepted (epoch 1), then reports are refused with 429 (epoch 2).
    flood = []
    for _ in range(30):
        code, headers = post(url, body(namespace, "beta", epoch=1), token=token_b)
        flood.append(code)
        if code == 429:
            assert int(headers["Retry-After"]) >= 1
            break
    assert flood[-1] == 429, flood
    refused = [post(url, body(namespace, "beta", epoch=2, epochsDone=2), token=token_b)[0] for _ in range(3)]
    assert refused == [429, 429, 429]

    after = {
        r: operator.sample("finetune_progress_reports_total", {"result": r}) or 0 for r in metrics.REPORT_RESULTS
    }
    assert after["unauthorized"] - before["unauthorized"] == 3
    assert after["forbidden"] - before["forbidden"] == 2
    assert after["too_large"] - before["too_large"] == 1
    assert after["invalid"] - before["invalid"] == 3
    assert after["rate_limited"] - before["rate_limited"] == 4
    assert after["unknown_job"] - before["unknown_job"] == 2
    # Only the two tokens that passed the claims check cost a TokenReview (token_a's was cached).
    reviews = {
        r: (operator.sample("finetune_progress_token_reviews_total", {"result": r}) or 0) - reviews_before[r]
        for r in metrics.TOKEN_REVIEW_RESULTS
    }
    assert reviews == {"ok": 0, "unauthorized": 1, "forbidden": 1, "error": 0}

    # beta's accepted burst shows (epoch 1); the refused epoch-2 reports never do.
    wait_for(lambda: status_watch.latest("beta").get("epoch") == 1, timeout=30, message="beta at epoch 1")
    # Each refusal was answered after the hub had decided, and a report it takes in sets the job's
    # epoch gauge in the same step as the status write it schedules: the gauge still at 1 after the
    # answers means no write of epoch 2 is pending (no report is sent after these).
    beta_head = {"namespace": namespace, "name": "beta", "stage": "head"}
    assert operator.sample("finetune_job_epoch", beta_head) == 1
    assert all(s.get("epoch") != 2 for s in status_watch.statuses("beta"))
    # alpha was only sent refused reports: no status version of it ever had a progress field.
    assert all(not any(k in s for k in PROGRESS_FIELDS) for s in status_watch.statuses("alpha"))
    assert status_watch.statuses("alpha"), "the watch saw alpha"



def test_the_trainer_credential_is_scoped_to_its_job_and_worthless_to_kubernetes(
    cluster: Cluster, namespace: str, apply_yaml: ApplyYaml, operator: OperatorProcess
) -> None:
    apply_yaml(waiting_ftj("alpha"), namespace=namespace)
    token = progress_token(cluster, namespace=namespace, name="alpha")

    def job_of_alpha() -> dict[str, Any] | None:
        jobs = cluster.kubectl_json("get", "jobs", "-n", namespace)["items"]
        owned = [
            j for j in jobs if any(o["name"] == "alpha" for o in j["metadata"].get("ownerReferences", []))
        ]
        return owned[0] if owned else None

    pod = wait_for(job_of_alpha, timeout=60, message="alpha's Job")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    env = {e["name"]: e for c in pod["containers"] for e in c.get("env", [])}
    token_file = env[protocol.ENV_PROGRESS_TOKEN_FILE]["value"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[token_file.rsplit("/", 1)[0]])
    uid = cluster.kubectl_json("get", "ftj", "alpha", "-n", namespace)["metadata"]["uid"]
    assert volume["projected"]["sources"][0]["serviceAccountToken"]["audience"] == protocol.progress_audience(uid)
    assert env[protocol.ENV_PROGRESS_URL]["value"] == operator.progress_url
    # No Secret holds a credential of the job.
    assert not cluster.kubectl_json("get", "secrets", "-n", namespace)["items"]

    # The Kubernetes API does not accept the progress token.
    kubeconfig = yaml.safe_load(cluster.kubeconfig.read_text())["clusters"][0]["cluster"]
    tls = ssl.create_default_context(
        cadata=base64.b64decode(kubeconfig["certificate-authority-data"]).decode()
    )
    request = urllib.request.Request(
        f"{kubeconfig['server']}/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}",
        headers={"Authorization": f"Bearer {token}"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10, context=tls)
    assert refused.value.code == 401


# ----- a flood of forged tokens -----

FORGED = 2000


@pytest.fixture
def own_operator(
    cluster: Cluster,
    namespace: str,
    tmp_path: Path,
    installed: None,
    service_account_kubeconfig: ServiceAccountKubeconfig,
) -> Iterator[tuple[OperatorProcess, str]]:
    """The operator as a ServiceAccount of its own, bound like deploy/base/rbac.yaml binds its own."""
    account = f"fto-forged-{secrets.token_hex(3)}"
    kubeconfig = service_account_kubeconfig(namespace=OPERATOR_NS, name=account)
    operator_sa = {"kind": "ServiceAccount", "name": "finetune-operator", "namespace": OPERATOR_NS}
    bindings = []
    for doc in yaml.safe_load_all(RBAC.read_text()):
        if doc and doc["kind"] == "ClusterRoleBinding" and operator_sa in doc["subjects"]:
            binding = copy.deepcopy(doc)
            binding["metadata"] = {"name": f"{doc['metadata']['name']}-{account}"}
            binding["subjects"] = [{**operator_sa, "name": account}]
            bindings.append(binding)
    assert {b["roleRef"]["name"] for b in bindings} >= {"finetune-operator", "system:service-account-issuer-discovery"}
    cluster.kubectl_run("apply", "-f", "-", input=yaml.safe_dump_all(bindings))
    try:
        with OperatorProcess(
            kubeconfig=kubeconfig,
            namespace=namespace,
            log=tmp_path / "operator-forged.log",
            extra_args=("--pending-timeout=600",),
            ready_on="metrics",
            ready_text="finetune_progress_token_checks_total",
        ) as op:
            yield op, f"system:serviceaccount:{OPERATOR_NS}:{account}"
    finally:
        for binding in bindings:
            cluster.kubectl_run("delete", "clusterrolebinding", binding["metadata"]["name"], "--wait=false", check=False)
        cluster.kubectl_run("delete", "sa", account, "-n", OPERATOR_NS, "--wait=false", check=False)


def audited_token_reviews(log: Path, *, offset: int, username: str) -> int:
    """TokenReviews `username` created, in the audit log after `offset` bytes."""
    count = 0
    with log.open("rb") as f:
        f.seek(offset)
        for line in f:
            if b"tokenreviews" not in line:
                continue
            event = json.loads(line)
            if (
                event.get("stage") == "ResponseComplete"
                and (event.get("objectRef") or {}).get("resource") == "tokenreviews"
                and (event.get("user") or {}).get("username") == username
            ):
                count += 1
    return count


def forge(real: str, *, key: ec.EllipticCurvePrivateKey, i: int) -> str:
    """A well-formed token like `real` (same claims, the job's audience, the cluster's key id for
    half of them, made-up ones for the rest), signed by a key the test made."""
    header = jwt.get_unverified_header(real)
    claims = jwt.decode(real, options={"verify_signature": False})
    kid = header["kid"] if i % 2 else f"made-up-{i}"
    return jwt.encode({**claims, "jti": f"forged-{i}"}, key, algorithm="ES256", headers={"kid": kid})


def test_forged_tokens_cost_no_token_review(
    cluster: Cluster, namespace: str, apply_yaml: ApplyYaml, own_operator: tuple[OperatorProcess, str]
) -> None:
    operator, username = own_operator
    apply_yaml(waiting_ftj("target"), namespace=namespace)
    real = progress_token(cluster, namespace=namespace, name="target")
    url = operator.progress_url
    probe = body(namespace, "target", timestamp=0.0)  # expired: 400 once registered (and the token checked)
    wait_for(lambda: post(url, probe, token=real)[0] == 400, timeout=30, message="target registered")

    key = ec.generate_private_key(ec.SECP256R1())
    forged = [forge(real, key=key, i=i) for i in range(FORGED)]
    assert len(set(forged)) == FORGED
    audit = cluster.dir / "audit.log"
    offset = audit.stat().st_size

    def reviews() -> float:
        return sum(
            operator.sample("finetune_progress_token_reviews_total", {"result": r}) or 0.0
            for r in metrics.TOKEN_REVIEW_RESULTS
        )

    reviews_before = reviews()
    rejected_before = operator.sample("finetune_progress_token_checks_total", {"result": "rejected"}) or 0.0
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(lambda t: post(url, body(namespace, "target", epoch=2), token=t)[0], forged))
    flood_s = time.monotonic() - started
    assert codes == [401] * FORGED, {c: codes.count(c) for c in set(codes)}

    # A real pod-bound token still works (a fresh one: it costs exactly one review).
    fresh = progress_token(cluster, namespace=namespace, name="target")
    assert post(url, body(namespace, "target", epoch=1), token=fresh)[0] == 202
    wait_for(
        lambda: reviews() >= reviews_before + 1, timeout=10, message="the fresh token's TokenReview counted"
    )
    counted = reviews() - reviews_before - 1
    rejected = (operator.sample("finetune_progress_token_checks_total", {"result": "rejected"}) or 0.0) - rejected_before
    # The audit log is written asynchronously: wait until the fresh token's review shows in it.
    wait_for(
        lambda: audited_token_reviews(audit, offset=offset, username=username) >= 1,
        timeout=30,
        message="the fresh token's TokenReview in the audit log",
    )
    audited = audited_token_reviews(audit, offset=offset, username=username) - 1
    per_1000 = 1000 * audited / FORGED
    print(
        f"\nTokenReviews per 1,000 forged tokens: {per_1000:g} "
        f"(audit log: {audited} for {FORGED}; metric: {counted:g}; rejected locally: {rejected:g}; "
        f"{FORGED / flood_s:.0f} forged reports/s)"
    )
    assert audited == 0 and counted == 0
    assert rejected == FORGED

