"""Training checkpoints: what an output folder holds, and whether a run may resume there.

A run writes ``checkpoint.pt`` (see :mod:`lenskit.training`) until it finishes and saves
the lens. A resume must use the settings the checkpoint was made with, except those that
leave the lens unchanged (``checkpoint_every`` and ``device``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lenskit.errors import LenskitError
from lenskit.lenses.tuned import CONFIG_FILE
from lenskit.training.config import TrainConfig

__all__ = ["CHECKPOINT_FILE", "check_out", "checkpoint_config"]

CHECKPOINT_FILE = "checkpoint.pt"
_RESUMABLE = ("checkpoint_every", "device")  # fields a resume may change: they leave the lens be


def _load_checkpoint(file: Path) -> tuple[dict[str, Any], TrainConfig]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        return state, TrainConfig.from_dict(state["config"])
    except Exception as err:
        raise LenskitError(
            f"{file} is corrupt ({type(err).__name__}): delete it to start over"
        ) from err


def checkpoint_config(out_dir: str | os.PathLike[str]) -> TrainConfig | None:
    """The settings of the unfinished run in ``out_dir`` (None: it holds no checkpoint).

    Raises:
        LenskitError: For a corrupt checkpoint.
    """
    file = Path(out_dir).expanduser() / CHECKPOINT_FILE
    return _load_checkpoint(file)[1] if file.is_file() else None


def _read_checkpoint(out: Path, config: TrainConfig) -> dict[str, Any] | None:
    """The checkpoint to resume from (None to start afresh), after checking the settings."""
    file = out / CHECKPOINT_FILE
    if not file.is_file():
        if (out / CONFIG_FILE).is_file():
            raise LenskitError(f"training in {out} already finished: choose another --out")
        return None
    state, old_config = _load_checkpoint(file)
    old = old_config.to_dict()
    for key, value in config.to_dict().items():
        if key not in _RESUMABLE and old[key] != value:
            raise LenskitError(
                f"the checkpoint in {out} was made with {key}={old[key]!r}, not "
                f"{value!r}: resume with the same settings or choose another "
                "--out"
            )
    return state


def check_out(out: Path, resume: bool, config: TrainConfig) -> dict[str, Any] | None:
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
