"""The lab's input checks and plan; these need no root and build nothing."""

import pytest

from flambe_iac.cli import lab as lab_cli
from flambe_iac.errors import EXIT_BAD_INPUT, InputError
from flambe_iac.lab import build, model, teardown


def test_plans_an_orchestrator_then_factories_on_distinct_addresses():
    state = model.plan_lab(4, "ubuntu", "10.213.0.0/16", None)
    assert [host.hostname for host in state.hosts] == ["orchestrator", "factory-1", "factory-2", "factory-3"]
    assert [host.role for host in state.hosts] == ["orchestrator", "factory", "factory", "factory"]
    assert state.client_address == "10.213.0.1"
    assert [host.address for host in state.hosts] == ["10.213.0.2", "10.213.0.3", "10.213.0.4", "10.213.0.5"]
    assert len(set(state.namespaces)) == 6
    assert all(name.startswith(f"flambe-{state.lab_id}-") for name in state.namespaces)


def test_two_plans_never_share_namespace_names():
    first = model.plan_lab(2, "ubuntu", "10.213.0.0/16", None)
    second = model.plan_lab(2, "ubuntu", "10.213.0.0/16", None)
    assert not set(first.namespaces) & set(second.namespaces)


def test_takes_exact_addresses():
    state = model.plan_lab(2, "ubuntu", "10.0.0.0/16", ["10.0.1.20", "10.0.1.9"])
    assert [host.address for host in state.hosts] == ["10.0.1.20", "10.0.1.9"]


def test_the_login_user_gets_a_uid_no_account_here_has():
    import pwd

    state = model.plan_lab(1, "ubuntu", "10.213.0.0/16", None)
    assert state.uid not in {entry.pw_uid for entry in pwd.getpwall()}


@pytest.mark.parametrize("hosts, user, subnet, addresses, expected", [
    (0, "ubuntu", "10.213.0.0/16", None, "--hosts must be at least 1"),
    (1, "root", "10.213.0.0/16", None, "--user must be a plain login name"),
    (1, "bad name", "10.213.0.0/16", None, "--user must be a plain login name"),
    (1, "ubuntu", "nonsense", None, "--subnet must be an IPv4 CIDR"),
    (1, "ubuntu", "8.8.8.0/24", None, "not a private range"),
    (4, "ubuntu", "10.213.0.0/30", None, "too small for 4 hosts"),
    (2, "ubuntu", "10.0.0.0/16", ["10.0.0.5"], "gives 1 addresses for 2 hosts"),
    (2, "ubuntu", "10.0.0.0/16", ["10.0.0.5", "10.0.0.5"], "must be distinct"),
    (1, "ubuntu", "10.0.0.0/16", ["10.9.0.5"], "not a host address in --subnet"),
    (1, "ubuntu", "10.0.0.0/16", ["10.0.0.1"], "must not be 10.0.0.1"),
])
def test_rejects_bad_input_with_a_message_naming_the_option(hosts, user, subnet, addresses, expected):
    with pytest.raises(InputError, match=expected):
        model.plan_lab(hosts, user, subnet, addresses)


def test_refuses_without_root_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(build.os, "geteuid", lambda: 1000)
    assert lab_cli.main(["up", "--hosts", "1", "--dir", str(tmp_path)]) == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "needs root" in error
    assert list(tmp_path.iterdir()) == []


def test_refuses_on_other_systems(monkeypatch):
    monkeypatch.setattr(build.sys, "platform", "darwin")
    with pytest.raises(InputError, match="needs Linux"):
        build.check_can_run_lab()


def test_down_on_a_directory_without_a_lab_does_nothing(tmp_path):
    assert teardown.down(tmp_path) == []


def test_help_explains_every_command(capsys):
    with pytest.raises(SystemExit):
        lab_cli.main(["--help"])
    text = capsys.readouterr().out
    for command in ("up", "down", "show", "exec"):
        assert command in text
