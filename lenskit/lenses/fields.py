"""Checks of single fields read from lens files, each failing with one line naming the field.

Example:
    >>> from lenskit.lenses.fields import check_int
    >>> check_int(3, "k", 1)
    3
    >>> check_int(None, "k", 1, optional=True) is None
    True
"""

from __future__ import annotations

from typing import Any

from lenskit.errors import LenskitError

__all__ = ["check_int", "check_optional_text"]


def check_int(value: Any, name: str, minimum: int = 0, *, optional: bool = False) -> int | None:
    """``value`` as an integer ``>= minimum`` (None where ``optional`` and absent).

    Raises:
        LenskitError: For a bool, a non-integer or a value below ``minimum``.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LenskitError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_optional_text(value: Any, name: str, *, absent: str = "null") -> str | None:
    """``value`` if it is a string or None; the message calls None ``absent``.

    Raises:
        LenskitError: For anything else.
    """
    if value is not None and not isinstance(value, str):
        raise LenskitError(f"{name} must be a string or {absent}, got {value!r}")
    return value
