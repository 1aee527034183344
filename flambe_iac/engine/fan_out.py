"""How trees reach the members: each from this machine (direct), or across the uplink once, to the orchestrator, and on
from member to member (relay: the orchestrator serves every factory; tree: each member serves at most BRANCHING
others, so no member's own link carries more than BRANCHING copies, whatever the cluster's size).

A member forwards while it receives: from the moment its own copy starts, it rsyncs what it already holds whole to
the members it serves, pass after pass over one shared SSH connection, and once its own copy is complete, one last
pass with --delete makes theirs exact. Each member then checks its own copy against the checksums: its server's
check is not on the way, so a chain of members costs one pass more a member, not a check.

Below the file, on first copies: a member that had no copy of a checked tree writes each file in place as it
arrives, and a member that had none either, served by it, takes what its files hold past the end of its own (rsync's
--append), pass after pass, so a file of gigabytes flows down the tree while it arrives, as a pipelined broadcast
does, instead of being stored whole at every level. Both copies being first copies, every file only ever grows, so
appending is exact; the last pass (no --append; by size, as every byte is there) makes each copy whole, and each
member checks its own by sha256. A member that has a copy takes no pass from a server whose files grow in place: it
waits for them whole, and its last pass replaces each file whole. A first copy served by a member that had a copy
takes whole files only. A changed file is otherwise written as rsync always does, under a temporary name
(`.NAME.XXXXXX`) renamed into place, so a job reading the old file never sees a mix: the passes leave those names out
and forward such a file once whole. A first copy that fails part-way leaves the files it wrote, part-written; the
host is failed, and the next run finishes them.

Each hop runs on the serving member, over the cluster's own key and pinned host keys (~/.ssh/flambe_known_hosts),
strict host key checking, that key only, no agent: the same `ssh_options` as every connection we make. The user's key
never leaves this machine. A member that cannot serve a tree (it is down, or its copy failed) hands the members it
serves to its own server, and those the orchestrator serves to this machine; the report says so. A copy that fails
its own check after a member served it is sent again from this machine."""

from __future__ import annotations

import dataclasses
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gevent.event import AsyncResult, Event
from gevent.lock import BoundedSemaphore

from flambe_iac.remote_layout import CLUSTER_PRIVATE_KEY, MEMBERS_KNOWN_HOSTS
from flambe_iac.ssh.channel import RemoteCommandError, run_remote
from flambe_iac.ssh.policy import (SshTarget, appending, close_shared_connection, comparing_contents, deciding_by_size,
                                   rsync_command, writing_in_place)

DIRECT, RELAY, TREE, AUTO = "direct", "relay", "tree", "auto"
BRANCHING = 2  # members a member serves in a tree
# AUTO: a tree of this many bytes or more goes by TREE, a smaller one by RELAY. Measured (bench/fanout.py): with every
# link at 100 Mbit/s, 50 MB to 16 hosts takes 2.5x one host's time by TREE and 12.9x by RELAY (a star: the
# orchestrator's link carries 15 copies); with no link limit, 5 MB takes 1.03-1.07x a direct transfer by RELAY and
# 1.15-1.21x by TREE (each level of the tree adds a forwarding pass and a last pass). 32 MiB crosses a 1 Gbit/s link
# in 0.27 s, about one level.
TREE_ABOVE_BYTES = 32 * 2**20
# Hops at once on one member's SSH connection: below sshd's default MaxSessions (10), leaving room for the deploy
# lock and the member's own commands.
PARALLEL_HOPS = 7
HOP_TIMEOUT = 6 * 3600.0
PASS_PAUSE = 0.25  # seconds between forwarding passes, unless the server's copy is whole sooner
RSYNC_TEMPORARY = ".*.??????"
SHARED_HOP_CONNECTION = "~/.flambe/hop-%h"  # %h: the member it reaches (one user, one port)
# The socket's path, HOME + "/.flambe/hop-" + an IPv6 address (39) + ssh's temporary suffix (17), fits in 107 bytes.
LONGEST_HOME_FOR_SHARING = 107 - len("/.flambe/hop-") - 39 - 17
# rsync's exit codes that mean the connection, not the data, failed: worth one more try.
RSYNC_CONNECTION_LOST = {12, 30, 35, 255}
SSH_FAILED = 255
WRITES_STOPPED = -1  # not rsync's: the hop was not started, the deploy lock being lost


@dataclass(frozen=True)
class Hop:
    """One rsync from a serving member to another member's private address."""

    destination: str
    user: str
    address: str
    connect_timeout: int
    excludes: tuple[str, ...] = ()  # the tree's own: left out, and kept on the member, as a direct transfer does
    streamed: bool = False  # the member had no copy: each pass adds to its files what its server's copy holds more

    def command(self, last: bool, by_contents: bool = False) -> str:
        """A forwarding pass, or the LAST pass (--delete); BY_CONTENTS: deciding by checksums, not sizes and mtimes.
        The passes share one SSH connection, which the last pass closes: a pass then costs no handshake. A socket's
        path is at most 107 bytes: under a longer home, each pass connects on its own."""
        shared = self.rsync(last, by_contents, SHARED_HOP_CONNECTION)
        alone = self.rsync(last, by_contents, None)
        return (f'if [ "${{#HOME}}" -le {LONGEST_HOME_FOR_SHARING} ]; then {shared}; else {alone}; fi')

    def rsync(self, last: bool, by_contents: bool, shared_connection: str | None) -> str:
        target = SshTarget(address=self.address, user=self.user, key=Path(CLUSTER_PRIVATE_KEY),
                           known_hosts=Path(MEMBERS_KNOWN_HOSTS), connect_timeout=self.connect_timeout,
                           shared_connection=shared_connection)
        source = destination = f"{self.destination}/"
        if not last:
            argv = rsync_command(source, destination, target, delete=False, excludes=(*self.excludes, RSYNC_TEMPORARY))
            return shlex.join(appending(argv) if self.streamed else argv)
        argv = rsync_command(source, destination, target, excludes=self.excludes)
        if by_contents:
            argv = comparing_contents(argv)
        elif self.streamed:  # the appending passes left every byte: a whole-file delta pass would reread them all
            argv = deciding_by_size(argv)
        argv = writing_in_place(argv) if self.streamed else argv
        if shared_connection is None:
            return shlex.join(argv)
        return (f"{shlex.join(argv)}; status=$?; {shlex.join(close_shared_connection(target))} >/dev/null 2>&1; "
                "exit $status")


class FanOut:
    """Who serves whom, and which members hold which trees whole (every file received; each member then checks its
    own copy), for the members waiting to take them."""

    def __init__(self, member_ids: list[str], modes: dict[str, str], branching: int = BRANCHING,
                 writes_stopped: Callable[[], str | None] = lambda: None):
        """MEMBER_IDS: the orchestrator first, then the factories; MODES: each tree's (RELAY or TREE), by its
        destination; WRITES_STOPPED: why no hop may start any more (the deploy lock is lost), or None."""
        self.writes_stopped = writes_stopped
        destinations = list(modes)
        self.server = {(tree, member): server_of(modes[tree], member_ids, index, branching)
                       for tree in destinations for index, member in enumerate(member_ids)}
        self.hosts: dict[str, object] = {}  # member id -> its connected pyinfra host
        self.started = {(tree, member): Event() for tree in destinations for member in member_ids}
        self.whole = {(tree, member): AsyncResult() for tree in destinations for member in member_ids}
        self.in_place: set[tuple[str, str]] = set()  # copies written in place as they arrive (first copies)
        self.hop_slots = {member: BoundedSemaphore(PARALLEL_HOPS) for member in member_ids}

    def serves(self, destination: str, member: str) -> bool:
        """MEMBER forwards its copy of DESTINATION to another member."""
        return any(server == member for (tree, _), server in self.server.items() if tree == destination)

    def receiving(self, destination: str, member: str, in_place: bool = False) -> None:
        """MEMBER's copy of DESTINATION has begun; IN_PLACE: its files grow under their final names."""
        if in_place:
            self.in_place.add((destination, member))
        self.started[destination, member].set()

    def holds(self, destination: str, member: str) -> None:
        self.started[destination, member].set()
        self.whole[destination, member].set(None)

    def lacks(self, destination: str, member: str, cause: str) -> None:
        self.started[destination, member].set()
        if not self.whole[destination, member].ready():
            self.whole[destination, member].set(cause)

    def stopped(self, member: str, cause: str) -> None:
        """MEMBER will serve nothing more: whoever still waits for it goes to another server."""
        for destination, holder in self.whole:
            if holder == member:
                self.lacks(destination, member, cause)

    def take(self, destination: str, member: str, hop: Hop, notes: list,
             first_copy: bool = False) -> tuple[str | None, int, str]:
        """MEMBER's copy of DESTINATION from the nearest server that holds it whole: (the server, rsync's exit code,
        its errors), or (None, 0, "") when no member can serve it and it must come from this machine. After a server
        that failed, the copy is compared by contents: what it forwarded may be damaged, with the right size and
        mtime. FIRST_COPY: MEMBER had none (and its copy is checked), so it may take a server's growing files."""
        server = self.server[destination, member]
        while server is not None:
            self.started[destination, server].wait()
            hop = self.hop_from(destination, server, member, hop, first_copy)
            if hop.streamed or (destination, server) not in self.in_place:
                self.forward_while_receiving(destination, server, hop)
            # else: the server's files grow under their final names, and MEMBER's own copy stays whole until the last
            # pass replaces each file whole
            unavailable = self.whole[destination, server].get()
            if unavailable is None:
                return (server, *self.last_pass(server, hop,
                                                by_contents=server != self.server[destination, member]))
            server, unavailable_server = self.server[destination, server], server
            notes.append(f"relay unavailable for ~/{destination} from {unavailable_server} ({unavailable}): "
                         + (f"taken from {server} instead" if server else "sent directly instead"))
        return None, 0, ""

    def hop_from(self, destination: str, server: str, member: str, hop: Hop, first_copy: bool) -> Hop:
        """The hop from SERVER, streamed only onto a first copy from a server whose own first copy grows in place:
        then every file only ever grows, so appending is exact. The first server decides whether MEMBER's copy is in
        place, for the members it serves in turn."""
        streamed = first_copy and (destination, server) in self.in_place
        if not self.started[destination, member].is_set():
            self.receiving(destination, member, in_place=streamed)
        return dataclasses.replace(hop, streamed=streamed and (destination, member) in self.in_place)

    def last_pass(self, server: str, hop: Hop, by_contents: bool) -> tuple[int, str]:
        """The pass with --delete, once more if the connection dropped."""
        code, stderr = self.hop(server, hop, last=True, by_contents=by_contents)
        if code in RSYNC_CONNECTION_LOST:
            code, stderr = self.hop(server, hop, last=True, by_contents=by_contents)
        return code, stderr

    def forward_while_receiving(self, destination: str, server: str, hop: Hop) -> None:
        """Passes of what SERVER already holds whole, until its own copy is whole (or failed). A pass before the
        server's directory exists fails (rsync's 23), and so may one while a file is renamed into place (24): the
        next pass goes on. An ssh that fails (255: refused host key, no route) ends the passes; the last pass will
        say why."""
        while not self.whole[destination, server].ready():
            code, _ = self.hop(server, hop, last=False)
            if code in (SSH_FAILED, WRITES_STOPPED):
                return
            self.whole[destination, server].wait(timeout=PASS_PAUSE)

    def hop(self, server: str, hop: Hop, last: bool, by_contents: bool = False) -> tuple[int, str]:
        with self.hop_slots[server]:
            stopped = self.writes_stopped()
            if stopped:
                return WRITES_STOPPED, stopped
            try:
                result = run_remote(self.hosts[server], hop.command(last, by_contents), timeout=HOP_TIMEOUT)
            except RemoteCommandError as error:
                return 255, f"the connection to {server} failed: {error}"
        return result.exit_code, result.stderr.decode(errors="replace")


def chosen_mode(asked: str, tree_bytes: int, members: int = 1, uplink: float | None = None) -> str:
    """The fan-out of a tree of TREE_BYTES to MEMBERS when ASKED. AUTO: DIRECT when UPLINK (this machine's, in bytes a
    second, as measured) carries a copy for every member within what the hops would cost (their own handshakes and
    passes); else by its size, TREE or RELAY."""
    if asked != AUTO:
        return asked
    if uplink and members * tree_bytes / uplink <= direct_within_seconds(members):
        return DIRECT
    return TREE if tree_bytes >= TREE_ABOVE_BYTES else RELAY


def tree_modes(asked: str, sizes: dict[str, int], members: int, uplink: float | None, notes: list) -> dict[str, str]:
    """Each tree's fan-out (SIZES: bytes by destination); with AUTO, what it chose and from what is added to NOTES."""
    modes = {tree: chosen_mode(asked, size, members, uplink) for tree, size in sizes.items()}
    if asked == AUTO:
        notes.extend(auto_choice(tree, mode, sizes[tree], members, uplink) for tree, mode in modes.items())
    return modes


def prepare_fan_out(context, fleet, view, connected: list) -> None:
    """Once every member is connected and locked: for --fan-out auto, measure the uplink to the orchestrator (before
    any tree is sent); then build the fan-out, once (members starting at once would each build their own), with
    the members that can serve."""
    plan, orchestrator = context.plan, fleet.hosts[0]
    if plan.fan_out == AUTO and (plan.resources or plan.extension_trees) and plan.cluster.factories \
            and orchestrator in connected:
        entry = fleet.entries[orchestrator]
        with view.waiting_for(entry, f"measuring the uplink to {entry.address}"):
            context.uplink = measure_uplink(orchestrator)
    if context.fan_out is not None:
        context.fan_out.hosts.update({fleet.members[host].id: host for host in connected})


def auto_choice(destination: str, mode: str, tree_bytes: int, members: int, uplink: float | None) -> str:
    """What --fan-out auto chose for a tree, and from what it measured: for the report."""
    measured = (f"{members} copies of {tree_bytes / 1e6:.1f} MB cross the measured uplink of {uplink / 1e6:.0f} MB/s "
                f"in {members * tree_bytes / uplink:.1f} s") if uplink else "the uplink could not be measured"
    return f"--fan-out auto sent ~/{destination} by {mode}: {measured}"


def direct_within_seconds(members: int) -> float:
    """What the hops of a relay or tree cost, which direct copies save. Measured on the lab with no link limit: a
    relay's hops (each a handshake and passes, served by the orchestrator) cost 1.9 s more than direct at 16 hosts."""
    return max(1.0, HOP_SECONDS * members)


HOP_SECONDS = 0.12
UPLINK_PROBE_BYTES = 2 * 2**20  # 0.17 s at 100 Mbit/s; a tbf or cloud burst allowance is far smaller
PROBE_TIMEOUT = 30.0


def measure_uplink(host, clock=time.monotonic) -> float | None:
    """This machine's uplink to HOST in bytes a second: UPLINK_PROBE_BYTES through a session that discards them,
    less the time of a session that carries nothing. None if the host does not answer both."""
    timings = []
    for payload in (b"", bytes(UPLINK_PROBE_BYTES)):
        started = clock()
        try:
            result = run_remote(host, "cat > /dev/null", stdin=payload, timeout=PROBE_TIMEOUT)
        except RemoteCommandError:
            return None
        if result.exit_code != 0:
            return None
        timings.append(clock() - started)
    return UPLINK_PROBE_BYTES / max(timings[1] - timings[0], 0.001)



def server_of(mode: str, member_ids: list[str], index: int, branching: int) -> str | None:
    """Who serves the member at INDEX: none for the orchestrator (it takes from this machine) or in DIRECT, the
    orchestrator in a relay, the member at (INDEX - 1) // BRANCHING in a tree."""
    if index == 0 or mode == DIRECT:
        return None
    return member_ids[0] if mode == RELAY else member_ids[(index - 1) // branching]
