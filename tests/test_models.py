import pytest
import torch

import lenskit
from lenskit.errors import LenskitError
from lenskit.models import ModelAdapter, embedded_model_dir, load_model


def test_tiny_models_have_expected_layout(tiny_llama, tiny_gpt2):
    llama, gpt2 = ModelAdapter(tiny_llama), ModelAdapter(tiny_gpt2)
    assert (llama.spec.norm, gpt2.spec.norm) == ("rms", "layernorm")
    assert llama.n_layers == 4 and gpt2.n_layers == 3
    assert llama.d_vocab == len(tiny_llama.tokenizer) == 257
    assert llama.n_rows == 5 and llama.row_label(4) == "output" and llama.row_label(0) == "L0"
    assert tiny_llama.tokenizer.decode(tiny_llama.to_tokens("héllo")[0, 1:]) == "héllo"


def test_tiny_models_are_deterministic():
    a, b = load_model("tiny-llama"), load_model("tiny-llama")
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_adapter_rejects_rows_out_of_range(tiny_llama):
    adapter = ModelAdapter(tiny_llama)
    with pytest.raises(LenskitError, match="out of range"):
        adapter.check_row(5)
    with pytest.raises(LenskitError, match="out of range"):
        adapter.check_row(-1)


def test_hook_names(tiny_llama):
    adapter = ModelAdapter(tiny_llama)
    assert adapter.hook_name(0) == "blocks.0.hook_resid_pre"
    assert adapter.hook_name(2, "resid_mid") == "blocks.2.hook_resid_mid"
    assert adapter.hook_name(4) == "blocks.3.hook_resid_post"


@pytest.mark.parametrize("name", ["", "   "])
def test_empty_model_name(name):
    with pytest.raises(LenskitError, match="non-empty"):
        load_model(name)


def test_unknown_model_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LenskitError) as info:
        load_model("nobody/no-such-model-xyz")
    message = str(info.value)
    assert "\n" not in message and "not in the local Hugging Face cache" in message


def test_folder_without_config(tmp_path):
    with pytest.raises(LenskitError, match=r"no config\.json"):
        load_model(str(tmp_path))


def test_bad_dtype():
    with pytest.raises(LenskitError, match="unknown dtype"):
        load_model("tiny-llama", dtype="float7")


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LENSKIT_CACHE", str(tmp_path / "c"))
    assert embedded_model_dir() == tmp_path / "c" / "models" / "SmolLM2-135M-Instruct"


@pytest.mark.slow
def test_embedded_model_loads_offline(smollm2):
    adapter = ModelAdapter(smollm2)
    assert (adapter.n_layers, adapter.d_model, adapter.d_vocab) == (30, 576, 49152)
    assert adapter.architecture == "LlamaForCausalLM"
    assert (embedded_model_dir() / "model.safetensors").is_file()
    assert lenskit.DEFAULT_MODEL == "smollm2-135m"
