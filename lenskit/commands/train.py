"""``lenskit train``: train a tuned lens for a model and write it to a folder.

Runs data-parallel under ``torchrun --nproc_per_node N lenskit train ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
from typing import Any

from lenskit.models import DEFAULT_MODEL, load_model
from lenskit.training import TrainConfig, TrainResult, train_tuned_lens

__all__ = ["command_line", "format_summary", "register", "run"]

_DEFAULTS = TrainConfig()


def register(sub: Any) -> None:
    """Add the ``train`` subcommand."""
    parser = sub.add_parser(
        "train",
        help="train a tuned lens for a model",
        description="Train a tuned lens (closed-form start, then KL fine-tuning) and write "
        "config.json, params.pt and metrics.json to --out. Ctrl-C writes a checkpoint; "
        "--resume continues it.",
    )
    d = _DEFAULTS
    add = parser.add_argument
    add("--model", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    add("--data", default=None, help="corpus file, folder or cached dataset (Shakespeare)")
    add("--tokens", type=int, required=True, help="KL fine-tuning tokens (0: closed form only)")
    add("--out", required=True, metavar="DIR", help="folder for the lens and checkpoints")
    add("--resume", action="store_true", help="continue the checkpoint in --out")
    add("--seq-len", type=int, default=d.seq_len, help=f"tokens per chunk ({d.seq_len})")
    add(
        "--tokens-per-step",
        type=int,
        default=d.tokens_per_step,
        help=f"tokens per optimizer step, all ranks ({d.tokens_per_step})",
    )
    add("--optimizer", choices=("adam", "sgd"), default=d.optimizer)
    add("--lr", type=float, default=None, help="base step size (adam 1e-3, sgd 1.0)")
    add(
        "--init",
        choices=("lstsq", "zero"),
        default=d.init,
        help="closed-form start or the logit lens (lstsq)",
    )
    add(
        "--lstsq-tokens",
        type=int,
        default=d.lstsq_tokens,
        help=f"tokens for the closed-form start ({d.lstsq_tokens})",
    )
    add("--ridge", type=float, default=d.ridge, help=f"relative ridge penalty ({d.ridge})")
    add("--seed", type=int, default=d.seed)
    add(
        "--checkpoint-every",
        type=int,
        default=d.checkpoint_every,
        metavar="K",
        help=f"steps between checkpoints, 0: only on Ctrl-C ({d.checkpoint_every})",
    )
    add("--held-out", type=float, default=d.held_out, help="held-out document fraction")
    add("--eval-tokens", type=int, default=d.eval_tokens, help="held-out tokens for metrics")
    add(
        "--val-tokens",
        type=int,
        default=d.val_tokens,
        help="training-split tokens that pick start or fine-tuned per layer",
    )
    add("--device", default=d.device, help="cpu or cuda (cuda:LOCAL_RANK under torchrun)")
    add("--dtype", default=d.dtype, help="model dtype (half types only on cuda)")
    add("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def _config(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if values["device"] == "cuda" and "LOCAL_RANK" in os.environ:
        values["device"] = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return TrainConfig(**values)


def command_line(config: TrainConfig, out: str, *, resume: bool = False) -> str:
    """The ``lenskit train`` command that gives ``config`` (non-default settings only)."""
    parts = ["lenskit", "train"]
    for key, value in config.to_dict().items():
        if key == "tokens" or (value is not None and value != getattr(_DEFAULTS, key)):
            parts += [f"--{key.replace('_', '-')}", str(value)]
    parts += ["--out", out] + (["--resume"] if resume else [])
    return shlex.join(parts)


def format_summary(result: TrainResult) -> str:
    """Per-layer held-out KL of the logit and the tuned lens, and the means, in bits."""
    lines = [f"{'layer':>5}  {'logit KL':>9}  {'tuned KL':>9}"]
    for layer, (logit, tuned) in enumerate(zip(result.logit_kl, result.tuned_kl, strict=True)):
        lines.append(f"{layer:>5}  {logit:>9.3f}  {tuned:>9.3f}")
    n = len(result.logit_kl)
    lines.append(f"{'mean':>5}  {sum(result.logit_kl) / n:>9.3f}  {sum(result.tuned_kl) / n:>9.3f}")
    rate = result.timings.get("kl_tokens_per_s")
    lines.append(
        f"{result.tokens} tokens, {result.seconds:.0f} s"
        + (f", KL steps at {rate:.1f} tokens/s" if rate else "")
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``lenskit train``."""
    config = _config(args)  # bad settings fail before the model loads
    model = load_model(config.model, device=config.device, dtype=config.dtype)
    result = train_tuned_lens(
        model,
        config,
        args.out,
        resume=args.resume,
        progress=not args.quiet,
        command=command_line(config, args.out, resume=args.resume),
    )
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(format_summary(result))
        print(f"wrote {args.out}/config.json, params.pt and metrics.json")
    return 0
