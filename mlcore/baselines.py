"""The implementations :mod:`mlcore.bench` compares mlcore with, written without :mod:`mlcore.inner`.

=================================  =====================================================================
:func:`reference_meta_loss`        what a common implementation does: per task, manual SGD with
                                   ``autograd.grad`` (``create_graph`` for second order) on the module's
                                   parameters, a functional forward on the query, ``backward`` (the
                                   bench's reference, checked against finite differences)
:func:`floor_step`                 plain supervised forward + backward over all the examples in one batch
:func:`higher_step`                ``higher.innerloop_ctx`` per task (optional package)
:func:`functorch_recipe_step`      the functorch MAML example's pattern: ``vmap`` over ``grad``
:func:`with_torch_batchnorm`       the same network with ``nn.BatchNorm2d``, whose second-order
                                   meta-gradient under vmap is wrong (chapter 3)
=================================  =====================================================================

A builder takes (problem, first_order) and returns a zero-argument step that accumulates the
meta-gradient (of the mean over tasks of the query loss, Finn et al. 2017, eq. 2) into ``.grad`` of the
problem's model.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .inner import LossFn
from .models import BatchStatNorm2d
from .tasks import TaskBatch

__all__ = ["Problem", "Step", "Build", "reference_meta_loss", "reference_step", "floor_step", "higher_step",
           "functorch_recipe_step", "with_torch_batchnorm"]


@dataclass(frozen=True)
class Problem:
    """One benchmark instance: a network, a meta-batch of tasks and the inner-loop settings."""

    model: nn.Module
    tasks: TaskBatch
    loss_fn: LossFn
    inner_lr: float
    inner_steps: int


Step = Callable[[], object]
Build = Callable[[Problem, bool], Step]


def reference_meta_loss(p: Problem, first_order: bool, backward: bool,
                        params: dict[str, Tensor] | None = None) -> Tensor:
    """The reference, written without mlcore.inner: per task, ``inner_steps`` of manual SGD with
    ``autograd.grad`` (``create_graph`` for second order) from θ = ``params`` (default: the model's), then the
    query loss ℓ_i; with ``backward``, ``(ℓ_i / B).backward()`` task by task. Returns (1/B) Σ_i ℓ_i, detached."""
    names, weights = zip(*(params or dict(p.model.named_parameters())).items())
    t, total = p.tasks, torch.zeros((), device=p.tasks.x_query.device, dtype=p.tasks.x_query.dtype)
    for i in range(t.meta_batch):
        fast = list(weights)
        for _ in range(p.inner_steps):
            loss = p.loss_fn(functional_call(p.model, dict(zip(names, fast)), (t.x_support[i],)), t.y_support[i])
            grads = torch.autograd.grad(loss, fast, create_graph=backward and not first_order)
            fast = [w - p.inner_lr * g for w, g in zip(fast, grads, strict=True)]   # θ_{j+1} = θ_j − α ∇L
        query = p.loss_fn(functional_call(p.model, dict(zip(names, fast)), (t.x_query[i],)), t.y_query[i]) / t.meta_batch
        if backward:
            query.backward()   # frees this task's graph before the next task
        total = total + query.detach()
    return total


def floor_step(p: Problem, first_order: bool) -> Step:
    x = torch.cat([p.tasks.x_support, p.tasks.x_query], 1).flatten(0, 1)   # (B·(support + query), *feature_shape)
    y = torch.cat([p.tasks.y_support, p.tasks.y_query], 1).flatten(0, 1)   # (B·(support + query), *target_shape)
    return lambda: p.loss_fn(p.model(x), y).backward()


def reference_step(p: Problem, first_order: bool) -> Step:
    return lambda: reference_meta_loss(p, first_order, backward=True)


def higher_step(p: Problem, first_order: bool) -> Step:
    import higher  # optional: Method(optional=True) turns an ImportError into a row that says so
    t, inner_opt = p.tasks, torch.optim.SGD(p.model.parameters(), lr=p.inner_lr)
    # higher always differentiates through its steps; FOMAML is its documented grad_callback that detaches.
    detach = (lambda grads: [g.detach() for g in grads]) if first_order else None

    def step() -> None:
        for i in range(t.meta_batch):
            # copy_initial_weights=False: with higher's default (True) no meta-gradient reaches the model.
            with higher.innerloop_ctx(p.model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(p.inner_steps):
                    diffopt.step(p.loss_fn(fmodel(t.x_support[i]), t.y_support[i]), grad_callback=detach)
                (p.loss_fn(fmodel(t.x_query[i]), t.y_query[i]) / t.meta_batch).backward()
    return step


def functorch_recipe_step(p: Problem, first_order: bool) -> Step:
    """The functorch MAML example's pattern, written independently of mlcore.inner."""
    params, t = dict(p.model.named_parameters()), p.tasks

    def task_query_loss(theta: dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        for _ in range(p.inner_steps):
            grads = torch.func.grad(lambda th: p.loss_fn(functional_call(p.model, th, (xs,)), ys))(theta)
            if first_order:
                grads = {n: g.detach() for n, g in grads.items()}
            theta = {n: theta[n] - p.inner_lr * grads[n] for n in theta}
        return p.loss_fn(functional_call(p.model, theta, (xq,)), yq)

    batched = torch.func.vmap(task_query_loss, in_dims=(None, 0, 0, 0, 0))
    return lambda: batched(params, t.x_support, t.y_support, t.x_query, t.y_query).mean().backward()


def with_torch_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose BatchStatNorm2d layers are ``nn.BatchNorm2d(track_running_stats=False)``
    with the same scale and shift: the same function, as ``replace_all_batch_norm_modules_`` leaves it."""
    clone = copy.deepcopy(model)  # a separate benchmark model; no gradient flows between the copies
    for name, module in list(clone.named_modules()):
        if isinstance(module, BatchStatNorm2d):
            bn = nn.BatchNorm2d(module.weight.shape[0], eps=module.eps, track_running_stats=False)
            bn.to(device=module.weight.device, dtype=module.weight.dtype).load_state_dict(module.state_dict())
            parent_name, _, child = name.rpartition(".")
            setattr(clone.get_submodule(parent_name), child, bn)
    return clone
