"""The whole SSH policy, in one place: how we connect to hosts and how hosts connect to each other.

- From this machine: exactly the user's key (IdentitiesOnly, no agent, no default keys, no forwarding), no ssh
  config, host keys checked against the pinned file only. paramiko (through pyinfra) and every OpenSSH process we
  start (rsync's ssh) get the same policy.
- Between members: the managed block of ~/.ssh/config that names the cluster key, IdentitiesOnly and strict
  host keys against the members' pinned keys.
- Transfers use the exec channel only (`run_remote` with the bytes on stdin): a host whose sshd has no SFTP
  subsystem gets everything, and no content ever appears on a command line.

pyinfra, paramiko and gevent are imported inside the functions that need them, to keep start-up fast.
"""

from __future__ import annotations

import os
import posixpath
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from flambe_iac.ssh.user_key import PASSPHRASE_VARIABLE
from flambe_iac.inputs.names import refuse_line_breaks
from flambe_iac.engine.remote_layout import CLUSTER_PRIVATE_KEY, MEMBERS_KNOWN_HOSTS

ASKPASS_SCRIPT = f'#!/bin/sh\nprintf "%s\\n" "${PASSPHRASE_VARIABLE}"\n'


@dataclass(frozen=True)
class SshTarget:
    address: str
    user: str
    key: Path
    known_hosts: Path
    connect_timeout: int = 10
    batch_mode: bool = True  # off only when an askpass helper must supply the key's passphrase
    jump: str | None = None  # [USER@]HOST[:PORT] of a bastion, reached under the same policy


def ssh_options(target: SshTarget) -> list[str]:
    """OpenSSH client options for TARGET: only its key, no agent, no config, strict pinned host keys; through the
    bastion, if any, under the very same options (a ProxyCommand, not ProxyJump, whose hop would read ~/.ssh/config)."""
    options = [
        "-F", "/dev/null",
        "-i", str(target.key),
        "-o", "IdentitiesOnly=yes",
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
    return options


def proxy_command(target: SshTarget) -> str:
    """ssh -W through the bastion, with TARGET's own key, pins and options: the key is used, never copied there."""
    user, _, rest = target.jump.rpartition("@")
    host, _, port = rest.partition(":")
    bastion = SshTarget(address=host, user=user or target.user, key=target.key, known_hosts=target.known_hosts,
                        connect_timeout=target.connect_timeout, batch_mode=target.batch_mode)
    return shlex.join(["ssh", *ssh_options(bastion), "-p", port or "22", "-W", "%h:%p",
                       f"{bastion.user}@{bastion.address}"])


def parse_jump(text: str | None) -> str | None:
    """--jump [USER@]HOST[:PORT], checked like every name that reaches a command line."""
    if text is None:
        return None
    from flambe_iac.errors import InputError
    from flambe_iac.inputs.names import check_address, check_ssh_user

    user, _, rest = text.rpartition("@")
    host, _, port = rest.partition(":")
    if user:
        check_ssh_user(user, "--jump user")
    check_address(host, "--jump host")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise InputError(f"--jump port must be a number from 1 to 65535, not {port!r}")
    return text


@dataclass(frozen=True)
class RsyncJob:
    argv: list[str]
    environment: dict[str, str] | None = field(default=None, repr=False)  # may carry the key's passphrase


def askpass_environment(helper: Path, passphrase: str) -> dict[str, str]:
    """What lets ssh unlock an encrypted key without a terminal or an agent: the passphrase stays in the
    environment of our own ssh process, never on a command line or on disk."""
    return {**os.environ, "SSH_ASKPASS": str(helper), "SSH_ASKPASS_REQUIRE": "force",
            PASSPHRASE_VARIABLE: passphrase}


def rsync_command(source: str, destination: str, target: SshTarget, delete: bool = True,
                  excludes: tuple[str, ...] = ()) -> list[str]:
    """rsync with delta transfer into DESTINATION (relative to the remote home), over our ssh options.

    --protect-args keeps the remote path away from the remote shell; the remote side first makes
    DESTINATION's parent, since rsync makes only the last directory of a path. rsync writes each file to a
    temporary name in its directory and renames it, so no final path ever holds a partial file.
    """
    remote_shell = shlex.join(["ssh", *ssh_options(target)])
    parent = posixpath.dirname(destination.rstrip("/")) or "."
    command = ["rsync", "--archive", "--protect-args", "--rsh", remote_shell,
               "--rsync-path", f"mkdir -p {shlex.quote(parent)} && rsync"]
    if delete:
        command.append("--delete")
    command += [f"--exclude={name}" for name in excludes]
    return [*command, "--", source, f"{target.user}@{target.address}:{destination}"]


def rsync_pull_command(remote_path: str, local_directory: str, target: SshTarget) -> list[str]:
    """rsync with delta transfer of REMOTE_PATH (relative to the remote home, or absolute) into LOCAL_DIRECTORY."""
    remote_shell = shlex.join(["ssh", *ssh_options(target)])
    return ["rsync", "--archive", "--protect-args", "--rsh", remote_shell, "--",
            f"{target.user}@{target.address}:{remote_path}", local_directory]


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

    def target(self, address: str) -> SshTarget:
        return SshTarget(address=address, user=self.user, key=self.key, known_hosts=self.known_hosts,
                         connect_timeout=self.connect_timeout, batch_mode=self.passphrase is None, jump=self.jump)

    def proxy_command(self) -> str:
        return proxy_command(self.target("%h"))

    def environment(self) -> dict[str, str] | None:
        """The environment for our own ssh and rsync processes: an askpass helper when the key is encrypted."""
        return askpass_environment(self._askpass_helper(), self.passphrase) if self.passphrase else None

    def rsync_job(self, source: str, destination: str, address: str, excludes: tuple[str, ...] = ()) -> RsyncJob:
        return RsyncJob(rsync_command(source, destination, self.target(address), excludes=excludes),
                        self.environment())

    def pyinfra_host_data(self, address: str) -> dict:
        """pyinfra's (paramiko's) settings for one host: the same policy as ssh_options."""
        data = {
            "ssh_hostname": address,
            "ssh_user": self.user,
            "ssh_key": str(self.key),
            "ssh_allow_agent": False,
            "ssh_look_for_keys": False,
            "ssh_forward_agent": False,
            "ssh_config_file": self._ssh_config_file(),
            "ssh_known_hosts_file": str(self.known_hosts),
            "ssh_strict_host_key_checking": self.strict_host_key_checking,
            "ssh_paramiko_connect_kwargs": {
                "allow_agent": False, "look_for_keys": False,
                # A host that accepts TCP but never speaks SSH must not hold the deploy longer than a dead one.
                "banner_timeout": self.connect_timeout, "auth_timeout": self.connect_timeout,
            },
        }
        if self.passphrase:
            data["ssh_key_password"] = self.passphrase
        return data

    def _ssh_config_file(self) -> str:
        """No ssh config at all, or with --jump, one of ours that says only the ProxyCommand (pyinfra reads a
        bastion from there and starts it afresh for every connection attempt)."""
        if not self.jump:
            return "/dev/null"
        path = self._private_path("ssh_config")
        if not path.exists():
            path.write_text(f"Host *\n    ProxyCommand {self.proxy_command()}\n")
        return str(path)

    def _private_path(self, name: str) -> Path:
        if self._private_directory is None:
            self._private_directory = tempfile.TemporaryDirectory(prefix="flambe-deploy-")
        return Path(self._private_directory.name) / name

    def _askpass_helper(self) -> Path:
        helper = self._private_path("askpass")
        if not helper.exists():
            helper.write_text(ASKPASS_SCRIPT)
            helper.chmod(0o700)
        return helper

    def close(self) -> None:
        if self._private_directory is not None:
            self._private_directory.cleanup()
            self._private_directory = None


def make_state(names_and_addresses: list[tuple[str, str]], policy: SshPolicy):
    """A pyinfra State with one host per (name, address), every one connected under POLICY."""
    from pyinfra.api import Config, Inventory, State

    names = [(name, policy.pyinfra_host_data(address)) for name, address in names_and_addresses]
    config = Config(CONNECT_TIMEOUT=policy.connect_timeout, PARALLEL=max(len(names), 1))
    return State(Inventory((names, {})), config, check_for_changes=False)


def describe_connect_error(message: str, policy: SshPolicy, address: str) -> str:
    """A connection failure in words that say what to do."""
    lowered = message.lower()
    if "host key" in lowered and "does not match" in lowered:
        return (f"REFUSED: the host key of {address} does not match the key pinned in {policy.known_hosts}; "
                "nothing was sent. If you know the host was rebuilt, forget the old pin with "
                f"`ssh-keygen -R {address} -f {policy.known_hosts}` and pin the new key")
    if "No host key for" in message:
        return f"REFUSED: no pinned host key for {address} in {policy.known_hosts}; nothing was sent"
    if "authentication" in lowered:
        return f"the host refused the key {policy.key} for user {policy.user!r}"
    return message or "could not connect"


# -- the exec channel


class RemoteCommandError(Exception):
    """The connection failed while a command ran: the host's state after it is unknown."""


@dataclass(frozen=True)
class RemoteResult:
    exit_code: int
    stdout: bytes
    stderr: bytes = field(repr=False)

    @property
    def reason(self) -> str:
        """The command's last error lines, for a cause in words."""
        lines = [line.strip() for line in self.stderr.decode(errors="replace").splitlines() if line.strip()]
        return "; ".join(lines[-3:]) or f"exit code {self.exit_code}"


def run_remote(host, command: str, stdin: bytes = b"", timeout: float | None = None) -> RemoteResult:
    """Run COMMAND on a connected pyinfra HOST over a fresh exec channel, with STDIN's bytes as its input.

    Nothing is logged: STDIN may hold secrets, and stdout may hold the cluster's private key.
    Raises RemoteCommandError when the channel cannot be opened or the connection drops.
    """
    import gevent

    client = getattr(host.connector, "client", None)
    transport = client.get_transport() if client is not None else None
    if transport is None or not transport.is_active():
        raise RemoteCommandError("the SSH connection is closed")
    try:
        channel = transport.open_session(timeout=30)
    except Exception as error:  # paramiko raises SSHException, EOFError or socket errors here
        raise RemoteCommandError(describe_channel_error(error)) from None
    try:
        with gevent.Timeout(timeout, RemoteCommandError(f"no answer within {timeout:g} s")):
            channel.exec_command(command)
            stderr_reader = gevent.spawn(_read_all, channel.recv_stderr)
            if stdin:
                channel.sendall(stdin)
            channel.shutdown_write()
            stdout = _read_all(channel.recv)
            stderr = stderr_reader.get()
            exit_code = channel.recv_exit_status()
    except RemoteCommandError:
        raise
    except Exception as error:
        raise RemoteCommandError(describe_channel_error(error)) from None
    finally:
        channel.close()
    if exit_code == -1:
        raise RemoteCommandError("the connection dropped before the command finished")
    return RemoteResult(exit_code, stdout, stderr)


def _read_all(receive) -> bytes:
    chunks = []
    while chunk := receive(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def describe_channel_error(error: BaseException) -> str:
    text = str(error).strip()
    if "administratively prohibited" in text or "Connect failed" in text or "ChannelException" in type(error).__name__:
        return ("the host refused a new SSH session (is its sshd's MaxSessions too low? flambe-deploy needs 2): "
                + (text or type(error).__name__))
    if isinstance(error, EOFError) or not text:
        return f"the connection dropped ({type(error).__name__})"
    return f"the connection failed: {text}"


# -- host to host


def _config_markers(cluster_name: str) -> tuple[str, str]:
    return (f"# BEGIN flambe cluster {cluster_name} (managed by flambe-deploy)",
            f"# END flambe cluster {cluster_name}")


def ssh_config_block(cluster_name: str, ssh_user: str, private_addresses: list[str]) -> str:
    """The managed ~/.ssh/config block that lets members reach each other with the cluster key only."""
    refuse_line_breaks("ssh config", cluster_name, ssh_user, *private_addresses)
    begin, end = _config_markers(cluster_name)
    return "\n".join([
        begin,
        f"Host {' '.join(private_addresses)}",
        f"    User {ssh_user}",
        f"    IdentityFile ~/{CLUSTER_PRIVATE_KEY}",
        "    IdentitiesOnly yes",
        "    IdentityAgent none",
        "    ForwardAgent no",
        "    StrictHostKeyChecking yes",
        f"    UserKnownHostsFile ~/{MEMBERS_KNOWN_HOSTS}",
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


class HeldCommand:
    """A remote command kept running for as long as we hold it, fed a heartbeat line every few seconds.

    The remote side stops when the heartbeat stops (this process died, the network went away) or when `release`
    closes its input: what it holds, such as a lock, never outlives its holder for long.
    """

    HEARTBEAT_SECONDS = 5.0

    def __init__(self, host, command: str, first_input: bytes, timeout: float):
        import gevent

        client = getattr(host.connector, "client", None)
        transport = client.get_transport() if client is not None else None
        if transport is None or not transport.is_active():
            raise RemoteCommandError("the SSH connection is closed")
        try:
            self.channel = transport.open_session(timeout=30)
            self.channel.exec_command(command)
            self.channel.sendall(first_input)
            with gevent.Timeout(timeout, RemoteCommandError(f"no answer within {timeout:g} s")):
                self.first_line = _read_line(self.channel)
        except RemoteCommandError:
            raise
        except Exception as error:
            raise RemoteCommandError(describe_channel_error(error)) from None
        self.heartbeat = gevent.spawn(self._beat)

    def _beat(self) -> None:
        import gevent

        while True:
            gevent.sleep(self.HEARTBEAT_SECONDS)
            try:
                self.channel.sendall(b"\n")
            except Exception:  # the channel is gone: the remote side has stopped by itself
                return

    def rest_of_output(self) -> bytes:
        """Everything the command printed after its first line; it has ended by then."""
        return _read_all(self.channel.recv)

    def release(self) -> None:
        self.heartbeat.kill(block=False)
        try:
            self.channel.shutdown_write()
            self.channel.close()
        except Exception:  # a connection that already dropped has released the remote side too
            return


def _read_line(channel) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = channel.recv(1)
        if not chunk:
            break
        line += chunk
    return line.strip()
