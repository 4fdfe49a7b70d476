"""The one differentiable inner loop shared by MAML, FOMAML, Meta-SGD, MAML++ and ANIL, and its batching
over tasks.

Given meta-parameters θ (a ``dict[str, Tensor]``) and one task's support set (x, y), S steps of
gradient descent give the adapted parameters (Finn et al. 2017, eq. 1, iterated):

    θ_0 = θ,        θ_{j+1} = θ_j − α_j ⊙ ∇_θ L_support(θ_j),        j = 0 … S−1

=================  ==============  =========================================================
code               paper           meaning
=================  ==============  =========================================================
``params``         θ               meta-parameters (the initialisation being meta-learned)
``inner_lr``       α               inner learning rate: a number (MAML), a dict name → tensor
                                   (Meta-SGD's learned α), or one such rate per step (MAML++)
``inner_steps``    S               number of inner gradient steps
``first_order``    —               FOMAML: treat ∇L_support(θ_j) as a constant (drop the Hessian)
``adapt``          —               names of the parameters that move (ANIL: the head only)
=================  ==============  =========================================================

MAML++'s per-step batch norm (Antoniou et al. 2019, §4, BNWB/BNRS; :class:`mlcore.models.PerStepBatchNorm2d`)
needs to know the step: :func:`trajectory` runs the support forward at θ_j inside
``models.inner_step(j)`` and :func:`outputs_at` runs a query forward at θ_k at index k − 1 (the step
whose update produced θ_k, as in the authors' code). For any other network the index is unused.

The adapted parameters stay differentiable functions of θ, so back-propagating the query loss through
them gives the exact second-order meta-gradient ∇_θ L_query(θ_S) = Π_j (I − α H_j) ∇ L_query(θ_S),
with Hessian-vector products only. ``first_order=True`` takes the inner gradient at a detached θ_j:
that one ``detach`` is the whole difference between FOMAML and MAML.

The gradient is ``torch.autograd.grad``, except inside ``torch.func.vmap`` (``vmapped=True``), where
autograd cannot run and ``torch.func.grad`` takes it: the same number, but on a CPU the per-task loop is
about 20% faster with autograd (Conv4 5-way 1-shot and the sine MLP, measured with one thread).

Over a meta-batch, :func:`query_losses` runs the tasks one by one (``"loop"``) or batched (``"vmap"``,
:func:`resolve_strategy`); :func:`mlcore.family.over_tasks` averages a method's per-task objective the same
way, back-propagating task by task when asked.

Nothing here swaps weights through ``.data``, ``load_state_dict`` or ``deepcopy``: the network is
always called with ``torch.func.functional_call`` on the parameter dict.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from . import checks
from .checks import InnerLoopDivergedError, InnerLR
from .models import inner_step, per_step_norms
from .tasks import TaskBatch

__all__ = ["inner_loop", "trajectory", "support_grad", "outputs_at", "adapted", "query_losses", "resolve_strategy",
           "InnerLR", "LossFn", "InnerLoopDivergedError", "STRATEGIES"]

STRATEGIES = ("auto", "loop", "vmap")

LossFn = Callable[[Tensor, Tensor], Tensor]
Rates = Sequence[Mapping[str, "float | Tensor"]]   # one dict name -> α per step (checks.rates builds it)


def inner_loop(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor, *, loss_fn: LossFn,
               inner_lr: InnerLR, inner_steps: int, first_order: bool = False,
               adapt: Collection[str] | None = None, vmapped: bool = False) -> list[dict[str, Tensor]]:
    """Adapt ``params`` to ONE task's support set (x, y); return the trajectory [θ_0, θ_1, …, θ_S].

    ``loss_fn(outputs, y) -> scalar`` (e.g. ``F.cross_entropy``); ``adapt``: names of the parameters
    that take inner steps (``None``: all); the others stay fixed and still carry the meta-gradient of
    whatever depends on them. ``vmapped=True`` when called inside ``torch.func.vmap`` (autograd cannot
    take gradients there). Under ``torch.no_grad()`` it still adapts (for evaluation).
    """
    checks.params(model, params)
    steps = checks.non_negative_int("inner_steps", inner_steps)
    names = adapted(model, params, adapt, steps)
    rates = checks.rates(inner_lr, steps, params, names)
    return trajectory(model, params, x, y, loss_fn=loss_fn, rates=rates, first_order=first_order,
                      vmapped=vmapped)


def trajectory(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor, *, loss_fn: LossFn,
               rates: Rates, first_order: bool, vmapped: bool) -> list[dict[str, Tensor]]:
    """:func:`inner_loop` without the argument checks: ``rates[j]`` maps each adapted name to α_j."""
    theta = dict(params)
    path = [theta]
    for j, rate in enumerate(rates):
        with _at_step(model, j):   # MAML++ per-step batch norm: the support forward at θ_j uses γ_j, β_j
            grads = support_grad(model, theta, x, y, loss_fn=loss_fn, names=list(rate), first_order=first_order,
                                 vmapped=vmapped)
        theta = {**theta, **{n: theta[n] - rate[n] * grads[n] for n in rate}}   # θ_{j+1} = θ_j − α_j ∇L
        path.append(theta)
    return path


def support_grad(model: nn.Module, theta: Mapping[str, Tensor], x: Tensor, y: Tensor, *, loss_fn: LossFn,
                 names: Sequence[str], first_order: bool, vmapped: bool) -> dict[str, Tensor]:
    """∇L_support(θ_j) for the parameters ``names``: a differentiable function of θ (second order) or,
    with ``first_order``, a constant taken at a detached θ_j and x."""
    if first_order:  # FOMAML, the one place second-order terms are dropped; x too (ANIL's features)
        theta, x = {n: t.detach() for n, t in theta.items()}, x.detach()
    fixed = {n: t for n, t in theta.items() if n not in names}

    def loss(moving: dict[str, Tensor]) -> Tensor:
        return checks.loss_value(loss_fn(functional_call(model, {**fixed, **moving}, (x,)), y))

    if vmapped:
        return torch.func.grad(loss)({n: theta[n] for n in names})
    create_graph = not first_order and torch.is_grad_enabled()   # under no_grad nothing differentiates later
    with torch.enable_grad():   # also under an outer no_grad (evaluation)
        try:
            # a tensor that does not require grad has no derivative to pass on: a fresh leaf stands in for it
            leaves = {n: theta[n] if theta[n].requires_grad else theta[n].detach().requires_grad_() for n in names}
            grads = torch.autograd.grad(loss(leaves), list(leaves.values()), allow_unused=True,
                                        create_graph=create_graph, materialize_grads=True)
        except RuntimeError as error:
            raise RuntimeError(f"{error}. (If this runs inside torch.func.vmap, pass vmapped=True: autograd "
                               f"cannot take gradients under vmap, torch.func.grad can.)") from error
    return dict(zip(leaves, grads, strict=True))


def outputs_at(model: nn.Module, path: Sequence[Mapping[str, Tensor]], k: int, x: Tensor) -> Tensor:
    """f_{θ_k}(x), θ_k = ``path[k]``, with per-step layers at step index max(k − 1, 0): the query forward
    after inner step j (θ_{j+1}) uses index j, as in Antoniou et al.'s code; θ_0 uses 0, like its support
    forward."""
    with _at_step(model, max(k - 1, 0)):
        return functional_call(model, path[k], (x,))


def _at_step(model: nn.Module, j: int) -> contextlib.AbstractContextManager:
    """``models.inner_step(j)`` for a network with per-step layers, nothing otherwise (a ContextVar is not
    something torch.compile's tracing follows, and the compiled path runs networks without such layers)."""
    return inner_step(j) if per_step_norms(model) else contextlib.nullcontext()


def adapted(model: nn.Module, params: Mapping[str, Tensor], adapt: Collection[str] | None,
            inner_steps: int) -> list[str]:
    """The names of the parameters the inner loop moves (:func:`mlcore.checks.adapted_names`), where
    ``adapt=None`` means all of them except MAML++'s per-step batch-norm γ_j, β_j (meta-learned only, as in
    the authors' code; a layer's ``inner_adapt = True`` includes them). Raises unless every per-step layer
    was built for ``inner_steps`` steps."""
    layers = per_step_norms(model)
    wrong = {n: m.steps for n, m in layers.items() if m.steps != inner_steps}
    if wrong:
        raise ValueError(
            f"the per-step batch-norm layers {dict(list(wrong.items())[:3])} (name: steps S) keep one γ_j, β_j and "
            f"one set of running statistics per inner step j = 0..S-1, but inner_steps={inner_steps}: run "
            f"inner_steps=S, or build the network with Conv4(norm='batch', per_step_bn={inner_steps})")
    if adapt is None and layers:
        meta_only = {f"{n}.{p}" for n, m in layers.items() if not m.inner_adapt for p in ("weight", "bias")}
        adapt = [n for n in params if n not in meta_only]
    return checks.adapted_names(params, adapt, inner_steps)


def resolve_strategy(strategy: str, model: nn.Module, device: torch.device) -> str:
    """Pick how tasks are batched: ``"loop"`` (one task after another) or ``"vmap"`` (all at once).

    ``"auto"``: vmap on a GPU (one kernel launch for the whole meta-batch instead of one per task);
    on a CPU, vmap for networks without convolutions and loop for convolutional ones (on a 2-core CPU
    batched convolutions under vmap measured slower than the per-task loop: ``python -m mlcore.bench``).
    Models holding ``torch.nn`` batch-norm layers always get ``"loop"``: under vmap their affine
    parameters receive a wrong second-order meta-gradient (see chapter 3); models with active dropout
    too (vmap refuses random operations unless told how to batch them), and models whose per-step batch norm
    updates its running statistics (an in-place update shared by all tasks, impossible under vmap).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    torch_bn = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if strategy == "vmap" and torch_bn:
        raise ValueError(
            f"strategy='vmap' with torch.nn batch-norm layers {torch_bn[:3]}: vmap over tasks returns a WRONG "
            f"second-order meta-gradient through nn.BatchNorm2d's affine parameters, silently. Use "
            f"mlcore.models.BatchStatNorm2d (Conv4(norm='batch')) or strategy='loop'.")
    updating = [n for n, m in per_step_norms(model).items() if m.updates_running_stats]
    if strategy == "vmap" and updating:
        raise ValueError(
            f"strategy='vmap' with per-step batch-norm layers {updating[:3]} that update their running statistics "
            f"(training mode): one in-place update shared by all tasks cannot happen inside vmap. Use "
            f"strategy='loop' (or 'auto'), model.eval(), track_running_stats = False on the layers, or "
            f"mlcore.models.frozen_running_stats()")
    if strategy != "auto":
        return strategy
    dropout = any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0 for m in model.modules())
    if torch_bn or dropout or updating:
        return "loop"
    if device.type == "cuda":
        return "vmap"
    return "loop" if any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()) else "vmap"


def query_losses(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, loss_fn: LossFn,
                 inner_lr: InnerLR, inner_steps: int, first_order: bool = False,
                 adapt: Collection[str] | None = None, eval_steps: Sequence[int] | None = None,
                 strategy: str = "auto") -> Tensor:
    """Every task's query loss after adaptation, differentiable w.r.t. ``params``: (meta_batch,), or
    (meta_batch, len(eval_steps)) holding L_query(θ_j) for each j in ``eval_steps``.

    The per-task values that :func:`mlcore.maml.meta_loss` averages; every task's graph stays alive.
    """
    checks.params(model, params)
    tasks = checks.tasks(tasks, params)
    steps = checks.non_negative_int("inner_steps", inner_steps)
    at = [steps] if eval_steps is None else list(eval_steps)
    if not at or any(isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= steps for k in at):
        raise ValueError(f"eval_steps must be integers in 0..inner_steps={steps}, got {eval_steps!r}")
    rates = checks.rates(inner_lr, steps, params, adapted(model, params, adapt, steps))
    how = resolve_strategy(strategy, model, tasks.device)

    def one_task(xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, *, vmapped: bool) -> tuple[Tensor, Tensor]:
        path = trajectory(model, params, xs, ys, loss_fn=loss_fn, rates=rates, first_order=first_order,
                          vmapped=vmapped)
        outs = {k: outputs_at(model, path, k, xq) for k in set(at)}
        return torch.stack([loss_fn(outs[k], yq) for k in at]), outs[at[-1]]

    data = (tasks.x_support, tasks.y_support, tasks.x_query, tasks.y_query)
    if how == "loop":
        results = [one_task(*(t[i] for t in data), vmapped=False) for i in range(tasks.meta_batch)]
        losses, outputs = (torch.stack(r) for r in zip(*results, strict=True))
    else:
        losses, outputs = torch.func.vmap(lambda *t: one_task(*t, vmapped=True))(*data)
    checks.outputs(outputs, tasks)
    return losses[:, 0] if eval_steps is None else losses
