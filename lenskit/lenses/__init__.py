"""Lenses: the protocol, the registry, and the built-in kinds."""

from lenskit.lenses import logit, tuned, jacobian, causal_basis  # noqa: F401  # isort: skip (registry order)
from lenskit.lenses.base import (
    Lens,
    available_lenses,
    file_lenses,
    get_lens,
    lens_class,
    lens_from_spec,
    parse_lens_spec,
    register_lens,
)

__all__ = [
    "Lens",
    "available_lenses",
    "file_lenses",
    "get_lens",
    "lens_class",
    "lens_from_spec",
    "logit",
    "parse_lens_spec",
    "register_lens",
]
