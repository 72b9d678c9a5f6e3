"""Foundation benchmark: model load (cold and warm) and one 64-token trajectory.

Compares ``lenskit.trajectory`` (full-vocabulary statistics for every row) with
the plain TransformerLens way of computing the same rows: ``run_with_cache``,
then the final norm and unembedding per layer, then softmax statistics per layer.

Run: ``python benchmarks/bench_foundation.py [--repeats 5] [--cold-repeats 1]``.
Writes ``benchmarks/results/foundation.json`` and prints medians.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PROMPT_TOKENS = 64

LOAD_SNIPPET = """
import time, sys
t0 = time.perf_counter()
import lenskit
import transformer_lens.model_bridge
t1 = time.perf_counter()
lenskit.load_model()
t2 = time.perf_counter()
print(f"{t1 - t0} {t2 - t1}")
"""


def _load_times(env: dict[str, str]) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-c", LOAD_SNIPPET], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return float(out[-2]), float(out[-1])


def bench_load(repeats: int, cold_repeats: int) -> dict[str, object]:
    """Cold load converts the GGUF into a fresh cache; warm load reads the safetensors cache."""
    cold = []
    for _ in range(cold_repeats):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "LENSKIT_CACHE": tmp}
            cold.append(_load_times(env)[1])
    warm_load, imports = [], []
    for _ in range(repeats):
        imp, load = _load_times(dict(os.environ))
        imports.append(imp)
        warm_load.append(load)
    return {
        "cold_load_s": cold,
        "warm_load_s": warm_load,
        "import_lenskit_and_transformer_lens_s": imports,
        "cold_load_median_s": statistics.median(cold) if cold else None,
        "warm_load_median_s": statistics.median(warm_load),
        "import_median_s": statistics.median(imports),
    }


def plain_transformer_lens(model, tokens, top_k: int = 10) -> dict[str, torch.Tensor]:
    """The same rows the plain way: cache, then norm + unembed + softmax stats per layer."""
    logits, cache = model.run_with_cache(tokens)
    final_lp = torch.log_softmax(logits[0], -1)
    n = model.cfg.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    out = {"entropy": [], "kl": [], "top": []}
    for name in names:
        z = model.unembed(model.ln_final(cache[name]))[0]
        lp = torch.log_softmax(z, -1)
        p = lp.exp()
        out["entropy"].append(-(p * lp).sum(-1) / math.log(2))
        out["kl"].append((final_lp.exp() * (final_lp - lp)).sum(-1) / math.log(2))
        out["top"].append(torch.topk(lp, top_k, -1).indices)
    return {k: torch.stack(v) for k, v in out.items()}


def bench_trajectory(repeats: int) -> dict[str, object]:
    """Median time of one 64-token trajectory, lenskit vs the plain per-layer loop."""
    import lenskit

    model = lenskit.load_model()
    lens = lenskit.get_lens("logit", model)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(100, 40000, (1, PROMPT_TOKENS), generator=gen)
    tokens[0, 0] = model.tokenizer.bos_token_id
    lenskit.trajectory(model, lens, tokens)  # warm-up
    from lenskit.readout import Readout
    from lenskit.residual import capture

    rows = capture(model, tokens).lens_rows()[:-1, 0]  # every block input, [layer, pos, d]
    auto = Readout(lens.adapter, "auto")
    normed = lens.adapter.final_norm(rows).reshape(-1, rows.shape[-1]).detach()
    ours, plain, floor, ours_auto, floor_auto = [], [], [], [], []
    for _ in range(repeats):  # interleaved, so load changes hit every variant alike
        t = time.perf_counter()
        with torch.no_grad():
            lens.adapter.readout(rows)  # the unembedding alone: the floor of any exact method
        floor.append(time.perf_counter() - t)
        t = time.perf_counter()
        traj = lenskit.trajectory(model, lens, tokens, target=" Paris", precision="exact")
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.no_grad():
            ref = plain_transformer_lens(model, tokens)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        auto.unembed(normed)  # the floor in the precision "auto" chose
        floor_auto.append(time.perf_counter() - t)
        t = time.perf_counter()
        lenskit.trajectory(model, lens, tokens, target=" Paris", precision="auto")
        ours_auto.append(time.perf_counter() - t)
    kl_diff = (traj.kl_to_final - ref["kl"]).abs().max().item()
    return {
        "auto_precision": auto.precision,
        "lenskit_auto_s": ours_auto,
        "readout_only_auto_s": floor_auto,
        "lenskit_auto_median_s": statistics.median(ours_auto),
        "readout_only_auto_median_s": statistics.median(floor_auto),
        "auto_over_its_floor": statistics.median(ours_auto) / statistics.median(floor_auto),
        "prompt_tokens": PROMPT_TOKENS,
        "rows": len(traj.layer_labels),
        "lenskit_trajectory_s": ours,
        "plain_transformer_lens_s": plain,
        "readout_only_s": floor,
        "lenskit_median_s": statistics.median(ours),
        "plain_median_s": statistics.median(plain),
        "readout_only_median_s": statistics.median(floor),
        "max_abs_kl_difference_bits": kl_diff,
    }


def _previous_load() -> dict[str, object]:
    """The load timings of the last full run (``--skip-load`` re-times only the trajectory)."""
    path = HERE / "results" / "foundation.json"
    if not path.exists():
        raise SystemExit("no earlier results to keep: run once without --skip-load")
    return json.loads(path.read_text())["load"]


def main() -> None:
    """Run the benchmark and write the results."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cold-repeats", type=int, default=1)
    parser.add_argument("--skip-load", action="store_true", help="only time the trajectory")
    args = parser.parse_args()
    from lenskit.readout import matmul_rates

    rates = matmul_rates("cpu", fresh=True)
    result = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "gflops_fp32": rates["fp32"],
            "gflops_bf16": rates["bf16"],
            "load_average_before": os.getloadavg(),
        },
        "load": _previous_load() if args.skip_load else bench_load(args.repeats, args.cold_repeats),
        "trajectory": bench_trajectory(args.repeats),
    }
    result["machine"]["load_average_after"] = os.getloadavg()
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "foundation.json").write_text(json.dumps(result, indent=2) + "\n")
    load, traj = result["load"], result["trajectory"]
    print(f"cold load (GGUF -> safetensors): {load['cold_load_median_s']:.1f} s")
    print(
        f"warm load (cached safetensors):  {load['warm_load_median_s']:.2f} s "
        f"(after {load['import_median_s']:.2f} s of imports: torch, TransformerLens)"
    )
    print(
        f"trajectory, {traj['prompt_tokens']} tokens x {traj['rows']} rows: "
        f"lenskit {traj['lenskit_median_s']:.2f} s, "
        f"plain TransformerLens loop {traj['plain_median_s']:.2f} s, "
        f"unembedding alone {traj['readout_only_median_s']:.2f} s (all float32); "
        f"{traj['auto_precision']}: lenskit {traj['lenskit_auto_median_s']:.2f} s, its "
        f"unembedding {traj['readout_only_auto_median_s']:.2f} s; fp32 / bf16 "
        f"{rates['fp32']:.0f} / {rates['bf16']:.0f} GFLOP/s, load average "
        f"{result['machine']['load_average_before'][0]:.1f}"
    )


if __name__ == "__main__":
    main()
