"""Running the Pulumi program without an engine: Pulumi's own mocks, recording every resource and answering
invokes, either from fixed values or from moto's EC2 (so EC2's own validation runs)."""

from __future__ import annotations

import asyncio
import gc
import json
from typing import Any, Callable

import pulumi
from pulumi.runtime import MockCallArgs, MockResourceArgs, Mocks

INSTANCE = "aws:ec2/instance:Instance"
ALARM = "aws:cloudwatch/metricAlarm:MetricAlarm"
PLACEMENT_GROUP = "aws:ec2/placementGroup:PlacementGroup"
LAUNCH_TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"
COMPONENT = "flambe:cluster:Cluster"

BASE_CONFIG = {
    "name": "exp1",
    "creator": "alice",
    "keyName": "alice-key",
    "subnetId": "subnet-0aaa",
    "securityGroupIds": '["sg-0aaa", "sg-0bbb"]',
    "factoryCount": "2",
}


def run_program(program: Callable[[], Any], config: dict[str, str], mocks: Mocks) -> dict:
    """Run PROGRAM under MOCKS with CONFIG (keys without the `flambe:` prefix); return its resolved exports.

    A fresh event loop and fresh runtime options each time: the runtime keeps state between programs.
    """
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        pulumi.runtime.settings.reset_options(project="flambe", stack="test")
        pulumi.runtime.set_mocks(mocks, project="flambe", stack="test", preview=False)
        pulumi.runtime.set_all_config({f"flambe:{key}": value for key, value in config.items()})
        exports: dict = {}

        @pulumi.runtime.test
        def body():
            return pulumi.Output.from_input(program()).apply(exports.update)

        body()
        # Every resource's URN, which names its parents' types: "...::flambe:cluster:Cluster$aws:ec2/...::name".
        mocks.urns = list(pulumi.runtime.settings.get_monitor().get_registered_resources())
        return exports
    finally:
        loop.close()
        asyncio.set_event_loop(None)


def close_stray_event_loops() -> None:
    """The mock monitor makes an event loop in each thread it serves from and never closes it; left to the garbage
    collector, one fails in __del__ at interpreter exit, after pytest's summary. The session's end closes them
    (tests/conftest.py), once no program runs any more."""
    for candidate in gc.get_objects():
        if isinstance(candidate, asyncio.BaseEventLoop) and not candidate.is_closed() and not candidate.is_running():
            try:
                candidate.close()
            except ValueError:
                continue  # its self-pipe is already gone: nothing left to release


class RecordingMocks(Mocks):
    """Records every resource; instances get addresses; invokes answer from a small fake network."""

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

    def of_type(self, typ: str) -> list[MockResourceArgs]:
        return [resource for resource in self.resources if resource.typ == typ]

    def new_resource(self, args: MockResourceArgs):
        self.resources.append(args)
        state = dict(args.inputs)
        if args.typ == COMPONENT:
            return f"{args.name}-component", {}
        if args.typ == INSTANCE:
            # By name, not by arrival: the runtime registers resources concurrently, in no fixed order.
            number = 1 if args.name.endswith("_orchestrator") else 2 + int(args.name.rsplit("_", 1)[1])
            state.update(privateIp=f"10.0.1.{10 + number}", publicIp=f"3.0.0.{number}" if self.public_ips else "",
                         publicDns=f"ec2-3-0-0-{number}.compute.amazonaws.com" if self.public_ips else "")
            return f"i-{number:017x}", state
        if args.typ == PLACEMENT_GROUP:
            return f"pg-{args.name}", {**state, "name": f"{args.name}-1a2b3c"}
        if args.typ == LAUNCH_TEMPLATE:
            return f"lt-{args.name}", {**state, "latestVersion": 1.0}
        return f"{args.name}-id", state

    def call(self, args: MockCallArgs):
        self.calls.append(args)
        if args.token == "aws:index/getRegion:getRegion":
            return {"name": self.region, "region": self.region, "id": self.region, "endpoint": "", "description": ""}
        if args.token == "aws:ec2/getInstanceType:getInstanceType":
            return fake_instance_type(args.args["instanceType"])
        if args.token == "aws:ec2/getInstances:getInstances":
            return {"ids": self.running.get(args.args["instanceTags"]["Role"], []), "id": "instances"}
        if args.token == "aws:ec2/getInstance:getInstance":
            return {"id": args.args["instanceId"], "ami": self.running_amis[args.args["instanceId"]]}
        if args.token == "aws:ec2/getAmi:getAmi":
            filters = {item["name"]: item["values"][0] for item in args.args.get("filters", [])}
            if "image-id" in filters:
                image = filters["image-id"]
                return {"id": image, "imageId": image, "architecture": self.ami_architectures.get(image, "x86_64")}
            suffix = "" if filters.get("architecture", "x86_64") == "x86_64" else "-arm64"
            return {"id": f"ami-0newest{suffix}", "imageId": f"ami-0newest{suffix}", "name": filters["name"],
                    "architecture": filters.get("architecture", "x86_64")}
        if args.token == "aws:ec2/getSubnet:getSubnet":
            if args.args["id"] not in self.subnets:
                raise Exception(f"no matching EC2 Subnet found ({args.args['id']})")
            return {"id": args.args["id"], "vpcId": self.subnets[args.args["id"]]}
        if args.token == "aws:ec2/getSecurityGroup:getSecurityGroup":
            if args.args["id"] not in self.groups:
                raise Exception(f"no matching EC2 Security Group found ({args.args['id']})")
            return {"id": args.args["id"], "vpcId": self.groups[args.args["id"]]}
        raise NotImplementedError(args.token)


class MotoMocks(Mocks):
    """Resources and invokes answered by moto's EC2 and CloudWatch: instances go through run_instances, so a
    bad AMI, subnet, security group, key pair or instance type fails as EC2 would fail it."""

    def __init__(self, region: str = "us-east-1"):
        import boto3

        self.region = region
        self.ec2 = boto3.client("ec2", region_name=region)
        self.cloudwatch = boto3.client("cloudwatch", region_name=region)
        self.resources: list[MockResourceArgs] = []
        self.placement_groups: dict[str, dict] = {}  # moto has no placement groups: EC2's rules for them, here
        self.launch_templates: dict[str, dict] = {}
        self.run_requests: list[dict] = []  # moto keeps one interface per device index: what EC2 was asked, here

    def new_resource(self, args: MockResourceArgs):
        self.resources.append(args)
        if args.typ == COMPONENT:
            return f"{args.name}-component", {}
        if args.typ == INSTANCE:
            return self.run_instance(args.inputs)
        if args.typ == PLACEMENT_GROUP:
            return self.create_placement_group(args.name, args.inputs)
        if args.typ == LAUNCH_TEMPLATE:
            template_id = f"lt-{len(self.launch_templates):017x}"
            self.launch_templates[template_id] = args.inputs
            return template_id, {**args.inputs, "latestVersion": 1.0}
        if args.typ == ALARM:
            return self.put_alarm(args.name, args.inputs)
        raise NotImplementedError(f"the program declared a {args.typ}, which these mocks do not expect")

    def run_instance(self, inputs: dict):
        root = inputs.get("rootBlockDevice", {})
        tags = [{"Key": key, "Value": value} for key, value in inputs.get("tags", {}).items()]
        request = {
            "ImageId": inputs["ami"], "InstanceType": inputs["instanceType"], "MinCount": 1, "MaxCount": 1,
            "KeyName": inputs["keyName"], **self.network_of(inputs),
            "InstanceInitiatedShutdownBehavior": inputs.get("instanceInitiatedShutdownBehavior", "stop"),
            "BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {
                "VolumeSize": int(root["volumeSize"]), "VolumeType": root["volumeType"],
                "Encrypted": root["encrypted"]}}],
            "MetadataOptions": {"HttpTokens": inputs["metadataOptions"]["httpTokens"],
                                "HttpEndpoint": inputs["metadataOptions"]["httpEndpoint"]},
            "TagSpecifications": [{"ResourceType": "instance", "Tags": tags},
                                  {"ResourceType": "volume", "Tags": tags}],
        }
        if inputs.get("iamInstanceProfile"):
            request["IamInstanceProfile"] = {"Name": inputs["iamInstanceProfile"]}
        request["Placement"] = self.placement_of(inputs)
        self.run_requests.append(request)
        (instance,) = self.ec2.run_instances(**request)["Instances"]
        return instance["InstanceId"], {
            **inputs, "privateIp": instance["PrivateIpAddress"], "publicIp": instance.get("PublicIpAddress", ""),
            "publicDns": instance.get("PublicDnsName", ""),
        }

    def network_of(self, inputs: dict) -> dict:
        """The instance's own subnet and groups, or its launch template's interfaces (EC2 refuses both at once)."""
        template = inputs.get("launchTemplate")
        if template is None:
            return {"SubnetId": inputs["subnetId"], "SecurityGroupIds": inputs["vpcSecurityGroupIds"]}
        if inputs.get("subnetId") or inputs.get("vpcSecurityGroupIds"):
            raise Exception("InvalidParameterCombination: Network interfaces and an instance-level subnet ID or "
                            "security groups may not be specified on the same request")
        interfaces = self.launch_templates[template["id"]]["networkInterfaces"]
        return {"NetworkInterfaces": [
            {"DeviceIndex": int(item["deviceIndex"]), "NetworkCardIndex": int(item["networkCardIndex"]),
             "InterfaceType": item["interfaceType"], "SubnetId": item["subnetId"], "Groups": item["securityGroups"],
             "DeleteOnTermination": item["deleteOnTermination"] == "true"} for item in interfaces]}

    def placement_of(self, inputs: dict) -> dict:
        placement = {"Tenancy": inputs["tenancy"]} if inputs.get("tenancy") else {}
        if inputs.get("placementGroup"):
            group = next((item for item in self.placement_groups.values()
                          if item["name"] == inputs["placementGroup"]), None)
            if group is None:
                raise Exception(f"InvalidPlacementGroup.Unknown: {inputs['placementGroup']}")
            placement["GroupName"] = group["name"]
            group["instances"].append(inputs["instanceType"])
        return placement

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
            return {"id": arguments["instanceId"], "ami": group["Instances"][0]["ImageId"]}
        if args.token == "aws:ec2/getAmi:getAmi":
            filters = [{"Name": item["name"], "Values": item["values"]} for item in arguments.get("filters", [])]
            by_id = [item["Values"][0] for item in filters if item["Name"] == "image-id"]
            images = (self.ec2.describe_images(ImageIds=by_id)["Images"] if by_id else
                      self.ec2.describe_images(Owners=arguments["owners"], Filters=filters)["Images"])
            if not images:
                raise Exception("Your query returned no results. Please change your search criteria and try again.")
            newest = max(images, key=lambda image: image.get("CreationDate", ""))
            return {"id": newest["ImageId"], "imageId": newest["ImageId"], "name": newest["Name"],
                    "architecture": newest["Architecture"]}
        if args.token == "aws:ec2/getSubnet:getSubnet":
            (subnet,) = self.ec2.describe_subnets(SubnetIds=[arguments["id"]])["Subnets"]
            return {"id": subnet["SubnetId"], "vpcId": subnet["VpcId"], "cidrBlock": subnet["CidrBlock"]}
        if args.token == "aws:ec2/getSecurityGroup:getSecurityGroup":
            (group,) = self.ec2.describe_security_groups(GroupIds=[arguments["id"]])["SecurityGroups"]
            return {"id": group["GroupId"], "vpcId": group["VpcId"], "name": group["GroupName"]}
        raise NotImplementedError(args.token)


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
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=subnet_cidr)["Subnet"]["SubnetId"]
    group = ec2.create_security_group(GroupName="flambe-users-own", Description="the user's", VpcId=vpc)["GroupId"]
    ec2.create_key_pair(KeyName="alice-key")
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]
    return {"vpc": vpc, "subnetId": subnet, "securityGroupIds": json.dumps([group]), "keyName": "alice-key",
            "amiName": image["Name"], "amiOwners": json.dumps([image["OwnerId"]]), "image": image["ImageId"]}
