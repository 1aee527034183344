"""The whole pipeline without a cloud: the Pulumi program on moto's EC2, its outputs, lab hosts at exactly the
instances' private addresses, and flambe-deploy --address private."""

import json

import boto3
import pytest
from conftest import CANARY_SECRETS
from lab_session import LabSession, home_environment, require_lab_support
from moto import mock_aws
from pulumi_harness import MotoMocks, moto_network, run_program

from flambe_iac.stacks.cluster import declare_cluster
from flambe_iac.stacks.cluster_config import load_config

pytestmark = pytest.mark.lab


@pytest.fixture
def stack_outputs(tmp_path, monkeypatch):
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(variable, "testing")
    with mock_aws():
        network = moto_network(boto3.client("ec2", region_name="us-east-1"))
        config = {"name": "pipeline", "creator": "ci", "factoryCount": "2",
                  **{key: network[key] for key in ("subnetId", "securityGroupIds", "keyName", "amiName", "amiOwners")}}
        exports = run_program(lambda: declare_cluster(load_config()), config, MotoMocks())
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps(exports, indent=2))
    return path


def test_pulumi_outputs_to_lab_hosts_to_a_deployed_cluster(stack_outputs, tmp_path, deploy_inputs):
    require_lab_support()
    outputs = json.loads(stack_outputs.read_text())
    private_ips = [outputs["orchestrator"]["private_ip"], *(factory["private_ip"] for factory in outputs["factories"])]
    assert all(address.startswith("10.0.1.") for address in private_ips)
    lab = LabSession.up(tmp_path / "lab", len(private_ips), "--subnet", "10.0.0.0/16",
                        "--addresses", ",".join(private_ips))
    try:
        assert lab.addresses == private_ips
        report_path = tmp_path / "report.json"
        result = lab.deploy("--outputs", str(stack_outputs), "--address", "private", "--key", str(lab.user_key),
                            "--known-hosts", str(lab.known_hosts), "--secrets", str(deploy_inputs["secrets"]),
                            "--resource", f"data={deploy_inputs['resource']}", "--report", str(report_path),
                            env=home_environment(tmp_path))
        assert result.returncode == 0, result.stdout + result.stderr
        report = json.loads(report_path.read_text())
        assert [host["host_id"] for host in report["hosts"]] == [
            outputs["orchestrator"]["id"], *(factory["id"] for factory in outputs["factories"])]
        for name in lab.hostnames:
            home = lab.home(name)
            assert (home / "secret.ini").read_bytes() == CANARY_SECRETS
            assert (home / "resources" / "data" / "train.csv").exists()
            manifest = lab.manifest(name)
            assert manifest["cluster_name"] == "pipeline"
            assert (home / "ray_bootstrap_key.pem").stat().st_mode & 0o777 == 0o600
        hop = lab.ssh(private_ips[1], f"ssh -o BatchMode=yes {private_ips[2]} hostname")
        assert hop.stdout.strip() == "factory-2", hop.stderr
    finally:
        lab.down()
