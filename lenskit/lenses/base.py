"""The Lens protocol and the lens registry.

A lens maps the residual at lens row ``layer`` to next-token logits. Each lens
first transforms the hidden state (``transform_hidden``: identity for the logit
lens, an affine translator for the tuned lens, ...) and then reads it out through
the model's own final norm and unembedding (``forward``).

Kinds register themselves with :func:`register_lens`; :func:`get_lens` builds one
by name, so callers (CLI, plots, app) never name a lens class.

Example:
    >>> import lenskit
    >>> model = lenskit.load_model("tiny-llama")
    >>> lens = lenskit.get_lens("logit", model)
    >>> lens.kind, lens.objective
    ('logit', 'none')
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from jaxtyping import Float
from torch import Tensor

from lenskit.errors import LenskitError
from lenskit.models import ModelAdapter

__all__ = [
    "Lens",
    "available_lenses",
    "file_lenses",
    "get_lens",
    "lens_class",
    "lens_from_spec",
    "parse_lens_spec",
    "point_rows",
    "register_lens",
    "row_blocks",
]

_REGISTRY: dict[str, type[Lens]] = {}
L = TypeVar("L", bound="Lens")


class Lens(torch.nn.Module, ABC):
    """A map from a layer's residual to next-token logits.

    Args:
        adapter: The model's adapter (final norm, unembedding, layer layout).
    """

    kind: ClassVar[str] = ""
    description: ClassVar[str] = ""
    objective: ClassVar[str] = "unspecified"
    """What the lens was fitted for (the evaluation table's ``objective`` column)."""
    coverage: ClassVar[str] = "every row"
    """Which rows the lens reads, in words; :meth:`covers` says it row by row."""
    note: ClassVar[str] = ""
    """What a reader of its evaluation should know (empty: nothing special)."""
    saved: ClassVar[str | None] = None
    """How a saved lens of this kind looks on disk (None: the kind has no files)."""

    @classmethod
    def is_saved_lens(cls, path: Path) -> bool:
        """Whether ``path`` holds a saved lens of this kind (False for kinds without files)."""
        return False

    def __init__(self, adapter: ModelAdapter) -> None:
        super().__init__()
        self.adapter = adapter

    @classmethod
    @abstractmethod
    def from_model(cls: type[L], model: Any, **options: Any) -> L:
        """Build the lens for a ``TransformerBridge``."""

    @property
    def n_rows(self) -> int:
        """Lens rows: one per block input, then the final residual."""
        return self.adapter.n_rows

    def covers(self, layer: int) -> bool:
        """Whether this lens has its own map for ``layer`` (rather than refusing it)."""
        return 0 <= layer <= self.adapter.n_layers

    def check_layer(self, layer: int) -> int:
        """Return ``layer`` if the lens can read it, else raise a one-line error."""
        layer = self.adapter.check_row(layer)
        if not self.covers(layer):
            raise LenskitError(
                f"the {self.kind} lens does not cover layer {layer}: use one of its layers "
                f"({self.covered_layers()})"
            )
        return layer

    def covered_layers(self) -> list[int]:
        """Lens rows this lens can read."""
        return [row for row in range(self.n_rows) if self.covers(row)]

    @abstractmethod
    def transform_hidden(
        self, h: Float[Tensor, "*batch d_model"], layer: int
    ) -> Float[Tensor, "*batch d_model"]:
        """Map a residual at ``layer`` to the residual the final norm should read."""

    def forward(
        self, h: Float[Tensor, "*batch d_model"], layer: int
    ) -> Float[Tensor, "*batch d_vocab"]:
        """Logits the lens reads from residual ``h`` at lens row ``layer``."""
        layer = self.check_layer(layer)
        translated = self.transform_hidden(h, layer)
        return self.adapter.readout(translated)

    def check_model(self, model: Any) -> None:
        """Raise a one-line error unless this lens was built for ``model``."""
        if self.adapter.model is not model:
            raise LenskitError(
                f"this {self.kind} lens was built for another model object: build it with "
                "get_lens(kind, model) for this model"
            )

    def translate_rows(
        self, hidden: Float[Tensor, "layer pos d_model"], layers: Sequence[int]
    ) -> Float[Tensor, "layer pos d_model"]:
        """:meth:`transform_hidden` of several rows; ``hidden[i]`` is at ``layers[i]``."""
        if len(layers) != hidden.shape[0]:
            raise ValueError(f"{hidden.shape[0]} residual rows but {len(layers)} layers")
        return torch.stack(
            [
                self.transform_hidden(h, self.check_layer(row))
                for h, row in zip(hidden, layers, strict=True)
            ]
        )

    def covers_point(self, layer: int, point: str) -> bool:
        """Whether this lens reads residual ``point`` of block ``layer`` (a :class:`Row`).

        Block inputs (``resid_pre``) and the final residual are the lens's rows; the
        stream between attention and MLP (``resid_mid``) needs a map of its own, which
        only some lenses have.
        """
        if point == "resid_mid":
            return False
        return self.covers(layer)

    def transform_mid(
        self, h: Float[Tensor, "*batch d_model"], layer: int
    ) -> Float[Tensor, "*batch d_model"]:
        """Map the ``resid_mid`` residual of block ``layer``; lenses that cover it override this."""
        raise self.mid_refusal(layer)

    def mid_refusal(self, layer: int) -> LenskitError:
        """The one-line error of a lens asked for a ``resid_mid`` row it has no map for."""
        return LenskitError(
            f"the {self.kind} lens has no map for the stream between attention and MLP "
            f"(L{layer}.mid): read block inputs only, or use a tuned lens trained with "
            "`lenskit train --points resid_pre,resid_mid`"
        )

    def transform_point(
        self, h: Float[Tensor, "*batch d_model"], layer: int, point: str = "resid_pre"
    ) -> Float[Tensor, "*batch d_model"]:
        """:meth:`transform_hidden` for any row point (``resid_pre``, ``resid_mid``, final)."""
        if point == "resid_mid":
            layer = self.adapter.check_row(layer)
            if layer == self.adapter.n_layers or not self.covers_point(layer, point):
                return Lens.transform_mid(self, h, layer)  # the one-line refusal
            return self.transform_mid(h, layer)
        return self.transform_hidden(h, self.check_layer(layer))

    def translate_points(
        self, hidden: Float[Tensor, "layer pos d_model"], rows: Sequence[Any]
    ) -> Float[Tensor, "layer pos d_model"]:
        """:meth:`transform_point` of several rows (:class:`~lenskit.models.Row`), stacked."""
        if len(rows) != hidden.shape[0]:
            raise ValueError(f"{hidden.shape[0]} residual rows but {len(rows)} rows")
        return torch.stack(
            [self.transform_point(h, r.layer, r.point) for h, r in zip(hidden, rows, strict=True)]
        )

    def read_points(
        self, hidden: Float[Tensor, "layer pos d_model"], rows: Sequence[Any]
    ) -> Float[Tensor, "layer pos d_vocab"]:
        """Logits of several rows (:class:`~lenskit.models.Row`) in one readout.

        ``hidden[i]`` is the residual at ``rows[i]``; each row is read through
        :meth:`transform_point`, so ``L12.mid`` rows work wherever the lens covers them.
        """
        if len(rows) != hidden.shape[0]:
            raise ValueError(f"{hidden.shape[0]} residual rows but {len(rows)} rows")
        translated = torch.stack(
            [self.transform_point(h, r.layer, r.point) for h, r in zip(hidden, rows, strict=True)]
        )
        return self.adapter.readout(translated)

    def read_rows(
        self, hidden: Float[Tensor, "layer pos d_model"], layers: Sequence[int]
    ) -> Float[Tensor, "layer pos d_vocab"]:
        """Logits of several rows in one readout; ``hidden[i]`` is the residual at ``layers[i]``.

        One matmul over all the rows streams the unembedding from memory once, which
        is what makes reading many rows fast.
        """
        return self.adapter.readout(self.translate_rows(hidden, layers))

    def extra_repr(self) -> str:
        """One line for ``repr``: kind, model and rows."""
        return f"kind={self.kind!r}, model={self.adapter.name!r}, rows={self.n_rows}"


def point_rows(lenses: Sequence[Lens], points: Sequence[str] = ("resid_pre",)) -> list[Any]:
    """The rows (:class:`~lenskit.models.Row`) several lenses read at ``points``, in stream order.

    ``("resid_pre",)`` gives the block inputs and the output; ``("resid_pre", "resid_mid")``
    adds the stream between attention and MLP (``L12.mid``), 2 rows per block.

    Raises:
        LenskitError: For unknown points, ``resid_mid`` on a family that has no such
            stream, or a lens that reads none of the ``resid_mid`` rows.
    """
    if isinstance(points, str):
        points = tuple(p.strip() for p in points.split(","))
    rows = lenses[0].adapter.rows(tuple(points))
    mids = [r for r in rows if r.point == "resid_mid"]
    for lens in lenses:
        if mids and not any(lens.covers_point(r.layer, r.point) for r in mids):
            raise lens.mid_refusal(mids[0].layer)
    return rows


def row_blocks(rows: Sequence[int], n_pos: int, cells: int = 512) -> list[list[int]]:
    """Split ``rows`` into blocks of about ``cells`` cells each, for :meth:`Lens.read_rows`.

    A block of a few hundred cells runs the unembedding matmul near peak speed while
    its ``[cells, d_vocab]`` logits stay a bounded size (512 x 49k floats is 100 MB).
    """
    per_block = max(1, cells // max(1, n_pos))
    rows = list(rows)
    return [rows[i : i + per_block] for i in range(0, len(rows), per_block)]


def register_lens(kind: str) -> Callable[[type[L]], type[L]]:
    """Class decorator that registers a lens class under ``kind``."""

    def decorate(cls: type[L]) -> type[L]:
        if kind in _REGISTRY and _REGISTRY[kind] is not cls:
            raise ValueError(f"lens kind {kind!r} is already registered")
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls

    return decorate


def available_lenses() -> list[str]:
    """Registered lens kinds, in registration order."""
    return list(_REGISTRY)


def file_lenses() -> list[str]:
    """Registered lens kinds read from a file or folder, in registration order."""
    return [kind for kind, cls in _REGISTRY.items() if cls.saved is not None]


def lens_class(kind: str) -> type[Lens]:
    """The class registered under ``kind``."""
    if kind not in _REGISTRY:
        raise LenskitError(
            f"unknown lens kind {kind!r}: use one of {', '.join(available_lenses())}"
        )
    return _REGISTRY[kind]


def get_lens(kind: str, model: Any, **options: Any) -> Lens:
    """Build a lens of a registered kind for a model.

    Args:
        kind: A registered kind (see :func:`available_lenses`).
        model: A ``TransformerBridge``.
        **options: Options of that kind (for example ``path=`` of a saved lens).

    Returns:
        The lens, in eval mode.
    """
    return lens_class(kind).from_model(model, **options).eval()


def parse_lens_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split a lens spec ``KIND`` or ``KIND:PATH`` into the kind and its options."""
    kind, sep, path = spec.partition(":")
    if not kind or (sep and not path):
        raise LenskitError(f"bad lens spec {spec!r}: write KIND or KIND:PATH, e.g. tuned:lenses/x")
    lens_class(kind)  # an unknown kind fails here, with the list of known ones
    return kind, ({"path": path} if path else {})


def lens_from_spec(spec: str, model: Any) -> Lens:
    """Build a lens from a ``KIND`` or ``KIND:PATH`` spec (as the CLI takes them)."""
    kind, options = parse_lens_spec(spec)
    return get_lens(kind, model, **options)
