"""Evicting a compromised member (issue 31, item 6). The deploy lock is all or nothing: a member that holds its lock
(another deploy, or an attacker keeping it) stops every deploy, --rotate-cluster-key included. The way out, as the
README says: leave the member out of the outputs or the cluster file, then rotate. A member the source does not list
is never connected, never locked, and the rotation goes through on the others."""

import dataclasses
import io

from test_honest_outcomes import HeldLock, offline, operations_that, plan_for

from flambe_iac.cluster import FACTORY, Host
from flambe_iac.engine.snapshot import HostSnapshot
from flambe_iac.engine import driver
from flambe_iac.engine.cluster_key import ROTATED, new_cluster_key
from flambe_iac.remote_layout import CLUSTER_PUBLIC_KEY
from flambe_iac.engine.report import summary
from flambe_iac.deploys.steps import TABLE

OLD_KEY = new_cluster_key("flambe-cluster:c1")
COMPROMISED = Host("h3", FACTORY, "10.0.0.4", "10.0.0.4")


class HeldByTheAttacker:
    first_line = b"BUSY"

    def rest_of_output(self, timeout):
        return b"mallory@h3 (pid 1) since forever\n"

    def release(self):
        pass


def holding_the_old_key() -> HostSnapshot:
    snapshot = HostSnapshot()
    snapshot.contents[CLUSTER_PUBLIC_KEY] = OLD_KEY.public_line.encode() + b"\n"
    return snapshot


def rotation(tmp_path, *, with_compromised: bool):
    plan = plan_for(tmp_path)
    cluster = plan.cluster
    if with_compromised:
        cluster = dataclasses.replace(cluster, factories=(*cluster.factories, COMPROMISED))
    plan = dataclasses.replace(plan, cluster=cluster,
                               request=dataclasses.replace(plan.request, rotate_cluster_key=True))
    asked = []

    def open_lock(host, timeout):
        asked.append(host.name)
        return HeldByTheAttacker() if host.name == COMPROMISED.id else HeldLock()
    stand_ins = {**offline(operations_that(lambda host, call: None), snapshot=holding_the_old_key),
                 "open_lock": open_lock}
    return driver.run_deploy(plan, io.StringIO(), TABLE, live=False, **stand_ins), asked


def test_a_member_holding_its_lock_blocks_even_the_rotation_meant_to_evict_it(tmp_path):
    report, _ = rotation(tmp_path, with_compromised=True)
    assert not report.ok and all("another deploy of c1 is under way, from mallory@h3" in host.error
                                 for host in report.hosts)
    assert report.cluster_key_fingerprint is None  # nothing settled, nothing written: every member keeps the old key


def test_left_out_of_the_source_the_member_is_never_locked_and_the_others_rotate(tmp_path):
    report, asked = rotation(tmp_path, with_compromised=False)
    assert COMPROMISED.id not in asked and sorted(asked) == ["h0", "h1", "h2"]
    assert report.ok, summary(report)
    assert report.cluster_key_action == ROTATED and report.cluster_key_fingerprint != OLD_KEY.fingerprint
    assert [host.host_id for host in report.hosts] == ["h0", "h1", "h2"]
