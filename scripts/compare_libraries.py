"""Chapter 8's library comparison: the same MAML meta-gradient through each library that installs here.

    PYTHONPATH=/tmp/libs python scripts/compare_libraries.py      # higher, torchopt installed in /tmp/libs

(``pip install -e ".[compare]"``, or ``pip install --target /tmp/libs --no-deps higher==0.2.1 torchopt==0.7.3 optree graphviz``; neither is a
dependency of this book, and learn2learn 0.2.0 fails to build on Python 3.11.) Writes
results/maml_in_practice/libraries.json: for every implementation, whether it imports, its meta-gradient's
relative error against mlcore in float64 (second and first order), the median time of one meta-gradient
step in float32 and the peak bytes of live tensors (``mlcore.complexity.count``), on Conv4 (32 channels,
batch-statistics norm), 5-way 1-shot, 5 queries per class, B = 4 tasks, S = 1, random 28×28 images,
one thread. All rows run in one process, interleaved round by round.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mlcore import baselines, maml
from mlcore.complexity import count
from mlcore.models import Conv4
from mlcore.tasks import TaskBatch

OUT = Path(__file__).resolve().parent.parent / "results" / "maml_in_practice" / "libraries.json"


def problem(dtype: torch.dtype, hidden: int, meta_batch: int, seed: int = 0) -> baselines.Problem:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Conv4(1, 5, hidden=hidden).to(dtype)
    xs = torch.randn(meta_batch, 5, 1, 28, 28, generator=g, dtype=dtype)
    xq = torch.randn(meta_batch, 25, 1, 28, 28, generator=g, dtype=dtype)
    ys = torch.arange(5).repeat(meta_batch, 1)
    yq = torch.arange(5).repeat_interleave(5).repeat(meta_batch, 1)
    return baselines.Problem(model, TaskBatch(xs, ys, xq, yq), F.cross_entropy, inner_lr=0.4, inner_steps=1)


def mlcore_step(p: baselines.Problem, first_order: bool):
    params = dict(p.model.named_parameters())
    return lambda: maml.meta_backward(p.model, params, p.tasks, loss_fn=p.loss_fn, inner_lr=p.inner_lr,
                                      inner_steps=p.inner_steps, first_order=first_order)


def higher_default_step(p: baselines.Problem, first_order: bool):
    """higher with its default copy_initial_weights=True: what a first try with the library does."""
    import higher
    t, inner_opt = p.tasks, torch.optim.SGD(p.model.parameters(), lr=p.inner_lr)

    def step() -> None:
        for i in range(t.meta_batch):
            with higher.innerloop_ctx(p.model, inner_opt) as (fmodel, diffopt):
                for _ in range(p.inner_steps):
                    diffopt.step(p.loss_fn(fmodel(t.x_support[i]), t.y_support[i]))
                (p.loss_fn(fmodel(t.x_query[i]), t.y_query[i]) / t.meta_batch).backward()
    return step


def torchopt_step(p: baselines.Problem, first_order: bool):
    """TorchOpt's OOP MAML pattern: MetaSGD steps the module in place, recover_state_dict undoes them."""
    import torchopt
    if first_order:
        raise NotImplementedError("torchopt.MetaSGD differentiates through its steps; first order needs "
                                  "torchopt.stop_gradient on the module, not measured here")
    t, inner_opt = p.tasks, torchopt.MetaSGD(p.model, lr=p.inner_lr)

    def step() -> None:
        state = torchopt.extract_state_dict(p.model)
        opt_state = torchopt.extract_state_dict(inner_opt)
        for i in range(t.meta_batch):
            for _ in range(p.inner_steps):
                inner_opt.step(p.loss_fn(p.model(t.x_support[i]), t.y_support[i]))
            (p.loss_fn(p.model(t.x_query[i]), t.y_query[i]) / t.meta_batch).backward()
            torchopt.recover_state_dict(p.model, state)
            torchopt.recover_state_dict(inner_opt, opt_state)
    return step


ROWS = {
    "mlcore (maml.meta_backward)": mlcore_step,
    "torch.func (vmap over grad)": baselines.functorch_recipe_step,
    "higher 0.2.1 (copy_initial_weights=False)": baselines.higher_step,
    "higher 0.2.1 (default copy_initial_weights=True)": higher_default_step,
    "TorchOpt 0.7.3 (MetaSGD + recover_state_dict)": torchopt_step,
}


def grad_of(build, p: baselines.Problem, first_order: bool) -> torch.Tensor:
    p.model.zero_grad(set_to_none=True)
    build(p, first_order)()
    return torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).flatten()
                      for q in p.model.parameters()])


def main() -> int:
    torch.set_num_threads(1)
    rows: dict[str, dict] = {name: {} for name in ROWS}
    for name, build in ROWS.items():
        for order, fo in (("second", False), ("first", True)):
            try:
                ref = grad_of(mlcore_step, problem(torch.float64, 8, 2), fo)
                g = grad_of(build, problem(torch.float64, 8, 2), fo)
                rows[name][f"rel_err_{order}_order_float64"] = float((g - ref).norm() / ref.norm())
            except ImportError as e:
                rows[name]["error"] = f"not installed: {e}"
            except NotImplementedError as e:
                rows[name][f"rel_err_{order}_order_float64"] = None
                rows[name][f"note_{order}_order"] = str(e)
    # time and memory, second order, float32, interleaved
    runnable = [n for n in ROWS if "error" not in rows[n] and rows[n].get("rel_err_second_order_float64") is not None]
    probs = {n: problem(torch.float32, 32, 4) for n in runnable}
    steps = {n: ROWS[n](probs[n], False) for n in runnable}
    for n in runnable:
        steps[n]()                      # warm-up
        probs[n].model.zero_grad(set_to_none=True)
        _, peak = count(steps[n])
        rows[n]["peak_live_tensor_MB_B4"] = round(peak / 2**20, 1)
    times: dict[str, list[float]] = {n: [] for n in runnable}
    for _ in range(7):
        for n in runnable:
            probs[n].model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - start)
    for n in runnable:
        rows[n]["ms_per_meta_step_B4_median"] = round(1000 * float(torch.tensor(times[n]).median()), 1)
        print(n, rows[n], flush=True)
    try:
        import torchopt
        accelerated = bool(torchopt.accelerated_op_available(torch.device("cpu")))
    except ImportError as e:  # reported, not hidden: the rows above say whether torchopt imports at all
        accelerated = f"unavailable: {type(e).__name__}"
    out = {"rows": rows, "torchopt_accelerated_op_cpu": accelerated,
           "setting": "Conv4 32 channels (float64 checks: 8 channels, B=2), 5-way 1-shot, 5 queries/class, "
                      "B=4, S=1, alpha=0.4, random images; relative error ‖g − g_mlcore‖/‖g_mlcore‖",
           "produced_by": "PYTHONPATH=/tmp/libs python scripts/compare_libraries.py",
           "environment": {"torch": torch.__version__, "python": platform.python_version(), "threads": 1,
                           "load_average": round(os.getloadavg()[0], 2)}}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
