"""The lab's network: its namespaces, the bridge and links between them, and `ip` run in batches."""

from __future__ import annotations

import ipaddress
import subprocess

from flambe_iac.errors import LabError
from flambe_iac.lab.model import LabState

# Every link is created inside a lab namespace (veth pairs are born in the switch namespace with their peer already
# in the member namespace), so the machine's root network namespace never changes.


def create_network(state: LabState) -> None:
    """Namespaces, a bridge in the switch namespace, and a veth from it to each member."""
    ip_batch(None, [f"netns add {name}" for name in state.namespaces])
    members = [(state.client_netns, "client", state.client_address)]
    members += [(host.netns, f"h{host.index}", host.address) for host in state.hosts]
    if state.s3_address:
        members.append((state.s3_netns, "s3", state.s3_address))
    switch = ["link add br0 type bridge", "link set br0 up"]
    for netns, port, _ in members:
        switch += [f"link add {port} type veth peer name eth0 netns {netns}",
                   f"link set {port} master br0", f"link set {port} up"]
    ip_batch(state.switch_netns, switch)
    wait_all([
        start_ip_batch(netns, [f"addr add {address}/{state.prefix_length} dev eth0",
                               "link set lo up", "link set eth0 up"])
        for netns, _, address in members
    ], "ip")


def reach_only_the_bastion(state: LabState) -> None:
    """The client's only route is to the bastion host (routes inside the client's namespace, nowhere else)."""
    network = ipaddress.ip_interface(f"{state.client_address}/{state.prefix_length}").network
    ip_batch(state.client_netns, [f"route del {network} dev eth0",
                                  f"route add {state.hosts[state.bastion].address}/32 dev eth0"])


def limit_links(state: LabState) -> None:
    """The client's link at UPLINK_MBIT, and every host's at HOST_MBIT, both ways: tbf on the member's eth0 (what it
    sends) and on the switch's port to it (what it receives), inside the lab's namespaces; tbf, since this kernel has
    no netem. Per-host links make the orchestrator's own link a bottleneck for a star fan-out, as on EC2."""
    if state.uplink_mbit:
        limit_both_ways(state, state.client_netns, "client", state.uplink_mbit)
    if state.host_mbit:
        for host in state.hosts:
            limit_both_ways(state, host.netns, f"h{host.index}", state.host_mbit)


def limit_both_ways(state: LabState, member_netns: str, switch_port: str, mbit: float) -> None:
    rate = f"{mbit:g}mbit"
    burst = f"{max(32, int(mbit * 1e6 / 8 / 100 / 1024))}kb"  # at least one timer tick's worth
    for netns, device in ((member_netns, "eth0"), (state.switch_netns, switch_port)):
        subprocess.run(["tc", "-n", netns, "qdisc", "replace", "dev", device, "root", "tbf", "rate", rate,
                        "burst", burst, "latency", "100ms"], check=True, capture_output=True)


def start_ip_batch(netns: str | None, commands: list[str]) -> subprocess.Popen:
    argv = ["ip", "-force", "-batch", "-"] if netns is None else ["ip", "-n", netns, "-force", "-batch", "-"]
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    process.stdin.write("\n".join(commands) + "\n")
    process.stdin.close()
    return process


def ip_batch(netns: str | None, commands: list[str]) -> None:
    wait_all([start_ip_batch(netns, commands)], "ip")


def wait_all(processes: list[subprocess.Popen], what: str) -> None:
    failures = []
    for process in processes:
        stderr = process.stderr.read() if process.stderr else ""
        if process.wait() != 0:
            failures.append(stderr.decode() if isinstance(stderr, bytes) else stderr)
    if failures:
        raise LabError(f"{what} failed: {failures[0].strip()}")
