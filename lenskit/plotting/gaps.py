"""Lines with gaps: finite values, uncertainty bands and dotted guides across unread layers.

A lens that does not read a layer (the J-lens at ``L0``, a causal basis at most layers)
leaves a gap in its line; the helpers here keep such gaps open in bands and draw a thin
dotted guide through the values a line does have.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.colors import hex_to_rgb

__all__ = ["band_color", "band_outline", "finite", "gap_connector"]


def finite(value: object) -> bool:
    """Whether ``value`` is a finite number (not None, NaN or infinite)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def band_color(color: str, alpha: float = 0.18) -> str:
    """``color`` (``#rrggbb``) as a translucent ``rgba`` fill."""
    r, g, b = hex_to_rgb(color)
    return f"rgba({r},{g},{b},{alpha})"


def band_outline(x: list[int], lo: list[float], hi: list[float]) -> tuple[list, list]:
    """A closed outline per run of finite bounds, runs separated by None (gaps stay open)."""
    xs: list = []
    ys: list = []
    run: list[tuple[int, float, float]] = []
    for point in [*zip(x, lo, hi, strict=True), None]:
        if point is not None and finite(point[1]) and finite(point[2]):
            run.append(point)
            continue
        if run:
            if xs:
                xs.append(None)
                ys.append(None)
            xs += [p[0] for p in run] + [p[0] for p in reversed(run)]
            ys += [p[2] for p in run] + [p[1] for p in reversed(run)]
        run = []
    return xs, ys


def gap_connector(x: list[int], y: list, color: str, group: str) -> go.Scatter | None:
    """A thin dotted line through a line's values across its gaps (None if it has none).

    A lens that reads only some layers (a causal basis: a few) would otherwise be a few
    lone dots; the markers stay the values, the dotted line only guides the eye.
    """
    known = [i for i, v in enumerate(y) if v is not None]
    if len(known) < 2 or known[-1] - known[0] + 1 == len(known):
        return None
    return go.Scatter(
        x=[x[i] for i in known],
        y=[y[i] for i in known],
        mode="lines",
        line={"color": color, "width": 1.2, "dash": "dot"},
        hoverinfo="skip",
        showlegend=False,
        legendgroup=group,
        name=f"{group} (joined across unread layers)",
    )
