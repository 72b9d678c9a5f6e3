"""The app's session: state keys, the session's choices, and bad input shown in the page.

The other app modules: :mod:`lenskit_app.loaders` (the cached model, lenses and readouts),
:mod:`lenskit_app.widgets` (the form sections pages share), :mod:`lenskit_app.jobs` (long
runs with progress: evaluation, training, causal-basis extraction) and
:mod:`lenskit_app.paths` (the folders the app may read and write).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import streamlit as st

from lenskit.errors import LenskitError
from lenskit.lenses import file_lenses
from lenskit.models import DEFAULT_MODEL

T = TypeVar("T")

# Session-state keys.
MODEL = "lenskit_model"
PROMPT = "lenskit_prompt"
DEVICE = "lenskit_device"
DTYPE = "lenskit_dtype"
LENS_PATHS = "lenskit_lens_paths"  # {kind: path} chosen by the user
TRAIN = "lenskit_train"  # the last training run: {"out", "model", "status", ...}
EVAL = "lenskit_eval"  # the inputs of the last evaluation run (a dict)
CAUSAL_RUN = "lenskit_causal_run"  # the last causal basis extraction: {"out", "status", ...}

CAUSAL_KIND = "tuned-with-causal-basis"
PATH_KINDS = tuple(file_lenses())  # lens kinds read from a file or folder
HUB = "hub"  # a lens path meaning: the tuned lens the tuned-lens project publishes

DEFAULT_PROMPT = "The capital of France is Paris. The capital of Germany is"


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


def lens_path(kind: str) -> str | None:
    """The lens file the user chose for ``kind`` (None: the kind's default)."""
    init_state()
    return st.session_state[LENS_PATHS].get(kind) or None


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
