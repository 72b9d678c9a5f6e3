"""Every architecture lenskit declares, on a tiny random model built in code.

For each family: the logit lens at the final row reproduces the Hugging Face model's
own log-probabilities, a tuned lens trains one step and survives a save and reload,
sub-layer rows read as they should, an attribution runs and adds up, and the app's
Home page opens on it. A family lenskit does not declare is refused in one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

import lenskit
import lenskit_app.state as S
from lenskit import tiny
from lenskit.attribution import attribute
from lenskit.errors import LenskitError
from lenskit.lenses.tuned import TunedLens
from lenskit.models import ARCHITECTURES, ModelAdapter
from lenskit.residual import capture, row_capture_points, tokenize

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The Eiffel Tower is in Paris."
FAMILIES = sorted(tiny.FAMILIES.items())
IDS = [name for _, name in FAMILIES]


@pytest.fixture(scope="module", params=FAMILIES, ids=IDS)
def family(request):
    architecture, name = request.param
    return architecture, name, lenskit.load_model(name)


def test_every_declared_architecture_has_a_tiny_model():
    assert set(tiny.FAMILIES) == set(ARCHITECTURES)


def test_logit_lens_reproduces_the_hf_model(family):
    architecture, name, model = family
    adapter = ModelAdapter(model)
    assert adapter.architecture == architecture
    hf_model, _ = tiny.build(name)  # an independent copy, run by transformers itself
    ids = tokenize(model, PROMPT)
    with torch.no_grad():
        reference = hf_model(ids).logits.double().log_softmax(-1)[0]
    cap = capture(model, ids)
    with torch.no_grad():
        read = lenskit.get_lens("logit", model)(cap.final[0], adapter.n_layers)
    assert (read.double().log_softmax(-1) - reference).abs().max().item() < 1e-4


def test_tuned_lens_trains_one_step_saves_and_reloads(family, corpus_dir, tmp_path):
    from lenskit.training import TrainConfig, train_tuned_lens

    _, name, model = family
    config = TrainConfig(
        model=name,
        data=str(corpus_dir),
        tokens=64,
        seq_len=32,
        tokens_per_step=64,
        init="zero",
        eval_tokens=64,
        val_tokens=32,
        checkpoint_every=0,
    )
    train_tuned_lens(model, config, tmp_path / "lens", progress=False)
    lens = lenskit.get_lens("tuned", model, path=str(tmp_path / "lens"))
    moved = sum(float(p.detach().abs().sum()) for p in lens.parameters())
    assert moved > 0  # one Adam step from zero moves every translator
    again = TunedLens.load(model, lens.save(tmp_path / "copy"))
    for key, value in lens.translator_state().items():
        assert torch.equal(value, again.translator_state()[key]), key


def test_sublayer_rows(family):
    _, _, model = family
    adapter = ModelAdapter(model)
    logit = lenskit.get_lens("logit", model)
    if not adapter.has_mid:  # attention and MLP in parallel: no stream between them
        with pytest.raises(LenskitError, match="in parallel") as info:
            adapter.rows(("resid_pre", "resid_mid"))
        assert "\n" not in str(info.value)
        return
    rows = adapter.rows(("resid_pre", "resid_mid"))
    assert [r.label for r in rows[:3]] == ["L0", "L0.mid", "L1"]
    assert len(rows) == 2 * adapter.n_layers + 1 and rows[-1].label == "output"
    cap = capture(model, tokenize(model, PROMPT), points=(*row_capture_points(rows), "attn_out"))
    hidden = cap.row_stack(rows)[:, 0]
    mid = cap.stack("resid_pre")[:, 0] + cap.stack("attn_out")[:, 0]
    torch.testing.assert_close(hidden[1::2][: adapter.n_layers], mid, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        read = logit.read_points(hidden, rows)
        plain = adapter.readout(hidden)  # the logit lens reads every row as it is
    torch.testing.assert_close(read, plain)
    untrained = TunedLens.untrained(model, points=("resid_pre", "resid_mid"))
    with torch.no_grad():
        torch.testing.assert_close(untrained.read_points(hidden, rows), plain)
    with pytest.raises(LenskitError, match="no map for the stream between"):
        TunedLens.untrained(model).read_points(hidden, rows)


def test_attribution_runs_and_adds_up(family):
    _, _, model = family
    adapter = ModelAdapter(model)
    result = attribute(
        model, lenskit.get_lens("logit", model), PROMPT, "!", metric="logit", at="output"
    )
    assert len(result.labels) == 2 * adapter.n_layers + 1
    total = float(result.direct.sum()) + result.constant
    if adapter.spec.family == "gemma2":  # soft-capped logits: no exact sum
        assert abs(total - result.output_value) > 1e-6
    else:
        assert total == pytest.approx(result.output_value, abs=1e-4)
    nearby = attribute(model, lenskit.get_lens("logit", model), PROMPT, "!")
    expected = "L0.mid" if adapter.has_mid else "L1"
    assert nearby.read_rows[1] == expected


def test_home_page_opens(family):
    _, name, _ = family
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.session_state[S.MODEL] = name
    at.session_state[S.PROMPT] = PROMPT
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    text = " ".join(m.value for m in at.markdown)
    assert name in text and "**logit** — ready" in text


def test_an_undeclared_family_is_refused_in_one_line():
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import BloomConfig, BloomForCausalLM

    tok = tiny.byte_tokenizer()
    config = BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=1, n_head=4)
    config.architectures = ["BloomForCausalLM"]
    model = TransformerBridge.boot_transformers(
        "tiny-bloom", hf_model=BloomForCausalLM(config).eval(), tokenizer=tok
    )
    with pytest.raises(LenskitError, match="does not support BloomForCausalLM") as info:
        lenskit.get_lens("logit", model)
    assert "\n" not in str(info.value)
