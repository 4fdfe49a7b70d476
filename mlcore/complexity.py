"""What a MAML meta-gradient costs: time and peak memory against inner steps S and parameter count |θ|.

Claim to measure (the book's complexity chapter): the second-order meta-gradient needs Hessian-vector
products, never the Hessian (Finn et al. 2017, §2.2; Pearlmutter 1994), so for a meta-batch of B tasks

==========  ======================  ==========================================================
method      time                    memory (beyond θ and the data)
==========  ======================  ==========================================================
gradient    O(|θ|)  one fwd+bwd     O(activations of one forward)
FOMAML      O(B · S · |θ|)          O(activations of one forward): the inner gradients are
                                    detached, so each step's graph is freed once it is used
MAML        O(B · S · |θ|)          O(S · activations): the unrolled S-step graph is kept for
                                    the backward pass through it
==========  ======================  ==========================================================

not O(|θ|²) as is sometimes claimed. The functions below return plain rows (dataclasses) that a
notebook turns into plots; :func:`linear_fit` gives the slope and R² of a straight line through them.

Time and memory come from :func:`mlcore.timing.measure`, the harness :mod:`mlcore.bench` uses too:
every row of one call is timed in interleaved rounds (a busy spell of a shared machine slows all rows
alike), and memory is the peak of one call — on the CPU the peak resident set size, which counts
allocator slack and moves in page-sized steps, so CPU memory curves mean something only well above a
few MB. Meta-gradients are taken with :func:`mlcore.maml.meta_backward` (task by task, what training
runs), so memory is that of one task's graph, as in the table above.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .inner import LossFn
from .maml import meta_backward
from .tasks import TaskBatch
from .timing import measure

__all__ = ["Cost", "cost_vs_inner_steps", "cost_vs_width", "gradient_step", "linear_fit", "meta_gradient_step"]


@dataclass(frozen=True)
class Cost:
    method: str           # "gradient", "FOMAML" or "MAML"
    inner_steps: int      # S (0 for the plain gradient)
    n_params: int         # |θ|
    time_ms: float        # median over repeats
    peak_mb: float | None


def _leaf_params(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}


def meta_gradient_step(model: nn.Module, tasks: TaskBatch, *, loss_fn: LossFn, inner_lr: float, inner_steps: int,
                       first_order: bool = False, strategy: str = "loop") -> Callable[[], None]:
    """One MAML (or FOMAML) meta-gradient, :func:`mlcore.maml.meta_backward`, on a copy of the weights."""
    params = _leaf_params(model)

    def step() -> None:
        meta_backward(model, params, tasks, loss_fn=loss_fn, inner_lr=inner_lr, inner_steps=inner_steps,
                      first_order=first_order, strategy=strategy)
    return step


def gradient_step(model: nn.Module, tasks: TaskBatch, *, loss_fn: LossFn) -> Callable[[], None]:
    """The baseline: one plain gradient of the loss on all support and query examples, in one batch."""
    params = _leaf_params(model)
    x = torch.cat([tasks.x_support, tasks.x_query], 1).flatten(0, 1)   # (B·(support + query), *feature_shape)
    y = torch.cat([tasks.y_support, tasks.y_query], 1).flatten(0, 1)   # (B·(support + query), *target_shape)
    return lambda: loss_fn(torch.func.functional_call(model, params, (x,)), y).backward()


def _rows(model: nn.Module, tasks: TaskBatch, inner_steps: Sequence[int], *, loss_fn: LossFn, inner_lr: float,
          strategy: str) -> list[tuple[str, int, int, Callable[[], None]]]:
    """(method, S, |θ|, step): the plain gradient, then MAML and FOMAML for each S."""
    n_params = sum(p.numel() for p in model.parameters())
    rows = [("gradient", 0, n_params, gradient_step(model, tasks, loss_fn=loss_fn))]
    for k in inner_steps:
        for first_order in (False, True):
            rows.append(("FOMAML" if first_order else "MAML", k, n_params,
                         meta_gradient_step(model, tasks, loss_fn=loss_fn, inner_lr=inner_lr, inner_steps=k,
                                            first_order=first_order, strategy=strategy)))
    return rows


def _measured(rows: list[tuple[str, int, int, Callable[[], None]]], tasks: TaskBatch, repeats: int) -> list[Cost]:
    timings = measure([step for *_, step in rows], tasks.device, repeats=repeats, warmup=1)
    return [Cost(method, k, n, t.median_ms, t.peak_mb) for (method, k, n, _), t in zip(rows, timings, strict=True)]


def cost_vs_inner_steps(model: nn.Module, tasks: TaskBatch, inner_steps: Sequence[int], *, loss_fn: LossFn,
                        inner_lr: float, strategy: str = "loop", repeats: int = 3) -> list[Cost]:
    """MAML and FOMAML for each S in ``inner_steps``, plus the plain gradient once (S = 0), timed interleaved."""
    return _measured(_rows(model, tasks, inner_steps, loss_fn=loss_fn, inner_lr=inner_lr, strategy=strategy),
                     tasks, repeats)


def cost_vs_width(make_model: Callable[[int], nn.Module], widths: Sequence[int], tasks: TaskBatch, *,
                  loss_fn: LossFn, inner_lr: float, inner_steps: int = 1, strategy: str = "loop",
                  repeats: int = 3) -> list[Cost]:
    """Gradient, MAML and FOMAML for networks ``make_model(width)`` of growing |θ| (e.g. MLP widths)."""
    rows = []
    for width in widths:
        model = make_model(width).to(device=tasks.device, dtype=tasks.x_query.dtype)
        rows += _rows(model, tasks, [inner_steps], loss_fn=loss_fn, inner_lr=inner_lr, strategy=strategy)
    return _measured(rows, tasks, repeats)


def linear_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares line y ≈ slope · x + intercept; returns (slope, intercept, R²)."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"linear_fit needs two equally long sequences of >= 2 points, got {len(x)} and {len(y)}")
    xs, ys = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    a = torch.stack([xs, torch.ones_like(xs)], 1)                     # (n, 2)
    (slope, intercept), = torch.linalg.lstsq(a, ys[:, None]).solution.T
    residual = ys - (slope * xs + intercept)
    total = ((ys - ys.mean()) ** 2).sum()
    r2 = 1.0 - float((residual ** 2).sum() / total) if total > 0 else 1.0
    return float(slope), float(intercept), r2
