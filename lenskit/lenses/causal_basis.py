"""The tuned lens reading only a layer's causal subspace (``tuned-with-causal-basis``).

At a block input ``L`` with an extracted causal basis (``k`` orthonormal rows ``V``, mean
residual ``m``; see :mod:`lenskit.lenses.basis`), the residual is projected onto the mean
plus the span of the top-``k`` directions, ``m + V^T V (h - m)``, and then read by the
tuned lens (translator, final norm, unembedding). With a full basis (``k = d_model``) the
projection is the identity and the lens is the tuned lens. Block inputs without a basis are
not covered (a clear error names the layers that have one); the final residual (the
model's output) is read as it is, as the tuned lens reads it.

Options: ``path`` (a basis folder written by ``lenskit causal-basis``; default: the basis
shipped for the embedded model), ``k`` (directions per layer; default: all in the files),
``tuned`` (the tuned lens's folder, or a :class:`~lenskit.lenses.tuned.TunedLens`; default:
the lens the basis folder records, which for a shipped lens is the one shipped for the
model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from lenskit.errors import LenskitError
from lenskit.lenses.base import Lens, register_lens
from lenskit.lenses.basis import (
    BasisIndex,
    CausalBasis,
    load_bases,
    read_index,
    shipped_basis_dir,
)
from lenskit.lenses.tuned import TunedLens, shipped_lens_dir
from lenskit.models import ModelAdapter

__all__ = ["CausalBasisLens"]

_OPTIONS = ("k", "path", "tuned")


def _hint(name: str) -> str:
    tuned = "tuned" if shipped_lens_dir(name) is not None else "tuned:TUNED_DIR"
    return (
        f"extract one with `lenskit causal-basis --model {name} --lens {tuned} --layer L "
        "--out DIR` and pass path=DIR"
    )


@register_lens("tuned-with-causal-basis")
class CausalBasisLens(Lens):
    """The tuned lens applied to ``m + V^T V (h - m)``: only the layer's causal subspace.

    Args:
        adapter: The model's adapter.
        tuned: The tuned lens that reads the projected residual.
        bases: The causal basis of each covered block input (cut to ``k`` rows).
        source: The basis folder.
    """

    description = "the tuned lens on the mean plus the span of a layer's top-k causal directions"
    objective = "kl_to_output_on_causal_subspace"
    coverage = "the layers with an extracted basis, and the output row"
    saved = "a folder with basis.json and layer_{L}.safetensors files"

    @classmethod
    def is_saved_lens(cls, path: Path) -> bool:
        """Whether ``path`` is a folder with a ``basis.json``."""
        return (path / "basis.json").is_file()

    def __init__(
        self,
        adapter: ModelAdapter,
        tuned: TunedLens,
        bases: dict[int, CausalBasis],
        *,
        source: str | None = None,
    ) -> None:
        super().__init__(adapter)
        self.tuned = tuned
        self.source = source
        self.layers = tuple(sorted(bases))
        self.k = {layer: basis.k for layer, basis in bases.items()}
        ref = adapter.W_U
        dtype = ref.dtype if ref.is_floating_point() else torch.float32
        for layer, basis in bases.items():
            if basis.d_model != adapter.d_model or not 0 <= layer < adapter.n_layers:
                raise LenskitError(
                    f"the causal basis of layer {layer} does not fit "
                    f"{adapter.name} (d_model {basis.d_model}): "
                    f"{_hint(adapter.name)}"
                )
            self.register_buffer(f"basis_{layer}", basis.basis.to(ref.device, dtype))
            self.register_buffer(f"mean_{layer}", basis.mean.to(ref.device, dtype))

    @classmethod
    def from_model(cls, model: Any, **options: Any) -> CausalBasisLens:
        """Load the lens for a ``TransformerBridge`` (see the module docs for the options).

        Raises:
            LenskitError: For unknown options, a bad ``k``, a basis folder for another model,
                or no path for a model with no shipped basis.
        """
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise LenskitError(
                f"the tuned-with-causal-basis lens takes only "
                f"{', '.join(_OPTIONS)}, got {', '.join(unknown)}: drop them"
            )
        adapter = ModelAdapter(model)
        path = options.get("path")
        if path is None:
            shipped = shipped_basis_dir(adapter.name)
            if shipped is None:
                raise LenskitError(
                    f"no causal basis is shipped for {adapter.name}: "
                    f"{_hint(adapter.name)} (tuned-with-causal-basis:DIR in the "
                    "CLI)"
                )
            path = shipped
        folder = Path(path).expanduser()
        index = read_index(folder)
        _check_fits(index, adapter, folder)
        bases = load_bases(folder)
        if not bases:
            raise LenskitError(f"{folder} holds no layers: {_hint(adapter.name)}")
        k = options.get("k")
        if k is not None:
            k = int(k) if isinstance(k, str) and k.strip().isdigit() else k
            bases = {layer: basis.top(k) for layer, basis in bases.items()}
        tuned = _tuned_lens(model, options.get("tuned"), index, folder)
        return cls(adapter, tuned, bases, source=str(folder))

    def covers(self, layer: int) -> bool:
        """Block inputs with a causal basis, and the final residual."""
        return layer == self.adapter.n_layers or layer in self.layers

    def check_layer(self, layer: int) -> int:
        """Return ``layer`` if the lens reads it, else a one-line error naming those it does."""
        layer = self.adapter.check_row(layer)
        if not self.covers(layer):
            raise LenskitError(
                f"the tuned-with-causal-basis lens has no causal basis for layer {layer}: use "
                f"one of layers {', '.join(map(str, self.layers))} (or {self.adapter.n_layers}, "
                f"the output), or extract it with `lenskit causal-basis --layer {layer} --out "
                f"{self.source or 'DIR'}`"
            )
        return layer

    def basis(self, layer: int) -> Float[Tensor, "k d_model"]:
        """The directions used at ``layer``."""
        return getattr(self, f"basis_{self.check_layer(layer)}")

    def project(
        self, h: Float[Tensor, "*batch d_model"], layer: int
    ) -> Float[Tensor, "*batch d_model"]:
        """``m + V^T V (h - m)``: the mean plus the part of ``h - m`` in the causal subspace."""
        basis = self.basis(layer)
        mean = getattr(self, f"mean_{layer}")
        x = h.to(basis.dtype) - mean
        return (mean + (x @ basis.T) @ basis).to(h.dtype)

    def transform_hidden(
        self, h: Float[Tensor, "*batch d_model"], layer: int
    ) -> Float[Tensor, "*batch d_model"]:
        """The tuned translator on the projected residual; the identity at the output."""
        layer = self.check_layer(layer)
        if layer == self.adapter.n_layers:
            return h
        return self.tuned.transform_hidden(self.project(h, layer), layer)

    def extra_repr(self) -> str:
        """Kind, model, rows, layers with a basis and their k."""
        ks = sorted(set(self.k.values()))
        k = ks[0] if len(ks) == 1 else self.k
        return f"{super().extra_repr()}, layers={list(self.layers)}, k={k}"


def _check_fits(index: BasisIndex, adapter: ModelAdapter, folder: Path) -> None:
    shape = index.model_shape.to_dict() if index.model_shape is not None else {}
    ours = {"d_model": adapter.d_model, "n_layers": adapter.n_layers, "d_vocab": adapter.d_vocab}
    for key, have in ours.items():
        if shape.get(key) not in (None, have):
            raise LenskitError(
                f"the causal basis in {folder} is for a model with {key} "
                f"{shape.get(key)}, {adapter.name} has {have}: "
                f"{_hint(adapter.name)}"
            )
    if index.model != adapter.name:
        raise LenskitError(
            f"the causal basis in {folder} is for {index.model}, not "
            f"{adapter.name}: {_hint(adapter.name)}"
        )


def _tuned_lens(model: Any, tuned: Any, index: BasisIndex, folder: Path) -> TunedLens:
    """The tuned lens: given, else the one the basis folder records."""
    if isinstance(tuned, TunedLens):
        if tuned.adapter.model is not model:
            raise LenskitError(
                "the tuned lens was built for another model object: load it for this model"
            )
        return tuned
    if tuned is not None:
        return TunedLens.load(model, tuned)
    record = index.lens
    if record.kind != "tuned":
        raise LenskitError(
            f"the causal basis in {folder} was extracted with the "
            f"{record.kind} lens, not a tuned lens: pass tuned=DIR"
        )
    if record.shipped:
        return TunedLens.from_model(model)
    if not record.path:
        raise LenskitError(
            f"the causal basis in {folder} does not record where its tuned lens is: pass tuned=DIR"
        )
    return TunedLens.load(model, record.path)
