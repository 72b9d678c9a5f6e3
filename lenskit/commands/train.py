"""``lenskit train``: train a tuned lens for a model and write it to a folder.

The settings' flags are generated from :class:`~lenskit.training.TrainConfig` (help text
and allowed values from its fields' metadata). ``--minutes M`` trains the best lens it
can in ``M`` minutes from launch to saved lens. Runs data-parallel under
``torchrun --nproc_per_node N lenskit train ...``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import time
from typing import Any

from lenskit.commands.flags import add_flags, config_from_args, flag_name
from lenskit.io import check_output
from lenskit.training.config import TrainConfig

__all__ = ["command_line", "format_summary", "register", "run"]

_DEFAULTS = TrainConfig()


def register(sub: Any) -> None:
    """Add the ``train`` subcommand."""
    parser = sub.add_parser(
        "train",
        help="train a tuned lens for a model",
        description="Train a tuned lens (closed-form start, then KL fine-tuning) and write "
        "config.json, params.pt and metrics.json to --out. Ctrl-C or SIGTERM writes a "
        "checkpoint; --resume continues it. One run at a time may use a folder.",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the lens")
    parser.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_flags(parser.add_argument_group("settings"), TrainConfig)
    parser.set_defaults(func=run)


def _config(args: argparse.Namespace) -> TrainConfig:
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return config_from_args(TrainConfig, args, device=device)


def command_line(config: TrainConfig, out: str, *, resume: bool = False) -> str:
    """The ``lenskit train`` command that gives ``config`` (non-default settings only)."""
    parts = ["lenskit", "train"]
    for key, value in config.to_dict().items():
        if value is None or value == getattr(_DEFAULTS, key):
            continue
        if isinstance(value, bool):
            parts.append(flag_name(key) if value else flag_name(f"no_{key}"))
        else:
            parts += [flag_name(key), str(value)]
    parts += ["--out", out] + (["--resume"] if resume else [])
    return shlex.join(parts)


def format_summary(result: Any) -> str:
    """Per-layer held-out KL of the logit and the tuned lens, and the means, in bits."""
    lines = []
    if result.reported:
        w = 7 if result.labels else 5  # room for L12.mid
        lines.append(f"{'layer':>{w}}  {'logit KL':>9}  {'tuned KL':>9}")
        pairs = zip(result.logit_kl, result.tuned_kl, strict=True)
        for layer, (logit, tuned) in enumerate(pairs):
            label = result.labels[layer] if result.labels else layer
            lines.append(f"{label:>{w}}  {logit:>9.3f}  {tuned:>9.3f}")
        n = len(result.logit_kl)
        lines.append(
            f"{'mean':>{w}}  {sum(result.logit_kl) / n:>9.3f}  {sum(result.tuned_kl) / n:>9.3f}"
        )
    rate = result.timings.get("kl_tokens_per_s")
    lines.append(
        f"{result.tokens} tokens ({result.steps} KL steps), {result.seconds:.0f} s"
        + (f", KL steps at {rate:.1f} tokens/s in {result.precision}" if rate else "")
        + ("" if result.reported or result.notes else "; no held-out report (--no-report)")
    )
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``lenskit train``."""
    started = time.perf_counter()
    config = _config(args)  # bad settings fail before the model loads
    check_output(args.out, "--out", kind="folder")
    from lenskit.models import load_model
    from lenskit.training import train_tuned_lens

    model = load_model(config.model, device=config.device, dtype=config.dtype)
    result = train_tuned_lens(
        model,
        config,
        args.out,
        resume=args.resume,
        progress=not args.quiet,
        command=command_line(config, args.out, resume=args.resume),
        started=started,
    )
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(format_summary(result))
        print(f"wrote {args.out}/config.json, params.pt and metrics.json")
    return 0
