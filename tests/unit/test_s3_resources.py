"""S3 resources: the listing here, and the puller a host runs, against the lab's own S3 stand-in (moto's server
with its faults) and metadata stand-in on 127.0.0.1. The puller runs as the hosts run it: a python3 process of
its own, its job on stdin, in a home of the test's."""

import base64
import datetime
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest
from werkzeug.serving import make_server

from flambe_iac.aws.s3_head_cache import HeadCache
from flambe_iac.aws.s3_listing import NONE, checked_checksum, list_s3_resources
from flambe_iac.aws.s3_staging import stage_resources
from flambe_iac.deploys.s3_resources import PULL_COMMAND, pull_job, pull_result, pulled_already, puller_files
from flambe_iac.engine.snapshot import HostSnapshot
from flambe_iac.errors import InputError
from flambe_iac.inputs.resources import Resource, checksums
from flambe_iac.inputs.s3_location import parse_s3_resource, split_s3_pairs
from flambe_iac.inputs.tree_listing import TreeSummary, walk_tree
from flambe_iac.lab import metadata_service
from flambe_iac.lab.s3_stand_in import FaultyS3

PULLER = Path(__file__).resolve().parents[2] / "flambe_iac" / "agent" / "s3_pull.py"
USER_CANARY = "AKIAUSERCANARY0000000"
USER_SECRET_CANARY = "user-secret-canary-never-on-a-host"


class Seen:
    """The stand-in's requests, as the S3 side saw them (the Authorization header names the credential)."""

    def __init__(self, app):
        self.app, self.authorizations, self.requests = app, [], []

    def __call__(self, environ, start_response):
        self.authorizations.append(environ.get("HTTP_AUTHORIZATION", ""))
        self.requests.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")))
        return self.app(environ, start_response)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    from moto.server import DomainDispatcherApplication, create_backend_app

    directory = tmp_path_factory.mktemp("stand-ins")
    faults = directory / "s3-faults.json"
    seen = Seen(FaultyS3(DomainDispatcherApplication(create_backend_app), faults))
    s3_server = make_server("127.0.0.1", 0, seen, threaded=True)
    mode = directory / "metadata-mode"
    metadata = ThreadingHTTPServer(("127.0.0.1", 0), metadata_service.handler_for(float("inf"), mode))
    for server in (s3_server, metadata):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"endpoint": f"http://127.0.0.1:{s3_server.server_port}", "faults": faults, "mode": mode, "seen": seen,
           "metadata": f"http://127.0.0.1:{metadata.server_address[1]}"}
    s3_server.shutdown()
    metadata.shutdown()


@pytest.fixture
def s3(stand_ins, monkeypatch, request, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", USER_CANARY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", USER_SECRET_CANARY)
    stand_ins["faults"].write_text("{}")
    stand_ins["mode"].write_text("")
    client = boto3.client("s3", endpoint_url=stand_ins["endpoint"], region_name="us-east-1")
    bucket = "b-" + hashlib.sha256(request.node.name.encode()).hexdigest()[:20]
    client.create_bucket(Bucket=bucket)
    return {**stand_ins, "client": client, "bucket": bucket, "cache": HeadCache(tmp_path / "s3-heads.sqlite")}


def put(s3, key: str, body: bytes, checksum: str | None = "SHA256") -> None:
    s3["client"].put_object(Bucket=s3["bucket"], Key=key, Body=body,
                            **({"ChecksumAlgorithm": checksum} if checksum else {}))


def listing(s3, prefix="data", allow_unverified=False):
    resource = parse_s3_resource("data", f"s3://{s3['bucket']}/{prefix}")
    return list_s3_resources([resource], allow_unverified, client=s3["client"], cache=s3["cache"])["data"]


def run_puller(s3, home: Path, job: bytes, **environment) -> subprocess.CompletedProcess:
    """As a host runs it: the files the deploy sends, in the home, and the deploy's command, with only the standard
    variables set (python3 is this Python)."""
    for path, content, _ in puller_files():
        (home / path).parent.mkdir(parents=True, exist_ok=True)
        (home / path).write_bytes(content.data)
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(home),
           "AWS_ENDPOINT_URL_S3": s3["endpoint"], "AWS_EC2_METADATA_SERVICE_ENDPOINT": s3["metadata"], **environment}
    return subprocess.run(["sh", "-c", PULL_COMMAND], input=job, capture_output=True, cwd=home, env=env, timeout=120)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*") if path.is_file()}


OBJECTS = {"data/a.txt": b"alpha\n", "data/sub dir/\u00fc \u00f1\nline.txt": b"x" * 100_000,
           "data/deep/er/big.bin": os.urandom(3 << 20)}


def test_a_host_pulls_every_object_byte_for_byte_and_a_second_pull_fetches_nothing(s3, tmp_path):
    for key, body in OBJECTS.items():
        put(s3, key, body)
    put(s3, "data/md5-only.txt", b"plain", checksum=None)
    pulled = listing(s3)
    home = tmp_path / "home"
    home.mkdir()
    first = run_puller(s3, home, pull_job(pulled))
    assert first.returncode == 0, first.stderr
    expected = {key[len("data/"):]: body for key, body in {**OBJECTS, "data/md5-only.txt": b"plain"}.items()}
    assert tree_bytes(home / "resources" / "data") == expected
    assert json.loads(first.stdout)["fetched"] == 4
    assert not (home / "resources" / ".data.s3-partial").exists()
    second = run_puller(s3, home, pull_job(pulled))
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["fetched"] == 0  # a second reading of the loop: nothing fetched again
    assert tree_bytes(home / "resources" / "data") == expected


def test_what_the_listing_does_not_hold_goes_but_nothing_outside_the_resource(s3, tmp_path):
    put(s3, "data/kept.txt", b"kept")
    home = tmp_path / "home"
    outside = tmp_path / "outside.txt"
    outside.write_text("not flambe's")
    resource = home / "resources" / "data"
    (resource / "old dir").mkdir(parents=True)
    (resource / "old dir" / "stale.txt").write_text("stale")
    (resource / "link").symlink_to(outside)
    (resource / "kept.txt").write_text("edited by hand")
    result = run_puller(s3, home, pull_job(listing(s3)))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(resource)) == ["kept.txt"]
    assert (resource / "kept.txt").read_bytes() == b"kept"
    assert outside.read_text() == "not flambe's"


def test_an_object_changed_after_the_listing_fails_the_host_by_key_and_nothing_of_it_is_kept(s3, tmp_path):
    put(s3, "data/a.txt", b"a, version 1")
    put(s3, "data/z.txt", b"z, version 1")
    home = tmp_path / "home"
    assert run_puller(s3, home, pull_job(listing(s3))).returncode == 0
    put(s3, "data/a.txt", b"a, version 2")
    put(s3, "data/b.txt", b"new")
    put(s3, "data/z.txt", b"z, version 2")
    listed = listing(s3)
    put(s3, "data/z.txt", b"z, version 3, written after the listing")
    result = run_puller(s3, home, pull_job(listed))
    assert result.returncode == 1
    assert f"s3://{s3['bucket']}/data/z.txt changed after this machine listed it" in result.stderr.decode()
    held = tree_bytes(home / "resources" / "data")
    assert held == {"a.txt": b"a, version 1", "z.txt": b"z, version 1"}  # the old files, whole; nothing new installed
    assert not (home / "resources" / ".data.s3-partial").exists()


def test_bytes_that_are_not_the_listed_objects_fail_the_host_by_key(s3, tmp_path):
    put(s3, "data/a.txt", b"the real bytes")
    s3["faults"].write_text(json.dumps({"127.0.0.1": ["corrupt"]}))
    home = tmp_path / "home"
    result = run_puller(s3, home, pull_job(listing(s3)))
    assert result.returncode == 1
    assert f"s3://{s3['bucket']}/data/a.txt: its sha256 is" in result.stderr.decode()
    assert not (home / "resources" / "data" / "a.txt").exists()


def test_a_throttled_pull_is_retried_and_ends_intact(s3, tmp_path):
    for index in range(6):
        put(s3, f"data/{index}.bin", os.urandom(50_000))
    s3["faults"].write_text(json.dumps({"127.0.0.1": ["slowdown"]}))
    home = tmp_path / "home"
    result = run_puller(s3, home, pull_job(listing(s3)))
    assert result.returncode == 0, result.stderr
    assert len(tree_bytes(home / "resources" / "data")) == 6


def test_the_host_reads_s3_with_its_role_alone_never_with_credentials_it_is_handed(s3, tmp_path):
    put(s3, "data/a.txt", b"alpha")
    job = pull_job(listing(s3))
    assert USER_CANARY.encode() not in job and USER_SECRET_CANARY.encode() not in job
    handed = {"AWS_ACCESS_KEY_ID": USER_CANARY, "AWS_SECRET_ACCESS_KEY": USER_SECRET_CANARY}
    s3["mode"].write_text("no-role")
    refused = run_puller(s3, tmp_path / "home", job, **handed)
    assert refused.returncode == 1
    assert "no instance role" in refused.stderr.decode() and "iamInstanceProfile" in refused.stderr.decode()
    s3["mode"].write_text("")
    s3["seen"].authorizations.clear()
    result = run_puller(s3, tmp_path / "home", job, **handed)
    assert result.returncode == 0, result.stderr
    assert s3["seen"].authorizations and all("Credential=ASIA" in value for value in s3["seen"].authorizations)


@pytest.mark.parametrize("answer, expected", [
    ({"ChecksumSHA256": base64.b64encode(b"\x01" * 32).decode(), "ChecksumType": "FULL_OBJECT",
      "ETag": '"' + "a" * 32 + '"'}, ("sha256", "01" * 32)),
    ({"ChecksumSHA256": base64.b64encode(b"\x01" * 32).decode() + "-3", "ChecksumType": "COMPOSITE",
      "ETag": '"' + "b" * 32 + '-3"'}, (NONE, "")),
    ({"ChecksumSHA256": base64.b64encode(b"\x01" * 32).decode(), "ChecksumType": "COMPOSITE",
      "ETag": '"' + "c" * 32 + '"'}, ("md5", "c" * 32)),
    ({"ETag": '"' + "d" * 32 + '"'}, ("md5", "d" * 32)),
    ({"ETag": '"' + "e" * 32 + '"', "ServerSideEncryption": "aws:kms"}, (NONE, "")),
    ({"ETag": '"' + "f" * 32 + '"', "SSECustomerAlgorithm": "AES256"}, (NONE, "")),
    ({"ETag": '"' + "0" * 32 + '-12"', "ChecksumCRC64NVME": "AAAAAAAAAAA="}, (NONE, "")),
    ({"ChecksumSHA256": "not base64!", "ETag": '"' + "1" * 32 + '"'}, ("md5", "1" * 32)),
    ({"ChecksumSHA256": base64.b64encode(b"short").decode(), "ETag": "W/garbage"}, (NONE, "")),
])
def test_an_objects_checksum_is_its_whole_sha256_else_a_single_part_md5_else_none(answer, expected):
    assert checked_checksum(answer) == expected


def test_an_object_no_host_can_check_is_refused_unless_allowed_and_then_named(s3):
    upload = s3["client"].create_multipart_upload(Bucket=s3["bucket"], Key="data/multi.bin")
    part = s3["client"].upload_part(Bucket=s3["bucket"], Key="data/multi.bin", UploadId=upload["UploadId"],
                                    PartNumber=1, Body=b"p" * 100)
    s3["client"].complete_multipart_upload(Bucket=s3["bucket"], Key="data/multi.bin", UploadId=upload["UploadId"],
                                           MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]})
    with pytest.raises(InputError, match="data/multi.bin has no checksum a host can check.*--allow-unverified"):
        listing(s3)
    assert listing(s3, allow_unverified=True).unverified == ["data/multi.bin"]


@pytest.mark.parametrize("key", ["data/../escape", "data//double", "data/./dot", "data/trailing/",
                                 "data/.flambe-s3-partial/x"])
def test_a_key_with_no_plain_path_below_the_prefix_is_refused_in_words(s3, key):
    put(s3, key, b"x" if not key.endswith("/") else b"not a folder marker")
    with pytest.raises(InputError, match="has no plain path below the prefix"):
        listing(s3)


@pytest.mark.parametrize("text", ["s3://UPPER/x", "s3://a/x", "s3://b_ucket/x", "s3://bucket/../x", "s3://bucket/a\nb",
                                  "s3://bucket//x", "s3://-bucket/x"])
def test_a_location_that_is_not_a_bucket_and_plain_prefix_is_bad_input(text):
    with pytest.raises(InputError):
        parse_s3_resource("data", text)


def test_a_prefix_names_a_folder_and_names_are_shared_with_local_resources():
    assert parse_s3_resource("data", "s3://my.bucket-1/sets/v2").prefix == "sets/v2/"
    assert parse_s3_resource("data", "s3://my-bucket").prefix == ""
    with pytest.raises(InputError, match="given twice"):
        split_s3_pairs(["data=./local", "data=s3://my-bucket/x"])


def test_the_signature_is_botocores_for_the_same_request(monkeypatch):
    import botocore.auth
    from botocore.awsrequest import AWSRequest
    from botocore.config import Config
    from botocore.credentials import Credentials

    sys.path.insert(0, str(PULLER.parent))
    try:
        import s3_client
    finally:
        sys.path.pop(0)
    now = datetime.datetime(2026, 12, 6, 23, 59, 1, tzinfo=datetime.timezone.utc)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: now.replace(tzinfo=None))
    credentials = {"id": "ASIAEXAMPLE", "secret": "wJalr/XUtnFEMI+K7MDENG", "token": "FwoGZX/token=="}
    for base, path in (("https://bucket.s3.eu-west-1.amazonaws.com", "/data/sub%20dir/%C3%BC%0Aline.txt"),
                       ("https://s3.eu-west-1.amazonaws.com", "/my.bucket/a%2Bb%3D/~c"),
                       ("http://127.0.0.1:9000", "/bucket/key")):  # a port is signed as the Host header sends it
        netloc = base.split("://")[1]
        ours = s3_client.sigv4_headers("GET", netloc, path, "eu-west-1", credentials, now)
        request = AWSRequest("GET", f"{base}{path}")
        request.context["client_config"] = Config(s3={"payload_signing_enabled": False})  # UNSIGNED-PAYLOAD
        botocore.auth.S3SigV4Auth(Credentials("ASIAEXAMPLE", "wJalr/XUtnFEMI+K7MDENG", "FwoGZX/token=="), "s3",
                                  "eu-west-1").add_auth(request)
        assert ours["Authorization"] == request.headers["Authorization"]


def state_snapshot(pulled, tree_digest="t" * 64, links=frozenset(), recorded=None):
    document = recorded if recorded is not None else json.dumps({"job": pulled.digest(), "tree": tree_digest})
    return HostSnapshot(contents={".flambe/s3/data/state.json": document.encode()},
                        trees={"resources/data": TreeSummary(tree_digest, links)})


def test_a_host_whose_last_pull_recorded_this_listing_and_whose_copy_is_untouched_is_unchanged(s3):
    put(s3, "data/a.txt", b"alpha")
    pulled = listing(s3)
    assert pulled_already(pulled, state_snapshot(pulled))
    touched = state_snapshot(pulled)
    touched.trees["resources/data"] = TreeSummary("u" * 64, frozenset())
    assert not pulled_already(pulled, touched)
    assert not pulled_already(pulled, state_snapshot(pulled, links=frozenset({("l", "/etc")})))
    assert not pulled_already(pulled, state_snapshot(pulled, recorded="{garbage"))
    assert not pulled_already(pulled, state_snapshot(pulled, recorded="[]"))
    put(s3, "data/a.txt", b"alpha 2")
    assert not pulled_already(listing(s3), state_snapshot(pulled))


@pytest.mark.parametrize("output", [b"", b"garbage", b'{"fetched": -1, "bytes": 0, "removed": 0, "seconds": 0}',
                                    b'{"fetched": true, "bytes": 0, "removed": 0, "seconds": 0}', b"[1]",
                                    b'{"fetched": "1", "bytes": 0, "removed": 0, "seconds": 0}'])
def test_a_puller_answer_that_is_not_its_own_is_refused(output):
    assert pull_result(output) is None


def test_a_resource_directory_that_is_a_symlink_is_refused_and_its_target_untouched(s3, tmp_path):
    put(s3, "data/a.txt", b"alpha")
    home = tmp_path / "home"
    victim = tmp_path / "work"
    victim.mkdir()
    (victim / "precious.txt").write_text("not flambe's")
    (home / "resources").mkdir(parents=True)
    (home / "resources" / "data").symlink_to(victim)
    result = run_puller(s3, home, pull_job(listing(s3)))
    assert result.returncode == 1 and "is a symlink" in result.stderr.decode()
    assert sorted(os.listdir(victim)) == ["precious.txt"]


def test_a_symlinked_directory_inside_the_resource_is_replaced_and_what_it_points_to_untouched(s3, tmp_path):
    put(s3, "data/sub/a.txt", b"alpha")
    home = tmp_path / "home"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a.txt").write_bytes(b"alpha")  # the right bytes, through a link: not the resource's own file
    (home / "resources" / "data").mkdir(parents=True)
    (home / "resources" / "data" / "sub").symlink_to(elsewhere)
    result = run_puller(s3, home, pull_job(listing(s3)))
    assert result.returncode == 0, result.stderr
    assert not (home / "resources" / "data" / "sub").is_symlink()
    assert tree_bytes(home / "resources" / "data") == {"sub/a.txt": b"alpha"}
    assert (elsewhere / "a.txt").read_bytes() == b"alpha"


def test_an_empty_prefix_is_refused_before_it_could_empty_every_hosts_copy(s3):
    put(s3, "data/a.txt", b"alpha")
    with pytest.raises(InputError, match="holds no object"):
        listing(s3, prefix="dtaa")


def test_the_puller_sent_is_the_one_in_this_package():
    assert [content.data for _, content, _ in puller_files()] == \
        [PULLER.read_bytes(), PULLER.with_name("s3_client.py").read_bytes()]


def test_a_host_python_too_old_for_the_puller_is_named_before_it_runs(s3, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text("#!/bin/sh\ncase \"$*\" in *-V*) echo 'Python 3.7.16';; *) exit 1;; esac\n")
    (fake / "python3").chmod(0o755)
    result = run_puller(s3, tmp_path / "home", b"{}", PATH=f"{fake}:/usr/bin:/bin")
    assert result.returncode == 1 and b"Python 3.7.16 is too old to pull from S3" in result.stderr


def staged(s3, tree: Path, said: list):
    resource = Resource("data", tree)
    walk = walk_tree(tree)
    via = parse_s3_resource("stage-via", f"s3://{s3['bucket']}/stage")
    return stage_resources(s3["client"], via, {resource: (walk, checksums(resource, walk))}, said.append)["data"]


def uploads(s3) -> list[str]:
    return [path for method, path in s3["seen"].requests if method == "PUT" and "/stage/sha256/" in path]


def test_a_staged_tree_reaches_a_host_with_its_modes_and_each_content_crosses_the_uplink_once(s3, tmp_path):
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (tree / "bin" / "run.sh").chmod(0o755)
    (tree / "same-1.bin").write_bytes(b"s" * 5000)
    (tree / "same-2.bin").write_bytes(b"s" * 5000)
    (tree / "\u00fc ber.txt").write_bytes(b"unicode")
    said = []
    s3["seen"].requests.clear()
    listed = staged(s3, tree, said)
    assert len(uploads(s3)) == 3  # three contents: the two identical files go up once
    home = tmp_path / "home"
    result = run_puller(s3, home, pull_job(listed))
    assert result.returncode == 0, result.stderr
    assert tree_bytes(home / "resources" / "data") == tree_bytes(tree)
    assert (home / "resources" / "data" / "bin" / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (home / "resources" / "data" / "same-1.bin").stat().st_mode & 0o777 == 0o644

    (tree / "same-2.bin").write_bytes(b"changed")
    s3["seen"].requests.clear()
    relisted = staged(s3, tree, said)
    assert len(uploads(s3)) == 1 and "1 of 4 contents to upload" in said[-1]
    again = run_puller(s3, home, pull_job(relisted))
    assert again.returncode == 0 and json.loads(again.stdout)["fetched"] == 1
    assert tree_bytes(home / "resources" / "data") == tree_bytes(tree)
    (tree / "bin" / "run.sh").chmod(0o644)  # a mode changed alone reaches the hosts too
    assert run_puller(s3, home, pull_job(staged(s3, tree, said))).returncode == 0
    assert (home / "resources" / "data" / "bin" / "run.sh").stat().st_mode & 0o777 == 0o644


def test_a_tree_s3_cannot_carry_as_it_is_is_refused_before_any_upload(s3, tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "link").symlink_to("elsewhere")
    s3["seen"].requests.clear()
    with pytest.raises(InputError, match="symlink"):
        staged(s3, tree, [])
    assert uploads(s3) == []


def heads(s3) -> int:
    return sum(method == "HEAD" and path.count("/") >= 2 for method, path in s3["seen"].requests)


def test_a_relisting_reads_again_only_the_objects_written_since(s3):
    for index in range(5):
        put(s3, f"data/{index}.txt", b"first %d" % index)
    s3["seen"].requests.clear()
    first = listing(s3)
    assert heads(s3) == 5
    s3["seen"].requests.clear()
    assert listing(s3) == first and heads(s3) == 0  # a second round: the listing alone
    put(s3, "data/3.txt", b"written again")
    s3["seen"].requests.clear()
    third = listing(s3)
    assert heads(s3) == 1
    assert [item.checksum for item in third.objects if item.key == "data/3.txt"] == \
        [hashlib.sha256(b"written again").hexdigest()]
