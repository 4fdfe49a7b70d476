"""CAVIA, fast context adaptation (Zintgraf, Shiarlis, Kurin, Hofmann & Whiteson 2019, "Fast Context
Adaptation via Meta-Learning", ICML).

MAML adapts every weight to a new task; CAVIA adapts only a few **context parameters** φ, an input to
the network that is reset to φ_0 = 0 for every task, and meta-learns the network weights θ in the outer
loop (the paper's Algorithm 1, with K inner steps in general):

    φ_i = φ_0 − α ∇_φ L_{T_i}(f_{θ, φ_0}; D^tr_i),        φ_0 = 0           (inner loop: the context only)
    θ ← θ − β ∇_θ Σ_i L_{T_i}(f_{θ, φ_i}; D^ts_i)                          (outer loop: the network only)

θ does not change inside the inner loop, so a task is represented by φ_i alone: a small vector that
the chapter plots against the task's true parameters. The meta-gradient w.r.t. θ is exact second
order: φ_i depends on θ through ∇_φ L, and the shared inner loop (:mod:`mlcore.inner`) differentiates
through it, adapting the context and nothing else (``adapt`` = the context's name).

How the context enters the network: concatenated to the input (the paper's regression networks),
:class:`ContextMLP`; FiLM layers for convolutional networks are the paper's choice for images.

Notation:

===============  ==============  ================================================================
code             paper           meaning
===============  ==============  ================================================================
``params``       θ and φ_0       every parameter of the model; the context is ``params["context"]``
                                 (zeros: the model holds φ_0 = 0), the rest is θ
``inner_lr``     α               inner rate for the context
``inner_steps``  —               inner steps on the context
===============  ==============  ================================================================

The outer optimiser holds θ only (:func:`meta_parameters`), so φ_0 stays 0 as in the paper; the same
four entry points as MAML's (:mod:`mlcore.family`) take the same arguments.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from . import checks, family, maml
from .family import MetaStep, Step
from .inner import InnerLR, LossFn, trajectory
from .tasks import TaskBatch

__all__ = ["ContextMLP", "CONTEXT", "context_names", "meta_parameters", "meta_loss", "meta_backward", "train_step",
           "predict", "adapt_context"]

CONTEXT = "context"


class ContextMLP(nn.Module):
    """f(x; θ, φ) = MLP([x, φ]): the context vector φ is concatenated to every input (CAVIA's regression net).

    ``context`` is a parameter of ``context_dim`` zeros (φ_0 = 0, never trained: give
    :func:`meta_parameters` to the optimiser). Shapes: x (N, in_features) → (N, out_features).
    """

    def __init__(self, in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int = 1,
                 context_dim: int = 4) -> None:
        super().__init__()
        checks.positive_int("context_dim", context_dim, "ContextMLP")
        checks.positive_int("in_features", in_features, "ContextMLP")
        checks.positive_int("out_features", out_features, "ContextMLP")
        if isinstance(hidden, (int, float)) or not hasattr(hidden, "__iter__"):
            raise TypeError(f"ContextMLP: hidden is the tuple of hidden-layer widths, e.g. (40, 40); got {hidden!r}")
        self.context = nn.Parameter(torch.zeros(context_dim))
        layers: list[nn.Module] = []
        width = in_features + context_dim
        for i, h in enumerate(hidden):
            checks.positive_int(f"hidden[{i}]", h, "ContextMLP")
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2:
            raise ValueError(f"ContextMLP expects inputs of shape (N, in_features), got {tuple(x.shape)}")
        phi = self.context.expand(x.shape[0], -1)                      # (N, context_dim)
        return self.head(self.body(torch.cat([x, phi], dim=-1)))


def context_names(params: Mapping[str, Tensor]) -> tuple[str, ...]:
    """The names of the context parameters (``context``, or ``….context`` in a submodule)."""
    names = tuple(n for n in params if n == CONTEXT or n.endswith("." + CONTEXT))
    if not names:
        raise KeyError(f"CAVIA needs a model with a context parameter named {CONTEXT!r} (e.g. "
                       f"mlcore.cavia.ContextMLP); the parameters are {list(params)[:6]}")
    if len(names) == len(params):
        raise ValueError("every parameter is a context parameter: nothing is left for the outer loop to learn")
    return names


def meta_parameters(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """θ: every parameter but the context, what the outer optimiser updates."""
    context = set(context_names(params))
    return {n: p for n, p in params.items() if n not in context}


def _objective(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, loss_fn: LossFn,
               inner_lr: InnerLR, inner_steps: int, first_order: bool = False, strategy: str = "auto",
               chunk_size: int | None = None, check_finite: bool = True, backward: bool = False) -> MetaStep:
    checks.params(model, params)
    context = context_names(params)
    p = family.prepare(model, params, tasks, inner_lr=inner_lr, inner_steps=inner_steps, adapt=context,
                       strategy=strategy, chunk_size=chunk_size, loss_fn=loss_fn)

    def one_task(x_s: Tensor, y_s: Tensor, x_q: Tensor, y_q: Tensor, *, vmapped: bool) -> tuple[Tensor, Tensor]:
        # MAML's task loss with only the context moving: φ_0 → φ_i, θ fixed inside the inner loop
        return maml.task_loss(model, params, x_s, y_s, x_q, y_q, loss_fn=loss_fn, rates=p.rates,
                              first_order=first_order, vmapped=vmapped)

    return family.run(one_task, tasks, p, inner_lr=inner_lr, check_finite=check_finite, backward=backward)


def meta_loss(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, loss_fn: LossFn,
              inner_lr: InnerLR, inner_steps: int, first_order: bool = False, strategy: str = "auto",
              chunk_size: int | None = None, check_finite: bool = True) -> Tensor:
    """The CAVIA objective: mean over tasks of L_query(θ, φ_i) after ``inner_steps`` steps on the context.

    A differentiable scalar w.r.t. θ (exact second order through the context updates) and φ_0; other
    arguments as in :func:`mlcore.maml.meta_loss`.
    """
    return _objective(model, params, tasks, loss_fn=loss_fn, inner_lr=inner_lr, inner_steps=inner_steps,
                      first_order=first_order, strategy=strategy, chunk_size=chunk_size,
                      check_finite=check_finite).loss


def meta_backward(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, loss_fn: LossFn,
                  inner_lr: InnerLR, inner_steps: int, first_order: bool = False, strategy: str = "auto",
                  chunk_size: int | None = None, check_finite: bool = True) -> MetaStep:
    """:func:`meta_loss` back-propagated task by task into ``.grad`` (the memory of one task)."""
    return _objective(model, params, tasks, loss_fn=loss_fn, inner_lr=inner_lr, inner_steps=inner_steps,
                      first_order=first_order, strategy=strategy, chunk_size=chunk_size, check_finite=check_finite,
                      backward=True)


def train_step(model: nn.Module, params: Mapping[str, Tensor], optimizer: torch.optim.Optimizer,
               tasks: TaskBatch, **kwargs: object) -> Step:
    """One outer step on θ (``optimizer`` over :func:`meta_parameters`); returns (loss, accuracy)."""
    context = {id(params[n]) for n in context_names(params)}
    if any(id(p) in context for group in getattr(optimizer, "param_groups", []) for p in group["params"]):
        raise ValueError("the optimizer holds the context parameter: CAVIA resets the context to φ_0 = 0 for every "
                         "task and learns θ only; build it over mlcore.cavia.meta_parameters(params)")
    return family.train_step(meta_backward, model, params, optimizer, tasks, **kwargs)


def predict(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, loss_fn: LossFn,
            inner_lr: InnerLR, inner_steps: int, strategy: str = "auto", chunk_size: int | None = None) -> Tensor:
    """Meta-test: adapt the context on each support set; query outputs (meta_batch, n_query, ...), detached."""
    return family.predict(_objective, model, params, tasks, loss_fn=loss_fn, inner_lr=inner_lr,
                          inner_steps=inner_steps, strategy=strategy, chunk_size=chunk_size)


def adapt_context(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, loss_fn: LossFn,
                  inner_lr: InnerLR, inner_steps: int) -> Tensor:
    """The adapted context φ_i of every task, (meta_batch, context_dim), detached: a task embedding."""
    checks.params(model, params)
    checks.tasks(tasks, params, loss_fn)
    names = context_names(params)
    if len(names) != 1:
        raise ValueError(f"adapt_context needs exactly one context parameter, the model has {list(names)}")
    name = names[0]
    steps = checks.non_negative_int("inner_steps", inner_steps)
    rates = checks.rates(inner_lr, steps, params, [name])
    detached = {n: t.detach() for n, t in params.items()}
    out = []
    for x, y in zip(tasks.x_support, tasks.y_support, strict=True):
        theta = trajectory(model, detached, x, y, loss_fn=loss_fn, rates=rates, first_order=True,
                           vmapped=False)[-1]
        out.append(theta[name].detach())
    return torch.stack(out)
