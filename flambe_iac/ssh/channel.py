"""A command on a connected host with bytes on its stdin, and a command held open with a heartbeat: each a session on
the host's one connection (ssh/master.py).

Transfers use the exec channel only: a host whose sshd has no SFTP subsystem gets everything, and no content ever
appears on a command line. gevent is imported inside the functions, to keep start-up fast.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from flambe_iac.ssh.processes import RUNNING_CHILDREN, reap, reap_later, spawn, stop

ANSWER_TIMEOUT = 120.0  # for a short command: a host that says nothing for this long has failed
ANSWER_LIMIT = 1 << 30  # bytes of one command's output: a hostile host cannot fill this process's memory
LINE_LIMIT = 4096  # bytes of a held command's first line


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


def run_remote(host, command: str, stdin: bytes = b"", timeout: float = ANSWER_TIMEOUT,
               limit: int = ANSWER_LIMIT) -> RemoteResult:
    """Run COMMAND on a connected pyinfra HOST as a session on its one connection, with STDIN's bytes as its input: the
    whole answer within TIMEOUT seconds (from the session's opening to the exit status) and LIMIT bytes of each output.

    Nothing is logged: STDIN may hold secrets, and stdout may hold the cluster's private key.
    Raises RemoteCommandError when the session cannot be opened or the connection drops.
    """
    import gevent

    connection = active_connection(host)
    child = spawn(connection.command_argv(command), None, stdin=True, stdout=True, stderr=True)
    try:
        with gevent.Timeout(timeout, RemoteCommandError(f"no answer within {timeout:g} s")):
            feeding = gevent.spawn(_feed, child.stdin, stdin)
            stderr_reader = gevent.spawn(_read_bounded, child.stderr, ERRORS_KEPT, child.pid)
            stdout = _read_all(child.stdout, limit)
            stderr, flooded = stderr_reader.get()
            if flooded:
                raise RemoteCommandError(f"its error output passed {ERRORS_CAP} bytes")
            feeding.get()
            exit_code = reap(child.pid)
    except BaseException:
        stop(child.pid)
        reap_later(child.pid)
        raise
    if exit_code == SSH_FAILED and (not connection.alive or _is_session_failure(stderr)):
        raise RemoteCommandError(describe_session_failure(stderr, connection.alive, connection))
    return RemoteResult(exit_code, stdout, stderr)


SSH_FAILED = 255  # ssh's own failure; a remote command that exits 255 is told apart by the master's words


def active_connection(host):
    """HOST's one SSH connection; RemoteCommandError if it is closed."""
    connection = getattr(host.connector, "connection", None)
    if connection is None or not connection.alive:
        raise RemoteCommandError("the SSH connection is closed")
    return connection


def connection_alive(host) -> bool:
    try:
        active_connection(host)
    except RemoteCommandError:
        return False
    return True


def read_file(host, path: str) -> bytes | None:
    """The bytes of PATH on HOST (relative to the home), or None if it cannot be read."""
    try:
        result = run_remote(host, f"cat {shlex.quote(path)}", timeout=ANSWER_TIMEOUT)
    except RemoteCommandError:
        return None
    return result.stdout if result.exit_code == 0 else None


def _read_all(fd: int, limit: int) -> bytes:
    from gevent.fileobject import FileObjectPosix

    chunks, size = [], 0
    with FileObjectPosix(fd, "rb", bufsize=0) as stream:
        while chunk := stream.read(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise RemoteCommandError(f"its answer passed {limit} bytes")
    return b"".join(chunks)


def _read_bounded(fd: int, keep: int, child: int) -> tuple[bytes, bool]:
    """(the first KEEP bytes of what FD gives, whether it passed ERRORS_CAP): past the cap, CHILD is stopped, so a
    host that floods its error output costs neither our memory nor our time until the deadline."""
    from gevent.fileobject import FileObjectPosix

    kept, total = bytearray(), 0
    with FileObjectPosix(fd, "rb", bufsize=0) as stream:
        while chunk := stream.read(65536):
            total += len(chunk)
            kept += chunk[:max(keep - len(kept), 0)]
            if total > ERRORS_CAP:
                stop(child)
                return bytes(kept), True
    return bytes(kept), False


ERRORS_KEPT = 64 * 1024  # bytes of a command's error output kept, for its cause in words
ERRORS_CAP = 16 << 20  # bytes of error output after which the command is stopped


def _feed(fd: int, data: bytes) -> None:
    """DATA to a session's stdin, then its end: a command that stops reading early is not an error of ours."""
    from gevent.fileobject import FileObjectPosix

    with FileObjectPosix(fd, "wb", bufsize=0) as stream:
        try:
            view = memoryview(data)
            while view:
                view = view[stream.write(view):]
        except BrokenPipeError:
            return


SESSION_REFUSED = ("Session open refused", "session request failed", "administratively prohibited",
                   "open failed")


def _is_session_failure(stderr: bytes) -> bool:
    text = stderr.decode(errors="replace")
    return any(words in text for words in (*SESSION_REFUSED, "mux_client", "Control socket", "ProxyCommand"))


def describe_session_failure(stderr: bytes, connection_alive: bool, connection=None) -> str:
    """Why a session failed, in words; CONNECTION's keeper's words count too: a keeper refused its session by a low
    MaxSessions may take the master down with it, and then the session itself says nothing."""
    if not connection_alive and connection is not None and hasattr(connection, "keeper_words"):
        stderr = stderr + b" " + connection.keeper_words()
    text = " ".join(stderr.decode(errors="replace").split())[-300:]
    if any(words in text for words in SESSION_REFUSED):
        return ("the host refused a new SSH session (is its sshd's MaxSessions too low? flambe-deploy needs 3: "
                "its connection's keeper, the deploy lock and one command): "
                + text)
    if not connection_alive:
        return "the connection dropped" + (f" ({text})" if text else "")
    return f"the connection failed: {text or 'ssh exited with code 255'}"


class HeldCommand:
    """A remote command kept running for as long as we hold it, fed a heartbeat line every few seconds.

    The remote side stops when the heartbeat stops (this process died, the network went away) or when `release`
    closes its input: what it holds, such as a lock, never outlives its holder for long.
    """

    HEARTBEAT_SECONDS = 5.0

    def __init__(self, host, command: str, first_input: bytes, timeout: float):
        import gevent
        from gevent.fileobject import FileObjectPosix

        self.connection = active_connection(host)
        self.exit_code: int | None = None
        self.child = spawn(self.connection.command_argv(command), None, stdin=True, stdout=True, stderr=True)
        self.input = FileObjectPosix(self.child.stdin, "wb", bufsize=0)
        self.output = FileObjectPosix(self.child.stdout, "rb")
        self.errors = gevent.spawn(_read_bounded, self.child.stderr, LINE_LIMIT, self.child.pid)  # ends with it
        try:
            # A host that never answers must not hold the deploy past TIMEOUT, the session's opening included.
            with gevent.Timeout(timeout, RemoteCommandError(f"no answer within {timeout:g} s")):
                self.input.write(first_input)
                self.first_line = self.output.readline(LINE_LIMIT).strip()
                if not self.first_line:
                    self.exit_code = reap(self.child.pid)
        except BaseException as error:
            stop(self.child.pid)
            self.release()
            if isinstance(error, (RemoteCommandError, gevent.GreenletExit)):
                raise
            raise RemoteCommandError(f"the connection failed: {error}") from None
        if not self.first_line and self.exit_code == SSH_FAILED:
            stderr, _ = self.errors.get()
            self.release()
            raise RemoteCommandError(describe_session_failure(stderr, self.connection.alive, self.connection))
        self.heartbeat = gevent.spawn(self._beat)

    def _beat(self) -> None:
        import gevent

        while True:
            gevent.sleep(self.HEARTBEAT_SECONDS)
            try:
                self.input.write(b"\n")
            except OSError:  # the session is gone: the remote side has stopped by itself
                return

    @property
    def taken_away(self) -> bool:
        """The command ended while its connection lives on: what it held was released under us (a heartbeat that
        starved, a kill), not lost with the host."""
        ended = self.errors.ready() or self.heartbeat.dead
        return ended and self.connection.alive

    def rest_of_output(self, limit: int = 4096, timeout: float = 10.0) -> bytes:
        """What the command printed after its first line, up to LIMIT bytes and TIMEOUT seconds: a hostile host
        can neither hang us here nor fill our memory."""
        import gevent

        received = b""
        with gevent.Timeout(timeout, False):
            while len(received) < limit and (chunk := self.output.read1(limit - len(received))):
                received += chunk
        return received

    def read_through(self, last_line: bytes, limit: int, timeout: float) -> bytes:
        """What the command printed after its first line, through the line LAST_LINE, within LIMIT bytes and TIMEOUT
        seconds; RemoteCommandError if it says less, more or nothing in time (a hostile host's answer is bounded)."""
        import gevent

        lines, received = [], 0
        with gevent.Timeout(timeout, RemoteCommandError(f"no answer within {timeout:g} s")):
            while True:
                line = self.output.readline(limit + 1 - received)
                lines.append(line)
                received += len(line)
                if received > limit:
                    raise RemoteCommandError(f"its answer passed {limit} bytes")
                if not line or line.rstrip(b"\r\n") == last_line:
                    return b"".join(lines)

    def release(self) -> None:
        """Close the command's input: the remote side sees its end and stops. Its ssh ends by itself then."""
        heartbeat = getattr(self, "heartbeat", None)
        if heartbeat is not None:
            heartbeat.kill(block=False)
        for stream in (self.input, self.output):  # nothing more is sent, nor read: a flood stops on its broken pipe
            if not stream.closed:
                try:
                    stream.close()
                except OSError:  # a session that already ended has released the remote side too
                    pass
        if self.child.pid in RUNNING_CHILDREN:
            reap_later(self.child.pid)
