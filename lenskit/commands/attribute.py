r"""``lenskit attribute``: which attention or MLP output moved one prediction, through a lens.

Example (shell)::

    lenskit attribute --model smollm2-135m --lens tuned \\
        --prompt "The Eiffel Tower is located in the city of" --target " Paris" --json out.json
"""

from __future__ import annotations

import argparse
from typing import Any

from lenskit.attribution_config import AttributionConfig
from lenskit.commands.flags import add_flags, config_from_args
from lenskit.errors import LenskitError
from lenskit.settings import DEFAULT_MODEL

__all__ = ["format_table", "register", "run"]


def register(sub: Any) -> None:
    """Add the ``attribute`` subcommand."""
    parser = sub.add_parser(
        "attribute",
        help="each attention and MLP output's effect on one prediction, through a lens",
        description=(
            "Direct effect (linearised, read through the lens) and ablation effect of every "
            "attention and MLP output on a target token at one position."
        ),
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    parser.add_argument(
        "--lens", default="logit", help="lens spec: KIND or KIND:PATH (tuned:hub for published)"
    )
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--target", required=True, help="the target token, e.g. ' Paris'")
    add_flags(parser.add_argument_group("settings"), AttributionConfig)
    parser.add_argument("--contrast", default=None, help="with --metric logit: a contrast token")
    parser.add_argument("--top", type=int, default=12, help="rows printed (largest effects)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the result as JSON")
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(func=run)


def format_table(result: Any, top: int = 12) -> str:
    """The components with the largest direct effects, with their ablation effects."""
    pos = result.position
    head = (
        f"{result.model_name} · {result.lens_kind} lens · position {pos} "
        f"({result.tokens[pos]!r}) · target {result.target!r} · {result.metric} "
        f"({result.unit}) · output {result.output_value:.3f}"
    )
    lines = [head, f"{'component':>10}  {'read at':>8}  {'direct':>9}  {'ablation':>9}"]
    order = sorted(range(len(result.labels)), key=lambda k: -abs(float(result.direct[k])))
    for k in order[: max(1, top)]:
        ablation = float(result.ablation[k])
        shown = "—" if ablation != ablation else f"{ablation:+9.3f}"
        lines.append(
            f"{result.labels[k]:>10}  {result.read_rows[k]:>8}  "
            f"{float(result.direct[k]):+9.3f}  {shown:>9}"
        )
    if result.constant is not None:
        lines.append(f"{'constant':>10}  {'output':>8}  {result.constant:+9.3f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``lenskit attribute``."""
    from lenskit.attribution import attribute
    from lenskit.io import atomic_write_json
    from lenskit.lenses import lens_from_spec, parse_lens_spec
    from lenskit.models import load_model

    if not args.prompt.strip():
        raise LenskitError("the prompt is empty: pass some text with --prompt")
    parse_lens_spec(args.lens)  # an unknown lens fails before the model loads
    model = load_model(args.model, device=args.device)
    lens = lens_from_spec(args.lens, model)
    result = attribute(
        model,
        lens,
        args.prompt,
        args.target,
        contrast=args.contrast,
        **config_from_args(AttributionConfig, args).to_dict(),
    )
    print(format_table(result, args.top))
    if args.json:
        atomic_write_json(args.json, result.to_dict())
        print(f"wrote {args.json}")
    return 0
