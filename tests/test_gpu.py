"""CUDA checks: exactness of the batched (vmap) meta-gradient on the GPU, and a conv MAML step that runs.

Exactness is checked in float64 with TF32 off: in float32, cuDNN may run convolutions in TF32 and the
vmap and loop meta-gradients then differ by ~1e-2 relative even though both are exact formulations.
Skipped cleanly on machines without CUDA.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlcore import anil, maml, metasgd
from mlcore.inner import resolve_strategy
from mlcore.models import MLP, Conv4
from mlcore.reptile import reptile_step
from mlcore.tasks import SineTasks, TaskBatch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

F64 = torch.float64


@pytest.fixture
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def conv_tasks(dtype: torch.dtype, meta_batch: int = 4, n_way: int = 5, size: int = 28) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    support = torch.arange(n_way)[None].expand(meta_batch, -1).clone()                 # 1-shot
    query = torch.arange(n_way).repeat(3)[None].expand(meta_batch, -1).clone()         # 3 queries per class
    return TaskBatch(torch.rand(meta_batch, n_way, 1, size, size, generator=g, dtype=dtype), support,
                     torch.rand(meta_batch, 3 * n_way, 1, size, size, generator=g, dtype=dtype),
                     query).to("cuda")


def grads_of(model, tasks, loss_fn, lr, strategy, **kwargs):
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    loss = maml.meta_loss(model, params, tasks, loss_fn=loss_fn, inner_lr=lr, inner_steps=2, strategy=strategy,
                          **kwargs)
    return loss.detach(), torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))])


@pytest.mark.parametrize("kind", ["mlp", "conv-batch", "conv-group"])
def test_vmap_and_loop_agree_on_cuda_in_float64(kind, no_tf32):
    torch.manual_seed(0)
    if kind == "mlp":
        model = MLP().to("cuda", F64)
        tasks = SineTasks().sample(8, 10, 10, generator=torch.Generator().manual_seed(0), device="cuda", dtype=F64)
        loss_fn, lr = F.mse_loss, 0.01
    else:
        model = Conv4(1, 5, hidden=16, norm=kind.split("-")[1], image_size=28, groups=4).to("cuda", F64)
        tasks, loss_fn, lr = conv_tasks(F64), F.cross_entropy, 0.4
    loss_loop, grad_loop = grads_of(model, tasks, loss_fn, lr, "loop")   # eager: per-task backward
    for strategy, kwargs in (("vmap", {}), ("vmap", {"chunk_size": 3}), ("loop", {"eager": False})):
        loss_other, grad_other = grads_of(model, tasks, loss_fn, lr, strategy, **kwargs)
        assert float((loss_other - loss_loop).abs() / loss_loop.abs()) < 1e-10
        assert float((grad_other - grad_loop).norm() / grad_loop.norm()) < 1e-10


def test_auto_strategy_is_vmap_on_cuda():
    assert resolve_strategy("auto", Conv4(norm="batch"), conv_tasks(F64, meta_batch=1).device) == "vmap"


def test_a_conv_maml_step_runs_and_lowers_the_loss():
    torch.manual_seed(0)
    model = Conv4(1, 5, hidden=32, norm="batch", image_size=28).to("cuda")
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    tasks = conv_tasks(torch.float32, meta_batch=8)
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
    torch.manual_seed(0)
    model = Conv4(1, 5, hidden=8, norm="group", groups=4, image_size=28).to("cuda", F64)
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    tasks = conv_tasks(F64)
    rates = metasgd.init_inner_lrs(params, 0.3)
    loss = metasgd.meta_loss(model, params, rates, tasks, loss_fn=F.cross_entropy, inner_steps=1)
    assert all(g.abs().max() > 0 for g in torch.autograd.grad(loss, list(rates.values())))
    fast, generic = (anil.meta_loss(model, params, tasks, head="head", loss_fn=F.cross_entropy, inner_lr=0.3,
                                    inner_steps=3, reuse_features=reuse) for reuse in (True, False))
    assert float((fast - generic).detach().abs()) < 1e-12
    new = reptile_step(model, params, tasks, loss_fn=F.cross_entropy, inner_lr=0.1, inner_steps=3, outer_lr=0.5,
                       optimizer="adam")
    assert all(t.is_cuda and torch.isfinite(t).all() for t in new.values())
