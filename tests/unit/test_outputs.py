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
