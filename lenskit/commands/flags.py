"""Command-line flags generated from a config dataclass, so that a setting has one source.

Each field becomes ``--kebab-name``: its type comes from the annotation (``X | None``
takes ``X``; a ``bool`` becomes ``--name/--no-name``), its default from the dataclass (or
a given instance of it), its help from ``metadata["help"]`` and its allowed values from
``metadata["choices"]``.

Example:
    >>> import argparse
    >>> from dataclasses import dataclass, field
    >>> @dataclass(frozen=True)
    ... class Demo:
    ...     max_len: int = field(default=8, metadata={"help": "tokens per prompt"})
    ...     mode: str = field(default="a", metadata={"help": "mode", "choices": ("a", "b")})
    ...     fast: bool = True
    >>> parser = argparse.ArgumentParser()
    >>> add_flags(parser, Demo)
    >>> args = parser.parse_args(["--max-len", "4", "--no-fast"])
    >>> config_from_args(Demo, args)
    Demo(max_len=4, mode='a', fast=False)
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Collection
from typing import Any

__all__ = ["add_flags", "config_from_args", "flag_name", "flag_type"]


def flag_name(name: str) -> str:
    """``field_name`` -> ``--field-name``."""
    return "--" + name.replace("_", "-")


def flag_type(annotation: Any) -> type:
    """The command-line type of a field: ``int``, ``float``, ``str`` or ``bool``.

    Raises:
        TypeError: For an annotation with no command-line form (lists, nested configs).
    """
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(inner) == 1:
            return flag_type(inner[0])
    if typing.get_origin(annotation) is typing.Literal:
        return type(typing.get_args(annotation)[0])
    if annotation in (int, float, str, bool):
        return annotation
    raise TypeError(f"no command-line form for a field of type {annotation!r}")


def _default(f: dataclasses.Field, defaults: Any) -> Any:
    if defaults is not None:
        return getattr(defaults, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def add_flags(
    parser: argparse.ArgumentParser | Any,
    cls: type,
    *,
    defaults: Any = None,
    skip: Collection[str] = (),
    required: Collection[str] = (),
) -> None:
    """Add one flag per field of the dataclass ``cls`` to ``parser`` (or an argument group).

    Args:
        parser: Where the flags go.
        cls: A dataclass; each field's ``metadata`` may hold ``help`` and ``choices``.
        defaults: An instance of ``cls`` whose values are the defaults (default: the
            dataclass defaults).
        skip: Fields that get no flag.
        required: Fields whose flag must be given.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind, default = flag_type(hints[f.name]), _default(f, defaults)
        text = f.metadata.get("help", "")
        kwargs: dict[str, Any] = {"dest": f.name, "default": default}
        if f.name in required:
            kwargs["required"] = True
        elif default is not None and kind is not bool:
            text += f" (default: {default})"
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if "choices" in f.metadata:
                kwargs["choices"] = choices = tuple(f.metadata["choices"])
                if any("," in str(c) for c in choices):  # argparse's {a,b} would blur them
                    kwargs["metavar"] = "{" + "|".join(map(str, choices)) + "}"
            else:
                kwargs["metavar"] = f.name.upper()
        parser.add_argument(flag_name(f.name), help=text.replace("%", "%%"), **kwargs)


def config_from_args(cls: type, args: argparse.Namespace, **changes: Any) -> Any:
    """An instance of ``cls`` from the parsed flags of :func:`add_flags` (and ``changes``).

    Fields without a flag take their dataclass defaults.
    """
    values = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)
    }
    return cls(**{**values, **changes})
