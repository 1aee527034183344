"""One allow-list for every name that reaches a host: whole names only, never a valid prefix with anything after."""

import pytest

from flambe_iac.cluster import Cluster, Host
from flambe_iac.errors import InputError
from flambe_iac.inputs.extensions import parse_location
from flambe_iac.names import check_address, check_cluster_name, check_host_id, check_ssh_user, check_tree_name
from flambe_iac.inputs.resources import parse_resources

BAD_SUFFIXES = ["/..", "\n", "\nssh-ed25519 AAAA evil", ";rm -rf ~", " x", "$(id)", "/x", "\r", "\0", "`id`"]


@pytest.mark.parametrize("suffix", BAD_SUFFIXES)
def test_a_valid_prefix_with_a_bad_suffix_is_refused_everywhere(suffix, tmp_path):
    for check, valid in ((check_cluster_name, "c1"), (check_ssh_user, "ubuntu")):
        with pytest.raises(InputError):
            check(valid + suffix)
    with pytest.raises(InputError):
        check_tree_name("data" + suffix, "resource")
    with pytest.raises(InputError):
        check_host_id("i-0abc" + suffix, "id")
    with pytest.raises(InputError):
        parse_resources([f"data{suffix}={tmp_path}"])
    with pytest.raises(InputError):
        parse_location("ext" + suffix, str(tmp_path), tmp_path)


@pytest.mark.parametrize("name", ["..", "../../tmp/x", "a..b", "", "-c", ".hidden", "x" * 64])
def test_cluster_names_that_would_become_paths_or_options_are_refused(name):
    with pytest.raises(InputError):
        check_cluster_name(name)


@pytest.mark.parametrize("name", ["my-cluster", "exp_42", "a", "A1.b-c_d", "x" * 63])
def test_ordinary_cluster_names_pass(name):
    assert check_cluster_name(name) == name


@pytest.mark.parametrize("user", ["root;id", "Ubuntu", "1abc", "a" * 33, "ubuntu\n", ""])
def test_ssh_users_must_be_login_names(user):
    with pytest.raises(InputError):
        check_ssh_user(user)


@pytest.mark.parametrize("address", ["10.0.0.1\n", "10.0.0.1;", "localhost", "10.0.0.256", " 10.0.0.1"])
def test_addresses_must_be_ip_addresses(address):
    with pytest.raises(InputError):
        check_address(address, "address")


def test_every_cluster_source_passes_the_same_checks():
    host = Host("i-1", "orchestrator", "10.0.0.1")
    with pytest.raises(InputError):
        Cluster("c1\nssh-ed25519 AAAA evil", "ubuntu", None, host, ())
    with pytest.raises(InputError):
        Cluster("c1", "ubuntu;id", None, host, ())
    with pytest.raises(InputError):
        Host("i-1;reboot", "factory", "10.0.0.2")
    with pytest.raises(InputError):
        Host("i-1", "factory", "10.0.0.2\n")
