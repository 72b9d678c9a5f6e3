"""Tiny random models built in code, for tests and for trying lenskit with no download.

``tiny-llama`` (RMSNorm, rotary, untied unembedding) and ``tiny-gpt2`` (LayerNorm,
learned positions, tied unembedding) are the two offered everywhere. One more tiny
model per supported architecture (``tiny-mistral``, ``tiny-qwen2``, ``tiny-qwen3``,
``tiny-gemma``, ``tiny-gemma2``, ``tiny-gpt-neox``, ``tiny-opt``, ``tiny-phi``; see
:data:`FAMILIES`) is smaller still (2 blocks, width 32): the family test matrix loads
each one. All share a byte-level tokenizer: one token per byte plus an end-of-text
token. Weights are random, drawn from a fixed seed, so every build of a name is the
same model.

Example:
    >>> from lenskit import tiny
    >>> hf_model, tokenizer = tiny.build("tiny-phi")
    >>> type(hf_model).__name__, len(tokenizer)
    ('PhiForCausalLM', 257)
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["FAMILIES", "TINY_MODELS", "build", "byte_tokenizer", "is_tiny"]

TINY_MODELS = ("tiny-llama", "tiny-gpt2")
FAMILIES: dict[str, str] = {
    "LlamaForCausalLM": "tiny-llama",
    "MistralForCausalLM": "tiny-mistral",
    "Qwen2ForCausalLM": "tiny-qwen2",
    "Qwen3ForCausalLM": "tiny-qwen3",
    "GemmaForCausalLM": "tiny-gemma",
    "Gemma2ForCausalLM": "tiny-gemma2",
    "GPT2LMHeadModel": "tiny-gpt2",
    "GPTNeoXForCausalLM": "tiny-gpt-neox",
    "OPTForCausalLM": "tiny-opt",
    "PhiForCausalLM": "tiny-phi",
}
"""One tiny model per architecture lenskit supports (architecture -> model name)."""
_EOS = "<|endoftext|>"


def byte_tokenizer() -> Any:
    """A byte-level tokenizer: 256 byte tokens, then ``<|endoftext|>`` (id 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: i for i, char in enumerate(sorted(alphabet, key=_byte_of))}
    vocab[_EOS] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=_EOS,
        bos_token=_EOS,
        pad_token=_EOS,
        unk_token=_EOS,
        add_bos_token=True,
    )
    tok.model_max_length = 128
    tok.init_kwargs["name_or_path"] = "lenskit-byte-tokenizer"
    return tok


def _byte_of(char: str) -> int:
    """The byte a ByteLevel alphabet character stands for (GPT-2's byte-to-unicode map)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    code = ord(char)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def is_tiny(name: str) -> bool:
    """Whether ``name`` is a tiny model built in code."""
    return name in TINY_MODELS or name in FAMILIES.values()


# The two long-standing tiny models (4 and 3 blocks, width 64).
_MAIN: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-llama": (
        "Llama",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            pad_token_id=None,
        ),
    ),
    "tiny-gpt2": ("GPT2", dict(n_embd=64, n_layer=3, n_head=4, n_positions=128)),
}
# One per further family: 2 blocks, width 32, a 64-token context.
_SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)
_FAMILY: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-mistral": ("Mistral", dict(_SMALL, num_key_value_heads=2, sliding_window=None)),
    "tiny-qwen2": ("Qwen2", dict(_SMALL, num_key_value_heads=2, tie_word_embeddings=True)),
    "tiny-qwen3": ("Qwen3", dict(_SMALL, num_key_value_heads=2, head_dim=8)),
    "tiny-gemma": ("Gemma", dict(_SMALL, num_key_value_heads=1, head_dim=8)),
    "tiny-gemma2": (
        "Gemma2",
        dict(_SMALL, num_key_value_heads=2, head_dim=8, sliding_window=16),
    ),
    "tiny-gpt-neox": ("GPTNeoX", dict(_SMALL, rotary_pct=0.5, use_parallel_residual=True)),
    "tiny-opt": (
        "OPT",
        {
            **{k: v for k, v in _SMALL.items() if k != "intermediate_size"},
            "ffn_dim": 64,
            "word_embed_proj_dim": 32,
        },
    ),
    "tiny-phi": ("Phi", dict(_SMALL, partial_rotary_factor=0.5)),
}


def _classes(prefix: str) -> tuple[Any, Any]:
    import transformers

    model_name = {"GPT2": "GPT2LMHeadModel"}.get(prefix, f"{prefix}ForCausalLM")
    return getattr(transformers, f"{prefix}Config"), getattr(transformers, model_name)


def build(name: str, *, seed: int = 0) -> tuple[Any, Any]:
    """Build the Hugging Face model and tokenizer of a tiny model.

    Args:
        name: One of :data:`TINY_MODELS` or a value of :data:`FAMILIES`.
        seed: Seed of the random weights.

    Returns:
        ``(hf_model, tokenizer)``, the model in eval mode, float32.
    """
    spec = _MAIN.get(name) or _FAMILY.get(name)
    if spec is None:
        known = ", ".join(dict.fromkeys([*TINY_MODELS, *FAMILIES.values()]))
        raise ValueError(f"unknown tiny model {name!r}: use one of {known}")
    prefix, options = spec
    config_class, model_class = _classes(prefix)
    tok = byte_tokenizer()
    torch.manual_seed(seed)
    cfg = config_class(
        vocab_size=len(tok),
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=0.2,
        **options,
    )
    model = model_class(cfg)
    cfg.architectures = [type(model).__name__]
    cfg._name_or_path = name
    # Random norm gains and biases, so tests see a final norm that is not the identity,
    # and a random unembedding bias where the family has one.
    with torch.no_grad():
        for module in model.modules():
            if "Norm" in type(module).__name__ and getattr(module, "weight", None) is not None:
                module.weight.uniform_(0.5, 1.5)
                if getattr(module, "bias", None) is not None:
                    module.bias.normal_(0.0, 0.1)
        head = model.get_output_embeddings()
        if name in _FAMILY and getattr(head, "bias", None) is not None:
            head.bias.normal_(0.0, 0.5)
    return model.eval(), tok
