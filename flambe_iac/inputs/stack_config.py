"""Where the preflight finds a cluster's network: a stack's config, a stack config file, or the outputs' instances."""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import re
from pathlib import Path

import yaml

from flambe_iac.errors import InputError
from flambe_iac.inputs.outputs import load_outputs
from flambe_iac.inputs.pulumi_cli import stack_config

DEFAULT_INSTANCE_TYPE = "m5.large"  # the stack's default for both roles
INSTANCE_TYPE = re.compile(r"[a-z][a-z0-9-]{0,30}\.[a-z0-9-]{1,30}")  # m5.large, u-6tb1.112xlarge, p6-b200.48xlarge
MAX_PREFERENCES = 50  # entries of one preference list: EC2 Fleet's overrides are types x subnets


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
    """What check reads of a stack's config: the network, and the cluster's shape for the capacity preflight."""
    def value(key):
        item = config.get(key)
        if isinstance(item, dict) and "secure" in item:
            raise InputError(f"{source}: {key} is encrypted; check needs it in clear")
        if item is not None and not isinstance(item, (str, list)):
            raise InputError(f"{source}: {key} must be a string, not {type(item).__name__}")
        return item

    groups = string_list(value("flambe:securityGroupIds"), "flambe:securityGroupIds", source)
    subnets = preference_list(value, source, "subnetIds", "subnetId", None)
    if not subnets or not groups:
        raise InputError(f"{source}: flambe:subnetId (or flambe:subnetIds) and flambe:securityGroupIds are needed "
                         "for the check")
    region, key_name = value("aws:region"), value("flambe:keyName")
    if isinstance(region, list) or isinstance(key_name, list):
        raise InputError(f"{source}: aws:region and flambe:keyName must be strings")
    efa = {"true": True, "false": False}.get(str(config.get("flambe:efa", False)).lower())
    if efa is None:
        raise InputError(f"{source}: flambe:efa must be true or false")
    reservation = value("flambe:capacityReservationId") or value("flambe:capacityReservationGroupArn")
    if isinstance(reservation, list):
        raise InputError(f"{source}: flambe:capacityReservationId and flambe:capacityReservationGroupArn are strings")
    factory_types = preference_list(value, source, "factoryTypes", "factoryType", DEFAULT_INSTANCE_TYPE)
    orchestrator_types = preference_list(value, source, "orchestratorTypes", "orchestratorType",
                                         DEFAULT_INSTANCE_TYPE)
    for instance_type in (*factory_types, *orchestrator_types):
        if not INSTANCE_TYPE.fullmatch(instance_type):
            raise InputError(f"{source}: {instance_type!r} is not an instance type such as m5.large or p4d.24xlarge")
    return {"region": region, "subnet_id": subnets[0], "subnet_ids": subnets, "group_ids": groups,
            "key_name": key_name, "efa": efa, "factory_types": factory_types,
            "orchestrator_types": orchestrator_types, "factory_count": factory_count(config, source),
            "market": market(config.get("flambe:spot"), source),
            "reservation": reservation, "instance_profile": value("flambe:iamInstanceProfile")}


def string_list(item, key: str, source: str) -> list[str] | None:
    """A list of non-empty strings from the config: a list, a JSON list in a string, or one string."""
    if isinstance(item, str):
        try:
            parsed = json.loads(item)
        except (ValueError, RecursionError):
            parsed = [item]
        item = parsed if isinstance(parsed, list) else [item]
    if item is None:
        return None
    if not isinstance(item, list) or not all(isinstance(entry, str) and entry for entry in item):
        raise InputError(f"{source}: {key} must be a list of strings")
    if len(item) > MAX_PREFERENCES:
        raise InputError(f"{source}: {key} has {len(item)} entries; give at most {MAX_PREFERENCES}")
    return item


def preference_list(value, source: str, key: str, one_key: str, default: str | None) -> list[str] | None:
    """flambe:KEY (an ordered list) or its one-item shorthand flambe:ONE_KEY; both set is a contradiction."""
    many = string_list(value(f"flambe:{key}"), f"flambe:{key}", source)
    one = value(f"flambe:{one_key}")
    if many is not None and one is not None:
        raise InputError(f"{source}: both flambe:{key} and flambe:{one_key} are set; keep the list: "
                         f"pulumi config rm flambe:{one_key}")
    if isinstance(one, list):
        raise InputError(f"{source}: flambe:{one_key} must be one string (a list goes in flambe:{key})")
    if many is not None:
        if not many:
            raise InputError(f"{source}: flambe:{key} is empty; name at least one, or remove it")
        return many
    return [one] if one else ([default] if default else None)


def factory_count(config: dict, source: str) -> int:
    item = config.get("flambe:factoryCount", 1)
    text = str(item)
    if isinstance(item, bool) or not isinstance(item, (int, str)) or not text.isascii() or not text.isdigit() \
            or len(text) > 6:
        raise InputError(f"{source}: flambe:factoryCount is {safe_repr(item)}; give a whole number such as 2")
    return int(text)


def market(item, source: str) -> str:
    """flambe:spot as the market the factories ask: on-demand (false, unset), spot (true or a price), fallback."""
    text = str(item).lower() if isinstance(item, (str, bool, int, float)) else None
    if item is None or text == "false":
        return "on-demand"
    if text == "true":
        return "spot"
    if text == "fallback":
        return "fallback"
    try:
        price = float(text) if text is not None else math.nan
    except ValueError:
        price = math.nan
    if not 0 < price < math.inf:
        raise InputError(f"{source}: flambe:spot is {safe_repr(item)}; give false, true, fallback, or a maximum "
                         "hourly price such as 0.25")
    return "spot"


def safe_repr(item) -> str:
    text = repr(item)
    return text if len(text) <= 40 else text[:40] + "..."
