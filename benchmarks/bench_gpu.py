"""lenskit on a CUDA GPU: KL-step and evaluation tokens/s, trajectory times and accuracy.

The same library code as on CPUs, on ``--device`` (``cuda`` by default), in bf16 where
the readout chooses it. The model has SmolLM2-135M's shape (its config and tokenizer, from
``--shape-of``: the embedded model's folder by default) and random weights drawn from a
fixed seed, saved to a temporary folder and loaded with :func:`lenskit.load_model` as any
local model is: speed depends only on shapes, and the embedded weights (98 MB quantised)
need not travel to a GPU machine. ``--model NAME`` loads a real model instead.

Measured, each beside the matmul rates of the readout's own shape (float32 with TF32
off, bf16 inputs with float32 sums):

- ``accuracy``: a 64-token logit-lens trajectory in ``exact`` and in ``auto`` precision
  against float64 (mean and max per-cell |dKL| and |dH| in bits, top-1 agreement), and
  the last row against the model's own logits; on random weights of 10x the default
  spread, whose outputs have entropies of 4-5 bits as a trained model's do;
- ``kl_step``: tokens/s of the exact-KL step (1,024 tokens a step, sequences of 256) in
  bfloat16 and float32, and how far the bf16 step's KL and gradient lie from float32's;
- ``eval``: ``evaluate`` of the logit and a tuned lens, tokens/s against the readout floor
  (the unembedding matmuls alone at the measured rate);
- ``trajectory``: 64 tokens x 31 rows against its own unembedding matmul, and Compare of
  4 lenses against one trajectory;
- ``train``: ``lenskit train --minutes`` on ``builtin:python-docs`` through the command
  line, launch to saved lens (skipped with ``--train-minutes 0``).

Run: ``python benchmarks/bench_gpu.py --out gpu.json``; ``--smoke --device cpu`` checks
the script on a CPU (about 3 minutes on 2 cores). For a GPU machine with
no lenskit dependencies installed, see "GPU" in the README.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TEXT = (
    "The tuned lens reads each layer of a transformer through an affine translator. "
    "Researchers check the numbers: KL divergence, entropy and the top token per layer, "
    "for every position of a paragraph of ordinary English text like this one. "
) * 4
SEQ_LEN, TOKENS_PER_STEP = 256, 1024
PEAKED_INIT = 0.2  # the accuracy check's weight spread (see main)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(fn, device: torch.device, repeats: int) -> float:
    """Median wall seconds of ``fn()`` after one warm-up, synchronising the device."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        tic = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def _unembed_seconds(engine, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of ``x @ W_U`` alone, in the readout ``engine``'s precision."""
    from lenskit.readout.precision import lowp_mm

    w = engine.adapter.W_U.detach().to(engine.dtype).contiguous()
    return _median(lambda: lowp_mm(x, w, engine.dtype), engine.device, repeats)


def _prompt(model, n: int = 64) -> torch.Tensor:
    """``[1, n]`` token ids of :data:`TEXT` (fewer where the model's context is shorter)."""
    ids = model.tokenizer(TEXT)["input_ids"][: min(n, model.cfg.n_ctx)]
    return torch.tensor([ids], device=model.cfg.device)


def _seq_len(model) -> int:
    return min(SEQ_LEN, model.cfg.n_ctx)


def shaped_model(shape_of: Path, folder: Path, init_range: float | None = None) -> Path:
    """Random weights (seed 0) of ``shape_of``'s config, saved with its tokenizer in ``folder``.

    ``init_range``: the weights' standard deviation (None: the config's).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(shape_of)
    if init_range is not None:
        config.initializer_range = init_range
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hf.save_pretrained(folder)
    AutoTokenizer.from_pretrained(shape_of).save_pretrained(folder)
    return folder


def matmul_rates(model, device: torch.device, rows: int, repeats: int) -> dict[str, float]:
    """TFLOP/s of ``[rows, d_model] @ W_U``: float32 (TF32 off) and bf16 into float32 sums."""
    import lenskit
    from lenskit.readout.precision import lowp_mm

    torch.backends.cuda.matmul.allow_tf32 = False
    w = lenskit.ModelAdapter(model).W_U.detach().float()
    x = torch.randn(rows, w.shape[0], device=device)
    flop = 2 * rows * w.shape[0] * w.shape[1]
    w16 = w.bfloat16()
    return {
        "float32": flop / _median(lambda: x @ w, device, repeats) / 1e12,
        "bf16": flop / _median(lambda: lowp_mm(x, w16, torch.bfloat16), device, repeats) / 1e12,
    }


def accuracy(model) -> dict[str, object]:
    """Per-cell KL, entropy and top-1 of the logit lens in each precision against float64."""
    import lenskit
    from lenskit.readout import Readout
    from lenskit.residual import capture

    tokens = _prompt(model)
    adapter = lenskit.ModelAdapter(model)
    cap = capture(model, tokens, logits=True)
    with torch.no_grad():
        x = adapter.final_norm(cap.lens_rows()[:, 0]).double()
        lq = torch.log_softmax(x @ adapter.W_U.double() + adapter.b_U.double(), -1)
    lp = lq[-1]
    kl = ((lp.exp() * (lp - lq)).sum(-1) / torch.log(torch.tensor(2.0))).cpu()
    entropy = (-(lq.exp() * lq).sum(-1) / torch.log(torch.tensor(2.0))).cpu()
    top = lq.argmax(-1).cpu()
    out: dict[str, object] = {
        "cells": int(kl.numel()),
        "output_row_vs_model_logits_max_abs": float(
            (lq[-1].float() - torch.log_softmax(cap.logits[0].float(), -1)).abs().max()
        ),
    }
    lens = lenskit.get_lens("logit", model)
    for precision in ("exact", "auto"):
        traj = lenskit.trajectory(model, lens, tokens, precision=precision, top_k=1)
        dkl = (traj.kl_to_final.double() - kl.double()).abs()
        dh = (traj.entropy.double() - entropy.double()).abs()
        out[precision] = {
            "readout_precision": Readout(adapter, precision).precision,
            "kl_bits_mean_abs_diff": float(dkl.mean()),
            "kl_bits_max_abs_diff": float(dkl.max()),
            "entropy_bits_mean_abs_diff": float(dh.mean()),
            "entropy_bits_max_abs_diff": float(dh.max()),
            "top1_agreement": float((traj.top_ids[..., 0] == top).double().mean()),
        }
    return out


def kl_step(model, device: torch.device, steps: int, repeats: int) -> dict[str, object]:
    """KL-step tokens/s per precision, and the bf16 step's KL and gradient against float32's."""
    from lenskit.lenses.tuned import TunedLens
    from lenskit.progress import frozen
    from lenskit.training.kl_step import Bf16Unembedding
    from lenskit.training.kl_step import kl_step as step

    gen = torch.Generator().manual_seed(1)
    seq = _seq_len(model)
    per = TOKENS_PER_STEP // seq
    batches = [
        torch.randint(0, model.cfg.d_vocab, (per, seq), generator=gen).to(device)
        for _ in range(steps)
    ]
    lens = TunedLens.untrained(model)
    out: dict[str, object] = {"tokens_per_step": per * seq, "steps": steps}
    grads, kls = {}, {}
    with frozen(model):
        for name in ("bfloat16", "float32"):
            un = None
            if name == "bfloat16":
                un = Bf16Unembedding(lens.adapter.W_U, lens.adapter.b_U)
            optimizer = torch.optim.Adam(lens.parameters(), lr=1e-5)
            lens.zero_grad()
            kls[name] = step(lens, model, batches[0], scale=1.0, bf16=un)[0]
            grads[name] = torch.cat([p.grad.flatten() for p in lens.parameters()]).double()

            def run(un=un, optimizer=optimizer) -> None:
                for batch in batches:
                    lens.zero_grad()
                    step(lens, model, batch, scale=1.0 / batch.numel(), bf16=un)
                    optimizer.step()

            seconds = _median(run, device, repeats)
            out[name] = {"tokens_per_s": steps * per * seq / seconds}
            with torch.no_grad():
                for p in lens.parameters():
                    p.zero_()  # the next precision starts from the same lens
    rel = (kls["bfloat16"] - kls["float32"]).abs() / kls["float32"].abs().clamp_min(1e-12)
    out["bf16_vs_float32_kl_max_rel_diff"] = float(rel.max())
    out["bf16_vs_float32_grad_cosine"] = float(
        torch.nn.functional.cosine_similarity(grads["bfloat16"], grads["float32"], dim=0)
    )
    return out


def evaluation(model, device: torch.device, tokens: int, repeats: int) -> dict[str, object]:
    """``evaluate`` of the logit and a tuned lens: tokens/s against the readout floor."""
    import lenskit
    from lenskit.data import TokenChunks
    from lenskit.evaluation import evaluate
    from lenskit.lenses.tuned import TunedLens
    from lenskit.readout import MATMUL_ROWS, Readout

    gen = torch.Generator().manual_seed(2)
    chunks = TokenChunks(
        torch.randint(
            0, model.cfg.d_vocab, (tokens // _seq_len(model), _seq_len(model)), generator=gen
        ),
        0,
        "random ids",
    )
    lenses = {"logit": lenskit.get_lens("logit", model), "tuned": TunedLens.untrained(model)}
    engine = Readout(lenses["logit"].adapter, None)
    x = torch.randn(MATMUL_ROWS, model.cfg.d_model, device=device)
    per_row = _unembed_seconds(engine, x, 9) / MATMUL_ROWS
    rows = 2 * model.cfg.n_layers + 1  # both lenses at every block input, and the output

    def run() -> float:
        result = evaluate(model, lenses, chunks, tokens=tokens, progress=False)
        return result.tokens / result.seconds

    run()  # warm up (and compile, where the statistics pass compiles)
    rates = [run() for _ in range(repeats)]
    floor = 1.0 / (per_row * rows)
    rate = statistics.median(rates)
    return {
        "precision": engine.precision,
        "tokens": tokens,
        "tokens_per_s": rate,
        "runs": rates,
        "floor_tokens_per_s": floor,
        "share_of_floor": rate / floor,
    }


def trajectories(model, device: torch.device, repeats: int) -> dict[str, float]:
    """A 64-token trajectory and Compare of 4 lenses, against the trajectory's matmul."""
    import lenskit
    from lenskit.comparison import compare
    from lenskit.lenses.tuned import TunedLens
    from lenskit.readout import Readout
    from lenskit.residual import capture

    lens = lenskit.get_lens("logit", model)
    tokens = _prompt(model)[0]
    engine = Readout(lens.adapter, None)
    rows = capture(model, tokens[None], logits=False).lens_rows()[:, 0]
    x = lens.adapter.final_norm(rows).reshape(-1, rows.shape[-1]).detach()
    floor = _unembed_seconds(engine, x, repeats)
    traj = _median(lambda: lenskit.trajectory(model, lens, tokens), device, repeats)
    tuned = TunedLens.untrained(model)
    four = [lens, tuned, lenskit.get_lens("logit", model), tuned]
    comp = _median(lambda: compare(model, four, tokens), device, repeats)
    return {
        "precision": engine.precision,
        "cells": int(x.shape[0]),
        "unembed_s": floor,
        "trajectory_s": traj,
        "trajectory_over_unembed": traj / floor,
        "compare4_s": comp,
        "compare4_over_trajectory": comp / traj,
    }


def train(model_dir: str, device: str, minutes: float, seq_len: int) -> dict[str, object]:
    """``lenskit train --minutes`` through the command line, launch to saved lens.

    Its metrics file (KL per layer, steps, timings) is returned as it is.
    """
    out = Path(tempfile.mkdtemp(prefix="lenskit-gpu-train-"))
    code = "import sys; from lenskit.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["train", "--model", model_dir, "--device", device, "--data", "builtin:python-docs"]
    args += ["--minutes", str(minutes), "--seq-len", str(seq_len), "--tokens-per-step"]
    args += [str(seq_len * (TOKENS_PER_STEP // seq_len)), "--out", str(out / "lens"), "--quiet"]
    tic = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - tic
    result: dict[str, object] = {"minutes": minutes, "seconds": seconds, "rc": done.returncode}
    metrics = out / "lens" / "metrics.json"
    if metrics.is_file():
        result["metrics"] = json.loads(metrics.read_text(encoding="utf-8"))
    else:
        result["stderr_tail"] = done.stderr[-2000:]
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape-of", default=None, help="folder with config.json and tokenizer")
    parser.add_argument("--model", default=None, help="load this model instead (name or folder)")
    parser.add_argument("--train-minutes", type=float, default=1.0, help="0: skip training")
    parser.add_argument("--smoke", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--out", default="gpu.json")
    args = parser.parse_args()
    import lenskit
    from lenskit.models import embedded_model_dir

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device here: pass --device cpu to check the script")
    repeats = 1 if args.smoke else 5
    report: dict[str, object] = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "processor": platform.processor() or platform.machine(),
        "smoke": args.smoke,
    }
    work = Path(tempfile.mkdtemp(prefix="lenskit-gpu-"))
    shape_of = Path(args.shape_of or embedded_model_dir())
    try:
        tic = time.perf_counter()
        name = args.model or str(shaped_model(shape_of, work / "model"))
        model = lenskit.load_model(name, device=device)
        report["load_s"] = time.perf_counter() - tic
        report["shape"] = {
            k: int(getattr(model.cfg, k)) for k in ("n_layers", "d_model", "d_vocab")
        }
        if not args.model:
            report["weights"] = f"random (seed 0), the shape of {shape_of.name}"

        def peaked_accuracy() -> dict[str, object]:
            if args.model:
                return accuracy(model)
            # weights 10x the default spread: output entropies of 4-5 bits and top-1
            # probabilities near 0.4, as a trained model's, not a near-uniform 15 bits
            folder = shaped_model(shape_of, work / "peaked", init_range=PEAKED_INIT)
            peaked = lenskit.load_model(str(folder), device=device)
            return {"init_range": PEAKED_INIT, **accuracy(peaked)}

        sections = {
            "matmul_tflops": lambda: matmul_rates(model, device, 1920, repeats),
            "accuracy": peaked_accuracy,
            "trajectory": lambda: trajectories(model, device, repeats),
            "kl_step": lambda: kl_step(model, device, 1 if args.smoke else 8, min(repeats, 3)),
            "eval": lambda: evaluation(model, device, 512 if args.smoke else 4096, min(repeats, 3)),
        }
        if args.train_minutes > 0:
            sections["train"] = lambda: train(
                name, args.device, args.train_minutes, _seq_len(model)
            )
        for key, fn in sections.items():
            try:  # one failing section still leaves the others' figures
                report[key] = fn()
            except Exception as err:  # recorded in the report, not hidden
                report[key] = {"error": f"{type(err).__name__}: {err}"}
            print(key, json.dumps(report[key]), flush=True)
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if device.type == "cuda":
        report["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    report["load_average_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
