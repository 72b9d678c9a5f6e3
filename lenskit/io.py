"""Files: the cache folder, atomic writes and the checks on a path before any work.

A write goes to a temporary file in the target's folder and is renamed over the
target, so a crash or Ctrl-C never leaves a half-written file behind.
:func:`check_path_limits` refuses a path the operating system would refuse (a name or a
path too long, a NUL byte) and :func:`check_output` an output that could not be written,
each in one line, so that a command fails before it computes anything.

>>> check_output("results/run.json", "--json", kind="file").name
'run.json'
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

from lenskit.errors import LenskitError

__all__ = [
    "atomic_open",
    "atomic_torch_save",
    "atomic_write_json",
    "atomic_write_text",
    "cache_dir",
    "check_output",
    "check_path_limits",
    "os_error_message",
    "remove_dead_writers_files",
]

CACHE_ENV = "LENSKIT_CACHE"


def cache_dir() -> Path:
    """Return lenskit's cache folder (``$LENSKIT_CACHE`` or ``~/.cache/lenskit``), creating it."""
    root = os.environ.get(CACHE_ENV) or os.path.join(Path.home(), ".cache", "lenskit")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` and rename it over ``path`` on success.

    Args:
        path: The final file.
        mode: ``"w"`` for text or ``"wb"`` for bytes.

    Yields:
        The open temporary file; on an exception it is removed and ``path`` is untouched.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_writers_files(target)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent
    )
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, owned by someone else
    return True


def remove_dead_writers_files(path: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary files beside ``path`` left by writers of it that were killed.

    :func:`atomic_open` names its temporary file ``.NAME.PID.XXXX.tmp``; one whose process
    no longer runs on this machine is a leftover (a write in progress keeps its own).

    Returns:
        The files removed.
    """
    target = Path(path)
    removed = []
    for tmp in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        pid = tmp.name[len(target.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically."""
    import torch  # here, not at the top: the command line starts without torch

    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)


def _limit(name: str, default: int) -> int:
    try:
        return int(os.pathconf("/", name))
    except (OSError, ValueError, AttributeError):
        return default


NAME_MAX = _limit("PC_NAME_MAX", 255)
PATH_MAX = _limit("PC_PATH_MAX", 4096)


def check_path_limits(path: str | os.PathLike[str], what: str = "path") -> str:
    """Refuse, in one line, a path the operating system cannot open.

    Args:
        path: The path as given.
        what: What it is for, named in the error (e.g. ``"--out"``).

    Returns:
        ``path`` as text.

    Raises:
        LenskitError: For a NUL byte, a name longer than the system's name limit or a path
            longer than its path limit (each counted in bytes).
    """
    text = os.fspath(path)
    if "\x00" in text:
        raise LenskitError(f"{what} holds a NUL character: retype the path")
    longest = max((len(os.fsencode(part)) for part in text.split(os.sep)), default=0)
    if longest > NAME_MAX:
        raise LenskitError(
            f"{what} has a name of {longest} bytes, over the system's limit of {NAME_MAX}: "
            "give a shorter path"
        )
    expanded = os.path.expanduser(text)
    if len(os.fsencode(expanded)) >= PATH_MAX:
        raise LenskitError(
            f"{what} is {len(os.fsencode(expanded))} bytes long, over the system's limit "
            f"of {PATH_MAX - 1}: give a shorter path"
        )
    return text


def os_error_message(err: OSError, path: str | os.PathLike[str], what: str) -> str:
    """One line for an ``OSError`` met at ``path``: the reason and the fix."""
    reason = err.strerror or type(err).__name__
    if err.errno == errno.ENAMETOOLONG:
        return f"{what} {os.fspath(path)[:80]}… is too long for the system: give a shorter path"
    return f"cannot use {what} {os.fspath(path)} ({reason}): check the path"


def check_output(
    path: str | os.PathLike[str],
    what: str,
    *,
    kind: Literal["file", "folder", "any"] = "file",
) -> Path:
    """Check that an output can be written, before any work (nothing is created).

    Args:
        path: The output file or folder (``~`` is expanded).
        what: What it is for, named in the error (e.g. ``"--json"``).
        kind: ``"file"`` (a folder is refused), ``"folder"`` (a file is refused) or
            ``"any"``.

    Returns:
        The path, ``~`` expanded.

    Raises:
        LenskitError: For a path too long, a file where a folder is needed (or the other
            way round), a file on the way to it, or a place this process cannot write.
    """
    target = Path(check_path_limits(path, what)).expanduser()
    try:
        if kind == "file" and target.is_dir():
            raise LenskitError(f"{what} {target} is a folder: give a file name")
        if kind == "folder" and target.exists() and not target.is_dir():
            raise LenskitError(f"{what} {target} is a file: give a folder")
        places = [target] if target.is_dir() else []
        base = target.absolute().parent
        while not os.path.lexists(base) and base != base.parent:
            base = base.parent
        if not base.is_dir():
            raise LenskitError(
                f"{what} {target} cannot be created: {base} is not a folder; choose another place"
            )
        places.append(base)
        for place in places:
            if not os.access(place, os.W_OK | os.X_OK):
                raise LenskitError(
                    f"{what} {target} cannot be written: no permission to write in {place} "
                    "(or it is read-only); choose another place"
                )
    except OSError as err:  # a link loop, a name the system refuses
        raise LenskitError(os_error_message(err, target, what)) from err
    return target
