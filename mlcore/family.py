"""What the MAML family (MAML, FOMAML, Meta-SGD, ANIL) does around its per-task objective.

Each method writes down one task's objective in its own file (``maml.task_loss``, ``anil.task_loss``)
and gets the same four entry points from here, with the same arguments and return types:

=====================  =================================================================================
``meta_loss``          the mean query loss over the meta-batch, an ordinary differentiable scalar; every
                       task's graph is alive until you call ``.backward()`` (or take
                       ``torch.autograd.grad``, ``create_graph=True`` included)
``meta_backward``      the same mean, back-propagated task by task (chunk by chunk under vmap) as soon as
                       each task's loss is known: gradients accumulate into ``.grad``, the memory of one
                       task instead of B, the same gradient; returns a :class:`~mlcore.inner.MetaStep`
                       (detached loss, query outputs)
``train_step``         ``optimizer.zero_grad()``, ``meta_backward``, ``optimizer.step()``; returns a
                       :class:`Step` (loss, accuracy), like ``protonet.train_step``
``predict``            meta-test: adapt to each support set without building a meta-gradient graph,
                       return the query outputs (meta_batch, n_query, ...), detached
=====================  =================================================================================

Which to call when: ``meta_backward`` (or ``train_step``) to train; ``meta_loss`` when you need the
graph itself (a second derivative, a gradient w.r.t. something that is not a leaf, ``torch.func``
transforms around it) and the memory of all tasks at once is affordable.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import checks
from .inner import InnerLR, MetaStep, TaskFn, over_tasks, resolve_strategy
from .tasks import TaskBatch

__all__ = ["Step", "Prepared", "prepare", "run", "train_step", "predict", "accuracy"]


class Step(NamedTuple):
    """One training step's loss and query accuracy (``None`` for regression), as Python floats."""
    loss: float
    accuracy: float | None


class Prepared(NamedTuple):
    """The checked arguments of one call: per-step rates of the adapted parameters, the strategy, and
    whether a learnable input is itself computed (its graph is then shared by every task's backward)."""
    rates: list[dict[str, float | Tensor]]
    inner_steps: int
    how: str
    chunk_size: int | None
    shared_graph: bool


def prepare(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, inner_lr: InnerLR,
            inner_steps: int, adapt: Collection[str] | None = None, strategy: str = "auto",
            chunk_size: int | None = None, loss_fn: object = None) -> Prepared:
    """Check every argument once (the validation boundary of the family's entry points)."""
    checks.params(model, params)
    checks.tasks(tasks, params, loss_fn)
    steps = checks.non_negative_int("inner_steps", inner_steps)
    rates = checks.rates(inner_lr, steps, params, checks.adapted_names(params, adapt, steps))
    how = resolve_strategy(strategy, model, tasks.device)
    inputs = [*params.values(), *(r for rate in rates for r in rate.values() if isinstance(r, Tensor))]
    return Prepared(rates, steps, how, checks.chunk_size(chunk_size, how), shared_graph=computed(inputs))


def computed(tensors: Collection[object]) -> bool:
    """True if a tensor among ``tensors`` requires grad and is not a leaf (θ = f(φ), say)."""
    return any(isinstance(t, Tensor) and t.requires_grad and t.grad_fn is not None for t in tensors)


def run(task_fn: TaskFn, tasks: TaskBatch, prepared: Prepared, *, inner_lr: InnerLR, check_finite: bool,
        backward: bool) -> MetaStep:
    """The mean of ``task_fn`` over the tasks (:func:`mlcore.inner.over_tasks`), checked."""
    result = over_tasks(task_fn, tasks, how=prepared.how, chunk_size=prepared.chunk_size, backward=backward,
                        shared_graph=prepared.shared_graph)
    checks.outputs(result.outputs, tasks)
    if check_finite:
        checks.raise_if_diverged(result.loss.detach(), inner_lr=inner_lr, inner_steps=prepared.inner_steps,
                                 tasks=tasks)
    return result


def train_step(meta_backward: Callable[..., MetaStep], model: nn.Module, params: Mapping[str, Tensor],
               optimizer: torch.optim.Optimizer, tasks: TaskBatch, **kwargs: object) -> Step:
    """One outer step: zero the gradients, ``meta_backward(model, params, tasks, **kwargs)``, step."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer over params (and learned rates), got "
                        f"{type(optimizer).__name__}")
    optimizer.zero_grad(set_to_none=True)
    result = meta_backward(model, params, tasks, **kwargs)
    optimizer.step()
    return Step(result.loss.item(), accuracy(result.outputs, tasks))


def predict(objective: Callable[..., MetaStep], model: nn.Module, params: Mapping[str, Tensor],
            tasks: TaskBatch, *, inner_lr: InnerLR, **kwargs: object) -> Tensor:
    """Query outputs after adaptation, detached: ``objective`` run first-order on detached θ and α."""
    with torch.no_grad():  # the inner loop takes its gradients under enable_grad, at detached leaves
        return objective(model, _detached(params), tasks, inner_lr=_detached(inner_lr), first_order=True,
                         check_finite=False, **kwargs).outputs


def accuracy(outputs: Tensor, tasks: TaskBatch) -> float | None:
    """The fraction of query examples whose highest score is the true class; ``None`` for regression."""
    if not tasks.is_classification:
        return None
    return (outputs.detach().argmax(-1) == tasks.y_query).float().mean().item()


def _detached(value: object) -> object:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, Mapping):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_detached(v) for v in value]
    return value
