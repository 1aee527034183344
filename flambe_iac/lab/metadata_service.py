"""A stand-in for EC2's instance metadata service, for one lab host (--fault INDEX:spot-notice=SECONDS): IMDSv2 only,
and a spot interruption notice from SECONDS after it starts. Standard library only: the host's python3 runs it.

    python3 metadata_service.py SECONDS [ADDRESS PORT]
"""

import json
import secrets
import sys
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NOTICE_PATH = "/latest/meta-data/spot/instance-action"
TOKEN_PATH = "/latest/api/token"
WARNING_SECONDS = 120  # AWS's two minutes between the notice and the interruption


def handler_for(notice_at: float):
    tokens = set()

    class Metadata(BaseHTTPRequestHandler):
        def log_message(self, *arguments):  # quiet: the host's log is sshd's
            return

        def answer(self, code: int, body: bytes = b"", kind: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_PUT(self):
            if self.path != TOKEN_PATH or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                return self.answer(400)
            token = secrets.token_urlsafe(32)
            tokens.add(token)
            self.answer(200, token.encode())

        def do_GET(self):
            if self.headers.get("X-aws-ec2-metadata-token") not in tokens:
                return self.answer(401)  # IMDSv2 only, as the stack requires
            if self.path != NOTICE_PATH or time.time() < notice_at:
                return self.answer(404)
            when = datetime.fromtimestamp(notice_at + WARNING_SECONDS, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            self.answer(200, json.dumps({"action": "terminate", "time": when}).encode(), "application/json")

    return Metadata


if __name__ == "__main__":
    address, port = (sys.argv[2], int(sys.argv[3])) if len(sys.argv) > 3 else ("169.254.169.254", 80)
    ThreadingHTTPServer((address, port), handler_for(time.time() + float(sys.argv[1]))).serve_forever()
