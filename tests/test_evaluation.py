"""Corpus evaluation: exact metrics, standard errors over chunks, transfer, CLI and bad input."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import lenskit
from lenskit import cli, plotting
from lenskit.commands import eval as eval_cmd
from lenskit.data import Corpus, TokenChunks
from lenskit.errors import LenskitError
from lenskit.evaluation import eval_chunks, evaluate
from lenskit.evaluation.layer_kl import layer_kl, layer_kl_sums, layer_kl_tokens
from lenskit.evaluation.results import COLUMNS, METRICS, PER_BYTE, ChunkMoments
from lenskit.lenses.jacobian import JLens
from lenskit.lenses.tuned import TunedLens

SEQ = 32
TEXT = (
    "Now is the winter of our discontent made glorious summer by this sun of York; "
    "and all the clouds that lour'd upon our house in the deep bosom of the ocean buried. "
)
CORPUS = Corpus("test-corpus", tuple(f"{i}: {TEXT * 3}" for i in range(4)))


def randomised(model, *, dtype=None, scale=0.05) -> TunedLens:
    lens = TunedLens.untrained(model, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)
    return lens.eval()


@pytest.fixture(scope="module")
def chunks(tiny_llama) -> TokenChunks:
    return eval_chunks(tiny_llama, CORPUS, tokens=5 * SEQ, seq_len=SEQ)


def brute_force(model, translators, tokens):
    """Per lens, layer and metric: (mean, SE over chunks), all in float64, from a TL cache."""
    logits, cache = model.run_with_cache(tokens)
    lp = torch.log_softmax(logits.double()[:, :-1], -1)
    nxt = tokens[:, 1:].unsqueeze(-1)
    bits = 1 / math.log(2)
    out = {}

    def add(key, per_position):
        per_chunk = per_position.mean(-1)
        se = per_chunk.std(unbiased=True) / math.sqrt(len(per_chunk))
        out[key] = (per_chunk.mean().item(), se.item())

    for name, move in translators.items():
        for layer in range(model.cfg.n_layers):
            h = move(cache[f"blocks.{layer}.hook_resid_pre"].double()[:, :-1], layer)
            lq = torch.log_softmax(model.unembed(model.ln_final(h)).double(), -1)
            add((name, layer, "kl_bits"), (lp.exp() * (lp - lq)).sum(-1) * bits)
            add((name, layer, "ce_bits"), -lq.gather(-1, nxt).squeeze(-1) * bits)
            add((name, layer, "entropy_bits"), -(lq.exp() * lq).sum(-1) * bits)
            add((name, layer, "top1_agree"), (lq.argmax(-1) == lp.argmax(-1)).double())
    add(("model", 4, "ce_bits"), -lp.gather(-1, nxt).squeeze(-1) * bits)
    add(("model", 4, "entropy_bits"), -(lp.exp() * lp).sum(-1) * bits)
    return out


def test_every_metric_matches_a_float64_brute_force(tiny_llama, chunks):
    tuned = randomised(tiny_llama)
    result = evaluate(
        tiny_llama,
        {"logit": lenskit.get_lens("logit", tiny_llama), "tuned": tuned},
        chunks,
        tokens=chunks.n_tokens,
        batch_size=2,
        progress=False,
    )
    model64 = lenskit.load_model("tiny-llama", dtype="float64")
    w = {k: v.double() for k, v in tuned.translator_state().items()}
    moves = {
        "logit": lambda h, i: h,
        "tuned": lambda h, i: h + h @ w[f"{i}.weight"].T + w[f"{i}.bias"],
    }
    with torch.no_grad():
        expected = brute_force(model64, moves, chunks.tokens)
    frame = result.to_frame().set_index(["lens", "layer"])
    assert len(expected) == 2 * 4 * 4 + 2
    for (lens, layer, metric), (mean, se) in expected.items():
        assert frame.loc[(lens, layer), metric] == pytest.approx(mean, abs=1e-5)
        assert frame.loc[(lens, layer), f"{metric}_se"] == pytest.approx(se, abs=1e-5)
    ratio = chunks.n_tokens / chunks.n_bytes
    for metric in PER_BYTE:
        for suffix in ("", "_se"):
            assert frame[f"{metric}_per_byte{suffix}"].tolist() == pytest.approx(
                (frame[f"{metric}{suffix}"] * ratio).tolist(), nan_ok=True
            )
    model_row = frame.loc[("model", 4)]
    assert (model_row.kl_bits, model_row.top1_agree, model_row.layer_label) == (0, 1, "output")
    assert result.tokens == 5 * SEQ and result.scored_tokens == 5 * (SEQ - 1)
    assert result.chunks == 5 and frame.attrs["se_unit"] == "chunk"


def test_untrained_tuned_lens_scores_exactly_as_the_logit_lens(tiny_llama, chunks):
    result = evaluate(
        tiny_llama,
        {"logit": lenskit.get_lens("logit", tiny_llama), "zero": TunedLens.untrained(tiny_llama)},
        chunks,
        tokens=chunks.n_tokens,
        progress=False,
    )
    frame = result.to_frame()
    numbers = [c for c in COLUMNS if c not in ("lens", "kind", "objective", "note")]
    logit = frame[frame.lens == "logit"][numbers].reset_index(drop=True)
    zero = frame[frame.lens == "zero"][numbers].reset_index(drop=True)
    pd.testing.assert_frame_equal(logit, zero, check_exact=True)
    # training's held-out KL agrees on the scored positions (the chunks less their last token)
    scored = TokenChunks(chunks.tokens[:, :-1].contiguous(), 0, "scored")
    held = layer_kl(tiny_llama, TunedLens.untrained(tiny_llama), scored)
    assert held.kl_bits.tolist() == pytest.approx(logit.kl_bits.tolist(), abs=1e-6)


def test_batch_size_does_not_change_the_numbers(tiny_llama, chunks):
    lenses = [lenskit.get_lens("logit", tiny_llama)]
    one = evaluate(tiny_llama, lenses, chunks, tokens=3 * SEQ, batch_size=1, progress=False).metrics
    three = evaluate(
        tiny_llama, lenses, chunks, tokens=3 * SEQ, batch_size=2, progress=False
    ).metrics
    cols = [f"{m}{s}" for m in METRICS for s in ("", "_se")]
    assert one[cols].to_numpy() == pytest.approx(three[cols].to_numpy(), abs=1e-6)
    assert list(one.columns) == list(COLUMNS) and len(one) == 4 + 1


def test_chunk_moments_merge_batches_exactly():
    values = torch.randn(3, 2, 17, dtype=torch.float64) * 5 + 100
    moments = ChunkMoments((3, 2))
    for lo, hi in ((0, 1), (1, 8), (8, 8), (8, 17)):
        moments.add(values[..., lo:hi])
    assert moments.count == 17 and moments.mean.shape == (3, 2)  # nothing kept per chunk
    assert torch.allclose(moments.mean, values.mean(-1))
    assert torch.allclose(moments.se(), values.std(-1) / math.sqrt(17))
    single = ChunkMoments((1,))
    single.add(torch.ones(1, 1))
    assert math.isnan(single.se().item())


def test_jacobian_lens_uncovered_layers_are_nan_with_a_note(tiny_llama, chunks):
    result = evaluate(
        tiny_llama,
        {"logit": lenskit.get_lens("logit", tiny_llama), "jlens": JLens.identity(tiny_llama)},
        chunks,
        tokens=chunks.n_tokens,
        progress=False,
    )
    frame = result.to_frame()
    jl = frame[frame.lens == "jlens"].set_index("layer")
    assert jl.loc[0, list(METRICS)].isna().all() and not jl.loc[0, "covered"]
    assert "not covered" in jl.loc[0, "note"]
    assert jl.note.str.contains("not trained to minimise KL").all()
    assert "not trained to minimise KL" in frame.attrs["notes"]["jlens"]
    logit = frame[frame.lens == "logit"].set_index("layer")
    assert jl.loc[1:, "kl_bits"].tolist() == pytest.approx(
        logit.loc[1:, "kl_bits"].tolist(), abs=1e-5
    )
    # what each lens was fitted for: only the tuned lens is trained to match the output
    assert set(jl.objective) == {"average_jacobian"} and set(logit.objective) == {"none"}
    assert result.lenses["jlens"]["objective"] == "average_jacobian"
    assert result.to_dict()["lenses"]["logit"]["objective"] == "none"
    # the figure leaves L0 out of the J-lens line and says so; it never borrows the logit's
    fig = plotting.metric_lines(frame, metric="kl_bits")
    lines = {t.name: t for t in fig.data if t.fill != "toself" and t.showlegend is not False}
    assert list(lines) == ["logit", "jlens (not read: L0)", "model"]  # coverage named once
    jline = lines["jlens (not read: L0)"]
    assert jline.y[0] is None and jline.y[1] == pytest.approx(jl.kl_bits[1])
    assert lines["logit"].y[0] == pytest.approx(logit.kl_bits[0])
    band = next(t for t in fig.data if t.fill == "toself" and t.legendgroup == "jlens")
    assert 0 not in band.x
    summary = eval_cmd.format_summary(result)
    assert summary.splitlines()[1].split()[-1] == "—" and "fitted for:" in summary
    assert "jlens average_jacobian" in summary


def test_layer_kl_skips_rows_a_lens_does_not_cover(tiny_llama, chunks):
    jlens, logit = JLens.identity(tiny_llama), lenskit.get_lens("logit", tiny_llama)
    ours = layer_kl(tiny_llama, jlens, chunks)
    reference = layer_kl(tiny_llama, logit, chunks)
    assert ours.covered.tolist() == [False, True, True, True] and reference.covered.all()
    assert math.isnan(ours.kl_bits[0]) and reference.kl_bits.notna().all()
    assert ours.kl_bits[1:].tolist() == pytest.approx(reference.kl_bits[1:].tolist(), abs=1e-5)


def test_per_token_kl_matches_a_float64_reference_and_the_sums(tiny_llama, chunks):
    jlens, lens = JLens.identity(tiny_llama), randomised(tiny_llama)
    per_token = layer_kl_tokens(tiny_llama, [lens, jlens], chunks.tokens, batch_size=2)
    assert per_token.shape == (2, tiny_llama.cfg.n_layers, chunks.n_tokens)
    sums = layer_kl_sums(tiny_llama, [lens, jlens], chunks.tokens)
    torch.testing.assert_close(
        per_token.double().sum(-1), sums, rtol=1e-5, atol=1e-4, equal_nan=True
    )
    assert per_token[1, 0].isnan().all() and not per_token[0].isnan().any()
    logits, cache = tiny_llama.run_with_cache(chunks.tokens)
    p = torch.log_softmax(logits.double(), -1).flatten(0, 1)
    for layer in (0, tiny_llama.cfg.n_layers - 1):
        h = cache[f"blocks.{layer}.hook_resid_pre"].flatten(0, 1)
        q = torch.log_softmax(lens.forward(h, layer).double(), -1)
        reference = (p.exp() * (p - q)).sum(-1)  # KL(model || lens) in nats, per token
        torch.testing.assert_close(per_token[0, layer].double(), reference, rtol=1e-3, atol=1e-4)


_FLAT_MEMORY_SCRIPT = """
import json, sys, torch, lenskit
from lenskit.evaluation import eval_chunks, evaluate
from lenskit.lenses.jacobian import JLens

def peak_kb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))

def reset_peak():
    with open("/proc/self/clear_refs", "w") as refs:  # "5": peak RSS := current RSS
        refs.write("5")

torch.set_num_threads(1)  # a 64-wide model gains nothing from threads
n = int(sys.argv[1])
model = lenskit.load_model("tiny-llama")
data = eval_chunks(model, None, tokens=4 * n, seq_len=128)  # the input is held throughout
lenses = {"logit": lenskit.get_lens("logit", model), "jacobian": JLens.identity(model)}
evaluate(model, lenses, data, tokens=n, batch_size=8, progress=False)  # warm up
growth = {}
for tokens in (n, 4 * n):
    reset_peak()
    before = peak_kb()
    result = evaluate(model, lenses, data, tokens=tokens, batch_size=8, progress=False)
    growth[tokens] = peak_kb() - before
    assert result.tokens == tokens and result.metrics.kl_bits.notna().sum() == 8
print(json.dumps(growth))
"""


def test_memory_stays_flat_as_the_token_count_grows():
    """Peak RSS of evaluate on 4N tokens is that of N tokens: only per-chunk means are kept.

    A fresh process with a fixed malloc mmap threshold, so the peak is not blurred by the
    allocator's history; Linux's clear_refs resets the peak before each run.
    """
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    n = 8192
    run = subprocess.run(
        [sys.executable, "-c", _FLAT_MEMORY_SCRIPT, str(n)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    growth = {int(k): v for k, v in json.loads(run.stdout.strip().splitlines()[-1]).items()}
    # keeping ~170 bytes or more per token would add > 4 MB over the 3N more tokens
    assert growth[4 * n] < growth[n] + 4096, growth


def test_transfer_matrix(tiny_llama, chunks):
    tuned = randomised(tiny_llama)
    result = evaluate(
        tiny_llama,
        {"logit": lenskit.get_lens("logit", tiny_llama), "tuned": tuned},
        chunks,
        tokens=2 * SEQ,
        transfer=True,
        progress=False,
    )
    matrix = result.transfer_matrix("tuned")
    assert matrix.shape == (4, 4) and set(result.transfer.lens) == {"tuned"}
    kl = result.metrics.set_index(["lens", "layer"]).kl_bits
    for i in range(4):
        assert matrix.loc[i, i] == pytest.approx(kl["tuned", i], abs=1e-5)
    assert abs(matrix.loc[2, 0] - matrix.loc[0, 0]) > 1e-3
    # translator 2 on layer 0, by hand, on the same two chunks (drawn with the same seed)
    tokens = eval_chunks(tiny_llama, chunks, tokens=2 * SEQ).tokens
    with torch.no_grad():
        logits, cache = tiny_llama.run_with_cache(tokens)
        lp = torch.log_softmax(logits[:, :-1].double(), -1)
        lq = torch.log_softmax(tuned(cache["blocks.0.hook_resid_pre"][:, :-1], 2).double(), -1)
    by_hand = ((lp.exp() * (lp - lq)).sum(-1).mean() / math.log(2)).item()
    assert matrix.loc[2, 0] == pytest.approx(by_hand, abs=1e-5)
    with pytest.raises(LenskitError, match="transfer needs a tuned lens"):
        evaluate(
            tiny_llama,
            [lenskit.get_lens("logit", tiny_llama)],
            chunks,
            tokens=SEQ,
            transfer=True,
            progress=False,
        )


def test_bad_input_is_one_line_lenskit_error(tiny_llama, tiny_gpt2, chunks, tmp_path):
    logit = lenskit.get_lens("logit", tiny_llama)
    cases = [
        (dict(lenses=[logit, lenskit.get_lens("logit", tiny_llama)]), "duplicate lens name"),
        (dict(lenses={"model": logit}), "bad lens name 'model'"),
        (dict(lenses={"a": lenskit.get_lens("logit", tiny_gpt2)}), "another model"),
        (dict(lenses=[]), "no lenses"),
        (dict(tokens=chunks.n_tokens + SEQ), f"only {chunks.n_tokens} tokens"),
        (dict(data=CORPUS, seq_len=4096), "seq_len must be in 2..128"),
        (dict(tokens=SEQ - 1), "less than one chunk"),
        (dict(batch_size=0), "batch_size"),
        (dict(seq_len=16), "seq_len=16 but the chunks have 32"),
    ]
    for changes, message in cases:
        kwargs = {"lenses": [logit], "data": chunks, "tokens": SEQ, "progress": False, **changes}
        with pytest.raises(LenskitError, match=message) as err:
            evaluate(tiny_llama, kwargs.pop("lenses"), kwargs.pop("data"), **kwargs)
        assert "\n" not in str(err.value)
    available = r"only \d+ tokens \(\d+ chunks of 32\), fewer than the 100000 asked"
    with pytest.raises(LenskitError, match=available):
        eval_chunks(tiny_llama, CORPUS, tokens=100_000, seq_len=SEQ)
    held = eval_chunks(tiny_llama, CORPUS, tokens=SEQ, seq_len=SEQ, held_out=0.25)
    assert held.source == "test-corpus:heldout" and held.n_tokens == SEQ
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(LenskitError, match="no text found"):
        evaluate(tiny_llama, [logit], str(tmp_path / "empty.txt"), tokens=SEQ, seq_len=SEQ)
    with pytest.raises(LenskitError, match="no file or folder"):
        evaluate(tiny_llama, [logit], str(tmp_path / "missing.txt"), tokens=SEQ, seq_len=SEQ)


# --- the command line --------------------------------------------------------------------


@pytest.fixture
def cli_env(tiny_llama, tmp_path, monkeypatch):
    """A data file, a tuned lens folder, and the session's tiny model for every load."""
    monkeypatch.setattr("lenskit.models.load_model", lambda name, device="cpu": tiny_llama)
    data = tmp_path / "data.txt"
    data.write_text(TEXT * 20, encoding="utf-8")
    randomised(tiny_llama).save(tmp_path / "lens")
    return tmp_path


def run_cli(capsys, *args):
    code = cli.main(
        ["eval", "--model", "tiny-llama", "--seq-len", str(SEQ), "--quiet", "--no-png", *args]
    )
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def test_lens_names_from_specs():
    assert eval_cmd.lens_names(None) == {"logit": "logit"}
    assert eval_cmd.lens_names(["a=tuned:/x", "tuned:/y=z", "logit"]) == {
        "a": "tuned:/x",
        "tuned": "tuned:/y=z",
        "logit": "logit",
    }
    with pytest.raises(LenskitError, match="duplicate lens name 'tuned'"):
        eval_cmd.lens_names(["tuned:/x", "tuned:/y"])
    with pytest.raises(LenskitError, match="reference row"):
        eval_cmd.lens_names(["model=logit"])


def test_cli_writes_every_output(cli_env, capsys):
    out = cli_env / "run"
    code, printed, _ = run_cli(
        capsys,
        "--lens",
        "logit",
        "--lens",
        f"tuned:{cli_env / 'lens'}",
        "--data",
        str(cli_env / "data.txt"),
        "--tokens",
        "96",
        "--out",
        str(out),
        "--transfer",
    )
    assert code == 0 and "tuned KL" in printed and "tokens/s" in printed
    files = {p.name for p in out.iterdir()}
    assert files == {"metrics.csv", "metrics.json", "transfer.csv", *(f"{m}.html" for m in METRICS)}
    meta = json.loads((out / "metrics.json").read_text())
    assert meta["model"] == "tiny-llama" and meta["tokens"] == 96 and meta["seq_len"] == SEQ
    assert meta["lenses"]["tuned"]["source"] == str(cli_env / "lens")
    assert meta["source"] == str(cli_env / "data.txt") and meta["seed"] == 0
    assert meta["lenskit_version"] == lenskit.__version__ and len(meta["metrics"]) == 9
    csv = pd.read_csv(out / "metrics.csv")
    assert list(csv.columns) == list(COLUMNS) and len(csv) == 9
    assert len(pd.read_csv(out / "transfer.csv")) == 16
    # a second run replaces the first; no temporary folders are left beside it
    assert (
        run_cli(capsys, "--data", str(cli_env / "data.txt"), "--tokens", "64", "--out", str(out))[0]
        == 0
    )
    assert json.loads((out / "metrics.json").read_text())["tokens"] == 64
    assert not (out / "transfer.csv").exists()
    assert sorted(p.name for p in cli_env.iterdir()) == ["data.txt", "lens", "run"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lens", "tuned:{gpt2}"], "trained for a model with 3 layers"),
        (["--lens", "tuned:{lens}", "--lens", "tuned:{lens}"], "duplicate lens name 'tuned'"),
        (["--lens", "nope"], "unknown lens kind"),
        (["--tokens", "100000"], "fewer than the"),
        (["--data", "{empty}"], "no text found"),
        (["--out", "{busy}"], "holds other files"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(cli_env, tiny_gpt2, capsys, args, message):
    TunedLens.untrained(tiny_gpt2).save(cli_env / "gpt2")
    (cli_env / "empty.txt").write_text("")
    (cli_env / "busy").mkdir()
    (cli_env / "busy" / "keep.txt").write_text("mine")
    paths = {
        "gpt2": cli_env / "gpt2",
        "lens": cli_env / "lens",
        "empty": cli_env / "empty.txt",
        "busy": cli_env / "busy",
    }
    args = [a.format(**paths) for a in args]
    base = {"--data": str(cli_env / "data.txt"), "--tokens": "64", "--out": str(cli_env / "o")}
    for i in range(0, len(args), 2):
        base.pop(args[i], None)
    flat = [x for kv in base.items() for x in kv]
    code, _, err = run_cli(capsys, *flat, *args)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (cli_env / "o").exists()
    assert not [p for p in cli_env.iterdir() if p.name.startswith(".")]
    assert [p.name for p in (cli_env / "busy").iterdir()] == ["keep.txt"]


def test_interrupted_write_leaves_no_results(cli_env, capsys, monkeypatch):
    calls = []

    def failing(fig, path, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr("lenskit.export.save_figure", failing)
    code, _, err = run_cli(
        capsys, "--data", str(cli_env / "data.txt"), "--tokens", "64", "--out", str(cli_env / "o")
    )
    assert code == 130 and "interrupted" in err[0]
    assert not (cli_env / "o").exists()
    assert not [p for p in cli_env.iterdir() if p.name.startswith(".")]


def test_png_is_skipped_with_a_note_without_a_browser(cli_env, monkeypatch, capsys):
    from lenskit.export import save_figure as real

    def no_browser(fig, path, **kw):
        if str(path).endswith(".png"):
            raise LenskitError("no Chrome or Chromium was found for .png export: save as .html")
        return real(fig, path, **kw)

    monkeypatch.setattr("lenskit.export.save_figure", no_browser)
    code = cli.main(
        [
            "eval",
            "--model",
            "tiny-llama",
            "--seq-len",
            str(SEQ),
            "--quiet",
            "--data",
            str(cli_env / "data.txt"),
            "--tokens",
            "64",
            "--out",
            str(cli_env / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 0 and err.count("skipped PNG") == 1
    names = {p.name for p in (cli_env / "o").iterdir()}
    assert "kl_bits.html" in names and not any(n.endswith(".png") for n in names)


# --- the real model ----------------------------------------------------------------------


@pytest.mark.slow
def test_shipped_tuned_lens_beats_the_logit_lens_on_smollm2(smollm2):
    try:
        tuned = lenskit.get_lens("tuned", smollm2)
    except LenskitError as err:
        pytest.skip(f"no shipped tuned lens: {err}")
    lenses = {"logit": lenskit.get_lens("logit", smollm2), "tuned": tuned}
    with contextlib.suppress(LenskitError):  # the J-lens, where this checkout ships it
        lenses["jacobian"] = lenskit.get_lens("jacobian", smollm2)
    result = evaluate(smollm2, lenses, None, tokens=128, seq_len=64, batch_size=2, progress=False)
    kl = result.metrics.pivot(index="layer", columns="lens", values="kl_bits")
    last = smollm2.cfg.n_layers - 1
    assert (kl.loc[: last - 1, "tuned"] < kl.loc[: last - 1, "logit"]).all(), kl
    if "jacobian" in lenses:  # scored like the others, L0 left out and marked
        assert math.isnan(kl.loc[0, "jacobian"]) and kl.loc[1:last, "jacobian"].notna().all()
        assert result.lenses["jacobian"]["objective"] == "average_jacobian"
