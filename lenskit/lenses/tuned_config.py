"""A tuned lens's ``config.json``, read into a typed record and checked field by field.

The keys are the tuned-lens package's (``base_model_name_or_path``, ``d_model``,
``num_hidden_layers``, ``bias``, ``base_model_revision``, ``unembed_hash``, ``lens_type``),
so lenses move between the two; lenskit adds a ``lenskit`` entry with the model's name,
vocabulary size and architecture, and how the lens was trained (free-form JSON data).
Keys this lenskit does not know are ignored, as the tuned-lens package may add some.

>>> config = TunedLensConfig.from_dict({"d_model": 64, "num_hidden_layers": 4})
>>> config.lens_type, config.bias, config.to_dict()["d_model"]
('linear_tuned_lens', True, 64)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from lenskit.errors import LenskitError
from lenskit.lenses.fields import check_int, check_optional_text

__all__ = ["LENS_TYPE", "LenskitRecord", "TunedLensConfig"]

LENS_TYPE = "linear_tuned_lens"


@dataclass(frozen=True)
class LenskitRecord:
    """What lenskit adds under ``config.json``'s ``lenskit`` key.

    Attributes:
        model: The model's lenskit name.
        d_vocab: The model's vocabulary size.
        architecture: The model's architecture.
        info: How the lens was trained (free-form JSON data, e.g. ``train_config``).
    """

    FIELDS: ClassVar[tuple[str, ...]] = ("model", "d_vocab", "architecture")

    model: str | None = None
    d_vocab: int | None = None
    architecture: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "info", self._check(vars(self))["info"])

    @staticmethod
    def _check(values: dict[str, Any]) -> dict[str, Any]:
        check_optional_text(values.get("model"), "lenskit.model")
        check_optional_text(values.get("architecture"), "lenskit.architecture")
        check_int(values.get("d_vocab"), "lenskit.d_vocab", 1, optional=True)
        info = values.get("info", {})
        if not isinstance(info, dict):
            raise LenskitError("lenskit provenance must be an object")
        try:
            info = json.loads(json.dumps(info, allow_nan=True))
        except (TypeError, ValueError) as err:
            raise LenskitError(f"lenskit provenance must be JSON data ({err})") from err
        return {**values, "info": info}

    def to_dict(self) -> dict[str, Any]:
        """As JSON data: the three fields, then the provenance."""
        return {
            "model": self.model,
            "d_vocab": self.d_vocab,
            "architecture": self.architecture,
            **json.loads(json.dumps(self.info)),
        }

    @classmethod
    def from_dict(cls, data: Any) -> LenskitRecord:
        """From :meth:`to_dict`'s form, every field checked."""
        if not isinstance(data, dict):
            raise LenskitError(f"lenskit must be an object, got {type(data).__name__}")
        values = {key: data.get(key) for key in cls.FIELDS}
        values["info"] = {k: v for k, v in data.items() if k not in cls.FIELDS}
        return cls(**cls._check(values))


@dataclass(frozen=True)
class TunedLensConfig:
    """``config.json`` of a tuned lens folder."""

    d_model: int
    num_hidden_layers: int
    base_model_name_or_path: str | None = None
    bias: bool = True
    base_model_revision: str | None = None
    unembed_hash: str | None = None
    lens_type: str = LENS_TYPE
    lenskit: LenskitRecord | None = None

    def __post_init__(self) -> None:
        self._check(vars(self))
        if self.lenskit is not None and not isinstance(self.lenskit, LenskitRecord):
            raise LenskitError("lenskit must be a LenskitRecord")

    @staticmethod
    def _check(values: dict[str, Any]) -> dict[str, Any]:
        check_int(values["d_model"], "d_model", 1)
        check_int(values["num_hidden_layers"], "num_hidden_layers", 1)
        bias = values.get("bias", True)
        if not isinstance(bias, bool):
            raise LenskitError(f"bias must be true or false, got {bias!r}")
        for name in ("base_model_name_or_path", "base_model_revision", "unembed_hash"):
            check_optional_text(values.get(name), name)
        lens_type = values.get("lens_type", LENS_TYPE)
        if lens_type != LENS_TYPE:
            raise LenskitError(
                f"the lens is a {lens_type!r}, not a {LENS_TYPE!r}: lenskit reads only "
                "linear tuned lenses"
            )
        return values

    def to_dict(self) -> dict[str, Any]:
        """As JSON data, in the tuned-lens package's keys (and ``lenskit``)."""
        out: dict[str, Any] = {
            "base_model_name_or_path": self.base_model_name_or_path,
            "d_model": self.d_model,
            "num_hidden_layers": self.num_hidden_layers,
            "bias": self.bias,
            "base_model_revision": self.base_model_revision,
            "unembed_hash": self.unembed_hash,
            "lens_type": self.lens_type,
        }
        if self.lenskit is not None:
            out["lenskit"] = self.lenskit.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Any) -> TunedLensConfig:
        """From ``config.json``'s contents; unknown keys are ignored, known ones checked.

        Raises:
            LenskitError: Naming the first bad field.
        """
        if not isinstance(data, dict):
            raise LenskitError(f"the config must be a JSON object, got {type(data).__name__}")
        missing = [k for k in ("d_model", "num_hidden_layers") if k not in data]
        if missing:
            raise LenskitError(f"the config lacks integer {', '.join(missing)}")
        names = [f.name for f in fields(cls) if f.name != "lenskit" and f.name in data]
        values = cls._check({name: data[name] for name in names})
        extra = data.get("lenskit")
        return cls(**values, lenskit=None if extra is None else LenskitRecord.from_dict(extra))
