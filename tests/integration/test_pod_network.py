"""Pod networking of the local pod runner (`FTO_POD_NETWORK=netns`, hack/podnet.py).

On a control plane of this module's own (no Kueue, no JobSet) whose pod runner gives each pod
a network namespace on the bridge, once with pods as processes (FTO_PODS=process) and once as
podman + runc containers (FTO_PODS=container, the trainer image of `make images` joined to the
pod's namespace with `--network ns:`): pods get different addresses on it, their hostnames,
find each other by the headless Service's names through their /etc/hosts, reach a
loopback-bound listener of this machine and the API server (TLS verified with the pod's
ServiceAccount CA and token) at the bridge address, and give namespace and address back when
deleted. The two clusters run one after the other (one bridge per host).
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from finetune_testbed.podrunner import podnet
from fixtures.cluster import PrivateCluster, private_cluster, wait_for

ROOT = Path(__file__).resolve().parents[2]

BRIDGE_NET = ipaddress.ip_network("10.244.0.0/24")
GATEWAY = "10.244.0.1"
NS = "default"
PROCESS_IMAGE = "ghcr.io/finetune-dev/finetune-trainer:test"  # process mode: the local finetune-train
CONTAINER_IMAGE = "localhost/finetune-trainer:dev"  # container mode: `make images`
CONTAINERS_CONF = ROOT / "hack" / "containers" / "containers.conf"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables") is None,
    reason="pod networking needs root, ip and iptables",
)


@dataclass(frozen=True)
class NetBed:
    """A netns cluster and the image its pods run (its pod runner's mode decides which)."""

    cluster: PrivateCluster
    mode: str
    image: str


def container_image_missing() -> str | None:
    """Why container mode cannot run here, or None."""
    if shutil.which("podman") is None:
        return "container mode needs podman (make deps-debian)"
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    found = subprocess.run(["podman", "image", "exists", CONTAINER_IMAGE], env=env, check=False, timeout=60)
    return None if found.returncode == 0 else f"{CONTAINER_IMAGE} is not built (make images)"


@pytest.fixture(scope="module", params=["process", "container"])
def net_bed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetBed]:
    mode = str(request.param)
    if mode == "container" and (why := container_image_missing()):
        pytest.skip(why)
    wanted = {"FTO_POD_NETWORK": "netns", "FTO_PODS": mode, "FTO_KUEUE": "0", "FTO_JOBSET": "0"}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        with private_cluster(cluster_dir=tmp_path_factory.mktemp(f"podnet-{mode}") / "cluster") as own:
            assert (own.dir / "podrunner-mode").read_text().strip() == ("real" if mode == "process" else mode)
            wait_for(
                lambda: own.get(f"/api/v1/namespaces/{NS}/serviceaccounts/default"),
                timeout=60,
                message="default SA",
            )
            yield NetBed(
                cluster=own, mode=mode, image=PROCESS_IMAGE if mode == "process" else CONTAINER_IMAGE
            )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pod(
    bed: NetBed, name: str, *, argv: list[str], hostname: str | None = None, subdomain: str | None = None,
    token: bool = False,
) -> dict[str, Any]:  # fmt: skip
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": token,
        "terminationGracePeriodSeconds": 1,
        "containers": [
            {
                "name": "main",
                "image": bed.image,
                "imagePullPolicy": "Never" if bed.mode == "container" else "IfNotPresent",
                "command": argv,
                "env": [
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                ],
            }
        ],
    }
    if hostname:
        spec["hostname"] = hostname
    if subdomain:
        spec["subdomain"] = subdomain
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "grp"}},
        "spec": spec,
    }


def create(bed: NetBed, manifest: dict[str, Any]) -> None:
    code, answer = bed.cluster.request("POST", f"/api/v1/namespaces/{NS}/pods", body=manifest)
    assert code == 201, (code, answer)


def delete(bed: NetBed, *names: str) -> None:
    for name in names:
        bed.cluster.request("DELETE", f"/api/v1/namespaces/{NS}/pods/{name}")


def pod_status(bed: NetBed, name: str) -> dict[str, Any]:
    got = bed.cluster.get(f"/api/v1/namespaces/{NS}/pods/{name}")
    return dict((got or {}).get("status") or {})


def log_of(bed: NetBed, name: str) -> str:
    return bed.cluster.pod_log(namespace=NS, pod=name, container="main")


def running_ip(bed: NetBed, name: str) -> str:
    def probe() -> str | None:
        st = pod_status(bed, name)
        return st.get("podIP") if st.get("phase") == "Running" and st.get("podIP") != "127.0.0.1" else None

    return wait_for(probe, timeout=60, message=f"pod {name} Running with its own podIP")


def finished(bed: NetBed, name: str) -> str:
    return wait_for(
        lambda: str(phase) if (phase := pod_status(bed, name).get("phase")) in ("Succeeded", "Failed") else None,
        timeout=90, message=f"pod {name} finished",
    )  # fmt: skip


# A bounded client: 60 tries, 0.5 s apart, then it gives up (exit 1).
CLIENT = """
import os, socket, sys, time, urllib.request
print("hostname", socket.gethostname(), flush=True)
for url in sys.argv[1:]:
    for _ in range(60):
        try:
            body = urllib.request.urlopen(url, timeout=2).read().decode()
            print("got", url, body.strip(), flush=True)
            break
        except OSError as err:
            last = err
            time.sleep(0.5)
    else:
        print("failed", url, last, flush=True)
        sys.exit(1)
"""

SERVER = """
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("pod-a " + os.environ["POD_IP"]).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer((os.environ["POD_IP"], 8080), H).serve_forever()
"""

# The API server as an in-cluster client reaches it: KUBERNETES_SERVICE_HOST/PORT, the
# ServiceAccount's CA (hostname verification on) and token.
API_CLIENT = """
import json, os, ssl, urllib.request
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
ctx = ssl.create_default_context(cafile=f"{sa}/ca.crt")
token = open(f"{sa}/token").read().strip()
req = urllib.request.Request(f"https://{host}:{port}/version", headers={"Authorization": f"Bearer {token}"})
with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
    print("api", host, resp.status, json.load(resp)["gitVersion"], flush=True)
"""


def test_pods_get_own_addresses_and_find_each_other_by_name(net_bed: NetBed) -> None:
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "grp"},
        "spec": {"clusterIP": "None", "selector": {"app": "grp"}, "ports": [{"name": "http", "port": 8080}]},
    }  # fmt: skip
    code, answer = net_bed.cluster.request("POST", f"/api/v1/namespaces/{NS}/services", body=service)
    assert code in (201, 409), (code, answer)
    create(net_bed, pod(net_bed, "server-a", argv=["python", "-c", SERVER], hostname="a", subdomain="grp"))
    try:
        ip_a = running_ip(net_bed, "server-a")
        urls = ["http://a.grp:8080/", f"http://a.grp.{NS}.svc.cluster.local:8080/"]
        create(
            net_bed,
            pod(net_bed, "client-b", argv=["python", "-c", CLIENT, *urls], hostname="b", subdomain="grp"),
        )
        assert finished(net_bed, "client-b") == "Succeeded", log_of(net_bed, "client-b")
        log = log_of(net_bed, "client-b")
        status_b = pod_status(net_bed, "client-b")
        ip_b = status_b.get("podIP")
        assert ip_a != ip_b
        for ip in (ip_a, ip_b):
            assert ip is not None and ipaddress.ip_address(ip) in BRIDGE_NET and ip != GATEWAY, ip
        assert status_b["podIPs"] == [{"ip": ip_b}]
        assert "hostname b\n" in log, log
        for url in urls:
            assert f"got {url} pod-a {ip_a}" in log, log  # by name, to A's own address
        if net_bed.mode == "container":
            (main,) = status_b["containerStatuses"]
            assert main["containerID"].startswith("podman://"), main  # really a container, not a process
    finally:
        delete(net_bed, "server-a", "client-b")


def test_pod_reaches_a_loopback_listener_and_the_api_server_at_the_bridge_address(net_bed: NetBed) -> None:
    seen: list[tuple[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append((self.client_address[0], self.path))
            body = b"host"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # loopback only
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://{GATEWAY}:{port}/from-pod"
        create(net_bed, pod(net_bed, "to-host", argv=["python", "-c", CLIENT, url]))
        create(net_bed, pod(net_bed, "to-api", argv=["python", "-c", API_CLIENT], token=True))
        assert finished(net_bed, "to-host") == "Succeeded", log_of(net_bed, "to-host")
        ip = pod_status(net_bed, "to-host")["podIP"]
        assert pod_status(net_bed, "to-host")["hostIP"] == GATEWAY
        assert (ip, "/from-pod") in seen, (ip, seen)  # from the pod's own address, not loopback
        assert finished(net_bed, "to-api") == "Succeeded", log_of(net_bed, "to-api")
        assert f"api {GATEWAY} 200 v1." in log_of(net_bed, "to-api"), log_of(net_bed, "to-api")
    finally:
        server.shutdown()
        delete(net_bed, "to-host", "to-api")


def test_deleted_pod_gives_back_namespace_and_address(net_bed: NetBed) -> None:
    create(net_bed, pod(net_bed, "sleeper", argv=["python", "-c", "import time; time.sleep(600)"]))
    ip = running_ip(net_bed, "sleeper")
    uid = net_bed.cluster.get(f"/api/v1/namespaces/{NS}/pods/sleeper")["metadata"]["uid"]  # type: ignore[index]
    netns, host_veth = podnet.PodNetwork(cluster_dir=net_bed.cluster.dir).names(uid)
    ipam = net_bed.cluster.dir / "podnet" / "ipam.json"

    def netns_list() -> list[str]:
        out = subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=True, timeout=10
        ).stdout
        return [line.split()[0] for line in out.splitlines() if line.split()]

    assert netns in netns_list()
    assert json.loads(ipam.read_text()).get(ip) == uid
    code, _ = net_bed.cluster.request("DELETE", f"/api/v1/namespaces/{NS}/pods/sleeper")
    assert code == 200
    wait_for(
        lambda: net_bed.cluster.get(f"/api/v1/namespaces/{NS}/pods/sleeper") is None, timeout=60,
        message="pod removed",
    )  # fmt: skip
    wait_for(lambda: netns not in netns_list(), timeout=10, message=f"netns {netns} deleted")
    assert ip not in json.loads(ipam.read_text())
    gone = subprocess.run(["ip", "link", "show", host_veth], capture_output=True, check=False, timeout=10)
    assert gone.returncode != 0


def test_api_server_certificate_names_the_bridge_address_also_when_issued_before(tmp_path: Path) -> None:
    """A PKI made before the bridge address was among the names gets its serving cert issued again."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from finetune_testbed import cluster as mod

    pki = tmp_path / "pki"
    mod.ensure_pki(pki=pki)

    def names() -> set[str]:
        cert = x509.load_pem_x509_certificate((pki / "apiserver.crt").read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}

    assert GATEWAY in names()
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    old = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(ca.not_valid_before_utc)
        .not_valid_after(ca.not_valid_after_utc)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    (pki / "apiserver.crt").write_bytes(old.public_bytes(serialization.Encoding.PEM))
    assert GATEWAY not in names()
    admin = (pki / "admin.crt").read_bytes()
    mod.ensure_pki(pki=pki)
    assert GATEWAY in names() and "127.0.0.1" in names()
    assert (pki / "admin.crt").read_bytes() == admin  # the others are kept


def test_a_second_cluster_cannot_take_the_bridge_while_the_first_runs(
    net_bed: NetBed, tmp_path: Path
) -> None:
    """Taking the bridge over would delete the running cluster's pod namespaces: refused."""
    owner = podnet.read_owner(podnet.OWNER_DIR / "fto0.owner")
    assert owner is not None and owner[1] == str(net_bed.cluster.dir.resolve()), owner
    assert podnet.pod_runner_alive(owner[0])
    with pytest.raises(
        podnet.NetworkError, match=r"bridge fto0 is in use by the pod runner of .* \(pid \d+\)"
    ):
        podnet.PodNetwork(cluster_dir=tmp_path / "other").setup()
    assert not (tmp_path / "other").exists()  # nothing of the second one was made
