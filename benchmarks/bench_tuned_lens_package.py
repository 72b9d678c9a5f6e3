"""lenskit's tuned-lens training beside the tuned-lens package (0.2.0), on this machine.

Both tools train a tuned lens for the embedded SmolLM2-135M-Instruct on the same data
(the training split of the default Shakespeare corpus, split by document with seed 0),
with sequence length 256 and 1,024 tokens per step. Quality is the mean over the 30
block inputs of ``KL(model output || lens)`` in bits per token on the same held-out
chunks, scored for both tools by lenskit's evaluator (``layer_kl_sums``, which the
test suite checks against a float64 reference).

Phases (each writes its result into ``--work``; a rerun skips finished phases):

1. ``venv``: a virtual environment with ``tuned-lens==0.2.0``, ``torchdata==0.8.0``,
   ``transformers<5``, ``datasets<4`` and the CPU build of torch.
2. ``prepare``: a copy of the converted SmolLM2 folder that transformers 4 reads
   (``PreTrainedTokenizerFast``, ``rope_theta`` in ``config.json``) and the training
   split as ``train.jsonl``.
3. ``package``: ``python -m tuned_lens train`` (its defaults: SGD with Nesterov momentum,
   bf16 autocast) for ``--minutes`` of wall-clock from launch, a snapshot every step.
4. ``lenskit``: ``lenskit train`` with a budget that ends within 3 minutes (and, with
   ``--long``, one that ends within 15).
5. ``score``: held-out KL of the package's snapshots at 5, 10 and 15 minutes (the last
   snapshot written by then) and of both lenskit lenses, in one pass over the data.

Run: ``python benchmarks/bench_tuned_lens_package.py [--work DIR] [--minutes 15]``.
Writes ``benchmarks/results/tuned_lens_package.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEQ_LEN = 256
TOKENS_PER_STEP = 1024
PACKAGE_PINS = ["tuned-lens==0.2.0", "torchdata==0.8.0", "transformers<5", "datasets<4"]
# Budgets of the lenskit runs (closed-form start, then exact-KL steps). A lens made
# within 3 minutes is also made within 15; ``--long`` adds the 15-minute budget.
LENSKIT_RUNS = {
    "lenskit_3min": [
        "--lstsq-tokens",
        "8192",
        "--tokens",
        "0",
        "--eval-tokens",
        "256",
        "--val-tokens",
        "0",
    ],
    "lenskit_15min": [
        "--lstsq-tokens",
        "32768",
        "--tokens",
        "4096",
        "--eval-tokens",
        "256",
        "--val-tokens",
        "512",
    ],
}


def _run(cmd: list[str], **kwargs: object) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def phase_venv(venv: Path) -> Path:
    """The package's own environment (created once)."""
    python = venv / "bin" / "python"
    if not python.exists():
        _run([sys.executable, "-m", "venv", str(venv)])
        _run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"])
        _run([str(python), "-m", "pip", "install", "-q", *PACKAGE_PINS])
    return python


def phase_prepare(work: Path) -> dict[str, object]:
    """A transformers-4 copy of the model, the training split, the held-out chunks."""
    import torch

    import lenskit
    from lenskit.data import default_corpus, split_documents, tokenize_corpus
    from lenskit.models import embedded_model_dir

    model_dir = work / "smollm2-135m-hf4"
    done = work / "prepare.json"
    if done.exists():
        return json.loads(done.read_text())
    model = lenskit.load_model()  # converts the embedded model into the cache if needed
    source = embedded_model_dir()
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(source, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", 10000.0)
    config["torch_dtype"] = "float32"
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))

    train, held = split_documents(default_corpus(), 0.1, seed=0)
    with (work / "train.jsonl").open("w") as f:
        for doc in train.documents:
            f.write(json.dumps({"text": doc}) + "\n")
    chunks = tokenize_corpus(held, model.tokenizer, SEQ_LEN, max_tokens=2048)
    torch.save(chunks.tokens, work / "heldout.pt")
    info = {
        "model_dir": str(model_dir),
        "train_docs": len(train.documents),
        "heldout_docs": len(held.documents),
        "heldout_tokens": chunks.n_tokens,
    }
    done.write_text(json.dumps(info, indent=2))
    return info


def phase_package(python: Path, work: Path, minutes: float) -> dict[str, object]:
    """Train with the package for ``minutes`` of wall-clock; snapshot times from launch."""
    done = work / "package.json"
    if done.exists():
        return json.loads(done.read_text())
    out = work / "package-lens"
    if out.exists():
        shutil.rmtree(out)
    cmd = [
        str(python),
        "-m",
        "tuned_lens",
        "train",
        "--model.name",
        str(work / "smollm2-135m-hf4"),
        "--precision",
        "float32",
        "--data.name",
        str(work / "train.jsonl"),
        "--max_length",
        str(SEQ_LEN),
        "--tokens_per_step",
        str(TOKENS_PER_STEP),
        "--num_steps",
        "250",
        "--per_gpu_batch_size",
        str(TOKENS_PER_STEP // SEQ_LEN),
        "--checkpoint_freq",
        "1",
        "--output",
        str(out),
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    log = (work / "package.log").open("w")
    start = time.time()
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        proc.wait(timeout=minutes * 60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
    snaps = sorted(
        (out / "checkpoints").glob("snapshot_*.pth"), key=lambda p: int(p.stem.split("_")[1])
    )
    times = [
        {"step": int(p.stem.split("_")[1]), "path": str(p), "seconds": p.stat().st_mtime - start}
        for p in snaps
    ]
    steps_s = [b["seconds"] - a["seconds"] for a, b in itertools.pairwise(times)]
    info = {
        "command": cmd,
        "minutes": minutes,
        "snapshots": times,
        "tokens_per_s": (TOKENS_PER_STEP / (sum(steps_s) / len(steps_s)) if steps_s else None),
    }
    done.write_text(json.dumps(info, indent=2))
    return info


def phase_lenskit(work: Path, long: bool) -> dict[str, object]:
    """The lenskit runs, timed from launch like the package's."""
    done = work / "lenskit.json"
    results = json.loads(done.read_text()) if done.exists() else {}
    for name, extra in LENSKIT_RUNS.items():
        if name in results or (name == "lenskit_15min" and not long):
            continue
        out = work / name
        if out.exists():
            shutil.rmtree(out)
        cmd = [
            "lenskit",
            "train",
            "--model",
            "smollm2-135m",
            "--seq-len",
            str(SEQ_LEN),
            "--tokens-per-step",
            str(TOKENS_PER_STEP),
            *extra,
            "--out",
            str(out),
        ]
        start = time.time()
        _run(cmd)
        metrics = json.loads((out / "metrics.json").read_text())
        results[name] = {
            "command": cmd,
            "seconds": time.time() - start,
            "dir": str(out),
            "metrics": {k: v for k, v in metrics.items() if k != "layers"},
        }
        done.write_text(json.dumps(results, indent=2))
    return results


def phase_score(work: Path, package: dict, runs: dict, minutes: float) -> dict[str, object]:
    """Held-out mean KL of every lens, scored in one pass over the held-out chunks."""
    import torch

    import lenskit
    from lenskit.evaluation.layer_kl import layer_kl_sums
    from lenskit.lenses.tuned import TunedLens
    from lenskit.metrics import LN2

    model = lenskit.load_model()
    tokens = torch.load(work / "heldout.pt", weights_only=True)
    lenses, names = [lenskit.get_lens("logit", model)], ["logit lens (step 0)"]
    marks = [m for m in (5, 10, 15, 20) if m <= minutes + 1e-9]
    for mark in marks:
        before = [s for s in package["snapshots"] if s["seconds"] <= mark * 60]
        if not before:
            continue
        snap = before[-1]
        state = torch.load(snap["path"], map_location="cpu", weights_only=False)["lens"]
        params = {
            k.removeprefix("layer_translators."): v
            for k, v in state.items()
            if k.startswith("layer_translators.")
        }
        lens = TunedLens.untrained(model)
        lens.translators.load_state_dict(params)
        lenses.append(lens)
        names.append(f"package {mark} min (step {snap['step']}, {snap['seconds']:.0f} s)")
    for name, run in runs.items():
        lenses.append(lenskit.get_lens("tuned", model, path=run["dir"]))
        names.append(f"{name} ({run['seconds']:.0f} s)")
    sums = layer_kl_sums(model, lenses, tokens, progress=True)
    per_layer = (sums / tokens.numel() / LN2).tolist()
    return {
        n: {"mean_kl_bits": sum(v) / len(v), "per_layer_kl_bits": v}
        for n, v in zip(names, per_layer, strict=True)
    }


def main() -> None:
    """Run the phases and write the results."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/lenskit-tl-bench"))
    parser.add_argument("--venv", type=Path, default=Path.home() / ".venvs" / "tuned-lens-0.2.0")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--long", action="store_true", help="also the 15-minute lenskit run")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    python = phase_venv(args.venv)
    prepared = phase_prepare(args.work)
    package = phase_package(python, args.work, args.minutes)
    runs = phase_lenskit(args.work, args.long)
    scores = phase_score(args.work, package, runs, args.minutes)
    result = {
        "seq_len": SEQ_LEN,
        "tokens_per_step": TOKENS_PER_STEP,
        "data": prepared,
        "package": package,
        "lenskit": runs,
        "heldout_mean_kl_bits": scores,
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "tuned_lens_package.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, score in scores.items():
        print(f"{name:55s} {score['mean_kl_bits']:7.2f} bits")
    rate = package["tokens_per_s"]
    print(
        f"package training: {rate:.1f} tokens/s"
        if rate and math.isfinite(rate)
        else "package training: fewer than two snapshots, no rate"
    )


if __name__ == "__main__":
    main()
