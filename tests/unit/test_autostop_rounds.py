"""The autostop agent across rounds of its loop, on a clock of the test's own, with fake or local sources: a notice
served again and again, a second interruption of the same member, a factory that answers between two silences, the
pace of the notice's questions, a metadata service that trickles, a GPU nvidia-smi cannot read, and `off` after an
agent that died. One reading proves little of a loop: each test runs it for many rounds."""

import dataclasses
import io
import json
import os
import shlex
import socket
import threading
import time
from http.server import ThreadingHTTPServer

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_autostop_agent import LINE, Checkpointing, watch_with
from test_honest_outcomes import offline, operations_that, plan_for

from flambe_iac.agent import __main__ as agent_main
from flambe_iac.agent import crontab as crontab_module
from flambe_iac.agent import watch as watch_module
from flambe_iac.agent.commands import SHUTDOWN, Answer, run_quietly
from flambe_iac.agent.records import AGENT_ARCHIVE, AGENT_CONFIG, NOTICE_WORDS, PREEMPTED_DIR, AgentState
from flambe_iac.agent.spot import NO_NOTICE, MetadataService, read_notice
from flambe_iac.engine.snapshot import HostSnapshot
from flambe_iac.engine import driver
from flambe_iac.lab import metadata_service
from flambe_iac.runnable import answer_notices
from flambe_iac.deploys.steps import TABLE

NOTICE = json.dumps({"action": "terminate", "time": "2026-11-30T10:00:00Z"}).encode()
SECOND_NOTICE = json.dumps({"action": "terminate", "time": "2026-11-30T11:30:00Z"}).encode()


class Metadata:
    """A metadata service that answers ANSWERS(clock now) and counts the questions."""

    def __init__(self, clock, answers, answered=True):
        self.clock, self.answers, self.answered, self.asked = clock, answers, answered, []

    def interruption(self):
        self.asked.append(self.clock())
        return self.answers(self.clock())


def run_rounds(agent, clock, seconds: float, after_each=lambda: None) -> None:
    """The loop as `run` drives it, its sleeps taken on the test's clock."""
    until = clock.now + seconds
    while clock.now < until:
        clock.now += agent.round()
        after_each()


def orchestrator_agent(tmp_path, monkeypatch, answers, ray_stop="ray stop"):
    """The orchestrator's agent, whose notices go to the real `notice` command and on to the runner's answer."""
    agent, clock, ran = watch_with(tmp_path, monkeypatch, ["runnable running"], minutes=30, member_id="i-0abc",
                                   ray_stop=ray_stop)
    agent.metadata = Metadata(clock, answers)
    told = []

    def run_quietly(argv, timeout, limit=0):
        ran.append(tuple(argv))
        if "flambe_iac.agent notice" in argv[-1]:
            words = shlex.split(argv[-1].split(" notice ", 1)[1])
            told.append(words[1])
            agent_main.notice(tmp_path, *words)
        return Answer(0, "", "")
    monkeypatch.setattr(watch_module, "run_quietly", run_quietly)
    return agent, clock, ran, told


def ray_stops(ran) -> int:
    return sum(1 for argv in ran if argv[-1].endswith("ray stop"))


def test_the_same_notice_served_at_every_question_is_answered_once(tmp_path, monkeypatch):
    agent, clock, ran, told = orchestrator_agent(tmp_path, monkeypatch, lambda now: read_notice(NOTICE))
    run_rounds(agent, clock, 120)
    assert len(agent.metadata.asked) >= 24  # every 5 s for the notice's two minutes
    assert told == ["terminate at 2026-11-30T10:00:00Z"] and ray_stops(ran) == 1
    assert agent.state.state == "preempted" and SHUTDOWN not in ran


def test_a_second_interruption_of_the_same_member_reaches_on_preempt_again(tmp_path, monkeypatch):
    """Back from a hibernation the service says no notice, then a new one comes: the runnable hears of both, though
    the outcome of the first is still on the orchestrator."""
    def answers(now):
        return read_notice(NOTICE) if now < 1060 else NO_NOTICE if now < 1200 else read_notice(SECOND_NOTICE)
    agent, clock, ran, told = orchestrator_agent(tmp_path, monkeypatch, answers)
    runnable = Checkpointing("return")
    started = time.time()
    run_rounds(agent, clock, 300, lambda: answer_notices(runnable, tmp_path / PREEMPTED_DIR, started))
    assert runnable.calls == [("i-0abc", "terminate at 2026-11-30T10:00:00Z"),
                              ("i-0abc", "terminate at 2026-11-30T11:30:00Z")]
    assert ray_stops(ran) == 2 and agent.state.interruption == "terminate at 2026-11-30T11:30:00Z"


def test_back_from_an_interruption_the_member_is_watched_again_a_whole_window(tmp_path, monkeypatch):
    agent, clock, ran = watch_with(tmp_path, monkeypatch, [], minutes=1)
    agent.metadata = Metadata(clock, lambda now: read_notice(NOTICE) if now < 1030 else NO_NOTICE)
    run_rounds(agent, clock, 45)
    assert agent.state.state == "watching" and SHUTDOWN not in ran
    run_rounds(agent, clock, 60)
    assert ran.count(SHUTDOWN) == 1 and agent.state.state == "stopping"


@pytest.mark.parametrize("body, cause", [
    (json.dumps({"action": "terminate\0", "time": "2026-11-30T10:00:00Z"}).encode(), "its action is not one"),
    (json.dumps({"action": "stop\n@run\n@sums", "time": "2026-11-30T10:00:00Z"}).encode(), "its action is not one"),
    (json.dumps({"action": "terminate", "time": "2026-13-30T10:00:00Z"}).encode(), "its time is not in EC2"),
    (json.dumps({"action": "hibernate", "time": "soon; rm -rf ~"}).encode(), "its time is not in EC2"),
    (b"<html>\x00", "not a JSON object"),
    (b"[1, 2]", "not a JSON object"),
])
def test_a_notice_that_is_not_ec2s_is_a_cause_and_the_member_still_stops_ray_and_tells_the_runnable(
        tmp_path, monkeypatch, body, cause):
    """What reaches a command line went through Popen for real: a NUL there is a ValueError, caught."""
    agent, clock, ran = watch_with(tmp_path, monkeypatch, [], minutes=30, ray_stop="ray stop")
    agent.metadata = Metadata(clock, lambda now: read_notice(body))
    started = []

    def through_popen(argv, timeout, limit=0):
        ran.append(tuple(argv))
        started.append(run_quietly(["true", *argv], 10))
        return Answer(0, "", "")
    monkeypatch.setattr(watch_module, "run_quietly", through_popen)
    run_rounds(agent, clock, 30)
    assert agent.state.state == "preempted" and cause in agent.state.cause
    assert NOTICE_WORDS.fullmatch(agent.state.interruption)
    assert len(ran) == 2 and ray_stops(ran) == 1 and "flambe_iac.agent notice i-1 " in ran[0][-1]
    assert None not in started  # each command could start: no NUL, no newline reached it


def test_a_member_id_that_is_no_host_id_is_a_cause_and_ray_still_stops(tmp_path, monkeypatch):
    agent, clock, ran = watch_with(tmp_path, monkeypatch, [], minutes=30, member_id="../i-1\n", ray_stop="ray stop")
    agent.metadata = Metadata(clock, lambda now: read_notice(NOTICE))
    run_rounds(agent, clock, 20)
    assert ran == [("sh", "-c", "cd && ray stop")] and "is no host id: on_preempt not told" in agent.state.cause


@given(st.binary(max_size=300))
def test_any_notice_is_told_in_the_words_an_agent_writes(body):
    assert NOTICE_WORDS.fullmatch(read_notice(body).words)


def test_a_command_with_a_nul_does_not_start_and_raises_nothing():
    assert run_quietly(["echo", "a\0b"], 5) is None


def test_the_orchestrator_passes_on_a_notice_only_in_an_agents_words(tmp_path):
    (tmp_path / ".flambe").mkdir()
    assert agent_main.notice(tmp_path, "i-1", "terminate\n@run\nexit 0") == "no runnable runs here"
    written = json.loads((tmp_path / PREEMPTED_DIR / "i-1.json").read_text())
    assert written["interruption"] == "unknown action at unknown time"
    agent_main.notice(tmp_path, "i-1", "hibernate at 2026-11-30T10:00:00Z")
    assert json.loads((tmp_path / PREEMPTED_DIR / "i-1.json").read_text())["interruption"] == \
        "hibernate at 2026-11-30T10:00:00Z"


# The pace of the notice's questions.

@pytest.mark.parametrize("answered, questions", [(True, 12), (False, 2)])
def test_on_ec2_the_notice_is_asked_every_5_s_elsewhere_every_30_s(tmp_path, monkeypatch, answered, questions):
    """A sample a minute (a 30-minute window): on EC2 the notice is still asked every 5 s, as AWS advises."""
    agent, clock, _ = watch_with(tmp_path, monkeypatch, ["gpu 80%"], minutes=30)
    agent.metadata = Metadata(clock, lambda now: NO_NOTICE if answered else None, answered)
    start = clock.now
    run_rounds(agent, clock, 60)
    asked = [at - start for at in agent.metadata.asked if at < start + 60]
    assert len(asked) == questions and asked[0] == 0
    assert max(later - earlier for earlier, later in zip(asked, asked[1:])) <= (5 if answered else 30)


# A factory's silences, as the orchestrator's agent reads them round after round.

def test_a_factory_that_answers_between_two_silences_starts_its_silence_afresh(tmp_path, monkeypatch):
    """Lost at 60 s, busy from 80 s, lost from 150 s: stopped only 120 s after the second silence began."""
    agent, clock, ran = watch_with(tmp_path, monkeypatch, [], minutes=1, factories=["10.0.0.3"])
    agent.metadata = Metadata(clock, lambda now: NO_NOTICE)
    start = clock.now
    busy = f"{int(start)}\n" + AgentState(pid=1, role="factory", minutes=5, idle_minutes=1, last_busy="gpu 80%",
                                          updated_at=start).to_bytes().decode()

    def probe(argv, timeout, limit=0):
        if argv == SHUTDOWN:
            ran.append(argv)
            return Answer(0, "", "")
        elapsed = clock.now - start
        return Answer(0, busy, "") if 80 <= elapsed < 150 else None
    monkeypatch.setattr(watch_module, "run_quietly", probe)
    stopped_at = []
    run_rounds(agent, clock, 400, lambda: stopped_at.append(clock.now - start) if SHUTDOWN in ran else None)
    assert stopped_at and 270 <= stopped_at[0] <= 290, stopped_at[:1]


# A metadata service that trickles: the lab's stand-in on a local port, and a bare socket.

@pytest.fixture
def trickling_service(tmp_path, monkeypatch):
    """The lab's stand-in answering the notice's question a byte at a time (its whole 404 takes about 10 s)."""
    monkeypatch.setattr(metadata_service, "TRICKLE_SECONDS", 0.002)
    (tmp_path / "metadata-mode").write_text("trickle\n")
    server = ThreadingHTTPServer(("127.0.0.1", 0), metadata_service.handler_for(time.time() + 3600,
                                                                                tmp_path / "metadata-mode"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_trickling_answer_is_no_answer_within_the_whole_checks_deadline(trickling_service):
    service = MetadataService(trickling_service, deadline=0.5)
    for _ in range(3):
        started = time.monotonic()
        assert service.interruption() is None
        assert time.monotonic() - started < 1.0
    assert service.answered  # its token came at once: the member is on EC2, asked every 5 s


def test_a_trickling_metadata_service_never_keeps_a_member_up(tmp_path, monkeypatch, trickling_service):
    agent, clock, ran = watch_with(tmp_path, monkeypatch, [], minutes=1)
    agent.metadata = MetadataService(trickling_service, deadline=0.2)
    started = time.monotonic()
    run_rounds(agent, clock, 70)
    assert ran == [SHUTDOWN] and time.monotonic() - started < 6  # 14 rounds, each at most the deadline


def test_a_token_that_trickles_is_no_answer_either():
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle():
        connection, _ = listener.accept()
        with connection:
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 4000\r\n\r\n" + b"t" * 4000:
                if stop.wait(0.05):
                    return
                connection.sendall(bytes([byte]))
    threading.Thread(target=trickle, daemon=True).start()
    started = time.monotonic()
    assert MetadataService(f"http://127.0.0.1:{listener.getsockname()[1]}", deadline=0.5).interruption() is None
    assert time.monotonic() - started < 1.0
    stop.set()
    listener.close()


# A GPU that cannot be read, round after round: real nvidia-smi stand-ins on PATH, the agent's own reading.

@pytest.mark.parametrize("script, stops", [
    ("echo '[N/A]'; echo '[N/A]'", False),  # MIG
    ("echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'; exit 9", False),
    ("exit 0", False),  # nothing at all
    ("echo 3", True),  # an idle GPU: the member stops, so the test can tell
])
def test_a_gpu_that_cannot_be_read_keeps_its_member_up_round_after_round(tmp_path, monkeypatch, script, stops):
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "nvidia-smi").write_text(f"#!/bin/sh\n{script}\n")
    (tools / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:/usr/bin:/bin")
    agent, clock, ran = watch_with(tmp_path, monkeypatch, [], minutes=0.2, cpu_cores=1e6, user="flambe-nobody")
    agent.sample = type(agent).sample.__get__(agent)  # the real reading, but for this machine's processes
    monkeypatch.setattr(watch_module, "processes", lambda: [])
    agent.metadata = Metadata(clock, lambda now: None, answered=False)
    run_rounds(agent, clock, 60)  # five windows
    assert (SHUTDOWN in ran) == stops
    if not stops:
        assert agent.state.last_busy == "gpu unreadable" and agent.state.state == "watching"


# `off`, whatever an earlier install left.

def fake_crontab(monkeypatch, table: bytes) -> list:
    written = [table]

    def run(argv, **options):
        if argv == ["crontab", "-l"]:
            return type("Done", (), {"returncode": 0, "stdout": written[-1], "stderr": b""})()
        written.append(options.get("input") or b"")
        return type("Done", (), {"returncode": 0, "stdout": b"", "stderr": b""})()
    monkeypatch.setattr(crontab_module.subprocess, "run", run)
    return written


def test_off_after_a_dead_agent_and_lost_settings_removes_every_file_of_ours_and_nothing_else(tmp_path, monkeypatch):
    flambe = tmp_path / ".flambe"
    (flambe / "preempted").mkdir(parents=True)
    for name in ("autostop.zip", "autostop.state", "autostop.log", "autostop.pid", "autostop.lock",
                 "preempted/i-0abc.json", "preempted/i-0abc.done"):
        (flambe / name).write_text("ours")
    (flambe / "run.log").write_text("the runnable's")
    users = b"@daily true\n" + LINE.encode() + b"\r\n"
    written = fake_crontab(monkeypatch, users + LINE.encode() + b"\n")
    assert agent_main.remove(tmp_path) == "agent removed"
    assert written[-1] == users  # our line gone; the user's, though it looks like ours, kept
    assert sorted(path.name for path in flambe.iterdir()) == ["run.log"]
    (flambe / "preempted").mkdir()
    (flambe / "preempted" / "i-1.json").write_text("ours")
    (flambe / "preempted" / "my notes.txt").write_text("the user's")
    agent_main.remove(tmp_path)
    assert [path.name for path in (flambe / "preempted").iterdir()] == ["my notes.txt"]


@pytest.mark.parametrize("left, removes", [
    (HostSnapshot(files={AGENT_ARCHIVE: ("644", "x")}), True),  # a dead agent whose settings a refused install took
    (HostSnapshot(files={AGENT_CONFIG: ("644", "x")}), True),
    (HostSnapshot(trees={PREEMPTED_DIR: None}), True),  # the orchestrator's notices
    (HostSnapshot(), False),
])
def test_off_goes_to_every_member_where_anything_of_the_agent_is_left(tmp_path, left, removes):
    plan = dataclasses.replace(plan_for(tmp_path, factories=1), autostop="off")
    snapshots = {"h0": HostSnapshot(), "h1": left}
    report = driver.run_deploy(plan, io.StringIO(), TABLE, live=False, **{
        **offline(operations_that(lambda host, call: None)), "read": lambda host, request, timeout: snapshots[
            host.name]})
    (factory,) = [host for host in report.hosts if host.host_id == "h1"]
    assert (factory.steps["autostop"].status == "changed") == removes, factory.steps["autostop"]
    assert report.hosts[0].steps["autostop"].status != "changed"


def test_off_reads_what_an_install_leaves():
    from types import SimpleNamespace

    from flambe_iac.deploys.autostop import reads

    request = reads(SimpleNamespace(plan=SimpleNamespace(autostop="off")))
    assert {AGENT_CONFIG, AGENT_ARCHIVE} <= set(request.files) and PREEMPTED_DIR in request.trees



# A hostile metadata service, a notice that changes, a notice directory that is not ours (issue 31's review).

def serving(answer: bytes):
    """A bare service that gives its token, then ANSWER to the notice's question and holds the connection open."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def answer_one(connection):
        with connection:
            asked = connection.recv(4096)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\ntoken" if asked.startswith(b"PUT")
                               else answer)
            stop.wait(2)

    def serve():
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=answer_one, args=(connection,), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", stop, listener


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n{}",  # more than any buffer can hold
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffffffff\r\n{}",
])
def test_an_answer_that_claims_more_bytes_than_any_buffer_is_no_answer(answer):
    """http.client raises OverflowError on such a length: no answer, never a failed round logged every 5 s."""
    address, stop, listener = serving(answer)
    started = time.monotonic()
    assert MetadataService(address, deadline=0.5).interruption() is None
    assert time.monotonic() - started < 1.0
    stop.set()
    listener.close()


def test_a_notice_whose_time_changes_at_every_question_is_answered_once(tmp_path, monkeypatch):
    """Only a service that says there is no notice ends an interruption: until then a notice whose time moves (or
    any other byte) is the same interruption, and on_preempt and Ray's stop are not run again every 5 s."""
    def answers(now):
        return read_notice(json.dumps({"action": "terminate", "time": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 120))}).encode())
    agent, clock, ran, told = orchestrator_agent(tmp_path, monkeypatch, answers)
    run_rounds(agent, clock, 120)
    assert len(told) == 1 and ray_stops(ran) == 1 and agent.state.state == "preempted"


def test_a_notice_directory_that_is_a_symlink_is_not_written_through(tmp_path):
    """A `preempted` that points elsewhere: nothing there is removed or written; the notice is refused in words."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "i-1.done").write_text("the user's")
    (tmp_path / ".flambe").mkdir()
    (tmp_path / PREEMPTED_DIR).symlink_to(elsewhere)
    with pytest.raises(agent_main.Refused, match="symlink"):
        agent_main.notice(tmp_path, "i-1", "terminate at 2026-11-30T10:00:00Z")
    assert [(path.name, path.read_text()) for path in elsewhere.iterdir()] == [("i-1.done", "the user's")]


@pytest.mark.parametrize("left", ["a symlink to the user's file", "a fifo that never ends"])
def test_the_runners_outcome_is_read_only_from_a_file_of_its_own(tmp_path, monkeypatch, left):
    """An ID.done that is not a plain file (a symlink elsewhere, a fifo a read would wait on forever) is not read."""
    (tmp_path / ".flambe").mkdir()
    (tmp_path / "secret").write_text("the user's secret")
    monkeypatch.setattr(agent_main, "runnable_alive", lambda home: True)
    real_unlink = type(tmp_path).unlink

    def outcome_left_at_once(path, missing_ok=False):  # the old outcome goes, and at once something is there
        real_unlink(path, missing_ok=missing_ok)
        if path.suffix == ".done":
            path.symlink_to(tmp_path / "secret") if left.startswith("a symlink") else os.mkfifo(path)
    monkeypatch.setattr(type(tmp_path), "unlink", outcome_left_at_once)
    said = []
    waiting = threading.Thread(target=lambda: said.append(agent_main.notice(
        tmp_path, "i-1", "terminate at 2026-11-30T10:00:00Z")), daemon=True)
    waiting.start()
    waiting.join(5)
    if waiting.is_alive():  # let the read that waits on the fifo end
        with open(tmp_path / PREEMPTED_DIR / "i-1.done", "wb"):
            pass
    assert said and "not a plain file" in said[0] and "secret" not in said[0]


@pytest.mark.parametrize("answer, said", [
    (None, "did not answer"),
    (Answer(255, "", "ssh: connect to host 10.0.0.2 port 22: Connection refused\n"), "Connection refused"),
    (Answer(3, "", "autostop: ~/.flambe/preempted is a symlink, not the runner's directory\n"), "is a symlink"),
])
def test_a_notice_the_orchestrator_could_not_take_is_a_cause_in_the_record(tmp_path, monkeypatch, answer, said):
    agent, clock, ran = watch_with(tmp_path, monkeypatch, [], minutes=30, orchestrator="10.0.0.2", ray_stop="ray stop")
    agent.metadata = Metadata(clock, lambda now: read_notice(NOTICE))

    def hop_fails(argv, timeout, limit=0):
        ran.append(tuple(argv))
        return answer if "flambe_iac.agent notice" in argv[-1] else Answer(0, "", "")
    monkeypatch.setattr(watch_module, "run_quietly", hop_fails)
    run_rounds(agent, clock, 20)
    assert agent.state.state == "preempted" and said in agent.state.cause and "on_preempt" in agent.state.cause
    assert ray_stops(ran) == 1


@pytest.mark.parametrize("jump", [+7200.0, -7200.0, +1e6])
def test_a_wall_clock_that_jumps_never_moves_the_window(tmp_path, monkeypatch, jump):
    """The window is measured on the monotonic clock: a wall clock stepped (NTP, a VM resumed) while the member works
    neither stops it early nor keeps it up; the record's times are the wall's."""
    signals = ["gpu 80%"]
    agent, clock, ran = watch_with(tmp_path, monkeypatch, signals, minutes=1)
    wall = [1.7e9]
    agent.wall = lambda: wall[0] + clock.now
    start = clock.now
    stopped_at = []

    def each_round():
        if clock.now - start >= 30:
            signals.clear()  # the work ends at 30 s
        if 40 <= clock.now - start < 41:
            wall[0] += jump
        if SHUTDOWN in ran and not stopped_at:
            stopped_at.append(clock.now - start)
    run_rounds(agent, clock, 200, each_round)
    assert stopped_at and 80 <= stopped_at[0] <= 92, stopped_at  # a minute after the last busy sample (20 s)
    assert abs(agent.state.updated_at - (1.7e9 + jump + clock.now)) < 20


@pytest.mark.parametrize("command, answered", [
    ("sleep 6 & sleep 6", False),  # too slow, and a child of its own keeps the output open after it is killed
    ("sleep 6 & echo done", True),  # done at once, but a child it left behind keeps the output open
])
def test_a_command_whose_children_keep_its_output_open_holds_the_loop_no_longer_than_its_timeout(command, answered):
    """A daemon that a command leaves (ray stop's, an ssh master's, a wedged nvidia-smi's helper) holds the pipe: the
    agent's loop still goes on within the timeout and a second, never until the child ends."""
    started = time.monotonic()
    answer = run_quietly(["sh", "-c", command], 1)
    assert time.monotonic() - started < 3.5
    assert (answer is not None and answer.stdout == "done\n") if answered else answer is None
