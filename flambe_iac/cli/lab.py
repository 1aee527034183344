"""flambe-lab: real OpenSSH hosts in Linux namespaces on this machine, to deploy to without a cloud."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from flambe_iac import __version__
from flambe_iac.errors import EXIT_OK, InputError, exit_code_of
from flambe_iac.lab.build import check_can_run_lab, up
from flambe_iac.lab.hosts import COMMANDS_LOG, reboot_host
from flambe_iac.lab.model import (
    DEFAULT_SUBNET,
    DEFAULT_USER,
    FAULTS,
    KNOWN_HOSTS_FILE,
    OUTPUTS_FILE,
    S3_PORT,
    USER_KEY_FILE,
    LabState,
)
from flambe_iac.lab.teardown import down, pid_alive


def exec_in_client(lab_dir: Path, command: list[str]) -> None:
    state = require_running_lab(lab_dir)
    if not command:
        raise InputError("give the command after --, e.g. flambe-lab exec --dir DIR -- ssh ...")
    os.execvp("ip", ["ip", "netns", "exec", state.client_netns, *command])


def require_running_lab(lab_dir: Path) -> LabState:
    check_can_run_lab()
    state = LabState.load(lab_dir.resolve())
    if state is None or state.status != "up":
        raise InputError(f"no lab is up in {lab_dir}: start one with `flambe-lab up --hosts N --dir {lab_dir}`")
    return state


def describe(lab_dir: Path, state: LabState) -> str:
    lines = [f"lab {state.lab_id} in {lab_dir}: {len(state.hosts)} hosts, login user {state.user!r}"]
    for host in state.hosts:
        status = "sshd running" if pid_alive(host.pid) else "sshd NOT running"
        lines.append(f"  {host.role:<13} {host.hostname:<13} {host.address:<15} {status} (pid {host.pid})")
    lines.append(f"  client namespace {state.client_netns} at {state.client_address}")
    if state.s3_endpoint:
        lines.append(f"  S3 stand-in at {state.s3_endpoint} (namespace {state.s3_netns})")
    lines.append(f"  user key {lab_dir / USER_KEY_FILE}, host keys {lab_dir / KNOWN_HOSTS_FILE}, "
                 f"stack outputs {lab_dir / OUTPUTS_FILE}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flambe-lab",
        description="Real OpenSSH hosts in Linux namespaces on this machine, to deploy to without a cloud. "
                    "Needs Linux and root. Nothing changes in the machine's own network, /etc or accounts.",
        epilog="example:\n"
               "  flambe-lab up --hosts 3 --dir /tmp/lab\n"
               "  flambe-lab exec --dir /tmp/lab -- flambe-deploy exec --outputs /tmp/lab/outputs.json \\\n"
               "      --key /tmp/lab/id_ed25519 --known-hosts /tmp/lab/known_hosts -- hostname\n"
               "  flambe-lab down --dir /tmp/lab",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"flambe-iac {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up_parser = commands.add_parser(
        "up", help="create the hosts and start their sshd",
        description=f"Create N hosts (host 0 is the orchestrator) and write into DIR: {OUTPUTS_FILE} "
                    f"(stack outputs v1), {USER_KEY_FILE}[.pub] (the user key), {KNOWN_HOSTS_FILE} and "
                    "hosts/<hostname>/home/ (each host's home, seen from this machine).")
    up_parser.add_argument("--hosts", type=int, required=True, metavar="N", help="how many hosts (at least 1)")
    up_parser.add_argument("--dir", type=Path, required=True, help="where the lab keeps its files")
    up_parser.add_argument("--user", default=DEFAULT_USER, help=f"login user on the hosts (default {DEFAULT_USER})")
    up_parser.add_argument("--subnet", default=DEFAULT_SUBNET,
                           help=f"private IPv4 range of the lab network (default {DEFAULT_SUBNET})")
    up_parser.add_argument("--addresses", type=lambda text: text.split(","), metavar="IP,IP,...",
                           help="exact host addresses inside --subnet, orchestrator first (default: the next free)")
    up_parser.add_argument("--fault", action="append", default=[], metavar="INDEX:KIND[=VALUE]",
                           help="make host INDEX (0 is the orchestrator) unlike the others; KIND is one of: "
                                + "; ".join(f"{kind} ({text})" for kind, text in FAULTS.items()))
    up_parser.add_argument("--bastion", type=int, metavar="INDEX",
                           help="the client reaches only host INDEX (a bastion); the others only through it")
    up_parser.add_argument("--record-commands", action="store_true",
                           help=f"every host notes each command its SSH sessions run, in its own {COMMANDS_LOG}")
    up_parser.add_argument("--uplink-mbit", type=float, metavar="N",
                           help="limit the client's link to N Mbit/s both ways, as a laptop's or a CI runner's uplink")
    up_parser.add_argument("--host-mbit", type=float, metavar="N",
                           help="limit every host's link to N Mbit/s both ways, as an instance's network bandwidth "
                                "(then the orchestrator's own link bounds what it can relay)")
    up_parser.add_argument("--s3", action="store_true",
                           help="an S3 stand-in (moto's server) on the lab network at the subnet's last address, port "
                                f"{S3_PORT}; every host's sessions find it in AWS_ENDPOINT_URL_S3, and its metadata "
                                "service hands out an instance role's credentials")
    for name, text in (("down", "stop every sshd and remove every namespace and link of the lab (idempotent)"),
                       ("show", "list the hosts, their addresses and whether their sshd runs")):
        commands.add_parser(name, help=text, description=text).add_argument("--dir", type=Path, required=True)
    reboot_parser = commands.add_parser(
        "reboot", help="restart one host: every process on it ends, then it boots again (its cron runs @reboot lines)",
        description="Restart host INDEX as a reboot would: every process on it ends, its home stays, and it boots "
                    "again: sshd, and cron, which runs its crontab's @reboot lines.")
    reboot_parser.add_argument("--dir", type=Path, required=True)
    reboot_parser.add_argument("--host", type=int, required=True, metavar="INDEX", help="0 is the orchestrator")
    exec_parser = commands.add_parser("exec", help="run a command in the client namespace, where the hosts are",
                                      description="Run CMD in the client namespace, from where the hosts answer.")
    exec_parser.add_argument("--dir", type=Path, required=True)
    exec_parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    return exit_code_of("flambe-lab", lambda: run_command(arguments))


def run_command(arguments: argparse.Namespace) -> int:
    if arguments.command == "up":
        started = time.monotonic()
        state = up(arguments.dir, arguments.hosts, arguments.user, arguments.subnet, arguments.addresses,
                   arguments.fault, arguments.uplink_mbit, arguments.record_commands, arguments.bastion,
                   arguments.host_mbit, arguments.s3)
        print(describe(arguments.dir.resolve(), state))
        print(f"lab up: {len(state.hosts)} hosts in {time.monotonic() - started:.2f} s")
    elif arguments.command == "down":
        check_can_run_lab()
        removed = down(arguments.dir)
        print(f"lab down: removed {len(removed)} namespaces" if removed else "lab down: nothing was running")
    elif arguments.command == "show":
        print(describe(arguments.dir.resolve(), require_running_lab(arguments.dir)))
    elif arguments.command == "reboot":
        started = time.monotonic()
        host = reboot_host(arguments.dir.resolve(), require_running_lab(arguments.dir), arguments.host)
        print(f"lab reboot: {host.hostname} up again in {time.monotonic() - started:.2f} s")
    elif arguments.command == "exec":
        command = arguments.cmd[1:] if arguments.cmd[:1] == ["--"] else arguments.cmd
        exec_in_client(arguments.dir, command)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
