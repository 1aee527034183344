"""Every input turned into one validated DeployPlan before anything connects: bad input sends nothing."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from flambe_iac.cluster import ADDRESS_KINDS, PRIVATE, PUBLIC, Cluster, Host
from flambe_iac.errors import InputError
from flambe_iac.inputs.cluster_file import ClusterSource, load_cluster_file
from flambe_iac.inputs.extensions import checkout
from flambe_iac.inputs.outputs import load_outputs
from flambe_iac.inputs.pulumi_cli import load_stack
from flambe_iac.inputs.resources import Resource, parse_resources, refuse_secrets
from flambe_iac.inputs.runnable_file import check_runnable_class, import_paths, load_runnable_file
from flambe_iac.inputs.s3_location import S3Resource, split_s3_pairs
from flambe_iac.inputs.secrets_file import HiddenBytes, read_secrets_file
from flambe_iac.inputs.tree_listing import LocalTree
from flambe_iac.names import DEFAULT_RAY_PYTHON, check_ray_python
from flambe_iac.ssh.host_keys import ConsoleSource, HostKeyPolicy, choose_host_key_policy
from flambe_iac.ssh.policy import SshPolicy, parse_jump, require_safe_rsync
from flambe_iac.ssh.user_key import UserKey, load_user_key

EXTENSION_CACHE = Path("~/.flambe/cache/extensions")


@dataclass(frozen=True)
class DeployRequest:
    """What the user asked for, as given on the command line: each field is the `dest` of one flag, so adding a
    flag is its parser entry and one field here."""

    outputs: Path | None = None
    stack: str | None = None
    cluster_file: Path | None = None
    key: Path | None = None
    secrets: Path | None = None
    resources: list[str] = field(default_factory=list)
    known_hosts: Path | None = None
    trust_on_first_use: bool = False
    address_kind: str = PUBLIC
    rotate_cluster_key: bool = False
    keep_cluster_key: bool = False  # even when members left the source (they keep their copy of it)
    connect_timeout: int = 10
    runnable_file: Path | None = None
    install_extensions: bool = False
    run: bool = False
    force: bool = False
    host_key_timeout: float = 300.0
    wait: float | None = None  # None: 0 for a cluster file, 300 for a stack's instances (they may still boot)
    fan_out: str | None = None  # "auto", "relay", "tree" or "direct"; None: auto when there is a factory
    jump: str | None = None  # [USER@]HOST[:PORT]: a bastion for every connection
    setup_commands: list[str] = field(default_factory=list)
    stack_directory: Path | None = None  # --cwd: the Pulumi project's directory
    ray: bool = False  # start Ray (head on the orchestrator, workers on the factories), or keep it
    ray_stop: bool = False
    ray_python: str | None = None
    autostop: float | str | None = None  # minutes idle before a member stops itself, or "off"; None: as the outputs say
    autostop_gpu: float = 10.0
    autostop_cpu: float = 0.5
    allow_unverified: bool = False  # S3 objects without a checksum a host can check are pulled unchecked
    stage_via: str | None = None  # s3://BUCKET/PREFIX: local resources go through S3, the hosts pull them

    @classmethod
    def from_arguments(cls, arguments) -> DeployRequest:
        """The request an argparse namespace holds: every field that is one of its attributes."""
        given = {item.name: getattr(arguments, item.name) for item in fields(cls) if hasattr(arguments, item.name)}
        return cls(**given)


@dataclass(frozen=True)
class DeployPlan:
    """The request, and what was read and checked from it. Flags that need no reading are read from `request`."""

    request: DeployRequest
    cluster: Cluster
    user_key: UserKey
    host_keys: HostKeyPolicy
    secrets: HiddenBytes | None
    resources: list[Resource]
    s3_resources: list[S3Resource] = field(default_factory=list)
    s3_listings: dict = field(default_factory=dict)  # name -> aws.s3_listing.S3Listing, listed before connecting
    runnable: object | None = None  # a runnable_file.RunnableFile
    extensions: list = field(default_factory=list)  # extensions.Checkout, in the runnable file's order
    wait: float = 0.0  # how long to keep retrying hosts whose sshd is not answering yet
    fan_out: str = "direct"  # or "auto", "relay", "tree": trees cross the uplink once, then members serve members
    setup_commands: tuple[str, ...] = ()
    ray_python: str = "python3"  # the hosts' Python that has Ray
    jump: str | None = None  # --jump, checked and in its normal form
    local_trees: dict = field(default_factory=dict)  # remote directory -> LocalTree, walked while checking the inputs
    autostop: float | str | None = None  # minutes, "off" (remove the agent), or None (leave it as it is)

    def ssh_policy(self) -> SshPolicy:
        """How this machine reaches the members: the one SSH policy, with this plan's key, pins and bastion."""
        return ssh_policy(self.cluster, self.user_key, self.host_keys, self.request, self.jump)

    def address(self, host: Host) -> str:
        return host.address(self.request.address_kind)

    @property
    def extension_requirements(self) -> list[str]:
        """The extensions that are PyPI requirements: nothing to push, only to install."""
        return [checkout.location.requirement for checkout in self.extensions if checkout.location.requirement]

    @property
    def extension_trees(self) -> list[Resource]:
        """The extensions that have files, as trees for ~/extensions/NAME/, without .git."""
        return [tree for tree in extension_trees(self.extensions) if tree is not None]


def extension_trees(extensions: list) -> list[Resource | None]:
    """Each extension's tree for ~/extensions/NAME/, without .git; None for a PyPI requirement (nothing to push)."""
    return [Resource(checkout.location.name, checkout.directory, parent="extensions", excludes=(".git",))
            if checkout.directory is not None else None for checkout in extensions]


def load_cluster(request: DeployRequest):
    """The cluster as a ClusterSource: with the key and setup commands its source names (only a cluster file)."""
    if request.outputs is not None:
        return ClusterSource(load_outputs(request.outputs), None)
    if request.stack is not None:
        return ClusterSource(load_stack(request.stack, request.stack_directory), None)

    return load_cluster_file(request.cluster_file)


def ssh_policy(cluster: Cluster, user_key: UserKey, host_keys: HostKeyPolicy, request: DeployRequest,
               jump: str | None) -> SshPolicy:
    """The one SSH policy for CLUSTER: the user's key, the pinned host keys, the bastion, the connect timeout."""
    return SshPolicy(cluster.ssh_user, user_key.path.resolve(), user_key.passphrase, host_keys.known_hosts.resolve(),
                     request.connect_timeout, host_keys.strict_host_key_checking, jump=jump)


def access_parts(request: DeployRequest):
    """What every command that reaches the hosts needs: (cluster, user key, host key policy, its ClusterSource)."""
    source = load_cluster(request)
    key = request.key or source.key
    if key is None:
        raise InputError("no SSH key: give the private key of the cluster's key pair with --key PATH")
    addresses = connect_addresses(source.cluster, request.address_kind)
    host_keys = choose_host_key_policy(source.cluster.name, addresses, request.known_hosts,
                                       request.trust_on_first_use, console_source(source.cluster, request))
    return source.cluster, load_user_key(key), host_keys, source


def build_plan(request: DeployRequest) -> DeployPlan:
    if (request.install_extensions or request.run) and request.runnable_file is None:
        raise InputError("-i and --run need a runnable file: flambe-deploy runnable.yaml --outputs ... --run")
    if request.known_hosts is not None and request.trust_on_first_use:
        raise InputError("--known-hosts pins the keys you hold; --trust-on-first-use accepts what hosts show: give one")
    if request.rotate_cluster_key and request.keep_cluster_key:
        raise InputError("--rotate-cluster-key replaces the cluster key and --keep-cluster-key keeps it: give one")
    ray_python = check_ray_request(request)
    jump = parse_jump(request.jump)
    cluster, user_key, host_keys, source = access_parts(request)
    runnable, extensions, runnable_resources = load_runnable(request.runnable_file)
    walks: dict[Resource, LocalTree] = {}
    local_pairs, s3_resources = split_s3_pairs([*request.resources, *runnable_resources])
    resources = parse_resources(local_pairs, walks)
    refuse_secrets(resources, user_key.path, walks=walks)
    refuse_secrets([tree for tree in extension_trees(extensions) if tree is not None], user_key.path, "extension",
                   own_cache=EXTENSION_CACHE.expanduser(), walks=walks)
    if resources or any(extension_trees(extensions)) or request.run:
        require_safe_rsync()  # the trees travel by rsync
    return DeployPlan(
        request=request,
        cluster=cluster,
        user_key=user_key,
        host_keys=host_keys,
        secrets=HiddenBytes(read_secrets_file(request.secrets)) if request.secrets else None,
        resources=resources,
        s3_resources=s3_resources,
        runnable=runnable,
        extensions=extensions,
        wait=request.wait if request.wait is not None else (0.0 if request.cluster_file else 300.0),
        fan_out=request.fan_out or ("auto" if cluster.factories else "direct"),
        setup_commands=(*source.setup_commands, *request.setup_commands),
        ray_python=ray_python,
        jump=jump,
        local_trees={tree.remote_directory: walk for tree, walk in walks.items()},
        autostop=request.autostop if request.autostop is not None else cluster.autostop_minutes,
    )


def check_ray_request(request: DeployRequest) -> str:
    if request.ray and request.ray_stop:
        raise InputError("--ray starts Ray and --ray-stop stops it: give one of them")
    if request.ray_python is not None and not (request.ray or request.ray_stop):
        raise InputError("--ray-python needs --ray (or --ray-stop)")
    if request.ray_stop and request.run:
        raise InputError("--run needs Ray running: give --ray, not --ray-stop")
    return check_ray_python(request.ray_python or DEFAULT_RAY_PYTHON)


def console_source(cluster: Cluster, request: DeployRequest) -> ConsoleSource | None:
    """For a cluster of EC2 instances from a Pulumi stack: their console output can vouch for their host keys."""
    on_ec2 = cluster.region not in (None, "lab") and all(host.id.startswith("i-") for host in cluster.members)
    if request.cluster_file is not None or not on_ec2:
        return None
    members = [(host.id, host.address(request.address_kind)) for host in cluster.members]
    return ConsoleSource(cluster.region, members, request.host_key_timeout)


def load_runnable(path: Path | None) -> tuple[object | None, list, list[str]]:
    """The runnable file, its extensions fetched locally with the user's git, and its resources as NAME=PATH."""
    if path is None:
        return None, [], []

    runnable = load_runnable_file(path)
    cache = EXTENSION_CACHE.expanduser()
    extensions = [checkout(location, cache) for location in runnable.extensions.values()]
    check_runnable_class(runnable.runnable, import_paths(extensions))
    return runnable, extensions, [f"{name}={resource}" for name, resource in runnable.resources.items()]


def connect_addresses(cluster: Cluster, address_kind: str) -> list[str]:
    if address_kind not in ADDRESS_KINDS:
        raise InputError(f"--address must be one of {', '.join(ADDRESS_KINDS)}, not {address_kind!r}")
    without = [host.id for host in cluster.members if not host.address(address_kind)]
    if without:
        hint = " (use --address private from inside the network)" if address_kind == PUBLIC else ""
        raise InputError(f"no {address_kind} address for {', '.join(without)}{hint}")
    for kind in dict.fromkeys((address_kind, PRIVATE)):
        values = [host.address(kind) for host in cluster.members]
        if len(set(values)) != len(values):
            raise InputError(f"two hosts share a {kind} address; every member needs its own")
    return [host.address(address_kind) for host in cluster.members]
