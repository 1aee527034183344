"""Host keys from EC2 console output: cloud-init's block in the formats it appears in, and the polling."""

import subprocess

import pytest

from flambe_iac.aws.console import fetch_console_host_keys
from flambe_iac.ssh.console_pins import parse_console_host_keys


@pytest.fixture(scope="module")
def host_keys(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keys")
    keys = {}
    for kind in ("ed25519", "ecdsa", "rsa"):
        path = directory / kind
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)
        public = (directory / f"{kind}.pub").read_text().split()
        listed = subprocess.run(["ssh-keygen", "-l", "-f", str(path)], capture_output=True, text=True, check=True)
        keys[kind] = (f"{public[0]} {public[1]}", listed.stdout.split()[1])
    return keys


def ubuntu_console(keys, prefix="", line_end="\n"):
    """Ubuntu's cloud-init output: fingerprints, then keys, each line with PREFIX."""
    lines = ["[    0.000000] Linux version 6.8.0-1012-aws", "Cloud-init v. 24.1 running 'modules:final'",
             "#############################################################",
             "-----BEGIN SSH HOST KEY FINGERPRINTS-----"]
    lines += [f"256 {keys[kind][1]} root@ip-10-0-1-5 ({kind.upper()})" for kind in ("ecdsa", "ed25519")]
    lines += [f"3072 {keys['rsa'][1]} root@ip-10-0-1-5 (RSA)", "-----END SSH HOST KEY FINGERPRINTS-----",
              "#############################################################",
              "-----BEGIN SSH HOST KEY KEYS-----"]
    lines += [f"{keys[kind][0]} root@ip-10-0-1-5" for kind in ("ecdsa", "ed25519", "rsa")]
    lines += ["-----END SSH HOST KEY KEYS-----", "Cloud-init v. 24.1 finished"]
    return line_end.join(prefix + line for line in lines) + line_end


def expected(keys):
    return [keys[kind][0] for kind in ("ecdsa", "ed25519", "rsa")]


@pytest.mark.parametrize("prefix, line_end", [
    ("", "\n"),
    ("<14>Nov 26 12:00:01 cloud-init: ", "\n"),
    ("[   23.456789] cloud-init[1234]: ", "\r\n"),
    ("ec2: ", "\n"),
])
def test_cloud_init_blocks_in_several_formats(host_keys, prefix, line_end):
    assert parse_console_host_keys(ubuntu_console(host_keys, prefix, line_end)) == expected(host_keys)


def test_the_last_boot_wins(host_keys):
    old = ubuntu_console(host_keys).replace(host_keys["ed25519"][0], "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOld")
    old = old.split("-----BEGIN SSH HOST KEY FINGERPRINTS-----")[0] + old.split("-----END SSH HOST KEY FINGERPRINTS-----")[1]
    assert parse_console_host_keys(old + ubuntu_console(host_keys)) == expected(host_keys)


def test_keys_that_do_not_match_the_printed_fingerprints_are_not_trusted(host_keys):
    tampered = ubuntu_console(host_keys).replace(host_keys["ed25519"][0],
                                                 "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBDeadBeefDeadBeefDeadBeefDead")
    assert parse_console_host_keys(tampered) == []


def test_without_a_block_there_are_no_keys(host_keys):
    assert parse_console_host_keys("Linux version 6.8\nlogin: ") == []
    unfinished = ubuntu_console(host_keys).split("-----END SSH HOST KEY KEYS-----")[0]
    assert parse_console_host_keys(unfinished) == []


class FakeEc2:
    """Console output that shows the keys only from the second poll on, for one instance; never for another."""

    def __init__(self, text):
        self.text, self.polls = text, {}

    def get_console_output(self, InstanceId, Latest=False):
        self.polls[InstanceId] = self.polls.get(InstanceId, 0) + 1
        ready = InstanceId == "i-1" and self.polls[InstanceId] >= 2
        return {"Output": self.text if ready else "booting..."}


def test_polling_waits_for_keys_and_gives_up_at_the_deadline(host_keys):
    ec2 = FakeEc2(ubuntu_console(host_keys))
    found = fetch_console_host_keys(ec2, ["i-1", "i-2"], timeout=0.5, poll_seconds=0.05)
    assert found == {"i-1": expected(host_keys)}
    assert ec2.polls["i-1"] >= 2 and ec2.polls["i-2"] >= 2
