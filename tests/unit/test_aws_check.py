"""`flambe-deploy check` against moto's EC2: every rule passing and failing, and the fix it prints."""

import json
import os
import subprocess
import sys

import pytest

from flambe_iac.cli.deploy import main as deploy_main

FROM = "203.0.113.7/32"


def check_main(argv):
    return deploy_main(["check", *argv])


def open_network(ec2, ssh=True, members="self", report_site=True):
    """A VPC, subnet, group and key pair, with the rules flambe needs unless told otherwise."""
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    # a zone moto's offerings say has m5.large: the capacity table of every --config check looks there
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24", AvailabilityZone="us-east-1a")["Subnet"]["SubnetId"]
    group = ec2.create_security_group(GroupName="mine", Description="mine", VpcId=vpc)["GroupId"]
    ec2.create_key_pair(KeyName="alice-key")
    permissions = []
    if ssh:
        permissions.append({"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": FROM}]})
    if members == "self":
        permissions.append({"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group}]})
    elif members == "cidr":
        permissions.append({"IpProtocol": "tcp", "FromPort": 0, "ToPort": 65535,
                            "IpRanges": [{"CidrIp": "10.0.0.0/16"}]})
    if report_site:
        permissions.append({"IpProtocol": "tcp", "FromPort": 49556, "ToPort": 49558,
                            "IpRanges": [{"CidrIp": "0.0.0.0/0"}]})
    if permissions:
        ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=permissions)
    return {"vpc": vpc, "subnet": subnet, "group": group}


def write_config(tmp_path, network, key="alice-key", groups=None):
    path = tmp_path / "Pulumi.dev.yaml"
    path.write_text("config:\n  aws:region: us-east-1\n"
                    f"  flambe:subnetId: {network['subnet']}\n"
                    f"  flambe:keyName: {key}\n"
                    "  flambe:securityGroupIds:\n" + "".join(f"    - {g}\n" for g in (groups or [network["group"]])))
    return path


def run(capsys, *arguments):
    code = check_main(list(arguments))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def firewall_state(ec2):
    return (ec2.describe_security_groups()["SecurityGroups"], ec2.describe_network_acls()["NetworkAcls"],
            ec2.describe_key_pairs()["KeyPairs"])


def test_everything_in_place_passes_and_nothing_changes(ec2, tmp_path, capsys):
    network = open_network(ec2)
    before = firewall_state(ec2)
    code, out, _ = run(capsys, "--config", str(write_config(tmp_path, network)), "--from", FROM)
    assert code == 0, out
    assert "FAIL" not in out
    for check in ("subnet", "security group", "key pair", "ssh from where you deploy", "report site port 49556",
                  "report site port 49558", "members reach each other", "network ACL"):
        assert f"PASS  {check}" in out
    assert firewall_state(ec2) == before


def test_members_may_reach_each_other_through_the_subnet_cidr(ec2, tmp_path, capsys):
    network = open_network(ec2, members="cidr")
    code, out, _ = run(capsys, "--config", str(write_config(tmp_path, network)), "--from", FROM)
    assert code == 0, out
    assert "lets the subnet 10.0.1.0/24 in" in out


@pytest.mark.parametrize("missing, check, fix", [
    ({"ssh": False}, "ssh from where you deploy",
     "aws ec2 authorize-security-group-ingress --region us-east-1 --group-id {group} --protocol tcp --port 22 "
     "--cidr 203.0.113.7/32"),
    ({"members": None}, "members reach each other",
     "aws ec2 authorize-security-group-ingress --region us-east-1 --group-id {group} --protocol -1 "
     "--source-group {group}"),
    ({"report_site": False}, "report site port 49556",
     "aws ec2 authorize-security-group-ingress --region us-east-1 --group-id {group} --protocol tcp --port 49556 "
     "--cidr 203.0.113.7/32"),
])
def test_each_missing_rule_fails_with_the_command_that_adds_it(ec2, tmp_path, capsys, missing, check, fix):
    network = open_network(ec2, **missing)
    code, out, _ = run(capsys, "--config", str(write_config(tmp_path, network)), "--from", FROM)
    assert code == 1
    assert f"FAIL  {check}" in out
    assert f"fix: {fix.format(group=network['group'])}" in out


def test_a_missing_subnet_group_and_key_pair_fail(ec2, tmp_path, capsys):
    network = open_network(ec2)
    broken = {**network, "subnet": "subnet-0000000000bad"}
    code, out, _ = run(capsys, "--config", str(write_config(tmp_path, broken, key="nobody",
                                                            groups=["sg-0000000000bad"])), "--from", FROM)
    assert code == 1
    assert "FAIL  subnet: subnet-0000000000bad does not exist" in out
    assert "FAIL  security group: sg-0000000000bad does not exist" in out
    assert "FAIL  key pair: nobody does not exist" in out


def test_a_security_group_of_another_vpc_fails(ec2, tmp_path, capsys):
    network = open_network(ec2)
    other_vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    stranger = ec2.create_security_group(GroupName="else", Description="x", VpcId=other_vpc)["GroupId"]
    code, out, _ = run(capsys, "--config", str(write_config(tmp_path, network, groups=[network["group"], stranger])),
                       "--from", FROM)
    assert code == 1
    assert f"FAIL  security group: {stranger} is in {other_vpc}, not in the subnet's {network['vpc']}" in out


def network_acl_of(ec2, network):
    acls = ec2.describe_network_acls(Filters=[{"Name": "vpc-id", "Values": [network["vpc"]]}])["NetworkAcls"]
    return acls[0]["NetworkAclId"]


def test_a_network_acl_that_denies_ssh_fails(ec2, tmp_path, capsys):
    network = open_network(ec2)
    acl = network_acl_of(ec2, network)
    ec2.create_network_acl_entry(NetworkAclId=acl, RuleNumber=50, Protocol="6", RuleAction="deny", Egress=False,
                                 CidrBlock="0.0.0.0/0", PortRange={"From": 22, "To": 22})
    code, out, _ = run(capsys, "--config", str(write_config(tmp_path, network)), "--from", FROM)
    assert code == 1
    assert f"FAIL  network ACL: {acl} blocks your ssh (tcp 22 ingress {FROM}) at rule 50" in out
    assert (f"fix: aws ec2 create-network-acl-entry --region us-east-1 --network-acl-id {acl} --ingress "
            f"--rule-number 49 --protocol tcp --port-range From=22,To=22 --cidr-block {FROM} --rule-action allow") in out


def test_a_network_acl_without_return_traffic_fails(ec2, tmp_path, capsys):
    network = open_network(ec2)
    acl = network_acl_of(ec2, network)
    ec2.replace_network_acl_entry(NetworkAclId=acl, RuleNumber=100, Protocol="6", RuleAction="allow", Egress=True,
                                  CidrBlock="0.0.0.0/0", PortRange={"From": 443, "To": 443})
    code, out, _ = run(capsys, "--config", str(write_config(tmp_path, network)), "--from", FROM)
    assert code == 1
    assert "blocks answers to you (tcp 1024-65535 egress" in out


def test_without_from_and_no_way_to_find_the_address_those_checks_are_skipped(ec2, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("flambe_iac.aws.network.this_machines_address", lambda: None)
    network = open_network(ec2, ssh=False)
    code, out, _ = run(capsys, "--config", str(write_config(tmp_path, network)))
    assert code == 0
    assert "SKIP  ssh from where you deploy: could not find this machine's public address: pass --from CIDR" in out


def test_outputs_source_reads_the_instances(ec2, tmp_path, capsys):
    network = open_network(ec2, ssh=False)
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    instances = ec2.run_instances(ImageId=image, MinCount=2, MaxCount=2, SubnetId=network["subnet"],
                                  SecurityGroupIds=[network["group"]], KeyName="alice-key")["Instances"]
    hosts = [{"id": instance["InstanceId"], "public_ip": None, "private_ip": instance["PrivateIpAddress"],
              "public_dns": None} for instance in instances]
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps({"flambe_outputs_version": 1, "cluster_name": "c", "ssh_user": "ubuntu",
                                   "region": "us-east-1", "orchestrator": hosts[0], "factories": hosts[1:]}))
    code, out, _ = run(capsys, "--outputs", str(outputs), "--from", FROM)
    assert code == 1
    assert f"PASS  subnet: {network['subnet']} exists" in out
    assert "FAIL  ssh from where you deploy" in out


def test_stack_source_reads_pulumi_config(ec2, tmp_path, capsys, monkeypatch):
    network = open_network(ec2)
    stub = tmp_path / "bin" / "pulumi"
    stub.parent.mkdir()
    config = {"aws:region": {"value": "us-east-1"}, "flambe:subnetId": {"value": network["subnet"]},
              "flambe:keyName": {"value": "alice-key"},
              "flambe:securityGroupIds": {"value": json.dumps([network["group"]]), "objectValue": [network["group"]]}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    stub.write_text(f"#!/bin/sh\ncat {tmp_path}/config.json\n")
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub.parent}:{os.environ['PATH']}")
    code, out, _ = run(capsys, "--stack", "dev", "--from", FROM)
    assert code == 0, out


def test_no_credentials_is_bad_input(tmp_path):
    config = tmp_path / "Pulumi.dev.yaml"
    config.write_text("config:\n  aws:region: us-east-1\n  flambe:subnetId: subnet-1\n"
                      "  flambe:securityGroupIds: [sg-1]\n")
    environment = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    environment.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
                       AWS_EC2_METADATA_DISABLED="true", HOME=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "flambe_iac.cli.deploy", "check", "--config", str(config),
                             "--from", FROM], capture_output=True, text=True, env=environment, timeout=60)
    assert result.returncode == 2
    assert "no AWS credentials" in result.stderr


def test_bad_from_is_bad_input(capsys, tmp_path):
    code, _, err = run(capsys, "--config", str(tmp_path / "x.yaml"), "--from", "not-a-cidr")
    assert code == 2 and "--from 'not-a-cidr'" in err


def test_a_rule_from_a_group_outside_the_cluster_does_not_let_members_in(ec2, tmp_path, capsys):
    network = open_network(ec2, members=None)
    stranger = ec2.create_security_group(GroupName="stranger", Description="x", VpcId=network["vpc"])["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=network["group"], IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "UserIdGroupPairs": [{"GroupId": stranger}]}])
    code, out, _ = run(capsys, "--config", str(write_config(tmp_path, network)), "--from", FROM)
    assert code == 1
    assert "FAIL  members reach each other" in out


def test_a_network_acl_deny_over_part_of_the_ephemeral_ports_fails(ec2, tmp_path, capsys):
    network = open_network(ec2)
    acl = network_acl_of(ec2, network)
    ec2.create_network_acl_entry(NetworkAclId=acl, RuleNumber=40, Protocol="6", RuleAction="deny", Egress=True,
                                 CidrBlock="10.0.1.0/28", PortRange={"From": 40000, "To": 45000})
    code, out, _ = run(capsys, "--config", str(write_config(tmp_path, network)), "--from", FROM)
    assert code == 1
    assert "blocks answers to members (tcp 1024-65535 egress" in out and "at rule 40" in out


def test_with_ray_the_members_ray_ports_are_checked_and_the_fix_names_exactly_them(ec2, tmp_path, capsys):
    network = open_network(ec2, members=None)
    ec2.authorize_security_group_ingress(GroupId=network["group"], IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "UserIdGroupPairs": [{"GroupId": network["group"]}]}])
    config = str(write_config(tmp_path, network))
    code, out, _ = run(capsys, "--config", config, "--from", FROM)
    assert code == 0 and "Ray" not in out, out  # without --ray, Ray's ports are none of the check's business
    code, out, _ = run(capsys, "--config", config, "--from", FROM, "--ray")
    assert code == 1
    assert "PASS  members reach each other" in out
    for ports in ("6379-6384", "10002-19999", "52365"):
        assert f"FAIL  Ray between members: no rule lets cluster members reach each other on tcp {ports}" in out
        assert (f"fix: aws ec2 authorize-security-group-ingress --region us-east-1 --group-id {network['group']} "
                f"--protocol tcp --port {ports} --source-group {network['group']}") in out


def test_with_ray_members_that_trust_each_other_pass(ec2, tmp_path, capsys):
    network = open_network(ec2)
    code, out, _ = run(capsys, "--config", str(write_config(tmp_path, network)), "--from", FROM, "--ray")
    assert code == 0, out
    assert out.count("PASS  Ray between members") == 3
    assert "allows Ray between members (tcp 6379-6384 ingress 10.0.1.0/24)" in out
