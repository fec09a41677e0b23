"""The operator survives its own world: SIGKILL at any moment, an API server restart, a watch
that expires (410 Gone), and a rotated, revoked token.

Everything runs on a control plane of this module's own (`fixtures.cluster.private_cluster`,
free ports, a temporary folder; stopped at the end), so the API server can be restarted and
the pods simulated (each Succeeds `SIMULATE` s after it starts, nothing runs) without
touching the shared `.cluster`. The operator runs as its ServiceAccount under
deploy/base/rbac.yaml. What each test proves, per FineTuneJob, is read from the cluster
itself: batch Jobs the operator created (201s in the API server's audit log, whatever the
operator did with them afterwards), `JobCreated` Events, `status.attempts` and the phase.

`FTO_CHAOS_SEED` (default 10) seeds the moments of the kills; a failure names the seed.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import datetime
import json
import os
import random
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import kopf
import psutil
import pytest
import yaml
from finetune_operator import kube
from fixtures.cluster import PrivateCluster, private_cluster, wait_for
from fixtures.jobs import OPERATOR_SA, ftj, restricted_namespace, write_kubeconfig
from fixtures.operator import OPERATOR_NS, OperatorProcess, install_crd_and_rbac

SIMULATE = 8.0  # seconds a simulated pod runs
SEED = int(os.environ.get("FTO_CHAOS_SEED", "10"))
USER = f"system:serviceaccount:{OPERATOR_NS}:{OPERATOR_SA}"
ADMIN = "kubernetes-admin"  # the CN of the private cluster's admin certificate
GROUP_PATH = "/apis/finetune.dev/v1alpha1"


# ----- the private cluster and helpers -----


@pytest.fixture(scope="module")
def pc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateCluster]:
    # A short path of its own (the pod runner's scratch lives under it).
    with (
        tempfile.TemporaryDirectory(prefix="fto-survival-") as tmp,
        private_cluster(cluster_dir=Path(tmp), simulate_pods=SIMULATE) as cluster,
    ):
        install_crd_and_rbac(cluster)
        yield cluster


def token_request(pc: PrivateCluster, *, bound_secret: str | None = None, expiration_s: int = 3600) -> str:
    """A TokenRequest token of the operator's ServiceAccount, bound to a Secret when given
    (deleting that Secret revokes the token: the API server checks the bound object)."""
    spec: dict[str, Any] = {"audiences": [], "expirationSeconds": expiration_s}
    if bound_secret is not None:
        secret = pc.get(f"/api/v1/namespaces/{OPERATOR_NS}/secrets/{bound_secret}")
        assert secret is not None
        spec["boundObjectRef"] = {
            "apiVersion": "v1", "kind": "Secret", "name": bound_secret, "uid": secret["metadata"]["uid"],
        }  # fmt: skip
    status, answer = pc.request(
        "POST",
        f"/api/v1/namespaces/{OPERATOR_NS}/serviceaccounts/{OPERATOR_SA}/token",
        body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
    )
    assert status == 201, answer
    return str(answer["status"]["token"])


def create(pc: PrivateCluster, namespace: str, names: Sequence[str]) -> None:
    manifest = {"apiVersion": "v1", "kind": "List", "items": [ftj(n, output=f"/models/{n}") for n in names]}
    pc.kubectl_run("create", "-n", namespace, "-f", "-", input=json.dumps(manifest))


def operator(
    pc: PrivateCluster, *, kubeconfig: Path, namespace: str, log: Path, verbose: bool = False
) -> OperatorProcess:
    return OperatorProcess(
        kubeconfig=kubeconfig,
        namespace=namespace,
        log=log,
        extra_args=("--pending-timeout", "0", *(["--verbose"] if verbose else [])),
        env={**pc.env, "KUBECONFIG": str(kubeconfig)},
        ready_timeout=90,
    )


def phases(pc: PrivateCluster, namespace: str) -> dict[str, dict[str, Any]]:
    items = pc.kubectl_json("get", "finetunejobs", "-n", namespace)["items"]
    return {i["metadata"]["name"]: dict(i.get("status") or {}) for i in items}


def wait_all(pc: PrivateCluster, namespace: str, names: Sequence[str], phase: str, *, timeout: float) -> None:
    def done() -> bool:
        got = phases(pc, namespace)
        return all(got.get(n, {}).get("phase") == phase for n in names)

    wait_for(
        done,
        timeout=timeout,
        interval=1.0,
        message=f"every FineTuneJob {phase} in {namespace} (seed {SEED}); now "
        + json.dumps(collections.Counter(s.get("phase") for s in phases(pc, namespace).values())),
    )


def audit_events(pc: PrivateCluster, *, namespace: str | None = None) -> Iterator[dict[str, Any]]:
    with pc.audit_log.open("rb") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("stage") != "ResponseComplete":
                    continue
                if namespace is not None and (event.get("objectRef") or {}).get("namespace") != namespace:
                    continue
                yield event


def jobs_created(pc: PrivateCluster, namespace: str) -> collections.Counter[str]:
    """batch Jobs the operator created (HTTP 201), by name: one per FineTuneJob or more."""
    counts: collections.Counter[str] = collections.Counter()
    for event in audit_events(pc, namespace=namespace):
        ref = event.get("objectRef") or {}
        if (
            event.get("verb") == "create"
            and ref.get("resource") == "jobs"
            and (event.get("responseStatus") or {}).get("code") == 201
            and (event.get("user") or {}).get("username") == USER
        ):
            counts[str(ref.get("name"))] += 1
    return counts


def events_by_reason(pc: PrivateCluster, namespace: str) -> dict[str, collections.Counter[str]]:
    """FineTuneJob name -> Counter of its Events' reasons."""
    out: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for e in pc.kubectl_json("get", "events", "-n", namespace)["items"]:
        if e["involvedObject"].get("kind") == "FineTuneJob":
            out[e["involvedObject"]["name"]][e["reason"]] += e.get("count") or 1
    return out


def assert_each_ran_once(pc: PrivateCluster, namespace: str, names: Sequence[str]) -> dict[str, Any]:
    """Every job Succeeded, with one batch Job, one JobCreated event and attempts == 1."""
    got = phases(pc, namespace)
    jobs = jobs_created(pc, namespace)
    events = events_by_reason(pc, namespace)
    figures = {
        "jobs": len(names),
        "succeeded": sum(1 for n in names if got[n].get("phase") == "Succeeded"),
        "batch_jobs_per_job": sorted(collections.Counter(jobs[n] for n in names).items()),
        "job_created_events_per_job": sorted(
            collections.Counter(events[n]["JobCreated"] for n in names).items()
        ),
        "attempts": sorted(collections.Counter(got[n].get("attempts") for n in names).items()),
    }
    print(f"figures ({namespace}, seed {SEED}): {json.dumps(figures)}")
    bad = {
        n: {"phase": got[n].get("phase"), "attempts": got[n].get("attempts"), "jobs": jobs[n],
            "events": dict(events[n])}
        for n in names
        if got[n].get("phase") != "Succeeded" or got[n].get("attempts") != 1 or jobs[n] != 1
        or events[n]["JobCreated"] != 1
    }  # fmt: skip
    if bad:
        for event in audit_events(pc, namespace=namespace):
            ref = event.get("objectRef") or {}
            if ref.get("resource") == "jobs" and ref.get("name") in bad:
                bad[ref["name"]].setdefault("audit", []).append(
                    f"{event.get('verb')} {(event.get('responseStatus') or {}).get('code')} "
                    f"{(event.get('user') or {}).get('username')} {event.get('stageTimestamp')}"
                )
    assert not bad, f"seed {SEED}: jobs that did not run exactly once: {json.dumps(bad, indent=1)}"
    return figures


def api_sockets(pid: int, port: int) -> int:
    """Established TCP connections of process `pid` (and its children) to the API server's port."""
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    return sum(
        1
        for p in procs
        for c in p.net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


def apiserver_port(pc: PrivateCluster) -> int:
    return int(pc.env["FTO_APISERVER_PORT"])


# ----- the client: connect swaps sessions, a 401 re-reads the credentials -----


def admin_info(pc: PrivateCluster) -> kopf.ConnectionInfo:
    config = yaml.safe_load(pc.kubeconfig.read_text())
    cluster, user = config["clusters"][0]["cluster"], config["users"][0]["user"]
    return kopf.ConnectionInfo(
        server=cluster["server"],
        ca_data=base64.b64decode(cluster["certificate-authority-data"]).decode(),
        certificate_data=base64.b64decode(user["client-certificate-data"]).decode(),
        private_key_data=base64.b64decode(user["client-key-data"]).decode(),
    )


def token_info(pc: PrivateCluster, token: str) -> kopf.ConnectionInfo:
    return kopf.ConnectionInfo(server=admin_info(pc).server, ca_data=admin_info(pc).ca_data, token=token)


async def whoami(client: kube.KubeClient) -> str:
    review = await client.create(
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
    )
    return str(review["status"]["userInfo"]["username"])


async def test_connect_closes_the_previous_session_once_its_requests_end(pc: PrivateCluster) -> None:
    port = apiserver_port(pc)
    admin, operator_sa = admin_info(pc), token_info(pc, token_request(pc))
    client = kube.KubeClient()
    try:
        await client.connect(info=admin)
        assert await whoami(client) == ADMIN
        # A watch in flight (the server ends it after 2 s) while Kopf re-logs in.
        watch = asyncio.ensure_future(
            client.request("GET", "/api/v1/namespaces", params={"watch": "1", "timeoutSeconds": "2"})
        )
        wait_until = time.monotonic() + 10
        while not client.in_flight and time.monotonic() < wait_until:
            await asyncio.sleep(0.01)
        assert client.in_flight == 1, "the watch never started"
        await client.connect(info=operator_sa)
        assert client.open_sessions == 1  # the old one drains: its watch is not cut
        assert await whoami(client) == USER
        assert client.open_sessions == 2
        await watch  # answers normally
        assert client.open_sessions == 1
        # Kopf re-logs in often (every 401 of any of its requests): sockets do not pile up.
        for i in range(20):
            await client.connect(info=admin if i % 2 == 0 else operator_sa)
            assert await whoami(client) == (ADMIN if i % 2 == 0 else USER)
            assert client.open_sessions == 1
        assert client.sessions_opened == 22
        assert api_sockets(os.getpid(), port) <= 1
        # The same credentials again (Kopf re-logging in after our own re-login): no new session.
        await client.connect(info=dataclasses.replace(operator_sa, priority=operator_sa.priority + 1))
        assert await whoami(client) == USER
        assert client.sessions_opened == 22
    finally:
        await client.close()
    assert client.open_sessions == 0
    wait_for(lambda: api_sockets(os.getpid(), port) == 0 or None, timeout=5, message="sockets closed")


async def test_a_401_re_reads_the_credentials_and_retries_once(pc: PrivateCluster) -> None:
    pc.kubectl_run("create", "secret", "generic", "t401", "-n", OPERATOR_NS)
    revoked = token_request(pc, bound_secret="t401")
    pc.kubectl_run("delete", "secret", "t401", "-n", OPERATOR_NS)
    good = token_info(pc, token_request(pc))
    calls: list[str] = []
    current = token_info(pc, revoked)

    async def relogin() -> kopf.ConnectionInfo:
        calls.append("relogin")
        return current

    now = [1000.0]  # the client's clock: the test moves it, nothing waits for the interval
    client = kube.KubeClient(relogin_interval_s=30.0, clock=lambda: now[0])
    try:
        await client.connect(info=token_info(pc, revoked), relogin=relogin)
        # The token file is not rotated yet: the same credentials come back, the 401 stands.
        with pytest.raises(kube.ApiError) as err:
            await whoami(client)
        assert err.value.status == 401 and calls == ["relogin"]
        # ... and is not re-read again and again while it cannot have changed (just short of
        # the interval, the file is not read: a client that ignored the interval would read it).
        now[0] += 29.9
        with pytest.raises(kube.ApiError):
            await whoami(client)
        assert calls == ["relogin"]
        # Rotated: concurrent 401s share one re-login, every request then succeeds.
        current = good
        now[0] += 0.2  # the re-read interval passes
        answers = await asyncio.gather(*(whoami(client) for _ in range(8)))
        assert answers == [USER] * 8
        assert calls == ["relogin", "relogin"] and client.relogins == 1
        assert client.open_sessions == 1
    finally:
        await client.close()


# ----- the operator process under chaos -----


@pytest.fixture
def op_kubeconfig(pc: PrivateCluster, tmp_path: Path) -> Path:
    return write_kubeconfig(pc, path=tmp_path / "operator.kubeconfig", token=token_request(pc))


def test_sigkill_at_random_moments_runs_every_job_exactly_once(
    pc: PrivateCluster, op_kubeconfig: Path, tmp_path: Path
) -> None:
    """20 jobs, created in 5 batches; after each batch the operator is SIGKILLed at a random
    moment (seeded: during start-up, listing, creating Jobs, writing status, or idle)."""
    rng = random.Random(SEED)
    namespace = restricted_namespace(pc, prefix="sigkill")
    names = [f"chaos-{i:02d}" for i in range(20)]
    op = operator(pc, kubeconfig=op_kubeconfig, namespace=namespace, log=tmp_path / "operator.log")
    kills: list[float] = []
    try:
        for batch in range(5):
            op.start(wait=False)
            started = time.monotonic()
            create(pc, namespace, names[batch * 4 : batch * 4 + 4])
            moment = rng.uniform(0.5, 9.0)  # seconds after the (re)start: the random moment of the kill
            time.sleep(max(0.0, started + moment - time.monotonic()))
            assert op.alive(), f"the operator exited by itself:\n{op.log.read_text()[-3000:]}"
            op.kill()
            kills.append(round(moment, 2))
        op.start()
        wait_all(pc, namespace, names, "Succeeded", timeout=240)
        figures = assert_each_ran_once(pc, namespace, names)
        print(f"kills: {len(kills)} at {kills} s after each (re)start; {figures}")
        assert len(kills) == 5
    finally:
        op.stop()


def test_apiserver_restart_under_running_jobs(
    pc: PrivateCluster, op_kubeconfig: Path, tmp_path: Path
) -> None:
    """kube-apiserver stopped and started again (etcd keeps the data) while 10 jobs run."""
    namespace = restricted_namespace(pc, prefix="apiserver")
    names = [f"restart-{i:02d}" for i in range(10)]
    op = operator(pc, kubeconfig=op_kubeconfig, namespace=namespace, log=tmp_path / "operator.log")
    with op:
        create(pc, namespace, names)
        wait_all(pc, namespace, names, "Running", timeout=60)
        pid = op.proc.pid if op.proc else None
        pc.restart_apiserver()
        wait_all(pc, namespace, names, "Succeeded", timeout=180)
        assert op.alive() and op.proc is not None and op.proc.pid == pid, "the operator itself was restarted"
        assert_each_ran_once(pc, namespace, names)


def raw_watch(pc: PrivateCluster, path: str, *, resource_version: str) -> list[dict[str, Any]]:
    """The events a watch from `resource_version` gets (for at most 2 s)."""
    with pc.api_client() as api:
        resp = api.rest_client.request(
            "GET",
            f"{api.configuration.host}{path}?watch=1&resourceVersion={resource_version}&timeoutSeconds=2",
            headers={"Accept": "application/json"},
        )
        return [json.loads(line) for line in resp.read().decode().splitlines() if line.strip()]


def operator_lists(pc: PrivateCluster, namespace: str, resource: str) -> list[float]:
    """When the operator LISTed `resource` in `namespace` (Kopf lists at start and after a 410)."""
    return [
        datetime.datetime.fromisoformat(e["stageTimestamp"].replace("Z", "+00:00")).timestamp()
        for e in audit_events(pc, namespace=namespace)
        if e.get("verb") == "list"
        and (e.get("objectRef") or {}).get("resource") == resource
        and (e.get("user") or {}).get("username") == USER
    ]


def test_an_expired_watch_410_gone_is_relisted_and_jobs_still_reconcile(
    pc: PrivateCluster, op_kubeconfig: Path, tmp_path: Path
) -> None:
    """A restarted API server rebuilds its watch cache at etcd's current revision, so a watch
    resumed from an older resourceVersion is answered `410 Gone` (Expired, "too old resource
    version"): what an operator meets after any control-plane restart or long disconnect."""
    namespace = restricted_namespace(pc, prefix="gone")
    log = tmp_path / "operator.log"
    op = operator(pc, kubeconfig=op_kubeconfig, namespace=namespace, log=log, verbose=True)
    with op:
        create(pc, namespace, ["before"])
        wait_all(pc, namespace, ["before"], "Succeeded", timeout=90)
        listed = pc.get(f"{GROUP_PATH}/namespaces/{namespace}/finetunejobs")
        assert listed is not None
        old_rv = listed["metadata"]["resourceVersion"]
        pc.kubectl_run("create", "configmap", "bump", "-n", namespace)  # etcd's revision moves on
        restarted_at = time.time()
        pc.restart_apiserver()
        # The server really answers 410 to a watch resumed from before the restart ...
        events = raw_watch(pc, f"{GROUP_PATH}/namespaces/{namespace}/finetunejobs", resource_version=old_rv)
        assert events and events[0]["type"] == "ERROR", events
        assert events[0]["object"]["code"] == 410 and events[0]["object"]["reason"] == "Expired", events
        # ... and so it did to the operator's watches: Kopf's 410 branch restarts the stream
        # (its debug line), with a fresh LIST (the audit log).
        gone = f"Restarting the watch-stream for finetunejobs.v1alpha1.finetune.dev in '{namespace}'"
        wait_for(lambda: gone in log.read_text(), timeout=60, message=f"{gone!r} in {log}")
        wait_for(
            lambda: any(t > restarted_at for t in operator_lists(pc, namespace, "finetunejobs")),
            timeout=30,
            message="the operator's LIST of finetunejobs after the 410",
        )
        names = ["after-1", "after-2", "after-3"]
        create(pc, namespace, names)
        wait_all(pc, namespace, [*names, "before"], "Succeeded", timeout=120)
        assert_each_ran_once(pc, namespace, [*names, "before"])
        assert op.alive()


def test_a_rotated_and_revoked_token_keeps_the_operator_working_without_leaking_connections(
    pc: PrivateCluster, tmp_path: Path
) -> None:
    """The operator reads its token from a file (kubeconfig `tokenFile`, as from a projected
    volume). Three times: a new TokenRequest token replaces the file and the old one is revoked
    (the Secret it is bound to is deleted); jobs created after each rotation still run. Then
    the API server restarts, so Kopf's own watches reconnect with Kopf's stale token, meet 401
    and re-log in. The operator's connections to the API server do not pile up."""
    namespace = restricted_namespace(pc, prefix="rotate")
    port = apiserver_port(pc)
    token_file = tmp_path / "token"

    def rotate(generation: int) -> str:
        secret = f"op-token-{namespace}-{generation}"
        pc.kubectl_run("create", "secret", "generic", secret, "-n", OPERATOR_NS)
        token = token_request(pc, bound_secret=secret)
        tmp = token_file.with_suffix(".new")
        tmp.write_text(token)
        tmp.replace(token_file)  # atomically, as the kubelet swaps a projected volume
        return secret

    def accepted(token: str) -> bool:
        code, _ = raw_status(pc, token)
        return code == 201

    secret = rotate(0)
    kubeconfig = write_kubeconfig(pc, path=tmp_path / "operator.kubeconfig", token_file=token_file)
    log = tmp_path / "operator.log"
    op = operator(pc, kubeconfig=kubeconfig, namespace=namespace, log=log)
    sockets: list[int] = []
    with op:
        assert op.proc is not None
        create(pc, namespace, ["r0-a", "r0-b"])
        wait_all(pc, namespace, ["r0-a", "r0-b"], "Succeeded", timeout=90)
        sockets.append(api_sockets(op.proc.pid, port))
        names = ["r0-a", "r0-b"]
        for generation in (1, 2, 3):
            old_token = token_file.read_text()
            old_secret, secret = secret, rotate(generation)
            pc.kubectl_run("delete", "secret", old_secret, "-n", OPERATOR_NS)
            wait_for(lambda: not accepted(old_token), timeout=10, message="the old token revoked")  # noqa: B023
            batch = [f"r{generation}-a", f"r{generation}-b"]
            create(pc, namespace, batch)
            names += batch
            # Only until its Jobs exist: the next rotation and the restart then land while they
            # train, and a status write lost to them must not lose an attempt.
            wait_for(
                lambda: all(jobs_created(pc, namespace)[n] for n in batch),  # noqa: B023
                timeout=90, message=f"the Jobs of {batch}",
            )  # fmt: skip
            sockets.append(api_sockets(op.proc.pid, port))
        assert "re-logged in after a 401" in log.read_text()
        # Kopf's watches still hold the first token: a restart makes them reconnect with it.
        pc.restart_apiserver()
        batch = ["r4-a", "r4-b"]
        create(pc, namespace, batch)
        names += batch
        wait_all(pc, namespace, names, "Succeeded", timeout=120)
        sockets.append(api_sockets(op.proc.pid, port))
        print(f"token rotation: sockets to the API server after each round {sockets}")
        assert_each_ran_once(pc, namespace, names)
        # Kopf's 3 watches + a few pooled connections of our client; never one set per login.
        assert max(sockets) <= sockets[0] + 4 and sockets[-1] <= sockets[0] + 4, sockets


def raw_status(pc: PrivateCluster, token: str) -> tuple[int, dict[str, Any]]:
    """A SelfSubjectReview with `token` (201 when the API server accepts it, 401 when not)."""
    admin = yaml.safe_load(pc.kubeconfig.read_text())["clusters"][0]["cluster"]
    ctx = ssl.create_default_context(cadata=base64.b64decode(admin["certificate-authority-data"]).decode())
    body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode()
    req = urllib.request.Request(
        admin["server"] + "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        data=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, {}
