"""Training checkpoints: what an output folder holds, and whether a run may resume there.

A run writes ``checkpoint.pt`` (a :class:`~lenskit.training.state.RunState`) until it
finishes and saves the lens. A resume must use the settings the checkpoint was made with,
except those that leave the lens unchanged (``checkpoint_every``, ``device``,
``precision`` and ``report``). :func:`unfinished_runs` lists the runs a folder tree holds.

Example:
    >>> import tempfile
    >>> unfinished_runs([tempfile.mkdtemp()])
    []
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from lenskit.errors import LenskitError
from lenskit.io import atomic_torch_save
from lenskit.lenses.tuned import CONFIG_FILE
from lenskit.training.config import TrainConfig
from lenskit.training.lock import LOCK_FILE, holder
from lenskit.training.state import RunState

__all__ = [
    "CHECKPOINT_FILE",
    "UnfinishedRun",
    "check_out",
    "checkpoint_config",
    "delete_unfinished",
    "load_checkpoint",
    "save_checkpoint",
    "unfinished_runs",
]

CHECKPOINT_FILE = "checkpoint.pt"
_RESUMABLE = ("checkpoint_every", "device", "precision", "report")  # leave the lens be


def load_checkpoint(out: str | os.PathLike[str]) -> RunState:
    """The run state in ``out``'s checkpoint.

    Raises:
        LenskitError: For a missing or corrupt checkpoint.
    """
    file = Path(out).expanduser() / CHECKPOINT_FILE
    try:
        return RunState.from_dict(torch.load(file, map_location="cpu", weights_only=True))
    except FileNotFoundError:
        raise LenskitError(f"{file.parent} holds no {CHECKPOINT_FILE}: nothing to resume") from None
    except Exception as err:
        raise LenskitError(
            f"{file} is corrupt ({type(err).__name__}): delete it to start over"
        ) from err


def save_checkpoint(state: RunState, out: Path) -> None:
    """Write ``state`` to ``out``'s checkpoint atomically."""
    atomic_torch_save(state.to_dict(), out / CHECKPOINT_FILE)


def checkpoint_config(out_dir: str | os.PathLike[str]) -> TrainConfig | None:
    """The settings of the unfinished run in ``out_dir`` (None: it holds no checkpoint).

    Raises:
        LenskitError: For a corrupt checkpoint.
    """
    file = Path(out_dir).expanduser() / CHECKPOINT_FILE
    return load_checkpoint(out_dir).config if file.is_file() else None


def _read_checkpoint(out: Path, config: TrainConfig) -> RunState | None:
    """The checkpoint to resume from (None to start afresh), after checking the settings."""
    if not (out / CHECKPOINT_FILE).is_file():
        if (out / CONFIG_FILE).is_file():
            raise LenskitError(f"training in {out} already finished: choose another --out")
        return None
    state = load_checkpoint(out)
    old = state.config.to_dict()
    for key, value in config.to_dict().items():
        if key not in _RESUMABLE and old[key] != value:
            raise LenskitError(
                f"the checkpoint in {out} was made with {key}={old[key]!r}, not "
                f"{value!r}: resume with the same settings or choose another "
                "--out"
            )
    return state


def check_out(out: Path, resume: bool, config: TrainConfig) -> RunState | None:
    """The checkpoint to resume from in ``out`` (None: start afresh), or a one-line refusal.

    Raises:
        LenskitError: If ``out`` holds a finished lens, an unfinished run without
            ``resume``, a corrupt checkpoint, or one made with other settings.
    """
    if resume:
        return _read_checkpoint(out, config)
    if (out / CHECKPOINT_FILE).is_file():
        raise LenskitError(
            f"{out} holds an unfinished training run: pass --resume to continue "
            "it or choose another --out"
        )
    if (out / CONFIG_FILE).is_file():
        raise LenskitError(f"{out} already holds a lens: choose another --out")
    return None


@dataclass(frozen=True)
class UnfinishedRun:
    """A folder with a training checkpoint and no finished lens.

    Attributes:
        path: The folder.
        config: The run's settings (None if the checkpoint cannot be read).
        mtime: When the checkpoint was written (seconds since the epoch).
        in_use: Who is training there now (``"pid N on HOST"``), or None.
    """

    path: Path
    config: TrainConfig | None
    mtime: float
    in_use: str | None


def unfinished_runs(folders: Iterable[str | os.PathLike[str]]) -> list[UnfinishedRun]:
    """Unfinished runs in ``folders`` and their subfolders (one level down), newest first."""
    found: dict[Path, UnfinishedRun] = {}
    for folder in folders:
        base = Path(folder).expanduser()
        if not base.is_dir():
            continue
        for file in [base / CHECKPOINT_FILE, *base.glob(f"*/{CHECKPOINT_FILE}")]:
            path = file.parent.resolve()
            if path in found or not file.is_file() or (path / CONFIG_FILE).is_file():
                continue
            try:
                config: TrainConfig | None = load_checkpoint(path).config
            except LenskitError:
                config = None
            found[path] = UnfinishedRun(path, config, file.stat().st_mtime, holder(path))
    return sorted(found.values(), key=lambda r: (-r.mtime, str(r.path)))


def delete_unfinished(out: str | os.PathLike[str]) -> None:
    """Delete an unfinished run's checkpoint (and the folder, if nothing else is left).

    Raises:
        LenskitError: If a run is training there now, or the folder holds a finished lens.
    """
    path = Path(out).expanduser()
    who = holder(path)
    if who is not None:
        raise LenskitError(f"{path} is in use by a training run ({who}): stop it first")
    if (path / CONFIG_FILE).is_file():
        raise LenskitError(f"{path} holds a finished lens: delete it by hand if you mean to")
    (path / CHECKPOINT_FILE).unlink(missing_ok=True)
    leftovers = [p for p in path.iterdir() if p.name != LOCK_FILE and not p.name.endswith(".tmp")]
    if not leftovers:
        shutil.rmtree(path, ignore_errors=True)
