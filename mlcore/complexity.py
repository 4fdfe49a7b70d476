"""What a meta-gradient costs, measured: FLOPs, peak tensor memory and time per step, as tidy records.

The claim to check (the book's complexity chapter): MAML's second-order meta-gradient needs
Hessian-vector products, never the Hessian (Finn et al. 2017, §2.2; Pearlmutter 1994), and a
Hessian-vector product costs a small constant times a gradient. So for B tasks and S inner steps

==========  ======================  ==========================================================
method      time                    memory (beyond θ and the data)
==========  ======================  ==========================================================
gradient    O(|θ|)  one fwd+bwd     O(activations of one forward)
FOMAML      O(B · S · |θ|)          O(activations of one forward): the inner gradients are
                                    detached, so each step's graph is freed once it is used
MAML        O(B · S · |θ|)          O(S · activations): the unrolled S-step graph is kept for
                                    the backward pass through it
==========  ======================  ==========================================================

linear in |θ| (at a fixed architecture, activations and FLOPs grow with the parameters), not
O(|θ|²) as is sometimes claimed. A :class:`~mlcore.workloads.Workload` names one step;
:func:`measure` returns one :class:`Record` per workload:

- ``flops``: :class:`torch.utils.flop_counter.FlopCounterMode` over one step (matrix products and
  convolutions, forward and backward; the same number on every machine);
- ``peak_mb``: :class:`LiveTensorBytes`, the peak of the bytes of tensors created during the step and
  alive at the same moment (each storage once). Deterministic: what an allocator without slack, caching
  or fragmentation would need above what existed before the step. It sees inside
  ``torch.utils.checkpoint`` and ``torch.func.vmap``, where ``saved_tensors_hooks`` cannot go;
- ``time_ms`` and ``rss_mb``: :func:`mlcore.timing.measure` (warm-up, median of interleaved repeats,
  the peak resident set size on a CPU or the CUDA allocator's peak), only with ``time=True``.

:func:`grid` builds workloads over the product of axes; :func:`loglog_fit` and :func:`linear_fit` fit
the curves; :func:`hvp_cost` measures a Hessian-vector product against a gradient.
"""
from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from .timing import measure as time_steps
from .workloads import Workload, build, make_tasks

__all__ = ["LiveTensorBytes", "Record", "count", "grid", "hvp_cost", "linear_fit", "loglog_fit", "measure"]


class LiveTensorBytes(TorchDispatchMode):
    """Inside ``with``: ``.peak`` (and ``.now``) bytes of the tensors created by operations in the block
    that are alive at the same time, each storage counted once, freed when its last tensor dies."""

    def __init__(self) -> None:
        super().__init__()
        self.now = self.peak = 0
        self._live: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                storage = t.untyped_storage()   # one Python object per storage, kept while it lives
                key = id(storage)
                if key not in self._live:
                    n = storage.nbytes()
                    self._live[key] = weakref.ref(storage, _on_free(self, key, n))
                    self.now += n
                    self.peak = max(self.peak, self.now)
        return out


def _on_free(mode: LiveTensorBytes, key: int, n: int) -> Callable[[object], None]:
    def free(_: object) -> None:
        mode._live.pop(key, None)
        mode.now -= n
    return free


def count(step: Callable[[], object]) -> tuple[int, int]:
    """(FLOPs, peak live tensor bytes) of one call of ``step``."""
    with FlopCounterMode(display=False) as flops, LiveTensorBytes() as memory:
        step()
    return flops.get_total_flops(), memory.peak


@dataclass(frozen=True)
class Record:
    """One measured workload: its sizes, |θ|, FLOPs, peak tensor MB, and time (``None`` if not timed)."""

    workload: Workload
    n_params: int
    flops: int
    peak_mb: float
    time_ms: float | None = None
    rss_mb: float | None = None

    @property
    def gflop(self) -> float:
        return self.flops / 1e9

    def row(self) -> dict[str, object]:
        """A flat dict: the workload's fields, then the measurements (one row of a tidy table)."""
        return {**asdict(self.workload), "label": self.workload.label, "n_params": self.n_params,
                "gflop": self.gflop, "peak_mb": self.peak_mb, "time_ms": self.time_ms, "rss_mb": self.rss_mb}


def measure(workloads: Iterable[Workload], *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
            time: bool = True, repeats: int = 3, warmup: int = 1, seed: int = 0,
            log: Callable[[str], None] | None = None) -> list[Record]:
    """Count every workload (FLOPs, peak tensor memory), then, with ``time``, time all of them
    interleaved round by round (:func:`mlcore.timing.measure`)."""
    workloads = list(workloads)
    steps, counted = [], []
    for w in workloads:
        step, model = build(w, device=device, dtype=dtype, seed=seed)
        counted.append((sum(p.numel() for p in model.parameters()), *count(step)))
        steps.append(step)
    timed = time_steps(steps, device, repeats=repeats, warmup=warmup, log=log) if time else [None] * len(steps)
    return [Record(w, n, flops, peak / 2**20, t and t.median_ms, t and t.peak_mb)
            for w, (n, flops, peak), t in zip(workloads, counted, timed, strict=True)]


def grid(base: Workload | None = None, **axes: Sequence[object]) -> list[Workload]:
    """``base`` (default ``Workload()``) with every combination of the values in ``axes`` (field name → values), in order."""
    names, base = list(axes), base or Workload()
    return [replace(base, **dict(zip(names, values, strict=True))) for values in itertools.product(*axes.values())]


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


def loglog_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """The exponent p of y ≈ c · x^p: the slope of log y against log x; returns (p, R²)."""
    if any(v <= 0 for v in [*x, *y]):
        raise ValueError("loglog_fit needs positive values")
    slope, _, r2 = linear_fit([math.log(v) for v in x], [math.log(v) for v in y])
    return slope, r2


def hvp_cost(w: Workload | None = None, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             time: bool = True, repeats: int = 5, seed: int = 0) -> dict[str, float | None]:
    """A gradient of one task's support loss against a Hessian-vector product H v (double backward,
    Pearlmutter 1994) on the Conv4 of ``w``: FLOPs of each and their ratio, and, with ``time``, the
    ratio of median times. The HVP includes the gradient it differentiates (its first backward)."""
    w = w or Workload()
    _, model = build(replace(w, method="gradient"), device=device, dtype=dtype, seed=seed)
    tasks = make_tasks(w, generator=torch.Generator().manual_seed(seed), device=device, dtype=dtype)
    x, y = tasks.x_support[0], tasks.y_support[0]
    leaves = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
    v = [torch.ones_like(p) for p in leaves.values()]

    def loss() -> Tensor:
        return F.cross_entropy(functional_call(model, leaves, (x,)), y)

    def gradient() -> None:
        torch.autograd.grad(loss(), list(leaves.values()))

    def hvp() -> None:
        g = torch.autograd.grad(loss(), list(leaves.values()), create_graph=True)
        torch.autograd.grad(g, list(leaves.values()), grad_outputs=v)

    (f_grad, _), (f_hvp, _) = count(gradient), count(hvp)
    out: dict[str, float | None] = {"n_params": sum(p.numel() for p in leaves.values()), "gradient_flops": f_grad,
                                    "hvp_flops": f_hvp, "flop_ratio": f_hvp / f_grad, "time_ratio": None}
    if time:
        t_grad, t_hvp = time_steps([gradient, hvp], device, repeats=repeats, warmup=1)
        out.update(gradient_ms=t_grad.median_ms, hvp_ms=t_hvp.median_ms, time_ratio=t_hvp.median_ms / t_grad.median_ms)
    return out
