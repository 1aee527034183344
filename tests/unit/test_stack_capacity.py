"""Capacity: the factories are one EC2 Fleet of type instant over the ordered types x subnets, all in one zone and
one type or none, and the orchestrator follows them into their zone. Under Pulumi's mocks with moto's EC2 behind
them, EC2 answering InsufficientInstanceCapacity, VcpuLimitExceeded or Unsupported per (type, zone)."""

import json

import pytest
from pulumi_harness import BASE_CONFIG, FLEET, LAUNCH_TEMPLATE, MotoMocks, RecordingMocks, fleet_tags, run_program

from flambe_iac.inputs.outputs import parse_outputs
from flambe_iac.stacks.cluster import declare_cluster
from flambe_iac.stacks.cluster_config import load_config

P5, P4D = "p5.48xlarge", "p4d.24xlarge"
ZONES = ("us-east-1a", "us-east-1b", "us-east-1c")


def three_zones(ec2, network) -> list[str]:
    """The user's subnet in zone a, and one more in b and in c, of the same VPC."""
    more = [ec2.create_subnet(VpcId=network["vpc"], CidrBlock=f"10.0.{number}.0/24",
                              AvailabilityZone=zone)["Subnet"]["SubnetId"]
            for number, zone in ((2, ZONES[1]), (3, ZONES[2]))]
    return [network["subnetId"], *more]


def config_for(network, subnets, **overrides):
    config = {"name": "exp1", "creator": "alice", "factoryCount": "3", "orchestratorType": "m5.large",
              "factoryTypes": json.dumps([P5, P4D]), "subnetIds": json.dumps(subnets),
              **{key: network[key] for key in ("securityGroupIds", "keyName", "amiName", "amiOwners")}, **overrides}
    return {key: value for key, value in config.items() if value is not None}


def deploy(config, **mocks_arguments):
    mocks = MotoMocks(**mocks_arguments)
    return run_program(lambda: declare_cluster(load_config()), config, mocks), mocks


def everywhere(kind, code="InsufficientInstanceCapacity"):
    return {(kind, zone): code for zone in ZONES}


def test_p5_nowhere_and_p4d_only_in_b_puts_every_member_in_b_on_p4d(aws):
    ec2, network = aws
    subnets = three_zones(ec2, network)
    no_room = {**everywhere(P5), (P4D, ZONES[0]): "InsufficientInstanceCapacity", (P4D, ZONES[2]): "Unsupported"}
    exports, mocks = deploy(config_for(network, subnets), no_room=no_room)
    cluster = parse_outputs(json.loads(json.dumps(exports)))
    assert [(host.instance_type, host.availability_zone, host.market) for host in cluster.factories] == \
        [(P4D, ZONES[1], "on-demand")] * 3
    assert (cluster.orchestrator.availability_zone, cluster.orchestrator.instance_type) == (ZONES[1], "m5.large")
    live = mocks.live_instances()
    assert sorted(item["InstanceId"] for item in live) == sorted(host.id for host in cluster.members)
    assert {item["Placement"]["AvailabilityZone"] for item in live} == {ZONES[1]}
    # EC2's order: the first type in each zone, then the next type; it stops at the first that holds all three.
    factories = [(kind, zone) for name, kind, zone in mocks.attempts if name == "exp1_factories"]
    assert factories == [(P5, ZONES[0]), (P5, ZONES[1]), (P5, ZONES[2]), (P4D, ZONES[0]), (P4D, ZONES[1])]
    # The orchestrator was offered only the factories' zone.
    assert [(kind, zone) for name, kind, zone in mocks.attempts if name == "exp1_orchestrator"] == [
        ("m5.large", ZONES[1])]


def test_the_first_type_in_the_first_zone_when_it_has_room(aws):
    ec2, network = aws
    exports, mocks = deploy(config_for(network, three_zones(ec2, network)))
    cluster = parse_outputs(exports)
    assert {(host.instance_type, host.availability_zone) for host in cluster.factories} == {(P5, ZONES[0])}
    assert cluster.orchestrator.availability_zone == ZONES[0]


def test_all_or_none_a_zone_with_room_for_some_is_passed_over(aws):
    """Zone a has room for two p5 of three: EC2 launches none there, all three in b."""
    ec2, network = aws
    exports, mocks = deploy(config_for(network, three_zones(ec2, network)), room={(P5, ZONES[0]): 2})
    cluster = parse_outputs(exports)
    assert {(host.instance_type, host.availability_zone) for host in cluster.factories} == {(P5, ZONES[1])}
    assert len(mocks.live_instances()) == 4
    (factories,) = [resource.inputs for resource in mocks.of_type(FLEET) if resource.name == "exp1_factories"]
    assert factories["onDemandOptions"] == {"allocationStrategy": "prioritized", "minTargetCapacity": 3,
                                            "singleAvailabilityZone": True, "singleInstanceType": True}


def test_no_capacity_anywhere_names_every_attempt_and_leaves_nothing(aws):
    ec2, network = aws
    subnets = three_zones(ec2, network)
    no_room = {**everywhere(P5), **everywhere(P4D, "VcpuLimitExceeded"), (P4D, ZONES[2]): "Unsupported"}
    with pytest.raises(Exception) as caught:
        deploy(config_for(network, subnets), no_room=no_room)
    message = str(caught.value)
    for kind in (P5, P4D):
        for zone, subnet in zip(ZONES, subnets):
            assert f"{kind} in {zone} ({subnet}), on-demand: " in message
    lines = [line for line in message.splitlines() if line.startswith("  ")]
    assert [line.split(", on-demand: ")[1].split(":")[0] for line in lines] == ["InsufficientInstanceCapacity"] * 3 + [
        "VcpuLimitExceeded"] * 2 + ["Unsupported"]
    assert [line.split(" (")[0].strip() for line in lines] == [f"{kind} in {zone}" for kind in (P5, P4D)
                                                                for zone in ZONES]
    assert "launched none, so nothing of this attempt runs or bills" in message
    assert "pulumi config set --path 'flambe:factoryTypes[2]' TYPE" in message
    reservations = ec2.describe_instances()["Reservations"]
    assert [item for group in reservations for item in group["Instances"]] == []
    # Only the factories' (empty) fleet was asked for: the orchestrator waits for their zone, so it never launched.
    assert [tags["Role"] for tags in fleet_tags()] == ["factory"]


def test_ec2_lists_no_instant_fleet_unless_asked_by_id(aws):
    """The harness answers DescribeFleets as EC2 does, so a program that lists its instant fleets finds none."""
    ec2, network = aws
    exports, mocks = deploy(config_for(network, [network["subnetId"]], factoryTypes=json.dumps(["m5.large"])))
    assert ec2.describe_fleets()["Fleets"] == [] and len(fleet_tags()) == 2
    ids = [mocks.state[name]["id"] for name in ("exp1_factories", "exp1_orchestrator")]
    assert [item["FleetId"] for item in ec2.describe_fleets(FleetIds=ids)["Fleets"]] == ids


def test_the_next_run_asks_ec2_again_with_a_new_attempt(aws):
    ec2, network = aws
    config = config_for(network, three_zones(ec2, network))
    failed = MotoMocks(no_room={**everywhere(P5), **everywhere(P4D)})
    with pytest.raises(Exception, match="EC2 could not launch all 3 factories"):
        run_program(lambda: declare_cluster(load_config()), config, failed)
    assert failed.live_instances() == [] and list(failed.state) == ["exp1_factories"]
    (empty,) = fleet_tags()
    # The state holds the empty fleet; no live instance shows its launch: a new attempt replaces it.
    exports, mocks = deploy(config, no_room=everywhere(P5), previous=failed)
    assert mocks.created == ["exp1_factories", "exp1_orchestrator"]
    attempts = {resource.name: resource.inputs["tags"]["flambe-attempt"] for resource in mocks.of_type(FLEET)}
    assert attempts["exp1_factories"] != empty["flambe-attempt"]
    cluster = parse_outputs(exports)
    assert {host.instance_type for host in cluster.factories} == {P4D}
    # A third run finds every instance live: the same attempts, nothing replaced, nothing added.
    again_exports, again = deploy(config, no_room=everywhere(P5), previous=mocks)
    assert {resource.name: resource.inputs["tags"]["flambe-attempt"] for resource in again.of_type(FLEET)} == \
        attempts
    assert again.created == [] and parse_outputs(again_exports).members == cluster.members
    assert len(again.live_instances()) == 4


# Spot: spot only, or spot and else on-demand for all; never a mix.

def spot_nowhere():
    return {(kind, zone, "spot"): "InsufficientInstanceCapacity" for kind in (P5, P4D) for zone in ZONES}


def markets(mocks):
    return sorted(item.get("InstanceLifecycle", "on-demand") for item in mocks.live_instances()
                  if {tag["Key"]: tag["Value"] for tag in item["Tags"]}["Role"] == "factory")


def test_spot_true_stays_spot_only(aws):
    ec2, network = aws
    subnets = three_zones(ec2, network)
    with pytest.raises(Exception) as caught:
        deploy(config_for(network, subnets, spot="true"), no_room=spot_nowhere())
    exports, mocks = deploy(config_for(network, subnets, spot="true"))
    assert {host.market for host in parse_outputs(exports).factories} == {"spot"}
    assert markets(mocks) == ["spot"] * 3
    assert parse_outputs(exports).orchestrator.market == "on-demand"
    assert ", spot: InsufficientInstanceCapacity" in str(caught.value) and ", on-demand: " not in str(caught.value)


def test_fallback_takes_spot_when_spot_holds_them_all(aws):
    ec2, network = aws
    exports, mocks = deploy(config_for(network, three_zones(ec2, network), spot="fallback"))
    assert {host.market for host in parse_outputs(exports).factories} == {"spot"}
    assert "exp1_factories_on_demand" not in {resource.name for resource in mocks.of_type(FLEET)}


def test_fallback_is_on_demand_for_all_when_spot_cannot_hold_them_all(aws):
    ec2, network = aws
    # Spot has room for two of three in a: all or none, so no spot at all; on-demand then holds all three in a.
    no_room = {key: code for key, code in spot_nowhere().items() if key[:2] != (P5, ZONES[0])}
    exports, mocks = deploy(config_for(network, three_zones(ec2, network), spot="fallback"), no_room=no_room,
                            room={(P5, ZONES[0], "spot"): 2})
    cluster = parse_outputs(exports)
    assert [(host.market, host.instance_type, host.availability_zone) for host in cluster.factories] == [
        ("on-demand", P5, ZONES[0])] * 3
    assert markets(mocks) == ["on-demand"] * 3


def test_fallback_failing_both_names_the_spot_and_the_on_demand_attempts(aws):
    ec2, network = aws
    subnets = three_zones(ec2, network)
    with pytest.raises(Exception) as caught:
        deploy(config_for(network, subnets, spot="fallback"), no_room={**everywhere(P5), **everywhere(P4D)})
    lines = [line for line in str(caught.value).splitlines() if line.startswith("  ")]
    assert [line.split(", ")[-1].split(":")[0] for line in lines] == ["spot"] * 6 + ["on-demand"] * 6
    assert not [item for group in ec2.describe_instances()["Reservations"] for item in group["Instances"]]


# Preview refusals: the lists.

def refusal(mocks, **overrides):
    config = {**BASE_CONFIG, **overrides}
    with pytest.raises(Exception) as caught:
        run_program(lambda: declare_cluster(load_config()), config, mocks)
    assert not mocks.of_type(FLEET)
    return str(caught.value)


def two_subnets(second):
    return RecordingMocks(subnets={"subnet-0aaa": ("vpc-0aaa", "eu-west-3a"), "subnet-0bbb": second})


def test_a_subnet_of_another_vpc_is_refused_with_the_fix():
    message = refusal(two_subnets(("vpc-0other", "eu-west-3b")), subnetIds='["subnet-0aaa", "subnet-0bbb"]')
    assert "flambe:subnetIds has subnet-0bbb, which is in vpc-0other, but the first, subnet-0aaa, is in vpc-0aaa" \
        in message
    assert "pulumi config rm --path 'flambe:subnetIds[1]'" in message


def test_two_subnets_of_one_zone_are_refused_with_the_fix():
    message = refusal(two_subnets(("vpc-0aaa", "eu-west-3a")), subnetIds='["subnet-0aaa", "subnet-0bbb"]')
    assert "has subnet-0aaa and subnet-0bbb, both in eu-west-3a" in message
    assert "pulumi config rm --path 'flambe:subnetIds[1]'" in message


def test_a_security_group_outside_the_vpc_is_refused():
    mocks = RecordingMocks(groups={"sg-0aaa": "vpc-0aaa", "sg-0bbb": "vpc-0else"})
    assert "sg-0bbb, which is in vpc-0else" in refusal(mocks)


@pytest.mark.parametrize("overrides, expected", [
    ({"factoryTypes": '["p5.48xlarge"]', "factoryType": "p4d.24xlarge"},
     "flambe:factoryTypes and flambe:factoryType are both set: keep the list: pulumi config rm flambe:factoryType"),
    ({"subnetId": "subnet-0aaa"}, "pulumi config rm flambe:subnetId"),
    ({"orchestratorTypes": '["m5.large"]', "orchestratorType": "c5.large"}, "pulumi config rm flambe:orchestratorType"),
    ({"factoryTypes": '["m5.large", "m5.large"]'}, "flambe:factoryTypes names m5.large twice"),
    ({"factoryTypes": '["m5.large", "m7g.large"]'}, "flambe:factoryTypes mixes architectures"),
    ({"capacityBlock": "true"}, "pulumi config set flambe:capacityReservationId cr-0abc"),
    ({"capacityReservationId": "cr-0abc", "capacityReservationGroupArn": "arn:aws:resource-groups:x"},
     "pulumi config rm flambe:capacityReservationGroupArn"),
    ({"capacityReservationId": "cr-0abc", "spot": "true"}, "pulumi config set flambe:spot false"),
    ({"spot": "sometimes"}, "give true, false, fallback"),
    ({"factoryTypes": json.dumps([f"m5.{size}" for size in ("large", "xlarge", "2xlarge", "4xlarge", "8xlarge",
                                                            "12xlarge", "16xlarge", "24xlarge")]),
      "subnetIds": json.dumps([f"subnet-0{number}" for number in range(7)])}, "EC2 Fleet takes at most 50"),
])
def test_list_settings_ec2_would_refuse_are_refused_at_preview(overrides, expected):
    assert expected in refusal(RecordingMocks(), **overrides)


def test_overrides_are_types_by_subnets_in_order_with_priorities_from_one():
    mocks = RecordingMocks(subnets={"subnet-0aaa": ("vpc-0aaa", "eu-west-3a"),
                                    "subnet-0bbb": ("vpc-0aaa", "eu-west-3b")})
    run_program(lambda: declare_cluster(load_config()), {
        **BASE_CONFIG, "factoryTypes": '["p5.48xlarge", "p4d.24xlarge"]',
        "subnetIds": '["subnet-0bbb", "subnet-0aaa"]'}, mocks)
    (factories,) = [resource.inputs for resource in mocks.of_type(FLEET) if resource.name == "exp1_factories"]
    assert [(item["instanceType"], item["subnetId"], item["priority"])
            for item in factories["launchTemplateConfigs"][0]["overrides"]] == [
        ("p5.48xlarge", "subnet-0bbb", 1), ("p5.48xlarge", "subnet-0aaa", 2),
        ("p4d.24xlarge", "subnet-0bbb", 3), ("p4d.24xlarge", "subnet-0aaa", 4)]
    assert factories["type"] == "instant" and factories["terminateInstances"] is True


def test_with_no_factory_the_orchestrator_may_go_to_any_subnet_in_order():
    mocks = RecordingMocks(subnets={"subnet-0aaa": ("vpc-0aaa", "eu-west-3a"),
                                    "subnet-0bbb": ("vpc-0aaa", "eu-west-3b")})
    run_program(lambda: declare_cluster(load_config()), {
        **BASE_CONFIG, "factoryCount": "0", "orchestratorTypes": '["c5.large", "m5.large"]',
        "subnetIds": '["subnet-0aaa", "subnet-0bbb"]'}, mocks)
    (orchestrator,) = mocks.of_type(FLEET)
    assert [(item["instanceType"], item["subnetId"]) for item in
            orchestrator.inputs["launchTemplateConfigs"][0]["overrides"]] == [
        ("c5.large", "subnet-0aaa"), ("c5.large", "subnet-0bbb"), ("m5.large", "subnet-0aaa"),
        ("m5.large", "subnet-0bbb")]


# Reservations and Capacity Blocks (moto has no capacity reservations: DescribeCapacityReservations answers here).

class ReservationsAnswer:
    """An EC2 client whose DescribeCapacityReservations answers RESERVATIONS; the rest is moto's."""

    def __init__(self, region, reservations):
        import boto3

        self.moto = boto3.client("ec2", region_name=region)
        self.reservations = reservations

    def describe_capacity_reservations(self, CapacityReservationIds):
        return {"CapacityReservations": [item for item in self.reservations
                                         if item["CapacityReservationId"] in CapacityReservationIds]}

    def __getattr__(self, name):
        return getattr(self.moto, name)


@pytest.fixture
def reservations(monkeypatch):
    import flambe_iac.aws.fleets

    held = []
    monkeypatch.setattr(flambe_iac.aws.fleets, "ec2_client", lambda region: ReservationsAnswer(region, held))
    return held


def reserved(kind, zone):
    return {"CapacityReservationId": "cr-0abc", "InstanceType": kind, "AvailabilityZone": zone}


@pytest.mark.parametrize("reservation, expected", [
    (None, "flambe:capacityReservationId cr-0abc does not exist in eu-west-3"),
    (reserved("p5.48xlarge", "eu-west-3a"), "holds p5.48xlarge, which flambe:factoryTypes does not list: "
                                            "pulumi config set --path 'flambe:factoryTypes[0]' p5.48xlarge"),
    (reserved("m5.large", "eu-west-3c"), "is in eu-west-3c, and no subnet of flambe:subnetIds is"),
])
def test_a_reservation_the_lists_cannot_use_is_refused_at_preview(reservations, reservation, expected):
    reservations.extend([reservation] if reservation else [])
    assert expected in refusal(RecordingMocks(), capacityReservationId="cr-0abc")


def test_the_factories_template_targets_the_reservation_or_the_capacity_block(reservations):
    reservations.append(reserved("m5.large", "eu-west-3a"))
    for extra, market in (({}, None), ({"capacityBlock": "true"}, "capacity-block")):
        mocks = RecordingMocks()
        exports = run_program(lambda: declare_cluster(load_config()),
                              {**BASE_CONFIG, "capacityReservationId": "cr-0abc", **extra}, mocks)
        templates = {resource.name: resource.inputs for resource in mocks.of_type(LAUNCH_TEMPLATE)}
        target = templates["exp1_factory"]["capacityReservationSpecification"]["capacityReservationTarget"]
        assert target == {"capacityReservationId": "cr-0abc"}
        assert templates["exp1_factory"].get("instanceMarketOptions", {}).get("marketType") == market
        assert "capacityReservationSpecification" not in templates["exp1_orchestrator"]
        hosts = parse_outputs(exports)
        assert {host.market for host in hosts.factories} == {market or "on-demand"}
        assert hosts.orchestrator.market == "on-demand"
    mocks = RecordingMocks()
    run_program(lambda: declare_cluster(load_config()),
                {**BASE_CONFIG, "capacityReservationGroupArn": "arn:aws:resource-groups:eu-west-3:1:group/g"}, mocks)
    (factory,) = [resource.inputs for resource in mocks.of_type(LAUNCH_TEMPLATE) if resource.name == "exp1_factory"]
    assert factory["capacityReservationSpecification"]["capacityReservationTarget"] == {
        "capacityReservationResourceGroupArn": "arn:aws:resource-groups:eu-west-3:1:group/g"}


# Day two: launches that never change; a count or a list edit never replaces a running factory.

def factory_ids(exports):
    return [host.id for host in parse_outputs(json.loads(json.dumps(exports))).factories]


def live_factories(mocks):
    return sorted(item["InstanceId"] for item in mocks.live_instances()
                  if {tag["Key"]: tag["Value"] for tag in item["Tags"]}["Role"] == "factory")


@pytest.fixture
def first_run(aws):
    """Two factories that landed on p4d.24xlarge in b (p5 has no room; p4d only in b)."""
    ec2, network = aws
    subnets = three_zones(ec2, network)
    no_room = {**everywhere(P5), (P4D, ZONES[0]): "InsufficientInstanceCapacity", (P4D, ZONES[2]): "Unsupported"}
    exports, mocks = deploy(config_for(network, subnets, factoryCount="2"), no_room=no_room)
    return ec2, network, subnets, exports, mocks


def test_more_factories_are_one_new_launch_pinned_to_the_clusters_type_and_zone(first_run):
    ec2, network, subnets, before, previous = first_run
    # Now p5 has room everywhere: the addition still joins the cluster's p4d.24xlarge in b.
    exports, mocks = deploy(config_for(network, subnets, factoryCount="3"), previous=previous)
    assert mocks.created == ["exp1_factories_1"]
    (added,) = [resource.inputs for resource in mocks.of_type(FLEET) if resource.name == "exp1_factories_1"]
    assert [(item["instanceType"], item["subnetId"]) for item in added["launchTemplateConfigs"][0]["overrides"]] == [
        (P4D, subnets[1])]
    hosts = parse_outputs(exports).factories
    assert [host.id for host in hosts[:2]] == factory_ids(before)
    assert {(host.instance_type, host.availability_zone) for host in hosts} == {(P4D, ZONES[1])}
    assert live_factories(mocks) == sorted(host.id for host in hosts)


def test_more_factories_where_ec2_has_no_more_fail_in_words_and_keep_the_others(first_run):
    ec2, network, subnets, before, previous = first_run
    with pytest.raises(Exception) as caught:
        deploy(config_for(network, subnets, factoryCount="4"), previous=previous,
               no_room={(P4D, ZONES[1]): "InsufficientInstanceCapacity"})
    message = str(caught.value)
    assert "could not launch all 2 more factories in the cluster's type and zone" in message
    assert [line for line in message.splitlines() if line.startswith("  ")] == [
        f"  {P4D} in {ZONES[1]} ({subnets[1]}), on-demand: InsufficientInstanceCapacity: We currently do not have "
        f"sufficient capacity in the Availability Zone you requested."]
    assert sorted(factory_ids(before)) == live_factories(previous)


def test_more_factories_ec2_had_no_room_for_are_asked_again_by_the_next_run(first_run):
    ec2, network, subnets, before, previous = first_run
    failed = MotoMocks(previous=previous, no_room={(P4D, ZONES[1]): "InsufficientInstanceCapacity"})
    with pytest.raises(Exception, match="could not launch all 2 more factories"):
        run_program(lambda: declare_cluster(load_config()), config_for(network, subnets, factoryCount="4"), failed)
    assert failed.created == ["exp1_factories_1"] and live_factories(failed) == sorted(factory_ids(before))
    exports, mocks = deploy(config_for(network, subnets, factoryCount="4"), previous=failed)
    assert mocks.created == ["exp1_factories_1"]  # the empty fleet replaced by a new attempt
    hosts = parse_outputs(exports).factories
    assert [host.id for host in hosts[:2]] == factory_ids(before) and len(hosts) == 4
    assert {(host.instance_type, host.availability_zone) for host in hosts} == {(P4D, ZONES[1])}
    assert live_factories(mocks) == sorted(host.id for host in hosts)


def test_fewer_factories_remove_whole_newest_launches_only(first_run):
    ec2, network, subnets, before, previous = first_run
    grown, grown_mocks = deploy(config_for(network, subnets, factoryCount="3"), previous=previous)
    exports, mocks = deploy(config_for(network, subnets, factoryCount="2"), previous=grown_mocks)
    assert mocks.created == [] and factory_ids(exports) == factory_ids(before)
    assert live_factories(mocks) == sorted(factory_ids(before))


def test_a_count_inside_one_launch_is_refused_at_preview_with_the_choices(first_run):
    ec2, network, subnets, before, previous = first_run
    mocks = MotoMocks(previous=previous)
    with pytest.raises(Exception) as caught:
        run_program(lambda: declare_cluster(load_config()), config_for(network, subnets, factoryCount="1"), mocks)
    message = str(caught.value)
    assert "flambe:factoryCount 1 falls inside launch 0, whose 2 factories" in message
    assert "pulumi config set flambe:factoryCount 0 (removes that launch) or " \
           "pulumi config set flambe:factoryCount 2 (keeps it)" in message
    assert mocks.created == [] and live_factories(previous) == sorted(factory_ids(before))


def test_editing_the_lists_replaces_no_running_factory(first_run):
    ec2, network, subnets, before, previous = first_run
    edited = config_for(network, list(reversed(subnets)), factoryTypes=json.dumps(["g5.48xlarge", P4D, P5]),
                        orchestratorType="c5.large", factoryCount="2")
    exports, mocks = deploy(edited, previous=previous)
    assert mocks.created == [] and factory_ids(exports) == factory_ids(before)
    assert parse_outputs(exports).orchestrator.id == parse_outputs(before).orchestrator.id


def test_a_factory_gone_is_replaced_by_the_next_run_in_the_clusters_type_and_zone(first_run):
    ec2, network, subnets, before, previous = first_run
    gone, kept = factory_ids(before)
    ec2.terminate_instances(InstanceIds=[gone])
    exports, mocks = deploy(config_for(network, subnets, factoryCount="2"), previous=previous)
    assert mocks.created == ["exp1_factories_1"]
    hosts = parse_outputs(exports).factories
    assert hosts[0].id == kept and gone not in [host.id for host in hosts]
    assert {(host.instance_type, host.availability_zone) for host in hosts} == {(P4D, ZONES[1])}
    assert live_factories(mocks) == sorted(host.id for host in hosts)


def test_an_orchestrator_gone_is_replaced_in_the_factories_zone(first_run):
    ec2, network, subnets, before, previous = first_run
    ec2.terminate_instances(InstanceIds=[parse_outputs(before).orchestrator.id])
    exports, mocks = deploy(config_for(network, subnets, factoryCount="2"), previous=previous)
    assert mocks.created == ["exp1_orchestrator"]
    (orchestrator,) = [resource.inputs for resource in mocks.of_type(FLEET) if resource.name == "exp1_orchestrator"]
    (first,) = [item.inputs for item in previous.of_type(FLEET) if item.name == "exp1_orchestrator"]
    assert orchestrator["tags"]["flambe-attempt"] != first["tags"]["flambe-attempt"]
    cluster = parse_outputs(exports)
    assert cluster.orchestrator.id != parse_outputs(before).orchestrator.id
    assert cluster.orchestrator.availability_zone == ZONES[1] and factory_ids(exports) == factory_ids(before)


def test_an_engine_that_ignores_the_replacement_trigger_is_refused_not_taken_for_a_new_launch(first_run):
    """An older Pulumi CLI keeps the gone orchestrator's fleet, whose record still names the gone instance."""
    ec2, network, subnets, before, previous = first_run
    gone = parse_outputs(before).orchestrator.id
    ec2.terminate_instances(InstanceIds=[gone])
    mocks = MotoMocks(previous=previous, ignores_trigger=True)
    with pytest.raises(Exception) as caught:
        run_program(lambda: declare_cluster(load_config()), config_for(network, subnets, factoryCount="2"), mocks)
    message = str(caught.value)
    assert "the orchestrator fleet was declared with attempt" in message
    assert "this Pulumi CLI ignores the replacementTrigger resource option" in message
    assert "pulumi up --replace 'urn:pulumi:test::flambe::flambe:cluster:Cluster$aws:ec2/fleet:Fleet::" \
           "exp1_orchestrator'" in message
    assert mocks.created == []


def test_a_stack_that_reuses_a_running_clusters_name_is_refused_and_launches_nothing(first_run):
    """Another stack's instances would look like this stack's launches: declaring their fleets here would launch
    them again (they are not in this stack's state) and join the other stack's machines to this cluster."""
    ec2, network, subnets, before, previous = first_run
    running = sorted(item["InstanceId"] for item in previous.live_instances())
    mocks = MotoMocks()
    with pytest.raises(Exception) as caught:
        run_program(lambda: declare_cluster(load_config()), config_for(network, subnets, factoryCount="2"), mocks,
                    stack="prod")
    message = str(caught.value)
    assert "launched by stack 'organization/flambe/test', not by this one (organization/flambe/prod)" in message
    assert "pulumi config set flambe:name ANOTHER-NAME" in message
    assert not mocks.of_type(FLEET) and sorted(item["InstanceId"] for item in mocks.live_instances()) == running


def test_reads_with_another_account_than_the_providers_are_refused():
    """A running cluster must never look absent because the program read another account than it deploys to."""
    class OtherAccount(RecordingMocks):
        def call(self, args):
            if args.token == "aws:index/getCallerIdentity:getCallerIdentity":
                return {"id": "999999999999", "accountId": "999999999999", "arn": "", "userId": ""}
            return super().call(args)
    message = refusal(OtherAccount())
    assert "deploys to account 999999999999, but the credentials the program reads EC2 with" in message
    assert "are of account 123456789012" in message


def test_after_a_fallback_the_next_run_keeps_the_on_demand_factories(aws):
    ec2, network = aws
    subnets = three_zones(ec2, network)
    no_room = {(kind, zone, "spot"): "InsufficientInstanceCapacity" for kind in (P5, P4D) for zone in ZONES}
    before, previous = deploy(config_for(network, subnets, spot="fallback"), no_room=no_room)
    exports, mocks = deploy(config_for(network, subnets, spot="fallback"), previous=previous)
    assert mocks.created == [] and factory_ids(exports) == factory_ids(before)
    assert {host.market for host in parse_outputs(exports).factories} == {"on-demand"}


def test_the_orchestrator_failure_names_the_orchestrators_types(aws):
    ec2, network = aws
    subnets = three_zones(ec2, network)
    with pytest.raises(Exception) as caught:
        deploy(config_for(network, subnets, factoryCount="0", orchestratorType=None,
                          orchestratorTypes='["c5.large", "m5.large"]'),
               no_room={**everywhere("c5.large"), **everywhere("m5.large", "VcpuLimitExceeded")})
    message = str(caught.value)
    assert "could not launch all 1 orchestrator" in message
    assert len([line for line in message.splitlines() if line.startswith("  ")]) == 6
    assert "pulumi config set --path 'flambe:orchestratorTypes[2]' TYPE" in message
    assert "factoryCount" not in message


def test_a_preview_of_three_types_in_three_zones_declares_two_fleets(aws):
    ec2, network = aws
    subnets = three_zones(ec2, network)
    mocks = MotoMocks()
    run_program(lambda: declare_cluster(load_config()),
                config_for(network, subnets, factoryTypes=json.dumps([P5, P4D, "p5e.48xlarge"])), mocks, preview=True)
    (factories,) = [resource.inputs for resource in mocks.of_type(FLEET) if resource.name == "exp1_factories"]
    assert len(factories["launchTemplateConfigs"][0]["overrides"]) == 9


# Fail closed: a read of the cluster's instances that cannot complete, or an instance that does not say which launch
# it is of, stops the program before it declares a fleet (what it does not declare, Pulumi deletes).

class FailingReads:
    """An EC2 client whose DescribeInstances fails with CODE; the rest is moto's."""

    def __init__(self, region, code):
        import boto3

        self.moto, self.code = boto3.client("ec2", region_name=region), code

    def get_paginator(self, operation):
        from botocore.exceptions import ClientError

        if operation != "describe_instances":
            return self.moto.get_paginator(operation)
        raise ClientError({"Error": {"Code": self.code, "Message": "Rate exceeded"}}, "DescribeInstances")

    def __getattr__(self, name):
        return getattr(self.moto, name)


def test_a_read_of_the_instances_that_fails_stops_the_program_before_any_fleet(aws, monkeypatch):
    import flambe_iac.aws.fleets

    ec2, network = aws
    _, previous = deploy(config_for(network, [network["subnetId"]], factoryTypes=json.dumps(["m5.large"])))
    monkeypatch.setattr(flambe_iac.aws.fleets, "ec2_client",
                        lambda region: FailingReads(region, "RequestLimitExceeded"))
    mocks = MotoMocks(previous=previous)
    with pytest.raises(Exception) as caught:
        run_program(lambda: declare_cluster(load_config()),
                    config_for(network, [network["subnetId"]], factoryTypes=json.dumps(["m5.large"])), mocks)
    assert "reading the cluster's factory instances (ec2:DescribeInstances) failed (ClientError" in str(caught.value)
    assert "rather than take the cluster for empty" in str(caught.value)
    assert not mocks.of_type(FLEET) and len(previous.live_instances()) == 4


def test_ec2_text_in_the_read_and_count_messages_stays_on_its_line():
    """What EC2 answers (an error's message, an instance id) reaches the terminal only made safe."""
    from botocore.exceptions import ClientError

    from flambe_iac.aws.fleets import StackReadError, cluster_instances
    from flambe_iac.stacks.cluster_config import StackConfigError
    from flambe_iac.stacks.launches import Launch, plan

    class Hostile:
        def get_paginator(self, operation):
            raise ClientError({"Error": {"Code": "Throttling", "Message": "slow\x1b]0;owned\x07\ndown"}},
                              "DescribeInstances")
    with pytest.raises(StackReadError) as read:
        cluster_instances(Hostile(), "exp1", "factory")
    launch = Launch(0, "ab", {"exp1_factories": [("i-0\x1b[2J", P4D, "subnet-0b", ZONES[1], "on-demand")] * 2})
    with pytest.raises(StackConfigError) as count:
        plan(1, [launch])
    for message in (str(read.value), str(count.value)):
        assert "\x1b" not in message and "\x07" not in message and "\n" not in message


def test_more_pages_than_the_cap_is_a_cause_not_a_part():
    from flambe_iac.aws.fleets import MAX_INSTANCE_PAGES, StackReadError, cluster_instances

    class Endless:
        def get_paginator(self, operation):
            return self

        def paginate(self, Filters):
            assert {item["Name"] for item in Filters} == {"tag:Cluster-Name", "tag:Role", "tag:Purpose",
                                                          "instance-state-name"}
            return iter([{"Reservations": [{"Instances": [{"InstanceId": "i-0abc"}]}]}] * (MAX_INSTANCE_PAGES + 1))
    with pytest.raises(StackReadError, match=f"more than {MAX_INSTANCE_PAGES} pages of instances"):
        cluster_instances(Endless(), "exp1", "factory")


def test_an_instance_tagged_as_a_factory_by_hand_stops_the_program_in_words(aws):
    ec2, network = aws
    image = network["image"]
    (stray,) = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, InstanceType="m5.large", TagSpecifications=[
        {"ResourceType": "instance", "Tags": [{"Key": key, "Value": value} for key, value in (
            ("Cluster-Name", "exp1"), ("Role", "factory"), ("Purpose", "flambe"), ("flambe-launch", "0"),
            ("flambe-fleet", "exp1_factories_9"), ("flambe-attempt", "1"))]}])["Instances"]
    mocks = MotoMocks()
    with pytest.raises(Exception) as caught:
        run_program(lambda: declare_cluster(load_config()), config_for(network, [network["subnetId"]]), mocks)
    message = str(caught.value)
    assert f"instance {stray['InstanceId']} is tagged as the factory of cluster exp1 but its tags" in message
    assert "flambe-fleet='exp1_factories_9'" in message
    assert f"aws ec2 delete-tags --resources {stray['InstanceId']} --tags Key=Cluster-Name" in message
    assert not mocks.of_type(FLEET)
