"""The tuned lens: identity start, files (ours and the tuned-lens package's), training."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
from pathlib import Path

import pytest
import torch
from helpers import randomised, small

import lenskit
from lenskit import cli
from lenskit.data import load_corpus, split_documents, tokenize_corpus
from lenskit.errors import LenskitError
from lenskit.evaluation.layer_kl import layer_kl
from lenskit.lenses.tuned import TunedLens
from lenskit.models import ModelAdapter
from lenskit.residual import capture, tokenize
from lenskit.training import CHECKPOINT_FILE, TrainConfig, train_tuned_lens
from lenskit.training import phases as training_loop
from lenskit.training.closed_form import fit_closed_form, normalized_target

PROMPT = "The tuned lens reads every layer."


def params(lens: TunedLens) -> dict[str, torch.Tensor]:
    return lens.translator_state()


# --- the lens ----------------------------------------------------------------------------


def test_untrained_equals_logit_lens_exactly(tiny_model):
    tuned = lenskit.get_lens("logit", tiny_model), TunedLens.untrained(tiny_model).eval()
    cap = capture(tiny_model, tokenize(tiny_model, PROMPT))
    rows = cap.lens_rows()[:, 0]
    with torch.no_grad():
        for layer in range(rows.shape[0]):
            assert torch.equal(tuned[0](rows[layer], layer), tuned[1](rows[layer], layer))


def test_translator_is_residual_affine(tiny_llama):
    lens = randomised(tiny_llama)
    h = torch.randn(5, 64)
    t = lens.translators[1]
    with torch.no_grad():
        assert torch.allclose(lens.transform_hidden(h, 1), h + h @ t.weight.T + t.bias)
        assert torch.equal(lens.transform_hidden(h, 4), h)  # the final row is the identity
    assert "tuned" in lenskit.available_lenses()


def test_save_load_round_trip(tiny_model, tmp_path):
    lens = randomised(tiny_model)
    lens.save(tmp_path / "pt")
    loaded = lenskit.get_lens("tuned", tiny_model, path=str(tmp_path / "pt"))
    assert set(os.listdir(tmp_path / "pt")) == {"config.json", "params.pt"}
    for key, value in params(lens).items():
        assert torch.equal(params(loaded)[key], value)
    lens.save(tmp_path / "st", dtype=torch.float16, safetensors=True)
    half = TunedLens.load(tiny_model, tmp_path / "st")
    assert half.translators[0].weight.dtype == torch.float32  # upcast to the model's dtype
    for key, value in params(lens).items():
        assert torch.allclose(params(half)[key], value, atol=1e-3)
    config = json.loads((tmp_path / "pt" / "config.json").read_text())
    assert config["lens_type"] == "linear_tuned_lens" and config["bias"] is True
    assert config["d_model"] == 64 and config["num_hidden_layers"] == tiny_model.cfg.n_layers


def test_tuned_lens_package_layout_loads(tiny_llama, tmp_path):
    """A folder as tuned-lens writes it: its config keys and a ModuleList state dict."""
    translators = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(4))
    torch.save(translators.state_dict(), tmp_path / "params.pt")
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "base_model_name_or_path": "tiny-llama",
                "d_model": 64,
                "num_hidden_layers": 4,
                "bias": True,
                "base_model_revision": None,
                "unembed_hash": "abc",
                "lens_type": "linear_tuned_lens",
            }
        )
    )
    lens = TunedLens.load(tiny_llama, tmp_path)
    for i, translator in enumerate(translators):
        assert torch.equal(lens.translators[i].weight, translator.weight.detach())
        assert torch.equal(lens.translators[i].bias, translator.bias.detach())


def _break(folder: Path, how: str) -> str:
    config = json.loads((folder / "config.json").read_text())
    raw = (folder / "params.pt").read_bytes()
    state = torch.load(folder / "params.pt", weights_only=True)
    if how == "d_model":
        config["d_model"] = 768
        (folder / "config.json").write_text(json.dumps(config))
        return "d_model 768"
    if how == "layers":
        config["num_hidden_layers"] = 12
        (folder / "config.json").write_text(json.dumps(config))
        return "12 layers"
    if how == "truncated":
        (folder / "params.pt").write_bytes(raw[: len(raw) // 2])
        return "truncated or corrupt"
    if how == "corrupt":
        (folder / "params.pt").write_bytes(b"not a checkpoint" * 100)
        return "truncated or corrupt"
    if how == "missing_key":
        del state["3.bias"]
        torch.save(state, folder / "params.pt")
        return "lacks 3.bias"
    if how == "wrong_shape":
        state["2.weight"] = torch.zeros(64, 32)
        torch.save(state, folder / "params.pt")
        return "2.weight"
    if how == "nan":
        state["1.bias"][0] = float("nan")
        torch.save(state, folder / "params.pt")
        return "NaN"
    if how == "bad_json":
        (folder / "config.json").write_text("{not json")
        return "not JSON"
    if how == "no_params":
        (folder / "params.pt").unlink()
        return "no params.pt"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "d_model",
        "layers",
        "truncated",
        "corrupt",
        "missing_key",
        "wrong_shape",
        "nan",
        "bad_json",
        "no_params",
    ],
)
def test_bad_lens_files_raise_one_line_errors(tiny_llama, tmp_path, how):
    randomised(tiny_llama).save(tmp_path)
    expected = _break(tmp_path, how)
    with pytest.raises(LenskitError) as err:
        TunedLens.load(tiny_llama, tmp_path)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_no_path_and_no_shipped_lens_says_how_to_train(tiny_llama, tmp_path):
    with pytest.raises(LenskitError, match="lenskit train --model tiny-llama"):
        lenskit.get_lens("tuned", tiny_llama)
    with pytest.raises(LenskitError, match="no tuned lens folder"):
        lenskit.get_lens("tuned", tiny_llama, path=str(tmp_path / "nowhere"))
    with pytest.raises(LenskitError, match="only path="):
        lenskit.get_lens("tuned", tiny_llama, path=str(tmp_path), bogus=1)


# --- the closed-form start ---------------------------------------------------------------


def test_closed_form_matches_float64_lstsq(tiny_model, corpus_dir):
    train, _ = split_documents(load_corpus(corpus_dir), 0.1)
    tokens = tokenize_corpus(train, tiny_model.tokenizer, 32, max_tokens=1024).tokens
    ridge = 1e-3  # block inputs of layer 0 are embeddings of few bytes: rank-deficient
    lens = fit_closed_form(tiny_model, tokens, ridge=ridge, batch_size=8)
    adapter = ModelAdapter(tiny_model)
    cap = capture(tiny_model, tokens)
    y = normalized_target(adapter, cap.final.flatten(0, 1))
    d = adapter.d_model
    for layer in range(adapter.n_layers):
        x = cap.stack("resid_pre")[layer].flatten(0, 1).double()
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
        # ridge as extra rows sqrt(lam) * [I, 0] with target 0; lam relative to mean x^2
        lam = ridge * x.pow(2).sum(0).mean()
        penalty = torch.cat([torch.eye(d, dtype=torch.float64), torch.zeros(d, 1)], 1)
        xa = torch.cat([xa, lam.sqrt() * penalty.double()])
        ya = torch.cat([y, torch.zeros(d, d, dtype=torch.float64)])
        solution = torch.linalg.lstsq(xa, ya, driver="gelsd").solution
        scale = x.pow(2).mean().sqrt().clamp_min(1.0)  # the norm ignores it; see solve()
        weight = scale * solution[:-1].T - torch.eye(adapter.d_model, dtype=torch.float64)
        got = lens.translators[layer]
        assert torch.allclose(got.weight.double(), weight, atol=2e-4, rtol=1e-3), layer
        assert torch.allclose(got.bias.double(), scale * solution[-1], atol=2e-4, rtol=1e-3)


def test_normalized_target_is_the_norm_before_its_gain(tiny_model):
    adapter = ModelAdapter(tiny_model)
    h = torch.randn(3, 7, adapter.d_model) * 5
    ln = tiny_model.ln_final._original_component
    bias = ln.bias if getattr(ln, "bias", None) is not None else 0.0
    with torch.no_grad():
        expected = (adapter.final_norm(h) - bias) / ln.weight
    assert torch.allclose(normalized_target(adapter, h).float(), expected, atol=1e-4)


def test_lean_kl_step_matches_plain_autograd(tiny_llama, monkeypatch):
    from lenskit.training import kl_step as fitting

    tokens = tokenize(tiny_llama, PROMPT * 3)
    results = []
    for plain in (True, False):
        lens = randomised(tiny_llama, scale=0.02)
        if not plain:
            monkeypatch.setattr(fitting, "_plain_unembed", lambda adapter: False)
        sums = fitting.kl_step(lens, tiny_llama, tokens, scale=0.01)
        results.append((sums, [p.grad.clone() for p in lens.parameters()]))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for fast, slow in zip(results[0][1], results[1][1], strict=True):
        assert torch.allclose(fast, slow, rtol=1e-4, atol=1e-6)


# --- training ----------------------------------------------------------------------------


def test_training_lowers_held_out_kl_and_writes_files(tiny_llama, corpus_dir, tmp_path):
    result = train_tuned_lens(tiny_llama, small(corpus_dir), tmp_path, progress=False)
    frame = result.to_frame()
    assert list(frame.columns) == ["layer", "logit_kl_bits", "tuned_kl_bits"]
    assert frame.tuned_kl_bits.mean() < 0.8 * frame.logit_kl_bits.mean()
    assert set(os.listdir(tmp_path)) == {"config.json", "params.pt", "metrics.json"}
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["tokens"] == 256 and len(metrics["per_layer"]) == 4
    assert metrics["timings"]["kl_tokens_per_s"] > 0
    loaded = TunedLens.load(tiny_llama, tmp_path)
    for key, value in params(result.lens).items():
        assert torch.equal(params(loaded)[key], value)
    chunks = tokenize_corpus(
        split_documents(load_corpus(corpus_dir), 0.1)[1], tiny_llama.tokenizer, 32, max_tokens=256
    )
    held = layer_kl(tiny_llama, loaded, chunks)
    assert list(held.columns) == ["layer", "kl_bits", "covered"]
    assert held.kl_bits.tolist() == pytest.approx(list(result.tuned_kl), rel=1e-4)


def test_sgd_and_zero_init_train_too(tiny_gpt2, corpus_dir, tmp_path):
    config = small(
        corpus_dir, model="tiny-gpt2", optimizer="sgd", init="zero", tokens=128, val_tokens=0
    )
    result = train_tuned_lens(tiny_gpt2, config, tmp_path, progress=False)
    assert sum(result.tuned_kl) < sum(result.logit_kl)


def _interrupt_on(monkeypatch, name: str, call: int) -> None:
    real, calls = getattr(training_loop, name), []

    def fake(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training_loop, name, fake)


@pytest.mark.parametrize(("name", "call"), [("kl_step", 3), ("capture", 4)])
def test_resume_ends_with_the_uninterrupted_lens(
    tiny_llama, corpus_dir, tmp_path, monkeypatch, name, call
):
    config = small(corpus_dir, checkpoint_every=1)
    whole = train_tuned_lens(tiny_llama, config, tmp_path / "whole", progress=False)
    with monkeypatch.context() as patch:
        _interrupt_on(patch, name, call)
        with pytest.raises(KeyboardInterrupt):
            train_tuned_lens(tiny_llama, config, tmp_path / "cut", progress=False)
    assert (tmp_path / "cut" / CHECKPOINT_FILE).is_file()
    with pytest.raises(LenskitError, match="--resume"):
        train_tuned_lens(tiny_llama, config, tmp_path / "cut", progress=False)
    resumed = train_tuned_lens(tiny_llama, config, tmp_path / "cut", resume=True, progress=False)
    for key, value in params(whole.lens).items():
        assert torch.allclose(params(resumed.lens)[key], value, atol=1e-6, rtol=0), key
    assert not (tmp_path / "cut" / CHECKPOINT_FILE).exists()


def test_resume_refuses_other_settings(tiny_llama, corpus_dir, tmp_path, monkeypatch):
    config = small(corpus_dir)
    with monkeypatch.context() as patch:
        _interrupt_on(patch, "kl_step", 2)
        with pytest.raises(KeyboardInterrupt):
            train_tuned_lens(tiny_llama, config, tmp_path, progress=False)
    with pytest.raises(LenskitError, match="made with seed=0, not 1"):
        train_tuned_lens(
            tiny_llama, small(corpus_dir, seed=1), tmp_path, resume=True, progress=False
        )


@pytest.mark.parametrize(
    "changes",
    [
        dict(tokens_per_step=48),
        dict(optimizer="lbfgs"),
        dict(tokens=-1),
        dict(held_out=1.0),
        dict(lr=0.0),
        dict(dtype="bfloat16"),
        dict(init="random"),
    ],
)
def test_config_refuses_bad_settings(corpus_dir, changes):
    with pytest.raises(LenskitError):
        small(corpus_dir, **changes)


def test_config_round_trips(corpus_dir):
    config = small(corpus_dir, optimizer="sgd")
    assert config.lr == 1.0 and TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(LenskitError, match="unknown training settings"):
        TrainConfig.from_dict({**config.to_dict(), "epochs": 3})


def _rank(rank: int, port: int, config: TrainConfig, out: str) -> None:
    code = 1
    try:
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            LOCAL_RANK=str(rank),
        )
        torch.set_num_threads(1)
        model = lenskit.load_model("tiny-llama")
        train_tuned_lens(model, config, out, progress=False)
        code = 0
    finally:
        os._exit(code)


def test_two_processes_match_one(tiny_llama, corpus_dir, tmp_path):
    config = small(corpus_dir)
    single = train_tuned_lens(tiny_llama, config, tmp_path / "one", progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_rank, args=(r, port, config, str(tmp_path / "two"))) for r in range(2)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    double = TunedLens.load(tiny_llama, tmp_path / "two")
    for key, value in params(single.lens).items():
        assert torch.allclose(params(double)[key], value, atol=1e-4, rtol=1e-3), key
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["world_size"] == 2


def test_cli_trains_and_reports_bad_settings(corpus_dir, tmp_path, capsys):
    out = tmp_path / "lens"
    argv = [
        "train",
        "--model",
        "tiny-llama",
        "--data",
        str(corpus_dir),
        "--tokens",
        "64",
        "--seq-len",
        "32",
        "--tokens-per-step",
        "64",
        "--lstsq-tokens",
        "256",
        "--eval-tokens",
        "64",
        "--val-tokens",
        "0",
        "--out",
        str(out),
        "--quiet",
    ]
    assert cli.main(argv) == 0
    assert "mean" in capsys.readouterr().out
    assert (out / "params.pt").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["command"].startswith("lenskit train --model tiny-llama")
    assert cli.main(argv) == 2  # the folder already holds a lens
    assert "already holds a lens" in capsys.readouterr().err
    assert cli.main([*argv[:-3], "--seq-len", "48", "--out", str(tmp_path / "x")]) == 2
    assert "tokens_per_step" in capsys.readouterr().err


# --- the shipped lens (slow: SmolLM2) ----------------------------------------------------


@pytest.mark.slow
def test_shipped_lens_beats_the_logit_lens(smollm2):
    tuned = lenskit.get_lens("tuned", smollm2)
    assert tuned.source is not None and tuned.source.endswith("smollm2-135m")
    prompt = "Fair is foul, and foul is fair: hover through the fog and filthy air."
    kl = {}
    for kind, lens in (("logit", lenskit.get_lens("logit", smollm2)), ("tuned", tuned)):
        traj = lenskit.trajectory(smollm2, lens, prompt)
        kl[kind] = traj.kl_to_final[:-1].mean().item()
    assert kl["tuned"] < 0.5 * kl["logit"]
