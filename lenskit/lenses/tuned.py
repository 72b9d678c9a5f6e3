"""The tuned lens (Belrose et al. 2023): a learned affine translator per layer, then the readout.

Block input ``i`` is read as ``readout(h + W_i h + b_i)``; the final residual (row
``n_layers``) is read as it is. ``W_i`` and ``b_i`` start at zero, so an untrained
tuned lens is exactly the logit lens.

Files use the tuned-lens package's layout, so lenses move between the two: a folder
with ``config.json`` (``base_model_name_or_path``, ``d_model``, ``num_hidden_layers``,
``bias``, ``lens_type``; lenskit adds a ``lenskit`` entry with the vocabulary size and
how the lens was trained) and ``params.pt``, the translators' state dict with keys
``0.weight``, ``0.bias``, ``1.weight``, ... (``params.safetensors`` is read too);
:mod:`lenskit.lenses.tuned_files` reads and checks them.

A lens can also read the stream between attention and MLP (rows ``L12.mid``): it
then has a second translator per block, saved as ``mid.0.weight``, ``mid.0.bias``, ...,
and its ``config.json`` records the points it reads under ``lenskit.points``
(``["resid_pre", "resid_mid"]``). A lens without them refuses ``.mid`` rows in one
line. ``path="hub"`` loads the lens the tuned-lens project publishes for the model
(see :mod:`lenskit.lenses.hub`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from lenskit.errors import LenskitError
from lenskit.io import atomic_open, atomic_torch_save, atomic_write_json
from lenskit.lenses.base import Lens, register_lens
from lenskit.lenses.tuned_config import LENS_TYPE, LenskitRecord, TunedLensConfig
from lenskit.lenses.tuned_files import (
    CONFIG_FILE,
    PARAMS_PT,
    PARAMS_SAFETENSORS,
    _base_model_name,
    _check_fits,
    _config_points,
    _read_config,
    _read_params,
    _train_hint,
    _unembed_hash,
    shipped_lens_dir,
)
from lenskit.models import ModelAdapter

__all__ = [
    "CONFIG_FILE",
    "LENS_TYPE",
    "PARAMS_PT",
    "PARAMS_SAFETENSORS",
    "TunedLens",
    "TunedLensConfig",
    "shipped_lens_dir",
]


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


def _check_points(points: Any, adapter: ModelAdapter) -> tuple[str, ...]:
    """The lens's row points in stream order, or a one-line error."""
    if isinstance(points, str) or not all(isinstance(p, str) for p in points):
        raise LenskitError(f"points must be a list of point names, got {points!r}")
    rows = adapter.rows(tuple(points))  # unknown points, or resid_mid where there is none
    return tuple(dict.fromkeys(r.point for r in rows[:-1]))
