"""A stand-in for EC2's instance metadata service, for one lab host (--fault INDEX:spot-notice=SECONDS, or --s3):
IMDSv2 only; a spot interruption notice from SECONDS after it starts (inf: never), the same notice at every question,
as EC2 serves it; and the instance role's credentials (ROLE), fresh for six hours.
Standard library only: the host's python3 runs it.

    python3 metadata_service.py SECONDS [ADDRESS PORT]

A test changes how it answers by writing words into `metadata-mode` beside it (read at every question):
    trickle   the notice's question is answered one byte every TRICKLE_SECONDS (4 KiB: about half an hour)
    again     the notice is withdrawn AGAIN_SECONDS after it came (as after a hibernation), and a second one, with
              its own time, comes AGAIN_SECONDS later
    no-role   the host has no instance role: the role listing answers 404, as EC2's does
"""

import json
import secrets
import sys
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

NOTICE_PATH = "/latest/meta-data/spot/instance-action"
TOKEN_PATH = "/latest/api/token"
WARNING_SECONDS = 120  # AWS's two minutes between the notice and the interruption
MODE_FILE = Path(__file__).with_name("metadata-mode")
TRICKLE_SECONDS = 0.5
ROLE = "flambe-lab-role"
ROLES_PATH = "/latest/meta-data/iam/security-credentials/"
AGAIN_SECONDS = 20


def modes(mode_file: Path) -> set[str]:
    try:
        return set(mode_file.read_text().split())
    except OSError:
        return set()


def notice_since(notice_at: float, now: float, again: bool) -> float | None:
    """When the notice served now was given, or None while there is none."""
    if now < notice_at:
        return None
    if not again or now < notice_at + AGAIN_SECONDS:
        return notice_at
    second = notice_at + 2 * AGAIN_SECONDS
    return second if now >= second else None


def handler_for(notice_at: float, mode_file: Path = MODE_FILE):
    tokens = set()

    class Metadata(BaseHTTPRequestHandler):
        def log_message(self, *arguments):  # quiet: the host's log is sshd's
            return

        def answer(self, code: int, body: bytes = b"", kind: str = "text/plain", trickle: bool = False) -> None:
            if trickle:
                return self.trickle(code, body or b" " * 4096)
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def trickle(self, code: int, body: bytes) -> None:
            whole = f"HTTP/1.0 {code} Slow\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
            try:
                for index in range(len(whole)):
                    self.wfile.write(whole[index:index + 1])
                    self.wfile.flush()
                    time.sleep(TRICKLE_SECONDS)
            except OSError:  # the reader gave up
                return

        def do_PUT(self):
            if self.path != TOKEN_PATH or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                return self.answer(400)
            token = secrets.token_urlsafe(32)
            tokens.add(token)
            self.answer(200, token.encode())

        def do_GET(self):
            if self.headers.get("X-aws-ec2-metadata-token") not in tokens:
                return self.answer(401)  # IMDSv2 only, as the stack requires
            mode = modes(mode_file)
            if self.path.startswith(ROLES_PATH):
                return self.role(self.path[len(ROLES_PATH):], "no-role" in mode)
            since = notice_since(notice_at, time.time(), "again" in mode)
            if self.path != NOTICE_PATH or since is None:
                return self.answer(404, trickle=self.path == NOTICE_PATH and "trickle" in mode)
            when = datetime.fromtimestamp(since + WARNING_SECONDS, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            self.answer(200, json.dumps({"action": "terminate", "time": when}).encode(), "application/json",
                        trickle="trickle" in mode)

        def role(self, name: str, no_role: bool) -> None:
            if no_role or name not in ("", ROLE):
                return self.answer(404)
            if not name:
                return self.answer(200, ROLE.encode())
            expires = datetime.fromtimestamp(time.time() + 6 * 3600, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            document = {"Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": "ASIA" + secrets.token_hex(8).upper(),
                        "SecretAccessKey": secrets.token_urlsafe(30), "Token": secrets.token_urlsafe(60),
                        "Expiration": expires}
            self.answer(200, json.dumps(document).encode(), "application/json")

    return Metadata


if __name__ == "__main__":
    address, port = (sys.argv[2], int(sys.argv[3])) if len(sys.argv) > 3 else ("169.254.169.254", 80)
    ThreadingHTTPServer((address, port), handler_for(time.time() + float(sys.argv[1]))).serve_forever()
