"""Training settings from one source, typed run state, bf16 KL steps, budgets, folder locks,
SIGTERM, stale temporary files, and unfinished runs in the app."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import torch
from helpers import SMALL, randomised, write_corpus
from helpers import small as small_config
from streamlit.testing.v1 import AppTest

import lenskit_app.state as S
from lenskit import cli
from lenskit.commands.flags import add_flags, config_from_args
from lenskit.data import load_corpus, split_documents, tokenize_corpus
from lenskit.errors import LenskitError
from lenskit.residual import tokenize
from lenskit.training import (
    CHECKPOINT_FILE,
    QUICK,
    RunState,
    TrainConfig,
    checkpoint_config,
    train_tuned_lens,
    unfinished_runs,
)
from lenskit.training.checkpoints import load_checkpoint
from lenskit.training.kl_step import Bf16Unembedding, bf16_logsumexp, kl_step
from lenskit.training.lock import LOCK_FILE, FolderLock, holder
from lenskit.training.loop import _data
from lenskit.training.phases import clearly_better
from lenskit_app.paths import DIRS_ENV

ROOT = Path(__file__).resolve().parents[1]


def small(corpus_dir: Path, **changes) -> TrainConfig:
    return small_config(corpus_dir, **{"eval_tokens": 64, **changes})


# --- one source of settings -------------------------------------------------------------


def test_cli_flags_take_every_default_from_the_config():
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--out", "x"])
    for f in dataclasses.fields(TrainConfig):
        assert getattr(args, f.name) == getattr(TrainConfig(), f.name) or (
            f.name == "lr" and args.lr is None
        ), f.name
    choices = {
        a.dest: a.choices for a in parser._subparsers._group_actions[0].choices["train"]._actions
    }
    assert choices["optimizer"] == ("adam", "sgd") and choices["precision"][0] == "auto"


def test_flags_from_any_dataclass():
    @dataclasses.dataclass(frozen=True)
    class Demo:
        n_items: int = dataclasses.field(default=3, metadata={"help": "how many"})
        name: str | None = None
        rate: float = 0.5
        kind: str = dataclasses.field(default="a", metadata={"choices": ("a", "b")})
        keep: bool = True

    parser = argparse.ArgumentParser()
    add_flags(parser, Demo, defaults=Demo(n_items=7))
    assert "how many" in parser.format_help()
    args = parser.parse_args(["--rate", "2", "--kind", "b", "--no-keep", "--name", "z"])
    assert config_from_args(Demo, args) == Demo(7, "z", 2.0, "b", False)
    with pytest.raises(SystemExit):
        parser.parse_args(["--kind", "c"])


def test_the_app_preset_is_a_config_and_smaller():
    assert isinstance(QUICK, TrainConfig)
    assert QUICK.tokens < TrainConfig().tokens and QUICK.lstsq_tokens < TrainConfig().lstsq_tokens


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.setenv(DIRS_ENV, str(tmp_path))
    write_corpus(tmp_path / "corpus")
    return tmp_path.resolve()


def _train_page(**state) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.session_state[S.MODEL] = "tiny-llama"
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    at.switch_page("pages/train.py")
    return at.run()


APP_FIELDS = {
    "Tokens per sequence": "seq_len",
    "Tokens per step": "tokens_per_step",
    "Fine-tuning tokens": "tokens",
    "Closed-form tokens": "lstsq_tokens",
    "Held-out tokens (report)": "eval_tokens",
    "Validation tokens": "val_tokens",
    "Seed": "seed",
    "Minutes": "minutes",
}


def test_the_train_page_takes_its_defaults_from_the_preset(workdir):
    at = _train_page()
    assert not at.exception, at.exception
    boxes = {b.label: b.value for b in at.number_input}
    for label, name in APP_FIELDS.items():
        assert boxes[label] == getattr(QUICK, name), label
    corpus = at.radio(key="train_corpus_kind")
    assert QUICK.data == "builtin:mix" and corpus.value == "Mixed text (default)"
    assert corpus.options == ["Mixed text (default)", "Shakespeare", "File or folder"]


# --- typed run state --------------------------------------------------------------------


def test_the_checkpoint_is_a_run_state(tiny_llama, corpus_dir, tmp_path):
    def stop(p):
        if p.phase == "fine-tune":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_tuned_lens(tiny_llama, small(corpus_dir), tmp_path, progress=False, on_progress=stop)
    state = load_checkpoint(tmp_path)
    assert isinstance(state, RunState) and state.phase == "kl" and state.step == 1
    assert RunState.from_dict(state.to_dict()) == state
    with pytest.raises(ValueError, match="unknown run-state keys"):
        RunState.from_dict({**state.to_dict(), "extra": 1})


# --- bfloat16 KL steps --------------------------------------------------------------------


def test_the_training_precision_is_the_readouts_choice(monkeypatch):
    from lenskit.training.precision import resolve_precision

    for env, auto in (("exact", "float32"), ("bf16", "bfloat16"), ("fp16", "float32")):
        monkeypatch.setenv("LENSKIT_PRECISION", env)
        assert resolve_precision("auto", "cpu") == auto
        assert resolve_precision("float32", "cpu") == "float32"  # a setting beats the variable
        assert resolve_precision("bfloat16", "cpu") == "bfloat16"
    monkeypatch.setenv("LENSKIT_PRECISION", "half")
    with pytest.raises(LenskitError, match="LENSKIT_PRECISION"):
        resolve_precision("auto", "cpu")


def test_bf16_logsumexp_matches_float64_for_any_shift():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=gen)
    w, b = torch.randn(16, 300, generator=gen), torch.randn(300, generator=gen)
    expected = torch.logsumexp((x.double() @ w.double() + b.double()), -1)
    un = Bf16Unembedding(w, b)
    for shift in (expected.float(), expected.float() - 40, expected.float() + 500, torch.zeros(40)):
        got = bf16_logsumexp(x, un, shift)
        assert torch.allclose(got.double(), expected, atol=0.1, rtol=0), shift[:2]


def test_bf16_kl_step_matches_float32(tiny_llama):
    tokens = tokenize(tiny_llama, "The tuned lens reads every layer. " * 3)
    grads, sums = [], []
    for bf16 in (False, True):
        lens = randomised(tiny_llama, scale=0.02)
        un = Bf16Unembedding(lens.adapter.W_U, lens.adapter.b_U) if bf16 else None
        sums.append(kl_step(lens, tiny_llama, tokens, scale=0.01, bf16=un))
        grads.append(torch.cat([p.grad.flatten() for p in lens.parameters()]))
    assert torch.allclose(sums[0], sums[1], rtol=0.02, atol=0.02)
    assert (grads[0] - grads[1]).norm() < 0.05 * grads[0].norm()


@pytest.mark.parametrize("points", [("resid_pre",), ("resid_pre", "resid_mid")])
def test_blocked_kl_step_matches_the_layer_by_layer_float64_step(tiny_llama, monkeypatch, points):
    """Token chunks, several layers per matmul and bf16 give the float64 gradients."""
    from lenskit.training import kl_step as fitting

    tokens = tokenize(tiny_llama, "The tuned lens reads every layer. " * 3)
    lens = randomised(tiny_llama, scale=0.02)
    if points != ("resid_pre",):
        lens = type(lens)(lens.adapter, dtype=torch.float32, points=points)
        with torch.no_grad():
            for p in lens.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    state = {k: v.clone() for k, v in lens.state_dict().items()}

    def run(bf16: bool, blocked: bool, plain: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        lens.load_state_dict(state)
        lens.zero_grad(set_to_none=True)
        with monkeypatch.context() as patch:
            if blocked:  # 5-token chunks, blocks of 2 layers (10 rows) per matmul
                patch.setattr(fitting, "ROWS_PER_READOUT", 5)
                patch.setattr(fitting, "MATMUL_ROWS", {torch.bfloat16: 10, torch.float32: 10})
            if not plain:
                patch.setattr(fitting, "_plain_unembed", lambda adapter: False)
            un = Bf16Unembedding(lens.adapter.W_U, lens.adapter.b_U) if bf16 else None
            sums = fitting.kl_step(lens, tiny_llama, tokens, scale=0.01, bf16=un)
        return sums, torch.cat([p.grad.flatten() for p in lens.parameters()])

    with torch.no_grad():  # the float64 reference: the generic path on a float64 copy
        for module in (tiny_llama, lens):
            module.double()
    try:
        ref_sums, ref_grad = run(False, False, plain=False)
    finally:
        for module in (tiny_llama, lens):
            module.float()
    state = {k: v.float() for k, v in state.items()}
    for bf16, tol in ((False, 1e-4), (True, 0.05)):
        sums, grad = run(bf16, True)
        assert sums.shape == ref_sums.shape
        assert torch.allclose(sums, ref_sums, rtol=tol, atol=tol)
        assert (grad.double() - ref_grad).norm() < tol * ref_grad.norm()


def test_a_layer_keeps_its_start_unless_fine_tuning_clearly_wins():
    gen = torch.Generator().manual_seed(0)
    start = torch.rand(512, generator=gen) * 4  # one layer's KL per validation token
    noise = torch.randn(512, generator=gen)
    assert clearly_better(start, start - 0.3 + 0.1 * noise)
    assert not clearly_better(start, start - 0.01 + noise)  # a gain within the noise
    assert not clearly_better(start, start + 0.2)
    assert clearly_better(torch.tensor(2.0), torch.tensor(1.9))  # an earlier checkpoint's means


def test_validation_chunks_are_drawn_from_the_whole_stream(tiny_llama, corpus_dir):
    config = small(corpus_dir, val_tokens=4 * SMALL["seq_len"])
    pool, val, _ = _data(tiny_llama, config)
    train = split_documents(load_corpus(config.data), config.held_out, seed=config.seed)[0]
    need = max(config.lstsq_tokens + config.tokens + config.val_tokens, 1 << 20)
    every = tokenize_corpus(train, tiny_llama.tokenizer, config.seq_len, max_tokens=need).tokens
    assert len(val) == 4 and len(pool) + len(val) == len(every)
    rows = {tuple(r) for r in every.tolist()}
    assert {tuple(r) for r in torch.cat([pool, val]).tolist()} == rows
    assert not torch.equal(val, every[-4:])  # not the stream's tail, which is one kind of text
    assert torch.equal(_data(tiny_llama, config)[1], val)  # the same on a resume


@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
def test_a_run_trains_in_its_precision_and_says_so(
    tiny_llama, corpus_dir, tmp_path, monkeypatch, precision
):
    """A bfloat16 run's training forward passes (closed form, KL steps) run under autocast;
    its scoring passes, and every pass of a float32 run, do not."""
    import importlib

    from lenskit import residual
    from lenskit.training import kl_step, phases

    layer_kl = importlib.import_module("lenskit.evaluation.layer_kl")
    evaluator = importlib.import_module("lenskit.evaluation.evaluator")

    seen: dict[str, set] = {"train": set(), "score": set()}
    real = residual.capture

    def spy(where: str):
        def capture(*args, **kwargs):
            seen[where].add(kwargs.get("autocast"))
            return real(*args, **kwargs)

        return capture

    monkeypatch.setattr(phases, "capture", spy("train"))
    monkeypatch.setattr(kl_step, "capture", spy("train"))
    monkeypatch.setattr(layer_kl, "capture", spy("score"))
    monkeypatch.setattr(evaluator, "capture", spy("score"))
    result = train_tuned_lens(
        tiny_llama, small(corpus_dir, precision=precision), tmp_path, progress=False
    )
    assert result.precision == precision
    assert seen["train"] == {torch.bfloat16 if precision == "bfloat16" else None}
    assert seen["score"] == {None}
    assert sum(result.tuned_kl) < 0.8 * sum(result.logit_kl)


# --- a wall-clock budget ------------------------------------------------------------------


def test_a_budget_run_plans_its_steps_and_can_skip_the_report(tiny_llama, corpus_dir, tmp_path):
    config = small(corpus_dir, minutes=0.25, tokens=0, report=False)
    result = train_tuned_lens(tiny_llama, config, tmp_path, progress=False)
    assert result.steps >= 1  # tokens=0 is ignored under a budget
    assert not result.reported
    assert (tmp_path / "config.json").is_file() and not (tmp_path / CHECKPOINT_FILE).exists()


@pytest.mark.parametrize(("seconds_per_token", "tokens"), [(1e-9, 128), (0.0112, 40), (100.0, 0)])
def test_a_budget_shrinks_or_skips_evaluations_it_has_no_time_for(
    tiny_llama, corpus_dir, tmp_path, monkeypatch, seconds_per_token, tokens
):
    from lenskit.training.phases import Phases

    # As if an evaluation took this long per token and lens: the report's share (15% of
    # 6 s) holds 0.9 / (2 * spt) tokens, whole chunks of 64 where one fits, else the first
    # positions of one; the validation choice gets half that, or is left out.
    monkeypatch.setattr(Phases, "_probe_eval", lambda self, chunks: seconds_per_token)
    monkeypatch.setattr(Phases, "_eval_rate", lambda self, seconds, n: seconds_per_token)
    config = small(
        corpus_dir, minutes=0.1, tokens=0, seq_len=64, eval_tokens=128, tokens_per_step=64
    )
    result = train_tuned_lens(tiny_llama, config, tmp_path, progress=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["held_out_tokens"] == tokens
    assert result.reported == bool(tokens)
    assert any("no held-out report" in n for n in result.notes) == (not tokens)
    assert any("no validation choice" in n for n in metrics["notes"]) == (tokens != 128)


# --- one run per folder -------------------------------------------------------------------


def _hold_and_die(out: str, ready) -> None:
    lock = FolderLock(out)
    lock.__enter__()
    ready.set()
    signal.pause()


def test_a_folder_in_use_is_refused_and_a_dead_holder_frees_it(tiny_llama, corpus_dir, tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold_and_die, args=(str(tmp_path), ready))
    proc.start()
    try:
        assert ready.wait(30)
        assert holder(tmp_path) == f"pid {proc.pid} on {os.uname().nodename}"
        with pytest.raises(LenskitError, match="in use by another training run") as err:
            train_tuned_lens(tiny_llama, small(corpus_dir), tmp_path, progress=False)
        assert "\n" not in str(err.value) and f"pid {proc.pid}" in str(err.value)
        assert not (tmp_path / "config.json").exists()
    finally:
        proc.kill()  # a crash: the lock file stays, the lock goes with the process
        proc.join()
    assert (tmp_path / LOCK_FILE).exists() and holder(tmp_path) is None
    train_tuned_lens(tiny_llama, small(corpus_dir, tokens=0), tmp_path, progress=False)
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_cli_refuses_a_folder_in_use_in_one_line(corpus_dir, tmp_path, capsys):
    with FolderLock(tmp_path):
        argv = ["train", "--model", "tiny-llama", "--data", str(corpus_dir), "--out"]
        assert cli.main([*argv, str(tmp_path), "--seq-len", "32", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "in use by another training run" in err and err.count("\n") == 1


def test_the_app_refuses_a_folder_in_use(workdir):
    out = workdir / "lenses" / "tiny-llama" / "tuned-1"
    with FolderLock(out):
        at = _train_page()
        at.text_input(key="train_out_tiny-llama").set_value(str(out)).run()
        assert any("A training run is using" in w.value for w in at.warning)
        assert next(b for b in at.button if b.label == "Start").disabled


# --- SIGTERM and stale temporary files ------------------------------------------------------


def test_sigterm_checkpoints_like_ctrl_c(tiny_llama, corpus_dir, tmp_path):
    def term(p):
        if p.phase == "fine-tune" and p.done == 128:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        train_tuned_lens(tiny_llama, small(corpus_dir), tmp_path, progress=False, on_progress=term)
    assert load_checkpoint(tmp_path).step == 2
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) or callable(
        signal.getsignal(signal.SIGTERM)
    )


def test_a_resume_removes_temporary_files_of_killed_writers(tiny_llama, corpus_dir, tmp_path):
    def stop(p):
        if p.phase == "fine-tune":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_tuned_lens(tiny_llama, small(corpus_dir), tmp_path, progress=False, on_progress=stop)
    stale = tmp_path / f".{CHECKPOINT_FILE}.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    train_tuned_lens(tiny_llama, small(corpus_dir), tmp_path, resume=True, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "metrics.json", "params.pt"]


# --- unfinished runs in the app -------------------------------------------------------------


def test_the_train_page_lists_unfinished_runs_with_resume_and_delete(workdir, tiny_llama):
    home = workdir / "lenses" / "tiny-llama"
    config = small(workdir / "corpus")
    for name in ("tuned-1", "tuned-2"):

        def stop(p):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            train_tuned_lens(tiny_llama, config, home / name, progress=False, on_progress=stop)
    assert [r.path.name for r in unfinished_runs([home])] == ["tuned-2", "tuned-1"]
    at = _train_page()
    assert at.text_input(key="train_out_tiny-llama").value.endswith("tuned-3")
    assert any("tuned-1" in m.value for m in at.markdown)
    next(b for b in at.button if b.key == f"delete_{home / 'tuned-2'}").click().run()
    assert not (home / "tuned-2").exists()
    next(b for b in at.button if b.key == f"resume_{home / 'tuned-1'}").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert (home / "tuned-1" / "config.json").is_file()
    assert checkpoint_config(home / "tuned-1") is None
    assert at.session_state[S.TRAIN]["status"] == "done"


def test_scoring_the_lens_reports_progress(tiny_llama, corpus_dir, tmp_path):
    seen = []
    train_tuned_lens(
        tiny_llama,
        small(corpus_dir),
        tmp_path,
        progress=False,
        on_progress=lambda p: seen.append((p.phase, p.done, p.total)),
    )
    scores = [(done, total) for phase, done, total in seen if phase == "score"]
    assert scores and all(0 < done <= total for done, total in scores)
    assert scores[-1][0] == scores[-1][1]  # the last report is the whole held-out set


@pytest.mark.slow
def test_a_bf16_forward_pass_keeps_smollm2s_output_distribution(smollm2):
    """The bfloat16 runs' autocast forward pass: its output distribution stays within a
    hundredth of a bit of the float32 pass (mean KL; 0.0005 measured)."""
    from lenskit.models import ModelAdapter
    from lenskit.residual import capture
    from lenskit.training.precision import forward_autocast

    tokens = tokenize(smollm2, "The tuned lens reads every layer of a model as it predicts. " * 8)
    exact = capture(smollm2, tokens)
    fast = capture(smollm2, tokens, logits=False, autocast=forward_autocast(smollm2))
    with torch.no_grad():
        logits = ModelAdapter(smollm2).readout(fast.final)  # as the KL step reads it
    p, q = (x.double().log_softmax(-1) for x in (exact.logits, logits))
    kl_bits = (p.exp() * (p - q)).sum(-1) / math.log(2)
    assert float(kl_bits.mean()) < 0.01 and float(kl_bits.max()) < 0.1
    assert torch.equal(exact.logits, smollm2(tokens))  # the float32 pass is untouched
