"""``lenskit causal-basis``: extract the causal basis of layers and add it to a basis folder.

Each layer is written to ``--out`` as soon as it is done, so Ctrl-C keeps finished layers;
the folder is then a ``tuned-with-causal-basis:DIR`` lens.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from lenskit.causal.config import CausalBasisConfig
from lenskit.commands.flags import add_flags, config_from_args
from lenskit.errors import LenskitError
from lenskit.io import check_output
from lenskit.settings import DEFAULT_MODEL

__all__ = ["format_table", "register", "run"]


def register(sub: Any) -> None:
    """Add the ``causal-basis`` subcommand."""
    parser = sub.add_parser(
        "causal-basis",
        help="find the residual directions of a layer that matter most to a lens",
        description="For each --layer, find --k orthonormal residual directions, one after "
        "another, each maximising the mean KL between the lens's output and its output with "
        "the direction ablated; measure each on held-out text on the lens and on the model "
        "(ablated in the residual stream); sort by lens influence; add the layer to --out.",
    )
    add = parser.add_argument
    add("--model", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    add(
        "--lens",
        default="tuned",
        help="the lens, tuned or tuned:DIR (default: the shipped tuned lens)",
    )
    add(
        "--layer",
        type=int,
        nargs="+",
        required=True,
        metavar="L",
        help="block inputs (lens rows 0..n_layers-1); several are captured in one pass",
    )
    add(
        "--out",
        required=True,
        metavar="DIR",
        help="basis folder (new, or one of this model and lens: layers are added or replaced)",
    )
    add(
        "--data",
        default=None,
        help="corpus file, folder, cached dataset or builtin:NAME (default: Shakespeare)",
    )
    add_flags(parser.add_argument_group("extraction settings"), CausalBasisConfig)
    add(
        "--figures",
        default=None,
        metavar="DIR",
        help="also write each layer's influence and token figures (HTML) to DIR",
    )
    add("--device", default="cpu")
    add("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def _config(args: argparse.Namespace) -> CausalBasisConfig:
    return config_from_args(CausalBasisConfig, args)


def format_table(basis: Any) -> str:
    """Per direction: held-out lens and model influence, training objective, search stats."""
    s = basis.settings
    lens = s.get("lens", {})
    where = "shipped" if lens.get("shipped") else (lens.get("path") or "in memory")
    lines = [
        f"layer {basis.layer} · {s.get('model')} · {lens.get('kind')} lens ({where}) · "
        f"{s.get('config', {}).get('ablation')} ablation · KL in bits per token",
        f"{'dir':>4}{'lens':>10}{'model':>10}{'train':>10}{'found':>7}{'iters':>7}",
    ]
    model = basis.model_influence
    for i in range(basis.k):
        m = f"{float(model[i]):>10.4f}" if model is not None else f"{'—':>10}"
        lines.append(
            f"{i + 1:>4}{float(basis.lens_influence[i]):>10.4f}{m}"
            f"{float(basis.train_influence[i]):>10.4f}{basis.found_at[i] + 1:>7}"
            f"{basis.iterations[i]:>6}{'' if basis.converged[i] else '*'}"
        )
    rho = basis.spearman
    if not math.isnan(rho):
        lines.append(
            f"Spearman rank correlation (lens, model) = {rho:.3f} over {basis.k} directions"
        )
    secs = s.get("seconds", {})
    lines.append(
        f"{s.get('train_tokens')} training and {s.get('eval_tokens')} held-out tokens "
        f"from {s.get('data')}; {secs.get('extract', 0):.0f} s extracting, "
        f"{secs.get('lens_influence', 0) + secs.get('model_influence', 0):.0f} s "
        f"measuring ({s.get('objective_path')} objective)"
    )
    if not all(basis.converged):
        lines.append("* stopped at --max-iter before the convergence test was met")
    return "\n".join(lines)


def _figures(model: Any, lens: Any, basis: Any, folder: Path) -> list[Path]:
    from lenskit.causal.influence import direction_tokens
    from lenskit.export import save_figure
    from lenskit.plotting.causal import direction_tokens_plot, influence_plot

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in (
        ("influence", influence_plot(basis)),
        ("tokens", direction_tokens_plot(direction_tokens(lens, basis, model.tokenizer))),
    ):
        path = folder / f"layer_{basis.layer}_{name}.html"
        save_figure(fig, path)
        written.append(path)
    return written


def run(args: argparse.Namespace) -> int:
    """Run ``lenskit causal-basis``."""
    config = _config(args)  # bad settings fail before the model loads
    from lenskit.causal.extraction import extract_causal_basis
    from lenskit.lenses import get_lens, parse_lens_spec
    from lenskit.models import load_model

    kind, options = parse_lens_spec(args.lens)
    if kind == "tuned-with-causal-basis":
        raise LenskitError(
            "extract a causal basis with the lens it will serve: pass --lens "
            "tuned or --lens tuned:DIR"
        )
    out = check_output(args.out, "--out", kind="folder")
    if args.figures:
        check_output(args.figures, "--figures", kind="folder")
    model = load_model(args.model, device=args.device)
    lens = get_lens(kind, model, **options)
    bases = extract_causal_basis(
        model, lens, args.layer, config, args.data, out=out, progress=not args.quiet
    )
    for basis in bases.values():
        print(format_table(basis))
        if args.figures:
            for path in _figures(model, lens, basis, Path(args.figures).expanduser()):
                print(f"wrote {path}")
    print(
        f"wrote {out}/: layers {', '.join(map(str, bases))}; read it with "
        f"`lenskit trajectory --model {shlex.quote(args.model)} --lens "
        f"{shlex.quote('tuned-with-causal-basis:' + str(out))} --prompt TEXT`",
        file=sys.stdout,
    )
    return 0
