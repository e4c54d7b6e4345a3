"""Conventional metavars in every densebench help screen: ``--seed N``, ``--out DIR``, ``--model MODEL``.

Typer (0.29) shows a parameter's Python type where the metavar goes (``<str>``, ``<bool>``, ``<list[Path]>``) and
builds a fresh click command tree at every call, with no hook for the parameter classes. ``install(app)`` makes
the app's root group a :class:`ConventionalGroup`: once typer has built the tree, every command in it (sub-groups
included) hands out its parameters, the ``--help`` option included, as :class:`ConventionalOption` /
:class:`ConventionalArgument`, which differ from typer's classes only in what the help shows after the name:

- an explicit ``metavar=`` is shown as given; a boolean flag shows none;
- else the word for the parameter's name in :data:`WORDS` (``MODEL``, ``DIR``, ``NAMES``, ...);
- else by type: int ``N``, float ``NUM``, path ``PATH`` / ``FILE`` / ``DIR``, str ``TEXT``, a list of strings
  ``NAMES``, other lists ``PATH...``, choices ``[a|b]``.
"""

from __future__ import annotations

import datetime
import functools
from pathlib import Path
from typing import Any, get_args, get_origin

import typer
from typer.core import TyperArgument, TyperGroup, TyperOption
from typer.models import DefaultPlaceholder

#: Metavars for parameters (by their Python name) whose name says more than their type; ``metavar=`` wins.
WORDS = {
    # models, weights and benchmarks
    "model": "MODEL", "model_a": "MODEL", "model_b": "MODEL", "weights": "FILE", "benchmark": "NAMES",
    # files and folders
    "data_root": "DIR", "root": "DIR", "cache_dir": "DIR", "out_dir": "DIR", "out": "DIR", "keep": "DIR",
    "output": "PATH", "leaderboard": "FILE", "file": "FILE", "result": "FILE", "results": "FILE...",
    # values with a vocabulary (listed in the help text)
    "name": "DATASET", "device": "DEVICE", "precision": "PRECISION", "protocol": "NAME", "pos_interp": "MODE",
    "feature_norm": "on|off", "fmt": "FORMAT", "source": "SOURCE", "only": "GROUP", "key": "KEY",
    # numbers with a unit
    "input_size": "PIXELS", "tolerance": "POINTS",
}

_SCALARS = {int: "N", float: "NUM", str: "TEXT", bool: "BOOLEAN", datetime.datetime: "DATETIME"}


def type_metavar(annotation: Any, path_kind: str = "path") -> str:
    """The conventional metavar of a value of this type (``path_kind``: typer's path, file or dir)."""
    if get_origin(annotation) in (list, tuple):
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        if get_origin(annotation) is tuple:
            return " ".join(type_metavar(a, path_kind) for a in args)
        return "NAMES" if args == [str] else type_metavar(args[0] if args else str, path_kind) + "..."
    if isinstance(annotation, type) and issubclass(annotation, Path):
        return path_kind.upper()
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    return getattr(annotation, "__name__", "VALUE").upper()


def conventional_metavar(param: TyperOption | TyperArgument) -> str:
    """What the help shows after ``param``'s name when it has no explicit metavar."""
    desc = param.type_descriptor
    if desc.is_choice and desc.choices:
        return "[" + "|".join(str(getattr(c, "value", c)) for c in desc.choices) + "]"
    if param.name in WORDS:
        return WORDS[param.name]
    path_kind = desc.path_type if desc.is_path or desc.is_list else "path"
    return type_metavar(desc.annotation, path_kind)


class ConventionalOption(TyperOption):
    """A typer option whose help shows a conventional metavar (none for a flag) instead of its Python type."""

    def display_type_rich(self, ctx: typer.Context) -> str | None:
        if self.metavar is not None:
            return self.metavar
        if self.is_flag or self.count:
            return None
        return conventional_metavar(self)


class ConventionalArgument(TyperArgument):
    """A typer argument whose help shows a conventional metavar instead of its Python type."""

    def display_type_rich(self, ctx: typer.Context) -> str | None:
        # an explicit metavar is already the argument's name in the help and the usage line
        return None if self.metavar is not None else conventional_metavar(self)


_PARAM_CLASSES = {TyperOption: ConventionalOption, TyperArgument: ConventionalArgument}


def conventional_params(params: list) -> list:
    """Rebind typer's own parameter classes in ``params`` (in place) to the conventional ones; returns ``params``.

    A parameter of any other class (a custom one) keeps its display.
    """
    for p in params:
        conventional = _PARAM_CLASSES.get(type(p))
        if conventional is not None:
            p.__class__ = conventional  # a subclass with the same fields: only the display methods differ
    return params


@functools.cache
def _conventional_command_class(cls: type) -> type:
    """``cls`` with ``get_params`` handing out conventional parameters.

    ``get_params`` is what parsing, the usage line and the help read, and where click adds the ``--help`` option
    (made on first use), so that one is covered too. A direct subclass, so a built command can be rebound to it.
    """
    if getattr(cls, "conventional_metavars", False):
        return cls

    def get_params(self, ctx: typer.Context) -> list:
        return conventional_params(cls.get_params(self, ctx))

    return type(cls.__name__, (cls,), {"get_params": get_params, "conventional_metavars": True,
                                       "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                       "__doc__": cls.__doc__})


def _convert_tree(group: TyperGroup) -> None:
    for command in group.commands.values():
        command.__class__ = _conventional_command_class(type(command))
        if isinstance(command, TyperGroup):
            _convert_tree(command)


class ConventionalGroup(TyperGroup):
    """Root group of a typer app: it and every command below it show conventional metavars (see the module doc)."""

    conventional_metavars = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # typer passes the sub-commands and sub-groups, already built
        _convert_tree(self)

    def get_params(self, ctx: typer.Context) -> list:
        return conventional_params(super().get_params(ctx))


def install(app: typer.Typer) -> typer.Typer:
    """Make ``app`` (its commands, sub-apps and their ``--help``) show conventional metavars; returns ``app``."""
    cls = app.info.cls
    if isinstance(cls, DefaultPlaceholder) or cls is None:
        app.info.cls = ConventionalGroup
    elif not issubclass(cls, ConventionalGroup):
        raise TypeError(f"the app's group class {cls.__name__} must derive from cli_help.ConventionalGroup")
    return app
