"""The exec channel: a command on a connected host with bytes on its stdin, and a command held open with a heartbeat.

Transfers use the exec channel only: a host whose sshd has no SFTP subsystem gets everything, and no content ever
appears on a command line. gevent is imported inside the functions, to keep start-up fast.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

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
    """Run COMMAND on a connected pyinfra HOST over a fresh exec channel, with STDIN's bytes as its input: the whole
    answer within TIMEOUT seconds (from the channel's opening to the exit status) and LIMIT bytes of each output.

    Nothing is logged: STDIN may hold secrets, and stdout may hold the cluster's private key.
    Raises RemoteCommandError when the channel cannot be opened or the connection drops.
    """
    import gevent

    transport = active_transport(host)
    try:
        channel = transport.open_session(timeout=30)
    except Exception as error:  # paramiko raises SSHException, EOFError or socket errors here
        raise RemoteCommandError(describe_channel_error(error)) from None
    try:
        with gevent.Timeout(timeout, RemoteCommandError(f"no answer within {timeout:g} s")):
            channel.exec_command(command)
            stderr_reader = gevent.spawn(_read_all, channel.recv_stderr, limit)
            if stdin:
                channel.sendall(stdin)
            channel.shutdown_write()
            stdout = _read_all(channel.recv, limit)
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


def active_transport(host):
    """HOST's SSH transport; RemoteCommandError if its connection is closed."""
    client = getattr(host.connector, "client", None)
    transport = client.get_transport() if client is not None else None
    if transport is None or not transport.is_active():
        raise RemoteCommandError("the SSH connection is closed")
    return transport


def connection_alive(host) -> bool:
    try:
        active_transport(host)
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


def _read_all(receive, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := receive(65536):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise RemoteCommandError(f"its answer passed {limit} bytes")
    return b"".join(chunks)


def describe_channel_error(error: BaseException) -> str:
    text = str(error).strip()
    if "administratively prohibited" in text or "Connect failed" in text or "ChannelException" in type(error).__name__:
        return ("the host refused a new SSH session (is its sshd's MaxSessions too low? flambe-deploy needs 2): "
                + (text or type(error).__name__))
    if isinstance(error, EOFError) or not text:
        return f"the connection dropped ({type(error).__name__})"
    return f"the connection failed: {text}"


class HeldCommand:
    """A remote command kept running for as long as we hold it, fed a heartbeat line every few seconds.

    The remote side stops when the heartbeat stops (this process died, the network went away) or when `release`
    closes its input: what it holds, such as a lock, never outlives its holder for long.
    """

    HEARTBEAT_SECONDS = 5.0

    def __init__(self, host, command: str, first_input: bytes, timeout: float):
        import gevent

        transport = active_transport(host)
        try:
            # paramiko waits for the exec request's reply with no deadline of its own: a host that never answers it
            # must not hold the deploy past TIMEOUT, the session's opening included.
            with gevent.Timeout(timeout, RemoteCommandError(f"no answer within {timeout:g} s")):
                self.channel = transport.open_session(timeout=min(30.0, timeout))
                self.channel.exec_command(command)
                self.channel.sendall(first_input)
                self.first_line = _read_line(self.channel)
        except Exception as error:  # paramiko raises SSHException, EOFError or socket errors here
            if hasattr(self, "channel"):
                self.channel.close()
            if isinstance(error, RemoteCommandError):
                raise
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

    @property
    def taken_away(self) -> bool:
        """The command ended while its connection lives on: what it held was released under us (a heartbeat that
        starved, a kill), not lost with the host."""
        ended = self.channel.closed or self.channel.exit_status_ready() or self.heartbeat.dead
        transport = self.channel.get_transport()
        return ended and transport is not None and transport.is_active()

    def rest_of_output(self, limit: int = 4096, timeout: float = 10.0) -> bytes:
        """What the command printed after its first line, up to LIMIT bytes and TIMEOUT seconds: a hostile host
        can neither hang us here nor fill our memory."""
        import gevent

        received = b""
        with gevent.Timeout(timeout, False):
            while len(received) < limit and (chunk := self.channel.recv(limit - len(received))):
                received += chunk
        return received

    def release(self) -> None:
        self.heartbeat.kill(block=False)
        try:
            self.channel.shutdown_write()
            self.channel.close()
        except Exception:  # a connection that already dropped has released the remote side too
            return


def _read_line(channel) -> bytes:
    line = b""
    while not line.endswith(b"\n") and len(line) < LINE_LIMIT:
        chunk = channel.recv(1)
        if not chunk:
            break
        line += chunk
    return line.strip()
