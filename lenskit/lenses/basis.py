"""Causal bases: the residual directions of a layer that matter most to a lens's output.

A :class:`CausalBasis` holds, for one lens row ``layer`` (the input of block ``layer``),
``k`` orthonormal directions of the residual stream sorted by their influence on a lens
(decreasing), the mean residual they are ablated around, and the data and settings that
found them. :mod:`lenskit.causal.extraction` finds them and :mod:`lenskit.causal.influence`
measures them.

Files: a basis folder holds one ``layer_{L}.safetensors`` per layer (``basis`` [k, d_model],
``mean`` [d_model], ``lens_influence``, ``train_influence`` and, where measured,
``model_influence`` [k]) and ``basis.json``, the index: the model, the lens the directions
were extracted with, and per layer its file, settings and influences (read into typed
records and checked by :mod:`lenskit.lenses.basis_index`). Saving a layer adds it to the
folder (or replaces it); a folder never mixes models or lenses. Files are written
atomically, the layer file before the index. A layer's file is a plain name inside the
folder: an index naming a file elsewhere is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from lenskit.errors import LenskitError
from lenskit.io import atomic_open, atomic_write_json
from lenskit.lenses.basis_index import (
    FORMAT,
    INDEX_FILE,
    VERSION,
    BasisIndex,
    LayerRecord,
    LensRecord,
    ModelShape,
    read_index,
)

__all__ = [
    "FORMAT",
    "INDEX_FILE",
    "VERSION",
    "BasisIndex",
    "CausalBasis",
    "layer_file",
    "load_bases",
    "rank_correlation",
    "read_index",
    "shipped_basis_dir",
]

ORTHONORMAL_TOL = 1e-4
_SHIPPED = {"smollm2-135m": "smollm2-135m"}  # model name -> folder under assets/causal_basis/
_TENSORS = ("basis", "mean", "lens_influence", "train_influence", "model_influence")


def shipped_basis_dir(model_name: str) -> Path | None:
    """Folder of the causal basis shipped inside lenskit for ``model_name``, if there is one."""
    if model_name not in _SHIPPED:
        return None
    return Path(str(resources.files("lenskit"))) / "assets" / "causal_basis" / _SHIPPED[model_name]


def layer_file(layer: int) -> str:
    """File name of one layer's basis inside a basis folder."""
    return f"layer_{layer}.safetensors"


def _ranks(values: Tensor) -> Tensor:
    """1-based ranks, ties sharing their average rank."""
    order = values.argsort(stable=True)
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(1, len(values) + 1, dtype=values.dtype)
    for value in values.unique():
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def rank_correlation(a: Float[Tensor, " k"], b: Float[Tensor, " k"]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the (average-tie) ranks.

    Returns:
        A value in [-1, 1]; NaN for fewer than two values or where either side is constant.
    """
    if a.shape != b.shape:
        raise ValueError(
            f"rank_correlation needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.numel() < 2:
        return math.nan
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float((ra.square().sum() * rb.square().sum()).sqrt())
    return float((ra * rb).sum()) / denom if denom > 0 else math.nan


def _vector(values: Any, name: str) -> Tensor:
    tensor = torch.as_tensor(values).detach().to("cpu", torch.float32).clone()
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} holds NaN or inf")
    return tensor


@dataclass(frozen=True)
class CausalBasis:
    """``k`` orthonormal residual directions of one layer, most influential first.

    Influences are mean KL divergences in bits per token between an output and the same
    output with the direction ablated (see :mod:`lenskit.causal.influence`).

    Attributes:
        layer: The lens row (block input) the directions live in.
        basis: The directions, one unit row each, orthonormal.
        mean: The mean residual of the training tokens (the centre of mean ablation and of
            the ``tuned-with-causal-basis`` projection).
        lens_influence: Each direction's influence on the lens's output over held-out
            tokens, in decreasing order (the rows are sorted by it).
        train_influence: The extraction objective at convergence: the same influence over the
            training tokens, measured when the direction was found.
        model_influence: Each direction's influence on the model's output when ablated in the
            model's own residual stream (held-out tokens), or None if not measured.
        found_at: The greedy step (0-based) at which each direction was found; the sorted
            order can differ from the greedy one.
        iterations: Optimizer iterations each direction took.
        converged: Whether each direction met the convergence test before ``max_iter``.
        settings: Model, lens, data, token counts, seed, ablation and optimizer settings
            (JSON data; a copy is kept).
    """

    layer: int
    basis: Float[Tensor, "k d_model"]
    mean: Float[Tensor, " d_model"]
    lens_influence: Float[Tensor, " k"]
    train_influence: Float[Tensor, " k"]
    model_influence: Float[Tensor, " k"] | None = None
    found_at: tuple[int, ...] = ()
    iterations: tuple[int, ...] = ()
    converged: tuple[bool, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer must be an integer >= 0, got {self.layer!r}")
        basis = _vector(self.basis, "basis")
        if basis.ndim != 2 or basis.shape[0] < 1 or basis.shape[0] > basis.shape[1]:
            raise ValueError(
                f"basis must be [k, d_model] with 1 <= k <= d_model, got {tuple(basis.shape)}"
            )
        k, d = basis.shape
        gram = basis.double() @ basis.double().T
        error = float((gram - torch.eye(k, dtype=torch.float64)).abs().max())
        if error > ORTHONORMAL_TOL:
            raise ValueError(f"basis rows are not orthonormal (max |V V^T - I| = {error:.2e})")
        values = {"basis": basis, "mean": _vector(self.mean, "mean")}
        if tuple(values["mean"].shape) != (d,):
            raise ValueError(f"mean must have shape ({d},), got {tuple(values['mean'].shape)}")
        for name in ("lens_influence", "train_influence", "model_influence"):
            value = getattr(self, name)
            if value is None:
                values[name] = None
                continue
            values[name] = _vector(value, name)
            if tuple(values[name].shape) != (k,):
                raise ValueError(f"{name} must have shape ({k},), got {tuple(values[name].shape)}")
        if bool((values["lens_influence"][1:] > values["lens_influence"][:-1]).any()):
            raise ValueError("lens_influence must be in decreasing order: sort the directions")
        meta = {
            "found_at": tuple(int(i) for i in self.found_at) or tuple(range(k)),
            "iterations": tuple(int(i) for i in self.iterations) or (0,) * k,
            "converged": tuple(bool(c) for c in self.converged) or (True,) * k,
        }
        for name, value in meta.items():
            if len(value) != k:
                raise ValueError(f"{name} must have {k} entries, got {len(value)}")
        try:
            settings = json.loads(json.dumps(dict(self.settings), allow_nan=True))
        except (TypeError, ValueError) as err:
            raise ValueError(f"settings must be JSON data ({err})") from err
        for name, value in {**values, **meta, "settings": settings}.items():
            object.__setattr__(self, name, value)

    @property
    def k(self) -> int:
        """Number of directions."""
        return int(self.basis.shape[0])

    @property
    def d_model(self) -> int:
        """Residual width."""
        return int(self.basis.shape[1])

    @property
    def spearman(self) -> float:
        """Rank correlation of lens and model influence (NaN without model influence)."""
        if self.model_influence is None:
            return math.nan
        return rank_correlation(self.lens_influence, self.model_influence)

    def top(self, k: int) -> CausalBasis:
        """The first ``k`` directions (the most influential on the lens)."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.k:
            raise LenskitError(
                f"k must be in 1..{self.k} for the basis of layer {self.layer}, "
                f"got {k!r}: pass a smaller k"
            )
        cut = {
            name: getattr(self, name)[:k]
            for name in (
                "basis",
                "lens_influence",
                "train_influence",
                "found_at",
                "iterations",
                "converged",
            )
        }
        if self.model_influence is not None:
            cut["model_influence"] = self.model_influence[:k]
        return replace(self, **cut)

    def to_frame(self) -> pd.DataFrame:
        """One row per direction (1 = most influential on the lens), influences in bits."""
        model = (
            self.model_influence.tolist()
            if self.model_influence is not None
            else [math.nan] * self.k
        )
        frame = pd.DataFrame(
            {
                "layer": self.layer,
                "direction": range(1, self.k + 1),
                "lens_influence_bits": self.lens_influence.tolist(),
                "model_influence_bits": model,
                "train_influence_bits": self.train_influence.tolist(),
                "found_at": [i + 1 for i in self.found_at],
                "iterations": list(self.iterations),
                "converged": list(self.converged),
            }
        )
        frame.attrs.update(
            spearman=self.spearman,
            **{key: self.settings.get(key) for key in ("model", "ablation", "data")},
        )
        return frame

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON data (tensors as nested lists)."""
        out: dict[str, Any] = {"layer": self.layer}
        for name in _TENSORS:
            value = getattr(self, name)
            out[name] = None if value is None else value.tolist()
        out |= {
            "found_at": list(self.found_at),
            "iterations": list(self.iterations),
            "converged": list(self.converged),
            "spearman": _json_float(self.spearman),
            "settings": json.loads(json.dumps(self.settings)),
        }
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CausalBasis:
        """Rebuild a basis written by :meth:`to_dict`."""
        values = {
            name: None if data.get(name) is None else torch.tensor(data[name]) for name in _TENSORS
        }
        return cls(
            layer=int(data["layer"]),
            **values,
            found_at=tuple(data["found_at"]),
            iterations=tuple(data["iterations"]),
            converged=tuple(data["converged"]),
            settings=dict(data.get("settings") or {}),
        )

    def save(self, folder: str | Path) -> Path:
        """Add this layer to a basis folder (replacing an earlier basis of the same layer).

        ``settings`` must hold ``model`` (the model's name and shape, see
        :mod:`lenskit.causal.extraction`) and ``lens``; a folder holding layers of another
        model or lens is refused.

        Returns:
            The layer's file.

        Raises:
            LenskitError: If the folder belongs to another model or lens, or is unreadable.
        """
        target = Path(folder).expanduser()
        if target.exists() and not target.is_dir():
            raise LenskitError(f"{target} is a file: give a folder for the basis")
        owner = {key: self.settings.get(key) for key in ("model", "model_shape", "lens")}
        if owner["model"] is None or owner["lens"] is None:
            raise LenskitError(
                "the basis's settings lack its model or lens: extract it with "
                "lenskit.causal.extraction.extract_causal_basis"
            )
        shape = owner["model_shape"]
        mine = BasisIndex(
            model=owner["model"],
            lens=LensRecord.from_dict(owner["lens"]),
            model_shape=None if shape is None else ModelShape.from_dict(shape),
        )
        index = read_index(target) if (target / INDEX_FILE).is_file() else mine
        for key in ("model", "model_shape", "lens"):
            theirs, ours = getattr(index, key), getattr(mine, key)
            if theirs != ours:
                raise LenskitError(
                    f"{target} holds causal bases for {key} {_plain(theirs)!r}, not "
                    f"{_plain(ours)!r}: give another folder (a basis folder never mixes "
                    "models or lenses)"
                )
        from safetensors.torch import save as st_save

        tensors = {
            name: getattr(self, name).contiguous()
            for name in _TENSORS
            if getattr(self, name) is not None
        }
        file = target / layer_file(self.layer)
        with atomic_open(file, "wb") as handle:
            handle.write(st_save(tensors, metadata={"format": "pt", "layer": str(self.layer)}))
        entry = self.to_dict()
        del entry["basis"], entry["mean"], entry["layer"]
        record = LayerRecord.from_dict({"file": file.name, "k": self.k, **entry}, self.layer)
        atomic_write_json(target / INDEX_FILE, index.with_layer(self.layer, record).to_dict())
        return file

    @classmethod
    def load(cls, folder: str | Path, layer: int) -> CausalBasis:
        """Read one layer of a basis folder.

        Raises:
            LenskitError: If the folder, the layer or its file is missing or corrupt.
        """
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise LenskitError(f"layer must be an integer >= 0, got {layer!r}: pass a block input")
        target = Path(folder).expanduser()
        index = read_index(target)
        entry = index.layers.get(layer)
        if entry is None:
            have = ", ".join(map(str, index.layers)) or "none"
            raise LenskitError(
                f"{target} has no causal basis for layer {layer} (layers: {have})"
                f": extract it with `lenskit causal-basis --layer {layer} --out "
                f"{target}`"
            )
        file = target / entry.file  # a plain name: the index cannot point elsewhere
        try:
            from safetensors.torch import load_file

            tensors = load_file(file, device="cpu")
            return cls(
                layer=int(layer),
                **{name: tensors.get(name) for name in _TENSORS},
                found_at=entry.found_at,
                iterations=entry.iterations,
                converged=entry.converged,
                settings=entry.settings,
            )
        except Exception as err:  # missing files, bad headers, truncated data, bad values
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
            raise LenskitError(
                f"{file} is missing or corrupt ({first}): extract layer {layer} again"
            ) from err


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else value


def _plain(value: Any) -> Any:
    """A record as JSON data, for messages."""
    return value.to_dict() if hasattr(value, "to_dict") else value


def load_bases(folder: str | Path) -> dict[int, CausalBasis]:
    """Every layer of a basis folder, by layer."""
    index = read_index(folder)
    return {layer: CausalBasis.load(folder, layer) for layer in index.layers}
