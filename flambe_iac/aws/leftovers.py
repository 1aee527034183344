"""Instances that outlive their purpose: every instance tagged Purpose=flambe that is not terminated, read-only.

A CI run cancelled between `pulumi up` and `pulumi destroy`, or a stack whose state was lost, leaves instances that
nothing tracks; their tags (Purpose, Cluster-Name, Role, creator) are what finds them. Tag values are the account's
to set, so they are data: shown only through safe_field and written to JSON as text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from flambe_iac.aws.client import aws_errors
from flambe_iac.aws.preflight import aws
from flambe_iac.errors import InputError

LIVE_STATES = ("pending", "running", "stopping", "stopped")  # stopped instances still cost their volumes


@dataclass(frozen=True)
class FlambeInstance:
    instance_id: str
    cluster: str
    role: str
    creator: str
    instance_type: str
    launch_time: str
    state: str
    in_stack: bool | None = None  # None: no stack was given to say

    @property
    def leftover(self) -> bool:
        return self.in_stack is not True


def find_flambe_instances(ec2, creator: str | None = None, cluster: str | None = None) -> list[FlambeInstance]:
    """Every live instance tagged Purpose=flambe (and CREATOR, CLUSTER when given), oldest first."""
    filters = [{"Name": "tag:Purpose", "Values": ["flambe"]},
               {"Name": "instance-state-name", "Values": list(LIVE_STATES)}]
    filters += [{"Name": "tag:creator", "Values": [creator]}] if creator else []
    filters += [{"Name": "tag:Cluster-Name", "Values": [cluster]}] if cluster else []
    from botocore.exceptions import BotoCoreError, ClientError

    found = []
    try:
        with aws_errors("listing instances (ec2:DescribeInstances)"):
            for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
                found += [flambe_instance(item) for reservation in page.get("Reservations", [])
                          for item in reservation.get("Instances", [])]
    except ClientError as error:
        raise InputError(f"EC2 refused listing instances in {ec2.meta.region_name}: "
                         f"{error.response.get('Error', {}).get('Code', 'an error')}") from None
    except BotoCoreError as error:
        raise InputError(f"cannot list instances in {ec2.meta.region_name}: {error}") from None
    exact = [instance for instance in found  # EC2 reads * and ? in a filter's values as wildcards
             if creator in (None, instance.creator) and cluster in (None, instance.cluster)]
    return sorted(exact, key=lambda instance: (instance.launch_time, instance.instance_id))


def flambe_instance(item: dict) -> FlambeInstance:
    tags = {tag.get("Key"): str(tag.get("Value", "")) for tag in item.get("Tags", []) if isinstance(tag, dict)}
    launched = item.get("LaunchTime")
    return FlambeInstance(
        instance_id=str(item.get("InstanceId", "")), cluster=tags.get("Cluster-Name", "?"),
        role=tags.get("Role", "?"), creator=tags.get("creator", "?"), instance_type=str(item.get("InstanceType", "?")),
        launch_time=launched.isoformat() if hasattr(launched, "isoformat") else str(launched or "?"),
        state=str(item.get("State", {}).get("Name", "?")))


def marked(instances: list[FlambeInstance], named_ids: set[str]) -> list[FlambeInstance]:
    """INSTANCES, each marked in or out of the stack whose outputs name NAMED_IDS."""
    return [FlambeInstance(**{**asdict(instance), "in_stack": instance.instance_id in named_ids})
            for instance in instances]


def terminate_line(region: str, leftovers: list[FlambeInstance]) -> str:
    return aws("ec2", "terminate-instances", "--region", region, "--instance-ids",
               *(instance.instance_id for instance in leftovers))


def leftovers_report(region: str, instances: list[FlambeInstance], stack: str | None) -> dict:
    leftovers = [instance for instance in instances if instance.leftover]
    return {"region": region, "stack": stack, "leftovers": len(leftovers),
            "instances": [{**asdict(instance), "leftover": instance.leftover} for instance in instances],
            "terminate": terminate_line(region, leftovers) if leftovers else None}
