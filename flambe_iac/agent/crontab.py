"""The agent's one line in the SSH user's crontab, `@reboot ... # flambe-autostop`: added, replaced or removed,
with every other byte of the user's crontab kept as it was."""

from __future__ import annotations

import re
import shlex
import subprocess

from flambe_iac.agent.records import AGENT_ENVIRONMENT, AGENT_LOG, CRONTAB_MARK

CRONTAB_TIMEOUT = 30
NO_CRONTAB = "no crontab for"
CRONTAB_ENVIRONMENT = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}


SHELL_WORD = rb"""(?:[\w@%+=:,./-]+|'[^']*'(?:"'"'[^']*')*)"""  # one word as shlex.quote writes it
AGENT_LINE = re.compile(rb"@reboot cd && PATH=" + SHELL_WORD + b" " + re.escape(AGENT_ENVIRONMENT.encode()) + b" "
                        + SHELL_WORD + re.escape(f" -m flambe_iac.agent run >> {AGENT_LOG} 2>&1 {CRONTAB_MARK}".encode()))


class CrontabError(Exception):
    pass


def reboot_line(python: str, path: str) -> str:
    """What cron runs at boot: the agent, from the pushed flambe_iac, with the deploy's PATH (cron's own is bare)."""
    if any(character in path + python for character in "%\n\r"):  # % ends a crontab command; a newline, the line
        raise CrontabError("the agent's PATH or python holds % or a newline, which a crontab line cannot")
    return (f"@reboot cd && PATH={shlex.quote(path)} {AGENT_ENVIRONMENT} {shlex.quote(python)} "
            f"-m flambe_iac.agent run >> {AGENT_LOG} 2>&1 {CRONTAB_MARK}")


def is_agent_line(line: bytes) -> bool:
    """The agent's line, exactly as `reboot_line` writes it (any PATH and python) and as cron reads it, ending at
    \n: a line of the user's that looks like it, merely ends with the mark, or ends in \r\n (cron runs the \r as
    part of the command), is theirs."""
    return AGENT_LINE.fullmatch(line.removesuffix(b"\n")) is not None


def without_agent(current: bytes) -> bytes:
    """CURRENT without the agent's line. Lines end at \n only, as cron reads them: a lone \r is inside a line."""
    return b"".join(line for line in re.split(rb"(?<=\n)", current) if not is_agent_line(line))


def with_agent(current: bytes, line: str) -> bytes:
    kept = without_agent(current)
    if kept and not kept.endswith(b"\n"):
        kept += b"\n"
    return kept + line.encode() + b"\n"


def read_crontab() -> bytes:
    """The user's crontab; empty if there is none. Any other failure raises: installing over a crontab that could
    not be read would lose the user's lines."""
    try:
        result = subprocess.run(["crontab", "-l"], capture_output=True, timeout=CRONTAB_TIMEOUT,
                                stdin=subprocess.DEVNULL, env=CRONTAB_ENVIRONMENT)
    except FileNotFoundError:
        raise CrontabError("no crontab command on this host (install cron): the agent could not come back after "
                           "a reboot") from None
    except subprocess.TimeoutExpired:
        raise CrontabError("crontab -l did not answer") from None
    if result.returncode == 0:
        return result.stdout
    if NO_CRONTAB in result.stderr.decode(errors="replace"):
        return b""
    raise CrontabError(f"crontab -l failed: {result.stderr.decode(errors='replace').strip()[:200]}")


def write_crontab(content: bytes) -> None:
    """Install CONTENT as the user's crontab; none at all if it is empty (as before the agent came)."""
    try:
        result = subprocess.run(["crontab", "-"] if content else ["crontab", "-r"], input=content,
                                capture_output=True, timeout=CRONTAB_TIMEOUT, env=CRONTAB_ENVIRONMENT)
    except subprocess.TimeoutExpired:
        raise CrontabError("crontab - did not answer") from None
    if result.returncode != 0:
        raise CrontabError(f"crontab refused the new table: {result.stderr.decode(errors='replace').strip()[:200]}")


def update_crontab(change) -> bool:
    """Apply CHANGE (bytes -> bytes) to the user's crontab; write it only if it changes. True if it did."""
    current = read_crontab()
    wanted = change(current)
    if wanted == current:
        return False
    write_crontab(wanted)
    return True
