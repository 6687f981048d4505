"""Frozen configs whose fields are their own command-line flags.

A field declared with ``option(default, help=...)`` becomes ``--field-name`` (or the ``flag``
given), read also from ``DISAGG_FIELD_NAME`` when that is set; ``group(Config, prefix)`` nests
another config whose flags get ``--prefix...``. The default and the help are written once, on
the field; ``add_flags`` puts them on a parser and ``from_args`` builds the config back, so
``__post_init__`` checks every value however it came (flag, environment or code).

Types come from the annotations: ``int``, ``float``, ``str``, ``Path``, ``X | None``, an enum
or ``Literal`` (choices), ``tuple[str, ...]`` (comma separated) and ``bool``: a field that
defaults to False is ``--name``, one that defaults to True is ``--no-name``.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

C = TypeVar("C")
ENV_PREFIX = "DISAGG_"
_TRUE = ("1", "true", "yes", "on")


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str | None = None,
    secret: bool = False,
    hidden: bool = False,
) -> Any:
    """A config field with a flag. ``secret``: hidden from repr, and the help points at the
    environment; ``hidden``: no help line at all."""
    meta = {"help": help, "flag": flag, "secret": secret, "hidden": hidden}
    return dataclasses.field(default=default, repr=not secret, metadata={"option": meta})


def group(cls: type, prefix: str = "") -> Any:
    """A nested config whose flags all start with ``--{prefix}``."""
    return dataclasses.field(default_factory=cls, metadata={"group": prefix})


def env_name(flag: str) -> str:
    """``--kv-memory-gb`` -> ``DISAGG_KV_MEMORY_GB``."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


@dataclasses.dataclass(frozen=True)
class _Flag:
    field: dataclasses.Field
    hint: Any
    flag: str
    dest: str


def _flags(cls: type, prefix: str = "") -> list[_Flag | tuple[str, type, str]]:
    """The flags of ``cls``, and its groups as (field name, class, prefix)."""
    hints = _hints(cls)
    out: list[_Flag | tuple[str, type, str]] = []
    for f in dataclasses.fields(cls):
        if "group" in f.metadata:
            out.append((f.name, hints[f.name], prefix + f.metadata["group"]))
        elif "option" in f.metadata:
            name = prefix + f.name.replace("_", "-")
            flag = f.metadata["option"]["flag"] or f"--{name}"
            out.append(_Flag(f, hints[f.name], flag, name.replace("-", "_")))
    return out


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def add_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add every flag of config ``cls`` (and of its groups) to ``parser``."""
    for item in _flags(cls, prefix):
        if isinstance(item, tuple):
            add_flags(parser, item[1], item[2])
        else:
            _add_flag(parser, item)


def from_args(cls: type[C], args: argparse.Namespace, prefix: str = "", **fixed: Any) -> C:
    """Build ``cls`` from parsed flags; ``fixed`` fields are given, not read from flags."""
    values: dict[str, Any] = {}
    for item in _flags(cls, prefix):
        if isinstance(item, tuple):
            values[item[0]] = from_args(item[1], args, item[2])
        elif item.field.name not in fixed:
            values[item.field.name] = getattr(args, item.dest)
    return cls(**values, **fixed)


def to_flags(config: Any, prefix: str = "") -> list[str]:
    """The flags that rebuild ``config`` where it differs from the defaults (a child process's
    command line; secrets are left out: they travel in the environment)."""
    argv: list[str] = []
    for item in _flags(type(config), prefix):
        if isinstance(item, tuple):
            argv += to_flags(getattr(config, item[0]), item[2])
            continue
        value, default = getattr(config, item.field.name), item.field.default
        if value == default or item.field.metadata["option"]["secret"]:
            continue
        if isinstance(value, bool):
            argv.append(item.flag if value else "--no-" + item.flag.removeprefix("--"))
        else:
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            argv += [item.flag, text]
    return argv


def _add_flag(parser: argparse.ArgumentParser, flag: _Flag) -> None:
    meta, default = flag.field.metadata["option"], flag.field.default
    base = _base_type(flag.hint)
    help_text = argparse.SUPPRESS if meta["hidden"] else _help(meta, flag.flag, default)
    if base is bool:
        _add_bool(parser, flag, help_text)
        return
    metavar = flag.flag.lstrip("-").replace("-", "_").upper()
    kwargs: dict[str, Any] = {
        "dest": flag.dest,
        "help": help_text,
        "default": default,
        "metavar": metavar,
    }
    env = os.environ.get(env_name(flag.flag))
    if env is not None:
        kwargs["default"] = env  # a string default goes through `type`, as a flag would
    elif default is dataclasses.MISSING:
        kwargs |= {"required": True, "default": None}
    kwargs |= _type_kwargs(base)
    parser.add_argument(flag.flag, **kwargs)


def _add_bool(parser: argparse.ArgumentParser, flag: _Flag, help_text: str) -> None:
    default = bool(flag.field.default)
    name = flag.flag if not default else "--no-" + flag.flag.removeprefix("--")
    env = os.environ.get(env_name(name))
    chosen = default if env is None else (env.strip().lower() in _TRUE) != default
    action = "store_false" if default else "store_true"
    parser.add_argument(name, dest=flag.dest, action=action, default=chosen, help=help_text)


def _help(meta: dict[str, Any], flag: str, default: Any) -> str:
    text = meta["help"]
    if meta["secret"]:
        return f"{text} (better: {env_name(flag)})"
    if default is None or isinstance(default, bool) or default is dataclasses.MISSING:
        return text
    shown = default.value if isinstance(default, enum.Enum) else default
    shown = ",".join(map(str, shown)) if isinstance(shown, tuple) else shown
    return text if shown == "" else f"{text} (default: {shown})"


def _base_type(hint: Any) -> Any:
    """``X`` for ``X | None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _type_kwargs(base: Any) -> dict[str, Any]:
    if typing.get_origin(base) is Literal:
        return {"choices": typing.get_args(base)}
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return {"type": base, "choices": list(base)}
    if typing.get_origin(base) is tuple:
        return {"type": _comma_list}
    if base in (int, float, str, Path):
        return {"type": base}
    raise TypeError(f"no flag type for {base!r}")


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())
