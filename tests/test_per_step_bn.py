"""MAML++'s per-step batch norm (BNWB and BNRS, Antoniou et al. 2019, §4): ``Conv4(per_step_bn=S)``, float64.

The oracles: the plain batch-statistics Conv4 (per-step γ_j = γ), a second implementation written out here
with explicit ``F.batch_norm`` calls and step indices (``torch.autograd.grad(create_graph=True)``), central
finite differences, vmap against the per-task loop, and running statistics folded by hand.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracles import F64, image_tasks, leaf_params
from torch.func import functional_call

from mlcore import anil, inner, maml, metasgd
from mlcore.models import Conv4, PerStepBatchNorm2d, inner_step, per_step_norms, use_running_stats
from mlcore.tasks import TaskBatch

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

S = 3
ALPHA = 0.3
CONVS = ("body.0", "body.4", "body.8", "body.12")   # Conv4's conv layers; its norm layers follow each: body.1, …
NORMS = ("body.1", "body.5", "body.9", "body.13")
NORM_PARAMS = {f"{n}.{p}" for n in NORMS for p in ("weight", "bias")}   # γ_j, β_j: (S, C) each


def build(steps: int | None = S, seed: int = 0) -> tuple[Conv4, dict[str, torch.Tensor], TaskBatch]:
    """A 3-way Conv4 (4 channels, 16×16 inputs) with distinct random γ_j, β_j per step, its leaves and 2 tasks."""
    torch.manual_seed(seed)
    model = Conv4(1, 3, hidden=4, image_size=16, per_step_bn=steps).to(F64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in NORMS:
            layer = model.get_submodule(name)
            layer.weight.copy_(1 + 0.3 * torch.randn(layer.weight.shape, generator=g, dtype=F64))
            layer.bias.copy_(0.3 * torch.randn(layer.bias.shape, generator=g, dtype=F64))
    tasks = image_tasks(2, n_way=3, k_shot=2, n_query=2, size=16, generator=torch.Generator().manual_seed(seed))
    return model, leaf_params(model), tasks


def lslr(params: dict[str, torch.Tensor], steps: int = S) -> list[dict[str, torch.Tensor]]:
    """MAML++ per-step per-layer rates, different per step (so that a wrong step index shows)."""
    return [{n: torch.tensor(ALPHA * (1 - 0.2 * j), dtype=F64, requires_grad=True) for n in params}
            for j in range(steps)]


def hand_net(theta: dict[str, torch.Tensor], x: torch.Tensor, j: int, record: list | None = None) -> torch.Tensor:
    """Conv4 with per-step batch norm written out: conv → F.batch_norm (batch statistics) → γ_j, β_j → ReLU → pool."""
    for conv, norm in zip(CONVS, NORMS, strict=True):
        x = F.conv2d(x, theta[f"{conv}.weight"], theta[f"{conv}.bias"], padding=1)
        if record is not None:
            record.append((norm, j, x.detach()))
        x = F.batch_norm(x, None, None, training=True, eps=1e-5)
        x = x * theta[f"{norm}.weight"][j][:, None, None] + theta[f"{norm}.bias"][j][:, None, None]
        x = F.max_pool2d(F.relu(x), 2)
    return F.linear(x.flatten(1), theta["head.weight"], theta["head.bias"])


def hand_meta_loss(params, tasks, rates, *, step_weights=None, first_order=False, record=None) -> torch.Tensor:
    """The MAML++ objective unrolled by hand: γ_j, β_j not adapted; support at step j and the query after the
    update both use index j; the final query uses S − 1."""
    moving = [n for n in params if n not in NORM_PARAMS]
    total = 0
    for i in range(tasks.meta_batch):
        xs, ys, xq, yq = tasks.x_support[i], tasks.y_support[i], tasks.x_query[i], tasks.y_query[i]
        theta, task = dict(params), 0
        for j, rate in enumerate(rates):
            loss = F.cross_entropy(hand_net(theta, xs, j, record), ys)
            grads = torch.autograd.grad(loss, [theta[n] for n in moving], create_graph=not first_order)
            theta = {**theta, **{n: theta[n] - rate[n] * g for n, g in zip(moving, grads, strict=True)}}
            if step_weights is not None:
                task = task + step_weights[j] * F.cross_entropy(hand_net(theta, xq, j, record), yq)
        if step_weights is None:
            task = F.cross_entropy(hand_net(theta, xq, len(rates) - 1, record), yq)
        total = total + task
    return total / tasks.meta_batch


def grads_of(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors, allow_unused=True, materialize_grads=True))


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


# ----------------------------------------------------------------------------------------------- 1
@pytest.mark.parametrize("msl", [False, True], ids=["final-step", "multi-step-loss"])
def test_per_step_bn_with_equal_gammas_is_plain_batch_norm(msl):
    """γ_j = γ, β_j = β for every j: the same meta-loss and meta-gradient (Σ_j ∂/∂γ_j = ∂/∂γ) as the
    shared-γ BatchStatNorm2d network whose γ, β are not adapted either."""
    model, params, tasks = build()
    torch.manual_seed(0)
    plain = Conv4(1, 3, hidden=4, image_size=16, norm="batch").to(F64)   # same seed: same conv and head weights
    shared = {n: (p[0] if n in NORM_PARAMS else p).detach().clone().requires_grad_() for n, p in params.items()}
    with torch.no_grad():
        for n in NORMS:
            for part in ("weight", "bias"):
                params[f"{n}.{part}"].copy_(shared[f"{n}.{part}"].expand(S, -1))
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=F64) if msl else None
    ours = maml.meta_loss(model, params, tasks, loss_fn=F.cross_entropy, inner_lr=ALPHA, inner_steps=S,
                          step_weights=weights, strategy="loop")
    moving = [n for n in shared if n not in NORM_PARAMS]
    at = list(range(1, S + 1)) if msl else None
    losses = inner.query_losses(plain, shared, tasks, loss_fn=F.cross_entropy, inner_lr=ALPHA, inner_steps=S,
                                adapt=moving, eval_steps=at, strategy="loop")
    reference = (losses @ weights).mean() if msl else losses.mean()
    assert abs(float((ours - reference).detach())) <= 1e-12
    g_ours = dict(zip(params, grads_of(ours, list(params.values())), strict=True))
    g_ref = dict(zip(shared, grads_of(reference, list(shared.values())), strict=True))
    folded = [g_ours[n].sum(0) if n in NORM_PARAMS else g_ours[n] for n in params]
    assert max_diff(folded, [g_ref[n] for n in params]) <= 1e-12
    assert all(float(g_ours[f"{n}.weight"].abs().min()) > 0 for n in NORMS)


# ----------------------------------------------------------------------------------------------- 2
@pytest.mark.parametrize("msl", [False, True], ids=["final-step", "multi-step-loss"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_matches_a_hand_unrolled_implementation(msl, first_order):
    """Meta-loss and the gradient w.r.t. every parameter (each γ_j, β_j) and every per-step rate (MAML++
    LSLR), against the explicit unrolled computation: ≤ 1e-10."""
    model, params, tasks = build()
    rates = lslr(params)
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=F64) if msl else None
    ours = maml.meta_loss(model, params, tasks, loss_fn=F.cross_entropy, inner_lr=rates, inner_steps=S,
                          step_weights=weights, first_order=first_order, strategy="loop")
    hand = hand_meta_loss(params, tasks, rates, step_weights=weights, first_order=first_order)
    assert abs(float((ours - hand).detach())) <= 1e-10
    wrt = [*params.values(), *(r for step in rates for r in step.values())]
    g_ours, g_hand = grads_of(ours, wrt), grads_of(hand, wrt)
    assert max_diff(g_ours, g_hand) <= 1e-10
    # meta_backward (task by task into .grad) gives the same gradient
    for t in wrt:
        t.grad = None
    maml.meta_backward(model, params, tasks, loss_fn=F.cross_entropy, inner_lr=rates, inner_steps=S,
                       step_weights=weights, first_order=first_order, strategy="loop")
    assert max_diff([t.grad if t.grad is not None else torch.zeros_like(t) for t in wrt], g_hand) <= 1e-10


def test_metasgd_matches_the_hand_unrolled_implementation():
    model, params, tasks = build()
    g = torch.Generator().manual_seed(3)
    alpha = {n: (ALPHA * (0.5 + torch.rand(p.shape, generator=g, dtype=F64))).requires_grad_()
             for n, p in params.items()}
    ours = metasgd.meta_loss(model, params, tasks, loss_fn=F.cross_entropy, inner_lr=alpha, inner_steps=S,
                             strategy="loop")
    hand = hand_meta_loss(params, tasks, [alpha] * S)
    assert abs(float((ours - hand).detach())) <= 1e-10
    wrt = [*params.values(), *alpha.values()]
    assert max_diff(grads_of(ours, wrt), grads_of(hand, wrt)) <= 1e-10


def test_gradient_of_one_gamma_entry_matches_finite_differences():
    model, params, tasks = build()
    name, index = "body.5.weight", (1, 2)      # γ_1 of the second norm layer, channel 2

    def f() -> torch.Tensor:
        return maml.meta_loss(model, params, tasks, loss_fn=F.cross_entropy, inner_lr=ALPHA, inner_steps=S,
                              step_weights=[0.2, 0.3, 0.5], strategy="loop")

    analytic = float(torch.autograd.grad(f(), params[name])[0][index])
    h = 1e-6
    with torch.no_grad():
        params[name][index] += h
        plus = float(f())
        params[name][index] -= 2 * h
        minus = float(f())
        params[name][index] += h
    numeric = (plus - minus) / (2 * h)
    assert abs(analytic) > 1e-4
    assert abs(analytic - numeric) <= 1e-7 * abs(analytic)


# ----------------------------------------------------------------------------------------------- 3
@pytest.mark.parametrize(("query_at", "first_order", "used"), [
    (1, False, {0}),            # L_query(θ_1): the step-0 support and query forwards only
    (2, False, {0, 1}),         # L_query(θ_2): steps 0 and 1
    (3, False, {0, 1, 2}),      # the usual objective, second order: every step
    (3, True, {2}),             # first order: the support gradients are constants; only the final query (index 2)
])
def test_each_gamma_row_gets_gradient_only_through_its_own_steps(query_at, first_order, used):
    model, params, tasks = build()
    losses = inner.query_losses(model, params, tasks, loss_fn=F.cross_entropy, inner_lr=ALPHA, inner_steps=S,
                                first_order=first_order, eval_steps=[query_at], strategy="loop")
    names = [f"{n}.{p}" for n in NORMS for p in ("weight", "bias")]
    for name, g in zip(names, grads_of(losses.mean(), [params[n] for n in names]), strict=True):
        for j in range(S):
            norm = float(g[j].abs().max())
            assert (norm > 1e-8) if j in used else (norm == 0.0), (name, j, norm)


# ----------------------------------------------------------------------------------------------- 4
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("running", [False, True], ids=["batch-stats", "running-stats"])
def test_vmap_equals_the_per_task_loop(first_order, running):
    model, params, tasks = build()
    model.eval()                       # no running-statistics update: vmap is allowed
    if running:
        with torch.no_grad():
            for layer in per_step_norms(model).values():
                layer.running_mean.normal_(0, 0.1)
                layer.running_var.uniform_(0.5, 1.5)
        use_running_stats(model)
    rates = lslr(params)
    wrt = [*params.values(), *(r for step in rates for r in step.values())]
    results = {}
    for how in ("loop", "vmap"):
        loss = maml.meta_loss(model, params, tasks, loss_fn=F.cross_entropy, inner_lr=rates, inner_steps=S,
                              step_weights=[0.2, 0.3, 0.5], first_order=first_order, strategy=how)
        results[how] = (loss, grads_of(loss, wrt))
    assert abs(float((results["loop"][0] - results["vmap"][0]).detach())) <= 1e-12
    assert max_diff(results["loop"][1], results["vmap"][1]) <= 1e-12
    out = {how: maml.predict(model, params, tasks, loss_fn=F.cross_entropy, inner_lr=ALPHA, inner_steps=S,
                             strategy=how) for how in ("loop", "vmap")}
    assert float((out["loop"] - out["vmap"]).abs().max()) <= 1e-12


def test_predict_in_training_mode_uses_vmap_and_leaves_running_stats_unchanged():
    model, params, tasks = build()
    before = {n: b.clone() for n, b in model.named_buffers()}
    loop = maml.predict(model, params, tasks, loss_fn=F.cross_entropy, inner_lr=ALPHA, inner_steps=S, strategy="loop")
    vmap = maml.predict(model, params, tasks, loss_fn=F.cross_entropy, inner_lr=ALPHA, inner_steps=S, strategy="vmap")
    assert float((loop - vmap).abs().max()) <= 1e-12
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())


# ----------------------------------------------------------------------------------------------- 5
@pytest.mark.parametrize("msl", [False, True], ids=["final-step", "multi-step-loss"])
def test_running_stats_are_the_momentum_average_of_each_steps_batch_statistics(msl):
    """BNRS: m_j, v_j fold, with momentum 0.1, the batch mean and unbiased variance of exactly the forwards
    at index j, in order: task 0's support (and query) forwards at step j, then task 1's."""
    model, params, tasks = build()
    weights = [0.2, 0.3, 0.5] if msl else None
    maml.meta_backward(model, params, tasks, loss_fn=F.cross_entropy, inner_lr=ALPHA, inner_steps=S,
                       step_weights=weights, strategy="auto")          # auto: the loop (statistics are updated)
    record: list = []
    hand_meta_loss(params, tasks, [dict.fromkeys(params, ALPHA)] * S, step_weights=weights, record=record)
    for norm in NORMS:
        layer = model.get_submodule(norm)
        for j in range(S):
            mean, var = torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64)
            seen = [x for n, k, x in record if n == norm and k == j]
            assert len(seen) == (4 if msl or j == S - 1 else 2)       # 2 tasks × (support [+ query])
            for x in seen:
                mean = 0.9 * mean + 0.1 * x.mean((0, 2, 3))
                var = 0.9 * var + 0.1 * x.var((0, 2, 3), correction=1)
            assert float((layer.running_mean[j] - mean).abs().max()) <= 1e-12
            assert float((layer.running_var[j] - var).abs().max()) <= 1e-12


def test_evaluation_with_running_stats_is_not_transductive():
    model, params, tasks = build()
    for _ in range(2):                  # collect some statistics
        maml.meta_backward(model, params, tasks, loss_fn=F.cross_entropy, inner_lr=ALPHA, inner_steps=S)
    alone = TaskBatch(tasks.x_support, tasks.y_support, tasks.x_query[:, :1], tasks.y_query[:, :1])

    def first_query_logits(batch: TaskBatch) -> torch.Tensor:
        return maml.predict(model, params, batch, loss_fn=F.cross_entropy, inner_lr=ALPHA, inner_steps=S)[:, 0]

    model.eval()
    transductive = float((first_query_logits(tasks) - first_query_logits(alone)).abs().max())
    use_running_stats(model)
    running = float((first_query_logits(tasks) - first_query_logits(alone)).abs().max())
    assert transductive > 1e-6          # batch statistics: the other queries change the first one's logits
    assert running <= 1e-12             # running statistics: they do not


# ----------------------------------------------------------------------------------------------- 6
def test_misuse_raises_errors_that_say_what_is_allowed():
    model, params, tasks = build()
    x = tasks.x_support[0]
    kw = dict(loss_fn=F.cross_entropy, inner_lr=ALPHA)
    with pytest.raises(ValueError, match=r"(?s)inner_steps=2.*per_step_bn=2"):
        maml.meta_loss(model, params, tasks, inner_steps=2, **kw)
    with pytest.raises(ValueError, match=r"inner_steps=4"):
        maml.predict(model, params, tasks, inner_steps=4, **kw)
    with pytest.raises(ValueError, match=r"inner_steps=1"):
        maml.adapt(model, params, x, tasks.y_support[0], inner_steps=1, **kw)
    with pytest.raises(RuntimeError, match=r"(?s)inner-step index.*inner_step\(j\).*0\.\.2"):
        model(x)
    with pytest.raises(ValueError, match=r"built for 3 inner steps.*called at step 3"), inner_step(3):
        model(x)
    with pytest.raises(ValueError, match="non-negative integer"), inner_step(-1):
        pass
    with pytest.raises(ValueError, match=r"(?s)strategy='vmap'.*running statistics.*model\.eval\(\)"):
        maml.meta_loss(model, params, tasks, inner_steps=S, strategy="vmap", **kw)
    with pytest.raises(RuntimeError, match="cannot update its running statistics"), inner_step(0):
        torch.func.vmap(lambda xs: functional_call(model, params, (xs,)))(tasks.x_support)
    with pytest.raises(ValueError, match="compile= does not support MAML\\+\\+ per-step batch norm"):
        maml.meta_backward(model, params, tasks, inner_steps=S, compile=True, **kw)
    with pytest.raises(ValueError, match="needs norm='batch'"):
        Conv4(norm="group", per_step_bn=2)
    with pytest.raises(ValueError, match="per_step_bn is the number of inner steps"):
        Conv4(per_step_bn=0)
    with pytest.raises(ValueError, match="no per-step batch-norm layer"):
        use_running_stats(Conv4())


# ------------------------------------------------------------------------------------- other entry points
def test_gammas_are_meta_learned_only_unless_the_layer_says_inner_adapt():
    model, params, tasks = build()
    theta = maml.adapt(model, params, tasks.x_support[0], tasks.y_support[0], loss_fn=F.cross_entropy,
                       inner_lr=ALPHA, inner_steps=S)
    assert all(theta[f"{n}.{p}"] is params[f"{n}.{p}"] for n in NORMS for p in ("weight", "bias"))
    assert not torch.equal(theta["body.0.weight"], params["body.0.weight"])
    for layer in per_step_norms(model).values():
        layer.inner_adapt = True
    theta = maml.adapt(model, params, tasks.x_support[0], tasks.y_support[0], loss_fn=F.cross_entropy,
                       inner_lr=ALPHA, inner_steps=S)
    assert not torch.equal(theta["body.1.weight"], params["body.1.weight"])


def test_train_step_and_anil_run_with_per_step_bn():
    model, params, tasks = build()
    opt = torch.optim.SGD(params.values(), lr=0.1)
    before = params["body.1.weight"].detach().clone()
    step = maml.train_step(model, params, opt, tasks, loss_fn=F.cross_entropy, inner_lr=ALPHA, inner_steps=S,
                           step_weights=[0.2, 0.3, 0.5])
    assert step.accuracy is not None and not torch.equal(params["body.1.weight"], before)
    assert float(model.body[1].running_mean.abs().min()) > 0
    assert isinstance(model.body[1], PerStepBatchNorm2d)
    # ANIL: the body's features differ from step to step, so they are not reused; the generic path is exact
    loss = anil.meta_loss(model, params, tasks, head="head", loss_fn=F.cross_entropy, inner_lr=ALPHA, inner_steps=S)
    assert not anil.can_reuse_features(model, params, anil.head_names(params, "head"))
    with pytest.raises(ValueError, match="no per-step batch"):
        anil.meta_loss(model, params, tasks, head="head", loss_fn=F.cross_entropy, inner_lr=ALPHA, inner_steps=S,
                       reuse_features=True)
    assert torch.isfinite(loss)
