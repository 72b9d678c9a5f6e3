"""``lenskit eval``: per-layer lens metrics over a corpus, written as CSV, JSON and figures.

Everything is written into a hidden temporary folder beside ``--out`` and renamed into
place at the end, so an interrupted or failed run leaves no results that look complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lenskit.commands.flags import add_flags, config_from_args
from lenskit.commands.trajectory import PRECISION_CHOICES, add_points_flag, parse_points
from lenskit.errors import LenskitError
from lenskit.evaluation.config import EvalConfig

if TYPE_CHECKING:
    from lenskit.evaluation.results import EvalResult

# Torch, the model code and plotting load only once the arguments are checked.

__all__ = ["PRODUCER", "format_summary", "lens_names", "register", "run", "write_outputs"]

PRODUCER = "lenskit eval"
_TITLES = {
    "kl_bits": "KL(model output || lens), bits per token",
    "ce_bits": "cross-entropy of the next token, bits per token",
    "entropy_bits": "entropy of the lens's prediction, bits",
    "top1_agree": "top-1 agreement with the model's output",
}


def register(sub: Any) -> None:
    """Add the ``eval`` subcommand."""
    parser = sub.add_parser(
        "eval",
        help="per-layer lens metrics over a corpus",
        description="Read a corpus through one or more lenses and write, per lens and layer, "
        "mean KL to the model's output, next-token cross-entropy, entropy and top-1 "
        "agreement (bits per token and per byte, with standard errors over chunks) to "
        "DIR/metrics.csv and DIR/metrics.json, with a figure per metric.",
    )
    add = parser.add_argument
    add("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    add(
        "--lens",
        action="append",
        metavar="[NAME=]SPEC",
        help="lens spec KIND or KIND:PATH, optionally named (mine=tuned:DIR); repeat for "
        "several (default: logit)",
    )
    add(
        "--data",
        default=None,
        help="corpus file, folder, cached dataset or builtin:NAME (default: Shakespeare)",
    )
    add(
        "--out",
        required=True,
        metavar="DIR",
        help="folder for the results (new or empty, or an earlier eval's, which is replaced)",
    )
    add_flags(parser.add_argument_group("settings"), EvalConfig, required=("tokens",))
    add_points_flag(parser)
    add("--no-png", action="store_true", help="write HTML figures only")
    add("--device", default="cpu")
    add("--quiet", action="store_true", help="no progress bar")
    add(
        "--precision",
        default=None,
        choices=PRECISION_CHOICES,
        help="readout matmul precision (default: $LENSKIT_PRECISION, else auto: measured)",
    )
    parser.set_defaults(func=run)


def lens_names(specs: list[str] | None) -> dict[str, str]:
    """Lens specs by name: ``NAME=SPEC`` names a lens, otherwise its kind is its name.

    Raises:
        LenskitError: For a bad spec or a duplicate name.
    """
    from lenskit.lenses import parse_lens_spec

    named: dict[str, str] = {}
    for text in specs or ["logit"]:
        name, sep, spec = text.partition("=")
        if not sep or any(c in name for c in ":/\\"):
            name, spec = "", text
        kind, _ = parse_lens_spec(spec)
        name = name.strip() or kind
        if name == "model":
            raise LenskitError(
                "'model' names the reference row: give the lens another name, "
                f"e.g. --lens mine={spec}"
            )
        if name in named:
            raise LenskitError(
                f"duplicate lens name {name!r}: name them, e.g. --lens "
                f"{name}-a={named[name]} --lens {name}-b={spec}"
            )
        named[name] = spec
    return named


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that holds anything but an earlier ``lenskit eval`` result."""
    if out.exists() and not out.is_dir():
        raise LenskitError(f"--out {out} is a file: give a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    with contextlib.suppress(OSError, ValueError, AttributeError):
        if json.loads((out / "metrics.json").read_text()).get("produced_by") == PRODUCER:
            return
    raise LenskitError(f"--out {out} holds other files: give a new or empty folder")


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place (an earlier result is moved aside, then removed)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def write_outputs(
    result: EvalResult,
    out: str | os.PathLike[str],
    *,
    png: bool = True,
    extra: dict[str, Any] | None = None,
) -> list[str]:
    """Write metrics.csv, transfer.csv, a figure per metric and metrics.json into ``out``.

    Files are written into a temporary folder beside ``out`` that is renamed into place
    once all are written; ``out`` may be new, empty or an earlier result (replaced).

    Args:
        result: The evaluation.
        out: The folder.
        png: Also draw PNGs (skipped, with a note on stderr, where no browser can).
        extra: More entries for metrics.json (e.g. the command line, lens specs).

    Returns:
        The names of the files written.
    """
    from lenskit.evaluation.results import METRICS
    from lenskit.export import save_figure
    from lenskit.io import atomic_open, atomic_write_json
    from lenskit.plotting import metric_lines

    target = Path(out).expanduser()
    _check_out(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; give the usual permissions
        frame = result.to_frame()
        with atomic_open(tmp / "metrics.csv") as handle:
            frame.to_csv(handle, index=False)
        if result.transfer is not None:
            with atomic_open(tmp / "transfer.csv") as handle:
                result.transfer.to_csv(handle, index=False)
        for metric in METRICS:
            fig = metric_lines(
                frame,
                metric=metric,  # uncovered layers: marked gaps
                title=f"{_TITLES[metric]} · {result.model} · {result.source}",
            )
            save_figure(fig, tmp / f"{metric}.html")
            if png:
                try:
                    save_figure(fig, tmp / f"{metric}.png")
                except LenskitError as err:
                    print(f"lenskit eval: note: skipped PNG figures ({err})", file=sys.stderr)
                    png = False
        files = [*sorted(p.name for p in tmp.iterdir()), "metrics.json"]
        atomic_write_json(
            tmp / "metrics.json",
            {"produced_by": PRODUCER, **(extra or {}), "files": files, **result.to_dict()},
        )
        _publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


def format_summary(result: EvalResult) -> str:
    """Per-layer mean KL (bits) of each lens, the model's own cross-entropy, and the run."""
    frame = result.metrics
    lenses = list(result.lenses)
    width = max(9, *(len(n) + 3 for n in lenses))
    lines = [f"{'layer':>6}" + "".join(f"{n + ' KL':>{width}}" for n in lenses)]
    table = frame[frame["lens"] != "model"].pivot(index="layer", columns="lens", values="kl_bits")
    labels = dict(zip(frame["layer"], frame["layer_label"], strict=True))
    for layer, row in table.iterrows():
        lines.append(
            f"{labels.get(layer, layer):>6}"
            + "".join(
                f"{row[n]:>{width}.3f}" if math.isfinite(row[n]) else f"{'—':>{width}}"
                for n in lenses
            )
        )
    if table[lenses].isna().to_numpy().any():
        lines.append("— : a layer the lens does not cover (NaN in metrics.csv, covered=False)")
    model = frame[frame["lens"] == "model"].iloc[0]
    lines.append(
        f"model output: cross-entropy {model.ce_bits:.3f} ± {model.ce_bits_se:.3f} "
        f"bits/token ({model.ce_bits_per_byte:.3f} bits/byte), entropy "
        f"{model.entropy_bits:.3f} bits (± 1 SE over {result.chunks} chunks)"
    )
    lines.append(
        f"{result.tokens} tokens ({result.chunks} chunks of {result.seq_len}) from "
        f"{result.source} in {result.seconds:.1f} s ({result.tokens_per_s:.0f} tokens/s)"
    )
    objectives = ", ".join(
        f"{name} {info.get('objective', 'unspecified')}" for name, info in result.lenses.items()
    )
    lines.append(
        f"fitted for: {objectives} (KL to the output is reported for every lens, "
        "also those not trained to lower it)"
    )
    lines += [f"note: {name}: {text}" for name, text in result.notes.items()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``lenskit eval``."""
    if args.tokens < 1:
        raise LenskitError(f"--tokens must be >= 1, got {args.tokens}: pass e.g. 65536")
    specs = lens_names(args.lens)  # bad specs and names fail before the model loads
    points = parse_points(args.points)
    from lenskit.evaluation import evaluate
    from lenskit.io import check_output
    from lenskit.lenses import get_lens, parse_lens_spec
    from lenskit.models import DEFAULT_MODEL, load_model

    check_output(args.out, "--out", kind="folder")
    _check_out(Path(args.out).expanduser())
    model = load_model(args.model or DEFAULT_MODEL, device=args.device)
    lenses = {}
    for name, spec in specs.items():
        kind, options = parse_lens_spec(spec)
        lenses[name] = get_lens(kind, model, **options)
    result = evaluate(
        model,
        lenses,
        args.data,
        **config_from_args(EvalConfig, args).to_dict(),
        progress=not args.quiet,
        precision=args.precision,
        points=points,
    )
    command = shlex.join(["lenskit", "eval", *sys.argv[2:]]) if sys.argv[1:2] == ["eval"] else None
    files = write_outputs(
        result, args.out, png=not args.no_png, extra={"command": command, "lens_specs": specs}
    )
    print(format_summary(result))
    print(f"wrote {args.out}/: {', '.join(files)}")
    return 0
