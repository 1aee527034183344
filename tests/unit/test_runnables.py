"""Runnable files, extension locations, git checkouts with the user's git, and flambe-run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from runnable_fixtures import make_repository, runnable_yaml, write_extension

from flambe_iac.errors import InputError
from flambe_iac.inputs.extensions import GIT, LOCAL, PYPI, checkout, parse_location, redact_url
from flambe_iac.inputs.runnable_file import check_runnable_class, load_runnable_file
from flambe_iac.runnable import secrets_config

CANARY = "canary-%-runnable-secret"


@pytest.mark.parametrize("text, url, ref, subdirectory", [
    ("https://github.com/me/ext.git", "https://github.com/me/ext.git", None, None),
    ("https://github.com/me/ext.git@v1.2#subdirectory=src/pkg", "https://github.com/me/ext.git", "v1.2", "src/pkg"),
    ("git+https://oauth2:tok@gitlab.com/me/ext.git@main", "https://oauth2:tok@gitlab.com/me/ext.git", "main", None),
    ("ssh://git@github.com/me/ext.git@abc123", "ssh://git@github.com/me/ext.git", "abc123", None),
    ("git@github.com:me/ext.git", "git@github.com:me/ext.git", None, None),
    ("git@github.com:me/ext.git@feature/x#subdirectory=lib", "git@github.com:me/ext.git", "feature/x", "lib"),
    ("lab-host:repos/ext.git", "lab-host:repos/ext.git", None, None),
])
def test_git_locations(text, url, ref, subdirectory, tmp_path):
    location = parse_location("ext", text, tmp_path)
    assert (location.kind, location.url, location.ref, location.subdirectory) == (GIT, url, ref, subdirectory)


def test_local_and_pypi_locations(tmp_path):
    (tmp_path / "ext").mkdir()
    local = parse_location("ext", "./ext", tmp_path)
    assert local.kind == LOCAL and local.path == (tmp_path / "ext").resolve()
    requirement = parse_location("ext", "my-extension==1.2", tmp_path)
    assert requirement.kind == PYPI and requirement.requirement == "my-extension==1.2"


@pytest.mark.parametrize("text, expected", [
    ("ftp://host/repo.git", "not a git URL git can fetch"),
    ("https://", "not a git URL git can fetch"),
    ("https://host/repo.git#egg=x", "fragment other than #subdirectory="),
    ("https://host/repo.git#subdirectory=../up", "fragment other than #subdirectory="),
    ("https://host/repo.git@bad ref!", "not a git ref"),
    ("./missing-dir", "not a directory"),
    ("not a location at all!", "not an existing directory, a git URL"),
])
def test_bad_locations_are_refused(text, expected, tmp_path):
    with pytest.raises(InputError, match=expected):
        parse_location("ext", text, tmp_path)


def test_tokens_in_urls_are_never_shown():
    assert redact_url("https://oauth2:s3cr3t@gitlab.com/me/x.git") == "https://oauth2:***@gitlab.com/me/x.git"
    with pytest.raises(InputError) as caught:
        parse_location("ext", "ftp://me:s3cr3t@host/x.git", Path("."))
    assert "s3cr3t" not in str(caught.value)


def test_runnable_file_with_and_without_extensions(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "ext").mkdir()
    plain = tmp_path / "plain.yaml"
    plain.write_text("runnable: pkg.mod:Job\nargs: {lr: 0.1}\nresources: {data: ./data}\n")
    loaded = load_runnable_file(plain)
    assert loaded.extensions == {} and loaded.args == {"lr": 0.1}
    assert loaded.resources == {"data": (tmp_path / "data").resolve()}
    full = tmp_path / "full.yaml"
    full.write_text("ext: ./ext\n---\nrunnable: pkg.mod:Job\n")
    assert load_runnable_file(full).extensions["ext"].kind == LOCAL


@pytest.mark.parametrize("text, expected", [
    ("a: 1\n---\nb: 2\n---\nrunnable: x:Y\n", "has 3 documents"),
    ("- a list\n---\nrunnable: x:Y\n", "document 1 (the extensions): expected a mapping"),
    ("ext: ftp://nowhere/x\n---\nrunnable: x:Y\n", "document 1 (the extensions), key 'ext'"),
    ("runnable: not-a-spec\n", "document 1 (the runnable), key 'runnable'"),
    ("runnable: x:Y\nargs: [1]\n", "key 'args'"),
    ("runnable: x:Y\nresources: {data: 3}\n", "key 'resources'"),
    ("runnable: x:Y\nextra: 1\n", "key 'extra': unknown"),
    ("runnable: !!python/object/apply:os.system [echo hi]\n", "no Python tags"),
])
def test_runnable_file_errors_name_the_document_and_key(tmp_path, text, expected):
    path = tmp_path / "runnable.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_runnable_file(path)


def test_runnable_class_is_found_by_reading_source_not_running_it(tmp_path):
    write_extension(tmp_path)
    (tmp_path / "reportext" / "explodes.py").write_text("raise SystemExit('must not run')\nclass Job: pass\n")
    check_runnable_class("reportext.runnables:WriteReport", [tmp_path])
    check_runnable_class("reportext.explodes:Job", [tmp_path])
    with pytest.raises(InputError, match="defines no class 'Nope'"):
        check_runnable_class("reportext.runnables:Nope", [tmp_path])
    with pytest.raises(InputError, match="no module 'nowhere.mod'"):
        check_runnable_class("nowhere.mod:Job", [tmp_path])


def test_secrets_config_keeps_percent_and_inherits_default(tmp_path):
    secrets = tmp_path / "secrets.ini"
    secrets.write_text(f"[DEFAULT]\nregion = eu\n[aws]\nsecret = {CANARY}\n")
    config = secrets_config(secrets)
    assert config["aws"]["secret"] == CANARY and config["aws"]["region"] == "eu"


@pytest.fixture
def repository(tmp_path):
    return make_repository(tmp_path / "repo"), tmp_path / "repo"


def test_checkout_default_branch_ref_and_subdirectory(repository, tmp_path):
    commits, path = repository
    cache = tmp_path / "cache"
    head = checkout(parse_location("ext", f"file://{path}", tmp_path), cache)
    assert head.commit == commits["v2"]
    assert "MARKER = 'v2'" in (head.directory / "reportext" / "runnables.py").read_text()
    pinned = checkout(parse_location("ext", f"file://{path}@v1", tmp_path), cache)
    assert pinned.commit == commits["v1"]
    assert "MARKER = 'v1'" in (pinned.directory / "reportext" / "runnables.py").read_text()
    by_commit = checkout(parse_location("ext", f"file://{path}@{commits['v1']}", tmp_path), cache)
    assert by_commit.commit == commits["v1"]
    sub = checkout(parse_location("ext", f"file://{path}@main#subdirectory=sub", tmp_path), cache)
    assert sub.directory.name == "sub" and "v2-sub" in (sub.directory / "reportext" / "runnables.py").read_text()


def test_checkout_errors_are_input_errors(repository, tmp_path):
    _, path = repository
    with pytest.raises(InputError, match="has no ref 'no-such-ref'"):
        checkout(parse_location("ext", f"file://{path}@no-such-ref", tmp_path), tmp_path / "cache")
    with pytest.raises(InputError, match="git could not fetch"):
        checkout(parse_location("ext", f"file://{tmp_path}/absent.git", tmp_path), tmp_path / "cache2")
    with pytest.raises(InputError, match="'nope' is not a directory"):
        checkout(parse_location("ext", f"file://{path}#subdirectory=nope", tmp_path), tmp_path / "cache3")


def flambe_run(*arguments, home):
    return subprocess.run([sys.executable, "-m", "flambe_iac.cli.run", *arguments], capture_output=True, text=True,
                          env={**os.environ, "HOME": str(home)})


def test_flambe_run_runs_locally_with_config_and_args(repository, tmp_path):
    _, path = repository
    out = tmp_path / "out"
    out.mkdir()
    home = tmp_path / "home"
    (home / ".flambe").mkdir(parents=True)
    (home / ".flambe" / "secrets.ini").write_text(f"[DEFAULT]\nregion = eu\n[aws]\nsecret = {CANARY}\n")
    runnable = runnable_yaml(tmp_path / "runnable.yaml", f"file://{path}@v1", out, message="hi")
    result = flambe_run(str(runnable), home=home)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "result.json").read_text())
    assert report["message"] == "hi" and report["marker"] == "v1"
    assert report["config"]["aws"] == {"region": "eu", "secret": CANARY}
    assert CANARY not in result.stdout + result.stderr


def test_flambe_run_refuses_a_named_secrets_file_that_is_missing(repository, tmp_path):
    _, path = repository
    runnable = runnable_yaml(tmp_path / "runnable.yaml", f"file://{path}", tmp_path)
    result = flambe_run(str(runnable), "--secrets", str(tmp_path / "absent.ini"), home=tmp_path)
    assert result.returncode == 2
    assert "does not exist" in result.stderr
    assert not (tmp_path / "result.json").exists()
