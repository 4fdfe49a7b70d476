"""meta_backward (per-task backward) against meta_loss(...).backward(), and the family's shared contract.

``meta_backward`` back-propagates each task (or vmap chunk) as soon as its query loss is known, so a
meta-gradient needs the memory of one task instead of the whole meta-batch. The oracle is
``torch.autograd.grad`` of ``meta_loss`` (itself checked against float64 finite differences in
test_inner.py, test_anil.py and test_metasgd.py). Also checked: the peak of saved activations really is
one task's, gradients accumulate like ``.backward()``'s, and MAML, FOMAML, Meta-SGD and ANIL answer the
same calls with the same types.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from oracles import F64, conv4_problem, sine_problem

from mlcore import anil, family, maml, metasgd
from mlcore.family import MetaStep

TOL = 1e-12  # float64: per-task backward sums the tasks' gradients in another order (measured ~1e-16)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def conv():
    """A 3-way batch-norm Conv4 on 3 tasks, 2 support and 2 query images per class."""
    return conv4_problem("batch", meta_batch=3, k_shot=2, n_query=2)


def sine():
    return sine_problem((8, 8), meta_batch=4, k_shot=5, n_query=6)


def relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    flat_a, flat_b = torch.cat([t.reshape(-1) for t in a]), torch.cat([t.reshape(-1) for t in b])
    return float(((flat_a - flat_b).norm() / flat_b.norm()).detach())


CE = dict(loss_fn=F.cross_entropy, inner_lr=0.4)
CASES = {  # name -> (module, keyword arguments)
    "maml-loop-2nd": (maml, dict(CE, inner_steps=2, strategy="loop")),
    "maml-loop-1st": (maml, dict(CE, inner_steps=2, first_order=True, strategy="loop")),
    "maml-vmap-chunk2": (maml, dict(CE, inner_steps=1, strategy="vmap", chunk_size=2)),
    "maml-vmap-whole": (maml, dict(CE, inner_steps=1, strategy="vmap")),
    "maml++-step-weights": (maml, dict(CE, inner_steps=3, step_weights=[0.2, 0.3, 0.5], strategy="loop")),
    "anil-feature-reuse": (anil, dict(CE, head="head", inner_steps=2, strategy="loop")),
    "anil-generic": (anil, dict(CE, head="head", inner_steps=2, strategy="loop", reuse_features=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_meta_backward_equals_the_gradient_of_meta_loss(case):
    module, kw = CASES[case]
    model, params, tasks = conv()
    loss = module.meta_loss(model, params, tasks, **kw)
    reference = torch.autograd.grad(loss, list(params.values()))
    result = module.meta_backward(model, params, tasks, **kw)
    assert isinstance(result, MetaStep) and not result.loss.requires_grad and not result.outputs.requires_grad
    assert abs(float(result.loss - loss.detach())) < TOL * abs(float(loss.detach()))
    assert result.outputs.shape == (tasks.meta_batch, 6, 3)
    assert relative([p.grad for p in params.values()], reference) < TOL


def test_meta_backward_reaches_learned_rates_and_step_weights():
    """Meta-SGD's α, MAML++'s per-step rates and a learnable multi-step weight vector all get gradient."""
    model, params, tasks = conv()
    alpha = metasgd.init_inner_lrs(params, 0.3)
    kw = dict(loss_fn=F.cross_entropy, inner_lr=alpha, inner_steps=2, strategy="loop")
    leaves = [*params.values(), *alpha.values()]
    reference = torch.autograd.grad(metasgd.meta_loss(model, params, tasks, **kw), leaves)
    metasgd.meta_backward(model, params, tasks, **kw)
    assert relative([t.grad for t in leaves], reference) < TOL
    assert all(float(a.grad.abs().sum()) > 0 for a in alpha.values())

    for p in params.values():
        p.grad = None
    rates = maml.per_step_learning_rates(params, 0.3, 2)
    weights = torch.tensor([0.4, 0.6], dtype=F64, requires_grad=True)
    kw = dict(loss_fn=F.cross_entropy, inner_lr=rates, inner_steps=2, step_weights=weights, strategy="loop")
    leaves = [*params.values(), *rates[0].values(), *rates[1].values(), weights]
    reference = torch.autograd.grad(maml.meta_loss(model, params, tasks, **kw), leaves)
    maml.meta_backward(model, params, tasks, **kw)
    assert relative([t.grad for t in leaves], reference) < TOL and float(weights.grad.abs().sum()) > 0


def test_gradients_accumulate_and_reach_leaves_behind_non_leaf_params_and_inside_loss_fn():
    model, params, tasks = sine()
    scale = torch.tensor(1.5, dtype=F64, requires_grad=True)         # θ = s · φ: non-leaf parameters
    temperature = torch.tensor(0.7, dtype=F64, requires_grad=True)   # a learnable tensor inside loss_fn

    def loss_fn(outputs, y):
        return F.mse_loss(outputs * temperature, y)

    def scaled():
        return {n: p * scale for n, p in params.items()}
    kw = dict(loss_fn=loss_fn, inner_lr=0.05, inner_steps=2, strategy="loop")
    leaves = [*params.values(), scale, temperature]
    reference = torch.autograd.grad(maml.meta_loss(model, scaled(), tasks, **kw), leaves)
    maml.meta_backward(model, scaled(), tasks, **kw)
    maml.meta_backward(model, scaled(), tasks, **kw)                 # .grad accumulates, as .backward() does
    assert relative([t.grad for t in leaves], [2 * r for r in reference]) < TOL
    assert float(scale.grad.abs()) > 0 and float(temperature.grad.abs()) > 0


PEAK = """
import sys, torch, torch.nn.functional as F
from mlcore import maml
from mlcore.models import Conv4
from mlcore.tasks import TaskBatch
torch.set_num_threads(1)
per_task, meta_batch = sys.argv[1] == "per-task", int(sys.argv[2])
g = torch.Generator().manual_seed(0)
labels = torch.arange(5).repeat(3)[None].expand(meta_batch, -1).clone()
tasks = TaskBatch(torch.rand(meta_batch, 15, 1, 28, 28, generator=g), labels,
                  torch.rand(meta_batch, 15, 1, 28, 28, generator=g), labels)
model = Conv4(1, 5, hidden=32)
params = dict(model.named_parameters())
kw = dict(loss_fn=F.cross_entropy, inner_lr=0.4, inner_steps=2, strategy="loop")
def kb(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1])
open("/proc/self/clear_refs", "w").write("5")   # reset the peak (VmHWM) to the current resident size
before = kb("VmRSS")
if per_task:
    maml.meta_backward(model, params, tasks, **kw)
else:
    maml.meta_loss(model, params, tasks, **kw).backward()
print(kb("VmHWM") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-memory reset")
def test_meta_backward_holds_one_task_graph_at_a_time():
    """The memory claim itself, as the peak resident memory of a fresh process per case (Linux's VmHWM,
    reset before the meta-gradient; ru_maxrss would carry the parent's peak across exec)."""
    import subprocess
    import sys

    def peak_kb(mode: str, meta_batch: int) -> int:
        run = subprocess.run([sys.executable, "-c", PEAK, mode, str(meta_batch)], capture_output=True, text=True,
                             check=True)
        return int(run.stdout.split()[-1])
    one, per_task, whole = peak_kb("per-task", 1), peak_kb("per-task", 12), peak_kb("whole", 12)
    assert per_task < 1.5 * one, (one, per_task, whole)       # about one task's graph at a time
    assert whole > 4 * one, (one, per_task, whole)            # the whole meta-batch at once


def test_meta_loss_is_an_ordinary_scalar():
    """A Hessian-vector product through it, a penalty on something computed from it, torch.func.grad."""
    model, params, tasks = sine()
    leaves = list(params.values())
    kw = dict(loss_fn=F.mse_loss, inner_lr=0.05, inner_steps=1)
    grads = torch.autograd.grad(maml.meta_loss(model, params, tasks, strategy="loop", **kw), leaves,
                                create_graph=True)
    hvp = torch.autograd.grad(sum((g * g).sum() for g in grads), leaves)
    assert all(bool(torch.isfinite(h).all()) and float(h.abs().sum()) > 0 for h in hvp)
    for strategy in ("loop", "vmap"):
        g = torch.func.grad(lambda p, s=strategy: maml.meta_loss(model, p, tasks, strategy=s, **kw))(params)
        assert relative(list(g.values()), [t.detach() for t in grads]) < TOL
    with torch.no_grad():
        assert maml.meta_loss(model, params, tasks, **kw).grad_fn is None


def test_inner_loop_under_a_users_vmap_says_to_pass_vmapped():
    from mlcore.inner import inner_loop
    model, params, tasks = sine()

    def one(x, y, **flag):
        return inner_loop(model, params, x, y, loss_fn=F.mse_loss, inner_lr=0.05, inner_steps=1, **flag)[-1]
    with pytest.raises(RuntimeError, match="pass vmapped=True"):
        torch.func.vmap(one)(tasks.x_support, tasks.y_support)
    batched = torch.func.vmap(lambda x, y: one(x, y, vmapped=True))(tasks.x_support, tasks.y_support)
    looped = one(tasks.x_support[2], tasks.y_support[2])
    assert all(torch.allclose(batched[n][2], looped[n], atol=1e-14) for n in params)


def test_train_step_is_zero_grad_meta_backward_step_and_reports_accuracy():
    model, params, tasks = conv()
    kw = dict(CE, inner_steps=1, strategy="loop")
    expected = {n: p.detach().clone() for n, p in params.items()}
    reference = torch.autograd.grad(maml.meta_loss(model, params, tasks, **kw), list(params.values()))
    for (n, e), g in zip(expected.items(), reference, strict=True):
        e -= 0.1 * g                                                      # plain SGD, lr 0.1
    for p in params.values():
        p.grad = torch.ones_like(p)                                       # stale gradients must be cleared
    step = maml.train_step(model, params, torch.optim.SGD(params.values(), lr=0.1), tasks, **kw)
    assert isinstance(step, family.Step) and isinstance(step.loss, float) and 0 <= step.accuracy <= 1
    assert relative([p.detach() for p in params.values()], list(expected.values())) < TOL
    sine_model, sine_params, sine_tasks = sine()
    step = maml.train_step(sine_model, sine_params, torch.optim.SGD(sine_params.values(), lr=0.01), sine_tasks,
                           loss_fn=F.mse_loss, inner_lr=0.05, inner_steps=1)
    assert step.accuracy is None
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        maml.train_step(sine_model, sine_params, None, sine_tasks, loss_fn=F.mse_loss, inner_lr=0.05, inner_steps=1)


def test_the_family_shares_one_contract():
    """MAML, Meta-SGD and ANIL: the same entry points, argument order, names and return types."""
    model, params, tasks = conv()
    alpha = metasgd.init_inner_lrs(params, 0.4)
    extra = {maml: {}, metasgd: {}, anil: {"head": "head"}}
    rate = {maml: 0.4, metasgd: alpha, anil: 0.4}
    for module in (maml, metasgd, anil):
        for name in ("meta_loss", "meta_backward", "train_step", "predict"):
            assert callable(getattr(module, name)), f"{module.__name__}.{name}"
        assert list(inspect.signature(module.meta_loss).parameters)[:3] == ["model", "params", "tasks"]
        assert list(inspect.signature(module.train_step).parameters)[:4] == ["model", "params", "optimizer", "tasks"]
        kw = dict(loss_fn=F.cross_entropy, inner_lr=rate[module], inner_steps=1, **extra[module])
        loss = module.meta_loss(model, params, tasks, **kw)
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad
        assert isinstance(module.meta_backward(model, params, tasks, **kw), MetaStep)
        outputs = module.predict(model, params, tasks, **kw)
        assert outputs.shape == (3, 6, 3) and not outputs.requires_grad
        learnable = [*params.values(), *(alpha.values() if module is metasgd else ())]
        assert isinstance(module.train_step(model, params, torch.optim.SGD(learnable, lr=0.0), tasks, **kw),
                          family.Step)
    for module in (maml, metasgd, anil):  # the same keyword names, bar the method's own (head, step_weights)
        names = set(inspect.signature(module.meta_loss).parameters) - {"head", "reuse_features", "step_weights"}
        assert names == set(inspect.signature(metasgd.meta_loss).parameters)


def test_bad_chunk_size_raises():
    model, params, tasks = sine()
    kw = dict(loss_fn=F.mse_loss, inner_lr=0.05, inner_steps=1)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        maml.meta_backward(model, params, tasks, strategy="vmap", chunk_size=0, **kw)
    with pytest.raises(ValueError, match="strategy='vmap' only"):
        maml.meta_backward(model, params, tasks, strategy="loop", chunk_size=2, **kw)


def test_a_computed_tensor_hidden_in_loss_fn_is_reported_not_dropped():
    """θ computed from φ is seen (params); a computed tensor inside loss_fn cannot be: the second task's
    backward finds its graph freed, and the error says what to do instead of dropping its gradient."""
    model, params, tasks = sine()
    log_t = torch.tensor(-0.3, dtype=F64, requires_grad=True)

    def make_loss_fn():
        temperature = log_t.exp()                              # computed once, used by every task

        def loss_fn(outputs, y):
            return F.mse_loss(outputs * temperature, y)
        return loss_fn
    kw = dict(inner_lr=0.05, inner_steps=1, strategy="loop")
    with pytest.raises(RuntimeError, match=r"shared by all tasks.*meta_loss\(\.\.\.\)\.backward\(\)"):
        maml.meta_backward(model, params, tasks, loss_fn=make_loss_fn(), **kw)
    loss = maml.meta_loss(model, params, tasks, loss_fn=make_loss_fn(), **kw)
    assert float(torch.autograd.grad(loss, log_t)[0].abs()) > 0


def test_adapt_inside_a_users_vmap_with_vmapped_true():
    model, params, tasks = sine()
    frozen = {n: p.detach() for n, p in params.items()}

    def one(x, y, **flag):
        return maml.adapt(model, frozen, x, y, loss_fn=F.mse_loss, inner_lr=0.05, inner_steps=2, check_finite=False,
                          **flag)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="pass vmapped=True"):
            torch.func.vmap(one)(tasks.x_support, tasks.y_support)
        batched = torch.func.vmap(lambda x, y: one(x, y, vmapped=True))(tasks.x_support, tasks.y_support)
        looped = one(tasks.x_support[1], tasks.y_support[1])
    assert all(torch.allclose(batched[n][1], looped[n], atol=1e-14) for n in params)


def test_evaluation_under_no_grad_records_no_second_order_graph():
    """Under an outer no_grad the inner gradient is taken without create_graph: nothing would use it."""
    from mlcore.inner import support_grad
    model, params, tasks = sine()
    kw = dict(loss_fn=F.mse_loss, names=list(params), first_order=False, vmapped=False)
    with torch.no_grad():
        grads = support_grad(model, params, tasks.x_support[0], tasks.y_support[0], **kw)
    assert all(not g.requires_grad for g in grads.values())
    grads = support_grad(model, params, tasks.x_support[0], tasks.y_support[0], **kw)
    assert all(g.requires_grad for g in grads.values())             # with grad mode on: second order
