"""The tuned lens (Belrose et al. 2023): a learned affine translator per layer, then the readout.

Block input ``i`` is read as ``readout(h + W_i h + b_i)``; the final residual (row
``n_layers``) is read as it is. ``W_i`` and ``b_i`` start at zero, so an untrained
tuned lens is exactly the logit lens.

Files use the tuned-lens package's layout, so lenses move between the two: a folder
with ``config.json`` (``base_model_name_or_path``, ``d_model``, ``num_hidden_layers``,
``bias``, ``lens_type``; lenskit adds a ``lenskit`` entry with the vocabulary size and
how the lens was trained) and ``params.pt``, the translators' state dict with keys
``0.weight``, ``0.bias``, ``1.weight``, ... (``params.safetensors`` is read too).

A lens can also read the stream between attention and MLP (rows ``L12.mid``): it
then has a second translator per block, saved as ``mid.0.weight``, ``mid.0.bias``, ...,
and its ``config.json`` records the points it reads under ``lenskit.points``
(``["resid_pre", "resid_mid"]``). A lens without them refuses ``.mid`` rows in one
line. ``path="hub"`` loads the lens the tuned-lens project publishes for the model
(see :mod:`lenskit.lenses.hub`).
"""

from __future__ import annotations

import contextlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from lenskit import models
from lenskit.errors import LenskitError
from lenskit.io import atomic_open, atomic_torch_save, atomic_write_json
from lenskit.lenses.base import Lens, register_lens
from lenskit.lenses.tuned_config import LENS_TYPE, LenskitRecord, TunedLensConfig
from lenskit.models import DEFAULT_MODEL, ModelAdapter

__all__ = [
    "CONFIG_FILE",
    "LENS_TYPE",
    "PARAMS_PT",
    "PARAMS_SAFETENSORS",
    "TunedLens",
    "TunedLensConfig",
    "shipped_lens_dir",
]

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


@register_lens("tuned")
class TunedLens(Lens):
    """The tuned lens: ``readout(h + W h + b)`` with one affine translator per block input.

    Args:
        adapter: The model's adapter.
        dtype: Dtype of the translators (default: the unembedding's).
        info: Free-form provenance, saved under ``config.json``'s ``lenskit`` entry.
    """

    description = "a learned affine translator per layer before the final norm and unembedding"
    objective = "kl_to_output"  # trained to minimise KL to the model's output
    saved = "a folder with config.json and params.pt (or params.safetensors)"

    @classmethod
    def is_saved_lens(cls, path: Path) -> bool:
        """Whether ``path`` is a folder with a ``config.json``."""
        return (path / "config.json").is_file()

    def __init__(
        self,
        adapter: ModelAdapter,
        *,
        dtype: torch.dtype | None = None,
        info: dict[str, Any] | None = None,
        points: tuple[str, ...] = ("resid_pre",),
    ) -> None:
        super().__init__(adapter)
        w_u = adapter.W_U
        dtype = dtype or (w_u.dtype if w_u.is_floating_point() else torch.float32)
        d = adapter.d_model
        self.translators = torch.nn.ModuleList(
            [
                torch.nn.Linear(d, d, bias=True, dtype=dtype, device=w_u.device)
                for _ in range(adapter.n_layers)
            ]
        )
        self.points = _check_points(points, adapter)
        self.mid_translators: torch.nn.ModuleList | None = None
        if "resid_mid" in self.points:
            self.mid_translators = torch.nn.ModuleList(
                [
                    torch.nn.Linear(d, d, bias=True, dtype=dtype, device=w_u.device)
                    for _ in range(adapter.n_layers)
                ]
            )
        with torch.no_grad():
            for translator in self.all_translators():
                translator.weight.zero_()
                translator.bias.zero_()
        self.info: dict[str, Any] = dict(info or {})
        self.source: str | None = None

    @classmethod
    def from_model(cls, model: Any, **options: Any) -> TunedLens:
        """Load a tuned lens for a ``TransformerBridge``.

        Args:
            model: The model.
            **options: ``path``: a folder written by :meth:`save` (or by the tuned-lens
                package). Without it, the lens shipped for the embedded default model.

        Raises:
            LenskitError: For unknown options, or no path for a model with no shipped lens.
        """
        path = options.pop("path", None)
        if options:
            raise LenskitError(
                f"the tuned lens takes only path=, got {', '.join(sorted(options))}: drop them"
            )
        if path == "hub":
            from lenskit.lenses import hub

            return hub.load_hub_lens(cls, model)
        adapter = ModelAdapter(model)
        if path is None:
            shipped = shipped_lens_dir(adapter.name)
            if shipped is None:
                raise LenskitError(
                    f"no tuned lens is shipped for {adapter.name}: "
                    f"{_train_hint(adapter.name)} (tuned:DIR in the CLI)"
                )
            if not (shipped / CONFIG_FILE).is_file():
                raise LenskitError(
                    f"the shipped tuned lens for {adapter.name} is missing from "
                    "the installed package: reinstall lenskit or pass path="
                )
            path = shipped
        return cls.load(model, path)

    @classmethod
    def untrained(
        cls,
        model: Any,
        *,
        dtype: torch.dtype | None = None,
        points: tuple[str, ...] = ("resid_pre",),
    ) -> TunedLens:
        """A tuned lens with zero translators: exactly the logit lens, the start of training.

        ``points=("resid_pre", "resid_mid")`` adds translators for the ``L12.mid`` rows.
        """
        return cls(ModelAdapter(model), dtype=dtype, points=points)

    @classmethod
    def load(cls, model: Any, path: str | Path) -> TunedLens:
        """Read a lens folder and check it fits ``model``.

        Args:
            model: The model the lens will read.
            path: A folder with ``config.json`` and ``params.pt`` (or ``params.safetensors``).

        Returns:
            The lens, its translators in the unembedding's dtype, on the model's device.

        Raises:
            LenskitError: For a missing, mismatched, truncated or corrupt lens (one line).
        """
        folder = Path(path).expanduser()
        adapter = ModelAdapter(model)
        config = _read_config(folder)
        _check_fits(config, adapter, folder)
        extra = config.lenskit.to_dict() if config.lenskit is not None else {}
        points = _config_points(extra, folder)
        state = _read_params(
            folder,
            adapter.n_layers,
            adapter.d_model,
            config.bias,
            prefixes=("", "mid.") if "resid_mid" in points else ("",),
        )
        skip = ("model", "d_vocab", "architecture", "points")
        info = {k: v for k, v in extra.items() if k not in skip}
        lens = cls(adapter, info=info, points=points)
        ref = lens.translators[0].weight
        with torch.no_grad():
            for key in lens.translator_state():
                lens._translator_tensor(key).copy_(state[key].to(ref))
        lens.source = str(folder)
        return lens

    def config(self) -> TunedLensConfig:
        """The ``config.json`` record of this lens."""
        info = {k: v for k, v in self.info.items() if k not in LenskitRecord.FIELDS}
        return TunedLensConfig(
            base_model_name_or_path=_base_model_name(self.adapter),
            d_model=self.adapter.d_model,
            num_hidden_layers=self.adapter.n_layers,
            bias=True,
            unembed_hash=_unembed_hash(self.adapter),
            lens_type=LENS_TYPE,
            lenskit=LenskitRecord(
                model=self.adapter.name,
                d_vocab=self.adapter.d_vocab,
                architecture=self.adapter.architecture,
                info={**info, "points": list(self.points)},
            ),
        )

    def config_dict(self) -> dict[str, Any]:
        """The ``config.json`` contents, in the tuned-lens package's keys."""
        return self.config().to_dict()

    def all_translators(self) -> list[torch.nn.Linear]:
        """Every translator: block inputs, then (where the lens has them) ``resid_mid`` rows."""
        mids = list(self.mid_translators) if self.mid_translators is not None else []
        return [*self.translators, *mids]

    def translator_state(self) -> dict[str, Tensor]:
        """The translators' state dict, keys ``0.weight``, ``0.bias``, ... (detached copies).

        Translators of ``resid_mid`` rows follow as ``mid.0.weight``, ``mid.0.bias``, ...
        """
        state = {k: v.detach().clone() for k, v in self.translators.state_dict().items()}
        if self.mid_translators is not None:
            mids = self.mid_translators.state_dict().items()
            state |= {f"mid.{k}": v.detach().clone() for k, v in mids}
        return state

    def _translator_tensor(self, key: str) -> Tensor:
        """The parameter behind a :meth:`translator_state` key."""
        mid = key.startswith("mid.")
        modules = self.mid_translators if mid else self.translators
        index, _, name = key.removeprefix("mid.").partition(".")
        return getattr(modules[int(index)], name)  # type: ignore[index]

    def covers_point(self, layer: int, point: str) -> bool:
        """Block inputs and the output always; ``resid_mid`` where the lens has translators."""
        if point == "resid_mid":
            return self.mid_translators is not None and 0 <= layer < self.adapter.n_layers
        return self.covers(layer)

    def transform_mid(
        self, h: Float[Tensor, "*batch d_model"], layer: int
    ) -> Float[Tensor, "*batch d_model"]:
        """``h + W h + b`` with block ``layer``'s ``resid_mid`` translator."""
        if self.mid_translators is None or not 0 <= layer < self.adapter.n_layers:
            return super().transform_mid(h, layer)
        translator = self.mid_translators[layer]
        x = h.to(translator.weight.dtype)
        return (x + translator(x)).to(h.dtype)

    def save(
        self, path: str | Path, *, dtype: torch.dtype | None = None, safetensors: bool = False
    ) -> Path:
        """Write ``config.json`` and the parameters to a folder, each file atomically.

        Args:
            path: The folder (created if missing).
            dtype: Store the parameters in this dtype (e.g. ``torch.float16`` to halve the
                file); default: as they are.
            safetensors: Write ``params.safetensors`` instead of ``params.pt``.

        Returns:
            The folder.
        """
        folder = Path(path).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            k: v.to(device="cpu", dtype=dtype or v.dtype).contiguous()
            for k, v in self.translator_state().items()
        }
        name, stale = (
            (PARAMS_SAFETENSORS, PARAMS_PT) if safetensors else (PARAMS_PT, PARAMS_SAFETENSORS)
        )
        if safetensors:
            from safetensors.torch import save as st_save

            with atomic_open(folder / name, "wb") as handle:
                handle.write(st_save(state, metadata={"format": "pt"}))
        else:
            atomic_torch_save(state, folder / name)
        with contextlib.suppress(FileNotFoundError):
            (folder / stale).unlink()
        atomic_write_json(folder / CONFIG_FILE, self.config_dict())
        return folder

    def transform_hidden(
        self, h: Float[Tensor, "*batch d_model"], layer: int
    ) -> Float[Tensor, "*batch d_model"]:
        """``h + W h + b`` for block inputs; the identity for the final residual."""
        layer = self.adapter.check_row(layer)
        if layer == self.adapter.n_layers:
            return h
        translator = self.translators[layer]
        x = h.to(translator.weight.dtype)
        return (x + translator(x)).to(h.dtype)


def _unembed_hash(adapter: ModelAdapter) -> str:
    """The tuned-lens package's fingerprint of the model's unembedding (see lenses.hub)."""
    from lenskit.lenses.hub import unembed_hash

    return unembed_hash(adapter.W_U)


def _check_points(points: Any, adapter: ModelAdapter) -> tuple[str, ...]:
    """The lens's row points in stream order, or a one-line error."""
    if isinstance(points, str) or not all(isinstance(p, str) for p in points):
        raise LenskitError(f"points must be a list of point names, got {points!r}")
    rows = adapter.rows(tuple(points))  # unknown points, or resid_mid where there is none
    return tuple(dict.fromkeys(r.point for r in rows[:-1]))


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
