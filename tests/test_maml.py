"""MAML, FOMAML and MAML++ (mlcore.maml) against closed forms built from explicit Hessians (float64)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracles import F64, FD_TOL, directional_fd, sine_problem
from torch.func import functional_call

from mlcore import maml
from mlcore.inner import InnerLoopDivergedError
from mlcore.tasks import TaskBatch

ALPHA = 0.05


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(seed: int = 0, meta_batch: int = 2, dtype: torch.dtype = F64):
    """A 13-parameter sine MLP (explicit Hessians are 13×13), its leaf params and a few tasks."""
    return sine_problem((4,), meta_batch=meta_batch, k_shot=5, n_query=6, seed=seed, dtype=dtype)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, p in like.items():
        out[name] = vector[i:i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def closed_form(model, params, tasks, inner_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over tasks of Π_k (I − α H_k) ∇L_q(θ_K) (MAML) and of ∇L_q(θ_K) (FOMAML), explicitly."""
    theta0 = flat(params.values()).detach()

    def loss(vector, x, y):
        return F.mse_loss(functional_call(model, unflat(vector, params), (x,)), y)

    second, first = [], []
    for i in range(tasks.meta_batch):
        xs, ys, xq, yq = tasks.x_support[i], tasks.y_support[i], tasks.x_query[i], tasks.y_query[i]
        theta, jacobian = theta0, torch.eye(theta0.numel(), dtype=F64)       # d θ_k / d θ_0
        for _ in range(inner_steps):
            hessian = torch.autograd.functional.hessian(lambda v: loss(v, xs, ys), theta)   # (P, P)
            grad = torch.func.grad(loss)(theta, xs, ys)
            jacobian = jacobian @ (torch.eye(theta.numel(), dtype=F64) - ALPHA * hessian)  # H symmetric
            theta = theta - ALPHA * grad
        query_grad = torch.func.grad(loss)(theta, xq, yq)
        second.append(jacobian @ query_grad)
        first.append(query_grad)
    return torch.stack(second).mean(0), torch.stack(first).mean(0)


def meta_grad(model, params, tasks, **kwargs) -> torch.Tensor:
    loss = maml.meta_loss(model, params, tasks, loss_fn=F.mse_loss, **kwargs)
    return flat(torch.autograd.grad(loss, list(params.values())))


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_one_step_meta_gradient_is_i_minus_alpha_h_times_query_gradient(strategy):
    model, params, tasks = tiny()
    expected, fo_expected = closed_form(model, params, tasks, inner_steps=1)
    got = meta_grad(model, params, tasks, inner_lr=ALPHA, inner_steps=1, strategy=strategy)
    got_fo = meta_grad(model, params, tasks, inner_lr=ALPHA, inner_steps=1, strategy=strategy, first_order=True)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_fo, fo_expected, rtol=1e-12, atol=1e-14)
    # FOMAML differs from MAML by exactly α·H·∇L_q(θ'), a sizeable term.
    hessian_term = fo_expected - expected
    torch.testing.assert_close(got_fo - got, hessian_term, rtol=1e-10, atol=1e-14)
    assert hessian_term.norm() > 1e-2 * expected.norm()


def test_two_step_meta_gradient_is_the_product_of_both_jacobians():
    model, params, tasks = tiny(seed=1)
    expected, fo_expected = closed_form(model, params, tasks, inner_steps=2)
    torch.testing.assert_close(meta_grad(model, params, tasks, inner_lr=ALPHA, inner_steps=2), expected,
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(meta_grad(model, params, tasks, inner_lr=ALPHA, inner_steps=2, first_order=True),
                               fo_expected, rtol=1e-12, atol=1e-14)


def test_meta_gradient_is_nonzero_and_not_first_order():
    """The .data-swap bug made the 'second-order' gradient equal the first-order one exactly."""
    model, params, tasks = tiny()
    second = meta_grad(model, params, tasks, inner_lr=ALPHA, inner_steps=3)
    first = meta_grad(model, params, tasks, inner_lr=ALPHA, inner_steps=3, first_order=True)
    assert second.norm() > 1e-3
    assert (second - first).norm() > 1e-2 * second.norm()


def test_adapt_works_under_no_grad_and_does_not_mutate_params():
    model, params, tasks = tiny()
    before = {n: p.detach().clone() for n, p in params.items()}
    x, y = tasks.x_support[0], tasks.y_support[0]
    with torch.no_grad():
        adapted = maml.adapt(model, params, x, y, loss_fn=F.mse_loss, inner_lr=ALPHA, inner_steps=3)
    assert all(not t.requires_grad for t in adapted.values())
    assert all(torch.equal(params[n], before[n]) for n in params)
    assert not torch.equal(adapted["head.weight"], params["head.weight"])
    with_grad = maml.adapt(model, params, x, y, loss_fn=F.mse_loss, inner_lr=ALPHA, inner_steps=3)
    assert all(torch.equal(adapted[n], with_grad[n].detach()) for n in params)
    assert with_grad["head.weight"].requires_grad  # differentiable w.r.t. θ outside no_grad
    loss = lambda th, xx, yy: F.mse_loss(functional_call(model, th, (xx,)), yy)  # noqa: E731
    assert loss(adapted, x, y) < loss(before, x, y)  # adaptation helped on the support set


def test_predict_returns_detached_adapted_query_outputs():
    model, params, tasks = tiny()
    out = maml.predict(model, params, tasks, loss_fn=F.mse_loss, inner_lr=ALPHA, inner_steps=2)
    assert out.shape == tasks.y_query.shape and not out.requires_grad
    _, expected = maml.meta_backward(model, params, tasks, loss_fn=F.mse_loss, inner_lr=ALPHA, inner_steps=2)
    torch.testing.assert_close(out, expected.detach(), rtol=1e-12, atol=1e-14)


# --- MAML++ ----------------------------------------------------------------------------------------------

def test_step_weights_on_the_last_step_equal_plain_maml():
    model, params, tasks = tiny()
    plain = maml.meta_loss(model, params, tasks, loss_fn=F.mse_loss, inner_lr=ALPHA, inner_steps=3)
    msl = maml.meta_loss(model, params, tasks, loss_fn=F.mse_loss, inner_lr=ALPHA, inner_steps=3,
                         step_weights=(0.0, 0.0, 1.0))
    torch.testing.assert_close(msl, plain, rtol=1e-15, atol=0)
    torch.testing.assert_close(flat(torch.autograd.grad(msl, list(params.values()))),
                               flat(torch.autograd.grad(plain, list(params.values()))), rtol=1e-13, atol=1e-15)
    # and the weights matter: the mean over steps is a different objective
    mean = maml.meta_loss(model, params, tasks, loss_fn=F.mse_loss, inner_lr=ALPHA, inner_steps=3,
                          step_weights=(1 / 3, 1 / 3, 1 / 3))
    assert abs(float((mean - plain).detach())) > 1e-6


def test_per_step_rates_all_alpha_equal_maml_and_receive_gradient():
    model, params, tasks = tiny()
    rates = maml.per_step_learning_rates(params, ALPHA, 3)
    plain = maml.meta_loss(model, params, tasks, loss_fn=F.mse_loss, inner_lr=ALPHA, inner_steps=3)
    lslr = maml.meta_loss(model, params, tasks, loss_fn=F.mse_loss, inner_lr=rates, inner_steps=3)
    torch.testing.assert_close(lslr, plain, rtol=1e-15, atol=0)
    leaves = list(params.values()) + [r for step in rates for r in step.values()]
    grads = torch.autograd.grad(lslr, leaves)
    torch.testing.assert_close(flat(grads[:len(params)]), flat(torch.autograd.grad(plain, list(params.values()))),
                               rtol=1e-13, atol=1e-15)
    rate_grads = torch.stack(grads[len(params):]).reshape(3, len(params))         # (step, parameter tensor)
    assert (rate_grads.abs() > 0).all(), "every per-step, per-tensor rate must get a meta-gradient"


def test_maml_plus_plus_gradient_matches_finite_differences():
    """Multi-step loss with unequal weights and learnable per-step rates: FD over θ and the rates together."""
    model, params, tasks = tiny()
    rates = maml.per_step_learning_rates(params, ALPHA, 2)
    names = list(params)
    leaves = list(params.values()) + [r for step in rates for r in step.values()]

    def f(ts):
        theta = dict(zip(names, ts[:len(names)], strict=True))
        lrs = [dict(zip(names, ts[len(names) * (k + 1):len(names) * (k + 2)], strict=True)) for k in range(2)]
        return maml.meta_loss(model, theta, tasks, loss_fn=F.mse_loss, inner_lr=lrs, inner_steps=2,
                              step_weights=(0.3, 0.7))
    # Relative to the directional derivative |⟨∇f, d⟩| itself, stricter than to ‖∇f‖.
    assert directional_fd(f, leaves, torch.Generator().manual_seed(3)).error_vs_derivative < FD_TOL


# --- Errors that teach ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf"), "0.1", True])
def test_bad_inner_lr_raises(bad):
    model, params, tasks = tiny()
    with pytest.raises((ValueError, TypeError), match="inner_lr"):
        maml.meta_loss(model, params, tasks, loss_fn=F.mse_loss, inner_lr=bad, inner_steps=1)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_inner_steps_raises(bad):
    model, params, tasks = tiny()
    with pytest.raises(ValueError, match="inner_steps must be a non-negative integer"):
        maml.meta_loss(model, params, tasks, loss_fn=F.mse_loss, inner_lr=ALPHA, inner_steps=bad)
    with pytest.raises(ValueError, match="inner_steps"):
        maml.adapt(model, params, tasks.x_support[0], tasks.y_support[0], loss_fn=F.mse_loss, inner_lr=ALPHA,
                   inner_steps=bad)


def test_mismatched_task_shapes_and_dtypes_raise():
    x, y = torch.zeros(2, 5, 1), torch.zeros(2, 5, 1)
    with pytest.raises(ValueError, match="pair up"):
        TaskBatch(x, y[:, :4], x, y)
    with pytest.raises(ValueError, match="same number of tasks"):
        TaskBatch(x, y, x[:1], y[:1])
    with pytest.raises(ValueError, match="feature shape"):
        TaskBatch(x, y, torch.zeros(2, 5, 2), y)
    with pytest.raises(TypeError, match="int64"):
        TaskBatch(x, y.int(), x, y.int())
    model, params, tasks = tiny(dtype=torch.float32)
    with pytest.raises(TypeError, match=r"float32 but the task inputs are torch.float64"):
        maml.meta_loss(model, params, tasks.to(dtype=F64), loss_fn=F.mse_loss, inner_lr=ALPHA, inner_steps=1)


def test_params_missing_a_parameter_raise():
    model, params, tasks = tiny()
    partial = {n: p for n, p in params.items() if n != "head.bias"}
    with pytest.raises(KeyError, match=r"missing \['head.bias'\]"):
        maml.meta_loss(model, partial, tasks, loss_fn=F.mse_loss, inner_lr=ALPHA, inner_steps=1)
    with pytest.raises(ValueError, match="shape"):
        maml.meta_loss(model, {**params, "head.bias": torch.zeros(2, dtype=F64)}, tasks, loss_fn=F.mse_loss,
                       inner_lr=ALPHA, inner_steps=1)


def test_step_weights_of_the_wrong_length_raise():
    model, params, tasks = tiny()
    with pytest.raises(ValueError, match="one weight per inner step"):
        maml.meta_loss(model, params, tasks, loss_fn=F.mse_loss, inner_lr=ALPHA, inner_steps=3, step_weights=(0, 1))
    with pytest.raises(ValueError, match="inner_steps"):
        maml.per_step_learning_rates(params, ALPHA, 0)


def test_a_diverging_inner_loop_raises_unless_asked_not_to():
    model, params, tasks = tiny(dtype=torch.float32)
    kwargs = dict(loss_fn=F.mse_loss, inner_lr=1e8, inner_steps=5)
    with pytest.raises(InnerLoopDivergedError, match="smaller inner_lr"):
        maml.meta_loss(model, params, tasks, **kwargs)
    assert not torch.isfinite(maml.meta_loss(model, params, tasks, check_finite=False, **kwargs))
    with pytest.raises(InnerLoopDivergedError, match="adapted parameters"):
        maml.adapt(model, params, tasks.x_support[0], tasks.y_support[0], **kwargs)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_predict_raises_when_the_test_time_inner_loop_diverges(strategy):
    # A NaN query output would score as class 0 under argmax and as NaN MSE: predict must say why instead.
    model, params, tasks = tiny(dtype=torch.float32)
    ok = maml.predict(model, params, tasks, loss_fn=F.mse_loss, inner_lr=ALPHA, inner_steps=2, strategy=strategy)
    assert torch.isfinite(ok).all()
    with pytest.raises(InnerLoopDivergedError, match=r"test-time inner loop diverged \(\d+ of \d+ tasks.*1e\+08"):
        maml.predict(model, params, tasks, loss_fn=F.mse_loss, inner_lr=1e8, inner_steps=5, strategy=strategy)
