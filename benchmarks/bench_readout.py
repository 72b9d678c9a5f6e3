"""Readout engine benchmark: matmul rates, trajectory / compare / eval vs their floor, CLI start.

Reports medians, each beside the machine's measured float32 and bf16 GFLOP/s and its load
average (a busy machine makes every figure slower; run it on a quiet one):

- matmul GFLOP/s of the real unembedding shape (``rows x 576 x 49152``), a block of
  :data:`~lenskit.readout.MATMUL_ROWS` rows at a time into a reused output: float32 and
  bf16 (bf16 inputs and output, float32 sums: the readout's CPU path);
- a 64-token, all-rows, full-vocabulary trajectory vs its own unembedding matmul in the
  chosen precision (the floor; target: within 1.3x), and the model's own forward pass
  over the prompt, which every trajectory pays before its readout;
- ``compare`` of 4 lenses vs one trajectory (target: within 2x);
- ``evaluate`` of logit + tuned lens: tokens/s vs the readout floor for the lenses and
  rows asked (target: >= 50% of the floor's rate), with the compiled statistics pass
  (after its one-off compile, timed) and with the eager passes;
- ``lenskit --help``, a bad-input error and a warm ``lenskit trajectory``, end to end.

Run: ``python benchmarks/bench_readout.py [--smoke] [--precision auto]`` (a few minutes;
``--smoke`` does one repeat of smaller sizes). Writes ``benchmarks/results/readout.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PROMPT_WORDS = (
    "The tuned lens reads each layer of a transformer through an affine translator, and "
    "researchers check the numbers: KL divergence, entropy and the top token per layer. "
)


def _median(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def _context() -> dict:
    from lenskit.readout import matmul_rates

    rates = matmul_rates("cpu", fresh=True)
    return {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
        "gflops_fp32": rates["fp32"],
        "gflops_bf16": rates["bf16"],
    }


def _blocked_mm(x: torch.Tensor, w: torch.Tensor):
    """``x @ w`` a block of MATMUL_ROWS rows at a time, into one reused output buffer."""
    from lenskit.readout import MATMUL_ROWS

    out = torch.empty(MATMUL_ROWS, w.shape[1], dtype=w.dtype)

    def run() -> None:
        for i in range(0, x.shape[0], MATMUL_ROWS):
            part = x[i : i + MATMUL_ROWS]
            torch.mm(part, w, out=out[: part.shape[0]])

    return run


def bench_matmul(rows: int, repeats: int) -> dict:
    d, v = 576, 49152
    x, w = torch.randn(rows, d), torch.randn(d, v) * 0.05
    flop = 2 * rows * d * v
    out = {
        "fp32": flop / _median(_blocked_mm(x, w), repeats) / 1e9,
        "bf16": flop / _median(_blocked_mm(x.bfloat16(), w.bfloat16()), repeats) / 1e9,
    }
    return {"shape": [rows, d, v], "gflops": out}


def bench_trajectory(model, repeats: int, precision: str | None, n_tokens: int) -> dict:
    import lenskit
    from lenskit.comparison import compare
    from lenskit.readout import Readout
    from lenskit.readout.precision import LOWP
    from lenskit.residual import capture

    lens = lenskit.get_lens("logit", model)
    tokens = model.to_tokens(PROMPT_WORDS * 8)[0, :n_tokens]
    engine = Readout(lens.adapter, precision)
    forward = _median(lambda: capture(model, tokens[None], logits=False), repeats)
    rows = capture(model, tokens[None], logits=False).lens_rows()[:, 0]
    x = lens.adapter.final_norm(rows).reshape(-1, rows.shape[-1]).detach()
    dtype = LOWP.get(engine.precision, torch.float32)
    w = lens.adapter.W_U.detach().to(dtype).contiguous()
    floor = _median(_blocked_mm(x.to(dtype), w), repeats)
    traj = _median(
        lambda: lenskit.trajectory(model, lens, tokens, precision=engine.precision), repeats
    )
    tuned = lenskit.lenses.tuned.TunedLens.untrained(model)
    four = [lens, tuned, lenskit.get_lens("logit", model), tuned]
    comp = _median(lambda: compare(model, four, tokens, precision=engine.precision), repeats)
    return {
        "precision": engine.precision,
        "cells": int(x.shape[0]),
        "unembed_floor_s": floor,
        "forward_s": forward,
        "trajectory_s": traj,
        "trajectory_over_floor": traj / floor,
        "trajectory_less_forward_over_floor": (traj - forward) / floor,
        "compare4_s": comp,
        "compare4_over_trajectory": comp / traj,
    }


def _compile_seconds(model) -> float:
    """Seconds to compile the statistics kernel in this process (inductor's disk cache warm)."""
    from lenskit.metrics import Reference
    from lenskit.readout import fused

    vocab = model.cfg.d_vocab
    z = torch.randn(4, vocab) * 4
    ref = Reference.from_logits(torch.randn(2, vocab))
    ids = torch.zeros(4, 1, dtype=torch.long)
    tic = time.perf_counter()
    fused.fused_stats(z.bfloat16(), ref, ids, None, lambda at: z.gather(1, at), top_k=1, own=16)
    return time.perf_counter() - tic


def bench_eval(model, tokens: int, precision: str | None, repeats: int = 3) -> dict:
    """Evaluation tokens/s against the floor, with the compiled statistics pass and without.

    Each repeat times the floor, then one evaluation with the compiled pass and one with
    the eager passes (``LENSKIT_COMPILE=0``), so both see the same host speed.
    """
    import lenskit
    from lenskit.evaluation import evaluate
    from lenskit.lenses.tuned import TunedLens
    from lenskit.readout import MATMUL_ROWS, Readout
    from lenskit.readout.fused import COMPILE_ENV
    from lenskit.readout.precision import LOWP

    lenses = {"logit": lenskit.get_lens("logit", model), "tuned": TunedLens.untrained(model)}
    engine = Readout(lenses["logit"].adapter, precision)
    dtype = LOWP.get(engine.precision, torch.float32)
    x = torch.randn(MATMUL_ROWS, model.cfg.d_model, dtype=dtype)
    w = engine.adapter.W_U.detach().to(dtype).contiguous()
    rows = 2 * model.cfg.n_layers + 1  # both lenses at every block input, and the output
    compile_s = _compile_seconds(model)

    def run() -> float:
        result = evaluate(
            model, lenses, None, tokens=tokens, seq_len=128, progress=False, precision=precision
        )
        return result.tokens / result.seconds

    run()  # warm up
    compiled, eager, floors = [], [], []
    for _ in range(repeats):  # the floor timed beside each run: the host's speed drifts
        floors.append(_median(_blocked_mm(x, w), 9) / MATMUL_ROWS)
        compiled.append(run())
        os.environ[COMPILE_ENV] = "0"
        try:
            eager.append(run())
        finally:
            del os.environ[COMPILE_ENV]
    floor_rate = 1.0 / (statistics.median(floors) * rows)
    rate, eager_rate = statistics.median(compiled), statistics.median(eager)
    return {
        "precision": engine.precision,
        "tokens": tokens,
        "repeats": repeats,
        "compile_seconds": compile_s,
        "tokens_per_s": rate,
        "eager_tokens_per_s": eager_rate,
        "floor_tokens_per_s": floor_rate,
        "share_of_floor": rate / floor_rate,
        "eager_share_of_floor": eager_rate / floor_rate,
        "runs_tokens_per_s": {"compiled": compiled, "eager": eager},
    }


def bench_cli(repeats: int) -> dict:
    def run(*args: str) -> float:
        tic = time.perf_counter()
        subprocess.run(["lenskit", *args], capture_output=True, check=False)
        return time.perf_counter() - tic

    prompt = "The capital of France is"
    return {
        "help_s": statistics.median(run("--help") for _ in range(repeats)),
        "empty_prompt_error_s": statistics.median(
            run("trajectory", "--prompt", "") for _ in range(repeats)
        ),
        "trajectory_warm_s": statistics.median(
            run("trajectory", "--prompt", prompt, "--quiet") for _ in range(repeats)
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one repeat, small sizes")
    parser.add_argument("--precision", default=None, help="readout precision (default auto)")
    parser.add_argument("--out", default=str(HERE / "results" / "readout.json"))
    args = parser.parse_args()
    import lenskit

    repeats = 1 if args.smoke else 5
    retained = lenskit.retain_freed_memory()  # as the command line does
    model = lenskit.load_model("smollm2-135m")
    report = {"context": _context(), "smoke": args.smoke, "retained_freed_memory": retained}
    report["matmul"] = bench_matmul(512 if args.smoke else 1920, repeats)
    report["trajectory"] = bench_trajectory(model, repeats, args.precision, 64)
    report["eval"] = bench_eval(model, 256 if args.smoke else 1024, args.precision, repeats)
    report["cli"] = bench_cli(1 if args.smoke else 3)
    report["context_after"] = {"load_average": os.getloadavg()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
