"""mlcore.complexity and mlcore.workloads: counts that are exact, and cost workloads that are exact.

FLOPs and peak tensor bytes depend only on shapes, so they are compared exactly (or to the bytes of a
copy of θ); nothing here is timed except the smoke test that the timing path runs.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from oracles import F64
from torch.func import functional_call

from mlcore import complexity, workloads
from mlcore.bench import relative_error
from mlcore.models import MLP, Conv4
from mlcore.tasks import SineTasks
from mlcore.workloads import Workload

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = Workload(hidden=4, image_size=16, n_query=1, meta_batch=2)


def counted(base: Workload, **axis) -> list[complexity.Record]:
    return complexity.measure(complexity.grid(base, **axis), time=False)


def test_maml_flops_and_memory_are_affine_in_the_inner_steps_fomaml_memory_is_not():
    steps = [1, 2, 3, 5]
    maml_rows = counted(TINY, inner_steps=steps)
    fomaml_rows = counted(replace(TINY, method="FOMAML"), inner_steps=steps)
    theta_mb = maml_rows[0].n_params * 4 / 2**20          # one float32 copy of θ
    for rows in (maml_rows, fomaml_rows):
        flops = [r.flops for r in rows]
        per_step = flops[1] - flops[0]
        assert per_step > 0
        assert flops == [flops[0] + per_step * (s - 1) for s in steps]   # exactly affine in S
    maml_mb = [r.peak_mb for r in maml_rows]
    maml_slope = maml_mb[1] - maml_mb[0]
    for s, mb in zip(steps, maml_mb, strict=True):   # linear, up to a copy of θ per step
        assert mb == pytest.approx(maml_mb[0] + maml_slope * (s - 1), abs=(s - 1) * theta_mb)
    fomaml_mb = [r.peak_mb for r in fomaml_rows]
    assert max(fomaml_mb) - min(fomaml_mb) <= 4 * theta_mb * (steps[-1] - 1)   # only copies of θ
    assert maml_slope > 10 * (fomaml_mb[-1] - fomaml_mb[0]) / (steps[-1] - 1)
    assert maml_rows[0].flops > fomaml_rows[0].flops   # the Hessian-vector products


def test_counts_are_deterministic_and_meta_backward_keeps_one_task():
    a, b = counted(TINY, meta_batch=[1, 3]), counted(TINY, meta_batch=[1, 3])
    assert [(r.flops, r.peak_mb) for r in a] == [(r.flops, r.peak_mb) for r in b]
    assert a[1].flops == 3 * a[0].flops                       # linear in B
    whole = counted(replace(TINY, variant="whole graph"), meta_batch=[1, 3])
    assert whole[0].peak_mb == pytest.approx(a[0].peak_mb, rel=0.05)   # one task: the same graph
    assert whole[1].peak_mb > 2 * a[1].peak_mb                # B graphs alive against one


def test_checkpointed_maml_is_exact_and_flat_in_memory():
    w = replace(TINY, inner_steps=3)
    step, model = workloads.build(w, dtype=F64)
    step()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    checkpointed, model2 = workloads.build(replace(w, variant="checkpoint"), dtype=F64)
    checkpointed()
    grads = {n: p.grad for n, p in model2.named_parameters()}
    assert relative_error(grads, reference) < 1e-10
    plain, ckpt = counted(TINY, inner_steps=[1, 6]), counted(replace(TINY, variant="checkpoint"), inner_steps=[1, 6])
    assert ckpt[1].peak_mb - ckpt[0].peak_mb < (plain[1].peak_mb - plain[0].peak_mb) / 3
    assert ckpt[1].flops > plain[1].flops                      # the recomputation


def test_conjugate_gradient_solves_a_small_system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=F64)
    a = m @ m.T + torch.eye(6, dtype=F64)
    b = torch.randn(6, generator=g, dtype=F64)
    x = workloads.conjugate_gradient(lambda u: a @ u, b, steps=30)
    assert torch.allclose(x, torch.linalg.solve(a, b), atol=1e-10)


def test_imaml_meta_gradient_matches_a_direct_solve():
    """Oracle: φ by the same proximal gradient descent, written out; H by torch.func.hessian; the
    system (I + H/λ) x = ∇L_q(φ) solved directly; x averaged over tasks."""
    torch.manual_seed(0)
    model = MLP(1, (5,), 1).to(F64)
    tasks = SineTasks().sample(2, 5, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    params = dict(model.named_parameters())
    alpha, steps, lam = 0.05, 4, 10.0
    n = sum(p.numel() for p in params.values())
    workloads.imaml_meta_backward(model, params, tasks, loss_fn=F.mse_loss, inner_lr=alpha, inner_steps=steps,
                                  cg_steps=3 * n, lam=lam)
    got = torch.cat([p.grad.reshape(-1) for p in params.values()])

    theta = torch.cat([p.detach().reshape(-1) for p in params.values()])
    shapes = {k: p.shape for k, p in params.items()}

    def loss(vec, x, y):
        parts = dict(zip(shapes, vec.split([s.numel() for s in shapes.values()]), strict=True))
        return F.mse_loss(functional_call(model, {k: parts[k].view(shapes[k]) for k in shapes}, (x,)), y)

    expected = torch.zeros_like(theta)
    for i in range(tasks.meta_batch):
        xs, ys, xq, yq = tasks.x_support[i], tasks.y_support[i], tasks.x_query[i], tasks.y_query[i]
        phi = theta.clone()
        for _ in range(steps):
            phi = phi - alpha * (torch.func.grad(loss)(phi, xs, ys) + lam * (phi - theta))
        h = torch.func.hessian(loss)(phi, xs, ys)
        x = torch.linalg.solve(torch.eye(n, dtype=F64) + h / lam, torch.func.grad(loss)(phi, xq, yq))
        expected += x / tasks.meta_batch
    assert float((got - expected).norm() / expected.norm()) < 1e-8


def test_every_method_runs_and_the_floor_is_one_forward_backward():
    rows = counted(replace(TINY, inner_steps=2), method=list(workloads.METHODS))
    by = {r.workload.method: r for r in rows}
    assert list(by) == list(workloads.METHODS)
    assert all(r.flops > 0 and r.peak_mb > 0 for r in rows)
    # ProtoNet and Matching: one forward and backward of the body over the same images as the floor;
    # the floor has the head's matrix product on top.
    assert by["ProtoNet"].flops <= by["gradient"].flops
    assert by["MAML"].flops > by["FOMAML"].flops > by["Reptile"].flops
    assert by["MAML"].n_params == by["gradient"].n_params == Conv4(1, 5, hidden=4, image_size=16).embedding_dim * 5 \
        + 5 + sum(p.numel() for p in Conv4(1, None, hidden=4, image_size=16).parameters())


def test_measure_times_rows_and_records_are_tidy():
    rows = complexity.measure([TINY, replace(TINY, method="ProtoNet")], repeats=1, warmup=0)
    assert all(r.time_ms > 0 for r in rows)
    row = rows[0].row()
    assert row["method"] == "MAML" and row["label"] == "MAML" and row["gflop"] == rows[0].flops / 1e9
    assert replace(TINY, strategy="vmap", chunk_size=2).label == "MAML (vmap, chunk=2)"
    hvp = complexity.hvp_cost(TINY, time=False)
    assert 2 <= hvp["flop_ratio"] <= 5 and hvp["time_ratio"] is None


def test_workload_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="method must be one of"):
        Workload(method="MAML++")
    with pytest.raises(ValueError, match="MAML and FOMAML only"):
        Workload(method="ANIL", variant="checkpoint")
    with pytest.raises(ValueError, match="no strategy"):
        Workload(method="ProtoNet", strategy="vmap")


def test_fits():
    slope, intercept, r2 = complexity.linear_fit([1, 2, 3], [5.0, 7.0, 9.0])
    assert (slope, intercept, r2) == pytest.approx((2.0, 3.0, 1.0))
    p, r2 = complexity.loglog_fit([1, 10, 100], [3.0, 300.0, 30000.0])
    assert (p, r2) == pytest.approx((2.0, 1.0))
    with pytest.raises(ValueError, match="two equally long"):
        complexity.linear_fit([1], [2.0])
    with pytest.raises(ValueError, match="positive"):
        complexity.loglog_fit([0, 1], [1.0, 2.0])


@pytest.mark.slow
def test_complexity_bench_prints_every_table(tmp_path, capsys):
    from mlcore import bench
    out = tmp_path / "c.json"
    report = bench.main(["complexity", "--device", "cpu", "--hidden", "4", "--meta-batch", "1", "--steps", "1,2",
                         "--widths", "4,8", "--repeats", "1", "--warmup", "0", "--inner-steps", "2",
                         "--json", str(out)])
    printed = capsys.readouterr().out
    for method in workloads.METHODS:
        assert method in printed
    assert "log-log slopes" in printed and "MAML (checkpoint)" in printed and "MAML (vmap, chunk=2)" in printed
    assert len(report["records"]) == 9 + 2 * 7 + 2 * 5 + 4
    assert out.exists()
