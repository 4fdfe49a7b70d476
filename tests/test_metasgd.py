"""Meta-SGD (mlcore.metasgd): float64 finite differences w.r.t. θ and α, and reduction to MAML."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracles import F64, FD_TOL, conv4_problem, directional_fd_error, sine_problem
from torch.func import functional_call

from mlcore import maml, metasgd
from mlcore.inner import InnerLoopDivergedError

ALPHA = 0.05


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# Sine: 3 tasks, 5-shot, 6 queries; Conv4: 2 tasks, 3-way 1-shot, 1 query per class.
@pytest.mark.parametrize("setup,loss_fn,lr", [(sine_problem, F.mse_loss, ALPHA),
                                              (lambda: conv4_problem("batch", n_query=1), F.cross_entropy, 0.4),
                                              (lambda: conv4_problem("group", n_query=1), F.cross_entropy, 0.4)],
                         ids=["mlp", "conv-batch", "conv-group"])
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("inner_steps", [1, 3])
def test_meta_gradient_wrt_params_and_rates_matches_finite_differences(setup, loss_fn, lr, strategy, inner_steps):
    model, params, tasks = setup()
    # Unequal rates, some negative: Meta-SGD may learn per-weight directions, not only sizes.
    g = torch.Generator().manual_seed(2)
    rates = {n: (lr * (1.5 * torch.rand(p.shape, generator=g, dtype=F64) - 0.25)).requires_grad_()
             for n, p in params.items()}
    names = list(params)

    def f(ts):
        return metasgd.meta_loss(model, dict(zip(names, ts[:len(names)], strict=True)), tasks,
                                 inner_lr=dict(zip(names, ts[len(names):], strict=True)), loss_fn=loss_fn,
                                 inner_steps=inner_steps, strategy=strategy)
    leaves = list(params.values()) + list(rates.values())
    assert directional_fd_error(f, leaves, torch.Generator().manual_seed(1)) < FD_TOL


@pytest.mark.parametrize("first_order", [False, True])
def test_all_rates_equal_alpha_is_exactly_maml(first_order):
    model, params, tasks = sine_problem()
    rates = metasgd.init_inner_lrs(params, ALPHA)
    kwargs = dict(loss_fn=F.mse_loss, inner_steps=2, first_order=first_order)
    ours = metasgd.meta_loss(model, params, tasks, inner_lr=rates, **kwargs)
    theirs = maml.meta_loss(model, params, tasks, inner_lr=ALPHA, **kwargs)
    assert torch.equal(ours, theirs)
    leaves = list(params.values())
    for a, b in zip(torch.autograd.grad(ours, leaves), torch.autograd.grad(theirs, leaves), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize("first_order", [False, True])
def test_rates_receive_the_closed_form_gradient(first_order):
    """One step: ∂L_q(θ')/∂α = −∇L_q(θ') ⊙ ∇L_s(θ), with no second derivative, so FO Meta-SGD learns α too."""
    model, params, tasks = sine_problem()
    tasks = tasks[0]                                                             # one task: no mean
    rates = metasgd.init_inner_lrs(params, ALPHA)
    loss = metasgd.meta_loss(model, params, tasks, inner_lr=rates, loss_fn=F.mse_loss, inner_steps=1, first_order=first_order)
    got = torch.autograd.grad(loss, list(rates.values()))

    def task_loss(theta, x, y):
        return F.mse_loss(functional_call(model, theta, (x,)), y)
    support_grad = torch.func.grad(task_loss)({n: p.detach() for n, p in params.items()},
                                              tasks.x_support[0], tasks.y_support[0])
    adapted = {n: params[n].detach() - ALPHA * support_grad[n] for n in params}
    query_grad = torch.func.grad(task_loss)(adapted, tasks.x_query[0], tasks.y_query[0])
    for name, g in zip(params, got, strict=True):
        torch.testing.assert_close(g, -query_grad[name] * support_grad[name], rtol=1e-12, atol=1e-15)
        assert g.abs().max() > 0


def test_init_inner_lrs_builds_new_leaves_like_params():
    model, params, _ = sine_problem()
    rates = metasgd.init_inner_lrs(params, 0.1)
    for name, p in params.items():
        a = rates[name]
        assert a.shape == p.shape and a.dtype == p.dtype and a.is_leaf and a.requires_grad
        assert a.data_ptr() != p.data_ptr() and torch.all(a == 0.1)
    assert not any(a.requires_grad for a in metasgd.init_inner_lrs(params, 0.1, requires_grad=False).values())
    for bad in (0, -0.1, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="positive finite"):
            metasgd.init_inner_lrs(params, bad)


def test_predict_uses_the_learned_rates_and_is_detached():
    model, params, tasks = sine_problem()
    rates = metasgd.init_inner_lrs(params, ALPHA)
    out = metasgd.predict(model, params, tasks, inner_lr=rates, loss_fn=F.mse_loss, inner_steps=2)
    assert out.shape == tasks.y_query.shape and not out.requires_grad
    torch.testing.assert_close(out, maml.predict(model, params, tasks, loss_fn=F.mse_loss, inner_lr=ALPHA,
                                                 inner_steps=2), rtol=1e-14, atol=1e-15)


def test_bad_rates_raise_clear_errors():
    model, params, tasks = sine_problem()
    rates = metasgd.init_inner_lrs(params, ALPHA)
    kwargs = dict(loss_fn=F.mse_loss, inner_steps=1)
    with pytest.raises(KeyError, match=r"missing \['head.bias'\]"):
        metasgd.meta_loss(model, params, tasks, inner_lr={n: a for n, a in rates.items() if n != "head.bias"}, **kwargs)
    with pytest.raises(ValueError, match="one rate per weight"):
        metasgd.meta_loss(model, params, tasks, inner_lr={**rates, "head.weight": torch.tensor(ALPHA, dtype=F64)},
                          **kwargs)
    with pytest.raises(TypeError, match="float32"):
        metasgd.meta_loss(model, params, tasks, inner_lr={**rates, "head.bias": rates["head.bias"].float()}, **kwargs)
    with pytest.raises(TypeError, match="dict name -> Tensor"):
        metasgd.meta_loss(model, params, tasks, inner_lr=ALPHA, **kwargs)
    with pytest.raises(KeyError, match="missing"):
        metasgd.meta_loss(model, {n: p for n, p in params.items() if n != "head.bias"}, tasks, inner_lr=rates, **kwargs)
    with pytest.raises(ValueError, match="inner_steps must be a non-negative integer"):
        metasgd.meta_loss(model, params, tasks, inner_lr=rates, loss_fn=F.mse_loss, inner_steps=-2)


def test_diverging_rates_raise_unless_asked_not_to():
    model, params, tasks = sine_problem(dtype=torch.float32)
    rates = metasgd.init_inner_lrs(params, 1e8)
    with pytest.raises(InnerLoopDivergedError, match="diverged"):
        metasgd.meta_loss(model, params, tasks, inner_lr=rates, loss_fn=F.mse_loss, inner_steps=5)
    loss = metasgd.meta_loss(model, params, tasks, inner_lr=rates, loss_fn=F.mse_loss, inner_steps=5, check_finite=False)
    assert not torch.isfinite(loss)
