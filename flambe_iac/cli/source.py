"""What every command that reaches a cluster's hosts takes: one cluster source, and the SSH options."""

from __future__ import annotations

import argparse
from pathlib import Path

from flambe_iac.cluster import ADDRESS_KINDS, PUBLIC
from flambe_iac.inputs.outputs import MAX_AUTOSTOP_MINUTES


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of seconds, at least 1, not {text!r}")
    return value


def non_negative_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 or more, not {text!r}")
    return value


def bounded_number(low: float, high: float, what: str):
    """An argparse type: a number above LOW and at most HIGH, described as WHAT in the error."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = low
        if not low < value <= high:
            raise argparse.ArgumentTypeError(f"must be {what} above {low:g} and at most {high:g}, not {text!r}")
        return value
    return parse


def autostop_minutes(text: str) -> float | str:
    """--autostop: minutes idle, or `off`."""
    if text == "off":
        return text
    try:
        return bounded_number(0, MAX_AUTOSTOP_MINUTES, "a number of minutes")(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"give a number of minutes (above 0, at most {MAX_AUTOSTOP_MINUTES}) or "
                                         f"off, not {text!r}") from None


def add_source_options(parser: argparse.ArgumentParser) -> None:
    """The cluster source (exactly one) and how to reach its hosts: the same options for every command that
    reaches hosts, each shown once in its --help, under these two headings."""
    source = parser.add_argument_group("cluster (exactly one)").add_mutually_exclusive_group(required=True)
    source.add_argument("--outputs", type=Path, metavar="FILE", help="stack outputs JSON (contract v1)")
    source.add_argument("--stack", metavar="NAME", help="read the outputs of this Pulumi stack")
    source.add_argument("--cluster", dest="cluster_file", type=Path, metavar="FILE",
                        help="your own hosts, Flambé SSHCluster YAML")
    ssh = parser.add_argument_group("reaching the hosts")
    ssh.add_argument("--cwd", dest="stack_directory", type=Path, metavar="DIR",
                     help="with --stack: the Pulumi project's directory")
    ssh.add_argument("--key", type=Path, metavar="PATH",
                     help="private key the hosts accept (the EC2 key pair's); default: the cluster file's `key`")
    ssh.add_argument("--known-hosts", type=Path, metavar="FILE",
                     help="pinned host keys of the members (default: the ones an earlier deploy pinned, "
                          "~/.flambe/known_hosts/CLUSTER)")
    ssh.add_argument("--address", dest="address_kind", choices=ADDRESS_KINDS, default=PUBLIC,
                     help="which address to reach the hosts by (default public; private from inside the VPC)")
    ssh.add_argument("--jump", metavar="[USER@]HOST[:PORT]",
                     help="reach every host through this bastion (OpenSSH ProxyCommand with -W): your key is used "
                          "from here, never copied there or forwarded; its host key must be pinned too")
    ssh.add_argument("--connect-timeout", type=positive_int, default=10, metavar="SECONDS",
                     help="give up on one connection attempt that gets no answer within this (default 10)")
