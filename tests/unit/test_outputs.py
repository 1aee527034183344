import copy
import json

import pytest

from flambe_iac.cluster import FACTORY, ORCHESTRATOR, PRIVATE, PUBLIC
from flambe_iac.errors import EXIT_BAD_INPUT, InputError
from flambe_iac.inputs.outputs import load_outputs, outputs_document, parse_outputs

VALID = {
    "flambe_outputs_version": 1,
    "cluster_name": "my-cluster",
    "ssh_user": "ubuntu",
    "region": "us-east-1",
    "orchestrator": {"id": "i-0abc", "public_ip": "3.1.2.3", "private_ip": "10.0.1.5", "public_dns": "ec2-a"},
    "factories": [
        {"id": "i-0def", "public_ip": None, "private_ip": "10.0.1.6", "public_dns": ""},
        {"id": "i-0fed", "public_ip": "3.1.2.5", "private_ip": "10.0.1.7", "public_dns": "ec2-c"},
    ],
}


def changed(path, value):
    """VALID with one field (a dotted path, list indexes as numbers) set to value, or removed if value is ..."""
    document = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    target = document
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return document


def error_for(document):
    with pytest.raises(InputError) as caught:
        parse_outputs(document, source="outputs.json")
    assert caught.value.exit_code == EXIT_BAD_INPUT
    return str(caught.value)


def test_parses_a_valid_document_into_the_cluster_model():
    cluster = parse_outputs(VALID)
    assert cluster.name == "my-cluster"
    assert cluster.ssh_user == "ubuntu"
    assert cluster.region == "us-east-1"
    assert cluster.orchestrator.role == ORCHESTRATOR
    assert cluster.orchestrator.address(PUBLIC) == "3.1.2.3"
    assert [host.role for host in cluster.factories] == [FACTORY, FACTORY]
    assert cluster.factories[0].public_ip is None
    assert cluster.factories[0].public_dns is None
    assert [host.address(PRIVATE) for host in cluster.members] == ["10.0.1.5", "10.0.1.6", "10.0.1.7"]


def test_round_trips_through_the_document_writer():
    cluster = parse_outputs(VALID)
    assert parse_outputs(json.loads(json.dumps(outputs_document(cluster)))) == cluster


def test_accepts_the_version_as_a_float_as_pulumi_sends_numbers():
    assert parse_outputs(changed("flambe_outputs_version", 1.0)).name == "my-cluster"


def test_accepts_a_cluster_without_factories():
    assert parse_outputs(changed("factories", [])).factories == ()


@pytest.mark.parametrize("path, value, expected", [
    ("cluster_name", ..., "'cluster_name' is missing"),
    ("ssh_user", 7, "'ssh_user' must be a non-empty string"),
    ("orchestrator", ..., "'orchestrator' must be an object, not missing"),
    ("orchestrator.private_ip", "not-an-ip", "'orchestrator.private_ip' must be an IP address"),
    ("factories", {"id": "x"}, "'factories' must be a list"),
    ("factories.1.id", ..., "'factories[1].id' is missing"),
    ("factories.0.public_ip", 3, "'factories[0].public_ip' must be a non-empty string"),
])
def test_names_the_field_that_is_wrong(path, value, expected):
    assert expected in error_for(changed(path, value))


def test_rejects_a_document_that_is_not_an_object():
    assert "must be an object" in error_for([VALID])


def test_missing_version_says_this_is_not_flambe_outputs():
    message = error_for(changed("flambe_outputs_version", ...))
    assert "not flambe stack outputs" in message


@pytest.mark.parametrize("version", [2, "1", True])
def test_rejects_an_unknown_version(version):
    assert "a version this flambe-iac does not know" in error_for(changed("flambe_outputs_version", version))


def test_masked_secret_values_tell_the_user_to_add_show_secrets():
    message = error_for(changed("factories.1.public_ip", "[secret]"))
    assert "factories[1].public_ip" in message
    assert "--show-secrets" in message


def test_load_reports_unreadable_and_non_json_files(tmp_path):
    with pytest.raises(InputError, match="cannot read stack outputs"):
        load_outputs(tmp_path / "absent.json")
    broken = tmp_path / "outputs.json"
    broken.write_text('{"flambe_outputs_version": 1,\n  oops}')
    with pytest.raises(InputError, match="line 2"):
        load_outputs(broken)


def test_load_reads_a_file(tmp_path):
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps(VALID))
    assert load_outputs(path) == parse_outputs(VALID)


# -- where each member landed: contract v1's optional placement keys


PLACED = {"instance_type": "p4d.24xlarge", "availability_zone": "us-east-1b", "market": "spot"}


def placed_document():
    document = copy.deepcopy(VALID)
    document["orchestrator"].update(PLACED)
    document["factories"][1].update(instance_type="u-6tb1.metal", availability_zone="us-west-2-lax-1a",
                                    market="capacity-block")
    return document


def test_each_host_says_where_it_landed_and_outputs_without_it_still_load():
    cluster = parse_outputs(placed_document())
    assert (cluster.orchestrator.instance_type, cluster.orchestrator.availability_zone,
            cluster.orchestrator.market) == ("p4d.24xlarge", "us-east-1b", "spot")
    assert cluster.orchestrator.placement == "p4d.24xlarge us-east-1b spot"
    assert cluster.factories[1].placement == "u-6tb1.metal us-west-2-lax-1a capacity-block"
    assert cluster.factories[0].placement == "" and cluster.factories[0].market is None
    old = parse_outputs(VALID)  # the v1 document before the addition
    assert all(host.placement == "" for host in old.members)


def test_placement_round_trips_and_unknown_values_are_not_written():
    cluster = parse_outputs(placed_document())
    document = json.loads(json.dumps(outputs_document(cluster)))
    assert parse_outputs(document) == cluster
    assert document["orchestrator"]["market"] == "spot"
    assert not set(PLACED) & set(document["factories"][0])  # unknown stays absent: old readers see the old shape


@pytest.mark.parametrize("key, value", [
    ("instance_type", "p4d.24xlarge\x1b[2J"),
    ("instance_type", "p4d 24xlarge"),
    ("instance_type", "P4D.24XLARGE; rm -rf ~"),
    ("instance_type", "p4d.24xlarge\nHost *"),
    ("instance_type", "x" * 300),
    ("instance_type", 24),
    ("instance_type", ""),
    ("availability_zone", "us-east-1b\r"),
    ("availability_zone", "../../etc"),
    ("availability_zone", "us-east-1b " * 3),
    ("availability_zone", ["us-east-1b"]),
    ("market", "Spot"),
    ("market", "reserved"),
    ("market", "spot\u202e"),
    ("market", True),
])
def test_a_hostile_placement_value_is_an_input_error_in_words_never_shown_raw(key, value):
    message = error_for(changed(f"factories.1.{key}", value))
    assert f"'factories[1].{key}'" in message
    assert "must be" in message
    assert not any(character in message for character in "\x1b\r\n\u202e")


def test_the_host_model_checks_placement_whatever_the_source():
    from flambe_iac.cluster import Host

    with pytest.raises(InputError, match="market of i-1 must be one of on-demand, spot, capacity-block"):
        Host("i-1", FACTORY, "10.0.0.1", market="preemptible")
    assert Host("i-1", FACTORY, "10.0.0.1", market="on-demand").placement == "on-demand"


def test_the_report_the_live_table_and_status_show_where_each_member_landed():
    import io
    from types import SimpleNamespace

    from flambe_iac.day_two.status import HostStatus, show_status
    from flambe_iac.engine.report import DeployReport, ProgressView

    cluster = parse_outputs(placed_document())
    plan = SimpleNamespace(cluster=cluster, address=lambda member: member.private_ip)
    report = DeployReport.for_plan(plan, ("cluster key",), "run-1")
    hosts = json.loads(report.to_json())["hosts"]
    assert {key: hosts[0][key] for key in PLACED} == PLACED
    assert hosts[1]["market"] is None  # unknown: said so, not guessed
    stream = io.StringIO()
    ProgressView(report, stream, live=True).redraw()
    table = stream.getvalue().splitlines()
    assert "where" in table[0]
    assert "p4d.24xlarge us-east-1b spot" in table[1]
    assert "u-6tb1.metal us-west-2-lax-1a capacity-block" in table[3]
    shown = show_status([HostStatus("c-orchestrator", "10.0.1.5", True, problems=[],
                                    placement=cluster.orchestrator.placement)])
    assert "placed: p4d.24xlarge us-east-1b spot" in shown


def test_status_names_the_members_the_source_lists_that_do_not_answer():
    from flambe_iac.day_two.status import HostStatus, show_status

    shown = show_status([HostStatus("c-orchestrator", "10.0.1.5", True, problems=[]),
                         HostStatus("c-factory-1", "10.0.1.7", False, problems=["unreachable: timed out"])])
    last = shown.splitlines()[-1]
    assert "not answering, though the source lists them: c-factory-1 (10.0.1.7)" in last
    assert "pulumi up --refresh" in last
    assert "not answering" not in show_status([HostStatus("c-orchestrator", "10.0.1.5", True, problems=[])])
