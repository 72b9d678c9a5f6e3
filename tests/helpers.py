"""Helpers shared by the tests: a small corpus on disk, randomised tuned lenses, and a
small training config."""

from __future__ import annotations

from pathlib import Path

import torch

from lenskit.data import default_corpus
from lenskit.lenses.tuned import TunedLens
from lenskit.training.config import TrainConfig


def write_corpus(folder: Path) -> Path:
    """A few kilobytes of six plays as ``.txt`` files: enough for tiny models, quick to tokenize."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(default_corpus().documents[:6]):
        (folder / f"{i}.txt").write_text(doc[2000:6000], encoding="utf-8")
    return folder


def randomised(model, scale: float = 0.05, seed: int = 0) -> TunedLens:
    """A tuned lens whose translators are random (``scale`` times standard normal)."""
    lens = TunedLens.untrained(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return lens.eval()


SMALL = dict(
    model="tiny-llama",
    tokens=256,
    seq_len=32,
    tokens_per_step=64,
    lstsq_tokens=512,
    eval_tokens=256,
    val_tokens=64,
    checkpoint_every=0,
)
"""A training run of a few seconds on tiny-llama."""


def small(corpus_dir: Path, **changes) -> TrainConfig:
    """:data:`SMALL` on the corpus in ``corpus_dir``, with ``changes``."""
    return TrainConfig(**{**SMALL, "data": str(corpus_dir), **changes})
