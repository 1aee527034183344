"""Host keys read from EC2 console output, the way AWS documents to verify a new instance's SSH key.

cloud-init prints the host keys to the console at first boot, between
    -----BEGIN SSH HOST KEY KEYS-----  and  -----END SSH HOST KEY KEYS-----
(lines may carry a syslog, kernel-time or `ec2:` prefix). If it also printed the keys' fingerprints, each key must
match one of them, or the output is not trusted.
"""

from __future__ import annotations

import binascii
import re

from flambe_iac.ssh.user_key import public_key_fingerprint

KEYS_BEGIN = "-----BEGIN SSH HOST KEY KEYS-----"
KEYS_END = "-----END SSH HOST KEY KEYS-----"
FINGERPRINTS_BEGIN = "-----BEGIN SSH HOST KEY FINGERPRINTS-----"
FINGERPRINTS_END = "-----END SSH HOST KEY FINGERPRINTS-----"
KEY = re.compile(r"\b(ssh-ed25519|ecdsa-sha2-nistp(?:256|384|521)|ssh-rsa|ssh-dss)\s+(AAAA[A-Za-z0-9+/]+={0,2})")
FINGERPRINT = re.compile(r"\b(SHA256:[A-Za-z0-9+/]{43})\b")


def parse_console_host_keys(output: str) -> list[str]:
    """The host keys ("type base64") of the last boot that printed them; [] if none can be trusted."""
    keys_block = _last_block(output, KEYS_BEGIN, KEYS_END)
    if keys_block is None:
        return []
    keys = list(dict.fromkeys(f"{match[1]} {match[2]}" for match in KEY.finditer(keys_block)))
    fingerprints_block = _last_block(output, FINGERPRINTS_BEGIN, FINGERPRINTS_END)
    if fingerprints_block:
        printed = set(FINGERPRINT.findall(fingerprints_block))
        if printed and not all(_fingerprint(key) in printed for key in keys):
            return []
    return keys


def _last_block(output: str, begin: str, end: str) -> str | None:
    start = output.rfind(begin)
    if start == -1:
        return None
    stop = output.find(end, start)
    return output[start + len(begin):stop] if stop != -1 else None


def _fingerprint(key: str) -> str:
    try:
        return public_key_fingerprint(key)
    except (binascii.Error, ValueError):
        return ""  # garbled: matches no printed fingerprint
