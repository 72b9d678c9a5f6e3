from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

import lenskit
from lenskit import plotting
from lenskit.comparison import lens_divergence
from lenskit.errors import LenskitError
from lenskit.export import load_table, save_figure, save_table
from lenskit.lenses.base import Lens
from lenskit.models import ModelAdapter
from lenskit.plotting import display_token
from lenskit.plotting.style import grid_size
from lenskit.trajectory import Trajectory

PROMPT = "The cat sat\non the\tmat."
OTHER = "Another prompt here."
SKIPPED = 2
CHROMIUM = Path("/usr/bin/chromium")


class RotatedLens(Lens):
    """A test lens: a fixed random rotation before the readout; skips one row."""

    kind = "rotated"

    def __init__(self, adapter: ModelAdapter) -> None:
        super().__init__(adapter)
        gen = torch.Generator().manual_seed(1)
        q, _ = torch.linalg.qr(torch.randn(adapter.d_model, adapter.d_model, generator=gen))
        self.register_buffer("rotation", q)

    @classmethod
    def from_model(cls, model: Any, **options: Any) -> RotatedLens:
        return cls(ModelAdapter(model))

    def covers(self, layer: int) -> bool:
        return layer != SKIPPED and super().covers(layer)

    def transform_hidden(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return h @ self.rotation


@pytest.fixture(scope="module")
def model() -> Any:
    return lenskit.load_model("tiny-llama")


@pytest.fixture(scope="module")
def lenses(model: Any) -> tuple[Lens, Lens]:
    return lenskit.get_lens("logit", model), RotatedLens.from_model(model).eval()


@pytest.fixture(scope="module")
def traj(model: Any, lenses: tuple[Lens, Lens]) -> Trajectory:
    return lenskit.trajectory(model, lenses[0], PROMPT, target=" ")


@pytest.fixture(scope="module")
def rotated(model: Any, lenses: tuple[Lens, Lens]) -> Trajectory:
    return lenskit.trajectory(model, lenses[1], PROMPT, target=" ")


def hover_text(trace: Any, row: int, col: int) -> str:
    """The hover text Plotly shows for one cell: the template filled from customdata."""
    fields = trace.customdata[row][col]
    text = re.sub(
        r"%\{customdata\[(\d+)\]\}", lambda m: str(fields[int(m.group(1))]), trace.hovertemplate
    )
    assert "%{" not in text, text
    return text


def expected(traj: Trajectory, statistic: str) -> np.ndarray:
    """Independent statistic arrays, NaN where no value."""
    if statistic == "top1_prob":
        return traj.top_probs[:, :, 0].double().numpy()
    if statistic == "target_rank":
        return np.log10(traj.target_rank.double().numpy() + 1)
    return getattr(traj, statistic).double().numpy()


def z_array(trace: Any) -> np.ndarray:
    return np.array([[math.nan if v is None else v for v in row] for row in trace.z], float)


def test_traces_hold_numpy_arrays(traj: Trajectory):
    """Arrays, not nested lists: fast to validate and written as compact binary in JSON."""
    trace = plotting.trajectory_heatmap(traj).data[0]
    for name in ("x", "y", "z", "text", "customdata"):
        assert isinstance(getattr(trace, name), np.ndarray), name
    assert trace.customdata.shape[:2] == trace.z.shape == (traj.n_layers, len(traj.tokens))


# --- token display --------------------------------------------------------------------------


def test_display_token_makes_whitespace_visible_and_shortens():
    assert display_token(" the") == "·the"
    assert display_token("\n\n") == "↵↵"
    assert display_token("\tx ") == "→x·"
    assert display_token("") == "∅"
    assert display_token("\x1f") == "\\x1f"
    assert display_token(None) == "–"
    assert display_token("abcdefghij", max_chars=5) == "abcd…"
    assert display_token("<|endoftext|>") == "&lt;|endoftext|&gt;"
    assert display_token("<b>", escape=False) == "<b>"


# --- trajectory heatmap ---------------------------------------------------------------------


def test_heatmap_axes_are_tokens_and_layers(traj: Trajectory):
    fig = plotting.trajectory_heatmap(traj)
    assert isinstance(fig, go.Figure) and len(fig.data) == 1
    assert list(fig.layout.xaxis.tickvals) == list(range(len(traj.tokens)))
    ticks = list(fig.layout.xaxis.ticktext)
    chars = grid_size(fig.data[0].z.shape[0], len(traj.tokens))["tick_chars"]
    assert ticks == [display_token(t, chars) for t in traj.tokens]  # shortened to fit 11 px
    assert ticks[4] == "·" and ticks[12] == "↵" and ticks[19] == "→"  # " ", "\n", "\t"
    # L0 at the bottom (y = 0), the output row on top
    assert list(fig.layout.yaxis.ticktext) == ["L0", "L1", "L2", "L3", "output"]
    assert list(fig.layout.yaxis.tickvals) == [0, 1, 2, 3, 4]
    assert fig.layout.yaxis.autorange != "reversed"
    assert list(fig.data[0].x) == list(range(len(traj.tokens)))
    assert list(fig.data[0].y) == [0, 1, 2, 3, 4]


def test_cells_show_top1_tokens(traj: Trajectory):
    trace = plotting.trajectory_heatmap(traj).data[0]
    assert trace.texttemplate == "%{text}"
    for r in range(traj.n_layers):
        assert list(trace.text[r]) == [display_token(c[0], 7) for c in traj.top_tokens[r]]


@pytest.mark.parametrize("statistic", list(plotting.STATISTICS))
def test_colour_values_are_the_statistic(traj: Trajectory, statistic: str):
    fig = plotting.trajectory_heatmap(traj, statistic=statistic)
    want = expected(traj, statistic)
    got = z_array(fig.data[0])
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=1e-6)
    axis = fig.layout.coloraxis
    assert fig.data[0].coloraxis == "coloraxis"
    if statistic.endswith("prob"):
        assert (axis.cmin, axis.cmax) == (0, 1) and axis.colorscale[0][1] != axis.colorscale[-1][1]
    else:
        assert axis.cmin == 0 and axis.cmax == pytest.approx(np.nanmax(want))
    if statistic == "target_rank":
        assert list(axis.colorbar.ticktext)[:3] == ["1", "10", "100"]


def test_bits_scales_are_reversed_so_dark_is_good(traj: Trajectory):
    prob = plotting.trajectory_heatmap(traj, statistic="top1_prob").layout.coloraxis
    kl = plotting.trajectory_heatmap(traj, statistic="kl_to_final").layout.coloraxis
    # the best value (prob 1 / KL 0) gets the same colour
    assert prob.colorscale[-1][1] == kl.colorscale[0][1]


def test_cross_entropy_last_position_is_blank(traj: Trajectory):
    trace = plotting.trajectory_heatmap(traj, statistic="cross_entropy").data[0]
    z = np.asarray(trace.z)
    assert np.isnan(z[:, -1]).all() and np.isfinite(z[:, :-1]).all()


def test_hover_lists_top_k_tokens_with_probabilities(traj: Trajectory):
    trace = plotting.trajectory_heatmap(traj, hover_k=3).data[0]
    row, pos = 1, 5
    text = hover_text(trace, row, pos)
    assert "<b>L1</b> · pos 5: c → a" in text
    assert "top-3 (logit lens):" in text
    listed = text.split("top-3 (logit lens):<br>")[1].replace("<extra></extra>", "").split("<br>")
    assert len(listed) == 3
    for line, tok, prob in zip(
        listed, traj.top_tokens[row][pos], traj.top_probs[row, pos], strict=False
    ):
        value, shown = line.split(" ", 1)
        assert shown == display_token(tok)
        assert abs(float(value) - float(prob)) <= 5e-4 + 0.05 * float(prob)
    assert f"entropy {float(traj.entropy[row, pos]):.2f} bits" in text
    assert f"KL to output {float(traj.kl_to_final[row, pos]):.2f} bits" in text
    assert f"rank {int(traj.target_rank[row, pos]) + 1}" in text
    assert "target ·" in text
    # a larger hover_k than the trajectory holds is clipped, 0 drops the list
    many = plotting.trajectory_heatmap(traj, hover_k=50).data[0]
    assert "top-10 (logit" in hover_text(many, 0, 0)
    assert "lens):" not in hover_text(plotting.trajectory_heatmap(traj, hover_k=0).data[0], 0, 0)


def test_stride_and_range_select_rows_and_columns(traj: Trajectory):
    fig = plotting.trajectory_heatmap(traj, statistic="entropy", layer_stride=3, token_range=(3, 9))
    trace = fig.data[0]
    rows, cols = [0, 3, 4], list(range(3, 9))  # the output row is always kept
    assert list(fig.layout.yaxis.ticktext) == ["L0", "L3", "output"]
    assert list(trace.x) == cols
    assert list(fig.layout.xaxis.ticktext) == [display_token(t) for t in traj.tokens[3:9]]
    np.testing.assert_allclose(z_array(trace), traj.entropy.double().numpy()[np.ix_(rows, cols)])
    assert trace.text[1][0] == display_token(traj.top_tokens[3][3][0], 7)
    assert "<b>L3</b> · pos 3" in hover_text(trace, 1, 0)
    sliced = plotting.trajectory_heatmap(traj, token_range=slice(-4, None)).data[0]
    assert list(sliced.x) == list(range(len(traj.tokens) - 4, len(traj.tokens)))
    assert len(plotting.trajectory_heatmap(traj, layer_stride=2).data[0].z) == 3  # L0 L2 output


def test_uncovered_rows_are_blank_and_labelled(rotated: Trajectory):
    fig = plotting.trajectory_heatmap(rotated, statistic="top1_prob")
    trace = fig.data[0]
    z = np.asarray(trace.z)
    assert np.isnan(z[SKIPPED]).all()  # drawn blank, never as a number
    assert np.isfinite(z[[0, 1, 3, 4]]).all()
    assert list(trace.text[SKIPPED]) == [""] * len(rotated.tokens)
    assert fig.layout.yaxis.ticktext[SKIPPED] == "L2"
    hover = hover_text(trace, SKIPPED, 4)
    assert "L2 (not covered)" in hover and not re.search(r"prob \d", hover)
    assert "not read: L2" in fig.layout.title.text  # said once, in the title
    assert not [a for a in fig.layout.annotations if "not" in a.text]
    assert fig.layout.plot_bgcolor  # the blank cells show the grey background


def test_bad_arguments_raise_one_line_errors(traj: Trajectory, model: Any, lenses):
    plain = lenskit.trajectory(model, lenses[0], "ab")
    cases = [
        (lambda: plotting.trajectory_heatmap(plain, statistic="target_prob"), "needs a target"),
        (lambda: plotting.trajectory_heatmap(traj, statistic="loss"), "unknown statistic"),
        (lambda: plotting.trajectory_heatmap(traj, layer_stride=0), "layer_stride"),
        (lambda: plotting.trajectory_heatmap(traj, token_range=(9, 3)), "selects no positions"),
        (lambda: plotting.trajectory_heatmap(traj, hover_k=-1), "hover_k"),
    ]
    for call, message in cases:
        with pytest.raises(LenskitError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


def test_large_grid_stays_small_and_readable(traj: Trajectory):
    """A 31-row x 512-token trajectory (synthetic, tiled) stays a few MB with thinned ticks."""
    n_layer, n_pos, k = 31, 512, 10
    reps = -(-n_pos // len(traj.tokens))
    tile = lambda t: t.repeat(7, reps, *([1] * (t.ndim - 2)))[:n_layer, :n_pos]  # noqa: E731
    cells = tuple(
        tuple((traj.top_tokens[r % 5][p % len(traj.tokens)]) for p in range(n_pos))
        for r in range(n_layer)
    )
    big = Trajectory(
        model_name="m",
        lens_kind="logit",
        prompt="p",
        token_ids=traj.token_ids.repeat(reps)[:n_pos],
        tokens=(traj.tokens * reps)[:n_pos],
        layer_labels=(*(f"L{i}" for i in range(30)), "output"),
        covered=torch.ones(n_layer, dtype=torch.bool),
        top_ids=tile(traj.top_ids),
        top_probs=tile(traj.top_probs),
        top_tokens=cells,
        entropy=tile(traj.entropy),
        kl_to_final=tile(traj.kl_to_final),
        cross_entropy=tile(traj.cross_entropy),
    )
    assert big.top_probs.shape == (n_layer, n_pos, k)
    fig = plotting.trajectory_heatmap(big)
    assert len(fig.to_json()) < 4_000_000
    assert fig.layout.width <= 2000 and fig.layout.height <= 1200
    assert len(fig.layout.xaxis.tickvals) < n_pos and fig.data[0].texttemplate is None
    assert len(fig.data[0].customdata[0][0]) == 7 + 2 * 5  # only the hover top-5 travel


# --- comparisons ----------------------------------------------------------------------------


def test_compare_stacks_panels_on_one_x_axis_and_one_colour_axis(traj, rotated):
    fig = plotting.compare_heatmaps([traj, rotated], statistic="kl_to_final")
    assert len(fig.data) == 2
    assert {t.coloraxis for t in fig.data} == {"coloraxis"}
    top = max(np.nanmax(expected(t, "kl_to_final")) for t in (traj, rotated))
    assert fig.layout.coloraxis.cmax == pytest.approx(top)
    # Stacked at full width: one x axis, a y axis each, the first lens on top.
    assert [(t.xaxis, t.yaxis) for t in fig.data] == [("x", "y"), ("x", "y2")]
    assert fig.layout.yaxis.domain[0] > fig.layout.yaxis2.domain[1]
    assert fig.layout.hovermode == "x" and fig.layout.hoversubplots == "axis"
    titles = [a.text for a in fig.layout.annotations if a.xref == "paper"]
    assert titles[0] == "<b>logit</b> lens" and titles[1].startswith("<b>rotated</b> lens")
    assert "not read: L2" in titles[1]  # the uncovered row, named once
    assert np.array_equal(fig.data[0].x, fig.data[1].x)
    assert np.array_equal(fig.data[0].y, fig.data[1].y)
    np.testing.assert_allclose(z_array(fig.data[1]), expected(rotated, "kl_to_final"))
    assert np.isnan(fig.data[1].z[SKIPPED]).all() and not np.isnan(fig.data[0].z).any()
    assert "rotated lens" in hover_text(fig.data[1], 0, 0)
    # The panel above the last gets the input tokens under it (the last: the axis ticks).
    under = [a for a in fig.layout.annotations if a.xref == "x"]
    assert [a.text for a in under] == list(fig.layout.xaxis.ticktext)


def test_compare_cells_are_clickable_and_the_chosen_one_outlined(traj, rotated):
    fig = plotting.compare_heatmaps([traj, rotated], clickable=True, selected=(5, 2))
    markers = [t for t in fig.data if t.type == "scatter"]
    assert [t.yaxis for t in markers] == ["y", "y2"] and markers[0].marker.opacity == 0
    assert len(markers[0].x) == traj.n_layers * len(traj.tokens)
    assert fig.layout.clickmode == "event+select"
    outlines = [(s.x0, s.x1, s.y0, s.yref) for s in fig.layout.shapes]
    assert outlines == [(4.5, 5.5, 1.5, "y"), (4.5, 5.5, 1.5, "y2")]


@pytest.mark.parametrize("n_tokens", [11, 32])
def test_compare_labels_stay_legible_with_four_lenses(traj, n_tokens):
    """Four lenses of 32 tokens: every cell keeps an 11 px label of at least 4 characters."""
    fig = plotting.compare_heatmaps([traj] * 4, token_range=(0, min(n_tokens, len(traj.tokens))))
    size = grid_size(traj.n_layers, n_tokens, panels=4)
    assert size["show_text"] and size["text_chars"] >= 4 and size["tick_step"] == 1
    for trace in fig.data:
        assert trace.texttemplate == "%{text}" and trace.textfont.size >= 11
        assert (
            max(len(t.replace("&lt;", "<").replace("&gt;", ">")) for t in trace.text.ravel())
            <= size["text_chars"]
        )
    assert fig.layout.xaxis.tickfont.size >= 11 and fig.layout.yaxis4.tickfont.size >= 11


def test_compare_refuses_mismatched_trajectories(model: Any, lenses, traj: Trajectory):
    other = lenskit.trajectory(model, lenses[0], OTHER)
    with pytest.raises(LenskitError, match="same prompt"):
        plotting.compare_heatmaps([traj, other])
    with pytest.raises(LenskitError, match="2 to 4"):
        plotting.compare_heatmaps([traj])
    with pytest.raises(LenskitError, match="2 to 4"):
        plotting.compare_heatmaps([traj] * 5)


def test_divergence_heatmap(model: Any, lenses):
    div = lens_divergence(model, lenses[0], lenses[1], PROMPT)
    for measure in ("kl", "js", "tv"):
        fig = plotting.divergence_heatmap(div, measure=measure, token_range=(2, 10))
        want = getattr(div, measure).double().numpy()[:, 2:10]
        got = z_array(fig.data[0])
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got[1], want[1])
        assert "not read: L2" in fig.layout.title.text
    assert (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax) == (0, 1)
    text = hover_text(fig.data[0], 3, 0)
    assert f"top-1 logit: {display_token(div.top1_a[3][2])}" in text
    with pytest.raises(LenskitError, match="unknown divergence measure"):
        plotting.divergence_heatmap(div, measure="l2")


# --- line plots -----------------------------------------------------------------------------


def metric_frame(**extra: Any) -> pd.DataFrame:
    rows = []
    for lens, scale in (("logit", 1.0), ("tuned", 0.5)):
        for layer in range(5):
            rows.append(
                {
                    "lens": lens,
                    "layer": layer,
                    "kl_bits": scale * (5 - layer),
                    "kl_bits_se": 0.1 * (layer + 1),
                    "layer_label": "output" if layer == 4 else f"L{layer}",
                }
            )
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # order must not matter


def test_metric_lines_lines_and_bands():
    fig = plotting.metric_lines(metric_frame(), metric="kl_bits")
    lines = [t for t in fig.data if t.fill is None]
    bands = [t for t in fig.data if t.fill == "toself"]
    assert {t.name for t in lines} == {"logit", "tuned"} and len(bands) == 2
    logit = next(t for t in lines if t.name == "logit")
    assert list(logit.x) == [0, 1, 2, 3, 4] and list(logit.y) == [5, 4, 3, 2, 1]
    band = next(t for t in bands if t.legendgroup == "logit")
    upper = [5 - i + 1.96 * 0.1 * (i + 1) for i in range(5)]
    lower = [5 - i - 1.96 * 0.1 * (i + 1) for i in range(5)]
    np.testing.assert_allclose(band.y[:5], upper)
    np.testing.assert_allclose(band.y[5:], lower[::-1])
    assert band.line.width == 0 and band.showlegend is False
    assert list(fig.layout.xaxis.ticktext) == ["L0", "L1", "L2", "L3", "output"]
    assert fig.layout.yaxis.title.text == "KL to the model's output (bits)"  # a human name


def test_metric_lines_mark_uncovered_layers_as_gaps():
    frame = metric_frame()
    frame["covered"] = ~((frame.lens == "tuned") & frame.layer.isin([0, 2]))
    frame.loc[~frame.covered, "kl_bits"] = 99.0  # a value that must never be drawn
    fig = plotting.metric_lines(frame, metric="kl_bits")
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    tuned = next(t for t in lines if t.legendgroup == "tuned")
    assert list(tuned.y) == [None, 2.0, None, 1.0, 0.5] and tuned.connectgaps is False
    assert tuned.name == "tuned (not read: L0, L2)"  # named once, in the legend
    band = next(t for t in fig.data if t.fill == "toself" and t.legendgroup == "tuned")
    assert list(band.x) == [1, 1, None, 3, 4, 4, 3]  # one outline per covered run
    joined = [t for t in fig.data if t.mode == "lines" and t.fill is None]
    assert [(list(t.x), t.line.dash) for t in joined] == [([1, 3, 4], "dot")]
    logit = next(t for t in lines if t.legendgroup == "logit")
    assert None not in list(logit.y) and logit.name == "logit"
    assert not fig.layout.annotations and not fig.layout.shapes  # no label per layer


def test_metric_lines_clip_a_far_off_first_layer_and_label_log_ticks_in_full():
    frame = metric_frame()
    frame.loc[(frame.lens == "logit") & (frame.layer == 0), "kl_bits"] = 156.0
    fig = plotting.metric_lines(frame)
    assert fig.layout.yaxis.range[1] == pytest.approx(4 * 1.15)  # the next largest: 4 bits
    (note,) = fig.layout.annotations
    assert "logit" in note.text and "156" in note.text and "L0" in note.text
    assert not plotting.metric_lines(frame, clip_first=False).layout.yaxis.range
    log = plotting.metric_lines(metric_frame(), log_y=True)
    ticks = dict(zip(log.layout.yaxis.tickvals, log.layout.yaxis.ticktext, strict=True))
    assert ticks[0.5] == "0.5" and ticks[2] == "2" and ticks[5] == "5"
    assert plotting.metric_name("top1_agree") == "top-1 agreement with the model"
    assert plotting.metric_name("js_bits") == "JS (bits)"


def test_training_lines_contrast_and_name_the_lenses():
    frame = pd.DataFrame(
        {"layer": range(4), "logit_kl_bits": [150.0, 3, 2, 1], "tuned_kl_bits": [2.0, 1, 0.5, 0.2]}
    )
    fig = plotting.training_lines(frame)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert [t.name for t in lines] == ["tuned lens", "logit lens"]
    assert len({t.line.color for t in lines}) == 2
    assert list(lines[1].y) == [150.0, 3, 2, 1]
    assert fig.layout.yaxis.range[1] == pytest.approx(3 * 1.15)  # L0's 150 bits written
    assert "150" in fig.layout.annotations[0].text


def test_position_topk_shows_each_lens_top_k_at_every_layer(traj, rotated):
    fig = plotting.position_topk([traj, rotated], 3, k=4)
    assert [t.name for t in fig.data] == ["logit", "rotated"]
    assert [t.xaxis for t in fig.data] == ["x", "x2"] and {t.yaxis for t in fig.data} == {"y"}
    z = z_array(fig.data[0])
    np.testing.assert_allclose(z, traj.top_probs[:, 3, :4].double().numpy())
    assert fig.data[0].text[1][0].startswith(display_token(traj.top_tokens[1][3][0], 40)[:3])
    assert np.isnan(z_array(fig.data[1])[SKIPPED]).all()  # the rotated lens skips L2
    assert list(fig.layout.yaxis.ticktext) == list(traj.layer_labels)
    target = display_token(traj.target)
    assert "position 3" in fig.layout.title.text and target in fig.layout.title.text
    shown = [t.split("<br>")[-1] for t in fig.data[0].text.ravel() if t]
    assert shown and all(len(p) <= 5 for p in shown)  # 0.435, 8e-24: fits a narrow cell
    assert all("<br>" in a.text for a in fig.layout.annotations)  # titles on one baseline
    bold = [t for t in fig.data[0].text.ravel() if t.startswith("<b>")]
    hits = int((traj.top_ids[:, 3, :4] == traj.target_id).sum())
    assert len(bold) == hits
    with pytest.raises(LenskitError, match="outside the prompt"):
        plotting.position_topk(traj, 999)
    with pytest.raises(LenskitError, match="k must be"):
        plotting.position_topk(traj, 0, k=0)


def test_table_bytes_carry_provenance(traj):
    import io

    from lenskit.export import table_bytes

    data, sidecar = table_bytes(traj, "csv")
    meta = json.loads(sidecar)["lenskit"]
    assert (meta["model"], meta["lens"], meta["prompt"]) == (traj.model_name, "logit", traj.prompt)
    assert len(pd.read_csv(io.BytesIO(data))) == traj.n_layers * len(traj.tokens)
    parquet, none = table_bytes(traj, "parquet", metadata={"position": 3})
    import pyarrow.parquet as pq

    stored = json.loads(pq.read_table(io.BytesIO(parquet)).schema.metadata[b"lenskit"])
    assert none is None and stored["position"] == 3 and stored["model"] == traj.model_name


def test_compare_marks_the_jacobian_lens_row_it_does_not_cover(model: Any, lenses, traj):
    from lenskit.lenses.jacobian import JLens

    jlens = lenskit.trajectory(model, JLens.identity(model), PROMPT, target=" ")
    fig = plotting.compare_heatmaps([traj, jlens], statistic="kl_to_final")
    logit_z, jlens_z = z_array(fig.data[0]), z_array(fig.data[1])
    assert np.isnan(jlens_z[0]).all() and not np.isnan(logit_z[0]).any()
    np.testing.assert_allclose(jlens_z[1:], logit_z[1:], atol=1e-5)  # J = I: the logit lens
    titles = [a.text for a in fig.layout.annotations if a.xref == "paper"]
    assert "not read" not in titles[0] and "not read: L0" in titles[1]
    assert fig.layout.yaxis2.ticktext[0] == "L0"


def test_metric_lines_explicit_bounds_and_errors():
    frame = metric_frame().drop(columns="kl_bits_se")
    frame["kl_bits_lo"], frame["kl_bits_hi"] = frame.kl_bits - 1, frame.kl_bits + 2
    fig = plotting.metric_lines(frame)
    band = next(t for t in fig.data if t.fill == "toself" and t.legendgroup == "tuned")
    np.testing.assert_allclose(band.y[:5], [2.5 - 0.5 * i + 2 for i in range(5)])
    assert len(plotting.metric_lines(frame.drop(columns=["kl_bits_lo"])).data) == 2  # no bands
    with pytest.raises(LenskitError, match="lacks column"):
        plotting.metric_lines(frame, metric="js_bits")
    with pytest.raises(LenskitError, match="several rows"):
        plotting.metric_lines(pd.concat([frame, frame]))


def test_target_plot_per_position_and_per_lens(traj: Trajectory, rotated: Trajectory):
    fig = plotting.target_plot(traj, positions=[1, -1])
    assert len(fig.data) == 2
    for trace, pos in zip(fig.data, [1, len(traj.tokens) - 1], strict=True):
        np.testing.assert_allclose(trace.y, traj.target_prob[:, pos].double().numpy())
        assert f"pos {pos}" in trace.name
    assert list(fig.layout.xaxis.ticktext) == list(traj.layer_labels)
    ranks = plotting.target_plot([traj, rotated], value="rank")
    lines = [t for t in ranks.data if t.mode == "lines+markers"]
    label = traj.layer_labels[SKIPPED]
    assert [t.name for t in lines] == ["logit", f"rotated (not read: {label})"]
    assert lines[1].marker.size > lines[0].marker.size  # lone points stay visible
    assert list(lines[0].y) == (traj.target_rank[:, -1] + 1).tolist()
    assert lines[1].y[SKIPPED] is None and lines[1].y[0] is not None
    joined = [t for t in ranks.data if t.mode == "lines"]  # a dotted guide across the gap
    assert len(joined) == 1 and joined[0].line.dash == "dot" and SKIPPED not in joined[0].x
    assert ranks.layout.yaxis.type == "log" and 1 in ranks.layout.yaxis.tickvals


def test_target_plot_errors(model: Any, lenses, traj: Trajectory):
    plain = lenskit.trajectory(model, lenses[0], PROMPT)
    with pytest.raises(LenskitError, match="no target"):
        plotting.target_plot(plain)
    with pytest.raises(LenskitError, match="outside the prompt"):
        plotting.target_plot(traj, positions=[99])
    with pytest.raises(LenskitError, match="'prob' or 'rank'"):
        plotting.target_plot(traj, value="logit")


# --- export ---------------------------------------------------------------------------------


def test_save_figure_html_is_self_contained(tmp_path: Path, traj: Trajectory):
    path = save_figure(plotting.trajectory_heatmap(traj), tmp_path / "fig.html")
    page = path.read_text()
    head, inline = page[:100], '<script src="https://cdn.plot.ly' not in page
    assert "<html>" in head and "Plotly.newPlot" in page[-50_000:]
    assert inline and len(page) > 1_000_000  # plotly.js is in the file: works offline
    with pytest.raises(LenskitError, match="ending in"):
        save_figure(go.Figure(), tmp_path / "fig.gif")
    assert not (tmp_path / "fig.gif").exists()


def test_save_figure_without_a_browser_says_so(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chrome"))
    with pytest.raises(LenskitError, match=r"BROWSER_PATH.*save as \.html"):
        save_figure(go.Figure(), tmp_path / "fig.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium at /usr/bin/chromium")
def test_save_figure_png_via_kaleido(tmp_path: Path, traj: Trajectory):
    fig = plotting.trajectory_heatmap(traj, token_range=(0, 8))
    path = save_figure(fig, tmp_path / "heat.png", scale=1)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (fig.layout.width, fig.layout.height)
    assert [p.name for p in tmp_path.iterdir()] == ["heat.png"]  # no temporary left behind


def test_save_table_csv_and_parquet_keep_metadata(tmp_path: Path, traj: Trajectory):
    csv = save_table(traj, tmp_path / "traj.csv", metadata={"note": "test"})
    sidecar = json.loads(Path(f"{csv}.json").read_text())
    assert sidecar["lenskit"]["model"] == "tiny-llama" and sidecar["lenskit"]["note"] == "test"
    back = load_table(csv)
    frame = traj.to_frame()
    assert back.attrs["prompt"] == PROMPT and back.attrs["lens"] == "logit"
    assert back.topk_tokens[7] == frame.topk_tokens[7]
    assert back.input_token.tolist() == frame.input_token.tolist()
    np.testing.assert_allclose(back.entropy_bits, frame.entropy_bits)
    pq = load_table(save_table(frame, tmp_path / "traj.parquet"))
    assert pq.attrs["model"] == "tiny-llama" and pq.attrs["target"] == " "
    assert list(pq.topk_tokens[7]) == frame.topk_tokens[7]
    with pytest.raises(LenskitError, match="lacks model, lens, prompt"):
        save_table(pd.DataFrame({"a": [1]}), tmp_path / "x.csv")
    with pytest.raises(LenskitError, match="ending in"):
        save_table(frame, tmp_path / "x.xlsx")
