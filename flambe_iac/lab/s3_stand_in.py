"""The lab's S3: moto's server, with faults a test asks of it for one host (by the address its requests come from).

    python -m flambe_iac.lab.s3_stand_in ADDRESS PORT FAULTS_FILE

FAULTS_FILE holds JSON, read at every request: {"10.213.0.3": ["corrupt"], ...}. A test may rewrite it at any time.
    corrupt   the objects served to that host arrive with their first byte changed (same size, same headers)
    slowdown  every second object request from that host is answered 503 SlowDown, as S3 does under load

moto's routes match no newline in a key, which S3 allows: the stand-in stores one as NEWLINE_STAND_IN and gives it
back as a newline in its listings (an object's own bytes are never rewritten).
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple

NEWLINE_STAND_IN = "\ue00a"  # a private-use character no test key holds
SLOW_DOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code>"
             b"<Message>Please reduce your request rate.</Message></Error>")


class FaultyS3:
    """A WSGI wrapper around moto's application."""

    def __init__(self, app, faults_file: Path):
        self.app = app
        self.faults_file = faults_file
        self.requests = itertools.count()

    def faults(self, address: str) -> list:
        try:
            return json.loads(self.faults_file.read_text()).get(address, [])
        except (OSError, ValueError):
            return []

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if "\n" in path:  # werkzeug's PATH_INFO: the URL's bytes, decoded as latin-1
            environ["PATH_INFO"] = path.replace("\n", NEWLINE_STAND_IN.encode().decode("latin-1"))
        if path.count("/") < 2 or path.endswith("/"):  # a bucket or its listing, not an object
            status, headers, body = self.answer_of(environ)
            body = body.replace(b"%EE%80%8A", b"%0A").replace(NEWLINE_STAND_IN.encode(), b"&#10;")
            return self.answered(start_response, status, headers, body)
        faults = self.faults(environ.get("REMOTE_ADDR", "")) if environ["REQUEST_METHOD"] == "GET" else []
        if "slowdown" in faults and next(self.requests) % 2 == 0:
            return self.answered(start_response, "503 Slow Down", [("Content-Type", "application/xml")], SLOW_DOWN)
        if "corrupt" in faults:
            status, headers, body = self.answer_of(environ)
            if status.startswith("200") and body:
                body = bytes([body[0] ^ 0x01]) + body[1:]
            return self.answered(start_response, status, headers, body)
        return self.app(environ, start_response)

    def answer_of(self, environ) -> tuple[str, list, bytes]:
        answered = {}

        def keep(status, headers, exc_info=None):
            answered["status"], answered["headers"] = status, headers
            return lambda data: None
        body = b"".join(self.app(environ, keep))
        return answered["status"], answered["headers"], body

    @staticmethod
    def answered(start_response, status: str, headers: list, body: bytes) -> list[bytes]:
        headers = [(name, value) for name, value in headers if name.lower() != "content-length"]
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [body]


def main(address: str, port: int, faults_file: Path) -> None:
    print(f"S3 stand-in on {address}:{port}", flush=True)
    run_simple(address, port, FaultyS3(DomainDispatcherApplication(create_backend_app), faults_file), threaded=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
