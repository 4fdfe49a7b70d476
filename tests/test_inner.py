"""The shared inner loop (mlcore.inner), checked through MAML's meta-loss against float64 oracles.

Oracles: central finite differences along a random unit direction covering every parameter at once
(an analytic directional derivative ⟨∇f, d⟩ against (f(θ + h·d) − f(θ − h·d)) / 2h, h = 1e-6); the
two batching strategies against each other; a static scan for the weight-swapping idioms that make
a common MAML implementation silently first-order.
"""
from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from oracles import (
    F64,
    FD_TOL,
    conv4_problem,
    directional_fd_error,
    image_tasks,
    leaf_params,
    sine_problem,
)
from torch import nn

from mlcore import maml
from mlcore.inner import inner_loop, query_losses, resolve_strategy
from mlcore.models import MLP, Conv4

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def setup(kind: str, dtype: torch.dtype = F64, seed: int = 0):
    """(model, leaf parameter list, names, tasks, loss_fn, inner_lr) for a tiny sine MLP or conv net."""
    if kind == "mlp":
        problem, lr = sine_problem((16, 16), meta_batch=3, k_shot=5, n_query=7, seed=seed, dtype=dtype), 0.01
    else:
        problem, lr = conv4_problem(kind.split("-")[1], meta_batch=3, seed=seed, dtype=dtype), 0.4
    return problem.model, problem.leaves, problem.names, problem.tasks, problem.loss_fn, lr


# (strategy, chunk_size, per_task): the meta-gradient of meta_loss (the whole graph) and of meta_backward
# (task by task, vmap chunk by chunk; tests/test_meta_backward.py), for both batching strategies.
STRATEGIES = [("loop", None, True), ("loop", None, False), ("vmap", None, False), ("vmap", 1, True)]


def meta_backward_grad(model, names, tasks, **kw):
    def grad(ts):
        leaves = [t.detach().clone().requires_grad_() for t in ts]
        maml.meta_backward(model, dict(zip(names, leaves, strict=True)), tasks, **kw)
        return [t.grad for t in leaves]
    return grad


@pytest.mark.parametrize("kind", ["mlp", "conv-batch", "conv-group"])
@pytest.mark.parametrize("strategy,chunk_size,per_task", STRATEGIES,
                         ids=["loop-per-task", "loop-graph", "vmap", "vmap-chunk1-per-task"])
@pytest.mark.parametrize("inner_steps", [1, 3])
def test_maml_meta_gradient_matches_finite_differences(kind, strategy, chunk_size, per_task, inner_steps):
    model, leaves, names, tasks, loss_fn, lr = setup(kind)
    kw = dict(loss_fn=loss_fn, inner_lr=lr, inner_steps=inner_steps, strategy=strategy, chunk_size=chunk_size)

    def f(ts):
        return maml.meta_loss(model, dict(zip(names, ts, strict=True)), tasks, **kw)
    grad = meta_backward_grad(model, names, tasks, **kw) if per_task else None
    assert directional_fd_error(f, leaves, torch.Generator().manual_seed(1), grad) < FD_TOL


def meta_gradient(kind: str, strategy: str, dtype: torch.dtype, chunk_size: int | None = None):
    model, leaves, names, tasks, loss_fn, lr = setup(kind, dtype)
    loss = maml.meta_loss(model, dict(zip(names, leaves, strict=True)), tasks, loss_fn=loss_fn, inner_lr=lr,
                          inner_steps=2, strategy=strategy, chunk_size=chunk_size)
    return loss, torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, leaves)])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# Tolerances (relative, loss and whole meta-gradient). float64: 1e-10; the strategies sum in a different
# order (measured 2e-15). float32: 1e-4; measured 1e-7 (MLP) to 4e-6 (conv) on CPU. On a GPU with TF32
# convolutions float32 differs by ~1e-2, hence the float64, TF32-off check in test_gpu.py.
@pytest.mark.parametrize("kind", ["mlp", "conv-batch", "conv-group"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("chunk_size", [None, 2], ids=["whole", "chunks-of-2"])
def test_vmap_and_loop_agree(kind, dtype, tol, chunk_size):
    loss_loop, grad_loop = meta_gradient(kind, "loop", dtype)
    loss_vmap, grad_vmap = meta_gradient(kind, "vmap", dtype, chunk_size)   # MLP: 3 tasks = chunks of 2 + 1
    assert relative(loss_vmap, loss_loop) < tol
    assert relative(grad_vmap, grad_loop) < tol


class TorchBatchNormNet(nn.Module):
    """conv → nn.BatchNorm2d (affine, no running stats) → ReLU → linear head, on 4×4 images."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2, track_running_stats=False),
                                  nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(2 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_torch_batchnorm_with_vmap_raises_the_teaching_error_and_auto_picks_loop():
    net = TorchBatchNormNet()
    with pytest.raises(ValueError, match=r"(?s)vmap.*WRONG.*BatchStatNorm2d"):
        resolve_strategy("vmap", net, torch.device("cpu"))
    # "auto" would choose vmap on a GPU for a vmap-exact network, but never with nn.BatchNorm2d.
    assert resolve_strategy("auto", net, torch.device("cuda")) == "loop"
    assert resolve_strategy("auto", Conv4(norm="batch"), torch.device("cuda")) == "vmap"
    assert resolve_strategy("auto", nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), torch.device("cpu")) == "loop"
    assert resolve_strategy("auto", MLP(), torch.device("cpu")) == "vmap"
    tasks = image_tasks(2, n_way=2, k_shot=2, n_query=2, size=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="WRONG"):
        maml.meta_loss(net, dict(net.named_parameters()), tasks, loss_fn=F.cross_entropy, inner_lr=0.1,
                       inner_steps=1, strategy="vmap")


def test_torch_batchnorm_is_exact_with_the_loop():
    net = TorchBatchNormNet().double()
    params = leaf_params(net)
    names, leaves = list(params), list(params.values())
    g = torch.Generator().manual_seed(0)
    tasks = image_tasks(2, n_way=2, k_shot=2, n_query=2, size=4, generator=g)

    def f(ts):
        return maml.meta_loss(net, dict(zip(names, ts, strict=True)), tasks, loss_fn=F.cross_entropy,
                              inner_lr=0.5, inner_steps=2, strategy="auto")
    assert directional_fd_error(f, leaves, g) < FD_TOL


def test_trajectory_starts_at_params_and_adapt_freezes_the_rest():
    model, leaves, names, tasks, loss_fn, lr = setup("mlp")
    params = dict(zip(names, leaves, strict=True))
    traj = inner_loop(model, params, tasks.x_support[0], tasks.y_support[0], loss_fn=loss_fn, inner_lr=lr,
                      inner_steps=3, adapt=["head.weight", "head.bias"])
    assert len(traj) == 4 and all(traj[0][n] is params[n] for n in names)
    for theta in traj[1:]:
        assert all(theta[n] is params[n] for n in names if n.startswith("body."))
        assert not torch.equal(theta["head.weight"], params["head.weight"])
    assert inner_loop(model, params, tasks.x_support[0], tasks.y_support[0], loss_fn=loss_fn, inner_lr=lr,
                      inner_steps=0) == [params]


@pytest.mark.parametrize("first_order", [False, True])
def test_plain_autograd_and_torch_func_paths_agree(first_order):
    """The inner loop takes its gradient with torch.autograd.grad, or with torch.func.grad when
    ``vmapped=True``: the adapted parameters and their derivatives w.r.t. the inputs x must agree, also
    when θ does not require grad (ANIL's head over differentiable features is such a case)."""
    model, leaves, names, tasks, loss_fn, lr = setup("conv-batch")
    params = {n: p.detach() for n, p in zip(names, leaves, strict=True)}        # θ without grad
    v = {n: torch.randn(p.shape, dtype=F64, generator=torch.Generator().manual_seed(5)) for n, p in params.items()}

    def projection(x, vmapped=False):  # <θ_2(x), v>
        theta = inner_loop(model, params, x, tasks.y_support[0], loss_fn=loss_fn, inner_lr=lr, inner_steps=2,
                           first_order=first_order, vmapped=vmapped)[-1]
        return sum((theta[n] * v[n]).sum() for n in names)
    x = tasks.x_support[0].clone().requires_grad_()
    value = projection(x)
    functorch = torch.func.grad(lambda x: projection(x, vmapped=True))(tasks.x_support[0])
    torch.testing.assert_close(projection(x, vmapped=True).detach(), value.detach(), rtol=1e-12, atol=0)
    if first_order:                                            # FOMAML: θ_2 is a constant of x
        assert not value.requires_grad and float(functorch.abs().sum()) == 0
        return
    plain = torch.autograd.grad(value, x)[0]
    torch.testing.assert_close(plain, functorch, rtol=1e-10, atol=1e-14)
    assert float(plain.abs().sum()) > 0


def test_first_order_inner_gradient_is_a_constant_of_everything():
    """FOMAML: θ_1 = θ_0 − α g with g constant, so dθ_1/dθ_0 = I and nothing else reaches θ_1 through g —
    not the inputs x (ANIL's differentiable body features) nor a learnable tensor inside loss_fn."""
    model, leaves, names, tasks, loss_fn, lr = setup("mlp")
    params = dict(zip(names, leaves, strict=True))
    scale = torch.tensor(1.3, dtype=F64, requires_grad=True)        # a learnable tensor in the loss
    x = (tasks.x_support[0] * 1.0).requires_grad_()                 # differentiable inputs

    def scaled_loss(outputs, y):
        return loss_fn(scale * outputs, y)
    theta1 = inner_loop(model, params, x, tasks.y_support[0], loss_fn=scaled_loss, inner_lr=lr, inner_steps=1,
                        first_order=True)[1]
    v = {n: torch.randn(p.shape, dtype=F64, generator=torch.Generator().manual_seed(3)) for n, p in params.items()}
    dot = sum((theta1[n] * v[n]).sum() for n in names)
    grads = torch.autograd.grad(dot, [*leaves, x, scale], allow_unused=True)
    for n, g in zip(names, grads[:len(names)], strict=True):
        torch.testing.assert_close(g, v[n], rtol=0, atol=0)           # identity Jacobian: no Hessian term
    assert grads[-2] is None and grads[-1] is None
    second = inner_loop(model, params, x, tasks.y_support[0], loss_fn=scaled_loss, inner_lr=lr, inner_steps=1)[1]
    grads_2nd = torch.autograd.grad(sum((second[n] * v[n]).sum() for n in names), [x, scale])
    assert all(float(g.abs().sum()) > 0 for g in grads_2nd)          # second order: both do reach θ_1


def test_inner_loop_errors_teach():
    model, leaves, names, tasks, loss_fn, lr = setup("mlp")
    params = dict(zip(names, leaves, strict=True))
    x, y = tasks.x_support[0], tasks.y_support[0]
    with pytest.raises(TypeError, match="letter by letter"):
        inner_loop(model, params, x, y, loss_fn=loss_fn, inner_lr=lr, inner_steps=1, adapt="head")
    with pytest.raises(KeyError, match="does not have"):
        inner_loop(model, params, x, y, loss_fn=loss_fn, inner_lr=lr, inner_steps=1, adapt=["head.w"])
    with pytest.raises(ValueError, match="one entry per step"):
        inner_loop(model, params, x, y, loss_fn=loss_fn, inner_lr=[0.1, 0.1], inner_steps=3)
    with pytest.raises(KeyError, match="no rate"):
        inner_loop(model, params, x, y, loss_fn=loss_fn, inner_lr={"head.bias": 0.1}, inner_steps=1)
    for bad in (torch.full((3,), 0.1, dtype=F64), torch.full((16, 2), 0.1, dtype=F64)):
        # (3,) would silently turn head.bias (1,) into a (3,) tensor; (16, 2) fits no parameter at all
        with pytest.raises(ValueError, match="does not broadcast to the parameter's shape"):
            inner_loop(model, params, x, y, loss_fn=loss_fn, inner_lr=bad, inner_steps=1)
    with pytest.raises(ValueError, match="non-negative integer"):
        query_losses(model, params, tasks, loss_fn=loss_fn, inner_lr=lr, inner_steps=-1)
    with pytest.raises(ValueError, match="strategy='vmap' only"):
        maml.meta_loss(model, params, tasks, loss_fn=loss_fn, inner_lr=lr, inner_steps=1, strategy="loop",
                       chunk_size=2)
    with pytest.raises(ValueError, match="strategy must be one of"):
        query_losses(model, params, tasks, loss_fn=loss_fn, inner_lr=lr, inner_steps=1, strategy="pmap")
    with pytest.raises(ValueError, match="eval_steps"):
        query_losses(model, params, tasks, loss_fn=loss_fn, inner_lr=lr, inner_steps=1, eval_steps=[2])
    with pytest.raises(TypeError, match="TaskBatch"):
        query_losses(model, params, (x, y), loss_fn=loss_fn, inner_lr=lr, inner_steps=1)


# --- No weight swapping in the algorithm files ---------------------------------------------------------

MLCORE = Path(__file__).resolve().parents[1] / "mlcore"
ALGORITHM_FILES = ["inner.py", "maml.py", "metasgd.py", "anil.py", "reptile.py", "protonet.py", "matching.py"]
FORBIDDEN = {r"\.data\s*[-+*/]?=(?!=)": "assignment through .data", r"\.data\.copy_\(": ".data.copy_",
             r"load_state_dict\(": "load_state_dict", r"deepcopy\(": "deepcopy"}


def code_without_strings_and_comments(source: str) -> str:
    """The source with every string literal and comment blanked (docstrings may name the idioms)."""
    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    chars = list(source)
    blank = {tokenize.STRING, tokenize.COMMENT, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in blank:
            begin, end = starts[tok.start[0] - 1] + tok.start[1], starts[tok.end[0] - 1] + tok.end[1]
            chars[begin:end] = [c if c == "\n" else " " for c in chars[begin:end]]
    return "".join(chars)


def forbidden_idioms(source: str) -> list[str]:
    code = code_without_strings_and_comments(source)
    return [what for pattern, what in FORBIDDEN.items() if re.search(pattern, code)]


def test_the_scanner_catches_weight_swaps_in_code_but_not_in_docs():
    assert forbidden_idioms("p.data = q\n") == ["assignment through .data"]
    assert forbidden_idioms("p.data -= lr * g\n") == ["assignment through .data"]
    assert forbidden_idioms("w.data.copy_(v)\nm.load_state_dict(s)\nc = copy.deepcopy(m)\n") == [
        ".data.copy_", "load_state_dict", "deepcopy"]
    assert forbidden_idioms('"""never p.data = q"""\n# or deepcopy(m)\nok = p.data == q\n') == []


def test_algorithm_files_never_swap_weights():
    present = [name for name in ALGORITHM_FILES if (MLCORE / name).exists()]
    assert {"inner.py", "maml.py", "metasgd.py", "anil.py", "reptile.py"} <= set(present)
    found = {name: forbidden_idioms((MLCORE / name).read_text()) for name in present}
    assert not any(found.values()), f"weight swapping cuts the meta-gradient: {found}"
