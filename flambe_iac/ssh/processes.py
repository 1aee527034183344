"""Local child processes (ssh, rsync) that let every other host go on while they run, and stop with the run.

posix_spawn, not gevent's subprocess: that one forks this whole process for every child, which cost ~20 ms per host on
a busy machine. gevent's os.waitpid and file objects wait cooperatively. Each child leads a process group of its own,
so stopping it stops whatever it started (rsync's ssh). gevent is imported inside the functions: start-up stays fast.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

RUNNING_CHILDREN: set[int] = set()  # children under way, so an interrupt or a lost lock can stop them


@dataclass
class Child:
    """A spawned child and the ends of its pipes we hold (None where the child got /dev/null or a file)."""

    pid: int
    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None


def spawn(argv: list[str], environment: dict | None, stdin: bool = False, stdout: bool = False,
          stderr: bool | str = False) -> Child:
    """Start ARGV in a process group of its own, registered in RUNNING_CHILDREN. A pipe for each of STDIN, STDOUT and
    STDERR asked for (else /dev/null); STDERR may instead name a file the child writes (a child that outlives its
    parent, as ssh's master does, would hold a pipe open for ever)."""
    actions, ours, theirs = [], {}, []
    for fd, wanted in ((0, stdin), (1, stdout), (2, stderr)):
        if wanted is True:
            read_end, write_end = os.pipe()
            mine, child_end = (write_end, read_end) if fd == 0 else (read_end, write_end)
            actions += [(os.POSIX_SPAWN_DUP2, child_end, fd), (os.POSIX_SPAWN_CLOSE, mine)]
            ours[fd], theirs = mine, [*theirs, child_end]
        elif wanted:
            actions.append((os.POSIX_SPAWN_OPEN, fd, wanted, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        else:
            actions.append((os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY, 0))
    try:
        pid = os.posix_spawnp(argv[0], argv, os.environ if environment is None else environment,
                              file_actions=actions, setpgroup=0)
    except OSError:
        for fd in [*ours.values()]:
            os.close(fd)
        raise
    finally:
        for fd in theirs:
            os.close(fd)
    RUNNING_CHILDREN.add(pid)
    return Child(pid, ours.get(0), ours.get(1), ours.get(2))


def reap(pid: int) -> int:
    """Wait for PID to end, letting the other greenlets run (a blocking waitpid would stop them all: gevent watches
    only the children it forked itself); its exit code (a signal's as -N)."""
    import gevent

    delay = 0.001
    try:
        while True:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped already (a stop raced another reaper): its status is gone
                return UNKNOWN_EXIT
            if done:
                return os.waitstatus_to_exitcode(status)
            gevent.sleep(delay)
            delay = min(delay * 2, 0.05)
    finally:
        RUNNING_CHILDREN.discard(pid)


UNKNOWN_EXIT = 255  # as ssh's own failure: never read as success


def reap_later(pid: int) -> None:
    """Reap PID in the background: a child we stopped, or whose end we need not wait for."""
    import gevent

    gevent.spawn(reap, pid)


def stop(pid: int) -> None:
    """SIGTERM to PID's process group (it leads one of its own), if it still runs."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


def spawn_and_wait(argv: list[str], environment: dict | None) -> tuple[int, str]:
    """Run ARGV and return (exit code, stderr), letting other hosts go on meanwhile."""
    from gevent.fileobject import FileObjectPosix

    child = spawn(argv, environment, stderr=True)
    try:
        with FileObjectPosix(child.stderr, "rb") as errors:
            stderr = errors.read()
        code = reap(child.pid)
    finally:
        RUNNING_CHILDREN.discard(child.pid)
    return code, stderr.decode(errors="replace")


def stop_children() -> None:
    """Stop every child under way (rsync and its ssh, commands on hosts) before the process exits."""
    for pid in list(RUNNING_CHILDREN):
        stop(pid)
