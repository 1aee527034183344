"""Local input checks: secrets, keys, resources, host keys, cluster files and stack outputs."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flambe_iac.engine.cluster_key import cluster_key_from_private, new_cluster_key
from flambe_iac.errors import InputError
from flambe_iac.inputs.cluster_file import load_cluster_file
from flambe_iac.inputs.plan import connect_addresses
from flambe_iac.inputs.pulumi_cli import load_stack
from flambe_iac.inputs.resources import checksums, parse_resources
from flambe_iac.inputs.secrets_file import HiddenBytes, read_secrets_file, secrets_parser
from flambe_iac.inputs.tree_listing import walk_tree
from flambe_iac.ssh.host_keys import choose_host_key_policy, keys_in, read_known_hosts
from flambe_iac.ssh.policy import SshTarget, rsync_command, ssh_options
from flambe_iac.ssh.user_key import PASSPHRASE_VARIABLE, is_encrypted, load_user_key, public_key_fingerprint

SECRET = "s3cr3t-value-%-with-percent"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# secrets


def test_secrets_are_returned_byte_identical(tmp_path):
    text = f"[DEFAULT]\nregion = x\n\n[db]\npassword = {SECRET}\n"
    assert read_secrets_file(write(tmp_path / "s.ini", text)) == text.encode()


def test_secrets_parser_keeps_percent_signs_and_inherits_default():
    parser = secrets_parser()
    parser.read_string(f"[DEFAULT]\nregion = x\n[db]\npassword = {SECRET}\n")
    assert parser["db"]["password"] == SECRET
    assert parser["db"]["region"] == "x"


@pytest.mark.parametrize("text, expected", [
    (f"password = {SECRET}\n", "line 1"),
    (f"[db]\npassword = {SECRET}\njust some words {SECRET}\n", "line 3"),
    (f"[db]\na = 1\n[db]\nb = {SECRET}\n", "line 3: section [db] appears twice"),
    (f"[db]\na = {SECRET}\na = 2\n", "line 3: key 'a' in [db] appears twice"),
])
def test_secrets_errors_name_the_line_and_never_show_it(tmp_path, text, expected):
    with pytest.raises(InputError) as caught:
        read_secrets_file(write(tmp_path / "s.ini", text))
    assert expected in str(caught.value)
    assert SECRET not in str(caught.value)


def test_missing_secrets_file_is_an_error(tmp_path):
    with pytest.raises(InputError, match="cannot read secrets file"):
        read_secrets_file(tmp_path / "absent.ini")


def test_hidden_bytes_never_show_in_a_repr():
    assert SECRET not in repr(HiddenBytes(SECRET.encode()))


# keys


def keygen(path: Path, passphrase: str = "", *options: str) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-f", str(path), *options], check=True)
    return path


def test_plain_and_encrypted_keys_are_told_apart(tmp_path):
    assert not is_encrypted(keygen(tmp_path / "plain").read_bytes())
    assert is_encrypted(keygen(tmp_path / "locked", "passphrase").read_bytes())
    assert is_encrypted(b"-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n")


def test_locked_key_without_a_passphrase_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(PASSPHRASE_VARIABLE, raising=False)
    with pytest.raises(InputError, match=PASSPHRASE_VARIABLE):
        load_user_key(keygen(tmp_path / "locked", "passphrase"))


def test_locked_key_with_its_passphrase_loads_and_hides_it(tmp_path, monkeypatch):
    monkeypatch.setenv(PASSPHRASE_VARIABLE, "passphrase")
    key = load_user_key(keygen(tmp_path / "locked", "passphrase"))
    assert key.passphrase == "passphrase"
    assert "passphrase=set" in repr(key) and "'passphrase'" not in repr(key)
    monkeypatch.setenv(PASSPHRASE_VARIABLE, "wrong")
    with pytest.raises(InputError, match="does not unlock"):
        load_user_key(tmp_path / "locked")


@pytest.mark.parametrize("name, content, expected", [
    ("absent", None, "cannot read SSH key"),
    ("key.pub", "ssh-ed25519 AAAA me", "that is a public key"),
    ("garbage", "hello", "not an SSH private key"),
])
def test_bad_keys_are_refused(tmp_path, name, content, expected):
    if content is not None:
        write(tmp_path / name, content)
    with pytest.raises(InputError, match=expected):
        load_user_key(tmp_path / name)


def test_cluster_key_is_a_valid_openssh_key_with_our_comment(tmp_path):
    key = new_cluster_key("flambe-cluster:c1")
    private = tmp_path / "k"
    private.write_bytes(key.private_openssh)
    private.chmod(0o600)
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(private)], capture_output=True, text=True, check=True)
    assert derived.stdout.split()[:2] == key.public_line.split()[:2]
    assert key.public_line.endswith(" flambe-cluster:c1")
    listed = subprocess.run(["ssh-keygen", "-l", "-f", str(private)], capture_output=True, text=True, check=True)
    assert key.fingerprint == listed.stdout.split()[1]
    assert cluster_key_from_private(key.private_openssh, "flambe-cluster:c1") == key
    assert "PRIVATE" not in repr(key)


def test_fingerprint_matches_ssh_keygen(tmp_path):
    public = keygen(tmp_path / "k").with_suffix(".pub")
    listed = subprocess.run(["ssh-keygen", "-l", "-f", str(public)], capture_output=True, text=True, check=True)
    assert public_key_fingerprint(public.read_text()) == listed.stdout.split()[1]


# resources


def test_resources_parse_and_check(tmp_path):
    (tmp_path / "data").mkdir()
    (resource,) = parse_resources([f"data={tmp_path / 'data'}"])
    assert resource.name == "data"
    assert resource.rsync_source.endswith("/data/")


@pytest.mark.parametrize("pairs, expected", [
    (["data"], "NAME=PATH"),
    (["=x"], "NAME=PATH"),
    (["a/b={dir}"], "not allowed"),
    (["..={dir}"], "not allowed"),
    (["a..b={dir}"], "not allowed"),
    (["data={dir}", "data={dir}"], "given twice"),
    (["data={dir}/absent"], "no such file"),
])
def test_bad_resources_are_refused(tmp_path, pairs, expected):
    with pytest.raises(InputError, match=expected):
        parse_resources([pair.format(dir=tmp_path) for pair in pairs])


def test_local_tree_and_checksums(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    write(tmp_path / "d" / "a.txt", "a")
    write(tmp_path / "d" / "sub" / "b.txt", "bb")
    os.symlink("a.txt", tmp_path / "d" / "link")
    (resource,) = parse_resources([f"d={tmp_path / 'd'}"])
    tree = walk_tree(resource.path).entries
    assert ("d", "sub") in tree and ("l", "link", "a.txt") in tree
    assert {entry[1] for entry in tree if entry[0] == "f"} == {"a.txt", "sub/b.txt"}
    assert checksums(resource) == {
        "a.txt": "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb",
        "sub/b.txt": "3b64db95cb55c763391c707108489ae18b4112d783300de38e033b4c98c3deaf",
    }


def test_a_single_file_resource(tmp_path):
    write(tmp_path / "model.bin", "m")
    (resource,) = parse_resources([f"model={tmp_path / 'model.bin'}"])
    assert resource.rsync_source == str(tmp_path / "model.bin")
    assert set(checksums(resource)) == {"model.bin"}


# host keys


def test_known_hosts_lookup_understands_hashed_and_bracketed_entries(tmp_path):
    public = keygen(tmp_path / "k").with_suffix(".pub").read_text().split()[:2]
    plain = write(tmp_path / "plain", f"10.0.0.1,[10.0.0.2]:22 {' '.join(public)}\n# comment\n")
    hashed = tmp_path / "hashed"
    subprocess.run(["cp", str(plain), str(hashed)], check=True)
    subprocess.run(["ssh-keygen", "-H", "-f", str(hashed)], check=True, capture_output=True)
    for path in (plain, hashed):
        entries = read_known_hosts(path)
        assert keys_in(entries, "10.0.0.1") == [" ".join(public)]
        assert keys_in(entries, "10.0.0.2") == [" ".join(public)]
        assert keys_in(entries, "10.0.0.3") == []


def test_without_pinned_keys_the_error_names_both_ways_out(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(InputError) as caught:
        choose_host_key_policy("c1", ["10.0.0.1"], None, False)
    assert "--known-hosts" in str(caught.value) and "--trust-on-first-use" in str(caught.value)


def test_known_hosts_missing_a_member_is_refused(tmp_path):
    known = write(tmp_path / "known", "10.0.0.1 ssh-ed25519 AAAA\n")
    with pytest.raises(InputError, match="no host key for 10.0.0.2"):
        choose_host_key_policy("c1", ["10.0.0.1", "10.0.0.2"], known, False)


def test_trust_on_first_use_writes_a_private_per_cluster_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    policy = choose_host_key_policy("c1", ["10.0.0.1"], None, True)
    assert policy.known_hosts == tmp_path / ".flambe" / "known_hosts" / "c1"
    assert policy.strict_host_key_checking == "accept-new"
    assert stat.S_IMODE(policy.known_hosts.stat().st_mode) == 0o600
    assert stat.S_IMODE(policy.known_hosts.parent.stat().st_mode) == 0o700
    assert not (tmp_path / ".ssh").exists()


# ssh options


def test_every_ssh_we_start_uses_only_the_given_key_and_pinned_host_keys(tmp_path):
    target = SshTarget("10.0.0.1", "ubuntu", tmp_path / "my key", tmp_path / "known hosts")
    options = ssh_options(target)
    for option in ("IdentitiesOnly=yes", "IdentityAgent=none", "ForwardAgent=no", "StrictHostKeyChecking=yes",
                   f"UserKnownHostsFile={tmp_path / 'known hosts'}", "BatchMode=yes"):
        assert option in options
    assert options[:4] == ["-F", "/dev/null", "-i", str(tmp_path / "my key")]
    argv = rsync_command("/data/", "resources/data/", target)
    remote_shell = argv[argv.index("--rsh") + 1]
    assert "'" + str(tmp_path / "my key") + "'" in remote_shell  # quoted for rsync's own word splitting
    assert "IdentitiesOnly=yes" in remote_shell and "ConnectTimeout=10" in remote_shell
    assert argv[-2:] == ["/data/", "ubuntu@10.0.0.1:resources/data/"]
    assert "--delete" in argv and "--protect-args" in argv


# cluster sources


def test_cluster_file_in_flambe_shape_with_its_tag(tmp_path):
    path = write(tmp_path / "cluster.yaml", "!SSHCluster\nname: mine\norchestrator_ip: [54.0.0.1, 10.0.0.1]\n"
                                            "factories_ips: [[54.0.0.2, 10.0.0.2], 10.0.0.3]\nkey: ~/.ssh/k\n"
                                            "username: ubuntu\n")
    source = load_cluster_file(path)
    cluster, key = source.cluster, source.key
    assert cluster.name == "mine" and cluster.ssh_user == "ubuntu"
    assert cluster.orchestrator.public_ip == "54.0.0.1" and cluster.orchestrator.private_ip == "10.0.0.1"
    assert [(host.public_ip, host.private_ip) for host in cluster.factories] == [
        ("54.0.0.2", "10.0.0.2"), ("10.0.0.3", "10.0.0.3")]
    assert key == Path("~/.ssh/k").expanduser()


@pytest.mark.parametrize("text, expected", [
    ("name: [unclosed\n", "not valid YAML"),
    ("- a list\n", "expected a mapping"),
    ("name: x\nusername: u\n", "'orchestrator_ip' is missing"),
    ("name: x\nusername: u\norchestrator_ip: 1.2.3.4\nfactories_ips: 5\n", "must be a list"),
    ("name: x\nusername: u\norchestrator_ip: [1.2.3.4, 10.0.0.1, 10.0.0.2]\n", "[public, private] pair"),
    ("name: x\nusername: u\norchestrator_ip: 1.2.3.4\nsetup_cmds: ls\n", "'setup_cmds' must be a list"),
    ("name: x\nusername: u\norchestrator_ip: 1.2.3.4\nkey: !!python/object:os.system {}\n", "not valid YAML"),
])
def test_bad_cluster_files_are_refused(tmp_path, text, expected):
    with pytest.raises(InputError, match=expected.replace("[", r"\[")):
        load_cluster_file(write(tmp_path / "c.yaml", text))


def test_keys_flambe_has_and_flambe_iac_does_not_are_a_warning_not_a_refusal(tmp_path, capsys):
    source = load_cluster_file(write(tmp_path / "c.yaml", "name: x\nusername: u\norchestrator_ip: 1.2.3.4\n"
                                                       "remote_context: y\nsetup_cmds: ['echo hi']\n"))
    assert source.setup_commands == ("echo hi",)
    warned = capsys.readouterr().err
    assert "warning" in warned and "ignoring 'remote_context'" in warned


def test_addresses_must_exist_and_be_distinct(tmp_path):
    cluster = load_cluster_file(write(tmp_path / "c.yaml", "name: x\nusername: u\norchestrator_ip: 10.0.0.1\n"
                                                              "factories_ips: [10.0.0.1]\n")).cluster
    with pytest.raises(InputError, match="share a public address"):
        connect_addresses(cluster, "public")


@pytest.fixture
def stub_pulumi(tmp_path, monkeypatch):
    """A `pulumi` on PATH that records its arguments and prints what the test puts in its reply file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "pulumi"
    stub.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/arguments\ncat {tmp_path}/reply\n'
                    f'exit $(cat {tmp_path}/status 2>/dev/null || echo 0)\n')
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return tmp_path


def test_stack_outputs_come_from_the_pulumi_cli(stub_pulumi):
    from test_outputs import VALID

    (stub_pulumi / "reply").write_text(json.dumps(VALID))
    cluster = load_stack("dev", stub_pulumi / "infra")
    assert cluster.name == "my-cluster"
    # No secret output, so no --show-secrets: secrets are asked for only when some output is one.
    assert (stub_pulumi / "arguments").read_text().split() == [
        "stack", "output", "--json", "--stack", "dev", "--cwd", str(stub_pulumi / "infra")]


def test_stack_failure_and_masked_values_are_input_errors(stub_pulumi):
    from test_outputs import VALID

    (stub_pulumi / "reply").write_text(json.dumps({**VALID, "ssh_user": "[secret]"}))
    with pytest.raises(InputError, match="--show-secrets"):
        load_stack("dev")
    assert "--show-secrets" in (stub_pulumi / "arguments").read_text().split()  # asked again, with secrets
    (stub_pulumi / "status").write_text("255")
    (stub_pulumi / "reply").write_text("")
    with pytest.raises(InputError, match="failed"):
        load_stack("dev")


def test_missing_pulumi_cli_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(InputError, match="needs the pulumi CLI"):
        load_stack("dev")


@pytest.mark.parametrize("signum, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_a_signal_while_inputs_are_read_still_ends_with_its_code_and_a_report(tmp_path, signum, code, name):
    """A CI job cancelled while `pulumi stack output` runs: no traceback, 143 (or 130), and a report saying so."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pulumi").write_text(f"#!/bin/sh\ntouch {tmp_path}/asked\nexec sleep 60\n")
    (bin_dir / "pulumi").chmod(0o755)
    report = tmp_path / "report.json"
    deploy = subprocess.Popen([sys.executable, "-m", "flambe_iac.cli.deploy", "--stack", "dev", "--key",
                               str(tmp_path / "key"), "--report", str(report)],
                              env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "asked").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    deploy.send_signal(signum)
    _, stderr = deploy.communicate(timeout=30)
    assert deploy.returncode == code, stderr
    assert "Traceback" not in stderr and f"interrupted ({name}) before anything was sent" in stderr
    assert json.loads(report.read_text()) == {"ok": False, "interrupted": name, "hosts": []}
