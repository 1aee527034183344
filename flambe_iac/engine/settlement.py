"""After every snapshot is read: what the members share for this run (the cluster key, Ray's token and plan)."""

from __future__ import annotations

from dataclasses import replace

from flambe_iac.agent.records import AGENT_PROCESS
from flambe_iac.engine.steps import StepContext, extension_sources
from flambe_iac.engine.cluster_key import settle_cluster_key
from flambe_iac.engine.departures import departed_members, departure_note
from flambe_iac.engine.ray_cluster import RAY_TOKEN
from flambe_iac.engine.ray_settlement import settle_ray
from flambe_iac.remote_layout import CLUSTER_PRIVATE_KEY
from flambe_iac.engine.report import DeployReport
from flambe_iac.ssh.channel import read_file


def settle(context: StepContext, report: DeployReport, fleet, snapshots: dict) -> None:
    """Settle from SNAPSHOTS (pyinfra host -> snapshot) into CONTEXT and REPORT; then release whatever other members
    would wait for from a member that was not reached."""
    plan = context.plan
    orchestrator = fleet.host_of(plan.cluster.orchestrator)
    departed = departed_members(snapshots.values(), plan.cluster)
    # Members that left take no key with them: this run rotates as --rotate-cluster-key does, unless told not to.
    rotate = plan.request.rotate_cluster_key or (bool(departed) and not plan.request.keep_cluster_key)
    settled = settle_cluster_key(snapshots, orchestrator, rotate, plan.cluster.name,
                                 lambda host: read_file(host, CLUSTER_PRIVATE_KEY))
    context.key, context.retired = settled.key, settled.retired
    report.settled_cluster_key(settled.key.fingerprint, settled.action, settled.note)
    if departed:
        # A Ray token on the members is replaced only by a rotation with --ray: until then they hold it too.
        ray_token_kept = not (rotate and plan.request.ray) and any(RAY_TOKEN in snapshot.files
                                                                    for snapshot in snapshots.values())
        report.departed(departed, departure_note(departed, rotate, source_name(plan.request), ray_token_kept),
                        holds_key=not rotate)
    if plan.request.ray:
        ray_plan = replace(plan, request=replace(plan.request, rotate_cluster_key=rotate))
        context.ray = settle_ray(snapshots, orchestrator, ray_plan, report.run_id,
                                 lambda host: read_file(host, RAY_TOKEN))
    report.extensions = extension_sources(plan)
    if plan.autostop is None:
        agents = {fleet.members[host]: AGENT_PROCESS in snapshot.running for host, snapshot in snapshots.items()}
        report.notes.extend(filter(None, [uncovered_members(agents)]))
    context.prepare_trees()
    for host, member in fleet.members.items():
        if host not in snapshots:
            context.member_finished(member, f"it was not reached: {fleet.entries[host].error}")


def source_name(request) -> str:
    """The cluster's source, as the user gave it."""
    if request.cluster_file is not None:
        return "cluster file"
    return "stack outputs" if request.outputs is not None else "stack"


def uncovered_members(running: dict) -> str | None:
    """A deploy without --autostop leaves the agents as they are. When some members run one and others do not (a
    factory added since), the ones without would never stop themselves: the report says which, and what to do.
    RUNNING: member -> whether its agent runs, for the members read."""
    without = [member.id for member, agent in running.items() if not agent]
    if not without or len(without) == len(running):
        return None
    shown = ", ".join(without[:5]) + (f" and {len(without) - 5} more" if len(without) > 5 else "")
    return (f"autostop agents run on {len(running) - len(without)} of {len(running)} members, but not on {shown}: "
            f"a deploy without --autostop leaves the agents as they are, so these would never stop themselves. "
            f"Deploy with --autostop MINUTES (or set flambe:autostopMinutes in the stack) to cover every member")
