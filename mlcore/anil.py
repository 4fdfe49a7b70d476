"""ANIL, "Almost No Inner Loop" (Raghu, Raghu, Bengio & Vinyals 2020, "Rapid Learning or Feature Reuse?
Towards Understanding the Effectiveness of MAML", ICLR; §4).

Raghu et al. found that a MAML-trained network barely changes its body during adaptation: the inner
loop mostly re-fits the last layer on top of features that are reused as they are. ANIL keeps the
outer loop of MAML unchanged and restricts the inner loop to the head. With θ = (θ_b, θ_h):

    θ_h' = θ_h − α ∇_{θ_h} L(θ_b, θ_h; D^tr_i)                  (inner loop: the head only, K steps)
    min_{θ_b, θ_h}  Σ_i L(θ_b, θ_h'; D^ts_i)                     (outer loop: body AND head)

**The body is meta-learned.** It receives the meta-gradient through both the query features and the
inner-loop gradient (θ_h' depends on θ_b through ∇_{θ_h} L^tr). Computing the body's features under
``torch.no_grad()``, as a common implementation does, cuts both paths: the body stays at its random
initialisation and only a head on frozen random features gets trained. That is a different (and much
weaker) algorithm, and nothing fails loudly — the tests check that the body's meta-gradient is non-zero.

Notation:

===============  ==============  ================================================================
code             paper           meaning
===============  ==============  ================================================================
``params``       θ = (θ_b, θ_h)  every parameter of the model (body and head), dict name → tensor
``head``         θ_h             the adapted parameters: a name prefix (``"head"``) or names
``inner_lr``     α               inner rate (a number, or per-name/per-step as in mlcore.inner)
``inner_steps``  K               inner steps on the head
===============  ==============  ================================================================

Feature reuse (``reuse_features``). The body's features of the support and query sets do not
depend on the head, so they can be computed once per task, with gradient tracking, instead of once
per inner step: the shared inner loop then runs on the head module alone, over those features
(support: (B, n_support, D), query: (B, n_query, D)). Value and meta-gradient are identical to the
generic path (tested). The saving is the body's forward and backward passes on the support set at
every inner step, so it grows with K and the support size: on a busy 2-core CPU, Conv4(hidden=64),
4 tasks of 5-way with 15 queries per class, ×1.7 (1-shot, K = 5) to ×3.7 (5-shot, K = 10); nothing
measurable for the sine MLP (overhead-bound at that size). It applies when the model is an
:class:`~mlcore.models.MLP` or :class:`~mlcore.models.Conv4` (known to compute ``head(body(x))``) and
``head`` is exactly the ``head`` module's parameters; ``reuse_features=None`` then picks it.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .inner import (InnerLR, LossFn, _check_params_match_tasks, check_params, grad_inputs, query_losses,
                    raise_if_diverged, resolve_strategy, task_mean)
from .models import MLP, Conv4
from .tasks import TaskBatch

__all__ = ["head_names", "meta_loss", "predict"]


def head_names(params: Mapping[str, Tensor], head: str | Collection[str]) -> tuple[str, ...]:
    """The names of the adapted (head) parameters, in ``params`` order.

    ``head`` is a module prefix (``"head"`` selects ``head.weight`` and ``head.bias``, not ``header.w``)
    or an explicit collection of names. Selecting nothing, unknown names, or every parameter raises.
    """
    available = list(params)
    if isinstance(head, str):
        names = tuple(n for n in available if n == head or n.startswith(head + "."))
        if not names:
            raise KeyError(f"head={head!r} matches no parameter name; available: {available}")
    elif isinstance(head, Collection):
        unknown = sorted(set(head) - set(available))
        if unknown or not head:
            raise KeyError(f"head names {unknown or '(none)'} are not parameters; available: {available}")
        names = tuple(n for n in available if n in set(head))
    else:
        raise TypeError(f"head must be a name prefix (str) or a collection of names, got {type(head).__name__}")
    if len(names) == len(available):
        raise ValueError(f"head={head!r} selects every parameter, so nothing is left for the body: that is MAML "
                         f"(mlcore.maml.meta_loss), not ANIL")
    return names


def _can_reuse_features(model: nn.Module, params: Mapping[str, Tensor], names: Sequence[str]) -> bool:
    if type(model).forward not in (MLP.forward, Conv4.forward) or getattr(model, "head", None) is None:
        return False  # only for networks known to compute head(body(x))
    head_params = {f"head.{n}" for n, _ in model.head.named_parameters()}
    return set(names) == head_params and all(n.startswith("body.") for n in params if n not in head_params)


def _strip_prefix(inner_lr: InnerLR, names: Sequence[str]) -> InnerLR:
    """Rename per-parameter rates 'head.weight' -> 'weight' for the head module."""
    def strip(rate):
        return {n[len("head."):]: rate[n] for n in names if n in rate} if isinstance(rate, Mapping) else rate
    if isinstance(inner_lr, Sequence) and not isinstance(inner_lr, (str, bytes)):
        return [strip(r) for r in inner_lr]
    return strip(inner_lr)


def _body_features(model: nn.Module, body: dict[str, Tensor], x: Tensor, how: str) -> Tensor:
    """Per-task body features, (b, N, ...) -> (b, N, D): per task, because batch statistics are per task."""
    def embed(x_task: Tensor) -> Tensor:
        return functional_call(model.body, body, (x_task,))          # (N, ...) -> (N, D)
    return torch.stack([embed(x_task) for x_task in x]) if how == "loop" else torch.func.vmap(embed)(x)


def meta_loss(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, head: str | Collection[str],
              loss_fn: LossFn, inner_lr: InnerLR, inner_steps: int, first_order: bool = False,
              strategy: str = "auto", chunk_size: int | None = None, check_finite: bool = True,
              return_outputs: bool = False, reuse_features: bool | None = None,
              eager: bool | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """The ANIL objective: mean over tasks of L_query after K inner steps on the head only.

    Differentiable w.r.t. every parameter (body included). ``first_order`` drops the inner gradient's
    derivative (FOMAML-style), which also removes the body's path through the inner loop.
    ``reuse_features``: ``None`` (auto), ``True`` (require the feature-reuse path; raises if the model does
    not qualify) or ``False`` (generic path: the full network runs at every inner step). Other
    arguments (``strategy``, ``chunk_size``, ``eager``...) as in :func:`mlcore.maml.meta_loss`; returns the
    scalar loss (and the query outputs (meta_batch, n_query, ...) with ``return_outputs``).
    """
    if not isinstance(tasks, TaskBatch):
        raise TypeError(f"tasks must be a mlcore.tasks.TaskBatch, got {type(tasks).__name__}")
    check_params(model, params)
    names = head_names(params, head)
    can_reuse = _can_reuse_features(model, params, names)
    if reuse_features and not can_reuse:
        raise ValueError(f"reuse_features=True needs an MLP or Conv4 with head={head!r} naming exactly the "
                         f"'head' module's parameters; got {type(model).__name__} and head names {list(names)}")
    how = resolve_strategy(strategy, model, tasks.device)
    if reuse_features is False or not can_reuse:
        def chunk_losses(chunk: TaskBatch) -> tuple[Tensor, Tensor]:  # (b, 1), (b, n_query, ...)
            return query_losses(model, params, chunk, loss_fn=loss_fn, inner_lr=inner_lr, inner_steps=inner_steps,
                                first_order=first_order, adapt=names, eval_steps=[inner_steps], strategy=how,
                                return_outputs=True)
    else:
        _check_params_match_tasks(params, tasks)
        if isinstance(model, Conv4) and tasks.x_support.shape[2:] != (model.in_channels, model.image_size,
                                                                      model.image_size):
            raise ValueError(f"Conv4 expects images of shape (N, {model.in_channels}, {model.image_size}, "
                             f"{model.image_size}), got tasks with {tuple(tasks.x_support.shape[2:])}")
        body = {n[len("body."):]: p for n, p in params.items() if n not in names}
        head_params = {n[len("head."):]: params[n] for n in names}
        head_lr = _strip_prefix(inner_lr, names)

        def chunk_losses(chunk: TaskBatch) -> tuple[Tensor, Tensor]:
            features = TaskBatch(_body_features(model, body, chunk.x_support, how), chunk.y_support,
                                 _body_features(model, body, chunk.x_query, how), chunk.y_query)
            # The same shared inner loop, on the head module over fixed (but differentiable) features.
            return query_losses(model.head, head_params, features, loss_fn=loss_fn, inner_lr=head_lr,
                                inner_steps=inner_steps, first_order=first_order, eval_steps=[inner_steps],
                                strategy=how, return_outputs=True)
    loss, outputs = task_mean(chunk_losses, tasks, how=how, chunk_size=chunk_size, eager=eager,
                              inputs=grad_inputs(params, inner_lr, tasks))
    if check_finite:
        raise_if_diverged(loss.detach(), inner_lr=inner_lr, inner_steps=inner_steps, tasks=tasks)
    return (loss, outputs) if return_outputs else loss


def predict(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, head: str | Collection[str],
            loss_fn: LossFn, inner_lr: InnerLR, inner_steps: int, strategy: str = "auto",
            reuse_features: bool | None = None) -> Tensor:
    """Meta-test: adapt the head only on each support set; query outputs (meta_batch, n_query, ...), detached."""
    with torch.no_grad():  # the inner loop's torch.func.grad still works under an outer no_grad
        _, outputs = meta_loss(model, {n: p.detach() for n, p in params.items()}, tasks, head=head,
                               loss_fn=loss_fn, inner_lr=inner_lr, inner_steps=inner_steps, first_order=True,
                               strategy=strategy, check_finite=False, return_outputs=True,
                               reuse_features=reuse_features)
    return outputs
