"""How much one residual direction matters: ablate it, measure the KL of the output, in bits.

Ablating unit direction ``v`` at token ``t`` replaces the residual's coordinate along ``v``
with a reference value: ``h' = h - ((h - r) . v) v``, where ``r`` is the mean residual
(``mean`` ablation), zero (``zero``), or the residual of another token, drawn by a seeded
permutation without fixed points (``resample``). A direction's influence on a lens is the
mean over tokens of ``KL(lens(h) || lens(h'))``; on the model, of ``KL(model(x) || model(x
with h' at the layer))``, with the ablation done in the model's own residual stream through
a TransformerLens hook.

:class:`~lenskit.causal.objective.LensObjective` is the lens influence as a differentiable
function of ``v``, for the optimizer; the ablation itself lives in :mod:`lenskit.causal.ablation`.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenskit.causal.ablation import ABLATIONS, ROWS, ablate, ablation_reference
from lenskit.causal.objective import LensObjective
from lenskit.errors import LenskitError
from lenskit.lenses.base import Lens
from lenskit.lenses.basis import CausalBasis
from lenskit.metrics import LN2, Reference, kl_nats
from lenskit.models import model_lock
from lenskit.readout import Readout

__all__ = [
    "ABLATIONS",
    "LensObjective",
    "ablate",
    "ablation_reference",
    "direction_logits",
    "direction_tokens",
    "lens_influence",
    "model_influence",
]


def lens_influence(
    lens: Lens,
    layer: int,
    h: Float[Tensor, "cell d_model"],
    reference: Float[Tensor, "cell d_model"],
    directions: Float[Tensor, "k d_model"],
    *,
    precision: str = "exact",
) -> Float[Tensor, " k"]:
    """Each direction's influence on a lens, in bits: the lens itself on the ablated residuals.

    A lens that reads its translated residual through the model's final norm and
    unembedding (every built-in kind) is read by :class:`lenskit.readout.Readout` at
    ``precision`` (float32 by default: single-direction KLs are small); any other lens
    through its own ``forward``.

    Returns:
        Mean ``KL(lens(h) || lens(ablate(h, v)))`` per direction (float64).
    """
    layer = lens.check_layer(layer)
    sums = torch.zeros(directions.shape[0], dtype=torch.float64)
    straight = type(lens).forward is Lens.forward  # translate, then the model's readout
    engine = Readout(lens.adapter, precision) if straight else None
    with torch.no_grad():
        for lo in range(0, h.shape[0], ROWS):
            part, ref_part = h[lo : lo + ROWS], reference[lo : lo + ROWS]
            if engine is None:
                clean = Reference.from_logits(lens(part, layer))
            else:
                clean = engine.reference(lens.transform_hidden(part, layer))
            for i, v in enumerate(directions.to(h)):
                ablated = ablate(part, v, ref_part)
                if engine is None:
                    kl = kl_nats(clean, lens(ablated, layer))
                else:
                    kl = engine.kl_nats(lens.transform_hidden(ablated, layer), clean)
                sums[i] += kl.double().sum()
    return sums / (h.shape[0] * LN2)


def model_influence(
    model: Any,
    layer: int,
    directions: Float[Tensor, "k d_model"],
    tokens: Int[Tensor, "chunk pos"],
    reference: Float[Tensor, "chunk pos d_model"],
    *,
    skip_first: int = 1,
    batch_size: int = 4,
    clean: list[Reference] | None = None,
    progress: bool = False,
) -> Float[Tensor, " k"]:
    """Each direction's influence on the model: ablated at ``blocks.{layer}.hook_resid_pre``.

    The direction is ablated at every position from ``skip_first`` on, and the KL between
    the model's clean and ablated output is averaged over those positions.

    Args:
        model: A ``TransformerBridge``.
        layer: The block whose input is ablated (``0 <= layer < n_layers``).
        directions: Unit directions.
        tokens: Token chunks.
        reference: The reference residual of each token (positions before ``skip_first``
            are not used).
        skip_first: Leading positions of each chunk left alone and unscored.
        batch_size: Chunks per forward pass.
        clean: The model's clean output distribution per batch (scored positions,
            flattened), if already computed.
        progress: Show a tqdm bar.

    Returns:
        Mean KL in bits per direction (float64).
    """
    n_layers = int(model.cfg.n_layers)
    if not 0 <= layer < n_layers:
        raise LenskitError(f"layer {layer} has no block input to ablate: use 0..{n_layers - 1}")
    if not 0 <= skip_first < tokens.shape[1]:
        raise LenskitError(f"skip_first must be in 0..{tokens.shape[1] - 1}, got {skip_first}")
    from tqdm.auto import tqdm

    name = f"blocks.{layer}.hook_resid_pre"
    starts = list(range(0, tokens.shape[0], batch_size))
    sums = torch.zeros(directions.shape[0], dtype=torch.float64)
    bar = tqdm(
        total=len(starts) * directions.shape[0],
        desc=f"model influence L{layer}",
        unit="pass",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    with torch.no_grad(), bar:
        for b, start in enumerate(starts):
            batch = tokens[start : start + batch_size]
            ref = reference[start : start + batch_size, skip_first:]
            if clean is not None:
                base = clean[b]
            else:
                with model_lock(model):
                    base = Reference.from_logits(model(batch)[:, skip_first:].flatten(0, 1))
            for i, v in enumerate(directions):

                def ablate_hook(act: Tensor, hook: Any, v: Tensor = v, ref: Tensor = ref) -> Tensor:
                    out = act.clone()
                    out[:, skip_first:] = ablate(act[:, skip_first:], v.to(act), ref.to(act))
                    return out

                with model_lock(model), model.hooks(fwd_hooks=[(name, ablate_hook)]):
                    logits = model(batch)
                sums[i] += kl_nats(base, logits[:, skip_first:].flatten(0, 1)).double().sum()
                bar.update(1)
    return sums / (tokens.shape[0] * (tokens.shape[1] - skip_first) * LN2)


def direction_logits(
    lens: Lens, layer: int, directions: Float[Tensor, "k d_model"], at: Float[Tensor, " d_model"]
) -> Float[Tensor, "k d_vocab"]:
    """How a step along each direction moves the lens's logits at residual ``at``.

    The lens's Jacobian at ``at`` applied to each direction (translator, final norm and
    unembedding, linearised), centred over the vocabulary (softmax ignores a shift).
    """
    layer = lens.check_layer(layer)

    def read(h: Tensor) -> Tensor:
        return lens(h.unsqueeze(0), layer)[0]

    rows = []
    for v in directions.to(at):
        _, tangent = torch.autograd.functional.jvp(read, (at.detach(),), (v,))
        rows.append(tangent - tangent.mean())
    return torch.stack(rows).detach()


def direction_tokens(
    lens: Lens,
    basis: CausalBasis,
    tokenizer: Any,
    *,
    top: int = 8,
) -> pd.DataFrame:
    """The tokens each direction of a basis promotes and suppresses through the lens.

    Args:
        lens: The lens the basis was extracted for.
        basis: The causal basis.
        tokenizer: The model's tokenizer (to decode token ids).
        top: Tokens per side.

    Returns:
        One row per (direction, side, rank): ``direction`` (1-based), ``side``
        (``promotes`` / ``suppresses``), ``rank``, ``token_id``, ``token`` and
        ``logit_change`` (per unit step along the direction at the mean residual).
    """
    effect = direction_logits(lens, basis.layer, basis.basis, basis.mean)
    if not 1 <= top <= effect.shape[1] // 2:
        raise LenskitError(f"top must be in 1..{effect.shape[1] // 2}, got {top}")
    records = []
    for i, row in enumerate(effect):
        for side, sign in (("promotes", 1.0), ("suppresses", -1.0)):
            values, ids = torch.topk(sign * row, top)
            for rank, (value, tid) in enumerate(zip(values.tolist(), ids.tolist(), strict=True)):
                records.append(
                    {
                        "direction": i + 1,
                        "side": side,
                        "rank": rank + 1,
                        "token_id": tid,
                        "token": tokenizer.decode([tid]),
                        "logit_change": sign * value,
                    }
                )
    frame = pd.DataFrame.from_records(records)
    frame.attrs.update(layer=basis.layer, lens=lens.kind, model=lens.adapter.name)
    return frame
