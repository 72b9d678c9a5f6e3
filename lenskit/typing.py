"""Shape aliases for lenskit's public tensors, and the glossary of their axes.

Axis names (used in every jaxtyping annotation and einops pattern):

- ``batch``: independent sequences in one forward pass.
- ``pos``: token positions within a sequence.
- ``layer``: rows of a lens readout; row ``i < n_layers`` is the input of block ``i``
  (``blocks.{i}.hook_resid_pre``) and row ``n_layers`` is the model's final residual.
- ``d_model``: the residual-stream width.
- ``d_vocab``: the vocabulary size of the unembedding.
- ``k``: a top-k or basis axis (the k best tokens, or k causal directions).
- ``chunk``: fixed-length token chunks cut from a corpus.
- ``cell``: cells read in one block, flattened: positions, or (layer, position) or
  (chunk, position) pairs.
- ``target``: target token ids asked about (their probability and rank).
- ``lens``: lenses read side by side.
"""

from __future__ import annotations

from jaxtyping import Float, Int
from torch import Tensor

__all__ = [
    "AXES",
    "Hidden",
    "LayerHidden",
    "LayerLogits",
    "Logits",
    "TokenIds",
]

AXES: dict[str, str] = {
    "batch": "independent sequences in one forward pass",
    "pos": "token positions within a sequence",
    "layer": "lens rows: block inputs 0..n_layers-1, then the model's final residual",
    "d_model": "residual-stream width",
    "d_vocab": "vocabulary size of the unembedding",
    "k": "top-k tokens or basis directions",
    "chunk": "fixed-length token chunks cut from a corpus",
    "cell": "cells read in one block, flattened (positions, or layer/chunk x position)",
    "target": "target token ids asked about",
    "lens": "lenses read side by side",
    "group": "rows (layers, lenses) read at the same cells, sharing their reference",
    "head": "a row's most likely tokens, read exactly by a low-precision readout",
    "cand": "candidate tokens known to hold a row's top-k (a readout's head)",
}

TokenIds = Int[Tensor, "batch pos"]
Hidden = Float[Tensor, "batch pos d_model"]
Logits = Float[Tensor, "batch pos d_vocab"]
LayerHidden = Float[Tensor, "layer batch pos d_model"]
LayerLogits = Float[Tensor, "layer batch pos d_vocab"]
