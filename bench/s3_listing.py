"""What listing an S3 resource costs this machine: a first listing (ListObjectsV2, then HeadObject for every object)
and a re-listing (ListObjectsV2 alone, each HeadObject answer reused from the cache), at N objects, against moto's
server on 127.0.0.1 (in-process S3 would flatter every request; a server costs each one a round trip).

Run: .venv/bin/python bench/s3_listing.py [--objects 1000 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import boto3
from moto.server import ThreadedMotoServer

from flambe_iac.aws.s3_head_cache import HeadCache
from flambe_iac.aws.s3_listing import list_s3_resources
from flambe_iac.inputs.s3_location import parse_s3_resource


def seeded(client, bucket: str, count: int) -> None:
    client.create_bucket(Bucket=bucket)
    for index in range(count):
        client.put_object(Bucket=bucket, Key=f"data/part-{index:06}.txt", Body=b"%d" % index,
                          ChecksumAlgorithm="SHA256")


def timed_listing(client, bucket: str, cache: HeadCache) -> float:
    started = time.perf_counter()
    list_s3_resources([parse_s3_resource("data", f"s3://{bucket}/data")], False, client=client, cache=cache)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line a request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1")
        print(f"medians of {arguments.repeats}; this machine has {os.cpu_count()} cores, which moto's server shares")
        for count in arguments.objects:
            bucket = f"bench-{count}"
            seeded(client, bucket, count)
            with tempfile.TemporaryDirectory() as directory:
                first, again = [], []
                for repeat in range(arguments.repeats):
                    cache = HeadCache(Path(directory) / f"heads-{repeat}.sqlite")
                    first.append(timed_listing(client, bucket, cache))
                    again.append(timed_listing(client, bucket, cache))
            print(f"  {count:>7} objects: first listing {statistics.median(first):.2f} s, re-listing "
                  f"{statistics.median(again):.2f} s ({statistics.median(again) / statistics.median(first):.2f}x)")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
