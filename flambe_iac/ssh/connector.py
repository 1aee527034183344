"""pyinfra driven over the host's one connection: a connector whose commands are sessions on the OpenSSH master of
ssh/master.py, so pyinfra's operations (the runnable's start, pip) get the same policy, the same connection and the
same bounded waits as our own commands, and paramiko opens no second connection."""

from __future__ import annotations

from pyinfra.api.exceptions import ConnectError
from pyinfra.connectors.base import BaseConnector
from pyinfra.connectors.util import CommandOutput, OutputLine, make_unix_command_for_host

from flambe_iac.ssh.channel import RemoteCommandError, run_remote
from flambe_iac.ssh.master import MasterConnection, MasterError

OPERATION_TIMEOUT = 6 * 3600.0  # an operation that gives no _timeout of its own (pip may build for long)


class SharedConnectionConnector(BaseConnector):
    """Set on each pyinfra host by ssh/policy.make_state, holding that host's MasterConnection."""

    def __init__(self, state, host, connection: MasterConnection, connect_timeout: float):
        super().__init__(state, host)
        self.connection = connection
        self.connect_timeout = connect_timeout

    @staticmethod
    def make_names_data(name: str):
        raise NotImplementedError("set on hosts by make_state, never chosen by an inventory name")

    def connect(self) -> None:
        try:
            # The TCP connection, the banner, the key exchange and the authentication: each has ssh's own
            # ConnectTimeout; the whole, three of them.
            self.connection.open(timeout=3 * self.connect_timeout)
        except MasterError as error:
            raise ConnectError(str(error)) from None

    def disconnect(self) -> None:
        self.connection.close()

    def run_shell_command(self, command, print_output: bool = False, print_input: bool = False, **arguments):
        timeout = arguments.pop("_timeout", None) or OPERATION_TIMEOUT
        if arguments.pop("_stdin", None):
            raise NotImplementedError("no operation of ours feeds stdin through pyinfra: use run_remote")
        success_codes = arguments.pop("_success_exit_codes", None) or [0]
        arguments.pop("_get_pty", None)
        unix_command = make_unix_command_for_host(self.state, self.host, command, **arguments)
        try:
            result = run_remote(self.host, unix_command.get_raw_value(), timeout=timeout)
        except RemoteCommandError as error:
            return False, CommandOutput([OutputLine("stderr", str(error))])
        lines = [OutputLine("stdout", line) for line in result.stdout.decode(errors="replace").splitlines()]
        lines += [OutputLine("stderr", line) for line in result.stderr.decode(errors="replace").splitlines()]
        return result.exit_code in success_codes, CommandOutput(lines)

    def put_file(self, *arguments, **keywords) -> bool:
        raise NotImplementedError("files travel in our own staged uploads (deploys/operations.py), never by SFTP")

    def get_file(self, *arguments, **keywords) -> bool:
        raise NotImplementedError("files are read with run_remote, never by SFTP")
