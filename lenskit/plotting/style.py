"""The one look of lenskit's figures: template, palette, token display and sizing."""

from __future__ import annotations

import functools
import html
import math
from collections.abc import Sequence

import plotly.graph_objects as go
import plotly.io as pio

from lenskit.errors import LenskitError

__all__ = [
    "FIGURE_WIDTH",
    "LABEL_PX",
    "MISSING_COLOR",
    "PALETTE",
    "TEMPLATE",
    "TOKEN_KEY",
    "coverage_note",
    "display_token",
    "grid_size",
    "label_chars",
    "log_ticks",
    "select_positions",
    "select_rows",
]

# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000")
MISSING_COLOR = "#d4d4d4"  # cells with no value (uncovered rows): the plot background
_FONT = "Inter, Helvetica Neue, Helvetica, Arial, sans-serif"
_MONO = "DejaVu Sans Mono, Menlo, Consolas, monospace"

TEMPLATE = go.layout.Template(pio.templates["plotly_white"])
TEMPLATE.layout.update(
    font={"family": _FONT, "size": 13, "color": "#222222"},
    title={"font": {"size": 16}, "x": 0.0, "xanchor": "left", "xref": "paper"},
    colorway=PALETTE,
    hoverlabel={
        "font": {"family": _MONO, "size": 13, "color": "#111111"},
        "bgcolor": "#ffffff",
        "bordercolor": "#444444",
        "align": "left",
    },
    legend={"bgcolor": "rgba(255,255,255,0)", "borderwidth": 0},
    margin={"l": 70, "r": 30, "t": 60, "b": 60},
)

_VISIBLE = {" ": "·", "\n": "↵", "\r": "␍", "\t": "→"}
TOKEN_KEY = "· space, ↵ newline, → tab"
"""What the whitespace marks in token labels mean (shown beside every token axis)."""
LABEL_PX = 11  # the smallest text a figure draws, in CSS pixels
_CHAR_PX = 6.6  # width of an average character at LABEL_PX (a little generous)


def label_chars(width_px: float) -> int:
    """How many characters of an 11 px label fit in ``width_px`` pixels (at least 1)."""
    return max(1, int((width_px - 4) // _CHAR_PX))


def coverage_note(labels: Sequence[str], covered: Sequence[bool]) -> str:
    """A short note on the rows a lens reads: ``""`` when it reads all of them.

    ``reads only L6, L12, output`` when it reads fewer rows than it skips, else
    ``not read: L0``.
    """
    read = [label for label, c in zip(labels, covered, strict=True) if c]
    skipped = [label for label, c in zip(labels, covered, strict=True) if not c]
    if not skipped:
        return ""
    if len(read) < len(skipped):
        return "reads only " + ", ".join(read) if read else "reads no row"
    return "not read: " + ", ".join(skipped)


@functools.lru_cache(maxsize=1 << 16)
def display_token(token: str | None, max_chars: int = 16, *, escape: bool = True) -> str:
    r"""A token as a readable label: whitespace made visible, long tokens shortened.

    Spaces become ``·`` (a glyph every font has), newlines ``↵``, carriage
    returns ``␍`` and tabs ``→``; other control characters are shown escaped
    (``\x1f``); the empty token is ``∅`` and a missing
    one (``None``) is ``–``. Tokens longer than ``max_chars`` end in ``…``. With
    ``escape`` the result is HTML-escaped, as Plotly renders labels as HTML.

    Args:
        token: The token text.
        max_chars: Longest label, ``…`` included.
        escape: Whether to HTML-escape the label.

    Returns:
        The label.
    """
    if token is None:
        return "–"
    if token == "":
        return "∅"
    shown = "".join(
        _VISIBLE.get(ch, f"\\x{ord(ch):02x}" if (ord(ch) < 32 or ord(ch) == 127) else ch)
        for ch in token
    )
    if len(shown) > max_chars:
        shown = shown[: max(1, max_chars - 1)] + "…"
    return html.escape(shown, quote=False) if escape else shown


def select_rows(n_rows: int | Sequence[str], stride: int) -> list[int]:
    """Rows ``0, stride, 2*stride, ...`` and always the last (output) row.

    Given the row labels instead of their number, sub-layer rows (``L12``, ``L12.mid``)
    are taken a block at a time: every ``stride``-th block, with both of its rows.
    """
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise LenskitError(f"layer_stride must be a positive integer, got {stride!r}")
    if isinstance(n_rows, int):
        count, per_block = n_rows, 1
    else:
        count = len(n_rows)
        per_block = 2 if any(label.endswith(".mid") for label in n_rows) else 1
    rows = [r for r in range(count - 1) if (r // per_block) % stride == 0]
    return [*rows, count - 1]


def select_positions(n_pos: int, token_range: tuple[int, int] | slice | None) -> list[int]:
    """Positions in ``token_range`` (``(start, stop)``, half-open, or a slice)."""
    if token_range is None:
        return list(range(n_pos))
    if isinstance(token_range, slice):
        chosen = range(n_pos)[token_range]
    elif (
        isinstance(token_range, (tuple, list))
        and len(token_range) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in token_range)
    ):
        chosen = range(n_pos)[token_range[0] : token_range[1]]
    else:
        raise LenskitError(
            f"token_range must be (start, stop) or a slice, got {token_range!r}: "
            "e.g. token_range=(0, 64)"
        )
    if len(chosen) == 0:
        raise LenskitError(
            f"token_range {token_range!r} selects no positions of {n_pos}: "
            f"use a range inside 0..{n_pos}"
        )
    return list(chosen)


FIGURE_WIDTH = 1400  # px: the app's page width at a 1600 px wide window


def grid_size(
    n_rows: int, n_cols: int, *, panels: int = 1, width: int = FIGURE_WIDTH, left: int = 80
) -> dict[str, float | bool | int]:
    """Cell and figure sizes for ``panels`` layer x position grids stacked at full width.

    Every panel spans the figure's width (``width`` px, less the row labels on the left
    and the colour bar on the right); cells are at most 90 px wide and 20 px tall (14 px
    for more than 40 rows). Labels are 11 px and shortened to what fits: a cell shows its
    top-1 token when at least 3 characters fit, and every ``tick_step``-th column is
    labelled with its input token.

    Returns:
        ``cell_w``, ``cell_h``, ``width``, ``height``, ``panel_h`` and ``gap`` (px),
        ``left``, ``right``, ``top``, ``bottom`` (margins, px), ``show_text``,
        ``text_chars`` (characters a cell label may have), ``tick_step``, ``tick_chars``
        and ``xgap`` (1 px between columns, 0 once columns are too narrow to spare it).
    """
    right, top, bottom, gap = 110, 84, 78, 54
    cell_w = min(90.0, (width - left - right) / n_cols)
    cell_h = 20.0 if n_rows <= 40 else 14.0
    panel_h = n_rows * cell_h
    tick_step = max(1, math.ceil(34.0 / cell_w))
    return {
        "cell_w": cell_w,
        "cell_h": cell_h,
        "width": math.ceil(max(left + right + n_cols * cell_w, 480)),
        "height": math.ceil(top + bottom + panels * panel_h + (panels - 1) * gap),
        "panel_h": panel_h,
        "gap": gap,
        "left": left,
        "right": right,
        "top": top,
        "bottom": bottom,
        "show_text": label_chars(cell_w) >= 3 and cell_h >= 14,
        "text_chars": label_chars(cell_w),
        "tick_step": tick_step,
        "tick_chars": label_chars(cell_w * tick_step),
        "xgap": 1 if cell_w >= 8 else 0,
    }


def log_ticks(values: Sequence[float | int | None], *, integers: bool = False) -> dict:
    """Log-axis ticks 1, 2, 5 (or 1..9 over a narrow range) times powers of ten.

    Written in full (``0.5``, ``200``, ``1,000``), never as Plotly's bare mantissas
    (``5``, ``2``) that read as the wrong number; with ``integers`` (ranks) from 1.
    Empty for no positive values.
    """
    positive = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    if not positive:
        return {}
    lo, hi = min(positive) / 1.25, max(positive) * 1.25
    if integers:  # ranks: the axis starts at 1, the top
        lo = 1.0
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks: list[float] = []
    for mantissas in ((1, 2, 5), range(1, 10)):
        ticks = [m * 10.0**e for e in decades for m in mantissas if lo <= m * 10.0**e <= hi]
        if len(ticks) >= 3:
            break
    text = [f"{t:,.0f}" if t >= 1 else f"{t:.3g}" for t in ticks]
    return {"tickmode": "array", "tickvals": ticks, "ticktext": text}
