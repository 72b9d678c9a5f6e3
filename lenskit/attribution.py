"""Per-component attribution through a lens: which attention or MLP output moved the prediction.

For one prompt, one position and a target token, every output a block adds to the
residual stream (each block's attention output ``attn_out`` and MLP output
``mlp_out``, plus the embedding the stream starts from) gets two numbers, both as
the chosen lens reads the prediction:

- **direct effect**: the component's output alone, read through the lens's map for
  the row where it is first read, linearised: the lens's (affine) translator, the
  final norm with its divisor frozen at the full stream's value, the unembedding,
  and the metric to first order around the lens's full reading;
- **ablation effect**: the same metric at the same row through the same lens, full
  minus with that output removed (its hook output zeroed at the chosen position, or
  at every position with ``ablate="all"``, in one batched forward pass). Blocks
  between the component and the row react to the removal; the direct effect is
  the first-order, no-reaction part.

``at="next"`` reads each component at the first row after it that the lens covers:
attention at ``L12.mid`` where the lens reads the stream between attention and MLP
(the logit lens always; a tuned lens trained with those points), else at the next
block input, like the MLP. ``at="output"`` reads every component at the final
residual: the classical direct logit attribution.

Metrics: ``logprob`` (the target's log-probability, bits), ``logit`` (the target's
logit minus the mean logit, or minus a ``contrast`` token's logit) and ``kl``
(KL(model output || lens reading), bits). With ``at="output"`` and ``metric="logit"``
the direct effects of all components plus :attr:`Attribution.constant` (norm and
unembedding biases) sum exactly to the output's logit difference, in every family
whose output is the plain unembedding (not Gemma 2, which soft-caps its logits).

Example:
    >>> import lenskit
    >>> from lenskit.attribution import attribute
    >>> model = lenskit.load_model("tiny-llama")
    >>> result = attribute(model, lenskit.get_lens("logit", model), "Hello", "!")
    >>> result.labels[:3], result.read_rows[:3]
    (('embed', 'L0.attn', 'L0.mlp'), ('L0', 'L0.mid', 'L1'))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lenskit.attribution_config import ABLATE, AT, METRICS
from lenskit.attribution_result import Attribution
from lenskit.errors import LenskitError
from lenskit.models import ModelAdapter, Row, model_lock
from lenskit.residual import capture, token_texts, tokenize
from lenskit.trajectory import resolve_target

__all__ = ["ABLATE", "AT", "METRICS", "Attribution", "Component", "attribute", "components"]

_LN2 = math.log(2.0)


@dataclass(frozen=True)
class Component:
    """One output added to the residual stream.

    Attributes:
        label: ``embed``, ``L3.attn`` or ``L3.mlp``.
        kind: ``embed``, ``attn`` or ``mlp``.
        layer: The block (-1 for the embedding).
        hook: The hook whose output is the component (None for the embedding).
        order: Where it enters the stream: rows with ``Row`` order >= this one see it.
    """

    label: str
    kind: str
    layer: int
    hook: str | None
    order: int


def components(adapter: ModelAdapter) -> list[Component]:
    """The embedding, then each block's attention and MLP outputs, in stream order."""
    out = [Component("embed", "embed", -1, None, 0)]
    for i in range(adapter.n_layers):
        out.append(Component(f"L{i}.attn", "attn", i, f"blocks.{i}.hook_attn_out", 2 * i + 1))
        out.append(Component(f"L{i}.mlp", "mlp", i, f"blocks.{i}.hook_mlp_out", 2 * i + 2))
    return out


def _order(row: Row) -> int:
    return 2 * row.layer + (1 if row.point == "resid_mid" else 0)


def _read_rows(adapter: ModelAdapter, lens: Any, comps: list[Component], at: str) -> list[Row]:
    """The row each component is read at (the first covered row after it, or the output)."""
    rows = adapter.rows(("resid_pre", "resid_mid") if adapter.has_mid else ("resid_pre",))
    if at == "output":
        return [rows[-1]] * len(comps)
    covered = [r for r in rows if lens.covers_point(r.layer, r.point)]
    return [next(r for r in covered if _order(r) >= c.order) for c in comps]


class _Metric:
    """The metric of a lens reading, and its first-order change."""

    def __init__(self, name: str, target: int, contrast: int | None, q: Tensor) -> None:
        self.name, self.target, self.contrast = name, target, contrast
        self.q_log = q.log_softmax(-1)

    def value(self, logits: Float[Tensor, "*cell d_vocab"]) -> Tensor:
        logits = logits.double()
        if self.name == "logprob":
            return logits.log_softmax(-1)[..., self.target] / _LN2
        if self.name == "logit":
            return logits[..., self.target] - self._baseline(logits)
        log_p = logits.log_softmax(-1)
        q_log = self.q_log.double()
        return (q_log.exp() * (q_log - log_p)).sum(-1) / _LN2

    def linear(
        self, delta: Float[Tensor, "k d_vocab"], logits: Float[Tensor, " d_vocab"]
    ) -> Tensor:
        delta = delta.double()
        if self.name == "logit":
            return delta[:, self.target] - self._baseline(delta)
        p = logits.double().softmax(-1)
        if self.name == "logprob":
            return (delta[:, self.target] - delta @ p) / _LN2
        return delta @ (p - self.q_log.double().exp()) / _LN2

    def _baseline(self, logits: Tensor) -> Tensor:
        if self.contrast is None:
            return logits.mean(-1)
        return logits[..., self.contrast]


def _direct(
    lens: Any, row: Row, h: Float[Tensor, " d_model"], outputs: Float[Tensor, "k d_model"]
) -> tuple[Tensor, Tensor, Tensor]:
    """Linearised logit changes of ``outputs`` read at ``row``, the lens's logits, the constant."""
    adapter: ModelAdapter = lens.adapter
    zero = torch.zeros_like(h)
    z = lens.transform_point(h, row.layer, row.point)
    offset = lens.transform_point(zero, row.layer, row.point)
    linear = lens.transform_point(outputs, row.layer, row.point) - offset  # affine translators
    scale = adapter.norm_scale(z)
    w_u = adapter.W_U.float()
    pre = adapter.final_norm(z).float() @ w_u + adapter.b_U.float()
    slope = adapter.output_slope(pre)
    delta = (adapter.frozen_norm(linear, scale) @ w_u) * slope
    bias = adapter.frozen_norm(offset, scale) + adapter.final_norm(zero).float()
    constant = (bias @ w_u + adapter.b_U.float()) * slope
    return delta, adapter.unembed(adapter.final_norm(z)), constant


def _ablated_rows(
    model: Any,
    tokens: Int[Tensor, "1 pos"],
    position: int,
    everywhere: bool,
    comps: list[Component],
    rows: list[Row],
) -> Float[Tensor, "k d_model"]:
    """For each component, the residual at its read row and ``position``, the component removed.

    The component's hook output is zeroed at ``position`` (at every position with
    ``everywhere``); one batch element per component, in chunks of ~4k tokens.
    """
    read = sorted({r.hook for r in rows})
    chunk = max(1, 4096 // tokens.shape[-1])
    out: list[Tensor] = []
    for start in range(0, len(comps), chunk):
        block = list(range(start, min(len(comps), start + chunk)))
        store: dict[str, Tensor] = {}

        def ablate(j: int) -> Any:
            def hook(act: Tensor, hook: Any) -> Tensor:
                act[j, slice(None) if everywhere else position] = 0.0
                return act

            return hook

        def save(name: str, store: dict[str, Tensor] = store) -> Any:
            def hook(act: Tensor, hook: Any) -> None:
                store[name] = act.detach()

            return hook

        fwd = [(comps[k].hook, ablate(j)) for j, k in enumerate(block)]
        fwd += [(name, save(name)) for name in read]
        with model_lock(model), torch.no_grad(), model.hooks(fwd_hooks=fwd):
            model(tokens.expand(len(block), -1))
        for j, k in enumerate(block):
            out.append(store[rows[k].hook][j, position])
    return torch.stack(out)


def attribute(
    model: Any,
    lens: Any,
    prompt: str | Sequence[int] | Tensor,
    target: str | int,
    *,
    position: int = -1,
    metric: str = "logprob",
    at: str = "next",
    contrast: str | int | None = None,
    ablate: str = "position",
    ablation: bool = True,
) -> Attribution:
    """Direct and ablation effects of every attention and MLP output on one prediction.

    Args:
        model: A ``TransformerBridge``.
        lens: A lens built for ``model`` (``get_lens``); its translators must be affine.
        prompt: Text or token ids.
        target: The target token (text of exactly one token, or its id).
        position: The position whose next-token prediction is explained (default last).
        metric: ``logprob`` (bits), ``logit`` (logits) or ``kl`` (bits).
        at: ``next`` (each component at the first row after it) or ``output``.
        contrast: For ``metric="logit"``: subtract this token's logit instead of the mean.
        ablate: Remove each output at ``position`` only, or at ``all`` positions.
        ablation: Run the ablation check (one batched forward pass).

    Returns:
        The :class:`Attribution`.
    """
    if metric not in METRICS:
        raise LenskitError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    if at not in AT or ablate not in ABLATE:
        raise LenskitError(
            f"at must be one of {', '.join(AT)} and ablate one of {', '.join(ABLATE)}, "
            f"got {at!r} and {ablate!r}"
        )
    if contrast is not None and metric != "logit":
        raise LenskitError("a contrast token goes with metric='logit': drop it or switch metric")
    lens.check_model(model)
    adapter: ModelAdapter = lens.adapter
    tokens = tokenize(model, prompt)[:1]
    n_pos = tokens.shape[-1]
    if not -n_pos <= position < n_pos:
        raise LenskitError(f"position {position} is outside the prompt's {n_pos} tokens")
    pos = position % n_pos
    target_text, target_id = resolve_target(model.tokenizer, target)
    contrast_text, contrast_id = (
        resolve_target(model.tokenizer, contrast) if contrast is not None else (None, None)
    )
    comps = components(adapter)
    rows = _read_rows(adapter, lens, comps, at)
    points = ("resid_pre", "attn_out", "mlp_out")
    points += ("resid_mid",) if any(r.point == "resid_mid" for r in rows) else ()
    cap = capture(model, tokens, points=points)
    outputs = torch.stack(
        [cap.stack("resid_pre")[0, 0, pos]]
        + [cap.stack(f"{c.kind}_out")[c.layer, 0, pos] for c in comps[1:]]
    )
    final_logits = cap.logits[0, pos].float()  # type: ignore[index]
    measure = _Metric(metric, target_id, contrast_id, final_logits)
    direct = torch.zeros(len(comps), dtype=torch.float64)
    row_values = torch.zeros(len(comps), dtype=torch.float64)
    constant = None
    with torch.no_grad():
        for row in dict.fromkeys(rows):
            idx = [k for k, r in enumerate(rows) if r == row]
            h = cap.row_stack([row])[0, 0, pos]
            delta, logits, const = _direct(lens, row, h, outputs[idx])
            direct[idx] = measure.linear(delta, logits)
            row_values[idx] = measure.value(logits)
            if at == "output":
                constant = float(measure.linear(const.unsqueeze(0), logits)[0])
        effects = torch.full((len(comps),), float("nan"), dtype=torch.float64)
        if ablation:
            ablated = _ablated_rows(model, tokens, pos, ablate == "all", comps[1:], rows[1:])
            logits = lens.read_points(ablated.unsqueeze(1), rows[1:])[:, 0]
            effects[1:] = row_values[1:] - measure.value(logits)
        output_value = float(measure.value(final_logits))
    return Attribution(
        model_name=adapter.name,
        lens_kind=lens.kind,
        lens_source=getattr(lens, "source", None),
        tokens=tuple(token_texts(model.tokenizer, tokens[0])),
        position=pos,
        target=target_text,
        target_id=target_id,
        metric=metric,
        unit=METRICS[metric],
        at=at,
        ablate=ablate,
        contrast=contrast_text,
        labels=tuple(c.label for c in comps),
        kinds=tuple(c.kind for c in comps),
        layers=tuple(c.layer for c in comps),
        read_rows=tuple(r.label for r in rows),
        direct=direct.numpy(),
        ablation=effects.numpy(),
        row_values=row_values.numpy(),
        output_value=output_value,
        constant=constant,
    )
