"""--resource NAME=s3://BUCKET/PREFIX on real hosts: the lab's S3 stand-in (moto's server, in a namespace of its own),
each host's metadata stand-in handing out its instance role, and faults on the hosts' side of S3.

Everything is checked on the hosts: the bytes of every file, what a failed host holds, the commands the hosts ran."""

import json
import sys

import pytest
from lab_session import home_environment

pytestmark = pytest.mark.lab

USER_KEY_ID = "AKIAUSERCANARY1234567"
USER_SECRET = "user-secret-canary-Vb8#never-on-a-host"
OBJECTS = {"a.txt": b"alpha\n", "sub dir/\u00fc \u00f1\nline.txt": b"x" * 100_000, "-leading dash": b"dash",
           "deep/er/big.bin": bytes(range(256)) * 8192}
SEED = """
import json, sys, boto3
objects = json.loads(sys.stdin.read())
s3 = boto3.client("s3")
s3.create_bucket(Bucket="lab-data")
for key, text in objects.items():
    s3.put_object(Bucket="lab-data", Key="data/" + key, Body=text.encode("latin-1"), ChecksumAlgorithm="SHA256")
"""


def held(lab, hostname: str) -> dict[str, bytes]:
    root = lab.home(hostname) / "resources" / "data"
    return {str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def s3_step(report: dict) -> dict[str, dict]:
    return {host["address"]: host["steps"]["s3 resources"] for host in report["hosts"]}


def test_a_prefix_reaches_every_host_with_a_role_checked_and_a_rerun_is_unchanged(make_lab, tmp_path):
    lab = make_lab(4, "--s3", "--record-commands", "--fault", "1:no-role", "--fault", "2:s3-corrupt",
                   "--fault", "3:s3-slowdown")
    env = home_environment(tmp_path / "home", AWS_ACCESS_KEY_ID=USER_KEY_ID, AWS_SECRET_ACCESS_KEY=USER_SECRET,
                           AWS_DEFAULT_REGION="us-east-1",
                           AWS_ENDPOINT_URL_S3=f"http://{lab.state['s3_address']}:5000")
    seeded = lab.run_in_client(sys.executable, "-c", SEED, env=env,
                               input=json.dumps({key: body.decode("latin-1") for key, body in OBJECTS.items()}))
    assert seeded.returncode == 0, seeded.stderr
    report_path = tmp_path / "report.json"
    arguments = [*lab.lab_arguments(), "--resource", "data=s3://lab-data/data", "--report", str(report_path)]
    first = lab.deploy(*arguments, env=env)
    assert first.returncode == 1, first.stderr  # two hosts fail, each with its cause
    steps = s3_step(json.loads(report_path.read_text()))
    orchestrator, no_role, corrupt, throttled = lab.addresses
    for address, hostname in ((orchestrator, "orchestrator"), (throttled, "factory-3")):
        assert steps[address]["status"] == "changed", steps[address]
        assert held(lab, hostname) == OBJECTS
    assert "no instance role" in steps[no_role]["cause"] and "iamInstanceProfile" in steps[no_role]["cause"]
    assert "s3://lab-data/data/" in steps[corrupt]["cause"] and "its sha256 is" in steps[corrupt]["cause"]
    assert held(lab, "factory-1") == {} and held(lab, "factory-2") == {}

    second = lab.deploy(*arguments, env=env)
    steps = s3_step(json.loads(report_path.read_text()))
    assert steps[orchestrator]["status"] == steps[throttled]["status"] == "unchanged", steps
    assert held(lab, "orchestrator") == OBJECTS

    outputs = first.stdout + first.stderr + second.stdout + second.stderr + report_path.read_text()
    for canary in (USER_KEY_ID, USER_SECRET):
        assert canary not in outputs
        for hostname in lab.hostnames:
            assert not any(canary.encode() in command for command in lab.recorded_commands(hostname))
            for path in (lab.directory / "hosts" / hostname / "home").rglob("*"):
                assert not path.is_file() or path.is_symlink() or canary.encode() not in path.read_bytes(), path


def content_uploads(lab) -> int:
    log = (lab.directory / "s3-stand-in.log").read_text(errors="replace")
    return sum('"PUT /lab-data/stage/sha256/' in line for line in log.splitlines())


def test_stage_via_sends_each_content_once_and_every_host_pulls_the_tree_with_its_modes(make_lab, tmp_path):
    lab = make_lab(3, "--s3")
    env = home_environment(tmp_path / "home", AWS_ACCESS_KEY_ID=USER_KEY_ID, AWS_SECRET_ACCESS_KEY=USER_SECRET,
                           AWS_DEFAULT_REGION="us-east-1",
                           AWS_ENDPOINT_URL_S3=f"http://{lab.state['s3_address']}:5000")
    seeded = lab.run_in_client(sys.executable, "-c", SEED, env=env, input="{}")
    assert seeded.returncode == 0, seeded.stderr
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "train.sh").write_bytes(b"#!/bin/sh\necho train\n")
    (tree / "bin" / "train.sh").chmod(0o755)
    for index in range(3):
        (tree / f"shard {index}.bin").write_bytes(bytes([index]) * 200_000)
    (tree / "copy of shard 0.bin").write_bytes(bytes([0]) * 200_000)
    arguments = [*lab.lab_arguments(), "--resource", f"data={tree}", "--stage-via", "s3://lab-data/stage"]
    first = lab.deploy(*arguments, env=env)
    assert first.returncode == 0, first.stderr
    assert content_uploads(lab) == 4  # five files, four contents
    expected = {str(path.relative_to(tree)): path.read_bytes() for path in tree.rglob("*") if path.is_file()}
    for hostname in lab.hostnames:
        assert held(lab, hostname) == expected
        assert (lab.home(hostname) / "resources" / "data" / "bin" / "train.sh").stat().st_mode & 0o777 == 0o755
    (tree / "shard 2.bin").write_bytes(b"new shard")
    second = lab.deploy(*arguments, env=env)
    assert second.returncode == 0, second.stderr
    assert content_uploads(lab) == 5 and "1 of 4 contents to upload" in second.stderr
    for hostname in lab.hostnames:
        assert held(lab, hostname)["shard 2.bin"] == b"new shard"

    status = lab.deploy("status", *lab.lab_arguments(), env=env)
    assert status.returncode == 0 and status.stdout.count("resources match") == 3, status.stdout
    (lab.home("factory-1") / "resources" / "data" / "shard 0.bin").write_bytes(b"edited on the host")
    edited = lab.deploy("status", *lab.lab_arguments(), env=env)
    assert edited.returncode == 1 and "resources differ from the manifest's checksums" in edited.stdout
