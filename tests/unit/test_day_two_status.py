"""status without hosts: what makes a member a problem, read from what the status script prints."""

import json

from framed_answers import section

from flambe_iac.day_two.status import flag_split_keys, parse_status
from flambe_iac.engine.cluster_key import new_cluster_key

KEY_A = new_cluster_key("flambe-cluster:c1").public_line
KEY_B = new_cluster_key("flambe-cluster:c1").public_line
SUM = "a" * 64


def record(public_line: str, sums: str = f"{SUM} *./data/x.bin", manifest_sum: str = SUM) -> str:
    manifest = json.dumps({"resources": {"data": {"x.bin": manifest_sum}}})
    return section("@pub", f"{public_line}\n") + section("@manifest", manifest) + section("@sums", f"{sums}\n") + "@end\n"


def status_of(alias: str, output: str):
    return parse_status(alias, "10.0.0.1", 0, output, "")


def test_a_member_whose_cluster_key_was_replaced_by_hand_is_named():
    statuses = flag_split_keys([status_of("c1-orchestrator", record(KEY_A)), status_of("c1-factory-0", record(KEY_A)),
                                status_of("c1-factory-1", record(KEY_B))])
    assert [status.healthy for status in statuses] == [False, False, False]
    assert all("differs from another member's" in " ".join(status.problems) for status in statuses)
    same = flag_split_keys([status_of("c1-orchestrator", record(KEY_A)), status_of("c1-factory-0", record(KEY_A))])
    assert all(status.healthy for status in same)


def test_a_resource_edited_on_a_host_is_named():
    edited = status_of("c1-factory-0", record(KEY_A, sums=f"{'b' * 64} *./data/x.bin"))
    assert edited.resources_match is False and not edited.healthy
    assert "resources differ from the manifest's checksums" in edited.problems
    intact = status_of("c1-factory-0", record(KEY_A))
    assert intact.resources_match is True and intact.healthy
