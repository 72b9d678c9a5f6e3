"""Tuned-lens folders: where they are, and reading them with every field checked.

A folder holds ``config.json`` (:class:`~lenskit.lenses.tuned_config.TunedLensConfig`)
and ``params.pt`` (or ``params.safetensors``), the translators' state dict, read with
``weights_only=True``. A missing, mismatched, truncated or corrupt file is refused in
one line that names the fix. :class:`~lenskit.lenses.tuned.TunedLens` reads and writes
these folders.

Example:
    >>> import tempfile
    >>> import lenskit
    >>> from lenskit.lenses.tuned import TunedLens
    >>> from lenskit.lenses.tuned_files import CONFIG_FILE, PARAMS_PT
    >>> folder = TunedLens.untrained(lenskit.load_model("tiny-llama")).save(tempfile.mkdtemp())
    >>> sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_FILE, PARAMS_PT])
    True
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lenskit import models
from lenskit.errors import LenskitError
from lenskit.lenses.tuned_config import TunedLensConfig
from lenskit.models import DEFAULT_MODEL, ModelAdapter

__all__ = ["CONFIG_FILE", "PARAMS_PT", "PARAMS_SAFETENSORS", "shipped_lens_dir"]

CONFIG_FILE = "config.json"
PARAMS_PT = "params.pt"
PARAMS_SAFETENSORS = "params.safetensors"
_SHIPPED = {DEFAULT_MODEL: "smollm2-135m"}  # model name -> folder under assets/tuned/


def shipped_lens_dir(model_name: str) -> Path | None:
    """Folder of the tuned lens shipped inside lenskit for ``model_name``, if there is one."""
    if model_name not in _SHIPPED:
        return None
    return Path(str(resources.files("lenskit"))) / "assets" / "tuned" / _SHIPPED[model_name]


def _train_hint(name: str) -> str:
    return f"train one with `lenskit train --model {name} --out DIR` and pass path=DIR"


def _unembed_hash(adapter: ModelAdapter) -> str:
    """The tuned-lens package's fingerprint of the model's unembedding (see lenses.hub)."""
    from lenskit.lenses.hub import unembed_hash

    return unembed_hash(adapter.W_U)


def _config_points(extra: dict[str, Any], folder: Path) -> tuple[str, ...]:
    """The row points a lens folder records (block inputs only where it records none)."""
    points = extra.get("points", ["resid_pre"])
    if (
        not isinstance(points, list)
        or "resid_pre" not in points
        or not set(points) <= {"resid_pre", "resid_mid"}
    ):
        raise LenskitError(
            f"{folder / CONFIG_FILE} records points {points!r}: it must list resid_pre and "
            "optionally resid_mid; retrain the lens"
        )
    return tuple(points)


def _base_model_name(adapter: ModelAdapter) -> str:
    """The model's hub id where known (a local folder's path would mean nothing elsewhere)."""
    if adapter.name == DEFAULT_MODEL:
        return models._EMBEDDED_REPO
    name = str(getattr(adapter.model.cfg, "model_name", None) or adapter.name)
    return adapter.name if Path(name).is_absolute() else name


def _read_config(folder: Path) -> TunedLensConfig:
    if not folder.is_dir():
        raise LenskitError(
            f"no tuned lens folder at {folder}: check the path, or {_train_hint('MODEL')}"
        )
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise LenskitError(
            f"{folder} has no {CONFIG_FILE}: give a folder written by "
            "`lenskit train` or the tuned-lens package"
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise LenskitError(
            f"{file} is unreadable or not JSON ({type(err).__name__}): "
            "copy the lens again or retrain it"
        ) from err
    try:
        return TunedLensConfig.from_dict(data)
    except LenskitError as err:
        raise LenskitError(
            f"{file} is not a valid tuned-lens config ({err}): give a tuned-lens config.json, "
            "or copy the lens again"
        ) from err


def _check_fits(config: TunedLensConfig, adapter: ModelAdapter, folder: Path) -> None:
    ours = {"d_model": adapter.d_model, "layers": adapter.n_layers, "d_vocab": adapter.d_vocab}
    theirs = {
        "d_model": config.d_model,
        "layers": config.num_hidden_layers,
        "d_vocab": config.lenskit.d_vocab if config.lenskit is not None else None,
    }
    for key, value in theirs.items():
        if value is not None and value != ours[key]:
            what = f"{value} layers" if key == "layers" else f"{key} {value}"
            have = f"{ours[key]} layers" if key == "layers" else f"{ours[key]}"
            raise LenskitError(
                f"lens in {folder} was trained for a model with {what}, this model "
                f"({adapter.name}) has {have}: use a lens trained for this model"
            )


def _load_state(folder: Path) -> tuple[Path, Any]:
    pt, st = folder / PARAMS_PT, folder / PARAMS_SAFETENSORS
    file = pt if pt.is_file() else st
    if not file.is_file():
        raise LenskitError(
            f"{folder} has no {PARAMS_PT} or {PARAMS_SAFETENSORS}: copy the "
            "lens again or retrain it"
        )
    try:
        if file is st:
            from safetensors.torch import load_file

            return file, load_file(file, device="cpu")
        return file, torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zips, bad pickles, bad headers: all one message
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise LenskitError(
            f"{file} is truncated or corrupt ({first}): copy the lens again or retrain it"
        ) from err


def _read_params(
    folder: Path, n_layers: int, d_model: int, bias: bool, prefixes: tuple[str, ...] = ("",)
) -> dict[str, Tensor]:
    file, state = _load_state(folder)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise LenskitError(f"{file} is not a state dict of tensors: give a tuned-lens params file")
    state = {str(k): v for k, v in state.items()}
    shapes = {f"{p}{i}.weight": (d_model, d_model) for p in prefixes for i in range(n_layers)}
    shapes |= {f"{p}{i}.bias": (d_model,) for p in prefixes for i in range(n_layers)}
    if not bias:  # a lens saved without biases reads as zero biases
        state |= {k: torch.zeros(s) for k, s in shapes.items() if k.endswith(".bias")}
    missing = [k for k in shapes if k not in state]
    unexpected = [k for k in state if k not in shapes]
    if missing or unexpected:
        which = (
            f"lacks {', '.join(missing[:3])}"
            if missing
            else f"has unexpected {', '.join(unexpected[:3])}"
        )
        more = len(missing or unexpected) - 3
        raise LenskitError(
            f"{file} {which}{f' (+{more} more)' if more > 0 else ''}: it must "
            f"hold 0.weight, 0.bias, ... for {n_layers} layers; retrain the lens"
        )
    for key, shape in shapes.items():
        value = state[key]
        if tuple(value.shape) != shape or not value.is_floating_point():
            raise LenskitError(
                f"{key} in {file} is {value.dtype} {tuple(value.shape)}, not float "
                f"{shape}: use a lens trained for this model"
            )
        if not bool(torch.isfinite(value).all()):
            raise LenskitError(f"{key} in {file} holds NaN or inf: retrain the lens")
    return state
