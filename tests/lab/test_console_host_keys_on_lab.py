"""End to end: host keys read from (moto's) EC2 console output pin the lab hosts; a forged key is refused."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lab_session import LabSession, home_environment, require_lab_support

pytestmark = pytest.mark.lab
ADDRESSES = ["10.0.1.10", "10.0.1.11", "10.0.1.12"]


def cloud_init_console(public_key: str) -> str:
    key = " ".join(public_key.split()[:2])
    return ("[   12.000000] cloud-init[800]: Generating public/private ed25519 key pair.\n"
            "<14>Nov 26 12:00:01 ec2: #############################################################\n"
            "<14>Nov 26 12:00:01 ec2: -----BEGIN SSH HOST KEY KEYS-----\n"
            f"<14>Nov 26 12:00:01 ec2: {key} root@ip-10-0-1-10\n"
            "<14>Nov 26 12:00:01 ec2: -----END SSH HOST KEY KEYS-----\n")


@pytest.fixture
def ec2_lab(tmp_path):
    """Lab hosts at the instances' private addresses, and moto's EC2 serving their console output."""
    require_lab_support()
    lab = LabSession.up(tmp_path / "lab", len(ADDRESSES), "--subnet", "10.0.0.0/16",
                        "--addresses", ",".join(ADDRESSES))
    console = tmp_path / "console"
    console.mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outputs = tmp_path / "outputs.json"
    server = subprocess.Popen(
        ["ip", "netns", "exec", f"flambe-{lab.state['lab_id']}-client", sys.executable,
         str(Path(__file__).parents[1] / "moto_cloud.py"), str(port), ",".join(ADDRESSES), str(console),
         str(outputs)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        environment = home_environment(tmp_path / "home", AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
                                       AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                                       AWS_DEFAULT_REGION="us-east-1")
        yield lab, console, outputs, environment
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=10)
        lab.down()


def host_public_key(lab, hostname):
    return (lab.directory / "hosts" / hostname / "etc" / "ssh_host_ed25519_key.pub").read_text()


def test_console_keys_pin_the_hosts_and_the_deploy_connects_strictly(ec2_lab, tmp_path):
    lab, console, outputs, environment = ec2_lab
    for address, hostname in zip(ADDRESSES, lab.hostnames):
        (console / f"{address}.txt").write_text(cloud_init_console(host_public_key(lab, hostname)))
    result = lab.deploy("--outputs", str(outputs), "--address", "private", "--key", str(lab.user_key),
                        "--host-key-timeout", "20", env=environment)
    assert result.returncode == 0, result.stdout + result.stderr
    pinned = Path(environment["HOME"]) / ".flambe" / "known_hosts" / "console-keys"
    pinned_lines = sorted(line.split()[0] + " " + line.split()[2] for line in pinned.read_text().splitlines())
    assert pinned_lines == sorted(f"{address} {host_public_key(lab, name).split()[1]}"
                                  for address, name in zip(ADDRESSES, lab.hostnames))
    for hostname in lab.hostnames:
        assert (lab.home(hostname) / "ray_bootstrap_key.pem").exists()


def test_a_forged_console_key_makes_the_deploy_refuse_that_host(ec2_lab, tmp_path):
    lab, console, outputs, environment = ec2_lab
    impostor = tmp_path / "impostor"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor)], check=True)
    for address, hostname in zip(ADDRESSES, lab.hostnames):
        key = Path(f"{impostor}.pub").read_text() if hostname == "factory-1" else host_public_key(lab, hostname)
        (console / f"{address}.txt").write_text(cloud_init_console(key))
    result = lab.deploy("--outputs", str(outputs), "--address", "private", "--key", str(lab.user_key),
                        "--host-key-timeout", "20", "--report", str(tmp_path / "report.json"), env=environment)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    refused = next(host for host in report["hosts"] if host["address"] == ADDRESSES[1])
    assert "REFUSED" in refused["error"] and "does not match" in refused["error"]
    assert not (lab.home("factory-1") / "ray_bootstrap_key.pem").exists()
    assert (lab.home("orchestrator") / "ray_bootstrap_key.pem").exists()


def test_no_keys_in_the_console_before_the_deadline_is_bad_input(ec2_lab):
    lab, console, outputs, environment = ec2_lab
    before = {name: lab.sshd_log(name) for name in lab.hostnames}
    result = lab.deploy("--outputs", str(outputs), "--address", "private", "--key", str(lab.user_key),
                        "--host-key-timeout", "1", env=environment)
    assert result.returncode == 2
    assert "no host keys in the EC2 console output" in result.stderr
    assert "--known-hosts" in result.stderr and "--trust-on-first-use" in result.stderr
    assert {name: lab.sshd_log(name) for name in lab.hostnames} == before


def test_a_new_instance_at_a_reused_address_is_pinned_afresh_from_its_console(ec2_lab, tmp_path):
    """`pulumi destroy` and `up`: factory-1's address now belongs to a new instance with a new host key."""
    lab, console, outputs, environment = ec2_lab
    for address, hostname in zip(ADDRESSES, lab.hostnames):
        (console / f"{address}.txt").write_text(cloud_init_console(host_public_key(lab, hostname)))
    arguments = ["--outputs", str(outputs), "--address", "private", "--key", str(lab.user_key),
                 "--host-key-timeout", "20"]
    assert lab.deploy(*arguments, env=environment).returncode == 0

    document = json.loads(outputs.read_text())
    old_id = document["factories"][0]["id"]
    replace = (  # run where moto's server is: inside the lab's client namespace
        "import boto3\n"
        "ec2 = boto3.client('ec2')\n"
        f"old = ec2.describe_instances(InstanceIds=['{old_id}'])['Reservations'][0]['Instances'][0]\n"
        "new = ec2.run_instances(ImageId=old['ImageId'], MinCount=1, MaxCount=1,\n"
        "                        SubnetId=old['SubnetId'])['Instances'][0]\n"
        "print(new['InstanceId'], new['PrivateIpAddress'])\n")
    created = lab.run_in_client(sys.executable, "-c", replace, env=environment)
    new_id, moto_address = created.stdout.split()
    assert new_id.startswith("i-") and new_id != old_id, created.stderr
    document["factories"][0]["id"] = new_id  # the new instance, at the old instance's address
    outputs.write_text(json.dumps(document))
    rebuild_host_key(lab, "factory-1")
    # moto_cloud.py serves an instance's console by the address moto gave it
    (console / f"{moto_address}.txt").write_text(cloud_init_console(host_public_key(lab, "factory-1")))

    result = lab.deploy(*arguments, env=environment)
    assert result.returncode == 0, result.stdout + result.stderr
    pinned = (Path(environment["HOME"]) / ".flambe" / "known_hosts" / "console-keys").read_text()
    assert old_id not in pinned and new_id in pinned
    assert host_public_key(lab, "factory-1").split()[1] in pinned


def rebuild_host_key(lab, hostname):
    """A new host key for the host, and its sshd reloaded (SIGHUP re-executes sshd with the new key)."""
    key = lab.directory / "hosts" / hostname / "etc" / "ssh_host_ed25519_key"
    key.unlink()
    key.with_suffix(".pub").unlink()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    os.kill(lab.sshd_pid(hostname), signal.SIGHUP)
    time.sleep(0.5)


def test_a_changed_host_key_without_instance_ids_names_the_command_that_forgets_the_pin(fresh_lab, tmp_path):
    lab = fresh_lab
    rebuild_host_key(lab, "factory-1")
    result = lab.deploy(*lab.lab_arguments(), "--report", str(tmp_path / "report.json"))
    assert result.returncode == 1
    refused = json.loads((tmp_path / "report.json").read_text())["hosts"][1]["error"]
    assert f"ssh-keygen -R {lab.addresses[1]} -f {lab.known_hosts}" in refused

