"""Conditional Neural Processes (mlcore.cnp): the context set is a set (order-invariant), an empty or
one-point context works, σ is bounded below, the likelihood is the Gaussian one, training lowers it and
the predicted uncertainty shrinks where the context has points; bad shapes are refused."""
from __future__ import annotations

import math

import pytest
import torch

from mlcore import cnp
from mlcore.tasks import SineTasks, TaskBatch

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
F64 = torch.float64


def model(seed: int = 0) -> cnp.CNP:
    torch.manual_seed(seed)
    return cnp.CNP(encoder=(16, 16), decoder=(16,)).double()


def sine(meta_batch: int = 4, k: int = 5, q: int = 7, seed: int = 0) -> TaskBatch:
    return SineTasks().sample(meta_batch, k, q, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_the_context_is_a_set_permutation_invariant():
    net, tasks = model(), sine()
    mean, std = net(tasks.x_support, tasks.y_support, tasks.x_query)
    order = torch.randperm(5, generator=torch.Generator().manual_seed(1))
    mean2, std2 = net(tasks.x_support[:, order], tasks.y_support[:, order], tasks.x_query)
    torch.testing.assert_close(mean, mean2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(std, std2, rtol=1e-12, atol=1e-14)
    assert mean.shape == std.shape == (4, 7, 1) and bool((std >= 0.1).all())


def test_empty_and_one_point_contexts():
    net, tasks = model(), sine()
    empty_x, empty_y = tasks.x_support[:, :0], tasks.y_support[:, :0]
    mean, std = net(empty_x, empty_y, tasks.x_query)
    assert bool(torch.isfinite(mean).all()) and bool(torch.isfinite(std).all())
    # no context: r = 0, the same prediction for every task at the same inputs
    same_x = tasks.x_query[:1].expand(4, -1, -1)
    prior, _ = net(empty_x, empty_y, same_x)
    torch.testing.assert_close(prior, prior[:1].expand(4, -1, -1))
    one, _ = net(tasks.x_support[:, :1], tasks.y_support[:, :1], tasks.x_query)
    assert not torch.allclose(one, mean)                                            # one point informs


def test_gaussian_nll_is_the_gaussian_negative_log_likelihood():
    mean, std, y = torch.tensor([[0.5]]), torch.tensor([[2.0]]), torch.tensor([[1.5]])
    expected = -torch.distributions.Normal(mean, std).log_prob(y).mean()
    torch.testing.assert_close(cnp.gaussian_nll(mean, std, y), expected)
    assert abs(float(cnp.gaussian_nll(torch.zeros(1), torch.ones(1), torch.zeros(1))) - 0.5 * math.log(2 * math.pi)) < 1e-7


def test_random_split_takes_a_context_subset_and_every_point_as_target():
    tasks = sine()
    xc, yc, xt, yt = cnp.random_split(tasks, generator=torch.Generator().manual_seed(0), min_context=3, max_context=6)
    assert 3 <= xc.shape[1] <= 6 and xt.shape[1] == 12 and yt.shape == (4, 12, 1)
    for b in range(4):   # every context pair is one of the task's points
        pairs = {(float(x), float(y)) for x, y in zip(xt[b, :, 0], yt[b, :, 0], strict=True)}
        assert all((float(x), float(y)) in pairs for x, y in zip(xc[b, :, 0], yc[b, :, 0], strict=True))


def test_training_lowers_the_likelihood_loss_and_uncertainty_shrinks_near_the_context():
    torch.manual_seed(0)
    net = cnp.CNP(encoder=(32, 32), decoder=(32, 32)).double()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g, sampler = torch.Generator().manual_seed(0), SineTasks()
    held_out = sampler.sample(16, 10, 20, generator=torch.Generator().manual_seed(99), dtype=F64)
    before = float(cnp.meta_loss(net, held_out).detach())
    for _ in range(300):
        cnp.train_step(net, opt, sampler.sample(16, 10, 10, generator=g, dtype=F64), generator=g, min_context=3,
                       max_context=10)
    after = float(cnp.meta_loss(net, held_out).detach())
    assert after < before - 0.3, (before, after)
    mean, std = cnp.predictive(net, held_out)
    at_context = cnp.predictive(net, TaskBatch(held_out.x_support, held_out.y_support, held_out.x_support,
                                               held_out.y_support))[1]
    assert float(at_context.mean()) < float(std.mean())                   # more certain where it has seen data
    assert torch.equal(cnp.predict(net, held_out), mean) and not mean.requires_grad


def test_bad_input_raises_clear_errors():
    net, tasks = model(), sine()
    with pytest.raises(ValueError, match=r"x_context must have shape \(tasks, points, 1\)"):
        net(tasks.x_support[0], tasks.y_support, tasks.x_query)
    with pytest.raises(ValueError, match="disagree on the number of tasks"):
        net(tasks.x_support, tasks.y_support[:, :3], tasks.x_query)
    with pytest.raises(ValueError, match="min_context <= max_context"):
        cnp.random_split(tasks, generator=torch.Generator(), min_context=5, max_context=3)
    labels = torch.arange(3).repeat(2, 1)
    images = TaskBatch(torch.rand(2, 3, 1, 4, 4), labels, torch.rand(2, 3, 1, 4, 4), labels)
    with pytest.raises(TypeError, match="regresses real-valued targets"):
        cnp.meta_loss(net, images)
    with pytest.raises(ValueError, match="CNP: x_dim must be a positive integer"):
        cnp.CNP(x_dim=0)
