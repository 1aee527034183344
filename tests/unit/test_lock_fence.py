"""The deploy lock is a fence: hashing a large resource never starves its heartbeat (the hashing runs in OS threads,
off the event loop), so a long deploy keeps its lock; a lost lock stops every write (test_honest_outcomes)."""

import os
import subprocess
import sys

from flambe_iac.engine.lock import deploy_lock_command, take_deploy_lock

HASH_WHILE_TICKING = r"""
import sys, time
from gevent import monkey
monkey.patch_all()
import gevent
from pathlib import Path
from types import SimpleNamespace
from flambe_iac.engine.steps import StepContext
from flambe_iac.inputs.resources import Resource

data = Path(sys.argv[1])
data.mkdir()
block = bytes(range(256)) * 4096
for index in range(4):
    with open(data / f"part-{index}", "wb") as stream:
        for _ in range(64):
            stream.write(block)  # 64 MiB a file
ticks = []

def heartbeat():
    while True:
        gevent.sleep(0.02)
        ticks.append(time.monotonic())

beating = gevent.spawn(heartbeat)
gevent.sleep(0.1)
plan = SimpleNamespace(resources=[Resource("data", data)], extension_trees=[], request=SimpleNamespace(run=False), autostop=None,
                       local_trees={})
context = StepContext(plan, None, "run")
started = time.monotonic()
digests = context.resource_checksums["data"]
ended = time.monotonic()
beating.kill()
during = [tick for tick in ticks if started < tick < ended]
print(len(digests), len(during), f"{ended - started:.2f}")
"""


def test_a_long_hash_leaves_the_heartbeat_beating(tmp_path):
    # A home of its own: an empty checksum cache, so every byte is hashed.
    result = subprocess.run([sys.executable, "-c", HASH_WHILE_TICKING, str(tmp_path / "data")], capture_output=True,
                            text=True, check=True, env={**os.environ, "HOME": str(tmp_path)})
    files, beats, seconds = result.stdout.split()
    assert files == "4"
    # Hashed inside the event loop, not one beat could happen until the last file was done.
    assert int(beats) >= 3, f"{beats} heartbeats in {seconds} s of hashing"


class AnsweringLock:
    def __init__(self, first_line: bytes, rest: bytes = b""):
        self.first_line, self.rest, self.released = first_line, rest, False

    def rest_of_output(self, timeout):
        return self.rest

    def release(self):
        self.released = True


def test_a_lock_file_that_cannot_be_opened_fails_at_once_instead_of_waiting_for_a_holder():
    waits = []
    outcome = take_deploy_lock(lambda timeout: AnsweringLock(b"UNWRITABLE"), "10.0.0.1", "c1", 300, waits.append,
                               sleep=lambda seconds: waits.append(seconds))
    assert outcome.failure and "cannot open the deploy lock" in outcome.failure and waits == []


def test_a_busy_lock_waits_within_wait_then_names_the_holder():
    clock = iter(range(0, 1000)).__next__  # every reading a second later
    waits = []
    outcome = take_deploy_lock(lambda timeout: AnsweringLock(b"BUSY", b"ci@runner (pid 7) since now\n"), "10.0.0.1", "c1",
                               10, waits.append, clock=clock, sleep=lambda seconds: None)
    assert "another deploy of c1 is under way, from ci@runner (pid 7) since now" in outcome.failure
    assert waits and all("from ci@runner (pid 7) since now" in words for words in waits)


def test_the_lock_script_tells_an_unwritable_lock_file_from_a_busy_one(tmp_path):
    locked_out = tmp_path / "home"
    (locked_out / ".flambe").mkdir(parents=True)
    (locked_out / ".flambe" / "deploy.lock").mkdir()  # cannot be opened as a file, even by root
    result = subprocess.run(["bash", "-c", deploy_lock_command(".flambe/deploy.lock")], cwd=locked_out,
                            input="me\n", capture_output=True, text=True, timeout=30)
    assert result.stdout.splitlines()[0] == "UNWRITABLE"
