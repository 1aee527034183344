"""Honest outcomes without root or hosts: whatever one host's operations do (raise anything, fail without a word),
that host fails with a cause, the others finish, and `ok` agrees with the table of outcomes."""

import dataclasses
import io
import json
import os
import signal

import gevent
import pytest
from pyinfra.api.command import StringCommand
from pyinfra.connectors.util import CommandOutput

from flambe_iac.cluster import FACTORY, ORCHESTRATOR, Cluster, Host
from flambe_iac.deploys.operations import host_function
from flambe_iac.engine.snapshot import HostSnapshot
from flambe_iac.engine import driver
from flambe_iac.engine.report import CHANGED, FAILED, SKIPPED, DeployReport, ProgressView, summary
from flambe_iac.inputs.plan import DeployPlan, DeployRequest
from flambe_iac.inputs.resources import Resource
from flambe_iac.inputs.secrets_file import HiddenBytes
from flambe_iac.ssh.host_keys import HostKeyPolicy
from flambe_iac.ssh.user_key import UserKey
from flambe_iac.deploys.steps import TABLE


def plan_for(tmp_path, factories=2) -> DeployPlan:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    members = [Host(f"h{index}", ORCHESTRATOR if index == 0 else FACTORY, f"10.0.0.{index + 1}", f"10.0.0.{index + 1}")
               for index in range(factories + 1)]
    cluster = Cluster("c1", "ubuntu", "lab", members[0], tuple(members[1:]))
    return DeployPlan(request=DeployRequest(address_kind="private"), cluster=cluster,
                      user_key=UserKey(tmp_path / "key"), host_keys=HostKeyPolicy(known_hosts, False),
                      secrets=HiddenBytes(b"[a]\nk = v\n"),
                      resources=[])


class HeldLock:
    first_line = b"LOCKED"
    taken_away = False

    def release(self):
        pass


def connected(host, entry, wait, policy, view):
    return True


def offline(operations, connect=connected, snapshot=HostSnapshot, lock=HeldLock):
    """Stand-ins for everything that reaches a host: hosts that 'connect', hand over the lock and show an empty
    home, without any network; OPERATIONS stands in for pyinfra's run_host_op."""
    return dict(connect=connect, open_lock=lambda host, timeout: lock(), read=lambda host, request, timeout: snapshot(),
                run_operation=operations, alive=lambda host: True)


def operations_that(behaviour):
    """A stand-in for pyinfra's run_host_op: BEHAVIOUR(host name, call number) raises, returns False, or None
    for an operation that ran and changed something."""
    calls = {}

    def run_host_op(state, host, op_hash):
        calls[host.name] = calls.get(host.name, 0) + 1
        result = behaviour(host.name, calls[host.name])
        if result is False:
            return False
        meta = state.get_op_data_for_host(host, op_hash).operation_meta
        meta.set_complete(True, [StringCommand("true")], CommandOutput([]))
        return True

    return run_host_op


@pytest.mark.parametrize("error", [EOFError(), RuntimeError("boom"), OSError(28, "No space left on device"),
                                   KeyError("x")])
def test_an_exception_on_one_host_fails_that_host_only_with_its_cause(tmp_path, error):
    def behaviour(host, call):
        if host == "h1" and call == 2:  # its second operation: the secrets, after the cluster key
            raise error
    report = driver.run_deploy(plan_for(tmp_path), io.StringIO(), TABLE, live=False, **offline(operations_that(behaviour)))

    failed = report.hosts[1]
    assert failed.steps["cluster key"].status == CHANGED
    assert failed.steps["secrets"].status == FAILED and failed.steps["secrets"].cause
    assert failed.steps["manifest"].status == FAILED  # asked, never reached: failed, not skipped
    assert failed.steps["manifest"].cause == "not done: secrets failed"
    assert failed.steps["resources"].status == SKIPPED  # never asked
    for other in (report.hosts[0], report.hosts[2]):
        assert {other.steps[name].status for name in ("cluster key", "secrets", "manifest")} == {CHANGED}
        assert other.ok
    assert not report.ok
    assert "2 of 3 hosts done" in summary(report)
    if isinstance(error, EOFError):
        assert "connection to the host dropped" in failed.error


def test_an_operation_that_fails_without_a_word_still_gets_a_cause(tmp_path):
    silent_on_h0 = operations_that(lambda host, call: False if host == "h0" else None)
    report = driver.run_deploy(plan_for(tmp_path), io.StringIO(), TABLE, live=False, **offline(silent_on_h0))
    orchestrator = report.hosts[0]
    assert orchestrator.steps["cluster key"].status == FAILED
    assert orchestrator.steps["cluster key"].cause  # never empty
    assert all(step.status != SKIPPED for name, step in orchestrator.steps.items()
               if name in ("cluster key", "secrets", "manifest"))
    assert [entry.ok for entry in report.hosts] == [False, True, True]


def test_every_host_failing_is_a_failed_run_not_an_empty_success(tmp_path):
    def behaviour(host, call):
        raise ConnectionResetError("reset")
    report = driver.run_deploy(plan_for(tmp_path), io.StringIO(), TABLE, live=False, **offline(operations_that(behaviour)))
    assert not report.ok
    assert all(entry.error for entry in report.hosts)
    assert "0 of 3 hosts done" in summary(report)


def test_an_internal_error_before_the_steps_fails_every_asked_step(tmp_path):
    class Unreadable(HostSnapshot):
        @property
        def contents(self):
            raise RuntimeError("settling broke")

        @contents.setter
        def contents(self, value):
            pass

    report = driver.run_deploy(plan_for(tmp_path), io.StringIO(), TABLE, live=False,
                               **offline(operations_that(lambda host, call: None), snapshot=Unreadable))
    assert not report.ok
    assert any("internal error" in note for note in report.notes)
    assert {entry.steps["secrets"].status for entry in report.hosts} == {FAILED}


def test_a_host_that_does_not_connect_fails_its_asked_steps(tmp_path):
    def connect(host, entry, wait, policy, view):
        if host.name == "h2":
            entry.fail("no route to host")
            return False
        return True

    report = driver.run_deploy(plan_for(tmp_path), io.StringIO(), TABLE, live=False,
                               **offline(operations_that(lambda host, call: None), connect=connect))
    down = report.hosts[2]
    assert down.error == "no route to host"
    assert down.steps["secrets"].status == FAILED and down.steps["resources"].status == SKIPPED
    assert [entry.ok for entry in report.hosts] == [True, True, False]


def test_a_lost_lock_stops_every_write_on_every_host(tmp_path):
    """The lock is a fence: once any member's lock has ended (its heartbeat starved, or another deploy took it
    over), no host runs another operation, and each says why."""
    ran = []
    locks = []

    class EndingLock(HeldLock):
        def __init__(self):
            locks.append(self)

    def operations(host, call):
        ran.append(host)
        if len(ran) == 3:  # the cluster key went to every host; then the orchestrator's lock ends
            locks[0].taken_away = True
        gevent.sleep(0.01)  # the hosts' operations interleave, as over a network

    report = driver.run_deploy(plan_for(tmp_path), io.StringIO(), TABLE, live=False,
                               **offline(operations_that(operations), lock=EndingLock))
    assert len(locks) == 3  # one lock on every member reached
    assert len(ran) == 3
    for host in report.hosts:
        assert host.steps["cluster key"].status == CHANGED
        assert host.steps["secrets"].status == FAILED
        assert "lost the deploy lock on 10.0.0.1" in host.steps["secrets"].cause
    assert not report.ok


def test_a_signal_mid_run_stops_every_host_and_marks_the_report_interrupted(tmp_path):
    def operations(host, call):
        if host == "h1" and call == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as a CI runner cancelling the job does
        gevent.sleep(0.05)

    report = driver.run_deploy(plan_for(tmp_path), io.StringIO(), TABLE, live=False, **offline(operations_that(operations)))
    document = json.loads(report.to_json())
    assert report.interrupted == "SIGTERM" and document["interrupted"] == "SIGTERM" and document["ok"] is False
    assert "INTERRUPTED by SIGTERM" in summary(report)
    assert all(host.steps["manifest"].status == FAILED for host in report.hosts)
    assert any("interrupted (SIGTERM)" in (host.steps["manifest"].cause or "") for host in report.hosts)


def test_every_connected_member_can_serve_the_members_that_take_trees_from_it(tmp_path):
    """The fan-out is one, whoever reaches it first: members connecting at once once built a fan-out each (the
    tree walk yields), and a factory then found its server missing from the one kept (a KeyError, CI, stop 28)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "shard").write_bytes(b"x" * 1000)
    plan = dataclasses.replace(plan_for(tmp_path, factories=3), resources=[Resource("data", data)], fan_out="relay")
    report = DeployReport.for_plan(plan, TABLE.names, "run-1")
    stand_ins = offline(operations_that(lambda host, call: None))
    deployment = driver.Deployment(plan, TABLE, report, ProgressView(report, io.StringIO(), False), stand_ins.pop("connect"),
                                   stand_ins.pop("open_lock"), stand_ins)
    try:
        deployment.run()
    finally:
        deployment.close()
    assert set(deployment.context.fan_out.hosts) == {"h0", "h1", "h2", "h3"}
    assert report.ok, report.to_json()


def test_an_error_of_ours_in_a_host_function_becomes_the_hosts_cause_not_a_silent_failure():
    """pyinfra logs a callback's exception (not shown without -v) and fails the operation without a word."""
    causes = {}

    def broken(state, host, server):
        return {}[server]

    class Member:
        name = "h1"

    command = host_function(broken, "h0", causes=causes)
    assert command.execute(None, Member(), {}) is False
    assert causes == {"h1": "stopped on an unexpected error: KeyError: 'h0'"}
    assert host_function(lambda state, host, value: value, True, causes=causes).execute(None, Member(), {}) is True
