"""CAVIA, fast context adaptation (Zintgraf, Shiarlis, Kurin, Hofmann & Whiteson 2019, "Fast Context
Adaptation via Meta-Learning", ICML).

MAML adapts every weight to a new task; CAVIA adapts only a few **context parameters** φ, an input to
the network that is reset to φ_0 = 0 for every task, and meta-learns the network weights θ in the outer
loop (the paper's Algorithm 1, with S inner steps in general):

    φ_i = φ_0 − α ∇_φ L_{T_i}(f_{θ, φ_0}; D^tr_i),        φ_0 = 0           (inner loop: the context only)
    θ ← θ − β ∇_θ Σ_i L_{T_i}(f_{θ, φ_i}; D^ts_i)                          (outer loop: the network only)

θ does not change inside the inner loop, so a task is represented by φ_i alone: a small vector that
the chapter plots against the task's true parameters. The meta-gradient w.r.t. θ is exact second
order: φ_i depends on θ through ∇_φ L, and the shared inner loop (:mod:`mlcore.inner`) differentiates
through it, adapting the context and nothing else (``adapt`` = the context's name).

How the context enters the network, as in the authors' released code (github.com/lmzintgraf/cavia):
concatenated to the input for regression (:class:`ContextMLP`); for images a FiLM layer,
γ, β = split(W φ + b) and h ← γ ⊙ h + β per channel, on the third convolutional block's output (after
batch norm and pooling, before the ReLU; 100 context parameters), :class:`ContextConv4`.

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
import torch.nn.functional as F
from torch import Tensor, nn

from . import checks, family, maml
from .family import MetaStep, Step
from .inner import InnerLR, LossFn, trajectory
from .models import BatchStatNorm2d
from .tasks import TaskBatch

__all__ = ["ContextMLP", "ContextConv4", "CONTEXT", "context_names", "meta_parameters", "meta_loss", "meta_backward", "train_step",
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


class ContextConv4(nn.Module):
    """The 4-block conv net (3×3 conv → batch statistics → 2×2 max-pool → ReLU) with a FiLM layer on block
    ``film_block`` (0-based; the authors' default, 2, is the third): there the pooled, normalised feature
    map h becomes γ ⊙ h + β before the ReLU, with (γ, β) = ``film``(φ) per channel.

    ``context`` is φ_0 = 0 (``context_dim`` zeros, never trained). Shapes: x (N, in_channels, image_size,
    image_size) → logits (N, n_way). Batch statistics as ``Conv4(norm="batch")``: exact under vmap.
    """

    def __init__(self, in_channels: int = 1, n_way: int = 5, hidden: int = 32, context_dim: int = 100,
                 film_block: int = 2, image_size: int = 28) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("n_way", n_way), ("hidden", hidden),
                            ("context_dim", context_dim), ("image_size", image_size)):
            checks.positive_int(name, value, "ContextConv4")
        if isinstance(film_block, bool) or film_block not in range(4):
            raise ValueError(f"ContextConv4: film_block is the index 0..3 of the conv block FiLM modulates, got "
                             f"{film_block!r}")
        side = image_size
        for _ in range(4):
            side //= 2
        if side == 0:
            raise ValueError(f"ContextConv4: image_size={image_size} is too small for four 2x2 poolings (need >= 16)")
        self.context = nn.Parameter(torch.zeros(context_dim))
        self.convs = nn.ModuleList(nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, padding=1)
                                   for i in range(4))
        self.norms = nn.ModuleList(BatchStatNorm2d(hidden) for _ in range(4))
        self.film = nn.Linear(context_dim, 2 * hidden)
        self.head = nn.Linear(hidden * side * side, n_way)
        self.film_block, self.in_channels, self.image_size = film_block, in_channels, image_size

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"ContextConv4 expects images of shape (N, {self.in_channels}, {self.image_size}, "
                             f"{self.image_size}), got {tuple(x.shape)}")
        h = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            h = F.max_pool2d(norm(conv(h)), 2)
            if i == self.film_block:
                gamma, beta = self.film(self.context).chunk(2)              # (hidden,) each
                h = gamma[None, :, None, None] * h + beta[None, :, None, None]
            h = F.relu(h)
        return self.head(h.flatten(1))


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

    def one_task(inputs: family.Inputs, x_s: Tensor, y_s: Tensor, x_q: Tensor, y_q: Tensor, *,
                 vmapped: bool) -> tuple[Tensor, Tensor]:
        # MAML's task loss with only the context moving: φ_0 → φ_i, θ fixed inside the inner loop
        return maml.task_loss(model, inputs.params, x_s, y_s, x_q, y_q, loss_fn=loss_fn, rates=inputs.rates,
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
