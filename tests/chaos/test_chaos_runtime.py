"""Chaos tier, runtime: hostile trainer output and hostile progress reports against the real operator.

One operator (`python -m finetune_operator`, as a ServiceAccount of its own bound to deploy/'s
ClusterRole, so the audit log tells its API calls apart) watches one restricted namespace.

Hostile trainer output: 256 FineTuneJobs, one per exit code 0-255 (and one exiting 0 per hostile
message), whose trainer
(`chaos_trainer.py`) copies one of a set of hostile termination messages (mounted from a
ConfigMap's binaryData: reasons the CRD refuses, 20 kB and 4 kB-cut messages, invalid UTF-8,
control characters, wrong JSON types, NaN metrics, JSON nested past any decoder, plain text,
nothing, or garbage on stderr for FallbackToLogsOnError) and exits with that code. Every job
must be terminal within 60 s of its creation, Succeeded exactly when the code is 0, with a
reason the CRD admits.

Hostile progress reports: two jobs whose pods wait on an unpullable image (so the operator
keeps them registered and nothing else reports) get out-of-range and non-finite numbers,
stale and future timestamps, other jobs' tokens, 10 MB bodies (with a length and chunked),
malformed and deeply nested JSON: each must get a 4xx, and no status write may carry any of
it. Then a bounded flood (forged tokens that carry the job's audience, valid tokens past the
rate limit, bad bodies) runs while `/healthz` (the progress server's and Kopf's) is probed;
the test prints the TokenReviews per 1,000 forged tokens (from the API server's audit log and
from the operator's own counter) and the health latency p50/p99 during the flood.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import math
import re
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from finetune_contract import protocol
from fixtures.cluster import Cluster, wait_for
from fixtures.jobs import (
    delete_namespace,
    ftj,
    progress_token,
    restricted_namespace,
    trainer_pod,
    waiting_ftj,
)
from fixtures.operator import OPERATOR_NS, OperatorProcess, install_crd_and_rbac

from chaos.chaos_support import (
    FTJ_PATH,
    StatusRecorder,
    operator_kubeconfig,
    operator_problems,
    raw_request,
    remove_operator_identity,
)

pytestmark = pytest.mark.timeout(600)

TRAINER = Path(__file__).resolve().with_name("chaos_trainer.py")
DEADLINE_S = 60.0
MAX_IN_FLIGHT = 32
REASON = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")  # the CRD's pattern of status reasons
MESSAGES_CM = "chaos-messages"
FORGED = 1000
PROGRESS_FIELDS = ("stage", "epoch", "epochs", "progress", "etaSeconds", "metrics", "lastProgressTime")


def _summary(**overrides: Any) -> bytes:
    body = {"exitCode": 1, "reason": "Error", "message": "chaos", "metrics": {}, "modelPath": None, **overrides}
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


# kind -> (bytes the trainer writes, where: "term" the termination-message path, "log" stderr only)
MESSAGES: dict[str, tuple[bytes, str]] = {
    "bad-reason": (_summary(reason="Not A Valid Reason!! "), "term"),
    "long-reason": (_summary(reason="R" * 2000), "term"),
    "newline-reason": (_summary(reason="Data\nError", message="two\nlines"), "term"),
    "lying-reason": (_summary(reason="Succeeded", message="claims success whatever the code"), "term"),
    "oversized": (_summary(message="M" * 20_000), "term"),
    "multibyte-cut": (_summary(message="\u00e9\u4e2d" * 1500), "term"),
    "invalid-utf8": (b"\xff\xfe\xfd" + b"\x80" * 200 + b"\xc3(\xed\xa0\x80", "term"),
    "invalid-utf8-json": (b'{"exitCode": 1, "reason": "Err\xffor", "message": "\xc3\x28\xa0\xa1", "metrics": {}}', "term"),
    "control-chars": (_summary(reason="Error\u0000", message="\u0000\u001b[2J\u001b[31mred\u0007\r\n\u2028\u202e"), "term"),
    "wrong-types": (json.dumps({"exitCode": "zero", "reason": 5, "message": None, "metrics": "x", "modelPath": 7}).encode(), "term"),
    "nan-metrics": (json.dumps({"exitCode": 0, "reason": "Succeeded", "message": "ok",
                                "metrics": {"loss": math.nan, "accuracy": math.inf}, "modelPath": "/m"}).encode(), "term"),
    "huge-model-path": (_summary(reason="Succeeded", modelPath="/models/" + "p" * 3000 + "\n\u0000"), "term"),
    "deep-json": (b"[" * 4096, "term"),
    "deep-object": (b'{"a":' * 1000 + b"1" + b"}" * 1000, "term"),
    "not-json": (b"Segmentation fault (core dumped)\n" * 200, "term"),
    "json-array": (b"[1, 2, 3]", "term"),
    "empty": (b"", "term"),
    "bidi": (_summary(reason="Succeeded\u202e", message="\u202eevil \U0001f4a5 \u200b"), "term"),
    "log-garbage": (b"\x1b[2J\xff\xfe" + b"Traceback (most recent call last):\n" * 50 + b"\xc3(" * 2000, "log"),
}  # fmt: skip
KINDS = sorted(MESSAGES)


def exit_job(name: str, *, code: int, kind: str) -> dict[str, Any]:
    _, where = MESSAGES[kind]
    return ftj(
        name,
        output="/tmp/chaos-out",
        env={"CHAOS_EXIT": str(code), "CHAOS_MESSAGE": f"/chaos/{kind}", "CHAOS_TO": where},
        backoffLimit=0,
        volumes=[{"name": "chaos", "configMap": {"name": MESSAGES_CM}}],
        volumeMounts=[{"name": "chaos", "mountPath": "/chaos", "readOnly": True}],
    )


@dataclass
class Runtime:
    cluster: Cluster
    namespace: str
    identity: str
    operator: OperatorProcess
    api: Any
    created: dict[str, float] = field(default_factory=dict)

    def create(self, manifest: dict[str, Any]) -> None:
        code, message, _ = raw_request(
            self.api, "POST", FTJ_PATH.format(namespace=self.namespace) + "?fieldValidation=Strict",
            body=json.dumps(manifest).encode(),
        )  # fmt: skip
        assert code == 201, f"{manifest['metadata']['name']}: HTTP {code}: {message}"
        self.created[manifest["metadata"]["name"]] = time.monotonic()


@pytest.fixture(scope="module")
def rt(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    install_crd_and_rbac(cluster)
    tmp = tmp_path_factory.mktemp("chaos-runtime")
    namespace = restricted_namespace(cluster, prefix="chaos-rt")
    identity = f"chaos-runtime-{namespace[-6:]}"
    binary = {k: base64.b64encode(data).decode() for k, (data, _) in MESSAGES.items()}
    cluster.kubectl_run("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": MESSAGES_CM}, "binaryData": binary}))  # fmt: skip
    operator = OperatorProcess(
        kubeconfig=operator_kubeconfig(cluster, name=identity, path=tmp / "kubeconfig"),
        namespace=namespace,
        log=tmp / "operator.log",
        extra_args=("--trainer-command", f"python {TRAINER}", "--pending-timeout", "600"),
        ready_on="metrics",
        ready_text="finetune_progress_reports_total",
        ready_timeout=60,
    )
    operator.start()
    api = cluster.api_client()
    try:
        yield Runtime(cluster=cluster, namespace=namespace, identity=identity, operator=operator, api=api)
    finally:
        operator.stop()
        api.close()
        delete_namespace(cluster, namespace)
        remove_operator_identity(cluster, name=identity)


# ----- hostile trainer output -----


def test_every_exit_code_and_hostile_termination_message_ends_terminal_with_a_valid_reason(
    rt: Runtime, capsys: pytest.CaptureFixture[str]
) -> None:
    recorder = StatusRecorder(api=rt.cluster.api_client(), namespace=rt.namespace)
    plan = {f"exit-{code:03d}": (code, KINDS[code % len(KINDS)]) for code in range(256)}
    plan.update({f"ok-{kind}": (0, kind) for kind in KINDS})  # the success path reads the summary too
    started = time.monotonic()
    try:
        with recorder.running():
            for name, (code, kind) in plan.items():
                while sum(1 for n in rt.created if n in plan and n not in recorder.terminal_at
                          and time.monotonic() - rt.created[n] <= DEADLINE_S) >= MAX_IN_FLIGHT:  # fmt: skip
                    time.sleep(0.5)  # slots free as jobs end (or pass their deadline)
                rt.create(exit_job(name, code=code, kind=kind))
            last = max(rt.created[n] for n in plan)
            while not all(n in recorder.terminal_at for n in plan) and time.monotonic() - last <= DEADLINE_S + 5:
                time.sleep(0.5)
            recorder.poll_once()
    finally:
        recorder.api.close()
    elapsed = time.monotonic() - started
    problems: list[str] = []
    by_reason: dict[str, int] = {}
    for name, (code, kind) in plan.items():
        status = recorder.latest(name)
        phase, reason, message = status.get("phase"), status.get("reason"), status.get("message")
        by_reason[f"{phase}/{reason}"] = by_reason.get(f"{phase}/{reason}", 0) + 1
        shown = f"exit {code}, {kind}: phase={phase!r} reason={str(reason)[:80]!r} message={str(message)[:160]!r}"
        seen = recorder.terminal_at.get(name)
        if seen is None or seen - rt.created[name] > DEADLINE_S:
            problems.append(f"not terminal within {DEADLINE_S:.0f} s: {shown}")
            continue
        if phase != ("Succeeded" if code == 0 else "Failed"):
            problems.append(f"wrong phase: {shown}")
        if not isinstance(reason, str) or len(reason) > 1024 or not REASON.match(reason):
            problems.append(f"reason the CRD refuses: {shown}")
        if not isinstance(message, str) or len(message) > 32768:
            problems.append(f"bad message: {shown}")
        failed = {c.get("type"): c for c in status.get("conditions") or []}.get("Failed")
        if code and (not failed or failed.get("status") != "True" or failed.get("reason") != reason):
            problems.append(f"no Failed condition with the reason: {shown}")
    with capsys.disabled():
        print(f"\nchaos runtime: {len(plan)} jobs (exit codes 0-255, and 0 with each of {len(KINDS)} hostile messages), settled in {elapsed:.0f} s; "
              + ", ".join(f"{k} {v}" for k, v in sorted(by_reason.items())))  # fmt: skip
    problems += operator_problems(rt.operator)
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems)[:8000]


# ----- hostile progress reports -----


def _post(url: str, *, body: bytes, token: str | None, headers: dict[str, str] | None = None) -> int:
    sent = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=sent, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def _post_chunked(url: str, *, total: int, token: str) -> int:
    """POST `total` bytes with Transfer-Encoding: chunked (no Content-Length to refuse it by)."""
    host_port = url.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    chunk = b"[" + b" " * (1 << 20)

    def chunks() -> Iterator[bytes]:
        sent = 0
        while sent < total:
            yield chunk
            sent += len(chunk)

    # The server may answer and close before the body ends: then read what it said.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        conn.request("POST", protocol.PROGRESS_PATH, body=chunks(), encode_chunked=True,
                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})  # fmt: skip
    try:
        return int(conn.getresponse().status)
    finally:
        conn.close()


def _report(namespace: str, name: str, **overrides: Any) -> dict[str, Any]:
    report: dict[str, Any] = {
        "namespace": namespace, "name": name, "event": "epoch-end", "stage": "head", "epoch": 1,
        "stageEpochs": 2, "epochsDone": 1, "totalEpochs": 5,
        "metrics": {"loss": 0.9, "accuracy": 0.6, "val_loss": 1.0, "val_accuracy": 0.55},
        "bestValAccuracy": 0.55, "imagesPerSecond": 100.0, "epochSeconds": 4.0, "timestamp": time.time(),
    }  # fmt: skip
    report.update(overrides)
    return report


def _raw(report: dict[str, Any], **literals: str) -> bytes:
    """The report as JSON with some values replaced by literal JSON text (NaN, 1e400, ...)."""
    marked = {**report, **{k: f"\u0001{k}\u0001" for k in literals}}
    text = json.dumps(marked)
    for key, literal in literals.items():
        text = text.replace(json.dumps(f"\u0001{key}\u0001"), literal)
    return text.encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_tokens(real: str, count: int) -> list[str]:
    """`count` distinct JWTs with a real token's header and claims (the job's audience) and a made-up signature."""
    header, payload, _ = real.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    out = []
    for _ in range(count):
        forged = {**claims, "jti": secrets.token_hex(8)}
        out.append(f"{header}.{_b64(json.dumps(forged).encode())}.{_b64(secrets.token_bytes(256))}")
    return out


def _audit_reviews(cluster: Cluster, *, identity: str, offset: int) -> int:
    """TokenReviews created by the operator's ServiceAccount since byte `offset` of the audit log."""
    user = f"system:serviceaccount:{OPERATOR_NS}:{identity}"
    count = 0
    with (cluster.dir / "audit.log").open("rb") as log:
        log.seek(offset)
        for line in log:
            if b"tokenreviews" not in line:
                continue
            event = json.loads(line)
            if (event.get("objectRef") or {}).get("resource") == "tokenreviews" and (
                event.get("user") or {}
            ).get("username") == user and event.get("stage") == "ResponseComplete":
                count += 1
    return count


def _reviews_metric(operator: OperatorProcess) -> float:
    return operator.metric("finetune_progress_token_reviews_total")


@dataclass
class Probe:
    url: str
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


async def _probe(session: aiohttp.ClientSession, probe: Probe, stop: asyncio.Event) -> None:
    while not stop.is_set():
        started = time.monotonic()
        try:
            async with session.get(probe.url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                await resp.read()
                if resp.status != 200:
                    probe.failures.append(f"HTTP {resp.status}")
        except Exception as exc:
            probe.failures.append(f"{type(exc).__name__}: {exc}"[:200])
        probe.latencies.append(time.monotonic() - started)
        await asyncio.sleep(0.02)


async def _flood(
    url: str, requests: list[tuple[str, bytes, str | None]], probes: list[Probe], *, concurrency: int = 32
) -> list[tuple[str, int]]:
    """POSTs every (kind, body, token) with `concurrency` in flight while the probes run; (kind, status)s."""
    results: list[tuple[str, int]] = []
    limit = asyncio.Semaphore(concurrency)
    stop = asyncio.Event()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency + 4)) as session:

        async def one(kind: str, body: bytes, token: str | None) -> None:
            headers = {"Content-Type": "application/json"}
            if token is not None:
                headers["Authorization"] = f"Bearer {token}"
            async with limit:
                try:
                    async with session.post(url, data=body, headers=headers,
                                            timeout=aiohttp.ClientTimeout(total=60)) as resp:  # fmt: skip
                        await resp.read()
                        results.append((kind, resp.status))
                except Exception as exc:
                    results.append((f"{kind}: {type(exc).__name__}", 0))

        watchers = [asyncio.create_task(_probe(session, p, stop)) for p in probes]
        await asyncio.sleep(0.5)  # a few probes before the flood: the baseline
        await asyncio.gather(*(one(*r) for r in requests))
        stop.set()
        await asyncio.gather(*watchers)
    return results


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] if ordered else math.nan


def test_hostile_progress_reports_get_4xx_and_health_answers_through_a_flood(
    rt: Runtime, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster, ns, op = rt.cluster, rt.namespace, rt.operator
    for name in ("alpha", "beta"):
        rt.create(waiting_ftj(name))
    token_a = progress_token(cluster, namespace=ns, name="alpha")
    token_b = progress_token(cluster, namespace=ns, name="beta")
    url = op.progress_url
    for name, token in (("alpha", token_a), ("beta", token_b)):
        probe = json.dumps(_report(ns, name, timestamp=time.time() - 10 * 86400)).encode()
        wait_for(lambda p=probe, t=token: _post(url, body=p, token=t) == 400, timeout=60,
                 message=f"{name} registered with the hub (an expired report gets 400, not 404)")  # fmt: skip
    # beta gets one valid report, so a stale one has something to be older than.
    assert _post(url, body=json.dumps(_report(ns, "beta")).encode(), token=token_b) == 202
    beta_pod = trainer_pod(cluster, namespace=ns, name="beta")["metadata"]["name"]
    alpha_on_beta_pod = progress_token(cluster, namespace=ns, name="alpha", pod=beta_pod)
    uid_b = cluster.kubectl_json("get", "ftj", "beta", "-n", ns)["metadata"]["uid"]
    now = time.time()
    r = lambda **kw: _report(ns, "alpha", **kw)  # noqa: E731
    hostile: list[tuple[str, bytes, str | None]] = [
        ("epoch 1e20", _raw(r(), epoch="1e20"), token_a),
        ("epoch 10**30", _raw(r(), epoch="1" + "0" * 30), token_a),
        ("epoch 2**63", json.dumps(r(epoch=2**63)).encode(), token_a),
        ("epoch -1", json.dumps(r(epoch=-1)).encode(), token_a),
        ("epoch beyond the stage's plan", json.dumps(r(epoch=3, epochsDone=3)).encode(), token_a),
        ("stageEpochs beyond the job's plan", json.dumps(r(stageEpochs=10**9)).encode(), token_a),
        ("epochsDone beyond totalEpochs", json.dumps(r(epochsDone=999)).encode(), token_a),
        ("totalEpochs 10**12", json.dumps(r(totalEpochs=10**12)).encode(), token_a),
        ("epoch a string", json.dumps(r(epoch="1")).encode(), token_a),
        ("loss NaN", _raw(r(), metrics='{"loss": NaN}'), token_a),
        ("loss Infinity", _raw(r(), metrics='{"loss": Infinity}'), token_a),
        ("loss 1e400", _raw(r(), metrics='{"loss": 1e400}'), token_a),
        ("loss -Infinity", _raw(r(), metrics='{"val_loss": -Infinity}'), token_a),
        ("bestValAccuracy NaN", _raw(r(), bestValAccuracy="NaN"), token_a),
        ("bestValAccuracy 1e300", json.dumps(r(bestValAccuracy=1e300)).encode(), token_a),
        ("imagesPerSecond Infinity", _raw(r(), imagesPerSecond="Infinity"), token_a),
        ("epochSeconds NaN", _raw(r(), epochSeconds="NaN"), token_a),
        ("epochSeconds 1e300", json.dumps(r(epochSeconds=1e300)).encode(), token_a),
        ("timestamp NaN", _raw(r(), timestamp="NaN"), token_a),
        ("timestamp Infinity", _raw(r(), timestamp="Infinity"), token_a),
        ("timestamp -Infinity", _raw(r(), timestamp="-Infinity"), token_a),
        ("timestamp 0", json.dumps(r(timestamp=0)).encode(), token_a),
        ("timestamp an hour old", json.dumps(r(timestamp=now - 3600)).encode(), token_a),
        ("timestamp an hour ahead", json.dumps(r(timestamp=now + 3600)).encode(), token_a),
        ("timestamp 1e300", json.dumps(r(timestamp=1e300)).encode(), token_a),
        ("timestamp -1e18", json.dumps(r(timestamp=-1e18)).encode(), token_a),
        ("timestamp a string", json.dumps(r(timestamp="now")).encode(), token_a),
        ("stale (older than beta's accepted one)", json.dumps(_report(ns, "beta", timestamp=now - 30)).encode(), token_b),
        ("metric name 10k", json.dumps(r(metrics={"m" * 10_000: 1.0})).encode(), token_a),
        ("100 metrics", json.dumps(r(metrics={f"m{i}": 1.0 for i in range(100)})).encode(), token_a),
        ("message 10k", json.dumps(r(message="x" * 10_000)).encode(), token_a),
        ("stage phase-9", json.dumps(r(stage="phase-9")).encode(), token_a),
        ("event explode", json.dumps(r(event="explode")).encode(), token_a),
        ("unknown field", json.dumps(r(admin=True)).encode(), token_a),
        ("beta's token for alpha", json.dumps(r()).encode(), token_b),
        ("alpha's audience, beta's pod", json.dumps(r()).encode(), alpha_on_beta_pod),
        ("alpha's token, beta's uid", json.dumps(r(uid=uid_b)).encode(), token_a),
        ("alpha's token naming beta", json.dumps(_report(ns, "beta")).encode(), token_a),
        ("alpha's token, another namespace", json.dumps(_report("kube-system", "alpha")).encode(), token_a),
        ("no token", json.dumps(r()).encode(), None),
        ("token 10k of garbage", json.dumps(r()).encode(), "x" * 10_000),
        ("an unsigned JWT (alg none)", json.dumps(r()).encode(), _b64(b'{"alg":"none"}') + "." + token_a.split(".")[1] + "."),
        ("invalid UTF-8 body", b'{"namespace": "\xff\xfe", "name": "alpha"}', token_a),
        ("truncated JSON", json.dumps(r()).encode()[:40], token_a),
        ("JSON nested 100k deep", b'{"namespace":' + b"[" * 60_000, token_a),
        ("a JSON array", b"[]", token_a),
        ("null", b"null", token_a),
        ("empty body", b"", token_a),
        ("duplicate keys", b'{"epoch": 1, "epoch": 1e20}', token_a),
        ("10 MB with Content-Length", b"{" + b" " * (10 * 2**20), token_a),
        ("10 MB without a token", b"{" + b" " * (10 * 2**20), None),
    ]  # fmt: skip
    wrong: list[str] = [f"{label}: HTTP {code}" for label, body, token in hostile
                        if not 400 <= (code := _post(url, body=body, token=token)) < 500]  # fmt: skip
    chunked = _post_chunked(url, total=10 * 2**20, token=token_a)
    if not 400 <= chunked < 500:
        wrong.append(f"10 MB chunked: HTTP {chunked}")
    for method in ("GET", "PUT", "DELETE"):
        request = urllib.request.Request(url, method=method, data=b"{}" if method == "PUT" else None)
        try:
            urllib.request.urlopen(request, timeout=10)
            wrong.append(f"{method}: answered 2xx")
        except urllib.error.HTTPError as err:
            if not 400 <= err.code < 500:
                wrong.append(f"{method}: HTTP {err.code}")

    # The flood: forged tokens with alpha's audience, beta past its rate limit, bad bodies.
    forged = forged_tokens(token_a, FORGED)
    flood: list[tuple[str, bytes, str | None]] = [("forged", json.dumps(r()).encode(), t) for t in forged]
    # One timestamp for all of beta's valid reports: shuffled, none is older than another (409 stale).
    valid = json.dumps(_report(ns, "beta", epoch=1, timestamp=time.time())).encode()
    flood += [("valid", valid, token_b) for _ in range(2000)]
    flood += [(label, body, token) for label, body, token in hostile if len(body) < 100_000] * 8
    order = list(range(len(flood)))
    secrets.SystemRandom().shuffle(order)  # interleaved; the order changes no expectation
    probes = [Probe(f"http://127.0.0.1:{op.progress_port}/healthz"), Probe(f"http://127.0.0.1:{op.health_port}/healthz")]
    audit_offset = (cluster.dir / "audit.log").stat().st_size
    metric_before = _reviews_metric(op)
    started = time.monotonic()
    results = asyncio.run(_flood(url, [flood[i] for i in order], probes))
    flood_s = time.monotonic() - started
    reviews_audit = _audit_reviews(cluster, identity=rt.identity, offset=audit_offset)  # written before each answer
    reviews_metric = _reviews_metric(op) - metric_before
    per_1000_audit = reviews_audit * 1000 / FORGED
    per_1000_metric = reviews_metric * 1000 / FORGED
    with capsys.disabled():
        print(f"\nTokenReviews per 1,000 forged tokens: {per_1000_audit:.0f} "
              f"(API server audit log; the operator's own counter: {per_1000_metric:.0f})")  # fmt: skip
        for probe in probes:
            lat = [1000 * x for x in probe.latencies]
            print(f"health latency during the flood ({len(flood)} requests in {flood_s:.1f} s): {probe.url} "
                  f"p50 {_percentile(lat, 0.5):.1f} ms, p99 {_percentile(lat, 0.99):.1f} ms, "
                  f"max {max(lat, default=math.nan):.1f} ms, n={len(lat)}, failures {len(probe.failures)}")  # fmt: skip
    codes: dict[str, dict[int, int]] = {}
    for kind, code in results:
        codes.setdefault(kind if kind in ("forged", "valid") else "hostile", {}).setdefault(code, 0)
        codes[kind if kind in ("forged", "valid") else "hostile"][code] += 1
    wrong += [f"forged token: HTTP {c} x{n}" for c, n in codes.get("forged", {}).items() if c != 401]
    wrong += [f"valid report in the flood: HTTP {c} x{n}" for c, n in codes.get("valid", {}).items() if c not in (202, 429)]
    wrong += [f"hostile report in the flood: HTTP {c} x{n}" for c, n in codes.get("hostile", {}).items() if not 400 <= c < 500]
    for probe in probes:
        wrong += [f"{probe.url}: {f}" for f in probe.failures[:5]]
        assert probe.latencies, probe.url
    if per_1000_audit > 10:
        wrong.append(f"{per_1000_audit:.0f} TokenReviews per 1,000 forged tokens (at most 10: verify locally first)")

    # Nothing refused reached a status: alpha only ever got refused reports.
    status = rt.cluster.get(FTJ_PATH.format(namespace=ns) + "/alpha") or {}
    leaked = {k: v for k, v in (status.get("status") or {}).items() if k in PROGRESS_FIELDS}
    if leaked:
        wrong.append(f"alpha's status carries progress from refused reports: {leaked}")
    beta = (rt.cluster.get(FTJ_PATH.format(namespace=ns) + "/beta") or {}).get("status") or {}
    if beta.get("epoch", 0) > 2 or any(not math.isfinite(v) for v in (beta.get("metrics") or {}).values()):
        wrong.append(f"beta's status took a hostile value: {beta}")
    # And the endpoint still takes a valid report once beta's bucket refills.
    wait_for(lambda: _post(url, body=json.dumps(_report(ns, "beta", epoch=2, epochsDone=2)).encode(), token=token_b)
             == 202, timeout=30, message="a valid report accepted after the flood", interval=1.0)  # fmt: skip
    wrong += operator_problems(op)
    assert not wrong, f"{len(wrong)} problems:\n" + "\n".join(wrong)[:8000]
