"""Tiny random models built in code, for tests and for trying lenskit with no download.

``tiny-llama`` (RMSNorm, rotary, untied unembedding) and ``tiny-gpt2`` (LayerNorm,
learned positions, tied unembedding) share a byte-level tokenizer: one token per
byte plus an end-of-text token. Weights are random, drawn from a fixed seed, so
every build of a name is the same model.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["TINY_MODELS", "build", "byte_tokenizer"]

TINY_MODELS = ("tiny-llama", "tiny-gpt2")
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


def build(name: str, *, seed: int = 0) -> tuple[Any, Any]:
    """Build the Hugging Face model and tokenizer of a tiny model.

    Args:
        name: One of :data:`TINY_MODELS`.
        seed: Seed of the random weights.

    Returns:
        ``(hf_model, tokenizer)``, the model in eval mode, float32.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    vocab = len(tok)
    torch.manual_seed(seed)
    if name == "tiny-llama":
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=None,
            initializer_range=0.2,
        )
        model = LlamaForCausalLM(cfg)
    elif name == "tiny-gpt2":
        cfg = GPT2Config(
            vocab_size=vocab,
            n_embd=64,
            n_layer=3,
            n_head=4,
            n_positions=128,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
            initializer_range=0.2,
        )
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(f"unknown tiny model {name!r}: use one of {', '.join(TINY_MODELS)}")
    cfg.architectures = [type(model).__name__]
    cfg._name_or_path = name
    # Random final-norm gains and biases, so tests see a norm that is not the identity.
    with torch.no_grad():
        for module in model.modules():
            if "Norm" in type(module).__name__:
                module.weight.uniform_(0.5, 1.5)
                if getattr(module, "bias", None) is not None:
                    module.bias.normal_(0.0, 0.1)
    return model.eval(), tok
