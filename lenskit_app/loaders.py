"""The app's cached loaders: the model, lenses and the readouts pages show.

Every cached object is keyed on every argument that changes it: the model on
(name, device, dtype), a lens on (kind, model key, path), a trajectory or a comparison
on all of its inputs. Changing the prompt never reloads the model. Every path goes
through :mod:`lenskit_app.paths`, which refuses anything outside the allowed folders.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

import lenskit
from lenskit.errors import LenskitError
from lenskit_app.paths import check_model, lens_options
from lenskit_app.state import CAUSAL_KIND, lens_path


@st.cache_resource(show_spinner="Loading the model (the first start converts it, ~45 s)…")
def load_model(name: str, device: str, dtype: str) -> Any:
    """The model, cached on everything that changes it; a folder must lie in the allowed ones."""
    return lenskit.load_model(check_model(name), device=device, dtype=dtype)


@st.cache_resource(show_spinner="Loading the lens…")
def load_lens(kind: str, name: str, device: str, dtype: str, path: str | None) -> Any:
    """A lens for the cached model, keyed on the lens kind, path and the model key."""
    options = lens_options(kind, path)  # the path, and every path its files name, checked
    model = load_model(name, device, dtype)
    return lenskit.get_lens(kind, model, **options)


def adapter(model: Any) -> lenskit.ModelAdapter:
    """The model's adapter (layer layout, vocabulary) for display."""
    return lenskit.ModelAdapter(model)


def lens_status(name: str, device: str, dtype: str) -> dict[str, str]:
    """For each registered lens kind: "ready" or the one-line reason it is not."""
    status = {}
    for kind in lenskit.available_lenses():
        try:
            load_lens(kind, name, device, dtype, lens_path(kind))
            status[kind] = "ready"
        except LenskitError as err:
            status[kind] = str(err)
    return status


def ready_lenses(name: str, device: str, dtype: str) -> list[str]:
    """Lens kinds that load for the session's model."""
    return [k for k, v in lens_status(name, device, dtype).items() if v == "ready"]


@st.cache_data(show_spinner="Reading the prompt through the lens…", max_entries=64)
def trajectory(
    kind: str,
    name: str,
    device: str,
    dtype: str,
    path: str | None,
    prompt: str,
    target: str | None,
    top_k: int,
    rows: tuple[int, ...] | None = None,
    positions: tuple[int, int] | None = None,
    points: tuple[str, ...] = ("resid_pre",),
) -> lenskit.Trajectory:
    """A trajectory of the shown rows and positions, cached on every input."""
    model = load_model(name, device, dtype)
    lens = load_lens(kind, name, device, dtype, path)
    return lenskit.trajectory(
        model,
        lens,
        prompt,
        target=target or None,
        top_k=top_k,
        rows=rows,
        positions=positions,
        points=points,
    )


@st.cache_data(show_spinner="Reading the prompt through the lenses…", max_entries=32)
def comparison(
    kinds: tuple[str, ...],
    paths: tuple[str | None, ...],
    pair: tuple[str, str],
    name: str,
    device: str,
    dtype: str,
    prompt: str,
    rows: tuple[int, ...] | None = None,
    positions: tuple[int, int] | None = None,
    target: str | int | None = None,
    points: tuple[str, ...] = ("resid_pre",),
) -> Any:
    """Several lenses' trajectories and a pair's divergence on the shown cells, cached on all.

    ``pair`` may be empty (no divergence); ``target`` follows a token in every lens.
    """
    from lenskit.comparison import compare

    model = load_model(name, device, dtype)
    lenses = [load_lens(k, name, device, dtype, p) for k, p in zip(kinds, paths, strict=True)]
    return compare(
        model,
        lenses,
        prompt,
        pair=(kinds.index(pair[0]), kinds.index(pair[1])) if pair else None,
        target=None if target in (None, "") else target,
        rows=rows,
        positions=positions,
        points=points,
    )


@st.cache_data(show_spinner="Attributing the prediction to attention and MLP…", max_entries=32)
def attribution(
    kinds: tuple[str, ...],
    paths: tuple[str | None, ...],
    name: str,
    device: str,
    dtype: str,
    prompt: str,
    position: int,
    target: int,
) -> list[Any]:
    """Each lens's per-component attribution of one position's target, cached on all."""
    from lenskit.attribution import attribute

    model = load_model(name, device, dtype)
    lenses = [load_lens(k, name, device, dtype, p) for k, p in zip(kinds, paths, strict=True)]
    return [attribute(model, lens, prompt, target, position=position) for lens in lenses]


@st.cache_data(show_spinner="Reading the causal basis…", max_entries=32)
def causal_basis(source: str, layer: int) -> Any:
    """One layer of a causal basis folder, cached on the folder and layer."""
    from lenskit.lenses.basis import CausalBasis

    return CausalBasis.load(source, layer)


@st.cache_data(show_spinner="Finding the tokens each direction moves…", max_entries=32)
def direction_tokens(
    name: str, device: str, dtype: str, path: str | None, layer: int, top: int
) -> Any:
    """Tokens each causal direction of ``layer`` promotes and suppresses, cached on all inputs."""
    from lenskit.causal.influence import direction_tokens as tokens_of

    model = load_model(name, device, dtype)
    lens = load_lens(CAUSAL_KIND, name, device, dtype, path)
    return tokens_of(lens.tuned, causal_basis(lens.source, layer), model.tokenizer, top=top)
