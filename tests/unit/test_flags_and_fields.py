"""Every flag of the deploy command reaches the request: `DeployRequest.from_arguments` takes the fields that are
attributes of argparse's namespace, so a flag whose `dest` is misspelt would be parsed and then silently dropped."""

from dataclasses import fields

from flambe_iac.cli.deploy import DEFAULT_COMMAND, build_parser
from flambe_iac.inputs.plan import DeployRequest

READ_BY_THE_COMMAND_ITSELF = {"report", "verbose"}  # where the report goes, how much is logged: not the request's
ARGPARSE_OWN = {"help", "version"}


def deploy_flags() -> set[str]:
    return {action.dest for action in build_parser().commands.choices[DEFAULT_COMMAND]._actions}


def test_every_deploy_flag_fills_a_request_field_and_every_field_has_its_flag():
    flags, request_fields = deploy_flags(), {field.name for field in fields(DeployRequest)}
    assert flags - request_fields - READ_BY_THE_COMMAND_ITSELF - ARGPARSE_OWN == set(), "flags with no field"
    assert request_fields - flags == set(), "fields no flag fills"
    assert READ_BY_THE_COMMAND_ITSELF <= flags


def test_a_request_from_the_parsed_flags_holds_what_was_given():
    arguments = build_parser().parse_args([DEFAULT_COMMAND, "--cluster", "c.yaml", "--fan-out", "tree", "--ray",
                                           "--resource", "data=/tmp/data", "--wait", "5"])
    request = DeployRequest.from_arguments(arguments)
    assert (request.fan_out, request.ray, request.resources, request.wait) == ("tree", True, ["data=/tmp/data"], 5)
    assert str(request.cluster_file) == "c.yaml"
