"""Tuned-lens training speed and quality on this machine: KL steps per second, and budgets.

``speed``: tokens per second of the exact-KL step (gradient and optimizer step) for
SmolLM2-135M (1,024 tokens a step, sequences of 256) in bfloat16 and float32, interleaved
over rounds (medians), each beside two ceilings at the matmul speeds measured in the same
rounds: the unembedding matmuls alone (``4 * d_model * d_vocab`` FLOP per token and row,
at the rate of those matmuls' own shapes in the step's precision), and those plus the
model's forward pass (float32, its FLOPs counted by ``FlopCounterMode``). The steps start
from a closed-form lens, as a training run's do.

``budget``: ``lenskit train --minutes M`` from launch to saved lens, trained on its
default corpus (``builtin:mix``), scored per layer beside its own closed-form start on
held-out text of the training kind and of other kinds (:func:`held_out_corpora`).

``in-kind``: the same budget trained on half of Node.js's API docs (every other file) and
scored on the other half as well: how far a lens gets on text of the kind it trained on.

Every figure is written with the load average and the measured float32 / bfloat16
matmul GFLOP/s beside it: on a shared machine the rates move with the load.

Run: ``python benchmarks/bench_train.py speed`` (about 6 minutes on a quiet machine),
``python benchmarks/bench_train.py budget --minutes 3`` (the budget, then about 4 minutes
of scoring; ``--score-tokens`` sets the tokens per held-out corpus), ``in-kind --minutes
3`` or ``score`` to
score a budget run's lens again.
Writes ``benchmarks/results/train_<what>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEQ_LEN, TOKENS_PER_STEP = 256, 1024
LICENSES = ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "LGPL-2.1", "Artistic")
# Held-out text of kinds that builtin:mix (plays, Python reference, docstrings) lacks.
OTHER_KINDS = {
    "licenses": [Path("/usr/share/common-licenses") / name for name in LICENSES],
    "nodejs_api_docs": sorted(Path("/usr/share/doc/nodejs/api").glob("*.md")),
}


def machine() -> dict[str, object]:
    """The load average and matmul speeds now, to print beside a figure."""
    from lenskit.training.precision import matmul_rates

    rates = matmul_rates("cpu", fresh=True)
    return {
        "load_average": os.getloadavg(),
        "gflops_float32": round(rates["float32"], 1),
        "gflops_bfloat16": round(rates["bfloat16"], 1),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }


def held_out_corpora(tokenizer: object, tokens: int) -> dict[str, object]:
    """Held-out chunks: the mix's held-out split (the training kind), the plays the default
    evaluation holds out, and the other kinds present on this machine."""
    from lenskit.data import Corpus, default_corpus, load_corpus, split_documents
    from lenskit.data import tokenize_corpus as tok

    corpora = {
        "mix_held_out": split_documents(load_corpus("builtin:mix"), 0.1, seed=0)[1],
        "shakespeare_held_out": split_documents(default_corpus(), 0.1, seed=0)[1],
    }
    for name, paths in OTHER_KINDS.items():
        files = [p for p in paths if p.is_file()]
        if files:
            texts = tuple(p.read_text(encoding="utf-8", errors="replace") for p in files)
            corpora[name] = Corpus(name, texts)
    return {k: tok(c, tokenizer, SEQ_LEN, max_tokens=tokens).tokens for k, c in corpora.items()}


def forward_flops(model, batch) -> float:
    """Matmul FLOPs of the model's own forward pass over ``batch`` (counted, not estimated)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lenskit.residual import capture

    with FlopCounterMode(display=False) as counter:
        capture(model, batch)
    return float(counter.get_total_flops())


def kl_step_rate(model, lens, batches, precision: str) -> float:
    """Tokens/s of lenskit's KL step (gradient and Adam step) over ``batches`` after a warm-up."""
    import torch

    from lenskit.training.kl_step import Bf16Unembedding, kl_step

    un = None
    if precision == "bfloat16":
        un = Bf16Unembedding(lens.adapter.W_U, lens.adapter.b_U)
    optimizer = torch.optim.Adam(lens.parameters(), lr=1e-5)
    kl_step(lens, model, batches[0][:1, :64], scale=1.0, bf16=un)  # warm up
    tic = time.perf_counter()
    for batch in batches:
        lens.zero_grad()
        kl_step(lens, model, batch, scale=1.0 / batch.numel(), bf16=un)
        optimizer.step()
    return sum(b.numel() for b in batches) / (time.perf_counter() - tic)


def step_matmul_rates(adapter, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of the KL step's own two vocabulary matmuls, at their shapes, per precision.

    ``[rows, d_model + 2] @ [d_model + 2, d_vocab]`` into a reused output, then that
    ``@ [d_vocab, d_model]`` (a transposed view, as the step has it), with the step's rows
    per matmul; the median of ``repeats``.
    """
    import statistics

    import torch

    from lenskit.training.kl_step import MATMUL_ROWS

    d, v = adapter.d_model, adapter.d_vocab
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        n = MATMUL_ROWS[dtype]
        a, w = torch.randn(n, d + 2, dtype=dtype), torch.randn(d + 2, v, dtype=dtype)
        wt, e = w[:d].T, torch.empty(n, v, dtype=dtype)
        times = []
        for _ in range(repeats + 1):
            tic = time.perf_counter()
            torch.mm(a, w, out=e)
            e @ wt
            times.append(time.perf_counter() - tic)
        out[name] = 2 * n * v * (2 * d + 2) / statistics.median(times[1:]) / 1e9
    return out


def start_lens(model, chunks):
    """The closed-form start ``lenskit train`` fine-tunes from, fitted on ``chunks``."""
    from lenskit.training.closed_form import fit_closed_form

    return fit_closed_form(model, chunks, ridge=1e-6)


def ceilings(
    model, lens, batch, rates: dict[str, float], forward_rates: dict[str, float]
) -> dict[str, float]:
    """Tokens/s if every matmul of a step ran at the measured rate of its precision.

    ``unembedding``: only the two ``[rows, d_vocab]`` matmuls per translated row, at
    ``rates`` (GFLOP/s of those matmuls' own shapes, :func:`step_matmul_rates`). ``step``:
    also the model's forward pass, counted by ``FlopCounterMode``: in float32 at
    ``forward_rates["float32"]``; in a bfloat16 step, which runs the forward pass under
    bfloat16 autocast and reads the model's output row in float32, the blocks at
    ``forward_rates["bfloat16"]`` and that row's unembedding at the float32 rate. The
    translators' own matmuls (under 2%) are left out.
    """
    from lenskit.training.kl_step import step_flops

    per_token_unembed = step_flops(lens.adapter)
    per_token_forward = forward_flops(model, batch) / batch.numel()
    per_token_output = 2.0 * lens.adapter.d_model * lens.adapter.d_vocab
    out = {}
    for precision in ("float32", "bfloat16"):
        unembed_s = per_token_unembed / (rates[precision] * 1e9)
        if precision == "float32":
            forward_s = per_token_forward / (forward_rates["float32"] * 1e9)
        else:
            forward_s = (per_token_forward - per_token_output) / (
                forward_rates["bfloat16"] * 1e9
            ) + per_token_output / (forward_rates["float32"] * 1e9)
        out[f"{precision}_unembedding"] = 1 / unembed_s
        out[f"{precision}_step"] = 1 / (unembed_s + forward_s)
    return out


def speed(steps: int, rounds: int, precisions: tuple[str, ...]) -> dict[str, object]:
    """KL-step tokens/s per precision beside its ceilings, interleaved over ``rounds``.

    Each round measures the matmul rates, then runs ``steps`` steps of each precision;
    the figures are medians over rounds, every round recorded with its load average.
    """
    import statistics

    import lenskit
    from lenskit.data import default_corpus, load_corpus, tokenize_corpus
    from lenskit.progress import frozen

    model = lenskit.load_model()
    per = TOKENS_PER_STEP // SEQ_LEN
    chunks = tokenize_corpus(
        default_corpus(), model.tokenizer, SEQ_LEN, max_tokens=TOKENS_PER_STEP * steps * rounds
    ).tokens
    fit = tokenize_corpus(load_corpus("builtin:mix"), model.tokenizer, SEQ_LEN, max_tokens=4096)
    lens = start_lens(model, fit.tokens)  # the steps of a run start from its closed form
    log: list[dict[str, object]] = []
    with frozen(model):
        for r in range(rounds):
            round_info: dict[str, object] = {"machine": machine()}
            round_info["step_matmul_gflops"] = step_matmul_rates(lens.adapter)
            for precision in precisions:
                first = (r * steps) * per % max(1, len(chunks) - per * steps)
                batches = [chunks[first + i * per : first + (i + 1) * per] for i in range(steps)]
                round_info[precision] = kl_step_rate(model, lens, batches, precision)
            round_info["load_after"] = os.getloadavg()
            log.append(round_info)
            print(f"round {r}: {round_info}", flush=True)
        rates = {
            p: statistics.median(float(x["step_matmul_gflops"][p]) for x in log)
            for p in ("float32", "bfloat16")
        }
        forward_rates = {
            p: statistics.median(float(x["machine"][f"gflops_{p}"]) for x in log)
            for p in ("float32", "bfloat16")
        }
        ceiling = ceilings(model, lens, chunks[:per], rates, forward_rates)
    out: dict[str, object] = {
        "rounds": log,
        "median_step_matmul_gflops": rates,
        "median_gflops_forward": forward_rates,
        "lens": "the closed-form start on 4,096 tokens of builtin:mix, as a run steps from it",
    }
    for precision in precisions:
        rate = statistics.median(float(x[precision]) for x in log)
        out[precision] = {
            "tokens_per_s": round(rate, 1),
            "ceiling_unembedding_tokens_per_s": round(ceiling[f"{precision}_unembedding"], 1),
            "fraction_of_unembedding_ceiling": round(rate / ceiling[f"{precision}_unembedding"], 3),
            "ceiling_step_tokens_per_s": round(ceiling[f"{precision}_step"], 1),
            "fraction_of_step_ceiling": round(rate / ceiling[f"{precision}_step"], 3),
        }
        print(f"{precision}: {out[precision]}")
    return out


# lenskit's CLI (argv[2:]), saving the closed-form start's translators to argv[1].
WRAPPER = """
import sys, torch
from lenskit import cli
from lenskit.training import phases
real = phases.Phases.finetune
def finetune(self, pool):
    if self.dist.rank == 0:
        torch.save(self.state.start, sys.argv[1])
    return real(self, pool)
phases.Phases.finetune = finetune
sys.exit(cli.main(sys.argv[2:]))
"""


def node_halves(work: Path) -> tuple[Path, Path]:
    """Node.js's API docs split file by file (sorted, alternately) into two folders."""
    files = OTHER_KINDS["nodejs_api_docs"]
    if not files:
        raise SystemExit("in-kind needs Node.js's API docs in /usr/share/doc/nodejs/api")
    halves = (work / "node_train", work / "node_test")
    for i, path in enumerate(files):
        dst = halves[i % 2] / path.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(path.read_bytes())
    return halves


def budget(
    minutes: float, work: Path, extra: list[str], tokens: int, test: Path | None = None
) -> dict[str, object]:
    """``lenskit train --minutes`` from launch to saved lens, then :func:`score`.

    ``test``: a folder of text of the training kind, never trained on, scored too.
    """
    tag = f"{minutes:g}min" if test is None else f"{minutes:g}min-in-kind"
    out, start_file = work / f"lens-{tag}", work / f"start-{tag}.pt"
    before = machine()
    cmd = [sys.executable, "-c", WRAPPER, str(start_file), "train", "--minutes", str(minutes)]
    cmd += ["--out", str(out), "--quiet", *extra]
    tic = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - tic
    after = machine()
    return {
        "minutes": minutes,
        "command": cmd[3:],
        "seconds_launch_to_saved": round(seconds, 1),
        "machine_before": before,
        "machine_after": after,
        **score(out, start_file, work, tokens, test),
    }


def score(
    out: Path, start_file: Path, work: Path, tokens: int, test: Path | None = None
) -> dict[str, object]:
    """Held-out KL of the logit lens, the closed-form start and the trained lens, per layer.

    On ``tokens`` tokens of each of :func:`held_out_corpora`, and of the files in ``test``.
    """
    import torch

    import lenskit
    from lenskit.evaluation.layer_kl import layer_kl_sums
    from lenskit.lenses.tuned import TunedLens
    from lenskit.metrics import LN2

    metrics = json.loads((out / "metrics.json").read_text())
    model = lenskit.load_model()
    tuned = TunedLens.load(model, out)
    start = TunedLens.untrained(model)
    start.translators.load_state_dict(torch.load(start_file, weights_only=True))
    scores = {}
    corpora = held_out_corpora(model.tokenizer, tokens)
    if test is not None:
        from lenskit.data import Corpus, tokenize_corpus

        texts = tuple(p.read_text(encoding="utf-8") for p in sorted(test.glob("*.md")))
        corpus = Corpus("in_kind_test", texts)
        corpora["in_kind_test"] = tokenize_corpus(
            corpus, model.tokenizer, SEQ_LEN, max_tokens=tokens
        ).tokens
    for name, chunks in corpora.items():
        lenses = [lenskit.get_lens("logit", model), start, tuned]
        kl = (layer_kl_sums(model, lenses, chunks) / chunks.numel() / LN2).tolist()
        worse = [i for i, (a, b) in enumerate(zip(kl[1], kl[2], strict=True)) if b > a + 1e-6]
        scores[name] = {
            "tokens": chunks.numel(),
            "mean_kl_bits": {
                k: sum(v) / len(v) for k, v in zip(("logit", "start", "tuned"), kl, strict=True)
            },
            "layers_worse_than_start": worse,
            "per_layer_kl_bits": {"logit": kl[0], "start": kl[1], "tuned": kl[2]},
        }
        print(f"{name}: {scores[name]['mean_kl_bits']} worse layers {worse}")
    return {
        "train_metrics": {
            k: metrics.get(k)
            for k in ("steps", "tokens_trained", "precision", "timings", "mean_kl_bits", "notes")
        },
        "scores": scores,
        "machine_after_scoring": machine(),
    }


def main() -> None:
    """Run one measurement and write its results."""
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("speed", "budget", "in-kind", "score"))
    parser.add_argument("--steps", type=int, default=3, help="KL steps per precision and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument("--precisions", default="bfloat16,float32")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lenskit-train-bench"))
    parser.add_argument("--score-tokens", type=int, default=2048, help="per held-out corpus")
    args, extra = parser.parse_known_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.what == "speed":
        from lenskit.allocator import retain_freed_memory

        retained = retain_freed_memory()  # as `lenskit train` does
        result = speed(args.steps, args.rounds, tuple(args.precisions.split(",")))
        result["retained_freed_memory"] = retained
        name = "train_speed.json"
    elif args.what == "budget":
        result = budget(args.minutes, args.work, extra, args.score_tokens)
        name = f"train_budget_{args.minutes:g}min.json"
    elif args.what == "in-kind":
        train, test = node_halves(args.work)
        result = budget(
            args.minutes, args.work, ["--data", str(train), *extra], args.score_tokens, test
        )
        name = f"train_in_kind_{args.minutes:g}min.json"
    else:  # score a budget run's lens again (e.g. on more tokens)
        out = args.work / f"lens-{args.minutes:g}min"
        start = args.work / f"start-{args.minutes:g}min.pt"
        result = score(out, start, args.work, args.score_tokens)
        name = f"train_budget_{args.minutes:g}min_score.json"
    result["note"] = "timed on a shared machine: see the load averages"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
