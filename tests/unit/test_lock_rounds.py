"""The deploy lock in one round trip (issue 32, item 2): every member's lock asked for at once, kept only if every
member hands it over. A round that meets BUSY lets go of all it took and tries again after a random pause; two deploys
whose rounds collide drift apart until one wins. Stand-in locks (flocks kept here) and real gevent time."""

import io
import time
from types import SimpleNamespace

import gevent
import pytest

from flambe_iac.engine import lock as lock_module
from flambe_iac.engine.lock import ClusterLock
from flambe_iac.engine.report import DeployReport, HostReport, ProgressView
from flambe_iac.ssh.channel import RemoteCommandError

HOSTS = ["h0", "h1", "h2", "h3"]


class Flock:
    """One member's deploy lock as its flock keeps it: one holder at a time, and who that is."""

    def __init__(self):
        self.holder = None


class LockCommand:
    """The lock command on one member, as a stand-in for HeldCommand: LOCKED if the flock was free, else BUSY."""

    taken_away = False

    def __init__(self, flock: Flock, holder: str):
        self.flock, self.holder = flock, holder
        self.first_line = b"BUSY" if flock.holder else b"LOCKED"
        self.busy_with = flock.holder
        flock.holder = flock.holder or holder

    def rest_of_output(self, timeout):
        return self.busy_with.encode() + b"\n"

    def release(self):
        if self.first_line == b"LOCKED" and self.flock.holder == self.holder:
            self.flock.holder = None


class Answering:
    """A member whose lock command answers FIRST_LINE (UNWRITABLE, NO-LOCK) and holds nothing."""

    taken_away = False

    def __init__(self, first_line: bytes):
        self.first_line, self.released = first_line, False

    def release(self):
        self.released = True


class Deploy:
    """One deploy's side: its holder line, how long each member takes to answer it, and what it was told."""

    def __init__(self, name: str, flocks: dict, latency: dict | None = None):
        self.name, self.flocks, self.latency = name, flocks, latency or {}
        self.asked = {host: 0 for host in flocks}
        self.busy_rounds = []  # the round of each BUSY answer this deploy got

    def open_lock(self, host, timeout):
        """The request reaches the member's flock half way, and its answer comes back the other half: a lock is taken
        when asked, not when the answer arrives, so whose request came first does not hang on timer order here."""
        self.asked[host] += 1
        one_way = self.latency.get(host, 0) / 2
        gevent.sleep(one_way)
        command = LockCommand(self.flocks[host], self.name)
        if command.first_line == b"BUSY":
            self.busy_rounds.append(self.asked[host])
        gevent.sleep(one_way)
        return command

    def holds(self) -> list:
        return [host for host, flock in self.flocks.items() if flock.holder == self.name]


def cluster_lock(open_lock, wait: float, pause=lock_module.backoff_pause, hosts=HOSTS):
    entries = {host: HostReport(f"i-{host}", "factory", f"10.0.0.{index + 1}") for index, host in enumerate(hosts)}
    report = DeployReport("c1", list(entries.values()))
    fleet = SimpleNamespace(entries=entries, report=report, plan=SimpleNamespace(cluster=SimpleNamespace(name="c1")))
    stream = io.StringIO()
    return ClusterLock(fleet, wait, ProgressView(report, stream, live=False), open_lock, pause), report, stream


def test_a_waiter_lets_go_of_every_lock_each_busy_round_and_gets_them_all_once_the_holder_leaves():
    flocks = {host: Flock() for host in HOSTS}
    flocks["h2"].holder = "ci@runner (pid 7) since 10:00 UTC"  # another deploy holds one member
    waiter = Deploy("me@here (pid 9)", flocks)
    pauses = []

    def pause():
        assert waiter.holds() == [], f"round {len(pauses) + 1} met BUSY and still holds {waiter.holds()}"
        pauses.append(len(pauses) + 1)
        if len(pauses) == 3:
            flocks["h2"].holder = None  # the other deploy ends
        return 0.01

    lock, report, stream = cluster_lock(waiter.open_lock, wait=30, pause=pause)
    assert lock.take_all(HOSTS) is True
    assert pauses == [1, 2, 3]
    assert waiter.asked == {host: 4 for host in HOSTS}  # every member asked in every round
    assert sorted(lock.held) == HOSTS and waiter.holds() == HOSTS
    assert all(host.error is None for host in report.hosts)
    said = [line for line in stream.getvalue().splitlines() if "waiting for the deploy lock" in line]
    assert len(said) == len(HOSTS)  # each member told once what it waits for, not once a round
    assert all("waiting for the deploy lock on 10.0.0.3: another deploy of c1 is under way, from ci@runner" in line
               for line in said)
    lock.release()
    assert waiter.holds() == []


def test_a_holder_that_stays_fails_every_host_with_its_name_and_the_waiter_holds_nothing():
    flocks = {host: Flock() for host in HOSTS}
    flocks["h3"].holder = "ci@runner (pid 7) since 10:00 UTC"
    waiter = Deploy("me@here (pid 9)", flocks)
    lock, report, _ = cluster_lock(waiter.open_lock, wait=0)
    started = time.monotonic()
    assert lock.take_all(HOSTS) is False and time.monotonic() - started < 1  # --wait 0: one round
    assert waiter.asked == {host: 1 for host in HOSTS} and waiter.holds() == [] and lock.held == {}
    assert all(host.error == "another deploy of c1 is under way, from ci@runner (pid 7) since 10:00 UTC (wait for it, "
                             "or give --wait SECONDS)" for host in report.hosts)


@pytest.fixture
def short_backoff(monkeypatch):
    monkeypatch.setattr(lock_module, "BACKOFF_SECONDS", (0.02, 0.3))  # wide next to a round's 0.1 s


def contend(first: Deploy, second: Deploy, wait: float, hold_seconds: float) -> list:
    """Both deploys take the whole cluster at once, each holding it HOLD_SECONDS once it has it; which got it when."""
    won = []

    def deploy(side: Deploy):
        lock, report, _ = cluster_lock(side.open_lock, wait)
        if not lock.take_all(HOSTS):
            won.append((side.name, None, report.hosts[0].error))
            return
        won.append((side.name, sorted(side.holds()), None))
        gevent.sleep(hold_seconds)
        lock.release()

    gevent.joinall([gevent.spawn(deploy, first), gevent.spawn(deploy, second)], raise_error=True)
    return won


def test_two_deploys_whose_rounds_collide_drift_apart_and_each_gets_the_whole_cluster_in_turn(short_backoff):
    """A asks h0 and h1 first, B h2 and h3: started together, every round of theirs that coincides leaves each holding
    half and told BUSY on the other half. The random pauses put one's round where the other holds nothing; it wins,
    deploys, lets go, and the other then gets every lock."""
    for _ in range(3):  # each time from a collision: not one lucky reading
        flocks = {host: Flock() for host in HOSTS}
        first = Deploy("A", flocks, {"h2": 0.1, "h3": 0.1})
        second = Deploy("B", flocks, {"h0": 0.1, "h1": 0.1})
        won = contend(first, second, wait=5, hold_seconds=0.1)
        assert [holds for _, holds, _ in won] == [HOSTS, HOSTS], won
        assert 1 in first.busy_rounds and 1 in second.busy_rounds  # they collided in their first round
        assert all(flock.holder is None for flock in flocks.values())


def test_every_member_is_asked_at_once_one_round_trip_whatever_the_cluster_size():
    hosts = [f"h{index}" for index in range(16)]
    flocks = {host: Flock() for host in hosts}
    deploy = Deploy("me", flocks, {host: 0.2 for host in hosts})
    lock, _, _ = cluster_lock(deploy.open_lock, wait=0, hosts=hosts)
    started = time.monotonic()
    assert lock.take_all(hosts) is True
    assert time.monotonic() - started < 0.2 * 16 / 2  # one after another: 3.2 s
    assert sorted(lock.held) == sorted(hosts)


def test_a_member_that_cannot_be_asked_fails_alone_and_the_others_are_held():
    """No answer, or a session refused: that member is not locked, so it gets nothing; the others go on, locked."""
    deploy = Deploy("me", {host: Flock() for host in HOSTS})

    def open_lock(host, timeout):
        if host == "h2":
            raise RemoteCommandError("no answer within 5 s")
        return deploy.open_lock(host, timeout)

    lock, report, _ = cluster_lock(open_lock, wait=30, pause=lambda: pytest.fail("paused for a member alone"))
    assert lock.take_all(HOSTS) is True
    assert sorted(lock.held) == sorted(host for host in HOSTS if host != "h2")
    errors = {entry.address: entry.error for entry in report.hosts}
    assert errors.pop("10.0.0.3") == "could not take the deploy lock on 10.0.0.3: no answer within 5 s"
    assert set(errors.values()) == {None}


@pytest.mark.parametrize("answer, cause", [
    (Answering(b"UNWRITABLE"), "cannot open the deploy lock ~/.flambe/deploy.lock on 10.0.0.3: the SSH user"),
])
def test_a_member_that_cannot_be_locked_fails_every_host_at_once_and_the_round_lets_go_of_the_others(answer, cause):
    flocks = {host: Flock() for host in HOSTS}
    flocks["h1"].holder = "ci@runner (pid 7)"  # BUSY too: waiting would not help, nothing is waited for
    deploy = Deploy("me", flocks)

    def open_lock(host, timeout):
        if host == "h2":
            if isinstance(answer, Exception):
                raise answer
            return answer
        return deploy.open_lock(host, timeout)

    lock, report, _ = cluster_lock(open_lock, wait=30, pause=lambda: pytest.fail("paused for a failure"))
    assert lock.take_all(HOSTS) is False
    assert deploy.holds() == [] and lock.held == {}
    assert all(host.error.startswith(cause) for host in report.hosts)


def test_a_member_without_flock_is_a_note_and_the_others_are_held():
    flocks = {host: Flock() for host in HOSTS}
    deploy = Deploy("me", flocks)
    no_lock = Answering(b"NO-LOCK")

    def open_lock(host, timeout):
        return no_lock if host == "h0" else deploy.open_lock(host, timeout)

    lock, report, _ = cluster_lock(open_lock, wait=0)
    assert lock.take_all(HOSTS) is True
    assert sorted(lock.held) == ["h1", "h2", "h3"] and no_lock.released
    assert report.notes == ["10.0.0.1 has no flock or bash: concurrent deploys of this cluster are not prevented "
                            "(install util-linux)"]
