"""``lenskit fit-jacobian``: fit a J-lens with TransformerLens and write the artifact.

Ctrl-C keeps the finished prompts in ``FILE.partial``; the same command resumes there,
and a later run with more ``--prompts`` extends ``FILE``.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from lenskit.errors import LenskitError
from lenskit.io import check_output
from lenskit.settings import DEFAULT_MODEL

__all__ = ["register", "run"]

_DTYPES = ("float16", "float32")  # storage dtypes, torch names


def register(sub: Any) -> None:
    """Add the ``fit-jacobian`` subcommand."""
    parser = sub.add_parser(
        "fit-jacobian",
        help="fit a Jacobian lens (J-lens) for a model",
        description="Fit a J-lens with TransformerLens's JacobianLens.fit, one prompt at a "
        "time, and write the artifact (the TransformerLens / reference format) to --out. "
        "Ctrl-C keeps finished prompts in OUT.partial; rerun the command to resume.",
    )
    add = parser.add_argument
    add("--model", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    add(
        "--data",
        default=None,
        help="corpus file, folder, cached dataset or builtin:NAME (default: Shakespeare)",
    )
    add("--prompts", type=int, required=True, help="prompts to average over")
    add("--seq-len", type=int, default=128, help="tokens per prompt, BOS included (128)")
    add("--out", required=True, metavar="FILE", help="artifact file (a folder: FILE/lens.pt)")
    add("--no-resume", action="store_true", help="start afresh, ignoring FILE.partial and FILE")
    add("--dtype", choices=_DTYPES, default="float16", help="storage dtype (float16)")
    add("--dim-batch", type=int, default=8, help="output dims per backward pass (8)")
    add("--skip-first", type=int, default=16, help="leading positions left out (16)")
    add("--seed", type=int, default=0, help="order of corpus chunks (0)")
    add("--device", default="cpu")
    add("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``lenskit fit-jacobian``."""
    if args.prompts < 1:
        raise LenskitError(f"--prompts must be >= 1, got {args.prompts}: fit on at least one")
    check_output(args.out, "--out", kind="any")  # a folder means FOLDER/lens.pt
    import torch

    from lenskit.models import load_model
    from lenskit.training.jacobian import fit_jacobian_lens

    model = load_model(args.model, device=args.device)
    lens = fit_jacobian_lens(
        model,
        args.data,
        n_prompts=args.prompts,
        seq_len=args.seq_len,
        out=args.out,
        resume=not args.no_resume,
        progress=not args.quiet,
        dtype=getattr(torch, args.dtype),
        dim_batch=args.dim_batch,
        skip_first_positions=args.skip_first,
        seed=args.seed,
    )
    seconds = lens.metadata.get("lenskit_progress", {}).get("seconds_per_prompt", [])
    rows = lens.covered_layers()
    print(
        f"J-lens for {lens.adapter.name}: {lens.n_prompts} prompts of {args.seq_len} tokens, "
        f"rows {rows[0]}..{rows[-1]}, {sum(seconds):.0f} s fitting "
        f"({sum(seconds) / max(len(seconds), 1):.1f} s/prompt)"
    )
    print(
        f"wrote {lens.source}; read it with "
        f"`lenskit trajectory --model {shlex.quote(args.model)} "
        f"--lens {shlex.quote('jacobian:' + str(lens.source))} --prompt TEXT`"
    )
    return 0
