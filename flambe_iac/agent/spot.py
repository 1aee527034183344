"""A spot interruption notice, from the instance metadata service with an IMDSv2 token (the stack requires tokens).

AWS gives the notice two minutes before it stops or terminates a spot instance (hibernation begins at once):
`spot/instance-action` answers 404 until then, and {"action": "terminate", "time": "2026-11-30T10:00:00Z"} from
then on, the same notice at every question until the interruption.

The service's answers are untrusted like any host's: one whole check (token and notice) has DEADLINE seconds and
each answer MAX_ANSWER bytes, so a service that trickles its answer cannot hold the agent's loop.
"""

from __future__ import annotations

import http.client
import io
import json
import re
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

from flambe_iac.agent.records import EC2_TIME, NOTICE_ACTIONS

METADATA = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
NOTICE_PATH = "/latest/meta-data/spot/instance-action"
TOKEN_TTL = 21600
DEADLINE = 1.0  # seconds for one whole check: the service is on the instance, and the agent's loop waits for it
MAX_ANSWER = 4096
NO_NOTICE = "no notice"  # the service answered 404: no interruption is coming
TOKEN = re.compile(r"[\x21-\x7e]{1,512}")  # printable ASCII: it goes back in a header


@dataclass(frozen=True)
class Notice:
    """An interruption notice: its action and time only if each is what EC2 writes, else None and a cause in words.
    BODY: the service's bytes, as they came."""

    action: str | None
    time: str | None
    cause: str | None
    body: bytes

    @property
    def words(self) -> str:
        return f"{self.action or 'unknown action'} at {self.time or 'unknown time'}"


def read_notice(body: bytes) -> Notice:
    """A 200 from spot/instance-action is a notice whatever its body says: the member is going."""
    try:
        document = json.loads(body.decode())
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        document = None
    if not isinstance(document, dict):
        return Notice(None, None, "the notice is not a JSON object", body)
    action, when = document.get("action"), document.get("time")
    action = action if isinstance(action, str) and action in NOTICE_ACTIONS else None
    when = when if isinstance(when, str) and is_ec2_time(when) else None
    causes = ([] if action else [f"its action is not one of EC2's ({', '.join(NOTICE_ACTIONS)})"]) + (
        [] if when else ["its time is not in EC2's format (2026-11-30T10:00:00Z)"])
    return Notice(action, when, f"the notice: {'; '.join(causes)}" if causes else None, body)


def is_ec2_time(text: str) -> bool:
    if not EC2_TIME.fullmatch(text):
        return False
    try:
        datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:  # month 13, 25 o'clock
        return False
    return True


class Received:
    """An answer's bytes already in hand, for http.client to parse as if it read them from the socket."""

    def __init__(self, data: bytes):
        self.data = data

    def makefile(self, mode: str):
        return io.BytesIO(self.data)


def parsed(data: bytes, ended: bool) -> tuple[int, bytes] | None:
    """The status and body of DATA if it holds one whole HTTP answer (ENDED: the service closed the connection)."""
    if b"\r\n\r\n" not in data and not ended:
        return None
    response = http.client.HTTPResponse(Received(data))
    try:
        response.begin()
        if response.length is None and not response.chunked and not ended:
            return None  # it ends only when the service closes
        return response.status, response.read()
    except (http.client.HTTPException, ValueError, OverflowError):  # not whole yet, not HTTP, a length past any size
        return None


class MetadataService:
    """One token, renewed when the service refuses it or before it expires; `answered` says whether the service
    ever answered (a member off EC2 has none, and is asked again only rarely)."""

    def __init__(self, base: str = METADATA, deadline: float = DEADLINE, clock=time.monotonic):
        parts = urlsplit(base)
        self.address = (parts.hostname, parts.port or 80)
        self.deadline, self.clock = deadline, clock
        self.token, self.token_until, self.answered = None, 0.0, False

    def exchange(self, method: str, path: str, header: str, until: float) -> tuple[int, bytes] | None:
        """The service's answer, whole before UNTIL (time.monotonic) and within MAX_ANSWER bytes; else None."""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.address[0]}", header, "Connection: close",
                 *(["Content-Length: 0"] if method == "PUT" else [])]
        request = "\r\n".join(lines) + "\r\n\r\n"
        data = b""
        try:
            with socket.create_connection(self.address, timeout=max(0.001, until - time.monotonic())) as connection:
                connection.sendall(request.encode())
                while len(data) <= MAX_ANSWER:
                    remaining = until - time.monotonic()
                    if remaining <= 0:
                        return None
                    connection.settimeout(remaining)
                    chunk = connection.recv(MAX_ANSWER + 1 - len(data))
                    data += chunk
                    answer = parsed(data, ended=not chunk)
                    if answer is not None or not chunk:
                        return answer
        except OSError:  # refused, unreachable, timed out
            return None
        return None  # over MAX_ANSWER

    def has_token(self, until: float) -> bool:
        if self.token is None or self.clock() >= self.token_until:
            answer = self.exchange("PUT", TOKEN_PATH, f"X-aws-ec2-metadata-token-ttl-seconds: {TOKEN_TTL}", until)
            token = answer[1].decode(errors="replace").strip() if answer and answer[0] == 200 else ""
            self.token = token if TOKEN.fullmatch(token) else None
            self.token_until = self.clock() + TOKEN_TTL / 2
            self.answered = self.answered or self.token is not None
        return self.token is not None

    def interruption(self) -> Notice | str | None:
        """The notice; NO_NOTICE while the service says there is none; None when it does not answer in time. A token
        the service refuses is replaced at once and the question asked again: the notice gives only two minutes."""
        until = time.monotonic() + self.deadline
        for _ in range(2):
            if not self.has_token(until):
                return None
            answer = self.exchange("GET", NOTICE_PATH, f"X-aws-ec2-metadata-token: {self.token}", until)
            if answer is None:
                return None
            status, body = answer
            if status != 401:
                return read_notice(body) if status == 200 else NO_NOTICE if status == 404 else None
            self.token = None
        return None
