"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms").

Reptile needs no meta-gradient at all. Adapt a copy of θ to each task with S steps of an ordinary
optimiser, then move θ part of the way towards the adapted weights:

    θ'_i = U^S_{T_i}(θ)                               S steps of SGD (or Adam) on task i's data
    θ ← θ + ε · (1/n) Σ_i (θ'_i − θ)                  Algorithm 2 ("batched"), n tasks per step
    θ ← θ + ε · (θ' − θ), one task after another      Algorithm 1 ("serial"), ``serial=True``

(θ − θ'_i) / α is a gradient-like direction; with S = 1 it is exactly ∇L_i(θ), and Reptile reduces to
plain SGD on the average task loss (joint training, no meta-learning). With S > 1 the update
contains the terms that make MAML work: Nichol et al. §5 show its Taylor expansion has a
component that maximises the inner product between gradients of different minibatches of a task.

Notation:

===============  =========  =================================================================
code             paper      meaning
===============  =========  =================================================================
``params``       φ (θ)      meta-parameters (the initialisation)
``inner_lr``     α          inner SGD/Adam learning rate (a positive number)
``inner_steps``  k          inner steps per task (S in the book's notation)
``outer_lr``     ε          step size of the interpolation towards θ' (the paper anneals it)
``tasks``        τ_i        a :class:`~mlcore.tasks.TaskBatch`; n = ``tasks.meta_batch``
===============  =========  =================================================================

Which data: the inner loop takes full-batch steps on each task's **support set only**; the query set
is not touched by the update, so a TaskBatch built for MAML works unchanged and the query loss stays
an honest held-out measurement. Nichol et al. simply train on a task's data (in minibatches); to use
all of it, pass a TaskBatch whose support set is the concatenation of support and query.

A common implementation of Reptile makes the inner optimiser write into the very tensors that hold θ
(``p.data = ...`` aliases storage), so θ' − θ is always zero and its "meta-update" is sequential
joint SGD. Here θ is never modified in
place: the inner loop builds new tensors and ``reptile_step`` returns a new dict.

Batching: with SGD the shared :func:`mlcore.inner.inner_loop` runs with ``first_order=True`` per task
(``strategy="loop"``) or for all tasks at once under ``torch.func.vmap``, inside ``torch.no_grad()``
(``torch.func.grad`` still differentiates there). With Adam (fresh moments per task, as
``torch.optim.Adam`` computes them), the update below is a pure function of the task, so it vmaps too.
Nichol et al. report using Adam with β1 = 0 in the inner loop: pass ``adam_betas=(0.0, 0.999)``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from . import checks
from .inner import InnerLoopDivergedError, LossFn, resolve_strategy, trajectory
from .tasks import TaskBatch

__all__ = ["reptile_step", "predict", "OPTIMIZERS"]

OPTIMIZERS = ("sgd", "adam")


def _adam(model: nn.Module, theta: dict[str, Tensor], x: Tensor, y: Tensor, *, loss_fn: LossFn, inner_lr: float,
          inner_steps: int, betas: tuple[float, float], eps: float) -> dict[str, Tensor]:
    """``inner_steps`` Adam steps from θ on one task, moments starting at zero (Kingma & Ba 2015, Algorithm 1)."""
    grad_fn = torch.func.grad(lambda th: loss_fn(functional_call(model, th, (x,)), y))
    b1, b2 = betas
    m = {n: torch.zeros_like(t) for n, t in theta.items()}   # first moment
    v = {n: torch.zeros_like(t) for n, t in theta.items()}   # second moment
    for t in range(1, inner_steps + 1):
        g = grad_fn(theta)
        m = {n: b1 * m[n] + (1 - b1) * g[n] for n in theta}
        v = {n: b2 * v[n] + (1 - b2) * g[n] * g[n] for n in theta}
        # Written as torch.optim.Adam does: θ − (α / (1 − β1^t)) · m / (sqrt(v) / sqrt(1 − β2^t) + eps)
        step, root = inner_lr / (1 - b1 ** t), math.sqrt(1 - b2 ** t)
        theta = {n: theta[n] - step * m[n] / (v[n].sqrt() / root + eps) for n in theta}
    return theta


def _adapt_tasks(model: nn.Module, theta: dict[str, Tensor], tasks: TaskBatch, how: str, *, loss_fn: LossFn,
                 inner_lr: float, inner_steps: int, optimizer: str, betas: tuple[float, float],
                 eps: float) -> dict[str, Tensor]:
    """θ'_i for every task: dict name -> (meta_batch, *parameter_shape)."""
    def one_task(x: Tensor, y: Tensor) -> dict[str, Tensor]:
        if optimizer == "sgd":
            rates = [dict.fromkeys(theta, inner_lr)] * inner_steps
            return trajectory(model, theta, x, y, loss_fn=loss_fn, rates=rates, first_order=True,
                              vmapped=how == "vmap")[-1]
        return _adam(model, theta, x, y, loss_fn=loss_fn, inner_lr=inner_lr, inner_steps=inner_steps,
                     betas=betas, eps=eps)

    if how == "vmap":
        return torch.func.vmap(one_task)(tasks.x_support, tasks.y_support)
    adapted = [one_task(x, y) for x, y in zip(tasks.x_support, tasks.y_support, strict=True)]
    return {n: torch.stack([a[n] for a in adapted]) for n in theta}


def reptile_step(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, loss_fn: LossFn,
                 inner_lr: float, inner_steps: int, outer_lr: float, optimizer: str = "sgd",
                 strategy: str = "auto", serial: bool = False, adam_betas: tuple[float, float] = (0.9, 0.999),
                 adam_eps: float = 1e-8) -> dict[str, Tensor]:
    """One Reptile meta-update over ``tasks``; returns NEW, detached parameters (``params`` is untouched).

    Args:
        optimizer: ``"sgd"`` (θ_{j+1} = θ_j − α ∇L) or ``"adam"`` (fresh Adam state per task and step).
        strategy: ``"loop"``, ``"vmap"`` or ``"auto"`` (see :func:`mlcore.inner.resolve_strategy`);
            batched over tasks only for ``serial=False``.
        serial: Algorithm 1: tasks one after another, θ moves after each task (order matters). Default
            Algorithm 2: every task adapts from the same θ and the mean displacement is applied once.
            For one task the two coincide.
        adam_betas, adam_eps: Adam's (β1, β2) and ε; defaults are ``torch.optim.Adam``'s.

    Returns a dict with the same names, shapes, dtype and device as ``params``, requires_grad False.
    """
    _check(model, params, tasks, inner_lr=inner_lr, inner_steps=inner_steps, optimizer=optimizer,
           adam_betas=adam_betas, adam_eps=adam_eps, min_steps=1)
    checks.positive_number("outer_lr (Reptile's ε)", outer_lr)
    how = resolve_strategy(strategy, model, tasks.device)
    kwargs = dict(loss_fn=loss_fn, inner_lr=inner_lr, inner_steps=inner_steps, optimizer=optimizer,
                  betas=tuple(adam_betas), eps=adam_eps)
    theta = {n: p.detach() for n, p in params.items()}
    with torch.no_grad():  # nothing here is differentiated by the caller; torch.func.grad still works inside
        if serial:
            for i in range(tasks.meta_batch):  # Algorithm 1
                adapted = _adapt_tasks(model, theta, tasks[i], how, **kwargs)        # (1, *shape) each
                theta = {n: theta[n] + outer_lr * (adapted[n][0] - theta[n]) for n in theta}
        else:  # Algorithm 2
            adapted = _adapt_tasks(model, theta, tasks, how, **kwargs)               # (B, *shape) each
            theta = {n: theta[n] + outer_lr * (adapted[n].mean(0) - theta[n]) for n in theta}
    if not bool(torch.stack([t.abs().max() for t in theta.values()]).isfinite().all()):
        bad = "the tasks' inputs or targets hold NaN or inf" if not _finite(tasks) else \
            f"the inner loop diverged: use a smaller inner_lr (now {inner_lr}) or fewer inner_steps ({inner_steps})"
        raise InnerLoopDivergedError(f"reptile_step: the new parameters are not finite: {bad}")
    return theta


def _check(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, inner_lr: float, inner_steps: int,
           optimizer: str, adam_betas: tuple[float, float], adam_eps: float, min_steps: int) -> None:
    checks.params(model, params)
    checks.tasks(tasks, params)
    checks.positive_number("inner_lr", inner_lr)
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < min_steps:
        what = ("a positive integer (Reptile moves towards θ' after k >= 1 inner steps)" if min_steps
                else "a non-negative integer")
        raise ValueError(f"inner_steps must be {what}, got {inner_steps!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if optimizer == "adam":
        if len(adam_betas) != 2 or not all(0 <= b < 1 for b in adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {adam_betas!r}")
        checks.positive_number("adam_eps", adam_eps)


def _finite(tasks: TaskBatch) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in (tasks.x_support, tasks.x_query)
               if t.is_floating_point()) and (not tasks.y_support.is_floating_point() or bool(
                   torch.isfinite(tasks.y_support).all()))


def predict(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, loss_fn: LossFn,
            inner_lr: float, inner_steps: int, optimizer: str = "sgd", strategy: str = "auto",
            adam_betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8) -> Tensor:
    """Meta-test: adapt θ to each support set with the inner optimiser Reptile trained with (``inner_steps``
    steps of SGD or Adam from fresh moments), return the query outputs (meta_batch, n_query, ...), detached.

    Reptile evaluates with its own inner optimiser: an Adam-trained initialisation tested with SGD at
    Adam's small rate would barely move.
    """
    _check(model, params, tasks, inner_lr=inner_lr, inner_steps=inner_steps, optimizer=optimizer,
           adam_betas=adam_betas, adam_eps=adam_eps, min_steps=0)
    how = resolve_strategy(strategy, model, tasks.device)
    theta = {n: p.detach() for n, p in params.items()}
    with torch.no_grad():
        if inner_steps == 0:
            return torch.stack([functional_call(model, theta, (x,)) for x in tasks.x_query])
        adapted = _adapt_tasks(model, theta, tasks, how, loss_fn=loss_fn, inner_lr=inner_lr, inner_steps=inner_steps,
                               optimizer=optimizer, betas=tuple(adam_betas), eps=adam_eps)
        return torch.stack([functional_call(model, {n: adapted[n][i] for n in theta}, (x,))
                            for i, x in enumerate(tasks.x_query)])
