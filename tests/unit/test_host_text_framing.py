"""What a job prints, what a file or a record on a host holds, reaches a parser only framed (base64 under a section's
line): no byte of it can end a section or open one. The status script and the state read run here, in bash, on a
home laid out as a host's, with the attacker's bytes where a job or a host puts them."""

import hashlib
import json
import os
import subprocess

from framed_answers import section
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flambe_iac.day_two.status import STATUS_SCRIPT, parse_status
from flambe_iac.engine.snapshot import SnapshotRequest, parse_snapshot, snapshot_command
from flambe_iac.engine.cluster_key import new_cluster_key
from flambe_iac.engine.ray_cluster import parse_start_output, start_command
from flambe_iac.remote_layout import CLUSTER_PUBLIC_KEY, MANIFEST, RUN_EXIT, RUN_LOG, RUN_PID
from flambe_iac.engine.remote_probes import answer_lines, host_sections

KEY = new_cluster_key("flambe-cluster:c1").public_line
# A job's output that rewrote status before framing: a run record that says it finished, a manifest that records
# nothing, no checksums, and the cluster key (which a job on the host can read).
FORGED = f'@run\nexited 0\n@manifest\n{{"resources": {{}}}}\n@sums\n@pub\n{KEY}\n'.encode()


def failed_run_home(home, log: bytes):
    """A host whose runnable failed (exit 1) after printing LOG, and whose resource differs from its manifest."""
    (home / ".flambe").mkdir(parents=True)
    (home / CLUSTER_PUBLIC_KEY).write_text(KEY + "\n")
    (home / MANIFEST).write_text(json.dumps({"resources": {"data": {"x.bin": hashlib.sha256(b"sent").hexdigest()}}}))
    (home / "resources" / "data").mkdir(parents=True)
    (home / "resources" / "data" / "x.bin").write_bytes(b"edited on the host")
    (home / RUN_PID).write_text("999999999\n")  # ended long ago
    (home / RUN_EXIT).write_text("1\n")
    (home / RUN_LOG).write_bytes(log)


def status_on(home):
    result = subprocess.run(["bash", "-c", STATUS_SCRIPT], capture_output=True, env={**os.environ, "HOME": str(home)})
    return parse_status("c1-orchestrator", "10.0.0.1", result.returncode, result.stdout.decode(errors="surrogateescape"),
                        result.stderr.decode(errors="replace"))


def test_a_job_that_prints_section_lines_cannot_turn_a_failed_status_into_ok(tmp_path):
    failed_run_home(tmp_path / "home", b"loading\n" + FORGED)
    status = status_on(tmp_path / "home")
    assert status.runnable == "failed (exit 1)" and status.resources_match is False and not status.healthy
    assert status.fingerprint is not None
    assert status.log_tail == answer_lines(FORGED)[-5:]  # shown as what the job printed, nothing else


def test_a_log_without_a_last_newline_cannot_swallow_the_next_section(tmp_path):
    failed_run_home(tmp_path / "home", b"progress 99%\r@ray")  # tail ends mid-line; @ray is not a section
    status = status_on(tmp_path / "home")
    assert status.runnable == "failed (exit 1)" and status.ray is None
    assert status.log_tail == ["progress 99%\r@ray"]


BASE = section("@pub", f"{KEY}\n") + section("@manifest", '{"resources": {}}') + section("@sums") \
    + section("@run", "exited 1\n")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.lists(st.sampled_from(["@run", "@pub", "@end", "@sums", "@manifest", "exited 0",
                                                          "@alive", "@running raylet", "\r", "\n", "\x85"]),
                                          max_size=12).map(lambda parts: "\n".join(parts).encode()))
def test_whatever_bytes_a_job_prints_status_reads_the_same(log):
    """The parser itself, fed the framed log with any bytes: the log changes nothing but the tail shown."""
    status = parse_status("c1-orchestrator", "10.0.0.1", 0, BASE + section("@log", log) + "@end\n", "")
    assert status.runnable == "failed (exit 1)" and status.problems == ["runnable failed (exit 1)"]
    assert status.log_tail == answer_lines(log) and status.ray is None and status.agent is None


def test_an_unframed_body_is_a_problem_in_words_not_a_verdict():
    """A host that answers a section in clear text (a start-up file printing, a script not ours) is not read."""
    status = parse_status("c1-orchestrator", "10.0.0.1", 0, BASE + "@log\nexited 0\n@end\n", "")
    assert not status.healthy and any("not base64" in problem for problem in status.problems)


def test_a_symlink_target_cannot_forge_the_state_read(tmp_path):
    """A target with a newline and a section's line (`@running raylet`, `@clock 0`) is one field, not sections."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    target = home / "keys\n@running raylet\n@clock 0"
    (home / ".ssh" / "authorized_keys").symlink_to(target)
    request = SnapshotRequest(links=(".ssh/authorized_keys",), processes=("no-such-process-here",))
    result = subprocess.run(["bash", "-c", snapshot_command(request)], cwd=home, capture_output=True, check=True,
                            env={**os.environ, "HOME": str(home)})
    lines = answer_lines(result.stdout)
    snapshot = parse_snapshot(lines[:-1])
    assert snapshot.links == {".ssh/authorized_keys": (str(target), True)}
    assert snapshot.running == set() and snapshot.clock > 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["@read", "@tree", "@x", "@"]), st.text(max_size=8),
                          st.binary(max_size=40)), max_size=6))
def test_one_parser_splits_every_answer_into_the_sections_it_was_given(parts):
    text = "".join(section(name, body, argument.replace("\n", " ")) for name, argument, body in parts)
    sections = host_sections(answer_lines(text))
    assert [(found.name, found.text()) for found in sections[1:]] == [(name, body) for name, _, body in parts]


FAKE_PYTHON = """#!/bin/sh
# A host's Python whose Ray prints what a hostile start log could hold, then fails to start.
case "$*" in
  *"print(ray.__version__)"*) echo 2.60.0 ;;
  *"ray.scripts.scripts start"*) printf '@started\\n@version 9.9\\n'; exit 1 ;;
esac
"""


def test_a_ray_start_log_cannot_say_the_start_succeeded(tmp_path):
    """The start command itself, in bash, with a Python whose `ray start` fails after printing section lines."""
    home = tmp_path / "home"
    home.mkdir()
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    command = start_command(str(python), "10.0.0.1", "10.0.0.1", "head", "r1")
    result = subprocess.run(["bash", "-c", command], cwd=home, capture_output=True, timeout=60,
                            env={**os.environ, "HOME": str(home)})
    outcome = parse_start_output(result.stdout)
    assert (outcome.status, outcome.version) == ("failed", "2.60.0") and "@started" in outcome.detail
