"""The compiled meta-gradient of the MAML family: ``torch.compile`` of ``torch.func.grad`` of the vmapped
meta-loss, built on the one inner loop (:mod:`mlcore.inner`).

For the learnable inputs w = (θ, the learned inner rates α, MAML++'s step weights) and a meta-batch of B
tasks, one function returns the meta-loss and its gradient w.r.t. every learnable input:

    w  ↦  ( (1/B) Σ_i ℓ_i(w),   ∇_w (1/B) Σ_i ℓ_i(w) )                (Finn et al. 2017, eq. 2)

    ℓ_i(w) = L(θ'_i; D^ts_i),   θ'_i = θ − α ∇_θ L(θ; D^tr_i)          (MAML's ℓ_i, one inner step)

The tasks are batched by ``torch.func.vmap``, the meta-gradient is ``torch.func.grad`` around it, and the
inner loop inside is :func:`mlcore.inner.trajectory` with ``vmapped=True`` (its gradient is
``torch.func.grad`` too), so the whole second-order computation, Hessian-vector products included, is one
graph that ``torch.compile`` optimises. It is the ``grad`` that is compiled, not the loss followed by
``.backward()``: aot_autograd refuses the double backward a second-order meta-gradient needs through a
compiled loss ("does not currently support double backward").

=================  ==============  ========================================================================
code               paper           meaning, shape
=================  ==============  ========================================================================
``task_fn``        ℓ_i             a method's objective for one task, ``task_fn(inputs, x_s, y_s, x_q, y_q,
                                   *, vmapped) -> (loss, outputs)`` (:data:`mlcore.family.TaskFn`)
``inputs``         w               :class:`mlcore.family.Inputs` (θ, α per step, step weights); any pytree
                                   of tensors and numbers: tensors that require grad are differentiated
``tasks``          T_1 … T_B       a :class:`~mlcore.tasks.TaskBatch`, B = ``meta_batch``
``grads``          ∇_w             one gradient per learnable tensor (``MetaGradient.wrt``), each once
=================  ==============  ========================================================================

Exactness is a property of the inner loop, not of this file: the compiled function runs the same
``trajectory`` as the eager strategies, and ``tests/test_compiled.py`` checks it against the per-task
eager loop in float64 (≤ 1e-10: MLP and Conv4 with batch statistics, 1 and 3 inner steps, first and
second order, Meta-SGD and ANIL).

Compiling happens on the first call for each configuration (model, method, ``first_order``, the inner
rates when they are numbers, the number of steps) and each input shape, dtype and device
(``dynamic=False``: the last, smaller chunk of a meta-batch is a graph of its own); later calls reuse it.
Each compilation prints its cost once, on stderr. If compiling is unavailable or fails (no
``torch._dynamo`` on this Python, an operation dynamo cannot trace, no C++ compiler for inductor,
dynamo's recompile limit), the same function runs eagerly and a :class:`CompileFallbackWarning` says
why; ``warnings.simplefilter("error", CompileFallbackWarning)`` makes that an error instead.

Modes (``compile=``): ``True`` or ``"default"``; ``"max-autotune-no-cudagraphs"``; ``"reduce-overhead"``
and ``"max-autotune"`` add CUDA graphs (the shapes of a training run are static), not yet measured on a
GPU; their outputs are copied before they are returned, as CUDA-graph outputs are overwritten by the
next replay. bf16 autocast is not offered: on a CPU it made the second-order step 18× slower.
"""
from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .inner import STRATEGIES, resolve_strategy
from .models import per_step_norms
from .tasks import TaskBatch

__all__ = ["MODES", "CompileFallbackWarning", "MetaGradient", "resolve_mode", "resolve_strategy_for_compile",
           "meta_gradient", "reset"]

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
BACKEND = "inductor"   # the tests of the wiring swap in "eager" (dynamo's tracing without inductor's compile time)

TaskFn = Callable[..., tuple[Tensor, Tensor]]


class CompileFallbackWarning(RuntimeWarning):
    """``compile=`` was asked for, but the meta-gradient runs eagerly (the message says why)."""


class MetaGradient(NamedTuple):
    """The meta-loss (1/B) Σ_i ℓ_i (detached), each task's ℓ_i (B,), the query outputs (B, n_query, ...),
    the learnable input tensors ``wrt`` (each once, in the order of ``inputs``) and ∂loss/∂wrt[k]."""
    loss: Tensor
    losses: Tensor
    outputs: Tensor
    wrt: tuple[Tensor, ...]
    grads: tuple[Tensor, ...]


def resolve_mode(compile: bool | str | None) -> str | None:
    """The torch.compile mode asked for by ``compile=``: ``None`` (eager) for False/None, "default" for True."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return "default"
    if isinstance(compile, str) and compile in MODES:
        return compile
    raise ValueError(f"compile must be False, True or a torch.compile mode {MODES}, got {compile!r}")


def resolve_strategy_for_compile(strategy: str, model: nn.Module, device: torch.device) -> str:
    """``"vmap"``: the compiled function batches the tasks with vmap; refuse what cannot be batched."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "loop":
        raise ValueError("compile= compiles the meta-gradient of the vmapped meta-loss (all tasks batched by vmap in "
                         "one graph), so strategy='loop' contradicts it: pass strategy='auto' or 'vmap' with "
                         "compile=, or compile=False for the per-task loop")
    dropout = [n for n, m in model.named_modules()
               if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0]
    if dropout:
        raise ValueError(f"compile= batches the tasks with vmap, which refuses the random operations of the active "
                         f"dropout layers {dropout[:3]}; use compile=False (the per-task loop) or model.eval()")
    per_step = list(per_step_norms(model))
    if per_step:
        raise ValueError(f"compile= does not support MAML++ per-step batch norm (layers {per_step[:3]}): the "
                         f"inner-step index reaches those layers through a Python context variable, which the compiled "
                         f"graph is not checked to follow; use compile=False (the eager loop or vmap, both exact)")
    return resolve_strategy("vmap", model, device)   # raises for torch.nn batch norm (a wrong meta-gradient)


def meta_gradient(task_fn: TaskFn, inputs: Any, tasks: TaskBatch, *, mode: str | None = "default",
                  chunk_size: int | None = None) -> MetaGradient:
    """The meta-loss of ``task_fn`` over ``tasks`` and its gradient w.r.t. every tensor of ``inputs`` that
    requires grad, compiled with torch.compile ``mode`` (see the module docstring; ``None``: the same
    function run eagerly); ``chunk_size`` tasks per call (default: all).

    The inputs are differentiated as given: a computed one (θ = f(φ)) gets ∂loss/∂θ, which the caller
    back-propagates into φ (``torch.autograd.backward(result.wrt, result.grads)``, as
    :func:`mlcore.family.run` does). Raises if the objective depends on a tensor that requires grad but is
    not among ``inputs`` (a ``loss_fn`` closing over one): its gradient would be lost.
    """
    mode = resolve_mode(mode)
    leaves, spec = tree_flatten(inputs)
    index: dict[int, int] = {}   # id -> position among the distinct tensors (Meta-SGD's α recurs at every step)
    slots = [index.setdefault(id(x), len(index)) if isinstance(x, Tensor) else None for x in leaves]
    tensors = list({id(x): x for x in leaves if isinstance(x, Tensor)}.values())   # each once, in that order
    learnable = [k for k, t in enumerate(tensors) if t.requires_grad]
    if not learnable:
        raise ValueError("nothing to differentiate: no parameter (nor learned rate) requires grad. Pass "
                         "dict(model.named_parameters()), or leaves made with p.detach().requires_grad_()")
    fixed = [k for k, t in enumerate(tensors) if not t.requires_grad]
    template = [None if s is not None else x for x, s in zip(leaves, slots, strict=True)]

    def rebuild(learned: Sequence[Tensor], constant: Sequence[Tensor]) -> Any:
        values = dict(zip(learnable, learned, strict=True)) | dict(zip(fixed, constant, strict=True))
        return tree_unflatten([x if s is None else values[s] for x, s in zip(template, slots, strict=True)], spec)

    learned = [tensors[k].detach() for k in learnable]
    constant = [tensors[k].detach() for k in fixed]
    size, b = chunk_size or tasks.meta_batch, tasks.meta_batch
    total, losses, outputs = None, [], []
    for start in range(0, b, size):
        data = [t[start:start + size] for t in (tasks.x_support, tasks.y_support, tasks.x_query, tasks.y_query)]
        grads, loss, out = _call(mode, task_fn, rebuild, learned, constant, b, data)
        total = list(grads) if total is None else [a + g for a, g in zip(total, grads, strict=True)]
        losses.append(loss)
        outputs.append(out)
    losses = torch.cat(losses)
    if losses.requires_grad or any(g.requires_grad for g in total):
        raise ValueError("the objective depends on a tensor that requires grad but is not among the params, rates "
                         "or step weights (a loss_fn closing over a learnable tensor, say): compile= differentiates "
                         "w.r.t. those inputs only, so its gradient would be lost. Use compile=False")
    return MetaGradient(losses.mean(), losses, torch.cat(outputs), tuple(tensors[k] for k in learnable), tuple(total))


def _meta_gradient(task_fn: TaskFn, rebuild: Callable[..., Any], learned: list[Tensor], constant: list[Tensor],
                   meta_batch: int, x_s: Tensor, y_s: Tensor, x_q: Tensor, y_q: Tensor
                   ) -> tuple[list[Tensor], Tensor, Tensor]:
    """∇_w of this chunk's share Σ_i ℓ_i / B of the meta-loss, each ℓ_i (chunk,) and the query outputs."""
    def chunk_loss(learned: list[Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        inputs = rebuild(learned, constant)
        losses, outputs = torch.func.vmap(lambda *t: task_fn(inputs, *t, vmapped=True))(x_s, y_s, x_q, y_q)
        return losses.sum() / meta_batch, (losses, outputs)

    grads, (_, (losses, outputs)) = torch.func.grad_and_value(chunk_loss, has_aux=True)(learned)
    return grads, losses, outputs


_COMPILED: dict[str, Callable[..., Any]] = {}   # mode -> torch.compile(_meta_gradient); dynamo caches per shape
_EAGER: dict[tuple, str] = {}                   # what failed to compile -> why (those calls run eagerly)


def reset() -> None:
    """Forget every compiled graph (``torch._dynamo.reset()``) and every recorded compile failure."""
    torch._dynamo.reset()
    _COMPILED.clear()
    _EAGER.clear()


def _call(mode: str | None, task_fn: TaskFn, rebuild: Callable[..., Any], learned: list[Tensor],
          constant: list[Tensor], meta_batch: int, data: list[Tensor]) -> tuple[list[Tensor], Tensor, Tensor]:
    """:func:`_meta_gradient` compiled (eager for ``mode=None``, or where compiling failed before)."""
    args = (task_fn, rebuild, learned, constant, meta_batch, *data)
    key = (mode, getattr(task_fn, "__code__", task_fn), meta_batch,
           *((tuple(t.shape), t.dtype, t.device) for t in (*learned, *constant, *data)))
    with torch.enable_grad():   # the same graph under an outer no_grad; and a leaked dependency stays visible
        if mode is None or key in _EAGER:
            return _meta_gradient(*args)
        if not torch._dynamo.is_dynamo_supported():
            return _fall_back(key, args, f"torch.compile is not supported here (Python {sys.version.split()[0]}, "
                                         f"torch {torch.__version__})")
        if mode not in _COMPILED:
            options = {"mode": mode} if BACKEND == "inductor" else {}
            _COMPILED[mode] = torch.compile(_meta_gradient, backend=BACKEND, fullgraph=True, dynamic=False, **options)
        graphs, started = torch._dynamo.utils.counters["stats"]["unique_graphs"], time.perf_counter()
        try:
            # past dynamo's recompile limit it would run eagerly without a word: make that an error here
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                if mode in CUDA_GRAPH_MODES:
                    torch.compiler.cudagraph_mark_step_begin()
                grads, losses, outputs = _COMPILED[mode](*args)
        except Exception as error:  # noqa: BLE001 - any compile failure: the eager run decides
            return _fall_back(key, args, _reason(error))
        if mode in CUDA_GRAPH_MODES:   # the next replay overwrites a CUDA graph's outputs
            grads, losses, outputs = [g.clone() for g in grads], losses.clone(), outputs.clone()
        if torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs:
            x_s, x_q = data[0], data[2]
            print(f"[mlcore.compiled] compiled the meta-gradient (mode={mode!r}, {x_s.shape[0]} tasks, support "
                  f"{tuple(x_s.shape[1:])}, query {tuple(x_q.shape[1:])}, {x_s.dtype}, {x_s.device}) in "
                  f"{time.perf_counter() - started:.1f} s, on its first call; calls of these shapes reuse it",
                  file=sys.stderr, flush=True)
        return grads, losses, outputs


def _reason(error: BaseException) -> str:
    """The error's type and first line, and those of the error inside it (inductor's, a backend's)."""
    def line(e: BaseException) -> str:
        text = str(e).strip()
        return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"
    inner = getattr(error, "inner_exception", None) or error.__cause__
    return line(error) + (f" <- {line(inner)}" if inner is not None else "")


def _fall_back(key: tuple, args: tuple, why: str) -> tuple[list[Tensor], Tensor, Tensor]:
    """Run eagerly; if that works, the failure was the compiler's: say so once, and stay eager for ``key``."""
    result = _meta_gradient(*args)   # an error of the objective itself is raised here, as it is
    _EAGER[key] = why
    hint = (" Call mlcore.compiled.reset() to drop the compiled graphs, or raise "
            "torch._dynamo.config.recompile_limit." if "recompile" in why.lower() else "")
    warnings.warn(CompileFallbackWarning(
        f"compile= could not compile the meta-gradient ({why}); it runs eagerly instead: the same function and "
        f"gradient, without the compiled speed.{hint}"), stacklevel=2)
    return result
