"""The stack program's own EC2 reads, for what the provider has no data source for: the cluster's instant fleets
(what each launched, and EC2's reason for what it did not), which of their instances still live, and which account
the reads see. Read-only; the pages read are bounded.
"""

from __future__ import annotations

from flambe_iac.aws.client import aws_errors, ec2_client
from flambe_iac.aws.leftovers import LIVE_STATES

MAX_FLEET_PAGES = 20  # DescribeFleets pages read (1000 fleets a page at most)
IDS_A_CALL = 200  # instance ids in one DescribeInstances filter


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


def fleet_records(ec2, cluster: str, role: str) -> list[dict]:
    """This cluster's instant fleets of ROLE, as DescribeFleets has them, each with its tags as a dict in `tags`."""
    found = []
    with aws_errors("reading the cluster's fleets (DescribeFleets)"):
        pages = ec2.get_paginator("describe_fleets").paginate(Filters=[{"Name": "type", "Values": ["instant"]}])
        for number, page in enumerate(pages):
            if number >= MAX_FLEET_PAGES:
                break
            for item in page.get("Fleets", []):
                tags = {tag.get("Key"): tag.get("Value") for tag in item.get("Tags") or []}
                if tags.get("Cluster-Name") == cluster and tags.get("Role") == role and \
                        tags.get("Purpose") == "flambe":
                    found.append({**item, "tags": tags})
    return found


def live_ids(ec2, instance_ids: list[str]) -> dict[str, tuple[str, str]]:
    """{instance id: (subnet, zone)} of those of INSTANCE_IDS that still live (stopped ones too: they hold data)."""
    live = {}
    with aws_errors("reading which of the cluster's instances live (DescribeInstances)"):
        for start in range(0, len(instance_ids), IDS_A_CALL):
            pages = ec2.get_paginator("describe_instances").paginate(Filters=[
                {"Name": "instance-id", "Values": instance_ids[start:start + IDS_A_CALL]},
                {"Name": "instance-state-name", "Values": list(LIVE_STATES)}])
            for page in pages:
                for item in (found for group in page.get("Reservations", []) for found in group.get("Instances", [])):
                    live[item["InstanceId"]] = (str(item.get("SubnetId", "")),
                                                str((item.get("Placement") or {}).get("AvailabilityZone", "")))
    return live


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
