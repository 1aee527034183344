"""Day two on a lab described by a Flambé SSHCluster file: setup commands, ssh-config, exec, download, status, and a
bastion that is the client's only way in."""

import json
import os
import stat
import subprocess
import sys

import pytest
from lab_session import LabSession, home_environment, require_lab_support

pytestmark = pytest.mark.lab

SETUP = 'echo "setup ran on $(hostname)" > ~/setup.txt'


@pytest.fixture(scope="module")
def day_two(tmp_path_factory):
    """A deployed 3-host lab from a cluster file with setup_cmds (and a key Flambé has that means nothing here)."""
    require_lab_support()
    directory = tmp_path_factory.mktemp("day-two")
    lab = LabSession.up(directory / "lab", 3)
    try:
        cluster = directory / "cluster.yaml"
        cluster.write_text(json.dumps({
            "name": "dt", "orchestrator_ip": lab.addresses[0], "factories_ips": lab.addresses[1:],
            "key": str(lab.user_key), "username": lab.user, "setup_cmds": [SETUP], "remote_context": "ignored",
        }))
        source = ["--cluster", str(cluster), "--known-hosts", str(lab.known_hosts)]
        env = home_environment(directory / "home")
        result = lab.deploy(*source, "--report", str(directory / "report.json"), env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "ignoring 'remote_context'" in result.stderr
        yield lab, source, env, directory
    finally:
        lab.down()


def day_two_command(lab, *arguments, env):
    return lab.run_in_client(sys.executable, "-m", "flambe_iac.cli.deploy", *arguments, env=env,
                             stdin=subprocess.DEVNULL)


def test_setup_commands_ran_on_every_host_and_are_reported(day_two):
    lab, _, _, directory = day_two
    for name in lab.hostnames:
        assert (lab.home(name) / "setup.txt").read_text() == f"setup ran on {name}\n"
    report = json.loads((directory / "report.json").read_text())
    for host in report["hosts"]:
        assert host["steps"]["setup"]["status"] == "changed"
        assert "exited 0" in host["steps"]["setup"]["detail"]


def test_a_failing_setup_command_fails_that_host_with_its_exit_code(day_two, tmp_path):
    lab, source, env, _ = day_two
    result = lab.deploy(*source, "--setup", '[ "$(hostname)" != factory-1 ] || { echo broken >&2; exit 7; }',
                        "--report", str(tmp_path / "report.json"), env=env)
    assert result.returncode == 1
    hosts = {host["address"]: host for host in json.loads((tmp_path / "report.json").read_text())["hosts"]}
    failed = hosts[lab.addresses[1]]
    assert "exited 7: broken" in failed["steps"]["setup"]["cause"]
    assert failed["steps"]["manifest"]["status"] == "failed"
    assert hosts[lab.addresses[0]]["error"] is None and hosts[lab.addresses[2]]["error"] is None


def test_the_printed_ssh_config_reaches_each_host_under_strict_host_keys(day_two, tmp_path):
    lab, source, env, _ = day_two
    printed = day_two_command(lab, "ssh-config", *source, env=env)
    assert printed.returncode == 0, printed.stderr
    config = tmp_path / "ssh_config"
    config.write_text(printed.stdout)
    assert "StrictHostKeyChecking yes" in printed.stdout and "IdentitiesOnly yes" in printed.stdout
    for alias, hostname in (("dt-orchestrator", "orchestrator"), ("dt-factory-1", "factory-2")):
        hop = lab.run_in_client("ssh", "-F", str(config), "-o", "BatchMode=yes", alias, "hostname", env=env)
        assert hop.stdout.strip() == hostname, hop.stderr


def test_ssh_config_write_includes_it_once_and_keeps_the_users_lines(day_two, tmp_path):
    lab, source, _, _ = day_two
    home = tmp_path / "writer"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text("Host work\n    User me\n")
    env = home_environment(home)
    for _ in range(2):
        assert day_two_command(lab, "ssh-config", *source, "--write", env=env).returncode == 0
    text = (home / ".ssh" / "config").read_text()
    assert text.count("Include ") == 1 and text.startswith("Include ") and text.endswith("Host work\n    User me\n")
    assert len(list((home / ".ssh").glob("config.flambe-backup-*"))) == 1
    assert oct((home / ".ssh" / "config").stat().st_mode & 0o777) == "0o600"


def test_exec_runs_everywhere_with_prefixes_and_fails_if_one_host_fails(day_two, tmp_path):
    lab, source, env, _ = day_two
    result = day_two_command(lab, "exec", *source, "--", "hostname", env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == ["dt-factory-0: factory-1", "dt-factory-1: factory-2",
                                                  "dt-orchestrator: orchestrator"]
    report = tmp_path / "exec.json"
    failing = day_two_command(lab, "exec", *source, "--report", str(report), "--", "sh", "-c",
                              '[ "$(hostname)" != factory-2 ]', env=env)
    assert failing.returncode == 1
    assert json.loads(report.read_text())["exit_codes"] == {"dt-orchestrator": 0, "dt-factory-0": 0,
                                                            "dt-factory-1": 1}
    only = day_two_command(lab, "exec", *source, "--role", "orchestrator", "--", "hostname", env=env)
    assert only.stdout == "dt-orchestrator: orchestrator\n"


def test_download_brings_back_a_file_from_every_host(day_two, tmp_path):
    lab, source, env, _ = day_two
    result = day_two_command(lab, "download", *source, "--remote", "setup.txt", "--to", str(tmp_path / "back"),
                             env=env)
    assert result.returncode == 0, result.stderr
    files = sorted(tmp_path.joinpath("back").glob("*/setup.txt"))
    assert len(files) == 3
    assert {path.read_text() for path in files} == {f"setup ran on {name}\n" for name in lab.hostnames}


def test_download_brings_home_only_plain_files_and_directories_from_a_hostile_tree(day_two, tmp_path):
    """A compromised orchestrator offers a symlink to a secret of this machine, a FIFO, a setuid file and a
    world-writable directory: none of them arrives as such, and the destination is the user's alone."""
    lab, source, env, _ = day_two
    tree = lab.home("orchestrator") / "hostile"
    (tree / "wide").mkdir(parents=True)
    (tree / "plain.txt").write_text("data\n")
    (tree / "wide" / "inner.txt").write_text("inner\n")
    (tree / "secret").symlink_to("/etc/shadow")
    os.mkfifo(tree / "pipe")
    (tree / "setuid").write_text("#!/bin/sh\n")
    os.chmod(tree / "setuid", 0o6777)
    os.chmod(tree / "wide", 0o777)
    owner = (lab.home("orchestrator") / "setup.txt").stat()
    for path in (tree, tree / "wide", tree / "wide" / "inner.txt", tree / "plain.txt", tree / "setuid"):
        os.chown(path, owner.st_uid, owner.st_gid)
    back = tmp_path / "back"
    result = day_two_command(lab, "download", *source, "--role", "orchestrator", "--remote", "hostile",
                             "--to", str(back), env=env)
    assert result.returncode == 0, result.stderr
    assert "dt-orchestrator: skipped 2 symlink(s), device(s), FIFO(s) or socket(s)" in result.stderr
    home = back / "dt-orchestrator"
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    arrived = {str(path.relative_to(home)): path.lstat() for path in home.rglob("*")}
    assert sorted(arrived) == ["hostile", "hostile/plain.txt", "hostile/setuid", "hostile/wide",
                               "hostile/wide/inner.txt"]
    for name, info in arrived.items():
        assert stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode), name
        assert not info.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | 0o022), (name, oct(info.st_mode))
        assert info.st_uid == os.getuid(), name
    assert (home / "hostile" / "plain.txt").read_text() == "data\n"


def test_exec_shows_a_hosts_escape_sequences_as_text(day_two):
    lab, source, env, _ = day_two
    result = day_two_command(lab, "exec", *source, "--role", "orchestrator", "--", "printf",
                             "\\033[2J\\033[1Adt-factory-0: forged\\r\\n", env=env)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\r" not in result.stdout
    assert result.stdout == "dt-orchestrator: \\x1b[2J\\x1b[1Adt-factory-0: forged\n"


def test_status_names_every_host_and_says_when_one_is_not_healthy(day_two, tmp_path):
    lab, source, env, _ = day_two
    result = day_two_command(lab, "status", *source, "--report", str(tmp_path / "status.json"), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    for alias in ("dt-orchestrator", "dt-factory-0", "dt-factory-1"):
        assert alias in result.stdout
    document = json.loads((tmp_path / "status.json").read_text())
    assert document["ok"] is True and len({host["fingerprint"] for host in document["hosts"]}) == 1
    (lab.home("factory-1") / ".flambe" / "cluster.json").rename(lab.home("factory-1") / "manifest.moved")
    try:
        broken = day_two_command(lab, "status", *source, env=env)
    finally:
        (lab.home("factory-1") / "manifest.moved").rename(lab.home("factory-1") / ".flambe" / "cluster.json")
    assert broken.returncode == 1 and "no manifest" in broken.stdout


def test_status_reads_a_truncated_run_record_as_a_problem_not_a_crash(day_two, tmp_path):
    """A full disk leaves ~/.flambe/run.exit empty (and a hostile host can write anything there)."""
    lab, source, env, _ = day_two
    flambe = lab.home("orchestrator") / ".flambe"
    (flambe / "run.pid").write_text("999999\n")
    (flambe / "run.exit").write_text("")
    report = tmp_path / "status.json"
    try:
        result = day_two_command(lab, "status", *source, "--report", str(report), env=env)
    finally:
        (flambe / "run.pid").unlink()
        (flambe / "run.exit").unlink()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "unreadable run record" in result.stdout
    assert json.loads(report.read_text())["ok"] is False


def test_every_command_answers_version():
    for module in ("flambe_iac.cli.deploy", "flambe_iac.cli.lab", "flambe_iac.cli.run"):
        result = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True)
        assert result.returncode == 0 and result.stdout.startswith("flambe-iac "), (module, result.stderr)


@pytest.fixture
def bastion_lab(tmp_path):
    """4 hosts; the client can reach only host 3, the bastion."""
    require_lab_support()
    lab = LabSession.up(tmp_path / "lab", 4, "--bastion", "3")
    try:
        yield lab
    finally:
        lab.down()


def test_a_deploy_through_a_bastion_that_is_the_clients_only_way_in(bastion_lab, tmp_path, deploy_inputs):
    lab = bastion_lab
    direct = lab.ssh(lab.addresses[0], "true")
    assert direct.returncode != 0  # no route: the bastion really is the only way in
    outputs = lab.outputs_with(tmp_path / "three.json", 3)
    env = home_environment(tmp_path / "home")
    jump = f"{lab.user}@{lab.addresses[3]}"
    result = lab.deploy("--outputs", str(outputs), "--key", str(lab.user_key), "--known-hosts", str(lab.known_hosts),
                        "--jump", jump, "--secrets", str(deploy_inputs["secrets"]), "--resource",
                        f"data={deploy_inputs['resource']}", "--fan-out", "direct", "--wait", "0", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in lab.hostnames[:3]:
        assert (lab.home(name) / "secret.ini").read_bytes() == deploy_inputs["secrets"].read_bytes()
        assert (lab.home(name) / "resources" / "data" / "train.csv").exists()
    bastion_home = lab.home("factory-3")
    assert not (bastion_home / "secret.ini").exists()
    assert lab.user_key.read_bytes() not in b"".join(
        path.read_bytes() for path in bastion_home.rglob("*") if path.is_file())
    assert "Accepted publickey" in lab.sshd_log("factory-3")  # every connection went through it
    status = day_two_command(lab, "status", "--outputs", str(outputs), "--key", str(lab.user_key), "--known-hosts",
                             str(lab.known_hosts), "--jump", jump, env=env)
    assert status.returncode == 0, status.stdout + status.stderr


def test_a_bastion_whose_host_key_is_not_the_pinned_one_is_refused_and_nothing_goes_past_it(bastion_lab, tmp_path,
                                                                                             deploy_inputs):
    """The bastion's own ssh (the ProxyCommand's) checks its host key strictly: with the bastion's pin swapped for
    another host's key, the deploy is refused, and the hosts behind it see no connection at all."""
    lab = bastion_lab
    outputs = lab.outputs_with(tmp_path / "three.json", 3)
    lines = lab.known_hosts.read_text().splitlines()
    other_key = next(line.split(None, 1)[1] for line in lines if line.startswith(f"{lab.addresses[0]} "))
    swapped = tmp_path / "known_hosts"
    swapped.write_text("".join(f"{lab.addresses[3]} {other_key}\n" if line.startswith(f"{lab.addresses[3]} ")
                               else f"{line}\n" for line in lines))
    before = lab.snapshot_hosts()
    result = lab.deploy("--outputs", str(outputs), "--key", str(lab.user_key), "--known-hosts", str(swapped),
                        "--jump", f"{lab.user}@{lab.addresses[3]}", "--secrets", str(deploy_inputs["secrets"]),
                        "--wait", "0", env=home_environment(tmp_path / "home"))
    assert result.returncode == 1, result.stdout + result.stderr
    after = lab.snapshot_hosts()
    for name in lab.hostnames[:3]:
        assert "Accepted publickey" not in after[f"{name} sshd.log"]
        assert {path: content for path, content in after.items() if f"/{name}/" in path} == \
            {path: content for path, content in before.items() if f"/{name}/" in path}
