"""Meta-SGD (Li, Zhou, Chen & Li 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning").

MAML learns the initialisation θ and keeps the inner learning rate α a fixed scalar. Meta-SGD learns
α too, as a tensor of the same shape as θ, so every single weight gets its own step size *and
direction* (α may turn negative). The paper's adaptation step (§3) and meta-objective:

    θ'_i = θ − α ⊙ ∇_θ L_{T_i}(θ; D^tr_i)                              (one inner step, elementwise ⊙)
    min_{θ, α}  Σ_{T_i ~ p(T)}  L_{T_i}(θ'_i; D^ts_i)                   (both learned by the outer loop)

The meta-gradient reaches α through the adaptation step: ∂L(θ')/∂α = −∇_{θ'}L(θ') ⊙ ∇_θ L^tr(θ).
That term needs no second derivative, so α is learned even with ``first_order=True`` (which drops
only the Hessian term in ∂L(θ')/∂θ, exactly as FOMAML does). The paper takes one inner step;
``inner_steps`` > 1 repeats it with the same α.

Notation:

===============  ==============  ================================================================
code             paper           meaning, shape
===============  ==============  ================================================================
``params``       θ               meta-parameters, dict name → tensor
``inner_lrs``    α               learned inner rates, dict name → tensor shaped like ``params[name]``
``inner_steps``  —               inner steps (the paper uses 1)
``tasks``        T_i             a :class:`~mlcore.tasks.TaskBatch` (support D^tr, query D^ts)
===============  ==============  ================================================================

Meta-SGD is MAML with a different learning-rate argument: the inner loop is the shared one in
:mod:`mlcore.inner` (which accepts a dict of rate tensors), nothing is re-implemented here.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .inner import LossFn, check_params, grad_inputs, query_losses, raise_if_diverged, resolve_strategy, task_mean
from .tasks import TaskBatch

__all__ = ["init_inner_lrs", "meta_loss", "predict"]


def init_inner_lrs(params: Mapping[str, Tensor], value: float, *, requires_grad: bool = True) -> dict[str, Tensor]:
    """α initialised to ``value`` everywhere: one tensor per parameter, same shape, dtype and device.

    The tensors are new leaves (not views of ``params``); give ``list(alpha.values())`` to the outer
    optimiser next to ``params.values()``. The paper initialises α at random in a small positive range;
    a constant equal to MAML's α makes step 0 of Meta-SGD identical to MAML, which is easier to compare.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"init_inner_lrs: value must be a positive finite number (the starting inner rate), "
                         f"got {value!r}")
    if not isinstance(params, Mapping) or not params:
        raise TypeError("init_inner_lrs: params must be a non-empty dict name -> Tensor, "
                        "e.g. dict(model.named_parameters())")
    return {n: torch.full_like(p.detach(), float(value)).requires_grad_(requires_grad) for n, p in params.items()}


def _check_inner_lrs(params: Mapping[str, Tensor], inner_lrs: Mapping[str, Tensor]) -> None:
    if not isinstance(inner_lrs, Mapping):
        raise TypeError(f"inner_lrs must be a dict name -> Tensor (see init_inner_lrs), got "
                        f"{type(inner_lrs).__name__}; for one scalar rate use mlcore.maml.meta_loss")
    missing, unknown = sorted(set(params) - set(inner_lrs)), sorted(set(inner_lrs) - set(params))
    if missing or unknown:
        raise KeyError(f"inner_lrs must hold one rate tensor per parameter; missing {missing[:5]}, "
                       f"unknown {unknown[:5]}")
    for name, p in params.items():
        a = inner_lrs[name]
        if not isinstance(a, Tensor):
            raise TypeError(f"inner_lrs[{name!r}] must be a Tensor, got {type(a).__name__}")
        if a.shape != p.shape:
            raise ValueError(f"inner_lrs[{name!r}] has shape {tuple(a.shape)} but the parameter has "
                             f"{tuple(p.shape)}: Meta-SGD learns one rate per weight (init_inner_lrs builds them)")
        if a.dtype != p.dtype or a.device != p.device:
            raise TypeError(f"inner_lrs[{name!r}] is {a.dtype} on {a.device} but the parameter is {p.dtype} on "
                            f"{p.device}; they must match")


def meta_loss(model: nn.Module, params: Mapping[str, Tensor], inner_lrs: Mapping[str, Tensor], tasks: TaskBatch, *,
              loss_fn: LossFn, inner_steps: int, first_order: bool = False, strategy: str = "auto",
              chunk_size: int | None = None, check_finite: bool = True,
              return_outputs: bool = False, eager: bool | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """The Meta-SGD objective: mean over tasks of L_query(θ'), θ' from ``inner_steps`` steps θ − α ⊙ ∇L.

    Differentiable w.r.t. ``params`` (θ) and ``inner_lrs`` (α). ``strategy``/``chunk_size``/``eager``
    batch the tasks and bound memory as in :func:`mlcore.maml.meta_loss`; ``check_finite`` raises
    :class:`~mlcore.inner.InnerLoopDivergedError` instead of returning inf/NaN; ``return_outputs`` also
    returns the adapted query outputs, (meta_batch, n_query, ...).
    """
    if not isinstance(tasks, TaskBatch):
        raise TypeError(f"tasks must be a mlcore.tasks.TaskBatch, got {type(tasks).__name__}")
    check_params(model, params)
    _check_inner_lrs(params, inner_lrs)
    how = resolve_strategy(strategy, model, tasks.device)

    def chunk_losses(chunk: TaskBatch) -> tuple[Tensor, Tensor]:  # (b, 1), (b, n_query, ...)
        return query_losses(model, params, chunk, loss_fn=loss_fn, inner_lr=dict(inner_lrs), inner_steps=inner_steps,
                            first_order=first_order, eval_steps=[inner_steps], strategy=how, return_outputs=True)

    loss, outputs = task_mean(chunk_losses, tasks, how=how, chunk_size=chunk_size, eager=eager,
                              inputs=grad_inputs(params, inner_lrs, tasks))
    if check_finite:
        raise_if_diverged(loss.detach(), inner_lr=inner_lrs, inner_steps=inner_steps, tasks=tasks)
    return (loss, outputs) if return_outputs else loss


def predict(model: nn.Module, params: Mapping[str, Tensor], inner_lrs: Mapping[str, Tensor], tasks: TaskBatch, *,
            loss_fn: LossFn, inner_steps: int, strategy: str = "auto") -> Tensor:
    """Meta-test: adapt with the learned α, return query outputs (meta_batch, n_query, ...), detached."""
    check_params(model, params)
    _check_inner_lrs(params, inner_lrs)
    with torch.no_grad():  # torch.func.grad inside the inner loop ignores an outer no_grad
        _, outputs = query_losses(model, {n: p.detach() for n, p in params.items()}, tasks, loss_fn=loss_fn,
                                  inner_lr={n: a.detach() for n, a in inner_lrs.items()}, inner_steps=inner_steps,
                                  first_order=True, strategy=strategy, return_outputs=True)
    return outputs
