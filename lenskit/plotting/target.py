"""A target token's probability or rank across layers, per position or per lens."""

from __future__ import annotations

import math
from collections.abc import Sequence

import plotly.graph_objects as go

from lenskit.errors import LenskitError
from lenskit.plotting.gaps import gap_connector
from lenskit.plotting.style import PALETTE, TEMPLATE, coverage_note, display_token, log_ticks
from lenskit.trajectory import Trajectory

__all__ = ["target_plot"]

_DASHES = ("solid", "dash", "dot", "dashdot")


def _positions(n_pos: int, positions: int | Sequence[int] | None) -> list[int]:
    if positions is None:
        return [n_pos - 1]
    chosen = [positions] if isinstance(positions, int) else list(positions)
    if not chosen:
        raise LenskitError("positions is empty: give at least one position, e.g. positions=[-1]")
    out = []
    for p in chosen:
        if isinstance(p, bool) or not isinstance(p, int) or not -n_pos <= p < n_pos:
            raise LenskitError(
                f"position {p!r} is outside the prompt's {n_pos} tokens: use 0..{n_pos - 1} "
                "(or negative from the end)"
            )
        out.append(p % n_pos)
    return out


def _check(trajs: list[Trajectory], value: str) -> None:
    if not trajs:
        raise LenskitError("target_plot needs at least one trajectory")
    if value not in ("prob", "rank"):
        raise LenskitError(f"value must be 'prob' or 'rank', got {value!r}")
    first = trajs[0]
    for traj in trajs:
        if traj.target_prob is None or traj.target_rank is None:
            raise LenskitError(
                f"the {traj.lens_kind} trajectory has no target: pass target=' Paris' to "
                "lenskit.trajectory"
            )
        if traj.tokens != first.tokens or traj.target_id != first.target_id:
            raise LenskitError(
                "trajectories differ in prompt or target: compute them with the same "
                "prompt and target"
            )


def _add_line(
    fig: go.Figure, traj: Trajectory, pos: int, name: str, value: str, style: tuple[str, str]
) -> None:
    """One line (and its dotted guide across unread layers) of ``traj`` at ``pos``."""
    x = list(range(traj.n_layers))
    if value == "prob":
        ys = traj.target_prob[:, pos].tolist()
    else:
        ys = (traj.target_rank[:, pos] + 1).tolist()
    covered = traj.covered.tolist()
    ys = [v if c else None for v, c in zip(ys, covered, strict=True)]
    color, dash = style
    connector = gap_connector(x, ys, color, name)
    if connector is not None:
        fig.add_trace(connector)
    note = coverage_note(traj.layer_labels, covered)
    fmt = ".3f" if value == "prob" else ",.0f"
    fig.add_trace(
        go.Scatter(
            x=x,
            y=ys,
            mode="lines+markers",
            name=f"{name} ({note})" if note else name,
            legendgroup=name,
            connectgaps=False,
            line={"color": color, "width": 2, "dash": dash},
            marker={"size": 8 if connector is not None else 5},
            customdata=[display_token(traj.top_tokens[r][pos][0]) for r in x],
            hovertemplate=f"{name}: %{{y:{fmt}}} (top-1 %{{customdata}})<extra></extra>",
        )
    )


def target_plot(
    trajs: Trajectory | Sequence[Trajectory],
    *,
    positions: int | Sequence[int] | None = None,
    value: str = "prob",
    title: str | None = None,
) -> go.Figure:
    """A target token's probability or rank across layers.

    With one trajectory there is one line per position; with several (lenses of
    the same prompt and target) one line per lens, or per lens and position.
    Rows a lens does not cover are gaps, named once in the legend; a line with gaps
    inside gets larger markers and a thin dotted guide through its values. Ranks are
    shown 1-based (1 = top-1) on a log axis.

    Args:
        trajs: A trajectory with a target, or several of the same prompt and target.
        positions: Positions to follow (default: the last one); negative counts
            from the end.
        value: ``"prob"`` or ``"rank"``.
        title: Figure title.

    Returns:
        The figure: per line a dotted guide (where it has gaps), then the line.

    Raises:
        LenskitError: Without a target, for mismatched trajectories or bad positions.
    """
    many = not isinstance(trajs, Trajectory)
    trajs = list(trajs) if many else [trajs]
    _check(trajs, value)
    first = trajs[0]
    chosen = _positions(len(first.tokens), positions)
    fig = go.Figure()
    for i, traj in enumerate(trajs):
        for j, pos in enumerate(chosen):
            where = f"pos {pos} {display_token(first.tokens[pos])}"
            if not many:
                name = where
            else:
                name = f"{traj.lens_kind} · {where}" if len(chosen) > 1 else traj.lens_kind
            color = PALETTE[(i if many else j) % len(PALETTE)]
            _add_line(fig, traj, pos, name, value, (color, _DASHES[j % 4] if many else "solid"))
    x = list(range(first.n_layers))
    step = max(1, math.ceil(len(x) / 16))
    ticks = x[::step] if x[-1] in x[::step] else [*x[::step], x[-1]]
    if value == "prob":
        yaxis = {"title_text": "target probability", "range": [0, 1.02]}
    else:
        ranks = [v for t in fig.data for v in t.y if v is not None]
        yaxis = {"title_text": "target rank (1 = top-1)", "type": "log"}
        yaxis.update(log_ticks(ranks, integers=True))
    fig.update_layout(
        template=TEMPLATE,
        title_text=title or f"target {display_token(first.target)} · {first.model_name}",
        xaxis={
            "title_text": "layer",
            "tickmode": "array",
            "tickvals": ticks,
            "ticktext": [first.layer_labels[t] for t in ticks],
            "showgrid": False,
            "zeroline": False,
        },
        yaxis=yaxis,
        width=820,
        height=460,
        hovermode="x unified",
        legend={"orientation": "h", "y": -0.22, "x": 0, "font": {"size": 12}},
        margin={"b": 110},
    )
    return fig
