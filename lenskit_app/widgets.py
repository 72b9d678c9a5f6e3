"""Form sections every page shares: the prompt, the model box, corpus and lens pickers.

A text box is bound to a widget key filled from the session before it is drawn, and an
edit is copied back before the page reruns, so no edit is ever lost. A path section
checks what is typed in place and shows its error there; :func:`form_blocked` tells the
page to keep its Run button disabled meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import streamlit as st

from lenskit.errors import LenskitError
from lenskit.models import model_names
from lenskit_app.loaders import load_model
from lenskit_app.paths import corpus_path, describe_roots, folder_name, lens_file, saved_lenses
from lenskit_app.state import (
    CAUSAL_KIND,
    HUB,
    LENS_PATHS,
    MODEL,
    PATH_KINDS,
    PROMPT,
    guard,
    init_state,
    model_key,
    report,
)

T = TypeVar("T")

MAX_PROMPT_TOKENS = 512
_PROMPT_BOX = "lenskit_prompt_box"  # the text box's widget key (see prompt_box)
_MODEL_BOX = "lenskit_model_box"  # the Home page's model folder / Hugging Face id box


def known_models() -> list[str]:
    """Model names offered in pickers."""
    return model_names()


def count_tokens(model: Any, prompt: str) -> int:
    """Tokens in ``prompt`` (with BOS), refusing empty and over-long prompts in one line."""
    from lenskit.residual import tokenize

    n = int(tokenize(model, prompt).shape[-1])
    if n > MAX_PROMPT_TOKENS:
        raise LenskitError(
            f"the prompt is {n} tokens; the app reads at most {MAX_PROMPT_TOKENS}: shorten it"
        )
    return n


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


def _keep_model() -> None:
    text = st.session_state[_MODEL_BOX].strip()
    if text:
        st.session_state[MODEL] = text


def model_box(models: list[str]) -> str:
    """The box for a model folder or Hugging Face id, bound like :func:`prompt_box`.

    Filled from the session's model (when it is not one of ``models``) before it is
    drawn and copied back on change, so every edit is kept, the second as the first.
    """
    init_state()
    current = st.session_state[MODEL]
    st.session_state[_MODEL_BOX] = "" if current in models else current
    return st.text_input("Model folder or Hugging Face id", key=_MODEL_BOX, on_change=_keep_model)


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


# --- paths: corpora and lens files under the allowed folders -----------------------


_FORM_ERRORS = "lenskit_form_errors"  # {section key: the error shown there this run}


def form_blocked(prefix: str) -> bool:
    """Whether a path section whose key starts with ``prefix`` shows an error now.

    Pages disable their Run / Start button with it: the form stays in view, and
    nothing runs on a path that failed its check.
    """
    return any(k.startswith(prefix) and v for k, v in _form_errors().items())


def _form_errors() -> dict[str, str | None]:
    return st.session_state.setdefault(_FORM_ERRORS, {})


def checked_path(check: Callable[[str], T], text: str, key: str) -> T | None:
    """``check(text)``, or None with its error shown in place (the page goes on).

    The error is remembered under ``key`` for :func:`form_blocked` until the next
    check of the same section.
    """
    try:
        value = check(text)
    except LenskitError as err:
        st.error(str(err))
        _form_errors()[key] = str(err)
        return None
    _form_errors()[key] = None
    return value


_BUILTIN_LABELS = {"builtin:mix": "Mixed text", "builtin:shakespeare": "Shakespeare"}
_MIX_HELP = (
    "Mixed text: Shakespeare's plays (all but those the Evaluate page holds out), the "
    "Python language reference and standard-library docstrings, in equal shares."
)


def corpus_section(key: str, *, default: str | None = None) -> str | None:
    """The corpus picker: a built-in corpus or a typed path, checked.

    ``default`` None offers the default corpus (Shakespeare, returned as None) or a path;
    a built-in ``default`` (``builtin:mix`` or ``builtin:shakespeare``, from the page's
    config) offers both built-ins, that one first, and returns the ``builtin:NAME`` chosen.
    A bad or missing path shows its error (or a hint) in place and returns None; the rest
    of the form stays, and :func:`form_blocked` tells the page to keep Run disabled.
    """
    if default is None:
        named: dict[str, str | None] = {"Shakespeare (default)": None}
    else:
        others = {label: src for src, label in _BUILTIN_LABELS.items() if src != default}
        named = {f"{_BUILTIN_LABELS[default]} (default)": default, **others}
    choice = st.radio(
        "Corpus",
        [*named, "File or folder"],
        horizontal=True,
        key=f"{key}_corpus_kind",
        help=None if default is None else _MIX_HELP,
    )
    if choice in named:
        _form_errors()[f"{key}_corpus"] = None
        return named[choice]
    text = st.text_input(
        "Corpus path",
        key=f"{key}_corpus_path",
        help="A .txt or .md file (one document), a .jsonl file (one document per line, in "
        "a 'text' field) or a folder of them, under " + describe_roots(),
    )
    if not text.strip():
        st.info("Type the path of a file or folder, or choose the default corpus.")
        _form_errors()[f"{key}_corpus"] = "no corpus path"
        return None
    return checked_path(corpus_path, text, f"{key}_corpus")


_DEFAULT, _OTHER = "", "<other>"


def lens_files_section(name: str) -> None:
    """Per file-backed lens kind, a picker: the default, a saved lens, or a typed path."""
    init_state()
    paths = st.session_state[LENS_PATHS]
    for kind in PATH_KINDS:
        current = paths.get(kind) or _DEFAULT
        saved = saved_lenses(name, kind)
        options = [_DEFAULT, *([HUB] if kind == "tuned" else []), *saved]
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
                else "published by the tuned-lens project (hub, or its local cache)"
                if o == HUB
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


def sublayer_points(adapter: Any, key: str = "sublayer_rows") -> tuple[str, ...]:
    """A "Sub-layer rows" checkbox (families with a stream between attention and MLP).

    Returns:
        The points each block is read at: ``("resid_pre",)``, or with the box ticked
        ``("resid_pre", "resid_mid")`` (rows ``L12`` and ``L12.mid``).
    """
    if not adapter.has_mid:
        return ("resid_pre",)
    ticked = st.checkbox(
        "Sub-layer rows (attention → MLP)",
        key=key,
        help="Also read the stream between each block's attention and its MLP (rows "
        "L12.mid): 2 rows per block. The lens needs maps for them (the logit lens reads "
        "them as they are; a tuned lens needs `lenskit train --points resid_pre,resid_mid`).",
    )
    return ("resid_pre", "resid_mid") if ticked else ("resid_pre",)
