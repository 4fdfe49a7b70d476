"""The one differentiable inner loop shared by MAML, FOMAML, Meta-SGD, MAML++ and ANIL.

Given meta-parameters θ (a ``dict[str, Tensor]``) and one task's support set (x, y), K steps of
gradient descent give the adapted parameters (Finn et al. 2017, eq. 1, iterated):

    θ_0 = θ,        θ_{k+1} = θ_k − α_k ⊙ ∇_θ L_support(θ_k),        k = 0 … K−1

Notation:

=================  ==============  =========================================================
code               paper           meaning
=================  ==============  =========================================================
``params``         θ               meta-parameters (the initialisation being meta-learned)
``inner_lr``       α               inner (task-level) learning rate; see "learning rates" below
``inner_steps``    K               number of inner gradient steps
``first_order``    —               FOMAML: treat ∇L_support(θ_k) as a constant (drop the Hessian)
``adapt``          —               names of the parameters that move (ANIL: the head only)
=================  ==============  =========================================================

Learning rates: a number (MAML); a dict name → tensor shaped like the parameter or a scalar
(Meta-SGD, Li et al. 2017, where α is learned); or a sequence of K such dicts/numbers, one per
step (MAML++'s per-layer per-step learning rates, Antoniou et al. 2019). Tensors may require
grad: the adapted parameters are differentiable functions of them.

Under ``torch.func.vmap`` (tasks batched) gradients are taken with ``torch.func.grad``; outside a
transform with ``torch.autograd.grad(create_graph=True)``, the same gradient with less bookkeeping.
Either way the adapted parameters stay functions of θ, so back-propagating the query loss through
them yields the exact second-order meta-gradient,
∇_θ L_query(θ_K) = Π_k (I − α H_k) ∇ L_query(θ_K), computed with Hessian-vector products only.
``first_order=True`` detaches the inner gradient in exactly one place below (taking it at a detached
θ_k, so that no graph of the inner backward pass is even recorded); everything else is identical, so
FOMAML differs from MAML by exactly the Hessian terms.

Over a meta-batch: :func:`query_losses` runs the tasks one by one (``"loop"``) or batched
(``"vmap"``); :func:`task_mean` averages them into the meta-loss, by default differentiating each
task (or vmap chunk) as soon as its loss is known, so that only one task's graph is alive at a time.

Nothing here swaps weights through ``.data``, ``load_state_dict`` or ``deepcopy``: the network is
always called with ``torch.func.functional_call`` on the parameter dict.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .tasks import TaskBatch

__all__ = ["inner_loop", "query_losses", "task_mean", "grad_inputs", "resolve_strategy", "InnerLR", "LossFn",
           "InnerLoopDivergedError", "check_params", "raise_if_diverged", "STRATEGIES"]

STRATEGIES = ("auto", "loop", "vmap")

LossFn = Callable[[Tensor, Tensor], Tensor]
_Rate = Union[float, Tensor, Mapping[str, Union[float, Tensor]]]
InnerLR = Union[_Rate, Sequence[_Rate]]


class InnerLoopDivergedError(FloatingPointError):
    """The adapted parameters or the loss became inf/NaN (usually: the inner learning rate is too large)."""


def check_params(model: nn.Module, params: Mapping[str, Tensor]) -> None:
    """Raise unless ``params`` names exactly the model's parameters, with matching shapes.

    A partial dict would make ``functional_call`` silently fall back to the module's own weights,
    and no meta-gradient would reach them.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict name -> Tensor (e.g. dict(model.named_parameters())), "
                        f"got {type(params).__name__}")
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(params))
    unknown = sorted(set(params) - set(expected))
    if missing or unknown:
        raise KeyError(f"params must name exactly the model's parameters; missing {missing[:5]}"
                       f"{'…' if len(missing) > 5 else ''}, unknown {unknown[:5]}{'…' if len(unknown) > 5 else ''}")
    for name, p in params.items():
        if p.shape != expected[name].shape:
            raise ValueError(f"params[{name!r}] has shape {tuple(p.shape)} but the model's parameter has "
                             f"{tuple(expected[name].shape)}")


def _check_rate(value: object, where: str) -> None:
    if isinstance(value, Tensor):
        return  # learned rates (Meta-SGD, MAML++) may take any value; they are the optimiser's business
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where} must be a number or a Tensor, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where} must be a positive finite number, got {value!r}")


def _rates_per_step(inner_lr: InnerLR, inner_steps: int, names: Collection[str]) -> list[dict[str, float | Tensor]]:
    """Resolve any accepted form of ``inner_lr`` into one dict name → rate per step, validating it."""
    if isinstance(inner_lr, Sequence) and not isinstance(inner_lr, (str, bytes)):
        if len(inner_lr) != inner_steps:
            raise ValueError(f"inner_lr has one entry per step, so it needs inner_steps={inner_steps} entries, "
                             f"got {len(inner_lr)}")
        per_step = list(inner_lr)
    else:
        per_step = [inner_lr] * inner_steps
    resolved = []
    for k, rate in enumerate(per_step):
        if isinstance(rate, Mapping):
            absent = sorted(set(names) - set(rate))
            if absent:
                raise KeyError(f"inner_lr (step {k}) has no rate for adapted parameters {absent[:5]}; "
                               f"give one per adapted parameter")
            for name in names:
                _check_rate(rate[name], f"inner_lr[{name!r}] (step {k})")
            resolved.append({name: rate[name] for name in names})
        else:
            _check_rate(rate, "inner_lr" if inner_steps == 1 or k == 0 else f"inner_lr (step {k})")
            resolved.append(dict.fromkeys(names, rate))
    return resolved


def _check_steps(inner_steps: object) -> None:
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 0:
        raise ValueError(f"inner_steps must be a non-negative integer, got {inner_steps!r}")


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def _check_params_match_tasks(params: Mapping[str, Tensor], tasks: TaskBatch) -> None:
    """Catch dtype/device mismatches here, with advice, rather than deep inside a matmul."""
    x = tasks.x_support
    for name, p in params.items():
        if p.device != x.device:
            raise ValueError(f"params[{name!r}] is on {p.device} but the tasks are on {x.device}; move one "
                             f"of them (tasks.to(device) or {{n: p.to(device) for n, p in params.items()}})")
        if p.is_floating_point() and p.dtype != x.dtype:
            raise TypeError(f"params[{name!r}] is {p.dtype} but the task inputs are {x.dtype}; use one dtype "
                            f"(tasks.to(dtype=...) or model.to(dtype) before taking its parameters)")


def inner_loop(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor, *, loss_fn: LossFn,
               inner_lr: InnerLR, inner_steps: int, first_order: bool = False,
               adapt: Collection[str] | None = None) -> list[dict[str, Tensor]]:
    """Adapt ``params`` to one task's support set; return the whole trajectory [θ_0, θ_1, …, θ_K].

    Args:
        model: the network; called as ``functional_call(model, θ_k, (x,))``.
        params: θ, a dict holding every parameter of ``model``.
        x, y: the support set of ONE task, x (n_support, *feature_shape), y (n_support, …).
        loss_fn: ``loss_fn(outputs, y) -> scalar``, e.g. ``F.cross_entropy`` or ``F.mse_loss``.
        inner_lr: α (see the module docstring for the accepted forms).
        inner_steps: K ≥ 0 (K = 0 returns [θ]).
        first_order: drop second-order terms (FOMAML).
        adapt: names of the parameters that take inner steps; the others stay fixed (and still carry
            the meta-gradient of whatever depends on them). ``None`` adapts all.

    Works for a single task and inside ``torch.func.vmap`` over tasks (with ``params`` unbatched), and
    under ``torch.no_grad()`` (``torch.func.grad`` ignores an outer no_grad), for evaluation.
    """
    _check_steps(inner_steps)
    if isinstance(adapt, (str, bytes)):
        raise TypeError(f"adapt must be a collection of parameter names, not the string {adapt!r} (a string "
                        f"would be read letter by letter); for a name prefix use mlcore.anil.head_names")
    names = list(params) if adapt is None else [n for n in params if n in set(adapt)]
    if adapt is not None and len(names) != len(set(adapt)):
        raise KeyError(f"adapt names parameters the model does not have: {sorted(set(adapt) - set(params))[:5]}")
    if not names and inner_steps > 0:
        raise ValueError("adapt selects no parameter, so the inner loop would change nothing")
    rates = _rates_per_step(inner_lr, inner_steps, names)
    for k, rate in enumerate(rates):  # a rate must not change the parameter's shape by broadcasting
        for n in names:
            r = rate[n]
            if isinstance(r, Tensor) and not _broadcasts_to(r.shape, params[n].shape):
                raise ValueError(f"inner_lr for {n!r} (step {k}) has shape {tuple(r.shape)}, which does not "
                                 f"broadcast to the parameter's shape {tuple(params[n].shape)}; give a scalar or "
                                 f"a tensor shaped like the parameter (per-step rates: a list of inner_steps rates)")

    def support_loss(moving: dict[str, Tensor], fixed: dict[str, Tensor], x: Tensor) -> Tensor:
        return loss_fn(functional_call(model, {**fixed, **moving}, (x,)), y)

    grad_fn = torch.func.grad(support_loss)
    # Outside torch.func transforms (the loop strategy, adapt) plain autograd computes the same gradient as
    # torch.func.grad with less bookkeeping: torch.func.grad always records the graph of its backward
    # pass (for higher derivatives), autograd only with create_graph, i.e. where a meta-gradient needs it.
    plain_autograd = not _inside_functorch([x, *params.values()])
    differentiable = torch.is_grad_enabled()   # under no_grad (evaluation) nothing is differentiated later

    def support_grad(moving: dict[str, Tensor], fixed: dict[str, Tensor], create_graph: bool) -> dict[str, Tensor]:
        """∇L_support(θ_k) w.r.t. the moving parameters; a differentiable function of θ (and x) with
        ``create_graph``, else taken at a detached copy of θ_k and x (ANIL's body features are a
        differentiable x), so that no graph is recorded only to be thrown away."""
        inputs = x
        if not create_graph:
            moving, fixed = ({n: t.detach() for n, t in part.items()} for part in (moving, fixed))
            inputs = x.detach()
        if not plain_autograd:
            return grad_fn(moving, fixed, inputs)
        with torch.enable_grad():   # also under an outer no_grad (evaluation)
            # a tensor that does not require grad has no derivative to pass on: a fresh leaf stands in for it
            leaves = {n: t if t.requires_grad else t.detach().requires_grad_() for n, t in moving.items()}
            grads = torch.autograd.grad(support_loss(leaves, fixed, inputs), list(leaves.values()),
                                        create_graph=create_graph, allow_unused=True, materialize_grads=True)
        return dict(zip(leaves, grads, strict=True))

    trajectory = [dict(params)]
    theta = dict(params)
    for k in range(inner_steps):
        moving = {n: theta[n] for n in names}
        fixed = {n: t for n, t in theta.items() if n not in moving}
        if first_order:  # FOMAML: the one and only place where second-order terms are dropped:
            # the inner gradient is a constant (detached), taken without recording any graph.
            grads = {n: g.detach() for n, g in support_grad(moving, fixed, create_graph=False).items()}
        else:
            grads = support_grad(moving, fixed, create_graph=differentiable)
        theta = {**theta, **{n: moving[n] - rates[k][n] * grads[n] for n in names}}
        trajectory.append(theta)
    return trajectory


def raise_if_diverged(value: Tensor, *, inner_lr: InnerLR, inner_steps: int, what: str = "meta-loss",
                      tasks: TaskBatch | None = None) -> None:
    """Raise :class:`InnerLoopDivergedError` with advice when ``value`` holds inf or NaN (one device sync).

    With ``tasks``, a non-finite value is first blamed on the data if the tasks themselves hold NaN or
    inf (a ``ValueError`` naming the tensor), so that bad data is not reported as a learning rate problem.
    """
    if not bool(torch.isfinite(value).all()):
        if tasks is not None:
            for name in ("x_support", "y_support", "x_query", "y_query"):
                t = getattr(tasks, name)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    where = (~torch.isfinite(t)).flatten(1).any(1).nonzero().flatten().tolist()[:5]
                    raise ValueError(f"The {what} is not finite because tasks.{name} holds NaN or inf values "
                                     f"(in task(s) {where}); clean the data: this is not a learning-rate problem")
        lr = inner_lr if isinstance(inner_lr, (int, float)) else "the given rates"
        raise InnerLoopDivergedError(
            f"The {what} is not finite after {inner_steps} inner step(s) with inner_lr={lr}: the inner loop "
            f"diverged. Use a smaller inner_lr (or fewer inner_steps); pass check_finite=False to get the "
            f"non-finite value back instead of this error.")


def resolve_strategy(strategy: str, model: nn.Module, device: torch.device) -> str:
    """Pick how tasks are batched: ``"loop"`` (one task after another) or ``"vmap"`` (all at once).

    ``"auto"``: vmap on a GPU (one kernel launch for the whole meta-batch instead of one per task);
    on a CPU, vmap for networks without convolutions and loop for convolutional ones — on a 2-core CPU,
    batched convolutions under vmap measured slower than the per-task loop (``python -m mlcore.bench``).
    The loop then differentiates task by task (``eager``, see :func:`task_mean`), as a hand-written
    per-task ``loss.backward()`` loop does, so it matches that loop's speed and memory.
    Models holding ``torch.nn`` batch-norm layers always get ``"loop"``: under vmap their affine form
    returns a wrong second-order meta-gradient without any error; use ``Conv4(norm="batch")``, whose
    :class:`~mlcore.models.BatchStatNorm2d` is exact under vmap.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    torch_bn = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if strategy == "vmap" and torch_bn:
        raise ValueError(
            f"strategy='vmap' with torch.nn batch-norm layers {torch_bn[:3]}: vmap over tasks returns a WRONG "
            f"second-order meta-gradient through nn.BatchNorm2d's affine parameters, silently. Use "
            f"mlcore.models.BatchStatNorm2d (Conv4(norm='batch')) or strategy='loop'.")
    if strategy != "auto":
        return strategy
    if torch_bn:
        return "loop"
    random_layers = [n for n, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)
                     and m.training and m.p > 0]
    if random_layers:
        return "loop"  # vmap refuses random operations unless told how to batch them (randomness=...)
    if device.type == "cuda":
        return "vmap"
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    return "loop" if has_conv else "vmap"


def query_losses(model: nn.Module, params: Mapping[str, Tensor], tasks: TaskBatch, *, loss_fn: LossFn,
                 inner_lr: InnerLR, inner_steps: int, first_order: bool = False,
                 adapt: Collection[str] | None = None, eval_steps: Sequence[int] | None = None,
                 strategy: str = "auto", chunk_size: int | None = None,
                 return_outputs: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Adapt to every task of ``tasks`` and return the query losses, differentiable w.r.t. ``params``.

    Returns a (meta_batch,) tensor of L_query(θ_K) per task, or (meta_batch, len(eval_steps)) holding
    L_query(θ_k) for each k in ``eval_steps`` (MAML++'s multi-step loss needs k = 1 … K). With
    ``return_outputs`` also the network's query outputs after the last inner step,
    (meta_batch, n_query, *output_shape), for accuracies.

    ``strategy``: ``"loop"``, ``"vmap"`` or ``"auto"`` (see :func:`resolve_strategy`). ``chunk_size``
    (vmap only) vmaps over at most that many tasks at a time. Every task's graph stays alive in the
    result; the meta-losses (:func:`mlcore.maml.meta_loss` ...) bound that memory by differentiating
    chunk by chunk (:func:`task_mean`).
    """
    if not isinstance(tasks, TaskBatch):
        raise TypeError(f"tasks must be a mlcore.tasks.TaskBatch, got {type(tasks).__name__}")
    check_params(model, params)
    _check_steps(inner_steps)
    _check_params_match_tasks(params, tasks)
    steps = [inner_steps] if eval_steps is None else list(eval_steps)
    if any(not isinstance(k, int) or not 0 <= k <= inner_steps for k in steps) or not steps:
        raise ValueError(f"eval_steps must be integers in 0..inner_steps={inner_steps}, got {eval_steps!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    how = resolve_strategy(strategy, model, tasks.device)
    if chunk_size is not None and how != "vmap":
        raise ValueError(f"chunk_size applies to strategy='vmap' only (resolved strategy: {how!r})")
    _check_labels(tasks)

    def one_task(theta: dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor):
        trajectory = inner_loop(model, theta, xs, ys, loss_fn=loss_fn, inner_lr=inner_lr,
                                inner_steps=inner_steps, first_order=first_order, adapt=adapt)
        outputs = {k: functional_call(model, trajectory[k], (xq,)) for k in set(steps)}
        losses = torch.stack([loss_fn(outputs[k], yq) for k in steps])  # (len(steps),)
        return losses, outputs[steps[-1]]

    params = dict(params)
    data = (tasks.x_support, tasks.y_support, tasks.x_query, tasks.y_query)
    if how == "loop":
        results = [one_task(params, *(t[i] for t in data)) for i in range(tasks.meta_batch)]
        losses = torch.stack([r[0] for r in results])          # (B, len(steps))
        outputs = torch.stack([r[1] for r in results])         # (B, n_query, ...)
    else:
        batched = torch.func.vmap(one_task, in_dims=(None, 0, 0, 0, 0))
        size = chunk_size or tasks.meta_batch
        parts = [batched(params, *(t[i:i + size] for t in data)) for i in range(0, tasks.meta_batch, size)]
        losses = torch.cat([p[0] for p in parts])
        outputs = torch.cat([p[1] for p in parts])
    _check_outputs(outputs, tasks)
    if eval_steps is None:
        losses = losses[:, 0]
    return (losses, outputs) if return_outputs else losses


def _check_labels(tasks: TaskBatch) -> None:
    """Classification labels: 0..n_way-1 with every query class among the support classes."""
    if not tasks.is_classification:
        return
    low = int(torch.minimum(tasks.y_support.min(), tasks.y_query.min()))
    n_way = int(tasks.y_support.max()) + 1
    if low < 0:
        raise ValueError(f"class labels must lie in 0..n_way-1, found {low}; remap each task's classes to "
                         f"0..n_way-1")
    if int(tasks.y_query.max()) >= n_way:
        raise ValueError(f"a query label ({int(tasks.y_query.max())}) is not among the support classes "
                         f"0..{n_way - 1}: a task can only be learnt from classes its support set shows")


def _check_outputs(outputs: Tensor, tasks: TaskBatch) -> None:
    """The network's query outputs must fit the targets: n_way logits, or the targets' exact shape."""
    if tasks.is_classification:
        n_way = int(tasks.y_support.max()) + 1
        if outputs.dim() != 3 or outputs.shape[-1] != n_way:
            raise ValueError(f"the model returns query outputs of shape {tuple(outputs.shape[1:])} per task, but "
                             f"the tasks are {n_way}-way: it needs (n_query, {n_way}) logits (a head with n_way "
                             f"outputs, e.g. Conv4(n_way={n_way}))")
    elif outputs.shape != tasks.y_query.shape:
        raise ValueError(f"the model's query outputs have shape {tuple(outputs.shape[1:])} per task but the targets "
                         f"{tuple(tasks.y_query.shape[1:])}; a loss over mismatched shapes broadcasts to a wrong "
                         f"value. Give targets the outputs' shape (e.g. y.unsqueeze(-1))")


# ----------------------------------------------------------------------------- the mean over tasks
class _PrecomputedGradient(torch.autograd.Function):
    """The meta-loss as a node whose gradient was already computed, task by task (``eager`` mode).

    forward(value, outputs, grads, *inputs) returns copies of ``value`` and ``outputs``; backward hands
    ``grad_value · grads[i]`` to ``inputs[i]``. The value and its first derivative are exact; a second
    derivative or a gradient through the outputs cannot be had from it, so both raise.
    """

    @staticmethod
    def forward(ctx, value: Tensor, outputs: Tensor, grads: tuple[Tensor | None, ...], *inputs: Tensor):
        ctx.grads = grads
        ctx.set_materialize_grads(False)  # unused outputs get None, so a gradient into them can be told apart
        return value.clone(), outputs.clone()

    @staticmethod
    def backward(ctx, grad_value: Tensor | None, grad_outputs: Tensor | None):
        if grad_outputs is not None:
            raise RuntimeError(
                "a gradient reached the query outputs returned by a meta-loss computed with eager=True (per-task "
                "backward): each task's graph was freed as soon as its meta-gradient was taken, so only the "
                "loss itself is differentiable. Pass eager=False to keep the whole graph.")
        if torch.is_grad_enabled():
            raise RuntimeError(
                "create_graph=True (a second derivative) through a meta-loss computed with eager=True (per-task "
                "backward): its gradient was computed task by task and the graphs freed, so it can be "
                "differentiated once only. Pass eager=False to keep the whole graph.")
        no_grad = (None, None, None)
        if grad_value is None:
            return (*no_grad, *(None for _ in ctx.grads))
        return (*no_grad, *(None if g is None else g * grad_value for g in ctx.grads))


def grad_inputs(*objects: object) -> list[Tensor]:
    """Every tensor that requires grad inside ``objects`` (tensors, dicts, lists, TaskBatch), once each."""
    found: dict[int, Tensor] = {}

    def visit(obj: object) -> None:
        if isinstance(obj, Tensor):
            if obj.requires_grad:
                found.setdefault(id(obj), obj)
        elif isinstance(obj, TaskBatch):
            visit([obj.x_support, obj.y_support, obj.x_query, obj.y_query])
        elif isinstance(obj, Mapping):
            for value in obj.values():
                visit(value)
        elif isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
            for value in obj:
                visit(value)
    visit(objects)
    return list(found.values())


def _unseen_leaves(root: Tensor, inputs: Sequence[Tensor]) -> list[str]:
    """Leaf tensors that ``root`` depends on other than through ``inputs`` (e.g. a loss_fn closing over a
    learnable tensor): the eager mode differentiates w.r.t. ``inputs`` only, so it would miss them."""
    leaves = {id(t) for t in inputs if t.grad_fn is None}
    stops = {(t.grad_fn, t.output_nr) for t in inputs if t.grad_fn is not None}  # non-leaf inputs
    unseen, seen, stack = [], set(), [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold a leaf
        if variable is not None:
            if id(variable) not in leaves:
                unseen.append(f"a {tuple(variable.shape)} {str(variable.dtype).removeprefix('torch.')} tensor")
            continue
        stack.extend(nxt for nxt, nr in node.next_functions if (nxt, nr) not in stops)
    return unseen


def _inside_functorch(tensors: Sequence[Tensor]) -> bool:
    """True inside a torch.func transform (grad, vmap, ...), where an autograd.Function may not run."""
    return torch._C._functorch.maybe_current_level() is not None or any(
        torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def task_mean(task_losses: Callable[[TaskBatch], tuple[Tensor, Tensor]], tasks: TaskBatch, *, how: str,
              chunk_size: int | None, inputs: Sequence[Tensor], weights: Tensor | None = None,
              eager: bool | None = None) -> tuple[Tensor, Tensor]:
    """The meta-loss (1/B) Σ_i ℓ_i over the B tasks, computed a chunk of tasks at a time; (loss, outputs).

    ``task_losses(sub_batch)`` returns the query losses (b, S) of b tasks (S = evaluated inner steps) and
    their query outputs; ℓ_i = Σ_s w_s L_{i,s} with ``weights`` w (MAML++'s multi-step loss), else
    ℓ_i = L_{i,0}. Chunks: one task with ``how="loop"``, ``chunk_size`` tasks (all by default) with
    ``"vmap"``.

    ``eager`` (the memory of one chunk instead of the whole meta-batch): with ``eager``, each chunk's
    contribution is differentiated w.r.t. ``inputs`` (the tensors requiring grad: θ, learnable rates,
    weights) as soon as it is computed, the gradients are summed and the chunk's graph is freed; the
    returned loss carries the summed gradient, so ``.backward()`` gives exactly the same meta-gradient as
    keeping the graph, but it can be back-propagated only once (no ``create_graph``) and not through the
    returned outputs (both raise). This is what a per-task ``loss.backward()`` loop does, behind the
    scalar-returning API. ``None`` (default): eager when grad mode is on, some input requires grad,
    there are several chunks and no torch.func transform is active; if the first chunk turns out to
    depend on a learnable tensor outside ``inputs`` (a ``loss_fn`` closing over one), the whole graph
    is kept instead, which is exact too. ``True``: eager, raising in that case; ``False``: keep the graph.
    """
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    if chunk_size is not None and how != "vmap":
        raise ValueError(f"chunk_size applies to strategy='vmap' only (resolved strategy: {how!r})")
    if eager not in (None, True, False):
        raise TypeError(f"eager must be True, False or None (automatic), got {eager!r}")
    batch = tasks.meta_batch
    size = 1 if how == "loop" else (chunk_size or batch)
    starts = range(0, batch, size)
    inputs = [t for t in inputs if t.requires_grad]
    transformed = _inside_functorch([*inputs, tasks.x_support])
    if eager and transformed:
        raise ValueError("eager=True inside a torch.func transform (grad, vmap, jacrev, ...): the per-task "
                         "backward needs plain autograd; use eager=False or None there")
    use_eager = torch.is_grad_enabled() and bool(inputs) and not transformed and (eager or (
        eager is None and len(starts) > 1))

    def reduce(losses: Tensor) -> Tensor:  # (b, S) -> (b,)
        return losses @ weights if weights is not None else losses[:, 0]

    parts = []  # (ℓ (b,), outputs) of the chunks whose graph is kept
    if use_eager:
        value, total, outputs = None, [None] * len(inputs), []
        for n, start in enumerate(starts):
            losses, out = task_losses(tasks[start:start + size])
            part = reduce(losses).sum() / batch
            unseen = _unseen_leaves(part, inputs)
            if unseen and n == 0 and eager is None:
                parts.append((reduce(losses), out))   # keep this graph and every later one
                break
            if unseen:
                where = "eager=True, but the query loss" if eager else f"the query loss of task chunk {n}"
                raise ValueError(
                    f"{where} depends on learnable tensors it was not given ({', '.join(unseen[:3])}; e.g. a "
                    f"loss_fn that closes over a parameter), whose gradient the per-task backward would drop. "
                    f"Pass eager=False to keep the whole graph.")
            grads = torch.autograd.grad(part, inputs, allow_unused=True)
            total = [g if t is None else t if g is None else t + g for t, g in zip(total, grads, strict=True)]
            value = part.detach() if value is None else value + part.detach()
            outputs.append(out.detach())
        else:
            return _PrecomputedGradient.apply(value, torch.cat(outputs), tuple(total), *inputs)
    for start in starts[len(parts):]:
        losses, out = task_losses(tasks[start:start + size])
        parts.append((reduce(losses), out))
    return torch.cat([p[0] for p in parts]).mean(), torch.cat([p[1] for p in parts])
