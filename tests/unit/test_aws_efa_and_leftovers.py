"""`flambe-deploy check` learns EFA's security-group rule, and `check --leftovers` finds the instances nothing
tracks: both against moto's EC2, both read-only."""

import json
import os
import shlex

import pytest
from test_aws_check import FROM, firewall_state, open_network, run, write_config

from flambe_iac.aws.preflight import efa_traffic_within_a_group, nacl_verdict

EFA_CHECK = "EFA traffic within the group"


def self_rule(group):
    return [{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group}]}]


def efa_config(tmp_path, network):
    path = write_config(tmp_path, network)
    path.write_text(path.read_text() + "  flambe:efa: 'true'\n")
    return str(path)


def test_a_self_referencing_rule_both_ways_passes(ec2, tmp_path, capsys):
    network = open_network(ec2)
    ec2.authorize_security_group_egress(GroupId=network["group"], IpPermissions=self_rule(network["group"]))
    before = firewall_state(ec2)
    code, out, _ = run(capsys, "--config", efa_config(tmp_path, network), "--from", FROM)
    assert code == 0, out
    assert f"PASS  {EFA_CHECK}: {network['group']} allows all traffic in from and out to itself" in out
    assert firewall_state(ec2) == before


def test_without_efa_the_rule_is_not_checked(ec2, tmp_path, capsys):
    network = open_network(ec2)
    code, out, _ = run(capsys, "--config", str(write_config(tmp_path, network)), "--from", FROM)
    assert code == 0 and "EFA" not in out


def test_the_default_egress_to_anywhere_is_not_efas_rule_and_the_fix_adds_exactly_the_egress(ec2, tmp_path,
                                                                                              capsys):
    network = open_network(ec2)  # ingress from itself, egress only moto's default 0.0.0.0/0
    code, out, _ = run(capsys, "--config", efa_config(tmp_path, network), "--from", FROM)
    assert code == 1
    group = network["group"]
    assert f"FAIL  {EFA_CHECK}" in out and f"{group} lacks egress" in out
    fixes = [line.split("fix: ", 1)[1] for line in out.splitlines() if "fix: " in line]
    assert fixes == [f"aws ec2 authorize-security-group-egress --region us-east-1 --group-id {group} "
                     f"--ip-permissions 'IpProtocol=-1,UserIdGroupPairs=[{{GroupId={group}}}]'"]


def test_a_subnet_cidr_rule_on_some_ports_fails_with_both_fix_lines_and_they_work(ec2, tmp_path, capsys):
    network = open_network(ec2, members="cidr")
    code, out, _ = run(capsys, "--config", efa_config(tmp_path, network), "--efa", "--from", FROM)
    assert code == 1
    assert f"{network['group']} lacks ingress and egress" in out
    fixes = [shlex.split(line.split("fix: ", 1)[1]) for line in out.splitlines() if "authorize-security-group-" in line
             and "IpProtocol=-1" in line]
    assert [fix[2] for fix in fixes] == ["authorize-security-group-ingress", "authorize-security-group-egress"]
    for fix in fixes:  # what the printed lines would do, done through boto3: then the check passes
        call = getattr(ec2, fix[2].replace("-", "_"))
        call(GroupId=fix[fix.index("--group-id") + 1], IpPermissions=self_rule(network["group"]))
    code, out, _ = run(capsys, "--config", efa_config(tmp_path, network), "--from", FROM)
    assert code == 0 and f"PASS  {EFA_CHECK}" in out


def test_all_traffic_from_the_vpc_or_tcp_from_itself_is_not_efas_rule():
    near_misses = [{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "10.0.0.0/16"}]},
                   {"IpProtocol": "tcp", "FromPort": 0, "ToPort": 65535, "UserIdGroupPairs": [{"GroupId": "sg-1"}]},
                   {"IpProtocol": "udp", "FromPort": 0, "ToPort": 65535, "UserIdGroupPairs": [{"GroupId": "sg-1"}]}]
    group = {"GroupId": "sg-1", "IpPermissions": near_misses, "IpPermissionsEgress": near_misses}
    finding = efa_traffic_within_a_group(type("N", (), {"region": "r"})(), [group])
    assert finding.status == "FAIL" and "lacks ingress and egress" in finding.detail


def test_a_rule_naming_another_group_is_not_the_group_itself():
    group = {"GroupId": "sg-1", "IpPermissions": [{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": "sg-2"}]}],
             "IpPermissionsEgress": [{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": "sg-1"}]}]}
    finding = efa_traffic_within_a_group(type("N", (), {"region": "r"})(), [group])
    assert finding.status == "FAIL" and "lacks ingress" in finding.detail


# Leftovers.

def launch(ec2, network, cluster, role, creator="alice", count=1, **tags):
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    all_tags = {"Purpose": "flambe", "Cluster-Name": cluster, "Role": role, "creator": creator, **tags}
    instances = ec2.run_instances(
        ImageId=image, MinCount=count, MaxCount=count, SubnetId=network["subnet"], InstanceType="m5.large",
        TagSpecifications=[{"ResourceType": "instance",
                            "Tags": [{"Key": key, "Value": value} for key, value in all_tags.items()]}])["Instances"]
    return [instance["InstanceId"] for instance in instances]


def outputs_naming(tmp_path, ids):
    hosts = [{"id": instance, "public_ip": None, "private_ip": f"10.0.1.{10 + index}", "public_dns": None}
             for index, instance in enumerate(ids)]
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps({"flambe_outputs_version": 1, "cluster_name": "exp1", "ssh_user": "ubuntu",
                                "region": "us-east-1", "orchestrator": hosts[0], "factories": hosts[1:]}))
    return str(path)


@pytest.fixture
def two_clusters(ec2):
    """exp1: three instances its stack names, and two it lost (one stopped); exp0: bob's, of another stack; and
    instances that are not flambe's or are terminated."""
    network = open_network(ec2)
    in_stack = launch(ec2, network, "exp1", "orchestrator") + launch(ec2, network, "exp1", "factory", count=2)
    lost = launch(ec2, network, "exp1", "factory", count=2)
    ec2.stop_instances(InstanceIds=lost[:1])
    others = launch(ec2, network, "exp0", "factory", creator="bob")
    ec2.terminate_instances(InstanceIds=launch(ec2, network, "exp1", "factory"))
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, TagSpecifications=[  # someone else's instance
        {"ResourceType": "instance", "Tags": [{"Key": "Purpose", "Value": "web"}, {"Key": "creator", "Value": "bob"}]}])
    return ec2, in_stack, lost, others


def pulumi_stub(tmp_path, monkeypatch, config: dict, outputs: dict):
    """A pulumi on PATH that answers `config --json` and `stack output --json` as a real stack would."""
    (tmp_path / "config.json").write_text(json.dumps({key: {"value": value} for key, value in config.items()}))
    (tmp_path / "outputs.json").write_text(json.dumps(outputs))
    stub = tmp_path / "bin" / "pulumi"
    stub.parent.mkdir()
    stub.write_text(f"#!/bin/sh\nif [ \"$1\" = config ]; then cat {tmp_path}/config.json; "
                    f"else cat {tmp_path}/outputs.json; fi\n")
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub.parent}:{os.environ['PATH']}")


def test_leftovers_are_the_clusters_instances_its_outputs_do_not_name(two_clusters, tmp_path, capsys):
    ec2, in_stack, lost, others = two_clusters
    before = ec2.describe_instances()["Reservations"]
    report = tmp_path / "leftovers.json"
    code, out, _ = run(capsys, "--leftovers", "--outputs", outputs_naming(tmp_path, in_stack), "--report", str(report))
    assert code == 1
    for instance in in_stack:
        assert f"IN STACK  {instance}  cluster=exp1" in out
    for instance in lost:
        assert f"LEFTOVER  {instance}  cluster=exp1  role=factory  creator=alice  m5.large" in out
    assert "  stopped  " in out  # a stopped instance still costs its volume: counted
    assert "exp0" not in out and "web" not in out  # another cluster's, and not flambe's
    assert "5 flambe instances in us-east-1; 2 leftover" in out
    assert (f"to terminate them: aws ec2 terminate-instances --region us-east-1 --instance-ids "
            f"{' '.join(sorted(lost, key=out.index))}") in out
    written = json.loads(report.read_text())
    assert written["leftovers"] == 2 and len(written["instances"]) == 5
    assert {item["instance_id"] for item in written["instances"] if item["leftover"]} == set(lost)
    assert ec2.describe_instances()["Reservations"] == before  # nothing changed, nothing terminated


def test_without_a_stack_every_flambe_instance_is_listed_with_a_warning_and_creator_filters(two_clusters, capsys):
    ec2, in_stack, lost, others = two_clusters
    code, out, _ = run(capsys, "--leftovers", "--region", "us-east-1", "--creator", "bob")
    assert code == 1
    assert out.count("LEFTOVER") == 1 and "exp1" not in out and "web" not in out
    assert "no cluster given: some may be other clusters'" in out
    code, out, _ = run(capsys, "--leftovers", "--region", "us-east-1", "--creator", "nobody")
    assert code == 0 and "0 flambe instances in us-east-1; 0 leftover" in out and "terminate" not in out


def test_a_destroyed_stack_names_nothing_and_its_own_region_is_searched(two_clusters, tmp_path, capsys, monkeypatch):
    ec2, in_stack, lost, others = two_clusters
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")  # not where the stack is: the stack's aws:region wins
    pulumi_stub(tmp_path, monkeypatch, {"flambe:name": "exp1", "aws:region": "us-east-1"}, {})
    code, out, _ = run(capsys, "--leftovers", "--stack", "dev")
    assert code == 1 and out.count("LEFTOVER") == 5 and "in us-east-1" in out and "exp0" not in out


def test_a_stack_config_file_scopes_to_its_cluster_region_and_creator(two_clusters, tmp_path, capsys):
    ec2, in_stack, lost, others = two_clusters
    config = tmp_path / "Pulumi.dev.yaml"
    config.write_text("config:\n  aws:region: us-east-1\n  flambe:name: exp0\n  flambe:creator: bob\n")
    code, out, _ = run(capsys, "--leftovers", "--config", str(config))
    assert code == 1 and out.count("LEFTOVER") == 1 and "exp1" not in out and "check each" not in out
    config.write_text("config:\n  aws:region: us-east-1\n  flambe:name: exp0\n  flambe:creator: carol\n")
    code, out, _ = run(capsys, "--leftovers", "--config", str(config))
    assert code == 0 and "0 leftover" in out


def test_a_report_that_cannot_be_written_is_bad_input_not_a_leftover(two_clusters, capsys):
    code, _, err = run(capsys, "--leftovers", "--region", "us-east-1", "--creator", "nobody", "--report",
                       "/nonexistent/dir/leftovers.json")
    assert code == 2 and "cannot write --report" in err


def test_an_ec2_error_other_than_credentials_is_bad_input(two_clusters, capsys, monkeypatch):
    from botocore.exceptions import EndpointConnectionError

    def unreachable(*arguments, **keywords):
        raise EndpointConnectionError(endpoint_url="https://ec2.nowhere-1.amazonaws.com")
    monkeypatch.setattr("botocore.paginate.PageIterator.__iter__", unreachable)
    code, _, err = run(capsys, "--leftovers", "--region", "us-east-1")
    assert code == 2 and "cannot list instances in us-east-1" in err


def test_hostile_tag_values_reach_the_terminal_escaped(ec2, capsys):
    """EC2's XML cannot carry C0 controls; C1 controls (CSI), line separators and bidi overrides it can."""
    network = open_network(ec2)
    launch(ec2, network, "exp\x9b2J\u202e", "factory", creator="eve\x85\u2028LEFTOVER  i-fake")
    code, out, _ = run(capsys, "--leftovers", "--region", "us-east-1")
    assert code == 1
    assert not set(out) & {"\x9b", "\x85", "\u2028", "\u202e"}
    assert "cluster=exp\\x9b2J\\u202e" in out and "creator=eve\\x85\\u2028LEFTOVER  i-fake" in out
    assert len(out.splitlines()) == 3  # the instance, the count, the terminate line


@pytest.mark.parametrize("arguments, expected", [
    (["--creator", "bob", "--config", "x.yaml"], "--creator go with --leftovers"),
    (["--leftovers", "--outputs", "/nonexistent/outputs.json"], "cannot read stack outputs"),
    (["--leftovers", "--config", "/nonexistent/Pulumi.dev.yaml"], "cannot read stack config"),
    ([], "give the cluster's network with --stack NAME"),
])
def test_misused_flags_are_bad_input(capsys, arguments, expected):
    code, _, err = run(capsys, *arguments)
    assert code == 2 and expected in err


def test_no_credentials_is_bad_input_for_leftovers(tmp_path, monkeypatch, capsys):
    for variable in [key for key in os.environ if key.startswith("AWS_")]:
        monkeypatch.delenv(variable)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    code, _, err = run(capsys, "--leftovers", "--region", "us-east-1")
    assert code == 2 and "no AWS credentials" in err


def test_an_ipv6_network_acl_rule_never_decides_an_ipv4_flow():
    """An entry without CidrBlock is IPv6 (Ipv6CidrBlock): it was once read as 0.0.0.0/0."""
    entry = {"Egress": False, "Protocol": "-1", "RuleNumber": 90, "Ipv6CidrBlock": "::/0"}
    ipv4_denied = {"Egress": False, "Protocol": "-1", "RuleNumber": 100, "CidrBlock": "0.0.0.0/0",
                   "RuleAction": "deny"}
    ipv4_allowed = {**ipv4_denied, "RuleAction": "allow"}
    assert not nacl_verdict({"Entries": [{**entry, "RuleAction": "allow"}, ipv4_denied]}, False, 22, "10.0.0.5/32")[0]
    assert nacl_verdict({"Entries": [{**entry, "RuleAction": "deny"}, ipv4_allowed]}, False, 22, "10.0.0.5/32")[0]


@pytest.mark.parametrize("region", ["us-east-1\x1b]0;pwned\x07", "", "us east"])
def test_a_region_that_is_no_region_is_bad_input_in_words(region, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    code, out, err = run(capsys, "--leftovers", "--region", region)
    assert code == 2 and "is not an AWS region" in err and "Traceback" not in err and "\x1b" not in out + err


def test_wildcards_in_a_creator_or_cluster_match_only_themselves(two_clusters, capsys):
    """EC2 reads * and ? in filter values as wildcards: `bo?` must not list bob's instances as leftovers."""
    for flags in (["--creator", "bo?"], ["--creator", "*"], ["--cluster", "exp*"]):
        code, out, _ = run(capsys, "--leftovers", "--region", "us-east-1", *flags)
        assert code == 0 and "0 flambe instances in us-east-1; 0 leftover" in out


def test_flags_that_contradict_the_stacks_scope_are_refused_and_outputs_alone_warn_of_other_creators(
        two_clusters, tmp_path, capsys):
    ec2, in_stack, lost, others = two_clusters
    config = tmp_path / "Pulumi.dev.yaml"
    config.write_text("config:\n  aws:region: us-east-1\n  flambe:name: exp0\n  flambe:creator: bob\n")
    for flags, said in ((["--region", "us-west-2"], "--region 'us-west-2' is not the region"),
                        (["--creator", "alice"], "--creator 'alice' is not the creator")):
        code, _, err = run(capsys, "--leftovers", "--config", str(config), *flags)
        assert code == 2 and said in err
    outputs = outputs_naming(tmp_path, in_stack)
    code, out, _ = run(capsys, "--leftovers", "--outputs", outputs)
    assert code == 1 and "no creator given: another person's cluster of this name" in out
    code, out, _ = run(capsys, "--leftovers", "--outputs", outputs, "--creator", "alice")
    assert code == 1 and "no creator given" not in out and out.count("LEFTOVER") == 2
