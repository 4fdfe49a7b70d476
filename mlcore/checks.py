"""One validation boundary: every check of a public argument, written once.

The public entry points (``maml.meta_loss``, ``anil.predict``, ``reptile_step``, ``EpisodeSampler``, …)
call these once per call; the inner loop and the batching over tasks behind them trust their inputs.
Each check raises an error that says what was wrong and what is allowed.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Union

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # mlcore.tasks uses these checks itself
    from .tasks import TaskBatch

__all__ = ["InnerLoopDivergedError", "InnerLR", "positive_int", "non_negative_int", "positive_number",
           "params", "tasks", "adapted_names", "rates", "loss_value", "step_weights", "chunk_size", "outputs",
           "raise_if_diverged"]

_Rate = Union[float, Tensor, Mapping[str, Union[float, Tensor]]]
InnerLR = Union[_Rate, Sequence[_Rate]]


class InnerLoopDivergedError(FloatingPointError):
    """The adapted parameters or the loss became inf/NaN (usually: the inner learning rate is too large)."""


# ----------------------------------------------------------------------------------------- numbers
def positive_int(name: str, value: object, where: str = "") -> int:
    """``value`` as an int if it is a positive integer (numpy/torch integers too; bools are refused)."""
    return _int(name, value, where, low=1, what="a positive integer")


def non_negative_int(name: str, value: object, where: str = "") -> int:
    return _int(name, value, where, low=0, what="a non-negative integer")


def _int(name: str, value: object, where: str, low: int, what: str) -> int:
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < low:
        raise ValueError(f"{where + ': ' if where else ''}{name} must be {what}, got {value!r}")
    return number


def positive_number(name: str, value: object, where: str = "") -> float:
    """``value`` as a float if it is a positive finite number (not a bool, not a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where + ': ' if where else ''}{name} must be a positive finite number, got {value!r}")
    return float(value)


# ------------------------------------------------------------------------------ params and tasks
def params(model: nn.Module, params: Mapping[str, Tensor]) -> None:
    """Raise unless ``params`` names exactly the model's parameters, with matching shapes.

    A partial dict would make ``functional_call`` silently fall back to the module's own weights,
    and no meta-gradient would reach them.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict name -> Tensor (e.g. dict(model.named_parameters())), "
                        f"got {type(params).__name__}")
    running = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               and m.training and m.track_running_stats]
    if running:
        raise ValueError(
            f"the model's batch-norm layers {running[:3]} keep running statistics in training mode: every inner "
            f"step and query pass of every task (and every predict) would update them in place, mixing tasks "
            f"and changing the model as a side effect. Use batch statistics without running state "
            f"(mlcore.models.Conv4(norm='batch'), or nn.BatchNorm2d(..., track_running_stats=False)), or "
            f"model.eval() to normalise with the frozen running statistics")
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(params))
    unknown = sorted(set(params) - set(expected))
    if missing or unknown:
        raise KeyError(f"params must name exactly the model's parameters; missing {_few(missing)}, "
                       f"unknown {_few(unknown)}")
    for name, p in params.items():
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{name!r}] must be a Tensor, got {type(p).__name__}")
        if p.shape != expected[name].shape:
            raise ValueError(f"params[{name!r}] has shape {tuple(p.shape)} but the model's parameter has "
                             f"{tuple(expected[name].shape)}")


def tasks(tasks: object, params: Mapping[str, Tensor] | None = None, loss_fn: object = None) -> TaskBatch:
    """A :class:`TaskBatch` whose labels make sense, on the params' device and dtype."""
    from .tasks import TaskBatch
    if not isinstance(tasks, TaskBatch):
        raise TypeError(f"tasks must be a mlcore.tasks.TaskBatch, got {type(tasks).__name__}")
    if loss_fn is torch.nn.functional.cross_entropy and not tasks.is_classification:
        raise TypeError(f"loss_fn is cross_entropy but the labels are {tasks.y_support.dtype}: class labels must "
                        f"be int64 class indices (tasks with y.long()); floating point targets mean regression "
                        f"(e.g. F.mse_loss)")
    x = tasks.x_support
    for name, p in (params or {}).items():  # caught here, with advice, rather than deep inside a matmul
        if p.device != x.device:
            raise ValueError(f"params[{name!r}] is on {p.device} but the tasks are on {x.device}; move one "
                             f"of them (tasks.to(device) or {{n: p.to(device) for n, p in params.items()}})")
        if p.is_floating_point() and p.dtype != x.dtype:
            raise TypeError(f"params[{name!r}] is {p.dtype} but the task inputs are {x.dtype}; use one dtype "
                            f"(tasks.to(dtype=...) or model.to(dtype) before taking its parameters)")
    if tasks.is_classification:  # labels 0..n_way-1, every query class among the support classes
        low = int(torch.minimum(tasks.y_support.min(), tasks.y_query.min()))
        n_way = int(tasks.y_support.max()) + 1
        if low < 0:
            raise ValueError(f"class labels must lie in 0..n_way-1, found {low}; remap each task's classes "
                             f"to 0..n_way-1")
        if int(tasks.y_query.max()) >= n_way:
            raise ValueError(f"a query label ({int(tasks.y_query.max())}) is not among the support classes "
                             f"0..{n_way - 1}: a task can only be learnt from classes its support set shows")
    return tasks


def outputs(outputs: Tensor, tasks: TaskBatch) -> None:
    """The network's query outputs must fit the targets: n_way logits, or the targets' exact shape."""
    if tasks.is_classification:
        n_way = int(tasks.y_support.max()) + 1
        if outputs.dim() != 3 or outputs.shape[-1] != n_way:
            raise ValueError(f"the model returns query outputs of shape {tuple(outputs.shape[1:])} per task, "
                             f"but the tasks are {n_way}-way: it needs (n_query, {n_way}) logits (a head with "
                             f"n_way outputs, e.g. Conv4(n_way={n_way}))")
    elif outputs.shape != tasks.y_query.shape:
        raise ValueError(f"the model's query outputs have shape {tuple(outputs.shape[1:])} per task but the "
                         f"targets {tuple(tasks.y_query.shape[1:])}; a loss over mismatched shapes broadcasts "
                         f"to a wrong value. Give targets the outputs' shape (e.g. y.unsqueeze(-1))")


# ------------------------------------------------------------------------ the inner loop's arguments
def adapted_names(params: Mapping[str, Tensor], adapt: Collection[str] | None, inner_steps: int) -> list[str]:
    """The names of the parameters that take inner steps (all when ``adapt`` is None), in params order."""
    if adapt is None:
        return list(params)
    if isinstance(adapt, (str, bytes)):
        raise TypeError(f"adapt must be a collection of parameter names, not the string {adapt!r} (a string "
                        f"would be read letter by letter); for a name prefix use mlcore.anil.head_names")
    unknown = sorted(set(adapt) - set(params))
    if unknown:
        raise KeyError(f"adapt names parameters the model does not have: {_few(unknown)}")
    names = [n for n in params if n in set(adapt)]
    if not names and inner_steps > 0:
        raise ValueError("adapt selects no parameter, so the inner loop would change nothing")
    return names


def rates(inner_lr: InnerLR, inner_steps: int, params: Mapping[str, Tensor],
          names: Sequence[str]) -> list[dict[str, float | Tensor]]:
    """Any accepted form of ``inner_lr`` as one dict name → rate per step, for the adapted ``names``.

    Forms: a number (MAML); a dict name → number or tensor, a tensor being a scalar or shaped like the
    parameter (Meta-SGD's learned α); a sequence of ``inner_steps`` such rates (MAML++'s per-step rates).
    Tensor rates may take any value (they are learned); numbers must be positive.
    """
    if isinstance(inner_lr, Sequence) and not isinstance(inner_lr, (str, bytes)):
        if len(inner_lr) != inner_steps:
            raise ValueError(f"inner_lr has one entry per step, so it needs inner_steps={inner_steps} "
                             f"entries, got {len(inner_lr)}")
        per_step = list(inner_lr)
    else:
        per_step = [inner_lr] * inner_steps
    resolved = []
    for k, rate in enumerate(per_step):
        at = "" if len(per_step) == 1 or not isinstance(inner_lr, Sequence) else f" (step {k})"
        if isinstance(rate, Mapping):
            absent = sorted(set(names) - set(rate))
            if absent:
                raise KeyError(f"inner_lr{at} has no rate for adapted parameters {_few(absent)}; give one "
                               f"per adapted parameter")
            rate = {n: rate[n] for n in names}
        else:
            rate = dict.fromkeys(names, rate)
        for n, r in rate.items():
            where = f"inner_lr[{n!r}]{at}" if isinstance(per_step[k], Mapping) else f"inner_lr{at}"
            if not isinstance(r, Tensor):
                if isinstance(r, bool) or not isinstance(r, (int, float)):
                    raise TypeError(f"{where} must be a number or a Tensor, got {type(r).__name__}")
                positive_number(where, r)
            elif not _broadcasts_to(r.shape, params[n].shape):
                raise ValueError(f"{where} has shape {tuple(r.shape)}, which does not broadcast to the "
                                 f"parameter's shape {tuple(params[n].shape)}; give a scalar or a tensor shaped "
                                 f"like the parameter (per-step rates: a list of inner_steps rates)")
        resolved.append(rate)
    return resolved


def loss_value(value: object) -> Tensor:
    """A loss_fn's value: a 0-dim tensor (what a gradient can be taken of)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"loss_fn must return a scalar tensor (differentiable), got a {type(value).__name__}; "
                        f"do not call .item() or float() inside it")
    if value.dim() != 0:
        raise ValueError(f"loss_fn must return one number per task (a mean over the examples), got shape "
                         f"{tuple(value.shape)}; use reduction='mean' (the default of F.cross_entropy)")
    return value


def step_weights(weights: Sequence[float] | Tensor | None, inner_steps: int, like: Tensor) -> Tensor | None:
    """MAML++'s multi-step loss weights w_1 … w_K as a tensor, or None."""
    if weights is None:
        return None
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    if w.shape != (inner_steps,):
        raise ValueError(f"step_weights needs one weight per inner step (inner_steps={inner_steps}), "
                         f"got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"step_weights must be finite and non-negative (MAML++ weights each step's query "
                         f"loss), got {w.tolist()}")
    return w


def chunk_size(chunk_size: object, how: str) -> int | None:
    if chunk_size is None:
        return None
    size = positive_int("chunk_size", chunk_size)
    if how != "vmap":
        raise ValueError(f"chunk_size applies to strategy='vmap' only (resolved strategy: {how!r})")
    return size


def raise_if_diverged(value: Tensor, *, inner_lr: InnerLR, inner_steps: int, what: str = "meta-loss",
                      tasks: TaskBatch | None = None) -> None:
    """Raise :class:`InnerLoopDivergedError` with advice when ``value`` holds inf or NaN (one device sync).

    With ``tasks``, a non-finite value is first blamed on the data if the tasks themselves hold NaN or
    inf (a ``ValueError`` naming the tensor), so that bad data is not reported as a learning rate problem.
    """
    if bool(torch.isfinite(value).all()):
        return
    for name in ("x_support", "y_support", "x_query", "y_query") if tasks is not None else ():
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


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def _few(names: Sequence[str]) -> str:
    return f"{list(names[:5])}{'…' if len(names) > 5 else ''}"
