"""Pod networking for the local pod runner (`FTO_POD_NETWORK=netns`): a CNI and cluster DNS in small.

Dev and test tooling for the project's own test hosts, not the product; needs root. With it,
hack/podrunner.py gives each pod:

- a network namespace of its own (`ip netns add <bridge>-<hash of uid>`), loopback up, and an
  `eth0` (one end of a veth pair) whose host end is a port of the bridge this module creates
  (default `fto0`, 10.244.0.1/24 on the host side);
- an address from a small IPAM (a JSON file in the cluster dir: ip -> pod uid), given back when
  the pod goes; `status.podIP`/`podIPs` (and fieldRef `status.podIP`) show it;
- a default route via the bridge address, which is how pods reach the host. Traffic from the
  bridge to 10.244.0.1 is DNATed to 127.0.0.1 (`route_localnet` on the bridge), so services
  that listen on loopback only (the API server, the operator's progress endpoint, any test
  listener) are reached at 10.244.0.1:<their port> without listening anywhere else. In this
  mode `KUBERNETES_SERVICE_HOST` and `status.hostIP` are 10.244.0.1, and the operator's
  progress URL must name 10.244.0.1 (not 127.0.0.1, which is the pod's own loopback);
- its hostname (spec.hostname, else the pod name; in a UTS namespace of its own, see
  `enter` below) and an /etc/hosts written per pod, as the kubelet and cluster DNS would make
  resolvable: localhost, its own `<hostname>.<subdomain>.<namespace>.svc.cluster.local`,
  `<hostname>.<subdomain>` and `<hostname>`, and the same names of every other pod this runner
  runs in the same namespace with the same spec.subdomain (the headless Service that JobSet or
  an Indexed Job's subdomain names). Each file is rewritten in place (the bind mount stays
  valid) whenever such a pod gets or gives back its address. What is left out: no Service
  ClusterIPs, no DNS server (names other than these do not resolve), no NetworkPolicy, IPv4
  only, one bridge per host (one cluster in netns mode at a time: a second pod runner is
  refused while the first lives, see `PodNetwork.setup`).

In container mode (FTO_PODS=container) podman joins the same namespace
(`--network ns:/run/netns/<ns>`), sets the hostname itself (`--hostname`) and gets the hosts
file as a read-only bind mount over /etc/hosts.

`python podnet.py enter --hostname NAME -- ARGV...` is run by the pod runner inside
`ip netns exec <ns>`: it unshares the UTS namespace, sets the hostname and execs ARGV in place
(the pid stays the container's).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import ipaddress
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWUTS = 0x04000000
CLUSTER_DOMAIN = "cluster.local"
OWNER_DIR = Path("/run/fto-podnet")  # <bridge>.owner: the pod runner that holds the bridge


class NetworkError(Exception):
    """The pod network could not be set up (an `ip`/`iptables` command failed)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if check and done.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


@dataclass(frozen=True)
class PodAddress:
    """One pod's place on the bridge."""

    uid: str
    netns: str
    ip: str
    host_veth: str


@dataclass(frozen=True)
class HostsEntry:
    """What one pod contributes to the hosts files of its subdomain."""

    uid: str
    namespace: str
    hostname: str
    subdomain: str
    ip: str


def read_owner(path: Path) -> tuple[int, str] | None:
    """(pid, cluster dir) from a bridge's owner file, or None when there is none (or it is garbled)."""
    try:
        data = json.loads(path.read_text())
        return int(data["pid"]), str(data["clusterDir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pod_runner_alive(pid: int) -> bool:
    """Whether `pid` is a live pod runner (not a reused pid of something else)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"podrunner" in cmdline


def pod_hostname(*, pod: dict[str, object]) -> str:
    """spec.hostname, else the pod's name, cut to 63 characters as the kubelet does."""
    spec = pod.get("spec") or {}
    meta = pod.get("metadata") or {}
    assert isinstance(spec, dict) and isinstance(meta, dict)
    return str(spec.get("hostname") or meta["name"])[:63]


def hosts_file_text(*, own: HostsEntry, peers: Iterable[HostsEntry]) -> str:
    """The /etc/hosts of `own`: localhost, then its own names, then its subdomain's other pods."""
    lines = [
        "# Kubernetes-managed hosts file (hack/finetune_testbed/podrunner/podnet.py).",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
    ]
    for entry in [own, *sorted((p for p in peers if p.uid != own.uid), key=lambda p: (p.hostname, p.ip))]:
        names = []
        if entry.subdomain:
            names += [
                f"{entry.hostname}.{entry.subdomain}.{entry.namespace}.svc.{CLUSTER_DOMAIN}",
                f"{entry.hostname}.{entry.subdomain}",
            ]
        names.append(entry.hostname)
        lines.append(f"{entry.ip}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"


class PodNetwork:
    """The bridge, the IPAM and each pod's namespace; see the module docstring."""

    def __init__(self, *, cluster_dir: Path, bridge: str = "fto0", cidr: str = "10.244.0.0/24") -> None:
        self.bridge = bridge
        self.net = ipaddress.ip_network(cidr)
        hosts = list(self.net.hosts())
        self.gateway = str(hosts[0])
        self.pool = [str(h) for h in hosts[1:]]
        self.dir = cluster_dir / "podnet"
        self.ipam_path = self.dir / "ipam.json"
        self.cluster_dir = cluster_dir.resolve()
        self.owner_path = OWNER_DIR / f"{bridge}.owner"
        self.lock = threading.Lock()
        self.pods: dict[str, PodAddress] = {}
        self.entries: dict[str, HostsEntry] = {}

    # -- the bridge --

    def setup(self) -> None:
        """Creates (or takes over) the bridge and the DNAT rule; forgets every namespace left
        by an earlier runner with this bridge's prefix. Refused (NetworkError) while the pod
        runner of another cluster dir, alive, owns the bridge: taking it over would delete
        that cluster's pod namespaces."""
        self._claim()
        (self.dir / "hosts").mkdir(parents=True, exist_ok=True)
        for line in _ip("netns", "list").stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith(f"{self.bridge}-"):
                _ip("netns", "del", name, check=False)
        self.ipam_path.write_text("{}\n")
        if _ip("link", "show", self.bridge, check=False).returncode != 0:
            _ip("link", "add", self.bridge, "type", "bridge")
        address = f"{self.gateway}/{self.net.prefixlen}"
        if address not in _ip("-4", "addr", "show", "dev", self.bridge).stdout:
            _ip("addr", "add", address, "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        Path(f"/proc/sys/net/ipv4/conf/{self.bridge}/route_localnet").write_text("1\n")
        rule = ["-t", "nat", "PREROUTING", "-i", self.bridge, "-d", self.gateway, "-p", "tcp",
                "-j", "DNAT", "--to-destination", "127.0.0.1"]  # fmt: skip
        check = subprocess.run(
            ["iptables", rule[0], rule[1], "-C", *rule[2:]], capture_output=True, check=False
        )
        if check.returncode != 0:
            added = subprocess.run(
                ["iptables", rule[0], rule[1], "-A", *rule[2:]], capture_output=True, text=True, check=False
            )
            if added.returncode != 0:
                raise NetworkError(f"iptables -A PREROUTING DNAT: {added.stderr.strip()}")

    # -- IPAM --

    def _allocate(self, uid: str) -> str:
        table: dict[str, str] = json.loads(self.ipam_path.read_text() or "{}")
        for ip, owner in table.items():
            if owner == uid:
                return ip
        free = next((ip for ip in self.pool if ip not in table), None)
        if free is None:
            raise NetworkError(f"no free address in {self.net}")
        table[free] = uid
        self.ipam_path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        return free

    def _release(self, uid: str) -> None:
        table: dict[str, str] = json.loads(self.ipam_path.read_text() or "{}")
        table = {ip: owner for ip, owner in table.items() if owner != uid}
        self.ipam_path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")

    def allocated(self) -> dict[str, str]:
        """The IPAM's table: ip -> pod uid."""
        with self.lock:
            table: dict[str, str] = json.loads(self.ipam_path.read_text() or "{}")
            return table

    # -- pods --

    def names(self, uid: str) -> tuple[str, str]:
        tag = hashlib.sha256(uid.encode()).hexdigest()[:10]
        return f"{self.bridge}-{tag}", f"vh{tag}"

    def hosts_path(self, uid: str) -> Path:
        return self.dir / "hosts" / uid

    def attach(self, *, pod: dict[str, object]) -> PodAddress:
        """The pod's namespace, veth, address, route and hosts file (idempotent)."""
        meta = pod["metadata"]
        spec = pod.get("spec") or {}
        assert isinstance(meta, dict) and isinstance(spec, dict)
        uid = str(meta["uid"])
        with self.lock:
            if uid in self.pods:
                return self.pods[uid]
            netns, host_veth = self.names(uid)
            ip = self._allocate(uid)
            try:
                _ip("netns", "del", netns, check=False)
                _ip("link", "del", host_veth, check=False)
                _ip("netns", "add", netns)
                _ip("link", "add", host_veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
                _ip("link", "set", host_veth, "master", self.bridge, "up")
                _ip("-n", netns, "link", "set", "lo", "up")
                _ip("-n", netns, "addr", "add", f"{ip}/{self.net.prefixlen}", "dev", "eth0")
                _ip("-n", netns, "link", "set", "eth0", "up")
                _ip("-n", netns, "route", "add", "default", "via", self.gateway)
            except NetworkError:
                _ip("netns", "del", netns, check=False)
                _ip("link", "del", host_veth, check=False)
                self._release(uid)
                raise
            address = PodAddress(uid=uid, netns=netns, ip=ip, host_veth=host_veth)
            self.pods[uid] = address
            self.entries[uid] = HostsEntry(
                uid=uid, namespace=str(meta["namespace"]), hostname=pod_hostname(pod=pod),
                subdomain=str(spec.get("subdomain") or ""), ip=ip,
            )  # fmt: skip
            self._refresh(self.entries[uid])
            return address

    def detach(self, *, uid: str) -> None:
        """Deletes the pod's namespace (its veth goes with it) and gives its address back."""
        with self.lock:
            address = self.pods.pop(uid, None)
            entry = self.entries.pop(uid, None)
            netns, host_veth = self.names(uid)
            _ip("netns", "del", netns, check=False)
            _ip("link", "del", host_veth, check=False)
            self._release(uid)
            self.hosts_path(uid).unlink(missing_ok=True)
            if address is not None and entry is not None:
                self._refresh(entry)

    def shutdown(self) -> None:
        for uid in list(self.pods):
            self.detach(uid=uid)
        owner = read_owner(self.owner_path)
        if owner is not None and owner[0] == os.getpid():
            self.owner_path.unlink(missing_ok=True)

    def _claim(self) -> None:
        owner = read_owner(self.owner_path)
        if owner is not None:
            pid, cluster_dir = owner
            if pid != os.getpid() and cluster_dir != str(self.cluster_dir) and pod_runner_alive(pid):
                raise NetworkError(
                    f"bridge {self.bridge} is in use by the pod runner of {cluster_dir} (pid {pid}): "
                    "one cluster in netns mode at a time; stop that one first"
                )
        OWNER_DIR.mkdir(parents=True, exist_ok=True)
        tmp = self.owner_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "clusterDir": str(self.cluster_dir)}) + "\n")
        tmp.replace(self.owner_path)

    def _refresh(self, changed: HostsEntry) -> None:
        """Rewrites, in place, the hosts file of every pod in `changed`'s namespace and subdomain."""
        for entry in self.entries.values():
            if entry.uid != changed.uid and (
                not changed.subdomain
                or (entry.namespace, entry.subdomain) != (changed.namespace, changed.subdomain)
            ):
                continue
            peers = [
                p for p in self.entries.values()
                if entry.subdomain and (p.namespace, p.subdomain) == (entry.namespace, entry.subdomain)
            ]  # fmt: skip
            path = self.hosts_path(entry.uid)
            text = hosts_file_text(own=entry, peers=peers).encode()
            with open(path, "ab") as f:  # same inode: a bind mount of it keeps seeing the new text
                f.truncate(0)
                f.write(text)
            os.chmod(path, 0o644)

    def exec_prefix(self, *, uid: str, hostname: str) -> list[str]:
        """What to run a container's process under: its namespace, then its hostname."""
        netns, _ = self.names(uid)
        return ["ip", "netns", "exec", netns, sys.executable, "-I", str(Path(__file__).resolve()),
                "enter", "--hostname", hostname, "--"]  # fmt: skip


def enter(*, hostname: str, argv: Sequence[str]) -> None:
    """A UTS namespace with `hostname`, then exec `argv` (never returns)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.unshare(CLONE_NEWUTS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUTS)")
    name = hostname.encode()
    if libc.sethostname(name, len(name)) != 0:
        raise OSError(ctypes.get_errno(), "sethostname")
    os.execvp(argv[0], list(argv))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) >= 4 and args[0] == "enter" and args[1] == "--hostname" and args[3] == "--" and args[4:]:
        try:
            enter(hostname=args[2], argv=args[4:])
        except OSError as err:
            print(f"podnet enter: {err}", file=sys.stderr)
            return 128
    print("usage: podnet.py enter --hostname NAME -- ARGV...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
