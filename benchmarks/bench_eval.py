"""Evaluation benchmark: tokens/s of ``lenskit.evaluation.evaluate`` on SmolLM2.

Scores the logit and the tuned lens together (KL to the output, next-token cross-entropy,
entropy, top-1 agreement at every block input) and, in the same run, the plain
TransformerLens way of computing the same numbers: ``run_with_cache`` per batch, then per
lens and layer ``ln_final`` + ``unembed`` + ``log_softmax`` statistics over the whole batch.
Both score the same chunks and positions in float32 (lenskit with ``logit_stats`` and
float64 per-chunk sums, the plain loop with ``log_softmax``); the largest differences in
mean KL and in any metric are reported.

lenskit runs at ``precision="exact"`` (float32, like the plain loop) and, beside it, at
``"auto"``; each against the readout floor (the unembedding matmuls alone) in its precision,
with the measured float32 / bf16 GFLOP/s and the load average.

Run: ``python benchmarks/bench_eval.py [--tokens 256] [--repeats 3]`` (about 2-3 minutes
on 2 cores: each repeat reads 256 tokens x 30 layers x 2 lenses through the 49k-token
unembedding, once per method). Writes ``benchmarks/results/eval.json`` (or ``--out``) and
prints medians, and the time 1M tokens would take at lenskit's rate. Run it on a quiet
machine: it uses every core torch is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def plain_transformer_lens(model, tuned, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean KL, CE, entropy (bits) and top-1 agreement per lens and layer, the plain way.

    Returns:
        ``[2 lenses (logit, tuned), n_layers, 4]`` float64 means over chunks.
    """
    n_layers = model.cfg.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)]
    moves = (lambda h, i: h, lambda h, i: h + tuned.translators[i](h))
    sums = torch.zeros(2, n_layers, 4, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(tokens), batch_size):
            batch = tokens[start : start + batch_size]
            logits, cache = model.run_with_cache(batch, names_filter=lambda n: n in names)
            lp = torch.log_softmax(logits[:, :-1].float(), -1)
            p, top = lp.exp(), lp.argmax(-1)
            nxt = batch[:, 1:].unsqueeze(-1)
            for k, move in enumerate(moves):
                for i, name in enumerate(names):
                    z = model.unembed(model.ln_final(move(cache[name][:, :-1], i)))
                    lq = torch.log_softmax(z.float(), -1)
                    values = (
                        (p * (lp - lq)).sum(-1) / math.log(2),
                        -lq.gather(-1, nxt).squeeze(-1) / math.log(2),
                        -(lq.exp() * lq).sum(-1) / math.log(2),
                        (lq.argmax(-1) == top).float(),
                    )
                    for m, v in enumerate(values):
                        sums[k, i, m] += v.double().mean(-1).sum().cpu()
    return sums / len(tokens)


def tuned_lens(model, which: str):
    """The shipped tuned lens, one from a folder, or ``untrained`` (zero translators)."""
    import lenskit
    from lenskit.lenses.tuned import TunedLens

    if which == "untrained":
        return TunedLens.untrained(model).eval()
    if which == "shipped":
        return lenskit.get_lens("tuned", model)
    return lenskit.get_lens("tuned", model, path=which)


def main() -> None:
    """Run the benchmark and write the results."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default=None, help="corpus (default: Shakespeare)")
    parser.add_argument("--tuned", default="shipped", help="shipped, untrained or a folder")
    parser.add_argument("--out", default=str(HERE / "results" / "eval.json"))
    args = parser.parse_args()

    import lenskit
    from lenskit.evaluation import STATS_DTYPE, eval_chunks, evaluate
    from lenskit.readout import Readout, matmul_rates

    retained = lenskit.retain_freed_memory()  # as the command line does (the peer's too)
    load_before = os.getloadavg()
    rates = matmul_rates("cpu", fresh=True)
    model = lenskit.load_model()
    lenses = {"logit": lenskit.get_lens("logit", model), "tuned": tuned_lens(model, args.tuned)}
    chunks = eval_chunks(model, args.data, tokens=args.tokens, seq_len=args.seq_len)
    evaluate(model, lenses, chunks, tokens=args.seq_len, progress=False)  # warm-up
    run = dict(tokens=chunks.n_tokens, batch_size=args.batch_size, progress=False)
    auto = Readout(lenses["logit"].adapter, "auto")
    x = torch.randn(512, model.cfg.d_model)
    ours, plain, ours_auto, floor_exact, floor_auto = [], [], [], [], []
    for _ in range(args.repeats):  # interleaved, so load changes hit every variant alike
        tic = time.perf_counter()
        result = evaluate(model, lenses, chunks, precision="exact", **run)
        ours.append(time.perf_counter() - tic)
        tic = time.perf_counter()
        ref = plain_transformer_lens(model, lenses["tuned"], chunks.tokens, args.batch_size)
        plain.append(time.perf_counter() - tic)
        tic = time.perf_counter()
        evaluate(model, lenses, chunks, precision="auto", **run)
        ours_auto.append(time.perf_counter() - tic)
        for engine, times in ((Readout(auto.adapter, "exact"), floor_exact), (auto, floor_auto)):
            tic = time.perf_counter()
            engine.unembed(x)
            times.append((time.perf_counter() - tic) / 512)  # seconds per readout row
    frame = result.metrics[result.metrics.lens != "model"]
    mine = torch.tensor(frame.kl_bits.to_numpy()).view(2, -1)
    n = chunks.n_tokens
    rows = 2 * model.cfg.n_layers + 1  # both lenses at every block input, and the output
    floor = {  # tokens/s of the unembedding matmuls alone, in each precision
        "exact": 1.0 / (statistics.median(floor_exact) * rows),
        "auto": 1.0 / (statistics.median(floor_auto) * rows),
    }
    out = {
        "gflops_fp32": rates["fp32"],
        "gflops_bf16": rates["bf16"],
        "auto_precision": auto.precision,
        "lenskit_auto_s": ours_auto,
        "lenskit_auto_tokens_per_s": n / statistics.median(ours_auto),
        "floor_tokens_per_s": floor,
        "share_of_floor_exact": n / statistics.median(ours) / floor["exact"],
        "share_of_floor_auto": n / statistics.median(ours_auto) / floor["auto"],
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "retained_freed_memory": retained,
            "load_average_1_5_15_min_before": [round(x, 2) for x in load_before],
            "load_average_1_5_15_min_after": [round(x, 2) for x in os.getloadavg()],
        },
        "model": result.model,
        "tuned_lens": args.tuned,
        "source": result.source,
        "tokens": n,
        "seq_len": chunks.seq_len,
        "batch_size": args.batch_size,
        "rows_per_token": 2 * model.cfg.n_layers,
        "lenskit_stats_dtype": str(STATS_DTYPE),
        "plain_stats_dtype": "torch.float32",
        "lenskit_evaluate_s": ours,
        "plain_transformer_lens_s": plain,
        "lenskit_median_s": statistics.median(ours),
        "plain_median_s": statistics.median(plain),
        "lenskit_tokens_per_s": n / statistics.median(ours),
        "plain_tokens_per_s": n / statistics.median(plain),
        "projected_1m_tokens_lenskit_h": 1e6 * statistics.median(ours) / n / 3600,
        "max_abs_kl_difference_bits": (mine - ref[:, :, 0]).abs().max().item(),
        "max_abs_difference_any_metric": max(
            (torch.tensor(frame[c].to_numpy()).view(2, -1) - ref[:, :, m]).abs().max().item()
            for m, c in enumerate(("kl_bits", "ce_bits", "entropy_bits", "top1_agree"))
        ),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(
        f"{n} tokens x 2 lenses x {model.cfg.n_layers} layers: lenskit evaluate "
        f"{out['lenskit_tokens_per_s']:.0f} tokens/s ({out['lenskit_median_s']:.1f} s), plain "
        f"TransformerLens loop {out['plain_tokens_per_s']:.0f} tokens/s "
        f"({out['plain_median_s']:.1f} s); max |KL difference| "
        f"{out['max_abs_kl_difference_bits']:.2e} bits; 1M tokens at lenskit's rate: "
        f"{out['projected_1m_tokens_lenskit_h']:.1f} h; share of the readout floor: exact "
        f"{out['share_of_floor_exact']:.0%}, {auto.precision} {out['share_of_floor_auto']:.0%}; "
        f"fp32 / bf16 {rates['fp32']:.0f} / {rates['bf16']:.0f} GFLOP/s, load average "
        f"{load_before[0]:.1f}; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
