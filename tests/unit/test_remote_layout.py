import pytest

from flambe_iac.engine.cluster_key import new_cluster_key, updated_authorized_keys
from flambe_iac.remote_layout import manifest, members_known_hosts
from flambe_iac.errors import InputError
from flambe_iac.ssh.policy import ssh_config_block, updated_ssh_config

NEW = "ssh-ed25519 AAAANEW flambe-cluster:c1"
OLD = "ssh-ed25519 AAAAOLD flambe-cluster:c1"
USER = b"ssh-rsa AAAAUSER me@laptop\n"


def test_adds_the_cluster_key_after_the_user_lines():
    assert updated_authorized_keys(USER, NEW, "c1") == USER + NEW.encode() + b"\n"


def test_adding_twice_changes_nothing():
    once = updated_authorized_keys(USER, NEW, "c1")
    assert updated_authorized_keys(once, NEW, "c1") == once


def test_replaces_an_old_key_of_the_same_cluster_only():
    other_cluster = b"ssh-ed25519 AAAAOTHER flambe-cluster:c2\n"
    current = USER + OLD.encode() + b"\n" + other_cluster
    assert updated_authorized_keys(current, NEW, "c1") == USER + other_cluster + NEW.encode() + b"\n"


def test_a_line_without_our_comment_is_the_users_whatever_key_it_holds():
    """Only lines flambe wrote are removed: a cluster key the user copied by hand, renamed or behind options, stays
    byte-identical (a hostile member's retired list can no longer name the user's key and have it removed)."""
    old = new_cluster_key("flambe-cluster:c1")
    key_only = " ".join(old.public_line.split()[:2]).encode()
    current = USER + key_only + b" renamed-by-hand\n" + b'from="10.0.0.0/8" ' + key_only + b"\n"
    assert updated_authorized_keys(current, NEW, "c1") == current + NEW.encode() + b"\n"


def test_an_old_key_with_our_comment_goes_even_behind_options():
    old = new_cluster_key("flambe-cluster:c1")
    current = USER + b'from="10.0.0.0/8" ' + old.public_line.encode() + b"\n"
    assert updated_authorized_keys(current, NEW, "c1") == USER + NEW.encode() + b"\n"


def test_the_users_own_key_is_never_removed_even_with_our_comment():
    user_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIUSERKEY"
    current = USER + f"{user_key} flambe-cluster:c1\n".encode()
    assert updated_authorized_keys(current, NEW, "c1", user_key) == current + NEW.encode() + b"\n"
    assert updated_authorized_keys(current, NEW, "c1") == USER + NEW.encode() + b"\n"


@pytest.mark.parametrize("hostile", ["c1\nssh-ed25519 AAAAEVIL attacker", "c1\rx", "c1\0", "c1 x", "c1\tx",
                                     "c1\x1b[2J", "c1\u2028x", "c1\x85"])
def test_writers_refuse_whitespace_and_control_characters_as_a_second_defence(hostile):
    with pytest.raises(InputError, match="whitespace or a control"):
        updated_authorized_keys(USER, f"ssh-ed25519 AAAANEW flambe-cluster:{hostile}", hostile)
    with pytest.raises(InputError, match="whitespace or a control"):
        ssh_config_block(hostile, "ubuntu", ["10.0.0.1"])
    with pytest.raises(InputError, match="whitespace or a control"):
        ssh_config_block("c1", "ubuntu", ["10.0.0.1", hostile])
    with pytest.raises(InputError, match="whitespace or a control"):
        manifest(hostile, "factory", "i-1", [], "SHA256:x", {}, "0", {})
    with pytest.raises(InputError, match="whitespace or a control"):
        members_known_hosts({f"10.0.0.1{hostile}": ["ssh-ed25519 AAAAKEY"]})


def test_the_members_ssh_config_never_forwards_the_agent():
    block = ssh_config_block("c1", "ubuntu", ["10.0.0.1"])
    assert "ForwardAgent no" in block and "IdentityAgent none" in block and "ForwardAgent yes" not in block


def test_keeps_other_lines_byte_identical_even_without_a_final_newline():
    current = b"# comment\r\n" + b"ssh-rsa AAAAUSER me@laptop"
    assert updated_authorized_keys(current, NEW, "c1") == current + b"\n" + NEW.encode() + b"\n"


def test_starts_an_empty_file():
    assert updated_authorized_keys(b"", NEW, "c1") == NEW.encode() + b"\n"


def test_ssh_config_block_comes_first_and_ends_with_host_star():
    block = ssh_config_block("c1", "ubuntu", ["10.0.0.1", "10.0.0.2"])
    config = updated_ssh_config(b"ServerAliveInterval 30\n", block, "c1").decode()
    assert config.startswith("# BEGIN flambe cluster c1")
    assert "Host 10.0.0.1 10.0.0.2\n" in config
    assert "StrictHostKeyChecking yes" in config and "IdentitiesOnly yes" in config
    assert config.endswith("Host *\n# END flambe cluster c1\nServerAliveInterval 30\n")


def test_ssh_config_block_is_replaced_not_repeated():
    first = updated_ssh_config(b"Host x\n  User y\n", ssh_config_block("c1", "ubuntu", ["10.0.0.1"]), "c1")
    second = updated_ssh_config(first, ssh_config_block("c1", "ubuntu", ["10.0.0.1", "10.0.0.9"]), "c1")
    assert second.count(b"# BEGIN flambe cluster c1") == 1
    assert b"10.0.0.9" in second
    assert second.endswith(b"Host x\n  User y\n")


def test_other_clusters_blocks_are_kept():
    other = updated_ssh_config(b"", ssh_config_block("c2", "ubuntu", ["10.1.0.1"]), "c2")
    both = updated_ssh_config(other, ssh_config_block("c1", "ubuntu", ["10.0.0.1"]), "c1")
    assert b"# BEGIN flambe cluster c2" in both and b"# BEGIN flambe cluster c1" in both


def test_members_known_hosts_lists_every_key_by_private_address():
    text = members_known_hosts({"10.0.0.1": ["ssh-ed25519 AAAA1"], "10.0.0.2": ["ssh-ed25519 AAAA2", "ssh-rsa B"]})
    assert text == b"10.0.0.1 ssh-ed25519 AAAA1\n10.0.0.2 ssh-ed25519 AAAA2\n10.0.0.2 ssh-rsa B\n"


def test_the_users_key_behind_quoted_options_is_read_as_sshd_reads_it():
    user_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIUSERKEY"
    current = USER + f'command="echo ssh-rsa AAAAFAKE" {user_key} flambe-cluster:c1\n'.encode()
    assert updated_authorized_keys(current, NEW, "c1", user_key) == current + NEW.encode() + b"\n"


def test_the_cluster_key_restricted_by_the_user_stays_as_the_user_wrote_it():
    restricted = b'from="10.0.0.0/8" ' + NEW.encode() + b"\n"
    assert updated_authorized_keys(USER + restricted, NEW, "c1") == USER + restricted
