"""Command-line flags generated from a stage's config dataclass, and `--set FIELD=VALUE`.

    add_config_flags(parser, SFTConfig, shown=sft.FLAGS)    # --lr, --lora-r, --max-steps, ...
    fields = {**set_fields(args, SFTConfig), **parse_set(args.set, SFTConfig)}

A nested config's fields get their flat names (cfg.optim.lr is --lr, cfg.lora.r is --lora-r; see
minilm/config.py). Every field has a flag; those not in `shown` are accepted but left out of
--help, so a stage's help fits a screen while every old command keeps working.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re

from minilm import MinilmError
from minilm.config import flat_fields, nested_configs

_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "tuple": tuple}
_FIELD_COMMENT = re.compile(r"^\s+(\w+): [^#]*#\s*(.+)$")   # `    lr: float = 1e-3   # what it is`


def field_comments(cls) -> dict[str, str]:
    """{flat field name: the comment after it in the dataclass source}: what --help says of a flag."""
    found = {}
    for kind, prefix in [(cls, "")] + [(k, getattr(k, "PREFIX", "")) for k in nested_configs(cls).values()]:
        for line in inspect.getsource(kind).splitlines():
            m = _FIELD_COMMENT.match(line)
            if m:
                found[prefix + m.group(1)] = m.group(2).strip()
    return found


def add_config_flags(parser: argparse.ArgumentParser, cls, shown, skip=(), choices=None) -> None:
    """One `--field-name` flag per field of `cls`; fields not in `shown` are accepted but left out of
    --help. Defaults are None, so that a flag the user did not give leaves the preset's value."""
    choices, comments = choices or {}, field_comments(cls)
    for name, f in flat_fields(cls):  # nested configs' fields by their flat names: lr, lora_r, ...
        kind = _TYPES.get(f.type if isinstance(f.type, str) else f.type.__name__)  # "int" -> int
        if name in skip or kind is None:  # no flag for dict fields (TrainConfig.model)
            continue
        flag = "--" + name.replace("_", "-")
        help_ = comments.get(name, "").replace("%", "%%") if name in shown else argparse.SUPPRESS
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif kind is tuple:
            parser.add_argument(flag, type=float, nargs="+", default=None, help=help_)  # --betas 0.9 0.95
        else:
            parser.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper(),
                                choices=choices.get(name), help=help_)


def set_fields(args, cls, skip=()) -> dict:
    """{field: value} of every flag of `cls` the user gave."""
    return {name: getattr(args, name) for name, _ in flat_fields(cls)
            if name not in skip and getattr(args, name, None) is not None}


def parse_set(items: list[str], *classes) -> dict:
    """["n_val=50", "replay=0.5,0.2"] -> {"n_val": 50, "replay": "0.5,0.2"}: each value read as its
    field's type (JSON for lists); a name that is no field of `classes` is an error naming the fields."""
    kinds = {name: _TYPES.get(f.type if isinstance(f.type, str) else f.type.__name__)
             for cls in classes for name, f in flat_fields(cls)}
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")  # max-steps=5 works too
        if not eq or key not in kinds:
            raise MinilmError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(kinds))}")
        out[key] = _read_value(key, value, kinds[key])
    return out


def _read_value(key: str, text: str, kind):
    """`text` as a value of type `kind`, or one clear error."""
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if kind in (int, float):
            return kind(text)
        if kind is tuple:
            return tuple(float(x) for x in text.strip("()[] ").split(","))
        return text if kind is str else json.loads(text)  # anything else (a dict): JSON
    except (ValueError, json.JSONDecodeError):
        name = getattr(kind, "__name__", "a value")
        raise MinilmError(f"--set {key}={text!r}: {key} takes {name}") from None
