"""The agent's files on a member, relative to the SSH user's home: its settings (written by flambe-deploy), its
state (written by the agent, read by `status` and by the orchestrator's agent), and the preemption notices the
runner on the orchestrator answers. Every reader treats the bytes as untrusted: garbage is a cause in words."""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import asdict, dataclass, field

AGENT_ARCHIVE = ".flambe/autostop.zip"  # the agent's code: this flambe_iac, as one zip
AGENT_ENVIRONMENT = f'PYTHONPATH="$HOME/{AGENT_ARCHIVE}"'  # how the agent's code runs, from the home
AGENT_CONFIG = ".flambe/autostop.json"
AGENT_STATE = ".flambe/autostop.state"
AGENT_PID = ".flambe/autostop.pid"
AGENT_LOG = ".flambe/autostop.log"
PREEMPTED_DIR = ".flambe/preempted"  # on the orchestrator: ID.json, a notice; ID.done, on_preempt's outcome
CRONTAB_MARK = "# flambe-autostop"
AGENT_PROCESS = "flambe-autostop"  # the agent's process name (at most 15 characters), as pgrep -x sees it
STATES = ("watching", "waiting for factories", "stopping", "stop refused", "preempted")
MAX_RECORD = 4096
LATEST_TIME = 2 ** 33  # seconds since 1970, about the year 2242: a larger time is not one
NOTICE_ACTIONS = ("terminate", "stop", "hibernate")  # EC2's words in spot/instance-action
EC2_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")  # as spot/instance-action writes it
NOTICE_WORDS = re.compile(r"(?:terminate|stop|hibernate|unknown action) at (?:" + EC2_TIME.pattern + "|unknown time)")


@dataclass(frozen=True)
class AgentConfig:
    minutes: float
    role: str
    member_id: str
    user: str
    factories: tuple[str, ...] = ()  # the factories' private addresses (the orchestrator waits for them)
    orchestrator: str | None = None  # its private address (a factory's preemption notice goes there)
    gpu_percent: float = 10.0
    cpu_cores: float = 0.5
    ray_stop: str | None = None  # the shell command that stops this host's Ray (with --ray), run on a notice

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True) + "\n").encode()


def read_plain_file(path, limit: int) -> bytes:
    """The first LIMIT bytes of PATH, only if it is a plain file: not a symlink to elsewhere, nor a fifo that a read
    would wait on for ever. OSError otherwise."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(descriptor, "rb") as stream:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(0, "not a plain file")
        return stream.read(limit)


def read_config(data: bytes) -> AgentConfig:
    """Raises ValueError or TypeError naming what is wrong."""
    document = json.loads(data.decode())
    if not isinstance(document, dict):
        raise ValueError("the agent's settings are not a JSON object")
    factories = document.get("factories") or []
    if not isinstance(factories, list) or not all(isinstance(item, str) for item in factories):
        raise ValueError("factories must be a list of addresses")
    config = AgentConfig(**{**document, "factories": tuple(factories)})
    for name in ("minutes", "gpu_percent", "cpu_cores"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"{name} must be a number above 0, not {value!r}")
    for name in ("role", "member_id", "user"):
        if not isinstance(getattr(config, name), str):
            raise ValueError(f"{name} must be text")
    return config


@dataclass
class AgentState:
    pid: int
    role: str
    minutes: float
    state: str = "watching"
    idle_minutes: float = 0.0
    last_busy: str | None = None  # the signals last seen busy, in words
    last_busy_at: float | None = None
    stops_in_minutes: float | None = None
    waiting_for: list[str] = field(default_factory=list)  # factories still busy (the orchestrator)
    preempted_at: float | None = None
    interruption: str | None = None  # the notice's action and time in NOTICE_WORDS (each part checked)
    cause: str | None = None  # why a stop was refused; what was wrong with a notice
    updated_at: float = 0.0

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True) + "\n").encode()


REQUIRED_NUMBERS = ("minutes", "idle_minutes", "updated_at")
MAY_BE_EMPTY_NUMBERS = ("last_busy_at", "stops_in_minutes", "preempted_at")  # null in a record: never happened
MAY_BE_EMPTY_TEXTS = ("last_busy", "interruption", "cause")


def parse_clock(line: str) -> float | None:
    """A host's `date +%s`, or None: only ASCII digits (str.isdigit also takes '²', which float refuses)."""
    line = line.strip()
    return float(line) if line.isascii() and line.isdigit() else None


def parse_state(data: bytes) -> AgentState | str:
    """The agent's state record as a host sent it, or the cause in words why it cannot be read."""
    if len(data) > MAX_RECORD:
        return f"its state record is over {MAX_RECORD} bytes"
    try:
        document = json.loads(data.decode(errors="replace") or "null")
    except (ValueError, RecursionError):
        return "its state record is not JSON (a full disk can leave it truncated)"
    if not isinstance(document, dict):
        return "its state record is not a JSON object"
    pid = document.get("pid")
    if document.get("state") not in STATES or isinstance(pid, bool) or not isinstance(pid, int):
        return "its state record names no known state"
    for key in (*REQUIRED_NUMBERS, *MAY_BE_EMPTY_NUMBERS):
        value = document.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not -LATEST_TIME <= value <= LATEST_TIME):
            return f"its state record's {key} is not a number"
    if any(document.get(key) is not None and not isinstance(document[key], str)
           for key in ("role", *MAY_BE_EMPTY_TEXTS)):
        return "its state record holds a field of the wrong type"
    waiting = document.get("waiting_for") or []
    if not isinstance(waiting, list) or not all(isinstance(item, str) for item in waiting):
        return "its state record's waiting_for is not a list of names"
    missing = [key for key in ("role", *REQUIRED_NUMBERS) if document.get(key) is None]
    if missing:
        return f"its state record has no {missing[0]}"
    known = AgentState.__dataclass_fields__
    return AgentState(**{key: value for key, value in document.items() if key in known})
