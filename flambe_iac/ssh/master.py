"""One OpenSSH connection per host, for everything: a ControlMaster opened under the SSH policy, and every command,
upload, rsync and held lock of the run carried over it as a session (one handshake per host, not one per rsync).

The master's socket lives in the policy's private directory (0700) and the master ends with the run: `close` stops it
by the pid it reported, on every exit path the driver has (a normal end, an error, SIGINT, SIGTERM). Were this process
killed outright, the master would still end by itself MASTER_IDLE_SECONDS after its last session.

A session never falls back to a connection of its own: its ssh is given no way to connect but the master's socket
(`ProxyCommand=false`), so a dropped master fails the command instead of opening a second, silent handshake.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Callable

from flambe_iac.ssh.processes import reap, spawn, stop

MASTER_IDLE_SECONDS = 30  # a master whose owner died ends this long after its last session
ERROR_LIMIT = 64 * 1024  # bytes of ssh's own messages read back


class MasterError(Exception):
    """The master could not be opened: ssh's own words, for a cause."""


class MasterConnection:
    """The OpenSSH master of one host at SOCKET. Its command lines come from the policy (ssh/policy.py): OPEN (the
    master), CHECK (asks it for its pid), SESSION(command) and REMOTE_SHELL (rsync's --rsh) over it; ENVIRONMENT is
    the master's ssh's (an askpass helper for an encrypted key)."""

    def __init__(self, open_command: list[str], check_command: list[str], socket: Path, environment: dict | None,
                 session: Callable[[str], list[str]], remote_shell: str):
        self.open_command, self.check_command, self.socket = open_command, check_command, socket
        self.environment, self.session, self.remote_shell = environment, session, remote_shell
        self.pid: int | None = None

    def open(self, timeout: float) -> None:
        """Connect and authenticate, within TIMEOUT seconds; MasterError with ssh's words if it cannot."""
        import gevent

        errors = self.socket.with_suffix(".log")
        child = spawn(self.open_command, self.environment, stderr=str(errors))  # -f: the master outlives this child
        try:
            with gevent.Timeout(timeout, False):
                code = reap(child.pid)
                self.pid = self._master_pid() if code == 0 else None
                if self.pid is not None:
                    return
                raise MasterError(_read_words(errors) or f"ssh exited with code {code}")
            stop(child.pid)
            gevent.spawn(reap, child.pid)
            raise MasterError(f"Connection timed out: no SSH session within {timeout:g} s")
        finally:
            errors.unlink(missing_ok=True)

    def _master_pid(self) -> int | None:
        """The master's pid, as the master itself reports it through its socket."""
        from gevent.fileobject import FileObjectPosix

        child = spawn(self.check_command, None, stderr=True)
        with FileObjectPosix(child.stderr, "rb") as answer:
            words = answer.read(4096).decode(errors="replace")
        reap(child.pid)
        found = re.search(r"Master running \(pid=(\d+)\)", words)
        return int(found.group(1)) if found else None

    def command_argv(self, command: str) -> list[str]:
        return self.session(command)

    @property
    def alive(self) -> bool:
        if self.pid is None or not self.socket.exists():
            return False
        try:
            os.kill(self.pid, 0)
        except (ProcessLookupError, PermissionError):  # gone, or a pid reused by another user's process
            return False
        return True

    def close(self) -> None:
        """Stop the master (every session on it ends with it) and remove its socket."""
        if self.alive:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.pid = None
        self.socket.unlink(missing_ok=True)


def _read_words(path: Path) -> str:
    try:
        with path.open("rb") as stream:
            return stream.read(ERROR_LIMIT).decode(errors="replace").strip()
    except OSError:
        return ""
