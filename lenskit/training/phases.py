"""The phases of a tuned-lens training run, on one typed run state that a checkpoint can save.

:class:`Phases` runs the closed-form start, the exact-KL steps and the per-layer choice
between start and fine-tuned translator, keeping everything a resume needs in a
:class:`~lenskit.training.state.RunState`; :func:`~lenskit.training.train_tuned_lens`
drives it. Under a wall-clock budget (``config.minutes``) it also plans the KL steps.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lenskit.data import batch_indices
from lenskit.evaluation.layer_kl import layer_kl_sums
from lenskit.lenses.tuned import TunedLens
from lenskit.metrics import LN2
from lenskit.models import ModelAdapter
from lenskit.progress import Progress, ProgressCallback, deferred_interrupt
from lenskit.residual import capture, row_capture_points
from lenskit.training.checkpoints import save_checkpoint
from lenskit.training.closed_form import NormalEquations, normalized_target, set_translators
from lenskit.training.config import TrainConfig
from lenskit.training.distributed import Dist
from lenskit.training.kl_step import Bf16Unembedding, kl_step, make_optimizer
from lenskit.training.precision import matmul_rates, readout_precision, resolve_precision
from lenskit.training.rows import (
    load_translator_state,
    row_translator,
    stack_rows,
    state_key,
    train_rows,
    translators,
)
from lenskit.training.state import RunState

__all__ = ["CLOSED_FORM_SHARE", "REPORT_SHARE", "Phases"]

CLOSED_FORM_SHARE = 1 / 3  # of a wall-clock budget, at most, for the closed-form start
REPORT_SHARE = 0.15  # of a wall-clock budget, at most, for the held-out report
_MARGIN = (5.0, 0.03)  # seconds, and share of the budget, kept in hand
_PROBE_TOKENS = 128  # tokens of the evaluation and KL step timed at the start of a budget
_MIN_EVAL_TOKENS = 32  # fewer held-out tokens than this: no report (and a note)


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


class Phases:
    """One training run's phases and state, so that a checkpoint can be written at any moment."""

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
        self.lens = TunedLens(self.adapter, dtype=torch.float32, points=config.point_list)
        self.rows = train_rows(self.lens)  # translator rows: block inputs (and L12.mid)
        self.optimizer: torch.optim.Optimizer | None = None
        self.normal: NormalEquations | None = None
        self.unembed: Bf16Unembedding | None = None
        self.per_rank = config.tokens_per_step // config.seq_len // dist.world
        phase = "lstsq" if config.init == "lstsq" else "kl"
        self.state = RunState(config, phase=phase, steps=config.steps)
        self.base_seconds, self.clock = 0.0, time.perf_counter()
        self.kl_seconds, self.kl_tokens, self.reserve = 0.0, 0, 0.0
        self.eval_spt = self._guess_eval_seconds()
        self.step_spt = 0.0  # seconds per KL-step token, timed under a budget
        self.notes: list[str] = []  # what a budget left out, for the result

    # --- state, clock and checkpoints -----------------------------------------------------

    def start_clock(self, started: float) -> None:
        """Count wall time (and a budget) from ``started`` (a ``time.perf_counter()``)."""
        self.clock = started

    def restore(self, state: RunState) -> None:
        """Continue from a checkpoint's state."""
        self.state = dataclasses.replace(state, config=self.config)
        if not self.config.minutes:
            self.state.steps = self.config.steps
        if state.lens is not None:
            load_translator_state(self.lens, state.lens)
        if state.rng is not None:
            torch.set_rng_state(state.rng)
        self.base_seconds = state.seconds

    def seconds(self) -> float:
        """Wall time of this run, over all sessions."""
        return self.base_seconds + time.perf_counter() - self.clock

    def left(self) -> float:
        """Seconds left of the wall-clock budget (infinite without one)."""
        return self.config.minutes * 60 - self.seconds() if self.config.minutes else math.inf

    def agree(self, value: float) -> float:
        """Rank 0's ``value`` on every rank."""
        if self.dist.world == 1:
            return value
        t = torch.tensor([value if self.dist.rank == 0 else 0.0], dtype=torch.float64)
        return float(self.dist.sum_(t)[0])

    def checkpoint(self) -> None:
        """Write the state atomically (rank 0 only; nothing before any work is done)."""
        st = self.state
        if self.dist.rank != 0 or (st.phase == "lstsq" and st.done == 0):
            return
        partial = st.phase == "lstsq" and self.normal is not None and self.dist.world == 1
        save_checkpoint(
            dataclasses.replace(
                st,
                seconds=self.seconds(),
                lens=self.lens.translator_state(),
                rng=torch.get_rng_state(),
                optimizer=self.optimizer.state_dict() if self.optimizer else st.optimizer,
                xtx=self.normal.xtx.cpu() if partial else None,
                xty=self.normal.xty.cpu() if partial else None,
            ),
            self.out,
        )

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

    # --- the run ----------------------------------------------------------------------------

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
            st.start_val = self.val_kl(val, [self.lens])[0]
            self.eval_spt = (time.perf_counter() - tic) * self.dist.world / val.numel()
        self._set_reserve(val, held)
        self.finetune(pool)
        if st.start_val is None or st.step == 0:
            return []
        return self.keep_better(val)

    def _bf16_here(self) -> float:
        return float(resolve_precision(self.config.precision, self.device) == "bfloat16")

    def _probe_eval(self, chunks: Tensor) -> float:
        """Seconds per token and lens of an evaluation, timed on part of one chunk.

        One-off costs (the first pass through the model, the readout's precision check)
        are counted in: the estimate errs long, so the budget's evaluations fit.
        """
        tokens = chunks[:1, : min(chunks.shape[-1], _PROBE_TOKENS)]
        tic = time.perf_counter()
        self.val_kl(tokens, [self.lens])
        return self.agree((time.perf_counter() - tic) / tokens.numel())

    def _probe_step(self, pool: Tensor) -> float:
        """Seconds per token of a KL step, timed on part of one chunk (erring long)."""
        tokens = pool[:1, : min(pool.shape[-1], _PROBE_TOKENS)].to(self.device)
        tic = time.perf_counter()
        kl_step(self.lens, self.model, tokens, scale=0.0, bf16=self._unembedding())
        self.lens.zero_grad(set_to_none=True)
        return self.agree((time.perf_counter() - tic) / tokens.numel())

    def _unembedding(self) -> Bf16Unembedding | None:
        """The bfloat16 unembedding when the KL step runs in bfloat16 (made once)."""
        if self.state.precision == "bfloat16" and self.unembed is None:
            self.unembed = Bf16Unembedding(self.adapter.W_U, self.adapter.b_U)
        return self.unembed if self.state.precision == "bfloat16" else None

    def _guess_eval_seconds(self) -> float:
        """Seconds per token and lens of an evaluation from the matmul speed (a lower bound)."""
        rates = matmul_rates(self.device)
        rate = rates[resolve_precision(self.config.precision, self.device)] * 1e9
        return 2 * self.adapter.d_model * self.adapter.d_vocab * len(self.rows) / rate

    def _set_reserve(self, val: Tensor, held: Tensor) -> None:
        """Seconds to keep for the validation choice, the report and saving."""
        if not self.config.minutes:
            return
        cfg, share = self.config, self.eval_spt / self.dist.world
        report = self.report_tokens(held)
        held_tokens = 0 if report is None else report.numel()
        tokens = val.numel() * bool(cfg.val_tokens) + held_tokens * 2 * cfg.report
        self.reserve = tokens * share + _MARGIN[0] + _MARGIN[1] * cfg.minutes * 60

    def report_tokens(self, held: Tensor) -> Tensor | None:
        """Held-out tokens the report reads: all, or under a budget what fits its share."""
        return self.fit_tokens(held, REPORT_SHARE)

    def fit_tokens(self, chunks: Tensor, share: float) -> Tensor | None:
        """All chunks, or under a budget what two lens passes read in ``share`` of it.

        Whole chunks where one fits, else the first positions of one chunk; None where
        not even :data:`_MIN_EVAL_TOKENS` tokens fit.
        """
        if not self.config.minutes or not len(chunks):
            return chunks
        tokens = math.floor(share * self.config.minutes * 60 / (2 * self.eval_spt))
        length = chunks.shape[-1]
        if tokens * self.dist.world >= length:
            return chunks[: max(1, min(len(chunks), tokens * self.dist.world // length))]
        return chunks[:1, :tokens] if tokens >= _MIN_EVAL_TOKENS else None

    def kl_wanted(self) -> bool:
        """Whether KL steps are planned (or, under a budget, there may be time for one)."""
        if not self.config.minutes:
            return self.state.steps > self.state.step
        return self.left() - self.reserve > self._step_seconds()

    def lstsq_tokens_done(self) -> int:
        """Tokens the closed-form start accumulated."""
        if self.config.init != "lstsq":
            return 0
        if self.state.lstsq_batches is None:
            return self.config.lstsq_tokens // self.config.seq_len * self.config.seq_len
        return min(self.state.lstsq_batches * self.per_rank * self.dist.world, self._n_chunks()) * (
            self.config.seq_len
        )

    def _n_chunks(self) -> int:
        return self.config.lstsq_tokens // self.config.seq_len

    def _closed_form_over(self) -> bool:
        """Under a budget: whether the closed form has had its share of the time."""
        if not self.config.minutes:
            return False
        budget = self.config.minutes * 60
        end = min(CLOSED_FORM_SHARE * budget, budget - self.reserve)
        return bool(self.agree(float(self.seconds() >= end)))

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
        with _bar(self.show, total, done_tokens, "closed-form start") as bar:
            for ids in batches[st.done :]:
                if st.done and self._closed_form_over():
                    break
                cap = capture(
                    self.model,
                    pool[ids[dist.rank :: dist.world]].to(self.device),
                    points=row_capture_points(self.rows),
                    logits=False,
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
            )
        return self.dist.sum_(sums) / tokens.numel()

    def _step_seconds(self) -> float:
        """Seconds per KL step: measured in this session, else estimated."""
        if self.kl_tokens:
            return self.kl_seconds / self.kl_tokens * self.config.tokens_per_step
        if self.step_spt:  # timed on a short batch: an overestimate per token
            return self.step_spt * self.config.tokens_per_step / self.dist.world
        factor = 2.0 if self.state.precision == "bfloat16" else 3.0  # vs an evaluation
        return factor * self.eval_spt * self.config.tokens_per_step / self.dist.world

    def _plan(self) -> None:
        """Under a budget: the KL steps that fit in the time left (rank 0 decides)."""
        if not self.config.minutes:
            return
        fit = max(0, math.floor((self.left() - self.reserve) / self._step_seconds()))
        self.state.steps = self.state.step + int(self.agree(float(fit)))

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
        """Per layer, put back the start translator where it beats the fine-tuned one."""
        st = self.state
        if st.start is None or st.start_val is None:
            return []
        tuned = st.tuned_val = self.val_kl(val, [self.lens])[0]
        kept = [i for i in range(len(tuned)) if st.start_val[i] < tuned[i]]
        with torch.no_grad():
            for i in kept:
                row = self.rows[i]
                row_translator(self.lens, row).weight.copy_(st.start[state_key(row, "weight")])
                row_translator(self.lens, row).bias.copy_(st.start[state_key(row, "bias")])
        return kept
