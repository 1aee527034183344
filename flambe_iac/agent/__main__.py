"""python3 -m flambe_iac.agent install | remove | run | notice ID TEXT, in the SSH user's home.

install and remove are what flambe-deploy runs (--autostop MINUTES, --autostop off); run is the agent itself (also
the crontab's @reboot line); notice is what a preempted member runs on the orchestrator.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flambe_iac.agent.commands import SHUTDOWN, run_quietly
from flambe_iac.agent.crontab import CrontabError, reboot_line, update_crontab, with_agent, without_agent
from flambe_iac.agent.records import (
    AGENT_ARCHIVE,
    AGENT_CONFIG,
    AGENT_LOG,
    AGENT_PID,
    AGENT_PROCESS,
    AGENT_STATE,
    NOTICE_WORDS,
    PREEMPTED_DIR,
    AgentConfig,
    read_config,
    read_plain_file,
)
from flambe_iac.agent.signals import runnable_alive
from flambe_iac.names import HOST_ID
from flambe_iac.local_files import READABLE, write_atomically

AGENT_LOCK = ".flambe/autostop.lock"
EXIT_REFUSED = 3
MAX_LOG = 1 << 20
ON_PREEMPT_WAIT = 95
MAX_OUTCOME = 500
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
PR_SET_NAME = 15


class Refused(Exception):
    """What stops the install, in words for the deploy's report."""


def load_config(home: Path) -> AgentConfig:
    try:
        return read_config((home / AGENT_CONFIG).read_bytes())
    except (OSError, ValueError, TypeError) as error:
        raise Refused(f"cannot read {AGENT_CONFIG}: {error}") from None


def running_agent(home: Path) -> int | None:
    """The pid of this home's agent, as its pid file names it, if that process is an agent."""
    try:
        pid = int((home / AGENT_PID).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if is_agent(pid, home) else None


def agents_of(home: Path) -> set[int]:
    """Every agent process of this user whose home is HOME, found in /proc (a pid file may be gone or stale)."""
    return {int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit() and is_agent(entry.name, home)}


def is_agent(pid: int | str, home: Path) -> bool:
    """Whether process PID is an agent watching HOME (`-m flambe_iac.agent run`, run from HOME)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return b"flambe_iac.agent" in cmdline and b"run" in cmdline and os.readlink(f"/proc/{pid}/cwd") == str(home)
    except OSError:
        return False


def stop_agent(home: Path) -> None:
    """End every agent of HOME: asked first (SIGTERM), then made to (SIGKILL)."""
    for number in (signal.SIGTERM, signal.SIGKILL):
        for pid in agents_of(home):
            try:
                os.kill(pid, number)
            except (ProcessLookupError, PermissionError):
                continue
        for _ in range(50):
            if not agents_of(home):
                return
            time.sleep(0.02)
    if agents_of(home):
        raise Refused(f"an agent of this home would not end: pids {sorted(agents_of(home))}")


def start_agent(home: Path, config: AgentConfig) -> int:
    log = home / AGENT_LOG
    if log.exists() and log.stat().st_size > MAX_LOG:
        log.unlink()
    with open(log, "ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "flambe_iac.agent", "run"], cwd=home, stdin=subprocess.DEVNULL, stdout=output,
            stderr=output, start_new_session=True,
            env={"PATH": os.environ.get("PATH", DEFAULT_PATH), "PYTHONPATH": str(home / AGENT_ARCHIVE),
                 "HOME": str(home), "LC_ALL": "C.UTF-8"})
    for _ in range(50):  # the agent writes its pid file once it holds the lock
        if running_agent(home) == process.pid:
            return process.pid
        if process.poll() is not None:
            break
        time.sleep(0.02)
    raise Refused(f"the agent did not start: see ~/{AGENT_LOG}")


def check_shutdown_allowed(config: AgentConfig) -> None:
    result = run_quietly(("sudo", "-n", "-l", *SHUTDOWN[2:]), 30)
    if result is None or result.returncode != 0:
        said = (result.stderr.strip().splitlines()[-1:] if result is not None else []) or ["not allowed"]
        raise Refused(f"{config.user} may not run `sudo -n shutdown` here (sudo: {said[0][:160]}), which the agent "
                      f"needs to stop this member: allow it, e.g. `{config.user} ALL=(root) NOPASSWD: "
                      f"/usr/sbin/shutdown` in /etc/sudoers.d/, or deploy with --autostop off")


def install(home: Path) -> str:
    """A refused install takes its settings away again: an agent still running with older ones must never make the
    next deploy's files match, and that deploy read as unchanged."""
    config = load_config(home)
    try:
        check_shutdown_allowed(config)
        add_reboot_line()
        stop_agent(home)
        return f"agent running (pid {start_agent(home, config)}), stops this member after {config.minutes:g} idle min"
    except Refused:
        (home / AGENT_CONFIG).unlink(missing_ok=True)
        raise


def add_reboot_line() -> None:
    try:
        path = os.environ.get("PATH", DEFAULT_PATH)  # the deploy's: where sudo and nvidia-smi are (cron's is bare)
        update_crontab(lambda current: with_agent(current, reboot_line(sys.executable, path)))
    except CrontabError as error:
        raise Refused(str(error)) from None


def remove(home: Path) -> str:
    """Every file of ours, whatever an earlier install left (a dead agent, settings a refused install took away), and
    the notices left for the runner; nothing else."""
    stop_agent(home)
    try:
        update_crontab(without_agent)
    except CrontabError as error:
        if "no crontab command" not in str(error):
            raise Refused(str(error)) from None
    for name in (AGENT_CONFIG, AGENT_STATE, AGENT_PID, AGENT_LOCK, AGENT_LOG, AGENT_ARCHIVE):
        (home / name).unlink(missing_ok=True)
    remove_notices(home / PREEMPTED_DIR)
    return "agent removed"


def remove_notices(directory: Path) -> None:
    """ID.json and ID.done, as `notice` and the runner write them; the directory too once it holds nothing else."""
    if directory.is_symlink() or not directory.is_dir():
        return
    for path in directory.iterdir():
        if path.suffix in (".json", ".done") and HOST_ID.fullmatch(path.stem) and not path.is_dir():
            path.unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:  # something of the user's is in it: it stays
        return


def run(home: Path) -> None:
    lock = os.open(home / AGENT_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # another agent watches this home
    config = load_config(home)
    name_this_process(AGENT_PROCESS)
    write_atomically(home / AGENT_PID, f"{os.getpid()}\n", READABLE)
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(0))
    from flambe_iac.agent.watch import Watch  # the loop's modules (urllib among them) load only for the agent

    Watch(home, config).run()


def name_this_process(name: str) -> None:
    """The name ps and pgrep -x show (prctl PR_SET_NAME), so the deploy's host read sees whether the agent runs."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: the pid file still finds the agent


def notice(home: Path, host_id: str, text: str) -> str:
    """Leave a notice for the runner, then wait (at most ON_PREEMPT_WAIT s) for what its on_preempt did. TEXT comes
    from another member: the runnable gets it only in the words an agent writes (`terminate at 2026-...`). An
    outcome left by an earlier interruption of the same member goes first, or this one would read as answered."""
    if not HOST_ID.fullmatch(host_id):
        raise Refused("a notice names a host id of letters, digits, '.', '_', ':' and '-'")
    directory = home / PREEMPTED_DIR
    directory.mkdir(mode=0o700, exist_ok=True)
    if directory.is_symlink():  # what it points to is not ours: nothing there is removed or written
        raise Refused(f"~/{PREEMPTED_DIR} is a symlink, not the runner's directory: the notice is not left there")
    (directory / f"{host_id}.done").unlink(missing_ok=True)
    words = text if NOTICE_WORDS.fullmatch(text) else "unknown action at unknown time"
    write_atomically(directory / f"{host_id}.json",
                     json.dumps({"host": host_id, "interruption": words, "at": time.time()}), READABLE)
    deadline = time.monotonic() + ON_PREEMPT_WAIT
    while time.monotonic() < deadline:
        done = directory / f"{host_id}.done"
        if done.exists() or done.is_symlink():
            return runners_outcome(done)
        if not runnable_alive(home):
            return "no runnable runs here"
        time.sleep(0.5)
    return "on_preempt did not answer in time"


def runners_outcome(done: Path) -> str:
    """The first MAX_OUTCOME bytes of ID.done, read only if it is a plain file (not a symlink elsewhere, nor a fifo
    that a read would wait on forever)."""
    try:
        return read_plain_file(done, MAX_OUTCOME).decode(errors="replace")
    except OSError as error:
        return f"the runner's outcome is not a plain file: {error.strerror}"


def main(argv: list[str]) -> int:
    home = Path.home()
    commands = {"install": lambda: install(home), "remove": lambda: remove(home), "run": lambda: run(home),
                "notice": lambda: notice(home, *argv[1:3])}
    if not argv or argv[0] not in commands or (argv[0] == "notice" and len(argv) != 3):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        said = commands[argv[0]]()
    except Refused as error:
        print(f"autostop: {error}", file=sys.stderr)
        return EXIT_REFUSED
    if said:
        print(said)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
