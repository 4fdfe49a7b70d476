"""Oracles, tiny problems and torch settings shared by the unit tests: ``from oracles import ...``.

pytest puts tests/ on ``sys.path`` (no ``__init__.py``, the default "prepend" import mode), so the test
files and conftest.py import this module by its name, as they import ``_omniglot_fixtures``.

- :func:`directional_fd_error`: the float64 finite-difference oracle for a gradient, over every tensor
  at once. Per-coordinate differences are not needed: one random direction through all parameters
  checks every tensor (a wrong gradient in any of them changes ⟨∇f, d⟩ almost surely), at the cost of
  two evaluations of f.
- :func:`sine_problem`, :func:`conv4_problem`, :func:`image_tasks`, :func:`leaf_params`: the small
  models and tasks the oracles run on, in float64 unless asked otherwise.
- :func:`torch_threads`, :func:`tf32_disabled`: settings changed for a block and restored after it
  (conftest.py's ``one_thread`` fixture, tests/test_gpu.py's ``no_tf32``).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlcore.models import MLP, Conv4
from mlcore.tasks import SineTasks, TaskBatch
from mlcore.timing import num_threads

F64 = torch.float64

# --- Finite differences -----------------------------------------------------------------------------

FD_STEP = 1e-6
# |analytic − FD| / ‖∇f‖ in float64: measured ≤ 4e-10 on the problems below (truncation O(h²) plus
# round-off ~1e-16/h). A first-order (FOMAML) gradient differs from MAML's by ~1e-1 of ‖∇f‖, so this
# tolerance is strict enough to catch a meta-gradient that silently lost its second-order term.
FD_TOL = 1e-7


@dataclass(frozen=True)
class DirectionalFD:
    """One directional finite-difference check along a unit direction d."""

    analytic: float   # ⟨∇f, d⟩ from the gradient under test
    numeric: float    # (f(t + h d) − f(t − h d)) / 2h
    grad_norm: float  # ‖∇f‖ over all tensors

    @property
    def error(self) -> float:
        """|analytic − numeric| / ‖∇f‖: the size of the mistake relative to the whole gradient."""
        return abs(self.analytic - self.numeric) / self.grad_norm

    @property
    def error_vs_derivative(self) -> float:
        """|analytic − numeric| / |⟨∇f, d⟩|: stricter than :attr:`error` (|⟨∇f, d⟩| ≤ ‖∇f‖)."""
        return abs(self.analytic - self.numeric) / abs(self.analytic)


def directional_fd(f: Callable[[list[Tensor]], Tensor], tensors: Sequence[Tensor], generator: torch.Generator,
                   grad: Callable[[list[Tensor]], Sequence[Tensor]] | None = None, step: float = FD_STEP
                   ) -> DirectionalFD:
    """Central difference of the scalar ``f`` along a random unit direction d spanning all ``tensors``.

    Args:
        f: the scalar function of the list of tensors (float64 for the tolerance :data:`FD_TOL`).
        tensors: leaves requiring grad, the point θ of the check.
        generator: draws d ~ N(0, I), normalised to ‖d‖ = 1 over all tensors together.
        grad: the gradient under test as a function of the tensors; by default
            ``torch.autograd.grad(f(tensors), tensors)`` (pass one for gradients computed another way,
            e.g. ``meta_backward``'s ``.grad``).
        step: h.
    """
    tensors = list(tensors)
    d = [torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) for t in tensors]
    norm = torch.sqrt(sum((x ** 2).sum() for x in d))
    d = [x / norm for x in d]
    grads = torch.autograd.grad(f(tensors), tensors) if grad is None else grad(tensors)
    analytic = sum((g * x).sum() for g, x in zip(grads, d, strict=True))
    with torch.no_grad():
        plus = f([t + step * x for t, x in zip(tensors, d, strict=True)])
        minus = f([t - step * x for t, x in zip(tensors, d, strict=True)])
    grad_norm = float(torch.sqrt(sum((g ** 2).sum() for g in grads)))
    assert grad_norm > 1e-6, "degenerate test: the gradient is ~0"
    return DirectionalFD(float(analytic), float((plus - minus) / (2 * step)), grad_norm)


def directional_fd_error(f: Callable[[list[Tensor]], Tensor], tensors: Sequence[Tensor],
                         generator: torch.Generator,
                         grad: Callable[[list[Tensor]], Sequence[Tensor]] | None = None) -> float:
    """|⟨∇f, d⟩ − (f(t + h d) − f(t − h d)) / 2h| / ‖∇f‖ for a random unit direction d over all tensors,
    h = :data:`FD_STEP`; compare with :data:`FD_TOL`. Arguments as in :func:`directional_fd`."""
    return directional_fd(f, tensors, generator, grad).error


# --- Tiny problems ----------------------------------------------------------------------------------

class Problem(NamedTuple):
    """A model, float64 leaf copies of its parameters and a batch of tasks: ``model, params, tasks = ...``."""

    model: nn.Module
    params: dict[str, Tensor]  # name -> fresh leaf (requires_grad); the model's own parameters are untouched
    tasks: TaskBatch

    @property
    def names(self) -> list[str]:
        return list(self.params)

    @property
    def leaves(self) -> list[Tensor]:
        return list(self.params.values())

    @property
    def loss_fn(self) -> Callable[[Tensor, Tensor], Tensor]:
        """Cross-entropy for classification tasks, mean squared error for regression."""
        return F.cross_entropy if self.tasks.is_classification else F.mse_loss


def leaf_params(model: nn.Module) -> dict[str, Tensor]:
    """Detached copies of the model's parameters that require grad: the θ an oracle differentiates."""
    return {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}


def sine_problem(hidden: tuple[int, ...] = (8, 8), meta_batch: int = 3, k_shot: int = 5, n_query: int = 6, *,
                 seed: int = 0, dtype: torch.dtype = F64, device: torch.device | str = "cpu") -> Problem:
    """Sine regression (Finn et al., 2017) with a small ``MLP(1, hidden, 1)``.

    The weights come from ``torch.manual_seed(seed)``, the tasks from their own generator seeded the same:
    x (meta_batch, k_shot | n_query, 1) → y of the same shape.
    """
    torch.manual_seed(seed)
    model = MLP(1, hidden, 1).to(device, dtype)
    tasks = SineTasks().sample(meta_batch, k_shot, n_query, generator=torch.Generator().manual_seed(seed),
                               device=device, dtype=dtype)
    return Problem(model, leaf_params(model), tasks)


def image_tasks(meta_batch: int = 2, n_way: int = 3, k_shot: int = 1, n_query: int = 2, *, size: int = 16,
                generator: torch.Generator | None = None, dtype: torch.dtype = F64) -> TaskBatch:
    """Uniform-noise 1×size×size images with labels 0..n_way-1: enough to exercise every layer of a conv net.

    Labels cycle through the classes, (0, 1, …, n_way-1, 0, 1, …): x_support (meta_batch, n_way·k_shot,
    1, size, size), y_support (meta_batch, n_way·k_shot), and likewise for the query set. The support
    images are drawn before the query images from ``generator`` (default: a fresh one seeded 0).
    size=16 is the smallest Conv4 input (four 2×2 poolings), which keeps the tests fast.
    """
    g = torch.Generator().manual_seed(0) if generator is None else generator

    def labels(per_class: int) -> Tensor:
        return torch.arange(n_way).repeat(per_class)[None].expand(meta_batch, -1).clone()  # (B, n_way·per_class)
    xs = torch.rand(meta_batch, n_way * k_shot, 1, size, size, generator=g, dtype=dtype)
    xq = torch.rand(meta_batch, n_way * n_query, 1, size, size, generator=g, dtype=dtype)
    return TaskBatch(xs, labels(k_shot), xq, labels(n_query))


def conv4_problem(norm: str = "batch", meta_batch: int = 2, n_way: int = 3, k_shot: int = 1, n_query: int = 2, *,
                  hidden: int = 4, size: int = 16, groups: int = 2, seed: int = 0, dtype: torch.dtype = F64,
                  device: torch.device | str = "cpu") -> Problem:
    """An n_way-way ``Conv4`` (``hidden`` channels, ``norm`` "batch" or "group") on :func:`image_tasks`.

    The weights come from ``torch.manual_seed(seed)``, the images from their own generator seeded the same.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = Conv4(1, n_way, hidden=hidden, norm=norm, image_size=size, groups=groups).to(device, dtype)
    tasks = image_tasks(meta_batch, n_way, k_shot, n_query, size=size, generator=g, dtype=dtype).to(device)
    return Problem(model, leaf_params(model), tasks)


# --- Torch settings for a block ---------------------------------------------------------------------

def torch_threads(n: int = 1):
    """``torch.set_num_threads(n)`` inside the block, the previous count restored after it
    (:func:`mlcore.timing.num_threads`).

    Tiny tensors: a second OpenMP thread costs more than it saves, and a 2-core machine shared with other
    jobs slows down many-fold when every process runs 2 threads.
    """
    return num_threads(n)


@contextlib.contextmanager
def tf32_disabled() -> Iterator[None]:
    """cuBLAS matmuls and cuDNN convolutions in full float32 (no TF32) inside the block; restored after.

    With TF32, float32 convolutions on an Ampere-or-later GPU round their inputs to 10 mantissa bits, and
    two exact formulations of the same gradient then differ by ~1e-2 relative. (Unlike
    :func:`mlcore.timing.exact_matmuls` it also switches the flags when no GPU is in use.)
    """
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
