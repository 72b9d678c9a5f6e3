"""The app's cached loaders and session-state keys, in one place.

Every cached object is keyed on every argument that changes it: the model on
(name, device, dtype), a lens on (kind, model key, path), a trajectory on all of
its inputs. Changing the prompt never reloads the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import streamlit as st

import lenskit
from lenskit.errors import LenskitError
from lenskit.models import DEFAULT_MODEL, model_names

T = TypeVar("T")

# Session-state keys.
MODEL = "lenskit_model"
PROMPT = "lenskit_prompt"
DEVICE = "lenskit_device"
DTYPE = "lenskit_dtype"
LENS_PATHS = "lenskit_lens_paths"  # {kind: path} chosen by the user

DEFAULT_PROMPT = "The capital of France is Paris. The capital of Germany is"
MAX_PROMPT_TOKENS = 512


def init_state() -> None:
    """Fill in defaults for every session key (the embedded model preselected)."""
    st.session_state.setdefault(MODEL, DEFAULT_MODEL)
    st.session_state.setdefault(PROMPT, DEFAULT_PROMPT)
    st.session_state.setdefault(DEVICE, "cpu")
    st.session_state.setdefault(DTYPE, "float32")
    st.session_state.setdefault(LENS_PATHS, {})


def model_key() -> tuple[str, str, str]:
    """(name, device, dtype) of the session's model: the model cache key."""
    init_state()
    return (st.session_state[MODEL], st.session_state[DEVICE], st.session_state[DTYPE])


def known_models() -> list[str]:
    """Model names offered in pickers."""
    return model_names()


@st.cache_resource(show_spinner="Loading the model (the first start converts it, ~45 s)…")
def load_model(name: str, device: str, dtype: str) -> Any:
    """The model, cached on everything that changes it."""
    return lenskit.load_model(name, device=device, dtype=dtype)


@st.cache_resource(show_spinner="Loading the lens…")
def load_lens(kind: str, name: str, device: str, dtype: str, path: str | None) -> Any:
    """A lens for the cached model, keyed on the lens kind, path and the model key."""
    model = load_model(name, device, dtype)
    options = {"path": path} if path else {}
    return lenskit.get_lens(kind, model, **options)


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
) -> lenskit.Trajectory:
    """A trajectory, cached on the model key, the lens and every input."""
    model = load_model(name, device, dtype)
    lens = load_lens(kind, name, device, dtype, path)
    return lenskit.trajectory(model, lens, prompt, target=target or None, top_k=top_k)


def lens_path(kind: str) -> str | None:
    """The lens file the user chose for ``kind`` (None: the kind's default)."""
    init_state()
    return st.session_state[LENS_PATHS].get(kind) or None


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


def report(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Call ``fn``; show a bad-input error as ``st.error`` and return None, no traceback."""
    try:
        return fn(*args, **kwargs)
    except LenskitError as err:
        st.error(str(err))
        return None


def guard(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn``; show a bad-input error as ``st.error`` and stop the page, no traceback."""
    try:
        return fn(*args, **kwargs)
    except LenskitError as err:
        st.error(str(err))
        st.stop()
        raise  # st.stop() raises; this line is never reached


def adapter(model: Any) -> lenskit.ModelAdapter:
    """The model's adapter (layer layout, vocabulary) for display."""
    return lenskit.ModelAdapter(model)


def count_tokens(model: Any, prompt: str) -> int:
    """Tokens in ``prompt`` (with BOS), refusing empty and over-long prompts in one line."""
    from lenskit.residual import tokenize

    n = int(tokenize(model, prompt).shape[-1])
    if n > MAX_PROMPT_TOKENS:
        raise LenskitError(
            f"the prompt is {n} tokens; the app reads at most {MAX_PROMPT_TOKENS}: shorten it"
        )
    return n


@st.cache_data(show_spinner="Comparing the two lenses cell by cell…", max_entries=32)
def divergence(
    kind_a: str,
    path_a: str | None,
    kind_b: str,
    path_b: str | None,
    name: str,
    device: str,
    dtype: str,
    prompt: str,
) -> Any:
    """KL, Jensen-Shannon and total variation between two lenses, cached on every input."""
    from lenskit.comparison import lens_divergence

    model = load_model(name, device, dtype)
    lens_a = load_lens(kind_a, name, device, dtype, path_a)
    lens_b = load_lens(kind_b, name, device, dtype, path_b)
    return lens_divergence(model, lens_a, lens_b, prompt)


def ready_lenses(name: str, device: str, dtype: str) -> list[str]:
    """Lens kinds that load for the session's model."""
    return [k for k, v in lens_status(name, device, dtype).items() if v == "ready"]


def prompt_section() -> tuple[tuple[str, str, str], Any, str, int]:
    """The shared top of a page: the session's model and an editable prompt, checked.

    Returns:
        ``(model_key, model, prompt, n_tokens)``; a bad prompt stops the page with an error.
    """
    key = model_key()
    model = guard(load_model, *key)
    prompt = st.text_area("Prompt", value=st.session_state[PROMPT], height=80)
    st.session_state[PROMPT] = prompt
    n_tokens = guard(count_tokens, model, prompt)
    return key, model, prompt, n_tokens
