"""Bad input gets an error that says what was wrong; nothing fails silently (one test per class)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracles import image_tasks

from mlcore import maml, matching, protonet, reptile
from mlcore.evaluate import episode_accuracy, evaluate
from mlcore.inner import InnerLoopDivergedError
from mlcore.models import MLP
from mlcore.tasks import SineTasks, TaskBatch

pytestmark = pytest.mark.usefixtures("one_thread")


def classification_tasks(b=2, n_way=3, shots=2, dim=4, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_way).repeat_interleave(shots).repeat(b, 1)
    return TaskBatch(torch.randn(b, n_way * shots, dim, generator=g), y, torch.randn(b, n_way * shots, dim,
                                                                                     generator=g), y.clone())


# --- silent wrong results -------------------------------------------------------------------------
def test_evaluate_refuses_nan_scores_instead_of_scoring_chance():
    tasks = classification_tasks()
    with pytest.raises(ValueError, match="NaN or infinite scores"):
        episode_accuracy(torch.full((2, 6, 3), math.nan), tasks)


def test_evaluate_refuses_scores_of_another_width():
    tasks = classification_tasks()
    with pytest.raises(ValueError, match="scores for 10 classes, but the episodes are 3-way"):
        episode_accuracy(torch.zeros(2, 6, 10), tasks)

    class Sampler:
        generator = None

        def sample(self, meta_batch):
            return classification_tasks(b=meta_batch)
    with pytest.raises(ValueError, match="3-way"):
        evaluate(lambda t: torch.zeros(t.meta_batch, 6, 5), Sampler(), n_episodes=4)


def test_reptile_raises_on_divergence_like_maml():
    torch.manual_seed(0)
    model = MLP(1, (8,), 1)
    params = dict(model.named_parameters())
    tasks = SineTasks().sample(2, 5, 5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(InnerLoopDivergedError, match="smaller inner_lr"):
        reptile.reptile_step(model, params, tasks, loss_fn=F.mse_loss, inner_lr=1e6, inner_steps=5, outer_lr=1.0)


@pytest.mark.parametrize("scale", [-1.0, 0.0, math.nan, math.inf])
def test_metric_scales_must_be_positive(scale):
    q, c = torch.randn(2, 4, 8), torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        protonet.logits(q, c, "cosine", scale=scale)
    s, y = torch.randn(2, 3, 8), torch.arange(3).repeat(2, 1)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        matching.log_probs(q, s, y, 3, scale=scale)


@pytest.mark.parametrize("x_range", [(-math.inf, 5.0), (0.0, math.nan)])
def test_sine_family_needs_finite_ranges(x_range):
    with pytest.raises(ValueError, match="finite numbers"):
        SineTasks(x_range=x_range)


def test_task_indices_are_task_numbers():
    tasks = classification_tasks(b=3)
    with pytest.raises(TypeError, match="task numbers"):
        tasks[True]
    with pytest.raises(IndexError, match="task index 3 is out of range for a TaskBatch of 3 tasks"):
        tasks[3]
    with pytest.raises(IndexError, match="selects no task"):
        tasks[5:]
    assert torch.equal(tasks[np.int64(-1)].x_support, tasks.x_support[2:])   # numpy integers are integers


def test_nan_step_weight_is_refused():
    torch.manual_seed(0)
    model = MLP(1, (8,), 1)
    tasks = SineTasks().sample(2, 5, 5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="step_weights must be finite"):
        maml.meta_loss(model, dict(model.named_parameters()), tasks, loss_fn=F.mse_loss, inner_lr=0.01,
                       inner_steps=2, step_weights=[0.5, math.nan])


# --- errors that teach ----------------------------------------------------------------------------
def test_nan_data_is_not_blamed_on_the_learning_rate():
    torch.manual_seed(0)
    model = MLP(1, (8,), 1)
    tasks = SineTasks().sample(2, 5, 5, generator=torch.Generator().manual_seed(0))
    x = tasks.x_query.clone()
    x[1, 0] = math.nan
    bad = TaskBatch(tasks.x_support, tasks.y_support, x, tasks.y_query)
    with pytest.raises(ValueError, match=r"tasks.x_query holds NaN or inf values \(in task\(s\) \[1\]\)"):
        maml.meta_loss(model, dict(model.named_parameters()), bad, loss_fn=F.mse_loss, inner_lr=0.01, inner_steps=1)


def test_mlp_hidden_widths_message():
    with pytest.raises(TypeError, match=r"tuple of hidden-layer widths, e.g. \(40, 40\)"):
        MLP(1, 40, 1)
    with pytest.raises(ValueError, match="hidden\\[0\\] must be a positive integer"):
        MLP(1, (True,), 1)


def test_models_with_dropout_run_task_by_task():
    from mlcore.inner import resolve_strategy
    model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 1))
    assert resolve_strategy("auto", model, torch.device("cpu")) == "loop"
    assert resolve_strategy("auto", model.eval(), torch.device("cpu")) == "vmap"


def test_model_output_width_and_labels_are_checked():
    from mlcore.models import Conv4
    torch.manual_seed(0)
    tasks = image_tasks(2, n_way=3, k_shot=1, n_query=1, size=28, dtype=torch.float32)
    y = tasks.y_support
    model = Conv4(1, 10, hidden=8)                                  # a 10-way head on 3-way tasks
    with pytest.raises(ValueError, match=r"the tasks are 3-way: it needs \(n_query, 3\) logits"):
        maml.meta_loss(model, dict(model.named_parameters()), tasks, loss_fn=F.cross_entropy, inner_lr=0.1,
                       inner_steps=1)
    model = Conv4(1, 3, hidden=8)
    bad = TaskBatch(tasks.x_support, y, tasks.x_query, y + 1)       # query label 3 not in the support set
    with pytest.raises(ValueError, match="not among the support classes"):
        maml.meta_loss(model, dict(model.named_parameters()), bad, loss_fn=F.cross_entropy, inner_lr=0.1,
                       inner_steps=1)


def test_regression_targets_must_match_the_outputs():
    torch.manual_seed(0)
    model = MLP(1, (8,), 1)
    t = SineTasks().sample(2, 5, 5, generator=torch.Generator().manual_seed(0))
    flat = TaskBatch(t.x_support, t.y_support[..., 0], t.x_query, t.y_query[..., 0])   # (B, n) targets
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="broadcasts to a wrong value"):
        maml.meta_loss(model, dict(model.named_parameters()), flat, loss_fn=F.mse_loss, inner_lr=0.01,
                       inner_steps=1)


def test_adapt_refuses_a_batch_of_tasks():
    torch.manual_seed(0)
    model = MLP(1, (8,), 1)
    t = SineTasks().sample(3, 5, 5, generator=torch.Generator().manual_seed(0))
    params = dict(model.named_parameters())
    with pytest.raises(ValueError, match="a batch of tasks"):
        maml.adapt(model, params, t.x_support, t.y_support, loss_fn=F.mse_loss, inner_lr=0.01, inner_steps=1)
    maml.adapt(model, params, t.x_support[0], t.y_support[0], loss_fn=F.mse_loss, inner_lr=0.01, inner_steps=1)


def test_conv4_embed_checks_its_input():
    from mlcore.models import Conv4
    with pytest.raises(ValueError, match=r"Conv4 expects images of shape \(N, 1, 28, 28\), got \(2, 3, 28, 28\)"):
        Conv4(1, None, hidden=8).embed(torch.zeros(2, 3, 28, 28))
