"""A Ray cluster of several network hosts on one machine: Linux network namespaces joined
by veth pairs on a private bridge, a Ray node in each.

The namespaces get addresses from one /24 that no interface of this machine uses, chosen
and removed by the cluster itself. They have no route but their own subnet, so nothing
they run reaches anything but each other and the bridge's address in the root namespace.
Teardown kills exactly the processes inside the cluster's namespaces (`ip netns pids`),
then deletes the namespaces, their veth pairs and the bridge.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

_CLUSTERS = itertools.count()
RAY_PORT = 6379
CLIENT_PORT = 10001

# Environment of every Ray process and driver of the cluster: nothing phones home, no token
# to pass around on a throwaway private network, and a lost node is noticed within seconds.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "4",
    "RAY_health_check_initial_delay_ms": "1000",
    "PYTHONUNBUFFERED": "1",
}


def unavailable() -> Optional[str]:
    """Why network namespaces cannot be made here, or None when they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if shutil.which("ip") is None:
        return "iproute2's `ip` command is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"slprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class Node:
    name: str
    namespace: str
    ip: str
    resources: dict
    num_cpus: int
    temp_dir: str
    veth: str = ""


@dataclass
class NetnsCluster:
    """Ray nodes in network namespaces: `nodes` maps a node name to its custom resources;
    the first node is the head. Use as a context manager (teardown also on error)."""

    nodes: dict
    num_cpus: int = 1
    object_store_bytes: int = 150 * 2**20
    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000:05d}{next(_CLUSTERS) % 100:02d}")  # unique per live cluster
    members: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bridge = f"slbr{self.tag}"
        self.root = tempfile.mkdtemp(prefix="slnet", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        self.subnet = _free_subnet()
        hosts = list(self.subnet.hosts())
        self.bridge_ip = str(hosts[0])
        for i, (name, resources) in enumerate(self.nodes.items()):
            self.members[name] = Node(
                name, f"sl{self.tag}n{i}", str(hosts[i + 1]), dict(resources), self.num_cpus,
                os.path.join(self.root, name), veth=f"slv{self.tag}{i}",
            )

    # ------------------------------------------------------------------ set-up

    def __enter__(self) -> "NetnsCluster":
        try:
            self._network()
            for i, node in enumerate(self.members.values()):
                self._start(node, head=i == 0)
            self.wait_for_nodes(len(self.members))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _network(self) -> None:
        prefix = self.subnet.prefixlen
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.bridge_ip}/{prefix}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for node in self.members.values():
            _ip("netns", "add", node.namespace)
            _ip("link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", node.namespace)
            _ip("link", "set", node.veth, "master", self.bridge, "up")
            _ip("-n", node.namespace, "addr", "add", f"{node.ip}/{prefix}", "dev", "eth0")
            _ip("-n", node.namespace, "link", "set", "eth0", "up")
            _ip("-n", node.namespace, "link", "set", "lo", "up")

    @property
    def head(self) -> Node:
        return next(iter(self.members.values()))

    @property
    def address(self) -> str:
        return f"{self.head.ip}:{RAY_PORT}"

    @property
    def client_address(self) -> str:
        return f"ray://{self.head.ip}:{CLIENT_PORT}"

    def _start(self, node: Node, head: bool) -> None:
        command = [
            _ray(), "start", "--node-ip-address", node.ip, "--num-cpus", str(node.num_cpus), "--num-gpus", "0",
            "--resources", json.dumps(node.resources), "--temp-dir", node.temp_dir,
            "--object-store-memory", str(self.object_store_bytes), "--disable-usage-stats",
        ]
        if head:
            command += ["--head", "--port", str(RAY_PORT), "--include-dashboard", "false", "--ray-client-server-port", str(CLIENT_PORT)]
        else:
            command += ["--address", self.address]
        done = self.run(node.name, command, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"ray start on {node.name} ({node.ip}) failed:\n{done.stdout}\n{done.stderr}")

    def env(self) -> dict:
        return {**os.environ, **RAY_ENV}

    def _in(self, node: Optional[str], command: list) -> list:
        """`command` run in a node's namespace (None: the root namespace)."""
        return list(command) if node is None else ["ip", "netns", "exec", self.members[node].namespace, *command]

    def run(self, node: Optional[str], command: list, timeout: float = 300, **kwargs: object) -> subprocess.CompletedProcess:
        """Run a command in a node's namespace (None: the root namespace) with the cluster's environment."""
        return subprocess.run(self._in(node, command), capture_output=True, text=True, timeout=timeout, env=self.env(), **kwargs)

    def popen(self, node: Optional[str], command: list, **kwargs: object) -> subprocess.Popen:
        return subprocess.Popen(self._in(node, command), env=self.env(), text=True, **kwargs)

    def wait_for_nodes(self, count: int, timeout: float = 60) -> None:
        """Until the head sees `count` live nodes."""
        probe = f"import ray; ray.init(address='{self.address}', log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))"
        deadline = time.monotonic() + timeout
        seen = "nothing"
        while time.monotonic() < deadline:
            done = self.run(self.head.name, [sys.executable, "-c", probe], timeout=60, cwd=self.head.temp_dir)
            seen = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
            if seen == str(count):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the Ray cluster did not reach {count} live nodes in {timeout:.0f} s; last saw {seen}")

    # ------------------------------------------------------------------ faults

    def raylet_pid(self, node: str) -> int:
        """The pid of a node's raylet (found among the processes in its namespace)."""
        for pid in self.pids(node):
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if name == "raylet":
                return pid
        raise RuntimeError(f"no raylet runs in {node}'s namespace")

    def pids(self, node: str) -> list[int]:
        listed = subprocess.run(["ip", "netns", "pids", self.members[node].namespace], capture_output=True, text=True)
        return [int(p) for p in listed.stdout.split()]

    def kill_node(self, node: str) -> None:
        """Kill every process of a node (its raylet first): what a crashed host looks like."""
        os.kill(self.raylet_pid(node), signal.SIGKILL)
        for pid in self.pids(node):
            _kill(pid)

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Kill the cluster's processes, delete its namespaces, veths and bridge, and its files."""
        for node in self.members.values():
            if _exists(node.namespace):
                for pid in self.pids(node.name):
                    _kill(pid)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(self.pids(n) for n in self.members if _exists(self.members[n].namespace)):
            time.sleep(0.1)
        for node in self.members.values():
            subprocess.run(["ip", "link", "del", node.veth], capture_output=True)
            subprocess.run(["ip", "netns", "del", node.namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 of 10.213.0.0/16 that no interface or route of this machine touches."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    used += subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    taken = []
    for word in used.split():
        try:
            taken.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            continue
    for third in random.sample(range(1, 255), 254):
        subnet = ipaddress.ip_network(f"10.213.{third}.0/24")
        if not any(subnet.overlaps(net) for net in taken if net.prefixlen > 0):
            return subnet
    raise RuntimeError("no free /24 in 10.213.0.0/16 for the test cluster")


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _exists(namespace: str) -> bool:
    return os.path.exists(f"/var/run/netns/{namespace}")


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _ray() -> str:
    return str(Path(sys.executable).with_name("ray"))
