"""The local control plane: `hack/cluster.py up|down|status` (finetune_testbed.cluster).

`up` builds (once, cached: hack/build-control-plane.sh) and starts etcd, kube-apiserver,
kube-controller-manager and the pod runner (hack/podrunner.py: finetune_testbed.podrunner), all on loopback, with
certificates, a service-account signing key and an audit policy generated under `.cluster/`:

    .cluster/kubeconfig         admin (client certificate, group system:masters)
    .cluster/bin/kubectl        the kubectl built with the control plane
    .cluster/logs/              one log per component, one per pod container
    .cluster/audit.log          the apiserver's audit log (Metadata level)
    .cluster/volumes/<ns>/<pvc> what a PersistentVolumeClaim mounts in a pod
    .cluster/pids/              one pid file per process started here
    .cluster/pids/attached/     "PID NEEDLE" files of processes run beside the cluster
                                (make demo's operator): `down` stops them too

`up` returns once /readyz answers, the ServiceAccount controller has made `default/default`
and node `local-node` is Ready; on a healthy cluster it returns at once. `down` stops every
process it started and every attached one (first, while the API server still answers
them), by pid (SIGTERM, then SIGKILL). Ports are fixed but overridable:
FTO_APISERVER_PORT (6443), FTO_ETCD_PORT (2379), FTO_ETCD_PEER_PORT (2380),
FTO_KCM_PORT (10257), FTO_KUBELET_PORT (10250: the pod runner's `kubectl logs` endpoint).
`up --simulate-pods SECONDS` starts the pod runner in simulated mode. FTO_PODS=container
runs every pod's containers from their images with podman + runc (finetune_testbed.podrunner.container);
FTO_PODS=process (the default) as local processes, the fast mode the tests use. A cluster up
in another mode gets its pod runner restarted in the one asked for.

Kueue (on unless FTO_KUEUE=0): `up` also runs Kueue's controller manager (hack/build-kueue.sh,
cached) as component `kueue`, after kube-controller-manager: its CRDs (kueue.x-k8s.io,
v1beta1) are installed and Established, its webhook server serves on
127.0.0.1:FTO_KUEUE_WEBHOOK_PORT (10270) with a certificate from this CA, and Kueue's own
Mutating/ValidatingWebhookConfigurations (`kueue-mutating-webhook-configuration`,
`kueue-validating-webhook-configuration`, failurePolicy Fail, namespaceSelectors as Kueue
ships them) point at it by `url`. They are installed only once Kueue serves and deleted
before Kueue is stopped (and, stale, before it is started again), so a stopped Kueue does
not fail every Job and Pod create. It manages `batch/job` (KUEUE_FRAMEWORKS), runs as
`kueue-controller-manager` in group system:masters (.cluster/kueue.kubeconfig), leader
election and internal cert management off; metrics on FTO_KUEUE_METRICS_PORT (10271),
/healthz and /readyz on FTO_KUEUE_HEALTH_PORT (10272); config in .cluster/kueue/config.yaml,
log in .cluster/logs/kueue.log. Its metrics server reads a fixed /etc/kueue/metrics/certs,
so Kueue runs in a mount namespace of its own (hack/localcluster_exec.py, root) with this
cluster's certificate bound there. The audit policy records batch Job updates and patches at
level Request (the body: who wrote `spec.suspend`), everything else at Metadata.

JobSet (on unless FTO_JOBSET=0): `up` also runs the JobSet controller manager
(hack/build-jobset.sh, cached; jobset.x-k8s.io/v1alpha2) as component `jobset`, before Kueue,
the same way: its CRD installed and Established before it starts, its webhook server on
127.0.0.1:FTO_JOBSET_WEBHOOK_PORT (10273) with a certificate from this CA, its own
Mutating/ValidatingWebhookConfigurations (`jobset-mutating-webhook-configuration`,
`jobset-validating-webhook-configuration`, failurePolicy Fail, the pod webhooks'
objectSelectors as the release patches them) by `url`, installed once it serves and deleted
before it stops. It runs as `jobset-controller-manager` in group system:masters
(.cluster/jobset.kubeconfig), leader election and internal cert management off; metrics
(HTTPS, self-signed) on FTO_JOBSET_METRICS_PORT (10274), /healthz and /readyz on
FTO_JOBSET_HEALTH_PORT (10275); config in .cluster/jobset/config.yaml, log in
.cluster/logs/jobset.log. With JobSet on, Kueue also manages `jobset.x-k8s.io/jobset` (a Kueue
started without it is restarted).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime
import fcntl
import functools
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from finetune_testbed import polling, tools
from finetune_testbed.net import tcp_open

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_PY = ROOT / "hack" / "cluster.py"  # the entry point: `python hack/cluster.py up|down|status`
NODE_NAME = "local-node"
SERVICE_CIDR = "10.0.0.0/24"
# The pod bridge's host address (finetune_testbed.podrunner.podnet, FTO_POD_NETWORK=netns): pods reach the API
# server there (KUBERNETES_SERVICE_HOST), so its serving certificate names it too.
POD_BRIDGE_GATEWAY = "10.244.0.1"
ISSUER = "https://kubernetes.default.svc.cluster.local"
# Order matters: started in this order, stopped in reverse. "kueue" only when kueue_enabled(),
# "jobset" only when jobset_enabled() (before Kueue, whose jobset integration needs its CRD).
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "jobset", "kueue", "podrunner")

# Job updates and patches keep their request body (who wrote spec.suspend, e.g. under
# Kueue); jobs/status and everything else stay at Metadata, to keep the log small.
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Request
    verbs: ["update", "patch"]
    resources:
      - group: batch
        resources: ["jobs"]
  - level: Metadata
"""


class ClusterError(RuntimeError):
    """The control plane could not be started, checked or stopped; the message says why."""


@dataclass(frozen=True)
class Ports:
    """Loopback ports of the control plane (environment overrides the defaults)."""

    apiserver: int
    etcd: int
    etcd_peer: int
    kcm: int
    kubelet: int
    kueue_webhook: int = 10270
    kueue_metrics: int = 10271
    kueue_health: int = 10272
    jobset_webhook: int = 10273
    jobset_metrics: int = 10274
    jobset_health: int = 10275

    @classmethod
    def from_env(cls) -> Ports:
        return cls(
            apiserver=int(os.environ.get("FTO_APISERVER_PORT", "6443")),
            etcd=int(os.environ.get("FTO_ETCD_PORT", "2379")),
            etcd_peer=int(os.environ.get("FTO_ETCD_PEER_PORT", "2380")),
            kcm=int(os.environ.get("FTO_KCM_PORT", "10257")),
            kubelet=int(os.environ.get("FTO_KUBELET_PORT", "10250")),
            kueue_webhook=int(os.environ.get("FTO_KUEUE_WEBHOOK_PORT", "10270")),
            kueue_metrics=int(os.environ.get("FTO_KUEUE_METRICS_PORT", "10271")),
            kueue_health=int(os.environ.get("FTO_KUEUE_HEALTH_PORT", "10272")),
            jobset_webhook=int(os.environ.get("FTO_JOBSET_WEBHOOK_PORT", "10273")),
            jobset_metrics=int(os.environ.get("FTO_JOBSET_METRICS_PORT", "10274")),
            jobset_health=int(os.environ.get("FTO_JOBSET_HEALTH_PORT", "10275")),
        )


@dataclass(frozen=True)
class Layout:
    """Where everything lives under the cluster folder."""

    dir: Path

    @property
    def pki(self) -> Path:
        return self.dir / "pki"

    @property
    def pids(self) -> Path:
        return self.dir / "pids"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def kubectl(self) -> Path:
        return self.dir / "bin" / "kubectl"

    def pidfile(self, name: str) -> Path:
        return self.pids / f"{name}.pid"

    @property
    def attached(self) -> Path:
        """Pid files ("PID NEEDLE") of processes that run against this cluster but not as part of it."""
        return self.pids / "attached"

    def component_kubeconfig(self, name: str) -> Path:
        return self.dir / f"{name}.kubeconfig"


# --- certificates -------------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def ensure_pki(*, pki: Path) -> None:
    """Creates what is missing of: the CA, serving and client certificates, the SA key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    pki.mkdir(parents=True, exist_ok=True)
    os.chmod(pki, 0o700)

    def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        os.chmod(path, 0o600)

    def name(cn: str, org: str | None = None) -> x509.Name:
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        if org:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
        return x509.Name(attrs)

    start = _now() - datetime.timedelta(hours=1)
    end = start + datetime.timedelta(days=3650)
    ca_name = name("finetune-local-ca")
    if not (pki / "ca.crt").exists():
        new_ca = ec.generate_private_key(ec.SECP256R1())
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(new_ca.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(new_ca, hashes.SHA256())
        )
        write_key(pki / "ca.key", new_ca)
        (pki / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    loaded = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    ca_key = loaded

    def issue(
        stem: str, *, cn: str, org: str | None, server: bool, sans: list[x509.GeneralName] | None = None
    ) -> None:
        if (pki / f"{stem}.crt").exists():
            old = x509.load_pem_x509_certificate((pki / f"{stem}.crt").read_bytes())
            try:
                had = set(old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
            except x509.ExtensionNotFound:
                had = set()
            if set(sans or []) <= had:
                return  # kept; one issued before a name was added here is issued again (same CA)
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn, org))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        write_key(pki / f"{stem}.key", key)
        (pki / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    loopback: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
    ]
    service_ip = next(ipaddress.IPv4Network(SERVICE_CIDR).hosts())
    issue(
        "apiserver",
        cn="kube-apiserver",
        org=None,
        server=True,
        sans=[
            *loopback,
            x509.DNSName("kubernetes"),
            x509.DNSName("kubernetes.default"),
            x509.DNSName("kubernetes.default.svc"),
            x509.DNSName("kubernetes.default.svc.cluster.local"),
            x509.IPAddress(service_ip),
            x509.IPAddress(ipaddress.IPv4Address(POD_BRIDGE_GATEWAY)),
        ],
    )
    issue("admin", cn="kubernetes-admin", org="system:masters", server=False)
    issue("kube-controller-manager", cn="system:kube-controller-manager", org=None, server=False)
    issue("podrunner", cn="system:pod-runner", org="system:masters", server=False)
    # The pod runner's kubelet-style log endpoint, and the apiserver's client cert for it.
    issue("kubelet", cn=f"system:node:{NODE_NAME}", org="system:nodes", server=True, sans=loopback)
    issue("apiserver-kubelet-client", cn="kube-apiserver-kubelet-client", org="system:masters", server=False)
    # Kueue: its identity, and the loopback serving certificate of its webhook and metrics servers.
    issue("kueue", cn="kueue-controller-manager", org="system:masters", server=False)
    issue("kueue-serving", cn="kueue-webhook", org=None, server=True, sans=loopback)
    # JobSet: the same two, for its controller manager and its webhook server.
    issue("jobset", cn="jobset-controller-manager", org="system:masters", server=False)
    issue("jobset-serving", cn="jobset-webhook", org=None, server=True, sans=loopback)
    if not (pki / "sa.key").exists():
        sa_key = ec.generate_private_key(ec.SECP256R1())
        write_key(pki / "sa.key", sa_key)
        (pki / "sa.pub").write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


def build_kubeconfig(*, server: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes, user: str) -> str:
    """A kubeconfig (JSON, which is YAML) with embedded client certificate credentials."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(cert_pem), "client-key-data": b64(key_pem)}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
        "current-context": "local",
        "preferences": {},
    }
    return json.dumps(config, indent=2) + "\n"


def write_kubeconfigs(*, layout: Layout, server: str) -> None:
    ca = (layout.pki / "ca.crt").read_bytes()
    for stem, path in (
        ("admin", layout.kubeconfig),
        ("kube-controller-manager", layout.component_kubeconfig("kube-controller-manager")),
        ("podrunner", layout.component_kubeconfig("podrunner")),
        ("kueue", layout.component_kubeconfig("kueue")),
        ("jobset", layout.component_kubeconfig("jobset")),
    ):
        text = build_kubeconfig(
            server=server,
            ca_pem=ca,
            cert_pem=(layout.pki / f"{stem}.crt").read_bytes(),
            key_pem=(layout.pki / f"{stem}.key").read_bytes(),
            user=stem,
        )
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o600)
        tmp.replace(path)


# --- processes -----------------------------------------------------------------------------


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int, *, needle: str) -> bool:
    """True when `pid` runs and its command line mentions `needle` (guards against pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return needle.encode() in cmdline


def component_alive(*, layout: Layout, name: str) -> int | None:
    pid = read_pid(layout.pidfile(name))
    needle = {"podrunner": "podrunner.py", "session-reaper": "reap-when-unused"}.get(name, name)
    if pid is not None and pid_alive(pid, needle=needle):
        return pid
    return None


def port_owner(port: int) -> str:
    """Best effort: which process listens on 127.0.0.1:`port`."""
    try:
        import psutil  # type: ignore[import-untyped]

        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                proc = psutil.Process(conn.pid)
                return f"pid {conn.pid} ({' '.join(proc.cmdline())[:120]})"
    except Exception:  # psutil may be missing or denied; the port number alone still helps
        pass
    return "another process"


def check_port_free(port: int, *, what: str, env_var: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise ClusterError(
                f"port 127.0.0.1:{port} (for {what}) is taken by {port_owner(port)}; "
                f"stop it or choose another port with {env_var}=<port>"
            ) from None


def start_process(
    *, layout: Layout, name: str, argv: list[str], env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    layout.logs.mkdir(parents=True, exist_ok=True)
    layout.pids.mkdir(parents=True, exist_ok=True)
    with open(layout.logs / f"{name}.log", "ab") as log:
        log.write(f"\n==== {_now().isoformat()} start: {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=env,
            cwd=ROOT,
        )
    layout.pidfile(name).write_text(f"{proc.pid}\n")
    return proc


def stop_pid(pid: int, *, needle: str, grace_s: float) -> None:
    if not pid_alive(pid, needle=needle):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        _reap(pid)
        if not pid_alive(pid, needle=needle):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    _reap(pid)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


# --- health --------------------------------------------------------------------------------


def admin_ssl_context(*, layout: Layout) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(layout.pki / "ca.crt"))
    ctx.load_cert_chain(str(layout.pki / "admin.crt"), str(layout.pki / "admin.key"))
    return ctx


def api_get(*, layout: Layout, ports: Ports, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    url = f"https://127.0.0.1:{ports.apiserver}{path}"
    try:
        with urllib.request.urlopen(url, context=admin_ssl_context(layout=layout), timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as err:
        return int(err.code), err.read()
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return 0, b""


def kcm_healthy(*, ports: Ports) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # kube-controller-manager's self-signed loopback cert
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{ports.kcm}/healthz", context=ctx, timeout=2) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


def node_ready(*, layout: Layout, ports: Ports, since: datetime.datetime | None = None) -> bool:
    """Node local-node is Ready (with a heartbeat not older than `since`, when given)."""
    code, body = api_get(layout=layout, ports=ports, path=f"/api/v1/nodes/{NODE_NAME}")
    if code != 200:
        return False
    conditions = json.loads(body).get("status", {}).get("conditions") or []
    for c in conditions:
        if c.get("type") == "Ready" and c.get("status") == "True":
            if since is None:
                return True
            beat = datetime.datetime.fromisoformat(c.get("lastHeartbeatTime", "1970-01-01T00:00:00Z"))
            return beat >= since.replace(microsecond=0)
    return False


def wait_until(check: Callable[[], bool], *, timeout: float, what: str, layout: Layout, log: str) -> None:
    """Polls `check` (finetune_testbed.polling); ClusterError with the last lines of `log` on timeout."""
    try:
        polling.wait_until(check, timeout=timeout, what=what)
        return
    except polling.WaitTimeout:
        pass
    tail = ""
    try:
        lines = (layout.logs / f"{log}.log").read_text(errors="replace").splitlines()
        tail = "\n".join(lines[-25:])
    except OSError:
        pass
    raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}; last lines of {log}.log:\n{tail}")


def wanted_components(*, kueue: bool, jobset: bool | None = None) -> tuple[str, ...]:
    """COMPONENTS less Kueue and JobSet when they are off (`jobset`: jobset_enabled() if None)."""
    jobset = jobset_enabled() if jobset is None else jobset
    return tuple(n for n in COMPONENTS if (kueue or n != "kueue") and (jobset or n != "jobset"))


def healthy(*, layout: Layout, ports: Ports, kueue: bool | None = None) -> bool:
    """Every component runs and answers; the cheap check `up` makes first. `kueue`: whether
    Kueue (running, ready, its webhook configurations installed) counts; kueue_enabled() if None."""
    kueue = kueue_enabled() if kueue is None else kueue
    if not all(component_alive(layout=layout, name=n) for n in wanted_components(kueue=kueue)):
        return False
    if not layout.kubeconfig.exists() or not layout.kubectl.exists():
        return False
    code, _ = api_get(layout=layout, ports=ports, path="/readyz")
    if not (code == 200 and kcm_healthy(ports=ports) and node_ready(layout=layout, ports=ports)):
        return False
    if jobset_enabled() and not (release_ready(JOBSET, ports=ports) and webhooks_installed(JOBSET, layout=layout, ports=ports)):
        return False
    return not kueue or (release_ready(KUEUE, ports=ports) and webhooks_installed(KUEUE, layout=layout, ports=ports))


# --- Kueue ---------------------------------------------------------------------------------
# Kueue's controller manager as a component (see the module docstring). Its webhook
# configurations have failurePolicy Fail and match every Job and Pod create outside
# kube-system/kueue-system, so they exist only while Kueue serves: installed after its
# /readyz answers, deleted before it stops and, stale (Kueue died), before it starts.

# Kueue's job integrations; kueue_config adds JOBSET_KUEUE_FRAMEWORK when JobSet runs (its CRD
# is installed before Kueue starts; Kueue defers a framework whose API is missing).
KUEUE_FRAMEWORKS: tuple[str, ...] = ("batch/job",)
KUEUE_NAMESPACE = "kueue-system"
KUEUE_WEBHOOK_CONFIGS = (
    ("mutatingwebhookconfigurations", "kueue-mutating-webhook-configuration"),
    ("validatingwebhookconfigurations", "kueue-validating-webhook-configuration"),
)
KUEUE_METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")  # fixed in Kueue's main.go
FIELD_MANAGER = "hack-cluster"


def switched_on(var: str) -> bool:
    """A part of the control plane switched on: `var` unset or anything but 0/false/no/off."""
    return os.environ.get(var, "1").strip().lower() not in ("0", "false", "no", "off")


def _build(script: str) -> Path:
    """hack/`script` (cached; its messages go to stderr as they come): the bin folder it prints."""
    try:
        return tools.build(script, capture_stderr=False)
    except tools.ToolBuildError as exc:
        raise ClusterError(str(exc)) from None


def kueue_enabled() -> bool:
    """Kueue is part of the control plane unless FTO_KUEUE is 0/false/no/off."""
    return switched_on("FTO_KUEUE")


def build_kueue() -> Path:
    """hack/build-kueue.sh (cached): the folder holding bin/kueue, crds/ and webhook/."""
    return _build("build-kueue.sh").parent


def api_request(
    *, layout: Layout, ports: Ports, method: str, path: str, body: bytes | None = None,
    content_type: str = "application/json", timeout: float = 10.0,
) -> tuple[int, bytes]:
    """An admin call to the API server: (HTTP status, body); status 0 when it did not answer."""
    req = urllib.request.Request(
        f"https://127.0.0.1:{ports.apiserver}{path}", data=body, method=method,
        headers={"Content-Type": content_type, "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, context=admin_ssl_context(layout=layout), timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as err:
        return int(err.code), err.read()
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return 0, b""


def _apply(*, layout: Layout, ports: Ports, path: str, doc: str) -> None:
    """Server-side apply of one object (YAML or JSON text) at its API path."""
    code, answer = api_request(
        layout=layout, ports=ports, method="PATCH",
        path=f"{path}?fieldManager={FIELD_MANAGER}&force=true", body=doc.encode(),
        content_type="application/apply-patch+yaml", timeout=30.0,
    )
    if code not in (200, 201):
        raise ClusterError(f"apply {path}: HTTP {code}: {answer[:500].decode(errors='replace')}")


def kueue_config(*, layout: Layout, ports: Ports, frameworks: tuple[str, ...] | None = None) -> str:
    """The manager's Configuration (config.kueue.x-k8s.io/v1beta1), as YAML-compatible JSON.
    `frameworks`: KUEUE_FRAMEWORKS, and JobSet's when JobSet runs (its CRD is installed before
    Kueue starts), if None."""
    if frameworks is None:
        frameworks = KUEUE_FRAMEWORKS + ((JOBSET_KUEUE_FRAMEWORK,) if jobset_enabled() else ())
    config = {
        "apiVersion": "config.kueue.x-k8s.io/v1beta1",
        "kind": "Configuration",
        "namespace": KUEUE_NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports.kueue_health}"},
        "metrics": {"bindAddress": f"127.0.0.1:{ports.kueue_metrics}"},
        "webhook": {"host": "127.0.0.1", "port": ports.kueue_webhook, "certDir": str(layout.pki / "kueue-webhook")},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "clientConnection": {"qps": 100, "burst": 200},
        "integrations": {"frameworks": list(frameworks)},
        # The visibility API server binds 0.0.0.0:8082, not configurable: off (loopback only,
        # and a second cluster could not start).
        "featureGates": {"VisibilityOnDemand": False},
    }
    return json.dumps(config, indent=2) + "\n"


def kueue_webhook_configs(*, manifests: str, kustomization: str, port: int, ca_pem: bytes) -> list[dict[str, object]]:
    """Kueue's webhook configurations as its release installs them (named `kueue-...`, the
    namespaceSelectors of its kustomization patches), each clientConfig a loopback `url`."""
    import yaml

    docs = [d for d in yaml.safe_load_all(manifests) if d]
    patches = [yaml.safe_load(p["patch"]) for p in (yaml.safe_load(kustomization) or {}).get("patches", []) if "patch" in p]
    ca = base64.b64encode(ca_pem).decode()
    out: list[dict[str, object]] = []
    for doc in docs:
        for patch in patches:
            if patch.get("kind") != doc.get("kind") or patch["metadata"]["name"] != doc["metadata"]["name"]:
                continue
            by_name = {w["name"]: w for w in doc["webhooks"]}
            for change in patch.get("webhooks", []):
                if change["name"] in by_name:
                    by_name[change["name"]].update({k: v for k, v in change.items() if k != "name"})
        for hook in doc["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": ca}
        doc["metadata"] = {"name": f"kueue-{doc['metadata']['name']}", "labels": {"app.kubernetes.io/name": "kueue"}}
        out.append(doc)
    return out


def install_kueue_crds(*, layout: Layout, ports: Ports, dist: Path) -> list[str]:
    """Applies the release's CRDs (server-side); returns their names."""
    import yaml

    names = []
    for path in sorted((dist / "crds").glob("*.yaml")):
        text = path.read_text()
        name = yaml.safe_load(text)["metadata"]["name"]
        _apply(layout=layout, ports=ports, path=f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}", doc=text)
        names.append(name)
    return names


def crds_established(*, layout: Layout, ports: Ports, names: list[str]) -> bool:
    for name in names:
        code, body = api_get(layout=layout, ports=ports, path=f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
        if code != 200:
            return False
        conditions = json.loads(body).get("status", {}).get("conditions") or []
        if not any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions):
            return False
    return True


def kueue_webhook_answers(*, layout: Layout, ports: Ports) -> bool:
    """A dry-run create of a Job labelled for a LocalQueue comes back suspended: the API server
    reached Kueue's mutating webhook over TLS and Kueue handled it."""
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "kueue-webhook-probe", "labels": {"kueue.x-k8s.io/queue-name": "webhook-probe"}},
        "spec": {
            "suspend": False,
            "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "probe", "command": ["true"]}]}},
        },
    }
    code, body = api_request(
        layout=layout, ports=ports, method="POST", path="/apis/batch/v1/namespaces/default/jobs?dryRun=All",
        body=json.dumps(job).encode(),
    )
    return code == 201 and json.loads(body).get("spec", {}).get("suspend") is True


def ensure_namespace(*, layout: Layout, ports: Ports, name: str) -> None:
    doc = json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    _apply(layout=layout, ports=ports, path=f"/api/v1/namespaces/{name}", doc=doc)


def prepare_kueue(*, layout: Layout, ports: Ports, dist: Path) -> list[str]:
    """Writes Kueue's config and certificate folders; returns its command line."""
    work = layout.dir / "kueue"
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.yaml"
    config.write_text(kueue_config(layout=layout, ports=ports))
    for sub in ("kueue-webhook", "kueue-metrics"):
        folder = layout.pki / sub
        folder.mkdir(mode=0o700, exist_ok=True)
        for src, dst in (("kueue-serving.crt", "tls.crt"), ("kueue-serving.key", "tls.key")):
            (folder / dst).write_bytes((layout.pki / src).read_bytes())
            os.chmod(folder / dst, 0o600)
    argv = [
        str(dist / "bin" / "kueue"),
        f"--config={config}",
        f"--kubeconfig={layout.component_kubeconfig('kueue')}",
        "--zap-log-level=info",
    ]
    if os.geteuid() != 0:
        if (KUEUE_METRICS_CERT_DIR / "tls.crt").exists():
            return argv  # someone provided the fixed metrics certificate folder
        raise ClusterError(
            f"Kueue's metrics server reads {KUEUE_METRICS_CERT_DIR} (fixed); binding this cluster's "
            "certificate there needs root (a mount namespace). Run as root, or without Kueue: FTO_KUEUE=0"
        )
    spec = {
        "mounts": [{"source": str(layout.pki / "kueue-metrics"), "target": str(KUEUE_METRICS_CERT_DIR), "readOnly": True}],
        "workingDir": str(work),
        "env": {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work)},
        "argv": argv,
        "startErrorPath": str(work / "start-error"),
    }
    (work / "exec-spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    return [sys.executable, "-I", str(ROOT / "hack" / "localcluster_exec.py"), str(work / "exec-spec.json")]


# --- JobSet --------------------------------------------------------------------------------
# The JobSet controller manager as a component, like Kueue (see the module docstring): its
# webhook configurations (failurePolicy Fail on JobSet creates and on pods of JobSets) exist
# only while it serves. Reuses Kueue's helpers: _apply, install_kueue_crds (any release's
# crds/), crds_established, wait_until.

JOBSET_KUEUE_FRAMEWORK = "jobset.x-k8s.io/jobset"
JOBSET_WEBHOOK_CONFIGS = (
    ("mutatingwebhookconfigurations", "jobset-mutating-webhook-configuration"),
    ("validatingwebhookconfigurations", "jobset-validating-webhook-configuration"),
)


def jobset_enabled() -> bool:
    """JobSet is part of the control plane unless FTO_JOBSET is 0/false/no/off."""
    return switched_on("FTO_JOBSET")


def build_jobset() -> Path:
    """hack/build-jobset.sh (cached): the folder holding bin/jobset, crds/ and webhook/."""
    return _build("build-jobset.sh").parent


def jobset_config(*, layout: Layout, ports: Ports) -> str:
    """The manager's Configuration (config.jobset.x-k8s.io/v1alpha1), as YAML-compatible JSON."""
    config = {
        "apiVersion": "config.jobset.x-k8s.io/v1alpha1",
        "kind": "Configuration",
        "webhook": {"host": "127.0.0.1", "port": ports.jobset_webhook, "certDir": str(layout.pki / "jobset-webhook")},
        "metrics": {"bindAddress": f"127.0.0.1:{ports.jobset_metrics}"},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports.jobset_health}"},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "clientConnection": {"qps": 100, "burst": 200},
    }
    return json.dumps(config, indent=2) + "\n"


def jobset_webhook_configs(
    *, manifests: str, kustomization: str, patches: dict[str, str], port: int, ca_pem: bytes
) -> list[dict[str, object]]:
    """JobSet's webhook configurations as its release installs them (named `jobset-...`, its
    kustomization's JSON6902 patches applied: the pod webhooks only for pods of JobSets), each
    clientConfig a loopback `url`. `patches`: the patch files' text by their kustomization path."""
    import yaml

    docs = [d for d in yaml.safe_load_all(manifests) if d]
    for entry in (yaml.safe_load(kustomization) or {}).get("patches", []):
        target = entry.get("target") or {}
        ops = yaml.safe_load(patches[entry["path"]]) or []
        for doc in docs:
            if doc.get("kind") != target.get("kind") or doc["metadata"]["name"] != target.get("name"):
                continue
            for op in ops:
                parts = op["path"].strip("/").split("/")
                if op["op"] not in ("replace", "add") or len(parts) != 2 or parts[0] != "webhooks":
                    raise ClusterError(f"JobSet webhook patch {entry['path']}: unsupported op {op}")
                hooks = doc["webhooks"]
                if parts[1] == "-":
                    hooks.append(op["value"])
                elif op["op"] == "replace":
                    hooks[int(parts[1])] = op["value"]
                else:
                    hooks.insert(int(parts[1]), op["value"])
    ca = base64.b64encode(ca_pem).decode()
    for doc in docs:
        for hook in doc["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": ca}
        doc["metadata"] = {"name": f"jobset-{doc['metadata']['name']}", "labels": {"app.kubernetes.io/name": "jobset"}}
    return docs


def jobset_webhook_answers(*, layout: Layout, ports: Ports) -> bool:
    """A dry-run create of a JobSet comes back with the defaults only JobSet's mutating webhook
    sets (startupPolicy, network.enableDNSHostnames): the API server reached it over TLS."""
    jobset = {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": "jobset-webhook-probe"},
        "spec": {
            "replicatedJobs": [{
                "name": "w",
                "template": {"spec": {"template": {"spec": {
                    "restartPolicy": "Never", "containers": [{"name": "c", "image": "probe", "command": ["true"]}],
                }}}},
            }],
        },
    }
    code, body = api_request(
        layout=layout, ports=ports, method="POST",
        path="/apis/jobset.x-k8s.io/v1alpha2/namespaces/default/jobsets?dryRun=All", body=json.dumps(jobset).encode(),
    )
    if code != 201:
        return False
    spec = json.loads(body).get("spec", {})
    return bool(spec.get("startupPolicy")) and (spec.get("network") or {}).get("enableDNSHostnames") is True


def prepare_jobset(*, layout: Layout, ports: Ports, dist: Path) -> list[str]:
    """Writes JobSet's config and webhook certificate folder; returns its command line."""
    work = layout.dir / "jobset"
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.yaml"
    config.write_text(jobset_config(layout=layout, ports=ports))
    folder = layout.pki / "jobset-webhook"
    folder.mkdir(mode=0o700, exist_ok=True)
    for src, dst in (("jobset-serving.crt", "tls.crt"), ("jobset-serving.key", "tls.key")):
        (folder / dst).write_bytes((layout.pki / src).read_bytes())
        os.chmod(folder / dst, 0o600)
    return [
        str(dist / "bin" / "jobset"),
        f"--config={config}",
        f"--kubeconfig={layout.component_kubeconfig('jobset')}",
        "--zap-log-level=info",
    ]


def start_jobset_prerequisites(*, layout: Layout, ports: Ports, dist: Path, timeout: float) -> list[str]:
    """What JobSet needs before it starts: stale webhooks gone (nobody answers them), its CRD
    installed and Established (its indexes need it served); returns its command line."""
    delete_webhooks(JOBSET, layout=layout, ports=ports)
    crds = install_kueue_crds(layout=layout, ports=ports, dist=dist)
    wait_until(
        functools.partial(crds_established, layout=layout, ports=ports, names=crds),
        timeout=timeout, what="JobSet's CRDs Established", layout=layout, log="kube-apiserver",
    )
    return prepare_jobset(layout=layout, ports=ports, dist=dist)


# --- controller releases as components ----------------------------------------------------
# Kueue and JobSet run the same way: a release's manager from its cached build, its webhook
# configurations (failurePolicy Fail) installed only once it serves and deleted before it
# stops, so that a stopped manager does not fail every create it would have answered.


@dataclass(frozen=True)
class Release:
    """What differs between the controller releases run as components."""

    name: str  # the component (pid file, log) and the prefix of its webhook configurations
    title: str  # in messages
    webhook_configs: tuple[tuple[str, str], ...]  # (resource, name) as installed
    webhook_port: Callable[[Ports], int]
    health_port: Callable[[Ports], int]
    # (the release's webhook/ folder, the webhook port, the CA) -> its webhook configurations
    configs: Callable[[Path, int, bytes], list[dict[str, object]]]
    answers: Callable[[Layout, Ports], bool]  # a dry run shows the webhook handled it
    answers_what: str


def install_webhooks(release: Release, *, layout: Layout, ports: Ports, dist: Path) -> None:
    configs = release.configs(dist / "webhook", release.webhook_port(ports), (layout.pki / "ca.crt").read_bytes())
    for config in configs:
        resource = f"{str(config['kind']).lower()}s"
        name = config["metadata"]["name"]  # type: ignore[index]
        _apply(layout=layout, ports=ports, path=f"/apis/admissionregistration.k8s.io/v1/{resource}/{name}", doc=json.dumps(config))


def delete_webhooks(release: Release, *, layout: Layout, ports: Ports) -> bool:
    """Deletes the release's webhook configurations; True when none is left (False: no API server)."""
    gone = True
    for resource, name in release.webhook_configs:
        code, _ = api_request(
            layout=layout, ports=ports, method="DELETE", path=f"/apis/admissionregistration.k8s.io/v1/{resource}/{name}",
            timeout=5.0,
        )
        gone = gone and code in (200, 202, 404)
    return gone


def webhooks_installed(release: Release, *, layout: Layout, ports: Ports) -> bool:
    return all(
        api_get(layout=layout, ports=ports, path=f"/apis/admissionregistration.k8s.io/v1/{resource}/{name}")[0] == 200
        for resource, name in release.webhook_configs
    )


def release_ready(release: Release, *, ports: Ports) -> bool:
    """The manager's /readyz (its webhook server started, its certificates read)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{release.health_port(ports)}/readyz", timeout=2) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def release_serving(
    release: Release, *, layout: Layout, ports: Ports, dist: Path, proc: subprocess.Popen[bytes] | None, timeout: float
) -> None:
    """The manager's /readyz answering (its CRDs installed before it started), then its webhook
    configurations installed and answering (`release.answers`); they are deleted again if they
    do not answer (never leave a webhook that does not answer)."""

    def alive() -> None:
        if proc is not None and proc.poll() is not None:
            raise ClusterError(f"{release.name} exited during start-up; see {layout.logs / (release.name + '.log')}")

    def ready() -> bool:
        alive()
        return release_ready(release, ports=ports)

    wait_until(ready, timeout=timeout, what=f"{release.title} /readyz", layout=layout, log=release.name)
    install_webhooks(release, layout=layout, ports=ports, dist=dist)

    def answers() -> bool:
        alive()
        return release.answers(layout, ports)

    try:
        wait_until(answers, timeout=max(10.0, timeout), what=f"{release.title}'s webhook ({release.answers_what})",
                   layout=layout, log=release.name)
    except ClusterError:
        delete_webhooks(release, layout=layout, ports=ports)
        raise


def _kueue_configs(webhook: Path, port: int, ca_pem: bytes) -> list[dict[str, object]]:
    return kueue_webhook_configs(
        manifests=(webhook / "manifests.yaml").read_text(), kustomization=(webhook / "kustomization.yaml").read_text(),
        port=port, ca_pem=ca_pem,
    )


def _jobset_configs(webhook: Path, port: int, ca_pem: bytes) -> list[dict[str, object]]:
    return jobset_webhook_configs(
        manifests=(webhook / "manifests.yaml").read_text(), kustomization=(webhook / "kustomization.yaml").read_text(),
        patches={f"patches/{p.name}": p.read_text() for p in sorted((webhook / "patches").glob("*.yaml"))},
        port=port, ca_pem=ca_pem,
    )


KUEUE = Release(
    name="kueue", title="Kueue", webhook_configs=KUEUE_WEBHOOK_CONFIGS,
    webhook_port=lambda ports: ports.kueue_webhook, health_port=lambda ports: ports.kueue_health,
    configs=_kueue_configs, answers=lambda layout, ports: kueue_webhook_answers(layout=layout, ports=ports),
    answers_what="a dry-run Job suspended",
)
JOBSET = Release(
    name="jobset", title="JobSet", webhook_configs=JOBSET_WEBHOOK_CONFIGS,
    webhook_port=lambda ports: ports.jobset_webhook, health_port=lambda ports: ports.jobset_health,
    configs=_jobset_configs, answers=lambda layout, ports: jobset_webhook_answers(layout=layout, ports=ports),
    answers_what="a dry-run JobSet defaulted",
)



def kueue_config_stale(*, layout: Layout, ports: Ports) -> bool:
    """Kueue runs with another config than it would get now (JobSet switched on or off)."""
    path = layout.dir / "kueue" / "config.yaml"
    try:
        return path.read_text() != kueue_config(layout=layout, ports=ports)
    except OSError:
        return False


# --- commands ------------------------------------------------------------------------------


def build_binaries() -> Path:
    """hack/build-control-plane.sh (cached): the bin folder of etcd, kube-apiserver, kcm, kubectl."""
    return _build("build-control-plane.sh")


def component_argv(*, name: str, bin_dir: Path, layout: Layout, ports: Ports, simulate: float | None) -> list[str]:
    pki = layout.pki
    if name == "etcd":
        return [
            str(bin_dir / "etcd"),
            "--name=local",
            f"--data-dir={layout.dir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{ports.etcd}",
            f"--advertise-client-urls=http://127.0.0.1:{ports.etcd}",
            f"--listen-peer-urls=http://127.0.0.1:{ports.etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{ports.etcd_peer}",
            f"--initial-cluster=local=http://127.0.0.1:{ports.etcd_peer}",
            "--listen-metrics-urls=",
            "--unsafe-no-fsync=true",  # a throwaway test cluster: speed over durability
            "--log-level=warn",
        ]
    if name == "kube-apiserver":
        return [
            str(bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{ports.etcd}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports.apiserver}",
            f"--cert-dir={pki / 'apiserver-generated'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--service-account-issuer={ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",  # so PodSecurity admission, not validation, refuses privileged pods
            f"--audit-policy-file={layout.dir / 'audit-policy.yaml'}",
            f"--audit-log-path={layout.dir / 'audit.log'}",
            "--audit-log-maxsize=200",
            "--audit-log-maxbackup=1",
            "--endpoint-reconciler-type=none",
            # `kubectl logs` reaches the pod runner's log endpoint at the node's InternalIP.
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={pki / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP",
            "--profiling=false",
            "--v=1",
        ]
    if name == "kube-controller-manager":
        kubeconfig = str(layout.component_kubeconfig("kube-controller-manager"))
        return [
            str(bin_dir / "kube-controller-manager"),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports.kcm}",
            f"--cert-dir={pki / 'kcm-generated'}",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--leader-elect=false",
            # The default 20 QPS throttles the Job controller long before the apiserver is busy.
            "--kube-api-qps=300",
            "--kube-api-burst=600",
            "--concurrent-job-syncs=10",
            "--controllers=*",
            "--profiling=false",
            "--v=1",
        ]
    if name == "podrunner":
        mode = podrunner_mode(simulate=simulate)
        argv = [
            sys.executable,
            str(ROOT / "hack" / "podrunner.py"),
            f"--kubeconfig={layout.component_kubeconfig('podrunner')}",
            f"--cluster-dir={layout.dir}",
            f"--node-name={NODE_NAME}",
            f"--kubelet-port={ports.kubelet}",
            f"--tls-dir={pki}",
        ]
        if simulate is not None:
            argv.append(f"--simulate={simulate}")
        elif mode == "container":
            argv.append("--pods=container")
        if simulate is None and os.environ.get("FTO_POD_NETWORK", "host") == "netns":
            argv.append("--pod-network=netns")  # a namespace per pod on a bridge: podrunner/podnet.py
        return argv
    raise ValueError(name)


def podrunner_mode(*, simulate: float | None) -> str:
    """What .cluster/podrunner-mode records: "real" (processes: the name tests look for),
    "container" (FTO_PODS=container) or "simulate=SECONDS"."""
    if simulate is not None:
        return f"simulate={simulate}"
    pods = os.environ.get("FTO_PODS", "process") or "process"
    if pods not in ("process", "container"):
        raise ClusterError(f"FTO_PODS={pods!r}: choose process or container")
    return "container" if pods == "container" else "real"


def up(*, layout: Layout, ports: Ports, simulate: float | None, timeout: float = 120.0) -> float:
    """Starts what is not running; returns the seconds it took."""
    started = time.monotonic()
    mode_file = layout.dir / "podrunner-mode"
    wanted_mode = podrunner_mode(simulate=simulate)
    current_mode = mode_file.read_text().strip() if mode_file.exists() else "real"
    if healthy(layout=layout, ports=ports) and current_mode == wanted_mode:
        return time.monotonic() - started
    bin_dir = build_binaries()
    kueue = kueue_enabled()
    kueue_dist = build_kueue() if kueue else None
    jobset = jobset_enabled()
    jobset_dist = build_jobset() if jobset else None
    for sub in ("bin", "logs", "volumes", "pids", "pods"):
        (layout.dir / sub).mkdir(parents=True, exist_ok=True)
    ensure_pki(pki=layout.pki)
    (layout.dir / "audit-policy.yaml").write_text(AUDIT_POLICY)
    server = f"https://127.0.0.1:{ports.apiserver}"
    write_kubeconfigs(layout=layout, server=server)
    if layout.kubectl.is_symlink() or layout.kubectl.exists():
        layout.kubectl.unlink()
    layout.kubectl.symlink_to(bin_dir / "kubectl")

    if component_alive(layout=layout, name="podrunner") and current_mode != wanted_mode:
        stop_component(layout=layout, name="podrunner")
    if kueue and component_alive(layout=layout, name="kueue") and kueue_config_stale(layout=layout, ports=ports):
        stop_component(layout=layout, name="kueue", ports=ports)  # restarted below with JobSet's integration
    own_ports = {
        "etcd": [(ports.etcd, "etcd", "FTO_ETCD_PORT"), (ports.etcd_peer, "etcd peer", "FTO_ETCD_PEER_PORT")],
        "kube-apiserver": [(ports.apiserver, "kube-apiserver", "FTO_APISERVER_PORT")],
        "kube-controller-manager": [(ports.kcm, "kube-controller-manager", "FTO_KCM_PORT")],
        "podrunner": [(ports.kubelet, "the pod runner's log endpoint", "FTO_KUBELET_PORT")],
        "kueue": [
            (ports.kueue_webhook, "Kueue's webhook server", "FTO_KUEUE_WEBHOOK_PORT"),
            (ports.kueue_metrics, "Kueue's metrics", "FTO_KUEUE_METRICS_PORT"),
            (ports.kueue_health, "Kueue's health probes", "FTO_KUEUE_HEALTH_PORT"),
        ],
        "jobset": [
            (ports.jobset_webhook, "JobSet's webhook server", "FTO_JOBSET_WEBHOOK_PORT"),
            (ports.jobset_metrics, "JobSet's metrics", "FTO_JOBSET_METRICS_PORT"),
            (ports.jobset_health, "JobSet's health probes", "FTO_JOBSET_HEALTH_PORT"),
        ],
    }
    for name in wanted_components(kueue=kueue, jobset=jobset):
        if component_alive(layout=layout, name=name):
            if name == "kueue" and kueue_dist is not None and not webhooks_installed(KUEUE, layout=layout, ports=ports):
                release_serving(KUEUE, layout=layout, ports=ports, dist=kueue_dist, proc=None, timeout=timeout)
            if name == "jobset" and jobset_dist is not None and not webhooks_installed(JOBSET, layout=layout, ports=ports):
                release_serving(JOBSET, layout=layout, ports=ports, dist=jobset_dist, proc=None, timeout=timeout)
            continue
        for port, what, env_var in own_ports[name]:
            check_port_free(port, what=what, env_var=env_var)
        env = None
        if name == "podrunner":
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            mode_file.write_text(wanted_mode + "\n")
        if name == "kueue":
            assert kueue_dist is not None
            # A Kueue that died left webhooks nobody answers (failurePolicy Fail): drop them first.
            delete_webhooks(KUEUE, layout=layout, ports=ports)
            ensure_namespace(layout=layout, ports=ports, name=KUEUE_NAMESPACE)
            # Kueue's indexes need its CRDs served before it starts.
            crds = install_kueue_crds(layout=layout, ports=ports, dist=kueue_dist)
            wait_until(
                functools.partial(crds_established, layout=layout, ports=ports, names=crds),
                timeout=max(10.0, timeout - (time.monotonic() - started)),
                what="Kueue's CRDs Established", layout=layout, log="kube-apiserver",
            )
            argv = prepare_kueue(layout=layout, ports=ports, dist=kueue_dist)
        elif name == "jobset":
            assert jobset_dist is not None
            argv = start_jobset_prerequisites(
                layout=layout, ports=ports, dist=jobset_dist, timeout=max(10.0, timeout - (time.monotonic() - started))
            )
        else:
            argv = component_argv(name=name, bin_dir=bin_dir, layout=layout, ports=ports, simulate=simulate)
        proc = start_process(layout=layout, name=name, argv=argv, env=env)
        remaining = max(10.0, timeout - (time.monotonic() - started))

        def alive_or_fail(
            check: Callable[[], bool], name: str = name, proc: subprocess.Popen[bytes] = proc
        ) -> Callable[[], bool]:
            def probe() -> bool:
                if proc.poll() is not None:
                    raise ClusterError(
                        f"{name} exited during start-up; see {layout.logs / (name + '.log')}"
                    )
                return check()

            return probe

        if name == "etcd":
            wait_until(
                alive_or_fail(lambda: tcp_open(ports.etcd)), timeout=remaining,
                what="etcd", layout=layout, log=name,
            )
        elif name == "kube-apiserver":
            wait_until(
                alive_or_fail(lambda: api_get(layout=layout, ports=ports, path="/readyz")[0] == 200),
                timeout=remaining, what="kube-apiserver /readyz", layout=layout, log=name,
            )
        elif name == "kube-controller-manager":
            wait_until(
                alive_or_fail(
                    lambda: kcm_healthy(ports=ports)
                    and api_get(layout=layout, ports=ports, path="/api/v1/namespaces/default/serviceaccounts/default")[0]
                    == 200
                ),
                timeout=remaining, what="the ServiceAccount controller (default/default)", layout=layout, log=name,
            )
        elif name == "kueue":
            assert kueue_dist is not None
            release_serving(KUEUE, layout=layout, ports=ports, dist=kueue_dist, proc=proc, timeout=remaining)
        elif name == "jobset":
            assert jobset_dist is not None
            release_serving(JOBSET, layout=layout, ports=ports, dist=jobset_dist, proc=proc, timeout=remaining)
        else:
            wait_until(
                alive_or_fail(functools.partial(node_ready, layout=layout, ports=ports, since=_now())),
                timeout=remaining, what=f"node {NODE_NAME} Ready", layout=layout, log=name,
            )
    # Everything runs; a component that runs but does not answer (hung, or started by an
    # older version with other flags) shows up here instead of as a mysterious test failure.
    deadline = time.monotonic() + 30.0
    while not healthy(layout=layout, ports=ports):
        if time.monotonic() > deadline:
            raise ClusterError(
                f"every component runs but the cluster is not healthy; see {layout.logs} "
                "(`hack/cluster.py down` then `up` restarts it)"
            )
        time.sleep(0.2)
    return time.monotonic() - started


def stop_component(*, layout: Layout, name: str, ports: Ports | None = None) -> None:
    """Stops one component by its pid file. Kueue's webhook configurations go first, while
    the API server answers (at `ports.apiserver`; if None, the port in this cluster's kubeconfig)."""
    if name == "kueue" and (layout.pki / "admin.crt").exists():
        ports = ports or _ports_of(layout=layout)
        if ports is not None:
            delete_webhooks(KUEUE, layout=layout, ports=ports)
    if name == "jobset" and (layout.pki / "admin.crt").exists():
        ports = ports or _ports_of(layout=layout)
        if ports is not None:
            delete_webhooks(JOBSET, layout=layout, ports=ports)
    pid = read_pid(layout.pidfile(name))
    if pid is not None:
        needle = {"podrunner": "podrunner.py", "session-reaper": "reap-when-unused"}.get(name, name)
        stop_pid(pid, needle=needle, grace_s=25.0 if name == "podrunner" else 10.0)
    layout.pidfile(name).unlink(missing_ok=True)


def _ports_of(*, layout: Layout) -> Ports | None:
    """The environment's ports with the API server's port this cluster's kubeconfig names."""
    try:
        server = json.loads(layout.kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
        port = int(server.rsplit(":", 1)[1].split("/")[0])
    except (OSError, ValueError, KeyError, IndexError):
        return None
    return dataclasses.replace(Ports.from_env(), apiserver=port)


def attached_processes(*, layout: Layout) -> dict[str, int]:
    """Name -> pid of the attached processes that still run (their pid file's needle matches)."""
    found = {}
    for path in sorted(layout.attached.glob("*.pid")) if layout.attached.is_dir() else []:
        pid, needle = _read_attached(path)
        if pid is not None and pid_alive(pid, needle=needle):
            found[path.stem] = pid
    return found


def _read_attached(path: Path) -> tuple[int | None, str]:
    try:
        fields = path.read_text().split()
        return int(fields[0]), fields[1]
    except (OSError, ValueError, IndexError):
        return None, ""


def stop_attached(*, layout: Layout, name: str | None = None, grace_s: float = 20.0) -> list[int]:
    """Stops the attached processes (only `name`'s when given), by pid; returns the pids it signalled."""
    stopped = []
    paths = [layout.attached / f"{name}.pid"] if name else sorted(layout.attached.glob("*.pid"))
    for path in paths if layout.attached.is_dir() else []:
        pid, needle = _read_attached(path)
        if pid is not None and pid_alive(pid, needle=needle):
            stop_pid(pid, needle=needle, grace_s=grace_s)
            stopped.append(pid)
        path.unlink(missing_ok=True)
    return stopped


def down(*, layout: Layout, ports: Ports | None = None) -> None:
    """Stops the attached processes, every process `up` started and any pod process the pod
    runner left, by pid (Kueue's webhook configurations deleted first; `ports`: see
    stop_component)."""
    stop_attached(layout=layout)
    # Where make demo kept its operator's pid before pids/attached/ (the pid alone).
    legacy = read_pid(layout.pidfile("demo-operator"))
    if legacy is not None:
        stop_pid(legacy, needle="finetune_operator", grace_s=20.0)
    layout.pidfile("demo-operator").unlink(missing_ok=True)
    for name in reversed(COMPONENTS):
        stop_component(layout=layout, name=name, ports=ports)
    pod_pids = layout.pids / "pods"
    if pod_pids.is_dir():
        for path in pod_pids.glob("*.pid"):
            pid = read_pid(path)
            if pid is not None and Path(f"/proc/{pid}").exists():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            path.unlink(missing_ok=True)


# --- sharing between test sessions ----------------------------------------------------------
# pytest sessions (tests/fixtures/cluster.py) register under .cluster/sessions/<pid>.pid; a
# cluster they started from nothing carries the marker `started-by-tests` and is stopped by
# the last session to leave, or by the reaper below if sessions die without leaving.

STARTED_BY_TESTS = "started-by-tests"


@contextlib.contextmanager
def sessions_lock(*, layout: Layout) -> Iterator[Path]:
    """Serialises test sessions deciding to start, reuse or stop the cluster."""
    sessions = layout.dir / "sessions"
    sessions.mkdir(parents=True, exist_ok=True)
    with open(sessions / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield sessions
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def live_sessions(sessions: Path) -> list[int]:
    """Registered sessions whose process still runs; forgets the others."""
    live = []
    for entry in sessions.glob("*.pid"):
        try:
            pid = int(entry.stem)
            alive = b"python" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except (ValueError, OSError):
            alive = False
        if alive:
            live.append(pid)
        else:
            entry.unlink(missing_ok=True)
    return live


def stop_if_unused(*, layout: Layout) -> bool:
    """Stops a cluster that test sessions started once none is left; True if it is (now) down."""
    with sessions_lock(layout=layout) as sessions:
        marker = sessions / STARTED_BY_TESTS
        if not marker.exists():
            return True
        if live_sessions(sessions):
            return False
        down(layout=layout)
        marker.unlink(missing_ok=True)
        return True


def reap_when_unused(*, layout: Layout, poll_s: float = 2.0) -> int:
    """Runs (detached) beside a cluster that tests started; stops it once every session is gone."""
    while not stop_if_unused(layout=layout):
        time.sleep(poll_s)
    return 0


def start_reaper(*, layout: Layout) -> None:
    if component_alive(layout=layout, name="session-reaper"):
        return
    start_process(
        layout=layout,
        name="session-reaper",
        argv=[sys.executable, str(CLUSTER_PY), "reap-when-unused", f"--dir={layout.dir}"],
    )


def status(*, layout: Layout, ports: Ports) -> int:
    ok = True
    kueue = kueue_enabled()
    for name in COMPONENTS:
        pid = component_alive(layout=layout, name=name)
        if name == "kueue" and not kueue and pid is None:
            print(f"{name:26} off (FTO_KUEUE=0)")
            continue
        if name == "jobset" and not jobset_enabled() and pid is None:
            print(f"{name:26} off (FTO_JOBSET=0)")
            continue
        ok = ok and pid is not None
        print(f"{name:26} {'running, pid ' + str(pid) if pid else 'stopped'}")
    for name, pid in attached_processes(layout=layout).items():
        print(f"{name:26} running, pid {pid} (attached: `down` stops it)")
    if ok:
        code, _ = api_get(layout=layout, ports=ports, path="/readyz")
        print(f"{'apiserver /readyz':26} {code}")
        print(f"{'node ' + NODE_NAME + ' Ready':26} {node_ready(layout=layout, ports=ports)}")
        ok = code == 200
        if kueue:
            installed = webhooks_installed(KUEUE, layout=layout, ports=ports)
            print(f"{'kueue /readyz, webhooks':26} {release_ready(KUEUE, ports=ports)}, {'installed' if installed else 'missing'}")
        if jobset_enabled():
            installed = webhooks_installed(JOBSET, layout=layout, ports=ports)
            print(f"{'jobset /readyz, webhooks':26} {release_ready(JOBSET, ports=ports)}, {'installed' if installed else 'missing'}")
    print(f"{'kubeconfig':26} {layout.kubeconfig}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hack/cluster.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "reap-when-unused"])
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("FTO_CLUSTER_DIR", ROOT / ".cluster")))
    parser.add_argument(
        "--simulate-pods", type=float, default=None, metavar="SECONDS",
        help="pod runner in simulated mode: pods succeed after SECONDS without running anything",
    )
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds `up` may take")
    args = parser.parse_args(argv)
    layout = Layout(dir=args.dir.resolve())
    ports = Ports.from_env()
    try:
        if args.command == "up":
            seconds = up(layout=layout, ports=ports, simulate=args.simulate_pods, timeout=args.timeout)
            print(f"cluster up in {seconds:.1f}s; KUBECONFIG={layout.kubeconfig} kubectl={layout.kubectl}")
            return 0
        if args.command == "down":
            down(layout=layout, ports=ports)
            print("cluster down")
            return 0
        if args.command == "reap-when-unused":
            return reap_when_unused(layout=layout)
        return status(layout=layout, ports=ports)
    except ClusterError as err:
        print(f"cluster.py: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
