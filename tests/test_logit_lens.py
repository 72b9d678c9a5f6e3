"""The logit lens against plain references: the model's logits, TransformerLens, and by hand."""

import pytest
import torch
from transformer_lens.tools.analysis import logit_readout

import lenskit
from lenskit.models import ModelAdapter
from lenskit.residual import capture, tokenize

PROMPT = "The logit lens reads every layer."


def _by_hand(model, h):
    """Final norm and unembedding written out in float64, statistics per vector."""
    h = h.double()
    cfg = model.cfg
    ln = model.ln_final
    gain = ln.weight.double() if hasattr(ln, "weight") else ln._original_component.weight.double()
    if cfg.normalization_type.startswith("RMS"):
        eps = model.original_model.config.rms_norm_eps
        x = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps) * gain
    else:
        eps = model.original_model.config.layer_norm_epsilon
        bias = ln._original_component.bias.double()
        centred = h - h.mean(-1, keepdim=True)
        x = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * gain + bias
    return x @ model.W_U.double() + model.b_U.double()


def test_final_row_reproduces_model_logits(tiny_model):
    lens = lenskit.get_lens("logit", tiny_model)
    cap = capture(tiny_model, tokenize(tiny_model, PROMPT))
    with torch.no_grad():
        out = lens(cap.final, tiny_model.cfg.n_layers)
    assert (out - cap.logits).abs().max().item() <= 1e-4


def test_every_layer_matches_transformer_lens_and_hand_reference(tiny_model):
    lens = lenskit.get_lens("logit", tiny_model)
    cap = capture(tiny_model, tokenize(tiny_model, PROMPT))
    rows = cap.lens_rows()
    for layer in range(rows.shape[0]):
        with torch.no_grad():
            ours = lens(rows[layer], layer)
        theirs = logit_readout(tiny_model, rows[layer], return_type="logits").values
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        hand = _by_hand(tiny_model, rows[layer])
        assert (ours.double() - hand).abs().max().item() < 1e-4


def test_each_layer_is_normalised_with_its_own_scale(tiny_llama):
    """Scaling a residual must not change an RMSNorm readout: statistics are per vector."""
    lens = lenskit.get_lens("logit", tiny_llama)
    h = capture(tiny_llama, tokenize(tiny_llama, PROMPT)).stack()[1]
    with torch.no_grad():
        torch.testing.assert_close(lens(h, 1), lens(7.0 * h, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_smollm2_final_row_and_paris(smollm2):
    lens = lenskit.get_lens("logit", smollm2)
    cap = capture(smollm2, tokenize(smollm2, "The capital of France is"))
    with torch.no_grad():
        out = lens(cap.final, 30)
        mid = lens(cap.stack()[20], 20)
    assert (out - cap.logits).abs().max().item() <= 1e-4
    assert smollm2.tokenizer.decode(out[0, -1].argmax()) == " Paris"
    hand = _by_hand(smollm2, cap.stack()[20])
    assert (mid.double() - hand).abs().max().item() < 1e-3


def test_lens_adapter_is_the_models(tiny_llama):
    lens = lenskit.get_lens("logit", tiny_llama)
    assert isinstance(lens.adapter, ModelAdapter) and lens.adapter.model is tiny_llama
    assert lens.covered_layers() == list(range(5))
