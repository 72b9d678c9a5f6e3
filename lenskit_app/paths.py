"""The folders the app may use, the check every typed path goes through, its lens folders.

The app reads corpora and lenses and writes lenses only under its allowed folders:
``$LENSKIT_APP_DIRS`` (folders separated by ``os.pathsep``) when set, else the working
folder and lenskit's cache folder. A path is resolved first (``~``, ``..`` and every
symbolic link), so neither ``..`` nor a link inside an allowed folder leads out of it;
for a folder, every link in it is checked too. Pure Python (no Streamlit), so the rule is
tested on its own.

Every path a loaded file names goes through the same check: :func:`lens_options` checks a
lens path and, for a causal-basis folder, each layer file and the tuned lens its
``basis.json`` records; :func:`check_model` confines a model folder (the embedded and tiny
models and cached Hugging Face ids stay allowed). A refusal never says whether an outside
path exists, and a path the system cannot resolve (too long, a link loop) is refused in one
line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import lenskit
from lenskit.data import SUFFIXES
from lenskit.errors import LenskitError
from lenskit.io import cache_dir, check_path_limits
from lenskit.lenses import lens_class

__all__ = [
    "DIRS_ENV",
    "allowed_roots",
    "check_model",
    "check_path",
    "corpus_path",
    "corpus_stamp",
    "describe_roots",
    "folder_name",
    "is_allowed",
    "lens_file",
    "lens_home",
    "lens_options",
    "next_lens_dir",
    "out_path",
    "saved_lenses",
]

DIRS_ENV = "LENSKIT_APP_DIRS"


def _resolve(path: str | os.PathLike[str]) -> Path | None:
    """``path`` made absolute with every link followed; None if the system cannot resolve it."""
    try:
        return (Path.cwd() / Path(path).expanduser()).resolve()
    except (OSError, RuntimeError, ValueError):  # a link loop, a name too long, a NUL byte
        return None


def allowed_roots() -> tuple[Path, ...]:
    """The allowed folders, resolved: ``$LENSKIT_APP_DIRS``, else the working and cache folders.

    A folder that cannot be resolved (a link loop, a name too long) is left out, so it
    allows nothing.
    """
    raw = os.environ.get(DIRS_ENV, "")
    parts = [p.strip() for p in raw.split(os.pathsep) if p.strip()]
    roots = [Path(p).expanduser() for p in parts] if parts else [Path.cwd(), cache_dir()]
    resolved: list[Path] = []
    for root in roots:
        path = _resolve(root)
        if path is not None and path not in resolved:
            resolved.append(path)
    return tuple(resolved)


def describe_roots(roots: Sequence[Path] | None = None) -> str:
    """The allowed folders and how to change them, for error messages."""
    roots = allowed_roots() if roots is None else roots
    where = ", ".join(str(r) for r in roots) or f"no usable folder ({DIRS_ENV} names none)"
    return (
        f"{where} (set {DIRS_ENV} to other folders, separated "
        f"by '{os.pathsep}', before starting the app)"
    )


def is_allowed(path: str | os.PathLike[str], roots: Sequence[Path] | None = None) -> bool:
    """Whether ``path``, resolved, lies in one of the allowed folders (False if unresolvable)."""
    roots = allowed_roots() if roots is None else roots
    resolved = _resolve(path)
    return resolved is not None and _inside(resolved, roots)


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def check_path(
    path: str | os.PathLike[str],
    *,
    what: str = "path",
    roots: Sequence[Path] | None = None,
) -> Path:
    """Resolve ``path`` (relative to the working folder) and refuse it outside the allowed folders.

    Args:
        path: The path the user typed.
        what: What the path is for, named in the error (e.g. ``"corpus"``).
        roots: The allowed folders (default: :func:`allowed_roots`).

    Returns:
        The resolved path, inside an allowed folder (it need not exist).

    Raises:
        LenskitError: For an empty path, one too long for the system, one that leads
            outside the allowed folders (itself or through a link inside it), or one
            inside them that cannot be resolved (a link loop). The message for a path
            outside is the same whether it exists or not.
    """
    roots = allowed_roots() if roots is None else tuple(roots)
    text = str(path).strip()
    if not text:
        raise LenskitError(f"the {what} path is empty: type a path under {describe_roots(roots)}")
    if "\x00" in text:
        raise LenskitError(f"the {what} path {text!r} holds a NUL character: retype it")
    shown = text if len(text) <= 200 else text[:200] + "…"
    check_path_limits(text, f"the {what} path {shown}")
    resolved = _resolve(text)
    if resolved is None or not _inside(resolved, roots):
        lexical = Path(os.path.abspath(Path(text).expanduser()))
        if resolved is None and _inside(lexical, roots):
            raise LenskitError(
                f"the {what} path {shown} cannot be resolved (a link loop?): "
                "remove the loop, or choose another path"
            )
        raise LenskitError(
            f"the {what} path {shown} is outside the folders the app may use: "
            f"choose one under {describe_roots(roots)}"
        )
    try:
        inner_paths = resolved.rglob("*") if resolved.is_dir() else iter(())
        for inner in inner_paths:
            if inner.is_symlink() and not is_allowed(inner, roots):
                raise LenskitError(
                    f"{inner} in the {what} folder links outside the folders the "
                    f"app may use (or in a loop): remove the link, or choose a folder "
                    f"under {describe_roots(roots)}"
                )
    except OSError as err:
        raise LenskitError(
            f"the {what} folder {resolved} cannot be read ({err.strerror or type(err).__name__})"
            ": check its permissions, or choose another folder"
        ) from err
    return resolved


def folder_name(name: str) -> str:
    """``name`` (a model name, id or folder) as one safe folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def lens_home(name: str) -> Path:
    """Where the app saves lenses for ``name``: the cache's (else an allowed) ``lenses/<model>``."""
    roots = allowed_roots()
    base = cache_dir().resolve()
    base = base if is_allowed(base, roots) else roots[0]
    return base / "lenses" / folder_name(name)


def next_lens_dir(name: str, stem: str = "tuned") -> Path:
    """The first ``<lens_home>/<stem>-<n>`` that does not exist yet."""
    home, n = lens_home(name), 1
    while (home / f"{stem}-{n}").exists():
        n += 1
    return home / f"{stem}-{n}"


def saved_lenses(name: str, kind: str) -> list[str]:
    """Saved lenses of ``kind`` for ``name`` in the allowed folders' ``lenses/<model>/``.

    Tuned lenses are folders with ``config.json``; J-lenses are ``*.pt`` files or folders
    with ``lens.pt``; causal bases (``tuned-with-causal-basis``) are folders with
    ``basis.json``. Newest first.
    """
    found: list[Path] = []
    homes = {lens_home(name), *(root / "lenses" / folder_name(name) for root in allowed_roots())}
    for home in homes:
        if not home.is_dir():
            continue
        found.extend(entry for entry in home.iterdir() if lens_class(kind).is_saved_lens(entry))
    found = [p for p in found if is_allowed(p)]
    found.sort(key=lambda p: (-p.stat().st_mtime, str(p)))
    return [str(p) for p in found]


def lens_file(text: str) -> str:
    """A typed lens path, checked to lie in the allowed folders (resolved)."""
    return str(check_path(text, what="lens"))


def corpus_path(text: str) -> str:
    """A typed corpus path, checked to lie in the allowed folders and to exist (resolved)."""
    path = check_path(text, what="corpus")
    if not path.exists():
        raise LenskitError(
            f"no file or folder at {path}: check the path (relative paths start at {Path.cwd()})"
        )
    return str(path)


def out_path(text: str) -> Path:
    """A typed output folder: in the allowed folders, not a file, not in the lenskit package."""
    path = check_path(text, what="output")
    if path.exists() and not path.is_dir():
        raise LenskitError(f"{path} is a file: give a folder for the lens")
    package = Path(lenskit.__file__).resolve().parent
    if path == package or package in path.parents:
        raise LenskitError(
            f"{path} is inside the lenskit package, whose shipped lenses must "
            "stay as they are: choose a folder outside it"
        )
    return path


def corpus_stamp(source: str | None) -> tuple[int, int, int]:
    """(files, bytes, newest mtime) of a corpus path: part of the cache key of its results."""
    if source is None:
        return (0, 0, 0)
    path = Path(source)
    files = (
        [p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file()]
        if path.is_dir()
        else [path]
        if path.is_file()
        else []
    )
    stats = [p.stat() for p in files]
    return (
        len(stats),
        sum(s.st_size for s in stats),
        max((s.st_mtime_ns for s in stats), default=0),
    )


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def _cached_hub_id(name: str) -> bool:
    """Whether ``name`` is a Hugging Face id whose config is in the local cache."""
    if not _HUB_ID.fullmatch(name) or ".." in name:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # a malformed id, no hub package: not a cached id
        return False


def check_model(name: str, roots: Sequence[Path] | None = None) -> str:
    """A model the app may load: a built-in name, a cached hub id or a folder inside the roots.

    Args:
        name: The model name, Hugging Face id or folder the user typed.
        roots: The allowed folders (default: :func:`allowed_roots`).

    Returns:
        ``name``, stripped.

    Raises:
        LenskitError: For a folder outside the allowed folders (the same message whether it
            exists or not) or a hub id that is not in the local cache.
    """
    from lenskit.models import model_names

    roots = allowed_roots() if roots is None else tuple(roots)
    text = str(name).strip()
    if text in model_names():
        return text
    check_path_limits(text, f"the model {text[:200]}")
    if _cached_hub_id(text):
        local = _resolve(text)
        # lenskit loads a local folder of that name first: it must lie inside too
        if local is None or _inside(local, roots) or not local.exists():
            return text
    elif _HUB_ID.fullmatch(text) and ".." not in text:
        local = _resolve(text)
        inside = local is not None and _inside(local, roots)
        if not (inside and local.exists()):  # only a folder inside is looked for
            raise LenskitError(
                f"model {text!r} is not built in, not in the local Hugging Face cache and "
                f"not a folder under {describe_roots(roots)}: choose one of "
                f"{', '.join(model_names())}, a cached id or a folder there"
            )
    check_path(text, what="model", roots=roots)
    return text


def lens_options(
    kind: str, path: str | None, roots: Sequence[Path] | None = None
) -> dict[str, str]:
    """The options to load a lens of ``kind`` from ``path``, every path they name checked.

    The lens path is checked as a typed path. A causal-basis folder names more paths in
    its ``basis.json``: each layer's file (a plain name, checked again here) and the tuned
    lens it was extracted with, which is checked and passed on as ``tuned=``, so nothing
    outside the allowed folders is read.

    Returns:
        ``{}`` for the kind's default (``path`` None or empty), else ``{"path": ...}`` and,
        for a causal basis recording a tuned lens folder, ``{"tuned": ...}``.

    Raises:
        LenskitError: For any path outside the allowed folders, or an invalid index.
    """
    if not path:
        return {}
    if kind == "tuned" and path == "hub":  # the published lens, from the Hugging Face cache
        return {"path": "hub"}
    from lenskit.lenses.basis_index import INDEX_FILE, read_index

    roots = allowed_roots() if roots is None else tuple(roots)
    checked = check_path(path, what=f"{kind} lens", roots=roots)
    options = {"path": str(checked)}
    if kind != "tuned-with-causal-basis" or not (checked / INDEX_FILE).is_file():
        return options
    index = read_index(checked)
    for layer, record in index.layers.items():
        check_path(checked / record.file, what=f"layer {layer} file of {INDEX_FILE}", roots=roots)
    if index.lens.path is not None and not index.lens.shipped:
        what = f"tuned lens named in {checked / INDEX_FILE}"
        options["tuned"] = str(check_path(index.lens.path, what=what, roots=roots))
    return options
