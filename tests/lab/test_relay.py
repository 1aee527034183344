"""Relay fan-out: trees cross the client's link once, to the orchestrator, which rsyncs them on to the factories with
the cluster key. Checked on the hosts: bytes, sshd logs (who logged in from where, with which key), and failures that
stay with the host they belong to."""

import json
import os
import shutil
import signal
import threading
import time

import pytest

from hostile_names import HOSTILE_NAMES, make_tree, tree_bytes

pytestmark = pytest.mark.lab


def resource_files(deploy_inputs):
    return {path.relative_to(deploy_inputs["resource"]): path.read_bytes()
            for path in deploy_inputs["resource"].rglob("*") if path.is_file()}


def holds_the_resource(lab, name, deploy_inputs):
    target = lab.home(name) / "resources" / "data"
    return all((target / relative).is_file() and (target / relative).read_bytes() == data
               for relative, data in resource_files(deploy_inputs).items())


def logins(lab, name):
    """The addresses sshd accepted a public key login from, with the key's fingerprint."""
    return [(line.split(" from ")[1].split()[0], line.rsplit(" ", 1)[-1])
            for line in lab.sshd_log(name).splitlines() if "Accepted publickey" in line]


def test_factories_get_the_tree_from_the_orchestrator_with_the_cluster_key(make_lab, tmp_path, deploy_inputs):
    lab = make_lab(4, "--uplink-mbit", "200")
    report = tmp_path / "report.json"
    result = lab.deploy(*lab.lab_arguments(), "--resource", f"data={deploy_inputs['resource']}", "--fan-out",
                        "relay", "--report", str(report))
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(report.read_text())
    cluster_key = document["cluster_key_fingerprint"]
    for name in lab.hostnames:
        assert holds_the_resource(lab, name, deploy_inputs), name
    for name in lab.hostnames[1:]:
        from_orchestrator = [key for address, key in logins(lab, name) if address == lab.addresses[0]]
        assert from_orchestrator and set(from_orchestrator) == {cluster_key}, logins(lab, name)
    assert not document["notes"]
    for name in lab.hostnames:  # each hop's shared connection closed by its last pass
        assert not list((lab.home(name) / ".flambe").glob("hop-*")), name


def test_a_swapped_host_key_at_a_factorys_private_address_refuses_the_hop(make_lab, tmp_path, deploy_inputs):
    """The cluster says factory B is reached privately at the address of another host, whose host key is not B's:
    the orchestrator's strict check refuses the hop, B fails with that cause, and nothing lands on either host."""
    lab = make_lab(4)
    cluster = tmp_path / "cluster.yaml"
    # First the cluster as it was, h3 a member: h3 authorizes the cluster key, so only its host key can refuse a hop.
    cluster.write_text(json.dumps({"name": "swapped", "username": lab.user, "orchestrator_ip": lab.addresses[0],
                                   "factories_ips": lab.addresses[1:]}))
    first = lab.deploy("--cluster", str(cluster), "--key", str(lab.user_key), "--known-hosts", str(lab.known_hosts))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "flambe-cluster:swapped" in (lab.home("factory-3") / ".ssh" / "authorized_keys").read_text()
    cluster.write_text(json.dumps({
        "name": "swapped", "username": lab.user,
        "orchestrator_ip": lab.addresses[0],
        "factories_ips": [lab.addresses[1], [lab.addresses[2], lab.addresses[3]]],  # B: public h2, private h3
    }))
    report = tmp_path / "report.json"
    result = lab.deploy("--cluster", str(cluster), "--key", str(lab.user_key), "--known-hosts", str(lab.known_hosts),
                        "--resource", f"data={deploy_inputs['resource']}", "--fan-out", "relay",
                        "--report", str(report))
    assert result.returncode == 1, result.stdout + result.stderr
    entries = {entry["address"]: entry for entry in json.loads(report.read_text())["hosts"]}
    refused = entries[lab.addresses[2]]
    assert "relay hop" in refused["error"] and "Host key verification failed" in refused["error"], refused["error"]
    assert entries[lab.addresses[1]]["error"] is None
    assert holds_the_resource(lab, "factory-1", deploy_inputs)
    assert not (lab.home("factory-2") / "resources").exists()
    assert not (lab.home("factory-3") / "resources").exists()
    assert not any(address == lab.addresses[0] for address, _ in logins(lab, "factory-3"))


def test_with_the_orchestrator_down_factories_fall_back_to_direct_with_a_note(make_lab, tmp_path, deploy_inputs):
    lab = make_lab(3)
    pids = lab.sshd_pids("orchestrator")
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    report = tmp_path / "report.json"
    try:
        result = lab.deploy(*lab.lab_arguments(), "--resource", f"data={deploy_inputs['resource']}",
                            "--fan-out", "relay", "--wait", "0", "--connect-timeout", "2", "--report", str(report))
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert result.returncode == 1
    document = json.loads(report.read_text())
    assert any("relay unavailable" in note and "sent directly" in note for note in document["notes"])
    for name in ("factory-1", "factory-2"):
        assert holds_the_resource(lab, name, deploy_inputs)
    again = lab.deploy(*lab.lab_arguments(), "--resource", f"data={deploy_inputs['resource']}")
    assert again.returncode == 0, again.stdout + again.stderr
    assert holds_the_resource(lab, "orchestrator", deploy_inputs)


def test_a_damaged_orchestrator_copy_is_never_kept_by_a_factory(make_lab, tmp_path, deploy_inputs):
    """The orchestrator's rsync changes a byte of what it receives, keeping size and mtime: its own check fails it.
    The factories may have taken the damaged file from it meanwhile; each checks its own copy, and one that fails is
    sent again from here, compared by contents: every factory ends up intact and checked."""
    lab = make_lab(3, "--fault", "0:corrupt-rsync")
    report = tmp_path / "report.json"
    result = lab.deploy(*lab.lab_arguments(), "--resource", f"data={deploy_inputs['resource']}", "--fan-out", "relay",
                        "--report", str(report))
    assert result.returncode == 1, result.stdout + result.stderr
    document = json.loads(report.read_text())
    entries = {entry["address"]: entry for entry in document["hosts"]}
    assert "integrity check failed" in entries[lab.addresses[0]]["error"]
    assert all("sent again from here, compared by contents" in note for note in document["notes"])
    for name, address in zip(lab.hostnames[1:], lab.addresses[1:]):
        assert entries[address]["error"] is None, entries[address]
        assert holds_the_resource(lab, name, deploy_inputs), name


@pytest.mark.parametrize("fan_out", ["relay", "direct"])
def test_a_copy_that_differs_from_the_checksums_fails_that_host(make_lab, tmp_path, deploy_inputs, fan_out):
    lab = make_lab(3, "--fault", "2:corrupt-rsync")
    report = tmp_path / "report.json"
    result = lab.deploy(*lab.lab_arguments(), "--resource", f"data={deploy_inputs['resource']}", "--fan-out",
                        fan_out, "--report", str(report))
    assert result.returncode == 1, result.stdout + result.stderr
    entries = {entry["address"]: entry for entry in json.loads(report.read_text())["hosts"]}
    assert "integrity check failed" in entries[lab.addresses[2]]["error"]
    assert entries[lab.addresses[2]]["steps"]["resources"]["status"] == "failed"
    assert entries[lab.addresses[0]]["error"] is None and entries[lab.addresses[1]]["error"] is None
    assert "cluster_key_fingerprint" in lab.manifest("factory-1")
    assert not (lab.home("factory-2") / ".flambe" / "cluster.json").exists()  # no manifest vouches for it


@pytest.mark.parametrize("fan_out", ["relay", "direct"])
def test_files_with_any_names_deliver_verify_and_rerun_unchanged(make_lab, tmp_path, fan_out):
    """Names with a newline, a tab, a backslash, a leading dash, bytes that are not UTF-8, 255 bytes: every host
    holds them byte for byte, the check after the transfer passes, and a re-run changes nothing."""
    lab = make_lab(3)
    tree = make_tree(tmp_path / "data", HOSTILE_NAMES)
    report = tmp_path / "report.json"
    arguments = (*lab.lab_arguments(), "--resource", f"data={tree}", "--fan-out", fan_out, "--report", str(report))
    first = lab.deploy(*arguments)
    assert first.returncode == 0, first.stdout + first.stderr
    for name in lab.hostnames:
        assert tree_bytes(lab.home(name) / "resources" / "data") == tree_bytes(tree), name
    again = lab.deploy(*arguments)
    assert again.returncode == 0, again.stdout + again.stderr
    statuses = {host["address"]: host["steps"]["resources"]["status"] for host in json.loads(report.read_text())["hosts"]}
    assert statuses == dict.fromkeys(lab.addresses, "unchanged")
    manifest = json.loads((lab.home("factory-1") / ".flambe" / "cluster.json").read_text())
    assert {os.fsencode(path) for path in manifest["resources"]["data"]} == {
        path for path, _ in tree_bytes(tree).items() if not os.path.islink(os.path.join(os.fsencode(tree), path))}


def test_a_local_change_that_keeps_size_and_mtime_reaches_every_host(make_lab, tmp_path):
    """A file rewritten here with its size and mtime kept: rsync's quick check would skip it, and the hosts' listings
    still match. Their manifests record its old checksum, so every host hashes it, and it arrives on every one."""
    lab = make_lab(3)
    tree = make_tree(tmp_path / "data", [b"a", b"b"])
    arguments = (*lab.lab_arguments(), "--resource", f"data={tree}")
    first = lab.deploy(*arguments)
    assert first.returncode == 0, first.stdout + first.stderr
    status = (tree / "a").stat()
    (tree / "a").write_bytes(b"Z" * status.st_size)
    os.utime(tree / "a", ns=(status.st_atime_ns, status.st_mtime_ns))
    again = lab.deploy(*arguments)
    assert again.returncode == 0, again.stdout + again.stderr
    for name in lab.hostnames:
        assert (lab.home(name) / "resources" / "data" / "a").read_bytes() == b"Z" * status.st_size, name


@pytest.mark.parametrize("uplink, mode", [((), "direct"), (("--uplink-mbit", "20"), "relay")])
def test_auto_measures_the_uplink_and_goes_direct_only_where_it_is_fast(make_lab, tmp_path, uplink, mode):
    """On a fast link, the hops would cost more than every copy from here; behind a 20 Mbit/s uplink, 4 copies of
    3 MB would take 4.8 s, and the tree crosses it once. The report says what auto measured and chose."""
    lab = make_lab(4, *uplink)
    resource = tmp_path / "data"
    resource.mkdir()
    (resource / "blob.bin").write_bytes(os.urandom(3_000_000))
    report = tmp_path / "report.json"
    result = lab.deploy(*lab.lab_arguments(), "--resource", f"data={resource}", "--report", str(report))
    assert result.returncode == 0, result.stdout + result.stderr
    notes = json.loads(report.read_text())["notes"]
    assert any(note.startswith(f"--fan-out auto sent ~/resources/data by {mode}: ") for note in notes), notes
    from_orchestrator = [address for name in lab.hostnames[1:] for address, _ in logins(lab, name)
                         if address == lab.addresses[0]]
    assert bool(from_orchestrator) == (mode == "relay")
    for name in lab.hostnames:
        assert (lab.home(name) / "resources" / "data" / "blob.bin").read_bytes() == (resource / "blob.bin").read_bytes()


class Watcher:
    """Reads one file on every host, over and over, while a deploy runs: every distinct content seen, by host."""

    def __init__(self, lab, relative: str):
        self.paths = {name: lab.home(name) / relative for name in lab.hostnames}
        self.seen = {name: [] for name in lab.hostnames}
        self.sizes = []  # each round's size of each host's file (-1: absent)
        self.running = True
        self.thread = threading.Thread(target=self.watch, daemon=True)

    def watch(self):
        while self.running:
            sizes = {}
            for name, path in self.paths.items():
                try:
                    content = path.read_bytes()
                except OSError:
                    sizes[name] = -1
                    continue
                sizes[name] = len(content)
                if not self.seen[name] or self.seen[name][-1] != content:
                    self.seen[name].append(content)
            self.sizes.append(sizes)
            time.sleep(0.01)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.running = False
        self.thread.join()


def test_a_first_copy_flows_on_while_it_arrives_and_a_rerun_never_shows_a_mixed_file(make_lab, tmp_path):
    """Behind a 20 Mbit/s uplink, one file of 6 MB (2.4 s to the orchestrator): a factory holds part of it while the
    orchestrator's own copy is still short of it, and every copy ends whole. On a re-run the file, changed, is renamed
    into place on each host: a reader there sees the old bytes or the new, never a mix; and so it is on factories
    that have a copy while a replaced orchestrator's grows in place."""
    lab = make_lab(3, "--uplink-mbit", "20")
    tree = tmp_path / "data"
    tree.mkdir()
    old, new = os.urandom(6_000_000), os.urandom(7_000_000)
    (tree / "blob.bin").write_bytes(old)
    arguments = (*lab.lab_arguments(), "--resource", f"data={tree}", "--fan-out", "tree")
    with Watcher(lab, "resources/data/blob.bin") as first_run:
        first = lab.deploy(*arguments)
    assert first.returncode == 0, first.stdout + first.stderr
    assert all(first_run.seen[name][-1] == old for name in lab.hostnames)
    assert any(0 < sizes["factory-1"] and sizes["orchestrator"] < len(old) for sizes in first_run.sizes)
    assert all(old.startswith(content) for name in lab.hostnames for content in first_run.seen[name])
    (tree / "blob.bin").write_bytes(new)
    with Watcher(lab, "resources/data/blob.bin") as rerun:
        again = lab.deploy(*arguments)
    assert again.returncode == 0, again.stdout + again.stderr
    for name in lab.hostnames:
        never_mixed = rerun.seen[name] in ([old, new], [new])
        assert never_mixed, (name, [len(content) for content in rerun.seen[name]])
    # A replaced orchestrator (no copy) serving factories that have one: its file grows in place, theirs do not.
    shutil.rmtree(lab.home("orchestrator") / "resources")
    newest = os.urandom(5_000_000)
    (tree / "blob.bin").write_bytes(newest)
    with Watcher(lab, "resources/data/blob.bin") as replaced:
        third = lab.deploy(*arguments)
    assert third.returncode == 0, third.stdout + third.stderr
    for name in lab.hostnames[1:]:
        never_mixed = replaced.seen[name] in ([new, newest], [newest])
        assert never_mixed, (name, [len(content) for content in replaced.seen[name]])
