"""The user's key: checked before anything connects, never copied anywhere; and OpenSSH fingerprints.

paramiko is imported inside the functions that need them, to keep start-up fast.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from flambe_iac.errors import InputError

PASSPHRASE_VARIABLE = "FLAMBE_KEY_PASSPHRASE"
OPENSSH_MAGIC = b"openssh-key-v1\0"


@dataclass(frozen=True)
class UserKey:
    path: Path
    passphrase: str | None = None
    public_key: str | None = None  # "type base64": never removed from any authorized_keys by flambe

    def __repr__(self) -> str:  # the passphrase must never reach a log
        return f"UserKey({str(self.path)!r}, passphrase={'set' if self.passphrase else 'none'})"


def load_user_key(path: Path) -> UserKey:
    """Check the key file and, if it is encrypted, find its passphrase; raise InputError otherwise."""
    path = Path(path).expanduser()
    try:
        text = path.read_bytes()
    except (OSError, ValueError) as error:  # ValueError: a NUL byte in the path
        raise InputError(f"cannot read SSH key {path}: {getattr(error, 'strerror', None) or error}; give the "
                         "private key with --key") from None
    if b"PRIVATE KEY-----" not in text:
        hint = " (that is a public key: give the private key, without .pub)" if path.suffix == ".pub" else ""
        raise InputError(f"{path} is not an SSH private key{hint}")
    if not is_encrypted(text):
        return UserKey(path, None, check_key_body(path, None))
    passphrase = os.environ.get(PASSPHRASE_VARIABLE) or ask_passphrase(path)
    if not passphrase:
        raise InputError(
            f"SSH key {path} is protected by a passphrase and there is no way to unlock it here: "
            f"set {PASSPHRASE_VARIABLE}, or run on a terminal to be asked (flambe-deploy never uses an ssh-agent)"
        )
    return UserKey(path, passphrase, check_key_body(path, passphrase))


def is_encrypted(key_text: bytes) -> bool:
    if b"ENCRYPTED" in key_text:  # PEM: "Proc-Type: 4,ENCRYPTED" or "BEGIN ENCRYPTED PRIVATE KEY"
        return True
    if b"BEGIN OPENSSH PRIVATE KEY" not in key_text:
        return False
    body = b"".join(line for line in key_text.splitlines() if line and not line.startswith(b"-----"))
    try:
        blob = base64.b64decode(body)
    except binascii.Error:
        return False
    if not blob.startswith(OPENSSH_MAGIC):
        return False
    cipher_length = int.from_bytes(blob[len(OPENSSH_MAGIC):len(OPENSSH_MAGIC) + 4], "big")
    cipher = blob[len(OPENSSH_MAGIC) + 4:len(OPENSSH_MAGIC) + 4 + cipher_length]
    return cipher != b"none"


def ask_passphrase(path: Path) -> str | None:
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return None
    return getpass.getpass(f"Passphrase for {path}: ") or None


def check_key_body(path: Path, passphrase: str | None) -> str:
    """Load the key as ssh would, so a damaged file or a wrong passphrase is bad input, found before connecting;
    its public key ("type base64")."""
    import paramiko

    try:
        key = paramiko.PKey.from_path(path, passphrase=passphrase.encode() if passphrase else None)
    except paramiko.PasswordRequiredException:
        raise InputError(f"SSH key {path} is protected by a passphrase: set {PASSPHRASE_VARIABLE}") from None
    except Exception:  # paramiko raises SSHException, ValueError or its own errors for a body it cannot read
        if passphrase:
            raise InputError(f"the passphrase does not unlock SSH key {path} "
                             f"(from {PASSPHRASE_VARIABLE} or the prompt)") from None
        raise InputError(f"SSH key {path} is damaged: its body is not a private key ssh can read") from None
    return f"{key.get_name()} {key.get_base64()}"


def public_key_fingerprint(public_line: str) -> str:
    """OpenSSH's SHA256 fingerprint of a public key line."""
    blob = base64.b64decode(public_line.split()[1], validate=True)
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
