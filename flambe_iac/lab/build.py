"""Bringing a lab up: check that this machine can run it, plan it, then build its network and hosts, or undo them."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from flambe_iac.errors import InputError
from flambe_iac.lab.hosts import prepare_host_files, start_key_generation, start_sshd, wait_for_sshd, write_client_files
from flambe_iac.lab.model import DEFAULT_SUBNET, DEFAULT_USER, USER_KEY_FILE, LabState, apply_faults, plan_lab
from flambe_iac.lab.network import create_network, limit_links, reach_only_the_bastion, wait_all
from flambe_iac.lab.teardown import down

REQUIRED_TOOLS = ("ip", "unshare", "ssh-keygen", "/usr/sbin/sshd")


def up(lab_dir: Path, host_count: int, user: str = DEFAULT_USER, subnet: str = DEFAULT_SUBNET,
       addresses: list[str] | None = None, faults: list[str] = (), uplink_mbit: float | None = None,
       record_commands: bool = False, bastion: int | None = None, host_mbit: float | None = None) -> LabState:
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
    state.status = "up"
    state.save(lab_dir)


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
