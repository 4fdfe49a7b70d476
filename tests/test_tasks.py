"""mlcore.tasks: TaskBatch's checks (each error says what is wrong) and the sine task family of MAML."""
from __future__ import annotations

import math

import pytest
import torch

from mlcore.tasks import SineTasks, TaskBatch


def batch(**override) -> TaskBatch:
    """A valid 3-task, 5-way classification batch (2 support, 4 query per task), with fields overridden."""
    fields = {"x_support": torch.zeros(3, 2, 1, 4, 4), "y_support": torch.zeros(3, 2, dtype=torch.int64),
              "x_query": torch.zeros(3, 4, 1, 4, 4), "y_query": torch.zeros(3, 4, dtype=torch.int64)}
    return TaskBatch(**{**fields, **override})


# --- TaskBatch ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("override", "error", "message"), [
    ({"x_support": [[0.0]]}, TypeError, r"x_support must be a torch.Tensor, got list"),
    ({"y_query": torch.zeros(4, dtype=torch.int64)}, ValueError, r"y_query has shape \(4,\); it needs a leading task"),
    ({"x_query": torch.zeros(2, 4, 1, 4, 4)}, ValueError, r"x_support has 3 but x_query has 2"),
    ({"y_support": torch.zeros(3, 5, dtype=torch.int64)}, ValueError,
     r"x_support has 2 examples per task but y_support has 5"),
    ({"x_query": torch.zeros(3, 0, 1, 4, 4), "y_query": torch.zeros(3, 0, dtype=torch.int64)}, ValueError,
     r"the query set is empty"),
    ({"x_query": torch.zeros(3, 4, 1, 5, 5)}, ValueError,
     r"support inputs have feature shape \(1, 4, 4\) but query inputs have \(1, 5, 5\)"),
    ({"y_query": torch.zeros(3, 4, 2, dtype=torch.int64)}, ValueError, r"query targets have \(2,\)"),
    ({"x_support": torch.zeros(3, 2, 1, 4, 4, dtype=torch.uint8)}, TypeError, r"inputs must be floating point"),
    ({"x_query": torch.zeros(3, 4, 1, 4, 4, dtype=torch.float64)}, TypeError,
     r"x_support is torch.float32 but x_query is torch.float64"),
    ({"y_query": torch.zeros(3, 4)}, TypeError, r"y_support is torch.int64 but y_query is torch.float32"),
    ({"y_support": torch.zeros(3, 2, dtype=torch.int32), "y_query": torch.zeros(3, 4, dtype=torch.int32)},
     TypeError, r"int64 class labels .* got torch.int32; use .long\(\)"),
    ({"y_query": torch.zeros(3, 4, dtype=torch.int64, device="meta")}, ValueError,
     r"tensors are on different devices \['cpu', 'meta'\]"),
])
def test_taskbatch_rejects_inconsistent_tensors(override, error, message):
    with pytest.raises(error, match=message):
        batch(**override)


def test_taskbatch_rejects_zero_tasks():
    with pytest.raises(ValueError, match="meta_batch is 0"):
        batch(x_support=torch.zeros(0, 2, 1), y_support=torch.zeros(0, 2, dtype=torch.int64),
              x_query=torch.zeros(0, 4, 1), y_query=torch.zeros(0, 4, dtype=torch.int64))


def test_taskbatch_is_frozen_and_indexes_tasks():
    tasks = batch(x_support=torch.arange(3.0)[:, None, None, None, None].expand(3, 2, 1, 4, 4))
    assert tasks.meta_batch == len(tasks) == 3 and tasks.is_classification and tasks.device == torch.device("cpu")
    with pytest.raises(AttributeError):
        tasks.x_support = torch.zeros(3, 2, 1, 4, 4)
    assert tasks[1].meta_batch == 1 and tasks[1].x_support[0, 0, 0, 0, 0] == 1
    assert tasks[-1].x_support[0, 0, 0, 0, 0] == 2 and tasks[-2].x_support[0, 0, 0, 0, 0] == 1
    assert tasks[1:].meta_batch == 2


def test_taskbatch_to_casts_inputs_but_not_labels():
    moved = batch().to(dtype=torch.float64)
    assert moved.x_support.dtype == moved.x_query.dtype == torch.float64
    assert moved.y_support.dtype == torch.int64
    regression = SineTasks().sample(2, 3, 4, generator=torch.Generator().manual_seed(0)).to(dtype=torch.float64)
    assert regression.y_query.dtype == torch.float64 and not regression.is_classification


# --- SineTasks (Finn et al. 2017, Section 5.1) --------------------------------------------------------

def test_sine_shapes_and_dtypes():
    tasks = SineTasks().sample(7, 10, 5, generator=torch.Generator().manual_seed(0))
    assert tasks.x_support.shape == tasks.y_support.shape == (7, 10, 1)
    assert tasks.x_query.shape == tasks.y_query.shape == (7, 5, 1)
    assert tasks.x_support.dtype == tasks.y_query.dtype == torch.float32
    tasks = SineTasks().sample(2, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert tasks.x_query.dtype == torch.float64


def test_sine_parameters_and_inputs_stay_in_the_papers_ranges():
    sine = SineTasks()
    amp, phase = sine.sample_parameters(20000, generator=torch.Generator().manual_seed(0))
    assert 0.1 <= amp.min() < 0.11 and 4.99 < amp.max() <= 5.0             # fills [0.1, 5]
    assert 0.0 <= phase.min() < 0.01 and math.pi - 0.01 < phase.max() <= math.pi
    assert abs(amp.mean() - 2.55) < 0.05 and abs(phase.mean() - math.pi / 2) < 0.03   # uniform means
    tasks = sine.sample(200, 50, 50, generator=torch.Generator().manual_seed(1))
    x = torch.cat([tasks.x_support, tasks.x_query], 1)
    assert -5.0 <= x.min() < -4.99 and 4.99 < x.max() <= 5.0
    assert tasks.y_support.abs().max() <= 5.0


def test_sine_targets_are_a_sin_x_minus_phase():
    tasks, amp, phase = SineTasks().fixed_eval_set(n_tasks=9, k_shot=4, n_query=6, dtype=torch.float64)
    for x, y in ((tasks.x_support, tasks.y_support), (tasks.x_query, tasks.y_query)):
        expected = amp[:, None, None] * torch.sin(x - phase[:, None, None])      # (B, n, 1)
        torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    # a hand-worked point: A = 2, φ = π/2, x = π/2 → 2 · sin(0) = 0; x = π → 2 · sin(π/2) = 2
    f = SineTasks.function(torch.tensor([math.pi / 2, math.pi]), 2.0, math.pi / 2)
    torch.testing.assert_close(f, torch.tensor([0.0, 2.0]))


def test_sine_reproducible_from_the_generator():
    sine = SineTasks()
    a = sine.sample(5, 3, 4, generator=torch.Generator().manual_seed(42))
    b = sine.sample(5, 3, 4, generator=torch.Generator().manual_seed(42))
    c = sine.sample(5, 3, 4, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a.x_support, b.x_support) and torch.equal(a.y_query, b.y_query)
    assert not torch.equal(a.x_support, c.x_support)
    e1, e2 = sine.fixed_eval_set(seed=7)[0], sine.fixed_eval_set(seed=7)[0]
    assert torch.equal(e1.x_query, e2.x_query) and not torch.equal(e1.x_query, sine.fixed_eval_set(seed=8)[0].x_query)


def test_sine_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"amplitude must be \(low, high\), finite numbers with low <= high, got \(5.0, 0.1\)"):
        SineTasks(amplitude=(5.0, 0.1))
    for name, args in (("meta_batch", (0, 3, 4)), ("k_shot", (2, 0, 4)), ("n_query", (2, 3, -1))):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            SineTasks().sample(*args)
    with pytest.raises(ValueError, match=r"must both have shape \(meta_batch,\)"):
        SineTasks().tasks_from_parameters(torch.ones(3), torch.ones(2), 2, 2)
