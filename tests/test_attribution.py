"""Per-component attribution: plain reference computations, the sum identity, ablations,
sub-layer tuned lenses, the CLI, the figure and published (hub) lenses."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import randomised

import lenskit
from lenskit import tiny
from lenskit.attribution import Attribution, attribute
from lenskit.errors import LenskitError
from lenskit.lenses.hub import unembed_hash
from lenskit.lenses.tuned import TunedLens
from lenskit.models import ModelAdapter
from lenskit.plotting import attribution_plot
from lenskit.residual import capture, tokenize

PROMPT = "The Eiffel Tower is in"
TARGET = " "


def _hf_parts(name: str, ids: torch.Tensor, ablate: tuple[str, int, int] | None = None):
    """Block inputs, attention and MLP outputs and logits of a tiny Llama, by transformers alone."""
    hf_model, _ = tiny.build(name)
    layers = hf_model.model.layers
    attn, mlp = {}, {}

    def keep(store, i, kind):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if ablate is not None and ablate[:2] == (kind, i):
                out = out.clone()
                out[:, ablate[2]] = 0.0
                output = (out, *output[1:]) if isinstance(output, tuple) else out
            store[i] = out.detach()
            return output

        return hook

    handles = [
        layer.self_attn.register_forward_hook(keep(attn, i, "attn"))
        for i, layer in enumerate(layers)
    ]
    handles += [
        layer.mlp.register_forward_hook(keep(mlp, i, "mlp")) for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            out = hf_model(ids, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    return hf_model, out.hidden_states, attn, mlp, out.logits[0]


def _plain_direct(hf_model, z, c, target):
    """Direct effect of ``c`` on log2 p(target), read with the stream ``z``: plain RMSNorm maths."""
    norm = hf_model.model.norm
    w_u = hf_model.lm_head.weight.detach().double()
    z, c = z.double(), c.double()
    scale = torch.sqrt(z.pow(2).mean() + norm.variance_epsilon)
    gain = norm.weight.detach().double()
    delta = (gain * c / scale) @ w_u.T
    p = ((gain * z / scale) @ w_u.T).softmax(-1)
    return float((delta[target] - p @ delta) / math.log(2))


@pytest.mark.parametrize("at", ["next", "output"])
def test_logit_lens_direct_effects_match_a_plain_computation(tiny_llama, at):
    result = attribute(tiny_llama, lenskit.get_lens("logit", tiny_llama), PROMPT, TARGET, at=at)
    ids = tokenize(tiny_llama, PROMPT)
    hf_model, hidden, attn, mlp, _ = _hf_parts("tiny-llama", ids)
    n = len(attn)
    pos = ids.shape[1] - 1
    pre = [hidden[i][0, pos] for i in range(n)]
    final = pre[0] + sum(attn[i][0, pos] + mlp[i][0, pos] for i in range(n))
    pre.append(final)
    expected = [
        _plain_direct(hf_model, pre[0] if at == "next" else final, pre[0], result.target_id)
    ]
    for i in range(n):
        mid = pre[i] + attn[i][0, pos]
        for c, z in ((attn[i][0, pos], mid), (mlp[i][0, pos], pre[i + 1])):
            expected.append(
                _plain_direct(hf_model, z if at == "next" else final, c, result.target_id)
            )
    np.testing.assert_allclose(result.direct, expected, atol=1e-4)


def test_ablation_matches_an_independent_ablation(tiny_llama):
    """At the output, the logit lens's ablation effect is the model's own: rerun transformers."""
    ids = tokenize(tiny_llama, PROMPT)
    result = attribute(
        tiny_llama, lenskit.get_lens("logit", tiny_llama), PROMPT, TARGET, at="output"
    )
    full = _hf_parts("tiny-llama", ids)[-1][-1].double().log_softmax(-1)[result.target_id]
    assert result.output_value == pytest.approx(float(full) / math.log(2), abs=1e-4)
    for k, (kind, layer) in enumerate(zip(result.kinds, result.layers, strict=True)):
        if kind == "embed":
            assert np.isnan(result.ablation[k])
            continue
        logits = _hf_parts("tiny-llama", ids, ablate=(kind, layer, ids.shape[1] - 1))[-1][-1]
        ablated = logits.double().log_softmax(-1)[result.target_id]
        assert result.ablation[k] == pytest.approx(float(full - ablated) / math.log(2), abs=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-phi", "tiny-opt"])
def test_direct_effects_and_embedding_sum_to_the_logit_difference(name):
    model = lenskit.load_model(name)
    for contrast in (None, "a"):
        result = attribute(
            model,
            lenskit.get_lens("logit", model),
            PROMPT,
            TARGET,
            metric="logit",
            at="output",
            contrast=contrast,
            ablation=False,
        )
        logits = capture(model, tokenize(model, PROMPT)).logits[0, -1].double()
        base = logits.mean() if contrast is None else logits[result_contrast_id(model, contrast)]
        assert result.output_value == pytest.approx(
            float(logits[result.target_id] - base), abs=1e-5
        )
        assert float(result.direct.sum()) + result.constant == pytest.approx(
            result.output_value, abs=1e-4
        )


def result_contrast_id(model, text):
    return model.tokenizer(text, add_special_tokens=False)["input_ids"][0]


def test_tuned_lens_reads_attention_at_mid_rows_and_ablation_is_exact_removal(tiny_llama):
    lens = randomised(tiny_llama)
    mid = TunedLens.untrained(tiny_llama, points=("resid_pre", "resid_mid"))
    with torch.no_grad():
        for a, b in zip(mid.all_translators(), lens.all_translators() * 2, strict=False):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
    pre_only = attribute(tiny_llama, lens, PROMPT, TARGET)
    assert pre_only.read_rows[1:4] == ("L1", "L1", "L2")  # no mid translators: next block input
    result = attribute(tiny_llama, mid, PROMPT, TARGET, metric="kl")
    assert result.read_rows[1:4] == ("L0.mid", "L1", "L1.mid")
    cap = capture(tiny_llama, tokenize(tiny_llama, PROMPT), points=("resid_mid", "attn_out"))
    final = cap.logits[0, -1].double().log_softmax(-1)
    for layer in range(2):
        h, c = cap.stack("resid_mid")[layer, 0, -1], cap.stack("attn_out")[layer, 0, -1]
        with torch.no_grad():
            kl = [
                float(
                    (
                        final.exp()
                        * (
                            final
                            - mid.adapter.readout(mid.transform_mid(x, layer))
                            .double()
                            .log_softmax(-1)
                        )
                    ).sum()
                )
                / math.log(2)
                for x in (h, h - c)
            ]
        k = result.labels.index(f"L{layer}.attn")
        assert result.row_values[k] == pytest.approx(kl[0], abs=1e-5)
        assert result.ablation[k] == pytest.approx(kl[0] - kl[1], abs=1e-5)


def test_result_round_trips_through_json(tiny_gpt2):
    result = attribute(tiny_gpt2, lenskit.get_lens("logit", tiny_gpt2), PROMPT, TARGET, position=3)
    again = Attribution.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again.labels == result.labels and again.position == 3
    np.testing.assert_array_equal(again.direct, result.direct)
    np.testing.assert_array_equal(np.isnan(again.ablation), np.isnan(result.ablation))
    frame = result.to_frame()
    assert list(frame["component"][:3]) == ["embed", "L0.attn", "L0.mlp"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"metric": "bits"}, "unknown metric"),
        ({"contrast": "a"}, "contrast token goes with metric='logit'"),
        ({"position": 99}, "outside the prompt"),
        ({"at": "somewhere"}, "at must be one of"),
    ],
)
def test_bad_settings_are_one_line(tiny_gpt2, kwargs, match):
    with pytest.raises(LenskitError, match=match) as info:
        attribute(tiny_gpt2, lenskit.get_lens("logit", tiny_gpt2), PROMPT, TARGET, **kwargs)
    assert "\n" not in str(info.value)


def test_cli_writes_json(tmp_path, capsys):
    from lenskit.cli import main

    out = tmp_path / "a.json"
    code = main(
        [
            "attribute",
            "--model",
            "tiny-llama",
            "--prompt",
            PROMPT,
            "--target",
            TARGET,
            "--json",
            str(out),
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    assert data["labels"][:2] == ["embed", "L0.attn"] and data["lens_kind"] == "logit"
    assert "L0.attn" in capsys.readouterr().out
    bad = main(["attribute", "--model", "tiny-llama", "--prompt", PROMPT, "--target", "two tokens"])
    assert bad == 2 and "not one" in capsys.readouterr().err


def test_figure_puts_lenses_side_by_side(tiny_llama):
    logit = attribute(tiny_llama, lenskit.get_lens("logit", tiny_llama), PROMPT, TARGET)
    tuned = attribute(tiny_llama, randomised(tiny_llama), PROMPT, TARGET)
    fig = attribution_plot([logit, tuned])
    bars = [t for t in fig.data if t.type == "bar"]
    assert [t.name for t in bars] == ["attention", "MLP"] * 2
    np.testing.assert_allclose(bars[2].y, tuned.by_layer()["attn"])
    other = attribute(tiny_llama, lenskit.get_lens("logit", tiny_llama), PROMPT, "a")
    with pytest.raises(LenskitError, match="differ"):
        attribution_plot([logit, other])


# --- published lenses in the hub cache ---------------------------------------------------


def _place_in_hub_cache(cache, lens, resource, config_changes=None):
    """Lay a lens out as huggingface_hub caches a file of the tuned-lens space."""
    commit = "0" * 40
    repo = cache / "spaces--AlignmentResearch--tuned-lens"
    folder = repo / "snapshots" / commit / "lens" / resource
    lens.save(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("lenskit")  # the tuned-lens package writes no lenskit entry
    config.update(config_changes or {})
    (folder / "config.json").write_text(json.dumps(config))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return folder


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def test_hub_lens_loads_from_the_cache_with_its_hash_checked(tiny_llama, offline_cache):
    lens = randomised(tiny_llama)
    _place_in_hub_cache(offline_cache, lens, "tiny-llama")
    loaded = lenskit.get_lens("tuned", tiny_llama, path="hub")
    assert loaded.source == "hub:AlignmentResearch/tuned-lens/lens/tiny-llama"
    assert loaded.info["unembed_hash"] == "checked"
    for key, value in lens.translator_state().items():
        torch.testing.assert_close(loaded.translator_state()[key], value)
    from lenskit.lenses import lens_from_spec

    assert lens_from_spec("tuned:hub", tiny_llama).source == loaded.source


def test_hub_hash_is_the_tuned_lens_packages(tiny_gpt2):
    hf_model, _ = tiny.build("tiny-gpt2")
    weight = hf_model.get_output_embeddings().weight.detach().numpy()  # [d_vocab, d_model]
    import hashlib

    expected = hashlib.sha256(np.array_str(weight, precision=1).encode()).hexdigest()
    assert unembed_hash(ModelAdapter(tiny_gpt2).W_U) == expected
    assert TunedLens.untrained(tiny_gpt2).config_dict()["unembed_hash"] == expected


def test_hub_lens_for_another_unembedding_is_an_error(tiny_llama, offline_cache):
    _place_in_hub_cache(
        offline_cache, randomised(tiny_llama), "tiny-llama", {"unembed_hash": "ab" * 32}
    )
    with pytest.raises(LenskitError, match="another unembedding") as info:
        lenskit.get_lens("tuned", tiny_llama, path="hub")
    assert "\n" not in str(info.value)


def test_hub_offline_without_a_copy_is_one_line(tiny_gpt2, offline_cache):
    with pytest.raises(
        LenskitError, match="unreachable and the local Hugging Face cache has no copy"
    ) as info:
        lenskit.get_lens("tuned", tiny_gpt2, path="hub")
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_paris_on_the_embedded_model(smollm2):
    prompt = "The Eiffel Tower is located in the city of"
    results = [
        attribute(smollm2, lenskit.get_lens(k, smollm2), prompt, " Paris")
        for k in ("logit", "tuned")
    ]
    for result in results:
        assert np.isfinite(result.direct).all() and np.isfinite(result.ablation[1:]).all()
        assert result.output_value == pytest.approx(results[0].output_value)
    total = attribute(
        smollm2, lenskit.get_lens("logit", smollm2), prompt, " Paris", metric="logit", at="output"
    )
    assert float(total.direct.sum()) + total.constant == pytest.approx(total.output_value, abs=1e-3)


def test_compare_page_shows_the_attribution_on_request(tmp_path, monkeypatch, tiny_llama):
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    import lenskit_app.state as S
    from lenskit_app.paths import DIRS_ENV

    monkeypatch.setenv(DIRS_ENV, str(tmp_path))
    randomised(tiny_llama).save(tmp_path / "lens")
    page = Path(__file__).resolve().parents[1] / "pages" / "compare.py"
    at = AppTest.from_file(str(page), default_timeout=300)
    at.session_state[S.MODEL] = "tiny-llama"
    at.session_state[S.PROMPT] = "Hello there, friend"
    at.session_state[S.LENS_PATHS] = {"tuned": str(tmp_path / "lens")}
    at.run()
    at.toggle(key="compare_attribution").set_value(True).run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    specs = [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]
    bars = [s for s in specs if any(t.get("type") == "bar" for t in s["data"])]
    assert len(bars) == 1
    names = [t["name"] for t in bars[0]["data"] if t.get("type") == "bar"]
    assert names == ["attention", "MLP"] * 2  # the logit and the tuned lens side by side


def test_home_offers_the_published_lens(tmp_path, monkeypatch, tiny_llama, offline_cache):
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    import lenskit_app.state as S
    from lenskit_app.paths import DIRS_ENV

    monkeypatch.setenv(DIRS_ENV, str(tmp_path))
    _place_in_hub_cache(offline_cache, randomised(tiny_llama), "tiny-llama")
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=300)
    at.session_state[S.MODEL] = "tiny-llama"
    at.session_state[S.PROMPT] = "Hello there"
    at.run()
    picker = next(box for box in at.selectbox if box.label == "tuned lens")
    assert any("published by the tuned-lens project" in option for option in picker.options)
    picker.set_value(S.HUB).run()
    assert not at.exception, at.exception
    text = " ".join(m.value for m in at.markdown)
    assert "**tuned** — ready" in text
