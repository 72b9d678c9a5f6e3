"""Built-in corpora: names, the equal-share mix, and no evaluation text in it."""

from __future__ import annotations

import re

import pytest

from lenskit.corpora import (
    SECTION_CHARS,
    _sections,
    builtin_corpus,
    is_builtin,
    mixed_corpus,
    python_docs,
    python_reference,
)
from lenskit.data import default_corpus, load_corpus, split_documents
from lenskit.errors import LenskitError
from lenskit.training import TrainConfig


def _paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n[ \t]*\n\s*", text) if p.strip()]


def test_names_resolve_through_load_corpus() -> None:
    assert load_corpus("builtin:mix") is mixed_corpus()
    assert load_corpus("builtin:python-docs").name == "builtin:python-docs"
    assert builtin_corpus("shakespeare").documents == default_corpus().documents
    assert is_builtin("builtin:mix") and not is_builtin("mix") and not is_builtin(None)


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(LenskitError, match=r"no built-in corpus 'builtin:nope'.*builtin:mix"):
        load_corpus("builtin:nope")


def test_sections_keep_every_paragraph_in_order() -> None:
    text = "\n\n".join(f"paragraph {i} " + "x" * (i * 7 % 50) for i in range(60))
    sections = _sections(text, 200)
    assert [p for s in sections for p in _paragraphs(s)] == _paragraphs(text)
    assert all(len(s) >= 200 for s in sections[:-1])
    longest = max(map(len, _paragraphs(text)))
    assert all(sum(map(len, _paragraphs(s))) < 200 + longest for s in sections)


def test_python_parts_hold_module_and_method_docs() -> None:
    docs = python_docs()
    argparse = docs.documents[0]
    assert "ArgumentParser" in argparse and "\nArgumentParser.error\n" in argparse
    assert len(python_reference().documents) > 50


def test_mix_has_equal_shares_interleaved() -> None:
    mix = mixed_corpus()
    kinds = [
        {p for doc in corpus.documents for p in _paragraphs(doc)}
        for corpus in (
            split_documents(default_corpus(), 0.1, seed=0)[0],
            python_reference(),
            python_docs(),
        )
    ]

    def kind(section: str) -> int:
        first = _paragraphs(section)[0]
        return next(k for k, paragraphs in enumerate(kinds) if first in paragraphs)

    labels = [kind(s) for s in mix.documents]
    chars = [
        sum(len(s) for s, k in zip(mix.documents, labels, strict=True) if k == i) for i in range(3)
    ]
    smallest = min(sum(len(d) for d in c.documents) for c in (python_reference(), python_docs()))
    assert min(chars) > 0.9 * smallest  # every kind gives about the smallest kind's total
    assert max(chars) - min(chars) < 3 * SECTION_CHARS
    assert set(labels[:6]) == {0, 1, 2}  # a short prefix is already a mix
    assert load_corpus("builtin:mix").documents == mixed_corpus.__wrapped__().documents


def test_mix_leaves_out_the_plays_the_default_evaluation_holds_out() -> None:
    text = "\n\n".join(mixed_corpus().documents)
    train, held = split_documents(default_corpus(), 0.1, seed=0)
    held_paragraphs = [p for doc in held.documents for p in _paragraphs(doc) if len(p) > 400]
    train_paragraphs = [p for doc in train.documents for p in _paragraphs(doc) if len(p) > 400]
    assert held_paragraphs and not any(p in text for p in held_paragraphs)
    assert any(p in text for p in train_paragraphs)  # the check can find a play's paragraph


def test_training_reads_the_mix_by_default() -> None:
    assert TrainConfig().data == "builtin:mix"
    assert TrainConfig(data=None).data is None  # the plays, as earlier configs meant
