"""``lenskit trajectory``: one prompt's prediction at every layer, as a table and JSON."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from lenskit.errors import LenskitError

if TYPE_CHECKING:
    from lenskit.trajectory import Trajectory

__all__ = [
    "POINT_CHOICES",
    "PRECISION_CHOICES",
    "add_points_flag",
    "format_table",
    "parse_points",
    "parse_positions",
    "parse_rows",
    "register",
    "run",
]

# Torch and the model code load only once the arguments are checked (a bad argument
# fails in well under a second); the same names as lenskit.readout.PRECISIONS and
# lenskit.models.SUBLAYER_POINTS.
PRECISION_CHOICES = ("auto", "exact", "bf16", "fp16")
POINT_CHOICES = ("resid_pre", "resid_mid")


def add_points_flag(parser: Any) -> None:
    """Add ``--points`` (the residual points read in each block) to a subcommand."""
    parser.add_argument(
        "--points",
        default="resid_pre",
        metavar="POINTS",
        help="residual points read in each block: resid_pre (block inputs), or "
        "resid_pre,resid_mid to add the stream between attention and MLP (rows L12.mid)",
    )


def parse_points(text: str) -> tuple[str, ...]:
    """``"resid_pre,resid_mid"`` as a tuple of point names.

    Raises:
        LenskitError: For an unknown or missing point name.
    """
    points = tuple(p.strip() for p in text.split(","))
    bad = [p for p in points if p not in POINT_CHOICES]
    if bad or not points:
        raise LenskitError(
            f"--points {text!r} names {bad[0] if bad else 'no'} point: use resid_pre or "
            "resid_pre,resid_mid"
        )
    return points


def register(sub: Any) -> None:
    """Add the ``trajectory`` subcommand."""
    parser = sub.add_parser(
        "trajectory",
        help="a prompt's next-token prediction at every layer",
        description="Read a prompt through a lens at every layer; print a table, write JSON.",
    )
    parser.add_argument(
        "--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--lens", default="logit", help="lens spec: KIND or KIND:PATH")
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--target", default=None, help="a token to follow, e.g. ' Paris'")
    parser.add_argument("--top-k", type=int, default=10, help="top tokens kept per cell")
    parser.add_argument(
        "--position", type=int, default=-1, help="position shown in the table (default: last)"
    )
    parser.add_argument(
        "--rows",
        default=None,
        metavar="ROWS",
        help="compute only these rows, e.g. 0,10,20-30 (default: all; the output row is the "
        "last: n_layers, or 2*n_layers with --points resid_pre,resid_mid)",
    )
    add_points_flag(parser)
    parser.add_argument(
        "--positions",
        default=None,
        metavar="START:STOP",
        help="compute only positions START..STOP-1, e.g. 0:64 (default: all)",
    )
    parser.add_argument(
        "--precision",
        default=None,
        choices=PRECISION_CHOICES,
        help="readout matmul precision (default: $LENSKIT_PRECISION, else auto: measured)",
    )
    parser.add_argument("--json", default=None, metavar="FILE", help="write every cell as JSON")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def parse_rows(text: str | None) -> list[int] | None:
    """``"0,10,20-30"`` as a sorted list of rows (None stays None).

    Raises:
        LenskitError: For anything but comma-separated integers and ``A-B`` ranges.
    """
    if text is None:
        return None
    rows: set[int] = set()
    for part in text.split(","):
        low, sep, high = part.strip().partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise LenskitError(
                f"--rows {text!r} is not a list of rows: write e.g. --rows 0,10,20-30"
            )
        rows.update(range(int(low), int(high) + 1) if sep else [int(low)])
    return sorted(rows)


def parse_positions(text: str | None) -> tuple[int, int] | None:
    """``"START:STOP"`` as a half-open position range (None stays None).

    Raises:
        LenskitError: For anything but two non-negative integers around a colon.
    """
    if text is None:
        return None
    start, sep, stop = text.partition(":")
    if not sep or not start.strip().isdigit() or not stop.strip().isdigit():
        raise LenskitError(f"--positions {text!r} is not START:STOP: write e.g. --positions 0:64")
    return int(start), int(stop)


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
        if row not in traj.cells.rows:
            continue  # not computed (--rows)
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
    if args.top_k < 1:
        raise LenskitError(f"--top-k must be >= 1, got {args.top_k}")
    rows, positions = parse_rows(args.rows), parse_positions(args.positions)
    points = parse_points(args.points)
    from tqdm.auto import tqdm

    from lenskit.io import atomic_write_json, check_output
    from lenskit.lenses import lens_from_spec, parse_lens_spec
    from lenskit.models import DEFAULT_MODEL, load_model
    from lenskit.trajectory import trajectory

    parse_lens_spec(args.lens)  # an unknown lens fails before the model loads
    if args.json:
        check_output(args.json, "--json", kind="file")  # before any work, not after
    model = load_model(args.model or DEFAULT_MODEL, device=args.device)
    lens = lens_from_spec(args.lens, model)
    bars: list[Any] = []

    def show(done: int, total: int) -> None:
        if not bars:  # made at the first report: an error before it prints no bar
            bars.append(tqdm(total=total, desc="reading cells", unit="cell", leave=False))
        bars[0].update(done - bars[0].n)

    try:
        traj = trajectory(
            model,
            lens,
            args.prompt,
            target=args.target,
            top_k=args.top_k,
            rows=rows,
            positions=positions,
            precision=args.precision,
            on_progress=None if args.quiet else show,
            points=points,
        )
    finally:
        for bar in bars:
            bar.close()
    shown = args.position if positions is None or args.position != -1 else positions[1] - 1
    print(format_table(traj, shown))
    if args.json:
        atomic_write_json(args.json, traj.to_dict())
        print(f"wrote {args.json}")
    return 0
