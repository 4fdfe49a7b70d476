"""Reptile (mlcore.reptile) against hand-written per-task SGD (autograd.grad in a Python loop) and
per-task torch.optim.Adam, in float64; no aliasing of the input parameters."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracles import conv4_problem, sine_problem
from torch.func import functional_call

from mlcore.reptile import reptile_step
from mlcore.tasks import TaskBatch

ALPHA, EPSILON, K = 0.02, 0.3, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def hand_adapt(model, params, x, y, optimizer: str, betas=(0.9, 0.999)) -> dict[str, torch.Tensor]:
    """K steps on one task's support set, the plain way: fresh leaves, autograd, an optimiser per task."""
    names = list(params)
    leaves = [p.detach().clone().requires_grad_() for p in params.values()]
    adam = torch.optim.Adam(leaves, lr=ALPHA, betas=betas) if optimizer == "adam" else None  # fresh moments
    for _ in range(K):
        loss = F.mse_loss(functional_call(model, dict(zip(names, leaves)), (x,)), y)
        grads = torch.autograd.grad(loss, leaves)
        if adam is None:
            leaves = [(p - ALPHA * g).detach().requires_grad_() for p, g in zip(leaves, grads, strict=True)]
        else:
            for p, g in zip(leaves, grads, strict=True):
                p.grad = g
            adam.step()
    return {n: p.detach() for n, p in zip(names, leaves, strict=True)}


def hand_reptile(model, params, tasks, optimizer: str, serial: bool, betas=(0.9, 0.999)) -> dict[str, torch.Tensor]:
    theta = {n: p.detach().clone() for n, p in params.items()}
    adapted = []
    for i in range(tasks.meta_batch):
        new = hand_adapt(model, theta, tasks.x_support[i], tasks.y_support[i], optimizer, betas)
        if serial:   # Algorithm 1: θ ← θ + ε (θ' − θ) after every task
            theta = {n: theta[n] + EPSILON * (new[n] - theta[n]) for n in theta}
        adapted.append(new)
    if serial:
        return theta
    # Algorithm 2: θ ← θ + ε · mean_i (θ'_i − θ)
    return {n: theta[n] + EPSILON * sum(a[n] - theta[n] for a in adapted) / len(adapted) for n in theta}


def assert_dicts_close(a, b, rtol=1e-12, atol=1e-14):
    assert list(a) == list(b)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("serial", [False, True], ids=["batched", "serial"])
def test_one_step_equals_the_hand_computed_update(optimizer, strategy, serial):
    model, params, tasks = sine_problem()
    got = reptile_step(model, params, tasks, loss_fn=F.mse_loss, inner_lr=ALPHA, inner_steps=K, outer_lr=EPSILON,
                       optimizer=optimizer, strategy=strategy, serial=serial)
    assert_dicts_close(got, hand_reptile(model, params, tasks, optimizer, serial))


def test_adam_with_the_papers_beta1_zero():
    model, params, tasks = sine_problem()
    got = reptile_step(model, params, tasks, loss_fn=F.mse_loss, inner_lr=ALPHA, inner_steps=K, outer_lr=EPSILON,
                       optimizer="adam", adam_betas=(0.0, 0.999))
    assert_dicts_close(got, hand_reptile(model, params, tasks, "adam", False, betas=(0.0, 0.999)))


def test_input_is_not_mutated_and_the_result_shares_no_storage():
    """A common implementation aliases θ with the inner optimiser's weights: θ' − θ is 0 and θ itself does SGD."""
    model, params, tasks = sine_problem()
    before = {n: p.detach().clone() for n, p in params.items()}
    got = reptile_step(model, params, tasks, loss_fn=F.mse_loss, inner_lr=ALPHA, inner_steps=K, outer_lr=EPSILON)
    assert all(torch.equal(params[n], before[n]) for n in params)
    assert all(params[n].requires_grad and params[n].is_leaf for n in params)
    assert all(got[n].data_ptr() != params[n].data_ptr() and not got[n].requires_grad for n in params)
    assert all(got[n].shape == params[n].shape and got[n].dtype == params[n].dtype for n in params)
    moved = torch.cat([(got[n] - before[n]).reshape(-1) for n in params])
    assert moved.norm() > 1e-4, "the meta-update did not move θ"


def test_serial_and_batched_coincide_for_one_task_and_differ_for_several():
    model, params, tasks = sine_problem(meta_batch=3)
    kwargs = dict(loss_fn=F.mse_loss, inner_lr=ALPHA, inner_steps=K, outer_lr=EPSILON)
    one = tasks[1]
    assert_dicts_close(reptile_step(model, params, one, serial=True, **kwargs),
                       reptile_step(model, params, one, serial=False, **kwargs), rtol=1e-14, atol=1e-16)
    serial = reptile_step(model, params, tasks, serial=True, **kwargs)
    batched = reptile_step(model, params, tasks, serial=False, **kwargs)
    step = torch.cat([(batched[n] - params[n]).detach().reshape(-1) for n in params])
    gap = torch.cat([(serial[n] - batched[n]).reshape(-1) for n in params])
    assert gap.norm() > 1e-2 * step.norm()
    # Order matters for the serial version only.
    reordered = TaskBatch(*(t.flip(0) for t in (tasks.x_support, tasks.y_support, tasks.x_query, tasks.y_query)))
    assert_dicts_close(reptile_step(model, params, reordered, serial=False, **kwargs), batched)
    assert not torch.equal(reptile_step(model, params, reordered, serial=True, **kwargs)["head.weight"],
                           serial["head.weight"])


def test_one_inner_step_is_joint_sgd():
    """k = 1, ε = 1: θ ← θ − α · mean_i ∇L_i(θ), plain SGD on the average support loss (no meta-learning)."""
    model, params, tasks = sine_problem()
    got = reptile_step(model, params, tasks, loss_fn=F.mse_loss, inner_lr=ALPHA, inner_steps=1, outer_lr=1.0)
    losses = [F.mse_loss(functional_call(model, params, (tasks.x_support[i],)), tasks.y_support[i])
              for i in range(tasks.meta_batch)]
    grads = torch.autograd.grad(torch.stack(losses).mean(), list(params.values()))
    assert_dicts_close(got, {n: (p - ALPHA * g).detach() for (n, p), g in zip(params.items(), grads, strict=True)})


def test_query_set_is_not_used():
    model, params, tasks = sine_problem()
    other = TaskBatch(tasks.x_support, tasks.y_support, tasks.x_query + 1.0, -tasks.y_query)
    kwargs = dict(loss_fn=F.mse_loss, inner_lr=ALPHA, inner_steps=K, outer_lr=EPSILON)
    assert_dicts_close(reptile_step(model, params, tasks, **kwargs), reptile_step(model, params, other, **kwargs),
                       rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_conv_net_vmap_and_loop_agree(norm, optimizer):
    model, params, tasks = conv4_problem(norm, meta_batch=2, k_shot=2, n_query=2)   # (B=2, 3-way 2-shot)
    kwargs = dict(loss_fn=F.cross_entropy, inner_lr=0.1, inner_steps=2, outer_lr=0.5, optimizer=optimizer)
    vmapped = reptile_step(model, params, tasks, strategy="vmap", **kwargs)
    looped = reptile_step(model, params, tasks, strategy="loop", **kwargs)
    if norm == "batch" and optimizer == "adam":
        # A conv bias before batch norm has an exactly-zero gradient; numerically it is round-off (~1e-17),
        # which Adam divides by its own size (+ eps = 1e-8): steps of ~1e-10 whose sign is round-off.
        # Compare those four biases loosely, everything else tightly.
        for i in range(4):
            torch.testing.assert_close(vmapped.pop(f"body.{4 * i}.bias"), looped.pop(f"body.{4 * i}.bias"),
                                       rtol=0, atol=1e-8)
    assert_dicts_close(vmapped, looped, rtol=1e-10, atol=1e-12)


def test_bad_input_raises_clear_errors():
    model, params, tasks = sine_problem()
    base = dict(loss_fn=F.mse_loss, inner_lr=ALPHA, inner_steps=K, outer_lr=EPSILON)
    cases = [(dict(inner_lr=0.0), ValueError, "inner_lr must be a positive"),
             (dict(inner_lr=-1.0), ValueError, "inner_lr must be a positive"),
             (dict(outer_lr=0.0), ValueError, "outer_lr"),
             (dict(inner_steps=0), ValueError, "inner_steps must be a positive integer"),
             (dict(inner_steps=-2), ValueError, "inner_steps must be a positive integer"),
             (dict(optimizer="rmsprop"), ValueError, "optimizer must be one of"),
             (dict(optimizer="adam", adam_betas=(0.9, 1.0)), ValueError, "adam_betas"),
             (dict(strategy="pmap"), ValueError, "strategy must be one of")]
    for override, error, message in cases:
        with pytest.raises(error, match=message):
            reptile_step(model, params, tasks, **{**base, **override})
    with pytest.raises(KeyError, match="missing"):
        reptile_step(model, {n: p for n, p in params.items() if n != "head.bias"}, tasks, **base)
    with pytest.raises(TypeError, match="float64 but the task inputs are torch.float32"):
        reptile_step(model, params, tasks.to(dtype=torch.float32), **base)
    with pytest.raises(TypeError, match="TaskBatch"):
        reptile_step(model, params, (tasks.x_support, tasks.y_support), **base)
