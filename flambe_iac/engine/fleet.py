"""The members of one run as pyinfra hosts, each with its report entry, and every phase run on all of them at once."""

from __future__ import annotations

import gevent

from flambe_iac.engine.report import DeployReport
from flambe_iac.errors import describe_exception
from flambe_iac.inputs.plan import DeployPlan
from flambe_iac.ssh.policy import make_state
from flambe_iac.ssh.processes import stop_children


class Interrupted(gevent.GreenletExit):
    """Thrown into the phase's greenlets on SIGINT or SIGTERM: a BaseException, so no host's handler takes it,
    and a GreenletExit, so the greenlet ends quietly."""


class Fleet:
    """The pyinfra state, the member and the report entry of each pyinfra host, and the phase under way."""

    def __init__(self, plan: DeployPlan, report: DeployReport):
        self.plan = plan
        self.report = report
        self.policy = plan.ssh_policy()
        self.state = make_state([(member.id, plan.address(member)) for member in plan.cluster.members], self.policy)
        self.members = {self.state.inventory.get_host(member.id): member for member in plan.cluster.members}
        self.entries = {host: entry for host, entry in zip(self.members, report.hosts)}
        self.phase: list[gevent.Greenlet] = []

    @property
    def hosts(self) -> list:
        return list(self.members)

    def host_of(self, member):
        return next((host for host, candidate in self.members.items() if candidate is member), None)

    def each_host(self, action, hosts: list) -> list:
        """ACTION(host) on every host at once, and what each returned (None for a host that failed): a host
        whose action raises fails with its cause, and the others go on."""
        if self.report.interrupted:
            return [None] * len(hosts)

        def guarded(host):
            try:
                return action(host)
            except Exception as error:  # anything at all from one host fails that host, never the run
                self.entries[host].fail(describe_exception(error))
                return None

        self.phase = [gevent.spawn(guarded, host) for host in hosts]
        gevent.joinall(self.phase)
        results = [greenlet.value for greenlet in self.phase]
        self.phase = []
        return results

    def interrupt(self, signal_name: str) -> None:
        """SIGINT or SIGTERM: stop every child and every host's work; the report says the run was interrupted."""
        self.report.interrupted = signal_name
        stop_children()
        gevent.killall(self.phase, Interrupted, block=False)

    def disconnect(self) -> None:
        self.policy.close()
        for host in self.members:
            if host.connected:
                try:
                    host.disconnect()
                except Exception:  # closing a connection that already broke must not hide the report
                    continue
