"""ANIL (mlcore.anil): the body IS meta-learned; only the head moves in the inner loop.

Oracles: float64 finite differences over every parameter (body included); the feature-reuse path
against the generic path (full network at every inner step); a hand-written ANIL with
torch.autograd.grad(create_graph=True) in a Python loop.
"""
from __future__ import annotations

import pytest
import torch
from oracles import F64, FD_TOL, conv4_problem, directional_fd_error, sine_problem

from mlcore import anil
from mlcore.inner import inner_loop

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def setup(kind: str, seed: int = 0, dtype: torch.dtype = F64):
    """(model, leaf params, tasks, loss_fn, inner_lr) for a tiny sine MLP or a tiny Conv4 with a norm layer."""
    if kind == "mlp":
        problem, lr = sine_problem((8, 8), meta_batch=3, k_shot=5, n_query=6, seed=seed, dtype=dtype), 0.05
    else:                                                    # B=2 tasks, 3-way 1-shot, 2 queries per class
        problem, lr = conv4_problem(kind.split("-")[1], meta_batch=2, seed=seed, dtype=dtype), 0.5
    model, params, tasks = problem
    return model, params, tasks, problem.loss_fn, lr


KINDS = ["mlp", "conv-batch", "conv-group"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("inner_steps,reuse", [(1, None), (3, None), (2, False)],
                         ids=["K1-reuse", "K3-reuse", "K2-generic"])
def test_meta_gradient_over_body_and_head_matches_finite_differences(kind, strategy, inner_steps, reuse):
    model, params, tasks, loss_fn, lr = setup(kind)
    names = list(params)

    def f(ts):
        return anil.meta_loss(model, dict(zip(names, ts, strict=True)), tasks, head="head", loss_fn=loss_fn,
                              inner_lr=lr, inner_steps=inner_steps, strategy=strategy, reuse_features=reuse)
    assert directional_fd_error(f, list(params.values()), torch.Generator().manual_seed(1)) < FD_TOL


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("strategy,chunk_size", [("loop", None), ("vmap", None), ("vmap", 1)])
@pytest.mark.parametrize("first_order", [False, True])
def test_feature_reuse_equals_the_generic_path(kind, strategy, chunk_size, first_order):
    model, params, tasks, loss_fn, lr = setup(kind)
    leaves = list(params.values())
    results = []
    for reuse in (True, False):
        for p in leaves:
            p.grad = None
        loss, outputs = anil.meta_backward(model, params, tasks, head="head", loss_fn=loss_fn, inner_lr=lr,
                                           inner_steps=3, first_order=first_order, strategy=strategy,
                                           chunk_size=chunk_size, reuse_features=reuse)
        results.append((loss, outputs, [p.grad for p in leaves]))
    (loss_a, out_a, grad_a), (loss_b, out_b, grad_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out_a, out_b, rtol=1e-12, atol=1e-14)
    for name, a, b in zip(params, grad_a, grad_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kind", KINDS)
def test_the_body_receives_a_meta_gradient(kind):
    """A common implementation computes body features under no_grad: its body never learns. Every body
    tensor must get a meta-gradient."""
    model, params, tasks, loss_fn, lr = setup(kind)
    loss = anil.meta_loss(model, params, tasks, head="head", loss_fn=loss_fn, inner_lr=lr, inner_steps=2)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    # A conv bias right before batch normalisation cancels in the mean subtraction: its gradient is
    # exactly zero for every algorithm, so only the other tensors are checked there.
    cancelled = {f"body.{4 * i}.bias" for i in range(4)} if kind == "conv-batch" else set()
    assert all(grads[n].abs().max() > 1e-8 for n in params if n not in cancelled), \
        {n: float(g.abs().max()) for n, g in grads.items()}
    # ... and part of it flows through the inner loop (the head's adaptation depends on the body's features).
    fo = anil.meta_loss(model, params, tasks, head="head", loss_fn=loss_fn, inner_lr=lr, inner_steps=2,
                        first_order=True)
    fo_body = torch.autograd.grad(fo, params["body.0.weight"])[0]
    assert (fo_body - grads["body.0.weight"]).norm() > 1e-3 * grads["body.0.weight"].norm()


def test_head_only_inner_loop_leaves_the_body_unchanged():
    model, params, tasks, loss_fn, lr = setup("conv-batch")
    head = anil.head_names(params, "head")
    trajectory = inner_loop(model, params, tasks.x_support[0], tasks.y_support[0], loss_fn=loss_fn, inner_lr=lr,
                            inner_steps=3, adapt=head)
    for k, theta in enumerate(trajectory[1:], start=1):
        assert all(theta[n] is params[n] for n in params if n not in head), f"a body tensor moved at step {k}"
        assert all(not torch.equal(theta[n], trajectory[k - 1][n]) for n in head), f"the head froze at step {k}"


def test_matches_a_hand_written_anil():
    """Body features with gradient tracking; K head steps with autograd.grad(create_graph=True); mean query loss."""
    model, params, tasks, loss_fn, lr = setup("mlp")
    body = [params["body.0.weight"], params["body.0.bias"], params["body.2.weight"], params["body.2.bias"]]

    def features(x):
        h = torch.relu(x @ body[0].T + body[1])
        return torch.relu(h @ body[2].T + body[3])
    losses = []
    for i in range(tasks.meta_batch):
        w, b = params["head.weight"], params["head.bias"]
        fs, fq = features(tasks.x_support[i]), features(tasks.x_query[i])
        for _ in range(3):
            gw, gb = torch.autograd.grad(loss_fn(fs @ w.T + b, tasks.y_support[i]), (w, b), create_graph=True)
            w, b = w - lr * gw, b - lr * gb
        losses.append(loss_fn(fq @ w.T + b, tasks.y_query[i]))
    expected = torch.stack(losses).mean()
    got = anil.meta_loss(model, params, tasks, head="head", loss_fn=loss_fn, inner_lr=lr, inner_steps=3)
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-15)
    leaves = list(params.values())
    for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(expected, leaves), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14)


def test_per_parameter_and_per_step_rates_reach_the_head_module():
    """Rates keyed by full names ('head.weight') must be renamed for the head module, not dropped."""
    model, params, tasks, loss_fn, _ = setup("mlp")
    rates = [{"head.weight": torch.tensor(0.02, dtype=F64), "head.bias": torch.tensor(0.07, dtype=F64)},
             {"head.weight": torch.tensor(0.05, dtype=F64), "head.bias": torch.tensor(0.01, dtype=F64)}]
    kwargs = dict(head="head", loss_fn=loss_fn, inner_lr=rates, inner_steps=2)
    fast = anil.meta_loss(model, params, tasks, reuse_features=True, **kwargs)
    torch.testing.assert_close(fast, anil.meta_loss(model, params, tasks, reuse_features=False, **kwargs),
                               rtol=1e-13, atol=1e-15)
    assert abs(float((fast - anil.meta_loss(model, params, tasks, head="head", loss_fn=loss_fn, inner_lr=0.02,
                                            inner_steps=2)).detach())) > 1e-8


def test_predict_adapts_only_the_head_and_is_detached():
    model, params, tasks, loss_fn, lr = setup("conv-group")
    out = anil.predict(model, params, tasks, head="head", loss_fn=loss_fn, inner_lr=lr, inner_steps=2)
    assert out.shape == (2, 6, 3) and not out.requires_grad
    _, expected = anil.meta_backward(model, params, tasks, head="head", loss_fn=loss_fn, inner_lr=lr,
                                     inner_steps=2, reuse_features=False)
    torch.testing.assert_close(out, expected.detach(), rtol=1e-12, atol=1e-14)


def test_head_names():
    model, params, _, _, _ = setup("mlp")
    assert anil.head_names(params, "head") == ("head.weight", "head.bias")
    assert anil.head_names(params, "body.2") == ("body.2.weight", "body.2.bias")
    assert anil.head_names(params, {"head.bias", "head.weight"}) == ("head.weight", "head.bias")
    with pytest.raises(KeyError, match=r"matches no parameter name; available: \['body.0.weight'"):
        anil.head_names(params, "classifier")
    with pytest.raises(KeyError, match="matches no parameter"):
        anil.head_names(params, "hea")                       # a prefix is a module path, not a string prefix
    with pytest.raises(KeyError, match=r"\['fc.weight'\] are not parameters; available"):
        anil.head_names(params, ["head.weight", "fc.weight"])
    with pytest.raises(KeyError, match="not parameters"):
        anil.head_names(params, [])
    with pytest.raises(ValueError, match="that is MAML"):
        anil.head_names(params, list(params))
    with pytest.raises(TypeError, match="name prefix"):
        anil.head_names(params, 3)


def test_another_adapted_layer_uses_the_generic_path():
    """Adapting a middle layer is allowed (generic path, still exact); feature reuse cannot apply there."""
    model, params, tasks, loss_fn, lr = setup("mlp")
    names = list(params)

    def f(ts):
        return anil.meta_loss(model, dict(zip(names, ts, strict=True)), tasks, head="body.2", loss_fn=loss_fn,
                              inner_lr=lr, inner_steps=2)
    assert directional_fd_error(f, list(params.values()), torch.Generator().manual_seed(1)) < FD_TOL
    with pytest.raises(ValueError, match="reuse_features=True needs"):
        anil.meta_loss(model, params, tasks, head="body.2", loss_fn=loss_fn, inner_lr=lr, inner_steps=2,
                       reuse_features=True)


@pytest.mark.parametrize("reuse", [True, False])
def test_bad_input_raises(reuse):
    model, params, tasks, loss_fn, lr = setup("mlp")
    kwargs = dict(head="head", loss_fn=loss_fn, reuse_features=reuse)
    with pytest.raises(ValueError, match="inner_lr must be a positive"):
        anil.meta_loss(model, params, tasks, inner_lr=0.0, inner_steps=1, **kwargs)
    with pytest.raises(ValueError, match="inner_steps must be a non-negative integer"):
        anil.meta_loss(model, params, tasks, inner_lr=lr, inner_steps=-1, **kwargs)
    with pytest.raises(TypeError, match="float64 but the task inputs are torch.float32"):
        anil.meta_loss(model, params, tasks.to(dtype=torch.float32), inner_lr=lr, inner_steps=1, **kwargs)
    with pytest.raises(KeyError, match="missing"):
        anil.meta_loss(model, {n: p for n, p in params.items() if n != "body.0.bias"}, tasks, inner_lr=lr,
                       inner_steps=1, **kwargs)
    with pytest.raises(ValueError, match="strategy='vmap' only"):
        anil.meta_loss(model, params, tasks, inner_lr=lr, inner_steps=1, strategy="loop", chunk_size=1, **kwargs)


def test_divergence_raises_unless_asked_not_to():
    model, params, tasks, loss_fn, _ = setup("mlp", dtype=torch.float32)
    from mlcore.inner import InnerLoopDivergedError
    kwargs = dict(head="head", loss_fn=loss_fn, inner_lr=1e12, inner_steps=6)
    with pytest.raises(InnerLoopDivergedError, match="diverged"):
        anil.meta_loss(model, params, tasks, **kwargs)
    assert not torch.isfinite(anil.meta_loss(model, params, tasks, check_finite=False, **kwargs))
