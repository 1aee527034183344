"""Running the Pulumi program without an engine: Pulumi's own mocks, recording every resource and answering
invokes, either from fixed values or from moto's EC2 (so EC2's own validation runs)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import uuid
import weakref
from typing import Any, Callable

import pulumi
from pulumi.runtime import MockCallArgs, MockResourceArgs, Mocks

INSTANCE = "aws:ec2/instance:Instance"
ALARM = "aws:cloudwatch/metricAlarm:MetricAlarm"
PLACEMENT_GROUP = "aws:ec2/placementGroup:PlacementGroup"
LAUNCH_TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"
FLEET = "aws:ec2/fleet:Fleet"
MOTO_ACCOUNT = "123456789012"
COMPONENT = "flambe:cluster:Cluster"

BASE_CONFIG = {
    "name": "exp1",
    "creator": "alice",
    "keyName": "alice-key",
    "subnetIds": '["subnet-0aaa"]',
    "securityGroupIds": '["sg-0aaa", "sg-0bbb"]',
    "factoryCount": "2",
}


def run_program(program: Callable[[], Any], config: dict[str, str], mocks: Mocks, preview: bool = False,
                stack: str = "test") -> dict:
    """Run PROGRAM under MOCKS with CONFIG (keys without the `flambe:` prefix) as STACK of project flambe; return
    its resolved exports. PREVIEW: as `pulumi preview` runs it (the mocks still answer every resource).

    A fresh event loop and fresh runtime options each time: the runtime keeps state between programs.
    """
    loop = asyncio.new_event_loop()
    # A failed program leaves futures whose error (the one run_program raises) nobody read; their finalizers would
    # log it with a traceback whenever the collector runs, and Python 3.11 formats that with ast.parse, which, run
    # inside another parse (pytest importing a module then), fails it: "AST constructor recursion depth mismatch".
    loop.set_exception_handler(lambda _loop, context: None)
    asyncio.set_event_loop(loop)
    # The program's own EC2 reads (DescribeFleets, DescribeCapacityReservations) go to moto: an empty one for the
    # fixed mocks, the test's for MotoMocks.
    own_ec2 = fake_aws() if getattr(mocks, "isolated_ec2", False) else contextlib.nullcontext()
    try:
        own_ec2.__enter__()
        pulumi.runtime.settings.reset_options(project="flambe", stack=stack)
        pulumi.runtime.set_mocks(mocks, project="flambe", stack=stack, preview=preview)
        pulumi.runtime.set_all_config({f"flambe:{key}": value for key, value in config.items()})
        exports: dict = {}

        @pulumi.runtime.test
        def body():
            return pulumi.Output.from_input(program()).apply(exports.update)

        body()
        if hasattr(mocks, "finish") and not preview:
            mocks.finish()  # what the engine does after a successful update: delete what is no longer declared
        # Every resource's URN, which names its parents' types: "...::flambe:cluster:Cluster$aws:ec2/...::name".
        mocks.urns = list(pulumi.runtime.settings.get_monitor().get_registered_resources())
        return exports
    finally:
        own_ec2.__exit__(None, None, None)
        loop.close()
        asyncio.set_event_loop(None)


@contextlib.contextmanager
def fake_aws():
    from moto import mock_aws

    saved = {name: os.environ.get(name) for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update({name: "testing" for name in saved})
    try:
        with mock_aws():
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def close_stray_event_loops() -> None:
    """The mock monitor makes an event loop in each thread it serves from and never closes it; left to the garbage
    collector, one fails in __del__ at interpreter exit, after pytest's summary. The session's end closes them
    (tests/conftest.py), once no program runs any more."""
    for candidate in gc.get_objects():
        if isinstance(candidate, weakref.ProxyTypes):
            continue  # a proxy whose object is gone fails any isinstance check with ReferenceError
        if isinstance(candidate, asyncio.BaseEventLoop) and not candidate.is_closed() and not candidate.is_running():
            try:
                candidate.close()
            except ValueError:
                continue  # its self-pipe is already gone: nothing left to release


class RecordingMocks(Mocks):
    """Records every resource; each fleet launches all it asks in its first override, with addresses; invokes
    answer from a small fake network. SUBNETS: {subnet: vpc, or (vpc, zone)}."""

    isolated_ec2 = True

    def __init__(self, region: str = "eu-west-3", subnets: dict | None = None, groups: dict | None = None,
                 public_ips: bool = True, running: dict | None = None, ami_architectures: dict | None = None):
        self.region = region
        self.running = running or {}  # role -> ids of the cluster's instances already running
        self.running_amis = {instance: f"ami-0{instance}" for ids in self.running.values() for instance in ids}
        self.ami_architectures = ami_architectures or {}
        self.subnets = subnets or {"subnet-0aaa": "vpc-0aaa"}
        self.groups = groups or {"sg-0aaa": "vpc-0aaa", "sg-0bbb": "vpc-0aaa"}
        self.public_ips = public_ips
        self.resources: list[MockResourceArgs] = []
        self.calls: list[MockCallArgs] = []
        self.instances: dict[str, dict] = {}  # id -> {number, type, subnet}

    def zone_of(self, subnet: str) -> str:
        where = self.subnets[subnet]
        return where[1] if isinstance(where, tuple) else f"{self.region}a"

    def vpc_of(self, subnet: str) -> str:
        where = self.subnets[subnet]
        return where[0] if isinstance(where, tuple) else where

    def of_type(self, typ: str) -> list[MockResourceArgs]:
        return [resource for resource in self.resources if resource.typ == typ]

    def new_resource(self, args: MockResourceArgs):
        self.resources.append(args)
        state = dict(args.inputs)
        if args.typ == COMPONENT:
            return f"{args.name}-component", {}
        if args.typ == FLEET:
            # By name, not by arrival: the runtime registers resources concurrently, in no fixed order.
            count = int(args.inputs["targetCapacitySpecification"]["totalTargetCapacity"])
            first = 1 if args.name.endswith("_orchestrator") else 2
            override = args.inputs["launchTemplateConfigs"][0]["overrides"][0]
            ids = [f"i-{number:017x}" for number in range(first, first + count)]
            for number, instance_id in enumerate(ids, start=first):
                self.instances[instance_id] = {"number": number, "type": override["instanceType"],
                                               "subnet": override["subnetId"]}
            lifecycle = args.inputs["targetCapacitySpecification"]["defaultTargetCapacityType"]
            state["fleetInstanceSets"] = [{"instanceIds": ids, "instanceType": override["instanceType"],
                                           "lifecycle": lifecycle, "platform": ""}]
            return f"fleet-{args.name}", state
        if args.typ == PLACEMENT_GROUP:
            return f"pg-{args.name}", {**state, "name": f"{args.name}-1a2b3c"}
        if args.typ == LAUNCH_TEMPLATE:
            return f"lt-{args.name}", {**state, "latestVersion": 1.0}
        return f"{args.name}-id", state

    def call(self, args: MockCallArgs):
        self.calls.append(args)
        if args.token == "aws:index/getCallerIdentity:getCallerIdentity":
            return {"id": MOTO_ACCOUNT, "accountId": MOTO_ACCOUNT, "arn": f"arn:aws:iam::{MOTO_ACCOUNT}:user/alice",
                    "userId": "alice"}
        if args.token == "aws:index/getRegion:getRegion":
            return {"name": self.region, "region": self.region, "id": self.region, "endpoint": "", "description": ""}
        if args.token == "aws:ec2/getInstanceType:getInstanceType":
            return fake_instance_type(args.args["instanceType"])
        if args.token == "aws:ec2/getInstances:getInstances":
            return {"ids": self.running.get(args.args["instanceTags"]["Role"], []), "id": "instances"}
        if args.token == "aws:ec2/getInstance:getInstance":
            instance_id = args.args["instanceId"]
            if instance_id in self.running_amis:
                return {"id": instance_id, "ami": self.running_amis[instance_id]}
            launched = self.instances[instance_id]
            number = launched["number"]
            return {"id": instance_id, "ami": "", "privateIp": f"10.0.1.{10 + number}",
                    "publicIp": f"3.0.0.{number}" if self.public_ips else "",
                    "publicDns": f"ec2-3-0-0-{number}.compute.amazonaws.com" if self.public_ips else "",
                    "instanceType": launched["type"], "subnetId": launched["subnet"],
                    "availabilityZone": self.zone_of(launched["subnet"])}
        if args.token == "aws:ec2/getAmi:getAmi":
            filters = {item["name"]: item["values"][0] for item in args.args.get("filters", [])}
            if "image-id" in filters:
                image = filters["image-id"]
                return {"id": image, "imageId": image, "architecture": self.ami_architectures.get(image, "x86_64"),
                        "rootDeviceName": "/dev/sda1"}
            suffix = "" if filters.get("architecture", "x86_64") == "x86_64" else "-arm64"
            return {"id": f"ami-0newest{suffix}", "imageId": f"ami-0newest{suffix}", "name": filters["name"],
                    "architecture": filters.get("architecture", "x86_64")}
        if args.token == "aws:ec2/getSubnet:getSubnet":
            if args.args["id"] not in self.subnets:
                raise Exception(f"no matching EC2 Subnet found ({args.args['id']})")
            return {"id": args.args["id"], "vpcId": self.vpc_of(args.args["id"]),
                    "availabilityZone": self.zone_of(args.args["id"])}
        if args.token == "aws:ec2/getSecurityGroup:getSecurityGroup":
            if args.args["id"] not in self.groups:
                raise Exception(f"no matching EC2 Security Group found ({args.args['id']})")
            return {"id": args.args["id"], "vpcId": self.groups[args.args["id"]]}
        raise NotImplementedError(args.token)


class MotoMocks(Mocks):
    """Resources and invokes answered by moto's EC2 and CloudWatch. Launch templates are moto's; a fleet walks its
    overrides in EC2's order (priority, then as listed) and, per (type, zone), either fails with the EC2 error
    NO_ROOM names or launches ALL its instances there through moto's CreateFleet (type instant). When no override
    can hold them, it ends as the real provider ends (terraform-provider-aws's aws_ec2_fleet does not read
    CreateFleet's Errors): a fleet that exists, launched nothing, and holds EC2's errors for DescribeFleets.

    NO_ROOM: {(instance type, zone) or (instance type, zone, market): EC2 error code}. ROOM: the same keys: how many
    EC2 has there (a fleet that asks for all or none gets none; one that does not gets what there is).

    PREVIOUS: the mocks of the run before, whose fleets are this run's state, as the engine's: a fleet declared
    again with the same attempt is left as it is (no CreateFleet), one with a new attempt is replaced (created,
    then the old one deleted with its instances), and one no longer declared is deleted with its instances.
    IGNORES_TRIGGER: an engine older than the replacementTrigger option, which keeps a fleet declared with a new
    attempt as it was (its outputs, tags included, those of the old one)."""

    def __init__(self, region: str = "us-east-1", no_room: dict | None = None, room: dict | None = None,
                 previous: "MotoMocks | None" = None, ignores_trigger: bool = False):
        import boto3

        self.region = region
        self.ec2 = boto3.client("ec2", region_name=region)
        self.cloudwatch = boto3.client("cloudwatch", region_name=region)
        self.no_room = no_room or {}
        self.room = room or {}
        self.resources: list[MockResourceArgs] = []
        self.placement_groups: dict[str, dict] = {}  # moto has no placement groups: EC2's rules for them, here
        self.launch_templates: dict[str, dict] = {}  # id -> the program's inputs
        self.fleet_requests: list[dict] = []  # what CreateFleet was asked, launch by launch
        self.attempts: list[tuple[str, str, str]] = []  # (fleet name, type, zone) in the order EC2 tried them
        self.state: dict[str, dict] = dict(previous.state) if previous else {}  # fleet name -> id, attempt, outputs
        self.declared: set[str] = set()
        self.created: list[str] = []  # fleets CreateFleet was called for, this run
        self.ignores_trigger = ignores_trigger
        instant_fleets_by_id_only()

    def new_resource(self, args: MockResourceArgs):
        self.resources.append(args)
        if args.typ == COMPONENT:
            return f"{args.name}-component", {}
        if args.typ == FLEET:
            return self.declare_fleet(args.name, args.inputs)
        if args.typ == PLACEMENT_GROUP:
            return self.create_placement_group(args.name, args.inputs)
        if args.typ == LAUNCH_TEMPLATE:
            return self.create_launch_template(args.name, args.inputs)
        if args.typ == ALARM:
            return self.put_alarm(args.name, args.inputs)
        raise NotImplementedError(f"the program declared a {args.typ}, which these mocks do not expect")

    def of_type(self, typ: str) -> list[MockResourceArgs]:
        return [resource for resource in self.resources if resource.typ == typ]

    def declare_fleet(self, name: str, inputs: dict):
        self.declared.add(name)
        attempt = inputs.get("tags", {}).get("flambe-attempt")
        known = self.state.get(name)
        if known is not None and (known["attempt"] == attempt or self.ignores_trigger):
            return known["id"], known["outputs"]
        fleet_id, outputs = self.create_fleet(name, inputs)
        self.created.append(name)
        if known is not None:  # replaced: the new one first, then the old one goes with its instances
            self.delete_fleet(known["id"])
        self.state[name] = {"id": fleet_id, "attempt": attempt, "outputs": outputs}
        return fleet_id, outputs

    def finish(self) -> None:
        for name in sorted(set(self.state) - self.declared):
            self.delete_fleet(self.state.pop(name)["id"])

    def delete_fleet(self, fleet_id: str) -> None:
        """DeleteFleets with its instances; moto refuses it when they are all gone already (EC2 does not)."""
        fleet = self.moto_fleet(fleet_id)
        if any(item["instance"].state == "running" for item in fleet.on_demand_instances) or \
                any(request.instance.state == "running" for request in fleet.spot_requests):
            self.ec2.delete_fleets(FleetIds=[fleet_id], TerminateInstances=True)
        else:
            fleet.state = "deleted"

    def create_launch_template(self, name: str, inputs: dict):
        data = {"ImageId": inputs["imageId"], "KeyName": inputs["keyName"],
                "MetadataOptions": {"HttpTokens": inputs["metadataOptions"]["httpTokens"],
                                    "HttpEndpoint": inputs["metadataOptions"]["httpEndpoint"]},
                "BlockDeviceMappings": [{"DeviceName": item["deviceName"], "Ebs": {
                    "VolumeSize": int(item["ebs"]["volumeSize"]), "VolumeType": item["ebs"]["volumeType"],
                    "Encrypted": item["ebs"]["encrypted"] == "true"}} for item in inputs["blockDeviceMappings"]],
                "TagSpecifications": [{"ResourceType": item["resourceType"], "Tags": [
                    {"Key": key, "Value": value} for key, value in item["tags"].items()]}
                    for item in inputs["tagSpecifications"]],
                "NetworkInterfaces": [{"DeviceIndex": int(item["deviceIndex"]),
                                       "Groups": item["securityGroups"]} for item in inputs["networkInterfaces"]]}
        if inputs.get("iamInstanceProfile"):
            data["IamInstanceProfile"] = {"Name": inputs["iamInstanceProfile"]["name"]}
        if inputs.get("instanceInitiatedShutdownBehavior"):
            data["InstanceInitiatedShutdownBehavior"] = inputs["instanceInitiatedShutdownBehavior"]
        placement = inputs.get("placement") or {}
        if placement.get("groupName"):
            self.group_named(placement["groupName"])
        # Pulumi's auto-naming: the logical name and a random suffix, so a second run can declare it again.
        template = self.ec2.create_launch_template(LaunchTemplateName=f"{name}-{uuid.uuid4().hex[:7]}",
                                                   LaunchTemplateData=data)
        template_id = template["LaunchTemplate"]["LaunchTemplateId"]
        self.launch_templates[template_id] = inputs
        return template_id, {**inputs, "latestVersion": 1.0}

    def zone_of(self, subnet_id: str) -> str:
        (subnet,) = self.ec2.describe_subnets(SubnetIds=[subnet_id])["Subnets"]
        return subnet["AvailabilityZone"]

    def create_fleet(self, name: str, inputs: dict):
        (config,) = inputs["launchTemplateConfigs"]
        specification = config["launchTemplateSpecification"]
        target = inputs["targetCapacitySpecification"]
        count, market = int(target["totalTargetCapacity"]), target["defaultTargetCapacityType"]
        options = inputs.get("spotOptions" if market == "spot" else "onDemandOptions") or {}
        all_or_none = (options.get("minTargetCapacity") == count and options.get("singleAvailabilityZone")
                       and options.get("singleInstanceType"))
        ordered = [item for _, item in sorted(enumerate(config["overrides"]),
                                              key=lambda pair: (pair[1].get("priority") or float("inf"), pair[0]))]
        errors = []
        for override in ordered:
            kind, subnet = override["instanceType"], override["subnetId"]
            zone = self.zone_of(subnet)
            self.attempts.append((name, kind, zone))
            code = self.no_room.get((kind, zone, market), self.no_room.get((kind, zone)))
            room = self.room.get((kind, zone, market), self.room.get((kind, zone), count))
            if code is None and room < count and all_or_none:
                code = "InsufficientInstanceCapacity"
            if code is not None:
                errors.append({"LaunchTemplateAndOverrides": {
                    "LaunchTemplateSpecification": {"LaunchTemplateId": specification["launchTemplateId"]},
                    "Overrides": {"InstanceType": kind, "SubnetId": subnet, "AvailabilityZone": zone}},
                    "Lifecycle": market, "ErrorCode": code, "ErrorMessage": EC2_MESSAGES.get(code, code)})
                continue
            return self.launch(name, inputs, specification, override, min(room, count), market, errors)
        return self.launch(name, inputs, specification, ordered[0], 0, market, errors)  # nothing launched

    def launch(self, name: str, inputs: dict, specification: dict, override: dict | None, count: int, market: str,
               errors: list):
        request = {"Type": "instant",
                   "LaunchTemplateConfigs": [{"LaunchTemplateSpecification": {
                       "LaunchTemplateId": specification["launchTemplateId"],
                       "Version": specification["version"]},
                       "Overrides": [{"InstanceType": override["instanceType"],
                                      "SubnetId": override["subnetId"]}]}],
                   "TargetCapacitySpecification": {"TotalTargetCapacity": count,
                                                   "DefaultTargetCapacityType": market},
                   "TagSpecifications": [{"ResourceType": "fleet", "Tags": [
                       {"Key": key, "Value": value} for key, value in inputs.get("tags", {}).items()]}]}
        self.fleet_requests.append(request)
        answer = self.ec2.create_fleet(**request)
        keep_launch_records()
        self.moto_fleet(answer["FleetId"]).launch_record = answer.get("Instances", [])
        group = (self.launch_templates[specification["launchTemplateId"]].get("placement") or {}).get("groupName")
        if group:
            self.group_named(group)["instances"] += [override["instanceType"]] * count
        self.moto_fleet(answer["FleetId"]).errors = errors
        sets = [{"instanceIds": item["InstanceIds"], "instanceType": item["InstanceType"],
                 "lifecycle": item["Lifecycle"], "platform": ""} for item in answer.get("Instances", [])]
        return answer["FleetId"], {**inputs, "fleetInstanceSets": sets, "fleetState": "active"}

    def moto_fleet(self, fleet_id: str):
        from moto.ec2.models import ec2_backends

        return ec2_backends[MOTO_ACCOUNT][self.region].fleets[fleet_id]

    def live_instances(self) -> list[dict]:
        reservations = self.ec2.describe_instances(Filters=[{"Name": "instance-state-name",
                                                             "Values": ["pending", "running"]}])["Reservations"]
        return [item for reservation in reservations for item in reservation["Instances"]]

    def group_named(self, name: str) -> dict:
        group = next((item for item in self.placement_groups.values() if item["name"] == name), None)
        if group is None:
            raise Exception(f"InvalidPlacementGroup.Unknown: {name}")
        return group

    def create_placement_group(self, name: str, inputs: dict):
        if inputs["strategy"] not in ("cluster", "spread", "partition"):
            raise Exception(f"InvalidParameterValue: strategy {inputs['strategy']}")
        if inputs.get("partitionCount") is not None and inputs["strategy"] != "partition":
            raise Exception("InvalidParameterCombination: partition count needs the partition strategy")
        group_id = f"pg-{len(self.placement_groups):017x}"
        self.placement_groups[group_id] = {**inputs, "name": f"{name}-{group_id[-6:]}", "instances": []}
        return group_id, {**inputs, "name": self.placement_groups[group_id]["name"]}

    def put_alarm(self, name: str, inputs: dict):
        self.cloudwatch.put_metric_alarm(
            AlarmName=name, Namespace=inputs["namespace"], MetricName=inputs["metricName"],
            Statistic=inputs["statistic"], Period=int(inputs["period"]),
            EvaluationPeriods=int(inputs["evaluationPeriods"]), Threshold=float(inputs["threshold"]),
            ComparisonOperator=inputs["comparisonOperator"], AlarmActions=inputs["alarmActions"],
            Dimensions=[{"Name": key, "Value": value} for key, value in inputs["dimensions"].items()],
        )
        return name, inputs

    def call(self, args: MockCallArgs):
        arguments = args.args
        if args.token == "aws:index/getCallerIdentity:getCallerIdentity":
            identity = boto3_client("sts", self.region).get_caller_identity()
            return {"id": identity["Account"], "accountId": identity["Account"], "arn": identity["Arn"],
                    "userId": identity["UserId"]}
        if args.token == "aws:index/getRegion:getRegion":
            return {"name": self.region, "region": self.region, "id": self.region, "endpoint": "", "description": ""}
        if args.token == "aws:ec2/getInstanceType:getInstanceType":
            (kind,) = self.ec2.describe_instance_types(InstanceTypes=[arguments["instanceType"]])["InstanceTypes"]
            network = kind["NetworkInfo"]
            return {"id": kind["InstanceType"], "instanceType": kind["InstanceType"],
                    "supportedArchitectures": kind["ProcessorInfo"]["SupportedArchitectures"],
                    "supportedPlacementStrategies": kind.get("PlacementGroupInfo", {}).get("SupportedStrategies", []),
                    "efaSupported": bool(network.get("EfaSupported")),
                    "efaMaximumInterfaces": network.get("EfaInfo", {}).get("MaximumEfaInterfaces", 0),
                    "maximumNetworkCards": network.get("MaximumNetworkCards", 1),
                    "gpuses": [{"count": gpu["Count"], "manufacturer": gpu["Manufacturer"], "name": gpu["Name"],
                              "memorySize": gpu["MemoryInfo"]["SizeInMiB"]}
                             for gpu in kind.get("GpuInfo", {}).get("Gpus", [])]}
        if args.token == "aws:ec2/getInstances:getInstances":
            filters = [{"Name": f"tag:{key}", "Values": [value]} for key, value in arguments["instanceTags"].items()]
            filters.append({"Name": "instance-state-name", "Values": arguments["instanceStateNames"]})
            reservations = self.ec2.describe_instances(Filters=filters)["Reservations"]
            return {"id": "instances", "ids": [item["InstanceId"] for group in reservations
                                               for item in group["Instances"]]}
        if args.token == "aws:ec2/getInstance:getInstance":
            (group,) = self.ec2.describe_instances(InstanceIds=[arguments["instanceId"]])["Reservations"]
            found = group["Instances"][0]
            return {"id": arguments["instanceId"], "ami": found["ImageId"], "instanceType": found["InstanceType"],
                    "privateIp": found["PrivateIpAddress"], "publicIp": found.get("PublicIpAddress", ""),
                    "publicDns": found.get("PublicDnsName", ""), "subnetId": found["SubnetId"],
                    "availabilityZone": found["Placement"]["AvailabilityZone"]}
        if args.token == "aws:ec2/getAmi:getAmi":
            filters = [{"Name": item["name"], "Values": item["values"]} for item in arguments.get("filters", [])]
            by_id = [item["Values"][0] for item in filters if item["Name"] == "image-id"]
            images = (self.ec2.describe_images(ImageIds=by_id)["Images"] if by_id else
                      self.ec2.describe_images(Owners=arguments["owners"], Filters=filters)["Images"])
            if not images:
                raise Exception("Your query returned no results. Please change your search criteria and try again.")
            newest = max(images, key=lambda image: image.get("CreationDate", ""))
            return {"id": newest["ImageId"], "imageId": newest["ImageId"], "name": newest["Name"],
                    "architecture": newest["Architecture"], "rootDeviceName": newest.get("RootDeviceName", "")}
        if args.token == "aws:ec2/getSubnet:getSubnet":
            (subnet,) = self.ec2.describe_subnets(SubnetIds=[arguments["id"]])["Subnets"]
            return {"id": subnet["SubnetId"], "vpcId": subnet["VpcId"], "cidrBlock": subnet["CidrBlock"],
                    "availabilityZone": subnet["AvailabilityZone"]}
        if args.token == "aws:ec2/getSecurityGroup:getSecurityGroup":
            (group,) = self.ec2.describe_security_groups(GroupIds=[arguments["id"]])["SecurityGroups"]
            return {"id": group["GroupId"], "vpcId": group["VpcId"], "name": group["GroupName"]}
        raise NotImplementedError(args.token)


def keep_launch_records() -> None:
    """DescribeFleets of an instant fleet lists what it launched, terminated since or not, as EC2 keeps the record
    of the launch; moto drops the terminated ones, which would hide a gone member from the program."""
    from moto.ec2.models.fleets import Fleet

    if "launch_record" in vars(Fleet):
        return
    launched_now = Fleet.instances.fget
    Fleet.launch_record = None
    Fleet.instances = property(lambda fleet: fleet.launch_record if fleet.launch_record is not None
                               else launched_now(fleet))


def instant_fleets_by_id_only() -> None:
    """DescribeFleets without fleet ids leaves instant fleets out, as EC2's API reference says ("If a fleet is of
    type instant, you must specify the fleet ID in the request, otherwise the fleet does not appear in the
    response"); moto lists them, which would hide a program that finds its fleets by listing them."""
    from moto.ec2.models.fleets import FleetsBackend

    if getattr(FleetsBackend.describe_fleets, "instant_by_id_only", False):
        return
    listed_by_moto = FleetsBackend.describe_fleets

    def describe_fleets(backend, fleet_ids):
        found = listed_by_moto(backend, fleet_ids)
        return found if fleet_ids else [fleet for fleet in found if fleet.fleet_type != "instant"]

    describe_fleets.instant_by_id_only = True
    FleetsBackend.describe_fleets = describe_fleets


def fleet_tags(region: str = "us-east-1") -> list[dict[str, str]]:
    """The tags of every fleet EC2 (moto) holds, instant or not: what a test sees of EC2's record, which the
    program cannot list."""
    from moto.ec2.models import ec2_backends

    return [{tag["key"]: tag["value"] for tag in ec2_backends[MOTO_ACCOUNT][region].describe_tags(
        filters={"resource-id": [fleet.id]})} for fleet in ec2_backends[MOTO_ACCOUNT][region].fleets.values()]


def boto3_client(service: str, region: str):
    import boto3

    return boto3.client(service, region_name=region)


EC2_MESSAGES = {
    "InsufficientInstanceCapacity": "We currently do not have sufficient capacity in the Availability Zone you "
                                    "requested.",
    "VcpuLimitExceeded": "You have requested more vCPU capacity than your current vCPU limit allows.",
    "Unsupported": "Your requested instance type is not supported in your requested Availability Zone.",
}


def fake_instance_type(name: str) -> dict:
    """What getInstanceType says, by the type's family: Graviton families end in g (m7g, c6g, g5g), GPU families
    start with g or p."""
    family = name.split(".")[0]
    graviton = family.rstrip("dn").endswith("g") and family[0] != "g" or family.startswith("g5g")
    gpus = [{"count": 1, "manufacturer": "NVIDIA", "name": "A10G", "memorySize": 24576}] \
        if family[0] in "gp" and family[1].isdigit() else []
    efa_interfaces = {"p5.48xlarge": 32, "p4d.24xlarge": 4, "c5n.18xlarge": 1}.get(name, 0)
    return {"id": name, "instanceType": name, "supportedArchitectures": ["arm64"] if graviton else ["x86_64", "i386"],
            "gpuses": gpus, "supportedPlacementStrategies": ["partition", "spread"] if family.startswith("t")
            else ["cluster", "partition", "spread"], "efaSupported": efa_interfaces > 0,
            "efaMaximumInterfaces": efa_interfaces, "maximumNetworkCards": max(1, efa_interfaces)}


def moto_network(ec2, cidr: str = "10.0.0.0/16", subnet_cidr: str = "10.0.1.0/24") -> dict[str, str]:
    """A VPC with a subnet, a security group and a key pair, as a user would already have them."""
    vpc = ec2.create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=subnet_cidr, AvailabilityZone="us-east-1a")["Subnet"]["SubnetId"]
    group = ec2.create_security_group(GroupName="flambe-users-own", Description="the user's", VpcId=vpc)["GroupId"]
    ec2.create_key_pair(KeyName="alice-key")
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]
    return {"vpc": vpc, "subnetIds": json.dumps([subnet]), "subnetId": subnet,
            "securityGroupIds": json.dumps([group]), "keyName": "alice-key",
            "amiName": image["Name"], "amiOwners": json.dumps([image["OwnerId"]]), "image": image["ImageId"]}
