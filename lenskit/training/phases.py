"""The phases of a tuned-lens training run, on one typed run state that a checkpoint can save.

:class:`Phases` runs the closed-form start, the exact-KL steps and the per-layer choice
between start and fine-tuned translator, keeping everything a resume needs in a
:class:`~lenskit.training.state.RunState`; :func:`~lenskit.training.train_tuned_lens`
drives it. Its state, clock, checkpoints and wall-clock budget (``config.minutes``, which
also plans the KL steps) come from :class:`~lenskit.training.clock.RunClock`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor

from lenskit.data import batch_indices
from lenskit.evaluation.layer_kl import layer_kl_sums, layer_kl_tokens
from lenskit.metrics import LN2
from lenskit.progress import deferred_interrupt
from lenskit.residual import capture, row_capture_points
from lenskit.training.clock import CLOSED_FORM_SHARE, REPORT_SHARE, RunClock
from lenskit.training.closed_form import NormalEquations, normalized_target, set_translators
from lenskit.training.kl_step import kl_step, make_optimizer
from lenskit.training.precision import forward_autocast, readout_precision
from lenskit.training.rows import (
    row_translator,
    stack_rows,
    state_key,
    translators,
)

__all__ = ["CLOSED_FORM_SHARE", "KEEP_Z", "REPORT_SHARE", "Phases", "clearly_better"]

_PROBE_TOKENS = 128  # tokens of the evaluation and KL step timed at the start of a budget


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


class Phases(RunClock):
    """One training run's phases: the closed-form start, the KL steps, the per-layer choice.

    The state, clock, checkpoints and budget planning come from
    :class:`~lenskit.training.clock.RunClock`.
    """

    def train(self, pool: Tensor, val: Tensor, held: Tensor) -> list[int]:
        """Closed form, KL steps, the per-layer choice; returns the layers that kept the start."""
        cfg, st = self.config, self.state
        st.precision = "bfloat16" if self.agree(self._bf16_here()) else "float32"
        if cfg.minutes:  # the budget sizes evaluations and steps by their measured cost
            self.eval_spt = self._probe_eval(val if len(val) else held)
            self.step_spt = self._probe_step(pool)
        val = self.fit_tokens(val, REPORT_SHARE / 2)  # start and fine-tuned: 2 passes
        if val is None:
            self.notes.append("no validation choice: the budget has no time for it")
            val = held[:0]
        self._set_reserve(val, held)  # a first estimate, measured again below
        if st.phase == "lstsq":
            self.closed_form(pool)
            self._set_reserve(val, held)
            if self.kl_wanted():
                self.checkpoint()
        if st.start is None:
            st.start = self.lens.translator_state()
        if (
            len(val)
            and cfg.val_tokens
            and st.start_val is None
            and (cfg.minutes or self.kl_wanted())
        ):
            tic = time.perf_counter()
            st.start_val = self.token_kl(val)
            self.eval_spt = self._eval_rate(time.perf_counter() - tic, val.numel())
        self._set_reserve(val, held)
        self.finetune(pool)
        if st.start_val is None or st.step == 0:
            return []
        return self.keep_better(val)

    def _eval_rate(self, seconds: float, tokens: int) -> float:
        """Seconds per token and lens of an evaluation, from one that read ``tokens``."""
        return seconds * self.dist.world / tokens

    def _probe_eval(self, chunks: Tensor) -> float:
        """Seconds per token and lens of an evaluation, timed on part of one chunk.

        One-off costs (the first pass through the model, the readout's precision check)
        are counted in: the estimate errs long, so the budget's evaluations fit.
        """
        tokens = chunks[:1, : min(chunks.shape[-1], _PROBE_TOKENS)]
        tic = time.perf_counter()
        self.token_kl(tokens)
        return self.agree((time.perf_counter() - tic) / tokens.numel())

    def _probe_step(self, pool: Tensor) -> float:
        """Seconds per token of a KL step, timed on part of one chunk (erring long)."""
        tokens = pool[:1, : min(pool.shape[-1], _PROBE_TOKENS)].to(self.device)
        tic = time.perf_counter()
        kl_step(self.lens, self.model, tokens, scale=0.0, bf16=self._unembedding())
        self.lens.zero_grad(set_to_none=True)
        return self.agree((time.perf_counter() - tic) / tokens.numel())

    def closed_form(self, pool: Tensor) -> None:
        """Accumulate the normal equations over ``lstsq_tokens`` (or a budget's share); solve."""
        cfg, dist, st, tic = self.config, self.dist, self.state, time.perf_counter()
        normal = self.normal = NormalEquations(len(self.rows), self.adapter.d_model, self.device)
        if st.xtx is not None and st.xty is not None and dist.rank == 0:  # a partial sum
            normal.add(st.xtx.to(self.device), st.xty.to(self.device))
        elif st.xtx is None:
            st.done = 0
        st.xtx = st.xty = None
        n_chunks, per_batch = self._n_chunks(), self.per_rank * dist.world
        order = batch_indices(len(pool), n_chunks, seed=cfg.seed, step=0)
        batches = [order[i : i + per_batch] for i in range(0, n_chunks, per_batch)]
        done_tokens = sum(len(b) for b in batches[: st.done]) * cfg.seq_len
        total, first = n_chunks * cfg.seq_len, done_tokens
        autocast = forward_autocast(self.model) if st.precision == "bfloat16" else None
        with _bar(self.show, total, done_tokens, "closed-form start") as bar:
            for ids in batches[st.done :]:
                if st.done and self._closed_form_over():
                    break
                cap = capture(
                    self.model,
                    pool[ids[dist.rank :: dist.world]].to(self.device),
                    points=row_capture_points(self.rows),
                    logits=False,
                    autocast=autocast,
                )
                stats = normal.batch(
                    stack_rows(cap, self.rows),
                    normalized_target(self.adapter, cap.final.flatten(0, 1)),
                )
                with deferred_interrupt():
                    normal.add(*stats)
                    st.done += 1
                bar.update(len(ids) * cfg.seq_len)
                done_tokens += len(ids) * cfg.seq_len
                rate = (done_tokens - first) / (time.perf_counter() - tic)
                self.report("closed-form", done_tokens, total, rate)
        st.lstsq_batches = st.done if cfg.minutes else None
        dist.sum_(normal.xtx)
        dist.sum_(normal.xty)
        set_translators(self.lens, *normal.solve(cfg.ridge))
        st.phase, self.normal = "kl", None
        st.timings["lstsq_seconds"] = st.timings.get("lstsq_seconds", 0.0) + (
            time.perf_counter() - tic
        )

    def val_kl(self, tokens: Tensor, lenses: list[Any]) -> Tensor:
        """Mean KL in nats per lens and layer, each rank taking its share of the chunks."""
        sums = torch.zeros(len(lenses), len(self.rows), dtype=torch.float64)
        mine = tokens[self.dist.rank :: self.dist.world]
        if len(mine):
            sums = layer_kl_sums(
                self.model,
                lenses,
                mine,
                progress=self.show,
                points=self.lens.points,
                precision=readout_precision(self.config.precision),
                on_progress=lambda p: self.report("score", p.done, p.total, p.tokens_per_s),
            )
        return self.dist.sum_(sums) / tokens.numel()

    def token_kl(self, tokens: Tensor) -> Tensor:
        """The lens's KL in nats per layer and token (``[row, token]``), ranks sharing chunks."""
        n_chunks, length = tokens.shape
        full = torch.zeros(len(self.rows), n_chunks, length)
        mine = tokens[self.dist.rank :: self.dist.world]
        if len(mine):
            kl = layer_kl_tokens(
                self.model,
                [self.lens],
                mine,
                progress=self.show,
                points=self.lens.points,
                precision=readout_precision(self.config.precision),
                on_progress=lambda p: self.report("score", p.done, p.total, p.tokens_per_s),
            )[0]
            full[:, self.dist.rank :: self.dist.world] = kl.view(len(self.rows), -1, length)
        return self.dist.sum_(full.flatten(1))

    def _step(self, pool: Tensor) -> Tensor:
        """One KL step's gradient; the summed statistics over ranks."""
        cfg, dist, st, lens = self.config, self.dist, self.state, self.lens
        lens.zero_grad(set_to_none=False)
        ids = batch_indices(
            len(pool),
            self.per_rank,
            seed=cfg.seed,
            step=st.step,
            rank=dist.rank,
            world_size=dist.world,
        )
        sums = kl_step(
            lens,
            self.model,
            pool[ids].to(self.device),
            scale=1.0 / (self.per_rank * cfg.seq_len * len(self.rows)),
            bf16=self._unembedding(),
        )
        if dist.world > 1:
            params = [p for t in translators(lens) for p in t.parameters()]
            flat = dist.sum_(torch.cat([p.grad.reshape(-1) for p in params]))
            torch.nn.utils.vector_to_parameters(flat / dist.world, [p.grad for p in params])
            dist.sum_(sums)
        return sums

    def finetune(self, pool: Tensor) -> None:
        """KL steps until the planned number, checkpointing as configured."""
        cfg, st, lens = self.config, self.state, self.lens
        if st.scales is not None:
            self.optimizer = make_optimizer(lens, cfg.optimizer, cfg.lr, st.scales)
            if st.optimizer is not None:
                self.optimizer.load_state_dict(st.optimizer)
        params = [p for t in translators(lens) for p in t.parameters()]
        n, n_layers = cfg.tokens_per_step, len(self.rows)
        self._plan()
        with _bar(self.show, st.steps * n, st.step * n, "KL fine-tuning") as bar:
            while st.step < st.steps:
                tic = time.perf_counter()
                sums = self._step(pool)
                if self.optimizer is None:  # the first step sets the per-layer step sizes
                    st.scales = (sums[1:] / n).sqrt().float()
                    self.optimizer = make_optimizer(lens, cfg.optimizer, cfg.lr, st.scales)
                if cfg.optimizer == "sgd":
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                with deferred_interrupt():
                    for group in self.optimizer.param_groups:
                        group["lr"] = group["base_lr"] * (1.0 - st.step / st.steps)
                    self.optimizer.step()
                    st.step += 1
                self.kl_seconds += time.perf_counter() - tic
                self.kl_tokens += n
                self._plan()
                bar.total = st.steps * n
                bar.update(n)
                kl_bits = float(sums[0].sum()) / n / n_layers / LN2
                bar.set_postfix(kl_bits=f"{kl_bits:.3f}")
                every = cfg.checkpoint_every
                if every and st.step % every == 0 and st.step < st.steps:
                    self.checkpoint()
                rate = self.kl_tokens / self.kl_seconds
                self.report("fine-tune", st.step * n, st.steps * n, rate, kl_bits)
        st.timings["kl_seconds"] = st.timings.get("kl_seconds", 0.0) + self.kl_seconds

    def keep_better(self, val: Tensor) -> list[int]:
        """Per layer, put back the start translator unless fine-tuning clearly beats it.

        Clearly: the mean per-token gain on the validation tokens exceeds
        :data:`KEEP_Z` standard errors, so a gain within the noise keeps the start.
        """
        st = self.state
        if st.start is None or st.start_val is None:
            return []
        tuned = st.tuned_val = self.token_kl(val)
        kept = [i for i in range(len(tuned)) if not clearly_better(st.start_val[i], tuned[i])]
        with torch.no_grad():
            for i in kept:
                row = self.rows[i]
                row_translator(self.lens, row).weight.copy_(st.start[state_key(row, "weight")])
                row_translator(self.lens, row).bias.copy_(st.start[state_key(row, "bias")])
        return kept


KEEP_Z = 2.0
"""Standard errors by which a fine-tuned translator must beat its start on validation."""


def clearly_better(start: Tensor, tuned: Tensor) -> bool:
    """Whether ``tuned``'s per-token KL beats ``start``'s by more than :data:`KEEP_Z` SEs.

    ``start`` and ``tuned`` are one layer's KL per validation token (the same tokens);
    per-layer means (a checkpoint from before per-token values) are compared as they are.
    """
    gain = (start - tuned).double()
    if gain.dim() == 0 or gain.numel() < 2:
        return bool(gain.mean() > 0)
    return bool(gain.mean() > KEEP_Z * gain.std() / math.sqrt(gain.numel()))
