"""Component contributions by layer: attention vs MLP, one panel per lens, side by side.

Example:
    >>> import lenskit
    >>> from lenskit.attribution import attribute
    >>> from lenskit.plotting import attribution_plot
    >>> model = lenskit.load_model("tiny-gpt2")
    >>> result = attribute(model, lenskit.get_lens("logit", model), "Hello", "!")
    >>> [trace.name for trace in attribution_plot(result).data][:2]
    ['attention', 'MLP']
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lenskit.attribution import Attribution
from lenskit.errors import LenskitError
from lenskit.plotting.style import PALETTE, TEMPLATE, display_token

__all__ = ["attribution_plot"]

_COLORS = {"attn": PALETTE[0], "mlp": PALETTE[1]}
_NAMES = {"attn": "attention", "mlp": "MLP"}


def _check(results: list[Attribution]) -> None:
    if not results:
        raise LenskitError("attribution_plot needs at least one attribution result")
    first = results[0]
    for result in results[1:]:
        same = (result.tokens, result.position, result.target_id, result.metric)
        if same != (first.tokens, first.position, first.target_id, first.metric):
            raise LenskitError(
                "attribution results differ in prompt, position, target or metric: compute "
                "them with the same ones to show them side by side"
            )


def _panel(fig: go.Figure, result: Attribution, col: int, show_ablation: bool) -> None:
    direct, ablation = result.by_layer("direct"), result.by_layer("ablation")
    layers = list(range(result.n_layers))
    rows_at = {
        k: [r for r, kk in zip(result.read_rows, result.kinds, strict=True) if kk == k]
        for k in _COLORS
    }
    for kind, color in _COLORS.items():
        fig.add_trace(
            go.Bar(
                x=layers,
                y=direct[kind],
                name=_NAMES[kind],
                legendgroup=kind,
                showlegend=col == 1,
                marker_color=color,
                customdata=rows_at[kind],
                hovertemplate=(
                    f"L%{{x}} {_NAMES[kind]}<br>direct %{{y:+.3f}} {result.unit}"
                    "<br>read at %{customdata}<extra></extra>"
                ),
            ),
            row=1,
            col=col,
        )
    if not show_ablation:
        return
    for kind, color in _COLORS.items():
        values = ablation[kind]
        if not np.isfinite(values).any():
            continue
        fig.add_trace(
            go.Scatter(
                x=layers,
                y=[v if np.isfinite(v) else None for v in values],
                mode="markers",
                name=f"{_NAMES[kind]}, ablated",
                legendgroup=f"{kind}-ablation",
                showlegend=col == 1,
                marker={"symbol": "diamond-open", "size": 8, "color": color, "line": {"width": 2}},
                hovertemplate=(
                    f"L%{{x}} {_NAMES[kind]} removed<br>ablation %{{y:+.3f}} {result.unit}"
                    "<extra></extra>"
                ),
            ),
            row=1,
            col=col,
        )


def attribution_plot(
    results: Attribution | Sequence[Attribution],
    *,
    ablation: bool = True,
    title: str | None = None,
) -> go.Figure:
    """Direct effect of each block's attention and MLP output, one panel per lens.

    Bars are the direct effects (linearised, read through the lens); open diamonds
    are the ablation effects of the same outputs, as a check. Each panel has its own
    y scale (a tuned lens's effects are often far smaller than the logit lens's). The embedding's
    direct effect is given in each panel's title.

    Args:
        results: One attribution, or several of the same prompt, position, target and
            metric (for example the logit and the tuned lens) to compare side by side.
        ablation: Draw the ablation effects.
        title: Figure title (default: prompt position, target and metric).

    Returns:
        The figure: per panel one ``go.Bar`` per kind, then the ablation markers.
    """
    results = [results] if isinstance(results, Attribution) else list(results)
    _check(results)
    first = results[0]
    subtitles = []
    for result in results:
        embed = float(result.direct[0]) if result.kinds[0] == "embed" else float("nan")
        where = "at the next row" if result.at == "next" else "at the output"
        subtitles.append(f"{result.lens_kind} lens (read {where}; embedding {embed:+.2f})")
    fig = make_subplots(
        rows=1,
        cols=len(results),
        subplot_titles=subtitles,
        horizontal_spacing=0.04,
    )
    for col, result in enumerate(results, start=1):
        _panel(fig, result, col, ablation)
        fig.update_xaxes(title_text="block", row=1, col=col, dtick=max(1, first.n_layers // 10))
    metric = {"logprob": "log-probability", "logit": "logit difference", "kl": "KL to output"}
    fig.update_yaxes(title_text=f"effect on {metric[first.metric]} ({first.unit})", row=1, col=1)
    token = display_token(first.tokens[first.position])
    fig.update_layout(
        template=TEMPLATE,
        barmode="group",
        title=title
        or (
            f"Which block moved {display_token(first.target)} · position {first.position} "
            f"({token}) · {first.model_name}"
        ),
        height=420,
        width=max(560, 480 * len(results)),
        legend={"orientation": "h", "y": -0.2},
        margin={"t": 100},
    )
    return fig
