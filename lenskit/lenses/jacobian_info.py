"""The header of a J-lens file (everything but the matrices), read into typed records.

A TransformerLens / reference artifact holds ``n_prompts``, ``d_model``, the matrices'
layers and a free-form ``metadata`` dict; lenskit reads the fields it relies on into
:class:`JLensInfo` and checks each (a prompt count below 1, a negative layer, a wrong type
each give one line naming the field). ``metadata["lenskit"]`` (the model lenskit fitted
for) becomes a :class:`JLensModelRecord`. Other metadata keys are kept as they are.

>>> info = JLensInfo.from_dict({"n_prompts": 4, "d_model": 64, "source_layers": [0, 1, 2]})
>>> info.n_prompts, info.source_layers
(4, (0, 1, 2))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from lenskit.errors import LenskitError
from lenskit.lenses.fields import check_int, check_optional_text

__all__ = ["JLensInfo", "JLensModelRecord"]


@dataclass(frozen=True)
class JLensModelRecord:
    """``metadata["lenskit"]``: the model the lens was fitted for, and how."""

    FIELDS: ClassVar[tuple[str, ...]] = ("model", "architecture", "n_layers", "d_model", "d_vocab")

    model: str | None = None
    architecture: str | None = None
    n_layers: int | None = None
    d_model: int | None = None
    d_vocab: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check(vars(self))

    @staticmethod
    def _check(values: dict[str, Any]) -> dict[str, Any]:
        check_optional_text(values.get("model"), "lenskit.model", absent="absent")
        check_optional_text(values.get("architecture"), "lenskit.architecture", absent="absent")
        for name in ("n_layers", "d_model", "d_vocab"):
            check_int(values.get(name), f"lenskit.{name}", 1, optional=True)
        if not isinstance(values.get("info", {}), dict):
            raise LenskitError("lenskit provenance must be a dict")
        return values

    def to_dict(self) -> dict[str, Any]:
        """As the metadata entry: the model fields, then the provenance."""
        return {**{name: getattr(self, name) for name in self.FIELDS}, **self.info}

    @classmethod
    def from_dict(cls, data: Any) -> JLensModelRecord:
        """From :meth:`to_dict`'s form, every field checked."""
        if not isinstance(data, dict):
            raise LenskitError(f"metadata lenskit must be a dict, got {type(data).__name__}")
        values = {name: data.get(name) for name in cls.FIELDS}
        values["info"] = {k: v for k, v in data.items() if k not in cls.FIELDS}
        return cls(**cls._check(values))


@dataclass(frozen=True)
class JLensInfo:
    """What a J-lens file says about itself, checked.

    Attributes:
        n_prompts: Prompts averaged into the fit (>= 1).
        d_model: Residual width the matrices are for.
        source_layers: The block outputs with a matrix (distinct, >= 0, sorted).
        model_name: The TransformerLens model name recorded, if any.
        target_layer: The block whose output the Jacobians are of, if recorded.
        estimator: How the matrices were made (``jacobian_lens``, ``identity``, ...).
        lenskit: What lenskit recorded about the model, if it fitted the lens.
        extra: Every other metadata entry, as it is.
    """

    METADATA: ClassVar[tuple[str, ...]] = ("model_name", "target_layer", "estimator", "lenskit")

    n_prompts: int
    d_model: int
    source_layers: tuple[int, ...]
    model_name: str | None = None
    target_layer: int | None = None
    estimator: str | None = None
    lenskit: JLensModelRecord | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "source_layers", self._check(vars(self))["source_layers"])
        if self.lenskit is not None and not isinstance(self.lenskit, JLensModelRecord):
            raise LenskitError("lenskit must be a JLensModelRecord")

    @staticmethod
    def _check(values: dict[str, Any]) -> dict[str, Any]:
        """The fields checked; ``source_layers`` as a sorted tuple."""
        check_int(values.get("n_prompts"), "n_prompts", 1)
        check_int(values.get("d_model"), "d_model", 1)
        layers = values.get("source_layers")
        if not isinstance(layers, (list, tuple)) or not layers:
            raise LenskitError(f"source_layers must be a non-empty list, got {layers!r}")
        checked = tuple(sorted(int(check_int(v, "each source layer", 0) or 0) for v in layers))
        if len(set(checked)) != len(checked):
            raise LenskitError(f"source_layers repeats a layer: {list(layers)[:8]}")
        check_optional_text(values.get("model_name"), "metadata model_name", absent="absent")
        check_optional_text(values.get("estimator"), "metadata estimator", absent="absent")
        check_int(values.get("target_layer"), "metadata target_layer", 0, optional=True)
        extra = values.get("extra", {})
        if not isinstance(extra, dict):
            raise LenskitError("extra metadata must be a dict")
        if "n_prompts" in extra:  # a TransformerLens fit records its prompt count too
            check_int(extra["n_prompts"], "metadata n_prompts", 1)
        return {**values, "source_layers": checked}

    def metadata(self) -> dict[str, Any]:
        """The file's ``metadata`` dict."""
        out = dict(self.extra)
        for name in ("model_name", "target_layer", "estimator"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.lenskit is not None:
            out["lenskit"] = self.lenskit.to_dict()
        return out

    def to_dict(self) -> dict[str, Any]:
        """The header as the file stores it (without the matrices)."""
        return {
            "n_prompts": self.n_prompts,
            "d_model": self.d_model,
            "source_layers": list(self.source_layers),
            "metadata": self.metadata(),
        }

    @classmethod
    def from_dict(cls, data: Any) -> JLensInfo:
        """From :meth:`to_dict`'s form (``metadata`` optional), every field checked."""
        if not isinstance(data, dict):
            raise LenskitError(f"the header must be a dict, got {type(data).__name__}")
        meta = data.get("metadata") or {}
        if not isinstance(meta, dict):
            raise LenskitError(f"metadata must be a dict, got {type(meta).__name__}")
        record = meta.get("lenskit")
        values = cls._check(
            {
                "n_prompts": data.get("n_prompts"),
                "d_model": data.get("d_model"),
                "source_layers": data.get("source_layers"),
                "model_name": meta.get("model_name"),
                "target_layer": meta.get("target_layer"),
                "estimator": meta.get("estimator"),
                "extra": {k: v for k, v in meta.items() if k not in cls.METADATA},
            }
        )
        lenskit = None if record is None else JLensModelRecord.from_dict(record)
        return cls(**values, lenskit=lenskit)

    @classmethod
    def from_tl(cls, tl: Any) -> JLensInfo:
        """The header of a TransformerLens ``JacobianLens``."""
        return cls.from_dict(
            {
                "n_prompts": tl.n_prompts,
                "d_model": tl.d_model,
                "source_layers": list(tl.jacobians),
                "metadata": tl.metadata,
            }
        )
