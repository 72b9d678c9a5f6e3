from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch

import lenskit
import lenskit.plotting
from lenskit.comparison import LensDivergence, lens_divergence
from lenskit.errors import LenskitError
from lenskit.lenses.base import Lens
from lenskit.lenses.logit import LogitLens
from lenskit.models import ModelAdapter
from lenskit.residual import capture, tokenize

PROMPT = "The cat sat\non the mat."
SKIPPED = 2


class RotatedLens(Lens):
    """A test lens: a fixed random rotation before the readout; skips one row."""

    kind = "rotated"

    def __init__(self, adapter: ModelAdapter, *, skip: int | None = SKIPPED, seed: int = 0):
        super().__init__(adapter)
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(adapter.d_model, adapter.d_model, generator=gen))
        self.register_buffer("rotation", q)
        self.skip = skip

    @classmethod
    def from_model(cls, model: Any, **options: Any) -> RotatedLens:
        return cls(ModelAdapter(model), **options)

    def covers(self, layer: int) -> bool:
        return layer != self.skip and super().covers(layer)

    def transform_hidden(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return h @ self.rotation


@pytest.fixture(scope="module")
def model() -> Any:
    return lenskit.load_model("tiny-llama")


@pytest.fixture(scope="module")
def logit(model: Any) -> Lens:
    return lenskit.get_lens("logit", model)


@pytest.fixture(scope="module")
def rotated(model: Any) -> Lens:
    return RotatedLens.from_model(model).eval()


@pytest.fixture(scope="module")
def div(model: Any, logit: Lens, rotated: Lens) -> LensDivergence:
    return lens_divergence(model, logit, rotated, PROMPT)


def _reference(model: Any, lens_a: Lens, lens_b: Lens) -> dict[str, np.ndarray]:
    """Plain float64 NumPy maths, one cell at a time, from the lenses' logits."""
    rows = capture(model, tokenize(model, PROMPT)).lens_rows()[:, 0]
    n_rows, n_pos = rows.shape[:2]
    out = {name: np.full((n_rows, n_pos), np.nan) for name in ("kl", "js", "tv", "a", "b")}
    for r in range(n_rows):
        if not (lens_a.covers(r) and lens_b.covers(r)):
            continue
        with torch.no_grad():
            za = lens_a(rows[r], r).double().numpy()
            zb = lens_b(rows[r], r).double().numpy()
        for p in range(n_pos):
            pa = np.exp(za[p] - za[p].max())
            pa /= pa.sum()
            pb = np.exp(zb[p] - zb[p].max())
            pb /= pb.sum()
            m = (pa + pb) / 2
            out["kl"][r, p] = np.sum(pa * np.log2(pa / pb))
            js = np.sum(pa * np.log2(pa / m)) + np.sum(pb * np.log2(pb / m))
            out["js"][r, p] = 0.5 * js
            out["tv"][r, p] = 0.5 * np.abs(pa - pb).sum()
            out["a"][r, p], out["b"][r, p] = za[p].argmax(), zb[p].argmax()
    return out


def test_matches_float64_reference(model: Any, logit: Lens, rotated: Lens, div: LensDivergence):
    ref = _reference(model, logit, rotated)
    covered = div.covered.numpy()
    assert covered.tolist() == [r != SKIPPED for r in range(div.n_layers)]
    for name in ("kl", "js", "tv"):
        got = getattr(div, name).double().numpy()
        assert np.isnan(got[~covered]).all()
        np.testing.assert_allclose(got[covered], ref[name][covered], rtol=1e-4, atol=1e-5)
    # the rotation makes the lenses disagree for real, so the comparison means something
    assert ref["js"][covered].mean() > 0.05
    decode = model.tokenizer.decode
    for r in np.flatnonzero(covered):
        assert div.top1_a[r] == tuple(decode([int(i)]) for i in ref["a"][r])
        assert div.top1_b[r] == tuple(decode([int(i)]) for i in ref["b"][r])
    assert div.top1_a[SKIPPED] == ("",) * len(div.tokens)


def test_bounds_and_kl_direction(model: Any, logit: Lens, rotated: Lens, div: LensDivergence):
    covered = div.covered
    assert (div.js[covered] <= 1.0 + 1e-6).all() and (div.js[covered] >= 0).all()
    assert (div.tv[covered] <= 1.0 + 1e-6).all() and (div.tv[covered] >= 0).all()
    backwards = lens_divergence(model, rotated, logit, PROMPT)
    torch.testing.assert_close(backwards.js, div.js, equal_nan=True, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(backwards.kl[covered], div.kl[covered], rtol=1e-3)
    assert (backwards.lens_a, backwards.lens_b) == ("rotated", "logit")


def test_same_lens_has_zero_divergence(model: Any, logit: Lens):
    same = lens_divergence(model, logit, logit, PROMPT)
    assert same.covered.all()
    for name in ("kl", "js", "tv"):
        assert getattr(same, name).abs().max() < 1e-4
    assert same.top1_a == same.top1_b


def test_rows_labels_tokens_and_frame(div: LensDivergence):
    assert div.layer_labels == ("L0", "L1", "L2", "L3", "output")
    assert div.tokens[0] == "<|endoftext|>" and "".join(div.tokens[1:]) == PROMPT
    assert div.token_ids.shape == (len(div.tokens),)
    frame = div.to_frame()
    n_rows, n_pos = div.kl.shape
    assert len(frame) == n_rows * n_pos
    cell = frame[(frame.layer == 3) & (frame.pos == 5)].iloc[0]
    assert cell.kl_bits == pytest.approx(float(div.kl[3, 5]))
    assert cell.js_bits == pytest.approx(float(div.js[3, 5]))
    assert cell.tv == pytest.approx(float(div.tv[3, 5]))
    assert cell.input_token == div.tokens[5] and cell.layer_label == "L3"
    assert cell.top1_a == div.top1_a[3][5]
    assert frame[frame.layer == SKIPPED].kl_bits.isna().all()
    assert not frame[frame.layer == SKIPPED].covered.any()
    assert frame.attrs["model"] == "tiny-llama" and frame.attrs["prompt"] == PROMPT
    assert frame.attrs["lens"] == "logit vs rotated"


def test_measure_lookup(div: LensDivergence):
    assert div.measure("tv") is div.tv
    with pytest.raises(LenskitError, match="unknown divergence measure 'hellinger'"):
        div.measure("hellinger")


def test_progress_reports_each_covered_row(model: Any, logit: Lens, rotated: Lens):
    calls: list[tuple[int, int]] = []
    lens_divergence(model, logit, rotated, "ab", progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_lens_of_another_model_is_refused(model: Any, logit: Lens):
    adapter = copy.copy(logit.adapter)
    adapter.model = object()
    stranger = LogitLens(adapter)
    with pytest.raises(LenskitError, match="built for another model"):
        lens_divergence(model, logit, stranger, PROMPT)


def test_bad_prompt_is_refused(model: Any, logit: Lens):
    with pytest.raises(LenskitError, match="empty"):
        lens_divergence(model, logit, logit, "   ")


def test_post_init_checks_shapes(div: LensDivergence):
    fields = {name: getattr(div, name) for name in div.__dataclass_fields__}
    fields["tv"] = div.tv[:, :-1]
    with pytest.raises((ValueError, TypeError), match="tv"):  # TypeError: jaxtyping's check
        LensDivergence(**fields)
    fields = {name: getattr(div, name) for name in div.__dataclass_fields__}
    fields["tokens"] = div.tokens[:-1]
    with pytest.raises(ValueError, match="tokens"):  # not a tensor shape: our own check
        LensDivergence(**fields)
    assert math.isnan(float(div.kl[SKIPPED, 0]))


def test_fused_divergences_equal_the_separate_definitions():
    import torch

    from lenskit.metrics import divergences, js_bits, kl_bits, total_variation

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 50, generator=gen) * 3, torch.randn(6, 50, generator=gen) * 3
    kl, js, tv = divergences(a, b)
    torch.testing.assert_close(kl, kl_bits(a, b))
    torch.testing.assert_close(js, js_bits(a, b))
    torch.testing.assert_close(tv, total_variation(a, b))
    ad, bd = a.double(), b.double()
    p, q = torch.softmax(ad, -1), torch.softmax(bd, -1)
    m = (p + q) / 2
    js_ref = 0.5 * ((p * (p / m).log2()).sum(-1) + (q * (q / m).log2()).sum(-1))
    assert (js.double() - js_ref).abs().max() < 1e-5


@pytest.mark.parametrize("pair", [(0, 1), (1, 2), None])
def test_compare_equals_separate_trajectories_and_divergence(
    model: Any, logit: Lens, rotated: Lens, pair
):
    other = RotatedLens.from_model(model, skip=None, seed=3).eval()
    lenses = [logit, rotated, other]
    result = lenskit.comparison.compare(model, lenses, PROMPT, pair=pair, target="t", top_k=3)
    for lens, got in zip(lenses, result.trajectories, strict=True):
        want = lenskit.trajectory(model, lens, PROMPT, target="t", top_k=3)
        assert got.lens_kind == want.lens_kind and got.top_tokens == want.top_tokens
        assert torch.equal(got.covered, want.covered)
        for name in ("entropy", "kl_to_final", "cross_entropy", "top_probs", "target_prob"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), equal_nan=True)
        assert torch.equal(got.target_rank, want.target_rank)
    if pair is None:
        assert result.divergence is None
        return
    want = lens_divergence(model, lenses[pair[0]], lenses[pair[1]], PROMPT)
    got = result.divergence
    assert torch.equal(got.covered, want.covered) and got.top1_a == want.top1_a
    for name in ("kl", "js", "tv"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), equal_nan=True)


def test_compare_refuses_a_bad_pair(model: Any, logit: Lens, rotated: Lens):
    with pytest.raises(LenskitError, match="pair"):
        lenskit.comparison.compare(model, [logit, rotated], PROMPT, pair=(0, 0))
    with pytest.raises(LenskitError, match="no lenses"):
        lenskit.comparison.compare(model, [], PROMPT)


# --- computing some cells only ------------------------------------------------------------

ROWS = [0, 2, 3, 4]  # row 2 is the rotated lens's uncovered row; 4 is the output row
POSITIONS = (3, 9)


def _held(n_rows: int, n_pos: int) -> torch.Tensor:
    mask = torch.zeros(n_rows, n_pos, dtype=torch.bool)
    mask[ROWS, POSITIONS[0] : POSITIONS[1]] = True
    return mask


def test_some_cells_equal_those_cells_of_the_full_trajectory(model: Any, rotated: Lens):
    full = lenskit.trajectory(model, rotated, PROMPT, target="t", top_k=3)
    some = lenskit.trajectory(
        model, rotated, PROMPT, target="t", top_k=3, rows=ROWS, positions=POSITIONS
    )
    assert full.n_layers == 5  # tiny-llama: 4 blocks and the output row
    held = _held(full.n_layers, len(full.tokens))
    assert some.cells.rows == tuple(ROWS) and (some.cells.start, some.cells.stop) == POSITIONS
    for name in ("entropy", "kl_to_final", "cross_entropy", "target_prob"):
        got, want = getattr(some, name), getattr(full, name)
        torch.testing.assert_close(got[held], want[held], equal_nan=True)
        assert got[~held].isnan().all()
    assert torch.equal(some.target_rank[held], full.target_rank[held])
    assert torch.equal(some.top_ids[held], full.top_ids[held])
    frame = some.to_frame()
    assert len(frame) == len(ROWS) * (POSITIONS[1] - POSITIONS[0])
    assert set(frame["layer"]) == set(ROWS) and set(frame["pos"]) == set(range(*POSITIONS))
    want_frame = (
        full.to_frame().set_index(["layer", "pos"]).loc[frame.set_index(["layer", "pos"]).index]
    )
    np.testing.assert_allclose(frame["entropy_bits"], want_frame["entropy_bits"], rtol=1e-5)


def test_compare_of_some_cells_equals_the_full_compare_there(
    model: Any, logit: Lens, rotated: Lens
):
    full = lenskit.comparison.compare(model, [logit, rotated], PROMPT, top_k=3)
    some = lenskit.comparison.compare(
        model, [logit, rotated], PROMPT, top_k=3, rows=ROWS, positions=POSITIONS
    )
    held = _held(full.trajectories[0].n_layers, len(full.trajectories[0].tokens))
    for got, want in zip(some.trajectories, full.trajectories, strict=True):
        torch.testing.assert_close(got.kl_to_final[held], want.kl_to_final[held], equal_nan=True)
        assert got.kl_to_final[~held].isnan().all()
    for name in ("kl", "js", "tv"):
        got, want = getattr(some.divergence, name), getattr(full.divergence, name)
        torch.testing.assert_close(got[held], want[held], equal_nan=True)
        assert got[~held].isnan().all()
    alone = lens_divergence(model, logit, rotated, PROMPT, rows=ROWS, positions=POSITIONS)
    torch.testing.assert_close(alone.kl, some.divergence.kl, equal_nan=True)
    frame = some.divergence.to_frame()
    assert len(frame) == len(ROWS) * (POSITIONS[1] - POSITIONS[0])
    top = full.divergence.to_frame().set_index(["layer", "pos"])["top1_a"]
    cells = zip(frame["layer"], frame["pos"], strict=True)
    assert list(frame["top1_a"]) == [top[(r, p)] for r, p in cells]


def test_plots_refuse_cells_that_were_not_computed(model: Any, logit: Lens, rotated: Lens):
    some = lenskit.comparison.compare(
        model, [logit, rotated], PROMPT, rows=[0, 2, 4], positions=POSITIONS
    )
    traj = some.trajectories[0]
    fig = lenskit.plotting.trajectory_heatmap(traj, layer_stride=2, token_range=POSITIONS)
    assert fig.data[0].z.shape == (3, POSITIONS[1] - POSITIONS[0])
    lenskit.plotting.compare_heatmaps(
        list(some.trajectories), layer_stride=2, token_range=POSITIONS
    )
    lenskit.plotting.divergence_heatmap(some.divergence, layer_stride=2, token_range=POSITIONS)
    with pytest.raises(LenskitError, match=r"positions 3\.\.8 only"):
        lenskit.plotting.trajectory_heatmap(traj, layer_stride=2)
    with pytest.raises(LenskitError, match=r"rows \[0, 2, 4\]"):
        lenskit.plotting.compare_heatmaps(list(some.trajectories), token_range=POSITIONS)
    with pytest.raises(LenskitError, match="divergence holds"):
        lenskit.plotting.divergence_heatmap(some.divergence, token_range=(0, 4))


@pytest.mark.parametrize(
    ("rows", "positions", "match"),
    [
        ([], None, "no rows"),
        ([7], None, "outside 0..4"),
        (None, (4, 4), "select no positions"),
        (None, (0, 99), "select no positions"),
    ],
)
def test_bad_cells_are_refused(model: Any, logit: Lens, rows, positions, match):
    with pytest.raises(LenskitError, match=match):
        lenskit.trajectory(model, logit, PROMPT, rows=rows, positions=positions)
