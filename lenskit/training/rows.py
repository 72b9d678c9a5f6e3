"""The rows a tuned lens trains translators for: block inputs, and optionally ``L12.mid``.

A lens trained with ``points=("resid_pre", "resid_mid")`` has one translator per block
input and one per stream between attention and MLP. Training handles them as one list
of rows in stream order (``L0``, ``L0.mid``, ``L1``, ...): the closed form, the KL steps,
the optimizer's groups, the validation choice and the report all index it the same way.

Example:
    >>> import lenskit
    >>> from lenskit.lenses.tuned import TunedLens
    >>> lens = TunedLens.untrained(lenskit.load_model("tiny-llama"),
    ...                            points=("resid_pre", "resid_mid"))
    >>> [row.label for row in train_rows(lens)][:3]
    ['L0', 'L0.mid', 'L1']
    >>> state_key(train_rows(lens)[1], "bias")
    'mid.0.bias'
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from lenskit.lenses.tuned import TunedLens
from lenskit.models import Row
from lenskit.residual import ResidualCapture

__all__ = [
    "load_translator_state",
    "row_translator",
    "stack_rows",
    "state_key",
    "train_rows",
    "translators",
]


def train_rows(lens: TunedLens) -> list[Row]:
    """The rows ``lens`` has translators for, in stream order (the output row left out)."""
    return lens.adapter.rows(lens.points)[:-1]


def row_translator(lens: TunedLens, row: Row) -> torch.nn.Linear:
    """The translator of one row."""
    modules = lens.mid_translators if row.point == "resid_mid" else lens.translators
    return modules[row.layer]  # type: ignore[index]


def translators(lens: TunedLens) -> list[torch.nn.Linear]:
    """Every translator, in the order of :func:`train_rows`."""
    return [row_translator(lens, row) for row in train_rows(lens)]


def state_key(row: Row, name: str) -> str:
    """The :meth:`~lenskit.lenses.tuned.TunedLens.translator_state` key of a row's tensor."""
    return f"{'mid.' if row.point == 'resid_mid' else ''}{row.layer}.{name}"


def load_translator_state(lens: TunedLens, state: dict[str, Tensor]) -> None:
    """Copy a :meth:`~lenskit.lenses.tuned.TunedLens.translator_state` into ``lens``."""
    with torch.no_grad():
        for row in train_rows(lens):
            translator = row_translator(lens, row)
            translator.weight.copy_(state[state_key(row, "weight")])
            translator.bias.copy_(state[state_key(row, "bias")])


def stack_rows(cap: ResidualCapture, rows: Sequence[Row]) -> Float[Tensor, "layer cell d_model"]:
    """The residual at each row, every token of the batch flattened into ``n``."""
    return cap.row_stack(rows).flatten(1, 2)
