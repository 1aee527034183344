"""The fan-out's plan and its waits, with hops that only record what they would run: who serves whom, passes while
the server receives, one last pass once its copy is whole, and a failed server handing its members on."""

from types import SimpleNamespace
from unittest.mock import patch

import gevent
import pytest

from flambe_iac.deploys.operations import Transfer, is_first_copy
from flambe_iac.engine.snapshot import HostSnapshot
from flambe_iac.engine import fan_out as fan_out_module
from flambe_iac.engine.fan_out import (
    AUTO,
    DIRECT,
    RELAY,
    TREE,
    TREE_ABOVE_BYTES,
    UPLINK_PROBE_BYTES,
    WRITES_STOPPED,
    FanOut,
    Hop,
    chosen_mode,
    measure_uplink,
    server_of,
)
from flambe_iac.ssh.policy import RsyncJob

MEMBERS = ["orchestrator", *(f"factory-{index}" for index in range(1, 16))]
HOP = Hop("resources/data", "ubuntu", "10.0.0.9", 10)


class RecordingFanOut(FanOut):
    def __init__(self, *arguments, answer=0, **keywords):
        super().__init__(*arguments, **keywords)
        self.hops, self.answer = [], answer

    def hop(self, server, hop, last, by_contents=False):
        self.hops.append((server, last, by_contents) if by_contents else (server, last))
        gevent.sleep(0.01)
        return self.answer, "" if self.answer == 0 else "rsync: connection refused"


@pytest.mark.parametrize("mode, expected", [
    (RELAY, [None] + ["orchestrator"] * 15),
    (TREE, [None, "orchestrator", "orchestrator", "factory-1", "factory-1", "factory-2", "factory-2", "factory-3",
            "factory-3", "factory-4", "factory-4", "factory-5", "factory-5", "factory-6", "factory-6", "factory-7"]),
])
def test_who_serves_whom(mode, expected):
    assert [server_of(mode, MEMBERS, index, 2) for index in range(16)] == expected


def test_auto_sends_large_trees_by_tree_and_small_ones_by_relay():
    assert chosen_mode(AUTO, TREE_ABOVE_BYTES) == TREE and chosen_mode(AUTO, TREE_ABOVE_BYTES - 1) == RELAY
    assert chosen_mode(RELAY, 10 * TREE_ABOVE_BYTES) == RELAY and chosen_mode(TREE, 0) == TREE


def test_auto_goes_direct_when_the_measured_uplink_carries_every_copy_within_what_the_hops_cost():
    five_mb = 5_000_000
    assert chosen_mode(AUTO, five_mb, 16, uplink=300e6) == DIRECT  # the lab with no link limit
    assert chosen_mode(AUTO, five_mb, 64, uplink=65e6) == DIRECT  # 4.9 s of copies, cheaper than 63 hops
    assert chosen_mode(AUTO, five_mb, 16, uplink=12.5e6) == RELAY  # a 100 Mbit/s uplink: 6.4 s of copies
    assert chosen_mode(AUTO, TREE_ABOVE_BYTES, 16, uplink=12.5e6) == TREE
    assert chosen_mode(AUTO, five_mb, 16, uplink=None) == RELAY  # not measured: by size, as before
    assert chosen_mode(RELAY, five_mb, 16, uplink=1e12) == RELAY  # asked for: never overridden


def test_a_direct_tree_has_no_servers():
    fan_out = FanOut(MEMBERS[:4], {"resources/data": DIRECT})
    assert all(fan_out.server["resources/data", member] is None for member in MEMBERS[:4])


def test_the_uplink_is_measured_by_the_probe_less_an_empty_session():
    calls = []

    def run(host, command, stdin=b"", timeout=0.0):
        calls.append(len(stdin))
        clock.now += 0.03 + len(stdin) / 10e6  # 30 ms a session, 10 MB/s
        return SimpleNamespace(exit_code=0)

    clock = SimpleNamespace(now=0.0)
    with patch.object(fan_out_module, "run_remote", run):
        uplink = measure_uplink("orchestrator", clock=lambda: clock.now)
    assert calls == [0, UPLINK_PROBE_BYTES] and uplink == pytest.approx(10e6)


def test_each_tree_has_its_own_servers():
    fan_out = FanOut(MEMBERS[:4], {"resources/big": TREE, "resources/small": RELAY})
    assert fan_out.server["resources/big", "factory-3"] == "factory-1"
    assert fan_out.server["resources/small", "factory-3"] == "orchestrator"


def test_a_tree_member_serves_at_most_branching_others():
    for branching in (1, 2, 3):
        servers = [server_of(TREE, MEMBERS, index, branching) for index in range(1, 16)]
        assert max(servers.count(member) for member in MEMBERS) == branching


def test_passes_follow_the_server_while_it_receives_then_one_last_pass():
    fan_out = RecordingFanOut(MEMBERS[:3], {"resources/data": TREE})
    taking = gevent.spawn(fan_out.take, "resources/data", "factory-1", HOP, [])
    gevent.sleep(0.05)
    assert fan_out.hops == []  # the orchestrator has not started: nothing to forward yet
    fan_out.receiving("resources/data", "orchestrator")
    gevent.sleep(0.5)
    passes = len(fan_out.hops)
    assert passes >= 2 and all(not last for _, last in fan_out.hops)
    fan_out.holds("resources/data", "orchestrator")
    assert taking.get(timeout=5) == ("orchestrator", 0, "")
    assert fan_out.hops[-1] == ("orchestrator", True) and len(fan_out.hops) <= passes + 2  # by size and mtime


def test_a_failed_server_hands_its_members_to_its_own_server():
    fan_out = RecordingFanOut(MEMBERS[:4], {"resources/data": TREE})
    notes = []
    taking = gevent.spawn(fan_out.take, "resources/data", "factory-3", HOP, notes)  # served by factory-1
    fan_out.lacks("resources/data", "factory-1", "its own copy failed: disk full")
    fan_out.holds("resources/data", "orchestrator")
    assert taking.get(timeout=5) == ("orchestrator", 0, "")
    assert notes == ["relay unavailable for ~/resources/data from factory-1 (its own copy failed: disk full): "
                     "taken from orchestrator instead"]
    assert fan_out.hops[-1] == ("orchestrator", True, True)  # what factory-1 forwarded is compared by contents


def test_with_the_orchestrator_gone_a_factory_is_sent_directly():
    fan_out = RecordingFanOut(MEMBERS[:3], {"resources/data": RELAY})
    notes = []
    taking = gevent.spawn(fan_out.take, "resources/data", "factory-2", HOP, notes)
    fan_out.stopped("orchestrator", "it failed: unreachable")
    assert taking.get(timeout=5) == (None, 0, "")
    assert "sent directly instead" in notes[0] and fan_out.hops == []


def test_a_pass_before_the_servers_copy_exists_is_followed_by_more():
    fan_out = RecordingFanOut(MEMBERS[:2], {"resources/data": RELAY}, answer=23)  # rsync: change_dir failed
    fan_out.receiving("resources/data", "orchestrator")
    taking = gevent.spawn(fan_out.take, "resources/data", "factory-1", HOP, [])
    gevent.sleep(0.5)
    fan_out.answer = 0
    fan_out.holds("resources/data", "orchestrator")
    taking.get(timeout=5)
    assert len([hop for hop in fan_out.hops if not hop[1]]) >= 2


def test_a_refused_hop_stops_the_passes_and_the_last_pass_says_why():
    fan_out = RecordingFanOut(MEMBERS[:2], {"resources/data": RELAY}, answer=255)
    fan_out.receiving("resources/data", "orchestrator")
    taking = gevent.spawn(fan_out.take, "resources/data", "factory-1", HOP, [])
    gevent.sleep(0.3)
    assert fan_out.hops == [("orchestrator", False)]
    fan_out.holds("resources/data", "orchestrator")
    assert taking.get(timeout=5) == ("orchestrator", 255, "rsync: connection refused")
    assert fan_out.hops[1:] == [("orchestrator", True)] * 2  # the last pass, once more: the connection may have dropped


def test_a_pass_never_deletes_and_leaves_rsyncs_partial_files_out():
    passing, last, thorough = HOP.command(last=False), HOP.command(last=True), HOP.command(True, by_contents=True)
    assert "--delete" not in passing and "--exclude=.*.??????" in passing
    assert "--delete" in last and "--exclude" not in last and "--checksum" not in last
    assert "--checksum" in thorough.split(" -- ")[0]
    assert not {"--append", "--inplace", "--size-only"} & set(f"{passing} {last} {thorough}".split())
    excluding = Hop("extensions/lib", "ubuntu", "10.0.0.9", 10, (".git",)).command(last=True)
    assert excluding.count("--exclude=.git") == 2  # a member's .git is kept, as a direct transfer keeps it
    for command in (passing, last, thorough):
        # Under a home too long for a socket's path, the same pass without the shared connection.
        assert command.count("ControlMaster=auto") == 1 and 'if [ "${#HOME}" -le 38 ]' in command
        assert "StrictHostKeyChecking=yes" in command and "IdentitiesOnly=yes" in command
        assert "ForwardAgent=no" in command and ".ssh/flambe_known_hosts" in command


def test_a_first_copy_is_appended_to_pass_after_pass_and_its_last_pass_goes_by_size_in_place():
    """A member that had no copy: each pass adds what its server holds past the end of its files, and the last pass
    sends only files whose size differs (its copy is checked by sha256 next), writing in place; after a failed server,
    the last pass compares contents."""
    streamed = Hop("resources/data", "ubuntu", "10.0.0.9", 10, streamed=True)
    options = [command.split(" -- ")[0].split() for command in
               (streamed.command(last=False), streamed.command(last=True), streamed.command(True, by_contents=True))]
    passing, last, thorough = ([option for option in words if option.startswith("--") and "=" not in option]
                               for words in options)
    assert "--append" in passing and "--delete" not in passing and "--inplace" not in passing
    assert {"--size-only", "--inplace", "--delete"} <= set(last) and "--append" not in last
    assert {"--checksum", "--inplace", "--delete"} <= set(thorough) and "--size-only" not in thorough


@pytest.mark.parametrize("trees, checksums, fan_out, first", [
    ({}, {"a": "0" * 64}, True, True),  # no copy of a checked tree that members serve
    ({"resources/data": "a listing"}, {"a": "0" * 64}, True, False),  # a copy: a job may read it
    ({}, None, True, False),  # an unchecked tree (extensions): a last pass by size could not be trusted
    ({}, {"a": "0" * 64}, False, False),  # direct, from here: nothing forwards it
])
def test_only_a_checked_trees_copy_that_was_not_there_is_a_first_copy(trees, checksums, fan_out, first):
    transfer = Transfer(destination="resources/data", expected=None, checksums=checksums,
                        rsync=RsyncJob(["rsync", "--archive", "--", "here/", "there/"]),
                        fan_out=FanOut(MEMBERS, {"resources/data": TREE}) if fan_out else None)
    assert is_first_copy(transfer, HostSnapshot(trees=dict(trees))) is first


class StreamRecordingFanOut(RecordingFanOut):
    def hop(self, server, hop, last, by_contents=False):
        self.hops.append((server, last, hop.streamed))
        gevent.sleep(0.01)
        return 0, ""


@pytest.mark.parametrize("server_in_place, first_copy, passes, streamed", [
    (True, True, True, True),  # both first copies: the member appends what the server's growing files hold more
    (True, False, False, False),  # the member has a copy: no pass while the server's files grow; then one whole pass
    (False, True, True, False),  # a server with a copy of its own may rename a file: only whole files, renamed
    (False, False, True, False),  # as always
])
def test_a_member_takes_growing_files_only_onto_a_first_copy_and_only_from_a_first_copy(
        server_in_place, first_copy, passes, streamed):
    fan_out = StreamRecordingFanOut(MEMBERS[:3], {"resources/data": TREE})
    taking = gevent.spawn(fan_out.take, "resources/data", "factory-1", HOP, [], first_copy)
    fan_out.receiving("resources/data", "orchestrator", in_place=server_in_place)
    gevent.sleep(0.3)
    forwarding = list(fan_out.hops)
    fan_out.holds("resources/data", "orchestrator")
    assert taking.get(timeout=5) == ("orchestrator", 0, "")
    assert bool(forwarding) is passes and all(not last for _, last, _ in forwarding)
    assert fan_out.hops[-1] == ("orchestrator", True, streamed)
    assert {hop_streamed for _, _, hop_streamed in fan_out.hops} == {streamed}
    assert (("resources/data", "factory-1") in fan_out.in_place) is streamed  # what factory-1's own members see


def test_once_the_lock_is_lost_no_pass_and_no_hop_starts():
    lost = []
    fan_out = RecordingFanOut(MEMBERS[:2], {"resources/data": RELAY})
    fan_out.writes_stopped = lambda: lost[0] if lost else None
    real_hop = FanOut.hop

    def counted(self, server, hop, last, by_contents=False):
        self.hops.append((server, last))
        return real_hop(self, server, hop, last, by_contents)
    fan_out.hop = counted.__get__(fan_out)
    fan_out.hosts["orchestrator"] = None
    fan_out.receiving("resources/data", "orchestrator")
    lost.append("lost the deploy lock on 10.0.0.1: nothing more was written")
    taking = gevent.spawn(fan_out.take, "resources/data", "factory-1", HOP, [])
    gevent.sleep(0.2)
    fan_out.holds("resources/data", "orchestrator")
    server, code, cause = taking.get(timeout=5)
    assert code == WRITES_STOPPED and cause.startswith("lost the deploy lock")
    assert fan_out.hops == [("orchestrator", False), ("orchestrator", True)]  # refused before any command ran
