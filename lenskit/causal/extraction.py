"""Causal basis extraction: the k residual directions of a layer that matter most to a lens.

Directions are found one after another (Belrose et al. 2023, causal basis extraction).
Direction ``i`` maximises the lens influence of :class:`~lenskit.causal.influence.LensObjective`
(mean KL between the lens's output and its output with the direction ablated, over training
tokens) over unit vectors orthogonal to directions ``0..i-1``: ``v = P theta / |P theta|`` with
``P`` the projector onto their orthogonal complement, optimised in ``theta`` by L-BFGS with a
strong-Wolfe line search. Each search starts from the top right-singular direction, within
that complement, of the lens-transformed unembedding: the centred unembedding composed with
the lens's map to the final norm (translator and norm), linearised at the mean residual.
A search stops once an iteration changes the objective by less than ``tol`` (relative), or
after ``max_iter`` iterations.

The directions are then measured on held-out tokens, on the lens and (optionally) on the
model, and sorted by their held-out lens influence, decreasing; the greedy order can differ
(``found_at`` keeps it). Data: the corpus is split by document into training and held-out
parts (``split_documents(corpus, held_out, seed=seed)``, the split ``lenskit train`` uses),
each cut into chunks; the first position of each chunk is left out (neither used, ablated
nor scored), as its residual acts as an attention sink with a norm far above the others'.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from lenskit.causal.influence import (
    ABLATIONS,
    LensObjective,
    ablation_reference,
    lens_influence,
    model_influence,
)
from lenskit.data import Corpus, load_corpus, split_documents
from lenskit.errors import LenskitError
from lenskit.evaluation.chunks import eval_chunks
from lenskit.lenses.base import Lens
from lenskit.lenses.basis import CausalBasis, read_index
from lenskit.metrics import Reference
from lenskit.progress import BasisProgress, BasisProgressCallback
from lenskit.residual import capture

__all__ = [
    "CausalBasisConfig",
    "extract_causal_basis",
    "find_direction",
    "lens_record",
    "unembedding_gram",
]


@dataclass(frozen=True)
class CausalBasisConfig:
    """Settings of a causal basis extraction.

    Attributes:
        k: Directions per layer.
        ablation: ``mean``, ``zero`` or ``resample`` (see :mod:`lenskit.causal.influence`).
        tokens: Training tokens (whole chunks) the directions are optimised on.
        eval_tokens: Held-out tokens the influences are reported on.
        seq_len: Tokens per chunk.
        held_out: Fraction of documents held out.
        seed: Seed of the split, the document order and resample ablation.
        max_iter: Most L-BFGS iterations per direction.
        tol: Convergence: relative change of the objective over one iteration.
        skip_first: Leading positions of each chunk left out.
        model_influence: Also measure each direction's influence on the model.
        batch_size: Chunks per forward pass of the model.
    """

    k: int = 8
    ablation: str = "mean"
    tokens: int = 2048
    eval_tokens: int = 1024
    seq_len: int = 256
    held_out: float = 0.1
    seed: int = 0
    max_iter: int = 50
    tol: float = 1e-4
    skip_first: int = 1
    model_influence: bool = True
    batch_size: int = 4

    def __post_init__(self) -> None:
        positive = ("k", "tokens", "eval_tokens", "seq_len", "max_iter", "batch_size")
        for name in (*positive, "seed", "skip_first"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise LenskitError(f"{name} must be an integer, got {value!r}")
            if value < (1 if name in positive else 0):
                raise LenskitError(
                    f"{name} must be >= {1 if name in positive else 0}, got "
                    f"{value}: pass a larger {name}"
                )
        if self.ablation not in ABLATIONS:
            raise LenskitError(
                f"unknown ablation {self.ablation!r}: use one of {', '.join(ABLATIONS)}"
            )
        if not 0 < self.held_out < 1:
            raise LenskitError(
                f"held_out must be between 0 and 1, got {self.held_out}: pass e.g. 0.1"
            )
        if not 0 < self.tol < 1:
            raise LenskitError(f"tol must be between 0 and 1, got {self.tol}: pass e.g. 1e-4")
        if self.skip_first >= self.seq_len:
            raise LenskitError(
                f"skip_first={self.skip_first} leaves nothing of chunks of "
                f"{self.seq_len} tokens: lower it"
            )

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CausalBasisConfig:
        """Settings from :meth:`to_dict` (unknown keys are refused)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise LenskitError(f"unknown causal basis settings {', '.join(unknown)}: drop them")
        return cls(**data)


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


def unembedding_gram(lens: Lens) -> Float[Tensor, "d_model d_model"]:
    """``W W^T`` of the unembedding ``W`` centred over the vocabulary (float64)."""
    w_u = lens.adapter.W_U.detach().double()
    centred = w_u - w_u.mean(1, keepdim=True)
    return centred @ centred.T


def _lens_gram(lens: Lens, layer: int, at: Tensor, gram: Tensor) -> Tensor:
    """``E^T E`` for the lens-transformed unembedding ``E = W^T J`` (J: Jacobian at ``at``)."""

    def to_norm(h: Tensor) -> Tensor:
        return lens.adapter.final_norm(lens.transform_hidden(h.unsqueeze(0), layer))[0]

    jac = torch.autograd.functional.jacobian(to_norm, at.detach()).double()
    return jac.T @ gram @ jac


def find_direction(
    objective: Callable[[Tensor], Tensor],
    previous: Float[Tensor, "i d_model"],
    start: Float[Tensor, " d_model"],
    *,
    max_iter: int = 50,
    tol: float = 1e-4,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[Float[Tensor, " d_model"], float, int, bool]:
    """Maximise ``objective`` over unit vectors orthogonal to the rows of ``previous``.

    Args:
        objective: A differentiable function of a unit vector.
        previous: Orthonormal rows the result must be orthogonal to.
        start: Starting point (projected and normalised first).
        max_iter: Most L-BFGS iterations.
        tol: Stop once an iteration changes the objective by less than ``tol`` (relative).
        on_step: Called with (iteration, objective) after each iteration.

    Returns:
        ``(v, objective(v), iterations, converged)``.
    """
    prev = previous.detach().double()

    def unit(theta: Tensor) -> Tensor:
        x = theta.double()
        x = x - (x @ prev.T) @ prev if prev.shape[0] else x
        return (x / x.norm()).to(theta.dtype)

    theta = unit(start.detach().float()).clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=1,
        max_eval=25,
        history_size=10,
        tolerance_grad=1e-12,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        loss = -objective(unit(theta))
        # autograd.grad, not backward: no gradient reaches the lens's or model's parameters
        (theta.grad,) = torch.autograd.grad(loss, theta)
        return loss.detach()

    last, converged, iterations = None, False, 0
    for iterations in range(1, max_iter + 1):
        value = -float(opt.step(closure).detach())  # where this iteration started
        if on_step is not None:
            on_step(iterations, value)
        if last is not None and abs(value - last) <= tol * max(abs(value), 1e-12):
            converged = True
            break
        last = value
    v = unit(theta.detach())
    with torch.no_grad():
        final = float(objective(v))
    return v, final, iterations, converged


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
        if index.get("model") != adapter.name or index.get("lens") != lens_record(lens):
            raise LenskitError(
                f"{out} holds causal bases of {index.get('model')} with lens "
                f"{index.get('lens')}: give another folder (a basis folder "
                "never mixes models or lenses)"
            )
    return layers


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
    from tqdm.auto import tqdm

    begun = time.perf_counter()
    cfg = config or CausalBasisConfig()
    layers = _check_inputs(model, lens, layers, cfg, out)
    adapter = lens.adapter
    corpus = data if isinstance(data, Corpus) else load_corpus(data)
    train, held = split_documents(corpus, cfg.held_out, seed=cfg.seed)
    train_chunks = eval_chunks(model, train, tokens=cfg.tokens, seq_len=cfg.seq_len, seed=cfg.seed)
    held_chunks = eval_chunks(
        model, held, tokens=cfg.eval_tokens, seq_len=cfg.seq_len, seed=cfg.seed
    )
    tic = time.perf_counter()
    search_seconds = 0.0

    def report(
        phase: str, li: int = 0, direction: int = 0, iteration: int = 0, value: float | None = None
    ) -> None:
        if on_progress is not None:
            on_progress(
                BasisProgress(
                    phase,
                    layers[li] if phase != "capture" else None,
                    li,
                    len(layers),
                    direction,
                    cfg.k,
                    iteration,
                    cfg.max_iter,
                    value,
                    time.perf_counter() - begun,
                    search_seconds,
                )
            )

    report("capture")
    skip = cfg.skip_first
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
    capture_seconds = time.perf_counter() - tic
    gram = unembedding_gram(lens)
    common = {
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
        "train_tokens": train_chunks.n_tokens - len(train_chunks) * skip,
        "eval_tokens": held_chunks.n_tokens - len(held_chunks) * skip,
        "torch_threads": torch.get_num_threads(),
    }
    results: dict[int, CausalBasis] = {}
    for li, layer in enumerate(layers):
        t0 = time.perf_counter()
        h = train_h[li][:, skip:].flatten(0, 1)
        mean = h.double().mean(0).float()
        objective = LensObjective(
            lens, layer, h, ablation_reference(h, cfg.ablation, mean, seed=cfg.seed)
        )
        lens_gram = _lens_gram(lens, layer, mean, gram)
        found = torch.zeros(0, adapter.d_model)
        train_inf, iters, conv = [], [], []
        bar = tqdm(
            total=cfg.k,
            desc=f"layer {layer} directions",
            unit="dir",
            disable=not progress,
            dynamic_ncols=True,
        )
        with bar:
            for i in range(cfg.k):
                proj = (
                    torch.eye(adapter.d_model, dtype=torch.float64)
                    - found.double().T @ found.double()
                )
                start = torch.linalg.eigh(proj @ lens_gram @ proj).eigenvectors[:, -1]
                if float((proj @ start).norm()) < 1e-3:  # the complement is flat: any start
                    gen = torch.Generator().manual_seed(cfg.seed + i)
                    start = torch.randn(adapter.d_model, generator=gen, dtype=torch.float64)

                def show(it: int, value: float, i: int = i, li: int = li, bar: Any = bar) -> None:
                    bar.set_postfix_str(f"dir {i + 1} it {it} {value:.4f} bits")
                    report("search", li, i, it, value)

                t_dir = time.perf_counter()

                v, value, n_iter, ok = find_direction(
                    objective,
                    found,
                    start.float(),
                    max_iter=cfg.max_iter,
                    tol=cfg.tol,
                    on_step=show,
                )
                v = v * torch.sign(v[v.abs().argmax()])  # sign: largest entry positive
                found = torch.cat([found, v.unsqueeze(0)])
                train_inf.append(value)
                iters.append(n_iter)
                conv.append(ok)
                search_seconds += time.perf_counter() - t_dir
                bar.update(1)
        extract_seconds = time.perf_counter() - t0
        mode, fallbacks, calls = objective.mode, objective.fallbacks, objective.calls
        del objective
        report("measure", li, cfg.k)
        t1 = time.perf_counter()
        hh = held_h[li]
        href = hh.clone()
        href[:, skip:] = ablation_reference(
            hh[:, skip:].flatten(0, 1), cfg.ablation, mean, seed=cfg.seed
        ).view_as(hh[:, skip:])
        held_inf = lens_influence(
            lens, layer, hh[:, skip:].flatten(0, 1), href[:, skip:].flatten(0, 1), found
        )
        order = torch.argsort(-held_inf, stable=True)
        lens_seconds = time.perf_counter() - t1
        t2 = time.perf_counter()
        model_inf = None
        if cfg.model_influence:
            model_inf = model_influence(
                model,
                layer,
                found[order],
                held_chunks.tokens,
                href,
                skip_first=skip,
                batch_size=cfg.batch_size,
                clean=held_clean,
                progress=progress,
            )
        pick = order.tolist()
        basis = CausalBasis(
            layer=layer,
            basis=found[order],
            mean=mean,
            lens_influence=held_inf[order],
            train_influence=torch.tensor(train_inf)[order],
            model_influence=model_inf,
            found_at=tuple(pick),
            iterations=tuple(iters[i] for i in pick),
            converged=tuple(conv[i] for i in pick),
            settings={
                **common,
                "objective_path": mode,
                "objective_calls": calls,
                "objective_fallbacks": fallbacks,
                "seconds": {
                    "capture_all_layers": capture_seconds,
                    "extract": extract_seconds,
                    "lens_influence": lens_seconds,
                    "model_influence": time.perf_counter() - t2,
                },
            },
        )
        if out is not None:
            basis.save(out)
        results[layer] = basis
        report("done", li, cfg.k)
    return results
