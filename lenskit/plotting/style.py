"""The one look of lenskit's figures: template, palette, token display and sizing."""

from __future__ import annotations

import functools
import html
import math

import plotly.graph_objects as go
import plotly.io as pio

from lenskit.errors import LenskitError

__all__ = [
    "MISSING_COLOR",
    "PALETTE",
    "TEMPLATE",
    "display_token",
    "grid_size",
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
    hoverlabel={"font": {"family": _MONO, "size": 12}, "align": "left"},
    legend={"bgcolor": "rgba(255,255,255,0)", "borderwidth": 0},
    margin={"l": 70, "r": 30, "t": 60, "b": 60},
)

_VISIBLE = {" ": "·", "\n": "↵", "\r": "␍", "\t": "→"}


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


def select_rows(n_rows: int, stride: int) -> list[int]:
    """Rows ``0, stride, 2*stride, ...`` and always the last (output) row."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise LenskitError(f"layer_stride must be a positive integer, got {stride!r}")
    rows = list(range(0, n_rows - 1, stride))
    return [*rows, n_rows - 1]


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


def grid_size(n_rows: int, n_cols: int, *, panels: int = 1) -> dict[str, float | bool | int]:
    """Cell and figure sizes for a layer x position grid that stays readable.

    The plotting area of each panel is at most ~1600 / panels pixels wide; cells
    are at most 56 px wide (enough for a short token) and 12..26 px tall.

    Returns:
        ``cell_w``, ``cell_h``, ``width``, ``height``, ``show_text`` (cells wide
        enough for their token), ``tick_step`` (label every n-th column) and
        ``xgap`` (1 px between columns, 0 once columns are too narrow to spare it).
    """
    cell_w = min(56.0, 1600.0 / panels / n_cols)
    cell_h = min(26.0, max(12.0, 700.0 / n_rows))
    width = 150 + panels * n_cols * cell_w + 130 + (panels - 1) * 30
    height = 120 + n_rows * cell_h + 110
    return {
        "cell_w": cell_w,
        "cell_h": cell_h,
        "width": math.ceil(max(width, 420)),
        "height": math.ceil(max(height, 300)),
        "show_text": cell_w >= 36 and cell_h >= 14,
        "tick_step": max(1, math.ceil(14.0 / cell_w)),
        "xgap": 1 if cell_w >= 8 else 0,
    }
