"""Typed command configs: validated up front (every problem in one error), printed at start and
saved as JSON next to what the command writes; and the command line derived from such a config
(``add_arguments`` / ``from_args`` / ``to_argv`` / ``parse_value``), so an option is declared once."""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """All problems of a config at once, one per line."""

    def __init__(self, problems: list[str], what: str = "config"):
        self.problems = list(problems)
        super().__init__(f"invalid {what} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n"
                         + "\n".join(f"  - {p}" for p in problems))


class CommandConfig:
    """Mixin for dataclass configs: subclasses implement ``problems()``."""

    def problems(self) -> list[str]:
        return []

    def validate(self):
        probs = self.problems()
        if probs:
            raise ConfigError(probs, type(self).__name__)
        return self

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}

    def describe(self) -> str:
        d = self.to_dict()
        width = max(map(len, d)) if d else 0
        return f"{type(self).__name__}:\n" + "\n".join(f"  {k:<{width}} = {v}" for k, v in d.items())

    def save(self, path: str | Path) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(json.dumps({"config": type(self).__name__, **self.to_dict()}, indent=2, default=str))
        tmp.replace(p)


def path_problems(**paths: tuple[Path | str | None, str]) -> list[str]:
    """Problems for paths that must exist: name=(path, 'file'|'dir')."""
    out = []
    for name, (p, kind) in paths.items():
        if p is None:
            out.append(f"{name} is required")
            continue
        p = Path(p)
        ok = p.is_file() if kind == "file" else p.is_dir()
        if not ok:
            out.append(f"{name}: {kind} {p} does not exist")
    return out


# ---------------------------------------------------------------------------------------------
# The command line, derived from a config dataclass: one declaration per option.
#
# Each dataclass field is an option ``--field-name``; its type gives the parser (``int``, ``float``,
# ``str``, ``Path``, ``X | None``, ``tuple[X, X]`` = two values, ``list[X]`` = repeatable, ``bool`` =
# ``--x/--no-x``), its default the default (no default = required), and
# ``field(metadata={...})`` the rest: ``help``, ``choices``, ``group`` (argument group key), ``metavar``,
# ``hidden`` (accepted, not shown in --help), ``flag`` (the option's name when it is not ``--field-name``,
# e.g. a name users already type) and ``cli=False`` (not an option at all).
# The same table parses values from other sources (``parse_value``: YAML overrides) and writes a
# config back as a command line (``to_argv``: a parent process starting the command).


@dataclasses.dataclass(frozen=True)
class Option:
    """One command-line option of a config field."""

    name: str                   # the field
    flag: str                   # --the-field
    convert: Callable[[Any], Any]
    kind: str                   # "bool" | "scalar" | "tuple" (nargs values) | "list" (repeatable)
    nargs: int | None
    default: Any
    required: bool
    optional: bool              # the type admits None
    help: str | None
    choices: tuple | None
    group: str | None
    hidden: bool
    metavar: str | tuple | None


def options(cls) -> list[Option]:
    """The command-line options of a config dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not f.init or meta.get("cli", True) is False:
            continue
        tp, optional = hints[f.name], False
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            rest = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(rest) != 1:
                raise TypeError(f"{cls.__name__}.{f.name}: only 'X | None' unions can be options")
            tp, optional = rest[0], True
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp is bool:
            kind, convert, nargs = "bool", _to_bool, None
        elif origin is tuple:
            if not args or Ellipsis in args or len(set(args)) != 1:
                raise TypeError(f"{cls.__name__}.{f.name}: tuples must be tuple[X, X, ...] of one type")
            kind, convert, nargs = "tuple", args[0], len(args)
        elif origin is list:
            kind, convert, nargs = "list", args[0], None
        elif tp in (int, float, str, Path):
            kind, convert, nargs = "scalar", tp, None
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: type {tp} has no command-line form")
        if f.default is not dataclasses.MISSING:
            default, required = f.default, False
        elif f.default_factory is not dataclasses.MISSING:
            default, required = f.default_factory(), False
        else:
            default, required = None, True
        choices = meta.get("choices")
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        out.append(Option(f.name, flag, convert, kind, nargs, default, required, optional,
                          meta.get("help"), tuple(choices) if choices is not None else None, meta.get("group"),
                          bool(meta.get("hidden", False)), meta.get("metavar")))
    return out


def _to_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "yes", "1", "false", "no", "0"):
        return v.lower() in ("true", "yes", "1")
    raise ValueError(f"{v!r} is not a boolean (true or false)")


def add_arguments(parser: argparse.ArgumentParser, cls, *, skip: Iterable[str] = (), skip_groups: Iterable[str] = (),
                  groups: dict[str, str] | None = None, overrides: dict[str, dict] | None = None) -> None:
    """Add one option per field of ``cls`` to ``parser``. ``groups`` maps group keys to titles;
    ``overrides`` adjusts an option's ``add_argument`` keywords for this parser (required, help, ...)."""
    skip, skip_groups, groups, overrides = set(skip), set(skip_groups), groups or {}, overrides or {}
    containers: dict[str, Any] = {}
    for o in options(cls):
        if o.name in skip or (o.group is not None and o.group in skip_groups):
            continue
        kw: dict[str, Any] = {"dest": o.name, "default": o.default}
        if o.kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = o.convert
            if o.kind == "tuple":
                kw["nargs"] = o.nargs
            elif o.kind == "list":
                kw["action"] = "append"
                kw["default"] = None  # argparse appends to a given default: the field's default is applied later
            if o.choices is not None:
                kw["choices"] = list(o.choices)
            if o.required:
                kw["required"] = True
        kw["help"] = argparse.SUPPRESS if o.hidden else o.help
        if o.metavar is not None:
            kw["metavar"] = o.metavar
        kw.update(overrides.get(o.name, {}))
        if o.group is None:
            target = parser
        else:
            if o.group not in containers:
                containers[o.group] = parser.add_argument_group(groups.get(o.group, o.group))
            target = containers[o.group]
        target.add_argument(o.flag, **kw)


def from_args(cls, args: argparse.Namespace, **fixed):
    """The config of parsed arguments (fields absent from ``args`` keep their defaults; ``fixed`` wins)."""
    kw = {}
    for o in options(cls):
        if o.name in fixed or not hasattr(args, o.name):
            continue
        v = getattr(args, o.name)
        if o.kind == "tuple" and v is not None:
            v = tuple(v)
        elif o.kind == "list" and v is None:
            v = o.default
        kw[o.name] = v
    return cls(**kw, **fixed)


def parse_value(cls, name: str, value: Any) -> Any:
    """``value`` (from a YAML/JSON file) as field ``name`` of ``cls`` holds it, parsed like its option.
    Raises ValueError with a one-line reason."""
    o = {o.name: o for o in options(cls)}[name]
    if value is None:
        if o.optional:
            return None
        raise ValueError("must not be empty")
    if o.kind == "bool":
        return _to_bool(value)
    if o.kind == "tuple":
        if not isinstance(value, (list, tuple)) or len(value) != o.nargs:
            raise ValueError(f"{value!r} is not a list of {o.nargs} values")
        parsed = tuple(_convert(o, v) for v in value)
    elif o.kind == "list":
        parsed = [_convert(o, v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    else:
        parsed = _convert(o, value)
    for v in (parsed if o.kind == "list" else [parsed]):  # a list's choices are its elements'
        if o.choices is not None and v not in o.choices:
            raise ValueError(f"{v!r} is not one of {list(o.choices)}")
    return parsed


def _convert(o: Option, value: Any) -> Any:
    what = getattr(o.convert, "__name__", str(o.convert))
    # a YAML true is no number, 2.5 no int (int() would truncate it), a list no scalar
    if isinstance(value, (bool, list, tuple, dict)) or (o.convert is int and isinstance(value, float)):
        raise ValueError(f"{value!r} is not {what}")
    try:
        return o.convert(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not {what}") from None


def to_argv(cfg, *, skip: Iterable[str] = ()) -> list[str]:
    """The command line that parses back to ``cfg``: required fields, and every other field whose value
    differs from its default."""
    skip = set(skip)
    argv: list[str] = []
    for o in options(type(cfg)):
        v = getattr(cfg, o.name)
        if o.name in skip or (not o.required and v == o.default):
            continue
        if v is None:
            raise ValueError(f"{type(cfg).__name__}.{o.name} is None: no command line sets that")
        if o.kind == "bool":
            argv.append(o.flag if v else "--no-" + o.flag[2:])
        elif o.kind == "tuple":
            argv += [o.flag, *(str(x) for x in v)]
        elif o.kind == "list":
            for x in v:
                argv += [o.flag, str(x)]
        else:
            argv += [o.flag, str(v)]
    return argv
