"""A lab brought up through the real `flambe-lab` command, and ways to look at its hosts from outside."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

FLAMBE_LAB = [sys.executable, "-m", "flambe_iac.cli.lab"]


def require_lab_support() -> None:
    """Lab tests need Linux and root. In CI a missing requirement fails; on a laptop it skips."""
    problem = None
    if not sys.platform.startswith("linux"):
        problem = "lab tests need Linux"
    elif os.geteuid() != 0:
        problem = "lab tests need root (CI runs them as root)"
    if problem and os.environ.get("CI"):
        pytest.fail(problem)
    if problem:
        pytest.skip(problem)


def flambe_lab(*arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*FLAMBE_LAB, *arguments], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"flambe-lab {' '.join(arguments)} failed ({result.returncode}):\n{result.stderr}")
    return result


@dataclass
class LabSession:
    directory: Path

    @classmethod
    def up(cls, directory: Path, hosts: int, *extra: str) -> LabSession:
        flambe_lab("up", "--hosts", str(hosts), "--dir", str(directory), *extra)
        return cls(directory)

    def down(self) -> subprocess.CompletedProcess:
        return flambe_lab("down", "--dir", str(self.directory))

    @property
    def state(self) -> dict:
        return json.loads((self.directory / "lab.json").read_text())

    @property
    def outputs(self) -> dict:
        return json.loads((self.directory / "outputs.json").read_text())

    @property
    def addresses(self) -> list[str]:
        return [host["address"] for host in self.state["hosts"]]

    @property
    def hostnames(self) -> list[str]:
        return [host["hostname"] for host in self.state["hosts"]]

    @property
    def user(self) -> str:
        return self.state["user"]

    @property
    def user_key(self) -> Path:
        return self.directory / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.directory / "known_hosts"

    def home(self, hostname: str) -> Path:
        """The login user's home on a host, as seen from this machine."""
        return self.directory / "hosts" / hostname / "home" / self.user

    def run_in_client(self, *command: str, timeout: float = 60, **options) -> subprocess.CompletedProcess:
        return subprocess.run([*FLAMBE_LAB, "exec", "--dir", str(self.directory), "--", *command],
                              capture_output=True, text=True, timeout=timeout, **options)

    def deploy(self, *arguments: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """flambe-deploy, run from the client namespace as a user would run it."""
        return self.run_in_client(sys.executable, "-m", "flambe_iac.cli.deploy", *arguments, timeout=timeout,
                                  env=env, stdin=subprocess.DEVNULL)

    def lab_arguments(self, outputs: Path | None = None) -> list[str]:
        """The arguments that point flambe-deploy at this lab with its user key and pinned host keys."""
        return ["--outputs", str(outputs or self.directory / "outputs.json"), "--key", str(self.user_key),
                "--known-hosts", str(self.known_hosts)]

    def outputs_with(self, path: Path, host_count: int) -> Path:
        """An outputs file for only the first HOST_COUNT hosts of the lab (a smaller cluster)."""
        document = self.outputs
        document["factories"] = document["factories"][: host_count - 1]
        path.write_text(json.dumps(document))
        return path

    def manifest(self, hostname: str) -> dict:
        """~/.flambe/cluster.json on a host."""
        return json.loads((self.home(hostname) / ".flambe" / "cluster.json").read_text())

    def snapshot_hosts(self) -> dict:
        """Every file in every home, with its bytes, and every sshd log: any connection would change one.
        Equal before and after means nothing was sent."""
        files = {}
        for name in self.hostnames:
            for path in sorted((self.directory / "hosts" / name / "home").rglob("*")):
                files[str(path)] = path.read_bytes() if path.is_file() and not path.is_symlink() else None
            files[f"{name} sshd.log"] = self.sshd_log(name)
        return files

    def recorded_commands(self, hostname: str) -> list[bytes]:
        """Every command a host's sessions ran (a lab made with --record-commands)."""
        log = self.directory / "hosts" / hostname / "tmp" / "flambe-lab-commands.log"
        return [command for command in log.read_bytes().split(b"\0") if command] if log.exists() else []

    def sshd_pids(self, hostname: str) -> list[int]:
        """Every process of a host: its sshd and the sessions it runs."""
        netns = next(host["netns"] for host in self.state["hosts"] if host["hostname"] == hostname)
        listing = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout
        return [int(pid) for pid in listing.split()]

    def machine_pid(self, hostname: str, pid_on_host: int) -> int | None:
        """The pid this machine knows a host's process by (each host has its own PID namespace), or None if that
        host runs no such process."""
        for pid in self.sshd_pids(hostname):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            namespace_pids = next(line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:"))
            if int(namespace_pids[-1]) == pid_on_host:
                return pid
        return None

    def processes(self, hostname: str) -> list[str]:
        """The names (comm) of every process the host runs."""
        names = []
        for pid in self.sshd_pids(hostname):
            try:
                names.append(Path(f"/proc/{pid}/comm").read_text().strip())
            except OSError:
                continue
        return names

    def sshd_pid(self, hostname: str) -> int:
        return next(host["pid"] for host in self.state["hosts"] if host["hostname"] == hostname)

    def sshd_log(self, hostname: str) -> str:
        return (self.directory / "hosts" / hostname / "sshd.log").read_text()

    def ssh(self, address: str, command: str, key: Path | None = None) -> subprocess.CompletedProcess:
        """ssh from the client namespace with only one key and strict host keys, ignoring any ssh config."""
        return self.run_in_client(
            "ssh", "-F", "/dev/null", "-i", str(key or self.user_key), "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "ConnectTimeout=10",
            f"{self.user}@{address}", command,
        )


def home_environment(home: Path, **extra: str) -> dict[str, str]:
    """The environment with a HOME of the test's own, so nothing reads or writes the real ~/.ssh or ~/.flambe."""
    home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "HOME": str(home), **extra}


def machine_snapshot() -> dict[str, str]:
    """What the lab must never change on the machine: root-namespace network state and accounts."""
    commands = {"links": ["ip", "-o", "link"], "addresses": ["ip", "-o", "addr"], "routes": ["ip", "route"]}
    snapshot = {name: subprocess.run(argv, capture_output=True, text=True, check=True).stdout
                for name, argv in commands.items()}
    for path in ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/hostname"):
        snapshot[path] = Path(path).read_text() if Path(path).exists() else ""
    snapshot["hostname"] = os.uname().nodename
    return snapshot


def lab_leftovers(lab_id: str, pids: set[int] = frozenset()) -> list[str]:
    """Namespaces named for the lab, processes that name them, and any of PIDS (the lab's own processes, recorded
    while it was up) still on the machine, zombies included. Other labs' processes are not this lab's leftovers."""
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    left = [line for line in namespaces.splitlines() if f"flambe-{lab_id}-" in line]
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                status = (proc / "status").read_text()
            except OSError:
                continue
            if f"flambe-{lab_id}-" in command or int(proc.name) in pids:
                left.append(f"pid {proc.name}: {command or status.splitlines()[0]}")
    return left
