"""Download buttons for a page's figure and table: PNG, SVG, HTML, CSV, Parquet.

Files are made only when their button is clicked. Tables carry their provenance (model,
lens, prompt, lenskit version): inside a Parquet file, and as a JSON sidecar beside a
CSV (save both; ``lenskit.export.load_table`` reads the pair back).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import streamlit as st

from lenskit.errors import LenskitError
from lenskit.export import figure_bytes, find_browser, table_bytes


def _safe(make: Callable[[], bytes]) -> Callable[[], bytes]:
    """``make``, but a failure gives a one-line text file saying why (never a traceback)."""

    def run() -> bytes:
        try:
            return make()
        except LenskitError as err:
            return f"lenskit could not make this file: {err}\n".encode()

    return run


def export_buttons(
    key: str,
    stem: str,
    fig: Any | None = None,
    table: Any | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """A row of download buttons for ``fig`` and ``table``, named ``<stem>.<suffix>``.

    Args:
        key: A key unique on the page (one row of buttons per key).
        stem: The file name without its suffix.
        fig: A plotly figure (PNG and SVG need Chrome or Chromium on the server).
        table: A DataFrame, or a result with ``to_frame()``.
        metadata: Provenance for the table (``model``, ``lens``, ``prompt``), added to
            what the table's ``attrs`` already hold.
    """
    buttons: list[tuple[str, Callable[[], bytes], str, str]] = []
    if fig is not None:
        if find_browser():
            buttons += [
                ("PNG", lambda: figure_bytes(fig, "png"), "png", "image/png"),
                ("SVG", lambda: figure_bytes(fig, "svg"), "svg", "image/svg+xml"),
            ]
        buttons.append(("HTML", lambda: figure_bytes(fig, "html"), "html", "text/html"))
    if table is not None:
        buttons += [
            ("CSV", lambda: table_bytes(table, "csv", metadata=metadata)[0], "csv", "text/csv"),
            (
                "CSV metadata",
                lambda: table_bytes(table, "csv", metadata=metadata)[1] or b"",
                "csv.json",
                "application/json",
            ),
            (
                "Parquet",
                lambda: table_bytes(table, "parquet", metadata=metadata)[0],
                "parquet",
                "application/octet-stream",
            ),
        ]
    columns = st.columns([1.2] + [1] * len(buttons) + [max(1, 9 - len(buttons))], gap="small")
    columns[0].markdown("**Download**")
    for column, (label, make, suffix, mime) in zip(columns[1:], buttons, strict=False):
        column.download_button(
            label,
            _safe(make),
            f"{stem}.{suffix}",
            mime,
            key=f"{key}_{suffix}",
            on_click="ignore",
        )
