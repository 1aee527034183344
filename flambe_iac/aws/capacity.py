"""The offering and quota preflight: which (instance type, zone) candidates can hold the cluster, read-only.

EC2 Fleet tries the factories' overrides in the order given, types outer and subnets inner. For each candidate this
reads whether the subnet's zone offers the type (DescribeInstanceTypeOfferings) and whether the account's vCPU quota
for the type's family (Service Quotas; on-demand and spot are separate quotas) minus the vCPUs running now holds the
factories, and the orchestrator too when it draws on the same quota. The orchestrator (always on-demand) takes the
first of its types that the chosen zone offers and that its quota holds.

EC2's and Service Quotas' answers are untrusted: a number that is not one, a field that is missing, a listing that
does not end becomes a cause in words, never a traceback.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field

from flambe_iac.aws.client import aws_errors
from flambe_iac.aws.fleets import fleet_order
from flambe_iac.aws.network import describe_one
from flambe_iac.aws.preflight import FAIL, PASS, SKIP, Finding, aws
from flambe_iac.errors import InputError

ON_DEMAND, SPOT, FALLBACK = "on-demand", "spot", "fallback"
MARKETS_ASKED = {ON_DEMAND: (ON_DEMAND,), SPOT: (SPOT,), FALLBACK: (SPOT, ON_DEMAND)}  # spot first, as the fleet does

# The vCPU quotas of EC2 per family (AWS General Reference, "Amazon EC2 instance type quotas"): the letters before
# the generation's digit -> (on-demand quota, spot quota). HPC and High Memory types have no spot quota.
STANDARD = ("L-1216C47A", "L-34B43A08")
FAMILY_QUOTAS = {
    **{letters: STANDARD for letters in ("a", "c", "d", "h", "i", "im", "is", "m", "r", "t", "z")},
    "g": ("L-DB2E81BA", "L-3819A6DF"), "gr": ("L-DB2E81BA", "L-3819A6DF"), "vt": ("L-DB2E81BA", "L-3819A6DF"),
    "p": ("L-417A185B", None),  # spot: by generation, below
    "f": ("L-74FC7D96", "L-88CF9481"), "inf": ("L-1945791B", "L-B5D1601B"), "trn": ("L-2C3B7624", "L-6B0D517C"),
    "x": ("L-7295265B", "L-E3A00192"), "dl": ("L-6E869C2A", "L-85EED4F7"), "hpc": ("L-F7808C92", None),
    "u": ("L-43DA4232", None),
}
P_SPOT_QUOTAS = {"2": "L-7212CCBC", "3": "L-7212CCBC", "4": "L-7212CCBC", "5": "L-C4BD4855"}
QUOTA_NAMES = {
    "L-1216C47A": "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances",
    "L-34B43A08": "All Standard (A, C, D, H, I, M, R, T, Z) Spot Instance Requests",
    "L-DB2E81BA": "Running On-Demand G and VT instances", "L-3819A6DF": "All G and VT Spot Instance Requests",
    "L-417A185B": "Running On-Demand P instances", "L-7212CCBC": "All P4, P3 and P2 Spot Instance Requests",
    "L-C4BD4855": "All P5 Spot Instance Requests",
    "L-74FC7D96": "Running On-Demand F instances", "L-88CF9481": "All F Spot Instance Requests",
    "L-1945791B": "Running On-Demand Inf instances", "L-B5D1601B": "All Inf Spot Instance Requests",
    "L-2C3B7624": "Running On-Demand Trn instances", "L-6B0D517C": "All Trn Spot Instance Requests",
    "L-7295265B": "Running On-Demand X instances", "L-E3A00192": "All X Spot Instance Requests",
    "L-6E869C2A": "Running On-Demand DL instances", "L-85EED4F7": "All DL Spot Instance Requests",
    "L-F7808C92": "Running On-Demand HPC instances", "L-43DA4232": "Running On-Demand High Memory instances",
}
FAMILY = re.compile(r"([a-z]+)-?(\d?)")
RUNNING_TYPE = re.compile(r"[a-z][a-z0-9-]{0,30}\.[a-z0-9-]{1,30}")  # what EC2 names a type; anything else is noise
LIVE = ("pending", "running")  # a pending instance runs within seconds: count it
MAX_PAGES = 200
MAX_VCPUS = 100_000  # more than any instance type has: a larger answer is not a vCPU count
MAX_QUOTA = 10_000_000
DEADLINE = 120.0  # seconds for every read of one check together
BATCH = 100  # DescribeInstanceTypes takes at most 100 types a call


def quota_code(instance_type: str, market: str) -> str | None:
    """The vCPU quota INSTANCE_TYPE draws on in MARKET, or None if its family has none known."""
    match = FAMILY.match(instance_type)
    if match is None or match.group(1) not in FAMILY_QUOTAS:
        return None
    letters, generation = match.groups()
    on_demand, spot = FAMILY_QUOTAS[letters]
    if market == ON_DEMAND:
        return on_demand
    return P_SPOT_QUOTAS.get(generation) if letters == "p" else spot


@dataclass(frozen=True)
class Quota:
    """One vCPU quota: its value and what runs against it now; CAUSE says why a number could not be read."""

    code: str
    value: int | None = None
    in_use: int | None = None
    cause: str | None = None

    @property
    def free(self) -> int | None:
        return None if self.value is None or self.in_use is None else self.value - self.in_use


@dataclass
class Reading:
    """What EC2 and Service Quotas said, for the stack's lists."""

    region: str
    zones: dict[str, str | None] = field(default_factory=dict)  # subnet -> zone (None: no such subnet)
    offered: set[tuple[str, str]] = field(default_factory=set)  # (type, zone)
    vcpus: dict[str, int | str] = field(default_factory=dict)  # type -> vCPUs, or the cause in words
    quotas: dict[str, Quota] = field(default_factory=dict)


@dataclass(frozen=True)
class Shape:
    """What the stack asks for: preference lists in EC2 Fleet's order, the count, and the market (flambe:spot)."""

    factory_types: list[str]
    orchestrator_types: list[str]
    subnet_ids: list[str]
    factory_count: int
    market: str = ON_DEMAND
    reservation: str | None = None  # the factories launch into this capacity reservation (its vCPUs are counted)


@dataclass(frozen=True)
class Verdict:
    """Whether a candidate holds the cluster in one market: True, False, or None (cannot tell, CAUSE says why).
    SHORT: each quota that is too small, with the value that would hold the cluster (in use + needed)."""

    market: str
    fits: bool | None
    cause: str
    orchestrator: str | None = None
    short: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Candidate:
    rank: int
    instance_type: str
    subnet_id: str
    zone: str | None
    offered: bool
    vcpus: int | str
    verdicts: tuple[Verdict, ...] = ()

    @property
    def fits(self) -> bool:
        return any(verdict.fits for verdict in self.verdicts)


def service_quotas_client(ec2):
    """Service Quotas in EC2's region, with bounded waits (each read also counts against DEADLINE)."""
    import boto3
    from botocore.config import Config

    return boto3.client("service-quotas", region_name=ec2.meta.region_name,
                        config=Config(connect_timeout=10, read_timeout=30, retries={"max_attempts": 3}))


def read_capacity(ec2, quotas, shape: Shape, deadline: float = DEADLINE) -> Reading:
    """Everything the verdicts need, read-only: zones, offerings, vCPUs, quotas and what runs now."""
    from botocore.exceptions import BotoCoreError, ClientError

    region = ec2.meta.region_name
    reading = Reading(region)
    until = time.monotonic() + deadline
    try:
        with aws_errors("reading capacity (ec2:DescribeSubnets, ec2:DescribeInstanceTypeOfferings, "
                        "ec2:DescribeInstanceTypes, ec2:DescribeInstances, servicequotas:GetServiceQuota)"):
            reading.zones = subnet_zones(ec2, shape.subnet_ids)
            types = list(dict.fromkeys([*shape.factory_types, *shape.orchestrator_types]))
            zones = sorted({zone for zone in reading.zones.values() if zone})
            reading.offered = offerings(ec2, types, zones, until) if zones else set()
            running = running_instances(ec2, until)
            reading.vcpus = instance_vcpus(ec2, list(dict.fromkeys([*types, *(t for t, _ in running)])))
            codes = {quota_code(instance_type, market) for instance_type in shape.factory_types
                     for market in MARKETS_ASKED[shape.market]}
            codes |= {quota_code(instance_type, ON_DEMAND) for instance_type in shape.orchestrator_types}
            if shape.reservation is not None:  # the reservation holds the capacity: no quota verdict to give
                codes = set()
            usage, unreadable = vcpus_in_use(running, reading.vcpus)
            for code in sorted(codes - {None}):
                reading.quotas[code] = read_quota(quotas, code, usage, unreadable, until)
    except ClientError as error:
        raise InputError(f"AWS refused reading capacity in {region} "
                         f"({error.response.get('Error', {}).get('Code', 'an error')}): check needs ec2:Describe* and "
                         "servicequotas:GetServiceQuota") from None
    except BotoCoreError as error:
        raise InputError(f"cannot read capacity in {region}: {error}") from None
    return reading


def pages(client, operation: str, until: float, **arguments):
    """The pages of a listing, each checked to be a mapping; a listing that does not end in time is an error."""
    paginator = client.get_paginator(operation)
    for number, page in enumerate(paginator.paginate(**arguments)):
        if number >= MAX_PAGES or time.monotonic() > until:
            raise InputError(f"{operation} did not finish within {MAX_PAGES} pages and {DEADLINE:.0f} s in "
                             f"{client.meta.region_name}: try again, or narrow the stack's lists")
        yield page if isinstance(page, dict) else {}


def items(document, key: str) -> list[dict]:
    found = document.get(key) if isinstance(document, dict) else None
    return [item for item in found if isinstance(item, dict)] if isinstance(found, list) else []


def subnet_zones(ec2, subnet_ids: list[str]) -> dict[str, str | None]:
    """subnet -> its Availability Zone, or None if EC2 does not know the subnet."""
    zones = {}
    for subnet_id in subnet_ids:
        subnet = describe_one(ec2.describe_subnets, "Subnets", SubnetIds=[subnet_id])
        zone = subnet.get("AvailabilityZone") if isinstance(subnet, dict) else None
        zones[subnet_id] = zone if isinstance(zone, str) and zone else None
    return zones


def offerings(ec2, types: list[str], zones: list[str], until: float) -> set[tuple[str, str]]:
    found = set()
    for page in pages(ec2, "describe_instance_type_offerings", until, LocationType="availability-zone",
                      Filters=[{"Name": "instance-type", "Values": types}, {"Name": "location", "Values": zones}]):
        for offer in items(page, "InstanceTypeOfferings"):
            if isinstance(offer.get("InstanceType"), str) and isinstance(offer.get("Location"), str):
                found.add((offer["InstanceType"], offer["Location"]))
    return found


def running_instances(ec2, until: float) -> list[tuple[str, str]]:
    """(type, market) of every pending or running instance in the region: spot, or on-demand (the rest but
    scheduled and capacity-block instances, which draw on no vCPU quota here)."""
    found = []
    for page in pages(ec2, "describe_instances", until,
                      Filters=[{"Name": "instance-state-name", "Values": list(LIVE)}]):
        for reservation in items(page, "Reservations"):
            for instance in items(reservation, "Instances"):
                lifecycle = instance.get("InstanceLifecycle")
                market = SPOT if lifecycle == SPOT else ON_DEMAND if lifecycle in (None, "") else None
                instance_type = instance.get("InstanceType")
                if market is not None and isinstance(instance_type, str) and RUNNING_TYPE.fullmatch(instance_type):
                    found.append((instance_type, market))
    return found


def instance_vcpus(ec2, types: list[str]) -> dict[str, int | str]:
    """type -> its default vCPUs, or why that is unknown; a type EC2 does not know is asked about alone."""
    from botocore.exceptions import ClientError

    answers: dict[str, int | str] = {}
    for start in range(0, len(types), BATCH):
        batch = types[start:start + BATCH]
        try:
            found = items(ec2.describe_instance_types(InstanceTypes=batch), "InstanceTypes")
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "InvalidInstanceType":
                raise
            if len(batch) == 1:
                answers[batch[0]] = f"{batch[0]} is not an instance type in {ec2.meta.region_name}"
            else:
                for instance_type in batch:
                    answers.update(instance_vcpus(ec2, [instance_type]))
            continue
        for item in found:
            if isinstance(item.get("InstanceType"), str) and item["InstanceType"] in batch:
                answers[item["InstanceType"]] = vcpu_count(item)
    for instance_type in types:
        answers.setdefault(instance_type, f"EC2 did not describe {instance_type}")
    return answers


def vcpu_count(item: dict) -> int | str:
    count = item.get("VCpuInfo", {}).get("DefaultVCpus") if isinstance(item.get("VCpuInfo"), dict) else None
    if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= MAX_VCPUS:
        return f"EC2 gave no vCPU count for {item['InstanceType']} ({str(count)[:20]!r})"
    return count


def vcpus_in_use(running: list[tuple[str, str]], vcpus: dict[str, int | str]) -> tuple[Counter, dict[str, str]]:
    """vCPUs in use per quota code, and the codes whose use cannot be read (a running type without a count)."""
    usage, unreadable = Counter(), {}
    for instance_type, market in running:
        code = quota_code(instance_type, market)
        if code is None:
            continue
        count = vcpus.get(instance_type)
        if isinstance(count, int):
            usage[code] += count
        else:
            unreadable[code] = f"a running {instance_type}'s vCPUs are unknown: {count}"
    return usage, unreadable


def read_quota(quotas, code: str, usage: Counter, unreadable: dict[str, str], until: float) -> Quota:
    """The quota's applied value; what it cannot be read is said, not guessed."""
    if time.monotonic() > until:
        raise InputError(f"Service Quotas did not answer within {DEADLINE:.0f} s: try again")
    try:
        answer = quotas.get_service_quota(ServiceCode="ec2", QuotaCode=code)
    except quotas.exceptions.NoSuchResourceException:
        return Quota(code, cause=f"Service Quotas has no value for {code} in {quotas.meta.region_name}")
    value = answer.get("Quota", {}).get("Value") if isinstance(answer.get("Quota"), dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_QUOTA \
            or (isinstance(value, float) and not math.isfinite(value)):
        return Quota(code, cause=f"Service Quotas gave {code} the value {str(value)[:20]!r}, not a vCPU count")
    if code in unreadable:
        return Quota(code, int(value), cause=unreadable[code])
    return Quota(code, int(value), usage[code])


def candidates(shape: Shape, reading: Reading) -> list[Candidate]:
    """Every factory candidate in EC2 Fleet's order, each with its verdict in every market the stack asks."""
    found = []
    for instance_type, subnet_id in fleet_order(shape.factory_types, shape.subnet_ids):
        zone = reading.zones.get(subnet_id)
        offered = zone is not None and (instance_type, zone) in reading.offered
        candidate = Candidate(len(found) + 1, instance_type, subnet_id, zone, offered,
                              reading.vcpus.get(instance_type, "unknown"))
        if offered and shape.reservation is None:
            candidate = Candidate(**{**candidate.__dict__, "verdicts": tuple(
                market_verdict(shape, reading, candidate, market) for market in MARKETS_ASKED[shape.market])})
        found.append(candidate)
    return found


def market_verdict(shape: Shape, reading: Reading, candidate: Candidate, market: str) -> Verdict:
    code = quota_code(candidate.instance_type, market)
    if code is None:
        return Verdict(market, None, f"no {market} vCPU quota is known for {candidate.instance_type}'s family: "
                                     "check the Service Quotas console")
    if isinstance(candidate.vcpus, str):
        return Verdict(market, None, candidate.vcpus)
    factories = Counter({code: shape.factory_count * candidate.vcpus})
    first: Verdict | None = None
    for orchestrator in shape.orchestrator_types:
        if (orchestrator, candidate.zone) not in reading.offered:
            continue
        verdict = quotas_verdict(reading, market, factories, orchestrator)
        if verdict.fits:
            return verdict
        first = first or verdict
    return first or Verdict(market, False, f"{candidate.zone} offers none of the orchestrator's types "
                                           f"({', '.join(shape.orchestrator_types)})")


def quotas_verdict(reading: Reading, market: str, factories: Counter, orchestrator: str) -> Verdict:
    """Whether the quotas hold the factories and ORCHESTRATOR (on-demand) together."""
    code = quota_code(orchestrator, ON_DEMAND)
    count = reading.vcpus.get(orchestrator, "unknown")
    if code is None or isinstance(count, str):
        return Verdict(market, None, f"orchestrator {orchestrator}: "
                                     + (count if isinstance(count, str) else "no on-demand vCPU quota is known for "
                                                                             "its family"), orchestrator)
    needs = factories + Counter({code: count})
    short, unknown, held = [], [], []
    for need_code, need in sorted(needs.items()):
        quota = reading.quotas.get(need_code, Quota(need_code, cause=f"{need_code} was not read"))
        if quota.value is not None and quota.value < need:  # too small even with nothing running
            short.append((need_code, need + (quota.in_use or 0)))
        elif quota.free is None:
            unknown.append(quota.cause or f"{need_code} could not be read")
        elif quota.free < need:
            short.append((need_code, quota.in_use + need))
        else:
            held.append(f"needs {need} of {quota.free} free in {need_code}")
    if short:
        return Verdict(market, False, "; ".join(f"needs {needs[c]} vCPUs of {c}, "
                                                f"{describe_free(reading.quotas.get(c))}" for c, _ in short),
                       orchestrator, tuple(short))
    if unknown:
        return Verdict(market, None, "; ".join(unknown), orchestrator)
    return Verdict(market, True, ", ".join(held), orchestrator)


def describe_free(quota: Quota | None) -> str:
    if quota is None or quota.value is None:
        return "unknown free"
    if quota.in_use is None:
        return f"quota {quota.value}"
    return f"{max(quota.free, 0)} free (quota {quota.value}, {quota.in_use} in use)"


def first_fit(found: list[Candidate]) -> Candidate | None:
    return next((candidate for candidate in found if candidate.fits), None)


def increase_lines(found: list[Candidate], region: str) -> tuple[str, ...]:
    """For the first candidate that a quota holds back, the requests that would raise each short quota (in the first
    market asked) to what runs now plus what the cluster needs."""
    short = next((verdict.short for candidate in found for verdict in candidate.verdicts if verdict.short), ())
    return tuple(aws("service-quotas", "request-service-quota-increase", "--service-code", "ec2", "--quota-code",
                     code, "--desired-value", str(desired), "--region", region) for code, desired in short)


def capacity_finding(shape: Shape, found: list[Candidate], region: str) -> Finding:
    check = "capacity"
    chosen = first_fit(found)
    if chosen is not None:
        verdict = next(verdict for verdict in chosen.verdicts if verdict.fits)
        return Finding(PASS, check, f"#{chosen.rank} {chosen.instance_type} in {chosen.zone} ({chosen.subnet_id}) "
                                    f"holds {shape.factory_count} factor{'y' if shape.factory_count == 1 else 'ies'} "
                                    f"{verdict.market} and the orchestrator {verdict.orchestrator}")
    if not any(candidate.offered for candidate in found):
        return Finding(FAIL, check, "no zone of the subnets offers any of the factory types: add a type or a subnet "
                                    "in another zone (pulumi config set --path 'flambe:subnetIds[N]' subnet-...)")
    if shape.reservation is not None:
        return Finding(SKIP, check, f"the factories launch into {shape.reservation}, which holds their capacity "
                                    "(AWS counts its vCPUs against the on-demand quota already): the table shows "
                                    "what the zones offer")
    increases = increase_lines(found, region)
    if any(verdict.fits is None for candidate in found for verdict in candidate.verdicts):
        return Finding(SKIP, check, "no candidate is known to hold the cluster, and some could not be read "
                                    "(the table says why)", increases)
    if not increases:
        return Finding(FAIL, check, "no candidate holds the cluster: the table says why for each")
    return Finding(FAIL, check, "no candidate holds the cluster within the account's vCPU quotas: request an "
                                "increase (it takes effect when AWS approves it)", increases)
