"""Sub-layer rows (``L12.mid``, the stream between attention and MLP) end to end.

Trajectories, comparisons and evaluations read them against plain references; lenses
without maps for them and families without such a stream refuse in one line; a tuned
lens trains translators for them, saves, reloads and reads them; the CLI, the figures
and the app's pages show them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

import lenskit
import lenskit_app.state as S
from lenskit import plotting
from lenskit.cli import main
from lenskit.comparison import compare, lens_divergence
from lenskit.data import Corpus, tokenize_corpus
from lenskit.errors import LenskitError
from lenskit.evaluation import evaluate
from lenskit.evaluation.layer_kl import layer_kl_sums
from lenskit.lenses.tuned import TunedLens
from lenskit.models import ModelAdapter
from lenskit.plotting.style import select_rows
from lenskit.residual import capture, tokenize

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The cat sat on the mat, and then"
BOTH = ("resid_pre", "resid_mid")


def _by_hand(model, h):
    """The model's own final norm (its ``ln_final`` module) and unembedding, float64 after."""
    with torch.no_grad():
        return (model.ln_final(h) @ model.W_U + model.b_U).double().log_softmax(-1)


def _stats(log_q, log_p, next_ids):
    """Entropy, KL(p || q), cross-entropy (bits) and top-1 by definition."""
    q, p = log_q.exp(), log_p.exp()
    entropy = -(q * log_q).sum(-1) / math.log(2)
    kl = (p * (log_p - log_q)).sum(-1) / math.log(2)
    ce = -log_q[:-1].gather(-1, next_ids[:, None]).squeeze(-1) / math.log(2)
    return entropy, kl, ce, log_q.argmax(-1)


def test_mid_rows_through_the_logit_lens_equal_the_models_own_readout(tiny_model):
    lens = lenskit.get_lens("logit", tiny_model)
    traj = lenskit.trajectory(tiny_model, lens, PROMPT, points=BOTH)
    n = tiny_model.cfg.n_layers
    assert traj.layer_labels[:3] == ("L0", "L0.mid", "L1") and len(traj.layer_labels) == 2 * n + 1
    assert traj.points == BOTH and traj.to_dict()["points"] == list(BOTH)
    tokens = tokenize(tiny_model, PROMPT)
    cap = capture(tiny_model, tokens, points=("resid_mid",))
    log_p = cap.logits[0].double().log_softmax(-1)
    for layer in range(n):
        row = 2 * layer + 1
        assert traj.layer_labels[row] == f"L{layer}.mid"
        log_q = _by_hand(tiny_model, cap.stack("resid_mid")[layer, 0])
        entropy, kl, ce, top = _stats(log_q, log_p, tokens[0, 1:])
        torch.testing.assert_close(traj.entropy[row].double(), entropy, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(traj.kl_to_final[row].double(), kl, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(traj.cross_entropy[row, :-1].double(), ce, atol=2e-4, rtol=1e-4)
        assert torch.equal(traj.top_ids[row, :, 0], top)
    # The block inputs and the output are the default trajectory's, unchanged.
    plain = lenskit.trajectory(tiny_model, lens, PROMPT)
    keep = [r for r, label in enumerate(traj.layer_labels) if not label.endswith(".mid")]
    assert plain.layer_labels == tuple(traj.layer_labels[r] for r in keep)
    torch.testing.assert_close(traj.entropy[keep], plain.entropy)
    torch.testing.assert_close(traj.kl_to_final[keep], plain.kl_to_final)
    frame = traj.to_frame()
    assert set(frame.layer_label) == set(traj.layer_labels)


def test_some_rows_of_a_sublayer_trajectory_equal_the_full_one(tiny_llama):
    lens = lenskit.get_lens("logit", tiny_llama)
    full = lenskit.trajectory(tiny_llama, lens, PROMPT, points=BOTH)
    some = lenskit.trajectory(tiny_llama, lens, PROMPT, points=BOTH, rows=[1, 4, 8])
    for row in (1, 4, 8):
        torch.testing.assert_close(some.entropy[row], full.entropy[row])
    assert some.entropy[2].isnan().all()


def test_compare_with_sublayer_rows_equals_separate_trajectories(tiny_llama):
    logit = lenskit.get_lens("logit", tiny_llama)
    tuned = TunedLens.untrained(tiny_llama, points=BOTH)
    with torch.no_grad():
        for t in tuned.all_translators():
            t.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    both = compare(tiny_llama, [logit, tuned], PROMPT, points=BOTH)
    alone = lenskit.trajectory(tiny_llama, tuned, PROMPT, points=BOTH)
    torch.testing.assert_close(both.trajectories[1].kl_to_final, alone.kl_to_final)
    div = lens_divergence(tiny_llama, logit, tuned, PROMPT, points=BOTH)
    assert div.layer_labels == alone.layer_labels
    torch.testing.assert_close(both.divergence.js, div.js)
    assert float(div.kl[1].abs().max()) > 0  # the mid translators moved the L0.mid row


def test_evaluate_scores_mid_rows_like_a_brute_force(tiny_llama):
    text = Corpus("demo", ("the cat sat on the mat and the dog sat on the log " * 20,))
    logit = lenskit.get_lens("logit", tiny_llama)
    result = evaluate(tiny_llama, [logit], text, tokens=64, seq_len=32, progress=False, points=BOTH)
    frame = result.metrics
    n = tiny_llama.cfg.n_layers
    assert list(frame.layer_label[:3]) == ["L0", "L0.mid", "L1"] and len(frame) == 2 * n + 1
    chunks = tokenize_corpus(text, tiny_llama.tokenizer, 32, max_tokens=64).tokens
    cap = capture(tiny_llama, chunks, points=("resid_mid",))
    log_p = cap.logits[:, :-1].double().log_softmax(-1)
    for layer in range(n):
        log_q = _by_hand(tiny_llama, cap.stack("resid_mid")[layer, :, :-1])
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean() / math.log(2)
        got = frame[(frame.lens == "logit") & (frame.layer_label == f"L{layer}.mid")].kl_bits
        assert float(got.iloc[0]) == pytest.approx(float(kl), rel=1e-4, abs=1e-5)
    plain = evaluate(tiny_llama, [logit], text, tokens=64, seq_len=32, progress=False)
    blocks = frame[~frame.layer_label.str.endswith(".mid")].reset_index(drop=True)
    torch.testing.assert_close(
        torch.tensor(blocks.kl_bits.to_numpy()), torch.tensor(plain.metrics.kl_bits.to_numpy())
    )


def test_a_lens_without_mid_maps_refuses_in_one_line(tiny_llama):
    plain_tuned = TunedLens.untrained(tiny_llama)
    logit = lenskit.get_lens("logit", tiny_llama)
    text = Corpus("demo", ("a b c d e f " * 40,))
    calls = [
        lambda: lenskit.trajectory(tiny_llama, plain_tuned, PROMPT, points=BOTH),
        lambda: compare(tiny_llama, [logit, plain_tuned], PROMPT, points=BOTH),
        lambda: evaluate(
            tiny_llama,
            [logit, plain_tuned],
            text,
            tokens=32,
            seq_len=32,
            progress=False,
            points=BOTH,
        ),
    ]
    for call in calls:
        with pytest.raises(LenskitError, match="no map for the stream between") as info:
            call()
        assert "\n" not in str(info.value) and "--points resid_pre,resid_mid" in str(info.value)
    with pytest.raises(LenskitError, match="unknown row point"):
        lenskit.trajectory(tiny_llama, logit, PROMPT, points=("resid_post",))


def test_gpt_neox_says_it_has_no_mid_row():
    model = lenskit.load_model("tiny-gpt-neox")
    assert not ModelAdapter(model).has_mid
    with pytest.raises(LenskitError, match="in parallel") as info:
        lenskit.trajectory(model, lenskit.get_lens("logit", model), PROMPT, points=BOTH)
    assert "\n" not in str(info.value) and "resid_pre" in str(info.value)


def test_cli_trajectory_and_eval_take_points(tmp_path, capsys):
    out = tmp_path / "t.json"
    args = ["trajectory", "--model", "tiny-llama", "--prompt", "Hello", "--quiet"]
    assert main([*args, "--points", "resid_pre,resid_mid", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert " L0.mid " in printed and " L3.mid " in printed
    data = json.loads(out.read_text())
    assert data["layers"][:2] == ["L0", "L0.mid"] and len(data["cells"]) == 9 * 6
    assert main([*args, "--points", "resid_mud"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resid_mud" in err[0]
    assert main(["trajectory", "--model", "tiny-gpt-neox", "--prompt", "Hi", "--quiet",
                 "--points", "resid_pre,resid_mid"]) == 2  # fmt: skip
    assert "in parallel" in capsys.readouterr().err
    code = main(["eval", "--model", "tiny-llama", "--tokens", "64", "--seq-len", "32",
                 "--out", str(tmp_path / "ev"), "--no-png", "--quiet",
                 "--points", "resid_pre,resid_mid"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "L2.mid" in printed
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert "L2.mid" in json.dumps(metrics)


def test_figures_stride_by_block_and_label_every_row(tiny_llama):
    labels = [r.label for r in ModelAdapter(tiny_llama).rows(BOTH)]
    assert select_rows(labels, 2) == [0, 1, 4, 5, 8]  # L0, L0.mid, L2, L2.mid, output
    assert select_rows(len(labels), 2) == [0, 2, 4, 6, 8]  # a plain count: every other row
    logit = lenskit.get_lens("logit", tiny_llama)
    traj = lenskit.trajectory(tiny_llama, logit, PROMPT, points=BOTH)
    fig = plotting.trajectory_heatmap(traj)
    assert "L3.mid" in list(fig.layout.yaxis.ticktext)
    fig = plotting.trajectory_heatmap(traj, layer_stride=2)
    assert list(fig.layout.yaxis.ticktext) == ["L0", "L0.mid", "L2", "L2.mid", "output"]


# --- training ------------------------------------------------------------------------------


def test_train_both_points_save_reload_and_read(tiny_llama, corpus_dir, tmp_path):
    from lenskit.training import TrainConfig, train_tuned_lens

    config = TrainConfig(
        model="tiny-llama",
        data=str(corpus_dir),
        tokens=64,
        seq_len=32,
        tokens_per_step=64,
        lstsq_tokens=1024,
        eval_tokens=64,
        val_tokens=32,
        checkpoint_every=0,
        points="resid_pre,resid_mid",
    )
    result = train_tuned_lens(tiny_llama, config, tmp_path / "lens", progress=False)
    n = tiny_llama.cfg.n_layers
    assert result.steps == 1 and len(result.tuned_kl) == 2 * n
    assert list(result.to_frame().layer_label[:2]) == ["L0", "L0.mid"]
    saved = json.loads((tmp_path / "lens" / "config.json").read_text())
    assert saved["lenskit"]["points"] == list(BOTH)
    lens = lenskit.get_lens("tuned", tiny_llama, path=str(tmp_path / "lens"))
    assert lens.points == BOTH and lens.mid_translators is not None
    assert all(float(t.weight.detach().abs().sum()) > 0 for t in lens.mid_translators)
    # On the text it was fitted to, the .mid rows read closer to the output than the
    # logit lens does (a closed-form start then a KL step).
    from lenskit.data import load_corpus, split_documents

    train, _ = split_documents(load_corpus(str(corpus_dir)), 0.1, seed=0)
    chunks = tokenize_corpus(train, tiny_llama.tokenizer, 32, max_tokens=1024).tokens
    logit = lenskit.get_lens("logit", tiny_llama)
    sums = layer_kl_sums(tiny_llama, [logit, lens], chunks, points=BOTH)
    mid = slice(1, None, 2)
    assert float(sums[1, mid].sum()) < float(sums[0, mid].sum()), sums
    assert (sums[1, mid] != sums[0, mid]).all(), sums
    traj = lenskit.trajectory(tiny_llama, lens, PROMPT, points=BOTH)
    plain = lenskit.trajectory(tiny_llama, logit, PROMPT, points=BOTH)
    assert traj.covered.all()
    assert not torch.allclose(traj.kl_to_final[1], plain.kl_to_final[1])
    assert (tmp_path / "lens" / "metrics.json").is_file()


def test_a_stopped_sublayer_run_resumes_to_the_same_lens(tiny_llama, corpus_dir, tmp_path):
    from lenskit.training import TrainConfig, train_tuned_lens
    from lenskit.training.checkpoints import load_checkpoint

    config = TrainConfig(
        model="tiny-llama",
        data=str(corpus_dir),
        tokens=128,
        seq_len=32,
        tokens_per_step=64,
        lstsq_tokens=128,
        eval_tokens=32,
        val_tokens=0,
        checkpoint_every=0,
        report=False,
        points="resid_pre,resid_mid",
    )
    whole = train_tuned_lens(tiny_llama, config, tmp_path / "a", progress=False)

    def stop(p):
        if p.phase == "fine-tune":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_tuned_lens(tiny_llama, config, tmp_path / "b", progress=False, on_progress=stop)
    state = load_checkpoint(tmp_path / "b")
    assert "mid.0.weight" in state.lens and state.scales.shape[1] == 2 * tiny_llama.cfg.n_layers
    again = train_tuned_lens(tiny_llama, config, tmp_path / "b", resume=True, progress=False)
    for key, value in whole.lens.translator_state().items():
        torch.testing.assert_close(again.lens.translator_state()[key], value)
    with pytest.raises(KeyboardInterrupt):
        train_tuned_lens(tiny_llama, config, tmp_path / "c", progress=False, on_progress=stop)
    other = TrainConfig(**{**config.to_dict(), "points": "resid_pre"})
    with pytest.raises(LenskitError, match="made with points='resid_pre,resid_mid'"):
        train_tuned_lens(tiny_llama, other, tmp_path / "c", resume=True, progress=False)


def test_train_cli_flag_and_bad_points():
    from lenskit.training import TrainConfig

    assert TrainConfig().points == "resid_pre"
    with pytest.raises(LenskitError, match="unknown points"):
        TrainConfig(points="resid_mid,resid_pre")
    with pytest.raises(LenskitError, match="in parallel"):
        TunedLens.untrained(lenskit.load_model("tiny-gpt-neox"), points=BOTH)


# --- the app -------------------------------------------------------------------------------


@pytest.mark.parametrize("page", ["pages/trajectory.py", "pages/compare.py"])
def test_pages_show_sublayer_rows_when_ticked(page, tiny_llama, tmp_path, monkeypatch):
    from lenskit_app.paths import DIRS_ENV

    monkeypatch.setenv(DIRS_ENV, str(tmp_path))
    lens = TunedLens.untrained(tiny_llama, points=BOTH).save(tmp_path / "lens")
    at = AppTest.from_file(str(ROOT / page), default_timeout=300)
    at.session_state[S.MODEL] = "tiny-llama"
    at.session_state[S.PROMPT] = PROMPT
    at.session_state[S.LENS_PATHS] = {"tuned": str(lens)}
    at.run()
    box = next(c for c in at.checkbox if c.label.startswith("Sub-layer rows"))
    box.check().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert "L0.mid" in spec["layout"]["yaxis"]["ticktext"]  # stride counts blocks


def test_train_page_offers_sublayer_translators(tmp_path, monkeypatch):
    from lenskit_app.paths import DIRS_ENV

    monkeypatch.setenv(DIRS_ENV, str(tmp_path))
    at = AppTest.from_file(str(ROOT / "pages/train.py"), default_timeout=300)
    at.session_state[S.MODEL] = "tiny-llama"
    at.run()
    assert not at.exception, at.exception
    box = next(c for c in at.checkbox if c.label.startswith("Sub-layer rows"))
    assert "resid_pre,resid_mid" in box.help
