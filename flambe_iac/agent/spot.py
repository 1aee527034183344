"""A spot interruption notice, from the instance metadata service with an IMDSv2 token (the stack requires tokens).

AWS gives the notice two minutes before it stops or terminates a spot instance: `spot/instance-action` answers 404
until then, and {"action": "terminate", "time": "2026-11-30T10:00:00Z"} from then on.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

METADATA = "http://169.254.169.254"
TOKEN_TTL = 21600
TIMEOUT = 1.0


class MetadataService:
    """One token, renewed when the service refuses it or before it expires; `answered` says whether the service
    ever answered (a member off EC2 has none, and is asked again only rarely)."""

    def __init__(self, base: str = METADATA, timeout: float = TIMEOUT, clock=time.monotonic):
        self.base, self.timeout, self.clock = base, timeout, clock
        self.token, self.token_until, self.answered = None, 0.0, False

    def _token(self) -> str | None:
        request = urllib.request.Request(f"{self.base}/latest/api/token", method="PUT",
                                         headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL)})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read(256).decode(errors="replace").strip() or None
        except (OSError, ValueError):
            return None

    @property
    def reachable(self) -> bool:
        if self.token is None or self.clock() >= self.token_until:
            self.token = self._token()
            self.token_until = self.clock() + TOKEN_TTL / 2
            self.answered = self.answered or self.token is not None
        return self.token is not None

    def interruption(self) -> str | None:
        """The notice in words (`terminate at 2026-...`), or None while there is none (or no service). A token the
        service refuses is replaced at once and the question asked again: the notice gives only two minutes."""
        for _ in range(2):
            if not self.reachable:
                return None
            request = urllib.request.Request(f"{self.base}/latest/meta-data/spot/instance-action",
                                             headers={"X-aws-ec2-metadata-token": self.token})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return describe_notice(response.read(4096))
            except urllib.error.HTTPError as error:
                if error.code != 401:
                    return None
                self.token = None
            except (OSError, ValueError):
                return None
        return None


def describe_notice(data: bytes) -> str | None:
    """`ACTION at TIME` from the notice's JSON; anything else the service sends is no notice."""
    try:
        document = json.loads(data.decode(errors="replace"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict) or not isinstance(document.get("action"), str):
        return None
    action, time = document["action"][:32], str(document.get("time", "?"))[:40]
    return f"{action} at {time}"
