"""flambe-deploy: hand a cluster its own key pair, the secrets and the resources, over SSH with only your key.

One argparse tree: `deploy` (the default: `flambe-deploy ARGS` is `flambe-deploy deploy ARGS`), `check` and the
day-two commands, every one of which that reaches hosts shares the cluster source and SSH options of `source`.
Each command's flags are defined in its own module, which the tree imports only once that command is chosen: a
deploy never loads check's AWS modules or the day-two commands'. pyinfra, paramiko and gevent load once the inputs
are valid and a deploy is about to run.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from flambe_iac import __version__
from flambe_iac.cli.source import add_source_options, autostop_minutes, bounded_number, non_negative_number
from flambe_iac.engine.ray_cluster import DASHBOARD_PORT
from flambe_iac.remote_layout import RUN_LOG
from flambe_iac.engine.report import summary
from flambe_iac.errors import EXIT_HOST_FAILED, EXIT_INTERRUPTED, EXIT_OK, InputError, exit_code_of
from flambe_iac.inputs.plan import DeployRequest, build_plan
from flambe_iac.local_files import write_json_atomically
from flambe_iac.ssh.policy import ssh_command_line

DEFAULT_COMMAND = "deploy"

# The commands defined elsewhere, in the listing's order: the one-line summary the listing shows, and the module and
# function that define the command's parser, imported only once the command is chosen.
OTHER_COMMANDS = {
    "check": ("read-only preflight on AWS: the network (security groups, key pair, network ACL), and with --stack or "
              "--config the capacity (offerings, vCPU quotas); or --leftovers", "flambe_iac.cli.check", "define_check"),
    "ssh-config": ("print an ssh_config for the cluster's hosts; --write includes it from ~/.ssh/config",
                   "flambe_iac.cli.day_two", "define_ssh_config"),
    "exec": ("run a command on the hosts at once; each output line prefixed with its host", "flambe_iac.cli.day_two",
             "define_exec"),
    "download": ("rsync a path from the hosts into DIR/ALIAS/", "flambe_iac.cli.day_two", "define_download"),
    "status": ("is every host reachable, with one cluster key, its resources intact, and the runnable?",
               "flambe_iac.cli.day_two", "define_status"),
}

DESCRIPTION = """\
Push to every host of a cluster, all hosts at once, over SSH with only the key you give:
  - a key pair made for this cluster alone (~/ray_bootstrap_key.pem), authorized on every member, with every
    member's host key pinned and an ~/.ssh/config block, so members reach each other with strict host keys;
  - the secrets ini, byte-identical, as ~/secret.ini (0600, written atomically);
  - resources, rsynced into ~/resources/NAME/; with a runnable file, its extensions too, and --run starts it;
  - with --ray, Ray: the head on the orchestrator, a worker on every factory, token authentication on, and the
    dashboard on the orchestrator's 127.0.0.1 (the deploy prints the ssh tunnel that reaches it).
Host keys are always checked: against --known-hosts, against keys pinned by an earlier run, for EC2 instances
against the keys their console output shows, or, only with --trust-on-first-use, accepted now and pinned in
~/.flambe/known_hosts/<cluster>. No ssh-agent, no default keys, no agent forwarding. Nothing secret is printed.

commands (each has --help; with none, flambe-deploy deploys):
{commands}"""

EPILOG = """\
where the cluster comes from (exactly one):
  --outputs outputs.json    `pulumi stack output --json --show-secrets > outputs.json`, or a lab's outputs.json
  --stack NAME              runs that pulumi command for you (needs the pulumi CLI and its login)
  --cluster cluster.yaml    hosts you already have, in Flambé's SSHCluster shape:
                              name: my-cluster
                              orchestrator_ip: [54.1.2.3, 10.0.0.4]   # [public, private] or one address
                              factories_ips: [[54.1.2.4, 10.0.0.5]]
                              key: ~/.ssh/my-key.pem
                              username: ubuntu

examples:
  # EC2 instances from a stack: host keys are pinned from each instance's console output
  flambe-deploy --stack dev --key ~/.ssh/flambe.pem --secrets secrets.ini --resource data=./data
  # hosts whose keys you already hold
  flambe-deploy --outputs lab/outputs.json --key lab/id_ed25519 --known-hosts lab/known_hosts \\
      --secrets secrets.ini --report report.json

  # Ray on the cluster, and a runnable whose plain ray.init() joins it (Ray must be on the hosts: see docs/ray.md)
  flambe-deploy examples/ray_spread/ray_spread.yaml --stack dev --key ~/.ssh/flambe.pem --ray --run

  flambe-deploy check --stack dev --from 203.0.113.7/32      # read-only preflight: network and capacity (check -h)

exit codes: 0 every host done, 1 some host failed (the others finished), 2 bad input (nothing was sent),
130 interrupted by Ctrl-C (SIGINT), 143 stopped by SIGTERM; the report says which step each host reached.
An encrypted --key is unlocked with $FLAMBE_KEY_PASSPHRASE, or by asking on a terminal."""


class CommandTree(argparse.ArgumentParser):
    """flambe-deploy's parser. `flambe-deploy ARGS...` with no command word first is the deploy, as it always was.
    Only the chosen command's parser gets its flags."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        if not args or args[0] not in self.commands.choices:
            args = [DEFAULT_COMMAND, *args]
        self.commands.choices[args[0]].define()
        return super().parse_known_args(args, namespace)

    def add_subparsers(self, **options):
        self.commands = super().add_subparsers(**options)
        return self.commands


class Command(argparse.ArgumentParser):
    """A command's parser, empty until define() imports the module that defines it and has it add its flags."""

    def __init__(self, *args, definition: tuple[str, str] | None = None, **options):
        super().__init__(*args, **options)
        self.definition = definition

    def define(self) -> None:
        if self.definition is not None:
            module, function = self.definition
            self.definition = None
            getattr(importlib.import_module(module), function)(self)

    def format_help(self) -> str:
        self.define()
        return super().format_help()


def build_parser() -> CommandTree:
    tree = CommandTree(prog="flambe-deploy", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Deploy to a cluster's hosts over SSH with only your key, check its network, "
                                   "and work with it on day two.")
    tree.add_argument("--version", action="version", version=f"flambe-iac {__version__}")
    commands = tree.add_subparsers(dest="command", metavar="COMMAND", parser_class=Command)
    deploy_parser = add_deploy_command(commands)
    for name, (summary, module, function) in OTHER_COMMANDS.items():
        commands.add_parser(name, help=summary, formatter_class=argparse.RawDescriptionHelpFormatter,
                            definition=(module, function))
    listing = "\n".join(f"  {name:<12} {action.help}" for name, action in
                         ((choice.dest, choice) for choice in commands._choices_actions))
    deploy_parser.description = DESCRIPTION.format(commands=listing)
    tree.description += "\n\ncommands:\n" + listing
    return tree


def add_deploy_command(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        DEFAULT_COMMAND, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="push the cluster key, secrets, resources and extensions to every host (the default command)")
    parser.set_defaults(handler=run_deploy_command)
    add_source_options(parser)
    parser.add_argument("runnable_file", nargs="?", type=Path, metavar="runnable.yaml",
                        help="a runnable file: its resources and extensions are pushed too (see flambe-run --help)")
    parser.add_argument("--secrets", type=Path, metavar="FILE", help="secrets ini, to ~/secret.ini on every host")
    parser.add_argument("--resource", dest="resources", action="append", default=[], metavar="NAME=PATH",
                        help="rsync PATH to ~/resources/NAME/ on every host (repeatable). PATH may be "
                             "s3://BUCKET/PREFIX: this machine lists it with your AWS credentials (read-only), and "
                             "every host pulls it with its own instance role (iamInstanceProfile), each object checked "
                             "by its SHA256 or single-part MD5; your credentials never leave this machine")
    parser.add_argument("--stage-via", metavar="s3://BUCKET/PREFIX",
                        help="send the local resources through S3: each file's content crosses your uplink once, to "
                             "PREFIX/sha256/<its sha256> (a re-run uploads only content S3 lacks), and every host "
                             "pulls it with its instance role, checked against the sha256 computed here. Files only: "
                             "a tree with a symlink is refused")
    parser.add_argument("--allow-unverified", action="store_true",
                        help="pull S3 objects that have no checksum a host can check (multipart or KMS uploads "
                             "without SHA256) unchecked; the report names them")
    parser.add_argument("--trust-on-first-use", action="store_true",
                        help="instead of --known-hosts: accept the keys hosts present now and pin them in "
                             "~/.flambe/known_hosts/<cluster>")
    parser.add_argument("--host-key-timeout", type=non_negative_number, default=300, metavar="SECONDS",
                        help="EC2 clusters without --known-hosts: how long to wait for each instance's console "
                             "output to show its host keys (default 300)")
    parser.add_argument("--fan-out", choices=("auto", "relay", "tree", "direct"),
                        help="how resources and extensions reach the factories. relay: each tree crosses your uplink "
                             "once, to the orchestrator, which forwards each file to every factory while it "
                             "arrives, with the cluster key; tree: the same, but each member serves at most 2 "
                             "others, so no instance's own link carries more than 2 copies; direct: from here to every "
                             "host; auto (the default with factories): first measures your uplink to the "
                             "orchestrator (2 MiB), then direct where every copy crosses it sooner than the hops "
                             "would cost (about 0.12 s a member), else tree for a tree of 32 MiB or more, else relay; "
                             "the report says what it measured and chose")
    parser.add_argument("--rotate-cluster-key", action="store_true",
                        help="replace the cluster key everywhere and remove the old one from every authorized_keys; "
                             "with --ray, also make a new Ray token and restart Ray. A deploy does this by itself "
                             "when members recorded on the hosts are gone from the cluster's source")
    parser.add_argument("--keep-cluster-key", action="store_true",
                        help="keep the cluster key even though members recorded on the hosts are gone from the "
                             "cluster's source. RISK: a member that left (a host dropped from the cluster file, a "
                             "replaced instance still running, a disk kept after termination) keeps its copy of the "
                             "key, and with it can log in to every member as the SSH user, until the key is rotated; "
                             "the next deploy no longer knows it left. Only when you know those machines are gone")
    runnable = parser.add_argument_group("with a runnable file")
    runnable.add_argument("-i", "--install-extensions", action="store_true",
                          help="pip install the extensions here and, with pip --user, on every host")
    runnable.add_argument("--run", action="store_true",
                          help="start the runnable on the orchestrator, detached; it logs to ~/.flambe/run.log")
    runnable.add_argument("--force", action="store_true", help="with --run: stop a runnable still running first")
    ray = parser.add_argument_group("Ray (the hosts need Ray; see docs/ray.md)")
    ray.add_argument("--ray", action="store_true",
                     help="start Ray, or keep it running: the head on the orchestrator at its private address, a "
                          "worker on every factory; token authentication on (a token made for this cluster, 0600 in "
                          "~/.ray/auth_token on every host, never printed); the dashboard on the orchestrator's "
                          "127.0.0.1 only. With --run, a plain ray.init() in the runnable joins the cluster")
    ray.add_argument("--ray-python", metavar="PATH",
                     help="the hosts' Python that has Ray, the same on every host (default python3)")
    ray.add_argument("--ray-stop", action="store_true", help="stop Ray on every host")
    idle = parser.add_argument_group("autostop (see docs/autostop.md)")
    idle.add_argument("--autostop", type=autostop_minutes, metavar="MINUTES|off",
                      help="an agent on every member shuts it down (on EC2: stop, or as the stack's idleAction says "
                           "when flambe:autostopMinutes is set) after MINUTES without work: a GPU above --autostop-gpu, CPU above "
                           "--autostop-cpu, an SSH session, the runnable, or a Ray task. The orchestrator stops last, "
                           "once every factory has. Needs `sudo -n shutdown` on the hosts; restarted at boot by an "
                           "@reboot line in your crontab. `off` removes the agent and its line. Default: the stack's "
                           "flambe:autostopMinutes, else the agent is left as it is")
    idle.add_argument("--autostop-gpu", type=bounded_number(0, 100, "a GPU utilization in percent"), default=10.0,
                      metavar="PERCENT", help="a GPU above this utilization is work (default 10)")
    idle.add_argument("--autostop-cpu", type=bounded_number(0, 4096, "a number of cores"), default=0.5,
                      metavar="CORES", help="the machine's CPU use above this many cores is work (default 0.5)")
    parser.add_argument("--report", type=Path, metavar="FILE", help="write the per-host, per-step report as JSON")
    parser.add_argument("--wait", type=non_negative_number, metavar="SECONDS",
                        help="keep retrying hosts that refuse connections or time out (instances still booting), "
                             "with backoff, for up to this long (default 300 with --stack or --outputs, 0 with "
                             "--cluster)")
    parser.add_argument("--setup", dest="setup_commands", action="append", default=[], metavar="CMD",
                        help="a command to run on every host, through its login shell, after the files are in place "
                             "and before --run (repeatable, in order; after the cluster file's setup_cmds)")
    parser.add_argument("--version", action="version", version=f"flambe-iac {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="show pyinfra's progress (-v) and debug detail (-vv); never secret values")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    return arguments.handler(arguments)


def run_deploy_command(arguments: argparse.Namespace) -> int:
    patch_for_parallel_connections()
    early_sigterm = stop_on_sigterm_until_the_driver()
    configure_logging(arguments.verbose)
    try:
        return exit_code_of("flambe-deploy", lambda: deploy(arguments, early_sigterm))
    except KeyboardInterrupt as interrupt:  # before any host was contacted; once the deploy runs, the driver takes
        name = getattr(interrupt, "signal_name", "SIGINT")  # signals (and says where each host got to)
        print(f"flambe-deploy: interrupted ({name}) before anything was sent", file=sys.stderr)
        if arguments.report:
            write_json_atomically(arguments.report, {"ok": False, "interrupted": name, "hosts": []})
        return EXIT_INTERRUPTED[name]


class Terminated(KeyboardInterrupt):
    signal_name = "SIGTERM"


def stop_on_sigterm_until_the_driver():
    """SIGTERM while inputs are read (a CI job cancelled early) ends the run as Ctrl-C does, with a report and 143,
    instead of killing it without one. The driver takes over both signals once hosts are contacted; cancel the
    returned handler before it does."""
    import gevent
    from greenlet import getcurrent

    main = getcurrent()
    return gevent.signal_handler(signal.SIGTERM, lambda: main.throw(Terminated()))


def patch_for_parallel_connections() -> None:
    """gevent must patch socket before paramiko imports it, or connections run one after another."""
    from gevent import monkey

    monkey.patch_all()


def configure_logging(verbosity: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    level = {0: logging.CRITICAL + 1, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    for name in ("pyinfra", "paramiko"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level if name == "pyinfra" or verbosity >= 2 else logging.CRITICAL + 1)
        logger.propagate = False


def deploy(arguments: argparse.Namespace, early_sigterm) -> int:
    from flambe_iac.deploys.steps import TABLE  # pyinfra, paramiko and gevent: only once a deploy runs
    from flambe_iac.engine.driver import run_deploy

    try:
        plan = with_s3_listings(build_plan(DeployRequest.from_arguments(arguments)))
        if plan.request.install_extensions:
            install_locally(plan)
    except InputError as error:
        if arguments.report:  # even bad input leaves a report, so a pipeline never reads an old one
            write_json_atomically(arguments.report, {"ok": False, "input_error": str(error), "hosts": []})
        raise
    early_sigterm.cancel()
    report = run_deploy(plan, sys.stderr, TABLE)
    if arguments.report:
        report.write(arguments.report)
    print(summary(report))
    if plan.request.ray and report.ok:
        print(dashboard_hint(plan))
    if plan.request.run and report.ok:
        print(follow_log_hint(plan))
    if report.interrupted:
        return EXIT_INTERRUPTED[report.interrupted]
    return EXIT_OK if report.ok else EXIT_HOST_FAILED


def with_s3_listings(plan):
    """The plan with every S3 resource listed and, with --stage-via, every local resource staged into S3 and listed
    for the hosts to pull instead (boto3 only then), before anything connects."""
    if not plan.s3_resources and not plan.request.stage_via:
        return plan
    from flambe_iac.aws.s3_listing import list_s3_resources
    from flambe_iac.aws.s3_staging import stage_local_resources

    listings = list_s3_resources(plan.s3_resources, plan.request.allow_unverified)
    if plan.request.stage_via:
        listings.update(stage_local_resources(plan.request.stage_via, plan.resources, plan.local_trees))
        plan = replace(plan, resources=[])
    return replace(plan, s3_listings=listings)


def install_locally(plan) -> None:
    """-i: the extensions into this Python too, so the runnable also runs here (flambe-run)."""
    targets = [str(tree.path) for tree in plan.extension_trees] + plan.extension_requirements
    if not targets:
        return
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                             *targets], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["no error output"]
        detail = next((line.strip() for line in reversed(lines) if line.strip().lower().startswith("error")), lines[-1])
        raise InputError(f"-i: pip could not install the extensions here: {detail}")


def follow_log_hint(plan) -> str:
    command = orchestrator_ssh_command(plan, f"tail -f {RUN_LOG}")
    return f"the runnable started on the orchestrator; follow its log with:\n  {command}"


def dashboard_hint(plan) -> str:
    port = free_local_port(DASHBOARD_PORT)
    command = orchestrator_ssh_command(plan, options=("-N", "-o", "ExitOnForwardFailure=yes",
                                                      "-L", f"127.0.0.1:{port}:localhost:{DASHBOARD_PORT}"))
    return (f"Ray runs (head on the orchestrator). Its dashboard listens only on the orchestrator's 127.0.0.1; "
            f"reach it at http://localhost:{port} with:\n  {command}")


def free_local_port(preferred: int) -> int:
    """PREFERRED if no one here listens on it yet, else a port the system finds free: another local user who took
    8265 first must not receive what the user types into the dashboard (ssh refuses a port taken meanwhile)."""
    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise InputError("no free local port for the dashboard's tunnel")


def orchestrator_ssh_command(plan, *command: str, options: tuple[str, ...] = ()) -> str:
    """The ssh command line that reaches the orchestrator with the project's SSH policy."""
    target = plan.ssh_policy().target(plan.address(plan.cluster.orchestrator))
    return shlex.join(ssh_command_line(target, *command, options=options))


if __name__ == "__main__":
    sys.exit(main())
