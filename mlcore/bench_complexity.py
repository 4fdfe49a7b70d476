"""``python -m mlcore.bench complexity``: the cost of every method of the book, side by side, in one run.

The tables of the complexity chapter (``book/10_complexity.ipynb``) from the command line, on any
device: every method on one Omniglot-shaped workload (Conv4, random images), then the cost against the
inner steps S and the width (|θ|) with fitted slopes, the Hessian-vector product against a gradient,
and the memory/time trade-offs (checkpointing, per-task backward against the whole graph, vmap against
the loop). Counts (FLOPs, peak tensor MB) come from :func:`mlcore.complexity.measure` and are the same
on every machine; times are medians of interleaved repeats after a warm-up (:mod:`mlcore.timing`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .complexity import Record, grid, hvp_cost, linear_fit, loglog_fit, measure
from .timing import describe_device, describe_measure, format_table, num_threads
from .workloads import INNER_LOOP, METHODS, Workload

__all__ = ["ComplexityConfig", "run"]


@dataclass(frozen=True)
class ComplexityConfig:
    """What ``python -m mlcore.bench complexity`` measures (its options, one field each)."""

    hidden: int = 32
    meta_batch: int = 2
    n_way: int = 5
    k_shot: int = 1
    n_query: int = 5
    inner_steps: int = 5                    # S of the per-method table
    steps: tuple[int, ...] = (1, 2, 4, 8)   # the S axis
    widths: tuple[int, ...] = (8, 16, 32, 64)
    device: str = "auto"
    threads: int | None = None
    repeats: int = 3
    warmup: int = 1
    json: str | None = None

    def __post_init__(self) -> None:
        if len(self.steps) < 2 or len(self.widths) < 2:
            raise ValueError("--steps and --widths need at least two values each (a slope needs two points)")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch.cuda.is_available() is False on this machine")


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def _ms(r: Record) -> str:
    return "-" if r.time_ms is None else f"{r.time_ms:.1f}"


def run(c: ComplexityConfig) -> dict:
    """Measure, print the tables, and return them as a report (also written to ``c.json``)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if c.device == "auto" else c.device)
    base = Workload(n_way=c.n_way, k_shot=c.k_shot, n_query=c.n_query, meta_batch=c.meta_batch, hidden=c.hidden)
    timing = {"device": device, "repeats": c.repeats, "warmup": c.warmup}
    out: list[str] = [f"mlcore.bench complexity: one meta-step of every method (meta-gradient into .grad, no "
                      f"optimiser step), Conv4 on random 1x28x28 images",
                      f"device: {describe_device(device)} | torch {torch.__version__} | float32",
                      f"workload: B={c.meta_batch}, {c.n_way}-way {c.k_shot}-shot, {c.n_query} queries/class, "
                      f"hidden={c.hidden}",
                      "counts: GFLOP by torch.utils.flop_counter.FlopCounterMode; peak MB = peak bytes of tensors "
                      "alive at once during the step (mlcore.complexity.LiveTensorBytes): deterministic",
                      *describe_measure(device, c.repeats, c.warmup, before="the counting step, ")]
    report: dict = {"config": asdict(c), "device": describe_device(device), "torch": torch.__version__}
    with num_threads(c.threads):
        methods = measure(grid(replace(base, inner_steps=c.inner_steps), method=list(METHODS)), **timing)
        floor = methods[0]
        out += ["", f"every method, S = {c.inner_steps} (x floor: / the supervised fwd+bwd over the same images)",
                format_table(("method", "|θ|", "GFLOP", "x floor", "peak MB", "x floor", "ms", "x floor",
                              "RSS/CUDA MB"),
                             [(r.workload.method, f"{r.n_params:,}", f"{r.gflop:.3f}", _ratio(r.flops, floor.flops),
                               f"{r.peak_mb:.1f}", _ratio(r.peak_mb, floor.peak_mb), _ms(r),
                               _ratio(r.time_ms, floor.time_ms),
                               "-" if r.rss_mb is None else f"{r.rss_mb:.0f}") for r in methods])]
        hvp = hvp_cost(base, device=device, repeats=max(c.repeats, 5))
        out += ["", f"Hessian-vector product / gradient (one task's support set): FLOPs {hvp['flop_ratio']:.2f}, "
                f"time {hvp['time_ratio']:.2f}"]

        by_steps = measure(grid(base, method=list(INNER_LOOP), inner_steps=list(c.steps))
                           + grid(base, variant=["checkpoint"], inner_steps=list(c.steps)), **timing)
        rows = []
        for label in [*INNER_LOOP, "MAML (checkpoint)"]:
            recs = [r for r in by_steps if r.workload.label == label]
            fits = [linear_fit(list(c.steps), [getattr(r, f) for r in recs]) for f in ("gflop", "peak_mb", "time_ms")]
            rows.append((label, f"{fits[0][0]:.4f}", f"{fits[0][2]:.4f}", f"{round(fits[1][0], 3) + 0.0:.3f}",
                         f"{fits[2][0]:.2f}", f"{fits[2][2]:.3f}"))
        out += ["", f"against the inner steps S = {list(c.steps)}: slopes of straight-line fits",
                format_table(("method", "GFLOP/step", "R²", "MB/step", "ms/step", "R²"), rows)]

        wide = ["gradient", "MAML", "FOMAML", "ANIL", "ProtoNet"]
        by_width = measure(grid(replace(base, inner_steps=1), method=wide, hidden=list(c.widths)), **timing)
        rows = []
        for method in wide:
            recs = [r for r in by_width if r.workload.method == method]
            n = [r.n_params for r in recs]
            rows.append((method, f"{loglog_fit(n, [r.flops for r in recs])[0]:.3f}",
                         f"{loglog_fit(n, [r.peak_mb for r in recs])[0]:.3f}",
                         f"{loglog_fit(n, [r.time_ms for r in recs])[0]:.2f}"))
        out += ["", f"against |θ| (widths {list(c.widths)}, S = 1): log-log slopes (1 = linear, 2 = quadratic)",
                format_table(("method", "FLOPs", "peak MB", "time"), rows)]

        b = max(4, c.meta_batch)
        trade = measure([replace(base, meta_batch=b, inner_steps=1), replace(base, meta_batch=b, variant="whole graph"),
                         replace(base, meta_batch=b, strategy="vmap"),
                         replace(base, meta_batch=b, strategy="vmap", chunk_size=b // 2)], **timing)
        out += ["", f"MAML, B = {b}, S = 1: per-task backward, whole graph, vmap, chunked vmap",
                format_table(("row", "GFLOP", "peak MB", "ms", "x loop"),
                             [(r.workload.label, f"{r.gflop:.3f}", f"{r.peak_mb:.1f}", _ms(r),
                               _ratio(r.time_ms, trade[0].time_ms)) for r in trade])]
    records = [*methods, *by_steps, *by_width, *trade]
    report.update(lines=out, hvp=hvp, records=[r.row() for r in records])
    print("\n".join(out), flush=True)
    if c.json:
        Path(c.json).write_text(json.dumps(report, indent=2))
    return report
