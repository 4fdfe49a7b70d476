"""One meta-training step of every method in the book, on the same Omniglot-shaped problem: what
:mod:`mlcore.complexity` counts, measures and times.

A :class:`Workload` names a method, a variant and the problem's sizes; :func:`build` turns it into a
zero-argument ``step`` (one meta-gradient, accumulated into ``.grad``; no optimiser step) on a
``Conv4`` network and random images of Omniglot's shape (1×28×28). Random images are enough: costs
depend on shapes, not on values. Every method runs on the same B tasks of N-way K-shot episodes with
Q query images per class:

============  ===================================================================================
method        one step
============  ===================================================================================
gradient      the floor: a plain supervised forward + backward over all B·N·(K + Q) images at once
MAML          :func:`mlcore.maml.meta_backward`, S inner steps, second order (Finn et al. 2017)
FOMAML        the same with ``first_order=True``
Meta-SGD      :func:`mlcore.metasgd.meta_backward`, α one learned rate per weight (Li et al. 2017)
ANIL          :func:`mlcore.anil.meta_backward`, the inner loop on the head only (Raghu et al. 2020)
Reptile       :func:`mlcore.reptile.reptile_step`, S SGD steps per task, ε = 1 (Nichol et al. 2018)
ProtoNet      :func:`mlcore.protonet.meta_loss` on the body's embeddings, then ``backward`` (Snell et al.)
Matching      :func:`mlcore.matching.meta_loss` without FCE, then ``backward`` (Vinyals et al. 2016)
iMAML         :func:`imaml_meta_backward`: S inner steps on the proximal objective, then C conjugate-
              gradient steps on the implicit system (Rajeswaran et al. 2019, eq. 7 and Algorithm 2)
============  ===================================================================================

Variants of MAML (``variant``): ``"meta_backward"`` (per-task backward, what training runs),
``"whole graph"`` (``maml.meta_loss(...).backward()``: every task's graph kept until the backward),
``"checkpoint"`` (:func:`checkpointed_meta_backward`: each inner step under
``torch.utils.checkpoint``); ``strategy`` and ``chunk_size`` as everywhere in the MAML family.

iMAML here is a cost workload, not a training API: it computes iMAML's meta-gradient
(I + H/λ)⁻¹ ∇L_q(φ) at the φ its inner loop reaches, with CG for the solve; the tests check the CG
solution against a direct solve of the same system in float64.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from . import anil, maml, matching, metasgd, protonet, reptile
from .inner import LossFn, trajectory
from .models import Conv4
from .tasks import TaskBatch

__all__ = ["METHODS", "VARIANTS", "Workload", "build", "checkpointed_meta_backward", "conjugate_gradient",
           "imaml_meta_backward", "make_tasks"]

METHODS = ("gradient", "MAML", "FOMAML", "Meta-SGD", "ANIL", "Reptile", "ProtoNet", "Matching", "iMAML")
VARIANTS = ("meta_backward", "whole graph", "checkpoint")
INNER_LOOP = ("MAML", "FOMAML", "Meta-SGD", "ANIL", "Reptile", "iMAML")   # the methods S applies to


@dataclass(frozen=True)
class Workload:
    """One row of a cost table: a method and the sizes of its problem (the book's symbols)."""

    method: str = "MAML"
    variant: str = "meta_backward"
    strategy: str = "loop"          # "loop" or "vmap" (MAML family)
    chunk_size: int | None = None   # vmap: tasks per chunk
    n_way: int = 5                  # N
    k_shot: int = 1                 # K
    n_query: int = 5                # Q per class
    meta_batch: int = 2             # B
    hidden: int = 32                # channels of every conv layer (sets |θ|)
    inner_steps: int = 1            # S
    inner_lr: float = 0.4           # α
    cg_steps: int = 5               # C (iMAML)
    imaml_lambda: float = 2.0       # λ (iMAML's proximal strength)
    image_size: int = 28

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.variant != "meta_backward" and self.method not in ("MAML", "FOMAML"):
            raise ValueError(f"variant={self.variant!r} exists for MAML and FOMAML only, not {self.method}")
        if self.variant == "checkpoint" and self.strategy != "loop":
            raise ValueError("variant='checkpoint' runs task by task: use strategy='loop'")
        if self.strategy != "loop" and self.method in ("gradient", "ProtoNet", "Matching", "iMAML"):
            raise ValueError(f"{self.method} has no strategy= (tasks are batched, or looped, by construction)")

    @property
    def label(self) -> str:
        """The method, with its variant and batching where they are not the defaults."""
        extra = [v for v in (self.variant != "meta_backward" and self.variant,
                             self.strategy != "loop" and self.strategy,
                             self.chunk_size and f"chunk={self.chunk_size}") if v]
        return self.method + (f" ({', '.join(extra)})" if extra else "")


def make_tasks(w: Workload, *, generator: torch.Generator, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> TaskBatch:
    """B random N-way K-shot episodes of 1×H×W images in [0, 1), Q queries per class, labels 0..N-1."""
    def images(per_class: int) -> tuple[Tensor, Tensor]:
        x = torch.rand(w.meta_batch, w.n_way * per_class, 1, w.image_size, w.image_size, generator=generator,
                       dtype=dtype)                                               # (B, N·k, 1, H, W)
        y = torch.arange(w.n_way).repeat_interleave(per_class).expand(w.meta_batch, -1)   # (B, N·k)
        return x.to(device), y.to(device).contiguous()

    return TaskBatch(*images(w.k_shot), *images(w.n_query))


def build(w: Workload, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
          seed: int = 0) -> tuple[Callable[[], None], nn.Module]:
    """``(step, model)``: one meta-gradient of ``w`` into the ``.grad`` of ``model``'s parameters
    (gradients set to None first, as after ``optimizer.zero_grad()``)."""
    g = torch.Generator().manual_seed(seed)
    tasks = make_tasks(w, generator=g, device=device, dtype=dtype)
    torch.manual_seed(seed)
    metric = w.method in ("ProtoNet", "Matching")
    model = Conv4(1, None if metric else w.n_way, hidden=w.hidden, image_size=w.image_size).to(device, dtype)
    params = dict(model.named_parameters())
    inner = {"loss_fn": F.cross_entropy, "inner_lr": w.inner_lr, "inner_steps": w.inner_steps,
             "strategy": w.strategy, "chunk_size": w.chunk_size}
    first_order = w.method == "FOMAML"
    alpha = metasgd.init_inner_lrs(params, w.inner_lr) if w.method == "Meta-SGD" else None

    def one() -> None:
        if w.method == "gradient":
            x = torch.cat([tasks.x_support, tasks.x_query], 1).flatten(0, 1)   # (B·N·(K+Q), 1, H, W)
            y = torch.cat([tasks.y_support, tasks.y_query], 1).flatten(0, 1)   # (B·N·(K+Q),)
            F.cross_entropy(model(x), y).backward()
        elif w.method in ("MAML", "FOMAML"):
            if w.variant == "whole graph":
                maml.meta_loss(model, params, tasks, first_order=first_order, **inner).backward()
            elif w.variant == "checkpoint":
                checkpointed_meta_backward(model, params, tasks, loss_fn=F.cross_entropy, inner_lr=w.inner_lr,
                                           inner_steps=w.inner_steps, first_order=first_order)
            else:
                maml.meta_backward(model, params, tasks, first_order=first_order, **inner)
        elif w.method == "Meta-SGD":
            metasgd.meta_backward(model, params, tasks, **{**inner, "inner_lr": alpha})
        elif w.method == "ANIL":
            anil.meta_backward(model, params, tasks, head="head", **inner)
        elif w.method == "Reptile":   # the new weights are the step's result; nothing is back-propagated
            reptile.reptile_step(model, params, tasks, loss_fn=F.cross_entropy, inner_lr=w.inner_lr,
                                 inner_steps=w.inner_steps, outer_lr=1.0, strategy=w.strategy)
        elif w.method == "ProtoNet":
            protonet.meta_loss(model, tasks)[0].backward()
        elif w.method == "Matching":
            matching.meta_loss(model, tasks)[0].backward()
        else:
            imaml_meta_backward(model, params, tasks, loss_fn=F.cross_entropy, inner_lr=w.inner_lr,
                                inner_steps=w.inner_steps, cg_steps=w.cg_steps, lam=w.imaml_lambda)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        if alpha is not None:
            for a in alpha.values():
                a.grad = None
        one()
    return step, model


def _one_inner_step(model: nn.Module, names: tuple[str, ...], x: Tensor, y: Tensor, loss_fn: LossFn,
                    inner_lr: float, first_order: bool, *theta: Tensor) -> tuple[Tensor, ...]:
    """θ_{j+1} from θ_j (as a tuple, what ``checkpoint`` passes through): the book's one inner loop, one step."""
    rates = [dict.fromkeys(names, inner_lr)]
    out = trajectory(model, dict(zip(names, theta, strict=True)), x, y, loss_fn=loss_fn, rates=rates,
                     first_order=first_order, vmapped=False)[-1]
    return tuple(out[n] for n in names)


def checkpointed_meta_backward(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *,
                               loss_fn: LossFn, inner_lr: float, inner_steps: int,
                               first_order: bool = False) -> Tensor:
    """:func:`mlcore.maml.meta_backward` (strategy loop) with every inner step under
    ``torch.utils.checkpoint``: the forward keeps only θ_j between steps; the backward recomputes each
    step (its forward and inner backward) before differentiating through it. The same meta-gradient
    (tested), for the memory of one step plus S copies of θ, at one extra inner step's work per step.
    Returns the detached mean query loss.

    The reentrant variant: its forward runs under ``no_grad`` (so the inner gradient records nothing)
    and each recomputation is back-propagated and freed at once. The non-reentrant one also gives the
    exact gradient, but keeps recomputed tensors that the backward never unpacks (those of the inner
    backward), so its memory still grew with S (Conv4-32, S = 5: 54 MB against 34 MB unchecked)."""
    names = tuple(params)
    total = torch.zeros(())
    for i in range(tasks.meta_batch):
        theta = tuple(params[n] for n in names)
        # functools.partial binds task i now: a closure would read i when the backward recomputes
        one_step = functools.partial(_one_inner_step, model, names, tasks.x_support[i], tasks.y_support[i],
                                     loss_fn, inner_lr, first_order)
        for _ in range(inner_steps):
            theta = checkpoint(one_step, *theta, use_reentrant=True)
        loss = loss_fn(functional_call(model, dict(zip(names, theta, strict=True)), (tasks.x_query[i],)),
                       tasks.y_query[i])
        (loss / tasks.meta_batch).backward()
        total = total + loss.detach().cpu()
    return total / tasks.meta_batch


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, steps: int) -> Tensor:
    """``steps`` iterations of conjugate gradients on A x = b (A symmetric positive definite, given as
    ``matvec``: u ↦ A u), from x = 0; stops early once the residual is exactly zero."""
    x, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), r @ r
    for _ in range(steps):
        if rr == 0:
            break
        ap = matvec(p)
        step = rr / (p @ ap)
        x, r = x + step * p, r - step * ap
        rr_new = r @ r
        p, rr = r + (rr_new / rr) * p, rr_new
    return x


def imaml_meta_backward(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, loss_fn: LossFn,
                        inner_lr: float, inner_steps: int, cg_steps: int, lam: float) -> None:
    """iMAML's meta-gradient (Rajeswaran et al. 2019), accumulated into ``params``' ``.grad``.

    Per task: φ ← φ − α (∇L_s(φ) + λ(φ − θ)), S times from φ = θ, no graph kept (the inner problem is
    G(φ) = L_s(φ) + λ/2 ‖φ − θ‖², their eq. 4); then x ≈ (I + H/λ)⁻¹ ∇L_q(φ), H = ∇²L_s(φ) (eq. 7),
    by ``cg_steps`` CG iterations whose Hessian-vector products differentiate one support gradient
    again. θ.grad += x / B. Memory does not grow with S or C: nothing is unrolled.
    """
    names, theta = list(params), {n: p.detach() for n, p in params.items()}

    def grads(phi: dict[str, Tensor], x: Tensor, y: Tensor, create_graph: bool = False) -> tuple[Tensor, ...]:
        return torch.autograd.grad(loss_fn(functional_call(model, phi, (x,)), y), list(phi.values()),
                                   create_graph=create_graph)

    def flat(ts: tuple[Tensor, ...] | list[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in ts])                             # (|θ|,)

    for i in range(tasks.meta_batch):
        x_s, y_s = tasks.x_support[i], tasks.y_support[i]
        phi = dict(theta)
        for _ in range(inner_steps):
            leaves = {n: t.detach().requires_grad_() for n, t in phi.items()}
            g = grads(leaves, x_s, y_s)
            phi = {n: phi[n] - inner_lr * (gn + lam * (phi[n] - theta[n])) for n, gn in zip(names, g, strict=True)}
        leaves = {n: t.detach().requires_grad_() for n, t in phi.items()}
        g_query = flat(grads(leaves, tasks.x_query[i], tasks.y_query[i]))
        g_support = flat(grads(leaves, x_s, y_s, create_graph=True))           # built once, reused by every HVP

        def matvec(u: Tensor, g_support: Tensor = g_support, leaves: dict = leaves) -> Tensor:
            hu = torch.autograd.grad(g_support, list(leaves.values()), grad_outputs=u, retain_graph=True)
            return u + flat(hu) / lam                                             # (I + H/λ) u

        solution = conjugate_gradient(matvec, g_query, cg_steps)
        for p, part in zip(params.values(), solution.split([p.numel() for p in params.values()]), strict=True):
            part = part.view_as(p) / tasks.meta_batch
            p.grad = part.clone() if p.grad is None else p.grad + part
