"""Long runs the app starts, with progress: evaluation, training, causal-basis extraction.

Each reports to the page as it goes (a progress bar or a callback) and writes only into
the output folder the page checked with :mod:`lenskit_app.paths`; an evaluation is cached
on every input (a corpus also on its files' sizes and times).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import streamlit as st

from lenskit.errors import LenskitError
from lenskit_app.loaders import causal_basis, direction_tokens, load_lens, load_model
from lenskit_app.paths import folder_name
from lenskit_app.state import CAUSAL_KIND, model_key


def eta_text(seconds: float) -> str:
    """``seconds`` as ``1 min 05 s`` (``—`` when unknown)."""
    if seconds != seconds or seconds == float("inf"):
        return "—"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


# --- evaluation -------------------------------------------------------------------------

EVAL_PARTIAL = "lenskit_eval_partial"  # the result of the batches finished so far


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
    bar = st.progress(0.0, text="Reading and tokenizing the corpus…")
    st.session_state.pop(EVAL_PARTIAL, None)

    def show(p: Any) -> None:  # each draw is where a Stop click interrupts the run
        bar.progress(
            p.fraction,
            text=f"Evaluating: {p.done:,} / {p.total:,} tokens · "
            f"{p.tokens_per_s:,.0f} tokens/s · {eta_text(p.eta_seconds)} left",
        )

    def keep(result: Any) -> None:  # the batches finished so far survive a Stop
        st.session_state[EVAL_PARTIAL] = result

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
            on_result=keep,
        )
    finally:
        bar.empty()


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


def unfinished_runs(name: str) -> list[Any]:
    """Unfinished training runs for ``name`` in the allowed folders' ``lenses/<model>/``."""
    from lenskit.training import unfinished_runs as find
    from lenskit_app.paths import allowed_roots, is_allowed, lens_home

    homes = {lens_home(name), *(r / "lenses" / folder_name(name) for r in allowed_roots())}
    return [r for r in find(sorted(homes)) if is_allowed(r.path)]


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
