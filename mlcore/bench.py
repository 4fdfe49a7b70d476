"""Side-by-side benchmark of one meta-gradient step: ``python -m mlcore.bench maml|sine [options]``.

One run times, on the same inputs and the same initial weights, one meta-gradient step (forward and
backward, no optimiser step) of several implementations, and checks every meta-gradient against an
independent per-task autograd loop:

==============================  ==========================================================================
row                             what it is
==============================  ==========================================================================
floor                           plain supervised forward + backward of the same network over the same
                                images (meta_batch × (support + query)) in ONE batch: no meta-learning
per-task autograd loop          how learn2learn/higher-style code does it: per task, ``autograd.grad``
                                (``create_graph``) on the module's parameters, manual SGD, functional
                                forward on the query, ``backward`` accumulates. The gradient reference.
higher                          ``higher.innerloop_ctx`` per task (only if ``higher`` is importable)
mlcore <strategy>               :func:`mlcore.maml.meta_loss` with ``strategy`` loop / vmap / vmap chunked /
                                auto (the row says what ``auto`` resolved to). "eager" rows differentiate
                                task by task (chunk by chunk) inside ``meta_loss`` and free each graph
                                (the default for loop and chunked vmap); "loop, whole graph" is
                                ``eager=False``: every task's graph is kept until the one ``backward``
torch.func.vmap recipe          the functorch MAML recipe (``vmap`` over ``grad`` + ``functional_call``);
                                for ``Conv4(norm="batch")`` it runs the network with ``nn.BatchNorm2d``
                                (``track_running_stats=False``), the naive fast version — whose
                                second-order meta-gradient is wrong (chapter 3 shows why)
==============================  ==========================================================================

Every row is measured for second-order MAML and for first-order (FOMAML) unless ``--no-first-order``.
The inputs are random tensors (timing only: nothing learns). This is a script (STYLE principle 11),
not a timed test; ``tests/test_bench.py`` runs it at toy size to check its rows and gradient checks.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .complexity import PeakMemory, synchronize
from .inner import LossFn, resolve_strategy
from .maml import meta_loss
from .models import MLP, NORMS, BatchStatNorm2d, Conv4
from .tasks import SineTasks, TaskBatch

__all__ = ["main", "Problem", "Row"]

EXACT_F64 = 1e-8  # float64 relative error below which a meta-gradient counts as exact


@dataclass(frozen=True)
class Problem:
    """One benchmark instance: a network, a meta-batch of tasks and the inner-loop settings."""

    model: nn.Module
    tasks: TaskBatch
    loss_fn: LossFn
    inner_lr: float
    inner_steps: int


@dataclass
class Row:
    method: str
    order: str                       # "2nd", "1st" or "-" (the floor)
    median_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    peak_mb: float | None = None
    x_floor: float | None = None
    speedup_vs_loop: float | None = None
    grad_err: float | None = None     # at the benchmarked size and dtype, vs the per-task loop
    grad_err_f64: float | None = None  # float64 tiny instance, vs the per-task loop
    verdict: str = ""
    note: str = ""


# ----------------------------------------------------------------------------- the implementations
# Each builder returns a zero-argument step that accumulates the meta-gradient (mean over tasks of
# the query loss) into ``.grad`` of the model's parameters.

def floor_step(p: Problem, first_order: bool) -> Callable[[], None]:
    t = p.tasks
    x = torch.cat([t.x_support, t.x_query], 1).flatten(0, 1)   # (B·(S+Q), *feature_shape)
    y = torch.cat([t.y_support, t.y_query], 1).flatten(0, 1)   # (B·(S+Q), *target_shape)
    return lambda: p.loss_fn(p.model(x), y).backward()


def per_task_loop_step(p: Problem, first_order: bool) -> Callable[[], None]:
    names, weights = zip(*p.model.named_parameters())
    t = p.tasks

    def step() -> None:
        for i in range(t.meta_batch):
            fast = list(weights)
            for _ in range(p.inner_steps):
                loss = p.loss_fn(functional_call(p.model, dict(zip(names, fast)), (t.x_support[i],)), t.y_support[i])
                grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
                fast = [w - p.inner_lr * g for w, g in zip(fast, grads, strict=True)]
            query = p.loss_fn(functional_call(p.model, dict(zip(names, fast)), (t.x_query[i],)), t.y_query[i])
            (query / t.meta_batch).backward()   # frees this task's graph before the next task
    return step


def higher_step(p: Problem, first_order: bool) -> Callable[[], None]:
    import higher  # optional; the caller checks that it imports
    t = p.tasks
    inner_opt = torch.optim.SGD(p.model.parameters(), lr=p.inner_lr)
    # higher always differentiates through its steps; FOMAML is its documented grad_callback that detaches.
    detach = (lambda grads: [g.detach() for g in grads]) if first_order else None

    def step() -> None:
        for i in range(t.meta_batch):
            # copy_initial_weights=False: with higher's default (True) no meta-gradient reaches the model.
            with higher.innerloop_ctx(p.model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(p.inner_steps):
                    diffopt.step(p.loss_fn(fmodel(t.x_support[i]), t.y_support[i]), grad_callback=detach)
                (p.loss_fn(fmodel(t.x_query[i]), t.y_query[i]) / t.meta_batch).backward()
    return step


def mlcore_step(strategy: str, chunk_size: int | None, eager: bool | None = None
                ) -> Callable[[Problem, bool], Callable[[], None]]:
    def build(p: Problem, first_order: bool) -> Callable[[], None]:
        params = dict(p.model.named_parameters())
        return lambda: meta_loss(p.model, params, p.tasks, loss_fn=p.loss_fn, inner_lr=p.inner_lr,
                                 inner_steps=p.inner_steps, first_order=first_order, strategy=strategy,
                                 chunk_size=chunk_size, eager=eager).backward()
    return build


def functorch_recipe_step(p: Problem, first_order: bool) -> Callable[[], None]:
    """The functorch MAML example's pattern, written independently of mlcore.inner."""
    params = dict(p.model.named_parameters())
    t = p.tasks

    def task_query_loss(theta: dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        for _ in range(p.inner_steps):
            grads = torch.func.grad(lambda th: p.loss_fn(functional_call(p.model, th, (xs,)), ys))(theta)
            if first_order:
                grads = {n: g.detach() for n, g in grads.items()}
            theta = {n: theta[n] - p.inner_lr * grads[n] for n in theta}
        return p.loss_fn(functional_call(p.model, theta, (xq,)), yq)

    batched = torch.func.vmap(task_query_loss, in_dims=(None, 0, 0, 0, 0))
    return lambda: batched(params, t.x_support, t.y_support, t.x_query, t.y_query).mean().backward()


def with_torch_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose BatchStatNorm2d layers are ``nn.BatchNorm2d(track_running_stats=False)``
    with the same scale and shift: the same function, as ``replace_all_batch_norm_modules_`` leaves it."""
    clone = copy.deepcopy(model)  # a separate benchmark model; no gradient flows between the copies
    for name, module in list(clone.named_modules()):
        if isinstance(module, BatchStatNorm2d):
            bn = nn.BatchNorm2d(module.weight.shape[0], eps=module.eps, track_running_stats=False)
            bn = bn.to(device=module.weight.device, dtype=module.weight.dtype)
            with torch.no_grad():  # building the benchmark's model, outside any differentiated path
                bn.weight.copy_(module.weight)
                bn.bias.copy_(module.bias)
            parent_name, _, child = name.rpartition(".")
            setattr(clone.get_submodule(parent_name), child, bn)
    return clone


# ----------------------------------------------------------------------------- measuring
def meta_gradient(build: Callable[[Problem, bool], Callable[[], None]], p: Problem,
                  first_order: bool) -> dict[str, Tensor]:
    """Run one step from zeroed gradients; return {name: gradient} (zeros where none arrived)."""
    step = build(p, first_order)
    for w in p.model.parameters():
        w.grad = None
    step()
    return {n: (w.grad.detach().clone() if w.grad is not None else torch.zeros_like(w))
            for n, w in p.model.named_parameters()}


def relative_error(grads: dict[str, Tensor], reference: dict[str, Tensor]) -> float:
    """max over parameter tensors n of ||g_n − r_n||₂ / max(||r_n||₂, 1e-3 · ||r||₂).

    The floor matters for tensors whose exact gradient is zero, such as conv biases followed by
    batch norm (the norm subtracts them out): their computed gradient is rounding noise, and noise
    divided by noise would say nothing.
    """
    floor = 1e-3 * float(torch.sqrt(sum((r.double() ** 2).sum() for r in reference.values())))
    return max(float((grads[n] - r).norm()) / max(float(r.norm()), floor, 1e-300) for n, r in reference.items())


@contextlib.contextmanager
def exact_matmuls(device: torch.device) -> Iterator[None]:
    """Turn TF32 off on CUDA (cuDNN uses it for convolutions by default) for the gradient checks."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def time_interleaved(steps: list[Callable[[], None]], device: torch.device, warmup: int, repeats: int
                     ) -> list[list[float]]:
    """Milliseconds per call of each step, timed in rounds (one call of every step per round).

    Interleaving makes a slow period of a shared machine hit every row alike, instead of whichever
    row happened to be running; ``warmup`` untimed rounds come first.
    """
    times: list[list[float]] = [[] for _ in steps]
    for round_ in range(warmup + repeats):
        for i, step in enumerate(steps):
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            if round_ >= warmup:
                times[i].append(1e3 * (time.perf_counter() - start))
        if round_ >= warmup:
            _log(f"timing round {round_ - warmup + 1}/{repeats} done")
    return times


def finite_difference_check(p: Problem, reference: dict[str, Tensor], directions: int = 3) -> float:
    """max relative error of the per-task loop's directional derivatives vs central differences."""
    names, weights = zip(*p.model.named_parameters())
    g = torch.Generator().manual_seed(0)

    def meta_value() -> float:
        total = 0.0
        for i in range(p.tasks.meta_batch):
            fast = list(weights)
            for _ in range(p.inner_steps):
                loss = p.loss_fn(functional_call(p.model, dict(zip(names, fast)), (p.tasks.x_support[i],)),
                                 p.tasks.y_support[i])
                fast = [w - p.inner_lr * d for w, d in zip(fast, torch.autograd.grad(loss, fast), strict=True)]
            total += p.loss_fn(functional_call(p.model, dict(zip(names, fast)), (p.tasks.x_query[i],)),
                               p.tasks.y_query[i]).item()
        return total / p.tasks.meta_batch

    worst, eps = 0.0, 1e-7  # small: ReLU and max-pool kinks lie within 1e-5 of these random weights
    for _ in range(directions):
        v = [torch.randn(w.shape, generator=g, dtype=w.dtype).to(w.device) for w in weights]
        analytic = sum(float((reference[n] * d).sum()) for n, d in zip(names, v, strict=True))
        values = []
        for sign in (1, -1):
            with torch.no_grad():  # perturb the weights in place for the finite difference, then undo
                for w, d in zip(weights, v, strict=True):
                    w.add_(sign * eps * d)
            values.append(meta_value())
            with torch.no_grad():
                for w, d in zip(weights, v, strict=True):
                    w.sub_(sign * eps * d)
        numeric = (values[0] - values[1]) / (2 * eps)
        worst = max(worst, abs(analytic - numeric) / max(abs(numeric), 1e-12))
    return worst


# ----------------------------------------------------------------------------- problems
def conv_problem(a: argparse.Namespace, *, device: torch.device, dtype: torch.dtype, tiny: bool = False) -> Problem:
    meta_batch, hidden, size = (min(a.meta_batch, 3), min(a.hidden, 8), 16) if tiny else \
        (a.meta_batch, a.hidden, a.image_size)
    n_query = min(a.n_query, 2) if tiny else a.n_query
    g = torch.Generator().manual_seed(1 if tiny else 0)
    torch.manual_seed(1 if tiny else 0)  # the network's initial weights (nn.Module init draws from it)
    model = Conv4(1, a.n_way, hidden=hidden, norm=a.norm, image_size=size).to(device=device, dtype=dtype)

    def images(per_class: int) -> tuple[Tensor, Tensor]:
        x = torch.rand(meta_batch, a.n_way * per_class, 1, size, size, generator=g)   # (B, N·k, 1, H, W)
        y = torch.arange(a.n_way).repeat_interleave(per_class).expand(meta_batch, -1)  # (B, N·k)
        return x.to(device=device, dtype=dtype), y.to(device).contiguous()

    tasks = TaskBatch(*images(a.k_shot), *images(n_query))
    return Problem(model, tasks, F.cross_entropy, a.inner_lr, a.inner_steps)


def sine_problem(a: argparse.Namespace, *, device: torch.device, dtype: torch.dtype, tiny: bool = False) -> Problem:
    meta_batch, hidden = (min(a.meta_batch, 3), min(a.hidden, 8)) if tiny else (a.meta_batch, a.hidden)
    g = torch.Generator().manual_seed(1 if tiny else 0)
    torch.manual_seed(1 if tiny else 0)
    model = MLP(1, (hidden,) * a.layers, 1).to(device=device, dtype=dtype)
    tasks = SineTasks().sample(meta_batch, a.k_shot, a.n_query, generator=g, device=device, dtype=dtype)
    return Problem(model, tasks, F.mse_loss, a.inner_lr, a.inner_steps)


# ----------------------------------------------------------------------------- the run
def _methods(kind: str, a: argparse.Namespace, problem: Problem, device: torch.device
             ) -> list[tuple[str, Callable[[Problem, bool], Callable[[], None]] | None, bool, str]]:
    """(label, builder or None if unavailable, uses the nn.BatchNorm2d copy, note) in table order."""
    try:
        import higher  # noqa: F401
        has_higher, higher_note = True, ""
    except ImportError:
        has_higher, higher_note = False, "not installed (pip install higher==0.2.1)"
    rows: list[tuple[str, Callable | None, bool, str]] = [
        ("per-task autograd loop", per_task_loop_step, False, ""),
        ("higher 0.2.1 innerloop_ctx", higher_step if has_higher else None, False, higher_note)]
    several = problem.tasks.meta_batch > 1   # eager=None is per-task backward when there is more than one chunk
    for s in a.strategies:
        if s == "auto":
            how = resolve_strategy("auto", problem.model, device)
            rows.append((f"mlcore auto (-> {how}{', eager' if how == 'loop' and several else ''})",
                         mlcore_step("auto", None), False, ""))
        elif s == "loop":
            rows.append(("mlcore loop" + (", eager" if several else ""), mlcore_step("loop", None), False,
                         "per-task backward inside meta_loss" if several else ""))
            rows.append(("mlcore loop, whole graph", mlcore_step("loop", None, eager=False), False, "eager=False"))
        else:
            rows.append((f"mlcore {s}", mlcore_step(s, None), False, ""))
        if s == "vmap" and a.chunk_size:
            chunks = -(-problem.tasks.meta_batch // a.chunk_size)
            rows.append((f"mlcore vmap chunk={a.chunk_size}" + (", eager" if chunks > 1 else ""),
                         mlcore_step("vmap", a.chunk_size), False, ""))
    torch_bn = kind == "maml" and a.norm == "batch"
    rows.append(("torch.func.vmap recipe" + (", nn.BatchNorm2d" if torch_bn else ""), functorch_recipe_step,
                 torch_bn, "naive fast version" if torch_bn else "independent vmap implementation"))
    return rows


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """For the tiny float64 checks: at that size threads only add hand-offs (which, on a busy machine,
    cost more than the arithmetic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fresh(model: nn.Module, step: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        for w in model.parameters():
            w.grad = None
        step()
    return run


def _log(message: str) -> None:
    print(f"[mlcore.bench] {message}", file=sys.stderr, flush=True)


def run(kind: str, a: argparse.Namespace) -> dict:
    """Run the benchmark described by parsed arguments ``a``; print and return the report."""
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          "cpu" if a.device == "auto" else a.device)
    dtype = getattr(torch, a.dtype)
    slow = kind == "maml" and device.type == "cpu"   # ~3 s per second-order step on 2 cores
    repeats = a.repeats or (3 if slow else 20)
    warmup = a.warmup if a.warmup is not None else (0 if slow else 3)
    make = conv_problem if kind == "maml" else sine_problem
    problem = make(a, device=device, dtype=dtype)
    tiny = make(a, device=device, dtype=torch.float64, tiny=True)
    header = _header(kind, a, problem, tiny, device, dtype, repeats, warmup)
    for line in header["lines"]:
        _log(line)

    # Phase 1, row by row: gradient checks (float64 tiny, then this size) and peak memory of one step.
    floor = _fresh(problem.model, floor_step(problem, False))
    floor()  # the floor has no gradient to check; this call is its untimed first step
    with PeakMemory(device) as memory:
        floor()
    rows = [Row("floor: plain fwd+bwd, one batch", "-", peak_mb=memory.mb, verdict="-",
                note=f"{_n_examples(problem.tasks)} examples in one batch")]
    steps = [floor]
    bn_model, bn_tiny = with_torch_batchnorm(problem.model), with_torch_batchnorm(tiny.model)
    for first_order in ([False] if a.no_first_order else [False, True]):
        order = "1st" if first_order else "2nd"
        ref = ref64 = None
        for label, build, uses_bn, note in _methods(kind, a, problem, device):
            if build is None:
                rows.append(Row(label, order, note=note))
                continue
            _log(f"{order}-order {label}: gradient checks and peak memory")
            p = replace(problem, model=bn_model) if uses_bn else problem
            pt = replace(tiny, model=bn_tiny) if uses_bn else tiny
            try:
                with _one_thread():
                    g64 = meta_gradient(build, pt, first_order)
                # The check call is also the row's first (untimed) step; on the CPU it gives the peak
                # memory, on CUDA it runs with TF32 off, so one more step with default settings does.
                with exact_matmuls(device), PeakMemory(device) as memory:
                    g = meta_gradient(build, p, first_order)
                step = _fresh(p.model, build(p, first_order))
                if device.type == "cuda":
                    with PeakMemory(device) as memory:
                        step()
            except Exception as error:  # noqa: BLE001 - only the third-party row may fail; shown in the table
                if not label.startswith("higher"):
                    raise
                rows.append(Row(label, order, note=f"failed: {type(error).__name__}: {error}"[:120]))
                continue
            if ref is None:  # the per-task loop comes first: it is the reference
                ref, ref64 = g, g64
                if not first_order:
                    with _one_thread():
                        header["finite_difference_check"] = fd = finite_difference_check(tiny, ref64)
                    header["lines"].append(f"reference check: the per-task loop's 2nd-order meta-gradient vs "
                                           f"central differences (float64, tiny, 3 random directions, eps 1e-7): {fd:.1e}")
                    _log(header["lines"][-1])
            err64 = relative_error(g64, ref64)
            rows.append(Row(label, order, peak_mb=memory.mb, grad_err=relative_error(g, ref), grad_err_f64=err64,
                            verdict="reference" if g is ref else "exact" if err64 < EXACT_F64 else "WRONG",
                            note=note))
            steps.append(step)

    # Phase 2: timing, all rows interleaved round by round.
    _log(f"timing {len(steps)} rows: {warmup} warm-up + {repeats} timed rounds")
    timed = [r for r in rows if r.verdict]
    for row, times in zip(timed, time_interleaved(steps, device, warmup, repeats), strict=True):
        row.median_ms, row.min_ms, row.max_ms = statistics.median(times), min(times), max(times)
    floor_ms = rows[0].median_ms
    for row in timed:
        row.x_floor = row.median_ms / floor_ms
        loop = next((r for r in timed if r.order == row.order and r.verdict == "reference"), None)
        row.speedup_vs_loop = loop.median_ms / row.median_ms if loop else None

    report = {"benchmark": kind, "header": header, "rows": [asdict(r) for r in rows]}
    print(format_report(report), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
        _log(f"wrote {a.json}")
    return report


def _n_examples(tasks: TaskBatch) -> int:
    return tasks.meta_batch * (tasks.x_support.shape[1] + tasks.x_query.shape[1])


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA: {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    load = ", load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    return f"CPU: {model}, {torch.get_num_threads()} torch threads ({os.cpu_count()} logical CPUs{load})"


def _header(kind: str, a: argparse.Namespace, p: Problem, tiny: Problem, device: torch.device,
            dtype: torch.dtype, repeats: int, warmup: int) -> dict:
    t, tt = p.tasks, tiny.tasks
    n_params = sum(w.numel() for w in p.model.parameters())
    if kind == "maml":
        data = (f"SYNTHETIC data: random images U[0,1) of 1x{a.image_size}x{a.image_size} (Omniglot size), "
                f"labels 0..{a.n_way - 1}: timing only, nothing learns")
        task = f"{a.n_way}-way {a.k_shot}-shot, {a.n_query} query/class"
        model = f"Conv4(hidden={a.hidden}, norm={a.norm!r}), {n_params:,} parameters"
        tiny_desc = f"meta_batch={tt.meta_batch}, hidden={min(a.hidden, 8)}, 16x16 images, {tt.x_query.shape[1]} query"
    else:
        data = "sine regression tasks (Finn et al. 2017), x ~ U[-5, 5]"
        task = f"{a.k_shot} support, {a.n_query} query points"
        model = f"MLP(1, {(a.hidden,) * a.layers}, 1), {n_params:,} parameters"
        tiny_desc = f"meta_batch={tt.meta_batch}, hidden={min(a.hidden, 8)}"
    memory = ("of one step: torch.cuda.max_memory_allocated above the allocation before it" if device.type == "cuda" else
              "of one step: peak resident set size (VmHWM of /proc/self/status, reset via /proc/self/clear_refs "
              "after malloc_trim) above the RSS before it: tensors plus allocator slack")
    lines = [
        f"mlcore.bench {kind}: one meta-gradient step (forward + backward, no optimiser step), side by side",
        f"device: {describe_device(device)} | torch {torch.__version__} | {str(dtype).removeprefix('torch.')}"
        + (f" | TF32 conv={torch.backends.cudnn.allow_tf32} matmul={torch.backends.cuda.matmul.allow_tf32}"
           if device.type == "cuda" else ""),
        data,
        f"tasks: meta_batch={t.meta_batch}, {task} -> {_n_examples(t)} examples per step; "
        f"inner_steps={p.inner_steps}, inner_lr={p.inner_lr}",
        f"model: {model}",
        f"time: median (min-max) of {repeats} timed steps per row, rows interleaved round by round, after the "
        f"untimed gradient-check step and {warmup} warm-up round(s)"
        + ("; torch.cuda.synchronize around each step" if device.type == "cuda" else ""),
        f"memory: {memory}",
        "columns: 'x floor' = median / the floor's median; 'vs loop' = the per-task loop's median / this median "
        "(> 1: faster than the per-task loop of the same order)",
        f"grad err: max over parameter tensors n of |g_n - r_n| / max(|r_n|, 1e-3 |r|) (2-norms; the floor is for "
        f"gradients that are exactly zero, e.g. conv biases before batch norm) against the per-task loop r of "
        f"the same order; at this size in {str(dtype).removeprefix('torch.')}"
        + (" with TF32 off" if device.type == "cuda" else "") + f", and 'f64 tiny' in float64 on {tiny_desc}; "
        f"verdict: exact if f64 err < {EXACT_F64:g}",
    ]
    return {"lines": lines, "device": describe_device(device), "torch": torch.__version__,
            "dtype": str(dtype), "repeats": repeats, "warmup": warmup, "args": vars(a)}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_report(report: dict) -> str:
    head = ("method", "order", "median ms", "(min-max)", "peak MB", "x floor", "vs loop", "grad err",
            "f64 tiny", "verdict")
    table = []
    for r in report["rows"]:
        spread = f"({_fmt(r['min_ms'], '.0f')}-{_fmt(r['max_ms'], '.0f')})" if r["min_ms"] is not None else ""
        if r["median_ms"] is not None and r["median_ms"] < 100:
            spread = f"({r['min_ms']:.2f}-{r['max_ms']:.2f})"
        table.append((r["method"], r["order"], _fmt(r["median_ms"], ".2f" if (r["median_ms"] or 0) < 100 else ".0f"),
                      spread, _fmt(r["peak_mb"], ".0f"), _fmt(r["x_floor"], ".1f"),
                      _fmt(r["speedup_vs_loop"], ".2f"), _fmt(r["grad_err"], ".1e"), _fmt(r["grad_err_f64"], ".1e"),
                      r["verdict"] + (f"  {r['note']}" if r["note"] else "")))
    widths = [max(len(row[i]) for row in [head, *table]) for i in range(len(head) - 1)]

    def line(cells: tuple[str, ...]) -> str:
        parts = [cells[0].ljust(widths[0]), cells[1].ljust(widths[1])]
        parts += [c.rjust(w) for c, w in zip(cells[2:-1], widths[2:], strict=True)]
        return "  ".join(parts + [cells[-1]]).rstrip()

    rule = "-" * len(line(head))
    lines = [*report["header"]["lines"], rule, line(head), rule]
    for i, row in enumerate(table):
        if i > 0 and row[1] != table[i - 1][1]:
            lines.append("")
        lines.append(line(row))
    return "\n".join([*lines, rule])


# ----------------------------------------------------------------------------- command line
def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mlcore.bench", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name, help_, defaults in (
            ("maml", "Conv4 on Omniglot-size images (random data)",
             dict(meta_batch=32, k_shot=1, n_query=15, hidden=64, inner_lr=0.4)),
            ("sine", "the sine-regression MLP of Finn et al. 2017",
             dict(meta_batch=25, k_shot=10, n_query=10, hidden=40, inner_lr=0.01))):
        p = sub.add_parser(name, help=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        p.add_argument("--threads", type=_positive, default=None,
                       help="torch.set_num_threads for this run (default: torch's choice)")
        p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
        p.add_argument("--meta-batch", type=_positive, default=defaults["meta_batch"])
        p.add_argument("--k-shot", type=_positive, default=defaults["k_shot"],
                       help="support examples per class" if name == "maml" else "support points per task")
        p.add_argument("--n-query", type=_positive, default=defaults["n_query"],
                       help="query examples per class" if name == "maml" else "query points per task")
        p.add_argument("--inner-steps", type=_positive, default=1)
        p.add_argument("--inner-lr", type=float, default=defaults["inner_lr"])
        p.add_argument("--hidden", type=_positive, default=defaults["hidden"],
                       help="channels of every conv layer" if name == "maml" else "width of every hidden layer")
        if name == "maml":
            p.add_argument("--n-way", type=_positive, default=5)
            p.add_argument("--image-size", type=_positive, default=28)
            p.add_argument("--norm", choices=NORMS, default="batch")
        else:
            p.add_argument("--layers", type=_positive, default=2, help="hidden layers")
        p.add_argument("--repeats", type=_positive, default=None,
                       help="timed steps per row (default: maml 3 on CPU, 20 on CUDA; sine 30)")
        p.add_argument("--warmup", type=_non_negative, default=None,
                       help="untimed warm-up rounds (default: maml 0 on CPU, 3 otherwise)")
        p.add_argument("--strategies", default="loop,vmap,auto", help="comma-separated mlcore strategies")
        p.add_argument("--chunk-size", type=_positive, default=None, help="add an 'mlcore vmap chunk=N' row")
        p.add_argument("--no-first-order", action="store_true", help="time second-order MAML only")
        p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (default: sys.argv[1:]), run the benchmark, print the table; return the report."""
    parser = build_parser()
    a = parser.parse_args(argv)
    a.strategies = [s.strip() for s in a.strategies.split(",") if s.strip()]
    bad = sorted(set(a.strategies) - {"loop", "vmap", "auto"})
    if bad or not a.strategies:
        parser.error(f"--strategies takes a comma-separated subset of loop,vmap,auto; got {bad or 'nothing'}")
    if a.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False on this machine")
    if a.chunk_size and "vmap" not in a.strategies:
        parser.error("--chunk-size adds a chunked vmap row; it needs 'vmap' in --strategies")
    if not (math.isfinite(a.inner_lr) and a.inner_lr > 0):
        parser.error(f"--inner-lr must be a positive number, got {a.inner_lr}")
    if a.benchmark == "maml" and a.image_size < 16:
        parser.error(f"--image-size {a.image_size} is too small for Conv4's four 2x2 poolings (need >= 16)")
    if a.json:  # check the output before minutes of work, not after
        target = Path(a.json).expanduser()
        if target.is_dir() or not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
            parser.error(f"--json {a.json}: cannot write there (a folder, or a missing or read-only parent "
                         f"folder); give a writable file path")
        a.json = str(target)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    return run(a.benchmark, a)


if __name__ == "__main__":
    main()
