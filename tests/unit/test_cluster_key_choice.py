"""Which key a cluster keeps: one key in the end, whatever the members held, whichever answered first."""

import itertools

import pytest

from flambe_iac.engine.cluster_key import CREATED, KEPT, ROTATED, HeldKey, decide_cluster_key, new_cluster_key

K1, K2, K3 = (new_cluster_key("flambe-cluster:c1") for _ in range(3))


def member(name, key=None, retired=(), orchestrator=False):
    return HeldKey(name, orchestrator, key.public_line if key else None, frozenset(k.fingerprint for k in retired))


def test_a_fresh_cluster_gets_a_new_key():
    assert decide_cluster_key([member("o", orchestrator=True), member("f1")], rotate=False).action == CREATED


def test_the_key_all_members_hold_is_kept():
    decision = decide_cluster_key([member("o", K1, orchestrator=True), member("f1", K1)], rotate=False)
    assert (decision.action, decision.keep, decision.retired) == (KEPT, K1.fingerprint, set())


def test_a_key_any_member_retired_is_never_kept_even_on_the_orchestrator():
    held = [member("o", K1, orchestrator=True), member("f1", K2, retired=[K1]), member("f2", K2, retired=[K1])]
    decision = decide_cluster_key(held, rotate=False)
    assert decision.keep == K2.fingerprint and decision.sources == ["f1", "f2"]
    assert decision.retired == {K1.fingerprint}


def test_rotation_retires_every_key_held():
    decision = decide_cluster_key([member("o", K1, orchestrator=True), member("f1", K2)], rotate=True)
    assert decision.action == ROTATED and decision.retired == {K1.fingerprint, K2.fingerprint}


def test_when_every_held_key_is_retired_a_new_key_replaces_them():
    decision = decide_cluster_key([member("o", K1, retired=[K1], orchestrator=True)], rotate=False)
    assert decision.action == CREATED and K1.fingerprint in decision.retired and decision.note


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_the_choice_does_not_depend_on_which_member_answered_first(order):
    """Factories holding different keys and no orchestrator key (two deploys raced before the lock existed)."""
    members = [member("f1", K1), member("f2", K2), member("f3", K3)]
    decision = decide_cluster_key([members[index] for index in order], rotate=False)
    expected = max(K1.fingerprint, K2.fingerprint, K3.fingerprint)
    assert decision.keep == expected
    assert decision.retired == {K1.fingerprint, K2.fingerprint, K3.fingerprint} - {expected}
    assert decision.note  # the user is told the cluster was split


def test_the_orchestrators_key_wins_a_split_and_the_others_are_retired():
    held = [member("f1", K2), member("f2", K2), member("o", K1, orchestrator=True)]
    decision = decide_cluster_key(held, rotate=False)
    assert decision.keep == K1.fingerprint and decision.retired == {K2.fingerprint}
