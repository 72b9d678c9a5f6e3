"""The readout engine: precision choice, the fast path's accuracy, bounded memory, bad ids."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import lenskit
import lenskit.readout as readout
import lenskit.readout.precision as precision
from lenskit.errors import LenskitError
from lenskit.metrics import Reference
from lenskit.residual import capture, tokenize

PROMPT = "The readout engine reads every layer of this prompt, one block at a time."
LN2 = math.log(2)
trajectory_module = importlib.import_module("lenskit.trajectory")  # not the function
# The fast path's stated tolerance against float64 (README, "Precision"): per-cell KL and
# entropy within these means (bits), and the same top-1 token in this share of cells.
FAST_KL_MEAN, FAST_H_MEAN, FAST_TOP1 = 0.01, 0.005, 0.995


def _float64_cells(model, prompt):
    """Per-cell KL to the output, entropy and top-1 of the logit lens, all in float64."""
    adapter = lenskit.ModelAdapter(model)
    rows = capture(model, tokenize(model, prompt), logits=False).lens_rows()[:, 0]
    with torch.no_grad():
        x = adapter.final_norm(rows).double()
    lq = torch.log_softmax(x @ adapter.W_U.double() + adapter.b_U.double(), -1)
    lp = lq[-1]
    kl = (lp.exp() * (lp - lq)).sum(-1) / LN2
    entropy = -(lq.exp() * lq).sum(-1) / LN2
    return kl, entropy, lq.argmax(-1)


def _errors(model, prompt, precision):
    lens = lenskit.get_lens("logit", model)
    traj = lenskit.trajectory(model, lens, prompt, precision=precision, top_k=1)
    kl, entropy, top = _float64_cells(model, prompt)
    return (
        (traj.kl_to_final.double() - kl).abs(),
        (traj.entropy.double() - entropy).abs(),
        (traj.top_ids[..., 0] == top).double().mean().item(),
    )


def test_exact_and_bf16_agree_with_float64_within_the_stated_tolerance(tiny_model):
    dkl, dh, top1 = _errors(tiny_model, PROMPT, "exact")
    assert dkl.max() < 1e-5 and dh.max() < 1e-5 and top1 == 1.0
    dkl, dh, top1 = _errors(tiny_model, PROMPT, "bf16")
    # ~200 cells of a random model: one near-tie is 0.5% of them; the top-1 share is
    # held to the stated tolerance on the embedded model (below).
    assert dkl.mean() <= FAST_KL_MEAN and dh.mean() <= FAST_H_MEAN and top1 >= 0.98


@pytest.mark.slow
def test_bf16_on_the_embedded_model_within_the_stated_tolerance(smollm2):
    text = (
        "The tuned lens reads each layer of a transformer through an affine translator. "
        "Researchers check the numbers: KL divergence, entropy and the top token per layer, "
        "for every position of a paragraph of ordinary English text like this one."
    )
    dkl, dh, top1 = _errors(smollm2, text, "bf16")
    assert dkl.mean() <= FAST_KL_MEAN, float(dkl.mean())
    assert dh.mean() <= FAST_H_MEAN, float(dh.mean())
    assert top1 >= FAST_TOP1, top1


def test_precision_comes_from_the_argument_then_the_environment(monkeypatch):
    monkeypatch.setenv(readout.PRECISION_ENV, "bf16")
    assert readout.resolve_precision() == "bf16"
    assert readout.resolve_precision("exact") == "exact"
    assert readout.matmul_dtype("cpu", "fp16") == torch.float16
    monkeypatch.setenv(readout.PRECISION_ENV, "fast-please")
    with pytest.raises(LenskitError, match="LENSKIT_PRECISION is 'fast-please'"):
        readout.resolve_precision()
    with pytest.raises(LenskitError, match="use one of auto, exact, bf16, fp16"):
        readout.resolve_precision("float128")


def test_auto_takes_bf16_only_where_measured_faster(monkeypatch):
    monkeypatch.setattr(precision, "matmul_rates", lambda device: {"fp32": 100.0, "bf16": 300.0})
    assert readout.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(precision, "matmul_rates", lambda device: {"fp32": 100.0, "bf16": 20.0})
    assert readout.resolve_precision("auto") == "exact"


def test_rates_are_measured_once_and_cached_on_disk(monkeypatch, tmp_path):
    monkeypatch.setenv("LENSKIT_CACHE", str(tmp_path))
    calls = []

    def fake(device):
        calls.append(device)
        return {"fp32": 1.0, "bf16": 2.0}

    monkeypatch.setattr(precision, "_measure", fake)
    precision._rates.cache_clear()
    try:
        assert readout.matmul_rates("cpu")["bf16"] == 2.0
        precision._rates.cache_clear()  # a new process: read back from the cache folder
        assert readout.matmul_rates("cpu")["bf16"] == 2.0
        assert len(calls) == 1 and (tmp_path / "readout-rates.json").is_file()
    finally:
        precision._rates.cache_clear()


def test_fused_statistics_equal_separate_float64_definitions():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 1000, generator=gen) * 4
    final = torch.randn(37, 1000, generator=gen) * 4
    ids = torch.randint(0, 1000, (37, 2), generator=gen)
    stats = readout.logit_stats(
        logits, Reference.from_logits(final), ids, top_k=5, rank_columns=1, chunk=8
    )
    lq, lp = torch.log_softmax(logits.double(), -1), torch.log_softmax(final.double(), -1)
    assert torch.allclose(stats.entropy.double(), -(lq.exp() * lq).sum(-1) / LN2, atol=1e-5)
    kl = (lp.exp() * (lp - lq)).sum(-1) / LN2
    assert torch.allclose(stats.kl.double(), kl, atol=1e-5)
    assert torch.allclose(stats.id_log_probs.double(), lq.gather(-1, ids), atol=1e-5)
    top = torch.topk(logits, 5, dim=-1)
    assert torch.equal(stats.top_ids, top.indices)
    assert torch.allclose(stats.top_probs.double(), lq.gather(-1, top.indices).exp(), atol=1e-6)
    ranks = (logits > logits.gather(-1, ids[:, 1:])).sum(-1)
    assert torch.equal(stats.id_ranks[:, 1], ranks) and (stats.id_ranks[:, 0] == -1).all()


@pytest.mark.parametrize("vocab", [49152, 1000, 4096 * 3])
def test_two_pass_top_k_equals_torch_topk(vocab):
    z = torch.randn(9, vocab, generator=torch.Generator().manual_seed(vocab))
    ours, theirs = readout.top_k(z, 10), torch.topk(z, 10, dim=-1)
    assert torch.equal(ours[0], theirs.values) and torch.equal(ours[1], theirs.indices)


def test_top_k_among_candidates_equals_the_whole_rows():
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(9, 4096, generator=gen)
    held = torch.topk(z, 16, dim=-1).indices
    cand = held.gather(1, torch.argsort(torch.rand(9, 16, generator=gen), -1))  # any order
    ours, theirs = readout.top_k(z, 10, cand), torch.topk(z, 10, dim=-1)
    assert torch.equal(ours[0], theirs.values) and torch.equal(ours[1], theirs.indices)
    ref = Reference.from_logits(torch.randn(9, 4096, generator=gen))
    ids = torch.randint(0, 4096, (9, 2), generator=gen)
    a = readout.logit_stats(z, ref, ids, top_k=5, rank_columns=1, candidates=cand)
    b = readout.logit_stats(z, ref, ids, top_k=5, rank_columns=1)
    for name in ("top_ids", "top_probs", "entropy", "kl", "id_log_probs", "id_ranks"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(readout.top_k(z, 20, cand)[1], torch.topk(z, 20, dim=-1).indices)


def test_a_rounded_readout_names_each_rows_top_tokens(tiny_model):
    adapter = lenskit.ModelAdapter(tiny_model)
    h = torch.randn(2, 5, tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    fast = readout.Readout(adapter, "bf16").read(h)
    assert fast.candidates.shape == (2, 5, readout.EXACT_HEAD)
    top = torch.topk(fast.logits, 4, dim=-1).indices
    assert (top.unsqueeze(-1) == fast.candidates.unsqueeze(-2)).any(-1).all()
    assert readout.Readout(adapter, "exact").read(h).candidates is None


def test_reference_equals_the_plain_softmax_in_and_out_of_autograd():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(37, 2000, generator=gen) * 5
    logits[3, :100] = -1e4  # underflows to p = 0
    lp = torch.log_softmax(logits.double(), -1)
    fast = Reference.from_logits(logits)
    assert torch.allclose(fast.probs.double(), lp.exp(), atol=1e-7, rtol=1e-5)
    assert torch.allclose(fast.neg_entropy.double(), (lp.exp() * lp).sum(-1), atol=1e-5)
    leaf = logits.clone().requires_grad_(True)
    slow = Reference.from_logits(leaf)
    slow.neg_entropy.sum().backward()  # differentiable where asked
    assert torch.allclose(slow.neg_entropy.detach(), fast.neg_entropy, atol=1e-5)
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


def test_pair_divergences_equal_float64_definitions():
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(21, 3000, generator=gen) * 4
    b = a + torch.randn(21, 3000, generator=gen) * 2
    a[:, :50] = b[:, :50] = -1e4  # both underflow to p = q = 0 there
    b[0] = a[0]
    kl, js, tv = readout.pair_divergences(a, b, chunk=4)
    p, q = torch.softmax(a.double(), -1), torch.softmax(b.double(), -1)
    lp, lq = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    lm = torch.logaddexp(lp, lq) - LN2
    assert torch.allclose(kl.double(), (p * (lp - lq)).sum(-1) / LN2, atol=1e-5)
    want_js = 0.5 * ((p * (lp - lm)).sum(-1) + (q * (lq - lm)).sum(-1)) / LN2
    assert torch.allclose(js.double(), want_js, atol=1e-5)
    assert torch.allclose(tv.double(), 0.5 * (p - q).abs().sum(-1), atol=1e-6)
    assert abs(float(kl[0])) < 1e-6 and abs(float(js[0])) < 1e-6 and float(tv[0]) == 0.0


def test_a_rounded_readout_is_exact_on_each_rows_head(tiny_model):
    """bf16 logits equal float32 ones on the row's own head and on the ids asked for."""
    adapter = lenskit.ModelAdapter(tiny_model)
    gen = torch.Generator().manual_seed(1)
    x = adapter.final_norm(torch.randn(7, tiny_model.cfg.d_model, generator=gen)).detach()
    asked = torch.randint(0, adapter.d_vocab, (7, 3), generator=gen)
    fast = readout.Readout(adapter, "bf16").unembed(x, asked).logits
    exact = readout.Readout(adapter, "exact").unembed(x).logits
    head = torch.topk(exact, readout.EXACT_HEAD // 2, dim=-1).indices
    for ids in (head, asked):
        assert torch.allclose(fast.gather(1, ids), exact.gather(1, ids), atol=1e-5, rtol=0)
    assert torch.equal(fast.argmax(-1), exact.argmax(-1))
    tail = (fast - exact).abs().amax()
    assert 0 < tail < 0.05  # elsewhere only the bf16 rounding of inputs and output


def test_scratch_buffers_are_reused_and_bounded(tiny_llama):
    engine = readout.Readout(lenskit.ModelAdapter(tiny_llama), "bf16")
    h = torch.randn(6, tiny_llama.cfg.d_model, generator=torch.Generator().manual_seed(2))
    fresh = engine.logits(h)
    first = engine.logits(h, scratch=0)
    assert torch.equal(first, fresh)
    second = engine.logits(h[:3], scratch=0)
    assert second.data_ptr() == first.data_ptr()  # the same buffer, overwritten
    assert engine.logits(h, scratch=1).data_ptr() != first.data_ptr()
    too_many = torch.randn(readout.MATMUL_ROWS + 1, tiny_llama.cfg.d_model)
    with pytest.raises(ValueError, match="scratch holds"):
        engine.unembed(too_many, scratch=0)


def test_device_plumbing_keeps_every_tensor_on_the_weights_device(tiny_llama):
    engine = readout.Readout(lenskit.ModelAdapter(tiny_llama), precision="bf16")
    h = torch.randn(5, tiny_llama.cfg.d_model)
    logits = engine.logits(h)
    assert logits.dtype == torch.float32 and logits.device == engine.device
    assert engine.reference(h).probs.device == engine.device
    assert engine.dtype == torch.bfloat16


def test_trajectory_memory_is_bounded_by_its_blocks(tiny_llama, monkeypatch):
    """A long prompt is read a block of positions at a time, never a full [pos, vocab]."""
    seen = []
    original = readout.Readout.logits

    def spy(self, h, exact=None, scratch=None):
        out = original(self, h, exact, scratch=scratch)
        seen.append(out.numel() // out.shape[-1])
        return out

    monkeypatch.setattr(readout.Readout, "logits", spy)
    monkeypatch.setattr(trajectory_module, "POSITIONS_PER_BLOCK", 8)
    calls = []
    lens = lenskit.get_lens("logit", tiny_llama)
    tokens = torch.randint(0, tiny_llama.cfg.d_vocab, (40,), generator=torch.Generator())
    traj = lenskit.trajectory(
        tiny_llama, lens, tokens, on_progress=lambda d, t: calls.append((d, t))
    )
    assert max(seen) <= readout.MATMUL_ROWS and max(seen) <= 8 * lens.adapter.n_rows
    assert not torch.isnan(traj.kl_to_final).any()
    assert calls[-1][0] == calls[-1][1] == 40 * lens.adapter.n_rows
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.tensor([1, 99999]), "token id 99999 is outside the model's vocabulary"),
        (torch.tensor([-1, 2]), "token id -1 is outside the model's vocabulary"),
        (torch.tensor([1.7, 2.2]), "token ids must be integers, got torch.float32"),
    ],
)
def test_bad_token_ids_are_one_line_errors(tiny_llama, ids, message):
    lens = lenskit.get_lens("logit", tiny_llama)
    with pytest.raises(LenskitError, match=message) as info:
        lenskit.trajectory(tiny_llama, lens, ids)
    assert "\n" not in str(info.value)


def test_cli_precision_choices_are_the_engines():
    from lenskit.commands.trajectory import PRECISION_CHOICES

    assert PRECISION_CHOICES == readout.PRECISIONS


def test_cli_help_and_argument_errors_import_no_torch():
    import subprocess
    import sys

    code = (
        "import sys\nfrom lenskit.cli import main\n"
        "for argv in (['--help'], ['trajectory', '--prompt', ''], ['eval', '--tokens', '0', "
        "'--out', 'x'], ['trajectory', '--prompt', 'a', '--rows', '1-x']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout


def test_cli_rows_and_positions_limit_the_cells(capsys, tmp_path):
    import json

    from lenskit.cli import main

    out = tmp_path / "t.json"
    args = ["trajectory", "--model", "tiny-llama", "--prompt", "a b c d e f", "--quiet"]
    assert main([*args, "--rows", "0,2-3", "--positions", "1:4", "--json", str(out)]) == 0
    cells = json.loads(out.read_text())["cells"]
    assert sorted({c["layer"] for c in cells}) == [0, 2, 3]
    assert sorted({c["pos"] for c in cells}) == [1, 2, 3]
    assert main([*args, "--positions", "4"]) == 2
    assert "START:STOP" in capsys.readouterr().err


def test_evaluation_stops_with_the_result_so_far_and_estimates_its_time(tiny_llama, corpus_dir):
    from lenskit.evaluation import evaluate, expected_seconds

    lens = lenskit.get_lens("logit", tiny_llama)
    assert expected_seconds(tiny_llama, [lens], 4096) > 0
    kept = []

    def stop_after_two(result):
        kept.append(result)
        if len(kept) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(
            tiny_llama,
            [lens],
            str(corpus_dir),
            tokens=256,
            seq_len=16,
            batch_size=2,
            progress=False,
            on_result=stop_after_two,
        )
    assert [r.chunks for r in kept] == [2, 4] and kept[-1].tokens == 64
    full = evaluate(
        tiny_llama, [lens], str(corpus_dir), tokens=64, seq_len=16, batch_size=2, progress=False
    )
    assert full.metrics["kl_bits"].tolist() == pytest.approx(kept[-1].metrics["kl_bits"].tolist())


def test_a_bf16_readout_leaves_other_threads_float32_matmuls_exact(tiny_llama):
    """The low-precision readout changes no process-wide setting: float32 stays float32."""
    import threading

    engine = readout.Readout(lenskit.ModelAdapter(tiny_llama), "bf16")
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 256, generator=gen), torch.randn(256, 256, generator=gen)
    expected = a @ b
    h = torch.randn(256, tiny_llama.cfg.d_model, generator=gen)
    stop, bad = threading.Event(), []

    def reader():
        while not stop.is_set():
            engine.logits(h)

    worker = threading.Thread(target=reader)
    worker.start()
    try:
        for _ in range(200):
            if not torch.equal(a @ b, expected):
                bad.append(True)
    finally:
        stop.set()
        worker.join(10)
    assert not bad


FIELDS = ("top_ids", "top_probs", "entropy", "kl", "id_log_probs", "id_ranks")


def test_statistics_of_rounded_logits_with_an_exact_head_equal_those_of_the_patched_copy():
    gen = torch.Generator().manual_seed(11)
    exact = torch.randn(37, 3000, generator=gen) * 4
    rounded = exact.bfloat16()
    ref = Reference.from_logits(torch.randn(37, 3000, generator=gen) * 4)
    ids = torch.randint(0, 3000, (37, 2), generator=gen)
    extra = torch.randint(0, 3000, (37, 3), generator=gen)
    seen = []

    def exact_head(rows, chunk):
        seen.append(chunk.dtype)
        own = readout.top_k(chunk, 8)[1]
        head = torch.cat([own, extra[rows]], 1)
        return own, head, exact[rows].gather(1, head)

    fused = readout.logit_stats(
        rounded, ref, ids, top_k=5, rank_columns=1, chunk=8, exact_head=exact_head
    )
    own = readout.top_k(rounded.float(), 8)[1]
    head = torch.cat([own, extra], 1)
    patched = rounded.float().scatter(1, head, exact.gather(1, head))
    plain = readout.logit_stats(patched, ref, ids, top_k=5, rank_columns=1, candidates=own)
    assert set(seen) == {torch.float32}  # the rounded logits reach the head as float32
    assert torch.equal(fused.top_ids, plain.top_ids)
    assert torch.equal(fused.id_ranks, plain.id_ranks)
    for name in ("top_probs", "entropy", "kl", "id_log_probs"):
        assert torch.allclose(getattr(fused, name), getattr(plain, name), atol=2e-5), name


def test_rows_cycling_through_a_reference_equal_the_reference_repeated():
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(3 * 24, 500, generator=gen) * 3
    ref = Reference.from_logits(torch.randn(24, 500, generator=gen) * 3)
    ids = torch.randint(0, 500, (72, 1), generator=gen)
    repeated = Reference(ref.probs.repeat(3, 1), ref.neg_entropy.repeat(3))
    a = readout.logit_stats(logits, ref, ids, top_k=3)
    b = readout.logit_stats(logits, repeated, ids, top_k=3)
    for name in FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    with pytest.raises(ValueError, match="do not cycle"):
        readout.logit_stats(logits[:50], ref, ids[:50], top_k=3)


@pytest.mark.parametrize("precision_name", ["exact", "bf16"])
def test_read_stats_of_groups_equal_reading_each_group_alone(tiny_model, precision_name):
    """Groups read together (cells of many groups per matmul) = each group on its own."""
    adapter = lenskit.ModelAdapter(tiny_model)
    engine = readout.Readout(adapter, precision_name)
    gen = torch.Generator().manual_seed(13)
    h = torch.randn(5, 3, 41, tiny_model.cfg.d_model, generator=gen)  # [*group, cell, d]
    ref = engine.reference(torch.randn(41, tiny_model.cfg.d_model, generator=gen))
    ids = torch.randint(0, adapter.d_vocab, (41, 2), generator=gen)
    done = []
    stats = engine.read_stats(h, ref, ids, top_k=4, rank_columns=1, progress=done.append)
    assert stats.kl.shape == (5, 3, 41) and stats.top_ids.shape == (5, 3, 41, 4)
    assert done[-1] == 1.0 and done == sorted(done)
    for i in range(5):
        for j in range(3):
            alone = engine.read_stats(h[i, j], ref, ids, top_k=4, rank_columns=1)
            assert torch.equal(stats.top_ids[i, j], alone.top_ids)
            for name in ("top_probs", "entropy", "kl", "id_log_probs"):
                got = getattr(stats, name)[i, j]
                assert torch.allclose(got, getattr(alone, name), atol=1e-5), name


def test_read_stats_without_a_float32_copy_equal_the_read_logits_statistics(tiny_model):
    """bf16: statistics read from the rounded block = those of the float32 logits read.

    read_stats reads the requested tokens exactly as well, so the plain read names them.
    """
    adapter = lenskit.ModelAdapter(tiny_model)
    engine = readout.Readout(adapter, "bf16")
    gen = torch.Generator().manual_seed(14)
    h = torch.randn(40, tiny_model.cfg.d_model, generator=gen)
    ref = engine.reference(torch.randn(40, tiny_model.cfg.d_model, generator=gen))
    ids = torch.randint(0, adapter.d_vocab, (40, 2), generator=gen)
    head = readout.head_ids(ref.probs)
    fused = engine.read_stats(h, ref, ids, top_k=3, rank_columns=1, head=head)
    logits, cand = engine.read(h, torch.cat([head, ids], 1))
    plain = readout.logit_stats(logits, ref, ids, top_k=3, rank_columns=1, candidates=cand)
    assert torch.equal(fused.top_ids, plain.top_ids)
    assert (fused.id_ranks - plain.id_ranks).abs().max() <= 1  # ties in the rounded tail
    for name in ("top_probs", "entropy", "kl", "id_log_probs"):
        assert torch.allclose(getattr(fused, name), getattr(plain, name), atol=2e-5), name


def test_read_stats_under_an_output_transform_equal_the_read_logits_statistics(
    tiny_llama, monkeypatch
):
    """A soft cap (or a bias) needs the float32 logits: read_stats reads them then."""
    bridge_adapter = tiny_llama.adapter
    monkeypatch.setattr(
        bridge_adapter, "apply_output_logits_transform", lambda z: 2.0 * torch.tanh(z / 2.0)
    )
    engine = readout.Readout(lenskit.ModelAdapter(tiny_llama), "bf16")
    gen = torch.Generator().manual_seed(15)
    h = torch.randn(20, tiny_llama.cfg.d_model, generator=gen)
    ref = engine.reference(torch.randn(20, tiny_llama.cfg.d_model, generator=gen))
    ids = torch.randint(0, 257, (20, 1), generator=gen)
    fused = engine.read_stats(h, ref, ids, top_k=2)
    logits, cand = engine.read(h, readout.head_ids(ref.probs))
    assert logits.abs().max() <= 2.0  # the cap was applied
    plain = readout.logit_stats(logits, ref, ids, top_k=2, candidates=cand)
    for name in FIELDS:
        assert torch.allclose(
            getattr(fused, name).double(), getattr(plain, name).double(), atol=1e-6
        ), name
