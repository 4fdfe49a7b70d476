"""Eager (per-task) backward in mlcore.inner.task_mean: same value and meta-gradient as keeping the graph.

``eager`` differentiates each task (or vmap chunk) as soon as its query loss is known and frees its
graph, so ``meta_loss`` needs the memory of one task instead of the whole meta-batch. The oracle is the
same computation with ``eager=False`` (itself checked against float64 finite differences in
test_inner.py, whose finite-difference tests run the eager path too). Also checked: what it refuses
(second derivatives, gradients into the returned outputs, a learnable tensor it cannot see) and when
the default turns it on.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlcore import anil, maml, metasgd
from mlcore.models import MLP, Conv4
from mlcore.tasks import SineTasks, TaskBatch

F64 = torch.float64
TOL = 1e-12  # float64: the eager path sums the tasks' gradients in another order (measured ~1e-16)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def conv(seed: int = 0, meta_batch: int = 3, norm: str = "batch"):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = Conv4(1, 3, hidden=4, norm=norm, image_size=16, groups=2).double()
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    labels = torch.arange(3).repeat(2)[None].expand(meta_batch, -1).clone()     # (B, 3-way 2-shot)
    tasks = TaskBatch(torch.rand(meta_batch, 6, 1, 16, 16, generator=g, dtype=F64), labels,
                      torch.rand(meta_batch, 6, 1, 16, 16, generator=g, dtype=F64), labels)
    return model, params, tasks


def sine(seed: int = 0, meta_batch: int = 4):
    torch.manual_seed(seed)
    model = MLP(1, (8, 8), 1).double()
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    return model, params, SineTasks().sample(meta_batch, 5, 6, generator=torch.Generator().manual_seed(seed), dtype=F64)


def relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    flat_a, flat_b = torch.cat([t.reshape(-1) for t in a]), torch.cat([t.reshape(-1) for t in b])
    return float(((flat_a - flat_b).norm() / flat_b.norm()).detach())


def node_names(loss: torch.Tensor) -> set[str]:
    """Type names of every autograd node behind ``loss``."""
    names, seen, stack = set(), set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return names


def both(objective, inputs: list[torch.Tensor]):
    """(value, gradient) of objective(eager) for eager=True and eager=False."""
    out = {}
    for eager in (True, False):
        loss = objective(eager)
        out[eager] = loss.detach(), torch.autograd.grad(loss, inputs)
    return out[True], out[False]


CASES = {
    "maml-loop-2nd": lambda eager, m, p, t: maml.meta_loss(m, p, t, loss_fn=F.cross_entropy, inner_lr=0.4,
                                                          inner_steps=2, strategy="loop", eager=eager),
    "maml-loop-1st": lambda eager, m, p, t: maml.meta_loss(m, p, t, loss_fn=F.cross_entropy, inner_lr=0.4,
                                                          inner_steps=2, first_order=True, strategy="loop", eager=eager),
    "maml-vmap-chunk2": lambda eager, m, p, t: maml.meta_loss(m, p, t, loss_fn=F.cross_entropy, inner_lr=0.4,
                                                             inner_steps=1, strategy="vmap", chunk_size=2, eager=eager),
    "maml++-step-weights": lambda eager, m, p, t: maml.meta_loss(m, p, t, loss_fn=F.cross_entropy, inner_lr=0.4,
                                                                inner_steps=3, step_weights=[0.2, 0.3, 0.5],
                                                                strategy="loop", eager=eager),
    "anil-feature-reuse": lambda eager, m, p, t: anil.meta_loss(m, p, t, head="head", loss_fn=F.cross_entropy,
                                                               inner_lr=0.4, inner_steps=2, strategy="loop", eager=eager),
    "anil-generic": lambda eager, m, p, t: anil.meta_loss(m, p, t, head="head", loss_fn=F.cross_entropy, inner_lr=0.4,
                                                         inner_steps=2, strategy="loop", reuse_features=False,
                                                         eager=eager),
}


@pytest.mark.parametrize("case", list(CASES))
def test_eager_equals_keeping_the_graph(case):
    model, params, tasks = conv()
    (value, grads), (value_ref, grads_ref) = both(lambda eager: CASES[case](eager, model, params, tasks),
                                                  list(params.values()))
    assert abs(float(value - value_ref)) < TOL * abs(float(value_ref))
    assert relative(grads, grads_ref) < TOL


def test_eager_reaches_learned_rates_and_step_weights():
    """Meta-SGD's α, MAML++'s per-step rates and a learnable multi-step weight vector all get gradient."""
    model, params, tasks = conv()
    lrs = metasgd.init_inner_lrs(params, 0.3)
    (_, g), (_, g_ref) = both(lambda eager: metasgd.meta_loss(model, params, lrs, tasks, loss_fn=F.cross_entropy,
                                                              inner_steps=2, strategy="loop", eager=eager),
                              [*params.values(), *lrs.values()])
    assert relative(g, g_ref) < TOL and all(float(x.abs().sum()) > 0 for x in g[len(params):])

    rates = maml.per_step_learning_rates(params, 0.3, 2)
    weights = torch.tensor([0.4, 0.6], dtype=F64, requires_grad=True)
    inputs = [*params.values(), *rates[0].values(), *rates[1].values(), weights]
    (_, g), (_, g_ref) = both(lambda eager: maml.meta_loss(model, params, tasks, loss_fn=F.cross_entropy, inner_lr=rates,
                                                           inner_steps=2, step_weights=weights, strategy="loop",
                                                           eager=eager), inputs)
    assert relative(g, g_ref) < TOL and float(g[-1].abs().sum()) > 0


def test_eager_frees_every_task_graph_and_the_default_picks_it_when_it_helps():
    model, params, tasks = conv()

    def names(**kw):
        return node_names(maml.meta_loss(model, params, tasks, loss_fn=F.cross_entropy, inner_lr=0.4,
                                         inner_steps=1, **kw))
    eager = names(strategy="loop")                         # default: several tasks, one at a time -> eager
    assert eager == {"_PrecomputedGradientBackward", "AccumulateGrad"}  # no convolution graph is kept
    assert "ConvolutionBackward0" in names(strategy="loop", eager=False)
    assert "ConvolutionBackward0" in names(strategy="vmap")                 # one vmap chunk: nothing to gain
    assert "_PrecomputedGradientBackward" in names(strategy="vmap", chunk_size=1)
    assert "ConvolutionBackward0" in node_names(maml.meta_loss(model, params, tasks[:1], loss_fn=F.cross_entropy,
                                                               inner_lr=0.4, inner_steps=1, strategy="loop"))
    with torch.no_grad():
        assert maml.meta_loss(model, params, tasks, loss_fn=F.cross_entropy, inner_lr=0.4, inner_steps=1,
                              strategy="loop").grad_fn is None


def test_eager_loss_backward_scales_and_accumulates_like_any_loss():
    model, params, tasks = sine()
    leaves = list(params.values())

    def loss(eager):
        return maml.meta_loss(model, params, tasks, loss_fn=F.mse_loss, inner_lr=0.05, inner_steps=2, strategy="loop",
                              eager=eager)
    (3 * loss(True) + loss(True).detach()).backward()
    got = [p.grad.clone() for p in leaves]
    ref = torch.autograd.grad(3 * loss(False), leaves)
    assert relative(got, ref) < TOL
    # a subset of the parameters, and a loss reused with retain_graph
    first = leaves[:2]
    shared = loss(True)
    a = torch.autograd.grad(shared, first, retain_graph=True)
    b = torch.autograd.grad(shared, first)
    assert relative(a, torch.autograd.grad(loss(False), first)) < TOL and relative(b, a) == 0


def test_non_leaf_params_pass_the_gradient_on_to_their_leaves():
    model, params, tasks = sine()
    scale = torch.tensor(1.5, dtype=F64, requires_grad=True)
    leaves = [*params.values(), scale]

    def loss(eager):
        scaled = {n: p * scale for n, p in params.items()}      # θ = s · φ: non-leaf parameters
        return maml.meta_loss(model, scaled, tasks, loss_fn=F.mse_loss, inner_lr=0.05, inner_steps=2,
                              strategy="loop", eager=eager)
    assert "_PrecomputedGradientBackward" in node_names(loss(None))
    (_, g), (_, g_ref) = both(loss, leaves)
    assert relative(g, g_ref) < TOL and float(g[-1].abs()) > 0


def test_second_derivative_and_gradient_into_outputs_raise_and_eager_false_allows_them():
    model, params, tasks = sine()
    leaves = list(params.values())

    def loss(eager, **kw):
        return maml.meta_loss(model, params, tasks, loss_fn=F.mse_loss, inner_lr=0.05, inner_steps=1,
                              strategy="loop", eager=eager, **kw)
    with pytest.raises(RuntimeError, match="create_graph=True.*eager=False"):
        torch.autograd.grad(loss(None), leaves, create_graph=True)
    value, outputs = loss(None, return_outputs=True)
    assert outputs.shape == (tasks.meta_batch, 6, 1)
    with pytest.raises(RuntimeError, match="query outputs.*eager=False"):
        (value + outputs.square().mean()).backward()
    # the kept graph supports both: a Hessian-vector product of the meta-loss, and an output penalty
    grads = torch.autograd.grad(loss(False), leaves, create_graph=True)
    hvp = torch.autograd.grad(sum((g * g).sum() for g in grads), leaves)
    assert all(torch.isfinite(h).all() for h in hvp)
    value, outputs = loss(False, return_outputs=True)
    (value + outputs.square().mean()).backward()


def test_a_learnable_tensor_hidden_in_loss_fn_keeps_the_graph_or_raises():
    model, params, tasks = sine()
    temperature = torch.tensor(0.7, dtype=F64, requires_grad=True)

    def loss_fn(outputs, y):  # closes over a learnable tensor that task_mean is not told about
        return F.mse_loss(outputs * temperature, y)

    def loss(eager):
        return maml.meta_loss(model, params, tasks, loss_fn=loss_fn, inner_lr=0.05, inner_steps=1, strategy="loop",
                              eager=eager)
    leaves = [*params.values(), temperature]
    auto = loss(None)
    assert "_PrecomputedGradientBackward" not in node_names(auto)      # it fell back to the whole graph
    g = torch.autograd.grad(auto, leaves)
    assert relative(g, torch.autograd.grad(loss(False), leaves)) < TOL and float(g[-1].abs()) > 0
    with pytest.raises(ValueError, match=r"eager=True, but .* learnable tensors it was not given \(a \(\) float64 "
                                         r"tensor.*eager=False"):
        loss(True)


def test_inside_a_torch_func_transform_it_keeps_the_graph():
    model, params, tasks = sine()

    def value(p, eager=None):
        return maml.meta_loss(model, p, tasks, loss_fn=F.mse_loss, inner_lr=0.05, inner_steps=1, strategy="loop",
                              eager=eager)
    g = torch.func.grad(value)(params)
    ref = torch.autograd.grad(value(params, eager=False), list(params.values()))
    assert relative(list(g.values()), ref) < TOL
    with pytest.raises(ValueError, match="inside a torch.func transform"):
        torch.func.grad(lambda p: value(p, eager=True))(params)


def test_bad_eager_and_chunk_size_raise():
    model, params, tasks = sine()
    kw = dict(loss_fn=F.mse_loss, inner_lr=0.05, inner_steps=1)
    with pytest.raises(TypeError, match="eager must be True, False or None"):
        maml.meta_loss(model, params, tasks, eager="yes", **kw)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        maml.meta_loss(model, params, tasks, strategy="vmap", chunk_size=0, **kw)
    with pytest.raises(ValueError, match="strategy='vmap' only"):
        maml.meta_loss(model, params, tasks, strategy="loop", chunk_size=2, **kw)


def test_a_hidden_learnable_tensor_seen_only_in_a_later_task_raises():
    """The first task decides eager=None's fallback; if a later task reveals a hidden learnable tensor,
    its gradient cannot be recovered any more, so the loss refuses instead of dropping it."""
    torch.manual_seed(0)
    model = MLP(1, (8,), 1).double()
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    x = torch.linspace(-1, 1, 5, dtype=F64)[None, :, None].expand(2, -1, -1).clone()   # (2 tasks, 5, 1)
    y = torch.stack([-torch.ones(5, 1, dtype=F64), torch.ones(5, 1, dtype=F64)])        # task 1: y > 0
    tasks = TaskBatch(x, y, x, y)
    scale = torch.tensor(2.0, dtype=F64, requires_grad=True)

    def loss_fn(outputs, target):  # the learnable scale only enters for targets above zero
        return F.mse_loss(outputs * scale if float(target.sum()) > 0 else outputs, target)
    with pytest.raises(ValueError, match="query loss of task chunk 1 depends on learnable tensors"):
        maml.meta_loss(model, params, tasks, loss_fn=loss_fn, inner_lr=0.1, inner_steps=1, strategy="loop")
    loss = maml.meta_loss(model, params, tasks, loss_fn=loss_fn, inner_lr=0.1, inner_steps=1, strategy="loop",
                          eager=False)
    assert float(torch.autograd.grad(loss, scale)[0].abs()) > 0
