"""Tasks: the unit of data in meta-learning.

A *task* T_i has a support set D^tr_i (what the learner adapts on) and a query set D^ts_i (what the
adapted learner is judged on).  Algorithms in mlcore take a batch of tasks at once, stacked along a
leading task dimension, so that the same code can loop over tasks or ``vmap`` over them.

Notation (shared by every file in mlcore):

==============  ==========================================================
``meta_batch``  number of tasks in a batch (B)
``n_way``       classes per classification task (N)
``k_shot``      labelled support examples per class (K); for regression, support points per task
``n_query``     query examples per class (classification) or per task (regression)
==============  ==========================================================

This module is a foundation: it imports nothing else from mlcore.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import Tensor

from . import checks

__all__ = ["TaskBatch", "SineTasks"]


@dataclass(frozen=True)
class TaskBatch:
    """A batch of tasks, each with a support set and a query set.

    Shapes (B = meta_batch):
        x_support: (B, n_support, *feature_shape)
        y_support: (B, n_support, *target_shape)   int64 class labels in 0..n_way-1, or float targets
        x_query:   (B, n_query_total, *feature_shape)
        y_query:   (B, n_query_total, *target_shape)

    Support and query must agree on the task count, the feature shape, the target shape, the dtypes
    and the device; each set must hold at least one example. Classification labels must be int64.
    """

    x_support: Tensor
    y_support: Tensor
    x_query: Tensor
    y_query: Tensor

    def __post_init__(self) -> None:
        names = ("x_support", "y_support", "x_query", "y_query")
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, Tensor):
                raise TypeError(f"TaskBatch.{name} must be a torch.Tensor, got {type(value).__name__}")
            if value.dim() < 2:
                raise ValueError(
                    f"TaskBatch.{name} has shape {tuple(value.shape)}; it needs a leading task dimension "
                    f"and an example dimension, (meta_batch, n_examples, ...). For a single task, "
                    f"use tensor.unsqueeze(0)."
                )
        xs, ys, xq, yq = self.x_support, self.y_support, self.x_query, self.y_query
        meta_batch = xs.shape[0]
        for name in names[1:]:
            if getattr(self, name).shape[0] != meta_batch:
                raise ValueError(
                    f"TaskBatch: every tensor needs the same number of tasks (dim 0); x_support has "
                    f"{meta_batch} but {name} has {getattr(self, name).shape[0]}"
                )
        if meta_batch == 0:
            raise ValueError("TaskBatch: meta_batch is 0; a batch needs at least one task")
        for x, y, which in ((xs, ys, "support"), (xq, yq, "query")):
            if x.shape[1] != y.shape[1]:
                raise ValueError(
                    f"TaskBatch: x_{which} has {x.shape[1]} examples per task but y_{which} has "
                    f"{y.shape[1]}; inputs and targets must pair up one to one"
                )
            if x.shape[1] == 0:
                raise ValueError(f"TaskBatch: the {which} set is empty (0 examples per task)")
        if xs.shape[2:] != xq.shape[2:]:
            raise ValueError(
                f"TaskBatch: support inputs have feature shape {tuple(xs.shape[2:])} but query inputs "
                f"have {tuple(xq.shape[2:])}; they must match"
            )
        if ys.shape[2:] != yq.shape[2:]:
            raise ValueError(
                f"TaskBatch: support targets have shape {tuple(ys.shape[2:])} per example but query "
                f"targets have {tuple(yq.shape[2:])}; they must match"
            )
        if not xs.is_floating_point() or not xq.is_floating_point():
            raise TypeError(
                f"TaskBatch: inputs must be floating point, got x_support {xs.dtype} and x_query "
                f"{xq.dtype}; convert images with .float() (values in [0, 1])"
            )
        if xs.dtype != xq.dtype:
            raise TypeError(f"TaskBatch: x_support is {xs.dtype} but x_query is {xq.dtype}; use one dtype")
        if ys.dtype != yq.dtype:
            raise TypeError(f"TaskBatch: y_support is {ys.dtype} but y_query is {yq.dtype}; use one dtype")
        if not (ys.dtype == torch.int64 or ys.is_floating_point()):
            raise TypeError(
                f"TaskBatch: targets must be int64 class labels (classification) or floating point "
                f"(regression), got {ys.dtype}; use .long() for labels"
            )
        devices = {t.device for t in (xs, ys, xq, yq)}
        if len(devices) != 1:
            raise ValueError(f"TaskBatch: tensors are on different devices {sorted(map(str, devices))}")

    @property
    def meta_batch(self) -> int:
        return self.x_support.shape[0]

    @property
    def device(self) -> torch.device:
        return self.x_support.device

    @property
    def is_classification(self) -> bool:
        return self.y_support.dtype == torch.int64

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TaskBatch:
        """Move to ``device`` and cast the inputs (and float targets) to ``dtype``."""

        def move(t: Tensor, cast: bool) -> Tensor:
            return t.to(device=device, dtype=dtype if (cast and dtype is not None) else None)

        float_y = self.y_support.is_floating_point()
        return TaskBatch(move(self.x_support, True), move(self.y_support, float_y),
                         move(self.x_query, True), move(self.y_query, float_y))

    def __getitem__(self, index: int | slice) -> TaskBatch:
        """Tasks ``index`` as a TaskBatch (an int keeps a task dimension of 1); a slice may be empty
        only if it is out of range, which raises."""
        if isinstance(index, bool) or not (isinstance(index, slice) or hasattr(index, "__index__")):
            raise TypeError(f"TaskBatch indices are task numbers (int) or slices, got {type(index).__name__} "
                            f"{index!r}")
        if not isinstance(index, slice):
            i = operator.index(index)
            if not -self.meta_batch <= i < self.meta_batch:
                raise IndexError(f"task index {i} is out of range for a TaskBatch of {self.meta_batch} tasks "
                                 f"(valid: {-self.meta_batch}..{self.meta_batch - 1})")
            i %= self.meta_batch
            index = slice(i, i + 1)
        elif len(range(*index.indices(self.meta_batch))) == 0:
            raise IndexError(f"the slice {index} selects no task of a TaskBatch of {self.meta_batch} tasks")
        return TaskBatch(self.x_support[index], self.y_support[index],
                         self.x_query[index], self.y_query[index])

    def __len__(self) -> int:
        return self.meta_batch


class SineTasks:
    """The sine-wave regression family of Finn et al. (2017), Section 5.1.

    A task is y = A · sin(x − φ) with amplitude A ~ U[amplitude], phase φ ~ U[phase], and inputs
    x ~ U[x_range]. Defaults are the paper's: A ∈ [0.1, 5.0], φ ∈ [0, π], x ∈ [−5, 5]; the loss is
    mean squared error, K support points per task.

    Sampling is vectorised and every random number comes from the ``generator`` you pass, so a seeded
    ``torch.Generator`` reproduces the same tasks on any machine (sampling happens on the CPU, then
    the batch moves to ``device``).
    """

    def __init__(self, amplitude: tuple[float, float] = (0.1, 5.0), phase: tuple[float, float] = (0.0, math.pi),
                 x_range: tuple[float, float] = (-5.0, 5.0)) -> None:
        for name, (lo, hi) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise ValueError(f"SineTasks: {name} must be (low, high), finite numbers with low <= high, "
                                 f"got {(lo, hi)}")
        self.amplitude = amplitude
        self.phase = phase
        self.x_range = x_range

    @staticmethod
    def function(x: Tensor, amplitude: Tensor | float, phase: Tensor | float) -> Tensor:
        """The true function of a task, A · sin(x − φ) (broadcasts; use it to plot a task)."""
        return amplitude * torch.sin(x - phase)

    def sample_parameters(self, meta_batch: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Amplitudes and phases of ``meta_batch`` tasks, each of shape (meta_batch,)."""
        checks.positive_int("meta_batch", meta_batch)
        u = torch.rand(2, meta_batch, generator=generator, dtype=torch.float64)
        amp = self.amplitude[0] + (self.amplitude[1] - self.amplitude[0]) * u[0]
        phase = self.phase[0] + (self.phase[1] - self.phase[0]) * u[1]
        return amp, phase

    def tasks_from_parameters(self, amplitude: Tensor, phase: Tensor, k_shot: int, n_query: int, *,
                              generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                              dtype: torch.dtype = torch.float32) -> TaskBatch:
        """Sample support/query inputs for given task parameters (shape (B,) each)."""
        checks.positive_int("k_shot", k_shot)
        checks.positive_int("n_query", n_query)
        if amplitude.shape != phase.shape or amplitude.dim() != 1:
            raise ValueError(f"amplitude and phase must both have shape (meta_batch,), got "
                             f"{tuple(amplitude.shape)} and {tuple(phase.shape)}")
        lo, hi = self.x_range
        x = lo + (hi - lo) * torch.rand(amplitude.shape[0], k_shot + n_query, 1, generator=generator,
                                        dtype=torch.float64)          # (B, K + Q, 1)
        y = self.function(x, amplitude[:, None, None], phase[:, None, None])  # (B, K + Q, 1)
        x, y = x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)
        return TaskBatch(x[:, :k_shot], y[:, :k_shot], x[:, k_shot:], y[:, k_shot:])

    def sample(self, meta_batch: int, k_shot: int, n_query: int, *, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> TaskBatch:
        """``meta_batch`` fresh tasks with ``k_shot`` support and ``n_query`` query points each.

        Returns a TaskBatch with x: (meta_batch, k_shot | n_query, 1) and y of the same shape.
        """
        amp, phase = self.sample_parameters(meta_batch, generator=generator)
        return self.tasks_from_parameters(amp, phase, k_shot, n_query, generator=generator, device=device,
                                          dtype=dtype)

    def fixed_eval_set(self, n_tasks: int = 100, k_shot: int = 10, n_query: int = 100, *, seed: int = 1234,
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                       ) -> tuple[TaskBatch, Tensor, Tensor]:
        """A reproducible evaluation set: (tasks, amplitudes, phases), the same for a given seed.

        Use it to compare methods on identical tasks (the paper evaluates on fixed held-out tasks).
        """
        g = torch.Generator().manual_seed(seed)
        amp, phase = self.sample_parameters(n_tasks, generator=g)
        tasks = self.tasks_from_parameters(amp, phase, k_shot, n_query, generator=g, device=device, dtype=dtype)
        return tasks, amp, phase

    def __repr__(self) -> str:
        return f"SineTasks(amplitude={self.amplitude}, phase={self.phase}, x_range={self.x_range})"
