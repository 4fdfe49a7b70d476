"""CUDA checks: exactness of the batched (vmap) meta-gradient on the GPU, and a conv MAML step that runs.

Exactness is checked in float64 with TF32 off: in float32, cuDNN may run convolutions in TF32 and the
vmap and loop meta-gradients then differ by ~1e-2 relative even though both are exact formulations.
Skipped cleanly on machines without CUDA.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracles import F64, conv4_problem, image_tasks, sine_problem, tf32_disabled

from mlcore import anil, maml, metasgd
from mlcore.inner import resolve_strategy
from mlcore.models import Conv4
from mlcore.reptile import reptile_step

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"


@pytest.fixture
def no_tf32():
    with tf32_disabled():
        yield


def conv_problem(norm: str, dtype: torch.dtype, meta_batch: int = 4, hidden: int = 16, groups: int = 4):
    """A 5-way Conv4 on 28×28 noise images, 1-shot with 3 queries per class, on the GPU."""
    return conv4_problem(norm, meta_batch, n_way=5, k_shot=1, n_query=3, hidden=hidden, size=28, groups=groups,
                         dtype=dtype, device=DEVICE)


def meta_gradient(model, params, tasks, per_task: bool, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, flat meta-gradient) from meta_backward (task by task, or vmap chunk by chunk) or from
    autograd.grad of meta_loss (the whole meta-batch's graph)."""
    if per_task:
        for p in params.values():
            p.grad = None
        loss, grads = maml.meta_backward(model, params, tasks, **kwargs).loss, [p.grad for p in params.values()]
    else:
        loss = maml.meta_loss(model, params, tasks, **kwargs)
        loss, grads = loss.detach(), torch.autograd.grad(loss, list(params.values()))
    return loss, torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("kind", ["mlp", "conv-batch", "conv-group"])
def test_vmap_and_loop_agree_on_cuda_in_float64(kind, no_tf32):
    if kind == "mlp":
        problem, lr = sine_problem((40, 40), meta_batch=8, k_shot=10, n_query=10, device=DEVICE), 0.01
    else:
        problem, lr = conv_problem(kind.split("-")[1], F64), 0.4
    model, params, tasks = problem
    kw = {"loss_fn": problem.loss_fn, "inner_lr": lr, "inner_steps": 2}
    loss_loop, grad_loop = meta_gradient(model, params, tasks, True, strategy="loop", **kw)
    for per_task, strategy, chunk_size in ((False, "vmap", None), (True, "vmap", 3), (False, "loop", None)):
        loss_other, grad_other = meta_gradient(model, params, tasks, per_task, strategy=strategy,
                                               chunk_size=chunk_size, **kw)
        assert float((loss_other - loss_loop).abs() / loss_loop.abs()) < 1e-10
        assert float((grad_other - grad_loop).norm() / grad_loop.norm()) < 1e-10


def test_auto_strategy_is_vmap_on_cuda():
    assert resolve_strategy("auto", Conv4(norm="batch"), image_tasks(1).to(DEVICE).device) == "vmap"


def test_a_conv_maml_step_runs_and_lowers_the_loss():
    model, params, tasks = conv_problem("batch", torch.float32, meta_batch=8, hidden=32, groups=8)
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    losses = []
    for _ in range(5):                       # the same tasks: the meta-loss must go down
        optimizer.zero_grad()
        loss = maml.meta_loss(model, params, tasks, loss_fn=F.cross_entropy, inner_lr=0.4, inner_steps=2)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())
    assert losses[-1] < losses[0]


def test_the_other_algorithms_run_on_cuda(no_tf32):
    model, params, tasks = conv_problem("group", F64, hidden=8)
    rates = metasgd.init_inner_lrs(params, 0.3)
    loss = metasgd.meta_loss(model, params, tasks, inner_lr=rates, loss_fn=F.cross_entropy, inner_steps=1)
    assert all(g.abs().max() > 0 for g in torch.autograd.grad(loss, list(rates.values())))
    fast, generic = (anil.meta_loss(model, params, tasks, head="head", loss_fn=F.cross_entropy, inner_lr=0.3,
                                    inner_steps=3, reuse_features=reuse) for reuse in (True, False))
    assert float((fast - generic).detach().abs()) < 1e-12
    new = reptile_step(model, params, tasks, loss_fn=F.cross_entropy, inner_lr=0.1, inner_steps=3, outer_lr=0.5,
                       optimizer="adam")
    assert all(t.device.type == DEVICE and torch.isfinite(t).all() for t in new.values())
