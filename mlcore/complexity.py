"""What a MAML meta-gradient costs: time and peak memory against inner steps K and parameter count |θ|.

Claim to measure (the book's complexity chapter): the second-order meta-gradient needs Hessian-vector
products, never the Hessian (Finn et al. 2017, §2.2; Pearlmutter 1994), so for a meta-batch of B tasks

==========  ======================  ==========================================================
method      time                    memory (beyond θ and the data)
==========  ======================  ==========================================================
gradient    O(|θ|)  one fwd+bwd     O(activations of one forward)
FOMAML      O(B · K · |θ|)          O(activations of one forward): the inner gradients are
                                    detached, so each step's graph is freed once it is used
MAML        O(B · K · |θ|)          O(K · activations): the unrolled K-step graph is kept for
                                    the backward pass through it
==========  ======================  ==========================================================

not O(|θ|²) as is sometimes claimed. The functions below return plain rows (dataclasses) that a
notebook turns into plots; :func:`linear_fit` gives the slope and R² of a straight line through them.

Memory is measured by :class:`PeakMemory`: on CUDA the caching allocator's peak, exact; on the CPU the
process's peak resident set size, which also counts allocator slack and moves in page-sized steps, so
CPU memory curves are only meaningful well above a few MB. Rows are timed one after another: on a
shared machine a busy spell inflates whichever row is running (on a 2-core box at load 5, one K = 8
MAML row read 2.4 s alone and 1.2–1.5 s when interleaved with the others), so use ``repeats`` > 3 or
compare against :mod:`mlcore.bench`, which interleaves its rows.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .inner import LossFn
from .maml import meta_loss
from .tasks import TaskBatch

__all__ = ["Cost", "PeakMemory", "measure", "meta_gradient_cost", "gradient_cost", "cost_vs_inner_steps",
           "cost_vs_width", "linear_fit"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/self/status")


def _reset_cpu_peak() -> bool:
    """Release the allocator's free memory and reset the peak RSS (Linux ≥ 4.0); False if impossible."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed blocks; they would hide later peaks
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of the code inside ``with``, in MB, in ``.mb`` (``None`` where it cannot be measured).

    CUDA: ``torch.cuda.max_memory_allocated`` above the allocation at entry. CPU (Linux): the peak
    resident set size (VmHWM, reset through /proc/self/clear_refs after ``malloc_trim``) above the RSS
    at entry — tensors plus allocator slack.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device, self.mb = torch.device(device), None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _proc_status_kb("VmRSS") * 1024 if _reset_cpu_peak() else None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self._base is not None:
            self.mb = (_proc_status_kb("VmHWM") * 1024 - self._base) / 2**20


@dataclass(frozen=True)
class Cost:
    method: str           # "gradient", "FOMAML" or "MAML"
    inner_steps: int      # K (0 for the plain gradient)
    n_params: int         # |θ|
    time_ms: float        # median over repeats
    peak_mb: float | None


def measure(fn: Callable[[], object], device: torch.device | str, *, repeats: int = 3, warmup: int = 1
            ) -> tuple[float, float | None]:
    """(median milliseconds of ``repeats`` calls after ``warmup`` calls, peak MB of one call)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    with PeakMemory(device) as memory:
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times), memory.mb


def _leaf_params(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}


def meta_gradient_cost(model: nn.Module, tasks: TaskBatch, *, loss_fn: LossFn, inner_lr: float, inner_steps: int,
                       first_order: bool = False, strategy: str = "loop", repeats: int = 3) -> Cost:
    """Time and peak memory of one meta-gradient (``meta_loss(...).backward()``) of MAML or FOMAML."""
    params = _leaf_params(model)

    def step() -> None:
        meta_loss(model, params, tasks, loss_fn=loss_fn, inner_lr=inner_lr, inner_steps=inner_steps,
                  first_order=first_order, strategy=strategy).backward()

    ms, mb = measure(step, tasks.device, repeats=repeats)
    return Cost("FOMAML" if first_order else "MAML", inner_steps, sum(p.numel() for p in params.values()), ms, mb)


def gradient_cost(model: nn.Module, tasks: TaskBatch, *, loss_fn: LossFn, repeats: int = 3) -> Cost:
    """The baseline: one plain gradient of the loss on all support and query examples, in one batch."""
    params = _leaf_params(model)
    x = torch.cat([tasks.x_support, tasks.x_query], 1).flatten(0, 1)   # (B·(S+Q), *feature_shape)
    y = torch.cat([tasks.y_support, tasks.y_query], 1).flatten(0, 1)

    def step() -> None:
        loss_fn(torch.func.functional_call(model, params, (x,)), y).backward()

    ms, mb = measure(step, tasks.device, repeats=repeats)
    return Cost("gradient", 0, sum(p.numel() for p in params.values()), ms, mb)


def cost_vs_inner_steps(model: nn.Module, tasks: TaskBatch, inner_steps: Sequence[int], *, loss_fn: LossFn,
                        inner_lr: float, strategy: str = "loop", repeats: int = 3) -> list[Cost]:
    """MAML and FOMAML for each K in ``inner_steps``, plus the plain gradient once (K = 0)."""
    rows = [gradient_cost(model, tasks, loss_fn=loss_fn, repeats=repeats)]
    for k in inner_steps:
        for first_order in (False, True):
            rows.append(meta_gradient_cost(model, tasks, loss_fn=loss_fn, inner_lr=inner_lr, inner_steps=k,
                                           first_order=first_order, strategy=strategy, repeats=repeats))
    return rows


def cost_vs_width(make_model: Callable[[int], nn.Module], widths: Sequence[int], tasks: TaskBatch, *,
                  loss_fn: LossFn, inner_lr: float, inner_steps: int = 1, strategy: str = "loop",
                  repeats: int = 3) -> list[Cost]:
    """Gradient, FOMAML and MAML for networks ``make_model(width)`` of growing |θ| (e.g. MLP widths)."""
    rows = []
    for width in widths:
        model = make_model(width).to(device=tasks.device, dtype=tasks.x_query.dtype)
        rows.append(gradient_cost(model, tasks, loss_fn=loss_fn, repeats=repeats))
        for first_order in (False, True):
            rows.append(meta_gradient_cost(model, tasks, loss_fn=loss_fn, inner_lr=inner_lr, inner_steps=inner_steps,
                                           first_order=first_order, strategy=strategy, repeats=repeats))
    return rows


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
