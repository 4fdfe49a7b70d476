"""Conditional Neural Processes (Garnelo, Rosenbaum, Maddison, Ramalho, Saxton, Shanahan, Teh, Rezende &
Eslami 2018, "Conditional Neural Processes", ICML).

Where MAML adapts weights with gradient steps, a CNP *amortises* adaptation: one forward pass maps a
task's context set (the support set) to a prediction at any target input. With an encoder h, a mean
aggregator and a decoder g (paper §2.3):

    r_i = h_θ(x_i, y_i)   for each context pair,        r = (1/n) Σ_i r_i          (order-invariant)
    (μ_t, σ_t) = g_θ(r, x_t)                                                     for each target input
    L(θ) = − E_tasks [ (1/|T|) Σ_{t ∈ T} log N(y_t; μ_t, σ_t²) ]                  (Gaussian likelihood)

trained on random context/target splits of each task's points, the targets including the context (the
paper's training procedure, §2.4). The predicted σ is an uncertainty: it should shrink where the context
holds points. As in the authors' released notebook, σ = 0.1 + 0.9 · softplus(decoder output) keeps the
likelihood bounded, and the default sizes are its: an encoder of four 128-unit layers, a decoder of two
128-unit layers and a (μ, log σ) output per target dimension.

An empty context is allowed: r is then the zero vector (no information), and the CNP predicts its prior.

Notation: ``x_context`` (B, n, x_dim) and ``y_context`` (B, n, y_dim) the context set of each of B tasks,
``x_target`` (B, m, x_dim) the target inputs; for a :class:`~mlcore.tasks.TaskBatch` the support set is the
context and the query set the targets.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checks
from .family import Step
from .tasks import TaskBatch

__all__ = ["CNP", "gaussian_nll", "meta_loss", "train_step", "predict", "predictive", "random_split"]


def _mlp(sizes: Sequence[int], where: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        checks.positive_int(f"layer width {i}", b, where)
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class CNP(nn.Module):
    """Encoder h (x, y) → r_i, mean over the context, decoder g (r, x_t) → (μ, σ).

    Shapes: ``forward(x_context (B, n, x_dim), y_context (B, n, y_dim), x_target (B, m, x_dim))`` →
    ``(mean, std)``, each (B, m, y_dim); n = 0 is allowed.
    """

    def __init__(self, x_dim: int = 1, y_dim: int = 1, encoder: Sequence[int] = (128, 128, 128, 128),
                 decoder: Sequence[int] = (128, 128)) -> None:
        super().__init__()
        checks.positive_int("x_dim", x_dim, "CNP")
        checks.positive_int("y_dim", y_dim, "CNP")
        if not encoder or not decoder:
            raise ValueError("CNP: encoder and decoder need at least one layer width each")
        self.x_dim, self.y_dim, self.r_dim = x_dim, y_dim, encoder[-1]
        self.encoder = _mlp([x_dim + y_dim, *encoder], "CNP encoder")
        self.decoder = _mlp([self.r_dim + x_dim, *decoder, 2 * y_dim], "CNP decoder")

    def represent(self, x_context: Tensor, y_context: Tensor) -> Tensor:
        """r = mean_i h(x_i, y_i), (B, r_dim); zeros for an empty context."""
        if x_context.shape[1] == 0:
            return x_context.new_zeros(x_context.shape[0], self.r_dim)
        return self.encoder(torch.cat([x_context, y_context], dim=-1)).mean(dim=1)

    def forward(self, x_context: Tensor, y_context: Tensor, x_target: Tensor) -> tuple[Tensor, Tensor]:
        _check_shapes(self, x_context, y_context, x_target)
        r = self.represent(x_context, y_context)                              # (B, r_dim)
        r = r[:, None, :].expand(-1, x_target.shape[1], -1)                   # (B, m, r_dim)
        mean, raw = self.decoder(torch.cat([r, x_target], dim=-1)).chunk(2, dim=-1)
        return mean, 0.1 + 0.9 * F.softplus(raw)                              # σ bounded below by 0.1


def _check_shapes(model: CNP, xc: Tensor, yc: Tensor, xt: Tensor) -> None:
    for name, t, dim in (("x_context", xc, model.x_dim), ("y_context", yc, model.y_dim), ("x_target", xt, model.x_dim)):
        if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[-1] != dim:
            raise ValueError(f"CNP: {name} must have shape (tasks, points, {dim}), got "
                             f"{tuple(getattr(t, 'shape', ())) or type(t).__name__}")
    if xc.shape[:2] != yc.shape[:2] or xc.shape[0] != xt.shape[0]:
        raise ValueError(f"CNP: x_context {tuple(xc.shape)}, y_context {tuple(yc.shape)} and x_target "
                         f"{tuple(xt.shape)} disagree on the number of tasks or context points")
    if not xc.is_floating_point() or not yc.is_floating_point():
        raise TypeError("CNP regresses real values: context inputs and targets must be floating point")


def gaussian_nll(mean: Tensor, std: Tensor, y: Tensor) -> Tensor:
    """− mean over tasks, targets and dimensions of log N(y; μ, σ²)."""
    if mean.shape != y.shape or std.shape != y.shape:
        raise ValueError(f"gaussian_nll: mean {tuple(mean.shape)}, std {tuple(std.shape)} and targets "
                         f"{tuple(y.shape)} must have one shape")
    return (torch.log(std) + 0.5 * ((y - mean) / std) ** 2 + 0.5 * math.log(2 * math.pi)).mean()


def random_split(tasks: TaskBatch, *, generator: torch.Generator, min_context: int = 1,
                 max_context: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The paper's training split of each task's points (support ∪ query): a random number n of them,
    uniform in [min_context, max_context], is the context; all points are the targets. One n per batch,
    a fresh random order per task. Returns (x_context, y_context, x_target, y_target)."""
    if tasks.is_classification:
        raise TypeError("a CNP here regresses real-valued targets; these tasks have class labels")
    x = torch.cat([tasks.x_support, tasks.x_query], dim=1)                    # (B, N, x_dim)
    y = torch.cat([tasks.y_support, tasks.y_query], dim=1)
    total = x.shape[1]
    high = total if max_context is None else max_context
    checks.non_negative_int("min_context", min_context)
    if not min_context <= high <= total:
        raise ValueError(f"need min_context <= max_context <= the task's {total} points, got {min_context} and "
                         f"{high}")
    n = int(torch.randint(min_context, high + 1, (), generator=generator))
    order = torch.argsort(torch.rand(x.shape[:2], generator=generator), dim=1).to(x.device)  # (B, N)
    pick = order[:, :n, None]
    return (torch.gather(x, 1, pick.expand(-1, -1, x.shape[-1])), torch.gather(y, 1, pick.expand(-1, -1, y.shape[-1])),
            x, y)


def meta_loss(model: CNP, tasks: TaskBatch, *, generator: torch.Generator | None = None,
              min_context: int = 1, max_context: int | None = None) -> Tensor:
    """The negative log-likelihood of the targets given the context, averaged (differentiable).

    Without ``generator``: the support set is the context and the query set the targets (evaluation).
    With it: the paper's random context/target split (:func:`random_split`), for training.
    """
    if not isinstance(tasks, TaskBatch):
        raise TypeError(f"tasks must be a mlcore.tasks.TaskBatch, got {type(tasks).__name__}")
    if generator is None:
        if tasks.is_classification:
            raise TypeError("a CNP here regresses real-valued targets; these tasks have class labels")
        xc, yc, xt, yt = tasks.x_support, tasks.y_support, tasks.x_query, tasks.y_query
    else:
        xc, yc, xt, yt = random_split(tasks, generator=generator, min_context=min_context, max_context=max_context)
    mean, std = model(xc, yc, xt)
    return gaussian_nll(mean, std, yt)


def train_step(model: CNP, optimizer: torch.optim.Optimizer, tasks: TaskBatch, *, generator: torch.Generator,
               min_context: int = 1, max_context: int | None = None) -> Step:
    """One optimiser step on random context/target splits; returns (negative log-likelihood, None)."""
    optimizer.zero_grad(set_to_none=True)
    loss = meta_loss(model, tasks, generator=generator, min_context=min_context, max_context=max_context)
    loss.backward()
    optimizer.step()
    return Step(loss.item(), None)


def predictive(model: CNP, tasks: TaskBatch) -> tuple[Tensor, Tensor]:
    """Meta-test in one forward pass: the predictive mean and σ at the query inputs given the support
    set, each (meta_batch, n_query, y_dim), detached."""
    if not isinstance(tasks, TaskBatch):
        raise TypeError(f"tasks must be a mlcore.tasks.TaskBatch, got {type(tasks).__name__}")
    with torch.no_grad():
        return model(tasks.x_support, tasks.y_support, tasks.x_query)


def predict(model: CNP, tasks: TaskBatch) -> Tensor:
    """The predictive mean only (:func:`predictive`), as the ``predict`` of :func:`mlcore.evaluate.evaluate`."""
    return predictive(model, tasks)[0]
