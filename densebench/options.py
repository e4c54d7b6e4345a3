"""Declarative protocol options: each Config field says its choices, range and meaning next to itself.

A protocol's ``Config`` is a frozen dataclass whose fields are made with :func:`option`. The same
declaration is used three times, so the three can never disagree:

* validation, once, in ``__post_init__`` (:func:`validate_options`), before any data is read or any
  forward runs; the message names the flag, the bad value and what is accepted;
* ``densebench list benchmarks --options`` and ``--help`` (:func:`describe_options`);
* the leaderboard's notion of a field that does not change the numbers (``non_semantic=True``).

This is scikit-learn's "defaults in the signature, validation at the boundary" with the parameter
constraints written next to the parameters, as ``neco_train`` does for its own options.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, choices_message

_META = "densebench"


@dataclass(frozen=True)
class OptionSpec:
    """What one Config field accepts. ``none`` names what ``None`` means for the field ("all", "auto")."""

    help: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False       # value > min instead of value >= min
    max_exclusive: bool = False
    none: str | None = None
    non_semantic: bool = False        # does not change the measured numbers (batch size, workers, pictures)

    def range_text(self) -> str:
        """``>= 1``, ``in (0, 1]``, or '' when unbounded."""
        if self.min is not None and self.max is not None:
            return (f"in {'(' if self.min_exclusive else '['}{_num(self.min)}, "
                    f"{_num(self.max)}{')' if self.max_exclusive else ']'}")
        if self.min is not None:
            return f"{'>' if self.min_exclusive else '>='} {_num(self.min)}"
        if self.max is not None:
            return f"{'<' if self.max_exclusive else '<='} {_num(self.max)}"
        return ""

    def accepts_text(self) -> str:
        parts = []
        if self.choices is not None:
            parts.append("|".join(str(c) for c in self.choices))
        if self.range_text():
            parts.append(self.range_text())
        if self.none:
            parts.append(f"or {self.none}")
        return " ".join(parts)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def option(default: Any, help: str, *, choices: Sequence | None = None, min: float | None = None,
           max: float | None = None, min_exclusive: bool = False, max_exclusive: bool = False,
           none: str | None = None, non_semantic: bool = False) -> Any:
    """A Config field with its declaration (see the module docstring)."""
    spec = OptionSpec(help=help, choices=tuple(choices) if choices is not None else None, min=min, max=max,
                      min_exclusive=min_exclusive, max_exclusive=max_exclusive, none=none,
                      non_semantic=non_semantic)
    return dataclasses.field(default=default, metadata={_META: spec})


def option_spec(field: dataclasses.Field) -> OptionSpec | None:
    return field.metadata.get(_META)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _allows_none(annotation: Any) -> bool:
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return union and type(None) in typing.get_args(annotation)


def _default_hint(field: dataclasses.Field) -> str:
    spec = option_spec(field)
    default = spec.none if field.default is None and spec and spec.none else option_text(field.default)
    return (f"leave {flag(field.name)} out for the published default ({default}); "
            "`densebench list benchmarks --options` lists what each option accepts")


def validate_options(config: Any) -> None:
    """Check every declared field of ``config`` against its declaration; ConfigError names the first bad one."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        spec = option_spec(f)
        if spec is None:
            continue
        value = getattr(config, f.name)
        if value is None:
            if not _allows_none(hints[f.name]):
                raise ConfigError(f"{flag(f.name)} needs a value", hint=_default_hint(f))
            continue
        if spec.choices is not None:
            values = value if isinstance(value, tuple) else (value,)
            for v in values:
                if v not in spec.choices:
                    raise ConfigError(choices_message(flag(f.name), v, spec.choices), hint=_default_hint(f))
        if spec.min is None and spec.max is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{flag(f.name)} must be a number, got {value!r}", hint=_default_hint(f))
        too_low = spec.min is not None and (value <= spec.min if spec.min_exclusive else value < spec.min)
        too_high = spec.max is not None and (value >= spec.max if spec.max_exclusive else value > spec.max)
        if too_low or too_high or (isinstance(value, float) and not math.isfinite(value)):
            none = f" or {spec.none}" if spec.none else ""
            raise ConfigError(f"{flag(f.name)} must be {spec.range_text()}{none}, got {value!r}",
                              hint=_default_hint(f))


@dataclass(frozen=True)
class OptionInfo:
    """One row of ``densebench list benchmarks --options``."""

    name: str
    flag: str
    type: str
    default: Any
    help: str
    accepts: str
    non_semantic: bool

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "default_text": self.default_text}

    @property
    def default_text(self) -> str:
        """The default as a user types it: on/off, comma lists, ``-`` for no value."""
        return option_text(self.default)


def option_text(value: Any, yes: str = "on", no: str = "off") -> str:
    """A value as a person types or reads it: ``yes``/``no`` for booleans, ``-`` for nothing, comma lists."""
    if isinstance(value, bool):
        return yes if value else no
    if value is None:
        return "-"
    if isinstance(value, (tuple, list)):
        return ",".join(option_text(v, yes, no) for v in value)
    return str(value)


def type_label(annotation: Any) -> str:
    """``int | None`` -> ``int``; ``tuple[str, ...]`` -> ``list``; plain words, no Python reprs."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if _allows_none(annotation) and len(args) == 1:
        annotation = args[0]
    if annotation is tuple or typing.get_origin(annotation) is tuple:
        return "list"
    return {bool: "on/off", int: "int", float: "float", str: "text"}.get(annotation, "text")


def describe_options(config_cls: type, *, defaults: Any | None = None) -> list[OptionInfo]:
    """The declared options of ``config_cls`` (``dataset`` is set by the benchmark, not an option)."""
    hints = typing.get_type_hints(config_cls)
    rows = []
    for f in dataclasses.fields(config_cls):
        spec = option_spec(f)
        if spec is None or f.name == "dataset":
            continue
        default = getattr(defaults, f.name) if defaults is not None else f.default
        if default is None and spec.none:
            default = spec.none
        rows.append(OptionInfo(name=f.name, flag=flag(f.name), type=type_label(hints[f.name]), default=default,
                               help=spec.help, accepts=spec.accepts_text(), non_semantic=spec.non_semantic))
    return rows


def non_semantic_fields(config_cls: type) -> frozenset[str]:
    """Fields declared as not changing the measured numbers."""
    return frozenset(f.name for f in dataclasses.fields(config_cls)
                     if (s := option_spec(f)) is not None and s.non_semantic)


@dataclasses.dataclass(frozen=True)
class ProtocolConfig:
    """Base of every protocol Config: declared options are checked when the config is made.

    Subclasses put rules that involve several fields in ``check()``; a field that needs normalising
    first (a comma list given as one string) does it in ``__post_init__`` before calling super().
    The one field every protocol has, ``limit``, comes first.
    """

    limit: int | None = option(None, "Smoke test on real data: only the first N images of every split (SPair: "
                                     "pairs, DAVIS: sequences); the result is non-standard.", min=1, none="all")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        validate_options(self)
        self.check()

    def check(self) -> None:
        """Rules across fields (override)."""

    @classmethod
    def options(cls) -> list[OptionInfo]:
        return describe_options(cls)
