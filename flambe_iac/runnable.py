"""The Runnable a user subclasses, and the one way it is run, locally (`flambe-run`) or on the orchestrator.

    from flambe_iac import Runnable

    class Train(Runnable):
        def __init__(self, epochs: int = 1):
            self.epochs = epochs

        def run(self):
            token = self.config["wandb"]["api_key"]      # from the secrets ini
            data = self.resources["data"]                 # a pathlib.Path
            ...

Only the standard library here: the orchestrator runs this module with its own python3.
"""

from __future__ import annotations

import configparser
import importlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from flambe_iac.agent.records import MAX_RECORD, PREEMPTED_DIR, read_plain_file
from flambe_iac.inputs.secrets_file import secrets_parser
from flambe_iac.local_files import READABLE, write_atomically

ON_PREEMPT_SECONDS = 90
NOTICE_LIFETIME_SECONDS = 150  # a spot notice comes two minutes before the interruption
NOTICE_POLL_SECONDS = 1.0


class Runnable:
    """Subclass it and implement run(). Before run() is called:

    - `self.config`: a configparser.ConfigParser read from the secrets ini (no interpolation, so `%` is a `%`;
      [DEFAULT] values are inherited by every section, as configparser does);
    - `self.resources`: {name: Path} of the runnable's resources, where they are on this machine.

    Optionally, `on_preempt(host_id, interruption)`: called (in a thread of its own, while run() goes on) when
    a spot member of the cluster gets its two-minute interruption notice, to save a checkpoint. It is given at
    most 90 s.
    """

    config: configparser.ConfigParser
    resources: dict[str, Path]

    def run(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement run()")


class RunnableError(Exception):
    """The runnable could not be found or made; the message says which and why."""


def secrets_config(path: Path | None) -> configparser.ConfigParser:
    """The secrets ini as the runnable sees it, read by the same parser that checked it before the deploy."""
    config = secrets_parser()
    if path is not None:
        with open(path, encoding="utf-8") as stream:
            config.read_file(stream, source=str(path))
    return config


def load_runnable_class(spec: str) -> type[Runnable]:
    """`package.module:ClassName` → the class, which must subclass Runnable."""
    module_name, _, class_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RunnableError(f"runnable {spec!r}: cannot import {module_name!r} ({error})") from None
    runnable_class = getattr(module, class_name, None)
    if not isinstance(runnable_class, type) or not issubclass(runnable_class, Runnable):
        raise RunnableError(f"runnable {spec!r}: {module_name} has no Runnable subclass named {class_name!r}")
    return runnable_class


def run_runnable(spec: str, args: dict[str, Any], config: configparser.ConfigParser,
                 resources: dict[str, Path]) -> None:
    runnable_class = load_runnable_class(spec)
    try:
        runnable = runnable_class(**args)
    except TypeError as error:
        raise RunnableError(f"runnable {spec!r}: its args do not fit {runnable_class.__name__}: {error}") from None
    runnable.config = config
    runnable.resources = resources
    threading.Thread(target=answer_preemptions, args=(runnable, Path.home() / PREEMPTED_DIR), daemon=True).start()
    runnable.run()


def answer_preemptions(runnable: Runnable, notices: Path) -> None:
    started = time.time()  # read once: a clock that jumps during the run cannot make a notice of this run stale
    said = None
    while True:
        try:
            cause = answer_notices(runnable, notices, started)
        except OSError as error:  # a full disk, a directory made unreadable: the next round tries again
            cause = f"preemption notices unreadable: {error}"
        if cause and cause != said:
            print(cause, flush=True)
        said = cause
        time.sleep(NOTICE_POLL_SECONDS)


def answer_notices(runnable: Runnable, notices: Path, started: float) -> str | None:
    """For each notice an agent left in NOTICES (ID.json), call the runnable's on_preempt, at most
    ON_PREEMPT_SECONDS, and leave what it did in ID.done for the agent that waits on it (written whole, a symlink
    there replaced, never followed). A notice whose own record says it was left more than the two minutes it
    announces before this run STARTED is answered without a call. A cause when the directory is not ours."""
    if notices.is_symlink():  # what it points to is not ours: nothing there is read or written
        return f"~/{PREEMPTED_DIR} is a symlink, not the runner's directory: its notices are not answered"
    for notice in sorted(notices.glob("*.json")) if notices.is_dir() else []:
        done = notice.with_suffix(".done")
        if done.is_file() and not done.is_symlink():
            continue
        write_atomically(done, answer_notice(runnable, notice, started) + "\n", READABLE)
    return None


def answer_notice(runnable: Runnable, notice: Path, started: float) -> str:
    try:
        document = json.loads(read_plain_file(notice, MAX_RECORD))
        host, interruption, left_at = str(document["host"]), str(document["interruption"]), document["at"]
        if isinstance(left_at, bool) or not isinstance(left_at, (int, float)):
            raise TypeError("its time is not a number")
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return "an unreadable notice: on_preempt not called"
    if left_at < started - NOTICE_LIFETIME_SECONDS:
        return "a notice from before this run: on_preempt not called"
    return call_on_preempt(runnable, host, interruption)


def call_on_preempt(runnable: Runnable, host: str, interruption: str) -> str:
    hook = getattr(runnable, "on_preempt", None)
    if hook is None:
        return "the runnable has no on_preempt"
    outcome = ["on_preempt did not return within 90 s"]

    def call():
        try:
            hook(host, interruption)
            outcome[0] = "on_preempt returned"
        except Exception as error:  # the user's code: any failure is reported, never fatal to the run
            outcome[0] = f"on_preempt raised {type(error).__name__}: {error}"[:300]

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(ON_PREEMPT_SECONDS)
    print(f"preemption notice for {host} ({interruption}): {outcome[0]}", flush=True)
    return outcome[0]


def run_from_plan(plan_path: Path) -> None:
    """On the orchestrator: the plan flambe-deploy --run wrote, with paths relative to the home directory."""
    plan = json.loads(plan_path.read_text())
    home = Path.home()
    for directory in reversed(plan["import_paths"]):
        sys.path.insert(0, str(home / directory))
    secrets = home / plan["secrets"]
    print(f"flambe-iac {plan['flambe_iac_version']}: running {plan['runnable']} (pid {os.getpid()})", flush=True)
    run_runnable(plan["runnable"], plan["args"], secrets_config(secrets if secrets.exists() else None),
                 {name: home / path for name, path in plan["resources"].items()})
    print("runnable finished", flush=True)


if __name__ == "__main__":
    # Through the package, not this __main__ copy: the user's classes subclass flambe_iac.runnable.Runnable.
    from flambe_iac.runnable import run_from_plan as run_from_plan_in_package

    run_from_plan_in_package(Path(sys.argv[1]))
