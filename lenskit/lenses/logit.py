"""The logit lens: every layer read through the model's own final norm and unembedding."""

from __future__ import annotations

from typing import Any

from jaxtyping import Float
from torch import Tensor

from lenskit.errors import LenskitError
from lenskit.lenses.base import Lens, register_lens
from lenskit.models import ModelAdapter

__all__ = ["LogitLens"]


@register_lens("logit")
class LogitLens(Lens):
    """The logit lens (nostalgebraist 2020): ``unembed(final_norm(h))`` at every layer.

    The norm recomputes its statistics for each residual it reads; at the final
    row it reproduces the model's logits.
    """

    description = "the model's final norm and unembedding applied to every layer"
    objective = "none"  # no parameters: the model's own final norm and unembedding

    @classmethod
    def from_model(cls, model: Any, **options: Any) -> LogitLens:
        """Build the logit lens for a ``TransformerBridge`` (it takes no options)."""
        if options:
            raise LenskitError(
                f"the logit lens takes no options, got {', '.join(sorted(options))}: drop them"
            )
        return cls(ModelAdapter(model))

    def covers_point(self, layer: int, point: str) -> bool:
        """Every row, the stream between attention and MLP included."""
        return 0 <= layer <= self.adapter.n_layers

    def transform_mid(
        self, h: Float[Tensor, "*batch d_model"], layer: int
    ) -> Float[Tensor, "*batch d_model"]:
        """The identity: ``L12.mid`` rows are read as they are."""
        return h

    def transform_hidden(
        self, h: Float[Tensor, "*batch d_model"], layer: int
    ) -> Float[Tensor, "*batch d_model"]:
        """The identity: the logit lens reads the residual as it is."""
        return h
