"""``lenskit trajectory``: one prompt's prediction at every layer, as a table and JSON."""

from __future__ import annotations

import argparse
from typing import Any

from lenskit.errors import LenskitError
from lenskit.io import atomic_write_json
from lenskit.lenses import lens_from_spec, parse_lens_spec
from lenskit.models import DEFAULT_MODEL, load_model
from lenskit.trajectory import Trajectory, trajectory

__all__ = ["format_table", "register", "run"]


def register(sub: Any) -> None:
    """Add the ``trajectory`` subcommand."""
    parser = sub.add_parser(
        "trajectory",
        help="a prompt's next-token prediction at every layer",
        description="Read a prompt through a lens at every layer; print a table, write JSON.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    parser.add_argument("--lens", default="logit", help="lens spec: KIND or KIND:PATH")
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--target", default=None, help="a token to follow, e.g. ' Paris'")
    parser.add_argument("--top-k", type=int, default=10, help="top tokens kept per cell")
    parser.add_argument(
        "--position", type=int, default=-1, help="position shown in the table (default: last)"
    )
    parser.add_argument("--json", default=None, metavar="FILE", help="write every cell as JSON")
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(func=run)


def _clip(text: str, width: int) -> str:
    """The token quoted, with escapes visible, shortened to ``width`` characters."""
    shown = repr(text)
    return shown if len(shown) <= width else shown[: width - 2] + "…" + shown[-1]


def format_table(traj: Trajectory, position: int = -1) -> str:
    """A compact table of one position across layers: top-3 tokens and statistics in bits."""
    n_pos = len(traj.tokens)
    if not -n_pos <= position < n_pos:
        raise LenskitError(f"position {position} is outside the prompt's {n_pos} tokens")
    pos = position % n_pos
    head = (
        f"{traj.model_name} · {traj.lens_kind} lens · position {pos} "
        f"(input {_clip(traj.tokens[pos], 20)}, next "
        f"{_clip(traj.next_tokens[pos] or '', 20) if pos < n_pos - 1 else '—'}) · bits"
    )
    cols = f"{'layer':>7}  {'top-1':<14}{'p':>6}  {'2nd':<12}{'3rd':<12}{'H':>6}{'KL':>7}"
    has_target = traj.target_prob is not None and traj.target_rank is not None
    if has_target:
        cols += f"  {'p(' + _clip(traj.target or '', 12) + ')':>16}{'rank':>7}"
    lines = [head, cols]
    for row, label in enumerate(traj.layer_labels):
        if not bool(traj.covered[row]):
            lines.append(f"{label:>7}  (not covered by this lens)")
            continue
        top = traj.top_tokens[row][pos]
        second = top[1] if len(top) > 1 else ""
        third = top[2] if len(top) > 2 else ""
        line = (
            f"{label:>7}  {_clip(top[0], 13):<14}{float(traj.top_probs[row, pos, 0]):>6.3f}  "
            f"{_clip(second, 11):<12}{_clip(third, 11):<12}"
            f"{float(traj.entropy[row, pos]):>6.2f}{float(traj.kl_to_final[row, pos]):>7.2f}"
        )
        if has_target:
            line += (
                f"  {float(traj.target_prob[row, pos]):>16.4f}"  # type: ignore[index]
                f"{int(traj.target_rank[row, pos]):>7d}"  # type: ignore[index]
            )
        lines.append(line)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``lenskit trajectory``."""
    if not args.prompt.strip():
        raise LenskitError("the prompt is empty: pass some text with --prompt")
    parse_lens_spec(args.lens)  # an unknown lens fails before the model loads
    model = load_model(args.model, device=args.device)
    lens = lens_from_spec(args.lens, model)
    traj = trajectory(model, lens, args.prompt, target=args.target, top_k=args.top_k)
    print(format_table(traj, args.position))
    if args.json:
        atomic_write_json(args.json, traj.to_dict())
        print(f"wrote {args.json}")
    return 0
