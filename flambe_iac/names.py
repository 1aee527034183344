"""The one validation of every name that reaches a host, a command line or a path (security invariant 9).

Strict allow-lists, applied before anything connects: the cluster name, the SSH user, resource and extension
names, addresses and host ids. The stack, the outputs file, the cluster file and the lab all use these.
Writers of line-based files (authorized_keys, ssh configs, known_hosts pins, the manifest) also call
`refuse_unsafe_fields` on every field they interpolate, as a second defence.

Standard library only: `stacks/` imports this too.
"""

from __future__ import annotations

import ipaddress
import re

from flambe_iac.errors import InputError

CLUSTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
SSH_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
TREE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # resources and extensions: ~/resources/NAME/
HOST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")  # an EC2 instance id, the lab's ids, an address

CLUSTER_NAME_RULE = "letters, digits, '_', '-' and '.', starting with a letter or digit, at most 63"


def check_cluster_name(name: object, where: str = "cluster name") -> str:
    if not isinstance(name, str) or not CLUSTER_NAME.fullmatch(name) or ".." in name:
        raise InputError(f"{where} {_shown(name)} is not allowed: use {CLUSTER_NAME_RULE}, without '..'")
    return name


def check_ssh_user(user: object, where: str = "ssh user") -> str:
    if not isinstance(user, str) or not SSH_USER.fullmatch(user):
        raise InputError(f"{where} {_shown(user)} is not a login name: use lowercase letters, digits, '_' and '-', "
                         "starting with a letter or '_', at most 32")
    return user


def check_tree_name(name: object, what: str) -> str:
    """A resource's or an extension's name: it becomes a directory under the home."""
    if not isinstance(name, str) or not TREE_NAME.fullmatch(name) or ".." in name:
        raise InputError(f"{what} name {_shown(name)} is not allowed: use letters, digits, '_', '-' and '.', "
                         f"without '/' or '..' (it becomes the directory ~/{what}s/NAME)")
    return name


def check_address(address: object, where: str) -> str:
    """An IPv4 address, or an IPv6 one without a zone id, in its normal form: the form every writer uses."""
    text = address if isinstance(address, str) else ""
    if "%" in text:  # ipaddress lets a zone id hold almost any byte, a newline included
        raise InputError(f"{where} {_shown(address)} has an IPv6 zone id (%...): give the address without it")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise InputError(f"{where} must be an IP address, not {_shown(address)}") from None


def check_host_id(host_id: object, where: str) -> str:
    if not isinstance(host_id, str) or not HOST_ID.fullmatch(host_id):
        raise InputError(f"{where} {_shown(host_id)} is not allowed: use letters, digits, '_', '.', ':' and '-'")
    return host_id


def refuse_unsafe_fields(what: str, *values: object) -> None:
    """The second defence: a field about to be written into a line-based file holds no whitespace and no control
    character, so it can neither end its line nor add a word to it."""
    for value in values:
        text = str(value)
        if not text or any(character.isspace() or not character.isprintable() for character in text):
            raise InputError(f"refusing to write {what}: the field {_shown(value)} holds whitespace or a control "
                             "character (or is empty)")


def _shown(value: object) -> str:
    """A rejected value as it may be shown: quoted, so a newline or a space is visible, and cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


DEFAULT_RAY_PYTHON = "python3"
PYTHON_PATH = re.compile(r"[A-Za-z0-9_./+-]{1,255}")


def check_ray_python(text: str) -> str:
    """--ray-python: a command name or a path, nothing a shell would read as more."""
    if not PYTHON_PATH.fullmatch(text):
        raise InputError(f"--ray-python must be a path or a command name (letters, digits, _ . / + -), not {text!r}")
    return text
