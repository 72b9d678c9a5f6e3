"""Training a tuned lens: a closed-form start, then exact-KL fine-tuning; resumable, data-parallel.

Objective (Belrose et al. 2023): for every block input, ``KL(model output || lens)`` at
the same position, averaged over tokens, every layer weighted equally; the model is frozen.

1. Closed-form start (``init="lstsq"``): per layer, ridge regression of what the final
   norm sees before its affine part on ``[h_layer, 1]`` (see
   :mod:`~lenskit.training.closed_form`).
2. Fine-tuning on the exact KL (see :mod:`~lenskit.training.kl_step`), in bfloat16
   matmuls where this machine runs them faster (``precision="auto"``). Step sizes are
   per layer, decay linearly, and at the end each layer keeps whichever of start and
   fine-tuned translator has the lower KL on a validation slice of the training split.

With ``minutes`` set, the run fits a wall-clock budget from launch to saved lens. It times
a short evaluation and a short KL step first; the closed form takes at most a third of
the budget; the validation choice and the held-out report read what fits their shares
(whole chunks, else the first positions of one, else nothing, with a note in the result);
the KL steps take the rest, planned from their measured speed, the step size decaying to
0 at the last one.

Checkpoints (``checkpoint.pt``) are written every ``checkpoint_every`` steps, on Ctrl-C or
SIGTERM and when the ``on_progress`` callback raises (how the app stops a run);
``resume=True`` continues with the same data order and optimizer state and ends with the
same lens. One run at a time may use a folder (:mod:`~lenskit.training.lock`). Under
``torchrun`` (``WORLD_SIZE > 1``) each rank reads its own shard; gradients are averaged,
statistics summed, and only rank 0 writes files and shows progress.

Example:
    >>> import lenskit, pathlib, tempfile
    >>> from lenskit.training import TrainConfig, train_tuned_lens
    >>> model = lenskit.load_model("tiny-llama")
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> for i in range(10):
    ...     _ = (folder / f"doc{i}.txt").write_text(f"story {i}: " + "the cat sat down " * 60)
    >>> config = TrainConfig(model="tiny-llama", data=str(folder), tokens=0, seq_len=32,
    ...                      lstsq_tokens=64, eval_tokens=32, val_tokens=0)
    >>> result = train_tuned_lens(model, config, folder / "lens", progress=False)
    >>> len(result.tuned_kl) == model.cfg.n_layers
    True
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lenskit.data import load_corpus, split_documents, tokenize_corpus
from lenskit.errors import LenskitError
from lenskit.io import atomic_write_json
from lenskit.lenses.logit import LogitLens
from lenskit.metrics import LN2
from lenskit.models import ModelAdapter
from lenskit.progress import ProgressCallback, frozen, sigterm_as_interrupt
from lenskit.training.checkpoints import CHECKPOINT_FILE, check_out, checkpoint_config
from lenskit.training.config import TrainConfig
from lenskit.training.distributed import Dist
from lenskit.training.lock import FolderLock
from lenskit.training.phases import Phases
from lenskit.training.result import METRICS_FILE, TrainResult, mean_bits, metrics_record

__all__ = [
    "CHECKPOINT_FILE",
    "METRICS_FILE",
    "TrainConfig",
    "TrainResult",
    "checkpoint_config",
    "train_tuned_lens",
]

_TOKENIZE_AT_LEAST = 1 << 20  # tokens of the training split to draw batches from
_BUDGET_RATE = 1000  # KL tokens per second a wall-clock budget tokenizes for


def _data(model: Any, config: TrainConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Training pool, validation chunks (of the training split) and held-out chunks."""
    train, held = split_documents(load_corpus(config.data), config.held_out, seed=config.seed)
    if config.minutes:  # no more than a fast machine trains in the time
        need = config.lstsq_tokens + int(config.minutes * 60 * _BUDGET_RATE) + config.val_tokens
    else:
        need = max(config.lstsq_tokens + config.tokens + config.val_tokens, _TOKENIZE_AT_LEAST)
    chunks = tokenize_corpus(train, model.tokenizer, config.seq_len, max_tokens=need).tokens
    n_val = config.val_tokens // config.seq_len
    if len(chunks) <= n_val:
        raise LenskitError(
            f"the training split has only {len(chunks)} chunks of "
            f"{config.seq_len} tokens: add data or lower val_tokens/seq_len"
        )
    held_chunks = tokenize_corpus(
        held, model.tokenizer, config.seq_len, max_tokens=config.eval_tokens
    ).tokens
    # Validation chunks drawn at random from the whole stream (any prefix of them too):
    # a corpus's kinds of text come in sections, so the last chunks would be one kind.
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(config.seed))
    keep = torch.ones(len(chunks), dtype=torch.bool)
    keep[order[:n_val]] = False
    return chunks[keep], chunks[order[:n_val]], held_chunks


def _check(adapter: ModelAdapter, config: TrainConfig, dist: Dist) -> None:
    if config.model != adapter.name:
        raise LenskitError(
            f"config.model is {config.model!r} but the model is {adapter.name!r}: "
            f"pass TrainConfig(model={adapter.name!r}, ...)"
        )
    if config.seq_len > adapter.n_ctx:
        raise LenskitError(
            f"seq_len {config.seq_len} exceeds the context of {adapter.name} "
            f"({adapter.n_ctx}): lower --seq-len"
        )
    if (config.tokens_per_step // config.seq_len) % dist.world:
        raise LenskitError(
            f"tokens_per_step/seq_len must be a multiple of the {dist.world} "
            "ranks: change --tokens-per-step"
        )


def train_tuned_lens(
    model: Any,
    config: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
    on_progress: ProgressCallback | None = None,
    started: float | None = None,
) -> TrainResult:
    """Train a tuned lens for ``model`` and write it, with ``metrics.json``, to ``out_dir``.

    Args:
        model: A ``TransformerBridge`` (frozen during training).
        config: The settings; ``config.model`` must name ``model``.
        out_dir: Folder for checkpoints, the lens (``config.json`` + ``params.pt``) and
            ``metrics.json``.
        resume: Continue from ``out_dir``'s checkpoint (a fresh start if there is none).
        progress: Show tqdm bars (rank 0 only).
        command: The command line, recorded in ``metrics.json``.
        on_progress: Called with a :class:`~lenskit.progress.Progress` after every batch of
            the closed-form start and every KL step (rank 0 only). If it raises, a
            checkpoint is written and the exception propagates: a way to stop a run that
            ``resume=True`` continues.
        started: ``time.perf_counter()`` at launch, where ``config.minutes`` counts from
            (default: now).

    Returns:
        The :class:`TrainResult` (the same on every rank).

    Raises:
        LenskitError: For bad settings or data, a checkpoint that does not match, or a
            folder another run is using.
        KeyboardInterrupt: On Ctrl-C or SIGTERM, after writing a checkpoint.
    """
    started = time.perf_counter() if started is None else started
    adapter = ModelAdapter(model)
    out = Path(out_dir).expanduser()
    dist = Dist.from_env(adapter.W_U.device)
    try:
        _check(adapter, config, dist)
        with FolderLock(out, active=dist.rank == 0), sigterm_as_interrupt():
            state = check_out(out, resume, config)
            run = Phases(model, config, out, dist, progress and dist.rank == 0, on_progress)
            run.start_clock(started)
            if state is not None:
                run.restore(state)
            with frozen(model):
                pool, val, held = _data(model, config)
                try:
                    kept = run.train(pool, val, held)
                    return _finish(run, held, kept, command)
                except BaseException as err:  # Ctrl-C, SIGTERM, a stop from on_progress
                    if isinstance(err, KeyboardInterrupt) or run.stopped:
                        run.checkpoint()
                    raise
    finally:
        dist.close()


def _finish(run: Phases, held: Tensor, kept: list[int], command: str | None) -> TrainResult:
    """Evaluate on held-out text (unless ``report`` is off) and write the lens and metrics."""
    cfg, lens, st, tic = run.config, run.lens, run.state, time.perf_counter()
    n = len(run.rows)
    report = run.report_tokens(held) if cfg.report else None
    if cfg.report and report is None:
        run.notes.append("no held-out report: the budget has no time for it (use lenskit eval)")
    if report is not None:
        kl = (run.val_kl(report, [LogitLens(lens.adapter), lens]) / LN2).tolist()
    else:
        kl = [[math.nan] * n, [math.nan] * n]
    timings = {**st.timings, "eval_seconds": time.perf_counter() - tic}
    if run.kl_seconds:
        timings["kl_tokens_per_s"] = run.kl_tokens / run.kl_seconds
    result = TrainResult(
        lens=lens,
        steps=st.step,
        tokens=run.lstsq_tokens_done() + st.step * cfg.tokens_per_step,
        seconds=run.seconds(),
        logit_kl=tuple(kl[0]),
        tuned_kl=tuple(kl[1]),
        kept_start=tuple(kept),
        timings=timings,
        precision=st.precision,
        labels=tuple(r.label for r in run.rows) if n != run.adapter.n_layers else (),
        notes=tuple(run.notes),
    )
    lens.info = {
        "trained_by": "lenskit train",
        "train_config": cfg.to_dict(),
        "held_out_mean_kl_bits": (
            {"logit": mean_bits(kl[0]), "tuned": mean_bits(kl[1])} if report is not None else None
        ),
    }
    if run.dist.rank == 0:
        lens.save(run.out)
        extra = {
            "model": lens.adapter.name,
            "command": command,
            "config": cfg.to_dict(),
            "world_size": run.dist.world,
            "held_out_tokens": 0 if report is None else report.numel(),
            "validation_kl_bits": {
                k: (v.mean(-1) / LN2).tolist() if v.dim() == 2 else (v / LN2).tolist()
                for k, v in (("start", st.start_val), ("tuned", st.tuned_val))
                if v is not None
            },
        }
        atomic_write_json(run.out / METRICS_FILE, metrics_record(result, extra))
        with contextlib.suppress(FileNotFoundError):
            (run.out / CHECKPOINT_FILE).unlink()
    return result
