"""The validation boundary (mlcore.checks): each bad input is refused once, at the entry point, with an
error that says what was wrong and what is allowed, before anything runs or changes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlcore import anil, checks, maml, metasgd, reptile
from mlcore.models import MLP, Conv4
from mlcore.tasks import SineTasks, TaskBatch

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def sine(meta_batch: int = 2):
    torch.manual_seed(0)
    model = MLP(1, (8,), 1)
    return model, dict(model.named_parameters()), SineTasks().sample(meta_batch, 5, 5,
                                                                      generator=torch.Generator().manual_seed(0))


def images(labels_dtype=torch.int64):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat(2, 1).to(labels_dtype)
    return TaskBatch(torch.rand(2, 3, 1, 16, 16, generator=g), labels, torch.rand(2, 3, 1, 16, 16, generator=g), labels)


def test_batch_norm_with_running_statistics_is_refused_everywhere_and_nothing_changes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 1))
    params = dict(net.named_parameters())
    _, _, tasks = sine()
    before = net[1].running_mean.clone()
    kw = dict(loss_fn=F.mse_loss, inner_lr=0.1, inner_steps=1)
    calls = [lambda: maml.meta_loss(net, params, tasks, **kw), lambda: maml.predict(net, params, tasks, **kw),
             lambda: maml.meta_backward(net, params, tasks, **kw),
             lambda: reptile.reptile_step(net, params, tasks, **kw, outer_lr=0.5)]
    for call in calls:
        with pytest.raises(ValueError, match=r"running statistics in training mode.*track_running_stats=False"):
            call()
    assert torch.equal(net[1].running_mean, before)
    net.eval()                                          # frozen running statistics: allowed
    assert torch.isfinite(maml.meta_loss(net, params, tasks, **kw))


def test_a_loss_fn_that_does_not_reduce_to_one_number_is_named():
    model, params, tasks = sine()

    def per_example(outputs, y):
        return F.mse_loss(outputs, y, reduction="none")
    for strategy in ("loop", "vmap"):
        with pytest.raises(ValueError, match=r"loss_fn must return one number per task.*reduction='mean'"):
            maml.meta_loss(model, params, tasks, loss_fn=per_example, inner_lr=0.1, inner_steps=1, strategy=strategy)


def test_meta_backward_without_anything_to_differentiate_says_so():
    model, params, tasks = sine()
    frozen = {n: p.detach() for n, p in params.items()}
    with pytest.raises(ValueError, match="nothing to back-propagate into"):
        maml.meta_backward(model, frozen, tasks, loss_fn=F.mse_loss, inner_lr=0.1, inner_steps=1)
    with torch.no_grad(), pytest.raises(ValueError, match="nothing to back-propagate into"):
        maml.meta_backward(model, params, tasks, loss_fn=F.mse_loss, inner_lr=0.1, inner_steps=1)


def test_float_class_labels_with_cross_entropy_are_refused():
    model = Conv4(1, 3, hidden=4, image_size=16, groups=2)
    params = dict(model.named_parameters())
    kw = dict(loss_fn=F.cross_entropy, inner_lr=0.1, inner_steps=1)
    with pytest.raises(TypeError, match=r"labels are torch.float32.*int64 class indices"):
        maml.meta_loss(model, params, images(torch.float32), **kw)
    with pytest.raises(TypeError, match=r"labels are torch.float32"):
        anil.meta_loss(model, params, images(torch.float32), head="head", **kw)
    assert torch.isfinite(maml.meta_loss(model, params, images(), **kw))


def test_the_checks_are_the_ones_every_entry_point_uses():
    """The same bad rate or step count gives the same message from MAML, Meta-SGD, ANIL and the inner loop."""
    model, params, tasks = sine()
    for bad, match in ((0.0, "inner_lr must be a positive finite number"), (float("nan"), "positive finite"),
                       ("0.1", "must be a number or a Tensor")):
        with pytest.raises((ValueError, TypeError), match=match):
            maml.meta_loss(model, params, tasks, loss_fn=F.mse_loss, inner_lr=bad, inner_steps=1)
        with pytest.raises((ValueError, TypeError), match=match):
            anil.meta_loss(model, params, tasks, head="head", loss_fn=F.mse_loss, inner_lr=bad, inner_steps=1)
    alpha = metasgd.init_inner_lrs(params, 0.1)
    for steps in (-1, 1.5, True):
        for call in (lambda: maml.meta_loss(model, params, tasks, loss_fn=F.mse_loss, inner_lr=0.1, inner_steps=steps),
                     lambda: metasgd.meta_loss(model, params, tasks, loss_fn=F.mse_loss, inner_lr=alpha,
                                               inner_steps=steps)):
            with pytest.raises(ValueError, match="inner_steps must be a non-negative integer"):
                call()
    assert checks.positive_int("k", 3) == 3 and checks.non_negative_int("k", 0) == 0
    with pytest.raises(ValueError, match="EpisodeSampler: n_way must be a positive integer, got 0"):
        checks.positive_int("n_way", 0, "EpisodeSampler")


def test_a_loss_fn_that_returns_a_python_number_is_named():
    model, params, tasks = sine()
    with pytest.raises(TypeError, match=r"loss_fn must return a scalar tensor.*got a float"):
        maml.meta_loss(model, params, tasks, loss_fn=lambda o, y: F.mse_loss(o, y).item(), inner_lr=0.1,
                       inner_steps=1, strategy="loop")


def test_an_mlp_given_inputs_of_the_wrong_width_says_so():
    model, params, _ = sine()
    with pytest.raises(ValueError, match=r"MLP expects inputs of shape \(N, 1\), got \(5, 3\)"):
        model(torch.zeros(5, 3))
    bad = TaskBatch(torch.zeros(2, 5), torch.zeros(2, 5, 1), torch.zeros(2, 5), torch.zeros(2, 5, 1))
    with pytest.raises(ValueError, match=r"MLP expects inputs of shape \(N, 1\).*unsqueeze"):
        maml.meta_loss(model, params, bad, loss_fn=F.mse_loss, inner_lr=0.1, inner_steps=1, strategy="loop")
