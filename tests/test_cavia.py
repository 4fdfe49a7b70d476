"""CAVIA (mlcore.cavia) against float64 oracles: the meta-gradient w.r.t. θ and the initial context
matches central finite differences; the inner loop moves the context only; the context is a task
embedding the outer loop cannot touch; bad input is refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracles import F64, FD_TOL, directional_fd_error, leaf_params

from mlcore import cavia, maml
from mlcore.tasks import SineTasks

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def problem(context_dim: int = 3, meta_batch: int = 3, seed: int = 0, nonzero_context: bool = True):
    torch.manual_seed(seed)
    model = cavia.ContextMLP(1, (8, 8), 1, context_dim=context_dim).double()
    params = leaf_params(model)
    if nonzero_context:   # the oracle also covers a non-zero φ_0 (all of its gradient paths)
        with torch.no_grad():
            params["context"].copy_(torch.linspace(-0.3, 0.4, context_dim, dtype=F64))
    tasks = SineTasks().sample(meta_batch, 5, 6, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return model, params, tasks


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("inner_steps", [1, 3])
def test_meta_gradient_wrt_theta_and_initial_context_matches_finite_differences(strategy, inner_steps):
    model, params, tasks = problem()
    names = list(params)

    def f(ts):
        return cavia.meta_loss(model, dict(zip(names, ts, strict=True)), tasks, loss_fn=F.mse_loss, inner_lr=0.5,
                               inner_steps=inner_steps, strategy=strategy)
    assert directional_fd_error(f, list(params.values()), torch.Generator().manual_seed(1)) < FD_TOL
    # and the per-task backward gives the same gradient as the whole graph
    reference = torch.autograd.grad(f(list(params.values())), list(params.values()))
    cavia.meta_backward(model, params, tasks, loss_fn=F.mse_loss, inner_lr=0.5, inner_steps=inner_steps,
                        strategy=strategy)
    for p, r in zip(params.values(), reference, strict=True):
        torch.testing.assert_close(p.grad, r, rtol=1e-12, atol=1e-14)


def test_the_inner_loop_moves_the_context_only_and_is_second_order_through_it():
    model, params, tasks = problem(nonzero_context=False)
    path = maml.trajectory(model, params, tasks.x_support[0], tasks.y_support[0], loss_fn=F.mse_loss,
                           rates=[{"context": 0.5}] * 2, first_order=False, vmapped=False)
    for theta in path[1:]:
        assert all(theta[n] is params[n] for n in params if n != "context")     # θ unchanged inside
        assert not torch.equal(theta["context"], params["context"])
    assert torch.equal(params["context"], torch.zeros(3, dtype=F64))             # φ_0 = 0
    # second order: the adapted context depends on θ (through ∇_φ L), first order it does not
    body = params["body.0.weight"]
    second = torch.autograd.grad(path[-1]["context"].sum(), body, allow_unused=True)[0]
    assert second is not None and float(second.abs().sum()) > 0
    first = maml.trajectory(model, params, tasks.x_support[0], tasks.y_support[0], loss_fn=F.mse_loss,
                            rates=[{"context": 0.5}] * 2, first_order=True, vmapped=False)[-1]["context"]
    assert not first.requires_grad or torch.autograd.grad(first.sum(), body, allow_unused=True)[0] is None


def test_training_keeps_the_initial_context_at_zero_and_learns_theta():
    model, params, tasks = problem(nonzero_context=False)
    theta = cavia.meta_parameters(params)
    assert set(theta) == set(params) - {"context"}
    opt = torch.optim.Adam(theta.values(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in theta.items()}
    sampler = SineTasks()
    g = torch.Generator().manual_seed(3)
    held_out = sampler.sample(32, 5, 10, generator=torch.Generator().manual_seed(99), dtype=F64)
    kw = dict(loss_fn=F.mse_loss, inner_lr=1.0, inner_steps=2)
    with torch.no_grad():
        start = float(cavia.meta_loss(model, params, held_out, **kw))
    for _ in range(150):
        cavia.train_step(model, params, opt, sampler.sample(8, 5, 6, generator=g, dtype=F64), **kw)
    assert torch.equal(params["context"], torch.zeros(3, dtype=F64))
    assert all(not torch.equal(before[n], p) for n, p in theta.items())
    with torch.no_grad():
        end = float(cavia.meta_loss(model, params, held_out, **kw))
    assert end < 0.85 * start, (start, end)                                       # it learns
    bad = torch.optim.SGD(params.values(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer holds the context parameter"):
        cavia.train_step(model, params, bad, tasks, loss_fn=F.mse_loss, inner_lr=1.0, inner_steps=1)


def test_adapted_context_is_a_detached_task_embedding_and_predict_matches():
    model, params, tasks = problem(nonzero_context=False)
    contexts = cavia.adapt_context(model, params, tasks, loss_fn=F.mse_loss, inner_lr=0.5, inner_steps=2)
    assert contexts.shape == (3, 3) and not contexts.requires_grad
    assert not torch.allclose(contexts[0], contexts[1])                          # tasks get different contexts
    out = cavia.predict(model, params, tasks, loss_fn=F.mse_loss, inner_lr=0.5, inner_steps=2)
    by_hand = torch.stack([torch.func.functional_call(model, {**params, "context": c}, (x,))
                           for c, x in zip(contexts, tasks.x_query, strict=True)])
    torch.testing.assert_close(out, by_hand.detach(), rtol=1e-12, atol=1e-14)


def test_bad_input_raises_clear_errors():
    from mlcore.models import MLP
    with pytest.raises(ValueError, match="context_dim must be a positive integer"):
        cavia.ContextMLP(context_dim=0)
    plain = MLP()
    tasks = SineTasks().sample(2, 5, 5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(KeyError, match="needs a model with a context parameter"):
        cavia.meta_loss(plain, dict(plain.named_parameters()), tasks, loss_fn=F.mse_loss, inner_lr=0.1, inner_steps=1)
    model = cavia.ContextMLP()
    with pytest.raises(ValueError, match=r"ContextMLP expects inputs of shape \(N, in_features\)"):
        model(torch.zeros(3))


def test_cavia_answers_the_family_contract():
    import inspect

    from mlcore import family, metasgd
    assert set(inspect.signature(cavia.meta_loss).parameters) == set(inspect.signature(metasgd.meta_loss).parameters)
    model, params, tasks = problem(nonzero_context=False)
    kw = dict(loss_fn=F.mse_loss, inner_lr=0.5, inner_steps=1)
    assert cavia.meta_loss(model, params, tasks, **kw).dim() == 0
    assert isinstance(cavia.meta_backward(model, params, tasks, **kw), family.MetaStep)
    step = cavia.train_step(model, params, torch.optim.SGD(cavia.meta_parameters(params).values(), lr=0.0), tasks,
                            **kw)
    assert isinstance(step, family.Step) and step.accuracy is None


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_film_conv_meta_gradient_matches_finite_differences(strategy):
    from oracles import image_tasks
    torch.manual_seed(0)
    model = cavia.ContextConv4(1, 3, hidden=4, context_dim=5, image_size=16).double()
    params = leaf_params(model)
    with torch.no_grad():
        params["context"].copy_(torch.linspace(-0.2, 0.3, 5, dtype=F64))
    tasks = image_tasks(meta_batch=2, n_way=3, k_shot=1, n_query=2, size=16)
    names = list(params)

    def f(ts):
        return cavia.meta_loss(model, dict(zip(names, ts, strict=True)), tasks, loss_fn=F.cross_entropy, inner_lr=0.5,
                               inner_steps=2, strategy=strategy)
    assert directional_fd_error(f, list(params.values()), torch.Generator().manual_seed(1)) < FD_TOL


def test_film_modulates_the_chosen_block_only_through_the_context():
    torch.manual_seed(0)
    model = cavia.ContextConv4(1, 3, hidden=4, context_dim=5, image_size=16).double()
    x = torch.rand(6, 1, 16, 16, dtype=F64)
    base = model(x)
    with torch.no_grad():
        model.context.fill_(0.5)
    assert not torch.allclose(model(x), base)                                     # the context changes the output
    with pytest.raises(ValueError, match="film_block is the index 0..3"):
        cavia.ContextConv4(film_block=4)
    with pytest.raises(ValueError, match=r"ContextConv4 expects images of shape \(N, 1, 28, 28\)"):
        cavia.ContextConv4()(torch.zeros(2, 3, 28, 28))
