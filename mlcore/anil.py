"""ANIL, "Almost No Inner Loop" (Raghu, Raghu, Bengio & Vinyals 2020, "Rapid Learning or Feature Reuse?
Towards Understanding the Effectiveness of MAML", ICLR; §4).

Raghu et al. found that a MAML-trained network barely changes its body during adaptation: the inner
loop mostly re-fits the last layer on top of features that are reused as they are. ANIL keeps the
outer loop of MAML unchanged and restricts the inner loop to the head. With θ = (θ_b, θ_h):

    θ_h' = θ_h − α ∇_{θ_h} L(θ_b, θ_h; D^tr_i)                  (inner loop: the head only, S steps)
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
``inner_steps``  S               inner steps on the head
===============  ==============  ================================================================

Feature reuse (``reuse_features``). The body's features of the support and query sets do not
depend on the head, so they can be computed once per task, with gradient tracking, instead of once
per inner step: ANIL is then MAML on the head module alone, over those features (:func:`task_loss`).
Value and meta-gradient are identical to the generic path (tested). The saving is the body's forward
and backward passes on the support set at every inner step, so it grows with S and the support size:
on a busy 2-core CPU, Conv4(hidden=64), 4 tasks of 5-way with 15 queries per class, ×1.7 (1-shot,
S = 5) to ×3.7 (5-shot, S = 10); nothing measurable for the sine MLP (overhead-bound at that size). It
applies when the model is a :class:`~mlcore.models.BodyHead` (``MLP``, ``Conv4``, or a subclass of
yours: the class promises ``forward(x) == head(body(x))``) and ``head`` names exactly the ``head``
module's parameters; ``reuse_features=None`` then picks it.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from . import checks, family, maml
from .family import MetaStep, Step
from .inner import InnerLR, LossFn, Rates
from .models import BodyHead, per_step_norms
from .tasks import TaskBatch

__all__ = ["head_names", "task_loss", "meta_loss", "meta_backward", "train_step", "predict"]


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


def can_reuse_features(model: nn.Module, params: Mapping[str, Tensor], names: Sequence[str]) -> bool:
    """True when ``model`` is a :class:`~mlcore.models.BodyHead` and ``names`` are its head's parameters, and
    its body has no MAML++ per-step batch norm (whose features differ from step to step)."""
    if not isinstance(model, BodyHead) or model.head is None or per_step_norms(model):
        return False
    head = {f"head.{n}" for n, _ in model.head.named_parameters()}
    return set(names) == head and all(n.startswith("body.") for n in params if n not in head)


def task_loss(model: nn.Module, params: Mapping[str, Tensor], x_s: Tensor, y_s: Tensor, x_q: Tensor, y_q: Tensor,
              *, head: Sequence[str], loss_fn: LossFn, rates: Rates, first_order: bool = False,
              reuse_features: bool = False, vmapped: bool = False) -> tuple[Tensor, Tensor]:
    """One task's ANIL objective and query outputs: S inner steps on the ``head`` parameters only.

    Without feature reuse that is MAML's task loss with only the head moving. With it, the body's
    features are computed once, tracked (the body is meta-learned through them), and MAML runs on the
    head module over the features.
    """
    if not reuse_features:
        return maml.task_loss(model, params, x_s, y_s, x_q, y_q, loss_fn=loss_fn, rates=rates,
                              first_order=first_order, vmapped=vmapped)
    body = {n.removeprefix("body."): p for n, p in params.items() if n not in head}
    features_s = functional_call(model.body, body, (x_s,))     # (n_support, D)
    features_q = functional_call(model.body, body, (x_q,))     # (n_query, D)
    theta_h = {n.removeprefix("head."): params[n] for n in head}
    head_rates = [{n.removeprefix("head."): r for n, r in rate.items()} for rate in rates]
    return maml.task_loss(model.head, theta_h, features_s, y_s, features_q, y_q, loss_fn=loss_fn, rates=head_rates,
                          first_order=first_order, vmapped=vmapped)


def _objective(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, head: str | Collection[str],
               loss_fn: LossFn, inner_lr: InnerLR, inner_steps: int, first_order: bool = False,
               strategy: str = "auto", chunk_size: int | None = None, check_finite: bool = True,
               reuse_features: bool | None = None, backward: bool = False, compile: bool | str = False) -> MetaStep:
    checks.params(model, params)
    names = head_names(params, head)
    p = family.prepare(model, params, tasks, inner_lr=inner_lr, inner_steps=inner_steps, adapt=names,
                       strategy=strategy, chunk_size=chunk_size, loss_fn=loss_fn, compile=compile)
    can_reuse = can_reuse_features(model, params, names)
    if reuse_features and not can_reuse:
        raise ValueError(f"reuse_features=True needs a mlcore.models.BodyHead (MLP, Conv4, or a subclass) with "
                         f"head={head!r} naming exactly its 'head' module's parameters (and no per-step batch "
                         f"norm); got "
                         f"{type(model).__name__} and head names {list(names)}")
    reuse = can_reuse if reuse_features is None else bool(reuse_features)
    if reuse:
        model.check_input(tasks.x_support[0])

    def one_task(inputs: family.Inputs, x_s: Tensor, y_s: Tensor, x_q: Tensor, y_q: Tensor, *,
                 vmapped: bool) -> tuple[Tensor, Tensor]:
        return task_loss(model, inputs.params, x_s, y_s, x_q, y_q, head=names, loss_fn=loss_fn, rates=inputs.rates,
                         first_order=first_order, reuse_features=reuse, vmapped=vmapped)

    return family.run(one_task, tasks, p, inner_lr=inner_lr, check_finite=check_finite, backward=backward)


def meta_loss(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, head: str | Collection[str],
              loss_fn: LossFn, inner_lr: InnerLR, inner_steps: int, first_order: bool = False,
              strategy: str = "auto", chunk_size: int | None = None, check_finite: bool = True,
              reuse_features: bool | None = None) -> Tensor:
    """The ANIL objective: mean over tasks of L_query after S inner steps on the head only.

    A differentiable scalar w.r.t. every parameter, body included. ``first_order`` drops the inner
    gradient's derivative (FOMAML-style), which also removes the body's path through the inner loop.
    ``reuse_features``: ``None`` (auto), ``True`` (require the feature-reuse path; raises if the model
    does not qualify) or ``False`` (generic path: the full network runs at every inner step). Other
    arguments as in :func:`mlcore.maml.meta_loss`.
    """
    return _objective(model, params, tasks, head=head, loss_fn=loss_fn, inner_lr=inner_lr,
                      inner_steps=inner_steps, first_order=first_order, strategy=strategy, chunk_size=chunk_size,
                      check_finite=check_finite, reuse_features=reuse_features).loss


def meta_backward(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, head: str | Collection[str],
                  loss_fn: LossFn, inner_lr: InnerLR, inner_steps: int, first_order: bool = False,
                  strategy: str = "auto", chunk_size: int | None = None, check_finite: bool = True,
                  reuse_features: bool | None = None, compile: bool | str = False) -> MetaStep:
    """:func:`meta_loss` back-propagated task by task into ``.grad`` (the memory of one task); returns
    the detached loss and query outputs, as :func:`mlcore.maml.meta_backward` (``compile=`` as there)."""
    return _objective(model, params, tasks, head=head, loss_fn=loss_fn, inner_lr=inner_lr,
                      inner_steps=inner_steps, first_order=first_order, strategy=strategy, chunk_size=chunk_size,
                      check_finite=check_finite, reuse_features=reuse_features, backward=True, compile=compile)


def train_step(model: nn.Module, params: Mapping[str, Tensor], optimizer: torch.optim.Optimizer,
               tasks: TaskBatch, **kwargs: object) -> Step:
    """One outer step on body and head; ``kwargs`` as for :func:`meta_loss`. Returns (loss, accuracy)."""
    return family.train_step(meta_backward, model, params, optimizer, tasks, **kwargs)


def predict(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, head: str | Collection[str],
            loss_fn: LossFn, inner_lr: InnerLR, inner_steps: int, strategy: str = "auto",
            chunk_size: int | None = None, reuse_features: bool | None = None) -> Tensor:
    """Meta-test: adapt the head only on each support set; query outputs (meta_batch, n_query, ...), detached."""
    return family.predict(_objective, model, params, tasks, head=head, loss_fn=loss_fn, inner_lr=inner_lr,
                          inner_steps=inner_steps, strategy=strategy, chunk_size=chunk_size,
                          reuse_features=reuse_features)
