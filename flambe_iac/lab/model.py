"""The lab's model: its hosts, its saved state, its plan from the inputs, and the faults a host can be made with."""

from __future__ import annotations

import ipaddress
import itertools
import json
import pwd
import re
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from flambe_iac.cluster import FACTORY, ORCHESTRATOR, Cluster, Host
from flambe_iac.errors import InputError
from flambe_iac.names import SSH_USER
from flambe_iac.local_files import write_json_atomically

# Layout of one lab (all names carry the lab's random id, so labs never collide):
#
#     flambe-<id>-sw       switch namespace, holds the bridge br0
#     flambe-<id>-client   where flambe-deploy runs (`flambe-lab exec`)
#     flambe-<id>-h<i>     host i: its own network, mount, UTS and PID namespaces, running sshd (its PID 1)
NETNS_PREFIX = "flambe-"
DEFAULT_SUBNET = "10.213.0.0/16"
DEFAULT_USER = "ubuntu"

STATE_FILE = "lab.json"
OUTPUTS_FILE = "outputs.json"
USER_KEY_FILE = "id_ed25519"
KNOWN_HOSTS_FILE = "known_hosts"


# Faults a host can be made with, so tests meet hosts unlike the lab's defaults: KIND or KIND=VALUE.
FAULTS = {
    "no-sftp": "its sshd has no SFTP subsystem",
    "small-home": "its home is a tmpfs of VALUE bytes (e.g. 256k)",
    "late-sshd": "its sshd starts VALUE seconds after `up` returns",
    "no-rsync": "rsync is missing on the host",
    "max-sessions": "its sshd allows VALUE sessions per connection",
    "corrupt-rsync": "its rsync changes a byte of a resource after each transfer it receives",
    "replaced-host-key": "its sshd presents another key than the one known_hosts pins (a rebuilt host, or a man in "
                         "the middle)",
    "gpu": "an nvidia-smi on its PATH reports one GPU at VALUE percent utilization",
    "spot-notice": "its instance metadata service (IMDSv2) gives a spot interruption notice VALUE seconds after `up`",
    "no-sudo": "its sudo refuses everything, `sudo -n shutdown` too",
    "no-role": "with --s3: its instance metadata service hands out no instance role",
    "s3-corrupt": "with --s3: the S3 stand-in changes the first byte of every object it serves this host",
    "s3-slowdown": "with --s3: the S3 stand-in answers every second object request of this host 503 SlowDown",
}
S3_FAULT_KINDS = ("no-role", "s3-corrupt", "s3-slowdown")
S3_PORT = 5000


@dataclass
class LabHost:
    hostname: str
    role: str
    address: str
    netns: str
    pid: int | None = None
    faults: dict[str, str] | None = None  # fault kind -> value ("" for none)

    @property
    def index(self) -> int:
        return int(self.netns.rsplit("-h", 1)[1])


@dataclass
class LabState:
    """What `up` made, written before each step so that `down` can undo a crashed `up`."""

    lab_id: str
    user: str
    uid: int
    prefix_length: int
    client_address: str
    hosts: list[LabHost]
    status: str = "starting"
    uplink_mbit: float | None = None  # the client's link, limited in both directions
    host_mbit: float | None = None  # every host's link, limited in both directions
    record_commands: bool = False  # every host notes each command its sessions run, for tests
    bastion: int | None = None  # the client reaches only this host: the others only through it
    s3_address: str | None = None  # with --s3: where the S3 stand-in (moto's server) listens, on port S3_PORT

    @property
    def switch_netns(self) -> str:
        return f"{NETNS_PREFIX}{self.lab_id}-sw"

    @property
    def client_netns(self) -> str:
        return f"{NETNS_PREFIX}{self.lab_id}-client"

    @property
    def s3_netns(self) -> str:
        return f"{NETNS_PREFIX}{self.lab_id}-s3"

    @property
    def s3_endpoint(self) -> str | None:
        return f"http://{self.s3_address}:{S3_PORT}" if self.s3_address else None

    @property
    def namespaces(self) -> list[str]:
        s3 = [self.s3_netns] if self.s3_address else []
        return [self.switch_netns, self.client_netns, *s3, *(host.netns for host in self.hosts)]

    def save(self, lab_dir: Path) -> None:
        write_json_atomically(lab_dir / STATE_FILE, asdict(self))

    @classmethod
    def load(cls, lab_dir: Path) -> LabState | None:
        path = lab_dir / STATE_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        data["hosts"] = [LabHost(**host) for host in data["hosts"]]
        return cls(**data)


def host_dir(lab_dir: Path, host: LabHost) -> Path:
    return lab_dir / "hosts" / host.hostname


def lab_cluster(state: LabState) -> Cluster:
    """The lab as contract v1 sees it: every address is both public and private."""
    members = [
        Host(id=f"lab-{state.lab_id}-h{host.index}", role=host.role, private_ip=host.address, public_ip=host.address)
        for host in state.hosts
    ]
    return Cluster(
        name=f"lab-{state.lab_id}",
        ssh_user=state.user,
        region="lab",
        orchestrator=members[0],
        factories=tuple(members[1:]),
    )


def plan_lab(host_count: int, user: str, subnet: str, addresses: list[str] | None) -> LabState:
    if host_count < 1:
        raise InputError(f"--hosts must be at least 1 (one orchestrator), not {host_count}")
    if user == "root" or not SSH_USER.fullmatch(user):
        raise InputError(f"--user must be a plain login name other than root, not {user!r}")
    network = _parse_network(subnet)
    usable = network.hosts()
    client_address = str(next(usable))
    if addresses:
        if len(addresses) != host_count:
            raise InputError(f"--addresses gives {len(addresses)} addresses for {host_count} hosts")
        host_addresses = [_address_in(network, text) for text in addresses]
        if client_address in host_addresses or len(set(host_addresses)) != len(host_addresses):
            raise InputError(f"--addresses must be distinct and must not be {client_address} (the client's)")
    else:
        host_addresses = [str(address) for address in itertools.islice(usable, host_count)]
        if len(host_addresses) < host_count:
            raise InputError(f"--subnet {subnet} is too small for {host_count} hosts and the client")
    lab_id = secrets.token_hex(3)
    hosts = [
        LabHost(
            hostname=ORCHESTRATOR if index == 0 else f"{FACTORY}-{index}",
            role=ORCHESTRATOR if index == 0 else FACTORY,
            address=address,
            netns=f"{NETNS_PREFIX}{lab_id}-h{index}",
        )
        for index, address in enumerate(host_addresses)
    ]
    return LabState(lab_id=lab_id, user=user, uid=free_uid(), prefix_length=network.prefixlen,
                    client_address=client_address, hosts=hosts)


def apply_faults(state: LabState, faults: list[str]) -> None:
    """Each fault is INDEX:KIND or INDEX:KIND=VALUE, INDEX counting hosts from 0 (the orchestrator)."""
    for text in faults:
        index_text, _, fault = text.partition(":")
        kind, _, value = fault.partition("=")
        if not index_text.isdigit() or int(index_text) >= len(state.hosts) or kind not in FAULTS:
            raise InputError(f"--fault {text!r}: write INDEX:KIND[=VALUE] with a host index below "
                             f"{len(state.hosts)} and KIND one of {', '.join(FAULTS)}")
        if kind in ("small-home", "late-sshd", "max-sessions") and not re.fullmatch(r"[0-9]+[kKmM]?", value):
            raise InputError(f"--fault {text!r}: {kind} needs a value: {FAULTS[kind]}")
        if kind in ("gpu", "spot-notice") and not (re.fullmatch(r"[0-9]{1,5}", value)
                                                   and (kind != "gpu" or int(value) <= 100)):
            raise InputError(f"--fault {text!r}: {kind} needs a whole number: {FAULTS[kind]}")
        host = state.hosts[int(index_text)]
        host.faults = {**(host.faults or {}), kind: value}


def has_fault(host: LabHost, kind: str) -> bool:
    return kind in (host.faults or {})


def _parse_network(subnet: str) -> ipaddress.IPv4Network:
    try:
        network = ipaddress.IPv4Network(subnet, strict=False)
    except ValueError:
        raise InputError(f"--subnet must be an IPv4 CIDR such as {DEFAULT_SUBNET}, not {subnet!r}") from None
    if not network.is_private:
        raise InputError(f"--subnet {subnet} is not a private range; the lab uses private addresses only")
    return network


def _address_in(network: ipaddress.IPv4Network, text: str) -> str:
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        raise InputError(f"--addresses: {text!r} is not an IPv4 address") from None
    if address not in network or address in (network.network_address, network.broadcast_address):
        raise InputError(f"--addresses: {text} is not a host address in --subnet {network}")
    return text


def free_uid(start: int = 2000) -> int:
    """A uid no account on this machine has, so lab files never look like a real user's."""
    taken = {entry.pw_uid for entry in pwd.getpwall()}
    return next(uid for uid in range(start, 60000) if uid not in taken)
