"""Saving figures and tables atomically, with what produced them.

Figures: ``.html`` always works offline (plotly.js is embedded in the file by
default); ``.png``, ``.svg``, ``.pdf``, ``.jpg`` and ``.webp`` are drawn by
kaleido 1.x in a headless Chrome or Chromium found on this machine. Nothing is
ever downloaded: the browser is ``$BROWSER_PATH`` if set (kaleido's own
variable), else the first of ``chromium``, ``chromium-browser``,
``google-chrome``, ``google-chrome-stable`` and ``chrome`` on ``PATH``, else a
Chrome that ``kaleido_get_chrome`` installed earlier; MathJax (a CDN script) is
not loaded.

Tables: ``.csv`` or ``.parquet``. The metadata (at least ``model``, ``lens`` and
``prompt``) goes, for CSV, to a JSON sidecar ``<path>.json`` (a commented header
would break CSV readers, and tokens may contain ``#``); for Parquet, to the
schema metadata under the key ``lenskit``. :func:`load_table` reads either back
with the metadata in ``frame.attrs``.

Example:
    >>> import tempfile, pandas as pd
    >>> from lenskit.export import load_table, save_table
    >>> path = save_table(pd.DataFrame({"kl_bits": [0.5]}), tempfile.mkdtemp() + "/t.csv",
    ...                   metadata={"model": "m", "lens": "logit", "prompt": "p"})
    >>> load_table(path).attrs["model"]
    'm'
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from lenskit.errors import LenskitError
from lenskit.io import atomic_open, atomic_write_json

__all__ = [
    "FIGURE_FORMATS",
    "REQUIRED_METADATA",
    "TABLE_FORMATS",
    "figure_bytes",
    "find_browser",
    "load_table",
    "save_figure",
    "save_table",
    "table_bytes",
]

FIGURE_FORMATS = (".html", ".png", ".svg", ".pdf", ".jpg", ".jpeg", ".webp")
TABLE_FORMATS = (".csv", ".parquet")
REQUIRED_METADATA = ("model", "lens", "prompt")
BROWSER_ENV = "BROWSER_PATH"
_BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_PARQUET_KEY = b"lenskit"


def find_browser() -> str | None:
    """The Chrome or Chromium that static export uses, or None; never downloads one."""
    override = os.environ.get(BROWSER_ENV)
    if override:
        return override if os.path.isfile(override) and os.access(override, os.X_OK) else None
    for name in _BROWSER_NAMES:
        found = shutil.which(name)
        if found:
            return found
    try:  # a Chrome fetched earlier with `kaleido_get_chrome` (looked up, not fetched)
        from choreographer.browsers.chromium import Chromium

        return Chromium.find_browser(skip_local=False)
    except Exception:
        return None


def _suffix(path: Path, allowed: tuple[str, ...], what: str) -> str:
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise LenskitError(
            f"cannot save a {what} as {path.name!r}: use a name ending in {', '.join(allowed)}"
        )
    return suffix


def figure_bytes(
    fig: go.Figure,
    fmt: str,
    *,
    width: int | None = None,
    height: int | None = None,
    scale: int | float = 2.0,
    include_plotlyjs: bool | str = True,
    timeout: int | float = 90.0,
) -> bytes:
    """A figure as the bytes of an HTML page or an image (for a download or a file).

    Args:
        fig: The figure.
        fmt: A suffix of :data:`FIGURE_FORMATS`, with or without the dot (``"png"``).
        width: Image width in layout pixels (default: the figure's, else 900).
        height: Image height in layout pixels (default: the figure's, else 600).
        scale: Pixel density of raster images (2 = sharp on high-DPI screens).
        include_plotlyjs: For HTML: ``True`` embeds plotly.js (works offline,
            ~4.5 MB), ``"cdn"`` links to it (small, needs the internet).
        timeout: Seconds to wait for the browser to draw an image.

    Raises:
        LenskitError: For an unknown format, or an image format with no browser.
    """
    suffix = _suffix(Path(f"figure.{str(fmt).lstrip('.')}"), FIGURE_FORMATS, "figure")
    if suffix == ".html":
        page = fig.to_html(
            include_plotlyjs=include_plotlyjs,
            full_html=True,
            config={"displaylogo": False, "toImageButtonOptions": {"scale": 2}},
        )
        return page.encode("utf-8")
    browser = find_browser()
    if browser is None:
        where = os.environ.get(BROWSER_ENV)
        problem = (
            f"{BROWSER_ENV}={where!r} is not an executable"
            if where
            else "no Chrome or Chromium was found"
        )
        raise LenskitError(
            f"{problem} for {suffix} export: install one (e.g. `apt install chromium`), set "
            f"{BROWSER_ENV} to it, or save as .html"
        )
    import kaleido
    from kaleido.errors import ChromeNotFoundError

    opts = {
        "format": suffix.lstrip("."),
        "width": width or fig.layout.width or 900,
        "height": height or fig.layout.height or 600,
        "scale": scale,
    }
    kopts = {"path": browser, "mathjax": False, "timeout": timeout}
    try:
        return kaleido.calc_fig_sync(fig, opts=opts, kopts=kopts)
    except ChromeNotFoundError as err:
        raise LenskitError(
            f"kaleido could not start the browser at {browser}: set {BROWSER_ENV} to a working "
            "Chrome or Chromium, or save as .html"
        ) from err
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LenskitError(
            f"{suffix} export failed in {browser} ({first}): save as .html, or check the "
            "browser runs headless"
        ) from err


def save_figure(
    fig: go.Figure,
    path: str | os.PathLike[str],
    *,
    width: int | None = None,
    height: int | None = None,
    scale: int | float = 2.0,
    include_plotlyjs: bool | str = True,
    timeout: int | float = 90.0,
) -> Path:
    """Save a figure as HTML or as an image, atomically.

    Args:
        fig: The figure.
        path: Target file; its suffix picks the format (see :data:`FIGURE_FORMATS`).
        width: Image width in layout pixels (default: the figure's, else 900).
        height: Image height in layout pixels (default: the figure's, else 600).
        scale: Pixel density of raster images (2 = sharp on high-DPI screens).
        include_plotlyjs: For HTML: ``True`` embeds plotly.js (works offline,
            ~4.5 MB), ``"cdn"`` links to it (small, needs the internet).
        timeout: Seconds to wait for the browser to draw an image.

    Returns:
        The path written.

    Raises:
        LenskitError: For an unknown suffix, or an image format with no browser.
    """
    target = Path(path)
    data = figure_bytes(
        fig,
        _suffix(target, FIGURE_FORMATS, "figure"),
        width=width,
        height=height,
        scale=scale,
        include_plotlyjs=include_plotlyjs,
        timeout=timeout,
    )
    with atomic_open(target, "wb") as handle:
        handle.write(data)
    return target


def _as_frame(table: Any) -> pd.DataFrame:
    if isinstance(table, pd.DataFrame):
        return table
    if callable(getattr(table, "to_frame", None)):
        return table.to_frame()
    raise LenskitError(
        f"save_table takes a DataFrame or a result with .to_frame(), got {type(table).__name__}"
    )


def _metadata(frame: pd.DataFrame, metadata: dict[str, Any] | None) -> dict[str, Any]:
    import lenskit

    meta = {**frame.attrs, **(metadata or {})}
    missing = [key for key in REQUIRED_METADATA if key not in meta]
    if missing:
        raise LenskitError(
            f"table metadata lacks {', '.join(missing)}: pass metadata={{"
            + ", ".join(f"{key!r}: ..." for key in missing)
            + "} to save_table"
        )
    meta.setdefault("lenskit_version", lenskit.__version__)
    return json.loads(json.dumps(meta, default=str))


def _is_listlike(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or hasattr(value, "tolist")


def _csv_frame(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The frame with its list columns (top-k tokens, ...) as JSON text, and their names."""
    frame = frame.copy()
    frame.attrs = {}
    json_columns = [
        str(c)
        for c in frame.columns
        if frame[c].dtype == object and frame[c].map(_is_listlike).any()
    ]
    for column in json_columns:
        frame[column] = frame[column].map(
            lambda v: (
                json.dumps(v.tolist() if hasattr(v, "tolist") else list(v))
                if _is_listlike(v)
                else v
            )
        )
    return frame, json_columns


def _parquet_bytes(frame: pd.DataFrame, meta: dict[str, Any]) -> bytes:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:
        raise LenskitError("Parquet needs pyarrow: `pip install pyarrow`, or save as .csv") from err
    frame = frame.copy()
    frame.attrs = {}
    arrow = pa.Table.from_pandas(frame, preserve_index=False)
    schema_meta = {**(arrow.schema.metadata or {}), _PARQUET_KEY: json.dumps(meta).encode()}
    sink = pa.BufferOutputStream()
    pq.write_table(arrow.replace_schema_metadata(schema_meta), sink)
    return sink.getvalue().to_pybytes()


def table_bytes(
    table: Any, fmt: str, *, metadata: dict[str, Any] | None = None
) -> tuple[bytes, bytes | None]:
    """A table as file bytes (for a download), with its provenance, as :func:`save_table`.

    Args:
        table: A DataFrame, or a result with ``.to_frame()``.
        fmt: ``"csv"`` or ``"parquet"`` (with or without the dot).
        metadata: More metadata (JSON-able), overriding ``frame.attrs``; it must name
            ``model``, ``lens`` and ``prompt`` in all.

    Returns:
        ``(data, sidecar)``: for CSV the CSV text and the JSON sidecar that
        :func:`save_table` writes beside it (:func:`load_table` reads the pair back when
        the sidecar is saved as ``<name>.csv.json``); for Parquet the file, the
        metadata inside, and None.

    Raises:
        LenskitError: For an unknown format or missing metadata.
    """
    suffix = _suffix(Path(f"table.{str(fmt).lstrip('.')}"), TABLE_FORMATS, "table")
    frame = _as_frame(table)
    meta = _metadata(frame, metadata)
    if suffix == ".parquet":
        return _parquet_bytes(frame, meta), None
    flat, json_columns = _csv_frame(frame)
    sidecar = {"lenskit": meta, "format": "csv", "json_columns": json_columns}
    return flat.to_csv(index=False).encode("utf-8"), json.dumps(sidecar, indent=2).encode()


def save_table(
    table: Any,
    path: str | os.PathLike[str],
    *,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save a table as CSV or Parquet with the model, lens and prompt that produced it.

    The metadata is ``table.attrs`` (results' ``to_frame()`` fill it) updated
    with ``metadata``, plus ``lenskit_version``; it must name ``model``, ``lens``
    and ``prompt`` (use a corpus name for a prompt where a table covers many).
    CSV: list columns (top-k tokens, ...) are written as JSON text and the
    metadata goes to ``<path>.json``. Parquet: lists stay lists and the metadata
    is JSON under the schema metadata key ``lenskit``.

    Args:
        table: A DataFrame, or a result with ``.to_frame()`` (e.g. a Trajectory).
        path: Target file ending in ``.csv`` or ``.parquet``.
        metadata: More metadata (JSON-able), overriding ``frame.attrs``.

    Returns:
        The path written.

    Raises:
        LenskitError: For an unknown suffix or missing metadata.
    """
    target = Path(path)
    data, sidecar = table_bytes(table, _suffix(target, TABLE_FORMATS, "table"), metadata=metadata)
    with atomic_open(target, "wb") as handle:
        handle.write(data)
    if sidecar is not None:
        atomic_write_json(f"{target}.json", json.loads(sidecar))
    return target


def load_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a table written by :func:`save_table`, its metadata in ``frame.attrs``."""
    source = Path(path)
    suffix = _suffix(source, TABLE_FORMATS, "table")
    if not source.is_file():
        raise LenskitError(f"{source} does not exist: check the path")
    if suffix == ".csv":
        frame = pd.read_csv(source, keep_default_na=False, na_values=[""])
        sidecar_path = Path(f"{source}.json")
        sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else {}
        for column in sidecar.get("json_columns", []):
            frame[column] = frame[column].map(lambda v: json.loads(v) if isinstance(v, str) else v)
        frame.attrs = dict(sidecar.get("lenskit", {}))
        return frame
    import pyarrow.parquet as pq

    arrow = pq.read_table(source)
    frame = arrow.to_pandas()
    raw = (arrow.schema.metadata or {}).get(_PARQUET_KEY)
    frame.attrs = json.loads(raw) if raw else {}
    return frame
