"""One deploy of a cluster at a time: an flock on every member reached, each held while a heartbeat arrives.

A second deploy waits within --wait, then fails every host and names the deploy under way. The lock frees itself
LOCK_IDLE_SECONDS after its holder's heartbeat stops (the holder died, the network went away).
"""

from __future__ import annotations

import datetime
import getpass
import math
import os
import shlex
import socket
import time
from dataclasses import dataclass

import gevent

from flambe_iac.cluster import ORCHESTRATOR
from flambe_iac.engine.remote_layout import DEPLOY_LOCK
from flambe_iac.ssh.channel import ANSWER_TIMEOUT, HeldCommand, RemoteCommandError

LOCKED, BUSY, UNWRITABLE, NO_LOCK = "LOCKED", "BUSY", "UNWRITABLE", "NO-LOCK"
LOCK_IDLE_SECONDS = 30  # the lock frees itself this long after its holder's heartbeat stops
ATTEMPT_FLOOR_SECONDS = 5.0  # what an attempt may take even with no --wait left: --wait 0 still asks once, honestly
HOLDER_READ_SECONDS = 10.0


def deploy_lock_command(lock_path: str) -> str:
    """Hold an flock on LOCK_PATH for as long as a heartbeat line arrives every few seconds; record who holds it.

    Prints LOCKED (then holds), BUSY and the holder's line, UNWRITABLE where the lock file cannot be opened, or
    NO-LOCK where the host has no flock or bash.
    """
    owner = shlex.quote(f"{lock_path}.owner")
    script = (
        f"umask 077; mkdir -p {shlex.quote(lock_path.rsplit('/', 1)[0])}; "
        f"exec 9>>{shlex.quote(lock_path)} || {{ echo {UNWRITABLE}; exit 0; }}; "
        f"if flock -n 9; then IFS= read -r holder; printf '%s\\n' \"$holder\" > {owner}; echo {LOCKED}; "
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


def open_deploy_lock(host, timeout: float = ANSWER_TIMEOUT) -> HeldCommand:
    """Start the lock command on HOST: its first line, within TIMEOUT seconds, says whether we hold the lock."""
    return HeldCommand(host, deploy_lock_command(DEPLOY_LOCK), lock_holder_line(), timeout)


@dataclass(frozen=True)
class LockOutcome:
    held: HeldCommand | None = None  # the lock, held until released
    failure: str | None = None  # why no deploy may go on: every host fails with it
    note: str | None = None  # the deploy goes on unguarded, and the report says why


def take_deploy_lock(open_lock, address: str, cluster_name: str, wait: float, on_wait, clock=time.monotonic,
                     sleep=gevent.sleep) -> LockOutcome:
    """Hold the lock OPEN_LOCK(timeout) starts on the member at ADDRESS; while another deploy holds it, wait up to
    WAIT seconds (ON_WAIT(words) each time), then give up. Each attempt (the lock's answer, then its holder's name)
    has what is left of WAIT, at least ATTEMPT_FLOOR_SECONDS: the whole wait ends within WAIT plus that floor."""
    deadline = clock() + wait
    while True:
        now = clock()
        budget = min(ANSWER_TIMEOUT, max(ATTEMPT_FLOOR_SECONDS, math.floor((deadline - now) * 10) / 10))
        attempt_until = now + budget
        try:
            lock = open_lock(budget)
        except RemoteCommandError as error:
            return LockOutcome(failure=f"could not take the deploy lock on {address}: {error}")
        answer = lock.first_line.decode(errors="replace")
        if answer == LOCKED:
            return LockOutcome(held=lock)
        if answer == UNWRITABLE:
            lock.release()
            return LockOutcome(failure=f"cannot open the deploy lock ~/{DEPLOY_LOCK} on {address}: the SSH user "
                                       "cannot write there (is ~/.flambe someone else's?)")
        holder_read = min(HOLDER_READ_SECONDS, attempt_until - clock())
        holder = (lock.rest_of_output(timeout=holder_read) if holder_read > 0 else b"").decode(
            errors="replace").strip()[:200] or "someone (holder unknown)"
        lock.release()
        if answer != BUSY:
            return LockOutcome(note=f"{address} has no flock or bash: concurrent deploys of this cluster are not "
                                    "prevented (install util-linux)")
        cause = f"another deploy of {cluster_name} is under way, from {holder}"
        if clock() + 2 > deadline:
            return LockOutcome(failure=cause + " (wait for it, or give --wait SECONDS)")
        on_wait(f"waiting for the deploy lock on {address}: {cause}")
        sleep(2)


class ClusterLock:
    """The deploy lock on every member reached, taken one member at a time in one fixed order (the orchestrator,
    then the others by private address): two deploys of one cluster always meet on the first member both reach, and
    neither goes on holding part of the cluster while the other holds the rest. A fence: once any member's lock has
    ended (its heartbeat starved, the lock freed and maybe taken by another deploy), `lost` says so, and this run
    writes nothing more anywhere."""

    def __init__(self, fleet, wait: float, view, open_lock=open_deploy_lock):
        self.fleet, self.wait, self.view, self.open_lock = fleet, wait, view, open_lock
        self.held: dict = {}  # pyinfra host -> HeldCommand
        self.settled: set = set()  # hosts locked, or that cannot lock (with a note)
        self.refused = False

    def take(self, host) -> bool:
        """Lock HOST; False (every host failed with the reason) if another deploy holds it past --wait."""
        if self.refused or host in self.settled:
            return not self.refused
        entry = self.fleet.entries[host]
        with self.view.waiting_for(entry, f"taking the deploy lock on {entry.address}"):
            outcome = take_deploy_lock(lambda timeout: self.open_lock(host, timeout), entry.address,
                                       self.fleet.plan.cluster.name, self.wait,
                                       lambda words: self.view.note(entry, words))
        if outcome.failure:
            self.refused = True
            for other in self.fleet.report.hosts:
                other.fail(outcome.failure)
            return False
        self.fleet.report.notes.extend([outcome.note] if outcome.note else [])
        self.settled.add(host)
        if outcome.held is not None:
            self.held[host] = outcome.held
        return True

    def take_in_order(self, hosts: list) -> bool:
        return all(self.take(host) for host in sorted(hosts, key=self.order))

    def order(self, host) -> tuple:
        member = self.fleet.members[host]
        return member.role != ORCHESTRATOR, member.private_ip

    def lost(self) -> str | None:
        """Why this run may write no more, or None while it holds every lock it took on a member still connected.
        A member whose connection dropped took its lock with it: nothing more can be written there, and another
        deploy still meets this one on the members before it in the order."""
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
