"""--ray without hosts: which token is kept, what counts as already running, what a start command says, and that no
member waits forever for one that stopped."""

import socket
import subprocess
import tomllib
from types import SimpleNamespace
from pathlib import Path

import pytest

from flambe_iac.cli.deploy import free_local_port
from flambe_iac.cluster import FACTORY, ORCHESTRATOR, Host
from flambe_iac.deploys import ray as ray_step
from flambe_iac.engine.snapshot import HostSnapshot, SnapshotRequest, parse_snapshot, snapshot_command
from flambe_iac.engine import ray_settlement
from flambe_iac.engine.ray_cluster import (
    EMPTY_SHA256,
    RAY_STATE,
    HeldToken,
    desired_state,
    parse_start_output,
    parse_state,
    start_command,
    stop_command,
    token_sha256,
    token_sources,
)
from flambe_iac.engine.ray_settlement import RayCluster, RayUnavailable, settle_ray
from flambe_iac.names import check_ray_python
from flambe_iac.errors import InputError
from flambe_iac.inputs.plan import DeployRequest, check_ray_request

ORCH = Host("i-0", ORCHESTRATOR, "10.0.0.1", "54.0.0.1")
FACTORIES = [Host(f"i-{n}", FACTORY, f"10.0.0.{n + 1}", f"54.0.0.{n + 1}") for n in (1, 2)]
TOKEN = b"a" * 64


class FakeHost:
    def __init__(self, name):
        self.name = name


def test_the_orchestrators_token_is_kept_then_the_most_held_then_by_digest():
    held = [HeldToken("f1", False, "bb"), HeldToken("f2", False, "bb"), HeldToken("o", True, "cc")]
    assert [entry.member for entry in token_sources(held, rotate=False)][0] == "o"
    without_orchestrator = [HeldToken("f1", False, "bb"), HeldToken("f2", False, "bb"), HeldToken("f3", False, "aa")]
    assert [entry.sha256 for entry in token_sources(without_orchestrator, False)] == ["bb", "bb", "aa"]
    tie = [HeldToken("f1", False, "dd"), HeldToken("f2", False, "aa")]
    assert token_sources(tie, False)[0].sha256 == "aa"
    assert token_sources(held, rotate=True) == []
    assert token_sources([HeldToken("o", True, EMPTY_SHA256), HeldToken("f", False, None)], False) == []


def test_the_desired_state_changes_with_the_token_the_python_and_the_heads_start():
    head = desired_state("head", "python3", "10.0.0.1", TOKEN)
    assert TOKEN.decode() not in head
    assert head != desired_state("head", "python3", "10.0.0.1", b"b" * 64)
    assert head != desired_state("head", "/opt/ray/bin/python", "10.0.0.1", TOKEN)
    assert desired_state("worker", "python3", "10.0.0.1", TOKEN, "run-1") != \
        desired_state("worker", "python3", "10.0.0.1", TOKEN, "run-2")


def state_file(desired: str, started_by="run-1", version="2.60.0") -> bytes:
    return f"{desired}\nstarted_by {started_by}\nray_version {version}\n".encode()


def snapshot(state: bytes | None, running=()) -> HostSnapshot:
    found = HostSnapshot(running=set(running))
    if state is not None:
        found.contents[RAY_STATE] = state
    return found


def test_a_running_head_as_asked_is_kept_and_its_workers_too():
    head = desired_state("head", "python3", ORCH.private_ip, TOKEN)
    cluster = RayCluster.plan(TOKEN, "python3", ORCH, FACTORIES, snapshot(state_file(head), ("gcs_server", "raylet")),
                              "run-2")
    assert not cluster.head_starts and cluster.head.get().started_by == "run-1"
    assert cluster.head.get().version == "2.60.0"
    worker = desired_state("worker", "python3", ORCH.private_ip, TOKEN, "run-1")
    assert not cluster.worker_must_start(snapshot(state_file(worker), ("raylet",)))
    assert cluster.worker_must_start(snapshot(state_file(worker), ()))  # recorded, but its raylet is gone
    assert cluster.worker_must_start(snapshot(None, ("raylet",)))  # a raylet we did not start, or a new factory
    stale = desired_state("worker", "python3", ORCH.private_ip, TOKEN, "run-0")
    assert cluster.worker_must_start(snapshot(state_file(stale), ("raylet",)))  # joined to an older head


@pytest.mark.parametrize("orchestrator_snapshot", [
    snapshot(None, ("gcs_server", "raylet")),  # running, but not as this run asks (or not started by us)
    snapshot(state_file(desired_state("head", "python3", ORCH.private_ip, TOKEN)), ("raylet",)),  # GCS gone
    snapshot(state_file(desired_state("head", "python3", ORCH.private_ip, b"old" * 20)), ("gcs_server", "raylet")),
])
def test_a_head_not_running_as_asked_starts_and_so_do_its_workers(orchestrator_snapshot):
    cluster = RayCluster.plan(TOKEN, "python3", ORCH, FACTORIES, orchestrator_snapshot, "run-2")
    assert cluster.head_starts and not cluster.head.ready()
    worker = desired_state("worker", "python3", ORCH.private_ip, TOKEN, "run-1")
    assert cluster.worker_must_start(snapshot(state_file(worker), ("raylet",)))


def test_nobody_waits_for_a_member_that_stopped():
    cluster = RayCluster.plan(TOKEN, "python3", ORCH, FACTORIES, snapshot(None), "run-1")
    cluster.member_finished(ORCH, "secrets failed")
    with pytest.raises(RayUnavailable, match="secrets failed"):
        cluster.head.get(timeout=1)
    causes = {}
    assert ray_step._start_worker(None, FakeHost("f1"), cluster, FACTORIES[0], causes, {}) is False
    assert "the Ray head did not start: the orchestrator failed: secrets failed" in causes["f1"]
    cluster.member_finished(FACTORIES[1], None)
    assert ray_step._wait_for_workers(None, FakeHost("o"), cluster, causes) is False
    assert "not starting the runnable on part of the cluster" in causes["o"]
    assert "i-1 (the Ray head did not start" in causes["o"] and "i-2 (it stopped before its Ray step)" in causes["o"]


def test_an_unreached_orchestrator_fails_the_workers_at_once():
    cluster = RayCluster.plan(TOKEN, "python3", ORCH, FACTORIES, None, "run-1")
    with pytest.raises(RayUnavailable, match="not reached"):
        cluster.head.get(timeout=1)


def test_the_runnable_waits_for_every_worker():
    cluster = RayCluster.plan(TOKEN, "python3", ORCH, FACTORIES, snapshot(None), "run-1")
    for factory in FACTORIES:
        cluster.workers[factory.id].set(True)
    cluster.member_finished(FACTORIES[0], "later failure")  # already joined: stays joined
    assert ray_step._wait_for_workers(None, FakeHost("o"), cluster, {}) is True


def test_start_output_says_what_happened():
    from framed_answers import section

    def parsed(text: str):
        return parse_start_output(text.encode())
    assert parsed(section("@version", "2.60.0") + "@started\n").status == "started"
    assert parsed(section("@version", "2.60.0") + "@started\n").version == "2.60.0"
    missing = parsed(section("@no-ray", "ModuleNotFoundError: No module named 'ray'"))
    assert missing.status == "no-ray" and "No module named 'ray'" in missing.detail
    assert parsed(section("@version", "2.59.0") + "@mismatch\n").status == "mismatch"
    failed = parsed(section("@version", "2.60.0") + section("@failed", "line one\nPermission denied: /tmp/ray\n"))
    assert failed.status == "failed" and "Permission denied" in failed.detail
    assert parse_start_output(b"").status == "failed"  # cut short: never a success
    forged = parsed(section("@version", "2.60.0") + section("@failed", "@started\n@version 9\n"))
    assert forged.status == "failed" and forged.version == "2.60.0"  # Ray's log cannot say it started
    assert parse_state(state_file("{}", "r9", "2.60.0")) == parse_state(state_file("{}", "r9", "2.60.0"))
    assert parse_state(None).desired == ""


def test_start_commands_lock_ray_down_and_are_valid_shell():
    head = start_command("python3", "10.0.0.1", "10.0.0.1", "{}", "run-1")
    worker = start_command("python3", "10.0.0.2", "10.0.0.1", "{}", "run-1", expected_version="2.60.0")
    assert "RAY_AUTH_MODE=token" in head and "--dashboard-host=127.0.0.1" in head and "--head" in head
    assert "--port=6379" in head and "--node-ip-address=10.0.0.1" in head
    assert "--address=10.0.0.1:6379" in worker and "--head" not in worker and "2.60.0" in worker
    for command in (head, worker, stop_command("/opt/ray/bin/python")):
        assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0


@pytest.mark.parametrize("hostile", ["python3; rm -rf ~", "$(id)", "py thon", "python\n", ""])
def test_a_hostile_ray_python_is_bad_input(hostile):
    with pytest.raises(InputError, match="--ray-python"):
        check_ray_python(hostile)


@pytest.mark.parametrize("request_, message", [
    (DeployRequest(ray=True, ray_stop=True), "give one of them"),
    (DeployRequest(ray_python="python3"), "needs --ray"),
    (DeployRequest(ray_stop=True, run=True), "--run needs Ray running"),
])
def test_ray_options_that_contradict_each_other_are_bad_input(request_, message):
    with pytest.raises(InputError, match=message):
        check_ray_request(request_)


def test_the_snapshot_tells_which_of_the_users_processes_run():
    command = snapshot_command(SnapshotRequest(processes=("raylet", "gcs_server")))
    output = subprocess.run(["bash", "-c", command], capture_output=True, text=True).stdout.splitlines()
    assert output[-1] == "@end-of-snapshot"
    assert parse_snapshot(["@running raylet"]).running == {"raylet"}


def test_ray_is_an_extra_pinned_exactly():
    root = Path(__file__).parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["ray"] == ["ray[default]==2.60.0"]
    assert not [item for item in project["dependencies"] if item.lower().startswith("ray")]
    assert "ray==2.60.0" in (root / "constraints.txt").read_text().splitlines()


def test_status_says_whether_the_ray_a_deploy_started_still_runs():
    from flambe_iac.day_two.status import parse_status

    def status(ray_lines):
        from framed_answers import section
        ray = section("@ray", f"{ray_lines[0]}\n") + "".join(f"{line}\n" for line in ray_lines[1:]) if ray_lines else ""
        output = section("@pub") + section("@manifest", "{}") + section("@sums") + ray + "@end\n"
        return parse_status("c-orchestrator", "10.0.0.1", 0, output, "")

    head = desired_state("head", "python3", "10.0.0.1", TOKEN)
    assert status([head, "@running gcs_server", "@running raylet"]).ray == "head running"
    stopped = status([head, "@running raylet"])
    assert stopped.ray == "head STOPPED" and not stopped.healthy
    assert "re-run flambe-deploy --ray" in " ".join(stopped.problems)
    never = status([])
    assert never.ray is None and not any("Ray" in problem for problem in never.problems)


def test_a_wait_that_never_ends_is_a_cause_not_an_escape(monkeypatch):
    monkeypatch.setattr(ray_settlement, "MEMBERS_WAIT_TIMEOUT", 0.01)
    cluster = RayCluster.plan(TOKEN, "python3", ORCH, FACTORIES, snapshot(None), "run-1")
    causes = {}
    assert ray_step._start_worker(None, FakeHost("f1"), cluster, FACTORIES[0], causes, {}) is False
    assert "the head's start did not come within" in causes["f1"]
    assert ray_step._wait_for_workers(None, FakeHost("o"), cluster, causes) is False
    assert "i-2 (its worker's start did not come within" in causes["o"]


def test_the_dashboard_tunnel_takes_a_local_port_no_one_holds():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        held = taken.getsockname()[1]
        assert free_local_port(held) != held
    assert free_local_port(held) == held  # free again: the port users know is kept when it can be


def test_ray_keeps_its_files_in_a_private_directory():
    command = start_command("python3", "10.0.0.2", "10.0.0.1", "{}", "run-1", expected_version="2.60.0")
    assert 'mkdir -p -m 700 .flambe/ray && chmod 700 .flambe/ray' in command
    assert '--temp-dir="$HOME/.flambe/ray/tmp"' in command


def test_rotation_makes_a_new_token_and_a_plain_run_keeps_the_held_one():
    """--rotate-cluster-key --ray: the token the members hold is not even fetched; without it, it is kept."""
    held = snapshot(None)
    held.files[".ray/auth_token"] = ("600", token_sha256(TOKEN))
    snapshots = {"o": held, "f1": snapshot(None)}
    fetched = []

    def fetch(member):
        fetched.append(member)
        return TOKEN

    def plan(rotate):
        return SimpleNamespace(request=SimpleNamespace(rotate_cluster_key=rotate), ray_python="python3",
                               cluster=SimpleNamespace(orchestrator=ORCH, factories=FACTORIES))

    assert settle_ray(snapshots, "o", plan(False), "run-1", fetch).token.data == TOKEN and fetched == ["o"]
    rotated = settle_ray(snapshots, "o", plan(True), "run-2", fetch)
    assert rotated.token.data != TOKEN and fetched == ["o"]
