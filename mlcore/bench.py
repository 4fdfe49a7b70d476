"""Side-by-side benchmark of one meta-gradient step: ``python -m mlcore.bench maml|sine [options]``
(``python -m mlcore.bench complexity``, every method's cost against S and |θ|, is
:mod:`mlcore.bench_complexity`).

One run times one MAML meta-gradient step (forward and backward, no optimiser step; Finn et al. 2017, eq. 2)

    ∇_θ (1/B) Σ_i L(θ'_i; D^ts_i),        θ'_i = θ − α ∇_θ L(θ; D^tr_i)        (S inner steps in general)

of several implementations on the same random inputs and initial weights, at second and first order, and
checks each meta-gradient against a per-task autograd loop, itself checked against finite differences:

=================================  =====================================================================
floor                              plain supervised forward + backward of the same network over the same
                                   examples (meta_batch × (support + query)) in ONE batch
per-task autograd loop             what a common implementation does: per task, ``autograd.grad``
                                   (``create_graph``) and manual SGD on the module's parameters, a
                                   functional forward on the query, ``backward``. The reference.
higher 0.2.1 innerloop_ctx         ``higher.innerloop_ctx`` per task (optional; its row says if missing)
mlcore <s>, meta_backward          :func:`mlcore.maml.meta_backward`, strategy ``s``: one backward per task
                                   (``vmap chunk=N``: per N tasks), each graph freed before the next
mlcore <s>, whole graph            ``meta_loss(...).backward()``: every task's graph kept until then
mlcore auto (-> s), meta_backward  the default, what ``maml.train_step`` runs (``s``: what auto chose)
mlcore compiled, meta_backward     ``meta_backward(..., compile=True)`` (:mod:`mlcore.compiled`): the
                                   compiled meta-gradient of the vmapped meta-loss (``--strategies
                                   …,compiled``; ``--compile-modes`` adds a row per torch.compile mode);
                                   its first call (the compile) is reported apart from the median
torch.func.vmap recipe             the functorch MAML recipe (``vmap`` over ``grad``), written here; for
                                   ``Conv4(norm="batch")`` through ``nn.BatchNorm2d``, the naive fast
                                   version, whose second-order meta-gradient is wrong (see chapter 3)
=================================  =====================================================================

The inputs are random (timing only: nothing learns). A script (STYLE principle 11), not a timed test;
``tests/test_bench.py`` runs it at toy size to check its rows and its gradient checks. Its options are
:func:`mlcore.cli.bench_main`'s; the timing harness is :func:`mlcore.timing.measure`; the implementations
mlcore is compared with are in :mod:`mlcore.baselines`.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .baselines import (Build, Problem, Step, floor_step, functorch_recipe_step, higher_step, reference_meta_loss,
                        reference_step, with_torch_batchnorm)
from .compiled import MODES
from .inner import resolve_strategy
from .maml import meta_backward, meta_loss
from .models import MLP, NORMS, Conv4
from .tasks import SineTasks, TaskBatch
from .timing import (describe_device, describe_measure, exact_matmuls, format_table, measure, num_threads,
                     synchronize)

__all__ = ["BenchConfig", "Method", "Problem", "Row", "finite_difference_check", "main", "methods", "relative_error",
           "run"]

EXACT_F64 = 1e-8  # float64 relative error below which a meta-gradient counts as exact
DEFAULTS = {  # Finn et al. 2017's 5-way 1-shot Omniglot and sine-regression settings
    "maml": {"meta_batch": 32, "k_shot": 1, "n_query": 15, "hidden": 64, "inner_lr": 0.4},
    "sine": {"meta_batch": 25, "k_shot": 10, "n_query": 10, "hidden": 40, "inner_lr": 0.01}}
STRATEGIES = ("loop", "vmap", "auto", "compiled")
DEFAULT_STRATEGIES = ("loop", "vmap", "auto")   # "compiled" costs minutes of compiling on a CPU: asked for


@dataclass(frozen=True)
class BenchConfig:
    """What to measure; ``python -m mlcore.bench`` builds it from its options (``--meta-batch`` → meta_batch)."""

    benchmark: str             # "maml": Conv4 on Omniglot-size random images; "sine": the MLP of Finn et al.
    meta_batch: int
    k_shot: int                # support examples per class (maml) or points per task (sine)
    n_query: int               # query examples per class (maml) or points per task (sine)
    hidden: int                # channels of every conv layer (maml) or width of every hidden layer (sine)
    inner_lr: float
    inner_steps: int = 1
    n_way: int = 5             # maml only
    image_size: int = 28       # maml only
    norm: str = "batch"        # maml only
    layers: int = 2            # sine only: hidden layers
    device: str = "auto"
    dtype: str = "float32"
    threads: int | None = None     # torch threads during the run (None: torch's choice)
    repeats: int | None = None     # timed steps per row (None: maml on a CPU 3, otherwise 20)
    warmup: int | None = None      # untimed rounds before them (None: maml on a CPU 0, otherwise 3)
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    compile_modes: tuple[str, ...] = ("default",)   # one "mlcore compiled" row per mode
    chunk_size: int | None = None  # adds a "vmap chunk=N, meta_backward" row
    no_first_order: bool = False
    json: str | None = None        # also write the report there

    def __post_init__(self) -> None:
        for name, allowed in (("benchmark", tuple(DEFAULTS)), ("device", ("auto", "cpu", "cuda")),
                              ("dtype", ("float32", "float64")), ("norm", NORMS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        bad = sorted(set(self.strategies) - set(STRATEGIES))
        if bad or not self.strategies:
            raise ValueError(f"--strategies takes a comma-separated subset of {','.join(STRATEGIES)}; got "
                             f"{bad or 'nothing'}")
        bad = sorted(set(self.compile_modes) - set(MODES))
        if bad or not self.compile_modes:
            raise ValueError(f"--compile-modes takes a comma-separated subset of {','.join(MODES)}; got "
                             f"{bad or 'nothing'}")
        if self.compile_modes != ("default",) and "compiled" not in self.strategies:
            raise ValueError("--compile-modes sets the modes of the 'compiled' rows; it needs 'compiled' in "
                             "--strategies")
        if self.chunk_size and "vmap" not in self.strategies:
            raise ValueError("--chunk-size adds a chunked vmap row; it needs 'vmap' in --strategies")
        if not (math.isfinite(self.inner_lr) and self.inner_lr > 0):
            raise ValueError(f"--inner-lr must be a positive number, got {self.inner_lr}")
        if self.benchmark == "maml" and self.image_size < 16:
            raise ValueError(f"--image-size {self.image_size} is too small for Conv4's four 2x2 poolings (need >= 16)")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch.cuda.is_available() is False on this machine")
        target = Path(self.json) if self.json else None  # checked before minutes of work, not after
        if target and (target.is_dir() or not target.parent.is_dir() or not os.access(target.parent, os.W_OK)):
            raise ValueError(f"--json {self.json}: cannot write there (a folder, or a missing or read-only parent "
                             f"folder); give a writable file path")

    def tiny(self) -> BenchConfig:
        """The float64 exactness checks' instance: ≤ 3 tasks, ≤ 8 channels or units (maml: 16x16, ≤ 2 queries)."""
        smaller = {"image_size": 16, "n_query": min(self.n_query, 2)} if self.benchmark == "maml" else {}
        return replace(self, meta_batch=min(self.meta_batch, 3), hidden=min(self.hidden, 8), **smaller)


# ----------------------------------------------------------------------------- the problem and the rows
def make_problem(c: BenchConfig, device: torch.device, dtype: torch.dtype, seed: int) -> Problem:
    """The network and random tasks of ``c``; ``seed`` draws both (the weights from torch's global generator,
    which ``nn.Module`` initialisers use, the data from its own)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if c.benchmark == "sine":
        model = MLP(1, (c.hidden,) * c.layers, 1).to(device=device, dtype=dtype)
        tasks = SineTasks().sample(c.meta_batch, c.k_shot, c.n_query, generator=g, device=device, dtype=dtype)
        return Problem(model, tasks, F.mse_loss, c.inner_lr, c.inner_steps)
    model = Conv4(1, c.n_way, hidden=c.hidden, norm=c.norm, image_size=c.image_size).to(device=device, dtype=dtype)

    def images(per_class: int) -> tuple[Tensor, Tensor]:
        x = torch.rand(c.meta_batch, c.n_way * per_class, 1, c.image_size, c.image_size, generator=g)  # (B, N·k, 1, H, W)
        y = torch.arange(c.n_way).repeat_interleave(per_class).expand(c.meta_batch, -1)                 # (B, N·k)
        return x.to(device=device, dtype=dtype), y.to(device).contiguous()

    tasks = TaskBatch(*images(c.k_shot), *images(c.n_query))
    return Problem(model, tasks, F.cross_entropy, c.inner_lr, c.inner_steps)


def mlcore_step(strategy: str, *, whole_graph: bool, chunk_size: int | None = None,
                compile: str | None = None) -> Build:
    """``meta_loss(...).backward()`` (``whole_graph``) or ``meta_backward(...)``, with ``strategy``
    (and ``compile``, a torch.compile mode, for ``meta_backward``)."""
    def build(p: Problem, first_order: bool) -> Step:
        args = (p.model, dict(p.model.named_parameters()), p.tasks)
        kwargs = {"loss_fn": p.loss_fn, "inner_lr": p.inner_lr, "inner_steps": p.inner_steps,
                  "first_order": first_order, "strategy": strategy, "chunk_size": chunk_size}
        if whole_graph:
            return lambda: meta_loss(*args, **kwargs).backward()
        return lambda: meta_backward(*args, **kwargs, compile=compile or False)
    return build


@dataclass(frozen=True)
class Method:
    """One implementation, a row of the table per order."""

    name: str
    build: Build
    optional: bool = False         # needs a package mlcore does not depend on: if it fails, its row says why
    torch_batchnorm: bool = False  # runs on the with_torch_batchnorm copy of the model
    note: str = ""
    compiled: bool = False         # its first call compiles: timed and reported apart from the median


def methods(c: BenchConfig, model: nn.Module, device: torch.device) -> list[Method]:
    """The rows of one order, in table order; the first (the per-task loop) is the reference."""
    rows = [Method("per-task autograd loop", reference_step),
            Method("higher 0.2.1 innerloop_ctx", higher_step, optional=True, note="pip install higher==0.2.1")]
    for s in c.strategies:  # in the order given
        if s == "loop":
            rows += [Method("mlcore loop, meta_backward", mlcore_step(s, whole_graph=False),
                            note="one task's graph at a time"),
                     Method("mlcore loop, whole graph", mlcore_step(s, whole_graph=True),
                            note="meta_loss(...).backward()")]
        elif s == "vmap":
            rows.append(Method("mlcore vmap, whole graph", mlcore_step(s, whole_graph=True),
                               note="one vmap over all tasks"))
            if c.chunk_size:
                rows.append(Method(f"mlcore vmap chunk={c.chunk_size}, meta_backward",
                                   mlcore_step(s, whole_graph=False, chunk_size=c.chunk_size)))
        elif s == "auto":
            rows.append(Method(f"mlcore auto (-> {resolve_strategy(s, model, device)}), meta_backward",
                               mlcore_step(s, whole_graph=False), note="what train_step runs"))
        else:
            rows += [Method("mlcore compiled" + (f" {mode}" if mode != "default" else "") + ", meta_backward",
                            mlcore_step("auto", whole_graph=False, compile=mode), compiled=True,
                            note="compile=" + ("True" if mode == "default" else repr(mode)))
                     for mode in c.compile_modes]
    bn = c.benchmark == "maml" and c.norm == "batch"
    rows.append(Method("torch.func.vmap recipe" + (", nn.BatchNorm2d" if bn else ""), functorch_recipe_step,
                       torch_batchnorm=bn, note="naive fast version" if bn else "independent vmap implementation"))
    return rows


# ----------------------------------------------------------------------------- checking
def fresh(model: nn.Module, step: Step) -> Step:
    """``step`` from gradients set to None, as after ``optimizer.zero_grad()``."""
    return lambda: (model.zero_grad(set_to_none=True), step())


def meta_gradient(step: Step, model: nn.Module) -> dict[str, Tensor]:
    """Run ``fresh(model, step)``; return {name: gradient} (zeros where none arrived)."""
    fresh(model, step)()
    return {n: (w.grad.detach().clone() if w.grad is not None else torch.zeros_like(w))
            for n, w in model.named_parameters()}


def relative_error(grads: dict[str, Tensor], reference: dict[str, Tensor]) -> float:
    """max over parameter tensors n of ||g_n − r_n||₂ / max(||r_n||₂, 1e-3 · ||r||₂).

    The floor matters for tensors whose exact gradient is zero, such as conv biases followed by
    batch norm (the norm subtracts them out): their computed gradient is rounding noise, and noise
    divided by noise would say nothing.
    """
    floor = 1e-3 * float(torch.sqrt(sum((r.double() ** 2).sum() for r in reference.values())))
    return max(float((grads[n] - r).norm()) / max(float(r.norm()), floor, 1e-300) for n, r in reference.items())


def finite_difference_check(p: Problem, reference: dict[str, Tensor], directions: int = 3) -> float:
    """max relative error of ⟨reference, v⟩ against the central difference (f(θ + εv) − f(θ − εv)) / 2ε
    of the second-order meta-loss f, over random directions v (use float64)."""
    params, g = dict(p.model.named_parameters()), torch.Generator().manual_seed(0)
    worst, eps = 0.0, 1e-7  # small: ReLU and max-pool kinks lie within 1e-5 of these random weights
    for _ in range(directions):
        v = {n: torch.randn(w.shape, generator=g, dtype=w.dtype).to(w.device) for n, w in params.items()}
        analytic = sum(float((reference[n] * d).sum()) for n, d in v.items())
        f = [reference_meta_loss(p, first_order=False, backward=False,
                                 params={n: w + sign * eps * v[n] for n, w in params.items()}).item()
             for sign in (1, -1)]
        numeric = (f[0] - f[1]) / (2 * eps)
        worst = max(worst, abs(analytic - numeric) / max(abs(numeric), 1e-12))
    return worst


# ----------------------------------------------------------------------------- the run
@dataclass
class Row:
    method: str
    order: str                         # "2nd", "1st" or "-" (the floor)
    median_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    peak_mb: float | None = None
    x_floor: float | None = None
    speedup_vs_loop: float | None = None
    grad_err: float | None = None      # at the benchmarked size and dtype, vs the per-task loop
    grad_err_f64: float | None = None  # float64 tiny instance, vs the per-task loop
    first_call_s: float | None = None  # compiled rows: the first call at this size (compiling), untimed otherwise
    verdict: str = ""                  # "reference", "exact", "WRONG"; "" for a row that did not run
    note: str = ""


def run(c: BenchConfig) -> dict:
    """Check every row's meta-gradient, then time all rows interleaved; print and return the report."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if c.device == "auto" else c.device)
    slow = c.benchmark == "maml" and device.type == "cpu"   # seconds per second-order step
    repeats, warmup = c.repeats or (3 if slow else 20), c.warmup if c.warmup is not None else (0 if slow else 3)
    with num_threads(c.threads):
        problem = make_problem(c, device, getattr(torch, c.dtype), seed=0)
        tiny = make_problem(c.tiny(), device, torch.float64, seed=1)
        header = describe(c, problem, device, repeats, warmup)
        for line in header["lines"]:
            _log(line)
        bn = tuple(replace(q, model=with_torch_batchnorm(q.model)) for q in (problem, tiny))

        # Phase 1, row by row: the gradient checks (float64 tiny, then this size); the second is also
        # the row's first, untimed, step. The floor has no gradient to check: one untimed call stands in.
        steps = [fresh(problem.model, floor_step(problem, False))]
        steps[0]()
        rows = [Row("floor: plain fwd+bwd, one batch", "-", verdict="-",
                    note=f"{_n_examples(problem.tasks)} examples in one batch")]
        references = {}  # order -> (gradient at this size, float64 tiny gradient) of the per-task loop
        for first_order in [False] if c.no_first_order else [False, True]:
            order = "1st" if first_order else "2nd"
            for m in methods(c, problem.model, device):
                p, pt = bn if m.torch_batchnorm else (problem, tiny)
                _log(f"{order}-order {m.name}: gradient checks")
                try:
                    with num_threads(1):  # at the toy size more threads only add hand-offs
                        g64 = meta_gradient(m.build(pt, first_order), pt.model)
                    step = m.build(p, first_order)
                    started = time.perf_counter()
                    with exact_matmuls(device):
                        g = meta_gradient(step, p.model)
                        synchronize(device)
                    first_call = time.perf_counter() - started
                except Exception as error:
                    if not m.optional:
                        raise
                    why = f"not installed: {m.note}" if isinstance(error, ImportError) else \
                        f"failed: {type(error).__name__}: {error}"[:120]
                    rows.append(Row(m.name, order, note=why))  # no verdict: not timed
                    continue
                ref, ref64 = references.setdefault(order, (g, g64))  # the first row, the per-task loop
                err64 = relative_error(g64, ref64)
                verdict = "reference" if g is ref else "exact" if err64 < EXACT_F64 else "WRONG"
                note = f"{m.note}; first call {first_call:.1f} s (compiling), not in the median" if m.compiled \
                    else m.note
                rows.append(Row(m.name, order, grad_err=relative_error(g, ref), grad_err_f64=err64, verdict=verdict,
                                note=note, first_call_s=first_call if m.compiled else None))
                steps.append(fresh(p.model, step))
        with num_threads(1):
            header["finite_difference_check"] = fd = finite_difference_check(tiny, references["2nd"][1])
        header["lines"].append(f"reference check: the per-task loop's 2nd-order meta-gradient vs central "
                               f"differences (float64, tiny, 3 random directions, eps 1e-7): {fd:.1e}")
        _log(header["lines"][-1])

        # Phase 2: peak memory of one step per row, then the timing, all rows interleaved round by round.
        _log(f"timing {len(steps)} rows: {warmup} warm-up + {repeats} timed rounds")
        measured = [r for r in rows if r.verdict]
        for row, t in zip(measured, measure(steps, device, repeats=repeats, warmup=warmup, log=_log), strict=True):
            row.median_ms, row.min_ms, row.max_ms, row.peak_mb = t
    for row in measured:
        row.x_floor = row.median_ms / rows[0].median_ms
        loop = next((r for r in measured if r.order == row.order and r.verdict == "reference"), None)
        row.speedup_vs_loop = loop.median_ms / row.median_ms if loop else None

    report = {"benchmark": c.benchmark, "header": header, "rows": [asdict(r) for r in rows]}
    print(format_report(report), flush=True)
    if c.json:
        Path(c.json).write_text(json.dumps(report, indent=2))
        _log(f"wrote {c.json}")
    return report


def main(argv: list[str] | None = None) -> dict:
    """``python -m mlcore.bench ARGV`` in this process (:func:`mlcore.cli.bench_config`); returns the report.
    ``complexity`` runs :func:`mlcore.bench_complexity.run`."""
    from . import bench_complexity
    from .cli import bench_config
    config = bench_config(argv)
    return bench_complexity.run(config) if isinstance(config, bench_complexity.ComplexityConfig) else run(config)


# ----------------------------------------------------------------------------- the report
def _n_examples(tasks: TaskBatch) -> int:
    return tasks.meta_batch * (tasks.x_support.shape[1] + tasks.x_query.shape[1])


def describe(c: BenchConfig, p: Problem, device: torch.device, repeats: int, warmup: int) -> dict:
    """The report's header: what was measured, where and how, one line per item."""
    t, tiny, cuda, maml = p.tasks, c.tiny(), device.type == "cuda", c.benchmark == "maml"
    data = (f"SYNTHETIC data: random images U[0,1) of 1x{c.image_size}x{c.image_size} (Omniglot size), labels "
            f"0..{c.n_way - 1}: timing only, nothing learns" if maml else
            "sine regression tasks (Finn et al. 2017), x ~ U[-5, 5]")
    task = f"{c.n_way}-way {c.k_shot}-shot, {c.n_query} query/class" if maml else \
        f"{c.k_shot} support, {c.n_query} query points"
    model = f"Conv4(hidden={c.hidden}, norm={c.norm!r})" if maml else f"MLP(1, {(c.hidden,) * c.layers}, 1)"
    tiny_desc = f"meta_batch={tiny.meta_batch}, hidden={tiny.hidden}" + (
        f", 16x16 images, {tiny.n_query} query" if maml else "")
    tf32 = f" | TF32 conv={torch.backends.cudnn.allow_tf32} matmul={torch.backends.cuda.matmul.allow_tf32}"
    lines = [
        f"mlcore.bench {c.benchmark}: one meta-gradient step (forward + backward, no optimiser step), side by side",
        f"device: {describe_device(device)} | torch {torch.__version__} | {c.dtype}{tf32 if cuda else ''}",
        data,
        (f"tasks: meta_batch={t.meta_batch}, {task} -> {_n_examples(t)} examples per step; "
         f"inner_steps={p.inner_steps}, inner_lr={p.inner_lr}"),
        f"model: {model}, {sum(w.numel() for w in p.model.parameters()):,} parameters",
        *describe_measure(device, repeats, warmup, before="the untimed gradient-check step, "),
        ("columns: 'x floor' = median / the floor's median; 'vs loop' = the per-task loop's median / this median "
         "(> 1: faster than the per-task loop of the same order)"),
        (f"grad err: max over parameter tensors n of |g_n - r_n| / max(|r_n|, 1e-3 |r|) (2-norms; the floor is for "
         f"gradients that are exactly zero, e.g. conv biases before batch norm) against the per-task loop r of "
         f"the same order; at this size in {c.dtype}{' with TF32 off' if cuda else ''}, and 'f64 tiny' in "
         f"float64 on {tiny_desc}; verdict: exact if f64 err < {EXACT_F64:g}"),
    ]
    return {"lines": lines, "device": describe_device(device), "torch": torch.__version__,
            "dtype": str(getattr(torch, c.dtype)), "repeats": repeats, "warmup": warmup, "args": asdict(c)}


def format_report(report: dict) -> str:
    """The header's lines, then one table row per method and order (a blank line between the orders)."""
    def cell(value: float | None, spec: str) -> str:
        return "-" if value is None or math.isnan(value) else format(value, spec)

    table = []
    for r in report["rows"]:
        ms = ".2f" if (r["median_ms"] or 0) < 100 else ".0f"
        spread = f"({cell(r['min_ms'], ms)}-{cell(r['max_ms'], ms)})" if r["min_ms"] is not None else ""
        table.append((r["method"], r["order"], cell(r["median_ms"], ms), spread, cell(r["peak_mb"], ".0f"),
                      cell(r["x_floor"], ".1f"), cell(r["speedup_vs_loop"], ".2f"), cell(r["grad_err"], ".1e"),
                      cell(r["grad_err_f64"], ".1e"), r["verdict"] + (f"  {r['note']}" if r["note"] else "")))
    head = ("method", "order", "median ms", "(min-max)", "peak MB", "x floor", "vs loop", "grad err", "f64 tiny",
            "verdict")
    return "\n".join([*report["header"]["lines"], format_table(head, table, left=2, group=1)])


def _log(message: str) -> None:
    print(f"[mlcore.bench] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":  # python -m mlcore.bench maml|sine …  (see mlcore.cli)
    from mlcore.cli import bench_main
    sys.exit(bench_main())
