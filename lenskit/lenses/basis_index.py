"""``basis.json``, the index of a causal-basis folder, read into typed records and checked.

The index names the model (and its shape), the lens the directions were extracted with
and, per layer, the layer's file (a plain file name inside the folder, never a path
elsewhere), ``k`` and the influences and search statistics. Every field is checked when
the file is read: a layer key that is not an integer >= 0 (or not below the model's layer
count), an entry that is not an object, a file name that leaves the folder, a wrong type or
length each give one line naming the field.

>>> index = BasisIndex.from_dict(
...     {
...         "format": FORMAT,
...         "version": VERSION,
...         "model": "tiny-llama",
...         "lens": {"kind": "tuned", "path": None, "shipped": False},
...         "layers": {},
...     }
... )
>>> index.model, index.lens.kind, dict(index.layers)
('tiny-llama', 'tuned', {})
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import MappingProxyType
from typing import Any

from lenskit.errors import LenskitError

__all__ = [
    "FORMAT",
    "INDEX_FILE",
    "VERSION",
    "BasisIndex",
    "LayerRecord",
    "LensRecord",
    "ModelShape",
    "read_index",
]

FORMAT = "lenskit-causal-basis"
VERSION = 1
INDEX_FILE = "basis.json"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(value: Any, name: str, minimum: int = 0) -> int:
    if not _is_int(value) or value < minimum:
        raise LenskitError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _text(value: Any, name: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise LenskitError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _seq(value: Any, name: str, n: int) -> list[Any]:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        got = f"{len(value)} entries" if isinstance(value, (list, tuple)) else repr(value)
        raise LenskitError(f"{name} must be a list of {n} entries, got {got}")
    return list(value)


def _floats(value: Any, name: str, n: int) -> tuple[float, ...]:
    items = _seq(value, name, n)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
        raise LenskitError(f"{name} must hold numbers only")
    if not all(math.isfinite(v) for v in items):
        raise LenskitError(f"{name} holds NaN or inf")
    return tuple(float(v) for v in items)


def _file_name(value: Any, name: str) -> str:
    """A plain ``*.safetensors`` file name: no folder part, so it stays inside the folder."""
    text = str(_text(value, name))
    plain = (
        PurePosixPath(text).name == text
        and PureWindowsPath(text).name == text
        and text not in (".", "..")
        and text.endswith(".safetensors")
        and "\x00" not in text
    )
    if not plain:
        raise LenskitError(
            f"{name} must be a plain *.safetensors file name inside the basis folder, "
            f"got {text[:80]!r}"
        )
    return text


def _json_data(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise LenskitError(f"{name} must be an object, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(value, allow_nan=True))
    except (TypeError, ValueError) as err:
        raise LenskitError(f"{name} must be JSON data ({err})") from err


@dataclass(frozen=True)
class ModelShape:
    """The model a basis folder belongs to: architecture and sizes."""

    architecture: str
    n_layers: int
    d_model: int
    d_vocab: int

    def __post_init__(self) -> None:
        self._check(vars(self))

    @staticmethod
    def _check(values: dict[str, Any]) -> dict[str, Any]:
        _text(values["architecture"], "model_shape.architecture")
        for name in ("n_layers", "d_model", "d_vocab"):
            _int(values[name], f"model_shape.{name}", 1)
        return values

    def to_dict(self) -> dict[str, Any]:
        """As JSON data."""
        return {
            "architecture": self.architecture,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_vocab": self.d_vocab,
        }

    @classmethod
    def from_dict(cls, data: Any) -> ModelShape:
        """From :meth:`to_dict`'s form, every field checked."""
        data = _fields(data, "model_shape", ("architecture", "n_layers", "d_model", "d_vocab"))
        return cls(**cls._check(data))


@dataclass(frozen=True)
class LensRecord:
    """The lens the directions were extracted with: kind, and its path unless shipped."""

    kind: str
    path: str | None = None
    shipped: bool = False

    def __post_init__(self) -> None:
        self._check(vars(self))

    @staticmethod
    def _check(values: dict[str, Any]) -> dict[str, Any]:
        _text(values["kind"], "lens.kind")
        _text(values.get("path"), "lens.path", optional=True)
        shipped = values.get("shipped", False)
        if not isinstance(shipped, bool):
            raise LenskitError(f"lens.shipped must be true or false, got {shipped!r}")
        if shipped and values.get("path") is not None:
            raise LenskitError("lens.path must be null for a shipped lens")
        return values

    def to_dict(self) -> dict[str, Any]:
        """As JSON data."""
        return {"kind": self.kind, "path": self.path, "shipped": self.shipped}

    @classmethod
    def from_dict(cls, data: Any) -> LensRecord:
        """From :meth:`to_dict`'s form, every field checked."""
        data = _fields(data, "lens", ("kind", "path", "shipped"), required=("kind",))
        return cls(**cls._check(data))


@dataclass(frozen=True)
class LayerRecord:
    """One layer's entry: its file, ``k``, influences (bits) and search statistics."""

    file: str
    k: int
    lens_influence: tuple[float, ...]
    train_influence: tuple[float, ...]
    model_influence: tuple[float, ...] | None
    found_at: tuple[int, ...]
    iterations: tuple[int, ...]
    converged: tuple[bool, ...]
    spearman: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in self._check(vars(self)).items():
            object.__setattr__(self, name, value)

    @staticmethod
    def _check(data: dict[str, Any]) -> dict[str, Any]:
        """The fields checked and in their types (tuples, floats)."""
        k = _int(data["k"], "k", 1)
        values: dict[str, Any] = {"file": _file_name(data["file"], "file"), "k": k}
        for name in ("lens_influence", "train_influence", "model_influence"):
            value = data.get(name)
            optional = name == "model_influence" and value is None
            values[name] = None if optional else _floats(value, name, k)
        found = _seq(data["found_at"], "found_at", k)
        if not all(_is_int(v) for v in found) or sorted(found) != list(range(k)):
            raise LenskitError(f"found_at must be the steps 0..{k - 1} in some order")
        values["found_at"] = tuple(found)
        iterations = _seq(data["iterations"], "iterations", k)
        values["iterations"] = tuple(_int(v, "iterations") for v in iterations)
        converged = _seq(data["converged"], "converged", k)
        if not all(isinstance(v, bool) for v in converged):
            raise LenskitError("converged must hold true or false only")
        values["converged"] = tuple(converged)
        rho = data.get("spearman")
        if rho is not None and not (
            isinstance(rho, (int, float)) and not isinstance(rho, bool) and -1 <= rho <= 1
        ):
            raise LenskitError(f"spearman must be null or a number in [-1, 1], got {rho!r}")
        values["spearman"] = None if rho is None else float(rho)
        values["settings"] = _json_data(data.get("settings", {}), "settings")
        return values

    def to_dict(self) -> dict[str, Any]:
        """As JSON data, in the order ``basis.json`` keeps."""
        return {
            "file": self.file,
            "k": self.k,
            "lens_influence": list(self.lens_influence),
            "train_influence": list(self.train_influence),
            "model_influence": None if self.model_influence is None else list(self.model_influence),
            "found_at": list(self.found_at),
            "iterations": list(self.iterations),
            "converged": list(self.converged),
            "spearman": self.spearman,
            "settings": json.loads(json.dumps(self.settings)),
        }

    @classmethod
    def from_dict(cls, data: Any, layer: int | str = "?") -> LayerRecord:
        """From :meth:`to_dict`'s form, every field checked (``layer`` names it in errors)."""
        names = tuple(f.name for f in cls.__dataclass_fields__.values())
        try:
            return cls(**cls._check(_fields(data, "entry", names, required=names[:8])))
        except LenskitError as err:
            raise LenskitError(f"layer {layer}: {err}") from err


def _fields(
    data: Any, name: str, names: tuple[str, ...], required: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """``data``'s fields, refusing a non-object, unknown fields and missing required ones."""
    if not isinstance(data, dict):
        raise LenskitError(f"{name} must be an object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise LenskitError(f"{name} has unknown fields {', '.join(map(str, unknown[:3]))}")
    missing = [key for key in (names if required is None else required) if key not in data]
    if missing:
        raise LenskitError(f"{name} lacks {', '.join(missing)}")
    return dict(data)


def _layer_key(key: Any) -> int:
    if not isinstance(key, str) or not key.isdigit() or str(int(key)) != key:
        raise LenskitError(f"layer keys must be integers >= 0 written plainly, got {key!r}")
    return int(key)


@dataclass(frozen=True)
class BasisIndex:
    """``basis.json``: the model, its shape, the lens and each layer's record."""

    model: str
    lens: LensRecord
    layers: Mapping[int, LayerRecord] = field(default_factory=dict)
    model_shape: ModelShape | None = None

    def __post_init__(self) -> None:
        _text(self.model, "model")
        if not isinstance(self.lens, LensRecord):
            raise LenskitError("lens must be a LensRecord")
        if self.model_shape is not None and not isinstance(self.model_shape, ModelShape):
            raise LenskitError("model_shape must be a ModelShape")
        layers = dict(self.layers)
        for layer, record in layers.items():
            _int(layer, "a layer")
            if not isinstance(record, LayerRecord):
                raise LenskitError(f"layer {layer} must be a LayerRecord")
            if self.model_shape is not None and layer >= self.model_shape.n_layers:
                raise LenskitError(
                    f"layer {layer} is not a block input of {self.model} "
                    f"(0..{self.model_shape.n_layers - 1})"
                )
        object.__setattr__(self, "layers", MappingProxyType(dict(sorted(layers.items()))))

    def with_layer(self, layer: int, record: LayerRecord) -> BasisIndex:
        """A copy with ``layer``'s record added or replaced."""
        return replace(self, layers={**self.layers, layer: record})

    def to_dict(self) -> dict[str, Any]:
        """As JSON data: the contents of ``basis.json``."""
        out: dict[str, Any] = {"format": FORMAT, "version": VERSION, "model": self.model}
        if self.model_shape is not None:
            out["model_shape"] = self.model_shape.to_dict()
        out["lens"] = self.lens.to_dict()
        out["layers"] = {str(layer): record.to_dict() for layer, record in self.layers.items()}
        return out

    @classmethod
    def from_dict(cls, data: Any) -> BasisIndex:
        """From :meth:`to_dict`'s form, every field checked.

        Raises:
            LenskitError: Naming the first bad field (format and version included).
        """
        names = ("format", "version", "model", "model_shape", "lens", "layers")
        data = _fields(data, "the index", names, required=("format", "model", "lens", "layers"))
        if data["format"] != FORMAT:
            raise LenskitError(f"format is {data['format']!r}, not {FORMAT!r}")
        if data.get("version") != VERSION:
            raise LenskitError(
                f"version {data.get('version')!r} of the format; this lenskit reads {VERSION}"
            )
        if not isinstance(data["layers"], dict):
            raise LenskitError("layers must be an object keyed by layer")
        shape = data.get("model_shape")
        return cls(
            model=str(_text(data["model"], "model")),
            lens=LensRecord.from_dict(data["lens"]),
            layers={
                _layer_key(key): LayerRecord.from_dict(entry, key)
                for key, entry in data["layers"].items()
            },
            model_shape=None if shape is None else ModelShape.from_dict(shape),
        )


def read_index(folder: str | Path) -> BasisIndex:
    """The ``basis.json`` index of a basis folder, every field checked.

    Raises:
        LenskitError: If the folder or its index is missing, unreadable or not a valid index
            (one line naming the field).
    """
    target = Path(folder).expanduser()
    file = target / INDEX_FILE
    try:
        if not target.is_dir():
            raise LenskitError(
                f"no causal basis folder at {target}: check the path, or extract "
                f"one with `lenskit causal-basis --layer L --out {target}`"
            )
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise LenskitError(
            f"{target} has no {INDEX_FILE}: give a folder written by `lenskit causal-basis`"
        ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise LenskitError(
            f"{file} is unreadable or not JSON ({type(err).__name__}): extract the basis again"
        ) from err
    try:
        return BasisIndex.from_dict(json.loads(text))
    except (json.JSONDecodeError, RecursionError) as err:
        raise LenskitError(
            f"{file} is unreadable or not JSON ({type(err).__name__}): extract the basis again"
        ) from err
    except LenskitError as err:
        raise LenskitError(
            f"{file} is not a valid {FORMAT} index ({err}): extract the basis again, or "
            "give a folder written by `lenskit causal-basis`"
        ) from err
