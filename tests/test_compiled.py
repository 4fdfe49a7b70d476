"""The compiled meta-gradient (mlcore.compiled) against the eager per-task loop, in float64.

Oracle: ``meta_backward(strategy="loop")``, the per-task autograd loop (itself checked against finite
differences in tests/test_inner.py); the compiled gradient of every learnable input must agree with it
to 1e-10. Around that: the fallback to eager says why, errors say what is allowed, and the training
command, the GPU script and the bench use the compiled path when asked.

Compile cost on this book's loaded 2-core CPU, with inductor: a few seconds per graph for the MLP; for
Conv4 (2 channels, 16x16 images) 70-160 s at second order with one inner step, 30-70 s at first order,
about 170 s at second order with three. So Conv4 runs through inductor at second order with one inner
step (the graph that holds every kernel of the others: forward, backward and double backward), and the
other three Conv4 cases through ``aot_eager``: dynamo's graph of the same function, functionalised and
decomposed by aot_autograd, executed op by op (everything but inductor's generated kernels).
``MLCORE_COMPILE_TESTS=full`` runs them all through inductor (measured: max abs difference 3.4e-15 /
9.5e-16 with one step, 1.8e-14 / 2.4e-15 with three, second / first order). Tests of the wiring use the
``eager`` backend (dynamo's tracing, no code generation).
"""
from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from oracles import F64, conv4_problem, sine_problem
from torch import nn

from mlcore import anil, cli, compiled, experiment, maml, metasgd
from mlcore.models import MLP
from mlcore.presets import get_preset

pytestmark = pytest.mark.usefixtures("one_thread")
FULL = os.environ.get("MLCORE_COMPILE_TESTS") == "full"
TOL = 1e-10
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Every test compiles from scratch, whatever ran before it (dynamo's caches are process-wide)."""
    compiled.reset()
    yield
    compiled.reset()


@pytest.fixture
def backend(monkeypatch):
    def use(name):
        monkeypatch.setattr(compiled, "BACKEND", name)
    return use


def grads_of(meta_backward, problem, *extra: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
    """{name: .grad} of the params (and of the tensors of ``extra`` dicts, named ``"k:name"``) after one call."""
    model, params, tasks = problem
    tensors = {**params, **{f"{k}:{n}": t for k, d in enumerate(extra) for n, t in d.items()}}
    for t in tensors.values():
        t.grad = None
    meta_backward(model, params, tasks, **kwargs)
    return {n: t.grad.clone() for n, t in tensors.items()}


def assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert got.keys() == want.keys()
    worst = max(float((got[n] - want[n]).abs().max()) for n in want)
    assert worst <= TOL, worst
    return worst


def mlp():
    return sine_problem((8,), meta_batch=3, k_shot=5, n_query=6), 0.01          # MLP 1 -> 8 -> 1


def conv():
    return conv4_problem("batch", meta_batch=2, hidden=2, n_query=1), 0.4     # Conv4, batch statistics, 16x16


# ---------------------------------------------------------------------------------------- exactness
@pytest.mark.slow   # inductor compiles (seconds each)
@pytest.mark.parametrize("first_order", [False, True], ids=["2nd", "1st"])
@pytest.mark.parametrize("inner_steps", [1, 3])
def test_mlp_compiled_meta_gradient_equals_the_eager_loop(inner_steps, first_order):
    problem, lr = mlp()
    kw = dict(loss_fn=F.mse_loss, inner_lr=lr, inner_steps=inner_steps, first_order=first_order)
    want = grads_of(maml.meta_backward, problem, strategy="loop", **kw)
    assert_equal(grads_of(maml.meta_backward, problem, compile=True, **kw), want)
    assert_equal(grads_of(maml.meta_backward, problem, compile=True, **kw), want)   # the reused graph


@pytest.mark.slow
@pytest.mark.parametrize("first_order", [False, True], ids=["2nd", "1st"])
@pytest.mark.parametrize("inner_steps", [1, 3])
def test_conv4_batch_norm_compiled_meta_gradient_equals_the_eager_loop(inner_steps, first_order, backend):
    if (inner_steps > 1 or first_order) and not FULL:
        backend("aot_eager")   # inductor: 30-170 s more per graph here (see the module docstring)
    problem, lr = conv()
    kw = dict(loss_fn=F.cross_entropy, inner_lr=lr, inner_steps=inner_steps, first_order=first_order)
    want = grads_of(maml.meta_backward, problem, strategy="loop", **kw)
    assert_equal(grads_of(maml.meta_backward, problem, compile=True, **kw), want)


@pytest.mark.slow   # inductor compiles (seconds each)
def test_meta_sgd_learned_rates_get_the_exact_gradient():
    problem, _ = mlp()
    alpha = metasgd.init_inner_lrs(problem.params, 0.01)
    kw = dict(loss_fn=F.mse_loss, inner_lr=alpha, inner_steps=2)   # α at both steps: one tensor, two uses
    want = grads_of(metasgd.meta_backward, problem, alpha, strategy="loop", **kw)
    assert_equal(grads_of(metasgd.meta_backward, problem, alpha, compile=True, **kw), want)


@pytest.mark.slow   # inductor compiles (seconds each)
def test_anil_body_and_head_get_the_exact_gradient():
    problem, lr = mlp()
    kw = dict(head="head", loss_fn=F.mse_loss, inner_lr=lr, inner_steps=2)   # feature reuse: an MLP is a BodyHead
    want = grads_of(anil.meta_backward, problem, strategy="loop", **kw)
    got = grads_of(anil.meta_backward, problem, compile=True, **kw)
    assert_equal(got, want)
    assert float(got["body.0.weight"].abs().max()) > 0   # the body is meta-learned through the inner loop


def test_maml_plus_plus_step_weights_per_step_rates_and_chunks(backend):
    backend("aot_eager")   # what composes is checked here; inductor's kernels by the tests above (saves ~10 s)
    problem, lr = mlp()
    rates = maml.per_step_learning_rates(problem.params, lr, 2)
    kw = dict(loss_fn=F.mse_loss, inner_lr=rates, inner_steps=2, step_weights=[0.3, 0.7])
    want = grads_of(maml.meta_backward, problem, *rates, strategy="loop", **kw)
    # 2 tasks, then the last one: two graphs, gradients summed over the chunks
    assert_equal(grads_of(maml.meta_backward, problem, *rates, compile=True, chunk_size=2, **kw), want)


# ------------------------------------------------------------------------- caching, messages, fallback
def test_the_first_call_prints_its_compile_time_once(backend, capsys):
    backend("eager")
    problem, lr = mlp()
    kw = dict(loss_fn=F.mse_loss, inner_lr=lr, inner_steps=1, compile=True)
    for _ in range(3):
        grads_of(maml.meta_backward, problem, **kw)
    printed = capsys.readouterr().err
    assert printed.count("[mlcore.compiled] compiled the meta-gradient") == 1
    assert "3 tasks" in printed and "torch.float64" in printed


def test_a_compiler_failure_falls_back_to_eager_and_says_why(backend):
    def broken(graph, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")
    backend(broken)
    problem, lr = mlp()
    kw = dict(loss_fn=F.mse_loss, inner_lr=lr, inner_steps=2)
    want = grads_of(maml.meta_backward, problem, strategy="loop", **kw)
    with pytest.warns(compiled.CompileFallbackWarning, match="no C.. compiler on this machine.*runs eagerly"):
        got = grads_of(maml.meta_backward, problem, compile=True, **kw)
    assert_equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # remembered: no second attempt, no second warning
        assert_equal(grads_of(maml.meta_backward, problem, compile=True, **kw), want)


def test_dynamos_recompile_limit_is_not_a_silent_fallback(backend):
    backend("eager")
    problem, _ = mlp()
    with torch._dynamo.config.patch(recompile_limit=1):
        grads_of(maml.meta_backward, problem, loss_fn=F.mse_loss, inner_lr=0.01, inner_steps=1, compile=True)
        with pytest.warns(compiled.CompileFallbackWarning, match="recompile.*mlcore.compiled.reset"):
            grads_of(maml.meta_backward, problem, loss_fn=F.mse_loss, inner_lr=0.02, inner_steps=1, compile=True)


def test_a_computed_theta_passes_its_gradient_on(backend):
    """θ = 2φ: the compiled ∂L/∂θ is back-propagated into φ, as the eager per-task backward does."""
    backend("eager")
    (model, params, tasks), lr = mlp()
    kw = dict(loss_fn=F.mse_loss, inner_lr=lr, inner_steps=1)
    results = []
    for how in (dict(strategy="loop"), dict(compile=True)):
        phi = {n: (p.detach() / 2).requires_grad_() for n, p in params.items()}
        maml.meta_backward(model, {n: 2 * v for n, v in phi.items()}, tasks, **kw, **how)
        results.append({n: v.grad for n, v in phi.items()})
    assert_equal(results[1], results[0])


# ----------------------------------------------------------------------------------------- errors
def test_what_compile_cannot_do_is_refused_with_advice(backend):
    backend("eager")
    (model, params, tasks), lr = mlp()
    kw = dict(loss_fn=F.mse_loss, inner_lr=lr, inner_steps=1)
    with pytest.raises(ValueError, match="strategy='loop' contradicts it"):
        maml.meta_backward(model, params, tasks, strategy="loop", compile=True, **kw)
    with pytest.raises(ValueError, match="compile must be False, True or a torch.compile mode"):
        maml.meta_backward(model, params, tasks, compile="fast", **kw)
    with pytest.raises(ValueError, match="nothing to back-propagate"), torch.no_grad():
        maml.meta_backward(model, params, tasks, compile=True, **kw)
    temperature = torch.tensor(2.0, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="not among the params.*gradient would be lost"):
        maml.meta_backward(model, params, tasks, compile=True, **{**kw, "loss_fn": lambda o, y: temperature *
                                                                 F.mse_loss(o, y)})
    dropout = nn.Sequential(MLP(1, (8,), 1), nn.Dropout(0.5)).to(F64)
    with pytest.raises(ValueError, match="dropout"):
        maml.meta_backward(dropout, dict(dropout.named_parameters()), tasks, compile=True, **kw)
    bn_model, bn_params, bn_tasks = conv4_problem("batch", meta_batch=2, hidden=2, n_query=1)
    bn_model.body[1] = nn.BatchNorm2d(2, track_running_stats=False).to(F64)
    with pytest.raises(ValueError, match="WRONG"):
        maml.meta_backward(bn_model, dict(bn_model.named_parameters()), bn_tasks, loss_fn=F.cross_entropy,
                           inner_lr=0.4, inner_steps=1, compile=True)
    with pytest.raises(TypeError, match="compile"):
        maml.meta_loss(model, params, tasks, compile=True, **kw)


# ------------------------------------------------------------------------- the training command, the GPU script
@pytest.fixture
def synthetic_omniglot(monkeypatch):
    def fake(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed({"train": 0, "val": 1, "test": 2}[split])
        return torch.rand(100, 1, 28, 28, generator=g), torch.arange(10).repeat_interleave(10)
    monkeypatch.setattr(experiment, "_omniglot", fake)


TINY = ["--steps", "2", "--val-every", "2", "--val-episodes", "2", "--checkpoint-every", "1", "--hidden", "4",
        "--meta-batch", "2", "--no-progress", "--device", "cpu"]


def test_train_compile_takes_the_compiled_meta_gradient(tmp_path, backend, synthetic_omniglot, capsys):
    backend("eager")
    out = tmp_path / "run"
    assert cli.train_main(["maml-omniglot-5w1s", "--out", str(out), *TINY, "--compile"]) == 0
    captured = capsys.readouterr()
    assert "compiled meta-gradient (mode 'default')" in captured.out
    assert captured.err.count("[mlcore.compiled] compiled the meta-gradient") == 1   # step 0 only
    (session,) = [json.loads(line) for line in (out / "sessions.jsonl").read_text().splitlines()]
    assert session["compile"] == "default"
    for argv, message in ((["protonet-omniglot-1shot", "--compile"], "MAML family"),
                          (["maml-omniglot-5w1s", "--compile-mode", "reduce-overhead"], "pass --compile too")):
        with pytest.raises(SystemExit):
            cli.train_main([*argv, "--out", str(tmp_path / "x"), *TINY])
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="MAML family"):
        experiment.build(get_preset("protonet-omniglot-1shot"), compile=True)


def test_gpu_script_compiles_the_maml_family_at_toy_size(tmp_path, backend, synthetic_omniglot, capsys):
    backend("eager")
    spec = importlib.util.spec_from_file_location("gpu_train", ROOT / "scripts" / "gpu_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plan = "anil-omniglot-5w1s:1,reptile-omniglot-5w1s:1"
    assert module.main([str(tmp_path), "--budget", "60", "--tiny", "--device", "cpu", "--presets", plan,
                        "--compile"]) == 0
    rows = json.loads((tmp_path / "gpu_train_summary.json").read_text())["rows"]
    assert [(r["preset"], r["compiled"], r["steps"]) for r in rows] == [
        ("anil-omniglot-5w1s", True, 6), ("reptile-omniglot-5w1s", False, 6)]
    assert capsys.readouterr().err.count("[mlcore.compiled] compiled the meta-gradient") == 1
