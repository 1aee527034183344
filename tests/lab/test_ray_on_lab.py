"""--ray on real hosts: Ray 2.60 from a virtualenv outside any home, each lab host in its own PID namespace.

Everything is checked on the hosts or from the client namespace: which host ran each task, the token files, what a
client without the token gets, which ports answer, which processes each host runs.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CANARY
from lab_session import home_environment

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "ray_spread" / "ray_spread.yaml"
REFUSED = "Authentication token is missing or incorrect"
ADMITTED = "Connected to Ray cluster"  # the head took the token (a driver off the nodes then finds no raylet)


@pytest.fixture(scope="session")
def ray_python():
    """The lab hosts' Ray: made once by scripts/lab-ray-python (scripts/test runs it first)."""
    result = subprocess.run([str(ROOT / "scripts" / "lab-ray-python")], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def ray_deploy(lab, tmp_path, *arguments, python, runnable=None):
    report = tmp_path / "report.json"
    result = lab.deploy(*([str(runnable)] if runnable else []), *lab.lab_arguments(), "--ray", "--ray-python",
                        python, "--report", str(report), *arguments, env=home_environment(tmp_path / "home"),
                        timeout=300)
    document = json.loads(report.read_text()) if report.exists() else {}
    return result, document


def ray_status(document) -> dict[str, str]:
    return {host["address"]: host["steps"]["ray"]["status"] for host in document["hosts"]}


def ray_pids(lab, hostname) -> dict[str, int]:
    """The host's Ray daemons, as this machine's pids."""
    pids = {}
    for pid in lab.sshd_pids(hostname):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if name in ("gcs_server", "raylet"):
            pids[name] = pid
    return pids


def client_ray_init(lab, python, address, environment: dict, ray_client: bool = False) -> subprocess.Popen:
    """A Ray driver in the client namespace, trying to join the cluster at the head's port; or, with RAY_CLIENT,
    through the Ray Client server on port 10001 (prints CLIENT CONNECTED once it can run work there)."""
    code = f"import ray\nray.init(address={address + ':6379'!r})"
    if ray_client:
        code = (f"import ray\nray.init({'ray://' + address + ':10001'!r})\n"
                "print('CLIENT CONNECTED', ray.cluster_resources()['CPU'])")
    return subprocess.Popen([sys.executable, "-m", "flambe_iac.cli.lab", "exec", "--dir", str(lab.directory), "--",
                             "env", "-i", "PATH=/usr/bin:/bin", "HOME=/nonexistent", *(f"{k}={v}" for k, v in
                                                                                       environment.items()),
                             python, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# How Ray's client server says it could not start the server of a client's own; both are Ray's, under load: its
# start timed out, or its process was gone before Ray's proxier read its command line (psutil's ZombieProcess).
SERVER_START_FAILURES = ("Starting Ray client server failed", "psutil.ZombieProcess")


def ray_client_connects(lab, python, address, environment: dict, attempts: int = 3) -> bool:
    """The Ray Client server starts a server of its own for each client; on a busy machine that start can fail,
    so a client with the token may try more than once. Refusal of a client without it is checked once."""
    for _ in range(attempts):
        output = client_ray_init(lab, python, address, environment, ray_client=True).communicate(timeout=180)[0]
        if "CLIENT CONNECTED" in output:
            return True
        assert any(words in output for words in SERVER_START_FAILURES), output[-2000:]  # only these merit a retry
    return False


def answers(lab, address, port) -> bool:
    probe = (f"import socket\ntry:\n    socket.create_connection(({address!r}, {port}), timeout=3).close()\n"
             "    print('OPEN')\nexcept OSError as error:\n    print('CLOSED', error)")
    return lab.run_in_client(sys.executable, "-c", probe).stdout.startswith("OPEN")


# Every port Ray listens on, and what a client without the token must get there. The gRPC ports answer a call with
# UNAUTHENTICATED; the HTTP agents answer 401. Ray's Prometheus metrics (the node's 6384, the autoscaler's 44217 and
# the dashboard's 44227 on the orchestrator) answer anyone: Ray has no option to guard or to rebind them (README).
GRPC_METHODS = {6379: "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo", 6380: "/ray.rpc.NodeManagerService/GetNodeStats",
                6381: "/ray.rpc.ObjectManagerService/Pull", 6383: "/ray.rpc.ReporterService/GetTraceback",
                10001: "/ray.rpc.RayletDriver/ClusterInfo"}
WORKER_METHOD = "/ray.rpc.CoreWorkerService/NumPendingTasks"
HTTP_PATHS = {6382: "/get_or_create_runtime_env", 52365: "/api/job_agent/jobs/", 6384: "/metrics",
              44217: "/metrics", 44227: "/metrics"}
METRICS_PORTS = {6384, 44217, 44227}
PROBE = """
import sys, urllib.request, urllib.error
import grpc
address = sys.argv[1]
for argument in sys.argv[2:]:
    kind, port, path = argument.split(",", 2)
    if kind == "grpc":
        try:
            grpc.insecure_channel(f"{address}:{port}").unary_unary(path)(b"", timeout=20)
            print(port, "ANSWERED")
        except grpc.RpcError as error:
            print(port, error.code().name)
        continue
    try:
        with urllib.request.urlopen(f"http://{address}:{port}{path}", timeout=20) as response:
            print(port, response.status)
    except urllib.error.HTTPError as error:
        print(port, error.code)
    except OSError as error:
        print(port, "CLOSED")
"""
HOLD_ACTORS = """
import sys, ray
ray.init("ray://{address}:10001")
@ray.remote(num_cpus=0)
class Hold:
    def ping(self):
        return 1
holders = [Hold.options(scheduling_strategy="SPREAD").remote() for _ in range(6)]
ray.get([holder.ping.remote() for holder in holders])
print("HELD", flush=True)
sys.stdin.read()  # until the test is done probing
for holder in holders:
    ray.kill(holder)
ray.shutdown()
"""


def listening_ports(lab, address) -> set[int]:
    """The TCP ports the host listens on beyond its loopback (what another machine could reach)."""
    ports = set()
    for line in lab.ssh(address, "ss -ltnH").stdout.splitlines():
        local = line.split()[3]
        where, _, port = local.rpartition(":")
        if port.isdigit() and "127.0.0.1" not in where and "::1]" not in where:
            ports.add(int(port))
    return ports


def probe_without_token(lab, python, address, ports: set[int]) -> dict[int, str]:
    arguments = [f"grpc,{port},{GRPC_METHODS.get(port, WORKER_METHOD)}" if port not in HTTP_PATHS
                 else f"http,{port},{HTTP_PATHS[port]}" for port in sorted(ports)]
    result = lab.run_in_client("env", "-i", "PATH=/usr/bin:/bin", "HOME=/nonexistent", python, "-c", PROBE, address,
                               *arguments, timeout=300)
    return {int(port): answer for port, answer in (line.split() for line in result.stdout.splitlines())}


def hold_actors(lab, python, token, attempts: int = 3) -> subprocess.Popen:
    """A Ray Client with the token holding actors on every member (retried as ray_client_connects is)."""
    for _ in range(attempts):
        holder = subprocess.Popen([sys.executable, "-m", "flambe_iac.cli.lab", "exec", "--dir", str(lab.directory),
                                   "--", "env", "-i", "PATH=/usr/bin:/bin", "HOME=/nonexistent", "RAY_AUTH_MODE=token",
                                   f"RAY_AUTH_TOKEN={token}", python, "-c",
                                   HOLD_ACTORS.format(address=lab.addresses[0])],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = []
        for line in holder.stdout:
            output.append(line)
            if line.startswith("HELD"):
                return holder
        holder.wait(timeout=30)
        assert "Starting Ray client server failed" in "".join(output), "".join(output)[-2000:]
    raise AssertionError("the Ray Client never started")


def assert_every_ray_port_refuses_a_client_without_the_token(lab, python, token):
    """Worker processes listen too (10002-19999): actors held on every member first, so there are some to probe."""
    holder = hold_actors(lab, python, token)
    try:
        workers = 0
        for address in lab.addresses:
            ports = listening_ports(lab, address) - {22, 8265}
            workers += len({port for port in ports if 10002 <= port <= 19999})
            answers_without = probe_without_token(lab, python, address, ports)
            assert set(answers_without) == ports, (address, ports, answers_without)
            for port, answer in answers_without.items():
                expected = "200" if port in METRICS_PORTS else "401" if port in HTTP_PATHS else "UNAUTHENTICATED"
                assert answer == expected, (address, port, answer)
        assert workers, "no Ray worker listened anywhere"
    finally:  # the actors end and the client leaves before anything else restarts Ray
        holder.stdin.close()
        try:
            holder.wait(timeout=120)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait(timeout=30)


def wait_for_file(path: Path, seconds: float = 120) -> str:
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert path.exists(), f"{path} never appeared"
    return path.read_text()


def test_the_runnable_spreads_one_task_per_host_and_only_token_holders_get_in(fresh_lab, ray_python, tmp_path):
    lab = fresh_lab
    orchestrator = lab.addresses[0]
    result, report = ray_deploy(lab, tmp_path, "--run", python=ray_python, runnable=EXAMPLE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(ray_status(report).values()) == {"changed"}

    spread = json.loads(wait_for_file(lab.home("orchestrator") / "ray_spread.json"))
    assert spread == {"nodes": 3, "hostnames": ["factory-1", "factory-2", "orchestrator"]}

    tokens = {name: lab.home(name) / ".ray" / "auth_token" for name in lab.hostnames}
    assert {oct(path.stat().st_mode & 0o777) for path in tokens.values()} == {"0o600"}
    token = tokens["orchestrator"].read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token) and {path.read_text() for path in tokens.values()} == {token}
    everything_local = result.stdout + result.stderr + json.dumps(report)
    everything_local += "".join(path.read_text(errors="replace") for path in (tmp_path / "home").rglob("*")
                                if path.is_file())
    assert token not in everything_local and CANARY not in everything_local

    # The head's port answers from the client namespace: only the token keeps a client out.
    assert answers(lab, orchestrator, 6379)
    the_token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    refused = {
        "no token": client_ray_init(lab, ray_python, orchestrator, {}),
        "a wrong token": client_ray_init(lab, ray_python, orchestrator,
                                         {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}),
        # The Ray Client server (ray://, port 10001) runs arbitrary code for whoever it admits: the token guards it too.
        "Ray Client, no token": client_ray_init(lab, ray_python, orchestrator, {}, ray_client=True),
    }
    outputs = {name: client.communicate(timeout=180)[0] for name, client in refused.items()}
    for name in ("no token", "a wrong token"):
        assert REFUSED in outputs[name] and ADMITTED not in outputs[name], outputs[name][-2000:]
    assert "CLIENT CONNECTED" not in outputs["Ray Client, no token"], outputs["Ray Client, no token"][-2000:]
    ray_temp = lab.home("orchestrator") / ".flambe" / "ray" / "tmp"
    client_server_log = "".join(path.read_text() for path in ray_temp.glob("session_2*/logs/ray_client_server.err"))
    assert "Authentication required but no authorization header provided" in client_server_log
    # The same clients with the token get in (so the refusals above are the token's doing, not the network's).
    admitted = client_ray_init(lab, ray_python, orchestrator, the_token).communicate(timeout=180)[0]
    assert ADMITTED in admitted and REFUSED not in admitted, admitted[-2000:]
    assert ray_client_connects(lab, ray_python, orchestrator, the_token)

    # Ray's sessions, sockets and logs: in ~/.flambe/ray (0700), none in the hosts' shared /tmp.
    for name in lab.hostnames:
        assert oct((lab.home(name) / ".flambe" / "ray").stat().st_mode & 0o777) == "0o700"
        assert any((lab.home(name) / ".flambe" / "ray" / "tmp").glob("session_2*"))
        assert not (lab.directory / "hosts" / name / "tmp" / "ray").exists()

    # The dashboard answers on the orchestrator's 127.0.0.1 only, through the printed tunnel.
    assert not answers(lab, orchestrator, 8265)
    local_port, tunnel_line = re.search(r"reach it at http://localhost:(\d+) with:\n  (.*)", result.stdout).groups()
    tunnel = subprocess.Popen([sys.executable, "-m", "flambe_iac.cli.lab", "exec", "--dir", str(lab.directory), "--",
                               "bash", "-c", f"exec {tunnel_line.strip()}"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not answers(lab, "127.0.0.1", int(local_port)) and time.monotonic() < deadline:
            time.sleep(0.2)
        probe = lab.run_in_client("curl", "-s", "-m", "5", "-w", " %{http_code}",
                                  f"http://127.0.0.1:{local_port}/api/version")
        assert probe.stdout.endswith(" 401"), probe.stdout  # the dashboard itself, asking for the token
    finally:
        tunnel.terminate()
        tunnel.wait(timeout=10)

    # Same members again: Ray is left running, untouched.
    before = {name: ray_pids(lab, name) for name in lab.hostnames}
    again, report = ray_deploy(lab, tmp_path, python=ray_python)
    assert again.returncode == 0, again.stdout + again.stderr
    assert set(ray_status(report).values()) == {"unchanged"}
    assert {name: ray_pids(lab, name) for name in lab.hostnames} == before
    assert set(before["orchestrator"]) == {"gcs_server", "raylet"} and set(before["factory-1"]) == {"raylet"}

    # A cluster key rotation rotates the token and restarts Ray everywhere.
    rotated, report = ray_deploy(lab, tmp_path, "--rotate-cluster-key", "-vv", python=ray_python)
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert set(ray_status(report).values()) == {"changed"}
    new_tokens = {path.read_text() for path in tokens.values()}
    assert len(new_tokens) == 1 and token not in new_tokens
    assert new_tokens.pop() not in rotated.stdout + rotated.stderr + json.dumps(report)  # not even with pyinfra's -vv
    assert all(ray_pids(lab, name) and ray_pids(lab, name) != before[name] for name in lab.hostnames)


def test_every_port_ray_listens_on_refuses_a_client_without_the_token(fresh_lab, ray_python, tmp_path):
    """A cluster of its own: the Ray Client and its actors, held for the probe, never share a Ray with the
    restarts of the test above."""
    result, _ = ray_deploy(fresh_lab, tmp_path, python=ray_python)
    assert result.returncode == 0, result.stdout + result.stderr
    token = (fresh_lab.home("orchestrator") / ".ray" / "auth_token").read_text()
    assert_every_ray_port_refuses_a_client_without_the_token(fresh_lab, ray_python, token)


def test_scale_up_adds_a_worker_and_ray_stop_stays_on_its_host(fresh_lab, ray_python, tmp_path):
    lab = fresh_lab
    two = lab.outputs_with(tmp_path / "two.json", 2)
    first = lab.deploy(*lab.lab_arguments(two), "--ray", "--ray-python", ray_python,
                       env=home_environment(tmp_path / "home"), timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert ray_pids(lab, "factory-2") == {} and not (lab.home("factory-2") / ".ray").exists()

    before = {name: ray_pids(lab, name) for name in lab.hostnames}
    grown, report = ray_deploy(lab, tmp_path, python=ray_python)
    assert grown.returncode == 0, grown.stdout + grown.stderr
    assert ray_status(report) == dict(zip(lab.addresses, ["unchanged", "unchanged", "changed"]))
    assert {name: ray_pids(lab, name) for name in lab.hostnames[:2]} == {name: before[name]
                                                                       for name in lab.hostnames[:2]}
    count = lab.ssh(lab.addresses[0], f"RAY_AUTH_MODE=token {ray_python} -c \"import ray; ray.init(address='auto'); "
                                      "print('ALIVE', len([n for n in ray.nodes() if n['Alive']]))\" 2>/dev/null")
    assert "ALIVE 3" in count.stdout, count.stdout + count.stderr

    # Each host has its own PID namespace: `ray stop` on one host stops only that host's Ray.
    stopped = lab.ssh(lab.addresses[1], f"{ray_python} -m ray.scripts.scripts stop")
    assert stopped.returncode == 0, stopped.stderr
    assert ray_pids(lab, "factory-1") == {}
    assert ray_pids(lab, "orchestrator") == before["orchestrator"] and ray_pids(lab, "factory-2")
    status = lab.deploy("status", *lab.lab_arguments(), "--report", str(tmp_path / "status.json"),
                        env=home_environment(tmp_path / "home"))
    assert status.returncode == 1, status.stdout + status.stderr
    assert [host["ray"] for host in json.loads((tmp_path / "status.json").read_text())["hosts"]] == \
        ["head running", "worker STOPPED", "worker running"]
    healed, report = ray_deploy(lab, tmp_path, python=ray_python)
    assert healed.returncode == 0, healed.stdout + healed.stderr
    assert ray_status(report) == dict(zip(lab.addresses, ["unchanged", "changed", "unchanged"]))

    stop = lab.deploy(*lab.lab_arguments(), "--ray-stop", "--ray-python", ray_python,
                      env=home_environment(tmp_path / "home"), timeout=300)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    for name in lab.hostnames:
        assert ray_pids(lab, name) == {} and not (lab.home(name) / ".flambe" / "ray.json").exists()
        assert (lab.home(name) / ".ray" / "auth_token").exists()  # the token stays: the hosts are the state


def test_a_host_without_ray_or_with_another_version_fails_naming_both(make_lab, ray_python, tmp_path):
    lab = make_lab(2)
    python = f"/home/{lab.user}/ray-python"  # each host's own, in its home
    for name, wrapper in (("orchestrator", f'exec {ray_python} "$@"'),
                          ("factory-1", 'PYTHONPATH="$HOME/fake-ray" exec /usr/bin/python3 "$@"')):
        path = lab.home(name) / "ray-python"
        path.write_text(f"#!/bin/sh\n{wrapper}\n")
        path.chmod(0o755)
        os.chown(path, lab.state["uid"], lab.state["uid"])
    fake = lab.home("factory-1") / "fake-ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '2.59.0'\n")

    without, report = ray_deploy(lab, tmp_path, python="/usr/bin/python3")
    assert without.returncode == 1
    causes = [host["steps"]["ray"]["cause"] for host in report["hosts"]]
    assert "/usr/bin/python3 has no Ray" in causes[0] and "--ray-python" in causes[0]
    assert "Ray head did not start" in causes[1]
    assert all(ray_pids(lab, name) == {} for name in lab.hostnames)

    mismatched, report = ray_deploy(lab, tmp_path, "--run", python=python, runnable=EXAMPLE)
    assert mismatched.returncode == 1
    orchestrator, factory = report["hosts"]
    assert factory["steps"]["ray"]["status"] == "failed", json.dumps(report, indent=1)
    assert "Ray 2.59.0 here" in factory["steps"]["ray"]["cause"] and "2.60.0" in factory["steps"]["ray"]["cause"], \
        json.dumps(report, indent=1) + mismatched.stdout + mismatched.stderr
    assert orchestrator["steps"]["ray"]["status"] == "changed"
    assert orchestrator["steps"]["run"]["status"] == "failed"
    assert "not starting the runnable on part of the cluster" in orchestrator["steps"]["run"]["cause"]
    assert not (lab.home("orchestrator") / ".flambe" / "run.pid").exists()
