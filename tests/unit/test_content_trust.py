"""Content is untrusted (invariant 12): what an input file says can never run code here, reach a writer as a new
line or word, or put the user's key or credentials into a tree that travels to the hosts."""

import json
import shlex
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flambe_iac.day_two.download import destination_for
from flambe_iac.errors import InputError, exit_code_of
from flambe_iac.inputs.cluster_file import load_cluster_file
from flambe_iac.names import check_address
from flambe_iac.inputs.outputs import parse_outputs
from flambe_iac.inputs.plan import DeployRequest, build_plan
from flambe_iac.ssh import policy as policy_module
from flambe_iac.ssh.policy import (
    SshTarget,
    parse_jump,
    printed_config_block,
    require_safe_rsync,
    rsync_command,
    rsync_pull_command,
)

ZONED = ["fe80::1%x\nMatch exec \"touch PWNED\"", "fe80::1%eth0", "fe80::1%25", "::1%\t"]


@pytest.mark.parametrize("address", ZONED)
def test_an_ipv6_zone_id_is_never_an_address(address):
    with pytest.raises(InputError, match="zone id"):
        check_address(address, "an address")


@pytest.mark.parametrize("given, normal", [("10.0.0.1", "10.0.0.1"), ("FE80:0:0::1", "fe80::1"),
                                           ("2001:db8::0:1", "2001:db8::1")])
def test_addresses_are_normalised(given, normal):
    assert check_address(given, "an address") == normal


def outputs(**orchestrator) -> dict:
    return {"flambe_outputs_version": 1, "cluster_name": "c1", "ssh_user": "ubuntu", "region": "lab",
            "orchestrator": {"id": "o", "public_ip": "10.0.0.1", "private_ip": "10.0.0.1", "public_dns": None,
                             **orchestrator},
            "factories": []}


@pytest.mark.parametrize("address", ZONED)
def test_stack_outputs_and_cluster_files_refuse_a_zone_id(tmp_path, address):
    with pytest.raises(InputError, match="IP address|zone id"):
        parse_outputs(outputs(public_ip=address), "outputs.json")
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(json.dumps({"name": "c1", "username": "ubuntu", "orchestrator_ip": address,
                                   "factories_ips": []}))
    with pytest.raises(InputError, match="not an IP address"):
        load_cluster_file(cluster)


@pytest.mark.parametrize("jump", ["10.0.0.9\nHost *", "10.0.0.9 -oProxyCommand=x", "10.0.0.9;id", "fe80::1%eth0",
                                  "bad user@10.0.0.9", "10.0.0.9:22\n", "10.0.0.9:²²"])
def test_jump_refuses_anything_but_user_address_and_port(jump):
    with pytest.raises(InputError):
        parse_jump(jump)


@pytest.mark.parametrize("given, normal", [("ops@FE80:0::1", "ops@fe80::1"), ("[FE80::1]:2222", "[fe80::1]:2222"),
                                           ("ops@10.0.0.9:2222", "ops@10.0.0.9:2222"), ("10.0.0.9", "10.0.0.9")])
def test_jump_is_normalised(given, normal):
    assert parse_jump(given) == normal


@pytest.mark.parametrize("field", ["address", "user", "key", "known_hosts"])
def test_the_printed_ssh_config_refuses_a_field_that_would_add_a_word_or_a_line(tmp_path, field):
    values = {"address": "10.0.0.1", "user": "ubuntu", "key": tmp_path / "k", "known_hosts": tmp_path / "kh"}
    values[field] = f"{values[field]}\n    ProxyCommand touch PWNED" if field != "key" else tmp_path / "my key"
    with pytest.raises(InputError, match="whitespace or a control"):
        printed_config_block("c1-orchestrator", SshTarget(**values))


# -- nothing secret goes into a tree


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    return home


def cluster(tmp_path: Path, home: Path):
    """A cluster file, a key in ~/.ssh and pinned host keys: enough for a plan, with nothing reached."""
    key = home / ".ssh" / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    path = tmp_path / "cluster.yaml"
    path.write_text(json.dumps({"name": "c1", "username": "ubuntu", "orchestrator_ip": "10.0.0.1",
                                "factories_ips": [], "key": str(key)}))
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("10.0.0.1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHOSTKEY\n")
    return path, key, known_hosts


def plan_with(tmp_path, home, **request):
    path, key, known_hosts = cluster(tmp_path, home)
    return build_plan(DeployRequest(cluster_file=path, known_hosts=known_hosts, **request)), key


def test_a_resource_holding_a_copy_of_the_key_is_bad_input(tmp_path, home):
    data = tmp_path / "data"
    (data / "deep").mkdir(parents=True)
    path, key, known_hosts = cluster(tmp_path, home)
    (data / "deep" / "innocent.txt").write_bytes(key.read_bytes())
    with pytest.raises(InputError, match="is your SSH key"):
        build_plan(DeployRequest(cluster_file=path, known_hosts=known_hosts, resources=[f"data={data}"]))


@pytest.mark.parametrize("place", [".ssh", ".aws", ".flambe/known_hosts", ".config/gcloud", "."])
def test_a_resource_in_or_holding_a_credentials_directory_is_bad_input(tmp_path, home, place):
    (home / place).mkdir(parents=True, exist_ok=True)
    (home / ".aws").mkdir(exist_ok=True)
    with pytest.raises(InputError, match="where keys and credentials live"):
        plan_with(tmp_path, home, resources=[f"stuff={home / place}"])


def test_a_runnable_file_cannot_ship_the_key(tmp_path, home):
    path, key, known_hosts = cluster(tmp_path, home)
    runnable = tmp_path / "runnable.yaml"
    runnable.write_text(f"runnable: flambe_iac.runnable:Runnable\nresources: {{k: {key}}}\n")
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "flambe_iac.cli.deploy", str(runnable), "--cluster", str(path),
                             "--known-hosts", str(known_hosts), "--report", str(report)],
                            capture_output=True, text=True, env={**os.environ, "HOME": str(home)})
    assert result.returncode == 2, result.stderr
    assert "where keys and credentials live" in json.loads(report.read_text())["input_error"]


def test_a_local_extension_holding_the_key_is_bad_input(tmp_path, home):
    path, key, known_hosts = cluster(tmp_path, home)
    extension = tmp_path / "my_ext"
    extension.mkdir()
    (extension / "setup.py").write_text("")
    (extension / "stolen").write_bytes(key.read_bytes())
    with pytest.raises(InputError, match="extension my_ext: .* is your SSH key"):
        plan_with_extension(tmp_path, path, known_hosts, "my_ext", extension)


def plan_with_extension(tmp_path, path, known_hosts, name, location):
    runnable = tmp_path / "runnable.yaml"
    runnable.write_text(f"{name}: {location}\n---\nrunnable: flambe_iac.runnable:Runnable\n")
    return build_plan(DeployRequest(cluster_file=path, known_hosts=known_hosts, runnable_file=runnable))


def test_a_tree_holding_the_keys_directory_is_bad_input_but_a_tree_beside_the_key_goes(tmp_path, home):
    path, key, known_hosts = cluster(tmp_path, home)
    keys = tmp_path / "project" / "keys"
    keys.mkdir(parents=True)
    moved = keys / "cluster.pem"
    moved.write_bytes(key.read_bytes())
    (keys / "other.pem").write_text("another key")
    (tmp_path / "project" / "data").mkdir()
    request = dict(cluster_file=path, known_hosts=known_hosts, key=moved)
    with pytest.raises(InputError, match="holds .*keys, where keys and credentials live"):
        build_plan(DeployRequest(resources=[f"everything={tmp_path / 'project'}"], **request))
    plan = build_plan(DeployRequest(resources=[f"data={tmp_path / 'project' / 'data'}"], **request))
    assert [resource.name for resource in plan.resources] == ["data"]


def test_an_ordinary_resource_still_goes(tmp_path, home):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("hello")
    plan, _ = plan_with(tmp_path, home, resources=[f"data={data}"])
    assert [resource.name for resource in plan.resources] == ["data"]


# -- rsync and downloads


@pytest.mark.parametrize("text, allowed", [
    ("rsync  version 3.5.0  protocol version 32\n", True), ("rsync  version v3.4.0  protocol version 32", True),
    ("rsync  version 3.2.7  protocol version 31\n", False), ("rsync  version 3.3.99  protocol version 31", False),
    ("openrsync: protocol version 29", False), ("", False)])
def test_an_rsync_older_than_3_4_0_is_refused_with_the_version_and_the_fix(text, allowed):
    if allowed:
        require_safe_rsync(text)
        return
    with pytest.raises(InputError, match="install rsync 3.4.0 or newer"):
        require_safe_rsync(text)


MACOS_RSYNCS = {
    "openrsync": "openrsync: protocol version 29\nrsync version 2.6.9 compatible\n",
    "Apple's rsync 2.6.9": "rsync  version 2.6.9  protocol version 29\nCopyright (C) 1996-2006 by Andrew Tridgell\n",
}


@pytest.mark.parametrize("name", MACOS_RSYNCS)
def test_on_macos_its_own_rsync_is_refused_with_homebrews_fix_and_which_rsync_was_found(name, monkeypatch):
    monkeypatch.setattr(policy_module.shutil, "which", lambda command: f"/usr/bin/{command}")
    with pytest.raises(InputError) as refused:
        require_safe_rsync(MACOS_RSYNCS[name], platform="darwin")
    said = str(refused.value)
    assert "this machine's rsync (/usr/bin/rsync) is " in said and "brew install rsync" in said
    assert "/opt/homebrew/bin" in said and "before /usr/bin on PATH" in said
    assert ("openrsync" in said) == (name == "openrsync") and "2.6.9" in said


def test_elsewhere_the_refusal_names_no_homebrew_and_a_missing_rsync_is_said_so(monkeypatch):
    with pytest.raises(InputError) as refused:
        require_safe_rsync("rsync  version 3.2.7  protocol version 31\n", platform="linux")
    assert "brew" not in str(refused.value) and "first `rsync` on PATH" in str(refused.value)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(InputError, match="rsync is not installed here .*brew install rsync"):
        require_safe_rsync(platform="darwin")


def test_download_refuses_a_destination_that_is_a_symlink_or_a_file(tmp_path):
    (tmp_path / "c1-orchestrator").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "c1-factory-0").write_text("")
    for alias in ("c1-orchestrator", "c1-factory-0"):
        with pytest.raises(InputError, match="symlink or not a directory"):
            destination_for(tmp_path, alias)
    made = destination_for(tmp_path / "new", "c1-factory-1")
    assert made.is_dir() and (made.stat().st_mode & 0o777) == 0o700


def test_download_asks_rsync_for_plain_files_without_special_bits():
    argv = rsync_pull_command("out", "dir/", SshTarget("10.0.0.1", "ubuntu", Path("k"), Path("kh")))
    options = argv[:argv.index("--")]
    assert "--archive" not in options and not {"-a", "-l", "--links", "-D", "--devices", "--specials", "-o", "-g",
                                                "--owner", "--group"} & set(options)
    assert "--chmod=ug-s,a-t,go-w" in options and "--protect-args" in options


def test_ssh_config_write_with_a_hostile_cluster_file_writes_nothing(tmp_path, home):
    """The first probe that worked: a zone id carrying a newline and `Match exec` into the file ~/.ssh/config
    Includes. Now the cluster file is bad input: exit 2, and neither file exists or changes."""
    (home / ".ssh" / "config").write_text("Host work\n    User me\n")
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(json.dumps({"name": "c1", "username": "ubuntu", "orchestrator_ip": ZONED[0],
                                   "factories_ips": [], "key": str(tmp_path / "k")}))
    result = subprocess.run([sys.executable, "-m", "flambe_iac.cli.deploy", "ssh-config", "--cluster", str(cluster),
                             "--write"], capture_output=True, text=True, env={**os.environ, "HOME": str(home)})
    assert result.returncode == 2, result.stderr
    assert "not an IP address" in result.stderr and "Traceback" not in result.stderr
    assert (home / ".ssh" / "config").read_text() == "Host work\n    User me\n"
    assert not (home / ".flambe" / "ssh").exists()


def test_a_git_extension_whose_subdirectory_leads_out_of_the_repository_is_bad_input(tmp_path, home):
    """A repository with `ext -> ../../../../.ssh`, named with #subdirectory=ext: its checkout would send ~/.ssh."""
    path, key, known_hosts = cluster(tmp_path, home)
    repository = tmp_path / "repo"
    repository.mkdir()
    (repository / "ext").symlink_to("../../../../.ssh")
    for command in (["init", "-q"], ["add", "-A"], ["-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "x"]):
        subprocess.run(["git", "-C", str(repository), *command], check=True, capture_output=True)
    with pytest.raises(InputError, match="leads out of the repository|where keys and credentials live|SSH key"):
        plan_with_extension(tmp_path, path, known_hosts, "evil", f"file://{repository}#subdirectory=ext")


def test_a_copy_of_the_key_with_other_line_endings_is_still_the_key(tmp_path, home):
    path, key, known_hosts = cluster(tmp_path, home)
    data = tmp_path / "data"
    data.mkdir()
    (data / "k.txt").write_bytes(key.read_bytes().replace(b"\n", b"\r\n") + b"\n\n")
    with pytest.raises(InputError, match="is your SSH key"):
        build_plan(DeployRequest(cluster_file=path, known_hosts=known_hosts, resources=[f"data={data}"]))


@pytest.mark.parametrize("place", [".kube", ".docker", ".gnupg", ".netrc"])
def test_other_credentials_stay_here_too(tmp_path, home, place):
    target = home / place
    if place == ".netrc":
        target.write_text("machine x password y\n")
    else:
        target.mkdir()
    with pytest.raises(InputError, match="where keys and credentials live"):
        plan_with(tmp_path, home, resources=[f"stuff={target}"])


def test_error_messages_reach_the_terminal_escaped(capsys):
    def hostile():
        raise InputError("extension 'x': https://e.com/\x1b]0;PWNED\x07\x1b[2J is not a repository")

    assert exit_code_of("flambe-deploy", hostile) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "\\x1b]0;PWNED\\x07" in err


def test_rsync_reaches_an_ipv6_member_in_brackets():
    argv = rsync_command("src/", "resources/d/", SshTarget("fd00::1", "ubuntu", Path("k"), Path("kh")))
    assert argv[-1] == "ubuntu@[fd00::1]:resources/d/"


def test_the_bastions_own_ssh_checks_its_host_key_against_the_pins():
    """ssh takes the first value of an option: the ProxyCommand's ssh must say strict, pinned, only the key, first."""
    target = SshTarget("10.0.0.2", "ubuntu", Path("/k"), Path("/kh"), jump="ops@10.0.0.9:2222")
    option = printed_config_block("c1-orchestrator", target).split("ProxyCommand ", 1)[1].strip()
    argv = shlex.split(option)
    values = {}
    for flag, value in zip(argv, argv[1:]):
        if flag == "-o":
            name, _, setting = value.partition("=")
            values.setdefault(name, setting)
    assert values["StrictHostKeyChecking"] == "yes" and values["UserKnownHostsFile"] == "/kh"
    assert values["IdentitiesOnly"] == "yes" and values["IdentityAgent"] == "none"
    assert argv[-1] == "ops@10.0.0.9" and argv[argv.index("-p") + 1] == "2222"
