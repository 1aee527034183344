"""One OpenSSH connection per host, for everything: a ControlMaster opened under the SSH policy, and every command,
upload, rsync and held lock of the run carried over it as a session (one handshake per host, not one per rsync).

The master's socket lives in the policy's private directory (0700) and the master ends with the run: `close` stops it
by the pid it reported, on every exit path the driver has (a normal end, an error, SIGINT, SIGTERM). While the run
lives, a keeper (a client of the master that runs no command) holds the master's idle countdown off, however long
the run waits for another host; were this process killed outright, the keeper's input would end with it, and the
master would end by itself MASTER_IDLE_SECONDS later.

A session never falls back to a connection of its own: its ssh is given no way to connect but the master's socket
(`ProxyCommand=false`), so a dropped master fails the command instead of opening a second, silent handshake.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Callable

from flambe_iac.ssh.processes import RUNNING_CHILDREN, reap, reap_later, spawn, stop

MASTER_IDLE_SECONDS = 30  # a master whose owner died ends this long after its last session
ERROR_LIMIT = 64 * 1024  # bytes of ssh's own messages read back


class MasterError(Exception):
    """The master could not be opened: ssh's own words, for a cause."""


class MasterConnection:
    """The OpenSSH master of one host at SOCKET. Its command lines come from the policy (ssh/policy.py): OPEN (the
    master), CHECK (asks it for its pid), SESSION(command) and REMOTE_SHELL (rsync's --rsh) over it; ENVIRONMENT is
    the master's ssh's (an askpass helper for an encrypted key)."""

    def __init__(self, open_command: list[str], check_command: list[str], keeper_command: list[str],
                 exit_command: list[str], socket: Path, environment: dict | None,
                 session: Callable[[str], list[str]], remote_shell: str):
        self.open_command, self.check_command, self.socket = open_command, check_command, socket
        self.keeper_command, self.exit_command = keeper_command, exit_command
        self.environment, self.session, self.remote_shell = environment, session, remote_shell
        self.pid: int | None = None
        self.keeper = None  # processes.Child: its input, held open until close

    def open(self, timeout: float) -> None:
        """Connect and authenticate, within TIMEOUT seconds; MasterError with ssh's words if it cannot."""
        import gevent

        errors = self.socket.with_suffix(".log")
        child = spawn(self.open_command, self.environment, stderr=str(errors))  # -f: the master outlives this child
        opened = False
        try:
            with gevent.Timeout(timeout, False):
                code = reap(child.pid)
                self.pid = self._master_pid() if code == 0 else None
                if self.pid is not None:
                    self.keeper = spawn(self.keeper_command, None, stdin=True, stderr=str(self._keeper_log))
                    opened = True
                    return
                raise MasterError(_read_words(errors) or f"ssh exited with code {code}")
            stop(child.pid)
            reap_later(child.pid)
            raise MasterError(f"Connection timed out: no SSH session within {timeout:g} s")
        finally:
            errors.unlink(missing_ok=True)
            if not opened and self.socket.exists():  # it detached before the deadline or the interrupt: end it
                self._ask_exit()

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
        """The master runs: its socket is there and its pid answers (it is not our child: init reaps it)."""
        if self.pid is None or self.keeper is None or not self.socket.exists():
            return False
        try:
            os.kill(self.pid, 0)
        except (ProcessLookupError, PermissionError):  # gone, or a pid reused by another user
            return False
        return True

    def close(self) -> None:
        """Stop the master (every session on it ends with it) and its keeper, and remove the socket. The master is
        signalled only while its keeper, which ends with it, still runs: never a pid that another process took."""
        if self.keeper is not None:
            keeper_ran = not self._keeper_ended()
            if keeper_ran and self.alive:
                try:
                    os.kill(self.pid, signal.SIGTERM)
                except ProcessLookupError:  # it ended a moment ago
                    pass
            os.close(self.keeper.stdin)
            if keeper_ran:
                stop(self.keeper.pid)
                reap_later(self.keeper.pid)
            self.keeper = None
        self.pid = None
        self.socket.unlink(missing_ok=True)
        self._keeper_log.unlink(missing_ok=True)

    @property
    def _keeper_log(self) -> Path:
        return self.socket.with_suffix(".keeper")

    def keeper_words(self) -> bytes:
        """What the keeper's ssh said (a refused session ends it, and may end the master with it), bounded."""
        try:
            with open(self._keeper_log, "rb") as log:
                return log.read(ERROR_LIMIT)
        except OSError:
            return b""

    def _keeper_ended(self) -> bool:
        try:
            ended = os.waitpid(self.keeper.pid, os.WNOHANG)[0] != 0
        except ChildProcessError:
            ended = True
        if ended:
            RUNNING_CHILDREN.discard(self.keeper.pid)
        return ended

    def _ask_exit(self) -> None:
        """The master at our socket, whose pid we never learnt, asked to exit (bounded: it answers at once)."""
        import gevent

        child = spawn(self.exit_command, None)
        with gevent.Timeout(5, False):
            reap(child.pid)
            return
        stop(child.pid)
        reap_later(child.pid)


def _read_words(path: Path) -> str:
    try:
        with path.open("rb") as stream:
            return stream.read(ERROR_LIMIT).decode(errors="replace").strip()
    except OSError:
        return ""
