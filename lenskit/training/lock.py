"""One training run per output folder: a lock that a crashed run does not leave held.

:class:`FolderLock` holds an ``fcntl`` lock on ``<out>/.lenskit-train.lock`` for the
whole run; the operating system drops it when the process ends, however it ends, so a
crash never leaves a folder locked. The file records the holder's pid and host for the
refusal message. While it holds the lock a run also removes the temporary files that
killed writers left in the folder (``.<name>.*.tmp``, see :mod:`lenskit.io`): no other
writer can be at work there.

Example:
    >>> import tempfile
    >>> out = tempfile.mkdtemp()
    >>> with FolderLock(out):
    ...     holder(out) is not None
    True
    >>> holder(out) is None
    True
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any

from lenskit.errors import LenskitError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "FolderLock", "holder", "remove_stale_temp_files"]

LOCK_FILE = ".lenskit-train.lock"


def _describe(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").split()
    except OSError:
        return "another process"
    return f"pid {text[0]} on {text[1]}" if len(text) >= 2 else "another process"


def holder(out: str | os.PathLike[str]) -> str | None:
    """Who holds ``out``'s training lock (``"pid N on HOST"``), or None if nobody does."""
    path = Path(out).expanduser() / LOCK_FILE
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _describe(path)
    finally:
        os.close(fd)
    return None


def remove_stale_temp_files(out: Path) -> list[Path]:
    """Remove the atomic writers' temporary files in ``out`` (call only under the lock)."""
    removed = []
    for path in out.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed


class FolderLock:
    """Hold ``out``'s training lock for a ``with`` block (a no-op where ``active`` is False).

    Raises:
        LenskitError: On entry, if another run (in any process or thread) holds it.
    """

    def __init__(self, out: str | os.PathLike[str], *, active: bool = True) -> None:
        self.out, self.active, self.fd = Path(out).expanduser(), active, -1

    def __enter__(self) -> FolderLock:
        if not self.active or fcntl is None:
            return self
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise LenskitError(
                f"{self.out} is in use by another training run ({_describe(path)}): wait "
                "for it to end, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self.fd = fd
        remove_stale_temp_files(self.out)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            (self.out / LOCK_FILE).unlink()  # still held: nobody else can be using it
        os.close(self.fd)  # releases the lock
        self.fd = -1
