"""Chaos tier, admission: a few hundred generated bad FineTuneJobs against the real API server and operator.

`chaos_cases.admission_cases(seed=SEED)` makes the manifests (deterministic: the same seed,
the same bytes). Each is POSTed as it is to the local control plane's API server with
`fieldValidation=Strict` (what `kubectl apply` does), in a namespace that the real operator
(`python -m finetune_operator`, as a ServiceAccount bound to deploy/'s ClusterRole) watches
with a 4 s pending timeout and `chaos_trainer.py` as its trainer: the real trainer's checks
before TensorFlow (config, weights file, data folders), so an admitted manifest that could
really train ends `Succeeded` and is reported, not excused by a missing folder.

Each case must be refused at admission with an error naming the field (`Case.names`), or,
when admitted, end `Failed` with a specific reason within 60 s of its creation. A bounded
number of admitted jobs is in flight at once, so the whole run takes a few minutes on two
cores. Across the run: the operator never exits, its log holds no traceback, and no admitted
job is without a status after 60 s. One test per category, so a report names what is broken.

A separate test applies objects nesting thousands of levels deep in a namespace of their
own, with an operator of its own, and checks that they cost only themselves, also across a
restart of the operator.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fixtures.cluster import Cluster
from fixtures.jobs import delete_namespace, restricted_namespace
from fixtures.operator import OperatorProcess, install_crd_and_rbac

from chaos.chaos_cases import DATA_CLAIM, Case, Raw, admission_cases, base_manifest, categories, deep_json
from chaos.chaos_support import (
    FTJ_PATH,
    StatusRecorder,
    operator_kubeconfig,
    operator_problems,
    raw_request,
    remove_operator_identity,
)

pytestmark = pytest.mark.timeout(900)

SEED = int(os.environ.get("FTO_CHAOS_SEED", "20261201"))
TRAINER = Path(__file__).resolve().with_name("chaos_trainer.py")
DEADLINE_S = 60.0  # an admitted job is terminal within this many seconds of its creation
MAX_IN_FLIGHT = 24  # admitted jobs neither terminal nor past their deadline, at once
GENERIC_REASONS = frozenset({"", "Failed", "Error", "Unknown", "Waiting", "Pending", "Training"})
CASES = admission_cases(seed=SEED)
CATEGORIES = list(categories(CASES))


@dataclass
class Outcome:
    case: Case
    http: int = 0
    message: str = ""
    created_at: float | None = None  # monotonic, when admitted

    @property
    def admitted(self) -> bool:
        return self.http == 201


@dataclass
class Campaign:
    namespace: str
    operator: OperatorProcess
    recorder: StatusRecorder
    outcomes: list[Outcome] = field(default_factory=list)
    controls: dict[str, float] = field(default_factory=dict)  # name -> created_at
    exits: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def problem(self, outcome: Outcome) -> str | None:
        """Why this case's outcome is not acceptable, or None."""
        case = outcome.case
        if outcome.admitted:
            assert outcome.created_at is not None
            status = self.recorder.latest(case.name)
            shown = f"phase={status.get('phase')!r} reason={status.get('reason')!r} message={str(status.get('message'))[:240]!r}"
            seen = self.recorder.terminal_at.get(case.name)
            if seen is None or seen - outcome.created_at > DEADLINE_S:
                return f"admitted; not terminal within {DEADLINE_S:.0f} s ({shown})"
            if status.get("phase") == "Succeeded":
                return f"admitted and Succeeded: the hostile input was neither refused nor failed the job ({shown})"
            if str(status.get("reason") or "") in GENERIC_REASONS:
                return f"Failed without a specific reason ({shown})"
            return None
        if 400 <= outcome.http < 500:
            if case.names is None or case.names in outcome.message:
                return None
            return f"refused (HTTP {outcome.http}) without naming {case.names}: {outcome.message[:400]!r}"
        return f"HTTP {outcome.http}: {outcome.message[:400]!r}"


def _make_data(cluster: Cluster, namespace: str) -> None:
    """The `data` claim and, where the pod runner mounts it, a two-class folder the pre-flight accepts."""
    cluster.kubectl_run("apply", "-n", namespace, "-f", "-", input=(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: " + DATA_CLAIM + "}\n"
        "spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}\n"))  # fmt: skip
    root = cluster.dir / "volumes" / namespace / DATA_CLAIM / "train"
    for label in ("cats", "dogs"):
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n")


def _post(api: Any, namespace: str, body: bytes) -> tuple[int, str]:
    code, message, _ = raw_request(
        api, "POST", FTJ_PATH.format(namespace=namespace) + "?fieldValidation=Strict", body=body
    )
    return code, message


def _control_body(name: str) -> bytes:
    import json

    return json.dumps(base_manifest(name)).encode()


def _operator(cluster: Cluster, *, namespace: str, log: Path, identity: str, tmp: Path) -> OperatorProcess:
    return OperatorProcess(
        kubeconfig=operator_kubeconfig(cluster, name=identity, path=tmp / f"kubeconfig-{identity}"),
        namespace=namespace,
        log=log,
        extra_args=("--trainer-command", f"python {TRAINER}", "--pending-timeout", "4"),
        ready_timeout=60,
    )


def _in_flight(campaign: Campaign, now: float) -> int:
    return sum(
        1
        for o in campaign.outcomes
        if o.admitted
        and o.created_at is not None
        and o.case.name not in campaign.recorder.terminal_at
        and now - o.created_at <= DEADLINE_S
    )


def _keep_alive(campaign: Campaign) -> None:
    """An operator that exited is recorded and started again, so later cases still tell something."""
    if not campaign.operator.alive():
        code = campaign.operator.proc.returncode if campaign.operator.proc is not None else None
        campaign.exits.append(f"exited with {code} after {len(campaign.outcomes)} cases")
        campaign.operator.start()


@pytest.fixture(scope="module")
def campaign(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Campaign]:
    install_crd_and_rbac(cluster)
    tmp = tmp_path_factory.mktemp("chaos-admission")
    namespace = restricted_namespace(cluster, prefix="chaos-adm")
    identity = f"chaos-admission-{namespace[-6:]}"
    _make_data(cluster, namespace)
    operator = _operator(cluster, namespace=namespace, log=tmp / "operator.log", identity=identity, tmp=tmp)
    operator.start()
    api = cluster.api_client()
    recorder = StatusRecorder(api=cluster.api_client(), namespace=namespace)
    run = Campaign(namespace=namespace, operator=operator, recorder=recorder)
    started = time.monotonic()
    try:
        with recorder.running():
            for name in ("control-a", "control-b"):
                code, message = _post(api, namespace, _control_body(name))
                assert code == 201, f"the valid control manifest was refused: {message}"
                run.controls[name] = time.monotonic()
            for case in CASES:
                while _in_flight(run, time.monotonic()) >= MAX_IN_FLIGHT:
                    _keep_alive(run)
                    time.sleep(0.5)  # slots free as jobs turn terminal or pass their deadline
                code, message = _post(api, namespace, case.body)
                run.outcomes.append(
                    Outcome(case=case, http=code, message=message, created_at=time.monotonic() if code == 201 else None)
                )
                if len(run.outcomes) % 25 == 0:
                    _keep_alive(run)
            last = max([o.created_at for o in run.outcomes if o.created_at] + list(run.controls.values()))
            while _in_flight(run, time.monotonic()) or not all(n in recorder.terminal_at for n in run.controls):
                if time.monotonic() - last > DEADLINE_S + 5:
                    break
                _keep_alive(run)
                time.sleep(0.5)
            recorder.poll_once()
        run.seconds = time.monotonic() - started
        yield run
    finally:
        operator.stop()
        api.close()
        recorder.api.close()
        delete_namespace(cluster, namespace)
        remove_operator_identity(cluster, name=identity)


def _summary(run: Campaign) -> str:
    rows: dict[str, collections.Counter[str]] = {c: collections.Counter() for c in CATEGORIES}
    for outcome in run.outcomes:
        row = rows[outcome.case.category]
        if not outcome.admitted:
            row["refused" if run.problem(outcome) is None else f"refused-badly(HTTP {outcome.http})"] += 1
            continue
        status = run.recorder.latest(outcome.case.name)
        verdict = "ok" if run.problem(outcome) is None else "BAD"
        row[f"admitted->{status.get('phase') or 'no-status'}/{status.get('reason') or '-'}:{verdict}"] += 1
    lines = [f"chaos admission: {len(run.outcomes)} cases (seed {SEED}) in {run.seconds:.0f} s"]
    for category, counts in rows.items():
        lines.append(f"  {category:15} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


def test_at_least_300_cases_were_applied(campaign: Campaign, capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print("\n" + _summary(campaign))
    assert len(CASES) >= 300
    assert len(campaign.outcomes) == len(CASES)
    assert all(o.http for o in campaign.outcomes)


def test_the_valid_controls_succeed(campaign: Campaign) -> None:
    """The harness can tell: the unmodified base manifest trains (pre-flight passes) and Succeeds."""
    for name, created in campaign.controls.items():
        status = campaign.recorder.latest(name)
        assert status.get("phase") == "Succeeded", (name, status)
        assert campaign.recorder.terminal_at[name] - created <= DEADLINE_S


@pytest.mark.parametrize("category", CATEGORIES)
def test_each_bad_manifest_is_refused_naming_the_field_or_fails_with_a_reason(
    campaign: Campaign, category: str
) -> None:
    problems = [
        f"{o.case.name} [{o.case.note[:120]}]: {why}"
        for o in campaign.outcomes
        if o.case.category == category and (why := campaign.problem(o)) is not None
    ]
    total = sum(1 for o in campaign.outcomes if o.case.category == category)
    assert not problems, f"{len(problems)} of {total} {category} cases:\n" + "\n".join(problems)


def test_the_operator_never_exited_and_logged_no_traceback(campaign: Campaign) -> None:
    problems = campaign.exits + operator_problems(campaign.operator)
    assert not problems, "\n".join(problems)[:6000]


def test_no_admitted_job_is_without_status_after_60_s(campaign: Campaign) -> None:
    missing = [
        f"{o.case.name} [{o.case.note[:100]}]"
        for o in campaign.outcomes
        if o.admitted and not campaign.recorder.latest(o.case.name).get("phase")
    ]
    assert not missing, f"{len(missing)} admitted jobs without status:\n" + "\n".join(missing)
    assert not campaign.recorder.errors, campaign.recorder.errors[:5]


# ----- objects nesting thousands of levels deep -----

# (what, parent under spec, key, the raw value, the field a refusal must name; None: the decoder's own limit)
DEEP: tuple[tuple[str, tuple[str | int, ...], str, Raw, str | None], ...] = (
    ("baseOptions, objects 2000 deep", ("model", "baseOptions"), "a", deep_json(2000), "spec.model.baseOptions"),
    ("baseOptions.alpha, lists 5000 deep", ("model", "baseOptions"), "alpha", deep_json(5000, kind="list"),
     "spec.model.baseOptions.alpha"),
    ("baseOptions.alpha, objects 3000 deep", ("model", "baseOptions"), "alpha", deep_json(3000),
     "spec.model.baseOptions.alpha"),
    ("baseOptions.alpha, lists 12000 deep (past the API server's decoder)", ("model", "baseOptions"), "alpha",
     deep_json(12_000, kind="list"), None),
    ("baseOptions, lists 5000 deep", ("model", "baseOptions"), "a", deep_json(5000, kind="list"), "spec.model.baseOptions"),
    ("affinity, objects 2000 deep", ("runtime", "affinity"), "nodeAffinity", deep_json(2000), "spec.runtime.affinity"),
    ("env valueFrom, objects 2000 deep", ("runtime", "env", 0), "valueFrom", deep_json(2000), "spec.runtime.env[0]"),
)  # fmt: skip


def _deep_body(name: str, parent: tuple[str | int, ...], key: str, text: str) -> bytes:
    """The base manifest with `text` (raw JSON) at spec.<parent>.<key>: spliced in as text."""
    import json

    doc = base_manifest(name)
    node: Any = doc["spec"]
    for part in parent:
        node = node[part] if isinstance(part, int) else node.setdefault(part, {})
    node[key] = "\u0001DEEP\u0001"
    return json.dumps(doc).replace(json.dumps("\u0001DEEP\u0001"), text).encode()


def test_objects_nested_thousands_deep_cost_only_themselves(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    install_crd_and_rbac(cluster)
    namespace = restricted_namespace(cluster, prefix="chaos-deep")
    identity = f"chaos-deep-{namespace[-6:]}"
    _make_data(cluster, namespace)
    operator = _operator(cluster, namespace=namespace, log=tmp_path / "operator.log", identity=identity, tmp=tmp_path)
    api = cluster.api_client()
    recorder = StatusRecorder(api=cluster.api_client(), namespace=namespace)
    problems: list[str] = []
    outcomes: list[str] = []
    try:
        operator.start()
        with recorder.running():
            created: dict[str, float] = {}
            for index, (label, parent, key, raw, names) in enumerate(DEEP):
                name = f"deep-{index}"
                code, message = _post(api, namespace, _deep_body(name, parent, key, raw.text))
                outcomes.append(f"  {label}: HTTP {code} {message[:150]}")
                if code == 201:
                    created[name] = time.monotonic()
                elif not (400 <= code < 500 and (names is None or names in message)):
                    problems.append(f"{label}: HTTP {code} without naming {names}: {message[:300]!r}")
            # Ordinary jobs after the deep ones: one valid, one the operator refuses.
            for name, body in (("after-ok", _control_body("after-ok")), ("after-bad", _bad_base_body("after-bad"))):
                code, message = _post(api, namespace, body)
                assert code == 201, message
                created[name] = time.monotonic()

            def settled() -> bool:
                now = time.monotonic()
                return all(n in recorder.terminal_at or now - t > DEADLINE_S for n, t in created.items())

            while not settled():
                time.sleep(0.5)
            # Kopf must survive a restart with these objects stored, and still reconcile new jobs.
            operator.restart()
            code, message = _post(api, namespace, _control_body("after-restart"))
            assert code == 201, message
            created["after-restart"] = time.monotonic()
            while not settled():
                time.sleep(0.5)
            recorder.poll_once()
        for name, at in created.items():
            status = recorder.latest(name)
            seen = recorder.terminal_at.get(name)
            shown = f"phase={status.get('phase')!r} reason={status.get('reason')!r}"
            if seen is None or seen - at > DEADLINE_S:
                problems.append(f"{name}: not terminal within {DEADLINE_S:.0f} s ({shown})")
            elif name in ("after-ok", "after-restart"):
                if status.get("phase") != "Succeeded":
                    problems.append(f"{name}: a valid job next to the deep ones did not succeed ({shown})")
            elif name == "after-bad":
                if (status.get("phase"), status.get("reason")) != ("Failed", "InvalidSpec"):
                    problems.append(f"{name}: expected Failed/InvalidSpec ({shown})")
            elif status.get("phase") != "Failed" or str(status.get("reason") or "") in GENERIC_REASONS:
                problems.append(f"{name}: admitted and not Failed with a specific reason ({shown})")
        problems += operator_problems(operator)
        problems += recorder.errors[:3]
    finally:
        operator.stop()
        api.close()
        recorder.api.close()
        delete_namespace(cluster, namespace)
        remove_operator_identity(cluster, name=identity)
    with capsys.disabled():
        print("\nchaos admission, deep objects:\n" + "\n".join(outcomes))
    assert not problems, "\n".join(problems)[:8000]


def _bad_base_body(name: str) -> bytes:
    import json

    doc = base_manifest(name)
    doc["spec"]["model"]["base"] = "NoSuchNet"
    return json.dumps(doc).encode()
