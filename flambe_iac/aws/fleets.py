"""The stack program's own EC2 reads, for what the provider has no data source for: the cluster's live instances
(the record of its launches), EC2's reasons of an instant fleet (by its id: DescribeFleets lists no instant fleet
otherwise), a capacity reservation, and which account the reads see. Read-only; the pages read are bounded."""

from __future__ import annotations

from flambe_iac.aws.client import aws_errors, ec2_client
from flambe_iac.errors import InputError
from flambe_iac.aws.leftovers import LIVE_STATES
from flambe_iac.terminal import safe_field

MAX_INSTANCE_PAGES = 50  # DescribeInstances pages of one cluster's role read (1000 instances a page at most)


class StackReadError(InputError):
    """One of the program's own EC2 reads could not complete; the message says which and why."""


def fleet_order(types: list[str], subnets: list[str]) -> list[tuple[str, str]]:
    """(type, subnet) in EC2 Fleet's priority order, the one order the stack asks in and the preflight reports: the
    first type in each subnet's zone, then the next type."""
    return [(instance_type, subnet) for instance_type in types for subnet in subnets]


def stack_ec2(region: str, profile: str | None):
    """An EC2 client with the stack's aws:profile when it sets one, else boto3's default chain."""
    if not profile:
        return ec2_client(region)
    import boto3

    return boto3.Session(profile_name=profile).client("ec2", region_name=region)


def account_of(region: str, profile: str | None) -> str:
    """The account the reads above see (sts GetCallerIdentity)."""
    import boto3

    with aws_errors("reading which account the stack's own reads use (sts GetCallerIdentity)"):
        session = boto3.Session(profile_name=profile) if profile else boto3.Session()
        return str(session.client("sts", region_name=region).get_caller_identity().get("Account"))


def cluster_instances(ec2, cluster: str, role: str) -> list[dict]:
    """This cluster's live instances of ROLE (stopped ones too: they hold data), filtered by its tags on EC2's side,
    each {id, type, subnet, zone, lifecycle, tags}. Its instances are the record of what the cluster holds:
    DescribeFleets leaves instant fleets out unless asked by id. A read that cannot complete stops the program
    (StackReadError): never "nothing there", for what the program does not declare Pulumi deletes."""
    from botocore.exceptions import BotoCoreError, ClientError

    doing = f"reading the cluster's {role} instances (ec2:DescribeInstances)"
    found = []
    try:
        with aws_errors(doing):
            pages = ec2.get_paginator("describe_instances").paginate(Filters=[
                {"Name": "tag:Cluster-Name", "Values": [cluster]}, {"Name": "tag:Role", "Values": [role]},
                {"Name": "tag:Purpose", "Values": ["flambe"]},
                {"Name": "instance-state-name", "Values": list(LIVE_STATES)}])
            for number, page in enumerate(pages):
                if number >= MAX_INSTANCE_PAGES:
                    raise StackReadError(
                        f"{doing}: more than {MAX_INSTANCE_PAGES} pages of instances answer the cluster's tags "
                        f"(Cluster-Name {cluster}, Role {role}): the program stops rather than plan from part of "
                        f"them; see aws ec2 describe-instances --filters Name=tag:Cluster-Name,Values={cluster}")
                found += [instance_record(item) for group in page.get("Reservations", [])
                          for item in group.get("Instances", [])]
    except (BotoCoreError, ClientError) as error:
        raise StackReadError(f"{doing} failed ({type(error).__name__}: {safe_field(str(error)[:300])}): the program "
                             f"stops rather than take the cluster for empty; run pulumi up again once EC2 answers"
                             ) from None
    return found


def instance_record(item: dict) -> dict:
    return {"id": str(item.get("InstanceId", "")), "type": str(item.get("InstanceType", "")),
            "subnet": str(item.get("SubnetId", "")),
            "zone": str((item.get("Placement") or {}).get("AvailabilityZone", "")),
            "lifecycle": "spot" if item.get("InstanceLifecycle") == "spot" else "on-demand",
            "launched": (str(item.get("LaunchTime", "")), int(item.get("AmiLaunchIndex") or 0)),
            "tags": {str(tag.get("Key")): str(tag.get("Value")) for tag in item.get("Tags") or []}}


def fleet_errors(ec2, fleet_id: str) -> tuple[list[dict], str | None]:
    """(EC2's errors of an instant fleet, or [] with why they could not be read)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        with aws_errors("reading the fleet's errors (DescribeFleets)"):
            fleets = ec2.describe_fleets(FleetIds=[fleet_id]).get("Fleets", [])
    except (BotoCoreError, ClientError) as error:
        return [], f"EC2's reasons could not be read: {type(error).__name__}"
    return list((fleets[0].get("Errors") or []) if fleets else []), None


def capacity_reservation(ec2, reservation_id: str) -> dict | None:
    with aws_errors("reading flambe:capacityReservationId (DescribeCapacityReservations)"):
        found = ec2.describe_capacity_reservations(CapacityReservationIds=[reservation_id]).get(
            "CapacityReservations", [])
    return found[0] if found else None
