"""The token chunks an evaluation reads: a corpus shuffled by document and cut into chunks.

Example:
    >>> import lenskit
    >>> from lenskit.evaluation.chunks import eval_chunks
    >>> model = lenskit.load_model("tiny-llama")
    >>> from lenskit.data import Corpus
    >>> corpus = Corpus("demo", ("one two three four five six seven eight " * 20,))
    >>> eval_chunks(model, corpus, tokens=64, seq_len=32).tokens.shape
    torch.Size([2, 32])
"""

from __future__ import annotations

import random
from typing import Any

import torch

from lenskit.data import Corpus, TokenChunks, load_corpus, split_documents, tokenize_corpus
from lenskit.errors import LenskitError
from lenskit.evaluation.config import DEFAULT_SEQ_LEN

__all__ = ["DEFAULT_SEQ_LEN", "eval_chunks"]


def _take_chunks(chunks: TokenChunks, n_chunks: int, seed: int) -> TokenChunks:
    if n_chunks > len(chunks):
        raise LenskitError(
            f"{chunks.source} has only {chunks.n_tokens} tokens ({len(chunks)} chunks of "
            f"{chunks.seq_len}), fewer than the {n_chunks * chunks.seq_len} asked for: ask "
            f"for at most {chunks.n_tokens} tokens or add data"
        )
    if n_chunks == len(chunks):
        return chunks
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(chunks), generator=gen)[:n_chunks].sort().values
    n_bytes = round(chunks.n_bytes * n_chunks / len(chunks))
    return TokenChunks(chunks.tokens[pick], n_bytes, chunks.source)


def eval_chunks(
    model: Any,
    data: Corpus | TokenChunks | str | None,
    *,
    tokens: int,
    seq_len: int | None = None,
    seed: int = 0,
    held_out: float | None = None,
) -> TokenChunks:
    """The chunks :func:`evaluate` reads: ``tokens // seq_len`` chunks of ``seq_len`` tokens.

    Text (a :class:`~lenskit.data.Corpus`, or a source for :func:`~lenskit.data.load_corpus`,
    ``None`` meaning Shakespeare) has its documents shuffled with ``seed``, then is tokenized
    as :func:`~lenskit.data.tokenize_corpus` does (no BOS, EOS after each document) until
    ``tokens``. Given chunks keep their ``seq_len``; ``seed`` draws the ones used.

    Raises:
        LenskitError: For bad arguments, unreadable or empty data, or fewer tokens than asked
            (the message names how many there are).
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise LenskitError(f"tokens must be a positive integer, got {tokens!r}: pass e.g. 65536")
    if isinstance(data, TokenChunks):
        if seq_len is not None and seq_len != data.seq_len:
            raise LenskitError(
                f"seq_len={seq_len} but the chunks have {data.seq_len} tokens: "
                "drop seq_len or re-chunk the data"
            )
        if held_out is not None:
            raise LenskitError("held_out splits text, not chunks: pass the corpus instead")
        seq_len = data.seq_len
    seq_len = DEFAULT_SEQ_LEN if seq_len is None else seq_len
    n_ctx = int(model.cfg.n_ctx)
    if not 2 <= seq_len <= n_ctx:
        raise LenskitError(
            f"seq_len must be in 2..{n_ctx} (the model's context), got {seq_len}: "
            "pass another seq_len"
        )
    if tokens < seq_len:
        raise LenskitError(
            f"tokens={tokens} is less than one chunk of seq_len={seq_len}: "
            "raise tokens or lower seq_len"
        )
    if isinstance(data, TokenChunks):
        return _take_chunks(data, tokens // seq_len, seed)
    corpus = data if isinstance(data, Corpus) else load_corpus(data)
    if held_out is not None:
        corpus = split_documents(corpus, held_out, seed=seed)[1]
    docs = list(corpus.documents)
    random.Random(seed).shuffle(docs)
    chunks = tokenize_corpus(
        Corpus(corpus.name, tuple(docs)), model.tokenizer, seq_len, max_tokens=tokens
    )
    return _take_chunks(chunks, tokens // seq_len, seed)
