"""Meta-SGD (mlcore.metasgd): float64 finite differences w.r.t. θ and α, and reduction to MAML."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from mlcore import maml, metasgd
from mlcore.inner import InnerLoopDivergedError
from mlcore.models import MLP, Conv4
from mlcore.tasks import SineTasks, TaskBatch

F64 = torch.float64
ALPHA = 0.05


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def sine_setup(seed: int = 0, dtype: torch.dtype = F64):
    torch.manual_seed(seed)
    model = MLP(1, (8, 8), 1).to(dtype)
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    tasks = SineTasks().sample(3, 5, 6, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return model, params, tasks


def conv_setup(norm: str, seed: int = 0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = Conv4(1, 3, hidden=4, norm=norm, image_size=16, groups=2).double()
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    labels = torch.arange(3)[None].expand(2, -1).clone()                       # (B=2, 3-way 1-shot)
    tasks = TaskBatch(torch.rand(2, 3, 1, 16, 16, generator=g, dtype=F64), labels,
                      torch.rand(2, 3, 1, 16, 16, generator=g, dtype=F64), labels.flip(1).clone())
    return model, params, tasks


def fd_error(f, leaves: list[torch.Tensor], seed: int = 1) -> float:
    """|⟨∇f, d⟩ − central difference along d| / ‖∇f‖ for a random unit direction d (h = 1e-6)."""
    g = torch.Generator().manual_seed(seed)
    d = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in leaves]
    norm = torch.sqrt(sum((x ** 2).sum() for x in d))
    d = [x / norm for x in d]
    grads = torch.autograd.grad(f(leaves), leaves)
    analytic = sum((gr * x).sum() for gr, x in zip(grads, d, strict=True))
    with torch.no_grad():
        h = 1e-6
        numeric = (f([t + h * x for t, x in zip(leaves, d)]) - f([t - h * x for t, x in zip(leaves, d)])) / (2 * h)
    return float(abs(analytic - numeric) / torch.sqrt(sum((gr ** 2).sum() for gr in grads)))


@pytest.mark.parametrize("setup,loss_fn,lr", [(sine_setup, F.mse_loss, ALPHA),
                                              (lambda: conv_setup("batch"), F.cross_entropy, 0.4),
                                              (lambda: conv_setup("group"), F.cross_entropy, 0.4)],
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
        return metasgd.meta_loss(model, dict(zip(names, ts[:len(names)], strict=True)),
                                 dict(zip(names, ts[len(names):], strict=True)), tasks, loss_fn=loss_fn,
                                 inner_steps=inner_steps, strategy=strategy)
    assert fd_error(f, list(params.values()) + list(rates.values())) < 1e-7  # measured <= 4e-10


@pytest.mark.parametrize("first_order", [False, True])
def test_all_rates_equal_alpha_is_exactly_maml(first_order):
    model, params, tasks = sine_setup()
    rates = metasgd.init_inner_lrs(params, ALPHA)
    kwargs = dict(loss_fn=F.mse_loss, inner_steps=2, first_order=first_order)
    ours = metasgd.meta_loss(model, params, rates, tasks, **kwargs)
    theirs = maml.meta_loss(model, params, tasks, inner_lr=ALPHA, **kwargs)
    assert torch.equal(ours, theirs)
    leaves = list(params.values())
    for a, b in zip(torch.autograd.grad(ours, leaves), torch.autograd.grad(theirs, leaves), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize("first_order", [False, True])
def test_rates_receive_the_closed_form_gradient(first_order):
    """One step: ∂L_q(θ')/∂α = −∇L_q(θ') ⊙ ∇L_s(θ), with no second derivative, so FO Meta-SGD learns α too."""
    model, params, tasks = sine_setup(dtype=F64)
    tasks = tasks[0]                                                             # one task: no mean
    rates = metasgd.init_inner_lrs(params, ALPHA)
    loss = metasgd.meta_loss(model, params, rates, tasks, loss_fn=F.mse_loss, inner_steps=1, first_order=first_order)
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
    model, params, _ = sine_setup()
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
    model, params, tasks = sine_setup()
    rates = metasgd.init_inner_lrs(params, ALPHA)
    out = metasgd.predict(model, params, rates, tasks, loss_fn=F.mse_loss, inner_steps=2)
    assert out.shape == tasks.y_query.shape and not out.requires_grad
    torch.testing.assert_close(out, maml.predict(model, params, tasks, loss_fn=F.mse_loss, inner_lr=ALPHA,
                                                 inner_steps=2), rtol=1e-14, atol=1e-15)


def test_bad_rates_raise_clear_errors():
    model, params, tasks = sine_setup()
    rates = metasgd.init_inner_lrs(params, ALPHA)
    kwargs = dict(loss_fn=F.mse_loss, inner_steps=1)
    with pytest.raises(KeyError, match=r"missing \['head.bias'\]"):
        metasgd.meta_loss(model, params, {n: a for n, a in rates.items() if n != "head.bias"}, tasks, **kwargs)
    with pytest.raises(ValueError, match="one rate per weight"):
        metasgd.meta_loss(model, params, {**rates, "head.weight": torch.tensor(ALPHA, dtype=F64)}, tasks, **kwargs)
    with pytest.raises(TypeError, match="float32"):
        metasgd.meta_loss(model, params, {**rates, "head.bias": rates["head.bias"].float()}, tasks, **kwargs)
    with pytest.raises(TypeError, match="dict name -> Tensor"):
        metasgd.meta_loss(model, params, ALPHA, tasks, **kwargs)
    with pytest.raises(KeyError, match="missing"):
        metasgd.meta_loss(model, {n: p for n, p in params.items() if n != "head.bias"}, rates, tasks, **kwargs)
    with pytest.raises(ValueError, match="inner_steps must be a non-negative integer"):
        metasgd.meta_loss(model, params, rates, tasks, loss_fn=F.mse_loss, inner_steps=-2)


def test_diverging_rates_raise_unless_asked_not_to():
    model, params, tasks = sine_setup(dtype=torch.float32)
    rates = metasgd.init_inner_lrs(params, 1e8)
    with pytest.raises(InnerLoopDivergedError, match="diverged"):
        metasgd.meta_loss(model, params, rates, tasks, loss_fn=F.mse_loss, inner_steps=5)
    loss = metasgd.meta_loss(model, params, rates, tasks, loss_fn=F.mse_loss, inner_steps=5, check_finite=False)
    assert not torch.isfinite(loss)
