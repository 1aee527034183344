"""The Pulumi program against moto's EC2: what EC2 would refuse, the program's deploy refuses too."""

import json

import boto3
import pytest
from pulumi_harness import ALARM, COMPONENT, FLEET, LAUNCH_TEMPLATE, MotoMocks, run_program

from flambe_iac.inputs.outputs import parse_outputs
from flambe_iac.stacks.cluster import declare_cluster
from flambe_iac.stacks.cluster_config import load_config


def config_for(network, **overrides):
    config = {"name": "exp1", "creator": "alice", "factoryCount": "2", "orchestratorType": "m5.large",
              "factoryType": "m5.large", **{key: network[key] for key in
                                            ("subnetId", "securityGroupIds", "keyName", "amiName", "amiOwners")}}
    return {**config, **overrides}


def deploy(config):
    mocks = MotoMocks()
    return run_program(lambda: declare_cluster(load_config()), config, mocks), mocks


def template_data(ec2, name):
    """The data of the one launch template EC2 holds whose auto-name begins with NAME."""
    (template,) = [item for item in ec2.describe_launch_templates()["LaunchTemplates"]
                   if item["LaunchTemplateName"].rsplit("-", 1)[0] == name]
    (version,) = ec2.describe_launch_template_versions(
        LaunchTemplateId=template["LaunchTemplateId"])["LaunchTemplateVersions"]
    return version["LaunchTemplateData"]


def test_instances_are_launched_by_ec2_with_our_inputs(aws):
    ec2, network = aws
    firewalls_before = (ec2.describe_security_groups()["SecurityGroups"], ec2.describe_network_acls()["NetworkAcls"],
                        ec2.describe_route_tables()["RouteTables"], ec2.describe_key_pairs()["KeyPairs"])
    exports, mocks = deploy(config_for(network, orchestratorIdleHours="2", factoriesIdleHours="1"))
    reservations = ec2.describe_instances()["Reservations"]
    launched = [instance for reservation in reservations for instance in reservation["Instances"]]
    assert len(launched) == 3
    for instance in launched:
        assert instance["SubnetId"] == network["subnetId"]
        assert instance["KeyName"] == "alice-key"
        assert instance["ImageId"] == network["image"]
        tags = {tag["Key"]: tag["Value"] for tag in instance["Tags"]}
        assert tags["Purpose"] == "flambe" and tags["Cluster-Name"] == "exp1"
    cluster = parse_outputs(exports)
    assert sorted(host.id for host in cluster.members) == sorted(instance["InstanceId"] for instance in launched)
    assert {host.private_ip for host in cluster.members} == {instance["PrivateIpAddress"] for instance in launched}
    alarms = boto3.client("cloudwatch", region_name="us-east-1").describe_alarms()["MetricAlarms"]
    assert {alarm["AlarmActions"][0] for alarm in alarms} == {"arn:aws:automate:us-east-1:ec2:terminate"}
    assert len(alarms) == 3
    # What moto's fleets do not apply of a launch template, EC2 would: the template EC2 holds says it.
    for name in ("exp1_factory", "exp1_orchestrator"):
        data = template_data(ec2, name)
        assert [item["Groups"] for item in data["NetworkInterfaces"]] == [json.loads(network["securityGroupIds"])]
        assert data["MetadataOptions"]["HttpTokens"] == "required"
        assert [item["Ebs"]["Encrypted"] for item in data["BlockDeviceMappings"]] == [True]
    assert {resource.typ for resource in mocks.resources} == {COMPONENT, LAUNCH_TEMPLATE, FLEET, ALARM}
    firewalls_after = (ec2.describe_security_groups()["SecurityGroups"], ec2.describe_network_acls()["NetworkAcls"],
                       ec2.describe_route_tables()["RouteTables"], ec2.describe_key_pairs()["KeyPairs"])
    assert firewalls_after == firewalls_before


@pytest.mark.parametrize("overrides, expected", [
    ({"ami": "ami-00000000bad"}, "InvalidAMIID"),
    ({"subnetId": "subnet-00000bad"}, "InvalidSubnetID"),
    ({"securityGroupIds": '["sg-00000bad"]'}, "InvalidGroup"),
    ({"keyName": "nobody-key"}, "InvalidKeyPair"),
    ({"factoryType": "m5.enormous"}, "InvalidInstanceType"),
    ({"amiName": "no-such-image-*"}, "returned no results"),
])
def test_what_ec2_refuses_fails_the_program(aws, overrides, expected):
    ec2, network = aws
    with pytest.raises(Exception, match=expected):
        deploy(config_for(network, **overrides))


def test_a_security_group_of_another_vpc_fails(aws):
    ec2, network = aws
    other_vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    stranger = ec2.create_security_group(GroupName="elsewhere", Description="x", VpcId=other_vpc)["GroupId"]
    groups = json.dumps([*json.loads(network["securityGroupIds"]), stranger])
    with pytest.raises(Exception, match=f"{stranger}, which is in {other_vpc}"):
        deploy(config_for(network, securityGroupIds=groups))
    assert ec2.describe_instances()["Reservations"] == []
