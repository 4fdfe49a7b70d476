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
``inner_lr``     α               learned inner rates, dict name → tensor shaped like ``params[name]``
``inner_steps``  —               inner steps (the paper uses 1)
``tasks``        T_i             a :class:`~mlcore.tasks.TaskBatch` (support D^tr, query D^ts)
===============  ==============  ================================================================

Meta-SGD is MAML with a learned learning-rate argument: each function below checks α and calls its
namesake in :mod:`mlcore.maml` (whose inner loop accepts a dict of rate tensors); nothing is
re-implemented. Give ``list(alpha.values())`` to the outer optimiser next to ``params.values()``.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from . import checks, family, maml
from .family import MetaStep, Step
from .inner import LossFn
from .tasks import TaskBatch

__all__ = ["init_inner_lrs", "meta_loss", "meta_backward", "train_step", "predict"]


def init_inner_lrs(params: Mapping[str, Tensor], value: float, *, requires_grad: bool = True) -> dict[str, Tensor]:
    """α initialised to ``value`` everywhere: one tensor per parameter, same shape, dtype and device.

    The tensors are new leaves (not views of ``params``); give ``list(alpha.values())`` to the outer
    optimiser next to ``params.values()``. The paper initialises α at random in a small positive range;
    a constant equal to MAML's α makes step 0 of Meta-SGD identical to MAML, which is easier to compare.
    """
    checks.positive_number("value (the starting inner rate)", value, "init_inner_lrs")
    if not isinstance(params, Mapping) or not params:
        raise TypeError("init_inner_lrs: params must be a non-empty dict name -> Tensor, "
                        "e.g. dict(model.named_parameters())")
    return {n: torch.full_like(p.detach(), float(value)).requires_grad_(requires_grad) for n, p in params.items()}


def _check_alpha(params: Mapping[str, Tensor], inner_lr: object) -> Mapping[str, Tensor]:
    if not isinstance(inner_lr, Mapping):
        raise TypeError(f"Meta-SGD's inner_lr is the dict name -> Tensor of learned rates (see init_inner_lrs), "
                        f"got {type(inner_lr).__name__}; for one scalar rate use mlcore.maml")
    missing, unknown = sorted(set(params) - set(inner_lr)), sorted(set(inner_lr) - set(params))
    if missing or unknown:
        raise KeyError(f"inner_lr must hold one rate tensor per parameter; missing {missing[:5]}, "
                       f"unknown {unknown[:5]}")
    for name, p in params.items():
        a = inner_lr[name]
        if not isinstance(a, Tensor):
            raise TypeError(f"inner_lr[{name!r}] must be a Tensor, got {type(a).__name__}")
        if a.shape != p.shape:
            raise ValueError(f"inner_lr[{name!r}] has shape {tuple(a.shape)} but the parameter has "
                             f"{tuple(p.shape)}: Meta-SGD learns one rate per weight (init_inner_lrs builds them)")
        if a.dtype != p.dtype or a.device != p.device:
            raise TypeError(f"inner_lr[{name!r}] is {a.dtype} on {a.device} but the parameter is {p.dtype} on "
                            f"{p.device}; they must match")
    return dict(inner_lr)


def meta_loss(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, loss_fn: LossFn,
              inner_lr: Mapping[str, Tensor], inner_steps: int, first_order: bool = False, strategy: str = "auto",
              chunk_size: int | None = None, check_finite: bool = True) -> Tensor:
    """The Meta-SGD objective: mean over tasks of L_query(θ'), θ' from ``inner_steps`` steps θ − α ⊙ ∇L.

    A differentiable scalar w.r.t. ``params`` (θ) and ``inner_lr`` (α); other arguments as in
    :func:`mlcore.maml.meta_loss`.
    """
    return maml.meta_loss(model, params, tasks, loss_fn=loss_fn, inner_lr=_check_alpha(params, inner_lr),
                          inner_steps=inner_steps, first_order=first_order, strategy=strategy,
                          chunk_size=chunk_size, check_finite=check_finite)


def meta_backward(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, loss_fn: LossFn,
                  inner_lr: Mapping[str, Tensor], inner_steps: int, first_order: bool = False,
                  strategy: str = "auto", chunk_size: int | None = None, check_finite: bool = True,
                  compile: bool | str = False) -> MetaStep:
    """:func:`meta_loss` back-propagated task by task into the ``.grad`` of θ and α (the memory of one
    task); returns the detached loss and query outputs, as :func:`mlcore.maml.meta_backward` (whose
    ``compile=`` differentiates θ and α in one compiled function)."""
    return maml.meta_backward(model, params, tasks, loss_fn=loss_fn, inner_lr=_check_alpha(params, inner_lr),
                              inner_steps=inner_steps, first_order=first_order, strategy=strategy,
                              chunk_size=chunk_size, check_finite=check_finite, compile=compile)


def train_step(model: nn.Module, params: Mapping[str, Tensor], optimizer: torch.optim.Optimizer,
               tasks: TaskBatch, **kwargs: object) -> Step:
    """One outer step on θ and α (``optimizer`` holds both); returns (loss, accuracy) as floats."""
    return family.train_step(meta_backward, model, params, optimizer, tasks, **kwargs)


def predict(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, loss_fn: LossFn,
            inner_lr: Mapping[str, Tensor], inner_steps: int, strategy: str = "auto",
            chunk_size: int | None = None) -> Tensor:
    """Meta-test: adapt with the learned α, return query outputs (meta_batch, n_query, ...), detached."""
    return maml.predict(model, params, tasks, loss_fn=loss_fn, inner_lr=_check_alpha(params, inner_lr),
                        inner_steps=inner_steps, strategy=strategy, chunk_size=chunk_size)
