"""MAML and FOMAML (Finn, Abbeel & Levine 2017), with the MAML++ multi-step loss (Antoniou et al. 2019).

Model-Agnostic Meta-Learning looks for an initialisation θ from which a few gradient steps on a new
task's support set already do well on its query set. The bi-level objective (paper eq. 1 and 2):

    θ'_i = θ − α ∇_θ L_{T_i}(f_θ; D^tr_i)                      (inner loop, K steps in general)
    min_θ  Σ_{T_i ~ p(T)}  L_{T_i}(f_{θ'_i}; D^ts_i)           (outer loop, the meta-objective)
    θ ← θ − β ∇_θ Σ_i L_{T_i}(f_{θ'_i}; D^ts_i)                 (meta-update, paper eq. 2)

The meta-gradient differentiates through the inner loop. For one inner step,
∇_θ L(θ') = (I − α H_θ) ∇_{θ'} L(θ'), with H_θ the Hessian of the support loss at θ; autograd
evaluates it with a Hessian-vector product, never forming H. **FOMAML** (``first_order=True``) drops
the H term: ∇_θ L(θ') ≈ ∇_{θ'} L(θ').

Notation: ``params`` θ; ``inner_lr`` α; ``inner_steps`` K; meta-batch of tasks T_i in a
:class:`~mlcore.tasks.TaskBatch` (support D^tr, query D^ts); the outer rate β belongs to the
optimiser the caller steps.

MAML++ options (Antoniou et al. 2019, "How to train your MAML"):

- multi-step loss (MSL, their §4 "Multi-Step Loss Optimization"): ``step_weights`` (w_1 … w_K) makes
  the meta-loss Σ_k w_k L_query(θ_k) instead of L_query(θ_K), so every inner step gets a direct
  training signal; the paper anneals the weights towards the last step during training.
- per-layer per-step learning rates (LSLR): pass ``inner_lr`` as a list of K dicts of learnable
  tensors (see :func:`per_step_learning_rates`) and give them to the outer optimiser.

The inner loop itself lives in :mod:`mlcore.inner`; this file only defines the MAML objective.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch
from torch import Tensor, nn

from .inner import (InnerLR, LossFn, check_params, grad_inputs, inner_loop, query_losses, raise_if_diverged,
                    resolve_strategy, task_mean)
from .tasks import TaskBatch

__all__ = ["adapt", "meta_loss", "predict", "per_step_learning_rates"]


def adapt(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor, *, loss_fn: LossFn,
          inner_lr: InnerLR, inner_steps: int, first_order: bool = False,
          check_finite: bool = True) -> dict[str, Tensor]:
    """Adapt θ to ONE task's support set (x (n, ...), y (n, ...)); return θ_K as a new dict.

    ``params`` is untouched (no in-place update). The result is differentiable w.r.t. ``params``
    unless ``first_order``; under ``torch.no_grad()`` adaptation still works (for evaluation).
    Raises :class:`~mlcore.inner.InnerLoopDivergedError` if θ_K is not finite (``check_finite``).
    """
    check_params(model, params)
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.dim() == 0 or y.dim() == 0 \
            or x.shape[0] != y.shape[0]:
        raise ValueError(f"adapt takes the support set of ONE task: x (n, ...) and y (n, ...) with the same n; "
                         f"got {tuple(getattr(x, 'shape', ()))} and {tuple(getattr(y, 'shape', ()))}")
    if (y.dtype == torch.int64 and y.dim() != 1) or (y.is_floating_point() and y.dim() > 2):
        raise ValueError(f"adapt takes ONE task, but y has shape {tuple(y.shape)}, a batch of tasks: it would be "
                         f"pooled into one task. Use meta_loss or predict for a TaskBatch, or pass tasks[i]'s "
                         f"x_support[0], y_support[0]")
    theta = inner_loop(model, params, x, y, loss_fn=loss_fn, inner_lr=inner_lr, inner_steps=inner_steps,
                       first_order=first_order)[-1]
    if check_finite:
        raise_if_diverged(torch.stack([t.detach().abs().max() for t in theta.values()]),
                          inner_lr=inner_lr, inner_steps=inner_steps, what="adapted parameters")
    return theta


def meta_loss(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, loss_fn: LossFn,
              inner_lr: InnerLR, inner_steps: int, first_order: bool = False, strategy: str = "auto",
              chunk_size: int | None = None, step_weights: Sequence[float] | Tensor | None = None,
              check_finite: bool = True, return_outputs: bool = False,
              eager: bool | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """The MAML meta-objective: mean over tasks of the query loss after ``inner_steps`` inner steps.

    Differentiable w.r.t. ``params`` (and w.r.t. learnable ``inner_lr`` tensors): call ``.backward()``
    and step an optimiser over ``params.values()``. ``first_order=True`` gives FOMAML.

    Args:
        strategy: ``"loop"`` (per task), ``"vmap"`` (all tasks batched) or ``"auto"``; all give the same
            value and gradient (tested against float64 finite differences). ``chunk_size`` vmaps that
            many tasks at a time.
        step_weights: MAML++ multi-step loss weights (w_1 … w_K), length ``inner_steps``.
        check_finite: raise :class:`~mlcore.inner.InnerLoopDivergedError` (one device sync) instead of
            returning inf/NaN when the inner loop diverges.
        return_outputs: also return the query outputs after adaptation, (meta_batch, n_query, ...).
        eager: per-task (per-chunk) backward, see :func:`mlcore.inner.task_mean`. By default, when the
            tasks run one at a time (``"loop"``) or in several vmap chunks, each task's meta-gradient is
            taken as soon as its query loss is known and its graph freed: peak memory of one task (or
            chunk) instead of the whole meta-batch, same gradient, but the loss can be back-propagated
            once only (``eager=False`` keeps the graph for ``create_graph=True``).

    Returns the scalar loss (and the outputs when asked).
    """
    if not isinstance(tasks, TaskBatch):
        raise TypeError(f"tasks must be a mlcore.tasks.TaskBatch, got {type(tasks).__name__}")
    check_params(model, params)
    eval_steps, weights = [inner_steps], None
    if step_weights is not None:
        weights = torch.as_tensor(step_weights, dtype=tasks.x_query.dtype, device=tasks.device)
        if weights.shape != (inner_steps,):
            raise ValueError(f"step_weights needs one weight per inner step (inner_steps={inner_steps}), "
                             f"got shape {tuple(weights.shape)}")
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError(f"step_weights must be finite and non-negative (MAML++ weights each step's query "
                             f"loss), got {weights.tolist()}")
        eval_steps = list(range(1, inner_steps + 1))
    how = resolve_strategy(strategy, model, tasks.device)

    def chunk_losses(chunk: TaskBatch) -> tuple[Tensor, Tensor]:  # (b, len(eval_steps)), (b, n_query, ...)
        return query_losses(model, params, chunk, loss_fn=loss_fn, inner_lr=inner_lr, inner_steps=inner_steps,
                            first_order=first_order, eval_steps=eval_steps, strategy=how, return_outputs=True)

    loss, outputs = task_mean(chunk_losses, tasks, how=how, chunk_size=chunk_size, weights=weights, eager=eager,
                              inputs=grad_inputs(params, inner_lr, weights, tasks))
    if check_finite:
        raise_if_diverged(loss.detach(), inner_lr=inner_lr, inner_steps=inner_steps, tasks=tasks)
    return (loss, outputs) if return_outputs else loss


def predict(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, loss_fn: LossFn,
            inner_lr: InnerLR, inner_steps: int, strategy: str = "auto",
            adapt: Collection[str] | None = None) -> Tensor:
    """Meta-test: adapt to each task's support set, return query outputs (meta_batch, n_query, ...).

    Runs without building a meta-gradient graph (first-order, detached), so it is cheap enough for
    hundreds of evaluation episodes; use it as the ``predict`` of :func:`mlcore.evaluate.evaluate`.
    ``adapt`` restricts adaptation to some parameters (ANIL: the head).
    """
    detached = {n: p.detach() for n, p in params.items()}
    _, outputs = query_losses(model, detached, tasks, loss_fn=loss_fn, inner_lr=inner_lr, inner_steps=inner_steps,
                              first_order=True, adapt=adapt, strategy=strategy, return_outputs=True)
    return outputs.detach()


def per_step_learning_rates(params: Mapping[str, Tensor], inner_lr: float, inner_steps: int, *,
                            requires_grad: bool = True) -> list[dict[str, Tensor]]:
    """MAML++ LSLR: one learnable scalar rate per parameter tensor and per inner step, all = ``inner_lr``.

    Give ``[r for step in rates for r in step.values()]`` to the outer optimiser and pass ``rates`` as
    ``inner_lr`` to :func:`meta_loss`.
    """
    if not isinstance(inner_lr, (int, float)) or inner_lr <= 0:
        raise ValueError(f"inner_lr must be a positive number, got {inner_lr!r}")
    if not isinstance(inner_steps, int) or inner_steps <= 0:
        raise ValueError(f"inner_steps must be a positive integer, got {inner_steps!r}")
    return [{n: torch.tensor(float(inner_lr), dtype=p.dtype, device=p.device, requires_grad=requires_grad)
             for n, p in params.items()} for _ in range(inner_steps)]
