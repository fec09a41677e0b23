"""Pod networking of the local pod runner (`FTO_POD_NETWORK=netns`, hack/podnet.py).

On a control plane of this module's own (no Kueue, no JobSet) whose pod runner gives each pod
a network namespace on the bridge: pods get different addresses on it, find each other by
the headless Service's names through their /etc/hosts, reach a loopback-bound listener of this
machine at the bridge address, and give namespace and address back when deleted.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.cluster import PrivateCluster, private_cluster, wait_for

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "hack"))
import podnet  # noqa: E402  (hack/podnet.py)

BRIDGE_NET = ipaddress.ip_network("10.244.0.0/24")
GATEWAY = "10.244.0.1"
NS = "default"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables") is None,
    reason="pod networking needs root, ip and iptables",
)


@pytest.fixture(scope="module")
def net_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateCluster]:
    wanted = {"FTO_POD_NETWORK": "netns", "FTO_KUEUE": "0", "FTO_JOBSET": "0"}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        with private_cluster(cluster_dir=tmp_path_factory.mktemp("podnet") / "cluster") as own:
            wait_for(
                lambda: own.get(f"/api/v1/namespaces/{NS}/serviceaccounts/default"), timeout=60, message="default SA"
            )
            yield own
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pod(name: str, *, argv: list[str], hostname: str | None = None, subdomain: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 1,
        "containers": [
            {
                "name": "main",
                "image": "ghcr.io/finetune-dev/finetune-trainer:test",
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
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": "grp"}}, "spec": spec}


def create(cluster: PrivateCluster, manifest: dict[str, Any]) -> None:
    code, answer = cluster.request("POST", f"/api/v1/namespaces/{NS}/pods", body=manifest)
    assert code == 201, (code, answer)


def pod_status(cluster: PrivateCluster, name: str) -> dict[str, Any]:
    got = cluster.get(f"/api/v1/namespaces/{NS}/pods/{name}")
    return dict((got or {}).get("status") or {})


def running_ip(cluster: PrivateCluster, name: str) -> str:
    def probe() -> str | None:
        st = pod_status(cluster, name)
        return st.get("podIP") if st.get("phase") == "Running" and st.get("podIP") != "127.0.0.1" else None

    return wait_for(probe, timeout=60, message=f"pod {name} Running with its own podIP")


def finished(cluster: PrivateCluster, name: str) -> str:
    return wait_for(
        lambda: pod_status(cluster, name).get("phase") if pod_status(cluster, name).get("phase") in (
            "Succeeded", "Failed") else None,
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


def test_pods_get_own_addresses_and_find_each_other_by_name(net_cluster: PrivateCluster) -> None:
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "grp"},
        "spec": {"clusterIP": "None", "selector": {"app": "grp"}, "ports": [{"name": "http", "port": 8080}]},
    }  # fmt: skip
    code, answer = net_cluster.request("POST", f"/api/v1/namespaces/{NS}/services", body=service)
    assert code in (201, 409), (code, answer)
    create(net_cluster, pod("server-a", argv=["python", "-c", SERVER], hostname="a", subdomain="grp"))
    ip_a = running_ip(net_cluster, "server-a")
    urls = ["http://a.grp:8080/", f"http://a.grp.{NS}.svc.cluster.local:8080/"]
    create(net_cluster, pod("client-b", argv=["python", "-c", CLIENT, *urls], hostname="b", subdomain="grp"))
    try:
        assert finished(net_cluster, "client-b") == "Succeeded", net_cluster.pod_log(
            namespace=NS, pod="client-b", container="main"
        )
        log = net_cluster.pod_log(namespace=NS, pod="client-b", container="main")
        status_b = pod_status(net_cluster, "client-b")
        ip_b = status_b.get("podIP")
        assert ip_a != ip_b
        for ip in (ip_a, ip_b):
            assert ip is not None and ipaddress.ip_address(ip) in BRIDGE_NET and ip != GATEWAY, ip
        assert status_b["podIPs"] == [{"ip": ip_b}]
        assert "hostname b\n" in log, log
        for url in urls:
            assert f"got {url} pod-a {ip_a}" in log, log  # by name, to A's own address
    finally:
        for name in ("server-a", "client-b"):
            net_cluster.request("DELETE", f"/api/v1/namespaces/{NS}/pods/{name}")


def test_pod_reaches_a_loopback_listener_at_the_bridge_address(net_cluster: PrivateCluster) -> None:
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
        create(net_cluster, pod("to-host", argv=["python", "-c", CLIENT, url]))
        assert finished(net_cluster, "to-host") == "Succeeded", net_cluster.pod_log(
            namespace=NS, pod="to-host", container="main"
        )
        ip = pod_status(net_cluster, "to-host")["podIP"]
        assert pod_status(net_cluster, "to-host")["hostIP"] == GATEWAY
        assert (ip, "/from-pod") in seen, (ip, seen)  # from the pod's own address, not loopback
    finally:
        server.shutdown()
        net_cluster.request("DELETE", f"/api/v1/namespaces/{NS}/pods/to-host")


def test_deleted_pod_gives_back_namespace_and_address(net_cluster: PrivateCluster) -> None:
    create(net_cluster, pod("sleeper", argv=["python", "-c", "import time; time.sleep(600)"]))
    ip = running_ip(net_cluster, "sleeper")
    uid = net_cluster.get(f"/api/v1/namespaces/{NS}/pods/sleeper")["metadata"]["uid"]  # type: ignore[index]
    netns, host_veth = podnet.PodNetwork(cluster_dir=net_cluster.dir).names(uid)
    ipam = net_cluster.dir / "podnet" / "ipam.json"

    def netns_list() -> list[str]:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True, timeout=10).stdout
        return [line.split()[0] for line in out.splitlines() if line.split()]

    assert netns in netns_list()
    assert json.loads(ipam.read_text()).get(ip) == uid
    code, _ = net_cluster.request("DELETE", f"/api/v1/namespaces/{NS}/pods/sleeper")
    assert code == 200
    wait_for(
        lambda: net_cluster.get(f"/api/v1/namespaces/{NS}/pods/sleeper") is None, timeout=60, message="pod removed"
    )
    wait_for(lambda: netns not in netns_list(), timeout=10, message=f"netns {netns} deleted")
    assert ip not in json.loads(ipam.read_text())
    gone = subprocess.run(["ip", "link", "show", host_veth], capture_output=True, check=False, timeout=10)
    assert gone.returncode != 0
