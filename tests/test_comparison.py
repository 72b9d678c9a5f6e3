from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch

import lenskit
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
    result = lenskit.comparison.compare(model, lenses, PROMPT, pair=pair, target="t",
                                        top_k=3)
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
