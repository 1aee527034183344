"""The deploy lock is a fence: hashing a large resource never starves its heartbeat (the hashing runs in OS threads,
off the event loop), so a long deploy keeps its lock; a lost lock stops every write (test_honest_outcomes)."""

import subprocess
import sys

HASH_WHILE_TICKING = r"""
import sys, time
from gevent import monkey
monkey.patch_all()
import gevent
from pathlib import Path
from types import SimpleNamespace
from flambe_iac.deploys.steps import StepContext
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
context = StepContext(SimpleNamespace(resources=[Resource("data", data)]), None, "run")
started = time.monotonic()
digests = context.resource_checksums["data"]
ended = time.monotonic()
beating.kill()
during = [tick for tick in ticks if started < tick < ended]
print(len(digests), len(during), f"{ended - started:.2f}")
"""


def test_a_long_hash_leaves_the_heartbeat_beating(tmp_path):
    result = subprocess.run([sys.executable, "-c", HASH_WHILE_TICKING, str(tmp_path / "data")], capture_output=True,
                            text=True, check=True)
    files, beats, seconds = result.stdout.split()
    assert files == "4"
    # Hashed inside the event loop, not one beat could happen until the last file was done.
    assert int(beats) >= 3, f"{beats} heartbeats in {seconds} s of hashing"
