"""The one mechanism that turns dataclasses into command-line options, and back.

Every `crma` command's options come from dataclass fields: the settings dataclasses of crma.config (train,
lora, crma, cl, device), the router's and the server's configs, and each command's own small dataclass of
arguments (crma/cli/*.py). A field becomes `--{prefix}{name}` with its type, default and help; `opt()`
adds what a field needs beyond that (help, choices, a positional argument, a list):

    @dataclass
    class GenerateArgs:
        store: Path = opt(help="the model store folder")                      # required: no default
        temperature: float = opt(0.7, help="0 = greedy (deterministic)")
        prompt: str = opt(positional=True)

    add_options(parser, GenerateArgs)           # --store STORE --temperature T PROMPT
    GenerateArgs(**values(args, GenerateArgs))  # back from the parsed namespace

Booleans are --name / --no-name; `tuple[str, ...]` fields take a comma list; `list[...]` fields take one or
more values, and the option may be repeated.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

from ..config import REQUIRED, ConfigError, opt


def _unwrap(tp) -> tuple[type, bool]:
    """(the type inside an Optional, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _parser_for(tp):
    """argparse `type` and `nargs` of a field type."""
    tp, _ = _unwrap(tp)
    origin = typing.get_origin(tp)
    if origin is tuple:
        return (lambda s: tuple(x for x in s.split(",") if x)), None
    if origin is list:
        (inner,) = typing.get_args(tp)
        return _parser_for(inner)[0], "+"
    if tp in (int, float, str, Path):
        return tp, None
    raise TypeError(f"no command-line form for fields of type {tp!r}")


def _default_of(f: dataclasses.Field, base):
    if base is not None:
        return getattr(base, f.name)
    if f.default is not REQUIRED:
        return f.default
    if f.default_factory is not REQUIRED:
        return f.default_factory()
    return REQUIRED


def add_options(parser: argparse.ArgumentParser, cls, prefix: str = "", section: str | None = None,
                base=None, hidden: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> None:
    """One option per field of dataclass `cls` (nested dataclasses and `skip` fields excepted), named
    --{prefix}{field}, defaulting to `base`'s value (else the field's default), stored as args.<section>.<field>
    (or args.<field> without a section); fields in `hidden` stay out of --help."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{section} settings") if section else parser
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.name in skip or (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            continue
        meta, default = f.metadata, _default_of(f, base)
        text = meta.get("help", "")
        if default is not REQUIRED and default not in (None, "", False, []):
            text = f"{text} (default: {default})".strip() if "default" not in text else text
        if f.name in hidden or meta.get("hidden"):
            text = argparse.SUPPRESS
        dest = f"{section}.{f.name}" if section else f.name
        if meta.get("positional"):
            kind, nargs = _parser_for(tp)
            optional = dict(nargs="?", default=default) if default is not REQUIRED else dict(nargs=nargs)
            group.add_argument(dest, type=kind, metavar=meta.get("metavar") or f.name.upper(),
                               help=text, choices=meta.get("choices"), **optional)
            continue
        flag = f"--{prefix}{f.name.replace('_', '-')}"
        if _unwrap(tp)[0] is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                               default=bool(default) if default is not REQUIRED else False, help=text)
            continue
        kind, nargs = _parser_for(tp)
        kwargs = dict(required=True) if default is REQUIRED else dict(default=default)
        if nargs == "+":                     # a list: --opt A B and --opt A --opt B alike
            kwargs["action"] = "extend"
        group.add_argument(flag, dest=dest, type=kind, nargs=nargs, choices=meta.get("choices"),
                           metavar=meta.get("metavar") or (None if meta.get("choices") else f.name.upper()),
                           help=text, **kwargs)


def values(args: argparse.Namespace, cls, section: str | None = None, skip: tuple[str, ...] = ()) -> dict:
    """{field: parsed value} of dataclass `cls` (the fields add_options made options of)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.name in skip or (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            continue
        out[f.name] = getattr(args, f"{section}.{f.name}" if section else f.name)
    return out


def build(args: argparse.Namespace, cls, section: str | None = None, **extra):
    """An instance of `cls` from the parsed options (plus `extra` fields: nested configs, skipped fields)."""
    return cls(**values(args, cls, section, skip=tuple(extra)), **extra)

__all__ = ["REQUIRED", "add_options", "build", "opt", "values"]


def named(items: list[str], option: str, what: str = "FILE") -> dict[str, str]:
    """NAME=VALUE command-line values -> {NAME: VALUE}; ConfigError naming the option for a malformed one."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"{option}: expected NAME={what}, got {item!r}")
        out[name] = value
    return out
