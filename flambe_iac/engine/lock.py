"""One deploy of a cluster at a time: an flock on every member reached, each held while a heartbeat arrives.

Every member's lock is asked for at once, and kept only if every member hands it over; a second deploy waits within
--wait, then fails every host and names the deploy under way. The lock frees itself LOCK_IDLE_SECONDS after its
holder's heartbeat stops (the holder died, the network went away).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import getpass
import math
import os
import random
import shlex
import socket
import time
from dataclasses import dataclass, field

import gevent

from flambe_iac.remote_layout import DEPLOY_LOCK
from flambe_iac.ssh.channel import ANSWER_TIMEOUT, HeldCommand, RemoteCommandError

LOCKED, BUSY, UNWRITABLE, NO_LOCK = "LOCKED", "BUSY", "UNWRITABLE", "NO-LOCK"
LOCK_IDLE_SECONDS = 30  # the lock frees itself this long after its holder's heartbeat stops
ATTEMPT_FLOOR_SECONDS = 5.0  # what an attempt may take even with no --wait left: --wait 0 still asks once, honestly
LATER_ROUND_FLOOR_SECONDS = 2.0  # a round after the first starts only with this much of --wait left, and has it all
HOLDER_READ_SECONDS = 10.0
BACKOFF_SECONDS = (1.0, 3.0)  # after a round that met BUSY, a pause drawn from this range before the next
_JITTER = random.SystemRandom()  # seeded by nothing fixed: two deploys started alike still draw apart


def backoff_pause() -> float:
    """A random pause: two deploys whose rounds collide drift apart, and the next round of one meets none of the
    other's."""
    return _JITTER.uniform(*BACKOFF_SECONDS)


def deploy_lock_command(lock_path: str, then: str = "") -> str:
    """Hold an flock on LOCK_PATH for as long as a heartbeat line arrives every few seconds; record who holds it.

    Prints LOCKED (then runs THEN, the state read, with no input: the read costs no round trip of its own; then
    holds), BUSY and the holder's line, UNWRITABLE where the lock file cannot be opened, or NO-LOCK where the host has
    no flock or bash.
    """
    owner = shlex.quote(f"{lock_path}.owner")
    script = (
        f"umask 077; mkdir -p {shlex.quote(lock_path.rsplit('/', 1)[0])}; "
        f"exec 9>>{shlex.quote(lock_path)} || {{ echo {UNWRITABLE}; exit 0; }}; "
        f"if flock -n 9; then IFS= read -r holder; printf '%s\\n' \"$holder\" > {owner}; echo {LOCKED}; "
        + (f"{{ {then}; }} </dev/null 9>&-; " if then else "") +
        f"while IFS= read -r -t {LOCK_IDLE_SECONDS} _; do :; done; rm -f {owner}; "
        f"else echo {BUSY}; cat {owner} 2>/dev/null; fi"
    )
    return (f"if command -v bash >/dev/null 2>&1 && command -v flock >/dev/null 2>&1; "
            f"then exec bash -c {shlex.quote(script)}; else echo {NO_LOCK}; fi")


def lock_holder_line() -> bytes:
    """Who is deploying, from where and since when: what a second deploy is told."""
    since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    holder = f"{getpass.getuser()}@{socket.gethostname()} (pid {os.getpid()}) since {since}"
    return holder.replace("\n", " ").encode() + b"\n"


def open_deploy_lock(host, timeout: float = ANSWER_TIMEOUT, then: str = "") -> HeldCommand:
    """Start the lock command on HOST: its first line, within TIMEOUT seconds, says whether we hold the lock; once
    held, it runs THEN (the state read) and its output follows."""
    return HeldCommand(host, deploy_lock_command(DEPLOY_LOCK, then), lock_holder_line(), timeout)


@dataclass(frozen=True)
class MemberAnswer:
    """One member's answer in one round: exactly one field is set."""
    held: HeldCommand | None = None  # LOCKED: held until released
    holder: str | None = None  # BUSY: who holds it (its lock was not ours, nothing is held)
    failure: str | None = None  # no deploy may go on: the lock file cannot be opened
    note: str | None = None  # the member has no flock: it goes on unguarded, and the report says why
    alone: str | None = None  # the member could not be asked (no answer, its session refused): it fails alone


def ask_member(open_lock, address: str, budget: float, attempt_until: float, clock) -> MemberAnswer:
    """Ask for the lock OPEN_LOCK(BUDGET) starts on the member at ADDRESS, once: the command answers at once."""
    try:
        lock = open_lock(budget)
    except RemoteCommandError as error:
        return MemberAnswer(alone=f"could not take the deploy lock on {address}: {error}")
    answer = lock.first_line.decode(errors="replace")
    if answer == LOCKED:
        return MemberAnswer(held=lock)
    if answer == BUSY:
        holder_read = min(HOLDER_READ_SECONDS, attempt_until - clock())
        holder = (lock.rest_of_output(timeout=holder_read) if holder_read > 0 else b"").decode(
            errors="replace").strip()[:200]
        lock.release()
        return MemberAnswer(holder=holder or "someone (holder unknown)")
    lock.release()
    if answer == UNWRITABLE:
        return MemberAnswer(failure=f"cannot open the deploy lock ~/{DEPLOY_LOCK} on {address}: the SSH user "
                                    "cannot write there (is ~/.flambe someone else's?)")
    if answer != NO_LOCK:  # a shell that died, a ForceCommand: never a reason to go on unguarded
        shown = "".join(character if character.isprintable() else "?" for character in answer[:80]) or "nothing"
        return MemberAnswer(alone=f"could not take the deploy lock on {address}: the host answered {shown!r}")
    return MemberAnswer(note=f"{address} has no flock or bash: concurrent deploys of this cluster are not "
                             "prevented (install util-linux)")


def ask_every_member(open_locks: dict, addresses: dict, budget: float, attempt_until: float, clock) -> dict:
    """Every member's answer, all asked at once: one round trip, whatever the cluster's size."""
    asking = {member: gevent.spawn(ask_member, open_lock, addresses[member], budget, attempt_until, clock)
              for member, open_lock in open_locks.items()}
    try:
        gevent.joinall(list(asking.values()), raise_error=True)
    except BaseException:  # an error of ours, or the run stopped: no lock outlives the round that took it
        gevent.killall([greenlet for greenlet in asking.values() if not greenlet.dead])
        release_all({member: greenlet.value for member, greenlet in asking.items()
                     if isinstance(greenlet.value, MemberAnswer)})
        raise
    return {member: greenlet.value for member, greenlet in asking.items()}


def release_all(answers: dict) -> None:
    for answer in answers.values():
        if answer.held is not None:
            answer.held.release()


@dataclass(frozen=True)
class LocksOutcome:
    held: dict  # member -> HeldCommand: every lock a member handed over, held until released
    failure: str | None = None  # why no deploy may go on: every host fails with it (nothing is held then)
    notes: tuple[str, ...] = ()  # members that go on unguarded, and why
    alone: dict = field(default_factory=dict)  # member -> why it fails alone: not locked, so nothing is sent there


def take_deploy_locks(open_locks: dict, addresses: dict, cluster_name: str, wait: float, on_wait,
                      clock=time.monotonic, sleep=gevent.sleep, pause=backoff_pause) -> LocksOutcome:
    """Hold the lock OPEN_LOCKS[member](timeout) starts on every member (at ADDRESSES[member]), all or nothing.

    Each round asks every member at once. A round where one is BUSY releases every lock it took, waits PAUSE()
    seconds (ON_WAIT(words) first) and asks again, until WAIT seconds are over; then it gives up naming the holder.
    Each round has what is left of WAIT for the answers and the holder's name: the first at least
    ATTEMPT_FLOOR_SECONDS (--wait 0 still asks once), a later one starts only with LATER_ROUND_FLOOR_SECONDS left. The
    whole wait ends within WAIT, or that first floor if WAIT is shorter."""
    deadline = clock() + wait
    floor = ATTEMPT_FLOOR_SECONDS
    while True:
        now = clock()
        budget = min(ANSWER_TIMEOUT, max(floor, math.floor((deadline - now) * 10) / 10))
        floor = LATER_ROUND_FLOOR_SECONDS
        answers = ask_every_member(open_locks, addresses, budget, now + budget, clock)
        failure = next((answer.failure for answer in answers.values() if answer.failure), None)
        busy = next((member for member, answer in answers.items() if answer.holder is not None), None)
        if failure is None and busy is None:
            return LocksOutcome(held={member: answer.held for member, answer in answers.items() if answer.held},
                                notes=tuple(answer.note for answer in answers.values() if answer.note),
                                alone={member: answer.alone for member, answer in answers.items() if answer.alone})
        release_all(answers)
        if failure is not None:
            return LocksOutcome(held={}, failure=failure)
        cause = f"another deploy of {cluster_name} is under way, from {answers[busy].holder}"
        backoff = min(pause(), deadline - clock() - LATER_ROUND_FLOOR_SECONDS)  # the last pause fits the last round
        if backoff < 0:
            return LocksOutcome(held={}, failure=cause + " (wait for it, or give --wait SECONDS)")
        on_wait(f"waiting for the deploy lock on {addresses[busy]}: {cause}")
        sleep(backoff)


@dataclass(frozen=True)
class LockOutcome:
    held: HeldCommand | None = None  # the lock, held until released
    failure: str | None = None  # why no deploy may go on: every host fails with it
    note: str | None = None  # the deploy goes on unguarded, and the report says why


def take_deploy_lock(open_lock, address: str, cluster_name: str, wait: float, on_wait, clock=time.monotonic,
                     sleep=gevent.sleep, pause=backoff_pause) -> LockOutcome:
    """The lock of the one member at ADDRESS: take_deploy_locks over a set of one."""
    outcome = take_deploy_locks({address: open_lock}, {address: address}, cluster_name, wait, on_wait, clock, sleep,
                                pause)
    return LockOutcome(held=outcome.held.get(address), failure=outcome.failure or outcome.alone.get(address),
                       note=next(iter(outcome.notes), None))


class ClusterLock:
    """The deploy lock on every member reached, all or nothing (take_deploy_locks): a round asks every member at once
    and keeps the locks only if none is BUSY; otherwise it lets go of them all and tries again after a random pause.

    Why no order: the fixed order of old (the orchestrator, then by private address) made two deploys meet on the
    first member, so that neither went on holding part of the cluster while the other held the rest. All or nothing
    per round gives that without an order: a deploy holds every lock or none, and keeps no part while it waits. Two
    deploys whose rounds collide (each holding a part, each told BUSY) both let go, and their random pauses put one's
    next round where the other holds nothing: it wins.

    A fence: once any member's lock has ended (its heartbeat starved, the lock freed and maybe taken by another
    deploy), `lost` says so, and this run writes nothing more anywhere."""

    def __init__(self, fleet, wait: float, view, open_lock=open_deploy_lock, pause=backoff_pause):
        self.fleet, self.wait, self.view, self.open_lock, self.pause = fleet, wait, view, open_lock, pause
        self.held: dict = {}  # pyinfra host -> HeldCommand

    def take(self, host) -> bool:
        return self.take_all([host])

    def take_all(self, hosts: list, then: str = "") -> bool:
        """Lock every one of HOSTS at once, once a run; False (every host failed with the reason) if one cannot be
        locked, or another deploy holds one past --wait. THEN: a command each member runs once locked, in the lock's
        own session (the state read); its output follows the lock's answer (`HeldCommand.read_through`)."""
        asked = {"then": then} if then else {}
        entries = {host: self.fleet.entries[host] for host in hosts}
        with contextlib.ExitStack() as waits:
            for entry in entries.values():
                waits.enter_context(self.view.waiting_for(entry, f"taking the deploy lock on {entry.address}"))
            outcome = take_deploy_locks({host: functools.partial(self.open_lock, host, **asked) for host in hosts},
                                        {host: entry.address for host, entry in entries.items()},
                                        self.fleet.plan.cluster.name, self.wait, self.say_wait(entries.values()),
                                        pause=self.pause)
        if outcome.failure:
            for other in self.fleet.report.hosts:
                other.fail(outcome.failure)
            return False
        self.fleet.report.notes.extend(outcome.notes)
        self.held.update(outcome.held)
        for host, cause in outcome.alone.items():  # a member we could not lock gets nothing; the others go on
            entries[host].fail(cause)
        return len(outcome.alone) < len(hosts)

    def say_wait(self, entries):
        """What every member waits for, said again only when it changes: not a line per member every round."""
        said = []

        def note(words: str) -> None:
            if said[-1:] != [words]:
                said.append(words)
                for entry in entries:
                    self.view.note(entry, words)
        return note

    def lost(self) -> str | None:
        """Why this run may write no more, or None while it holds every lock it took on a member still connected.
        A member whose connection dropped took its lock with it: nothing more can be written there, and another
        deploy, which must take every member's lock at once, still meets this one on the others."""
        for host, lock in self.held.items():
            if lock.taken_away:
                return (f"lost the deploy lock on {self.fleet.entries[host].address} (its heartbeat stopped, or the "
                        "lock was taken over): nothing more was written; run the deploy again")
        return None

    def watch(self, on_lost, every: float = 2.0) -> None:
        """ON_LOST() (stop every transfer under way) as soon as a lock is taken away: a long rsync does not run on."""
        while not self.lost():
            gevent.sleep(every)
        on_lost()

    def release(self) -> None:
        for lock in self.held.values():
            lock.release()
