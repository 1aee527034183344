"""The local lab: N real OpenSSH hosts on one machine, each in its own Linux namespaces.

Layout of one lab (all names carry the lab's random id, so labs never collide):

    flambe-<id>-sw       switch namespace, holds the bridge br0
    flambe-<id>-client   where flambe-deploy runs (`flambe-lab exec`)
    flambe-<id>-h<i>     host i: its own network, mount, UTS and PID namespaces, running sshd (its PID 1)

Every link is created inside a lab namespace (veth pairs are born in the switch namespace with their
peer already in the member namespace), so the machine's root network namespace never changes. The
login user exists only inside the hosts, through bind-mounted passwd, group and shadow files.
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from flambe_iac import __version__
from flambe_iac.cluster import FACTORY, ORCHESTRATOR, Cluster, Host
from flambe_iac.errors import EXIT_OK, InputError, LabError, exit_code_of
from flambe_iac.inputs.outputs import outputs_document

NETNS_PREFIX = "flambe-"
DEFAULT_SUBNET = "10.213.0.0/16"
DEFAULT_USER = "ubuntu"
LOGIN_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
SSHD_START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
REAP_TIMEOUT = 20.0  # init may reap orphans only every second or two, and slower on a busy machine
IN_HOST_DIR = "/run/flambe-lab"  # where each host sees its own lab directory
REQUIRED_TOOLS = ("ip", "unshare", "ssh-keygen", "/usr/sbin/sshd")

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
}
COMMANDS_LOG = "/tmp/flambe-lab-commands.log"  # inside each host: its own /tmp, hosts/<name>/tmp/ from here
RECORDING_SHELL = f"""#!/bin/bash
# sshd's ForceCommand with --record-commands: note every command a session runs (NUL-separated), then run it.
printf '%s\\0' "$SSH_ORIGINAL_COMMAND" >> {COMMANDS_LOG}
if [ -z "$SSH_ORIGINAL_COMMAND" ]; then exec bash -l; fi
exec bash -c "$SSH_ORIGINAL_COMMAND"
"""
CORRUPTING_RSYNC = """#!/bin/sh
# A broken host for tests: rsync that damages what it received.
/run/flambe-lab/rsync.real "$@"
status=$?
if [ "$status" -eq 0 ]; then
  for file in "$HOME"/resources/*/*; do [ -f "$file" ] && { printf X >> "$file"; break; }; done
fi
exit $status
"""


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
    record_commands: bool = False  # every host notes each command its sessions run, for tests
    bastion: int | None = None  # the client reaches only this host: the others only through it

    @property
    def switch_netns(self) -> str:
        return f"{NETNS_PREFIX}{self.lab_id}-sw"

    @property
    def client_netns(self) -> str:
        return f"{NETNS_PREFIX}{self.lab_id}-client"

    @property
    def namespaces(self) -> list[str]:
        return [self.switch_netns, self.client_netns, *(host.netns for host in self.hosts)]

    def save(self, lab_dir: Path) -> None:
        path = lab_dir / STATE_FILE
        path.with_suffix(".tmp").write_text(json.dumps(asdict(self), indent=2) + "\n")
        path.with_suffix(".tmp").replace(path)

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


# ---------------------------------------------------------------------------------------------- up


def up(lab_dir: Path, host_count: int, user: str = DEFAULT_USER, subnet: str = DEFAULT_SUBNET,
       addresses: list[str] | None = None, faults: list[str] = (), uplink_mbit: float | None = None,
       record_commands: bool = False, bastion: int | None = None) -> LabState:
    """Build the lab; on any failure tear down what was made and raise."""
    check_can_run_lab()
    lab_dir = lab_dir.resolve()
    existing = LabState.load(lab_dir)
    if existing is not None and existing.status != "down":
        raise InputError(f"a lab is already up in {lab_dir}: run `flambe-lab down --dir {lab_dir}` first")
    state = plan_lab(host_count, user, subnet, addresses)
    apply_faults(state, faults)
    if uplink_mbit is not None and not 0 < uplink_mbit <= 100000:
        raise InputError(f"--uplink-mbit must be between 0 and 100000, not {uplink_mbit:g}")
    state.uplink_mbit = uplink_mbit
    state.record_commands = record_commands
    if bastion is not None and not 0 <= bastion < host_count:
        raise InputError(f"--bastion must be a host index below {host_count}, not {bastion}")
    state.bastion = bastion
    lab_dir.mkdir(parents=True, exist_ok=True)
    state.save(lab_dir)
    try:
        build_lab(lab_dir, state)
    except BaseException:
        down(lab_dir)
        raise
    return state


def plan_lab(host_count: int, user: str, subnet: str, addresses: list[str] | None) -> LabState:
    if host_count < 1:
        raise InputError(f"--hosts must be at least 1 (one orchestrator), not {host_count}")
    if not LOGIN_NAME.fullmatch(user) or user == "root":
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


def build_lab(lab_dir: Path, state: LabState) -> None:
    keygens = start_key_generation(lab_dir, state)
    create_network(state)
    if state.uplink_mbit:
        limit_uplink(state)
    if state.bastion is not None:
        reach_only_the_bastion(state)
    wait_all(keygens, "ssh-keygen")
    user_public_key = (lab_dir / f"{USER_KEY_FILE}.pub").read_text()
    for host in state.hosts:
        prepare_host_files(lab_dir, state, host, user_public_key)
    for host in state.hosts:
        host.pid = start_sshd(lab_dir, host)
    state.save(lab_dir)
    wait_for_sshd(lab_dir, state)
    write_client_files(lab_dir, state)
    state.status = "up"
    state.save(lab_dir)


def check_can_run_lab() -> None:
    if not sys.platform.startswith("linux"):
        raise InputError("the lab needs Linux (network, mount and UTS namespaces)")
    if os.geteuid() != 0:
        raise InputError("the lab needs root: run flambe-lab as root (sudo flambe-lab ...)")
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        raise InputError(
            f"the lab needs {', '.join(missing)}: apt-get install openssh-server openssh-client iproute2 util-linux"
        )


def start_key_generation(lab_dir: Path, state: LabState) -> list[subprocess.Popen]:
    """The user key (authorized on every host, like an EC2 key pair) and one host key per host."""
    targets = [(lab_dir / USER_KEY_FILE, "flambe-lab user key")]
    for host in state.hosts:
        directory = host_dir(lab_dir, host)
        if directory.exists():
            shutil.rmtree(directory)
        (directory / "etc").mkdir(parents=True)
        targets.append((directory / "etc" / "ssh_host_ed25519_key", f"root@{host.hostname}"))
        if has_fault(host, "replaced-host-key"):  # the key known_hosts will pin; sshd presents the other
            targets.append((directory / "etc" / "pinned_host_key", f"root@{host.hostname}"))
    for path in targets:
        path[0].unlink(missing_ok=True)
        path[0].with_suffix(".pub").unlink(missing_ok=True)
    return [
        subprocess.Popen(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for path, comment in targets
    ]


def create_network(state: LabState) -> None:
    """Namespaces, a bridge in the switch namespace, and a veth from it to each member."""
    ip_batch(None, [f"netns add {name}" for name in state.namespaces])
    members = [(state.client_netns, "client", state.client_address)]
    members += [(host.netns, f"h{host.index}", host.address) for host in state.hosts]
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


def limit_uplink(state: LabState) -> None:
    """The client's link at UPLINK_MBIT both ways: tbf on the client's eth0 (its uploads) and on the switch's port to
    it (its downloads). Both inside the lab's namespaces; tbf, since this kernel has no netem."""
    rate = f"{state.uplink_mbit:g}mbit"
    burst = f"{max(32, int(state.uplink_mbit * 1e6 / 8 / 100 / 1024))}kb"  # at least one timer tick's worth
    for netns, device in ((state.client_netns, "eth0"), (state.switch_netns, "client")):
        subprocess.run(["ip", "netns", "exec", netns, "tc", "qdisc", "replace", "dev", device, "root", "tbf",
                        "rate", rate, "burst", burst, "latency", "100ms"], check=True, capture_output=True)


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


def prepare_host_files(lab_dir: Path, state: LabState, host: LabHost, user_public_key: str) -> None:
    """Home, tmp, accounts and sshd config of one host; the sshd boot script binds them in place."""
    directory = host_dir(lab_dir, host)
    user_home = directory / "home" / state.user
    (user_home / ".ssh").mkdir(parents=True)
    (directory / "tmp").mkdir()
    (directory / "tmp").chmod(0o1777)
    authorized_keys = user_home / ".ssh" / "authorized_keys"
    authorized_keys.write_text(user_public_key)
    authorized_keys.chmod(0o600)
    (user_home / ".ssh").chmod(0o700)
    user_home.chmod(0o755)
    for path in (user_home, user_home / ".ssh", authorized_keys):
        os.chown(path, state.uid, state.uid)
    etc = directory / "etc"
    write_accounts(etc, state)
    (etc / "sshd_config").write_text(sshd_config(host, state.record_commands))
    if state.record_commands:
        (directory / "record-command").write_text(RECORDING_SHELL)
        (directory / "record-command").chmod(0o755)
    (directory / "boot.sh").write_text(boot_script(directory, host))
    if has_fault(host, "small-home"):
        mount_small_home(directory / "home", host.faults["small-home"])
    if has_fault(host, "corrupt-rsync"):
        (directory / "rsync-corrupting").write_text(CORRUPTING_RSYNC)
        (directory / "rsync-corrupting").chmod(0o755)


def mount_small_home(home: Path, size: str) -> None:
    """A tmpfs of SIZE over the host's home, holding what the home held: a disk that fills up."""
    holding = home.with_name("home.prepared")
    home.rename(holding)
    home.mkdir(mode=0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "flambe-lab-home", str(home)],
                   check=True, capture_output=True)
    subprocess.run(["cp", "-a", f"{holding}/.", str(home)], check=True, capture_output=True)
    shutil.rmtree(holding)


def write_accounts(etc: Path, state: LabState) -> None:
    """The machine's passwd and group plus the login user, and a shadow file that knows only it."""
    user_line = f"{state.user}:x:{state.uid}:{state.uid}:flambe lab user:/home/{state.user}:/bin/bash\n"
    group_line = f"{state.user}:x:{state.uid}:\n"
    (etc / "passwd").write_text(Path("/etc/passwd").read_text() + user_line)
    (etc / "group").write_text(Path("/etc/group").read_text() + group_line)
    shadow = etc / "shadow"
    shadow.write_text(f"root:*:19000:0:99999:7:::\n{state.user}:*:19000:0:99999:7:::\n")
    shadow.chmod(0o600)


def sshd_config(host: LabHost, record_commands: bool = False) -> str:
    return "\n".join([
        f"ListenAddress {host.address}",
        f"HostKey {IN_HOST_DIR}/etc/ssh_host_ed25519_key",
        f"PidFile {IN_HOST_DIR}/sshd.pid",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin no",
        "PubkeyAuthentication yes",
        "AuthorizedKeysFile .ssh/authorized_keys",
        "UsePAM no",
        "StrictModes yes",
        "PrintMotd no",
        *([] if has_fault(host, "no-sftp") else ["Subsystem sftp internal-sftp"]),
        *([f"MaxSessions {host.faults['max-sessions']}"] if has_fault(host, "max-sessions") else []),
        *([f"ForceCommand {IN_HOST_DIR}/record-command"] if record_commands else []),
        "",
    ])


def boot_script(directory: Path, host: LabHost) -> str:
    """Run inside fresh mount, UTS and PID namespaces (with their own /proc and /dev/shm); ends by becoming sshd,
    the host's PID 1, so that `ps`, `pkill` or `ray stop` on a host see and stop only that host's processes.

    The host directory is bound at IN_HOST_DIR first, because binding the host's /tmp may hide
    the lab directory itself.
    """
    return "\n".join([
        "set -e",
        f"hostname {host.hostname}",
        "mount -t tmpfs -o mode=0755 lab-run /run",
        "mount -t tmpfs -o mode=1777 lab-shm /dev/shm",
        f"mkdir -m 0755 /run/sshd {IN_HOST_DIR}",
        f"mount --rbind {directory} {IN_HOST_DIR}",
        f"mount --rbind {IN_HOST_DIR}/home /home",
        f"mount --bind {IN_HOST_DIR}/tmp /tmp",
        f"mount --bind {IN_HOST_DIR}/etc/passwd /etc/passwd",
        f"mount --bind {IN_HOST_DIR}/etc/group /etc/group",
        f"mount --bind {IN_HOST_DIR}/etc/shadow /etc/shadow",
        *(["for tool in $(which -a rsync); do mount --bind /dev/null \"$tool\"; done"]
          if has_fault(host, "no-rsync") else []),
        *([f"cp /usr/bin/rsync {IN_HOST_DIR}/rsync.real",
           f"mount --bind {IN_HOST_DIR}/rsync-corrupting /usr/bin/rsync"] if has_fault(host, "corrupt-rsync") else []),
        *([f"sleep {host.faults['late-sshd']}"] if has_fault(host, "late-sshd") else []),
        f"exec /usr/sbin/sshd -D -e -f {IN_HOST_DIR}/etc/sshd_config",
        "",
    ])


def start_sshd(lab_dir: Path, host: LabHost) -> int:
    """Start the host; returns its sshd's pid as this machine sees it (its PID 1 is sshd)."""
    directory = host_dir(lab_dir, host)
    log = open(directory / "sshd.log", "ab")
    try:
        process = subprocess.Popen(
            ["ip", "netns", "exec", host.netns,
             "unshare", "--mount", "--uts", "--pid", "--fork", "--kill-child", "--mount-proc",
             "--propagation", "private", "/bin/sh", str(directory / "boot.sh")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )
    finally:
        log.close()
    return first_child(process)


def first_child(process: subprocess.Popen) -> int:
    """unshare --fork runs the boot script as its child, the new PID namespace's PID 1. If the host already ended,
    unshare's own pid: it is not alive either, and wait_for_sshd reports the host's log."""
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    deadline = time.monotonic() + SSHD_START_TIMEOUT
    while time.monotonic() < deadline:
        listed = children.read_text().split() if children.exists() else []
        if listed:
            return int(listed[0])
        if process.poll() is not None:
            return process.pid
        time.sleep(0.005)
    raise LabError(f"unshare did not start the host within {SSHD_START_TIMEOUT:.0f} s")


def wait_for_sshd(lab_dir: Path, state: LabState) -> None:
    """sshd writes its pid file once it listens; a host whose sshd exited fails the lab with its log."""
    waiting = [host for host in state.hosts if not has_fault(host, "late-sshd")]
    deadline = time.monotonic() + SSHD_START_TIMEOUT
    while waiting:
        for host in list(waiting):
            if (host_dir(lab_dir, host) / "sshd.pid").exists():
                waiting.remove(host)
            elif not pid_alive(host.pid):
                raise LabError(first_sshd_failure(lab_dir, state))
        if waiting and time.monotonic() > deadline:
            raise LabError(f"sshd on {waiting[0].hostname} did not start within {SSHD_START_TIMEOUT:.0f} s")
        if waiting:
            time.sleep(0.02)


def first_sshd_failure(lab_dir: Path, state: LabState) -> str:
    """The failure to report when sshds exit: the first failed host in host order, after a moment for the others
    (they often fail together, and which one is noticed first should not decide what the user reads)."""
    time.sleep(0.3)
    failed = [host for host in state.hosts if not (host_dir(lab_dir, host) / "sshd.pid").exists()
              and not pid_alive(host.pid)]
    host = failed[0]
    log = (host_dir(lab_dir, host) / "sshd.log").read_text(errors="replace").strip()
    others = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    return f"sshd on {host.hostname} exited{others}: {log.splitlines()[-1] if log else 'no output'}"


def write_client_files(lab_dir: Path, state: LabState) -> None:
    known_hosts = []
    for host in state.hosts:
        public = host_dir(lab_dir, host) / "etc" / ("pinned_host_key.pub" if has_fault(host, "replaced-host-key")
                                                    else "ssh_host_ed25519_key.pub")
        key_type, key = public.read_text().split()[:2]
        known_hosts.append(f"{host.address} {key_type} {key}\n")
    (lab_dir / KNOWN_HOSTS_FILE).write_text("".join(known_hosts))
    document = outputs_document(lab_cluster(state))
    (lab_dir / OUTPUTS_FILE).write_text(json.dumps(document, indent=2) + "\n")


# -------------------------------------------------------------------------------------------- down


def down(lab_dir: Path) -> list[str]:
    """Stop every process in the lab's namespaces and delete the namespaces. Safe to repeat."""
    lab_dir = lab_dir.resolve()
    state = LabState.load(lab_dir)
    if state is None:
        return []
    namespaces = lab_namespaces(state.lab_id)
    stop_processes(namespace_pids(namespaces))
    if namespaces:
        ip_batch(None, [f"netns delete {name}" for name in namespaces])
    for host in state.hosts:
        host.pid = None
        (host_dir(lab_dir, host) / "sshd.pid").unlink(missing_ok=True)
        home = host_dir(lab_dir, host) / "home"
        if os.path.ismount(home):
            subprocess.run(["umount", str(home)], check=True, capture_output=True)
    state.status = "down"
    state.save(lab_dir)
    return namespaces


def lab_namespaces(lab_id: str) -> list[str]:
    """Every namespace of this lab that exists now, whether or not `up` got to record it."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    names = [line.split()[0] for line in listing.splitlines() if line.strip()]
    return [name for name in names if name.startswith(f"{NETNS_PREFIX}{lab_id}-")]


def namespace_pids(namespaces: list[str]) -> set[int]:
    """Only processes the lab started live in its namespaces: sshd, its sessions and `exec` commands."""
    pids = set()
    for name in namespaces:
        listing = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
        pids.update(int(pid) for pid in listing.split())
    return pids


def pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); reap it if it is our child.
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        return reaped == 0
    except ChildProcessError:
        return Path(f"/proc/{pid}").exists() and "Z" not in _process_state(pid)


def _process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def stop_processes(pids: set[int]) -> None:
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in pids:
        if pid_alive(pid):
            _signal(pid, signal.SIGKILL)
    wait_until_reaped(pids)


def wait_until_reaped(pids: set[int]) -> None:
    """Orphans are reaped by init, which may take a moment; wait so `down` leaves no zombie either."""
    deadline = time.monotonic() + REAP_TIMEOUT
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


# -------------------------------------------------------------------------------------------- CLI


def exec_in_client(lab_dir: Path, command: list[str]) -> None:
    state = require_running_lab(lab_dir)
    if not command:
        raise InputError("give the command after --, e.g. flambe-lab exec --dir DIR -- ssh ...")
    os.execvp("ip", ["ip", "netns", "exec", state.client_netns, *command])


def require_running_lab(lab_dir: Path) -> LabState:
    check_can_run_lab()
    state = LabState.load(lab_dir.resolve())
    if state is None or state.status != "up":
        raise InputError(f"no lab is up in {lab_dir}: start one with `flambe-lab up --hosts N --dir {lab_dir}`")
    return state


def describe(lab_dir: Path, state: LabState) -> str:
    lines = [f"lab {state.lab_id} in {lab_dir}: {len(state.hosts)} hosts, login user {state.user!r}"]
    for host in state.hosts:
        status = "sshd running" if pid_alive(host.pid) else "sshd NOT running"
        lines.append(f"  {host.role:<13} {host.hostname:<13} {host.address:<15} {status} (pid {host.pid})")
    lines.append(f"  client namespace {state.client_netns} at {state.client_address}")
    lines.append(f"  user key {lab_dir / USER_KEY_FILE}, host keys {lab_dir / KNOWN_HOSTS_FILE}, "
                 f"stack outputs {lab_dir / OUTPUTS_FILE}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flambe-lab",
        description="Real OpenSSH hosts in Linux namespaces on this machine, to deploy to without a cloud. "
                    "Needs Linux and root. Nothing changes in the machine's own network, /etc or accounts.",
        epilog="example:\n"
               "  flambe-lab up --hosts 3 --dir /tmp/lab\n"
               "  flambe-lab exec --dir /tmp/lab -- ssh -i /tmp/lab/id_ed25519 -o IdentitiesOnly=yes \\\n"
               "      -o UserKnownHostsFile=/tmp/lab/known_hosts ubuntu@10.213.0.2 hostname\n"
               "  flambe-lab down --dir /tmp/lab",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"flambe-iac {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up_parser = commands.add_parser(
        "up", help="create the hosts and start their sshd",
        description=f"Create N hosts (host 0 is the orchestrator) and write into DIR: {OUTPUTS_FILE} "
                    f"(stack outputs v1), {USER_KEY_FILE}[.pub] (the user key), {KNOWN_HOSTS_FILE} and "
                    "hosts/<hostname>/home/ (each host's home, seen from this machine).")
    up_parser.add_argument("--hosts", type=int, required=True, metavar="N", help="how many hosts (at least 1)")
    up_parser.add_argument("--dir", type=Path, required=True, help="where the lab keeps its files")
    up_parser.add_argument("--user", default=DEFAULT_USER, help=f"login user on the hosts (default {DEFAULT_USER})")
    up_parser.add_argument("--subnet", default=DEFAULT_SUBNET,
                           help=f"private IPv4 range of the lab network (default {DEFAULT_SUBNET})")
    up_parser.add_argument("--addresses", type=lambda text: text.split(","), metavar="IP,IP,...",
                           help="exact host addresses inside --subnet, orchestrator first (default: the next free)")
    up_parser.add_argument("--fault", action="append", default=[], metavar="INDEX:KIND[=VALUE]",
                           help="make host INDEX (0 is the orchestrator) unlike the others; KIND is one of: "
                                + "; ".join(f"{kind} ({text})" for kind, text in FAULTS.items()))
    up_parser.add_argument("--bastion", type=int, metavar="INDEX",
                           help="the client reaches only host INDEX (a bastion); the others only through it")
    up_parser.add_argument("--record-commands", action="store_true",
                           help=f"every host notes each command its SSH sessions run, in its own {COMMANDS_LOG}")
    up_parser.add_argument("--uplink-mbit", type=float, metavar="N",
                           help="limit the client's link to N Mbit/s both ways, as a laptop's or a CI runner's uplink")
    for name, text in (("down", "stop every sshd and remove every namespace and link of the lab (idempotent)"),
                       ("show", "list the hosts, their addresses and whether their sshd runs")):
        commands.add_parser(name, help=text, description=text).add_argument("--dir", type=Path, required=True)
    exec_parser = commands.add_parser("exec", help="run a command in the client namespace, where the hosts are",
                                      description="Run CMD in the client namespace, from where the hosts answer.")
    exec_parser.add_argument("--dir", type=Path, required=True)
    exec_parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    return exit_code_of("flambe-lab", lambda: run_command(arguments))


def run_command(arguments: argparse.Namespace) -> int:
    if arguments.command == "up":
        started = time.monotonic()
        state = up(arguments.dir, arguments.hosts, arguments.user, arguments.subnet, arguments.addresses,
                   arguments.fault, arguments.uplink_mbit, arguments.record_commands, arguments.bastion)
        print(describe(arguments.dir.resolve(), state))
        print(f"lab up: {len(state.hosts)} hosts in {time.monotonic() - started:.2f} s")
    elif arguments.command == "down":
        check_can_run_lab()
        removed = down(arguments.dir)
        print(f"lab down: removed {len(removed)} namespaces" if removed else "lab down: nothing was running")
    elif arguments.command == "show":
        print(describe(arguments.dir.resolve(), require_running_lab(arguments.dir)))
    elif arguments.command == "exec":
        command = arguments.cmd[1:] if arguments.cmd[:1] == ["--"] else arguments.cmd
        exec_in_client(arguments.dir, command)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
