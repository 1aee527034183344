"""`flambe-deploy check`'s offering and quota preflight against moto's EC2 and Service Quotas (moto answers no EC2
quota: its backend is given the values here, and they travel through botocore as AWS's would), and botocore's
Stubber where moto cannot say what a hostile EC2 says."""

import datetime
import json

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws
from moto.servicequotas.exceptions import NoSuchResource
from moto.servicequotas.models import ServiceQuotasBackend

from flambe_iac.aws.capacity import (ON_DEMAND, SPOT, Shape, candidates, quota_code, read_capacity)
from flambe_iac.cli.deploy import main as deploy_main
from flambe_iac.errors import InputError

REGION = "us-east-1"
STANDARD_ON_DEMAND, STANDARD_SPOT = "L-1216C47A", "L-34B43A08"
IMAGE = "ami-12c6146b"  # one of moto's images


@pytest.fixture
def account(monkeypatch):
    """moto's EC2 and Service Quotas; the dict returned holds the account's EC2 vCPU quotas, code -> value."""
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(variable, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    quotas = {}

    def get_service_quota(self, service_code, quota_code):
        if service_code != "ec2" or quota_code not in quotas:
            raise NoSuchResource()
        return {"ServiceCode": "ec2", "QuotaCode": quota_code, "Value": quotas[quota_code], "Unit": "None"}

    monkeypatch.setattr(ServiceQuotasBackend, "get_service_quota", get_service_quota)
    with mock_aws():
        yield boto3.client("ec2", region_name=REGION), quotas


def network(ec2, zones=("us-east-1a", "us-east-1b", "us-east-1c")):
    """A VPC with one subnet in each of ZONES, a group that lets everything in, and a key pair."""
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{number}.0/24", AvailabilityZone=zone)["Subnet"]
               ["SubnetId"] for number, zone in enumerate(zones)]
    group = ec2.create_security_group(GroupName="mine", Description="mine", VpcId=vpc)["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[
        {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    ec2.create_key_pair(KeyName="alice-key")
    return {"subnets": subnets, "group": group}


def write_config(tmp_path, net, **keys):
    """A stack config with the network and KEYS (flambe:KEY: value; lists as YAML lists)."""
    lines = ["config:", "  aws:region: us-east-1", "  flambe:keyName: alice-key",
             "  flambe:securityGroupIds:", f"    - {net['group']}"]
    keys.setdefault("subnetIds", net["subnets"])
    for key, value in keys.items():
        if value == []:
            lines.append(f"  flambe:{key}: []")
        elif isinstance(value, list):
            lines += [f"  flambe:{key}:", *(f"    - {item}" for item in value)]
        else:
            lines.append(f"  flambe:{key}: {value!r}" if isinstance(value, str) else f"  flambe:{key}: {value}")
    path = tmp_path / "Pulumi.dev.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def check(capsys, config, *more):
    code = deploy_main(["check", "--config", str(config), "--from", "203.0.113.7/32", *more])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table_row(out, rank):
    return next(line for line in out.splitlines() if line[5:9].strip() == str(rank))


def increase(code, value):
    return (f"fix: aws service-quotas request-service-quota-increase --service-code ec2 --quota-code {code} "
            f"--desired-value {value} --region {REGION}")


def test_a_type_zone_a_does_not_offer_marks_the_candidate_in_zone_b(account, tmp_path, capsys):
    ec2, quotas = account
    quotas.update({"L-2C3B7624": 256, STANDARD_ON_DEMAND: 32})  # Trn on-demand; the orchestrator's
    net = network(ec2, zones=("us-east-1a", "us-east-1b"))  # moto's trn1.32xlarge: offered in b, c, f; not in a
    code, out, err = check(capsys, write_config(tmp_path, net, factoryTypes=["trn1.32xlarge"], factoryCount=2))
    assert code == 0, out + err
    first, second = table_row(out, 1), table_row(out, 2)
    assert "us-east-1a does not offer trn1.32xlarge" in first and not first.startswith("  ->")
    assert second.startswith("  ->") and "us-east-1b" in second and "on-demand fits" in second
    assert f"PASS  capacity: #2 trn1.32xlarge in us-east-1b ({net['subnets'][1]}) holds 2 factories on-demand" in out


def test_types_are_tried_outer_and_subnets_inner_as_ec2_fleet_does(account, tmp_path, capsys):
    ec2, quotas = account
    quotas.update({"L-2C3B7624": 256, "L-417A185B": 0, STANDARD_ON_DEMAND: 32})
    net = network(ec2, zones=("us-east-1a", "us-east-1b"))
    code, out, _ = check(capsys, write_config(tmp_path, net, factoryTypes=["p4d.24xlarge", "trn1.32xlarge"]))
    assert code == 0, out
    assert [table_row(out, rank)[10:26].strip() for rank in (1, 2, 3, 4)] == \
        ["p4d.24xlarge", "p4d.24xlarge", "trn1.32xlarge", "trn1.32xlarge"]
    assert "too small: needs 96 vCPUs of L-417A185B, 0 free (quota 0, 0 in use)" in table_row(out, 1)
    assert table_row(out, 4).startswith("  ->")


@pytest.mark.parametrize("spot, exit_code", [("false", 1), ("true", 0), ("fallback", 0), ("0.25", 0)])
def test_the_spot_setting_chooses_the_quota(account, tmp_path, capsys, spot, exit_code):
    ec2, quotas = account
    quotas.update({STANDARD_ON_DEMAND: 10, STANDARD_SPOT: 64})  # 4 m5.2xlarge: 32 vCPUs
    net = network(ec2)
    config = write_config(tmp_path, net, factoryTypes=["m5.2xlarge"], factoryCount=4, spot=spot)
    code, out, _ = check(capsys, config)
    assert code == exit_code, out
    if exit_code:
        assert increase(STANDARD_ON_DEMAND, 34) in out  # 32 for the factories + 2 for the orchestrator, 0 in use
    else:
        assert "holds 4 factories spot and the orchestrator m5.large" in out


def test_fallback_fits_on_demand_when_the_spot_quota_is_short(account, tmp_path, capsys):
    ec2, quotas = account
    quotas.update({STANDARD_ON_DEMAND: 64, STANDARD_SPOT: 8})
    net = network(ec2)
    code, out, _ = check(capsys, write_config(tmp_path, net, factoryTypes=["m5.2xlarge"], factoryCount=4,
                                              spot="fallback"))
    assert code == 0, out
    assert "spot too small: needs 32 vCPUs of L-34B43A08" in table_row(out, 1)
    assert "holds 4 factories on-demand" in out


@pytest.mark.parametrize("orchestrators, exit_code, words", [
    (["trn1.32xlarge"], 1, "us-east-1a offers none of the orchestrator's types (trn1.32xlarge)"),
    (["trn1.32xlarge", "m5.large"], 0, "on-demand fits: needs 4 of 32 free in L-1216C47A (orchestrator m5.large)"),
    (["p4d.24xlarge"], 1, increase("L-417A185B", 96)),
])
def test_the_orchestrator_takes_the_first_of_its_types_the_zone_offers_and_its_quota_holds(
        account, tmp_path, capsys, orchestrators, exit_code, words):
    ec2, quotas = account
    quotas.update({STANDARD_ON_DEMAND: 32, "L-417A185B": 0})
    config = write_config(tmp_path, network(ec2, zones=("us-east-1a",)), factoryTypes=["m5.large"],
                          orchestratorTypes=orchestrators)  # moto offers trn1.32xlarge in b, c and f only
    code, out, _ = check(capsys, config)
    assert code == exit_code, out
    assert words in out


def test_running_instances_count_against_the_quota_and_the_increase_line_says_so(account, tmp_path, capsys):
    ec2, quotas = account
    quotas.update({STANDARD_ON_DEMAND: 12, STANDARD_SPOT: 100})
    net = network(ec2)
    config = write_config(tmp_path, net, factoryTypes=["m5.xlarge"], factoryCount=2)  # 2 x 4 + 2 = 10 vCPUs
    assert check(capsys, config)[0] == 0
    ec2.run_instances(ImageId=IMAGE, MinCount=2, MaxCount=2, InstanceType="m5.large", SubnetId=net["subnets"][0])
    spot = ec2.run_instances(ImageId=IMAGE, MinCount=1, MaxCount=1, InstanceType="c5.4xlarge",
                             SubnetId=net["subnets"][0], InstanceMarketOptions={"MarketType": "spot"})
    assert spot["Instances"][0].get("InstanceLifecycle") == "spot"
    code, out, _ = check(capsys, config)
    assert code == 1, out
    assert f"quota {STANDARD_ON_DEMAND} (Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances): " \
           "12 vCPUs, 4 in use" in out  # the spot instance counts against the spot quota, not this one
    assert "FAIL  capacity: no candidate holds the cluster" in out
    assert increase(STANDARD_ON_DEMAND, 14) in out  # 4 in use + 10 needed


def test_the_report_holds_the_findings_and_the_table(account, tmp_path, capsys):
    ec2, quotas = account
    quotas.update({STANDARD_ON_DEMAND: 4})
    report = tmp_path / "check.json"
    code, out, _ = check(capsys, write_config(tmp_path, network(ec2, zones=("us-east-1a",)),
                                              factoryTypes=["m5.xlarge"]), "--report", str(report))
    assert code == 1, out
    written = json.loads(report.read_text())
    assert written["capacity"]["chosen"] is None
    assert written["capacity"]["candidates"][0]["verdicts"][0] == {
        "market": "on-demand", "fits": False, "orchestrator": "m5.large",
        "cause": "needs 6 vCPUs of L-1216C47A, 4 free (quota 4, 0 in use)"}
    assert written["findings"][-1]["fixes"] == [increase(STANDARD_ON_DEMAND, 6)[len("fix: "):]]


def test_the_check_only_reads(account, tmp_path, capsys):
    ec2, quotas = account
    quotas.update({STANDARD_ON_DEMAND: 4})
    net = network(ec2)
    ec2.run_instances(ImageId=IMAGE, MinCount=1, MaxCount=1, InstanceType="m5.large", SubnetId=net["subnets"][0])
    calls = []
    boto3.setup_default_session()
    boto3.DEFAULT_SESSION.events.register("before-call", lambda model, **_: calls.append(model.name))

    def state():
        return (ec2.describe_instances()["Reservations"], ec2.describe_subnets()["Subnets"],
                ec2.describe_security_groups()["SecurityGroups"], ec2.describe_key_pairs()["KeyPairs"],
                ec2.describe_network_acls()["NetworkAcls"])

    before = state()
    code, out, _ = check(capsys, write_config(tmp_path, net, factoryTypes=["m5.xlarge", "c5.xlarge"],
                                              factoryCount=3))
    assert code == 1, out
    assert state() == before
    assert {"DescribeInstanceTypeOfferings", "DescribeInstanceTypes", "DescribeInstances", "GetServiceQuota"} \
        <= set(calls)
    assert all(name.startswith(("Describe", "Get")) for name in calls), calls


def test_a_reservation_holds_the_capacity_so_only_offerings_are_checked(account, tmp_path, capsys):
    ec2, quotas = account
    quotas.update({STANDARD_ON_DEMAND: 0})
    code, out, _ = check(capsys, write_config(tmp_path, network(ec2, zones=("us-east-1a",)), factoryTypes=["m5.large"],
                                              capacityReservationId="cr-0abc"))
    assert code == 0, out
    assert "SKIP  capacity: the factories launch into cr-0abc" in out
    assert "quota L-" not in out


def test_a_list_and_its_one_item_key_together_are_bad_input(account, tmp_path, capsys):
    ec2, _ = account
    net = network(ec2)
    code, _, err = check(capsys, write_config(tmp_path, net, factoryTypes=["m5.large"], factoryType="c5.large"))
    assert code == 2
    assert "both flambe:factoryTypes and flambe:factoryType are set" in err
    assert "pulumi config rm flambe:factoryType" in err


@pytest.mark.parametrize("keys, words", [
    ({"factoryCount": "many"}, "flambe:factoryCount is 'many'; give a whole number"),
    ({"spot": "sometimes"}, "flambe:spot is 'sometimes'; give false, true, fallback"),
    ({"factoryTypes": ["m5.large; rm -rf"]}, "is not an instance type"),
    ({"factoryTypes": []}, "flambe:factoryTypes is empty"),
])
def test_bad_capacity_settings_are_bad_input_in_words(account, tmp_path, capsys, keys, words):
    ec2, _ = account
    code, _, err = check(capsys, write_config(tmp_path, network(ec2), **keys))
    assert code == 2
    assert words in err


def defaults_only_config(tmp_path, net):
    """A stack config that names no capacity key: one flambe:subnetId, so m5.large, one factory, on-demand."""
    path = tmp_path / "Pulumi.dev.yaml"
    path.write_text(f"config:\n  aws:region: us-east-1\n  flambe:keyName: alice-key\n"
                    f"  flambe:subnetId: {net['subnets'][0]}\n  flambe:securityGroupIds:\n    - {net['group']}\n")
    return path


def test_a_config_with_only_the_defaults_gets_the_capacity_of_the_m5_large_it_launches(account, tmp_path, capsys):
    ec2, quotas = account
    config = defaults_only_config(tmp_path, network(ec2, zones=("us-east-1a",)))
    quotas.update({STANDARD_ON_DEMAND: 2})  # an m5.large factory and an m5.large orchestrator need 4
    code, out, err = check(capsys, config)
    assert code == 1, out + err
    assert "capacity: 1 factory (on-demand) and an orchestrator (on-demand: m5.large)" in out
    assert "m5.large" in table_row(out, 1) and "us-east-1a" in table_row(out, 1)
    assert increase(STANDARD_ON_DEMAND, 4) in out
    quotas.update({STANDARD_ON_DEMAND: 32})
    code, out, err = check(capsys, config)
    assert code == 0 and "PASS  capacity: #1 m5.large in us-east-1a" in out, out + err


def test_a_quota_moto_cannot_read_is_a_skip_for_a_defaults_only_config(account, tmp_path, capsys):
    ec2, _ = account
    code, out, err = check(capsys, defaults_only_config(tmp_path, network(ec2, zones=("us-east-1a",))))
    assert code == 0, out + err
    assert "Service Quotas has no value for L-1216C47A in us-east-1" in table_row(out, 1)
    assert "SKIP  capacity: no candidate is known to hold the cluster" in out


def test_a_quota_that_is_not_a_number_is_a_cause_in_words(account, tmp_path, capsys):
    ec2, quotas = account
    quotas.update({STANDARD_ON_DEMAND: "lots"})
    code, out, err = check(capsys, write_config(tmp_path, network(ec2), factoryTypes=["m5.large"]))
    assert code == 0, out + err  # cannot tell is not a failure
    assert "Service Quotas gave L-1216C47A the value 'lots', not a vCPU count" in out
    assert "SKIP  capacity: no candidate is known to hold the cluster" in out
    assert "Traceback" not in out + err


def test_a_family_without_a_known_quota_says_so(account, tmp_path, capsys):
    ec2, quotas = account
    quotas.update({STANDARD_ON_DEMAND: 100})
    zone = ec2.describe_instance_type_offerings(LocationType="availability-zone", Filters=[
        {"Name": "instance-type", "Values": ["mac1.metal"]}])["InstanceTypeOfferings"][0]["Location"]
    code, out, _ = check(capsys, write_config(tmp_path, network(ec2, zones=(zone,)), factoryTypes=["mac1.metal"]))
    assert code == 0, out
    assert "on-demand cannot tell: no on-demand vCPU quota is known for mac1.metal's family" in out
    assert "SKIP  capacity" in out


def test_refused_service_quotas_is_bad_input_in_words(account, tmp_path, capsys, monkeypatch):
    ec2, _ = account

    def refuse(self, service_code, quota_code):
        from moto.core.exceptions import JsonRESTError
        raise JsonRESTError("AccessDeniedException", "not allowed")

    monkeypatch.setattr(ServiceQuotasBackend, "get_service_quota", refuse)
    code, _, err = check(capsys, write_config(tmp_path, network(ec2), factoryTypes=["m5.large"]))
    assert code == 2
    assert "AWS refused reading capacity in us-east-1 (AccessDeniedException): check needs ec2:Describe* and " \
           "servicequotas:GetServiceQuota" in err


def test_a_type_ec2_does_not_know_is_a_row_in_words(account, tmp_path, capsys):
    ec2, quotas = account
    quotas.update({STANDARD_ON_DEMAND: 32})
    code, out, _ = check(capsys, write_config(tmp_path, network(ec2, zones=("us-east-1a",)),
                                              factoryTypes=["zz9.huge", "m5.large"]))
    assert code == 0, out
    assert "us-east-1a does not offer zz9.huge" in table_row(out, 1)
    assert table_row(out, 2).startswith("  ->")


@pytest.mark.parametrize("instance_type, market, code", [
    ("m5.large", ON_DEMAND, "L-1216C47A"), ("m5.large", SPOT, "L-34B43A08"), ("im4gn.large", ON_DEMAND, "L-1216C47A"),
    ("p4d.24xlarge", ON_DEMAND, "L-417A185B"), ("p4d.24xlarge", SPOT, "L-7212CCBC"),
    ("p5.48xlarge", SPOT, "L-C4BD4855"), ("p6-b200.48xlarge", SPOT, None), ("g5.xlarge", SPOT, "L-3819A6DF"),
    ("vt1.3xlarge", ON_DEMAND, "L-DB2E81BA"), ("inf2.xlarge", ON_DEMAND, "L-1945791B"),
    ("trn1.32xlarge", SPOT, "L-6B0D517C"), ("dl1.24xlarge", ON_DEMAND, "L-6E869C2A"),
    ("hpc7g.4xlarge", ON_DEMAND, "L-F7808C92"), ("hpc7g.4xlarge", SPOT, None),
    ("u-6tb1.112xlarge", ON_DEMAND, "L-43DA4232"), ("x2iedn.xlarge", SPOT, "L-E3A00192"),
    ("f1.2xlarge", ON_DEMAND, "L-74FC7D96"), ("mac1.metal", ON_DEMAND, None),
])
def test_each_family_draws_on_its_own_quota(instance_type, market, code):
    assert quota_code(instance_type, market) == code


SHAPE = Shape(["m5.large"], ["m5.large"], ["subnet-0aaa", "subnet-0bbb"], 2)


def stubbed_reading(offerings, instance_types, quota_value=64):
    """read_capacity against stubbed clients: EC2 answers OFFERINGS and INSTANCE_TYPES as given."""
    ec2 = boto3.client("ec2", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    quotas = boto3.client("service-quotas", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(ec2) as ec2_stub, Stubber(quotas) as quota_stub:
        for subnet, zone in (("subnet-0aaa", "us-east-1a"), ("subnet-0bbb", "us-east-1b")):
            ec2_stub.add_response("describe_subnets", {"Subnets": [{"SubnetId": subnet, "AvailabilityZone": zone}]})
        for number, page in enumerate(offerings, start=1):
            ec2_stub.add_response("describe_instance_type_offerings", {
                "InstanceTypeOfferings": page, **({"NextToken": f"page{number}"} if number < len(offerings) else {})})
        ec2_stub.add_response("describe_instances", {"Reservations": [{"Instances": [
            {"InstanceId": "i-1", "InstanceType": "m5.large", "State": {"Name": "running"},
             "LaunchTime": datetime.datetime(2026, 1, 1)}]}]})
        ec2_stub.add_response("describe_instance_types", {"InstanceTypes": instance_types})
        quota_stub.add_response("get_service_quota", {"Quota": {"QuotaCode": STANDARD_ON_DEMAND,
                                                                "Value": quota_value}})
        reading = read_capacity(ec2, quotas, SHAPE)
        ec2_stub.assert_no_pending_responses()
    return reading


def test_an_offering_missing_for_a_zone_leaves_that_zone_out_across_pages():
    reading = stubbed_reading(
        [[{"InstanceType": "m5.large", "LocationType": "availability-zone", "Location": "us-east-1b"}], []],
        [{"InstanceType": "m5.large", "VCpuInfo": {"DefaultVCpus": 2}}])
    found = candidates(SHAPE, reading)
    assert [candidate.offered for candidate in found] == [False, True]
    assert found[1].fits and reading.quotas[STANDARD_ON_DEMAND].in_use == 2


def test_missing_vcpu_information_is_a_cause_in_words():
    reading = stubbed_reading(
        [[{"InstanceType": "m5.large", "Location": zone} for zone in ("us-east-1a", "us-east-1b")]],
        [{"InstanceType": "m5.large"}])
    found = candidates(SHAPE, reading)
    assert [verdict.fits for candidate in found for verdict in candidate.verdicts] == [None, None]
    assert "EC2 gave no vCPU count for m5.large" in found[0].verdicts[0].cause
    assert "a running m5.large's vCPUs are unknown" in reading.quotas[STANDARD_ON_DEMAND].cause


def test_a_listing_that_does_not_end_is_a_cause_in_words(monkeypatch):
    monkeypatch.setattr("flambe_iac.aws.capacity.MAX_PAGES", 2)
    page = [{"InstanceType": "m5.large", "Location": "us-east-1a"}]
    with pytest.raises(InputError, match="describe_instance_type_offerings did not finish within 2 pages"):
        stubbed_reading([page, page, page], [{"InstanceType": "m5.large", "VCpuInfo": {"DefaultVCpus": 2}}])
