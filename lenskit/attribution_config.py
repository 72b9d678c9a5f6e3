"""Settings of a per-component attribution: :class:`AttributionConfig`.

The ``lenskit attribute`` flags take their defaults from it; see
:func:`lenskit.attribution.attribute` for what each does.

Example:
    >>> from lenskit.attribution_config import AttributionConfig
    >>> AttributionConfig().metric, AttributionConfig(at="output").at
    ('logprob', 'output')
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lenskit.errors import LenskitError
from lenskit.settings import setting

__all__ = ["ABLATE", "AT", "METRICS", "AttributionConfig"]

METRICS: dict[str, str] = {"logprob": "bits", "logit": "logits", "kl": "bits"}
"""Metric name -> its unit."""
AT = ("next", "output")
ABLATE = ("position", "all")


@dataclass(frozen=True)
class AttributionConfig:
    """What an attribution explains and how it reads each component."""

    position: int = setting(-1, "position explained (-1: the last)")
    metric: str = setting("logprob", "what is explained", choices=tuple(METRICS))
    at: str = setting("next", "read each output at the next row or at the output", choices=AT)
    ablate: str = setting("position", "ablate at the explained position or at all", choices=ABLATE)

    def __post_init__(self) -> None:
        for name, allowed in (("metric", tuple(METRICS)), ("at", AT), ("ablate", ABLATE)):
            if getattr(self, name) not in allowed:
                raise LenskitError(
                    f"unknown {name} {getattr(self, name)!r}: use one of {', '.join(allowed)}"
                )

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON data (also keyword arguments of ``attribute``)."""
        return dataclasses.asdict(self)
