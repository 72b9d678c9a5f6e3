"""The greedy search for one layer's causal directions.

Direction ``i`` maximises a lens influence (see :class:`~lenskit.causal.influence.LensObjective`)
over unit vectors orthogonal to directions ``0..i-1``: ``v = P theta / |P theta|`` with ``P``
the projector onto their orthogonal complement, optimised in ``theta`` by L-BFGS with a
strong-Wolfe line search (:func:`find_direction`). Each search starts from the top
right-singular direction, within that complement, of the lens-transformed unembedding: the
centred unembedding composed with the lens's map to the final norm (translator and norm),
linearised at the mean residual (:func:`lens_gram`).

Example:
    >>> import torch
    >>> from lenskit.causal.search import find_direction
    >>> target = torch.tensor([0.0, 0.6, 0.8])
    >>> v, value, _, _ = find_direction(lambda v: v @ target, torch.zeros(0, 3), torch.ones(3))
    >>> round(value, 4)
    1.0
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from lenskit.lenses.base import Lens

__all__ = ["Directions", "find_direction", "lens_gram", "search_directions", "unembedding_gram"]


def unembedding_gram(lens: Lens) -> Float[Tensor, "d_model d_model"]:
    """``W W^T`` of the unembedding ``W`` centred over the vocabulary (float64)."""
    w_u = lens.adapter.W_U.detach().double()
    centred = w_u - w_u.mean(1, keepdim=True)
    return centred @ centred.T


def lens_gram(lens: Lens, layer: int, at: Tensor, gram: Tensor) -> Tensor:
    """``E^T E`` for the lens-transformed unembedding ``E = W^T J`` (J: Jacobian at ``at``)."""

    def to_norm(h: Tensor) -> Tensor:
        return lens.adapter.final_norm(lens.transform_hidden(h.unsqueeze(0), layer))[0]

    jac = torch.autograd.functional.jacobian(to_norm, at.detach()).double()
    return jac.T @ gram @ jac


def find_direction(
    objective: Callable[[Tensor], Tensor],
    previous: Float[Tensor, "k d_model"],
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


@dataclass
class Directions:
    """Directions found so far for one layer, in the order the search found them."""

    basis: Float[Tensor, "k d_model"]
    train_influence: list[float] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)
    converged: list[bool] = field(default_factory=list)
    seconds: float = 0.0


def _start(
    found: Float[Tensor, "k d_model"], gram: Float[Tensor, "d_model d_model"], seed: int
) -> Float[Tensor, " d_model"]:
    """The top eigenvector of ``gram`` within the complement of ``found`` (random if flat)."""
    d_model = gram.shape[0]
    proj = torch.eye(d_model, dtype=torch.float64) - found.double().T @ found.double()
    start = torch.linalg.eigh(proj @ gram @ proj).eigenvectors[:, -1]
    if float((proj @ start).norm()) < 1e-3:  # the complement is flat: any start will do
        gen = torch.Generator().manual_seed(seed)
        start = torch.randn(d_model, generator=gen, dtype=torch.float64)
    return start.float()


def search_directions(
    objective: Callable[[Tensor], Tensor],
    gram: Float[Tensor, "d_model d_model"],
    k: int,
    *,
    max_iter: int,
    tol: float,
    seed: int,
    on_step: Callable[[int, int, float], None] | None = None,
) -> Directions:
    """Find ``k`` orthonormal directions one after another with :func:`find_direction`.

    Args:
        objective: The influence of a unit vector, differentiable.
        gram: The lens gram of :func:`lens_gram`, whose top eigenvector starts each search.
        k: How many directions.
        max_iter: Most L-BFGS iterations per direction.
        tol: Relative change of the objective that ends a search.
        seed: Seed of the random start used where the complement is flat.
        on_step: Called with (direction, iteration, objective) after each iteration.

    Returns:
        The directions (sign: largest entry positive), with their training influences.
    """
    found = Directions(torch.zeros(0, gram.shape[0]))
    for i in range(k):
        tic = time.perf_counter()

        def step(it: int, value: float, i: int = i) -> None:
            if on_step is not None:
                on_step(i, it, value)

        v, value, n_iter, ok = find_direction(
            objective,
            found.basis,
            _start(found.basis, gram, seed + i),
            max_iter=max_iter,
            tol=tol,
            on_step=step,
        )
        v = v * torch.sign(v[v.abs().argmax()])
        found.basis = torch.cat([found.basis, v.unsqueeze(0)])
        found.train_influence.append(value)
        found.iterations.append(n_iter)
        found.converged.append(ok)
        found.seconds += time.perf_counter() - tic
    return found
