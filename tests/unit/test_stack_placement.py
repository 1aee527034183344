"""Placement groups and EFA in the Pulumi program: under Pulumi's mocks, and with moto's EC2 behind them (its
catalogue of instance types says which can join a cluster placement group and how many EFA interfaces each has)."""

import json

import pytest
from pulumi_harness import (BASE_CONFIG, COMPONENT, FLEET, LAUNCH_TEMPLATE, PLACEMENT_GROUP, RecordingMocks,
                            run_program)
from test_stack_on_moto import config_for, deploy

from flambe_iac.stacks.cluster import declare_cluster
from flambe_iac.stacks.cluster_config import load_config
from flambe_iac.stacks.placement import EFA_TYPE_EXAMPLES


def run_cluster(**overrides):
    mocks = RecordingMocks()
    config = {**BASE_CONFIG, **overrides}
    return run_program(lambda: declare_cluster(load_config()), config, mocks), mocks


def by_name(mocks, typ):
    return {resource.name: resource.inputs for resource in mocks.of_type(typ)}


def refusal(**overrides) -> str:
    with pytest.raises(Exception) as caught:
        run_cluster(**overrides)
    return str(caught.value)


@pytest.mark.parametrize("strategy", ["cluster", "spread", "partition"])
def test_one_placement_group_per_cluster_holds_the_factories(strategy):
    _, mocks = run_cluster(placementGroup=strategy, factoryType="c5n.18xlarge")
    (group,) = by_name(mocks, PLACEMENT_GROUP).values()
    assert group["strategy"] == strategy
    assert group["tags"]["Purpose"] == "flambe" and group["tags"]["Cluster-Name"] == "exp1"
    assert ("partitionCount" in group) == (strategy == "partition")
    templates = by_name(mocks, LAUNCH_TEMPLATE)
    assert templates["exp1_factory"]["placement"]["groupName"] == "exp1_placement-1a2b3c"
    assert "placement" not in templates["exp1_orchestrator"]


def test_the_orchestrator_joins_when_asked_and_partitions_are_counted():
    _, mocks = run_cluster(placementGroup="partition", partitionCount="4", placementOrchestrator="true")
    (group,) = by_name(mocks, PLACEMENT_GROUP).values()
    assert group["partitionCount"] == 4
    assert {inputs["placement"]["groupName"] for inputs in by_name(mocks, LAUNCH_TEMPLATE).values()} == {
        "exp1_placement-1a2b3c"}


def test_the_component_parents_the_placement_group_and_the_templates():
    _, mocks = run_cluster(placementGroup="cluster", efa="true", factoryType="c5n.18xlarge")
    children = [urn for urn in mocks.urns if "aws:ec2/placementGroup" in urn or "aws:ec2/launchTemplate" in urn]
    assert len(children) == 3
    assert all("::flambe:cluster:Cluster$aws:" in urn for urn in children)


def test_without_placement_nothing_changes():
    _, mocks = run_cluster()
    assert not mocks.of_type(PLACEMENT_GROUP)
    assert all("placement" not in inputs for inputs in by_name(mocks, LAUNCH_TEMPLATE).values())
    assert all("interfaceType" not in interface
               for inputs in by_name(mocks, LAUNCH_TEMPLATE).values() for interface in inputs["networkInterfaces"])


def test_efa_gives_each_factory_every_interface_of_its_type_in_the_users_network():
    _, mocks = run_cluster(placementGroup="cluster", efa="true", factoryType="p4d.24xlarge",
                           associatePublicIp="false")
    templates = by_name(mocks, LAUNCH_TEMPLATE)
    interfaces = templates["exp1_factory"]["networkInterfaces"]
    assert [item["networkCardIndex"] for item in interfaces] == [0, 1, 2, 3]
    assert [item["deviceIndex"] for item in interfaces] == [0, 1, 1, 1]
    assert [item["interfaceType"] for item in interfaces] == ["efa", "efa-only", "efa-only", "efa-only"]
    # The subnet is the fleet's override; the security groups are the user's on every interface.
    assert all("subnetId" not in item and item["securityGroups"] == ["sg-0aaa", "sg-0bbb"] for item in interfaces)
    (factories,) = [inputs for name, inputs in by_name(mocks, FLEET).items() if name == "exp1_factories"]
    assert factories["launchTemplateConfigs"][0]["launchTemplateSpecification"]["launchTemplateId"] == \
        "lt-exp1_factory"
    (orchestrator_interface,) = templates["exp1_orchestrator"]["networkInterfaces"]
    assert "interfaceType" not in orchestrator_interface


def test_types_with_different_efa_interface_counts_are_refused():
    message = refusal(placementGroup="cluster", efa="true", associatePublicIp="false",
                      factoryTypes='["p5.48xlarge", "p4d.24xlarge"]')
    assert "p5.48xlarge 32, p4d.24xlarge 4" in message
    assert "pulumi config rm --path 'flambe:factoryTypes[1]'" in message


def test_every_listed_type_must_be_able_to_join_the_group():
    message = refusal(placementGroup="cluster", factoryTypes='["c5n.18xlarge", "t3.large"]')
    assert "t3.large cannot join a cluster placement group" in message


def test_with_efa_a_refusal_never_suggests_a_strategy_efa_cannot_use():
    message = refusal(placementGroup="cluster", efa="true", factoryType="t3.large")
    assert "cannot join a cluster placement group" in message and "placementGroup spread" not in message


def test_the_placement_group_and_templates_carry_the_clusters_tags():
    _, mocks = run_cluster(placementGroup="cluster", efa="true", factoryType="c5n.18xlarge")
    for typ in (PLACEMENT_GROUP, LAUNCH_TEMPLATE):
        for inputs in by_name(mocks, typ).values():
            assert inputs["tags"]["Purpose"] == "flambe" and inputs["tags"]["Cluster-Name"] == "exp1"


def test_one_efa_interface_keeps_the_public_address():
    _, mocks = run_cluster(placementGroup="cluster", efa="true", factoryType="c5n.18xlarge")
    (interface,) = by_name(mocks, LAUNCH_TEMPLATE)["exp1_factory"]["networkInterfaces"]
    assert interface["associatePublicIpAddress"] == "true" and interface["interfaceType"] == "efa"


@pytest.mark.parametrize("overrides, expected", [
    ({"placementGroup": "rack"}, "flambe:placementGroup is 'rack': use one of cluster, spread, partition"),
    ({"efa": "true"}, "flambe:efa needs the factories in a cluster placement group"),
    ({"efa": "true", "placementGroup": "spread"}, "pulumi config set flambe:placementGroup cluster"),
    ({"partitionCount": "3", "placementGroup": "cluster"}, "applies to partition placement groups only"),
    ({"partitionCount": "8", "placementGroup": "partition"}, "pulumi config set flambe:partitionCount 7"),
    ({"placementOrchestrator": "true"}, "but flambe:placementGroup is unset"),
    ({"placementGroup": "spread", "factoryCount": "7", "placementOrchestrator": "true"},
     "would put 8 in it: pulumi config set flambe:placementGroup partition"),
    ({"placementGroup": "cluster", "factoryType": "t3.large"}, "t3.large cannot join a cluster placement group"),
    ({"placementGroup": "cluster", "placementOrchestrator": "true", "orchestratorType": "t3.large"},
     "pick a type that can, e.g. pulumi config set flambe:orchestratorType c5n.18xlarge, or"),
    ({"placementGroup": "spread", "dedicated": "true"}, "spread cannot hold Dedicated Instances"),
    ({"placementGroup": "cluster", "efa": "true", "factoryType": "m5.large"},
     "m5.large has no EFA: use a type that has it, e.g. pulumi config set flambe:factoryType p5.48xlarge"),
    ({"placementGroup": "cluster", "efa": "true", "factoryType": "p5.48xlarge"},
     "pulumi config set flambe:associatePublicIp false"),
    ({"partitionCount": "inf", "placementGroup": "partition"}, "flambe:partitionCount is 'inf': give a whole number"),
    ({"factoryCount": "nan"}, "flambe:factoryCount is 'nan': give a whole number >= 0"),
    ({"factoryCount": "9" * 400}, "give a whole number >= 0"),
    ({"orchestratorIdleHours": "nan"}, "flambe:orchestratorIdleHours is 'nan': give a number of hours above 0"),
])
def test_what_aws_would_refuse_is_refused_at_preview_with_the_fix(overrides, expected):
    assert expected in refusal(**overrides)


def test_placement_resources_are_not_firewalls():
    _, mocks = run_cluster(placementGroup="cluster", efa="true", factoryType="c5n.18xlarge")
    types = {resource.typ for resource in mocks.resources}
    assert types == {COMPONENT, FLEET, PLACEMENT_GROUP, LAUNCH_TEMPLATE}


# With moto's EC2 behind the mocks.

def test_on_moto_factories_launch_in_the_group_with_efa_interfaces_in_the_users_subnet(aws):
    ec2, network = aws
    groups_before = ec2.describe_security_groups()["SecurityGroups"]
    _, mocks = deploy(config_for(network, factoryType="p4d.24xlarge", placementGroup="cluster", efa="true",
                                 associatePublicIp="false"))
    (group,) = mocks.placement_groups.values()
    assert group["strategy"] == "cluster" and group["instances"] == ["p4d.24xlarge", "p4d.24xlarge"]
    launched = [item for reservation in ec2.describe_instances()["Reservations"] for item in reservation["Instances"]]
    factories = [item for item in launched if item["InstanceType"] == "p4d.24xlarge"]
    assert len(factories) == 2 and {item["SubnetId"] for item in factories} == {network["subnetId"]}
    template = [inputs for inputs in mocks.launch_templates.values() if inputs["tags"]["Role"] == "factory"][0]
    assert [(item["networkCardIndex"], item["interfaceType"]) for item in template["networkInterfaces"]] == \
        [(0, "efa"), (1, "efa-only"), (2, "efa-only"), (3, "efa-only")]
    assert all(item["securityGroups"] == json.loads(network["securityGroupIds"])
               for item in template["networkInterfaces"])
    assert ec2.describe_security_groups()["SecurityGroups"] == groups_before


def test_on_moto_a_type_without_efa_or_cluster_placement_is_refused_before_any_instance(aws):
    ec2, network = aws
    with pytest.raises(Exception, match="m5.large has no EFA"):
        deploy(config_for(network, placementGroup="cluster", efa="true"))
    with pytest.raises(Exception, match="t3.micro cannot join a cluster placement group"):
        deploy(config_for(network, placementGroup="cluster", factoryType="t3.micro"))
    assert ec2.describe_instances()["Reservations"] == []


def test_the_types_a_refusal_names_have_efa_in_ec2s_catalogue(aws):
    ec2, _ = aws
    kinds = ec2.describe_instance_types(InstanceTypes=list(EFA_TYPE_EXAMPLES))["InstanceTypes"]
    assert len(kinds) == len(EFA_TYPE_EXAMPLES)
    assert all(kind["NetworkInfo"]["EfaSupported"] for kind in kinds)
