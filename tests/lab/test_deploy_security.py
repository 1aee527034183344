"""Each security invariant of flambe-deploy, attacked on real hosts."""

import base64
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import CANARY
from cryptography.hazmat.primitives import serialization
from lab_session import LabSession, home_environment, require_lab_support

pytestmark = pytest.mark.lab


def home_env(deploy_inputs):
    return home_environment(deploy_inputs["home"])


def new_key(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def every_file_under(directory: Path):
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            yield path


class PoisonedAgent:
    """An ssh-agent in the client namespace, holding a key every host accepts."""

    def __init__(self, lab, key: Path, socket: Path):
        self.socket = socket
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", lab.state and f"flambe-{lab.state['lab_id']}-client",
             "ssh-agent", "-D", "-a", str(socket)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not socket.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        subprocess.run(["ssh-add", str(key)], env={**os.environ, "SSH_AUTH_SOCK": str(socket)},
                       check=True, capture_output=True)

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=10)


def test_a_poisoned_agent_is_never_used(fresh_lab, deploy_inputs, tmp_path):
    """The agent holds the authorized user key; --key is a stranger. Only --key may be tried: it must fail."""
    agent = PoisonedAgent(fresh_lab, fresh_lab.user_key, tmp_path / "agent.sock")
    try:
        env = {**home_env(deploy_inputs), "SSH_AUTH_SOCK": str(agent.socket)}
        check = fresh_lab.run_in_client("ssh-add", "-l", env=env)
        assert "flambe-lab user key" in check.stdout  # the agent really offers the good key
        stranger = new_key(tmp_path / "stranger")
        result = fresh_lab.deploy("--outputs", str(fresh_lab.directory / "outputs.json"), "--key", str(stranger),
                                  "--known-hosts", str(fresh_lab.known_hosts),
                                  "--resource", f"data={deploy_inputs['resource']}", env=env)
    finally:
        agent.stop()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "refused the key" in result.stdout
    for name in fresh_lab.hostnames:
        assert not (fresh_lab.home(name) / "ray_bootstrap_key.pem").exists()
        assert not (fresh_lab.home(name) / "resources").exists()


def test_the_agent_is_not_forwarded(fresh_lab, deploy_inputs, tmp_path):
    """With an agent running locally, no remote session of the deploy sees SSH_AUTH_SOCK."""
    agent = PoisonedAgent(fresh_lab, fresh_lab.user_key, tmp_path / "agent.sock")
    probe = tmp_path / "probe"
    probe.mkdir()
    try:
        env = {**home_env(deploy_inputs), "SSH_AUTH_SOCK": str(agent.socket)}
        # An rc file runs in every session sshd opens for the user, pyinfra's and rsync's alike.
        for name in fresh_lab.hostnames:
            rc = fresh_lab.home(name) / ".ssh" / "rc"
            rc.write_text('echo "agent=${SSH_AUTH_SOCK:-none}" >> ~/.ssh/sessions\n')
        result = fresh_lab.deploy(*fresh_lab.lab_arguments(), "--resource", f"data={deploy_inputs['resource']}",
                                  env=env)
    finally:
        agent.stop()
    assert result.returncode == 0, result.stderr
    for name in fresh_lab.hostnames:
        sessions = (fresh_lab.home(name) / ".ssh" / "sessions").read_text().splitlines()
        assert len(sessions) >= 2  # pyinfra's connection and rsync's
        assert set(sessions) == {"agent=none"}


def test_no_byte_of_the_user_private_key_reaches_a_host(fresh_lab, deploy_inputs):
    result = fresh_lab.deploy(*fresh_lab.lab_arguments(), "--secrets", str(deploy_inputs["secrets"]),
                              "--resource", f"data={deploy_inputs['resource']}", env=home_env(deploy_inputs))
    assert result.returncode == 0, result.stderr
    private = fresh_lab.user_key.read_bytes()
    body = b"".join(line for line in private.splitlines() if not line.startswith(b"-----"))
    seed = serialization.load_ssh_private_key(private, password=None).private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    secret_forms = [private, body, base64.b64decode(body), seed, base64.b64encode(seed), seed.hex().encode()]
    scanned = 0
    for name in fresh_lab.hostnames:
        for path in every_file_under(fresh_lab.directory / "hosts" / name):
            data = path.read_bytes()
            scanned += 1
            assert not any(form in data for form in secret_forms), path
    assert scanned > 10


def test_a_host_whose_key_changed_is_refused_and_receives_nothing(fresh_lab, deploy_inputs, tmp_path):
    lines = fresh_lab.known_hosts.read_text().splitlines()
    impostor = new_key(tmp_path / "impostor")
    swapped_address = fresh_lab.addresses[1]
    lines[1] = f"{swapped_address} {' '.join(Path(str(impostor) + '.pub').read_text().split()[:2])}"
    swapped = tmp_path / "known_hosts"
    swapped.write_text("\n".join(lines) + "\n")
    report_path = tmp_path / "report.json"
    result = fresh_lab.deploy("--outputs", str(fresh_lab.directory / "outputs.json"), "--key", str(fresh_lab.user_key),
                              "--known-hosts", str(swapped), "--secrets", str(deploy_inputs["secrets"]),
                              "--resource", f"data={deploy_inputs['resource']}", "--report", str(report_path),
                              env=home_env(deploy_inputs))
    assert result.returncode == 1
    report = json.loads(report_path.read_text())
    refused = next(host for host in report["hosts"] if host["address"] == swapped_address)
    assert "REFUSED" in refused["error"] and "does not match" in refused["error"]
    assert f"{swapped_address}" in result.stdout and "REFUSED" in result.stdout
    victim = fresh_lab.home("factory-1")
    assert sorted(path.name for path in victim.iterdir()) == [".ssh"]
    for name in ("orchestrator", "factory-2"):
        assert (fresh_lab.home(name) / "secret.ini").exists()


def test_without_pinned_keys_the_deploy_stops_before_connecting(fresh_lab, deploy_inputs):
    logs_before = {name: fresh_lab.sshd_log(name) for name in fresh_lab.hostnames}
    result = fresh_lab.deploy("--outputs", str(fresh_lab.directory / "outputs.json"), "--key",
                              str(fresh_lab.user_key), env=home_env(deploy_inputs))
    assert result.returncode == 2
    assert "--known-hosts" in result.stderr and "--trust-on-first-use" in result.stderr
    assert {name: fresh_lab.sshd_log(name) for name in fresh_lab.hostnames} == logs_before


def test_trust_on_first_use_pins_into_a_per_cluster_file_only(fresh_lab, deploy_inputs):
    env = home_env(deploy_inputs)
    home = Path(env["HOME"])
    arguments = ["--outputs", str(fresh_lab.directory / "outputs.json"), "--key", str(fresh_lab.user_key)]
    result = fresh_lab.deploy(*arguments, "--trust-on-first-use", env=env)
    assert result.returncode == 0, result.stderr
    cluster_name = fresh_lab.outputs["cluster_name"]
    pinned = home / ".flambe" / "known_hosts" / cluster_name
    pinned_keys = {tuple(line.split()[:3]) for line in pinned.read_text().splitlines()}
    assert pinned_keys == {tuple(line.split()[:3]) for line in fresh_lab.known_hosts.read_text().splitlines()}
    assert not (home / ".ssh" / "known_hosts").exists()
    again = fresh_lab.deploy(*arguments, env=env)  # now strict, against the pinned file
    assert again.returncode == 0, again.stderr
    # A pinned key that no longer matches is refused even without --known-hosts.
    pinned.write_text(pinned.read_text().replace(pinned.read_text().split()[2], "AAAAC3NzaC1lZDI1NTE5AAAAIBDeadBeef"
                                                 "DeadBeefDeadBeefDeadBeefDeadBeefDeadBeefDeadB", 1))
    refused = fresh_lab.deploy(*arguments, env=env)
    assert refused.returncode == 1
    assert "REFUSED" in refused.stdout


@pytest.fixture
def recording_lab(tmp_path):
    """A 3-host lab whose hosts note every command their SSH sessions run."""
    require_lab_support()
    session = LabSession.up(tmp_path / "recording-lab", 3, "--record-commands")
    try:
        yield session
    finally:
        session.down()


@pytest.mark.parametrize("verbosity", [[], ["-v"], ["-vv"]])
def test_the_canary_secret_never_appears_in_output_report_or_process_lists(recording_lab, deploy_inputs, tmp_path,
                                                                          verbosity):
    fresh_lab = recording_lab
    seen_in_process_lists = []
    stop = threading.Event()

    def watch_every_process_on_the_machine():
        # The lab hosts share this machine's process table, so this sees remote command lines too.
        while not stop.is_set():
            for proc in Path("/proc").iterdir():
                try:
                    command = (proc / "cmdline").read_bytes()
                except OSError:
                    continue
                if CANARY.encode() in command:
                    seen_in_process_lists.append(command)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch_every_process_on_the_machine)
    watcher.start()
    report_path = tmp_path / "report.json"
    try:
        result = fresh_lab.deploy(*fresh_lab.lab_arguments(), "--secrets", str(deploy_inputs["secrets"]),
                                  "--resource", f"data={deploy_inputs['resource']}", "--report", str(report_path),
                                  *verbosity, env=home_env(deploy_inputs))
    finally:
        stop.set()
        watcher.join()
    assert result.returncode == 0, result.stderr
    if verbosity:
        assert len(result.stderr) > 200  # the verbose log really was written
    for text in (result.stdout, result.stderr, report_path.read_text()):
        assert CANARY not in text
        assert "AKIAEXAMPLE" not in text
    assert seen_in_process_lists == []
    for name in fresh_lab.hostnames:
        commands = fresh_lab.recorded_commands(name)
        assert len(commands) >= 3  # the record is real: state read, uploads, the lock or rsync
        assert not any(CANARY.encode() in command or b"AKIAEXAMPLE" in command for command in commands)
        assert CANARY not in fresh_lab.sshd_log(name)
        assert (fresh_lab.home(name) / "secret.ini").read_text().count(CANARY) == 1


def test_rsyncs_ssh_checks_host_keys_and_uses_only_the_given_key(fresh_lab, deploy_inputs, tmp_path):
    """rsync's own ssh, exactly as flambe-deploy builds it, against a real sshd: a swapped host key and a stranger
    key with a poisoned agent are both refused; the right key and pins get through."""
    from flambe_iac.ssh.policy import SshTarget, rsync_command

    address = fresh_lab.addresses[0]
    swapped = tmp_path / "swapped_known_hosts"
    other_key = (fresh_lab.directory / "hosts" / "factory-1" / "etc" / "ssh_host_ed25519_key.pub").read_text()
    swapped.write_text(f"{address} {' '.join(other_key.split()[:2])}\n")
    stranger = new_key(tmp_path / "stranger")
    source = f"{deploy_inputs['resource']}/"

    def rsync(key, known_hosts, env=None):
        target = SshTarget(address, fresh_lab.user, key, known_hosts)
        return fresh_lab.run_in_client(*rsync_command(source, "resources/probe/", target), env=env)

    refused = rsync(fresh_lab.user_key, swapped)
    assert refused.returncode != 0 and "Host key verification failed" in refused.stderr
    agent = PoisonedAgent(fresh_lab, fresh_lab.user_key, tmp_path / "agent.sock")
    try:
        with_agent = rsync(stranger, fresh_lab.known_hosts, env={**os.environ, "SSH_AUTH_SOCK": str(agent.socket)})
    finally:
        agent.stop()
    assert with_agent.returncode != 0 and "Permission denied" in with_agent.stderr
    assert not (fresh_lab.home("orchestrator") / "resources" / "probe").exists()
    accepted = rsync(fresh_lab.user_key, fresh_lab.known_hosts)
    assert accepted.returncode == 0, accepted.stderr
    assert (fresh_lab.home("orchestrator") / "resources" / "probe" / "train.csv").exists()


def test_default_keys_in_home_ssh_are_never_offered(fresh_lab, deploy_inputs, tmp_path):
    """A decoy that every host accepts sits at ~/.ssh/id_ed25519; --key is a stranger. Only --key may be tried:
    the deploy must fail, and no host's sshd may have accepted the decoy."""
    home = deploy_inputs["home"]
    (home / ".ssh").mkdir(parents=True)
    decoy = home / ".ssh" / "id_ed25519"
    decoy.write_bytes(fresh_lab.user_key.read_bytes())
    decoy.chmod(0o600)
    stranger = new_key(tmp_path / "stranger")
    result = fresh_lab.deploy("--outputs", str(fresh_lab.directory / "outputs.json"), "--key", str(stranger),
                              "--known-hosts", str(fresh_lab.known_hosts), "--wait", "0", env=home_env(deploy_inputs))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "refused the key" in result.stdout
    for name in fresh_lab.hostnames:
        assert "Accepted publickey" not in fresh_lab.sshd_log(name)
        assert not (fresh_lab.home(name) / "ray_bootstrap_key.pem").exists()


IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE, IN_ISDIR = 0x2, 0x4, 0x8, 0x80, 0x100, 0x40000000


class DirectoryWatch:
    """inotify on a few directories, from this machine (the hosts' homes are its files): every event, by name."""

    def __init__(self, directories, on_directory_created=None):
        import ctypes

        self.libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        self.watches = {}
        for directory in directories:
            handle = self.libc.inotify_add_watch(self.fd, str(directory).encode(),
                                                 IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE)
            assert handle >= 0, directory
            self.watches[handle] = directory
        self.events = []  # (directory, name, mask)
        self.on_directory_created = on_directory_created
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.read_events)
        self.thread.start()

    def read_events(self):
        import select
        import struct

        while not self.stop.is_set():
            if not select.select([self.fd], [], [], 0.05)[0]:
                continue
            data = os.read(self.fd, 65536)
            offset = 0
            while offset < len(data):
                handle, mask, _, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16:offset + 16 + length].rstrip(b"\0").decode()
                offset += 16 + length
                directory = self.watches.get(handle)
                if mask & IN_CREATE and mask & IN_ISDIR and self.on_directory_created:
                    self.on_directory_created(directory / name)
                self.events.append((directory, name, mask))

    def close(self):
        self.stop.set()
        self.thread.join()
        os.close(self.fd)


def test_final_paths_only_ever_appear_whole_by_a_rename_and_staging_is_0700_from_birth(fresh_lab, deploy_inputs,
                                                                                       tmp_path):
    arguments = [*fresh_lab.lab_arguments(), "--secrets", str(deploy_inputs["secrets"])]
    assert fresh_lab.deploy(*arguments).returncode == 0  # the directories exist now; the next run rewrites files
    deploy_inputs["secrets"].write_bytes(deploy_inputs["secrets"].read_bytes() + b"\n[more]\nkey = value\n")
    staging_modes = []

    def note_mode(directory):
        try:
            staging_modes.append(directory.stat().st_mode & 0o777)
        except FileNotFoundError:
            pass  # already done and removed: other runs of the watch see the next one

    homes = [fresh_lab.home(name) for name in fresh_lab.hostnames]
    watched = [directory for home in homes for directory in (home, home / ".ssh", home / ".flambe")]
    watch = DirectoryWatch(watched + [home / ".flambe" / "staging" for home in homes], note_mode)
    try:
        result = fresh_lab.deploy(*arguments, "--rotate-cluster-key")
    finally:
        watch.close()
    assert result.returncode == 0, result.stdout + result.stderr
    final_names = {"secret.ini", "ray_bootstrap_key.pem", "ray_bootstrap_key.pub", "authorized_keys", "config",
                   "cluster.json", "retired_cluster_keys"}
    landed = {(directory, name) for directory, name, mask in watch.events if name in final_names and mask & IN_MOVED_TO}
    assert len(landed) == len(homes) * (len(final_names) - 1)  # all but the ssh config (the key's not in it) replaced
    written_in_place = [(str(directory), name, hex(mask)) for directory, name, mask in watch.events
                        if name in final_names and mask & (IN_CREATE | IN_MODIFY | IN_CLOSE_WRITE | IN_ATTRIB)]
    assert written_in_place == []
    assert staging_modes and set(staging_modes) == {0o700}
