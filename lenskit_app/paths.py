"""The folders the app may use, the check every typed path goes through, its lens folders.

The app reads corpora and lenses and writes lenses only under its allowed folders:
``$LENSKIT_APP_DIRS`` (folders separated by ``os.pathsep``) when set, else the working
folder and lenskit's cache folder. A path is resolved first (``~``, ``..`` and every
symbolic link), so neither ``..`` nor a link inside an allowed folder leads out of it;
for a folder, every link in it is checked too. Pure Python (no Streamlit), so the rule is
tested on its own.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import lenskit
from lenskit.data import SUFFIXES
from lenskit.errors import LenskitError
from lenskit.io import cache_dir

__all__ = [
    "DIRS_ENV",
    "allowed_roots",
    "check_path",
    "corpus_path",
    "corpus_stamp",
    "describe_roots",
    "folder_name",
    "is_allowed",
    "lens_file",
    "lens_home",
    "next_lens_dir",
    "out_path",
    "saved_lenses",
]

DIRS_ENV = "LENSKIT_APP_DIRS"


def allowed_roots() -> tuple[Path, ...]:
    """The allowed folders, resolved: ``$LENSKIT_APP_DIRS``, else the working and cache folders."""
    raw = os.environ.get(DIRS_ENV, "")
    parts = [p.strip() for p in raw.split(os.pathsep) if p.strip()]
    roots = [Path(p).expanduser() for p in parts] if parts else [Path.cwd(), cache_dir()]
    resolved: list[Path] = []
    for root in roots:
        path = (Path.cwd() / root).resolve()
        if path not in resolved:
            resolved.append(path)
    return tuple(resolved)


def describe_roots(roots: Sequence[Path] | None = None) -> str:
    """The allowed folders and how to change them, for error messages."""
    roots = allowed_roots() if roots is None else roots
    return (
        f"{', '.join(str(r) for r in roots)} (set {DIRS_ENV} to other folders, separated "
        f"by '{os.pathsep}', before starting the app)"
    )


def is_allowed(path: str | os.PathLike[str], roots: Sequence[Path] | None = None) -> bool:
    """Whether ``path``, resolved, lies in one of the allowed folders."""
    roots = allowed_roots() if roots is None else roots
    resolved = (Path.cwd() / Path(path).expanduser()).resolve()
    return any(resolved == root or resolved.is_relative_to(root) for root in roots)


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
        LenskitError: For an empty path, or one that leads outside the allowed folders,
            itself or through a file inside it.
    """
    roots = allowed_roots() if roots is None else tuple(roots)
    text = str(path).strip()
    if not text:
        raise LenskitError(f"the {what} path is empty: type a path under {describe_roots(roots)}")
    if "\x00" in text:
        raise LenskitError(f"the {what} path {text!r} holds a NUL character: retype it")
    if not is_allowed(text, roots):
        raise LenskitError(
            f"the {what} path {text} is outside the folders the app may use: "
            f"choose one under {describe_roots(roots)}"
        )
    resolved = (Path.cwd() / Path(text).expanduser()).resolve()
    if resolved.is_dir():
        for inner in resolved.rglob("*"):
            if inner.is_symlink() and not is_allowed(inner, roots):
                raise LenskitError(
                    f"{inner} in the {what} folder links outside the folders the "
                    f"app may use: remove the link, or choose a folder under "
                    f"{describe_roots(roots)}"
                )
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
        for entry in home.iterdir():
            tuned = (entry / "config.json").is_file()
            jacobian = (entry.suffix == ".pt" and entry.is_file()) or (entry / "lens.pt").is_file()
            causal = (entry / "basis.json").is_file()
            if (
                (kind == "tuned" and tuned)
                or (kind == "jacobian" and jacobian)
                or (kind == "tuned-with-causal-basis" and causal)
            ):
                found.append(entry)
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
