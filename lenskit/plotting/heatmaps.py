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

from lenskit.errors import LenskitError
from lenskit.plotting.grid import (
    NA,
    Statistic,
    click_layer,
    color_axis,
    field,
    fmt_bits,
    fmt_prob,
    grid_axes,
    heatmap_trace,
    mark_cell,
)
from lenskit.plotting.style import (
    FIGURE_WIDTH,
    coverage_note,
    display_token,
    grid_size,
    select_positions,
    select_rows,
)
from lenskit.trajectory import Trajectory

__all__ = ["MAX_PANELS", "STATISTICS", "compare_heatmaps", "trajectory_heatmap"]

MAX_PANELS = 4  # lenses compare_heatmaps stacks


STATISTICS: dict[str, Statistic] = {
    "top1_prob": Statistic("top-1 probability", "Blues", (0.0, 1.0)),
    "entropy": Statistic("entropy (bits)", "Blues_r"),
    "kl_to_final": Statistic("KL to the model's output (bits)", "Blues_r"),
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
    panel: int = 0,
) -> go.Heatmap:
    values = _statistic(traj, statistic)[np.ix_(rows, cols)]
    k = min(hover_k, traj.top_probs.shape[-1])
    covered = traj.covered.tolist()
    chars = int(size["text_chars"])
    text = [
        [display_token(traj.top_tokens[r][p][0], chars) if covered[r] else "" for p in cols]
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
        panel=panel,
    )


def _note(traj: Trajectory, rows: list[int]) -> str:
    covered = [bool(traj.covered[r]) for r in rows]
    return coverage_note([traj.layer_labels[r] for r in rows], covered)


def _panel_title(name: str, traj: Trajectory, rows: list[int]) -> str:
    """``<b>tuned</b> lens`` and, when it skips shown rows, which rows it reads."""
    note = _note(traj, rows)
    grey = f" <span style='color:#555555'>· {note} (grey: not read)</span>" if note else ""
    return f"<b>{name}</b> lens{grey}"


def trajectory_heatmap(
    traj: Trajectory,
    *,
    statistic: str = "top1_prob",
    layer_stride: int = 1,
    token_range: tuple[int, int] | slice | None = None,
    hover_k: int = 5,
    title: str | None = None,
    width: int = FIGURE_WIDTH,
) -> go.Figure:
    """Heatmap of one trajectory: layers (``output`` at the top) by input positions.

    Each cell shows its top-1 token, shortened to what fits at 11 px (no label once
    fewer than 3 characters fit), and is coloured by ``statistic``; hovering shows the
    top ``hover_k`` tokens with their probabilities and every statistic of the cell.
    Rows the lens does not cover are blank (grey) and the title names them once.

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
        width: Figure width in pixels; cells and labels are sized for it.

    Returns:
        The figure; ``fig.data[0]`` is the heatmap, its ``customdata`` the hover texts.

    Raises:
        LenskitError: For an unknown statistic, a target statistic without a
            target, or a bad stride or range.
    """
    _check_hover_k(hover_k)
    values = _statistic(traj, statistic)
    spec = STATISTICS[statistic]
    rows = select_rows(traj.layer_labels, layer_stride)
    cols = select_positions(len(traj.tokens), token_range)
    traj.cells.check_shown(rows, cols, "trajectory")
    size = grid_size(len(rows), len(cols), width=width)
    fig = go.Figure()  # add_trace validates the big arrays once; Figure(trace) copies them
    fig.add_trace(_trajectory_trace(traj, statistic, rows, cols, hover_k, size))
    note = _note(traj, rows)
    fig.update_layout(
        coloraxis=color_axis(spec, [values[np.ix_(rows, cols)]], spec.colorscale),
        title_text=title
        or f"{spec.label} · {traj.lens_kind} lens · {traj.model_name}"
        + (f"<br><sup>{note} (grey rows: not read)</sup>" if note else ""),
    )
    grid_axes(fig, traj.layer_labels, traj.tokens, rows, cols, size, [""])
    fig.layout.yaxis.title.text = "layer"
    return fig


def _check_same(trajs: list[Trajectory], labels: Sequence[str] | None) -> list[str]:
    """The panel labels; refuses trajectories of different models, prompts or rows."""
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
    return labels


def compare_heatmaps(
    trajs: Sequence[Trajectory],
    *,
    statistic: str = "top1_prob",
    layer_stride: int = 1,
    token_range: tuple[int, int] | slice | None = None,
    hover_k: int = 3,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    width: int = FIGURE_WIDTH,
    selected: tuple[int, int] | None = None,
    clickable: bool = False,
) -> go.Figure:
    """Two to four trajectories of the same prompt, stacked at full width, one colour scale.

    One panel per lens, top to bottom, each with the same rows and positions: the cells
    stay as wide as one trajectory's heatmap would be, so each lens's top-1 tokens stay
    legible (32 positions in 1400 px: 5 characters a cell). All panels share the x axis:
    hovering a cell shows that cell in every panel. A lens's rows it does not read are
    blank (grey), named once in its panel's title.

    Args:
        trajs: 2 to 4 trajectories of the same model and prompt (different lenses).
        statistic: As in :func:`trajectory_heatmap`.
        layer_stride: Show every n-th row (the output row is always shown).
        token_range: Positions to show: ``(start, stop)`` (half-open) or a slice.
        hover_k: Top tokens listed on hover, per lens.
        labels: Panel titles (default: the lens kinds).
        title: Figure title.
        width: Figure width in pixels; cells and labels are sized for it.
        selected: ``(position, shown row index)`` of a cell to outline in every panel.
        clickable: Add invisible markers on the cells so that a click on a cell selects
            it (``x`` = position, ``y`` = shown row index) in hosts such as Streamlit.

    Returns:
        The figure: the heatmaps in ``fig.data`` first (one per panel), then any
        click markers.

    Raises:
        LenskitError: If the trajectories are not 2 to 4 of the same model and tokens.
    """
    trajs = list(trajs)
    labels = _check_same(trajs, labels)
    _check_hover_k(hover_k)
    first = trajs[0]
    values = [_statistic(t, statistic) for t in trajs]
    spec = STATISTICS[statistic]
    rows = select_rows(first.layer_labels, layer_stride)
    cols = select_positions(len(first.tokens), token_range)
    for traj in trajs:
        traj.cells.check_shown(rows, cols, f"{traj.lens_kind} trajectory")
    size = grid_size(len(rows), len(cols), panels=len(trajs), width=width)
    fig = go.Figure()
    for i, traj in enumerate(trajs):
        fig.add_trace(_trajectory_trace(traj, statistic, rows, cols, hover_k, size, panel=i))
    if clickable:
        for i, label in enumerate(labels):
            fig.add_trace(click_layer(len(rows), cols, i, label))
        fig.update_layout(clickmode="event+select", dragmode=False)
    fig.update_layout(
        coloraxis=color_axis(spec, [v[np.ix_(rows, cols)] for v in values], spec.colorscale),
        title_text=title or f"{spec.label} · {first.model_name}",
    )
    titles = [_panel_title(label, t, rows) for label, t in zip(labels, trajs, strict=True)]
    grid_axes(fig, first.layer_labels, first.tokens, rows, cols, size, titles)
    if selected is not None:
        mark_cell(fig, selected[0], selected[1], len(trajs))
    return fig
