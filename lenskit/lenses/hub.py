"""Tuned lenses the tuned-lens project publishes, found for the loaded model.

The tuned-lens project keeps trained lenses for many models (GPT-2, Pythia, Llama,
...) in the Hugging Face space ``AlignmentResearch/tuned-lens``, one folder per
model: ``lens/<model id>/config.json`` and ``params.pt``, the same layout lenskit
reads. ``get_lens("tuned", model, path="hub")`` (``--lens tuned:hub`` in the CLI)
downloads the one for the model when the hub is reachable and reads it from the
local hub cache otherwise. Like the tuned-lens package, ``TUNED_LENS_REPO_ID`` and
``TUNED_LENS_REPO_TYPE`` name another repository.

Before any translator is used, the lens's ``unembed_hash`` (the tuned-lens package's
fingerprint of the unembedding matrix) is checked against the model's: a lens
trained for another model is an error, not a warning.

Example:
    >>> import torch
    >>> from lenskit.lenses.hub import unembed_hash
    >>> len(unembed_hash(torch.zeros(4, 8)))
    64
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from lenskit import models
from lenskit.errors import LenskitError
from lenskit.models import ModelAdapter

__all__ = [
    "HUB_REPO",
    "HUB_REPO_TYPE",
    "fetch_hub_lens",
    "hub_lens_id",
    "hub_repo",
    "load_hub_lens",
    "unembed_hash",
]

HUB_REPO = "AlignmentResearch/tuned-lens"
HUB_REPO_TYPE = "space"
_SUBFOLDER = "lens"
_FILES = ("config.json", "params.pt")


def hub_repo() -> tuple[str, str]:
    """``(repo id, repo type)`` of the published lenses (the environment may name others)."""
    repo = os.environ.get("TUNED_LENS_REPO_ID") or HUB_REPO
    kind = os.environ.get("TUNED_LENS_REPO_TYPE") or HUB_REPO_TYPE
    return repo, kind


def unembed_hash(w_u: Float[Tensor, "d_model d_vocab"]) -> str:
    """The tuned-lens package's fingerprint of an unembedding matrix.

    SHA-256 of NumPy's default summary print (corners only, one decimal) of the
    ``[d_vocab, d_model]`` weight, as the tuned-lens package computes it; NumPy's
    default print options are used whatever the caller has set.
    """
    w_u = w_u.detach()
    if w_u.dtype not in (torch.float16, torch.float32, torch.float64):
        w_u = w_u.float()  # NumPy has no bfloat16
    weight = w_u.T.to("cpu").numpy()
    with np.printoptions(
        precision=8, threshold=1000, edgeitems=3, linewidth=75, suppress=False, floatmode="maxprec"
    ):
        text = np.array_str(weight, precision=1)
    return hashlib.sha256(text.encode()).hexdigest()


def _model_hashes(adapter: ModelAdapter) -> set[str]:
    """The model's fingerprint in float32 and float16 (lenses were trained in either)."""
    w_u = adapter.W_U.detach()
    return {unembed_hash(w_u.to(torch.float32)), unembed_hash(w_u.to(torch.float16))}


def hub_lens_id(adapter: ModelAdapter) -> str:
    """The folder name a published lens for this model has: its Hugging Face id."""
    from lenskit.lenses.tuned import _base_model_name

    return _base_model_name(adapter)


def _download(resource: str, local_only: bool) -> Path:
    from huggingface_hub import hf_hub_download

    repo, kind = hub_repo()
    paths = [
        hf_hub_download(
            repo_id=repo,
            filename=name,
            subfolder=f"{_SUBFOLDER}/{resource}",
            repo_type=kind,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            local_files_only=local_only,
        )
        for name in _FILES
    ]
    return Path(paths[0]).parent


def fetch_hub_lens(resource: str) -> Path:
    """The folder of the published lens ``lens/<resource>``: downloaded, or from the cache.

    Args:
        resource: The model's Hugging Face id, e.g. ``gpt2`` or ``EleutherAI/pythia-160m``.

    Returns:
        A folder holding ``config.json`` and ``params.pt``.

    Raises:
        LenskitError: When the repository has no lens for ``resource``, or the hub is
            unreachable and the local cache has no copy (one line each).
    """
    from huggingface_hub import errors

    repo, _ = hub_repo()
    where = f"{repo}/{_SUBFOLDER}/{resource}"
    train = f"train one with `lenskit train --model {resource} --out DIR` and use tuned:DIR"
    if models._hub_reachable():
        try:
            return _download(resource, local_only=False)
        except (errors.EntryNotFoundError, errors.RepositoryNotFoundError) as err:
            raise LenskitError(f"no tuned lens is published at {where}: {train}") from err
        except (errors.HfHubHTTPError, OSError, ValueError):
            pass  # the hub answered badly: a cached copy still serves
    try:
        return _download(resource, local_only=True)
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, OSError) as err:
        raise LenskitError(
            f"the hub is unreachable and the local Hugging Face cache has no copy of "
            f"{where}: connect once to download it, or {train}"
        ) from err


def load_hub_lens(cls: Any, model: Any) -> Any:
    """Load the published tuned lens for ``model`` (``path="hub"``), its hash checked first.

    Args:
        cls: The tuned-lens class (:class:`~lenskit.lenses.tuned.TunedLens`).
        model: A ``TransformerBridge``.

    Returns:
        The lens; its ``source`` reads ``hub:<repo>/lens/<model id>``.

    Raises:
        LenskitError: For no lens, no connection and no cached copy, or a lens whose
            ``unembed_hash`` is not this model's.
    """
    adapter = ModelAdapter(model)
    resource = hub_lens_id(adapter)
    folder = fetch_hub_lens(resource)
    try:
        config = json.loads((folder / _FILES[0]).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LenskitError(
            f"the cached {_FILES[0]} of the published lens for {resource} is unreadable "
            f"({type(err).__name__}): delete it from the hub cache to download it again"
        ) from err
    expected = config.get("unembed_hash") if isinstance(config, dict) else None
    if expected and expected not in _model_hashes(adapter):
        raise LenskitError(
            f"the published tuned lens for {resource} was trained with another unembedding "
            f"(unembed_hash {str(expected)[:12]}… does not match {adapter.name}'s): use the "
            "exact model it was trained for, or train a lens for this one"
        )
    lens = cls.load(model, folder)
    repo, _ = hub_repo()
    lens.source = f"hub:{repo}/{_SUBFOLDER}/{resource}"
    lens.info["unembed_hash"] = "checked" if expected else "not recorded"
    return lens
