"""What the MAML family (MAML, FOMAML, Meta-SGD, ANIL) does around its per-task objective.

Each method writes down one task's objective in its own file (``maml.task_loss``, ``anil.task_loss``)
and gets the same four entry points from here, with the same arguments and return types:

=====================  =================================================================================
``meta_loss``          the mean query loss over the meta-batch, an ordinary differentiable scalar; every
                       task's graph is alive until you call ``.backward()`` (or take
                       ``torch.autograd.grad``, ``create_graph=True`` included)
``meta_backward``      the same mean, back-propagated task by task (chunk by chunk under vmap) as soon as
                       each task's loss is known: gradients accumulate into ``.grad``, the memory of one
                       task instead of B, the same gradient; returns a :class:`MetaStep`
                       (detached loss, query outputs). ``compile=True`` computes the same gradient with
                       the compiled meta-gradient of :mod:`mlcore.compiled` instead
``train_step``         ``optimizer.zero_grad()``, ``meta_backward``, ``optimizer.step()``; returns a
                       :class:`Step` (loss, accuracy), like ``protonet.train_step``
``predict``            meta-test: adapt to each support set without building a meta-gradient graph,
                       return the query outputs (meta_batch, n_query, ...), detached
=====================  =================================================================================

Which to call when: ``meta_backward`` (or ``train_step``) to train; ``meta_loss`` when you need the
graph itself (a second derivative, a gradient w.r.t. something that is not a leaf, ``torch.func``
transforms around it) and the memory of all tasks at once is affordable.

A method's per-task objective is a function of its learnable :class:`Inputs` (θ, the inner rates, the
step weights) and one task's data, ``task_fn(inputs, x_s, y_s, x_q, y_q, *, vmapped)``: the eager
strategies call it with the tensors as given, the compiled meta-gradient with the tensors it
differentiates.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import checks, compiled
from .inner import InnerLR, adapted, resolve_strategy
from .models import frozen_running_stats
from .tasks import TaskBatch

__all__ = ["MetaStep", "Step", "Inputs", "Prepared", "over_tasks", "prepare", "run", "train_step", "predict",
           "accuracy"]


class MetaStep(NamedTuple):
    """A meta-batch's mean query loss and the query outputs after adaptation, (B, n_query, ...)."""
    loss: Tensor
    outputs: Tensor


class Inputs(NamedTuple):
    """What the meta-gradient is taken with respect to: θ (name → tensor), the inner rates α_j of each
    step (name → number, or tensor when learned: Meta-SGD, MAML++ LSLR) and MAML++'s step weights w_j."""
    params: dict[str, Tensor]
    rates: list[dict[str, float | Tensor]]
    step_weights: Tensor | None = None


TaskFn = Callable[..., tuple[Tensor, Tensor]]   # (inputs, x_s, y_s, x_q, y_q, *, vmapped) -> (loss, outputs)


def over_tasks(task_fn: TaskFn, inputs: Inputs, tasks: TaskBatch, *, how: str, chunk_size: int | None = None,
               backward: bool = False, shared_graph: bool = False) -> MetaStep:
    """(1/B) Σ_i ℓ_i over the B tasks, ℓ_i, o_i = ``task_fn(inputs, x_s, y_s, x_q, y_q, vmapped=…)`` of task i.

    ``how="loop"`` runs one task at a time, ``"vmap"`` vmaps ``chunk_size`` tasks at a time (all by
    default). ``backward=True`` calls ``(Σ_chunk ℓ_i / B).backward()`` on each chunk as soon as its
    losses are known, accumulating into ``.grad`` of every leaf they depend on, and keeps only detached
    values, so that the chunk's graph is freed: the memory of one chunk instead of the whole meta-batch,
    the same gradient as ``loss.backward()`` on the mean. ``shared_graph``: some input shared by all
    tasks is itself computed (θ = f(φ)), so each backward keeps that part of the graph for the next.
    """
    size = 1 if how == "loop" else (chunk_size or tasks.meta_batch)
    batched = torch.func.vmap(lambda *t: task_fn(inputs, *t, vmapped=True))
    losses, outputs = [], []
    for start in range(0, tasks.meta_batch, size):
        data = [t[start:start + size] for t in (tasks.x_support, tasks.y_support, tasks.x_query, tasks.y_query)]
        if how == "loop":
            loss, out = task_fn(inputs, *(t[0] for t in data), vmapped=False)
            loss, out = loss[None], out[None]
        else:
            loss, out = batched(*data)
        if backward:
            _backward(loss.sum() / tasks.meta_batch, shared_graph)
            loss, out = loss.detach(), out.detach()   # frees this chunk's graph
        losses.append(loss)
        outputs.append(out)
    return MetaStep(torch.cat(losses).mean(), torch.cat(outputs))


NOTHING_TO_BACKPROPAGATE = ("nothing to back-propagate into: no parameter (nor learned rate) requires grad, or grad "
                            "mode is off. Pass dict(model.named_parameters()), or leaves made with "
                            "p.detach().requires_grad_(), and call it outside torch.no_grad()")


def _backward(loss: Tensor, shared_graph: bool) -> None:
    if not loss.requires_grad:
        raise ValueError(NOTHING_TO_BACKPROPAGATE)
    try:
        loss.backward(retain_graph=shared_graph)
    except RuntimeError as error:
        if "second time" not in str(error):
            raise
        raise RuntimeError("per-task backward reached a computed tensor shared by all tasks that is not among the "
                           "params or rates (a loss_fn closing over one, say), whose graph the first task's "
                           "backward freed; the .grad of some leaves is now partial: zero them, and use "
                           "meta_loss(...).backward() (the whole graph) for this objective") from error


class Step(NamedTuple):
    """One training step's loss and query accuracy (``None`` for regression), as Python floats."""
    loss: float
    accuracy: float | None


class Prepared(NamedTuple):
    """The checked arguments of one call: the learnable inputs (per-step rates of the adapted parameters
    among them), the strategy, whether a learnable input is itself computed (its graph is then shared by
    every task's backward), and the torch.compile mode of the compiled meta-gradient (None: eager)."""
    inputs: Inputs
    inner_steps: int
    how: str
    chunk_size: int | None
    shared_graph: bool
    compile: str | None = None


def prepare(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, inner_lr: InnerLR,
            inner_steps: int, adapt: Collection[str] | None = None, strategy: str = "auto",
            chunk_size: int | None = None, loss_fn: object = None,
            step_weights: Sequence[float] | Tensor | None = None, compile: bool | str = False) -> Prepared:
    """Check every argument once (the validation boundary of the family's entry points)."""
    checks.params(model, params)
    checks.tasks(tasks, params, loss_fn)
    steps = checks.non_negative_int("inner_steps", inner_steps)
    rates = checks.rates(inner_lr, steps, params, adapted(model, params, adapt, steps))
    weights = checks.step_weights(step_weights, steps, tasks.x_query)
    mode = compiled.resolve_mode(compile)
    how = resolve_strategy(strategy, model, tasks.device) if mode is None else \
        compiled.resolve_strategy_for_compile(strategy, model, tasks.device)
    learnable = [*params.values(), *(r for rate in rates for r in rate.values() if isinstance(r, Tensor)), weights]
    return Prepared(Inputs(dict(params), rates, weights), steps, how, checks.chunk_size(chunk_size, how),
                    shared_graph=computed(learnable), compile=mode)


def computed(tensors: Collection[object]) -> bool:
    """True if a tensor among ``tensors`` requires grad and is not a leaf (θ = f(φ), say)."""
    return any(isinstance(t, Tensor) and t.requires_grad and t.grad_fn is not None for t in tensors)


def run(task_fn: TaskFn, tasks: TaskBatch, prepared: Prepared, *, inner_lr: InnerLR, check_finite: bool,
        backward: bool) -> MetaStep:
    """The mean of ``task_fn`` over the tasks (:func:`over_tasks`), checked; with ``prepared.compile``
    (``backward`` only) the compiled meta-gradient, back-propagated into ``.grad``."""
    if prepared.compile is None:
        result = over_tasks(task_fn, prepared.inputs, tasks, how=prepared.how, chunk_size=prepared.chunk_size,
                            backward=backward, shared_graph=prepared.shared_graph)
    else:
        if not backward:
            raise ValueError("compile= computes gradients (meta_backward, train_step), not a graph to differentiate: "
                             "meta_loss takes no compile=")
        if not torch.is_grad_enabled():
            raise ValueError(NOTHING_TO_BACKPROPAGATE)
        g = compiled.meta_gradient(task_fn, prepared.inputs, tasks, mode=prepared.compile,
                                   chunk_size=prepared.chunk_size)
        torch.autograd.backward(list(g.wrt), list(g.grads))   # into .grad of leaves; through θ = f(φ) into φ
        result = MetaStep(g.loss, g.outputs)
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
    """Query outputs after adaptation, detached: ``objective`` run first-order on detached θ and α; MAML++
    per-step batch norm updates no running statistics meanwhile (evaluating leaves the model unchanged)."""
    with torch.no_grad(), frozen_running_stats():  # the inner loop takes its gradients under enable_grad
        outputs = objective(model, _detached(params), tasks, inner_lr=_detached(inner_lr), first_order=True,
                            check_finite=False, **kwargs).outputs
    # A test-time inner loop that diverges must not turn into a silent NaN score (argmax of NaN is class 0).
    finite = torch.isfinite(outputs.reshape(outputs.shape[0], -1)).all(1)    # (meta_batch,)
    if not bool(finite.all()):
        steps = kwargs.get("inner_steps")
        raise checks.InnerLoopDivergedError(
            f"predict: the test-time inner loop diverged ({int((~finite).sum())} of {finite.numel()} tasks "
            f"have non-finite query outputs after {steps} inner steps at inner_lr={_describe(inner_lr)}); "
            f"use a smaller inner_lr or fewer inner_steps at test time (more steps than in training can "
            f"diverge at a rate that trained fine)")
    return outputs


def accuracy(outputs: Tensor, tasks: TaskBatch) -> float | None:
    """The fraction of query examples whose highest score is the true class; ``None`` for regression."""
    if not tasks.is_classification:
        return None
    return (outputs.detach().argmax(-1) == tasks.y_query).float().mean().item()


def _describe(rate: object) -> str:
    if isinstance(rate, (int, float)):
        return f"{rate:g}"
    if isinstance(rate, Tensor) and rate.numel() == 1:
        return f"{rate.item():g}"
    return f"a learned {type(rate).__name__} of rates"


def _detached(value: object) -> object:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, Mapping):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_detached(v) for v in value]
    return value
