"""Day two on a deployed cluster: `flambe-deploy ssh-config | exec | download | status`.

Each takes the same cluster sources and SSH policy as the deploy (only your key, pinned host keys, no agent, an
optional --jump host) and starts OpenSSH's own ssh and rsync, built by `connection`, one per host, all at once.
Hosts are named as SkyPilot and Ray users expect: CLUSTER-orchestrator, CLUSTER-factory-0, CLUSTER-factory-1, ...
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from flambe_iac.cluster import ADDRESS_KINDS, ORCHESTRATOR, PUBLIC, Cluster, Host
from flambe_iac.ssh.policy import SshPolicy, SshTarget, rsync_pull_command, ssh_options
from flambe_iac.errors import EXIT_HOST_FAILED, EXIT_OK, InputError
from flambe_iac.engine.remote_layout import CLUSTER_PUBLIC_KEY, MANIFEST, RESOURCES_DIR, RUN_EXIT, RUN_LOG, RUN_PID
from flambe_iac.engine.ray_cluster import RAY_STATE

ROLES = ("all", "orchestrator", "factories")
SSH_CONFIG_DIR = Path("~/.flambe/ssh")


@dataclass(frozen=True)
class Access:
    """A cluster and how to reach its members: what every day-two command needs."""

    cluster: Cluster
    policy: SshPolicy
    address_kind: str

    def alias(self, member: Host) -> str:
        if member.role == ORCHESTRATOR:
            return f"{self.cluster.name}-orchestrator"
        return f"{self.cluster.name}-factory-{self.cluster.factories.index(member)}"

    def target(self, member: Host) -> SshTarget:
        return self.policy.target(member.address(self.address_kind))

    def chosen(self, role: str) -> list[Host]:
        members = self.cluster.members
        if role == "orchestrator":
            return [self.cluster.orchestrator]
        if role == "factories":
            return list(self.cluster.factories)
        return list(members)

    def ssh_argv(self, member: Host, command: str) -> list[str]:
        target = self.target(member)
        return ["ssh", *ssh_options(target), f"{target.user}@{target.address}", command]


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("cluster (exactly one)").add_mutually_exclusive_group(required=True)
    source.add_argument("--outputs", type=Path, metavar="FILE", help="stack outputs JSON (contract v1)")
    source.add_argument("--stack", metavar="NAME", help="read the outputs of this Pulumi stack")
    source.add_argument("--cluster", type=Path, metavar="FILE", help="your own hosts, Flambé SSHCluster YAML")
    parser.add_argument("--cwd", type=Path, metavar="DIR", help="with --stack: the Pulumi project's directory")
    parser.add_argument("--key", type=Path, metavar="PATH", help="private key the hosts accept")
    parser.add_argument("--known-hosts", type=Path, metavar="FILE",
                        help="pinned host keys (default: the ones the deploy pinned, ~/.flambe/known_hosts/CLUSTER)")
    parser.add_argument("--address", choices=ADDRESS_KINDS, default=PUBLIC, help="which address to reach hosts by")
    parser.add_argument("--jump", metavar="[USER@]HOST[:PORT]",
                        help="reach the hosts through this bastion (its host key must be pinned too)")
    parser.add_argument("--connect-timeout", type=int, default=10, metavar="SECONDS")


def load_access(arguments: argparse.Namespace) -> Access:
    from flambe_iac.inputs.plan import DeployRequest, access_parts

    request = DeployRequest(outputs=arguments.outputs, stack=arguments.stack, cluster_file=arguments.cluster,
                            key=arguments.key, known_hosts=arguments.known_hosts, address_kind=arguments.address,
                            connect_timeout=arguments.connect_timeout, jump=arguments.jump,
                            stack_directory=arguments.cwd, host_key_timeout=0)
    cluster, user_key, host_keys, _ = access_parts(request)
    policy = SshPolicy(cluster.ssh_user, user_key.path.resolve(), user_key.passphrase, host_keys.known_hosts.resolve(),
                       arguments.connect_timeout, jump=arguments.jump)
    return Access(cluster, policy, arguments.address)


# -- ssh-config


def ssh_config_text(access: Access) -> str:
    """An ssh_config with a block per member, under the same policy as the deploy's own connections."""
    blocks = [f"# flambe cluster {access.cluster.name}: written by flambe-deploy ssh-config\n"]
    for member in access.cluster.members:
        target = access.target(member)
        lines = [f"Host {access.alias(member)}", f"    HostName {target.address}", f"    User {target.user}",
                 f"    IdentityFile {target.key}", "    IdentitiesOnly yes", "    IdentityAgent none",
                 "    ForwardAgent no", "    StrictHostKeyChecking yes", f"    UserKnownHostsFile {target.known_hosts}",
                 f"    ConnectTimeout {target.connect_timeout}"]
        if access.policy.jump:
            lines.append(f"    ProxyCommand {access.policy.proxy_command()}")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def write_ssh_config(access: Access, text: str) -> tuple[Path, bool]:
    """Write the cluster's file under ~/.flambe/ssh/ and Include it from ~/.ssh/config once (a backup first; the
    user's lines untouched). Returns (the cluster's file, whether ~/.ssh/config changed)."""
    directory = SSH_CONFIG_DIR.expanduser()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cluster_file = directory / f"{access.cluster.name}.conf"
    write_private(cluster_file, text.encode())
    user_config = Path("~/.ssh/config").expanduser()
    include = f"Include {cluster_file}\n"
    current = user_config.read_bytes() if user_config.exists() else b""
    if include.strip().encode() in (line.strip() for line in current.splitlines()):
        return cluster_file, False
    if current:
        backup = user_config.with_name(f"config.flambe-backup-{time.strftime('%Y%m%dT%H%M%S')}")
        write_private(backup, current)
    user_config.parent.mkdir(mode=0o700, exist_ok=True)
    # Include goes first: after a Host line it would apply to that host only.
    write_private(user_config, include.encode() + current)
    return cluster_file, True


def write_private(path: Path, content: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(content)
    partial.replace(path)


# -- exec and download


class PrefixedOutput:
    """Lines from many hosts at once, each whole and prefixed with its host's alias."""

    def __init__(self):
        self.lock = threading.Lock()

    def pump(self, stream, alias: str, to) -> None:
        for line in iter(stream.readline, b""):
            with self.lock:
                to.write(f"{alias}: {line.decode(errors='replace').rstrip()}\n")
                to.flush()


def run_everywhere(access: Access, members: list[Host], argv_for) -> dict[str, int]:
    """ARGV_FOR(member) on every member at once; their output prefixed; {alias: exit code}."""
    output = PrefixedOutput()

    def run(member: Host) -> int:
        alias = access.alias(member)
        process = subprocess.Popen(argv_for(member), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=access.policy.environment())
        pumps = [threading.Thread(target=output.pump, args=(process.stdout, alias, sys.stdout)),
                 threading.Thread(target=output.pump, args=(process.stderr, alias, sys.stderr))]
        for pump in pumps:
            pump.start()
        for pump in pumps:
            pump.join()
        return process.wait()

    with ThreadPoolExecutor(max_workers=max(1, len(members))) as pool:
        codes = list(pool.map(run, members))
    return {access.alias(member): code for member, code in zip(members, codes)}


def exec_command(access: Access, role: str, command: list[str]) -> dict[str, int]:
    remote = shlex.join(command)
    return run_everywhere(access, access.chosen(role), lambda member: access.ssh_argv(member, remote))


def download(access: Access, role: str, remote_path: str, local_dir: Path) -> dict[str, int]:
    def argv(member: Host) -> list[str]:
        destination = local_dir / access.alias(member)
        destination.mkdir(parents=True, exist_ok=True)
        return rsync_pull_command(remote_path, f"{destination}/", access.target(member))

    return run_everywhere(access, access.chosen(role), argv)


# -- status


STATUS_SCRIPT = f"""\
cd ~ || exit 3
printf '@pub\\n'; cat {CLUSTER_PUBLIC_KEY} 2>/dev/null
printf '@manifest\\n'; cat {MANIFEST} 2>/dev/null
printf '@sums\\n'
if [ -d {RESOURCES_DIR} ]; then
  if command -v openssl >/dev/null 2>&1; then hash='openssl dgst -sha256 -r'; else hash='sha256sum --'; fi
  (cd {RESOURCES_DIR} && find . -type f -print0 | xargs -0 -r $hash)
fi
printf '@run\\n'
if [ -f {RUN_PID} ]; then
  pid=$(cat {RUN_PID})
  if kill -0 "$pid" 2>/dev/null && grep -q flambe_iac.runnable "/proc/$pid/cmdline" 2>/dev/null; then
    echo "running $pid"
  elif [ -f {RUN_EXIT} ]; then echo "exited $(cat {RUN_EXIT})"; else echo "gone"; fi
  printf '@log\\n'; tail -n 5 {RUN_LOG} 2>/dev/null
fi
printf '@ray\\n'
if [ -f {RAY_STATE} ]; then
  head -n 1 {RAY_STATE}
  for name in gcs_server raylet; do pgrep -u "$(id -u)" -x "$name" >/dev/null 2>&1 && echo "@running $name"; done
fi
printf '@end\\n'
"""


@dataclass
class HostStatus:
    alias: str
    address: str
    reachable: bool
    fingerprint: str | None = None
    resources_match: bool | None = None  # None: no resources recorded
    runnable: str | None = None  # "running (pid N)", "finished", "failed (exit N)", or None: never started
    ray: str | None = None  # "head running", "worker running", or None: Ray not started here by --ray
    log_tail: list[str] | None = None
    problems: list[str] | None = None

    @property
    def healthy(self) -> bool:
        return self.reachable and not self.problems


def parse_status(alias: str, address: str, returncode: int, output: str, stderr: str) -> HostStatus:
    from flambe_iac.engine.cluster_key import fingerprint_or_none

    sections: dict[str, list[str]] = {}
    current = None
    for line in output.splitlines():
        if line.startswith("@") and line[1:] in ("pub", "manifest", "sums", "run", "log", "ray", "end"):
            current = line[1:]
            sections[current] = []
        elif current:
            sections[current].append(line)
    if returncode != 0 or "end" not in sections:
        reason = (stderr.strip().splitlines() or [f"ssh exit code {returncode}"])[-1]
        return HostStatus(alias, address, False, problems=[f"unreachable: {reason}"])
    status = HostStatus(alias, address, True, problems=[])
    status.fingerprint = fingerprint_or_none(" ".join(sections.get("pub", []))) if sections.get("pub") else None
    if status.fingerprint is None:
        status.problems.append("no cluster key")
    try:
        manifest = json.loads("\n".join(sections.get("manifest", [])) or "null")
    except json.JSONDecodeError:
        manifest = None
    if manifest is None:
        status.problems.append("no manifest: never deployed, or the last deploy failed here")
    recorded = {f"{name}/{path}": digest for name, files in ((manifest or {}).get("resources") or {}).items()
                for path, digest in files.items()}
    found = {}
    for line in sections.get("sums", []):
        digest, _, path = line.partition(" ")
        path = path.lstrip("* ")
        found[path[2:] if path.startswith("./") else path] = digest
    if recorded:
        status.resources_match = all(found.get(path) == digest for path, digest in recorded.items())
        if not status.resources_match:
            status.problems.append("resources differ from the manifest's checksums")
    run = (sections.get("run") or [""])[0].split()
    if run:
        if run[0] == "running":
            status.runnable = f"running (pid {run[1]})"
        elif run[0] == "exited" and run[1:] == ["0"]:
            status.runnable = "finished"
        else:
            status.runnable = f"failed (exit {run[1]})" if run[0] == "exited" else "failed (it vanished)"
            status.problems.append(f"runnable {status.runnable}")
        status.log_tail = sections.get("log", [])
    status.ray = ray_status(sections.get("ray", []), status.problems)
    return status


def ray_status(lines: list[str], problems: list[str]) -> str | None:
    """What --ray left on a host: its role, and whether the processes of that role run."""
    if not lines:
        return None
    try:
        role = json.loads(lines[0]).get("role", "?")
    except (json.JSONDecodeError, AttributeError):
        role = "?"
    running = {line.split()[1] for line in lines[1:] if line.startswith("@running ")}
    needed = {"gcs_server", "raylet"} if role == "head" else {"raylet"}
    if needed <= running:
        return f"{role} running"
    problems.append(f"Ray's {role} is not running here (re-run flambe-deploy --ray)")
    return f"{role} STOPPED"


def cluster_status(access: Access) -> list[HostStatus]:
    def probe(member: Host) -> HostStatus:
        result = subprocess.run(access.ssh_argv(member, STATUS_SCRIPT), stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, env=access.policy.environment())
        return parse_status(access.alias(member), access.target(member).address, result.returncode, result.stdout,
                            result.stderr)

    with ThreadPoolExecutor(max_workers=len(access.cluster.members)) as pool:
        statuses = list(pool.map(probe, access.cluster.members))
    fingerprints = {status.fingerprint for status in statuses if status.fingerprint}
    if len(fingerprints) > 1:
        for status in statuses:
            if status.fingerprint:
                status.problems.append("its cluster key differs from another member's")
    return statuses


def show_status(statuses: list[HostStatus]) -> str:
    lines = []
    for status in statuses:
        state = "ok" if status.healthy else "PROBLEM: " + "; ".join(status.problems or [])
        key = status.fingerprint or "-"
        resources = {None: "-", True: "match", False: "DIFFER"}[status.resources_match]
        lines.append(f"{status.alias:<32} {status.address:<16} key {key[:20]:<20} resources {resources:<6} "
                     f"runnable {status.runnable or '-'} ray {status.ray or '-'}: {state}")
        for line in status.log_tail or []:
            lines.append(f"    | {line}")
    return "\n".join(lines)


# -- the CLI


def build_parser() -> argparse.ArgumentParser:
    from flambe_iac import __version__

    parser = argparse.ArgumentParser(
        prog="flambe-deploy", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Day-two commands on a deployed cluster, with the deploy's cluster sources and SSH policy.")
    parser.add_argument("--version", action="version", version=f"flambe-iac {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config = commands.add_parser(
        "ssh-config", help="print an ssh_config for the cluster's hosts; --write includes it from ~/.ssh/config",
        description="Print a Host block per member (CLUSTER-orchestrator, CLUSTER-factory-0, ...) with the key, "
                    "IdentitiesOnly, no agent and strict pinned host keys. --write saves it to "
                    "~/.flambe/ssh/CLUSTER.conf and adds an Include of it at the top of ~/.ssh/config once (a "
                    "backup of the old file first). Then `ssh CLUSTER-orchestrator` just works.")
    add_source_arguments(config)
    config.add_argument("--write", action="store_true")
    run = commands.add_parser(
        "exec", help="run a command on the hosts at once; each output line prefixed with its host",
        description="Run CMD through each chosen host's login shell, all at once. Exit 0 only if it exited 0 "
                    "everywhere.", epilog="example: flambe-deploy exec --outputs outputs.json --key k -- nvidia-smi")
    add_source_arguments(run)
    run.add_argument("--role", choices=ROLES, default="all")
    run.add_argument("--report", type=Path, metavar="FILE", help="each host's exit code, as JSON")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    fetch = commands.add_parser(
        "download", help="rsync a path from the hosts into DIR/ALIAS/",
        description="Bring PATH (relative to the home, or absolute) back from each chosen host into DIR/ALIAS/, "
                    "by rsync (delta transfer: a second download only fetches what changed).")
    add_source_arguments(fetch)
    fetch.add_argument("--remote", required=True, metavar="PATH")
    fetch.add_argument("--to", required=True, type=Path, metavar="DIR")
    fetch.add_argument("--role", choices=ROLES, default="all")
    state = commands.add_parser(
        "status", help="is every host reachable, with one cluster key, its resources intact, and the runnable?",
        description="Per host: reachable, its cluster key's fingerprint and whether all agree, whether its "
                    "resources match the manifest's checksums, and the runnable (running, finished, failed, with "
                    "the last lines of its log). Exit 0 when all is healthy, 1 otherwise.")
    add_source_arguments(state)
    state.add_argument("--report", type=Path, metavar="FILE", help="the same, as JSON")
    return parser


def main(argv: list[str]) -> int:
    arguments = build_parser().parse_args(argv)
    access = load_access(arguments)
    try:
        if arguments.command == "ssh-config":
            text = ssh_config_text(access)
            if not arguments.write:
                print(text, end="")
                return EXIT_OK
            path, changed = write_ssh_config(access, text)
            print(f"wrote {path}" + ("; ~/.ssh/config now includes it (the old one is backed up beside it)"
                                     if changed else "; ~/.ssh/config already includes it"))
            print(f"try: ssh {access.alias(access.cluster.orchestrator)}")
            return EXIT_OK
        if arguments.command == "exec":
            command = arguments.cmd[1:] if arguments.cmd[:1] == ["--"] else arguments.cmd
            if not command:
                raise InputError("give the command after --, e.g. flambe-deploy exec ... -- hostname")
            codes = exec_command(access, arguments.role, command)
            if arguments.report:
                arguments.report.write_text(json.dumps({"command": command, "exit_codes": codes}, indent=2) + "\n")
            return EXIT_OK if all(code == 0 for code in codes.values()) else EXIT_HOST_FAILED
        if arguments.command == "download":
            codes = download(access, arguments.role, arguments.remote, arguments.to)
            for alias, code in codes.items():
                if code != 0:
                    print(f"{alias}: download failed (rsync exit code {code})", file=sys.stderr)
            return EXIT_OK if all(code == 0 for code in codes.values()) else EXIT_HOST_FAILED
        statuses = cluster_status(access)
        print(show_status(statuses))
        if arguments.report:
            arguments.report.write_text(json.dumps(
                {"ok": all(status.healthy for status in statuses),
                 "hosts": [{**status.__dict__, "healthy": status.healthy} for status in statuses]}, indent=2) + "\n")
        return EXIT_OK if all(status.healthy for status in statuses) else EXIT_HOST_FAILED
    finally:
        access.policy.close()
