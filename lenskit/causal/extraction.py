"""Causal basis extraction: the k residual directions of a layer that matter most to a lens.

Directions are found one after another (Belrose et al. 2023, causal basis extraction), each
maximising the lens influence of :class:`~lenskit.causal.influence.LensObjective` (mean KL
between the lens's output and its output with the direction ablated, over training tokens)
over unit vectors orthogonal to the ones before; :mod:`lenskit.causal.search` runs the
search. A search stops once an iteration changes the objective by less than ``tol``
(relative), or after ``max_iter`` iterations.

The directions are then measured on held-out tokens, on the lens and (optionally) on the
model, and sorted by their held-out lens influence, decreasing; the greedy order can differ
(``found_at`` keeps it). Data: the corpus is split by document into training and held-out
parts (``split_documents(corpus, held_out, seed=seed)``, the split ``lenskit train`` uses),
each cut into chunks; the first position of each chunk is left out (neither used, ablated
nor scored), as its residual acts as an attention sink with a norm far above the others'.

Example:
    >>> import lenskit
    >>> from lenskit.causal import CausalBasisConfig, extract_causal_basis
    >>> from lenskit.data import Corpus
    >>> model = lenskit.load_model("tiny-llama")
    >>> lens = lenskit.get_lens("logit", model)
    >>> text = Corpus("demo", tuple(f"document {i} " + "a b c d e f g " * 30 for i in range(8)))
    >>> cfg = CausalBasisConfig(k=2, tokens=64, eval_tokens=32, seq_len=32, max_iter=3)
    >>> bases = extract_causal_basis(model, lens, 1, cfg, text, progress=False)
    >>> bases[1].basis.shape
    torch.Size([2, 64])
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lenskit.causal.config import CausalBasisConfig
from lenskit.causal.influence import (
    LensObjective,
    ablation_reference,
    lens_influence,
    model_influence,
)
from lenskit.causal.search import Directions, lens_gram, search_directions, unembedding_gram
from lenskit.data import Corpus, TokenChunks, load_corpus, split_documents
from lenskit.errors import LenskitError
from lenskit.evaluation.chunks import eval_chunks
from lenskit.lenses.base import Lens
from lenskit.lenses.basis import CausalBasis, read_index
from lenskit.metrics import Reference
from lenskit.progress import BasisProgress, BasisProgressCallback
from lenskit.residual import capture

__all__ = ["CausalBasisConfig", "extract_causal_basis", "lens_record"]


def lens_record(lens: Lens) -> dict[str, Any]:
    """How a basis folder names its lens: kind, and a path unless the lens ships with lenskit."""
    from importlib import resources

    source = getattr(lens, "source", None)
    if source is None:
        return {"kind": lens.kind, "path": None, "shipped": False}
    path = Path(source).expanduser().resolve()
    assets = (Path(str(resources.files("lenskit"))) / "assets").resolve()
    shipped = assets in path.parents
    return {"kind": lens.kind, "path": None if shipped else str(path), "shipped": shipped}


def _residuals(
    model: Any,
    tokens: Tensor,
    layers: list[int],
    cfg: CausalBasisConfig,
    *,
    clean: bool,
    desc: str,
    progress: bool,
) -> tuple[Tensor, list[Reference]]:
    """Block inputs of ``layers`` ([layer, chunk, pos, d]) and, if asked, the clean outputs."""
    from tqdm.auto import tqdm

    rows, refs = [], []
    starts = range(0, tokens.shape[0], cfg.batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
            cap = capture(model, tokens[start : start + cfg.batch_size])
            rows.append(cap.stack("resid_pre")[layers])
            if clean:
                refs.append(Reference.from_logits(cap.logits[:, cfg.skip_first :].flatten(0, 1)))
    return torch.cat(rows, dim=1), refs


def _check_inputs(
    model: Any,
    lens: Lens,
    layers: int | Sequence[int],
    cfg: CausalBasisConfig,
    out: str | Path | None,
) -> list[int]:
    adapter = lens.adapter
    lens.check_model(model)
    layers = [layers] if isinstance(layers, int) else list(layers)
    if not layers or len(set(layers)) != len(layers):
        raise LenskitError(f"give one or more distinct layers, got {layers}")
    for layer in layers:
        if (
            isinstance(layer, bool)
            or not isinstance(layer, int)
            or not 0 <= layer < adapter.n_layers
        ):
            raise LenskitError(
                f"layer {layer!r} has no block input in {adapter.name}: use "
                f"0..{adapter.n_layers - 1}"
            )
        lens.check_layer(layer)
    if cfg.k > adapter.d_model:
        raise LenskitError(
            f"k={cfg.k} is more than d_model={adapter.d_model} of "
            f"{adapter.name}: pass k <= {adapter.d_model}"
        )
    if out is not None and (Path(out).expanduser() / "basis.json").is_file():
        index = read_index(out)
        if index.model != adapter.name or index.lens.to_dict() != lens_record(lens):
            raise LenskitError(
                f"{out} holds causal bases of {index.model} with lens "
                f"{index.lens.to_dict()}: give another folder (a basis folder "
                "never mixes models or lenses)"
            )
    return layers


@dataclass
class _Run:
    """What every layer of one extraction shares: data, settings, residuals, progress."""

    model: Any
    lens: Lens
    layers: list[int]
    cfg: CausalBasisConfig
    held_tokens: Tensor
    train_h: Tensor
    held_h: Tensor
    held_clean: list[Reference]
    common: dict[str, Any]
    capture_seconds: float
    begun: float
    on_progress: BasisProgressCallback | None
    progress: bool
    search_seconds: float = 0.0

    def report(
        self,
        phase: str,
        li: int = 0,
        direction: int = 0,
        iteration: int = 0,
        value: float | None = None,
    ) -> None:
        """Hand a :class:`~lenskit.progress.BasisProgress` to the callback, if any."""
        if self.on_progress is None:
            return
        layer = self.layers[li] if phase != "capture" else None
        self.on_progress(
            BasisProgress(
                phase,
                layer,
                li,
                len(self.layers),
                direction,
                self.cfg.k,
                iteration,
                self.cfg.max_iter,
                value,
                time.perf_counter() - self.begun,
                self.search_seconds,
            )
        )


def _search(run: _Run, li: int) -> tuple[Directions, Tensor, dict[str, Any]]:
    """Find the directions of ``run.layers[li]`` on the training residuals."""
    from tqdm.auto import tqdm

    cfg, lens, layer = run.cfg, run.lens, run.layers[li]
    h = run.train_h[li][:, cfg.skip_first :].flatten(0, 1)
    mean = h.double().mean(0).float()
    objective = LensObjective(
        lens, layer, h, ablation_reference(h, cfg.ablation, mean, seed=cfg.seed)
    )
    gram = lens_gram(lens, layer, mean, unembedding_gram(lens))
    bar = tqdm(
        total=cfg.k,
        desc=f"layer {layer} directions",
        unit="dir",
        disable=not run.progress,
        dynamic_ncols=True,
    )

    def step(i: int, it: int, value: float) -> None:
        bar.n = i
        bar.set_postfix_str(f"dir {i + 1} it {it} {value:.4f} bits")
        run.report("search", li, i, it, value)

    with bar:
        found = search_directions(
            objective, gram, cfg.k, max_iter=cfg.max_iter, tol=cfg.tol, seed=cfg.seed, on_step=step
        )
        bar.update(cfg.k - bar.n)
    run.search_seconds += found.seconds
    stats = {
        "objective_path": objective.mode,
        "objective_calls": objective.calls,
        "objective_fallbacks": objective.fallbacks,
    }
    return found, mean, stats


def _layer_basis(run: _Run, li: int) -> CausalBasis:
    """Search, then measure on held-out tokens, one layer's causal basis."""
    cfg, layer, skip = run.cfg, run.layers[li], run.cfg.skip_first
    t0 = time.perf_counter()
    found, mean, stats = _search(run, li)
    extract_seconds = time.perf_counter() - t0
    run.report("measure", li, cfg.k)
    t1 = time.perf_counter()
    hh = run.held_h[li]
    href = hh.clone()
    href[:, skip:] = ablation_reference(
        hh[:, skip:].flatten(0, 1), cfg.ablation, mean, seed=cfg.seed
    ).view_as(hh[:, skip:])
    held_inf = lens_influence(
        run.lens, layer, hh[:, skip:].flatten(0, 1), href[:, skip:].flatten(0, 1), found.basis
    )
    order = torch.argsort(-held_inf, stable=True)
    lens_seconds = time.perf_counter() - t1
    t2 = time.perf_counter()
    model_inf = None
    if cfg.model_influence:
        model_inf = model_influence(
            run.model,
            layer,
            found.basis[order],
            run.held_tokens,
            href,
            skip_first=skip,
            batch_size=cfg.batch_size,
            clean=run.held_clean,
            progress=run.progress,
        )
    pick = order.tolist()
    seconds = {
        "capture_all_layers": run.capture_seconds,
        "extract": extract_seconds,
        "lens_influence": lens_seconds,
        "model_influence": time.perf_counter() - t2,
    }
    return CausalBasis(
        layer=layer,
        basis=found.basis[order],
        mean=mean,
        lens_influence=held_inf[order],
        train_influence=torch.tensor(found.train_influence)[order],
        model_influence=model_inf,
        found_at=tuple(pick),
        iterations=tuple(found.iterations[i] for i in pick),
        converged=tuple(found.converged[i] for i in pick),
        settings={**run.common, **stats, "seconds": seconds},
    )


def _common(
    lens: Lens, corpus: Corpus, cfg: CausalBasisConfig, train: TokenChunks, held: TokenChunks
) -> dict[str, Any]:
    """Settings every layer's file records: model, lens, data, config and token counts."""
    adapter, skip = lens.adapter, cfg.skip_first
    return {
        "model": adapter.name,
        "model_shape": {
            "architecture": adapter.architecture,
            "n_layers": adapter.n_layers,
            "d_model": adapter.d_model,
            "d_vocab": adapter.d_vocab,
        },
        "lens": lens_record(lens),
        "data": corpus.name,
        "config": cfg.to_dict(),
        "train_tokens": train.n_tokens - len(train) * skip,
        "eval_tokens": held.n_tokens - len(held) * skip,
        "torch_threads": torch.get_num_threads(),
    }


def extract_causal_basis(
    model: Any,
    lens: Lens,
    layers: int | Sequence[int],
    config: CausalBasisConfig | None = None,
    data: Corpus | str | None = None,
    *,
    out: str | Path | None = None,
    progress: bool = True,
    on_progress: BasisProgressCallback | None = None,
) -> dict[int, CausalBasis]:
    """Extract the causal basis of one or more layers (see the module docs).

    Residuals are captured once for all layers. With ``out``, each layer is saved to that
    basis folder as soon as it is done, so an interrupted run keeps the finished layers.

    Args:
        model: A ``TransformerBridge``.
        lens: The lens whose output the directions should move (e.g. a tuned lens).
        layers: Lens rows with a block input (``0 <= layer < n_layers``).
        config: Settings (default :class:`CausalBasisConfig`).
        data: A corpus or a source for :func:`~lenskit.data.load_corpus` (None: Shakespeare).
        out: A basis folder to save each layer into.
        progress: Show tqdm bars.
        on_progress: Called with a :class:`~lenskit.progress.BasisProgress` before the
            residuals are captured, after each L-BFGS iteration, before a layer's directions
            are measured and once the layer is done. If it raises, the extraction stops
            there; the layers done before are already saved in ``out``.

    Returns:
        The basis of each layer.

    Raises:
        LenskitError: For bad layers or settings, unreadable data, too few tokens, or an
            ``out`` folder holding another model's or lens's bases.
    """
    begun = time.perf_counter()
    cfg = config or CausalBasisConfig()
    layers = _check_inputs(model, lens, layers, cfg, out)
    corpus = data if isinstance(data, Corpus) else load_corpus(data)
    train, held = split_documents(corpus, cfg.held_out, seed=cfg.seed)
    train_chunks = eval_chunks(model, train, tokens=cfg.tokens, seq_len=cfg.seq_len, seed=cfg.seed)
    held_chunks = eval_chunks(
        model, held, tokens=cfg.eval_tokens, seq_len=cfg.seq_len, seed=cfg.seed
    )
    if on_progress is not None:
        on_progress(
            BasisProgress(
                "capture",
                None,
                0,
                len(layers),
                0,
                cfg.k,
                0,
                cfg.max_iter,
                None,
                time.perf_counter() - begun,
                0.0,
            )
        )
    tic = time.perf_counter()
    train_h, _ = _residuals(
        model,
        train_chunks.tokens,
        layers,
        cfg,
        clean=False,
        desc="training residuals",
        progress=progress,
    )
    held_h, held_clean = _residuals(
        model,
        held_chunks.tokens,
        layers,
        cfg,
        clean=cfg.model_influence,
        desc="held-out residuals",
        progress=progress,
    )
    run = _Run(
        model,
        lens,
        layers,
        cfg,
        held_chunks.tokens,
        train_h,
        held_h,
        held_clean,
        _common(lens, corpus, cfg, train_chunks, held_chunks),
        time.perf_counter() - tic,
        begun,
        on_progress,
        progress,
    )
    results: dict[int, CausalBasis] = {}
    for li, layer in enumerate(layers):
        basis = _layer_basis(run, li)
        if out is not None:
            basis.save(out)
        results[layer] = basis
        run.report("done", li, cfg.k)
    return results
