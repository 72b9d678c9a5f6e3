"""A tuned-lens run's state and clock: checkpoints, progress and the wall-clock budget.

:class:`RunClock` keeps everything a resume needs in a
:class:`~lenskit.training.state.RunState`, writes it as a checkpoint at any moment,
reports progress, and under a wall-clock budget (``config.minutes``) plans how many
held-out tokens and KL steps fit. :class:`~lenskit.training.phases.Phases` runs the
phases on top of it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lenskit.lenses.tuned import TunedLens
from lenskit.models import ModelAdapter
from lenskit.progress import Progress, ProgressCallback
from lenskit.training.checkpoints import save_checkpoint
from lenskit.training.closed_form import NormalEquations
from lenskit.training.config import TrainConfig
from lenskit.training.distributed import Dist
from lenskit.training.kl_step import Bf16Unembedding
from lenskit.training.precision import matmul_rates, resolve_precision
from lenskit.training.rows import load_translator_state, train_rows
from lenskit.training.state import RunState

__all__ = ["CLOSED_FORM_SHARE", "REPORT_SHARE", "RunClock"]

CLOSED_FORM_SHARE = 1 / 3  # of a wall-clock budget, at most, for the closed-form start
REPORT_SHARE = 0.15  # of a wall-clock budget, at most, for the held-out report
_MARGIN = (5.0, 0.03)  # seconds, and share of the budget, kept in hand
_MIN_EVAL_TOKENS = 32  # fewer held-out tokens than this: no report (and a note)


class RunClock:
    """One training run's state, clock and budget: a checkpoint can be written at any moment."""

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

    def _bf16_here(self) -> float:
        return float(resolve_precision(self.config.precision, self.device) == "bfloat16")

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
