"""Fitting a J-lens with TransformerLens's ``JacobianLens.fit``, resumable prompt by prompt.

TransformerLens fits the lens in one call over all prompts and combines separately fitted
lenses with ``JacobianLens.merge`` (a mean weighted by prompt counts). lenskit calls
``fit`` on one prompt at a time and merges each into the running lens, so after every
prompt the lens so far is written atomically (fp32) to ``OUT.partial``: Ctrl-C loses at
most the prompt in progress, and the same call with ``resume=True`` continues from there.
The finished lens replaces ``OUT`` and the partial file is removed; a later call with more
prompts extends ``OUT`` the same way. The merged running mean equals one ``fit`` over all
the prompts up to float32 rounding.

Prompts: from a corpus, :func:`lenskit.data.tokenize_corpus` chunks of ``seq_len - 1``
tokens, taken in a fixed random order (``seed``), decoded to text; TransformerLens adds the
BOS token and re-tokenizes, so each prompt is about ``seq_len`` tokens. Prompt ``i`` does
not depend on ``n_prompts``. Or pass the prompt texts themselves.

Example:
    >>> import lenskit, tempfile
    >>> from lenskit.training.jacobian import fit_jacobian_lens
    >>> model = lenskit.load_model("tiny-llama")
    >>> out = tempfile.mkdtemp() + "/lens.pt"
    >>> lens = fit_jacobian_lens(model, ["the cat sat on the mat " * 4], n_prompts=1,
    ...                          seq_len=24, out=out, progress=False)
    >>> lens.kind
    'jacobian'
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lenskit.data import Corpus, batch_indices, load_corpus, tokenize_corpus
from lenskit.errors import LenskitError
from lenskit.io import atomic_open
from lenskit.lenses.jacobian import JLens, lenskit_metadata, resolve_path
from lenskit.models import ModelAdapter, model_lock
from lenskit.progress import deferred_interrupt

if TYPE_CHECKING:
    from transformer_lens.tools.analysis import JacobianLens as TLJacobianLens

__all__ = ["PROGRESS_KEY", "fit_jacobian_lens", "fit_prompts", "partial_path"]

PROGRESS_KEY = "lenskit_progress"  # metadata: prompts done, their hash, seconds
_SETTINGS = (
    "transformer_lens_version",
    "model_name",
    "corpus",
    "dim_batch",
    "max_seq_len",
    "skip_first_positions",
    "fit_dtype",
    "lenskit",
)


def partial_path(out: str | Path) -> Path:
    """The running checkpoint kept beside ``out`` while a fit is unfinished."""
    file = resolve_path(out)
    return file.with_name(file.name + ".partial")


def _prompt_hash(prompts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(prompt.encode("utf-8") + b"\x00")
    return digest.hexdigest()


def fit_prompts(
    model: Any,
    data: Corpus | str | os.PathLike[str] | None,
    *,
    n_prompts: int,
    seq_len: int,
    seed: int = 0,
) -> tuple[list[str], str]:
    """The first ``n_prompts`` prompt texts of a corpus, in the fit's fixed order.

    Args:
        model: The model (its tokenizer cuts the chunks).
        data: A :class:`~lenskit.data.Corpus`, or a source for :func:`lenskit.data.load_corpus`
            (None: the default Shakespeare corpus).
        n_prompts: How many prompts.
        seq_len: Tokens per prompt with BOS (chunks hold ``seq_len - 1``).
        seed: Seed of the chunk order.

    Returns:
        The prompts and the corpus name.
    """
    corpus = data if isinstance(data, Corpus) else load_corpus(data)
    chunks = tokenize_corpus(corpus, model.tokenizer, seq_len - 1)
    if n_prompts > len(chunks):
        raise LenskitError(
            f"{corpus.name} has only {len(chunks)} chunks of {seq_len - 1} "
            f"tokens, fewer than {n_prompts} prompts: lower --prompts or --seq-len"
        )
    order = batch_indices(len(chunks), n_prompts, seed=seed, step=0)
    decode = model.tokenizer.decode
    return [decode(chunks.tokens[i].tolist()) for i in order], corpus.name


def _check_args(
    adapter: ModelAdapter, n_prompts: int, seq_len: int, dim_batch: int, skip_first_positions: int
) -> None:
    if n_prompts < 1:
        raise LenskitError(f"n_prompts must be >= 1, got {n_prompts}: fit on at least one prompt")
    if dim_batch < 1:
        raise LenskitError(f"dim_batch must be >= 1, got {dim_batch}: pass a positive number")
    if skip_first_positions < 0:
        raise LenskitError(f"skip_first_positions must be >= 0, got {skip_first_positions}")
    if not skip_first_positions + 2 <= seq_len <= adapter.n_ctx:
        raise LenskitError(
            f"seq_len {seq_len} must be in {skip_first_positions + 2}..{adapter.n_ctx}: the fit "
            f"skips the first {skip_first_positions} positions and the last; {adapter.name} "
            f"reads at most {adapter.n_ctx} tokens"
        )
    if adapter.n_layers < 2:
        raise LenskitError(
            f"{adapter.name} has one block, so a J-lens has no matrices: use the logit lens"
        )


def _short_prompts(model: Any, prompts: Sequence[str], need: int) -> None:
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise LenskitError(f"prompt {i} is a {type(prompt).__name__}, not text: give strings")
        n = int(model.to_tokens(prompt).shape[-1])
        if n < need:
            raise LenskitError(
                f"prompt {i} is {n} tokens with BOS, the fit needs >= {need}: "
                "give longer prompts or lower skip_first_positions"
            )


def _load_state(
    file: Path, model: Any, expected: dict[str, Any], prompts: Sequence[str], n_prompts: int
) -> TLJacobianLens:
    """Read a partial or finished fit and check it continues this one."""
    from transformer_lens.tools.analysis import JacobianLens as TLJacobianLens

    fix = "pass the same settings, another out, or resume=False (--no-resume)"
    try:
        state = TLJacobianLens.load(str(file))
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise LenskitError(
            f"{file} is not a readable J-lens ({first}): delete it or pass "
            "resume=False (--no-resume)"
        ) from err
    progress = state.metadata.get(PROGRESS_KEY)
    if not isinstance(progress, dict) or not isinstance(progress.get("prompts_done"), int):
        raise LenskitError(
            f"{file} was not written by lenskit's fit, so it cannot be resumed: "
            "pass another out or resume=False (--no-resume)"
        )
    for key in _SETTINGS:
        if state.metadata.get(key) != expected.get(key):
            raise LenskitError(
                f"{file} was fitted with {key}={state.metadata.get(key)!r}, "
                f"this fit has {expected.get(key)!r}: {fix}"
            )
    done = progress["prompts_done"]
    if done > n_prompts:
        raise LenskitError(
            f"{file} already holds a fit on {done} prompts, more than the "
            f"{n_prompts} asked for: ask for >= {done}, or {fix}"
        )
    if progress.get("prompts_sha256") != _prompt_hash(prompts[:done]):
        raise LenskitError(
            f"the first {done} prompts differ from those {file} was fitted on: {fix}"
        )
    JLens.from_tl(model, state, source=str(file))  # the model checks, one line each
    return state


def _save(state: TLJacobianLens, file: Path, dtype: torch.dtype) -> None:
    with atomic_open(file, "wb") as handle:
        state.save(handle, dtype=dtype)  # type: ignore[arg-type]  (torch.save takes a file)


def fit_jacobian_lens(
    model: Any,
    corpus_or_prompts: Corpus | str | os.PathLike[str] | Sequence[str] | None = None,
    *,
    n_prompts: int,
    seq_len: int = 128,
    out: str | Path,
    resume: bool = True,
    progress: bool = True,
    dtype: torch.dtype = torch.float16,
    dim_batch: int = 8,
    skip_first_positions: int = 16,
    seed: int = 0,
) -> JLens:
    """Fit a J-lens with TransformerLens, one prompt at a time, and write it to ``out``.

    Args:
        model: A raw ``TransformerBridge`` (as :func:`lenskit.load_model` gives), in eval mode.
        corpus_or_prompts: A corpus, a corpus source for :func:`lenskit.data.load_corpus`
            (None: Shakespeare), or a list of prompt texts (used in order).
        n_prompts: Prompts to average over.
        seq_len: Tokens per prompt, BOS included (TransformerLens's ``max_seq_len``).
        out: The artifact file (a folder means its ``lens.pt``).
        resume: Continue ``OUT.partial`` or extend ``OUT`` if either holds a fit with the
            same settings and prompts; False starts afresh.
        progress: Show a tqdm bar over prompts, with ETA.
        dtype: Storage dtype of ``out`` (fp16 like the published artifacts).
        dim_batch: Output dimensions per backward pass (TransformerLens's; memory only).
        skip_first_positions: Leading positions left out of the average (TL's default 16).
        seed: Order of corpus chunks.

    Returns:
        The fitted lens, read from ``out``.

    Raises:
        LenskitError: For bad settings, a model TransformerLens cannot fit, or a checkpoint
            from another fit (one line).
        KeyboardInterrupt: On Ctrl-C, after the finished prompts were saved.
    """
    adapter = ModelAdapter(model)
    _check_args(adapter, n_prompts, seq_len, dim_batch, skip_first_positions)
    JLens.identity(model)  # TransformerLens's model checks, before any data is read
    if isinstance(corpus_or_prompts, Sequence) and not isinstance(corpus_or_prompts, str):
        prompts, corpus = list(corpus_or_prompts)[:n_prompts], "prompts"
        if len(prompts) < n_prompts:
            raise LenskitError(
                f"{len(prompts)} prompts given, {n_prompts} asked for: "
                "give more prompts or lower n_prompts"
            )
        _short_prompts(model, prompts, skip_first_positions + 2)
        data = "prompts"
    else:
        prompts, corpus = fit_prompts(
            model, corpus_or_prompts, n_prompts=n_prompts, seq_len=seq_len, seed=seed
        )
        data = corpus
    info = {**lenskit_metadata(adapter), "data": data, "seq_len": seq_len, "seed": seed}
    expected = {
        "transformer_lens_version": version("transformer-lens"),
        "model_name": getattr(model.cfg, "model_name", None),
        "corpus": corpus,
        "dim_batch": dim_batch,
        "max_seq_len": seq_len,
        "skip_first_positions": skip_first_positions,
        "fit_dtype": str(adapter.W_U.dtype).removeprefix("torch."),
        "lenskit": info,
    }
    file, partial = resolve_path(out), partial_path(out)
    state, loaded_from = None, None
    if resume:
        for candidate in (partial, file):
            if candidate.is_file():
                state = _load_state(candidate, model, expected, prompts, n_prompts)
                loaded_from = candidate
                break
    elif partial.is_file():
        partial.unlink()
    record: dict[str, Any] = (
        dict(state.metadata[PROGRESS_KEY])
        if state is not None
        else {"prompts_done": 0, "seconds_per_prompt": []}
    )
    first = record["prompts_done"]
    bar = _bar(n_prompts, first, progress)
    try:
        for i in range(first, n_prompts):
            start = time.perf_counter()
            shard = _fit_one(
                model,
                prompts[i],
                i,
                corpus=corpus,
                dim_batch=dim_batch,
                seq_len=seq_len,
                skip=skip_first_positions,
                info=info,
            )
            with deferred_interrupt():  # merge and save whole, or not at all
                state = shard if state is None else _merge(state, shard, loaded_from)
                seconds = [*record["seconds_per_prompt"], round(time.perf_counter() - start, 2)]
                record = {
                    "prompts_done": i + 1,
                    "prompts_sha256": _prompt_hash(prompts[: i + 1]),
                    "seconds_per_prompt": seconds,
                }
                state.metadata[PROGRESS_KEY] = record
                _save(state, partial, torch.float32)
            bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        if progress and record["prompts_done"]:
            print(
                f"lenskit: kept {record['prompts_done']} finished prompts in {partial}: "
                "run the same fit again to resume",
                file=sys.stderr,
                flush=True,
            )
        raise
    bar.close()
    if state is None:
        raise LenskitError("no prompt was fitted: ask for at least one prompt")  # unreachable
    if loaded_from != file or record["prompts_done"] > first:  # publish, drop the checkpoint
        with deferred_interrupt():
            _save(state, file, dtype)
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
    return JLens.load(model, file)


def _fit_one(
    model: Any,
    prompt: str,
    index: int,
    *,
    corpus: str,
    dim_batch: int,
    seq_len: int,
    skip: int,
    info: dict[str, Any],
) -> TLJacobianLens:
    """TransformerLens's ``JacobianLens.fit`` on one prompt."""
    from transformer_lens.tools.analysis import JacobianLens as TLJacobianLens

    try:
        with model_lock(model):  # its hooks go on the model object, shared between threads
            return TLJacobianLens.fit(
                model,
                [prompt],
                corpus=corpus,
                dim_batch=dim_batch,
                max_seq_len=seq_len,
                skip_first_positions=skip,
                show_progress=False,
                metadata={"lenskit": info},
            )
    except (TypeError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise LenskitError(
            f"TransformerLens could not fit prompt {index} ({first}): "
            "check the model and the prompt"
        ) from err


def _merge(state: TLJacobianLens, shard: TLJacobianLens, source: Path | None) -> TLJacobianLens:
    """TransformerLens's prompt-weighted ``merge`` of the lens so far and one more prompt."""
    from transformer_lens.tools.analysis import JacobianLens as TLJacobianLens

    state.metadata.pop(PROGRESS_KEY, None)
    try:
        return TLJacobianLens.merge([state, shard])
    except ValueError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise LenskitError(
            f"{source} cannot be extended by this fit ({first}): pass another "
            "out or resume=False (--no-resume)"
        ) from err


def _bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc="fitting J-lens",
        unit="prompt",
        disable=not enabled,
        smoothing=0.5,
    )
