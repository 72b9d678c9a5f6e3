"""lenskit's tuned-lens training beside the tuned-lens package (0.2.0), on this machine.

Both tools train a tuned lens for the embedded SmolLM2-135M-Instruct on the same data
(the training split of ``lenskit train``'s default corpus ``builtin:mix``: plays, Python
reference and docstrings; split by document with seed 0, as ``lenskit train`` splits it),
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
4. ``lenskit``: ``lenskit train --minutes 3`` (and, with ``--long``, ``--minutes 15``),
   timed from launch to saved lens.
5. ``score``: held-out KL of the package's snapshots at 5, 10 and 15 minutes (the last
   snapshot written by then) and of both lenskit lenses, on held-out text of the training
   kind (the mix's held-out split) and on text of other kinds that neither tool trained
   on: the license texts of ``/usr/share/common-licenses`` and, where Node.js is
   installed, its API documentation (``/usr/share/doc/nodejs/api``).

``speed`` instead times the KL step side by side, in one run: rounds of the package's
own training loop (``--steps`` + 1 steps, the first left out) and of lenskit's bfloat16
KL step on the same training chunks (from a closed-form start fitted on other chunks,
as ``lenskit train`` steps), alternating, with the load average and matmul
rates of each round; medians over ``--rounds``.

Run (quiet machine, times for this 2-core AMX kind):

- ``python benchmarks/bench_tuned_lens_package.py speed --venv DIR`` (about 10 minutes);
- ``python benchmarks/bench_tuned_lens_package.py --long --venv DIR`` (about 40 minutes:
  the package's 15, lenskit's 3 and 15, then scoring);

a venv with ``--system-site-packages`` and the pins installed ``--no-deps`` also works.
Writes ``benchmarks/results/tuned_lens_package.json`` and ``..._speed.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_train  # noqa: E402

SEQ_LEN = 256
TOKENS_PER_STEP = 1024
PACKAGE_PINS = ["tuned-lens==0.2.0", "torchdata==0.8.0", "transformers<5", "datasets<4"]
# The lenskit runs: a wall-clock budget from launch to saved lens (``--long`` adds 15 minutes).
LENSKIT_RUNS = {"lenskit_3min": ["--minutes", "3"], "lenskit_15min": ["--minutes", "15"]}
DATA = "builtin:mix"  # lenskit train's default corpus


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
    from lenskit.data import load_corpus, split_documents, tokenize_corpus
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

    train, held = split_documents(load_corpus(DATA), 0.1, seed=0)
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


def phase_package(python: Path, work: Path, minutes: float, precision: str) -> dict[str, object]:
    """Train with the package for ``minutes`` of wall-clock; snapshot times from launch."""
    done = work / "package.json"
    if done.exists():
        return json.loads(done.read_text())
    out = work / "package-lens"
    if out.exists():
        shutil.rmtree(out)
    cmd = [*_package_cmd(python, work, precision, 250, out), "--checkpoint_freq", "1"]
    env = _package_env(work)
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
        "load_average_after": os.getloadavg(),
        "snapshots": times,
        "tokens_per_s": (TOKENS_PER_STEP / (sum(steps_s) / len(steps_s)) if steps_s else None),
    }
    done.write_text(json.dumps(info, indent=2))
    return info


def _package_env(work: Path) -> dict[str, str]:
    """The package's environment: no wandb, and transformer-lens hidden.

    A venv made with ``--system-site-packages`` sees lenskit's transformer-lens 4, which
    the package 0.2.0 probes for ``HookedTransformer`` (removed in 4.0); a stub that fails
    to import makes it take its plain-transformers path, as in its own environment.
    """
    stub = work / "hide-transformer-lens" / "transformer_lens"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").write_text('raise ImportError("hidden from tuned-lens 0.2.0")\n')
    path = os.pathsep.join(p for p in (str(stub.parent), os.environ.get("PYTHONPATH")) if p)
    return {
        **os.environ,
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": path,
    }


def _package_cmd(python: Path, work: Path, precision: str, steps: int, out: Path) -> list[str]:
    return [
        str(python),
        "-m",
        "tuned_lens",
        "train",
        "--model.name",
        str(work / "smollm2-135m-hf4"),
        "--precision",
        precision,
        "--data.name",
        str(work / "train.jsonl"),
        "--max_length",
        str(SEQ_LEN),
        "--tokens_per_step",
        str(TOKENS_PER_STEP),
        "--num_steps",
        str(steps),
        "--per_gpu_batch_size",
        str(TOKENS_PER_STEP // SEQ_LEN),
        "--output",
        str(out),
    ]


_TQDM = re.compile(r"Training:[^\r\n]*?\| *(\d+)/\d+ \[(?:(\d+):)?(\d+):(\d+)")


def package_rate(python: Path, work: Path, steps: int, precision: str) -> float | None:
    """Tokens/s of the package's own training loop, its first step left out (tqdm's clock).

    ``python -m tuned_lens train`` runs ``steps + 1`` steps without snapshots; the rate
    is taken between the progress bar's first and last update (1-second resolution).
    """
    out = work / "package-speed-lens"
    shutil.rmtree(out, ignore_errors=True)
    env = _package_env(work)
    cmd = _package_cmd(python, work, precision, steps + 1, out)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    marks = [
        (int(n), int(h or 0) * 3600 + int(m) * 60 + int(sec))
        for n, h, m, sec in _TQDM.findall(done.stdout + done.stderr)
    ]
    marks = [m for m in marks if m[0] >= 1]
    if len(marks) < 2 or marks[-1][0] == marks[0][0] or marks[-1][1] == marks[0][1]:
        return None
    (n0, t0), (n1, t1) = marks[0], marks[-1]
    return (n1 - n0) * TOKENS_PER_STEP / (t1 - t0)


def phase_speed(
    python: Path, work: Path, steps: int, rounds: int, precision: str
) -> dict[str, object]:
    """KL-step tokens/s of the package and of lenskit (bf16), interleaved round by round."""
    import statistics

    import lenskit
    from lenskit.data import load_corpus, split_documents, tokenize_corpus
    from lenskit.progress import frozen

    retained = lenskit.retain_freed_memory()  # as `lenskit train` does
    model = lenskit.load_model()
    train = split_documents(load_corpus(DATA), 0.1, seed=0)[0]
    per = TOKENS_PER_STEP // SEQ_LEN
    chunks = tokenize_corpus(
        train, model.tokenizer, SEQ_LEN, max_tokens=TOKENS_PER_STEP * steps + 4096
    ).tokens
    batches = [chunks[i * per : (i + 1) * per] for i in range(steps)]
    lens = bench_train.start_lens(model, chunks[steps * per :])  # as a run steps from it
    log = []
    for r in range(rounds):
        entry: dict[str, object] = {"machine": bench_train.machine()}
        entry["package"] = package_rate(python, work, steps, precision)
        with frozen(model):
            entry["lenskit_bfloat16"] = bench_train.kl_step_rate(model, lens, batches, "bfloat16")
        entry["load_after"] = os.getloadavg()
        log.append(entry)
        print(f"round {r}: {entry}", flush=True)
    package = statistics.median(x["package"] for x in log if x["package"]) if log else None
    ours = statistics.median(float(x["lenskit_bfloat16"]) for x in log)
    return {
        "rounds": log,
        "package_tokens_per_s": package,
        "lenskit_bfloat16_tokens_per_s": ours,
        "speedup": ours / package if package else None,
        "lenskit_retained_freed_memory": retained,
    }


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
        start_file = work / f"{name}-start.pt"
        cmd = [
            sys.executable,
            "-c",
            bench_train.WRAPPER,  # lenskit's CLI, saving the closed-form start
            str(start_file),
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
            "command": ["lenskit", *cmd[4:]],
            "seconds": time.time() - start,
            "dir": str(out),
            "start": str(start_file),
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
    corpora = bench_train.held_out_corpora(model.tokenizer, 2048)
    starts = {}
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
        start = TunedLens.untrained(model)
        start.translators.load_state_dict(torch.load(run["start"], weights_only=True))
        lenses.append(start)
        names.append(f"{name} closed-form start")
        starts[names[-2]] = names[-1]
    scores = {}
    for corpus, tokens in corpora.items():
        sums = layer_kl_sums(model, lenses, tokens, progress=True)
        per_layer = (sums / tokens.numel() / LN2).tolist()
        scores[corpus] = {
            n: {"mean_kl_bits": sum(v) / len(v), "per_layer_kl_bits": v}
            for n, v in zip(names, per_layer, strict=True)
        }
        for tuned, start in starts.items():
            before = scores[corpus][start]["per_layer_kl_bits"]
            pairs = zip(before, per_layer[names.index(tuned)], strict=True)
            worse = [i for i, (a, b) in enumerate(pairs) if b > a + 1e-6]
            scores[corpus][tuned]["layers_worse_than_start"] = worse
    return scores


def main() -> None:
    """Run the phases and write the results."""
    parser = argparse.ArgumentParser()
    parser.add_argument("what", nargs="?", default="quality", choices=("quality", "speed"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/lenskit-tl-bench"))
    parser.add_argument("--venv", type=Path, default=Path.home() / ".venvs" / "tuned-lens-0.2.0")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--long", action="store_true", help="also the 15-minute lenskit run")
    parser.add_argument(
        "--precision", default="bfloat16", help="the package's --precision (bf16 autocast)"
    )
    parser.add_argument("--steps", type=int, default=4, help="speed: timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="speed: interleaved rounds")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    python = phase_venv(args.venv)
    prepared = phase_prepare(args.work)
    (HERE / "results").mkdir(exist_ok=True)
    if args.what == "speed":
        speed = phase_speed(python, args.work, args.steps, args.rounds, args.precision)
        speed["note"] = "medians of interleaved rounds; each round has its load average"
        path = HERE / "results" / "tuned_lens_package_speed.json"
        path.write_text(json.dumps(speed, indent=2) + "\n")
        print(
            f"package {speed['package_tokens_per_s']} tokens/s, lenskit bf16 "
            f"{speed['lenskit_bfloat16_tokens_per_s']:.1f} tokens/s, x{speed['speedup']}"
        )
        return
    package = phase_package(python, args.work, args.minutes, args.precision)
    runs = phase_lenskit(args.work, args.long)
    scores = phase_score(args.work, package, runs, args.minutes)
    from lenskit.training.precision import matmul_rates

    result = {
        "load_average": os.getloadavg(),
        "matmul_gflops": matmul_rates("cpu", fresh=True),
        "note": "timed on a shared machine: see the load averages",
        "seq_len": SEQ_LEN,
        "tokens_per_step": TOKENS_PER_STEP,
        "data": prepared,
        "package": package,
        "lenskit": runs,
        "heldout_mean_kl_bits": scores,
    }
    (HERE / "results" / "tuned_lens_package.json").write_text(json.dumps(result, indent=2) + "\n")
    for corpus, table in scores.items():
        for name, score in table.items():
            print(f"{corpus:22s} {name:55s} {score['mean_kl_bits']:7.2f} bits")
    rate = package["tokens_per_s"]
    print(
        f"package training: {rate:.1f} tokens/s"
        if rate and math.isfinite(rate)
        else "package training: fewer than two snapshots, no rate"
    )


if __name__ == "__main__":
    main()
