"""One connection per host (ssh/master.py): every session rides the master, and a session whose master is gone fails
instead of dialling a connection of its own, under any policy."""

import socket
import subprocess
import threading
from pathlib import Path

from flambe_iac.ssh.policy import SshPolicy, session_command


def listener() -> tuple[socket.socket, list]:
    """A TCP port on this machine that notes every connection made to it."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5)
    dialled = []

    def accept():
        try:
            connection, _ = server.accept()
            dialled.append(connection)
        except OSError:
            return

    threading.Thread(target=accept, daemon=True).start()
    return server, dialled


def policy(tmp_path: Path) -> SshPolicy:
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    return SshPolicy("ubuntu", key, None, known_hosts, 5)


def test_a_session_never_dials_when_its_master_is_gone(tmp_path):
    server, dialled = listener()
    port = server.getsockname()[1]
    target = policy(tmp_path).target("127.0.0.1")
    argv = session_command(target, tmp_path / "gone", "true")
    argv[1:1] = ["-o", f"Port={port}", "-o", "ConnectTimeout=3"]  # where a fallback connection would go
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    server.close()
    assert result.returncode == 255
    assert dialled == [], "the session dialled a connection of its own instead of failing"


def test_rsync_rides_the_hosts_master_once_there_is_one(tmp_path):
    rules = policy(tmp_path)
    before = rules.rsync_job("data/", "resources/data/", "10.0.0.5").argv
    master = rules.master("10.0.0.5")
    after = rules.rsync_job("data/", "resources/data/", "10.0.0.5").argv
    shell = lambda argv: argv[argv.index("--rsh") + 1]  # noqa: E731
    assert "ControlPath" not in shell(before)
    assert f"ControlPath={master.socket}" in shell(after) and "ProxyCommand=false" in shell(after)
    assert rules.master("10.0.0.5") is master and rules.master("10.0.0.6") is not master
    assert master.socket.parent.stat().st_mode & 0o077 == 0
    rules.close()
    assert not master.socket.parent.exists()


def test_the_askpass_helper_answers_only_the_question_for_the_keys_passphrase(tmp_path):
    """A host that refuses the key and asks for a password is never told the key's passphrase."""
    rules = policy(tmp_path)
    rules.passphrase = "canary-passphrase-never-sent"
    environment = rules.environment()
    helper = environment["SSH_ASKPASS"]
    asked = {prompt: subprocess.run([helper, prompt], capture_output=True, text=True, env=environment)
             for prompt in ("Enter passphrase for key '/home/me/.ssh/id': ", "ubuntu@10.0.0.5's password: ",
                            "(ubuntu@10.0.0.5) Password: ", "Verification code: ")}
    answers = {prompt: (result.returncode, result.stdout) for prompt, result in asked.items()}
    assert answers.pop("Enter passphrase for key '/home/me/.ssh/id': ") == (0, "canary-passphrase-never-sent\n")
    assert all(code != 0 and out == "" for code, out in answers.values()), answers
    rules.close()


def test_every_ssh_offers_the_key_and_nothing_else(tmp_path):
    options = " ".join(policy(tmp_path).master("10.0.0.5").open_command)
    for option in ("PreferredAuthentications=publickey", "PasswordAuthentication=no",
                   "KbdInteractiveAuthentication=no"):
        assert option in options
