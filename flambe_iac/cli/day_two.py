"""The day-two commands of flambe-deploy's tree: ssh-config, exec, download, status. Each takes the shared source."""

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


def add_commands(commands) -> None:
    def command(name: str, run, **texts) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, formatter_class=argparse.RawDescriptionHelpFormatter, **texts)
        add_source_options(parser)
        parser.add_argument("--version", action="version", version=f"flambe-iac {__version__}")
        # The deploy pinned the host keys already: no waiting for console output here.
        parser.set_defaults(handler=lambda arguments: exit_code_of(f"flambe-deploy {name}",
                                                                   lambda: with_access(arguments, run)),
                            host_key_timeout=0)
        return parser

    config = command(
        "ssh-config", print_ssh_config,
        help="print an ssh_config for the cluster's hosts; --write includes it from ~/.ssh/config",
        description="Print a Host block per member (CLUSTER-orchestrator, CLUSTER-factory-0, ...) with the key, "
                    "no other key, no agent and strict pinned host keys. --write saves it to "
                    "~/.flambe/ssh/CLUSTER.conf and adds an Include of it at the top of ~/.ssh/config once (a "
                    "backup of the old file first). Then `ssh CLUSTER-orchestrator` just works.")
    config.add_argument("--write", action="store_true")
    run = command(
        "exec", run_exec, help="run a command on the hosts at once; each output line prefixed with its host",
        description="Run CMD through each chosen host's login shell, all at once. Exit 0 only if it exited 0 "
                    "everywhere.", epilog="example: flambe-deploy exec --outputs outputs.json --key k -- nvidia-smi")
    run.add_argument("--role", choices=ROLES, default="all")
    run.add_argument("--report", type=Path, metavar="FILE", help="each host's exit code, as JSON")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    fetch = command(
        "download", run_download, help="rsync a path from the hosts into DIR/ALIAS/",
        description="Bring PATH (relative to the home, or absolute) back from each chosen host into DIR/ALIAS/, "
                    "by rsync (delta transfer: a second download only fetches what changed).")
    fetch.add_argument("--remote", required=True, metavar="PATH")
    fetch.add_argument("--to", required=True, type=Path, metavar="DIR")
    fetch.add_argument("--role", choices=ROLES, default="all")
    state = command(
        "status", run_status,
        help="is every host reachable, with one cluster key, its resources intact, and the runnable?",
        description="Per host: reachable, its cluster key's fingerprint and whether all agree, whether its "
                    "resources match the manifest's checksums, and the runnable (running, finished, failed, with "
                    "the last lines of its log). Exit 0 when all is healthy, 1 otherwise.")
    state.add_argument("--report", type=Path, metavar="FILE", help="the same, as JSON")


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
