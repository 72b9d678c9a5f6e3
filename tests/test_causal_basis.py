"""Causal basis extraction, influences, files, the tuned-with-causal-basis lens and its CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import randomised

import lenskit
from lenskit import cli, plotting
from lenskit.causal.config import CausalBasisConfig
from lenskit.causal.extraction import extract_causal_basis
from lenskit.causal.influence import (
    ABLATIONS,
    LensObjective,
    ablate,
    ablation_reference,
    direction_logits,
    direction_tokens,
    lens_influence,
    model_influence,
)
from lenskit.data import default_corpus, load_corpus, split_documents
from lenskit.errors import LenskitError
from lenskit.evaluation import eval_chunks
from lenskit.lenses.basis import INDEX_FILE, CausalBasis, load_bases, rank_correlation
from lenskit.lenses.causal_basis import CausalBasisLens
from lenskit.lenses.tuned import TunedLens
from lenskit.progress import BasisProgress
from lenskit.residual import capture

SEQ = 32
SMALL = dict(k=3, tokens=128, eval_tokens=64, seq_len=SEQ, max_iter=15, tol=1e-3)
KIND = "tuned-with-causal-basis"


@pytest.fixture(scope="module")
def tuned(tiny_llama, tmp_path_factory) -> TunedLens:
    folder = tmp_path_factory.mktemp("tuned")
    randomised(tiny_llama, scale=0.1).save(folder)
    return lenskit.get_lens("tuned", tiny_llama, path=str(folder))


@pytest.fixture(scope="module")
def basis_dir(tiny_llama, tuned, corpus_dir, tmp_path_factory) -> Path:
    """A basis folder for layer 1 of tiny-llama, written by the command line."""
    out = tmp_path_factory.mktemp("basis") / "b"
    argv = [
        "causal-basis",
        "--model",
        "tiny-llama",
        "--lens",
        f"tuned:{tuned.source}",
        "--layer",
        "1",
        "--k",
        "3",
        "--data",
        str(corpus_dir),
        "--tokens",
        "128",
        "--eval-tokens",
        "64",
        "--seq-len",
        str(SEQ),
        "--max-iter",
        "15",
        "--tol",
        "1e-3",
        "--out",
        str(out),
        "--quiet",
    ]
    assert cli.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def basis(basis_dir) -> CausalBasis:
    return CausalBasis.load(basis_dir, 1)


def residuals(model, tokens, layer, skip=1):
    """Block input ``layer`` of every position from ``skip`` on, by TransformerLens's cache."""
    _, cache = model.run_with_cache(tokens)
    return cache[f"blocks.{layer}.hook_resid_pre"][:, skip:].flatten(0, 1)


def split_chunks(model, corpus_dir, **changes):
    cfg = CausalBasisConfig(**{**SMALL, **changes})
    train, held = split_documents(load_corpus(str(corpus_dir)), cfg.held_out, seed=cfg.seed)
    return (
        eval_chunks(model, train, tokens=cfg.tokens, seq_len=SEQ, seed=cfg.seed),
        eval_chunks(model, held, tokens=cfg.eval_tokens, seq_len=SEQ, seed=cfg.seed),
    )


def kl64(p_logits, q_logits):
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1) / math.log(2)


def test_basis_is_orthonormal_sorted_and_complete(basis):
    v = basis.basis.double()
    torch.testing.assert_close(v @ v.T, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    assert bool((basis.lens_influence[1:] <= basis.lens_influence[:-1]).all())
    assert basis.model_influence is not None and bool((basis.model_influence > 0).all())
    assert sorted(basis.found_at) == [0, 1, 2]
    s = basis.settings
    assert s["model"] == "tiny-llama" and s["config"]["k"] == 3 and s["lens"]["kind"] == "tuned"
    assert s["train_tokens"] == 4 * (SEQ - 1) and s["eval_tokens"] == 2 * (SEQ - 1)
    assert s["objective_path"] == "fast"


def test_mean_and_lens_influence_equal_a_plain_float64_computation(
    basis, tiny_llama, tuned, corpus_dir
):
    train, held = split_chunks(tiny_llama, corpus_dir)
    mean = residuals(tiny_llama, train.tokens, 1).double().mean(0)
    torch.testing.assert_close(basis.mean.double(), mean, atol=1e-5, rtol=1e-5)
    h = residuals(tiny_llama, held.tokens, 1).double()
    with torch.no_grad():
        clean = tuned(h.float(), 1)
        for i, v in enumerate(basis.basis.double()):
            ablated = h - ((h - basis.mean.double()) @ v).unsqueeze(-1) * v
            expected = kl64(clean, tuned(ablated.float(), 1)).mean()
            assert float(basis.lens_influence[i]) == pytest.approx(float(expected), rel=1e-5)


def test_model_influence_equals_a_plain_pre_hook_reference(basis, tiny_llama, corpus_dir):
    _, held = split_chunks(tiny_llama, corpus_dir)
    tokens, v, m = held.tokens, basis.basis[0].double(), basis.mean.double()

    def pre(module, args, kwargs):  # torch's own hook on block 1, not a TransformerLens one
        h = args[0].double()
        out = h.clone()
        out[:, 1:] = h[:, 1:] - ((h[:, 1:] - m) @ v).unsqueeze(-1) * v
        return (out.to(args[0].dtype), *args[1:]), kwargs

    with torch.no_grad():
        clean = tiny_llama(tokens)
        handle = tiny_llama.blocks[1].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            ablated = tiny_llama(tokens)
        finally:
            handle.remove()
    expected = kl64(clean[:, 1:], ablated[:, 1:]).mean()
    assert float(basis.model_influence[0]) == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_fast_objective_equals_the_exact_one(tiny_model, ablation):
    lens = randomised(tiny_model, scale=0.1)
    tokens = torch.randint(0, 256, (3, SEQ), generator=torch.Generator().manual_seed(1))
    h = capture(tiny_model, tokens).stack()[1][:, 1:].flatten(0, 1)
    ref = ablation_reference(h, ablation, h.mean(0), seed=0)
    fast, exact = LensObjective(lens, 1, h, ref), LensObjective(lens, 1, h, ref, mode="exact")
    assert fast.mode == "fast"
    v = torch.randn(h.shape[1], generator=torch.Generator().manual_seed(2))
    values, grads = [], []
    for objective in (fast, exact):
        leaf = (v / v.norm()).requires_grad_(True)
        value = objective(leaf)
        values.append(float(value.detach()))
        grads.append(torch.autograd.grad(value, leaf)[0])
    assert values[0] == pytest.approx(values[1], rel=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)
    plain = lens_influence(lens, 1, h, ref, (v / v.norm()).unsqueeze(0))
    assert values[1] == pytest.approx(float(plain[0]), rel=1e-5)


def test_ablation_references():
    h = torch.arange(12.0).view(6, 2)
    assert torch.equal(ablation_reference(h, "zero", h.mean(0), seed=0), torch.zeros_like(h))
    assert torch.equal(ablation_reference(h, "mean", h.mean(0), seed=0), h.mean(0).expand(6, 2))
    resampled = ablation_reference(h, "resample", h.mean(0), seed=3)
    assert sorted(map(tuple, resampled.tolist())) == sorted(map(tuple, h.tolist()))
    assert not bool((resampled == h).all(-1).any())  # every token takes another's
    v = torch.tensor([1.0, 0.0])
    assert torch.equal(ablate(h, v, torch.zeros_like(h))[:, 0], torch.zeros(6))
    with pytest.raises(LenskitError, match="unknown ablation"):
        ablation_reference(h, "noise", h.mean(0), seed=0)


def test_first_direction_moves_the_lens_more_than_random_directions(
    basis, tiny_llama, tuned, corpus_dir
):
    _, held = split_chunks(tiny_llama, corpus_dir)
    h = residuals(tiny_llama, held.tokens, 1)
    ref = ablation_reference(h, "mean", basis.mean, seed=0)
    random = torch.randn(8, h.shape[1], generator=torch.Generator().manual_seed(0))
    random = random / random.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        first = lens_influence(tuned, 1, h, ref, basis.basis[:1])
        others = lens_influence(tuned, 1, h, ref, random)
    assert float(first[0]) > float(others.max())


def test_same_seed_same_basis_other_seed_another(tiny_llama, tuned, corpus_dir):
    params = [*tiny_llama.parameters(), *tuned.parameters()]
    for p in params:
        p.grad = None
    cfg = CausalBasisConfig(**{**SMALL, "k": 2, "model_influence": False})
    one = extract_causal_basis(tiny_llama, tuned, 2, cfg, str(corpus_dir), progress=False)[2]
    assert all(p.grad is None for p in params)  # only the direction is differentiated
    two = extract_causal_basis(tiny_llama, tuned, [2], cfg, str(corpus_dir), progress=False)[2]
    assert torch.equal(one.basis, two.basis) and torch.equal(one.lens_influence, two.lens_influence)
    assert one.model_influence is None and math.isnan(one.spearman)
    cfg3 = CausalBasisConfig(**{**SMALL, "k": 2, "model_influence": False, "seed": 3})
    three = extract_causal_basis(tiny_llama, tuned, 2, cfg3, str(corpus_dir), progress=False)[2]
    assert not torch.allclose(one.basis, three.basis, atol=1e-3)


def test_save_load_round_trip_adds_layers_and_refuses_mixing(basis, tmp_path, tiny_gpt2):
    folder = tmp_path / "b"
    basis.save(folder)
    again = CausalBasis.load(folder, 1)
    for name in ("basis", "mean", "lens_influence", "train_influence", "model_influence"):
        assert torch.equal(getattr(again, name), getattr(basis, name))
    assert (again.found_at, again.iterations, again.converged, again.settings) == (
        basis.found_at,
        basis.iterations,
        basis.converged,
        basis.settings,
    )
    assert CausalBasis.from_dict(json.loads(json.dumps(basis.to_dict()))).basis.equal(basis.basis)
    moved = CausalBasis(
        **{
            **{
                f: getattr(basis, f)
                for f in (
                    "basis",
                    "mean",
                    "lens_influence",
                    "train_influence",
                    "model_influence",
                    "found_at",
                    "iterations",
                    "converged",
                    "settings",
                )
            },
            "layer": 3,
        }
    )
    moved.save(folder)
    assert sorted(load_bases(folder)) == [1, 3]
    assert sorted(json.loads((folder / INDEX_FILE).read_text())["layers"]) == ["1", "3"]
    other_lens = CausalBasis(
        **{
            **moved.__dict__,
            "settings": {
                **basis.settings,
                "lens": {"kind": "tuned", "path": "/elsewhere", "shipped": False},
            },
        }
    )
    with pytest.raises(LenskitError, match="never mixes models or lenses"):
        other_lens.save(folder)
    other_model = CausalBasis(
        **{**moved.__dict__, "settings": {**basis.settings, "model": "tiny-gpt2"}}
    )
    with pytest.raises(LenskitError, match="never mixes"):
        other_model.save(folder)
    with pytest.raises(LenskitError, match="no causal basis for layer 2"):
        CausalBasis.load(folder, 2)
    frame = basis.to_frame()
    assert list(frame["direction"]) == [1, 2, 3] and frame.attrs["spearman"] == basis.spearman


def test_result_validation(basis):
    fields = {
        f: getattr(basis, f)
        for f in ("layer", "basis", "mean", "lens_influence", "train_influence")
    }
    with pytest.raises(ValueError, match="orthonormal"):
        CausalBasis(**{**fields, "basis": basis.basis * 2})
    with pytest.raises(ValueError, match="decreasing"):
        CausalBasis(**{**fields, "lens_influence": basis.lens_influence.flip(0)})
    with pytest.raises(LenskitError, match=r"k must be in 1\.\.3"):
        basis.top(4)
    assert basis.top(2).k == 2


def test_rank_correlation_matches_a_reference():
    assert rank_correlation(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == -1.0
    # ties share their average rank: ranks (1.5, 1.5, 3) and (1, 2, 3) -> 0.866...
    assert rank_correlation(torch.tensor([5.0, 5, 7]), torch.tensor([1.0, 2, 3])) == pytest.approx(
        math.sqrt(3) / 2
    )
    assert math.isnan(rank_correlation(torch.ones(4), torch.arange(4.0)))
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        a, b = torch.randint(0, 5, (9,), generator=gen).double(), torch.randn(9, generator=gen)
        assert rank_correlation(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)


def test_lens_equals_a_plain_projection_then_the_tuned_lens(tiny_llama, tuned, basis_dir, basis):
    lens = lenskit.get_lens(KIND, tiny_llama, path=str(basis_dir))
    assert isinstance(lens, CausalBasisLens) and lens.covered_layers() == [1, 4]
    h = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)) * 3
    m, v = basis.mean.double(), basis.basis.double()
    projected = m + ((h.double() - m) @ v.T) @ v
    with torch.no_grad():
        torch.testing.assert_close(lens(h, 1), tuned(projected.float(), 1), atol=1e-5, rtol=1e-5)
        two = lenskit.get_lens(KIND, tiny_llama, path=str(basis_dir), k="2")
        projected2 = m + ((h.double() - m) @ v[:2].T) @ v[:2]
        torch.testing.assert_close(two(h, 1), tuned(projected2.float(), 1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lens(h, 4), tuned(h, 4))  # the output row, as it is
    with pytest.raises(LenskitError, match=r"no causal basis for layer 2: use one of layers 1"):
        lens(h, 2)
    traj = lenskit.trajectory(tiny_llama, lens, "Hello there")
    assert traj.covered.tolist() == [False, True, False, False, True]


def test_full_basis_is_the_tuned_lens(tiny_llama, tuned, basis, tmp_path):
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
    full = CausalBasis(
        layer=2,
        basis=q.T.contiguous(),
        mean=torch.randn(64),
        lens_influence=torch.linspace(1, 0, 64),
        train_influence=torch.zeros(64),
        settings=basis.settings,
    )
    full.save(tmp_path / "full")
    lens = lenskit.get_lens(KIND, tiny_llama, path=str(tmp_path / "full"))
    h = torch.randn(7, 64, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad():
        torch.testing.assert_close(lens(h, 2), tuned(h, 2), atol=1e-4, rtol=1e-4)


def test_lens_bad_options_and_folders(tiny_llama, tiny_gpt2, basis_dir, tmp_path):
    with pytest.raises(LenskitError, match="no causal basis is shipped for tiny-llama"):
        lenskit.get_lens(KIND, tiny_llama)
    with pytest.raises(LenskitError, match="takes only k, path, tuned"):
        lenskit.get_lens(KIND, tiny_llama, path=str(basis_dir), top=3)
    with pytest.raises(LenskitError, match=r"k must be in 1\.\.3"):
        lenskit.get_lens(KIND, tiny_llama, path=str(basis_dir), k=9)
    with pytest.raises(LenskitError, match="no causal basis folder"):
        lenskit.get_lens(KIND, tiny_llama, path=str(tmp_path / "none"))
    with pytest.raises(LenskitError, match="is for a model with n_layers 4"):
        lenskit.get_lens(KIND, tiny_gpt2, path=str(basis_dir))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / INDEX_FILE).write_text("{not json")
    with pytest.raises(LenskitError, match="unreadable or not JSON"):
        lenskit.get_lens(KIND, tiny_llama, path=str(tmp_path / "bad"))
    shutil.copytree(basis_dir, tmp_path / "cut")
    data = (tmp_path / "cut" / "layer_1.safetensors").read_bytes()
    (tmp_path / "cut" / "layer_1.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LenskitError, match=r"layer_1\.safetensors is missing or corrupt"):
        lenskit.get_lens(KIND, tiny_llama, path=str(tmp_path / "cut"))


def test_direction_tokens_and_figures(tiny_llama, tuned, basis):
    effect = direction_logits(tuned, 1, basis.basis[:1], basis.mean)
    eps = 1e-2
    with torch.no_grad():
        up = tuned((basis.mean + eps * basis.basis[0]).unsqueeze(0), 1)[0]
        down = tuned((basis.mean - eps * basis.basis[0]).unsqueeze(0), 1)[0]
    diff = (up - down) / (2 * eps)
    torch.testing.assert_close(effect[0], diff - diff.mean(), atol=2e-3, rtol=1e-2)
    frame = direction_tokens(tuned, basis, tiny_llama.tokenizer, top=4)
    assert len(frame) == 3 * 2 * 4
    promoted = frame[(frame.direction == 1) & (frame.side == "promotes")]
    assert list(promoted["token_id"]) == torch.topk(effect[0], 4).indices.tolist()
    assert (frame[frame.side == "suppresses"]["logit_change"] < 0).all()
    fig = plotting.direction_tokens_plot(frame)
    assert [t.type for t in fig.data] == ["heatmap"] and len(fig.data[0].z) == 3
    fig = plotting.influence_plot(basis)
    assert [t.name for t in fig.data] == ["lens", "model"]
    assert "Spearman ρ" in fig.layout.title.text and fig.layout.yaxis.type == "log"
    with pytest.raises(LenskitError, match="lacks column"):
        plotting.direction_tokens_plot(frame.drop(columns="token"))


def test_config_validation():
    for bad, match in [
        ({"k": 0}, "k must be >= 1"),
        ({"ablation": "x"}, "unknown ablation"),
        ({"held_out": 1.0}, "held_out"),
        ({"tol": 0.0}, "tol"),
        ({"skip_first": 32, "seq_len": 32}, "skip_first"),
    ]:
        with pytest.raises(LenskitError, match=match):
            CausalBasisConfig(**bad)
    cfg = CausalBasisConfig(k=4)
    assert CausalBasisConfig.from_dict(cfg.to_dict()) == cfg


def _error(capsys, argv) -> str:
    assert cli.main(["causal-basis", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lenskit causal-basis: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layer", "4"], "layer 4 has no block input in tiny-llama: use 0..3"),
        (["--layer", "1", "--k", "0"], "k must be >= 1"),
        (["--layer", "1", "--k", "65"], "k=65 is more than d_model=64"),
        (["--layer", "1", "--data", "/nonexistent/corpus.txt"], "no file or folder named"),
        (["--layer", "1", "--lens", KIND], "extract a causal basis with the lens it will serve"),
        (["--layer", "1", "--lens", "tuned"], "no tuned lens is shipped for tiny-llama"),
    ],
)
def test_cli_bad_input_is_one_line(capsys, tmp_path, tuned, extra, message):
    argv = [
        "--model",
        "tiny-llama",
        "--lens",
        f"tuned:{tuned.source}",
        "--out",
        str(tmp_path / "o"),
        "--tokens",
        "64",
        "--seq-len",
        str(SEQ),
        "--quiet",
        *extra,
    ]
    assert message in _error(capsys, argv)


def test_cli_refuses_a_lens_for_another_model_and_a_folder_of_another(
    capsys, tmp_path, tiny_gpt2, basis_dir
):
    other = tmp_path / "gpt2-tuned"
    randomised(tiny_gpt2, scale=0.1).save(other)
    base = [
        "--model",
        "tiny-llama",
        "--layer",
        "1",
        "--tokens",
        "64",
        "--seq-len",
        str(SEQ),
        "--quiet",
    ]
    assert "trained for a model with 3 layers" in _error(
        capsys, [*base, "--lens", f"tuned:{other}", "--out", str(tmp_path / "o")]
    )
    assert "never mixes models or lenses" in _error(
        capsys,
        [
            "--model",
            "tiny-gpt2",
            "--lens",
            f"tuned:{other}",
            "--layer",
            "1",
            "--out",
            str(basis_dir),
            "--tokens",
            "64",
            "--seq-len",
            str(SEQ),
            "--quiet",
        ],
    )


@pytest.mark.slow
def test_smollm2_first_direction_beats_random_directions(smollm2):
    lens = lenskit.get_lens(KIND, smollm2)
    assert lens.covered_layers()[:-1] == sorted(lens.covered_layers()[:-1])
    layer = lens.layers[len(lens.layers) // 2]
    basis = CausalBasis.load(lens.source, layer)
    tuned = lens.tuned
    corpus = split_documents(default_corpus(), 0.1, seed=0)[1]
    chunks = eval_chunks(smollm2, corpus, tokens=256, seq_len=128, seed=5)
    h = capture(smollm2, chunks.tokens).stack()[layer]
    random = torch.randn(3, 576, generator=torch.Generator().manual_seed(0))
    directions = torch.cat([basis.basis[:1], random / random.norm(dim=-1, keepdim=True)])
    flat = h[:, 1:].flatten(0, 1)
    ref = ablation_reference(flat, "mean", basis.mean, seed=0)
    lens_inf = lens_influence(tuned, layer, flat, ref, directions)
    full_ref = h.clone()
    full_ref[:, 1:] = ref.view_as(h[:, 1:])
    model_inf = model_influence(smollm2, layer, directions, chunks.tokens, full_ref)
    assert float(lens_inf[0]) > 5 * float(lens_inf[1:].max())
    assert float(model_inf[0]) > float(model_inf[1:].max())


class Halt(BaseException):
    """Like the exception Streamlit raises in a script to rerun it: not an ``Exception``."""


def test_basis_progress_fraction_and_eta():
    p = BasisProgress("search", 2, 1, 2, 1, 4, 3, 50, 0.5, 10.0, 6.0)
    assert p.directions_done == 5 and p.fraction == 5 / 8
    assert p.eta_seconds == pytest.approx(6.0 / 5 * 3)
    start = BasisProgress("capture", None, 0, 2, 0, 4, 0, 50, None, 1.0, 0.0)
    assert start.fraction == 0 and math.isnan(start.eta_seconds)


def test_progress_reports_every_iteration_and_a_stop_keeps_finished_layers(
    tiny_llama, tuned, corpus_dir, tmp_path
):
    cfg = CausalBasisConfig(**{**SMALL, "k": 2, "model_influence": False})
    seen: list[BasisProgress] = []
    bases = extract_causal_basis(
        tiny_llama, tuned, [1, 2], cfg, str(corpus_dir), progress=False, on_progress=seen.append
    )
    assert seen[0].phase == "capture" and seen[0].layer is None
    for li, layer in enumerate([1, 2]):
        mine = [p for p in seen if p.layer == layer]
        searched = [p for p in mine if p.phase == "search"]
        per_direction = [0] * cfg.k  # iterations in the order the directions were found
        for j, found in enumerate(bases[layer].found_at):
            per_direction[found] = bases[layer].iterations[j]
        assert [(p.direction, p.iteration) for p in searched] == [
            (d, it) for d in range(cfg.k) for it in range(1, per_direction[d] + 1)
        ]
        assert [p.phase for p in mine if p.phase != "search"] == ["measure", "done"]
        assert all(
            p.layers_done == li and p.n_layers == 2 and p.k == cfg.k and p.max_iter == cfg.max_iter
            for p in mine
        )
        assert all(p.objective_bits is not None and p.objective_bits > 0 for p in searched)
    assert len(seen) == 1 + sum(sum(b.iterations) + 2 for b in bases.values())
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert seen[-1].directions_done == 4 and seen[-1].eta_seconds == 0
    assert [p.seconds for p in seen] == sorted(p.seconds for p in seen)
    assert [p.search_seconds for p in seen] == sorted(p.search_seconds for p in seen)

    def stop(p: BasisProgress) -> None:
        if p.phase == "search" and p.layer == 2:
            raise Halt

    with pytest.raises(Halt):
        extract_causal_basis(
            tiny_llama,
            tuned,
            [1, 2],
            cfg,
            str(corpus_dir),
            out=tmp_path,
            progress=False,
            on_progress=stop,
        )
    kept = load_bases(tmp_path)
    assert sorted(kept) == [1] and torch.equal(kept[1].basis, bases[1].basis)
