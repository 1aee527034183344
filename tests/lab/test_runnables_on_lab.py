"""Runnables on real hosts: extensions fetched with the user's own git (over SSH through their ~/.ssh/config, and
over HTTP), pushed without .git, installed with -i, and the runnable started on the orchestrator with --run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CANARY
from lab_session import home_environment
from runnable_fixtures import bare_clone, make_repository, runnable_yaml

pytestmark = pytest.mark.lab


@pytest.fixture
def repository(tmp_path):
    commits = make_repository(tmp_path / "repo")
    return commits, tmp_path / "repo"


@pytest.fixture
def ssh_served(fresh_lab, repository, tmp_path):
    """The repository, bare, in factory-2's home; reachable as `extension-host:repos/ext.git` only through an
    ~/.ssh/config entry that names the lab user key (bind-mounted over /root/.ssh for our commands alone)."""
    commits, path = repository
    home = fresh_lab.home("factory-2")
    bare_clone(path, home / "repos" / "ext.git")
    uid = fresh_lab.state["uid"]
    for directory, _, files in os.walk(home / "repos"):
        os.chown(directory, uid, uid)
        for name in files:
            os.chown(Path(directory, name), uid, uid)
    user_home = tmp_path / "user-home"
    ssh_dir = user_home / ".ssh"
    ssh_dir.mkdir(mode=0o700, parents=True)
    (ssh_dir / "config").write_text(
        f"Host extension-host\n    HostName {fresh_lab.addresses[2]}\n    User {fresh_lab.user}\n"
        f"    IdentityFile {fresh_lab.user_key}\n    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {fresh_lab.known_hosts}\n    StrictHostKeyChecking yes\n")
    (ssh_dir / "config").chmod(0o600)
    return commits, user_home


def deploy_as_user(lab, home: Path, *arguments):
    """flambe-deploy in the client namespace as a user whose home is HOME. ssh finds ~/.ssh through the passwd
    entry, not $HOME, so a private mount namespace gets a passwd whose root entry points there."""
    passwd = home.parent / f"{home.name}.passwd"
    passwd.write_text("".join(
        ":".join([*line.split(":")[:5], str(home), *line.split(":")[6:]]) if line.startswith("root:") else line
        for line in Path("/etc/passwd").read_text().splitlines(keepends=True)))
    script = 'mount --bind "$0" /etc/passwd && exec "$@"'
    command = ["unshare", "--mount", "sh", "-c", script, str(passwd), sys.executable, "-m",
               "flambe_iac.cli.deploy", *arguments]
    return lab.run_in_client(*command, timeout=180, env=home_environment(home), stdin=subprocess.DEVNULL)


def wait_for_result(lab, timeout: float = 30) -> Path:
    """The runnable's result file on the orchestrator; on a time-out, the run log says why."""
    path = lab.home("orchestrator") / "resources" / "out" / "result.json"
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = lab.home("orchestrator") / ".flambe" / "run.log"
    assert path.exists(), f"no result within {timeout} s; run.log: {log.read_text() if log.exists() else '(none)'}"
    return path


def out_directory(tmp_path: Path) -> Path:
    """The runnable's `out` resource: a directory of its own (never one that holds the lab)."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return out


def lab_args(lab, tmp_path, secrets=None):
    arguments = [*lab.lab_arguments(), "--report", str(tmp_path / "report.json")]
    return arguments + (["--secrets", str(secrets)] if secrets else [])


def test_run_an_extension_from_git_over_ssh_with_the_users_own_ssh_config(fresh_lab, ssh_served, tmp_path,
                                                                         deploy_inputs):
    commits, user_home = ssh_served
    runnable = runnable_yaml(tmp_path / "runnable.yaml", "extension-host:repos/ext.git@v1", out_directory(tmp_path),
                             message="hi")
    result = deploy_as_user(fresh_lab, user_home, str(runnable),
                            *lab_args(fresh_lab, tmp_path, deploy_inputs["secrets"]), "--run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tail -f .flambe/run.log" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["extensions"]["reportext"]["commit"] == commits["v1"]
    result_file = wait_for_result(fresh_lab)
    written = json.loads(result_file.read_text())
    assert written["message"] == "hi" and written["marker"] == "v1"
    assert written["config"]["aws"]["secret"] == CANARY
    assert written["config"]["aws"]["region"] == "us-east-1"  # inherited from [DEFAULT]
    for name in fresh_lab.hostnames:
        extension = fresh_lab.home(name) / "extensions" / "reportext"
        assert (extension / "reportext" / "runnables.py").exists()
        assert not (extension / ".git").exists()
        assert fresh_lab.manifest(name)["extensions"]["reportext"]["commit"] == commits["v1"]
    log = (fresh_lab.home("orchestrator") / ".flambe" / "run.log").read_text()
    assert "running reportext.runnables:WriteReport" in log
    for text in (result.stdout, result.stderr, (tmp_path / "report.json").read_text(), log):
        assert CANARY not in text


def test_without_the_users_ssh_config_the_ssh_remote_is_unreachable(fresh_lab, ssh_served, tmp_path):
    """The same deploy from a home with an empty ~/.ssh: the entry in the user's own config was what worked."""
    empty_home = tmp_path / "empty-home"
    (empty_home / ".ssh").mkdir(mode=0o700, parents=True)
    runnable = runnable_yaml(tmp_path / "runnable.yaml", "extension-host:repos/ext.git", out_directory(tmp_path))
    before = {name: fresh_lab.sshd_log(name) for name in ("orchestrator", "factory-1")}
    result = deploy_as_user(fresh_lab, empty_home, str(runnable), *lab_args(fresh_lab, tmp_path))
    assert result.returncode == 2
    assert "git could not fetch extension-host:repos/ext.git" in result.stderr
    assert {name: fresh_lab.sshd_log(name) for name in before} == before


@pytest.fixture
def http_served(fresh_lab, repository, tmp_path):
    """The repository over dumb HTTP from a server on the client namespace's loopback."""
    commits, path = repository
    served = tmp_path / "served"
    bare_clone(path, served / "ext.git")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(["ip", "netns", "exec", f"flambe-{fresh_lab.state['lab_id']}-client", sys.executable,
                               "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(served), str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while fresh_lab.run_in_client("git", "ls-remote", f"http://127.0.0.1:{port}/ext.git").returncode != 0:
        assert time.monotonic() < deadline, "the HTTP server did not start"
        time.sleep(0.1)
    yield commits, f"http://127.0.0.1:{port}/ext.git"
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=10)


def test_an_extension_over_http_pinned_to_a_ref_and_a_subdirectory(fresh_lab, http_served, tmp_path):
    commits, url = http_served
    runnable = runnable_yaml(tmp_path / "runnable.yaml", f"{url}@main#subdirectory=sub", out_directory(tmp_path))
    result = fresh_lab.deploy(str(runnable), *lab_args(fresh_lab, tmp_path),
                              env=home_environment(tmp_path / "home"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "report.json").read_text())["extensions"]["reportext"]["commit"] == commits["v2"]
    for name in fresh_lab.hostnames:
        source = fresh_lab.home(name) / "extensions" / "reportext" / "reportext" / "runnables.py"
        assert "MARKER = 'v2-sub'" in source.read_text()


def test_a_second_run_is_refused_while_one_runs_unless_forced(fresh_lab, repository, tmp_path):
    _, path = repository
    runnable = runnable_yaml(tmp_path / "runnable.yaml", f"file://{path}", out_directory(tmp_path), sleep=120)
    env = home_environment(tmp_path / "home")
    first = fresh_lab.deploy(str(runnable), *lab_args(fresh_lab, tmp_path), "--run", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    pid_file = fresh_lab.home("orchestrator") / ".flambe" / "run.pid"
    first_pid_on_host = int(pid_file.read_text())
    first_pid = fresh_lab.machine_pid("orchestrator", first_pid_on_host)
    assert first_pid is not None
    wait_for_result(fresh_lab)
    again = fresh_lab.deploy(str(runnable), *lab_args(fresh_lab, tmp_path), "--run", env=env)
    assert again.returncode == 1
    assert "already running" in again.stdout and "--force" in again.stdout
    assert int(pid_file.read_text()) == first_pid_on_host
    assert Path(f"/proc/{first_pid}").exists()
    forced = fresh_lab.deploy(str(runnable), *lab_args(fresh_lab, tmp_path), "--run", "--force", env=env)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    second_pid = fresh_lab.machine_pid("orchestrator", int(pid_file.read_text()))
    assert second_pid is not None and second_pid != first_pid
    deadline = time.monotonic() + 10
    while Path(f"/proc/{first_pid}/status").exists() and "State:\tZ" not in Path(
            f"/proc/{first_pid}/status").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{first_pid}").exists() or "State:\tZ" in Path(f"/proc/{first_pid}/status").read_text()
    command_line = Path(f"/proc/{second_pid}/cmdline").read_bytes()
    assert b"flambe_iac.runnable" in command_line and CANARY.encode() not in command_line


def test_install_extensions_on_every_host_and_report_one_failure(fresh_lab, repository, tmp_path):
    _, path = repository
    for name in fresh_lab.hostnames:
        # The lab has no internet: builds use the hosts' own setuptools (pip's no-build-isolation).
        pip_config = fresh_lab.home(name) / ".config" / "pip" / "pip.conf"
        pip_config.parent.mkdir(parents=True)
        pip_config.write_text("[install]\nno-build-isolation = false\n")
        for directory in (pip_config.parent.parent, pip_config.parent, pip_config):
            os.chown(directory, fresh_lab.state["uid"], fresh_lab.state["uid"])
    (fresh_lab.home("factory-2") / ".local").write_text("not a directory: pip --user must fail here")
    runnable = runnable_yaml(tmp_path / "runnable.yaml", f"file://{path}", out_directory(tmp_path))
    env = home_environment(tmp_path / "home", PIP_NO_BUILD_ISOLATION="0")
    try:
        result = fresh_lab.deploy(str(runnable), *lab_args(fresh_lab, tmp_path), "-i", env=env)
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "--quiet", "--yes", "reportext"],
                       capture_output=True)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    statuses = {host["address"]: host["steps"]["install"]["status"] for host in report["hosts"]}
    assert statuses == {fresh_lab.addresses[0]: "changed", fresh_lab.addresses[1]: "changed",
                        fresh_lab.addresses[2]: "failed"}
    for address in fresh_lab.addresses[:2]:
        check = fresh_lab.ssh(address, "cd /tmp && python3 -c 'import reportext; print(reportext.__file__)'")
        assert check.stdout.strip().startswith(f"/home/{fresh_lab.user}/.local/lib/"), check.stderr


@pytest.mark.parametrize("case", ["unknown class", "bad url", "unreachable remote", "missing ref"])
def test_bad_runnable_input_exits_2_and_sends_nothing(lab, repository, tmp_path, case):
    _, path = repository
    location, runnable_spec = {
        "unknown class": (f"file://{path}", "reportext.runnables:NoSuchRunnable"),
        "bad url": ("ftp://example.invalid/ext.git", "reportext.runnables:WriteReport"),
        "unreachable remote": ("http://127.0.0.1:9/ext.git", "reportext.runnables:WriteReport"),
        "missing ref": (f"file://{path}@no-such-ref", "reportext.runnables:WriteReport"),
    }[case]
    runnable = runnable_yaml(tmp_path / "runnable.yaml", location, out_directory(tmp_path), runnable=runnable_spec)
    before = {name: lab.sshd_log(name) for name in lab.hostnames}
    result = lab.deploy(str(runnable), *lab.lab_arguments(), "--run",
                        env=home_environment(tmp_path / "home"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("flambe-deploy: ") and result.stderr.count("\n") == 1
    assert {name: lab.sshd_log(name) for name in lab.hostnames} == before
