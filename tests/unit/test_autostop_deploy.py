"""--autostop from the deploy's side: the flag, the outputs' autostop_minutes, the settings each member gets, what
`status` shows of the agent (read as untrusted), and what the stack sets for the agent's shutdown."""

import dataclasses
import io
import json
from types import SimpleNamespace

import pytest
from framed_answers import section
from pulumi_harness import BASE_CONFIG, LAUNCH_TEMPLATE, RecordingMocks, run_program
from test_day_two_status import KEY_A, record, status_of
from test_honest_outcomes import offline, operations_that, plan_for

from flambe_iac.agent.records import AGENT_PROCESS, AgentState
from flambe_iac.cli.deploy import build_parser
from flambe_iac.cluster import Cluster, Host
from flambe_iac.day_two.status import show_status
from flambe_iac.deploys.autostop import agent_config
from flambe_iac.engine.snapshot import HostSnapshot
from flambe_iac.engine import driver
from flambe_iac.engine.ray_cluster import stop_command
from flambe_iac.engine.report import summary
from flambe_iac.errors import InputError
from flambe_iac.inputs.outputs import contract_document, parse_outputs
from flambe_iac.stacks.cluster import declare_cluster
from flambe_iac.stacks.cluster_config import load_config
from flambe_iac.deploys.steps import TABLE


def deploy_arguments(*argv):
    return build_parser().parse_args(["deploy", "--outputs", "o.json", "--key", "k", *argv])


def test_the_flag_takes_minutes_or_off_and_thresholds(capsys):
    assert deploy_arguments("--autostop", "30").autostop == 30.0
    assert deploy_arguments("--autostop", "off").autostop == "off"
    assert deploy_arguments().autostop is None
    parsed = deploy_arguments("--autostop", "5", "--autostop-gpu", "25", "--autostop-cpu", "2")
    assert (parsed.autostop_gpu, parsed.autostop_cpu) == (25.0, 2.0)
    for bad in (["--autostop", "0"], ["--autostop", "soon"], ["--autostop", "nan"], ["--autostop-gpu", "101"],
                ["--autostop-cpu", "0"]):
        with pytest.raises(SystemExit):
            deploy_arguments(*bad)
    assert "or off, not 'soon'" in capsys.readouterr().err


def hosts():
    return ({"id": "i-0a", "public_ip": None, "private_ip": "10.0.1.10", "public_dns": None},
            [{"id": "i-0b", "public_ip": None, "private_ip": "10.0.1.11", "public_dns": None}])


def test_the_outputs_may_carry_the_stacks_autostop_minutes():
    orchestrator, factories = hosts()
    assert parse_outputs(contract_document("c", "ubuntu", "r", orchestrator, factories)).autostop_minutes is None
    assert parse_outputs(contract_document("c", "ubuntu", "r", orchestrator, factories, 45.0)).autostop_minutes == 45
    for bad in (0, -5, "30", True, 1e9):
        with pytest.raises(InputError, match="autostop_minutes"):
            parse_outputs(contract_document("c", "ubuntu", "r", orchestrator, factories, bad))


def test_each_member_gets_its_role_the_others_addresses_and_rays_stop():
    cluster = Cluster("c", "ubuntu", "r", Host("i-0a", "orchestrator", "10.0.1.10"),
                      (Host("i-0b", "factory", "10.0.1.11"), Host("i-0c", "factory", "10.0.1.12")))
    plan = SimpleNamespace(cluster=cluster, autostop=20.0, ray_python="/opt/ray/bin/python",
                           request=SimpleNamespace(autostop_gpu=15.0, autostop_cpu=1.0, ray=True))
    orchestrator = agent_config(plan, cluster.orchestrator)
    assert orchestrator.factories == ("10.0.1.11", "10.0.1.12") and orchestrator.orchestrator is None
    factory = agent_config(plan, cluster.factories[1])
    assert factory.factories == () and factory.orchestrator == "10.0.1.10" and factory.member_id == "i-0c"
    assert (factory.minutes, factory.gpu_percent, factory.cpu_cores) == (20.0, 15.0, 1.0)
    assert factory.ray_stop == stop_command("/opt/ray/bin/python")
    plan.request.ray = False
    assert agent_config(plan, cluster.orchestrator).ray_stop is None


def agent_section(now: str, state: bytes, alive: bool = True) -> str:
    return section("@agent", state, argument=now) + ("@alive\n" if alive else "")


def status_with_agent(section: str):
    return status_of("c-factory-0", record(KEY_A).replace("@end\n", section + "@end\n"))


def test_status_shows_the_agent_idle_minutes_last_busy_and_when_it_stops():
    state = AgentState(pid=9, role="factory", minutes=30, idle_minutes=12.5, last_busy="gpu 80%",
                       stops_in_minutes=17.5, updated_at=1000.0)
    status = status_with_agent(agent_section("1030", state.to_bytes()))
    assert status.healthy
    assert status.agent == "watching, idle 12.5 min (last busy: gpu 80%), stops in 17.5 min, 30 s ago"
    assert status.agent_record["last_busy"] == "gpu 80%"


def test_status_names_a_preempted_member_and_a_dead_agent():
    preempted = AgentState(pid=9, role="factory", minutes=30, state="preempted", preempted_at=1796025472.0,
                           interruption="terminate at 2026-11-30T07:59:51Z")
    status = status_with_agent(agent_section("1796025480", preempted.to_bytes(), alive=False))
    assert status.agent == "preempted at 2026-11-30T07:57:52Z (terminate at 2026-11-30T07:59:51Z)" and status.healthy
    dead = status_with_agent(agent_section("1000", AgentState(pid=9, role="factory", minutes=30).to_bytes(), False))
    assert dead.agent.startswith("NOT RUNNING (last: watching") and not dead.healthy
    refused = AgentState(pid=9, role="factory", minutes=5, state="stop refused", cause="sudo -n shutdown: no")
    assert "autostop could not stop this member: sudo -n shutdown: no" in status_with_agent(
        agent_section("1000", refused.to_bytes())).problems


def test_a_hostile_agent_record_is_a_problem_in_words_and_its_text_reaches_the_terminal_escaped():
    garbage = status_with_agent(agent_section("1000", b'{"pid": 1, "state": "watching", "idle_minutes": 1e999}'))
    assert garbage.agent == "running, state unreadable" and "idle_minutes is not a number" in " ".join(garbage.problems)
    hostile = AgentState(pid=9, role="factory", minutes=30, last_busy="\x1b[2J\x1b]0;owned\x07 @end")
    status = status_with_agent(agent_section("x", hostile.to_bytes()))
    shown = show_status([status])
    assert "\x1b" not in shown and "\x07" not in shown and "\\x1b[2J" in shown
    assert status.agent_record["last_busy"] == hostile.last_busy  # the report keeps the text as it came
    assert no_agent().agent is None


def no_agent():
    return status_of("c-factory-0", record(KEY_A))


def stack(**overrides):
    mocks = RecordingMocks()
    exports = run_program(lambda: declare_cluster(load_config()), {**BASE_CONFIG, **overrides}, mocks)
    # Each role's launch template carries what its fleet's instances launch with.
    templates = {resource.name: resource.inputs for resource in mocks.of_type(LAUNCH_TEMPLATE)}
    return exports, {"exp1_orchestrator": templates["exp1_orchestrator"], "exp1_factory_0": templates["exp1_factory"]}


def test_the_stack_maps_the_agents_shutdown_to_idle_action_and_exports_autostop_minutes():
    exports, instances = stack(autostopMinutes="45", idleAction="stop")
    assert exports["autostop_minutes"] == 45.0
    assert parse_outputs(json.loads(json.dumps(exports))).autostop_minutes == 45.0
    assert {inputs["instanceInitiatedShutdownBehavior"] for inputs in instances.values()} == {"stop"}
    exports, instances = stack(spot="true", autostopMinutes="20")
    assert instances["exp1_orchestrator"]["instanceInitiatedShutdownBehavior"] == "terminate"  # idleAction's default
    assert instances["exp1_factory_0"]["instanceInitiatedShutdownBehavior"] == "terminate"  # one-time spot
    exports, instances = stack(spot="true", autostopMinutes="20", idleAction="stop")
    assert instances["exp1_factory_0"]["instanceInitiatedShutdownBehavior"] == "terminate"
    exports, instances = stack(idleAction="terminate")  # no autostop: a shutdown typed on a host only stops it
    assert "autostop_minutes" not in exports
    assert all("instanceInitiatedShutdownBehavior" not in inputs for inputs in instances.values())
    with pytest.raises(Exception, match="flambe:autostopMinutes is '0'"):
        stack(autostopMinutes="0")


def test_the_agents_code_is_one_zip_the_same_for_the_same_code_that_runs_on_its_own(tmp_path):
    import subprocess
    import zipfile

    from flambe_iac.deploys.autostop import agent_archive

    archive = agent_archive()
    assert archive == agent_archive.__wrapped__()  # the same bytes each time: an unchanged agent is not sent again
    (tmp_path / "agent.zip").write_bytes(archive)
    names = zipfile.ZipFile(tmp_path / "agent.zip").namelist()
    assert "flambe_iac/agent/__main__.py" in names and not any("__pycache__" in name for name in names)
    # The host's python, isolated from this environment: the agent's code needs nothing but the zip and the stdlib.
    result = subprocess.run(["/usr/bin/python3", "-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                             "import flambe_iac.agent.__main__, flambe_iac.agent.watch; print('ok')",
                             str(tmp_path / "agent.zip")], capture_output=True, text=True, timeout=60)
    assert result.stdout == "ok\n", result.stderr
    assert not list(tmp_path.glob("**/__pycache__"))


@pytest.mark.parametrize("autostop, agents, expected", [
    (None, {"h0": True, "h1": True, "h2": False}, "autostop agents run on 2 of 3 members, but not on h2"),
    (None, {"h0": True, "h1": True, "h2": True}, None),
    (None, {"h0": False, "h1": False, "h2": False}, None),  # autostop was never asked: nothing to say
    (30.0, {"h0": True, "h1": True, "h2": False}, None),  # this deploy installs the agent on h2
])
def test_a_deploy_without_autostop_names_the_members_an_agent_does_not_cover(tmp_path, autostop, agents, expected):
    """A factory added by a deploy without --autostop would never stop itself, while its cluster's others do."""
    requests = []

    def read(host, request, timeout):
        requests.append(request)
        return HostSnapshot(running={AGENT_PROCESS} if agents[host.name] else set())

    plan = dataclasses.replace(plan_for(tmp_path), autostop=autostop)
    report = driver.run_deploy(plan, io.StringIO(), TABLE, live=False, **{**offline(operations_that(lambda host, call: None)),
                                                                   "read": read})
    notes = [note for note in report.notes if "autostop agents" in note]
    assert AGENT_PROCESS in requests[0].processes
    if expected is None:
        assert notes == []
    else:
        assert len(notes) == 1 and expected in notes[0] and "--autostop MINUTES" in notes[0]
        assert f"note: {notes[0]}" in summary(report)
