"""Training a tuned lens: a closed-form start, then exact-KL fine-tuning; resumable, data-parallel.

Objective (Belrose et al. 2023): for every block input, ``KL(model output || lens)`` at
the same position, averaged over tokens, every layer weighted equally; the model is frozen.

1. Closed-form start (``init="lstsq"``): per layer, ridge regression of what the final
   norm sees before its affine part (``h_final / rms(h_final)`` for RMSNorm, the
   standardised ``h_final`` for LayerNorm) on ``[h_layer, 1]``. Only ``X^T X`` and
   ``X^T Y`` are accumulated (float64), ``d_model^2`` work per token instead of
   ``d_model * d_vocab``; the translator is ``(W - I, b)``.
2. Fine-tuning on the exact KL: residuals are captured once per batch without grad; each
   layer's translated rows go through the real final norm and unembedding in row chunks,
   backward per chunk, so one ``[rows, d_vocab]`` block lives at a time. Step sizes are
   per layer (scaled by each layer's input and output RMS), decay linearly, and at the end
   each layer keeps whichever of start and fine-tuned translator has the lower KL on a
   validation slice of the training split.

Checkpoints (``checkpoint.pt``) are written every ``checkpoint_every`` steps, on Ctrl-C and
when the ``on_progress`` callback raises (how the app stops a run); ``resume=True`` continues
with the same data order and optimizer state and ends with the same lens. Under ``torchrun``
(``WORLD_SIZE > 1``) each rank reads its own shard; gradients are averaged, statistics
summed, and only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from lenskit.data import batch_indices, load_corpus, split_documents, tokenize_corpus
from lenskit.errors import LenskitError
from lenskit.evaluation.layer_kl import layer_kl_sums
from lenskit.io import atomic_torch_save, atomic_write_json
from lenskit.lenses.logit import LogitLens
from lenskit.lenses.tuned import TunedLens
from lenskit.metrics import LN2
from lenskit.models import ModelAdapter
from lenskit.progress import Progress, ProgressCallback, deferred_interrupt, frozen
from lenskit.residual import capture
from lenskit.training.checkpoints import CHECKPOINT_FILE, check_out, checkpoint_config
from lenskit.training.closed_form import NormalEquations, normalized_target, set_translators
from lenskit.training.config import TrainConfig
from lenskit.training.distributed import Dist
from lenskit.training.kl_step import kl_step, make_optimizer

__all__ = [
    "CHECKPOINT_FILE",
    "METRICS_FILE",
    "TrainConfig",
    "TrainResult",
    "checkpoint_config",
    "train_tuned_lens",
]

METRICS_FILE = "metrics.json"
_TOKENIZE_AT_LEAST = 1 << 20  # tokens of the training split to draw batches from


@dataclass(frozen=True)
class TrainResult:
    """A trained lens and its held-out per-layer KL (bits) next to the logit lens's.

    Attributes:
        lens: The trained lens.
        steps: KL fine-tuning steps taken.
        tokens: Tokens trained on (closed-form and KL steps).
        seconds: Wall time, over all resumed sessions.
        logit_kl: Held-out mean KL of the logit lens per block input.
        tuned_kl: Held-out mean KL of the trained lens per block input.
        kept_start: Layers whose start translator beat fine-tuning on the validation slice.
        timings: Seconds per phase and the KL step's tokens per second.
    """

    lens: TunedLens
    steps: int
    tokens: int
    seconds: float
    logit_kl: tuple[float, ...]
    tuned_kl: tuple[float, ...]
    kept_start: tuple[int, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.logit_kl) != len(self.tuned_kl) or not self.logit_kl:
            raise ValueError("logit_kl and tuned_kl must have one value per layer")
        if self.steps < 0 or self.tokens < 0 or self.seconds < 0:
            raise ValueError("steps, tokens and seconds must be >= 0")

    def to_frame(self) -> pd.DataFrame:
        """One row per block input: ``layer``, ``logit_kl_bits``, ``tuned_kl_bits``."""
        return pd.DataFrame(
            {
                "layer": range(len(self.logit_kl)),
                "logit_kl_bits": self.logit_kl,
                "tuned_kl_bits": self.tuned_kl,
            }
        )


def _data(model: Any, config: TrainConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Training pool, validation slice (of the training split) and held-out chunks."""
    train, held = split_documents(load_corpus(config.data), config.held_out, seed=config.seed)
    need = config.lstsq_tokens + config.tokens + config.val_tokens
    chunks = tokenize_corpus(
        train, model.tokenizer, config.seq_len, max_tokens=max(need, _TOKENIZE_AT_LEAST)
    ).tokens
    n_val = config.val_tokens // config.seq_len
    if len(chunks) <= n_val:
        raise LenskitError(
            f"the training split has only {len(chunks)} chunks of "
            f"{config.seq_len} tokens: add data or lower val_tokens/seq_len"
        )
    held_chunks = tokenize_corpus(
        held, model.tokenizer, config.seq_len, max_tokens=config.eval_tokens
    ).tokens
    return chunks[: len(chunks) - n_val], chunks[len(chunks) - n_val :], held_chunks


def _bar(show: bool, total: int, initial: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="tok",
        unit_scale=True,
        disable=not show,
        dynamic_ncols=True,
    )


class _Run:
    """One training run's state, so that a checkpoint can be written at any moment."""

    def __init__(
        self,
        model: Any,
        config: TrainConfig,
        out: Path,
        dist: Dist,
        show: bool,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        self.model, self.config, self.out, self.dist, self.show = model, config, out, dist, show
        self.on_progress = on_progress if dist.rank == 0 else None
        self.stopped = False  # set when on_progress raised: the run stops with a checkpoint
        self.adapter = ModelAdapter(model)
        self.device = self.adapter.W_U.device
        self.lens = TunedLens(self.adapter, dtype=torch.float32)
        self.optimizer: torch.optim.Optimizer | None = None
        self.normal: NormalEquations | None = None
        self.per_rank = config.tokens_per_step // config.seq_len // dist.world
        self.st: dict[str, Any] = {
            "phase": "lstsq" if config.init == "lstsq" else "kl",
            "step": 0,
            "done": 0,
            "seconds": 0.0,
            "timings": {},
            "start": None,
            "start_val": None,
            "scales": None,
            "optimizer": None,
        }
        self.saved: dict[str, Any] = {}
        self.clock = time.perf_counter()
        self.kl_seconds, self.kl_tokens = 0.0, 0

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Continue from a checkpoint's state."""
        self.st.update({k: ckpt[k] for k in self.st if k in ckpt})
        self.lens.translators.load_state_dict(ckpt["lens"])
        torch.set_rng_state(ckpt["rng"])
        self.saved = ckpt

    def seconds(self) -> float:
        """Wall time of this run, over all sessions."""
        return self.st["seconds"] + time.perf_counter() - self.clock

    def report(
        self, phase: str, done: int, total: int, rate: float, kl_bits: float | None = None
    ) -> None:
        """Call ``on_progress`` (at a point where the state is whole, so a raise can stop)."""
        if self.on_progress is None:
            return
        try:
            self.on_progress(Progress(phase, done, total, rate, self.seconds(), kl_bits))
        except BaseException:
            self.stopped = True
            raise

    def checkpoint(self) -> None:
        """Write the state atomically (rank 0 only)."""
        if self.dist.rank != 0:
            return
        state = {
            **self.st,
            "config": self.config.to_dict(),
            "seconds": self.seconds(),
            "lens": self.lens.translator_state(),
            "rng": torch.get_rng_state(),
        }
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        if self.st["phase"] == "lstsq" and self.normal is not None and self.dist.world == 1:
            state |= {"xtx": self.normal.xtx.cpu(), "xty": self.normal.xty.cpu()}
        atomic_torch_save(state, self.out / CHECKPOINT_FILE)

    def closed_form(self, pool: Tensor) -> None:
        """Accumulate the normal equations over ``lstsq_tokens`` and solve them."""
        cfg, dist, st, tic = self.config, self.dist, self.st, time.perf_counter()
        normal = self.normal = NormalEquations(
            self.adapter.n_layers, self.adapter.d_model, self.device
        )
        if "xtx" in self.saved and dist.rank == 0:  # a partial sum (only saved by one process)
            normal.add(self.saved["xtx"].to(self.device), self.saved["xty"].to(self.device))
        elif "xtx" not in self.saved:
            st["done"] = 0
        n_chunks, per_batch = cfg.lstsq_tokens // cfg.seq_len, self.per_rank * dist.world
        order = batch_indices(len(pool), n_chunks, seed=cfg.seed, step=0)
        batches = [order[i : i + per_batch] for i in range(0, n_chunks, per_batch)]
        done_tokens = sum(len(b) for b in batches[: st["done"]]) * cfg.seq_len
        total, first = n_chunks * cfg.seq_len, done_tokens
        with _bar(self.show, total, done_tokens, "closed-form start") as bar:
            for ids in batches[st["done"] :]:
                cap = capture(
                    self.model, pool[ids[dist.rank :: dist.world]].to(self.device), logits=False
                )
                stats = normal.batch(
                    cap.stack("resid_pre").flatten(1, 2),
                    normalized_target(self.adapter, cap.final.flatten(0, 1)),
                )
                with deferred_interrupt():
                    normal.add(*stats)
                    st["done"] += 1
                bar.update(len(ids) * cfg.seq_len)
                done_tokens += len(ids) * cfg.seq_len
                self.report(
                    "closed-form",
                    done_tokens,
                    total,
                    (done_tokens - first) / (time.perf_counter() - tic),
                )
        dist.sum_(normal.xtx)
        dist.sum_(normal.xty)
        set_translators(self.lens, *normal.solve(cfg.ridge))
        st["phase"], self.normal = "kl", None
        st["timings"]["lstsq_seconds"] = time.perf_counter() - tic

    def val_kl(self, tokens: Tensor, lenses: list[Any]) -> Tensor:
        """Mean KL in nats per lens and layer, each rank taking its share of the chunks."""
        sums = torch.zeros(len(lenses), self.adapter.n_layers, dtype=torch.float64)
        mine = tokens[self.dist.rank :: self.dist.world]
        if len(mine):
            sums = layer_kl_sums(self.model, lenses, mine, progress=self.show)
        return self.dist.sum_(sums) / tokens.numel()

    def finetune(self, pool: Tensor) -> None:
        """KL steps from ``st["step"]`` to ``config.steps``, checkpointing as configured."""
        cfg, dist, st, lens = self.config, self.dist, self.st, self.lens
        if st["scales"] is not None:
            self.optimizer = make_optimizer(lens, cfg.optimizer, cfg.lr, st["scales"])
            if st["optimizer"] is not None:
                self.optimizer.load_state_dict(st["optimizer"])
        params = [p for t in lens.translators for p in t.parameters()]
        n, n_layers = cfg.tokens_per_step, self.adapter.n_layers
        with _bar(self.show, cfg.steps * n, st["step"] * n, "KL fine-tuning") as bar:
            while st["step"] < cfg.steps:
                tic = time.perf_counter()
                lens.zero_grad(set_to_none=False)
                ids = batch_indices(
                    len(pool),
                    self.per_rank,
                    seed=cfg.seed,
                    step=st["step"],
                    rank=dist.rank,
                    world_size=dist.world,
                )
                sums = kl_step(
                    lens,
                    self.model,
                    pool[ids].to(self.device),
                    scale=1.0 / (self.per_rank * cfg.seq_len * n_layers),
                )
                if dist.world > 1:
                    flat = dist.sum_(torch.cat([p.grad.reshape(-1) for p in params]))
                    torch.nn.utils.vector_to_parameters(flat / dist.world, [p.grad for p in params])
                    dist.sum_(sums)
                if self.optimizer is None:  # the first step sets the per-layer step sizes
                    st["scales"] = (sums[1:] / n).sqrt().float()
                    self.optimizer = make_optimizer(lens, cfg.optimizer, cfg.lr, st["scales"])
                if cfg.optimizer == "sgd":
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                with deferred_interrupt():
                    for group in self.optimizer.param_groups:
                        group["lr"] = group["base_lr"] * (1.0 - st["step"] / cfg.steps)
                    self.optimizer.step()
                    st["step"] += 1
                self.kl_seconds += time.perf_counter() - tic
                self.kl_tokens += n
                bar.update(n)
                kl_bits = float(sums[0].sum()) / n / n_layers / LN2
                bar.set_postfix(kl_bits=f"{kl_bits:.3f}")
                every = cfg.checkpoint_every
                if every and st["step"] % every == 0 and st["step"] < cfg.steps:
                    self.checkpoint()
                self.report(
                    "fine-tune",
                    st["step"] * n,
                    cfg.steps * n,
                    self.kl_tokens / self.kl_seconds,
                    kl_bits,
                )

    def keep_better(self, val: Tensor) -> list[int]:
        """Per layer, put back the start translator where it beats the fine-tuned one."""
        tuned = self.st["tuned_val"] = self.val_kl(val, [self.lens])[0]
        kept = [i for i in range(len(tuned)) if self.st["start_val"][i] < tuned[i]]
        with torch.no_grad():
            for i in kept:
                self.lens.translators[i].weight.copy_(self.st["start"][f"{i}.weight"])
                self.lens.translators[i].bias.copy_(self.st["start"][f"{i}.bias"])
        return kept


def train_tuned_lens(
    model: Any,
    config: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
    on_progress: ProgressCallback | None = None,
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

    Returns:
        The :class:`TrainResult` (the same on every rank).

    Raises:
        LenskitError: For bad settings or data, or a checkpoint that does not match.
        KeyboardInterrupt: On Ctrl-C, after writing a checkpoint.
    """
    adapter = ModelAdapter(model)
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
    out = Path(out_dir).expanduser()
    dist = Dist.from_env(adapter.W_U.device)
    try:
        if (config.tokens_per_step // config.seq_len) % dist.world:
            raise LenskitError(
                f"tokens_per_step/seq_len must be a multiple of the {dist.world} "
                "ranks: change --tokens-per-step"
            )
        ckpt = check_out(out, resume, config)
        run = _Run(model, config, out, dist, progress and dist.rank == 0, on_progress)
        if ckpt is not None:
            run.restore(ckpt)
        with frozen(model):
            pool, val, held = _data(model, config)
            try:
                if run.st["phase"] == "lstsq":
                    run.closed_form(pool)
                    if config.steps:
                        run.checkpoint()
                if run.st["start"] is None:
                    run.st["start"] = run.lens.translator_state()
                if config.steps and config.val_tokens and run.st["start_val"] is None:
                    run.st["start_val"] = run.val_kl(val, [run.lens])[0]
                run.finetune(pool)
                kept = run.keep_better(val) if run.st["start_val"] is not None else []
                return _finish(run, held, kept, command)
            except BaseException as err:  # Ctrl-C, or a stop from on_progress: keep the work
                if isinstance(err, KeyboardInterrupt) or run.stopped:
                    run.checkpoint()
                raise
    finally:
        dist.close()


def _finish(run: _Run, held: Tensor, kept: list[int], command: str | None) -> TrainResult:
    """Evaluate on held-out text and write the lens and ``metrics.json``."""
    cfg, lens, tic = run.config, run.lens, time.perf_counter()
    kl = (run.val_kl(held, [LogitLens(lens.adapter), lens]) / LN2).tolist()
    timings = {**run.st["timings"], "eval_seconds": time.perf_counter() - tic}
    if run.kl_seconds:
        timings["kl_tokens_per_s"] = run.kl_tokens / run.kl_seconds
    trained = cfg.lstsq_tokens * (cfg.init == "lstsq") + cfg.steps * cfg.tokens_per_step
    result = TrainResult(
        lens=lens,
        steps=cfg.steps,
        tokens=trained,
        seconds=run.seconds(),
        logit_kl=tuple(kl[0]),
        tuned_kl=tuple(kl[1]),
        kept_start=tuple(kept),
        timings=timings,
    )
    mean = {"logit": sum(kl[0]) / len(kl[0]), "tuned": sum(kl[1]) / len(kl[1])}
    lens.info = {
        "trained_by": "lenskit train",
        "train_config": cfg.to_dict(),
        "held_out_mean_kl_bits": mean,
    }
    if run.dist.rank == 0:
        lens.save(run.out)
        atomic_write_json(
            run.out / METRICS_FILE,
            {
                "model": lens.adapter.name,
                "command": command,
                "config": cfg.to_dict(),
                "world_size": run.dist.world,
                "tokens_trained": trained,
                "held_out_tokens": held.numel(),
                "seconds": result.seconds,
                "timings": timings,
                "mean_kl_bits": mean,
                "kept_start_layers": kept,
                "validation_kl_bits": {
                    k: (run.st[f"{k}_val"] / LN2).tolist()
                    for k in ("start", "tuned")
                    if run.st.get(f"{k}_val") is not None
                },
                "per_layer": result.to_frame().to_dict(orient="records"),
            },
        )
        with contextlib.suppress(FileNotFoundError):
            (run.out / CHECKPOINT_FILE).unlink()
    return result
