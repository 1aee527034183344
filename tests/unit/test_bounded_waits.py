"""Every wait of a run has a total deadline and a size limit, and names what it waits for (issue 31, item 7): hosts
that never answer, trickle or flood end within the deadline with a cause that names the wait, and the live table
and the report say what a member waits for."""

import io
import threading
import time
from types import SimpleNamespace

import gevent
import gevent.event
import pytest

from flambe_iac.day_two import status
from flambe_iac.engine import report
from flambe_iac.engine.lock import ATTEMPT_FLOOR_SECONDS, ClusterLock, take_deploy_lock
from flambe_iac.engine.report import DeployReport, HostReport, ProgressView
from flambe_iac.ssh import processes
from flambe_iac.ssh.channel import ANSWER_TIMEOUT, HeldCommand, RemoteCommandError, run_remote


HOSTILE_COMMANDS = {
    "silent": "exec sleep 60",  # never answers
    "trickle": "while :; do printf x; sleep 0.05; done",  # one byte every 50 ms
    "flood": "exec cat /dev/zero",  # floods
    "error flood": "exec cat /dev/zero >&2",  # floods its error output, and never ends
}


class HostileConnection:
    """A host's one connection whose every session runs BEHAVIOUR here, in a real process: what a hostile host's
    session would do to our side of the pipe."""

    def __init__(self, behaviour: str):
        self.behaviour, self.alive = behaviour, True

    def command_argv(self, command: str) -> list[str]:
        return ["sh", "-c", HOSTILE_COMMANDS[self.behaviour]]


def host_answering(connection: HostileConnection):
    return SimpleNamespace(connector=SimpleNamespace(connection=connection))


def test_a_lock_request_the_host_never_answers_ends_at_its_deadline_and_stops_the_session():
    started = time.monotonic()
    before = set(processes.RUNNING_CHILDREN)
    with pytest.raises(RemoteCommandError, match="no answer within 0.3 s"):
        HeldCommand(host_answering(HostileConnection("silent")), "flock ...", b"me\n", 0.3)
    assert time.monotonic() - started < 1.5
    gevent.sleep(0.3)
    assert not processes.RUNNING_CHILDREN - before


@pytest.mark.parametrize("behaviour, cause", [("trickle", "no answer within 0.5 s"), ("silent", "no answer within 0.5 s"),
                                              ("flood", "its answer passed 1048576 bytes")])
def test_a_command_whose_host_trickles_stalls_or_floods_ends_within_its_deadline_and_limit(behaviour, cause):
    started = time.monotonic()
    before = set(processes.RUNNING_CHILDREN)
    with pytest.raises(RemoteCommandError, match=cause):
        run_remote(host_answering(HostileConnection(behaviour)), "cat big", timeout=0.5, limit=1 << 20)
    assert time.monotonic() - started < 1.5
    gevent.sleep(0.3)
    assert not processes.RUNNING_CHILDREN - before


def test_a_host_flooding_its_error_output_is_stopped_at_the_cap_not_the_deadline():
    before = set(processes.RUNNING_CHILDREN)
    started = time.monotonic()
    with pytest.raises(RemoteCommandError, match="error output passed"):
        run_remote(host_answering(HostileConnection("error flood")), "make", timeout=20)
    assert time.monotonic() - started < 10
    gevent.sleep(0.3)
    assert not processes.RUNNING_CHILDREN - before


def status_of_one_member(monkeypatch, ssh_argv, **limits):
    for name, value in limits.items():
        monkeypatch.setattr(status, name, value)
    member = SimpleNamespace(placement="")
    access = SimpleNamespace(cluster=SimpleNamespace(members=[member]), alias=lambda member: "c1-orchestrator",
                             target=lambda member: SimpleNamespace(address="10.0.0.3"),
                             ssh_argv=lambda member, script: ssh_argv, policy=SimpleNamespace(environment=dict))
    found, started = [], time.monotonic()
    asking = threading.Thread(target=lambda: found.extend(status.cluster_status(access)), daemon=True)
    asking.start()
    asking.join(10)
    assert not asking.is_alive(), "status still waits for a member that does not answer"
    return found[0], time.monotonic() - started


@pytest.mark.parametrize("script", ["exec sleep 30", "while :; do echo @run; sleep 0.1; done"],
                         ids=["silent", "trickling"])
def test_status_of_a_member_that_never_finishes_answering_ends_at_its_deadline(monkeypatch, script):
    found, seconds = status_of_one_member(monkeypatch, ["sh", "-c", script], STATUS_TIMEOUT=1.0)
    assert seconds < 3 and not found.healthy and found.problems == ["unreachable: no answer within 1 s"]


def test_status_of_a_member_that_floods_is_refused_past_its_limit(monkeypatch):
    found, _ = status_of_one_member(monkeypatch, ["head", "-c", str(3 << 20), "/dev/zero"], STATUS_LIMIT=1 << 20)
    assert found.problems == ["unreadable: its answer passed 1 MiB"]


class BusyLock:
    first_line = b"BUSY"

    def rest_of_output(self, timeout):
        return b"ci@runner (pid 7) since 10:00 UTC\n"

    def release(self):
        pass


def cluster_lock(open_lock, wait: float):
    entry = HostReport("i-0a", "orchestrator", "10.0.0.3")
    report = DeployReport("c1", [entry])
    fleet = SimpleNamespace(entries={"h0": entry}, report=report, plan=SimpleNamespace(cluster=SimpleNamespace(
        name="c1")))
    stream = io.StringIO()
    return ClusterLock(fleet, wait, ProgressView(report, stream, live=True), open_lock), entry, stream


def test_a_busy_lock_is_named_in_the_live_table_while_it_lasts_and_in_the_report_after(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    lock, entry, stream = cluster_lock(lambda host, timeout: BusyLock(), wait=3)
    started = time.monotonic()
    taking = gevent.spawn(lock.take, "h0")
    gevent.sleep(0.5)
    row = stream.getvalue().splitlines()[-2]  # the host's row, above the clock line
    assert "waiting for the deploy lock on 10.0.0.3: another deploy of c1 is under way, from ci@runner" in row
    assert taking.get(timeout=5) is False and time.monotonic() - started < 3 + 0.5  # within --wait
    assert "another deploy of c1 is under way" in entry.error
    (wait,) = entry.waits
    assert wait.startswith("waiting for the deploy lock on 10.0.0.3: another deploy") and wait.endswith(" s)")
    assert "waiting for" not in stream.getvalue().splitlines()[-2]  # the wait is over


def test_a_lock_the_host_never_answers_fails_within_its_deadline_naming_the_lock_and_the_member():
    lock, entry, _ = cluster_lock(lambda host, timeout: HeldCommand(host_answering(HostileConnection("silent")), "flock",
                                                                    b"me\n", 0.3), wait=300)
    started = time.monotonic()
    assert lock.take("h0") is False and time.monotonic() - started < 1.5
    assert entry.error == "could not take the deploy lock on 10.0.0.3: no answer within 0.3 s"


class LockHostOnAFakeClock:
    """A member whose deploy lock is BUSY for BUSY_ANSWERS attempts (its holder's name taking HOLDER_SECONDS, or the
    whole deadline given), then never answers: each silent attempt lasts the whole deadline it is given."""

    def __init__(self, busy_answers: int, holder_seconds: float | None):
        self.now, self.deadlines, self.busy_answers, self.holder_seconds = 0.0, [], busy_answers, holder_seconds

    def open_lock(self, timeout):
        self.deadlines.append(timeout)
        if self.busy_answers:
            self.busy_answers -= 1
            self.now += 1
            return self
        self.now += timeout
        raise RemoteCommandError(f"no answer within {timeout:g} s")

    first_line = b"BUSY"

    def rest_of_output(self, timeout):
        self.deadlines.append(timeout)
        self.now += timeout if self.holder_seconds is None else min(timeout, self.holder_seconds)
        return b"ci@runner (pid 7) since 10:00 UTC\n"

    def release(self):
        pass

    def sleep(self, seconds):
        self.now += seconds


@pytest.mark.parametrize("wait", [0, 3, 10, 300])
@pytest.mark.parametrize("busy_answers, holder_seconds", [(0, None), (3, 1.0), (1, None)])
def test_the_lock_wait_ends_within_wait_plus_one_floor_whatever_each_attempt_would_take(wait, busy_answers,
                                                                                      holder_seconds):
    host = LockHostOnAFakeClock(busy_answers, holder_seconds)
    waits = []
    outcome = take_deploy_lock(host.open_lock, "10.0.0.3", "c1", wait, waits.append, clock=lambda: host.now,
                               sleep=host.sleep)
    assert host.now <= max(wait, ATTEMPT_FLOOR_SECONDS) <= wait + ATTEMPT_FLOOR_SECONDS, host.deadlines
    assert host.deadlines[0] == max(ATTEMPT_FLOOR_SECONDS, min(wait, ANSWER_TIMEOUT))  # --wait 0 still asks once
    assert outcome.failure.startswith(("could not take the deploy lock on 10.0.0.3: no answer within ",
                                       "another deploy of c1 is under way, from ci@runner (pid 7)"))
    assert all(words.startswith("waiting for the deploy lock on 10.0.0.3: another deploy of c1") for words in waits)


def test_no_wait_is_left_named_once_it_ends_and_short_ones_stay_out_of_the_report():
    entry = HostReport("i-0a", "orchestrator", "10.0.0.3")
    view = ProgressView(DeployReport("c1", [entry]), io.StringIO(), live=False)
    with view.waiting_for(entry, "connecting to 10.0.0.3"):
        assert view.waiting == {"i-0a": "connecting to 10.0.0.3"}
    assert view.waiting == {} and entry.waits == []


def test_a_long_wait_is_said_again_so_a_log_never_sits_silent(monkeypatch):
    monkeypatch.setattr(report, "REMIND_EVERY", 0.1)
    entry = HostReport("i-0a", "orchestrator", "10.0.0.3")
    stream = io.StringIO()
    view = ProgressView(DeployReport("c1", [entry]), stream, live=False)
    with view.waiting_for(entry, "reading the state of 10.0.0.3"):
        gevent.sleep(0.35)
    said = stream.getvalue().splitlines()
    assert len(said) >= 2 and all(line.startswith("i-0a (10.0.0.3): reading the state of 10.0.0.3 (") for line in said)
    gevent.sleep(0.25)
    assert stream.getvalue().splitlines() == said  # not once the wait is over
