"""Layer x position heatmaps of trajectories, alone or side by side.

Every heatmap has the same orientation: one row per lens row with the first
block input (``L0``) at the bottom and the model's ``output`` row at the top, so
a prediction reads bottom-up as it forms; one column per input position, labelled
with its input token. Colours always go light (poor) to dark (good): dark is a
confident, final-like prediction whatever the statistic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lenskit.errors import LenskitError
from lenskit.plotting.grid import (
    NA,
    Statistic,
    color_axis,
    field,
    fmt_bits,
    fmt_prob,
    grid_axes,
    heatmap_trace,
)
from lenskit.plotting.style import display_token, grid_size, select_positions, select_rows
from lenskit.trajectory import Trajectory

__all__ = ["STATISTICS", "compare_heatmaps", "trajectory_heatmap"]

_CELL_CHARS = 7  # longest token shown inside a cell
MAX_PANELS = 4  # lenses compare_heatmaps puts side by side


STATISTICS: dict[str, Statistic] = {
    "top1_prob": Statistic("top-1 probability", "Blues", (0.0, 1.0)),
    "entropy": Statistic("entropy (bits)", "Blues_r"),
    "kl_to_final": Statistic("KL(output ‖ lens) (bits)", "Blues_r"),
    "cross_entropy": Statistic("next-token cross-entropy (bits)", "Blues_r"),
    "target_prob": Statistic("target probability", "Blues", (0.0, 1.0)),
    "target_rank": Statistic("target rank (1 = top-1)", "Blues_r", log_rank=True),
}


def _statistic(traj: Trajectory, statistic: str) -> np.ndarray:
    """The statistic's colour values, ``[layer, pos]`` float64 with NaN for no value."""
    if statistic not in STATISTICS:
        raise LenskitError(f"unknown statistic {statistic!r}: use one of {', '.join(STATISTICS)}")
    if statistic.startswith("target_") and traj.target_prob is None:
        raise LenskitError(
            f"statistic {statistic!r} needs a target token: pass target=' Paris' to "
            "lenskit.trajectory"
        )
    if statistic == "top1_prob":
        values = traj.top_probs[..., 0].double().numpy().copy()
    elif statistic == "target_rank":
        rank = traj.target_rank.double().numpy()
        values = np.where(rank >= 0, np.log10(rank + 1.0), np.nan)
    else:
        values = getattr(traj, statistic).double().numpy().copy()
    values[~traj.covered.numpy()] = np.nan
    return values


def _check_hover_k(hover_k: int) -> None:
    if isinstance(hover_k, bool) or not isinstance(hover_k, int) or hover_k < 0:
        raise LenskitError(f"hover_k must be a non-negative integer, got {hover_k!r}")


def _trajectory_hover(
    traj: Trajectory, rows: list[int], cols: list[int], k: int
) -> tuple[list[list[list[str]]], str]:
    """Per-cell hover fields ``[row][col][field]`` and the hover template reading them.

    Only the per-cell values travel with the figure (the labels are in the template
    once), which keeps a 30-layer x 512-token heatmap a few MB.
    """
    has_target = traj.target_prob is not None and traj.target_rank is not None
    inputs = [display_token(t) for t in traj.tokens]
    nexts = [display_token(t) for t in traj.next_tokens]
    top1, top_p = traj.top_probs[..., 0].tolist(), traj.top_probs[..., :k].tolist()
    stats = [getattr(traj, n).tolist() for n in ("entropy", "kl_to_final", "cross_entropy")]
    target = (traj.target_prob.tolist(), traj.target_rank.tolist()) if has_target else None
    nfields = 7 + (2 if has_target else 0) + 2 * k
    cells = []
    for r in rows:
        covered = bool(traj.covered[r])  # once per row
        label = traj.layer_labels[r] if covered else f"{traj.layer_labels[r]} (not covered)"
        line = []
        for p in cols:
            fields = [label, f"{p}: {inputs[p]}", nexts[p]]
            if covered:
                fields += [fmt_prob(top1[r][p])]
                fields += [fmt_bits(stat[r][p]) for stat in stats]
                if target is not None:
                    fields += [fmt_prob(target[0][r][p]), str(target[1][r][p] + 1)]
                for tok, prob in zip(traj.top_tokens[r][p][:k], top_p[r][p], strict=True):
                    fields += [fmt_prob(prob), display_token(tok)]
            fields += [NA] * (nfields - len(fields))
            line.append(fields)
        cells.append(line)
    lines = [
        f"<b>{field(0)}</b> · pos {field(1)} → {field(2)}",  # %{x} shows the tick label
        f"top-1 prob {field(3)} · entropy {field(4)} bits",
        f"KL to output {field(5)} bits · next-token CE {field(6)} bits",
    ]
    if has_target:
        lines.append(f"target {display_token(traj.target)}: prob {field(7)} · rank {field(8)}")
    if k:
        first = nfields - 2 * k
        lines.append(f"top-{k} ({traj.lens_kind} lens):")
        lines += [f"{field(first + 2 * i)} {field(first + 2 * i + 1)}" for i in range(k)]
    return cells, "<br>".join(lines) + "<extra></extra>"


def _trajectory_trace(
    traj: Trajectory,
    statistic: str,
    rows: list[int],
    cols: list[int],
    hover_k: int,
    size: dict,
) -> go.Heatmap:
    values = _statistic(traj, statistic)[np.ix_(rows, cols)]
    k = min(hover_k, traj.top_probs.shape[-1])
    covered = traj.covered.tolist()
    text = [
        [display_token(traj.top_tokens[r][p][0], _CELL_CHARS) if covered[r] else "" for p in cols]
        for r in rows
    ]
    hover, template = _trajectory_hover(traj, rows, cols, k)
    return heatmap_trace(
        values,
        text,
        hover,
        template,
        cols,
        show_text=bool(size["show_text"]),
        xgap=int(size["xgap"]),
        name=traj.lens_kind,
    )


def trajectory_heatmap(
    traj: Trajectory,
    *,
    statistic: str = "top1_prob",
    layer_stride: int = 1,
    token_range: tuple[int, int] | slice | None = None,
    hover_k: int = 5,
    title: str | None = None,
) -> go.Figure:
    """Heatmap of one trajectory: layers (``output`` at the top) by input positions.

    Each cell shows its top-1 token (when cells are wide enough) and is coloured
    by ``statistic``; hovering shows the top ``hover_k`` tokens with their
    probabilities and every statistic of the cell. Rows the lens does not cover
    are blank (grey) and labelled ``(not covered)``.

    Colour scales run light (poor) to dark (good): probabilities on a fixed
    0..1 scale; entropy, KL and cross-entropy in bits from 0 (dark) to the
    largest shown value; the target rank on a log scale (the colour value is
    ``log10(1 + rank)``, the colour bar reads 1-based ranks 1, 10, 100, ...).

    Args:
        traj: The trajectory (see :func:`lenskit.trajectory`).
        statistic: ``"top1_prob"``, ``"entropy"``, ``"kl_to_final"``,
            ``"cross_entropy"``, ``"target_prob"`` or ``"target_rank"`` (the last
            two need a trajectory with a target).
        layer_stride: Show every n-th row (the output row is always shown).
        token_range: Positions to show: ``(start, stop)`` (half-open) or a slice.
        hover_k: Top tokens listed on hover (at most the trajectory's top-k; 0 for none).
        title: Figure title (default: statistic, lens and model).

    Returns:
        The figure; ``fig.data[0]`` is the heatmap, its ``customdata`` the hover texts.

    Raises:
        LenskitError: For an unknown statistic, a target statistic without a
            target, or a bad stride or range.
    """
    _check_hover_k(hover_k)
    values = _statistic(traj, statistic)
    spec = STATISTICS[statistic]
    rows = select_rows(traj.n_layers, layer_stride)
    cols = select_positions(len(traj.tokens), token_range)
    traj.cells.check_shown(rows, cols, "trajectory")
    size = grid_size(len(rows), len(cols))
    fig = go.Figure()  # add_trace validates the big arrays once; Figure(trace) copies them
    fig.add_trace(_trajectory_trace(traj, statistic, rows, cols, hover_k, size))
    fig.update_layout(
        coloraxis=color_axis(spec, [values[np.ix_(rows, cols)]], spec.colorscale),
        title_text=title or f"{spec.label} · {traj.lens_kind} lens · {traj.model_name}",
    )
    grid_axes(
        fig,
        traj.layer_labels,
        traj.covered.tolist(),
        traj.tokens,
        rows,
        cols,
        size,
        [(traj.lens_kind, traj.covered.tolist())],
    )
    return fig


def compare_heatmaps(
    trajs: Sequence[Trajectory],
    *,
    statistic: str = "top1_prob",
    layer_stride: int = 1,
    token_range: tuple[int, int] | slice | None = None,
    hover_k: int = 5,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Two to four trajectories of the same prompt side by side, on one colour scale.

    The panels share one colour axis (``layout.coloraxis``), the same rows and
    columns in the same order, and linked axes (zooming one zooms all).

    Args:
        trajs: 2 to 4 trajectories of the same model and prompt (different lenses).
        statistic: As in :func:`trajectory_heatmap`.
        layer_stride: Show every n-th row (the output row is always shown).
        token_range: Positions to show: ``(start, stop)`` (half-open) or a slice.
        hover_k: Top tokens listed on hover.
        labels: Panel titles (default: the lens kinds).
        title: Figure title.

    Returns:
        The figure, one heatmap per panel in ``fig.data``.

    Raises:
        LenskitError: If the trajectories are not 2 to 4 of the same model and tokens.
    """
    trajs = list(trajs)
    if not 2 <= len(trajs) <= MAX_PANELS:
        raise LenskitError(
            f"compare_heatmaps takes 2 to {MAX_PANELS} trajectories, got "
            f"{len(trajs)}: compare fewer lenses at a time"
        )
    first = trajs[0]
    for other in trajs[1:]:
        if other.model_name != first.model_name:
            raise LenskitError(
                f"trajectories come from different models ({first.model_name!r} and "
                f"{other.model_name!r}): compare lenses of one model"
            )
        if other.tokens != first.tokens or other.layer_labels != first.layer_labels:
            raise LenskitError(
                "trajectories have different tokens or layers: compute them all from the "
                "same prompt and model"
            )
    labels = list(labels) if labels is not None else [t.lens_kind for t in trajs]
    if len(labels) != len(trajs):
        raise LenskitError(f"got {len(labels)} labels for {len(trajs)} trajectories: give one each")
    _check_hover_k(hover_k)
    values = [_statistic(t, statistic) for t in trajs]
    spec = STATISTICS[statistic]
    rows = select_rows(first.n_layers, layer_stride)
    cols = select_positions(len(first.tokens), token_range)
    for traj in trajs:
        traj.cells.check_shown(rows, cols, f"{traj.lens_kind} trajectory")
    size = grid_size(len(rows), len(cols), panels=len(trajs))
    fig = make_subplots(
        rows=1,
        cols=len(trajs),
        shared_yaxes=True,
        horizontal_spacing=0.03,
        subplot_titles=labels,
    )
    for i, traj in enumerate(trajs, start=1):
        fig.add_trace(_trajectory_trace(traj, statistic, rows, cols, hover_k, size), row=1, col=i)
    fig.update_layout(
        coloraxis=color_axis(spec, [v[np.ix_(rows, cols)] for v in values], spec.colorscale),
        title_text=title or f"{spec.label} · {first.model_name}",
    )
    # A row is drawn blank in a panel whose lens skips it; the label says so only
    # when every lens skips it.
    covered = [any(bool(t.covered[r]) for t in trajs) for r in range(first.n_layers)]
    grid_axes(
        fig,
        first.layer_labels,
        covered,
        first.tokens,
        rows,
        cols,
        size,
        [(label, t.covered.tolist()) for label, t in zip(labels, trajs, strict=True)],
    )
    fig.update_xaxes(matches="x")
    return fig
