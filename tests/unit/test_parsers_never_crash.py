"""Every parser of what a host sends back, and of every input file, fed arbitrary text and bytes (hypothesis):
each returns a value, an input error or a host's cause in words, never another exception (invariant 12)."""

import json
import string
from pathlib import Path

import pytest
import yaml
from framed_answers import section
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flambe_iac.day_two.status import parse_status
from flambe_iac.engine.snapshot import SnapshotError, parse_snapshot
from flambe_iac.engine.cluster_key import parse_retired_list
from flambe_iac.engine.ray_cluster import parse_start_output, parse_state
from flambe_iac.engine.remote_probes import parse_checksums, parse_copy_check
from flambe_iac.errors import InputError
from flambe_iac.inputs.cluster_file import load_cluster_file, parse_cluster_file
from flambe_iac.inputs.outputs import load_outputs, parse_outputs
from flambe_iac.inputs.runnable_file import load_runnable_file
from flambe_iac.inputs.secrets_file import read_secrets_file
from flambe_iac.inputs.stack_config import config_values, source_from_config
from flambe_iac.inputs.tree_listing import parse_tree_listing
from flambe_iac.ssh.console_pins import parse_console_host_keys
from flambe_iac.ssh.host_keys import keys_in, read_known_hosts
from flambe_iac.terminal import safe_field, safe_line, safe_text

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Text shaped like what the parsers read: their markers and separators, mixed with anything at all.
MARKERS = ["@file ", "@sha ", "@read ", "@tree ", "@link ", "@missing ", "@running ", "@pub", "@manifest", "@sums",
           "@run", "@log", "@ray", "@end", "running ", "exited ", "gone", "f\t", "d\t", "l\t", "  ", " *", "./",
           "SHA256:", "@version ", "@started", "@no-ray", "@failed", "|1|", "ssh-ed25519 AAAA", "\t", "\n", "{", "}"]
pieces = st.one_of(st.sampled_from(MARKERS), st.text(max_size=12), st.text(string.hexdigits, max_size=8))
hostile_text = st.lists(pieces, max_size=30).map("".join)
hostile_lines = st.lists(hostile_text, max_size=20)
hostile_bytes = st.one_of(st.binary(max_size=200), hostile_text.map(lambda text: text.encode(errors="surrogatepass")))


@SETTINGS
@given(hostile_lines)
def test_the_snapshot_parser_returns_a_snapshot_or_a_cause(lines):
    try:
        parse_snapshot(lines)
    except SnapshotError as error:
        assert "unreadable" in str(error)


@SETTINGS
@given(hostile_bytes)
def test_checksum_listings_always_parse(data):
    assert isinstance(parse_checksums(data), dict)


@SETTINGS
@given(st.lists(st.sampled_from([b"f", b"d", b"l", b"x", b"", b"12", b"1.5", b"-3", b"a/b"]) | st.binary(max_size=9),
                max_size=20).map(b"\0".join))
def test_tree_listings_parse_or_are_named_malformed(data):
    try:
        entries = parse_tree_listing(data)
    except ValueError:
        return
    assert all(entry[0] in "fdl" for entry in entries)


@SETTINGS
@given(hostile_bytes)
def test_copy_checks_parse_or_are_named_malformed(data):
    try:
        parse_copy_check(data)
    except ValueError:
        pass


@SETTINGS
@given(hostile_text, st.integers(-1, 255), hostile_text)
def test_status_records_are_read_or_named_unreadable(output, returncode, stderr):
    status = parse_status("c-orchestrator", "10.0.0.1", returncode, output + "\n@end\n", stderr)
    assert status.problems is not None


@pytest.mark.parametrize("record", ["exited ", "exited", "running", "running abc", "exited x y", "garbage"])
def test_a_truncated_run_record_is_a_problem_in_words(record):
    output = section("@pub") + section("@manifest") + section("@sums") + section("@run", f"{record}\n") + "@log\n@end\n"
    status = parse_status("c-orchestrator", "10.0.0.1", 0, output, "")
    assert not status.healthy
    assert any(problem.startswith("runnable ") for problem in status.problems)


@SETTINGS
@given(hostile_bytes)
def test_ray_records_and_start_output_always_parse(data):
    parse_state(data)
    parse_start_output(data)
    parse_retired_list(data)


@SETTINGS
@given(hostile_text)
def test_console_output_never_crashes_the_pin_reader(text):
    assert isinstance(parse_console_host_keys(text), list)


@SETTINGS
@given(hostile_text)
def test_host_text_reaches_the_terminal_without_control_characters(text):
    for shown in (safe_field(text), safe_line(text.encode(errors="surrogatepass"))):
        assert all(character == "\t" or character.isprintable() for character in shown), repr(shown)
    assert all(character in "\n\t" or character.isprintable() for character in safe_text(text))


def test_an_escape_sequence_is_shown_not_obeyed():
    assert safe_field("ok\x1b[2K\x1b[1Afactory-2: changed\r\n") == "ok\\x1b[2K\\x1b[1Afactory-2: changed\\x0d\\x0a"
    assert safe_line(b"\xff\x9b31m\xe2\x80\xaeevil\n") == "\\xff\\x9b31m\\u202eevil"


# -- input files: a value or an InputError


documents = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), hostile_text),
                         lambda children: st.lists(children, max_size=4) | st.dictionaries(
                             st.sampled_from(["flambe_outputs_version", "cluster_name", "ssh_user", "region",
                                              "orchestrator", "factories", "id", "public_ip", "private_ip", "name",
                                              "username", "orchestrator_ip", "factories_ips", "key", "setup_cmds",
                                              "flambe:subnetId", "flambe:securityGroupIds", "secure", "runnable",
                                              "args", "resources"]) | hostile_text, children, max_size=6),
                         max_leaves=12)


@SETTINGS
@given(documents)
def test_outputs_and_cluster_documents_are_a_cluster_or_an_input_error(document):
    for parse in (lambda: parse_outputs(document, "outputs.json"), lambda: parse_cluster_file(document, "c.yaml")):
        try:
            parse()
        except InputError:
            pass


@SETTINGS
@given(documents)
def test_stack_config_is_values_or_an_input_error(document):
    try:
        config_values(document if isinstance(document, dict) else {"flambe:subnetId": document}, "stack")
    except InputError:
        pass


def file_contents():
    return st.one_of(hostile_bytes, documents.map(lambda document: json.dumps(document).encode()),
                     documents.map(lambda document: yaml.safe_dump(document).encode()))


@SETTINGS
@given(data=file_contents())
def test_every_input_file_is_read_or_refused_in_words(tmp_path_factory, data):
    path = Path(tmp_path_factory.mktemp("input")) / "file"
    path.write_bytes(data)
    for read in (load_outputs, load_cluster_file, load_runnable_file, read_secrets_file, source_from_config):
        try:
            read(path)
        except InputError:
            pass
    keys_in(read_known_hosts(path), "10.0.0.1")


DEEP = "[" * 100000
HUGE = "1" * 5000


@pytest.mark.parametrize("text", [DEEP, HUGE, '{"a": ' * 50000, "- " * 50000 + "x", "{1: x, z: y}",
                                  "name: c\nkey: \"a\\0b\"\n"])
def test_deep_nesting_huge_numbers_and_odd_keys_are_input_errors(tmp_path, text):
    path = tmp_path / "file"
    path.write_text(text)
    for read in (load_outputs, load_cluster_file, load_runnable_file, source_from_config):
        try:
            read(path)
        except InputError:
            pass


@pytest.mark.parametrize("manifest", [DEEP, HUGE, "[]", '{"resources": [1]}', '{"resources": {"d": 1}}'])
def test_a_hostile_manifest_is_a_problem_not_a_crash(manifest):
    output = section("@pub") + section("@manifest", manifest) + section("@sums") + section("@ray", DEEP) + "@end\n"
    status = parse_status("c-orchestrator", "10.0.0.1", 0, output, "")
    assert not status.healthy
