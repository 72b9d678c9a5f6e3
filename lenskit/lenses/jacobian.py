"""The Jacobian lens (J-lens; Gurnee et al. 2026), backed by TransformerLens's ``JacobianLens``.

For each block output ``l`` the J-lens holds one ``[d_model, d_model]`` matrix ``J_l``,
the Jacobian of the final block's output with respect to block ``l``'s output, averaged
over a corpus; a residual is read as ``W_U norm(J_l h)``. The logit lens is ``J_l = I``.
Fitting, the file format and the transport ``J_l h`` are TransformerLens's
(:class:`transformer_lens.tools.analysis.JacobianLens`, kept at :attr:`JLens.tl`); lenskit
adds the lens-row numbering, the model checks and the shipped lens.

Rows: TransformerLens numbers a matrix by the block whose *output* it reads, lenskit
numbers rows by block *input*, so lenskit row ``r`` (``1 <= r < n_layers``) uses TL
layer ``r - 1``. A full fit covers rows ``1..n_layers``; row ``n_layers`` (the model's
output) is the identity, and row 0 (the embeddings, no block output) is never covered.

Files: the reference / TransformerLens artifact (``torch.save`` of ``J`` {layer:
matrix}, ``n_prompts``, ``source_layers``, ``d_model`` and optional ``metadata``; fp16 by
default) or a reference fit checkpoint (``jacobian_sum``, ``n_done``), read by TL's own
``JacobianLens.load`` with ``weights_only=True``. A folder means its ``lens.pt``, as in
``JacobianLens.from_pretrained``. lenskit writes its own provenance under
``metadata["lenskit"]``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from lenskit.errors import LenskitError
from lenskit.io import atomic_open
from lenskit.lenses.base import Lens, register_lens
from lenskit.lenses.jacobian_info import JLensInfo
from lenskit.models import DEFAULT_MODEL, ModelAdapter

if TYPE_CHECKING:
    from transformer_lens.tools.analysis import JacobianLens as TLJacobianLens

__all__ = [
    "ARTIFACT_FILE",
    "JLens",
    "fit_hint",
    "lenskit_metadata",
    "read_info",
    "resolve_path",
    "shipped_jlens_path",
]

ARTIFACT_FILE = "lens.pt"  # what JacobianLens.from_pretrained reads from a folder
_SHIPPED = {DEFAULT_MODEL: "smollm2-135m"}  # model name -> folder under assets/jacobian/


def shipped_jlens_path(model_name: str) -> Path | None:
    """File of the J-lens shipped inside lenskit for ``model_name`` (it may be missing)."""
    if model_name not in _SHIPPED:
        return None
    root = Path(str(resources.files("lenskit")))
    return root / "assets" / "jacobian" / _SHIPPED[model_name] / ARTIFACT_FILE


def fit_hint(name: str) -> str:
    """How to fit a J-lens for model ``name`` (the fix in error messages)."""
    return (
        f"fit one with `lenskit fit-jacobian --model {name} --prompts 4 --out FILE` "
        "and pass path=FILE"
    )


def resolve_path(path: str | Path) -> Path:
    """The artifact file for ``path``: the file itself, or ``lens.pt`` inside a folder."""
    file = Path(path).expanduser()
    return file / ARTIFACT_FILE if file.is_dir() else file


def lenskit_metadata(adapter: ModelAdapter) -> dict[str, Any]:
    """What lenskit records about the model under ``metadata["lenskit"]``."""
    return {
        "model": adapter.name,
        "architecture": adapter.architecture,
        "n_layers": adapter.n_layers,
        "d_model": adapter.d_model,
        "d_vocab": adapter.d_vocab,
    }


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:160]


def _names(*values: Any) -> set[str]:
    """Names and their last path component, so a cache folder matches on any machine."""
    out: set[str] = set()
    for value in values:
        if isinstance(value, str) and value.strip():
            out |= {value, PurePath(value.rstrip("/")).name}
    return out - {""}


def _model_names(model: Any, adapter: ModelAdapter) -> set[str]:
    hf_config = getattr(getattr(model, "original_model", None), "config", None)
    return _names(
        adapter.name,
        getattr(model.cfg, "model_name", None),
        getattr(hf_config, "_name_or_path", None),
    )


def read_info(tl: TLJacobianLens, where: str) -> JLensInfo:
    """The checked header of ``tl`` (prompt count, layers, metadata), or a one-line error."""
    try:
        return JLensInfo.from_tl(tl)
    except LenskitError as err:
        raise LenskitError(
            f"the J-lens in {where} has a bad header ({err}): copy it again or refit it"
        ) from err


def _check_fits(tl: TLJacobianLens, model: Any, adapter: ModelAdapter, where: str) -> None:
    """Refuse a bad header, or a lens fitted for another model, with one line."""
    info = read_info(tl, where)
    ours = f"this model ({adapter.name})"
    fix = "use a J-lens fitted for this model"
    if info.d_model != adapter.d_model:
        raise LenskitError(
            f"the J-lens in {where} was fitted for d_model {info.d_model}, "
            f"{ours} has {adapter.d_model}: {fix}"
        )
    record = info.lenskit
    recorded = {
        "layers": record.n_layers if record is not None else None,
        "d_vocab": record.d_vocab if record is not None else None,
        "target": info.target_layer + 1 if info.target_layer is not None else None,
    }
    for key, value in recorded.items():
        have = adapter.d_vocab if key == "d_vocab" else adapter.n_layers
        if value is not None and value != have:
            what = f"a vocabulary of {value}" if key == "d_vocab" else f"{value} layers"
            raise LenskitError(
                f"the J-lens in {where} was fitted for a model with {what}, "
                f"{ours} has {have}: {fix}"
            )
    bad = [layer for layer in info.source_layers if not 0 <= layer < adapter.n_layers - 1]
    if bad:
        raise LenskitError(
            f"the J-lens in {where} has matrices for block outputs {bad[:3]}, "
            f"outside 0..{adapter.n_layers - 2} of {ours}: {fix}"
        )
    theirs = _names(record.model if record is not None else None, info.model_name)
    if theirs and not theirs & _model_names(model, adapter):
        name = (record.model if record is not None else None) or info.model_name
        raise LenskitError(f"the J-lens in {where} was fitted for {name}, not {ours}: {fix}")
    for layer, matrix in tl.jacobians.items():
        if not bool(torch.isfinite(matrix).all()):
            raise LenskitError(f"the J-lens in {where} holds NaN or inf in layer {layer}: refit it")


@register_lens("jacobian")
class JLens(Lens):
    """The J-lens: ``readout(J h)`` with one fitted transport matrix per block output.

    Args:
        adapter: The model's adapter.
        tl: The TransformerLens ``JacobianLens`` holding the matrices (see :meth:`from_tl`,
            which checks that it fits the model).
        source: Where the lens was read from, if from a file.
    """

    description = "the average Jacobian of the final residual, then the final norm and unembedding"
    objective = "average_jacobian"  # fitted as a mean Jacobian, not to match the output
    coverage = "block outputs (L1 on) and the output row; L0 is no block's output"
    note = (
        "J-lens: an average Jacobian, fitted without a KL objective (not trained to "
        "minimise KL to the model's output); layers without a fitted matrix are NaN"
    )
    saved = "a TransformerLens JacobianLens file (*.pt), or a folder with lens.pt"

    @classmethod
    def is_saved_lens(cls, path: Path) -> bool:
        """Whether ``path`` is a ``*.pt`` file or a folder with ``lens.pt``."""
        return (path.suffix == ".pt" and path.is_file()) or (path / "lens.pt").is_file()

    def __init__(
        self, adapter: ModelAdapter, tl: TLJacobianLens, *, source: str | None = None
    ) -> None:
        super().__init__(adapter)
        self.tl = tl
        self.source = source
        self._file_metadata: dict[str, Any] = dict(tl.metadata)

    @classmethod
    def from_model(cls, model: Any, **options: Any) -> JLens:
        """Load a J-lens for a ``TransformerBridge``.

        Args:
            model: The model.
            **options: ``path``: an artifact file (or a folder with ``lens.pt``) in the
                TransformerLens / reference format. Without it, the lens shipped for the
                embedded default model.

        Raises:
            LenskitError: For unknown options, or no path for a model with no shipped lens.
        """
        path = options.pop("path", None)
        if options:
            raise LenskitError(
                f"the jacobian lens takes only path=, got {', '.join(sorted(options))}: drop them"
            )
        if path is None:
            name = ModelAdapter(model).name
            shipped = shipped_jlens_path(name)
            if shipped is None:
                raise LenskitError(
                    f"no J-lens is shipped for {name}: {fit_hint(name)} (jacobian:FILE in the CLI)"
                )
            if not shipped.is_file():
                raise LenskitError(
                    f"the J-lens for {name} is not shipped in this installation: "
                    f"{fit_hint(name)} (jacobian:FILE in the CLI)"
                )
            path = shipped
        return cls.load(model, path)

    @classmethod
    def load(cls, model: Any, path: str | Path) -> JLens:
        """Read an artifact (or a reference fit checkpoint) and check it fits ``model``.

        Args:
            model: The model the lens will read.
            path: A ``.pt`` file, or a folder holding ``lens.pt``.

        Raises:
            LenskitError: For a missing, mismatched, truncated or corrupt file (one line).
        """
        from transformer_lens.tools.analysis import JacobianLens as TLJacobianLens

        file = resolve_path(path)
        if not file.is_file():
            raise LenskitError(
                f"no J-lens file at {file}: check the path, or {fit_hint(ModelAdapter(model).name)}"
            )
        try:  # TL reads with weights_only=True: a file cannot run code
            tl = TLJacobianLens.load(str(file))
        except Exception as err:  # truncated zips, pickles, missing keys, bad shapes
            raise LenskitError(
                f"{file} is not a readable J-lens ({_first_line(err)}): copy it again or refit it"
            ) from err
        return cls.from_tl(model, tl, source=str(file))

    @classmethod
    def from_tl(cls, model: Any, tl: TLJacobianLens, *, source: str | None = None) -> JLens:
        """Wrap a TransformerLens ``JacobianLens`` after checking that it fits ``model``.

        lenskit matches the model by its lenskit name, TransformerLens name or folder name,
        so a lens fitted on a cached copy of a model loads on another machine; then
        ``tl.validate_model`` runs, with the recorded ``model_name`` set to this model's
        for the session (files saved by :meth:`save` keep the recorded one).

        Raises:
            LenskitError: If the lens was fitted for another model (one line).
        """
        adapter = ModelAdapter(model)
        where = source or "memory"
        _check_fits(tl, model, adapter, where)
        lens = cls(adapter, tl, source=source)
        recorded = tl.metadata.get("model_name")
        current = getattr(model.cfg, "model_name", None)
        if recorded is not None and recorded != current:
            tl.metadata["model_name"] = current
        try:
            tl.validate_model(model)
        except (TypeError, ValueError) as err:
            if recorded is not None:
                tl.metadata["model_name"] = recorded
            raise LenskitError(
                f"TransformerLens refuses the J-lens in {where} for "
                f"{adapter.name} ({_first_line(err)}): {fit_hint(adapter.name)}"
            ) from err
        return lens

    @classmethod
    def identity(cls, model: Any) -> JLens:
        """A J-lens whose matrices are all the identity: exactly the logit lens."""
        from transformer_lens.tools.analysis import JacobianLens as TLJacobianLens

        adapter = ModelAdapter(model)
        if adapter.n_layers < 2:
            raise LenskitError(
                f"{adapter.name} has one block, so a J-lens has no matrices: use the logit lens"
            )
        eye = torch.eye(adapter.d_model)
        meta = {"estimator": "identity", "lenskit": lenskit_metadata(adapter)}
        tl = TLJacobianLens(
            {layer: eye for layer in range(adapter.n_layers - 1)},
            n_prompts=1,
            d_model=adapter.d_model,
            metadata=meta,
        )
        return cls.from_tl(model, tl)

    @property
    def n_prompts(self) -> int:
        """Prompts averaged into the fit."""
        return self.tl.n_prompts

    @property
    def metadata(self) -> dict[str, Any]:
        """Provenance as recorded in the file."""
        return dict(self._file_metadata)

    def tl_layer(self, row: int) -> int | None:
        """TransformerLens layer (block output) of lens row ``row``; None for the output row."""
        row = self.adapter.check_row(row)
        return None if row == self.adapter.n_layers else row - 1

    def covers(self, layer: int) -> bool:
        """Rows with a fitted matrix, and the output row (the identity)."""
        return layer == self.adapter.n_layers or (layer >= 1 and layer - 1 in self.tl.jacobians)

    def transform_hidden(
        self, h: Float[Tensor, "*batch d_model"], layer: int
    ) -> Float[Tensor, "*batch d_model"]:
        """``J h`` through TransformerLens's ``transport`` (fp32); the identity at the output."""
        layer = self.check_layer(layer)
        if layer == self.adapter.n_layers:
            return h
        return self.tl.transport(h, layer - 1).to(h.dtype)

    def save(self, path: str | Path, *, dtype: torch.dtype = torch.float16) -> Path:
        """Write the artifact atomically with TransformerLens's ``save`` (fp16 by default).

        Args:
            path: A ``.pt`` file, or a folder (the file is then ``lens.pt`` in it).
            dtype: Storage dtype of the matrices.

        Returns:
            The file written.
        """
        from transformer_lens.tools.analysis import JacobianLens as TLJacobianLens

        file = resolve_path(path)
        out = TLJacobianLens(
            self.tl.jacobians,
            n_prompts=self.tl.n_prompts,
            d_model=self.tl.d_model,
            metadata=self._file_metadata,
        )
        with atomic_open(file, "wb") as handle:
            out.save(handle, dtype=dtype)  # type: ignore[arg-type]  (torch.save takes a file)
        return file

    def extra_repr(self) -> str:
        """Kind, model, rows, covered rows and prompts."""
        rows = self.covered_layers()
        span = f"{rows[0]}..{rows[-1]}" if rows == list(range(rows[0], rows[-1] + 1)) else rows
        return f"{super().extra_repr()}, covered={span}, n_prompts={self.n_prompts}"
