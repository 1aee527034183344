"""The Pulumi program under Pulumi's mocks: launch templates and fleets, tags, idle alarms, exports, config errors."""

import json
import os
import runpy
from pathlib import Path

import pulumi
import pytest
from pulumi_harness import ALARM, BASE_CONFIG, COMPONENT, FLEET, LAUNCH_TEMPLATE, RecordingMocks, run_program

from flambe_iac.inputs.outputs import parse_outputs
from flambe_iac.stacks.cluster import declare_cluster
from flambe_iac.stacks.cluster_config import load_config

STACKS_DIR = Path(__file__).resolve().parents[2] / "stacks"


def run_cluster(mocks=None, **overrides):
    mocks = mocks or RecordingMocks()
    config = {**BASE_CONFIG, **{key: value for key, value in overrides.items() if value is not None}}
    exports = run_program(lambda: declare_cluster(load_config()), config, mocks)
    return exports, mocks


def templates(mocks):
    return {resource.name: resource.inputs for resource in mocks.of_type(LAUNCH_TEMPLATE)}


def fleets(mocks):
    return {resource.name: resource.inputs for resource in mocks.of_type(FLEET)}


def overrides(fleet):
    return [(item["instanceType"], item["subnetId"]) for item in fleet["launchTemplateConfigs"][0]["overrides"]]


def test_one_orchestrator_and_n_factories_in_the_users_network():
    _, mocks = run_cluster(orchestratorType="c5.xlarge", factoryType="p3.2xlarge", factoryCount="3")
    declared = fleets(mocks)
    assert sorted(declared) == ["exp1_factories", "exp1_orchestrator"]
    assert overrides(declared["exp1_orchestrator"]) == [("c5.xlarge", "subnet-0aaa")]
    assert overrides(declared["exp1_factories"]) == [("p3.2xlarge", "subnet-0aaa")]
    assert declared["exp1_factories"]["targetCapacitySpecification"]["totalTargetCapacity"] == 3
    for name, inputs in templates(mocks).items():
        (interface,) = inputs["networkInterfaces"]
        assert interface["securityGroups"] == ["sg-0aaa", "sg-0bbb"] and "subnetId" not in interface
        assert interface["associatePublicIpAddress"] == "true"
        assert "vpcSecurityGroupIds" not in inputs and "securityGroupNames" not in inputs
        assert inputs["keyName"] == "alice-key"
        assert inputs["imageId"] == "ami-0newest"
        (root,) = inputs["blockDeviceMappings"]
        assert root["ebs"]["volumeSize"] == 100 and root["ebs"]["volumeType"] == "gp3"
        assert "placement" not in inputs and "instanceMarketOptions" not in inputs


def test_nothing_but_templates_fleets_and_alarms_is_declared():
    """No security group, rule, NACL, route or key pair: only what we allow-list may be registered."""
    _, mocks = run_cluster(orchestratorIdleHours="4", factoriesIdleHours="2")
    types = {resource.typ for resource in mocks.resources}
    assert types == {COMPONENT, LAUNCH_TEMPLATE, FLEET, ALARM}
    forbidden = ("securityGroup", "SecurityGroup", "networkAcl", "route", "Route", "keyPair", "KeyPair",
                 "vpc/", "internetGateway", "natGateway")
    assert not [typ for typ in types if any(word in typ for word in forbidden)]


def ami_lookups(mocks):
    """{name pattern: (owners, architecture)} of every newest-image lookup."""
    found = {}
    for call in mocks.calls:
        if call.token == "aws:ec2/getAmi:getAmi" and call.args.get("mostRecent"):
            filters = {item["name"]: item["values"][0] for item in call.args["filters"]}
            found[filters["name"]] = (call.args["owners"], filters["architecture"])
    return found


def test_the_default_ami_is_the_newest_ubuntu_lts_from_canonical():
    exports, mocks = run_cluster()
    assert ami_lookups(mocks) == {"ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*":
                                  (["099720109477"], "x86_64")}
    assert exports["amis"] == {"orchestrator": "ami-0newest", "factory": "ami-0newest"}


def test_a_graviton_factory_gets_an_arm64_image():
    exports, mocks = run_cluster(factoryType="m7g.large")
    assert ami_lookups(mocks)["ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-arm64-server-*"] == (
        ["099720109477"], "arm64")
    assert templates(mocks)["exp1_factory"]["imageId"] == "ami-0newest-arm64"
    assert templates(mocks)["exp1_orchestrator"]["imageId"] == "ami-0newest"


def test_a_gpu_factory_gets_the_deep_learning_base_gpu_image():
    _, mocks = run_cluster(factoryType="g5.xlarge")
    lookups = ami_lookups(mocks)
    assert lookups["Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *"] == (["amazon"], "x86_64")
    assert "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*" in lookups  # the orchestrator's


def test_a_given_ami_of_the_wrong_architecture_is_refused_at_preview():
    with pytest.raises(Exception, match="ami-0x86 is built for x86_64, but m7g.large runs arm64"):
        run_cluster(RecordingMocks(ami_architectures={"ami-0x86": "x86_64"}), ami="ami-0x86",
                    orchestratorType="m7g.large")


def test_a_factory_added_later_boots_the_image_the_others_run():
    mocks = RecordingMocks(running={"factory": ["i-0f1", "i-0f2"], "orchestrator": ["i-0o"]})
    exports, mocks = run_cluster(mocks, factoryCount="3")
    assert templates(mocks)["exp1_factory"]["imageId"] == "ami-0i-0f1"
    assert exports["amis"] == {"orchestrator": "ami-0i-0o", "factory": "ami-0i-0f1"}
    assert not ami_lookups(mocks)
    _, refreshed = run_cluster(RecordingMocks(running={"factory": ["i-0f1"]}), refreshAmi="true")
    assert {inputs["imageId"] for inputs in templates(refreshed).values()} == {"ami-0newest"}


def test_a_given_ami_skips_the_lookup():
    _, mocks = run_cluster(ami="ami-0pinned")
    assert {inputs["imageId"] for inputs in templates(mocks).values()} == {"ami-0pinned"}
    assert not ami_lookups(mocks)


def test_every_instance_requires_imdsv2_and_has_an_encrypted_root_volume():
    _, mocks = run_cluster(kmsKeyId="arn:aws:kms:eu-west-3:111122223333:key/abc")
    assert len(templates(mocks)) == 2
    for inputs in templates(mocks).values():
        assert inputs["metadataOptions"] == {"httpEndpoint": "enabled", "httpTokens": "required"}
        (root,) = inputs["blockDeviceMappings"]
        assert root["deviceName"] == "/dev/sda1" and root["ebs"]["encrypted"] == "true"
        assert root["ebs"]["kmsKeyId"] == "arn:aws:kms:eu-west-3:111122223333:key/abc"


def test_fleets_templates_and_alarms_are_children_of_the_cluster_component():
    _, mocks = run_cluster(orchestratorIdleHours="4", factoriesIdleHours="2")
    children = [urn for urn in mocks.urns if "aws:" in urn]
    assert len(children) == 2 + 2 + 3
    assert all("::flambe:cluster:Cluster$aws:" in urn for urn in children)


@pytest.mark.parametrize("hours, period, periods", [("2", 300, 24), ("24", 300, 288), ("30", 3600, 30),
                                                     ("48", 3600, 48), ("168", 3600, 168)])
def test_idle_alarms_stay_within_what_cloudwatch_accepts(hours, period, periods):
    _, mocks = run_cluster(orchestratorIdleHours=hours, factoriesIdleHours=hours)
    for resource in mocks.of_type(ALARM):
        assert (resource.inputs["period"], resource.inputs["evaluationPeriods"]) == (period, periods)
        assert period * periods <= (86400 if period < 3600 else 7 * 86400)


def test_factories_count_as_idle_only_below_one_percent_and_the_action_can_be_stop():
    _, mocks = run_cluster(orchestratorIdleHours="3", factoriesIdleHours="2", idleAction="stop")
    alarms = {resource.name: resource.inputs for resource in mocks.of_type(ALARM)}
    assert alarms["exp1_factory_0_idle"]["threshold"] <= 1.0
    assert alarms["exp1_orchestrator_idle"]["alarmActions"] == ["arn:aws:automate:eu-west-3:ec2:stop"]


def declared_options(monkeypatch, **overrides):
    """{resource name: its ResourceOptions} of every fleet and launch template."""
    seen = {}
    real = pulumi.CustomResource.__init__

    def record(self, t, name, props=None, opts=None, *args, **kwargs):
        if t in (FLEET, LAUNCH_TEMPLATE):
            seen[(t, name)] = opts
        return real(self, t, name, props, opts, *args, **kwargs)

    monkeypatch.setattr(pulumi.CustomResource, "__init__", record)
    run_cluster(**overrides)
    return seen


def test_ami_and_list_changes_are_ignored_so_instances_are_not_replaced(monkeypatch):
    seen = declared_options(monkeypatch)
    assert {name for _, name in seen} == {"exp1_factory", "exp1_orchestrator", "exp1_factories"}
    for (typ, _), opts in seen.items():
        if typ == LAUNCH_TEMPLATE:
            assert opts.ignore_changes == ["imageId"]
        else:  # a fleet: new lists, images or counts never replace what it launched
            assert {"launchTemplateConfigs", "targetCapacitySpecification", "onDemandOptions", "spotOptions",
                    "tags"} <= set(opts.ignore_changes)
            # A new cluster: each fleet a new attempt, so the next run asks EC2 again if its launch shows no instance.
            assert opts.replacement_trigger and not opts.replace_on_changes


def test_tags_on_instances_and_root_volumes_with_reserved_ones_ours():
    _, mocks = run_cluster(tags='{"team": "nlp", "cost-center": "42"}')
    declared = templates(mocks)
    orchestrator_tags = {"team": "nlp", "cost-center": "42", "creator": "alice", "Purpose": "flambe",
                         "Cluster-Name": "exp1", "Role": "orchestrator", "Name": "exp1_orchestrator"}
    specifications = {item["resourceType"]: item["tags"] for item in declared["exp1_orchestrator"]["tagSpecifications"]}
    # The instances also say which fleet, and which attempt of it, launched them: the next run finds them so.
    attempt = specifications["instance"].pop("flambe-attempt")
    assert specifications == {"instance": {**orchestrator_tags, "flambe-fleet": "exp1_orchestrator",
                                           "flambe-stack": "organization/flambe/test"},
                              "volume": orchestrator_tags}
    (factory_tags, volume_tags) = [item["tags"] for item in declared["exp1_factory"]["tagSpecifications"]]
    assert factory_tags["Role"] == "factory" and factory_tags["Name"] == "exp1_factory"
    assert (factory_tags["flambe-launch"], factory_tags["flambe-fleet"]) == ("0", "exp1_factories")
    assert "flambe-launch" not in volume_tags and len(attempt) == len(factory_tags["flambe-attempt"]) == 8


def test_options_spot_dedicated_profile_and_private_addresses():
    _, mocks = run_cluster(spot="0.4", dedicated="true", iamInstanceProfile="flambe-s3-read",
                           associatePublicIp="false", volumeSize="250", volumeType="io2", volumeIops="4000",
                           username="ec2-user")
    orchestrator, factories = fleets(mocks)["exp1_orchestrator"], fleets(mocks)["exp1_factories"]
    # The orchestrator must not be reclaimed.
    assert orchestrator["targetCapacitySpecification"]["defaultTargetCapacityType"] == "on-demand"
    assert factories["targetCapacitySpecification"]["defaultTargetCapacityType"] == "spot"
    assert factories["spotOptions"]["allocationStrategy"] == "capacity-optimized-prioritized"
    assert "onDemandOptions" not in factories
    assert {item["maxPrice"] for item in factories["launchTemplateConfigs"][0]["overrides"]} == {"0.4"}
    for inputs in templates(mocks).values():
        assert inputs["placement"]["tenancy"] == "dedicated"
        assert inputs["iamInstanceProfile"] == {"name": "flambe-s3-read"}
        assert inputs["networkInterfaces"][0]["associatePublicIpAddress"] == "false"
        assert inputs["blockDeviceMappings"][0]["ebs"]["volumeSize"] == 250
        assert inputs["blockDeviceMappings"][0]["ebs"]["iops"] == 4000


def test_idle_alarms_terminate_in_the_providers_real_region():
    _, mocks = run_cluster(RecordingMocks(region="ap-southeast-2"), orchestratorIdleHours="3",
                           factoriesIdleHours="1.5")
    alarms = {resource.name: resource.inputs for resource in mocks.of_type(ALARM)}
    assert sorted(alarms) == ["exp1_factory_0_idle", "exp1_factory_1_idle", "exp1_orchestrator_idle"]
    orchestrator = alarms["exp1_orchestrator_idle"]
    assert orchestrator["alarmActions"] == ["arn:aws:automate:ap-southeast-2:ec2:terminate"]
    assert orchestrator["metricName"] == "CPUUtilization" and orchestrator["namespace"] == "AWS/EC2"
    assert orchestrator["comparisonOperator"] == "LessThanThreshold"
    assert orchestrator["period"] * orchestrator["evaluationPeriods"] == 3 * 3600
    assert alarms["exp1_factory_1_idle"]["period"] * alarms["exp1_factory_1_idle"]["evaluationPeriods"] == 1.5 * 3600
    assert orchestrator["dimensions"] == {"InstanceId": "i-00000000000000001"}
    for index in range(2):  # each alarm watches the instance it would stop (the mocks number factories from 2)
        assert alarms[f"exp1_factory_{index}_idle"]["dimensions"] == {"InstanceId": f"i-{2 + index:017x}"}


def test_no_alarms_without_idle_hours():
    _, mocks = run_cluster()
    assert mocks.of_type(ALARM) == []


def test_exports_are_contract_v1_and_the_driver_parses_them():
    exports, _ = run_cluster(factoryCount="2")
    cluster = parse_outputs(json.loads(json.dumps(exports)))
    assert cluster.name == "exp1" and cluster.ssh_user == "ubuntu" and cluster.region == "eu-west-3"
    assert cluster.orchestrator.id == "i-00000000000000001"
    assert [host.private_ip for host in cluster.members] == ["10.0.1.11", "10.0.1.12", "10.0.1.13"]
    assert set(exports) == {"flambe_outputs_version", "cluster_name", "ssh_user", "region", "orchestrator",
                            "factories", "amis"}


def test_instances_without_public_addresses_export_null():
    exports, _ = run_cluster(RecordingMocks(public_ips=False), associatePublicIp="false")
    cluster = parse_outputs(exports)
    assert cluster.orchestrator.public_ip is None and cluster.orchestrator.public_dns is None


def test_zero_factories_is_a_cluster_of_one():
    exports, mocks = run_cluster(factoryCount="0")
    assert exports["factories"] == [] and list(fleets(mocks)) == ["exp1_orchestrator"]


@pytest.mark.parametrize("overrides, expected", [
    ({"keyName": None}, "flambe:keyName is required"),
    ({"subnetIds": None}, "flambe:subnetIds is required"),
    ({"securityGroupIds": None}, "flambe:securityGroupIds is required"),
    ({"name": None}, "flambe:name is required"),
    ({"creator": None}, "flambe:creator is required"),
    ({"factoryCount": "-1"}, "flambe:factoryCount is '-1': give a whole number >= 0"),
    ({"factoryCount": "two"}, "flambe:factoryCount is 'two'"),
    ({"tags": '{"Name": "mine"}'}, "flambe:tags sets Name, which flambe-iac sets itself"),
    ({"tags": '{"Role": "x", "creator": "y"}'}, "flambe:tags sets Role, creator"),
    ({"orchestratorIdleHours": "1", "factoriesIdleHours": "2"}, "flambe:orchestratorIdleHours (1) is shorter"),
    ({"orchestratorIdleHours": "1"}, "flambe:factoriesIdleHours is not"),
    ({"securityGroupIds": "[1, 2]"}, "flambe:securityGroupIds must be a non-empty list of strings"),
    ({"volumeType": "ssd"}, "flambe:volumeType is 'ssd'"),
    ({"spot": "cheap"}, "flambe:spot is 'cheap'"),
    ({"dedicated": "yes"}, "flambe:dedicated is 'yes': give true or false"),
    ({"volumeType": "st1"}, "flambe:volumeType is 'st1', which AWS cannot boot from"),
    ({"volumeType": "sc1"}, "flambe:volumeType is 'sc1', which AWS cannot boot from"),
    ({"volumeType": "io2"}, "flambe:volumeType io2 needs provisioned IOPS: pulumi config set flambe:volumeIops"),
    ({"volumeType": "io1"}, "flambe:volumeType io1 needs provisioned IOPS"),
    ({"orchestratorIdleHours": "200", "factoriesIdleHours": "1"}, "beyond what CloudWatch can watch"),
    ({"factoriesIdleCpu": "0"}, "flambe:factoriesIdleCpu is '0': give a CPU percentage"),
    ({"idleAction": "hibernate"}, "flambe:idleAction is 'hibernate': use one of terminate, stop"),
    ({"username": "root;id"}, "flambe:username is 'root;id'"),
])
def test_config_errors_name_the_key_and_how_to_set_it(overrides, expected):
    config = {**BASE_CONFIG, **overrides}
    config = {key: value for key, value in config.items() if value is not None}
    with pytest.raises(Exception) as caught:
        run_program(lambda: declare_cluster(load_config()), config, RecordingMocks())
    assert expected in str(caught.value)
    if "required" in expected:
        assert "pulumi config set" in str(caught.value)


def test_a_security_group_of_another_vpc_is_refused_before_any_instance():
    mocks = RecordingMocks(groups={"sg-0aaa": "vpc-0aaa", "sg-0bbb": "vpc-0other"})
    with pytest.raises(Exception, match="sg-0bbb, which is in vpc-0other"):
        run_program(lambda: declare_cluster(load_config()), BASE_CONFIG, mocks)
    assert mocks.of_type(FLEET) == []


def test_main_runs_as_the_engine_runs_it(monkeypatch):
    """`main: stacks/`: the engine runs the directory's __main__.py with runpy, from inside stacks/."""
    exported = {}
    monkeypatch.setattr(pulumi, "export", lambda key, value: exported.__setitem__(key, value))
    monkeypatch.chdir(STACKS_DIR)
    mocks = RecordingMocks()
    resolved = run_program(lambda: (runpy.run_path(os.getcwd(), run_name="__main__"), exported)[1], BASE_CONFIG,
                           mocks)
    assert parse_outputs(resolved).name == "exp1"
    assert len(mocks.of_type(FLEET)) == 2
