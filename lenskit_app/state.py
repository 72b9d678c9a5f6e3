"""The app's cached loaders and session-state keys, in one place.

Every cached object is keyed on every argument that changes it: the model on
(name, device, dtype), a lens on (kind, model key, path), a trajectory or an evaluation
on all of its inputs (a corpus also on its files' sizes and times). Changing the prompt
never reloads the model. Every path a user types goes through ``lenskit_app.paths``, which
refuses anything outside the allowed folders.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import streamlit as st

import lenskit
from lenskit.errors import LenskitError
from lenskit.models import DEFAULT_MODEL, model_names
from lenskit_app.paths import corpus_path, describe_roots, folder_name, lens_file, saved_lenses

T = TypeVar("T")

# Session-state keys.
MODEL = "lenskit_model"
PROMPT = "lenskit_prompt"
_PROMPT_BOX = "lenskit_prompt_box"  # the text box's widget key (see prompt_box)
DEVICE = "lenskit_device"
DTYPE = "lenskit_dtype"
LENS_PATHS = "lenskit_lens_paths"  # {kind: path} chosen by the user
TRAIN = "lenskit_train"  # the last training run: {"out", "model", "status", ...}
EVAL = "lenskit_eval"  # the inputs of the last evaluation run (a dict)
CAUSAL_RUN = "lenskit_causal_run"  # the last causal basis extraction: {"out", "status", ...}

CAUSAL_KIND = "tuned-with-causal-basis"
PATH_KINDS = ("tuned", "jacobian", CAUSAL_KIND)  # lens kinds read from a file or folder

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
    rows: tuple[int, ...] | None = None,
    positions: tuple[int, int] | None = None,
) -> lenskit.Trajectory:
    """A trajectory of the shown rows and positions, cached on every input."""
    model = load_model(name, device, dtype)
    lens = load_lens(kind, name, device, dtype, path)
    return lenskit.trajectory(
        model, lens, prompt, target=target or None, top_k=top_k, rows=rows, positions=positions
    )


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
) -> Any:
    """Several lenses' trajectories and a pair's divergence on the shown cells, cached on all."""
    from lenskit.comparison import compare

    model = load_model(name, device, dtype)
    lenses = [load_lens(k, name, device, dtype, p) for k, p in zip(kinds, paths, strict=True)]
    return compare(
        model,
        lenses,
        prompt,
        pair=(kinds.index(pair[0]), kinds.index(pair[1])),
        rows=rows,
        positions=positions,
    )


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


def ready_lenses(name: str, device: str, dtype: str) -> list[str]:
    """Lens kinds that load for the session's model."""
    return [k for k, v in lens_status(name, device, dtype).items() if v == "ready"]


def _keep_prompt() -> None:
    st.session_state[PROMPT] = st.session_state[_PROMPT_BOX]


def prompt_box(height: int) -> str:
    """The prompt's text box, shared by every page: an edit is kept for the whole session.

    The box is bound to a widget key that is filled from the session's prompt before it is
    drawn, and an edit is copied back before the page reruns, so no edit is ever lost
    (a box whose ``value=`` changes between runs would be a new widget and drop the
    next edit).
    """
    init_state()
    st.session_state[_PROMPT_BOX] = st.session_state[PROMPT]
    return st.text_area("Prompt", key=_PROMPT_BOX, height=height, on_change=_keep_prompt)


def prompt_section() -> tuple[tuple[str, str, str], Any, str, int]:
    """The shared top of a page: the session's model and an editable prompt, checked.

    Returns:
        ``(model_key, model, prompt, n_tokens)``; a bad prompt stops the page with an error.
    """
    key = model_key()
    model = guard(load_model, *key)
    prompt = prompt_box(height=80)
    n_tokens = guard(count_tokens, model, prompt)
    return key, model, prompt, n_tokens


# --- files: lenses and corpora under the allowed folders ------------------------------


def corpus_section(key: str) -> str | None:
    """The corpus picker: the default corpus (None) or a typed path, checked.

    A bad path stops the page with the error and its fix.
    """
    choice = st.radio(
        "Corpus",
        ["Shakespeare (default)", "File or folder"],
        horizontal=True,
        key=f"{key}_corpus_kind",
    )
    if choice.startswith("Shakespeare"):
        return None
    text = st.text_input(
        "Corpus path",
        key=f"{key}_corpus_path",
        help="A .txt or .md file (one document), a .jsonl file (one document per line, in "
        "a 'text' field) or a folder of them, under " + describe_roots(),
    )
    if not text.strip():
        st.info("Type the path of a file or folder, or choose the default corpus.")
        st.stop()
    return guard(corpus_path, text)


_DEFAULT, _OTHER = "", "<other>"


def lens_files_section(name: str) -> None:
    """Per file-backed lens kind, a picker: the default, a saved lens, or a typed path."""
    init_state()
    paths = st.session_state[LENS_PATHS]
    for kind in PATH_KINDS:
        current = paths.get(kind) or _DEFAULT
        saved = saved_lenses(name, kind)
        options = [_DEFAULT, *saved]
        other_key = f"lens_other_{kind}"
        if current not in options:
            st.session_state[other_key] = True
        options.append(_OTHER)
        index = len(options) - 1 if st.session_state.get(other_key) else options.index(current)
        pick = st.selectbox(
            f"{kind} lens",
            options,
            index=index,
            format_func=lambda o: (
                "default (shipped for this model, if any)"
                if o == _DEFAULT
                else "another path…"
                if o == _OTHER
                else o
            ),
            help=f"Lenses saved under lenses/{folder_name(name)}/ in the allowed folders are "
            f"listed; the {'Causal basis' if kind == CAUSAL_KIND else 'Train'} page saves there.",
        )
        st.session_state[other_key] = pick == _OTHER
        if pick != _OTHER:
            paths[kind] = pick or None
            continue
        text = st.text_input(
            f"Path of the {kind} lens",
            value="" if current == _DEFAULT else current,
            key=f"lens_path_{kind}",
        )
        if text.strip():
            checked = report(lens_file, text)
            if checked is not None:
                paths[kind] = checked


# --- evaluation -------------------------------------------------------------------------


@st.cache_data(show_spinner=False, max_entries=16)
def evaluation(
    name: str,
    device: str,
    dtype: str,
    lenses: tuple[tuple[str, str | None], ...],
    corpus: str | None,
    stamp: tuple[int, int, int],
    tokens: int,
    seq_len: int,
    held_out: float | None,
    seed: int,
) -> Any:
    """Per-layer metrics of ``(kind, path)`` lenses over a corpus, with a progress bar.

    Cached on every input; ``stamp`` (:func:`corpus_stamp`) notices a changed corpus.
    """
    from lenskit.evaluation import evaluate

    model = load_model(name, device, dtype)
    named = {kind: load_lens(kind, name, device, dtype, path) for kind, path in lenses}
    bar = st.progress(0.0, text="Reading the corpus…")

    def show(p: Any) -> None:
        bar.progress(
            p.fraction,
            text=f"Evaluating: {p.done:,} / {p.total:,} tokens · "
            f"{p.tokens_per_s:,.0f} tokens/s · {eta_text(p.eta_seconds)} left",
        )

    try:
        return evaluate(
            model,
            named,
            corpus,
            tokens=tokens,
            seq_len=seq_len,
            held_out=held_out,
            seed=seed,
            progress=False,
            on_progress=show,
        )
    finally:
        bar.empty()


def eta_text(seconds: float) -> str:
    """``seconds`` as ``1 min 05 s`` (``—`` when unknown)."""
    if seconds != seconds or seconds == float("inf"):
        return "—"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


# --- training ---------------------------------------------------------------------------


@st.cache_data(show_spinner=False, max_entries=8)
def checkpoint_config(out: str, mtime_ns: int) -> Any:
    """The settings of the unfinished run in ``out`` (cached on the checkpoint's time)."""
    from lenskit.training import checkpoint_config as read

    return read(out)


def train_lens(
    model: Any, config: Any, out: Path, *, resume: bool, on_progress: Callable[[Any], None]
) -> Any:
    """Train a tuned lens into ``out`` (created here), reporting to ``on_progress``."""
    from lenskit.training import train_tuned_lens

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LenskitError(
            f"cannot create {out} ({err.strerror or type(err).__name__}): choose a writable folder"
        ) from err
    return train_tuned_lens(
        model, config, out, resume=resume, progress=False, on_progress=on_progress
    )


# --- causal basis extraction ----------------------------------------------------------


def extract_basis(
    model: Any,
    tuned: Any,
    layer: int,
    config: Any,
    corpus: str | None,
    out: Path,
    *,
    on_progress: Callable[[Any], None],
) -> Any:
    """Extract ``layer``'s causal basis into the folder ``out`` (created here).

    The cached causal-basis lens of ``out`` and the cached bases and tokens are dropped
    afterwards (also after a stop), so every page reads the folder as it now is.
    """
    from lenskit.causal.extraction import extract_causal_basis
    from lenskit.lenses.basis import INDEX_FILE

    if out.is_dir() and not (out / INDEX_FILE).is_file() and any(out.iterdir()):
        raise LenskitError(
            f"{out} holds other files and no causal basis: choose a new folder or a basis folder"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LenskitError(
            f"cannot create {out} ({err.strerror or type(err).__name__}): choose a writable folder"
        ) from err
    try:
        return extract_causal_basis(
            model, tuned, [layer], config, corpus, out=out, progress=False, on_progress=on_progress
        )[layer]
    finally:
        load_lens.clear(CAUSAL_KIND, *model_key(), str(out))
        causal_basis.clear()
        direction_tokens.clear()
