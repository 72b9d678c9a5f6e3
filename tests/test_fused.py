"""The compiled statistics pass: the same results as the eager passes it replaces."""

from __future__ import annotations

import pytest
import torch

import lenskit.readout as readout
import lenskit.readout.fused as fused
from lenskit.metrics import Reference

FIELDS = ("top_ids", "top_probs", "entropy", "kl", "id_log_probs", "id_ranks")


def _case(seed: int, groups: int = 3, cells: int = 5, vocab: int = 2048):
    gen = torch.Generator().manual_seed(seed)
    n = groups * cells
    exact = torch.randn(n, vocab, generator=gen) * 4
    exact[:, :7] += 9.0  # a few likely tokens, as a lens row has
    ref = Reference.from_logits(torch.randn(cells, vocab, generator=gen) * 4)
    ids = torch.randint(0, vocab, (n, 2), generator=gen)
    head = readout.head_ids(ref.probs).repeat(groups, 1)
    return exact, ref, ids, head


@pytest.mark.parametrize("rank_columns", [0, 1])
def test_compiled_statistics_equal_those_of_the_rounded_block_with_its_head_made_exact(
    rank_columns,
):
    exact, ref, ids, head = _case(21)
    rounded = exact.bfloat16()
    asked = []

    def head_logits(at):
        asked.append(at)
        return exact.gather(1, at)

    got = fused.fused_stats(
        rounded, ref, ids, head, head_logits, top_k=4, own=16, rank_columns=rank_columns
    )
    assert got is not None
    read = asked[-1]  # the tokens read exactly: each row's own 16, the head, the ids
    assert torch.equal(read[:, 16:], torch.cat([head, ids], 1))
    # each row's 16 most likely by the rounded logits (which of tied tokens is free)
    best = rounded.float().topk(16, dim=-1).values
    assert torch.equal(rounded.float().gather(1, read[:, :16]).sort(-1, descending=True)[0], best)
    patched = rounded.float().scatter(1, read, exact.gather(1, read))
    m = ref.probs.shape[0]
    plain = readout.logit_stats(patched, ref, ids, top_k=4, rank_columns=rank_columns)
    assert torch.equal(got.top_ids, plain.top_ids)
    assert torch.equal(got.id_ranks, plain.id_ranks)
    for name in ("top_probs", "entropy", "kl", "id_log_probs"):
        assert torch.allclose(getattr(got, name), getattr(plain, name), atol=3e-5), name
    assert got.kl.shape == (exact.shape[0],) and m == 5


def test_compiled_statistics_without_a_reference_have_nan_kl_and_the_rest():
    exact, _, ids, _ = _case(22, groups=1, cells=7, vocab=1024)
    rounded = exact.bfloat16()
    got = fused.fused_stats(
        rounded, None, ids, None, lambda at: rounded.float().gather(1, at), top_k=2, own=8
    )
    plain = readout.logit_stats(rounded.float(), None, ids, top_k=2)
    assert got is not None and got.kl.isnan().all()
    assert torch.equal(got.top_ids, plain.top_ids)
    for name in ("top_probs", "entropy", "id_log_probs"):
        assert torch.allclose(getattr(got, name), getattr(plain, name), atol=3e-5), name


def test_where_the_kernel_cannot_compile_the_eager_passes_run(monkeypatch):
    exact, ref, ids, head = _case(23)
    monkeypatch.setitem(fused._state, "failed", True)
    assert fused.block_sums(exact.bfloat16().view(3, 5, -1), ref.probs, None) is None
    got = fused.fused_stats(
        exact.bfloat16(), ref, ids, head, lambda at: exact.gather(1, at), top_k=1, own=16
    )
    assert got is None  # the caller falls back to logit_stats
    assert not fused.fused_ready(torch.device("cpu"), 2048)


def test_compiled_statistics_are_switched_off_by_the_environment_and_odd_vocabularies(
    monkeypatch,
):
    cpu = torch.device("cpu")
    assert fused.fused_ready(cpu, 49152)
    assert not fused.fused_ready(cpu, 50257)  # not whole groups of tokens
    monkeypatch.setenv(fused.COMPILE_ENV, "0")
    assert not fused.fused_ready(cpu, 49152)


def test_rows_that_do_not_cycle_through_the_reference_are_refused():
    exact, ref, ids, head = _case(24)
    with pytest.raises(ValueError, match="do not cycle"):
        fused.fused_stats(
            exact[:7].bfloat16(), ref, ids[:7], head[:7], lambda at: at.float(), top_k=1, own=4
        )


@pytest.mark.slow
def test_compiled_reads_of_the_embedded_model_equal_the_eager_reads(smollm2):
    import lenskit
    from lenskit.residual import capture, tokenize

    text = "The tuned lens reads each layer of a transformer. def f(x):\n    return x + 1\n"
    adapter = lenskit.ModelAdapter(smollm2)
    engine = readout.Readout(adapter, "bf16")
    tokens = tokenize(smollm2, text)
    cap = capture(smollm2, tokens, logits=False)
    h = cap.stack("resid_pre")[:, 0]  # [layer, pos, d_model]
    ref = engine.reference(cap.final[0])
    ids = torch.cat([tokens[0, 1:], tokens[0, :1]]).unsqueeze(-1)
    a = engine.read_stats(h, ref, ids, top_k=3, rank_columns=1, compiled=True)
    b = engine.read_stats(h, ref, ids, top_k=3, rank_columns=1, compiled=False)
    assert (a.top_ids[..., 0] == b.top_ids[..., 0]).float().mean() >= 0.99
    # the own heads may differ where the rounded logits tie: rounding-sized differences
    assert (a.kl - b.kl).abs().mean() < 1e-3 and (a.entropy - b.entropy).abs().mean() < 1e-3
    assert (a.id_log_probs - b.id_log_probs).abs().max() < 1e-3


def test_a_read_asked_to_compile_falls_back_to_the_eager_passes(tiny_llama, monkeypatch):
    import lenskit
    import lenskit.readout.engine as engine_module

    engine = readout.Readout(lenskit.ModelAdapter(tiny_llama), "bf16")
    gen = torch.Generator().manual_seed(25)
    h = torch.randn(2, 9, tiny_llama.cfg.d_model, generator=gen)
    ref = engine.reference(torch.randn(9, tiny_llama.cfg.d_model, generator=gen))
    ids = torch.randint(0, 257, (9, 1), generator=gen)
    eager = engine.read_stats(h, ref, ids, top_k=2, rank_columns=1, compiled=False)
    monkeypatch.setattr(engine_module, "fused_ready", lambda device, vocab: True)
    monkeypatch.setitem(fused._state, "failed", True)  # as where no C++ compiler works
    got = engine.read_stats(h, ref, ids, top_k=2, rank_columns=1, compiled=True)
    for name in FIELDS:
        assert torch.equal(getattr(got, name), getattr(eager, name)), name
