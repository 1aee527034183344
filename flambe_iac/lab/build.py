"""Bringing a lab up: check that this machine can run it, plan it, then build its network and hosts, or undo them."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from flambe_iac.errors import InputError, LabError
from flambe_iac.lab.hosts import prepare_host_files, start_key_generation, start_sshd, wait_for_sshd, write_client_files
from flambe_iac.lab.model import (
    DEFAULT_SUBNET,
    DEFAULT_USER,
    S3_FAULT_KINDS,
    S3_PORT,
    USER_KEY_FILE,
    LabState,
    apply_faults,
    plan_lab,
)
from flambe_iac.lab.network import create_network, limit_links, reach_only_the_bastion, wait_all
from flambe_iac.lab.teardown import down
from flambe_iac.local_files import write_json_atomically

REQUIRED_TOOLS = ("ip", "unshare", "ssh-keygen", "/usr/sbin/sshd")
S3_LOG = "s3-stand-in.log"
S3_FAULTS = "s3-faults.json"  # read by the stand-in at every request (lab/s3_stand_in.py)
S3_START_TIMEOUT = 60.0


def up(lab_dir: Path, host_count: int, user: str = DEFAULT_USER, subnet: str = DEFAULT_SUBNET,
       addresses: list[str] | None = None, faults: list[str] = (), uplink_mbit: float | None = None,
       record_commands: bool = False, bastion: int | None = None, host_mbit: float | None = None,
       s3: bool = False) -> LabState:
    """Build the lab; on any failure tear down what was made and raise."""
    check_can_run_lab()
    lab_dir = lab_dir.resolve()
    existing = LabState.load(lab_dir)
    if existing is not None and existing.status != "down":
        raise InputError(f"a lab is already up in {lab_dir}: run `flambe-lab down --dir {lab_dir}` first")
    state = plan_lab(host_count, user, subnet, addresses)
    apply_faults(state, faults)
    state.uplink_mbit = link_rate("--uplink-mbit", uplink_mbit)
    state.host_mbit = link_rate("--host-mbit", host_mbit)
    state.record_commands = record_commands
    if bastion is not None and not 0 <= bastion < host_count:
        raise InputError(f"--bastion must be a host index below {host_count}, not {bastion}")
    state.bastion = bastion
    state.s3_address = s3_stand_in_address(state) if s3 else None
    if any(kind in S3_FAULT_KINDS for host in state.hosts for kind in host.faults or {}) and not s3:
        raise InputError(f"--fault INDEX:{'|'.join(S3_FAULT_KINDS)} needs --s3")
    lab_dir.mkdir(parents=True, exist_ok=True)
    state.save(lab_dir)
    try:
        build_lab(lab_dir, state)
    except BaseException:
        down(lab_dir)
        raise
    return state


def link_rate(option: str, mbit: float | None) -> float | None:
    if mbit is not None and not 0 < mbit <= 100000:
        raise InputError(f"{option} must be between 0 and 100000, not {mbit:g}")
    return mbit


def build_lab(lab_dir: Path, state: LabState) -> None:
    keygens = start_key_generation(lab_dir, state)
    create_network(state)
    limit_links(state)
    s3_server = start_s3_stand_in(lab_dir, state) if state.s3_address else None
    if state.bastion is not None:
        reach_only_the_bastion(state)
    wait_all(keygens, "ssh-keygen")
    user_public_key = (lab_dir / f"{USER_KEY_FILE}.pub").read_text()
    for host in state.hosts:
        prepare_host_files(lab_dir, state, host, user_public_key)
    for host in state.hosts:
        host.pid = start_sshd(lab_dir, host)
    state.save(lab_dir)
    wait_for_sshd(lab_dir, state)
    write_client_files(lab_dir, state)
    if s3_server is not None:
        wait_for_s3_stand_in(lab_dir, s3_server)
    state.status = "up"
    state.save(lab_dir)


def s3_stand_in_address(state: LabState) -> str:
    """The subnet's last usable address: the hosts and the client take the first ones."""
    network = ipaddress.ip_interface(f"{state.client_address}/{state.prefix_length}").network
    address = str(network.broadcast_address - 1)
    if address in {host.address for host in state.hosts}:
        raise InputError(f"--s3: the S3 stand-in takes {address}, the subnet's last address; give hosts others")
    return address


def start_s3_stand_in(lab_dir: Path, state: LabState) -> subprocess.Popen:
    """moto's server in a namespace of its own on the lab's network: the hosts reach it as they would S3."""
    faults = {host.address: [kind[len("s3-"):] for kind in host.faults or {} if kind.startswith("s3-")]
              for host in state.hosts}
    write_json_atomically(lab_dir / S3_FAULTS, {address: kinds for address, kinds in faults.items() if kinds})
    log = open(lab_dir / S3_LOG, "wb")
    try:
        return subprocess.Popen(["ip", "netns", "exec", state.s3_netns, sys.executable, "-m",
                                 "flambe_iac.lab.s3_stand_in", state.s3_address, str(S3_PORT),
                                 str(lab_dir / S3_FAULTS)], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()


def wait_for_s3_stand_in(lab_dir: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + S3_START_TIMEOUT
    while b"Running on" not in (lab_dir / S3_LOG).read_bytes():  # werkzeug's words once it listens
        if process.poll() is not None or time.monotonic() > deadline:
            tail = (lab_dir / S3_LOG).read_text(errors="replace").strip().splitlines()[-1:]
            raise LabError(f"the S3 stand-in did not start: {tail[0] if tail else 'no output'}")
        time.sleep(0.05)


def check_can_run_lab() -> None:
    if not sys.platform.startswith("linux"):
        raise InputError("the lab needs Linux (network, mount and UTS namespaces)")
    if os.geteuid() != 0:
        raise InputError("the lab needs root: run flambe-lab as root (sudo flambe-lab ...)")
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        raise InputError(
            f"the lab needs {', '.join(missing)}: apt-get install openssh-server openssh-client iproute2 util-linux"
        )
