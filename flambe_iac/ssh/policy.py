"""The whole SSH policy, in one place: how we connect to hosts and how hosts connect to each other.

- From this machine: exactly the user's key (IdentitiesOnly, no agent, no default keys, no forwarding), no ssh
  config, host keys checked against the pinned file only. A deploy opens one OpenSSH connection per host under it
  (ssh/master.py) and runs everything over it: pyinfra's commands, ours, rsync; day-two commands start ssh with the
  same options.
- Between members: the managed block of ~/.ssh/config that names the cluster key, IdentitiesOnly and strict
  host keys against the members' pinned keys.

pyinfra, paramiko and gevent are imported inside the functions that need them, to keep start-up fast.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from flambe_iac.remote_layout import CLUSTER_PRIVATE_KEY, MEMBERS_KNOWN_HOSTS
from flambe_iac.errors import InputError
from flambe_iac.names import check_address, check_ssh_user, refuse_unsafe_fields
from flambe_iac.local_files import PRIVATE, write_atomically
from flambe_iac.ssh.master import MASTER_IDLE_SECONDS, MasterConnection
from flambe_iac.ssh.user_key import PASSPHRASE_VARIABLE

# It answers only ssh's question for the key's passphrase: a host that asks for a password gets nothing.
ASKPASS_SCRIPT = (f'#!/bin/sh\ncase "$1" in\n  "Enter passphrase for"*) printf "%s\\n" "${PASSPHRASE_VARIABLE}" ;;\n'
                  '  *) exit 1 ;;\nesac\n')


@dataclass(frozen=True)
class SshTarget:
    address: str
    user: str
    key: Path
    known_hosts: Path
    connect_timeout: int = 10
    batch_mode: bool = True  # off only when an askpass helper must supply the key's passphrase
    jump: str | None = None  # [USER@]HOST[:PORT] of a bastion, reached under the same policy
    shared_connection: str | None = None  # a ControlPath: one connection for a run of commands (forwarding passes)

    def with_address(self, address: str) -> SshTarget:
        return dataclasses.replace(self, address=address)


def ssh_options(target: SshTarget) -> list[str]:
    """OpenSSH client options for TARGET: only its key, no agent, no config, strict pinned host keys; through the
    bastion, if any, under the very same options (a ProxyCommand, not ProxyJump, whose hop would read ~/.ssh/config)."""
    options = [
        "-F", "/dev/null",
        "-i", str(target.key),
        "-o", "IdentitiesOnly=yes",
        "-o", "PreferredAuthentications=publickey",  # never a password: askpass would answer with the passphrase
        "-o", "PasswordAuthentication=no",
        "-o", "KbdInteractiveAuthentication=no",
        "-o", "IdentityAgent=none",
        "-o", "ForwardAgent=no",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={target.known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", f"ConnectTimeout={target.connect_timeout}",
    ]
    if target.batch_mode:
        options += ["-o", "BatchMode=yes"]
    if target.jump:
        options += ["-o", f"ProxyCommand={proxy_command(target)}"]
    if target.shared_connection:  # the socket is the user's own (0600, in a 0700 directory), as is the key
        options += ["-o", "ControlMaster=auto", "-o", f"ControlPath={target.shared_connection}",
                    "-o", f"ControlPersist={SHARED_CONNECTION_LINGERS}"]
    return options


SHARED_CONNECTION_LINGERS = 10  # seconds a shared connection stays open after its last command


def master_command(target: SshTarget, socket: Path, strict_host_keys: str = "yes") -> list[str]:
    """ssh that opens this run's one connection to TARGET (ssh/master.py) under the policy, STRICT_HOST_KEYS
    `accept-new` only with --trust-on-first-use, and backgrounds once authenticated. It ends MASTER_IDLE_SECONDS
    after its last session if this process dies; a host gone silent ends it within a minute."""
    return ["ssh", "-o", f"StrictHostKeyChecking={strict_host_keys}", *ssh_options(target),
            "-o", "ControlMaster=yes", "-o", f"ControlPath={socket}", "-o", f"ControlPersist={MASTER_IDLE_SECONDS}",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4", "-f", "-N", login(target)]


def master_check_command(target: SshTarget, socket: Path, request: str = "check") -> list[str]:
    """ssh asking the master at SOCKET whether it runs (it answers with its pid), or to `exit`."""
    return ["ssh", "-F", "/dev/null", "-o", f"ControlPath={socket}", "-O", request, login(target)]


def master_keeper_command(target: SshTarget, socket: Path) -> list[str]:
    """A client of the master that runs no command (a proxy that is never spoken to; sshd still counts it against
    MaxSessions): while it lives, the master's idle countdown (ControlPersist) does not run, however long the run
    waits; once this process dies, its input ends, the keeper ends, and the countdown starts."""
    return ["ssh", *session_options(socket), "-O", "proxy", login(target)]


def session_options(socket: Path) -> list[str]:
    """ssh options for a session over the master at SOCKET, and over nothing else: no way to connect of its own
    (ProxyCommand=false), so a master that dropped fails the session instead of a second, silent handshake."""
    return ["-F", "/dev/null", "-o", f"ControlPath={socket}", "-o", "ControlMaster=no",
            "-o", "ProxyCommand=false", "-o", "BatchMode=yes", "-o", "ForwardX11=no",
            "-o", "ForwardAgent=no", "-o", "IdentityAgent=none"]


def session_command(target: SshTarget, socket: Path, command: str) -> list[str]:
    return ["ssh", *session_options(socket), "--", login(target), command]


def login(target: SshTarget) -> str:
    return f"{target.user}@{target.address}"


def close_shared_connection(target: SshTarget) -> list[str]:
    """ssh's command that ends TARGET's shared connection now, instead of SHARED_CONNECTION_LINGERS later."""
    return ["ssh", "-F", "/dev/null", "-o", f"ControlPath={target.shared_connection}", "-O", "exit",
            f"{target.user}@{target.address}"]


def ssh_command_line(target: SshTarget, *command: str, options: tuple[str, ...] = ()) -> list[str]:
    """ssh to TARGET under the policy, with extra OPTIONS (such as a port forward) and the remote COMMAND."""
    return ["ssh", *ssh_options(target), *options, f"{target.user}@{target.address}", *command]


def config_policy_lines(user: str, key: str, known_hosts: str) -> list[str]:
    """The policy in ssh_config words, for every block we write: that key only, no agent, strict pinned host keys."""
    return [f"    User {user}", f"    IdentityFile {key}", "    IdentitiesOnly yes", "    IdentityAgent none",
            "    ForwardAgent no", "    StrictHostKeyChecking yes", f"    UserKnownHostsFile {known_hosts}"]


def printed_config_block(alias: str, target: SshTarget) -> str:
    """A Host block for the user's own ssh: the same policy as every connection flambe-deploy makes."""
    refuse_unsafe_fields("ssh config", alias, target.address, target.user, str(target.key), str(target.known_hosts))
    lines = [f"Host {alias}", f"    HostName {target.address}",
             *config_policy_lines(target.user, str(target.key), str(target.known_hosts)),
             f"    ConnectTimeout {target.connect_timeout}"]
    if target.jump:
        lines.append(f"    ProxyCommand {proxy_command(target.with_address('%h'))}")
    return "\n".join(lines) + "\n"


def proxy_command(target: SshTarget) -> str:
    """ssh -W through the bastion, with TARGET's own key, pins and options: the key is used, never copied there."""
    user, host, port = split_jump(target.jump)
    bastion = SshTarget(address=host, user=user or target.user, key=target.key, known_hosts=target.known_hosts,
                        connect_timeout=target.connect_timeout, batch_mode=target.batch_mode)
    return shlex.join(["ssh", *ssh_options(bastion), "-p", port or "22", "-W", "%h:%p",
                       f"{bastion.user}@{bastion.address}"])


def split_jump(text: str) -> tuple[str, str, str]:
    """[USER@]HOST[:PORT], with an IPv6 HOST bare or in brackets: (user or "", host, port or "")."""
    user, _, rest = text.rpartition("@")
    if rest.startswith("["):
        host, _, port = rest[1:].partition("]")
        return user, host, port[1:] if port.startswith(":") else port
    if rest.count(":") > 1:
        return user, rest, ""
    host, _, port = rest.partition(":")
    return user, host, port


def parse_jump(text: str | None) -> str | None:
    """--jump [USER@]HOST[:PORT], checked like every name that reaches a command line; in its normal form."""
    if text is None:
        return None
    user, host, port = split_jump(text)
    if user:
        check_ssh_user(user, "--jump user")
    address = check_address(host, "--jump host")
    if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise InputError(f"--jump port must be a number from 1 to 65535, not {port!r}")
    where = f"[{address}]" if ":" in address and port else address
    return (f"{user}@" if user else "") + where + (f":{port}" if port else "")


@dataclass(frozen=True)
class RsyncJob:
    argv: list[str]
    environment: dict[str, str] | None = field(default=None, repr=False)  # may carry the key's passphrase

    def comparing_contents(self) -> RsyncJob:
        """The same transfer, deciding by each file's checksum instead of its size and mtime: after a member that
        failed may have forwarded a damaged file with the right size and mtime."""
        return RsyncJob(comparing_contents(self.argv), self.environment)

    def writing_in_place(self) -> RsyncJob:
        return RsyncJob(writing_in_place(self.argv), self.environment)


def comparing_contents(argv: list[str]) -> list[str]:
    return _with_options(argv, "--checksum")


def writing_in_place(argv: list[str]) -> list[str]:
    """The same transfer, each file written under its final name as it arrives, not renamed into place once whole: a
    member's first copy, which the members it serves take while it grows (engine/fan_out.py)."""
    return _with_options(argv, "--inplace")


def appending(argv: list[str]) -> list[str]:
    """The same transfer, only adding to each file what lies past the end of the receiver's copy (and writing in
    place): a forwarding pass of a copy that is still growing."""
    return _with_options(argv, "--append")


def deciding_by_size(argv: list[str]) -> list[str]:
    """The same transfer, sending only files whose size differs (setting every file's mode and mtime still): the last
    pass after appending passes, whose copy is then checked by sha256 (engine/fan_out.py)."""
    return _with_options(argv, "--size-only")


def _with_options(argv: list[str], *options: str) -> list[str]:
    end_of_options = argv.index("--")
    return [*argv[:end_of_options], *options, *argv[end_of_options:]]


def askpass_environment(helper: Path, passphrase: str) -> dict[str, str]:
    """What lets ssh unlock an encrypted key without a terminal or an agent: the passphrase stays in the
    environment of our own ssh process, never on a command line or on disk."""
    return {**os.environ, "SSH_ASKPASS": str(helper), "SSH_ASKPASS_REQUIRE": "force",
            PASSPHRASE_VARIABLE: passphrase}


def rsync_command(source: str, destination: str, target: SshTarget, delete: bool = True,
                  excludes: tuple[str, ...] = (), remote_shell: str | None = None) -> list[str]:
    """rsync with delta transfer into DESTINATION (relative to the remote home), over our ssh options.

    --protect-args keeps the remote path away from the remote shell; the remote side first makes
    DESTINATION's parent, since rsync makes only the last directory of a path. rsync writes each file to a
    temporary name in its directory and renames it, so no final path ever holds a partial file (unless
    `writing_in_place` or `appending` says otherwise, on a copy that was not there). REMOTE_SHELL: a
    session on an open master (ssh/master.py) instead of a connection of rsync's own.
    """
    remote_shell = remote_shell or shlex.join(["ssh", *ssh_options(target)])
    parent = posixpath.dirname(destination.rstrip("/")) or "."
    command = ["rsync", "--archive", "--protect-args", "--rsh", remote_shell,
               "--rsync-path", f"mkdir -p {shlex.quote(parent)} && rsync"]
    if delete:
        command.append("--delete")
    command += [f"--exclude={name}" for name in excludes]
    return [*command, "--", source, f"{target.user}@{rsync_host(target.address)}:{destination}"]


def rsync_pull_command(remote_path: str, local_directory: str, target: SshTarget) -> list[str]:
    """rsync with delta transfer of REMOTE_PATH (relative to the remote home, or absolute) into LOCAL_DIRECTORY.

    A host's tree is not trusted here: only plain files and directories come home (no -l, -D: symlinks, devices,
    FIFOs and sockets are skipped, and rsync says so), owned by whoever runs this, even root (no -o, -g), with no
    setuid, setgid or sticky bit and nothing writable by group or others."""
    remote_shell = shlex.join(["ssh", *ssh_options(target)])
    return ["rsync", "--recursive", "--times", "--perms", "--chmod=ug-s,a-t,go-w", "--protect-args",
            "--rsh", remote_shell, "--", f"{target.user}@{rsync_host(target.address)}:{remote_path}", local_directory]


def rsync_host(address: str) -> str:
    """An IPv6 address in brackets: rsync would otherwise read its first colon as the end of the host."""
    return f"[{address}]" if ":" in address else address


SAFE_RSYNC = (3, 4, 0)  # older clients have holes a hostile server can use (CVE-2024-12086, CVE-2024-12087)


def require_safe_rsync(version_text: str | None = None, platform: str = sys.platform) -> None:
    """Refuse a local rsync older than SAFE_RSYNC, or none, naming the fix for PLATFORM: every command that runs
    rsync asks first."""
    if version_text is None:
        try:
            version_text = subprocess.run(["rsync", "--version"], capture_output=True, text=True,
                                          stdin=subprocess.DEVNULL, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            raise InputError(f"rsync is not installed here (or does not answer): {rsync_fix(platform)}") from None
    found = re.search(r"version\s+v?(\d+)\.(\d+)\.(\d+)", version_text)
    version = tuple(int(part) for part in found.groups()) if found else None
    if version is not None and version >= SAFE_RSYNC and "openrsync" not in version_text:
        return
    shown = ".".join(map(str, version)) if version else "of an unknown version"
    if "openrsync" in version_text:
        shown = "openrsync, macOS's own (it speaks the protocol of rsync 2.6.9)"
    where = shutil.which("rsync") or "rsync"
    raise InputError(f"this machine's rsync ({where}) is {shown}; rsync before 3.4.0 lets a hostile host read or "
                     f"write files here (CVE-2024-12086, CVE-2024-12087): {rsync_fix(platform)}")


def rsync_fix(platform: str) -> str:
    """How to get a safe rsync first on PATH, on PLATFORM (sys.platform's words)."""
    if platform == "darwin":  # /usr/bin/rsync is openrsync (macOS 15.4 and later) or rsync 2.6.9
        return ("install rsync 3.4.0 or newer with Homebrew (`brew install rsync`) and put Homebrew's bin before "
                "/usr/bin on PATH (/opt/homebrew/bin on Apple silicon, /usr/local/bin on Intel); `rsync --version` "
                "then says 3.4.0 or newer")
    return ("install rsync 3.4.0 or newer (your distribution's package if it is that new, else a build from "
            "https://rsync.samba.org) and make it the first `rsync` on PATH")


class SshPolicy:
    """The user's side of every connection of one deploy: user, key (and its passphrase), pinned host keys."""

    def __init__(self, user: str, key: Path, passphrase: str | None, known_hosts: Path, connect_timeout: int,
                 strict_host_key_checking: str = "yes", jump: str | None = None):
        self.user = user
        self.jump = jump
        self.key = key
        self.passphrase = passphrase
        self.known_hosts = known_hosts
        self.connect_timeout = connect_timeout
        self.strict_host_key_checking = strict_host_key_checking
        self._private_directory: tempfile.TemporaryDirectory | None = None
        self._private_files_lock = threading.Lock()
        self.masters: dict[str, MasterConnection] = {}  # address -> this run's one connection to it

    def target(self, address: str) -> SshTarget:
        return SshTarget(address=address, user=self.user, key=self.key, known_hosts=self.known_hosts,
                         connect_timeout=self.connect_timeout, batch_mode=self.passphrase is None, jump=self.jump)

    def environment(self) -> dict[str, str] | None:
        """The environment for our own ssh and rsync processes: an askpass helper when the key is encrypted."""
        return askpass_environment(self._askpass_helper(), self.passphrase) if self.passphrase else None

    def rsync_job(self, source: str, destination: str, address: str, excludes: tuple[str, ...] = ()) -> RsyncJob:
        """rsync to ADDRESS, over the run's connection to it when there is one (no second handshake)."""
        master = self.masters.get(address)
        if master is not None:  # the master holds the authentication: no passphrase in rsync's environment
            return RsyncJob(rsync_command(source, destination, self.target(address), excludes=excludes,
                                          remote_shell=master.remote_shell))
        return RsyncJob(rsync_command(source, destination, self.target(address), excludes=excludes),
                        self.environment())

    def master(self, address: str) -> MasterConnection:
        """The one connection of this run to ADDRESS (made the first time it is asked for, opened by connecting)."""
        environment = self.environment()
        with self._private_files_lock:
            if address not in self.masters:
                socket = self._private_path() / f"m{len(self.masters)}"  # short: a socket's path has ~100 bytes
                target = self.target(address)
                self.masters[address] = MasterConnection(
                    master_command(target, socket, self.strict_host_key_checking),
                    master_check_command(target, socket), master_keeper_command(target, socket),
                    master_check_command(target, socket, "exit"), socket, environment,
                    session=lambda command, target=target, socket=socket: session_command(target, socket, command),
                    remote_shell=shlex.join(["ssh", *session_options(socket)]))
            return self.masters[address]

    def _askpass_helper(self) -> Path:
        return self._private_file("askpass", ASKPASS_SCRIPT, mode=0o700)

    def _private_file(self, name: str, content: str, mode: int = PRIVATE) -> Path:
        """NAME in this policy's own temporary directory, written once with MODE. Day-two commands reach their
        members from threads at once: the first to ask writes it, and none sees a second directory or half a file."""
        with self._private_files_lock:
            path = self._private_path() / name
            if not path.exists():
                write_atomically(path, content, mode)
            return path

    def _private_path(self) -> Path:
        """This policy's own 0700 directory (callers hold the lock). Under /tmp when $TMPDIR is long (macOS's is):
        a master's socket path must fit in about 100 bytes."""
        if self._private_directory is None:
            base = None if len(tempfile.gettempdir()) < 40 else "/tmp"
            self._private_directory = tempfile.TemporaryDirectory(prefix="flambe-deploy-", dir=base)
        return Path(self._private_directory.name)

    def close(self) -> None:
        for master in list(self.masters.values()):
            master.close()
        with self._private_files_lock:
            if self._private_directory is not None:
                self._private_directory.cleanup()
                self._private_directory = None


def make_state(names_and_addresses: list[tuple[str, str]], policy: SshPolicy):
    """A pyinfra State with one host per (name, address), each driven over its one OpenSSH connection under POLICY
    (ssh/connector.py): paramiko opens none."""
    from pyinfra.api import Config, Inventory, State

    from flambe_iac.ssh.connector import SharedConnectionConnector

    names = [(name, {"ssh_hostname": address}) for name, address in names_and_addresses]
    config = Config(CONNECT_TIMEOUT=policy.connect_timeout, PARALLEL=max(len(names), 1))
    state = State(Inventory((names, {})), config, check_for_changes=False)
    for name, address in names_and_addresses:
        host = state.inventory.get_host(name)
        host.connector = SharedConnectionConnector(state, host, policy.master(address), policy.connect_timeout)
    return state


def describe_connect_error(message: str, policy: SshPolicy, address: str) -> str:
    """A connection failure (OpenSSH's words) in words that say what to do."""
    lowered = message.lower()
    if "remote host identification has changed" in lowered or ("host key" in lowered and "does not match" in lowered):
        return (f"REFUSED: the host key of {address} does not match the key pinned in {policy.known_hosts}; "
                "nothing was sent. If you know the host was rebuilt, forget the old pin with "
                f"`ssh-keygen -R {address} -f {policy.known_hosts}` and pin the new key")
    if "host key is known for" in lowered or "no host key for" in lowered or "host key verification failed" in lowered:
        return f"REFUSED: no pinned host key for {address} in {policy.known_hosts}; nothing was sent"
    if "permission denied" in lowered or "authentication" in lowered:
        return f"the host refused the key {policy.key} for user {policy.user!r}"
    lines = [line.strip() for line in message.splitlines()
             if line.strip() and not line.lower().startswith(("warning:", "@@@"))]
    return (lines[-1] if lines else "could not connect")[:300]


# -- host to host


def _config_markers(cluster_name: str) -> tuple[str, str]:
    return (f"# BEGIN flambe cluster {cluster_name} (managed by flambe-deploy)",
            f"# END flambe cluster {cluster_name}")


def ssh_config_block(cluster_name: str, ssh_user: str, private_addresses: list[str]) -> str:
    """The managed ~/.ssh/config block that lets members reach each other with the cluster key only."""
    refuse_unsafe_fields("ssh config", cluster_name, ssh_user, *private_addresses)
    begin, end = _config_markers(cluster_name)
    return "\n".join([
        begin,
        f"Host {' '.join(private_addresses)}",
        *config_policy_lines(ssh_user, f"~/{CLUSTER_PRIVATE_KEY}", f"~/{MEMBERS_KNOWN_HOSTS}"),
        # Ends the Host block, so the user's own options that follow keep applying to every host.
        "Host *",
        end,
        "",
    ])


def updated_ssh_config(current: bytes, block: str, cluster_name: str) -> bytes:
    """The config with the cluster's managed block first (ssh takes the first value it finds),
    replacing any earlier copy; the user's own lines are kept as they are."""
    begin, end = _config_markers(cluster_name)
    text = current.decode("utf-8", errors="surrogateescape")
    start = text.find(begin)
    if start != -1:
        stop = text.find(end, start)
        stop = len(text) if stop == -1 else text.find("\n", stop) + 1 or len(text)
        text = text[:start] + text[stop:]
    return (block + text).encode("utf-8", errors="surrogateescape")
