"""The lab's hosts: their keys and files (accounts, sshd_config, boot script), their sshd, and the client's files."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from flambe_iac.errors import LabError
from flambe_iac.inputs.outputs import outputs_document
from flambe_iac.lab.model import (
    KNOWN_HOSTS_FILE,
    OUTPUTS_FILE,
    USER_KEY_FILE,
    LabHost,
    LabState,
    has_fault,
    host_dir,
    lab_cluster,
)
from flambe_iac.lab.teardown import pid_alive, stop_processes
from flambe_iac.local_files import READABLE, write_atomically, write_json_atomically

# The login user exists only inside the hosts, through bind-mounted passwd, group and shadow files.

SSHD_START_TIMEOUT = 15.0
IN_HOST_DIR = "/run/flambe-lab"  # where each host sees its own lab directory
COMMANDS_LOG = "/tmp/flambe-lab-commands.log"  # inside each host: its own /tmp, hosts/<name>/tmp/ from here
RECORDING_SHELL = f"""#!/bin/bash
# sshd's ForceCommand with --record-commands: note every command a session runs (NUL-separated), then run it.
printf '%s\\0' "$SSH_ORIGINAL_COMMAND" >> {COMMANDS_LOG}
if [ -z "$SSH_ORIGINAL_COMMAND" ]; then exec bash -l; fi
exec bash -c "$SSH_ORIGINAL_COMMAND"
"""
CORRUPTING_RSYNC = """#!/bin/sh
# A broken host for tests: rsync that damages what it received.
/run/flambe-lab/rsync.real "$@"
status=$?
if [ "$status" -eq 0 ]; then
  # One byte changed in place, the size and mtime kept: only the file's bytes (and its ctime) tell.
  for file in "$HOME"/resources/*/*; do
    if [ -f "$file" ] && [ -s "$file" ]; then
      touch -r "$file" "$HOME/.flambe-lab-mtime"
      byte=X; [ "$(head -c 1 "$file")" = X ] && byte=Y
      printf '%s' "$byte" | dd of="$file" bs=1 count=1 conv=notrunc 2>/dev/null
      touch -r "$HOME/.flambe-lab-mtime" "$file"; rm -f "$HOME/.flambe-lab-mtime"
      break
    fi
  done
fi
exit $status
"""


LAB_SUDO = """#!/bin/sh
# The lab's sudo: only `sudo -n shutdown ...`, recorded in /run/flambe-lab/shutdowns; the host keeps running.
[ "$1" = -n ] && shift || { echo "sudo: a password is required" >&2; exit 1; }
case "$1 $2" in
  "-l shutdown") echo /usr/sbin/shutdown; exit 0;;
  "shutdown "*) shift; echo "$(date +%s) shutdown $*" >> /run/flambe-lab/shutdowns; exit 0;;
esac
echo "sudo: a password is required" >&2; exit 1
"""
REFUSING_SUDO = """#!/bin/sh
echo "sudo: a password is required" >&2; exit 1
"""
STAND_IN_GPU = f"""#!/bin/sh
# The lab's nvidia-smi: one GPU at a fixed utilization, as --query-gpu=utilization.gpu prints it; or what a test wrote
# into gpu-reading beside it (MIG's `[N/A]`, nothing at all).
cat {IN_HOST_DIR}/gpu-reading 2>/dev/null && exit
echo {{percent}}
"""
LAB_PATH = f"{IN_HOST_DIR}/bin:/usr/local/bin:/usr/bin:/bin"  # the stand-ins first, as sshd's SetEnv gives it
METADATA_ADDRESS = "169.254.169.254"
HOST_PYTHON = "/usr/bin/python3"
CRONTABS = Path("/var/spool/cron/crontabs")


def start_key_generation(lab_dir: Path, state: LabState) -> list[subprocess.Popen]:
    """The user key (authorized on every host, like an EC2 key pair) and one host key per host."""
    targets = [(lab_dir / USER_KEY_FILE, "flambe-lab user key")]
    for host in state.hosts:
        directory = host_dir(lab_dir, host)
        if directory.exists():
            shutil.rmtree(directory)
        (directory / "etc").mkdir(parents=True)
        targets.append((directory / "etc" / "ssh_host_ed25519_key", f"root@{host.hostname}"))
        if has_fault(host, "replaced-host-key"):  # the key known_hosts will pin; sshd presents the other
            targets.append((directory / "etc" / "pinned_host_key", f"root@{host.hostname}"))
    for path in targets:
        path[0].unlink(missing_ok=True)
        path[0].with_suffix(".pub").unlink(missing_ok=True)
    return [
        subprocess.Popen(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for path, comment in targets
    ]


def prepare_host_files(lab_dir: Path, state: LabState, host: LabHost, user_public_key: str) -> None:
    """Home, tmp, accounts and sshd config of one host; the sshd boot script binds them in place."""
    directory = host_dir(lab_dir, host)
    user_home = directory / "home" / state.user
    (user_home / ".ssh").mkdir(parents=True)
    (directory / "tmp").mkdir()
    (directory / "tmp").chmod(0o1777)
    authorized_keys = user_home / ".ssh" / "authorized_keys"
    authorized_keys.write_text(user_public_key)
    authorized_keys.chmod(0o600)
    (user_home / ".ssh").chmod(0o700)
    user_home.chmod(0o755)
    for path in (user_home, user_home / ".ssh", authorized_keys):
        os.chown(path, state.uid, state.uid)
    etc = directory / "etc"
    write_accounts(etc, state)
    (etc / "sshd_config").write_text(sshd_config(host, state.record_commands, state.s3_endpoint))
    if state.record_commands:
        (directory / "record-command").write_text(RECORDING_SHELL)
        (directory / "record-command").chmod(0o755)
    (directory / "boot.sh").write_text(boot_script(directory, host, serves_metadata(state, host)))
    if has_fault(host, "small-home"):
        mount_small_home(directory / "home", host.faults["small-home"])
    if has_fault(host, "corrupt-rsync"):
        (directory / "rsync-corrupting").write_text(CORRUPTING_RSYNC)
        (directory / "rsync-corrupting").chmod(0o755)
    prepare_stand_ins(directory, host, state.uid, serves_metadata(state, host))


def serves_metadata(state: LabState, host: LabHost) -> bool:
    """The metadata stand-in runs for a spot notice, and with --s3 for the instance role's credentials."""
    return has_fault(host, "spot-notice") or state.s3_address is not None


def prepare_stand_ins(directory: Path, host: LabHost, uid: int, metadata: bool) -> None:
    """What a cloud host has and the lab must fake: sudo for `shutdown` (recorded, not run), a GPU, the metadata
    service, and a crontab of the host's own."""
    executable = {"sudo": REFUSING_SUDO if has_fault(host, "no-sudo") else LAB_SUDO}
    if has_fault(host, "gpu"):
        executable["nvidia-smi"] = STAND_IN_GPU.format(percent=int(float(host.faults["gpu"])))
    (directory / "bin").mkdir()
    for name, text in executable.items():
        (directory / "bin" / name).write_text(text)
        (directory / "bin" / name).chmod(0o755)
    shutdowns = directory / "shutdowns"
    shutdowns.touch()
    os.chown(shutdowns, uid, uid)
    if metadata:
        shutil.copy(Path(__file__).with_name("metadata_service.py"), directory / "metadata_service.py")
    if has_fault(host, "no-role"):
        (directory / "metadata-mode").write_text("no-role\n")
    if CRONTABS.is_dir():  # cron's spool, one per host (root:crontab 1730, as the package makes it)
        (directory / "crontabs").mkdir()
        os.chown(directory / "crontabs", 0, CRONTABS.stat().st_gid)
        (directory / "crontabs").chmod(0o1730)


def mount_small_home(home: Path, size: str) -> None:
    """A tmpfs of SIZE over the host's home, holding what the home held: a disk that fills up."""
    holding = home.with_name("home.prepared")
    home.rename(holding)
    home.mkdir(mode=0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "flambe-lab-home", str(home)],
                   check=True, capture_output=True)
    subprocess.run(["cp", "-a", f"{holding}/.", str(home)], check=True, capture_output=True)
    shutil.rmtree(holding)


def write_accounts(etc: Path, state: LabState) -> None:
    """The machine's passwd and group plus the login user, and a shadow file that knows only it."""
    user_line = f"{state.user}:x:{state.uid}:{state.uid}:flambe lab user:/home/{state.user}:/bin/bash\n"
    group_line = f"{state.user}:x:{state.uid}:\n"
    (etc / "passwd").write_text(Path("/etc/passwd").read_text() + user_line)
    (etc / "group").write_text(Path("/etc/group").read_text() + group_line)
    shadow = etc / "shadow"
    shadow.write_text(f"root:*:19000:0:99999:7:::\n{state.user}:*:19000:0:99999:7:::\n")
    shadow.chmod(0o600)


def sshd_config(host: LabHost, record_commands: bool = False, s3_endpoint: str | None = None) -> str:
    """The host's sshd; with the lab's S3 stand-in, every session finds it the standard way (AWS_ENDPOINT_URL_S3)."""
    endpoint = f" AWS_ENDPOINT_URL_S3={s3_endpoint}" if s3_endpoint else ""
    return "\n".join([
        f"ListenAddress {host.address}",
        f"HostKey {IN_HOST_DIR}/etc/ssh_host_ed25519_key",
        f"PidFile {IN_HOST_DIR}/sshd.pid",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin no",
        "PubkeyAuthentication yes",
        "AuthorizedKeysFile .ssh/authorized_keys",
        "UsePAM no",
        "StrictModes yes",
        "PrintMotd no",
        f"SetEnv PATH={LAB_PATH}{endpoint}",
        *([] if has_fault(host, "no-sftp") else ["Subsystem sftp internal-sftp"]),
        *([f"MaxSessions {host.faults['max-sessions']}"] if has_fault(host, "max-sessions") else []),
        *([f"ForceCommand {IN_HOST_DIR}/record-command"] if record_commands else []),
        "",
    ])


def boot_script(directory: Path, host: LabHost, metadata: bool = False) -> str:
    """Run inside fresh mount, UTS and PID namespaces (with their own /proc and /dev/shm); ends by becoming sshd,
    the host's PID 1, so that `ps`, `pkill` or `ray stop` on a host see and stop only that host's processes.

    The host directory is bound at IN_HOST_DIR first, because binding the host's /tmp may hide
    the lab directory itself.
    """
    return "\n".join([
        "set -e",
        f"hostname {host.hostname}",
        "mount -t tmpfs -o mode=0755 lab-run /run",
        "mount -t tmpfs -o mode=1777 lab-shm /dev/shm",
        f"mkdir -m 0755 /run/sshd {IN_HOST_DIR}",
        f"mount --rbind {directory} {IN_HOST_DIR}",
        f"mount --rbind {IN_HOST_DIR}/home /home",
        f"mount --bind {IN_HOST_DIR}/tmp /tmp",
        f"mount --bind {IN_HOST_DIR}/etc/passwd /etc/passwd",
        f"mount --bind {IN_HOST_DIR}/etc/group /etc/group",
        f"mount --bind {IN_HOST_DIR}/etc/shadow /etc/shadow",
        *(["for tool in $(which -a rsync); do mount --bind /dev/null \"$tool\"; done"]
          if has_fault(host, "no-rsync") else []),
        *([f"cp /usr/bin/rsync {IN_HOST_DIR}/rsync.real",
           f"mount --bind {IN_HOST_DIR}/rsync-corrupting /usr/bin/rsync"] if has_fault(host, "corrupt-rsync") else []),
        *([f"mount --bind {IN_HOST_DIR}/crontabs {CRONTABS}", "/usr/sbin/cron"] if CRONTABS.is_dir() else []),
        *([f"ip address replace {METADATA_ADDRESS}/32 dev lo",
           # The system's Python, from /: a shim on root's PATH (pyenv) may need a directory the host's /tmp hides.
           f"cd / && {HOST_PYTHON} {IN_HOST_DIR}/metadata_service.py {notice_seconds(host)} &"]
          if metadata else []),
        *([f"sleep {host.faults['late-sshd']}"] if has_fault(host, "late-sshd") else []),
        f"exec /usr/sbin/sshd -D -e -f {IN_HOST_DIR}/etc/sshd_config",
        "",
    ])


def notice_seconds(host: LabHost) -> float:
    return float(host.faults["spot-notice"]) if has_fault(host, "spot-notice") else float("inf")


def reboot_host(lab_dir: Path, state: LabState, index: int) -> LabHost:
    """End every process of host INDEX (its sshd is its PID 1: the kernel ends the rest), then boot it again."""
    if not 0 <= index < len(state.hosts):
        raise LabError(f"--host must be a host index below {len(state.hosts)}, not {index}")
    host = state.hosts[index]
    stop_processes({host.pid} if host.pid else set())
    (host_dir(lab_dir, host) / "sshd.pid").unlink(missing_ok=True)
    host.pid = start_sshd(lab_dir, host)
    state.save(lab_dir)
    wait_for_sshd(lab_dir, LabState(**{**state.__dict__, "hosts": [host]}))
    return host


def start_sshd(lab_dir: Path, host: LabHost) -> int:
    """Start the host; returns its sshd's pid as this machine sees it (its PID 1 is sshd)."""
    directory = host_dir(lab_dir, host)
    log = open(directory / "sshd.log", "ab")
    try:
        process = subprocess.Popen(
            ["ip", "netns", "exec", host.netns,
             "unshare", "--mount", "--uts", "--pid", "--fork", "--kill-child", "--mount-proc",
             "--propagation", "private", "/bin/sh", str(directory / "boot.sh")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )
    finally:
        log.close()
    return first_child(process)


def first_child(process: subprocess.Popen) -> int:
    """unshare --fork runs the boot script as its child, the new PID namespace's PID 1. If the host already ended,
    unshare's own pid: it is not alive either, and wait_for_sshd reports the host's log."""
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    deadline = time.monotonic() + SSHD_START_TIMEOUT
    while time.monotonic() < deadline:
        listed = children.read_text().split() if children.exists() else []
        if listed:
            return int(listed[0])
        if process.poll() is not None:
            return process.pid
        time.sleep(0.005)
    raise LabError(f"unshare did not start the host within {SSHD_START_TIMEOUT:.0f} s")


def wait_for_sshd(lab_dir: Path, state: LabState) -> None:
    """sshd writes its pid file once it listens; a host whose sshd exited fails the lab with its log."""
    waiting = [host for host in state.hosts if not has_fault(host, "late-sshd")]
    deadline = time.monotonic() + SSHD_START_TIMEOUT
    while waiting:
        for host in list(waiting):
            if (host_dir(lab_dir, host) / "sshd.pid").exists():
                waiting.remove(host)
            elif not pid_alive(host.pid):
                raise LabError(first_sshd_failure(lab_dir, state))
        if waiting and time.monotonic() > deadline:
            raise LabError(f"sshd on {waiting[0].hostname} did not start within {SSHD_START_TIMEOUT:.0f} s")
        if waiting:
            time.sleep(0.02)


def first_sshd_failure(lab_dir: Path, state: LabState) -> str:
    """The failure to report when sshds exit: the first failed host in host order, after a moment for the others
    (they often fail together, and which one is noticed first should not decide what the user reads)."""
    time.sleep(0.3)
    failed = [host for host in state.hosts if not (host_dir(lab_dir, host) / "sshd.pid").exists()
              and not pid_alive(host.pid)]
    host = failed[0]
    log = (host_dir(lab_dir, host) / "sshd.log").read_text(errors="replace").strip()
    others = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    return f"sshd on {host.hostname} exited{others}: {log.splitlines()[-1] if log else 'no output'}"


def write_client_files(lab_dir: Path, state: LabState) -> None:
    known_hosts = []
    for host in state.hosts:
        public = host_dir(lab_dir, host) / "etc" / ("pinned_host_key.pub" if has_fault(host, "replaced-host-key")
                                                    else "ssh_host_ed25519_key.pub")
        key_type, key = public.read_text().split()[:2]
        known_hosts.append(f"{host.address} {key_type} {key}\n")
    write_atomically(lab_dir / KNOWN_HOSTS_FILE, "".join(known_hosts), READABLE)
    document = outputs_document(lab_cluster(state))
    write_json_atomically(lab_dir / OUTPUTS_FILE, document)
