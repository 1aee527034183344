"""Where the preflight finds a cluster's network: a stack's config, a stack config file, or the outputs' instances."""

from __future__ import annotations

import argparse
import ipaddress
import json
from pathlib import Path

import yaml

from flambe_iac.errors import InputError
from flambe_iac.inputs.outputs import load_outputs
from flambe_iac.inputs.pulumi_cli import stack_config


def parse_cidr(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise InputError(f"--from {text!r} is not an address or CIDR such as 203.0.113.7/32") from None


def read_source(arguments: argparse.Namespace) -> dict:
    """{region, subnet_id, group_ids, key_name} from a stack, a stack config file, or the outputs' instances."""
    if arguments.config is not None:
        return source_from_config(arguments.config)
    if arguments.stack is not None:
        return source_from_stack(arguments.stack)
    cluster = load_outputs(arguments.outputs)
    return {"region": cluster.region, "instance_ids": [host.id for host in cluster.members]}


def source_from_config(path: Path) -> dict:
    return config_values(read_config_file(path), str(path))


def cluster_named_in_config(path: Path) -> tuple[str, str | None, str | None]:
    """(flambe:name, aws:region, flambe:creator) of a stack config file."""
    return cluster_named(read_config_file(path), f"stack config {path}")


def cluster_named_in_stack(stack: str) -> tuple[str, str | None, str | None]:
    return cluster_named(stack_config(stack), f"stack {stack!r}")


def cluster_named(config: dict, source: str) -> tuple[str, str | None, str | None]:
    name, region, creator = config.get("flambe:name"), config.get("aws:region"), config.get("flambe:creator")
    if not isinstance(name, str) or not name or not all(isinstance(item, (str, type(None)))
                                                        for item in (region, creator)):
        raise InputError(f"{source}: flambe:name (and aws:region, flambe:creator, if set) must be strings")
    return name, region, creator


def read_config_file(path: Path) -> dict:
    """The `config:` mapping of a Pulumi.<stack>.yaml."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise InputError(f"cannot read stack config {path}: {getattr(error, 'strerror', None) or 'not valid YAML'}") \
            from None
    except (RecursionError, ValueError):  # nested too deep, or a number too long to read
        raise InputError(f"cannot read stack config {path}: nested too deep, or a number too long") from None
    config = document.get("config") if isinstance(document, dict) else None
    if not isinstance(config, dict):
        raise InputError(f"stack config {path} has no `config:` mapping: give a Pulumi.<stack>.yaml")
    return config


def source_from_stack(stack: str) -> dict:
    return config_values(stack_config(stack), f"stack {stack!r}")


def config_values(config: dict, source: str) -> dict:
    def value(key):
        item = config.get(key)
        if isinstance(item, dict) and "secure" in item:
            raise InputError(f"{source}: {key} is encrypted; check needs it in clear")
        if item is not None and not isinstance(item, (str, list)):
            raise InputError(f"{source}: {key} must be a string, not {type(item).__name__}")
        return item

    groups = value("flambe:securityGroupIds")
    if isinstance(groups, str):
        try:
            groups = json.loads(groups)
        except (ValueError, RecursionError):
            groups = [groups]
    subnet = value("flambe:subnetId")
    if not subnet or not groups or not isinstance(subnet, str):
        raise InputError(f"{source}: flambe:subnetId and flambe:securityGroupIds are needed for the check")
    if not isinstance(groups, list) or not all(isinstance(group, str) and group for group in groups):
        raise InputError(f"{source}: flambe:securityGroupIds must be a list of group ids")
    region, key_name = value("aws:region"), value("flambe:keyName")
    if isinstance(region, list) or isinstance(key_name, list):
        raise InputError(f"{source}: aws:region and flambe:keyName must be strings")
    efa = {"true": True, "false": False}.get(str(config.get("flambe:efa", False)).lower())
    if efa is None:
        raise InputError(f"{source}: flambe:efa must be true or false")
    return {"region": region, "subnet_id": subnet, "group_ids": groups, "key_name": key_name, "efa": efa}
