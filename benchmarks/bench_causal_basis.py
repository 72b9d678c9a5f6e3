"""Causal basis benchmark: k = 8 directions at one layer of SmolLM2 with the shipped tuned lens.

Times each phase of ``extract_causal_basis`` (capturing residuals, the k searches, the
held-out lens and model influences) with the default settings (2,048 training and 1,024
held-out tokens, mean ablation), and records the machine's load average, since the
reference machine's 2 cores are shared.

Run: ``python benchmarks/bench_causal_basis.py [--layer 12] [--k 8] [--repeats 1]``.
Writes ``benchmarks/results/causal_basis.json`` and prints medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import lenskit
from lenskit.causal.config import CausalBasisConfig
from lenskit.causal.extraction import extract_causal_basis
from lenskit.io import atomic_write_json

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=CausalBasisConfig().tokens)
    parser.add_argument("--eval-tokens", type=int, default=CausalBasisConfig().eval_tokens)
    parser.add_argument("--out", default=str(HERE / "results" / "causal_basis.json"))
    args = parser.parse_args()

    model = lenskit.load_model("smollm2-135m")
    lens = lenskit.get_lens("tuned", model)
    config = CausalBasisConfig(k=args.k, tokens=args.tokens, eval_tokens=args.eval_tokens)
    runs = []
    for _ in range(args.repeats):
        load_before = os.getloadavg()
        tic = time.perf_counter()
        basis = extract_causal_basis(model, lens, args.layer, config, progress=False)[args.layer]
        wall = time.perf_counter() - tic
        s = basis.settings
        runs.append(
            {
                "wall_s": wall,
                **{f"{k}_s": v for k, v in s["seconds"].items()},
                "objective_calls": s["objective_calls"],
                "objective_path": s["objective_path"],
                "iterations": list(basis.iterations),
                "converged": list(basis.converged),
                "lens_influence_bits": basis.lens_influence.tolist(),
                "model_influence_bits": basis.model_influence.tolist(),
                "spearman": basis.spearman,
                "train_tokens": s["train_tokens"],
                "eval_tokens": s["eval_tokens"],
                "load_average_before": list(load_before),
                "load_average_after": list(os.getloadavg()),
            }
        )
        print(
            f"run {len(runs)}: {wall:.0f} s ({s['seconds']['extract']:.0f} s for {args.k} "
            f"directions, {s['objective_calls']} objective calls), Spearman "
            f"{basis.spearman:.3f}, load {load_before[0]:.1f}",
            flush=True,
        )

    def median(key: str) -> float:
        return statistics.median(run[key] for run in runs)

    result = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "model": "smollm2-135m",
        "lens": "tuned (shipped)",
        "layer": args.layer,
        "k": args.k,
        "config": config.to_dict(),
        "repeats": args.repeats,
        "median_s": {
            key: median(key)
            for key in (
                "wall_s",
                "capture_all_layers_s",
                "extract_s",
                "lens_influence_s",
                "model_influence_s",
            )
        },
        "runs": runs,
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result["median_s"], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
