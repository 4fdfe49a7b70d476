"""MAML and FOMAML (Finn, Abbeel & Levine 2017), with the MAML++ multi-step loss (Antoniou et al. 2019).

Model-Agnostic Meta-Learning looks for an initialisation θ from which a few gradient steps on a new
task's support set already do well on its query set. The bi-level objective (paper eq. 1 and 2):

    θ'_i = θ − α ∇_θ L_{T_i}(f_θ; D^tr_i)                      (inner loop, S steps in general)
    min_θ  Σ_{T_i ~ p(T)}  L_{T_i}(f_{θ'_i}; D^ts_i)           (outer loop, the meta-objective)
    θ ← θ − β ∇_θ Σ_i L_{T_i}(f_{θ'_i}; D^ts_i)                 (meta-update, paper eq. 2)

The meta-gradient differentiates through the inner loop. For one inner step,
∇_θ L(θ') = (I − α H_θ) ∇_{θ'} L(θ'), with H_θ the Hessian of the support loss at θ; autograd
evaluates it with a Hessian-vector product, never forming H. **FOMAML** (``first_order=True``) drops
the H term: ∇_θ L(θ') ≈ ∇_{θ'} L(θ').

Notation: ``params`` θ; ``inner_lr`` α; ``inner_steps`` S; meta-batch of B tasks T_i in a
:class:`~mlcore.tasks.TaskBatch` (support D^tr, query D^ts); the outer rate β belongs to the
optimiser the caller steps.

MAML++ options (Antoniou et al. 2019, "How to train your MAML"):

- multi-step loss (MSL, their §4 "Multi-Step Loss Optimization"): ``step_weights`` (w_1 … w_S) makes
  the meta-loss Σ_j w_j L_query(θ_j) instead of L_query(θ_S), so every inner step gets a direct
  training signal; the paper anneals the weights towards the last step during training.
- per-layer per-step learning rates (LSLR): pass ``inner_lr`` as a list of S dicts of learnable
  tensors (see :func:`per_step_learning_rates`) and give them to the outer optimiser.
- per-step batch normalisation (BNWB and BNRS, their §4): build the network with
  ``Conv4(norm="batch", per_step_bn=inner_steps)`` (:class:`mlcore.models.PerStepBatchNorm2d`); the inner
  loop and the query forwards tell its layers the step index (:func:`mlcore.inner.outputs_at`).

The inner loop lives in :mod:`mlcore.inner`; this file writes down one task's objective
(:func:`task_loss`); :mod:`mlcore.family` turns it into ``meta_loss`` (a differentiable scalar),
``meta_backward`` (per-task backward: the memory of one task), ``train_step`` and ``predict``, the
same four entry points as Meta-SGD's and ANIL's.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from . import checks, family
from .family import MetaStep, Step
from .inner import InnerLR, LossFn, Rates, adapted, outputs_at, trajectory
from .tasks import TaskBatch

__all__ = ["adapt", "task_loss", "meta_loss", "meta_backward", "train_step", "predict", "per_step_learning_rates"]


def adapt(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor, *, loss_fn: LossFn,
          inner_lr: InnerLR, inner_steps: int, first_order: bool = False,
          check_finite: bool = True, vmapped: bool = False) -> dict[str, Tensor]:
    """Adapt θ to ONE task's support set (x (n, ...), y (n, ...)); return θ_S as a new dict (every
    parameter moves but MAML++'s per-step batch-norm γ_j, β_j, which are meta-learned only:
    :func:`mlcore.inner.adapted`).

    ``params`` is untouched (no in-place update). The result is differentiable w.r.t. ``params``
    unless ``first_order``; under ``torch.no_grad()`` adaptation still works (for evaluation).
    Raises :class:`~mlcore.inner.InnerLoopDivergedError` if θ_S is not finite (``check_finite``).
    Inside ``torch.func.vmap`` pass ``vmapped=True`` (and ``check_finite=False``: vmap cannot branch
    on a value).
    """
    checks.params(model, params)
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.dim() == 0 or y.dim() == 0 \
            or x.shape[0] != y.shape[0]:
        raise ValueError(f"adapt takes the support set of ONE task: x (n, ...) and y (n, ...) with the same n; "
                         f"got {tuple(getattr(x, 'shape', ()))} and {tuple(getattr(y, 'shape', ()))}")
    if (y.dtype == torch.int64 and y.dim() != 1) or (y.is_floating_point() and y.dim() > 2):
        raise ValueError(f"adapt takes ONE task, but y has shape {tuple(y.shape)}, a batch of tasks: it would be "
                         f"pooled into one task. Use meta_loss or predict for a TaskBatch, or pass tasks[i]'s "
                         f"x_support[0], y_support[0]")
    steps = checks.non_negative_int("inner_steps", inner_steps)
    rates = checks.rates(inner_lr, steps, params, adapted(model, params, None, steps))
    theta = trajectory(model, params, x, y, loss_fn=loss_fn, rates=rates, first_order=first_order,
                       vmapped=vmapped)[-1]
    if check_finite:
        checks.raise_if_diverged(torch.stack([t.detach().abs().max() for t in theta.values()]),
                                 inner_lr=inner_lr, inner_steps=inner_steps, what="adapted parameters")
    return theta


def task_loss(model: nn.Module, params: Mapping[str, Tensor], x_s: Tensor, y_s: Tensor, x_q: Tensor, y_q: Tensor,
              *, loss_fn: LossFn, rates: Rates, first_order: bool = False, step_weights: Tensor | None = None,
              vmapped: bool = False) -> tuple[Tensor, Tensor]:
    """One task's term of the MAML objective and its query outputs: adapt on (x_s, y_s), score (x_q, y_q).

    ``rates[j]`` maps each parameter to α_j (checked by the caller). With MAML++ ``step_weights``
    (w_1 … w_S) the term is Σ_j w_j L(θ_j; D^ts) instead of L(θ_S; D^ts). The query forwards go through
    :func:`mlcore.inner.outputs_at` (MAML++ per-step batch norm: the query at θ_j uses step index j − 1).
    """
    path = trajectory(model, params, x_s, y_s, loss_fn=loss_fn, rates=rates, first_order=first_order,
                      vmapped=vmapped)                                           # θ_0 = θ, …, θ_S = θ'_i
    steps = len(path) - 1
    if step_weights is None:
        outputs = outputs_at(model, path, steps, x_q)
        return loss_fn(outputs, y_q), outputs                                    # L_{T_i}(f_{θ'_i}; D^ts_i)
    outputs = [outputs_at(model, path, k, x_q) for k in range(1, steps + 1)]
    return sum(w * loss_fn(out, y_q) for w, out in zip(step_weights, outputs, strict=True)), outputs[-1]


def _objective(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, loss_fn: LossFn,
               inner_lr: InnerLR, inner_steps: int, first_order: bool = False,
               step_weights: Sequence[float] | Tensor | None = None, strategy: str = "auto",
               chunk_size: int | None = None, check_finite: bool = True, backward: bool = False,
               compile: bool | str = False) -> MetaStep:
    p = family.prepare(model, params, tasks, inner_lr=inner_lr, inner_steps=inner_steps, strategy=strategy,
                       chunk_size=chunk_size, loss_fn=loss_fn, step_weights=step_weights, compile=compile)

    def one_task(inputs: family.Inputs, x_s: Tensor, y_s: Tensor, x_q: Tensor, y_q: Tensor, *,
                 vmapped: bool) -> tuple[Tensor, Tensor]:
        return task_loss(model, inputs.params, x_s, y_s, x_q, y_q, loss_fn=loss_fn, rates=inputs.rates,
                         first_order=first_order, step_weights=inputs.step_weights, vmapped=vmapped)

    return family.run(one_task, tasks, p, inner_lr=inner_lr, check_finite=check_finite, backward=backward)


def meta_loss(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, loss_fn: LossFn,
              inner_lr: InnerLR, inner_steps: int, first_order: bool = False,
              step_weights: Sequence[float] | Tensor | None = None, strategy: str = "auto",
              chunk_size: int | None = None, check_finite: bool = True) -> Tensor:
    """The MAML meta-objective (paper eq. 2): mean over tasks of the query loss after ``inner_steps`` steps.

    An ordinary differentiable scalar, w.r.t. ``params`` and learnable ``inner_lr`` tensors; every
    task's graph is kept until ``.backward()``. To train with the memory of one task, use
    :func:`meta_backward` (the same gradient). ``first_order=True`` gives FOMAML.

    Args:
        strategy: ``"loop"`` (per task), ``"vmap"`` (all tasks batched) or ``"auto"``
            (:func:`mlcore.inner.resolve_strategy`); all give the same value and gradient (tested against
            float64 finite differences). ``chunk_size`` (vmap) batches that many tasks at a time.
        step_weights: MAML++ multi-step loss weights (w_1 … w_K), length ``inner_steps``.
        check_finite: raise :class:`~mlcore.inner.InnerLoopDivergedError` (one device sync) instead of
            returning inf/NaN when the inner loop diverges.
    """
    return _objective(model, params, tasks, loss_fn=loss_fn, inner_lr=inner_lr, inner_steps=inner_steps,
                      first_order=first_order, step_weights=step_weights, strategy=strategy,
                      chunk_size=chunk_size, check_finite=check_finite).loss


def meta_backward(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, loss_fn: LossFn,
                  inner_lr: InnerLR, inner_steps: int, first_order: bool = False,
                  step_weights: Sequence[float] | Tensor | None = None, strategy: str = "auto",
                  chunk_size: int | None = None, check_finite: bool = True,
                  compile: bool | str = False) -> MetaStep:
    """``meta_loss(...).backward()`` task by task: each task's (chunk's) graph is back-propagated and
    freed as soon as its loss is known, so gradients accumulate into ``.grad`` with the memory of one
    task. Returns the detached mean loss and query outputs (a :class:`~mlcore.family.MetaStep`).
    Arguments as in :func:`meta_loss`; zero the gradients first (or use :func:`train_step`).

    ``compile=True`` (or a torch.compile mode) takes the same gradient with :mod:`mlcore.compiled`: the
    meta-gradient of the vmapped meta-loss (``chunk_size`` tasks at a time), compiled on its first call
    for these shapes (minutes on a CPU), then reused; off by default (see the README's Benchmarks)."""
    return _objective(model, params, tasks, loss_fn=loss_fn, inner_lr=inner_lr, inner_steps=inner_steps,
                      first_order=first_order, step_weights=step_weights, strategy=strategy,
                      chunk_size=chunk_size, check_finite=check_finite, backward=True, compile=compile)


def train_step(model: nn.Module, params: Mapping[str, Tensor], optimizer: torch.optim.Optimizer,
               tasks: TaskBatch, **kwargs: object) -> Step:
    """One MAML update θ ← θ − β ∇_θ Σ_i L(θ'_i) (paper eq. 2, with ``optimizer`` over ``params``):
    zero the gradients, :func:`meta_backward` with ``kwargs`` (as for :func:`meta_loss`), step.
    Returns (loss, accuracy) as floats (accuracy ``None`` for regression)."""
    return family.train_step(meta_backward, model, params, optimizer, tasks, **kwargs)


def predict(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, loss_fn: LossFn,
            inner_lr: InnerLR, inner_steps: int, strategy: str = "auto", chunk_size: int | None = None) -> Tensor:
    """Meta-test: adapt to each task's support set, return query outputs (meta_batch, n_query, ...).

    Builds no meta-gradient graph (first-order, detached), so it is cheap enough for hundreds of
    evaluation episodes; use it as the ``predict`` of :func:`mlcore.evaluate.evaluate`.
    """
    return family.predict(_objective, model, params, tasks, loss_fn=loss_fn, inner_lr=inner_lr,
                          inner_steps=inner_steps, strategy=strategy, chunk_size=chunk_size)


def per_step_learning_rates(params: Mapping[str, Tensor], inner_lr: float, inner_steps: int, *,
                            requires_grad: bool = True) -> list[dict[str, Tensor]]:
    """MAML++ LSLR: one learnable scalar rate per parameter tensor and per inner step, all = ``inner_lr``.

    Give ``[r for step in rates for r in step.values()]`` to the outer optimiser and pass ``rates`` as
    ``inner_lr`` to :func:`meta_loss`.
    """
    checks.positive_number("inner_lr", inner_lr)
    checks.positive_int("inner_steps", inner_steps)
    return [{n: torch.tensor(float(inner_lr), dtype=p.dtype, device=p.device, requires_grad=requires_grad)
             for n, p in params.items()} for _ in range(inner_steps)]
