"""Connecting to one member, waiting with backoff (up to --wait) for an sshd that is not answering yet."""

from __future__ import annotations

import time

import gevent

from flambe_iac.ssh.policy import SshPolicy, describe_connect_error

FIRST_DELAY, LONGEST_DELAY = 1.0, 10.0


def connect_with_wait(host, entry, wait: float, policy: SshPolicy, view, clock=time.monotonic,
                      sleep=gevent.sleep) -> bool:
    """Connect HOST; while its failure is worth waiting for, retry with backoff until WAIT seconds have passed.
    A host that never connects fails ENTRY with its cause in words. Each attempt (opening the host's one OpenSSH
    connection: the TCP connection, the banner, the key exchange and the authentication) ends within three times the
    policy's connect timeout; no attempt starts past WAIT."""
    with view.waiting_for(entry, f"connecting to {entry.address}"):
        return _connect_with_wait(host, entry, wait, policy, view, clock, sleep)


def _connect_with_wait(host, entry, wait: float, policy: SshPolicy, view, clock, sleep) -> bool:
    started = clock()
    deadline = started + wait
    delay = FIRST_DELAY
    while True:
        try:
            host.connect(show_errors=False, raise_exceptions=True)
            entry.connect_seconds = clock() - started
            return True
        except Exception as error:  # the connector raises ConnectError; anything else is a failure of this host too
            cause = describe_connect_error(str(error), policy, entry.address)
        if not is_worth_waiting_for(cause) or clock() + delay > deadline:
            waited = clock() - started
            entry.fail(cause + (f" (waited {waited:.0f} s for its sshd)" if wait and is_worth_waiting_for(cause)
                                else ""))
            entry.connect_seconds = waited
            return False
        view.note(entry, f"waiting for sshd on {entry.address} ({cause})")
        sleep(delay)
        delay = min(delay * 2, LONGEST_DELAY)


def is_worth_waiting_for(cause: str) -> bool:
    """A host still booting refuses or ignores connections; a wrong key or host key will not fix itself."""
    lowered = cause.lower()
    return not (cause.startswith("REFUSED") or "refused the key" in lowered)
