"""The day-two commands of flambe-deploy's tree: ssh-config, exec, download, status. Each takes the shared source;
the tree imports this module only once one of them is chosen."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flambe_iac import __version__
from flambe_iac.cli.source import add_source_options
from flambe_iac.day_two.access import ROLES, Access, load_access
from flambe_iac.day_two.download import download
from flambe_iac.day_two.exec_command import exec_command
from flambe_iac.day_two.ssh_config import ssh_config_text, write_ssh_config
from flambe_iac.day_two.status import cluster_status, show_status
from flambe_iac.errors import EXIT_HOST_FAILED, EXIT_OK, InputError, exit_code_of
from flambe_iac.local_files import write_json_atomically


def reaching_hosts(parser: argparse.ArgumentParser, name: str, run, **texts) -> None:
    """What every day-two command has: its texts (its one-line summary is the tree's), the shared cluster source and
    SSH options, --version, and a handler that runs RUN with access to the hosts."""
    for field, text in texts.items():
        setattr(parser, field, text)
    add_source_options(parser)
    parser.add_argument("--version", action="version", version=f"flambe-iac {__version__}")
    # The deploy pinned the host keys already: no waiting for console output here.
    parser.set_defaults(handler=lambda arguments: exit_code_of(f"flambe-deploy {name}",
                                                               lambda: with_access(arguments, run)),
                        host_key_timeout=0)


def define_ssh_config(parser: argparse.ArgumentParser) -> None:
    reaching_hosts(
        parser, "ssh-config", print_ssh_config,
        description="Print a Host block per member (CLUSTER-orchestrator, CLUSTER-factory-0, ...) with the key, "
                    "no other key, no agent and strict pinned host keys. --write saves it to "
                    "~/.flambe/ssh/CLUSTER.conf and adds an Include of it at the top of ~/.ssh/config once (a "
                    "backup of the old file first). Then `ssh CLUSTER-orchestrator` just works.")
    parser.add_argument("--write", action="store_true")


def define_exec(parser: argparse.ArgumentParser) -> None:
    reaching_hosts(
        parser, "exec", run_exec,
        description="Run CMD through each chosen host's login shell, all at once. Exit 0 only if it exited 0 "
                    "everywhere.", epilog="example: flambe-deploy exec --outputs outputs.json --key k -- nvidia-smi")
    parser.add_argument("--role", choices=ROLES, default="all")
    parser.add_argument("--report", type=Path, metavar="FILE", help="each host's exit code, as JSON")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")


def define_download(parser: argparse.ArgumentParser) -> None:
    reaching_hosts(
        parser, "download", run_download,
        description="Bring PATH (relative to the home, or absolute) back from each chosen host into DIR/ALIAS/, "
                    "by rsync (delta transfer: a second download only fetches what changed).")
    parser.add_argument("--remote", required=True, metavar="PATH")
    parser.add_argument("--to", required=True, type=Path, metavar="DIR")
    parser.add_argument("--role", choices=ROLES, default="all")


def define_status(parser: argparse.ArgumentParser) -> None:
    reaching_hosts(
        parser, "status", run_status,
        description="Per host: reachable, its cluster key's fingerprint and whether all agree, whether its "
                    "resources match the manifest's checksums, and the runnable (running, finished, failed, with "
                    "the last lines of its log). Exit 0 when all is healthy, 1 otherwise.")
    parser.add_argument("--report", type=Path, metavar="FILE", help="the same, as JSON")


def with_access(arguments: argparse.Namespace, run) -> int:
    access = load_access(arguments)
    try:
        return run(access, arguments)
    finally:
        access.policy.close()


def print_ssh_config(access: Access, arguments: argparse.Namespace) -> int:
    text = ssh_config_text(access)
    if not arguments.write:
        print(text, end="")
        return EXIT_OK
    path, changed = write_ssh_config(access, text)
    print(f"wrote {path}" + ("; ~/.ssh/config now includes it (the old one is backed up beside it)"
                             if changed else "; ~/.ssh/config already includes it"))
    print(f"try: ssh {access.alias(access.cluster.orchestrator)}")
    return EXIT_OK


def run_exec(access: Access, arguments: argparse.Namespace) -> int:
    command = arguments.cmd[1:] if arguments.cmd[:1] == ["--"] else arguments.cmd
    if not command:
        raise InputError("give the command after --, e.g. flambe-deploy exec ... -- hostname")
    codes = exec_command(access, arguments.role, command)
    if arguments.report:
        write_json_atomically(arguments.report, {"command": command, "exit_codes": codes})
    return EXIT_OK if all(code == 0 for code in codes.values()) else EXIT_HOST_FAILED


def run_download(access: Access, arguments: argparse.Namespace) -> int:
    codes = download(access, arguments.role, arguments.remote, arguments.to)
    for alias, code in codes.items():
        if code != 0:
            print(f"{alias}: download failed (rsync exit code {code})", file=sys.stderr)
    return EXIT_OK if all(code == 0 for code in codes.values()) else EXIT_HOST_FAILED


def run_status(access: Access, arguments: argparse.Namespace) -> int:
    statuses = cluster_status(access)
    print(show_status(statuses))
    healthy = all(status.healthy for status in statuses)
    if arguments.report:
        write_json_atomically(arguments.report, {
            "ok": healthy, "hosts": [{**status.__dict__, "healthy": status.healthy} for status in statuses]})
    return EXIT_OK if healthy else EXIT_HOST_FAILED
