"""Precompute the longer grids of chapter 8, "MAML in practice" (book/08_maml_in_practice.ipynb).

Each part writes one JSON file under results/maml_in_practice/ that the chapter reads:

    python scripts/maml_in_practice.py sine-fixes       # MAML++ fixes one by one on sine, 3 seeds
    python scripts/maml_in_practice.py sine-fixes --configs 0,1  # a subset (rows of SINE_FIXES): run
                                                        # subsets in parallel, each to its own file
    python scripts/maml_in_practice.py sine-edge        # the same fixes at alpha = 0.1, where MAML diverges
    python scripts/maml_in_practice.py sine-grids       # alpha x S_train and B x beta on sine, 3 seeds
    python scripts/maml_in_practice.py omniglot-fixes   # the MAML++ fixes on Omniglot (S = 3), 3 seeds
    python scripts/maml_in_practice.py omniglot-extra   # BatchNorm at test time, alpha grid, Meta-SGD,
                                                        # a pre-trained embedding baseline, 3 seeds

One thread (``torch.set_num_threads(1)``), CPU, deterministic seeded generators: the same command gives
the same file. Every run of a seed starts from the same initial weights (``torch.manual_seed(seed)``) and
sees the same training tasks (a generator seeded with ``seed``); every configuration is scored on the
same fixed test tasks, so differences between configurations can be paired by seed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlcore import maml, metasgd, protonet
from mlcore.checks import InnerLoopDivergedError
from mlcore.models import MLP, BatchStatNorm2d, Conv4, use_running_stats
from mlcore.tasks import SineTasks

OUT = Path(__file__).resolve().parent.parent / "results" / "maml_in_practice"
SMOKE = os.environ.get("MIP_SMOKE") == "1"   # 3 steps, 1 seed, output to /tmp: checks the script runs


def budget(steps: int, seeds: list[int]) -> tuple[int, list[int]]:
    return (7, seeds[:1]) if SMOKE else (steps, seeds)

# ---------------------------------------------------------------- the MAML++ options as schedules


def msl_weights(it: int, steps: int, inner_steps: int, anneal_fraction: float = 0.5) -> list[float]:
    """Multi-step loss weights w_1..w_S at outer step ``it``: uniform at the start, annealed linearly
    to the last step only over the first ``anneal_fraction`` of training (our schedule; Antoniou et
    al. 2019, §4, anneal towards the last step as well)."""
    lam = min(1.0, it / (anneal_fraction * steps))
    return [(1 - lam) / inner_steps + (lam if j == inner_steps - 1 else 0.0) for j in range(inner_steps)]


def make_run(cfg: dict, params: dict[str, Tensor], steps: int):
    """Optimiser, scheduler, inner rates and per-step options of one configuration."""
    alpha, S, beta = cfg["alpha"], cfg["S"], cfg["beta"]
    if cfg.get("metasgd"):
        rates: object = metasgd.init_inner_lrs(params, alpha)
        extra = list(rates.values())
    elif cfg.get("lslr"):
        rates = maml.per_step_learning_rates(params, alpha, S)
        extra = [r for step in rates for r in step.values()]
    else:
        rates, extra = alpha, []
    opt = torch.optim.Adam([*params.values(), *extra], lr=beta)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.01 * beta) \
        if cfg.get("cosine") else None
    return rates, opt, sched


def train(cfg: dict, model: nn.Module, sample, loss_fn, steps: int) -> dict:
    """The outer loop, written out: returns the learned rates, grad norms, losses, divergence."""
    params = dict(model.named_parameters())
    rates, opt, sched = make_run(cfg, params, steps)
    S = cfg["S"]
    grad_norms, losses, seconds, diverged_at = [], [], [], None
    for it in range(steps):
        tasks = sample()
        weights = msl_weights(it, steps, S) if cfg.get("msl") and S > 1 else None
        first_order = cfg.get("first_order", False) or \
            (cfg.get("da") and it < cfg.get("da_fraction", 1 / 3) * steps)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        try:
            out = maml.meta_backward(model, params, tasks, loss_fn=loss_fn, inner_lr=rates, inner_steps=S,
                                     first_order=bool(first_order), step_weights=weights)
        except InnerLoopDivergedError:
            diverged_at = it
            break
        gn = torch.cat([p.grad.flatten() for p in params.values()]).norm().item()   # ‖∇_θ‖ of θ only
        if not math.isfinite(gn) or not math.isfinite(out.loss.item()):
            diverged_at = it
            break
        opt.step()
        if sched is not None:
            sched.step()
        seconds.append(time.perf_counter() - start)
        grad_norms.append(gn)
        losses.append(out.loss.item())
    return {"params": params, "rates": rates, "grad_norms": grad_norms, "losses": losses,
            "diverged_at": diverged_at, "ms_per_step": 1000 * float(torch.tensor(seconds[5:] or [0.0]).median())}


def spikes(grad_norms: list[float], factor: float = 10.0, window: int = 50) -> int:
    """Steps whose gradient norm exceeds ``factor`` × the median of the previous ``window`` steps."""
    g = torch.tensor(grad_norms)
    return sum(int(g[i] > factor * g[max(0, i - window):i].median()) for i in range(min(window, len(g) - 1) or 1, len(g)))


def window(values: list[float], size: int, how: str) -> list[float]:
    v = torch.tensor(values)
    chunks = [v[i:i + size] for i in range(0, len(v), size)]
    f = {"mean": torch.mean, "max": torch.max, "median": torch.median}[how]
    return [round(float(f(c)), 5) for c in chunks]


def summary(run: dict, win: int) -> dict:
    g = run["grad_norms"]
    return {"diverged_at": run["diverged_at"], "steps_done": len(g), "ms_per_step": round(run["ms_per_step"], 2),
            "grad_norm_median": round(float(torch.tensor(g).median()), 5) if g else None,
            "grad_norm_max": round(max(g), 5) if g else None, "spikes_10x": spikes(g) if g else None,
            "grad_norm_max_per_window": window(g, win, "max") if g else [],
            "grad_norm_median_per_window": window(g, win, "median") if g else [],
            "loss_per_window": window(run["losses"], win, "mean") if g else []}


def rates_detached(rates: object) -> object:
    if isinstance(rates, Tensor):
        return rates.detach()
    if isinstance(rates, dict):
        return {k: v.detach() for k, v in rates.items()}
    if isinstance(rates, list):
        return [rates_detached(r) for r in rates]
    return rates


# ---------------------------------------------------------------- sine

SINE = {"K": 10, "Q": 10, "B": 25, "alpha": 0.01, "S": 1, "beta": 1e-3}


def sine_eval_set():
    return SineTasks().fixed_eval_set(n_tasks=200, k_shot=10, n_query=100, seed=1234)[0]


def sine_test_mse(model, params, rates, S_test: int, tasks) -> float:
    """Mean query MSE over the 200 tasks × 100 points; NaN (recorded as such) if the test-time loop diverges."""
    try:
        out = maml.predict(model, params, tasks, loss_fn=F.mse_loss, inner_lr=rates_detached(rates),
                           inner_steps=S_test)
    except InnerLoopDivergedError:
        return math.nan
    return float(((out - tasks.y_query) ** 2).mean())


def sine_run(cfg: dict, seed: int, steps: int, eval_steps: list[int] | None = None) -> dict:
    torch.manual_seed(seed)
    model = MLP(1, (40, 40), 1)
    g = torch.Generator().manual_seed(seed)
    sine = SineTasks()
    run = train(cfg, model, lambda: sine.sample(cfg["B"], cfg["K"], cfg["Q"], generator=g), F.mse_loss, steps)
    rec = {"seed": seed, **summary(run, 25)}
    tasks = sine_eval_set()
    if run["diverged_at"] is None:
        if eval_steps is None:
            rec["test_mse"] = round(sine_test_mse(model, run["params"], run["rates"], cfg["S"], tasks), 5)
        else:
            rec["test_mse_at"] = {str(s): round(sine_test_mse(model, run["params"], run["rates"], s, tasks), 5)
                                  for s in eval_steps}
    if cfg.get("lslr"):
        rec["learned_rates"] = [{n: round(float(r), 5) for n, r in step.items()} for step in run["rates"]]
    return rec


SINE_FIXES = {   # one budget: S = 5, alpha = 0.03 (plain MAML's gradient norm spikes there), 300 steps
    "MAML": {},
    "+ multi-step loss": {"msl": True},
    "+ LSLR": {"lslr": True},
    "+ derivative-order annealing": {"da": True},
    "+ cosine annealing of beta": {"cosine": True},
    "all four": {"msl": True, "lslr": True, "da": True, "cosine": True},
}


def part_sine_fixes(configs: list[int] | None = None, alpha: float = 0.03) -> dict:
    base = {**SINE, "S": 5, "alpha": alpha}
    steps, seeds = budget(300, [0, 1, 2])
    runs = {}
    for i, (name, fix) in enumerate(SINE_FIXES.items()):
        if configs is not None and i not in configs:
            continue
        runs[name] = []
        for seed in seeds:
            runs[name].append(sine_run({**base, **fix}, seed, steps))
            r = runs[name][-1]
            print(f"sine-fixes {name:32s} seed {seed}: test MSE {r.get('test_mse')}  max|g| {r['grad_norm_max']}"
                  f"  spikes {r['spikes_10x']}  {r['ms_per_step']} ms/step", flush=True)
    return {"config": {**base, "steps": steps, "seeds": seeds, "test": "200 fixed tasks (seed 1234), K=10, 100 "
                       "query points each", "da_fraction": 1 / 3, "msl_anneal_fraction": 0.5,
                       "cosine_eta_min": "0.01 beta"}, "runs": runs}


SINE_ALPHAS, SINE_STEPS = (0.003, 0.01, 0.03, 0.1, 0.3), (1, 3, 5, 10)
SINE_BATCHES, SINE_BETAS = (1, 5, 25, 100), (1e-4, 1e-3, 1e-2, 1e-1)


def part_sine_grids() -> dict:
    """Two grids on sine, 3 seeds, one budget (300 outer steps each):

    - alpha x S_train (B = 25, beta = 1e-3), tested with S_test = S_train and with S_test = 10;
    - B x beta (alpha = 0.01, S = 1), tested with S_test = 1 and 10. A larger B sees more tasks in the
      same number of steps: the grid holds the number of steps fixed, as a practitioner's budget would.
    """
    steps, seeds = budget(300, [0, 1, 2])
    a_s, b_b = [], []
    for alpha in SINE_ALPHAS:
        for S in SINE_STEPS:
            for seed in seeds:
                rec = sine_run({**SINE, "alpha": alpha, "S": S}, seed, steps, eval_steps=sorted({S, 10}))
                a_s.append({"alpha": alpha, "S": S, **{k: v for k, v in rec.items() if "per_window" not in k}})
                print(f"sine-grids alpha={alpha} S={S} seed {seed}: {rec.get('test_mse_at')} "
                      f"diverged {rec['diverged_at']} max|g| {rec['grad_norm_max']}", flush=True)
    for B in SINE_BATCHES:
        for beta in SINE_BETAS:
            for seed in seeds:
                rec = sine_run({**SINE, "B": B, "beta": beta}, seed, steps, eval_steps=[1, 10])
                b_b.append({"B": B, "beta": beta, **{k: v for k, v in rec.items() if "per_window" not in k}})
                print(f"sine-grids B={B} beta={beta} seed {seed}: {rec.get('test_mse_at')} "
                      f"diverged {rec['diverged_at']}", flush=True)
    return {"config": {**SINE, "steps": steps, "seeds": seeds, "test": "200 fixed tasks (seed 1234), K=10, 100 "
                       "query points each"}, "alpha_S": a_s, "B_beta": b_b}


def part_sine_edge(configs: list[int] | None = None) -> dict:
    """The same fixes at the edge of divergence: S = 5, alpha = 0.1, where plain MAML diverges on two of
    three seeds in the alpha x S grid (the sine-grids part)."""
    return part_sine_fixes(configs, alpha=0.1)


# ---------------------------------------------------------------- Omniglot

OMNI = {"N": 5, "K": 1, "Q": 5, "B": 4, "alpha": 0.4, "S": 1, "beta": 3e-3, "hidden": 32}
N_TEST = 20 if SMOKE else 100


def omniglot():
    from mlcore.data.omniglot import load_omniglot
    from mlcore.episodes import EpisodeSampler
    x_tr, y_tr = load_omniglot(split="train", progress=False)
    x_te, y_te = load_omniglot(split="test", progress=False)

    def sampler(x, y, q, seed):
        return EpisodeSampler(x, y, n_way=5, k_shot=1, n_query=q, generator=torch.Generator().manual_seed(seed))
    return x_tr, y_tr, x_te, y_te, sampler


def episode_stats(scores: Tensor, tasks) -> dict:
    """Accuracy, mean max-softmax confidence and predicted-class spread of query scores (B, Q, N)."""
    p = scores.softmax(-1)
    pred = p.argmax(-1)
    acc = (pred == tasks.y_query).double().mean(1)                          # (B,)
    conf = p.max(-1).values.double().mean(1)                                # (B,)
    counts = F.one_hot(pred, scores.shape[-1]).double().mean(1)             # (B, N) share of each class
    return {"acc": acc, "conf": conf, "top_class_share": counts.max(-1).values}


def omni_test(predict, sampler_fn, x_te, y_te) -> dict:
    s = sampler_fn(x_te, y_te, 10, 0)                       # the same 100 test episodes for every model
    acc, conf, top = [], [], []
    for _ in range(N_TEST // 20):
        tasks = s.sample(20)
        st = episode_stats(predict(tasks).detach(), tasks)
        acc.append(st["acc"])
        conf.append(st["conf"])
        top.append(st["top_class_share"])
    acc, conf, top = torch.cat(acc), torch.cat(conf), torch.cat(top)
    return {"acc": round(float(acc.mean()), 5), "ci95": round(float(1.96 * acc.std() / math.sqrt(len(acc))), 5),
            "confidence": round(float(conf.mean()), 5), "top_class_share": round(float(top.mean()), 5),
            "per_episode": [round(float(a), 4) for a in acc]}


def omni_model(cfg, seed, norm="batch"):
    torch.manual_seed(seed)
    # MAML++ per-step batch norm: (S, C) scales and shifts (BNWB) and running statistics (BNRS)
    per_step = cfg["S"] if cfg.get("per_step_bn") else None
    return Conv4(1, 5, hidden=cfg["hidden"], norm=norm, per_step_bn=per_step)


def omni_run(cfg: dict, seed: int, steps: int, data, norm="batch", S_test: int | None = None) -> tuple[dict, dict]:
    x_tr, y_tr, x_te, y_te, sampler_fn = data
    model = omni_model(cfg, seed, norm)
    s = sampler_fn(x_tr, y_tr, cfg["Q"], seed)
    run = train(cfg, model, lambda: s.sample(cfg["B"]), F.cross_entropy, steps)
    rec = {"seed": seed, **summary(run, 10)}
    if run["diverged_at"] is None:
        rates = rates_detached(run["rates"])
        params = {n: p.detach() for n, p in run["params"].items()}
        def predict(t):
            return maml.predict(model, params, t, loss_fn=F.cross_entropy, inner_lr=rates,
                                inner_steps=S_test or cfg["S"])
        rec["test"] = omni_test(predict, sampler_fn, x_te, y_te)
        if cfg.get("per_step_bn"):   # BNRS used: each step's running statistics, not transductive
            use_running_stats(model)
            rec["test_running_stats"] = omni_test(predict, sampler_fn, x_te, y_te)
            use_running_stats(model, False)
    return rec, {"model": model, "params": run["params"], "rates": run["rates"]}


class FixedStatNorm2d(nn.Module):
    """BatchStatNorm2d with frozen per-channel statistics (what model.eval() with running statistics does)."""

    def __init__(self, mean: Tensor, var: Tensor, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones_like(mean))
        self.bias = nn.Parameter(torch.zeros_like(mean))
        self.register_buffer("mean", mean)
        self.register_buffer("var", var)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = (x - self.mean[:, None, None]) / torch.sqrt(self.var[:, None, None] + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def with_training_statistics(model: Conv4, params: dict[str, Tensor], images: Tensor) -> Conv4:
    """A copy of ``model`` whose batch norms use statistics of ``images`` under θ (no adaptation)."""
    import copy
    clone = copy.deepcopy(model)   # evaluation copy only: no gradient flows between the two
    norms = [(n, m) for n, m in clone.named_modules() if isinstance(m, BatchStatNorm2d)]
    stats = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=n: stats.__setitem__(name, inp[0]))
             for n, m in norms]
    with torch.no_grad():
        torch.func.functional_call(clone, params, (images,))
    for h in hooks:
        h.remove()
    for name, _ in norms:
        x = stats[name]
        fixed = FixedStatNorm2d(x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False))
        parent, _, child = name.rpartition(".")
        setattr(clone.get_submodule(parent), child, fixed)
    return clone


def part_omniglot_extra() -> dict:
    steps, seeds = budget(150, [0, 1, 2])
    data = omniglot()
    x_tr, y_tr, x_te, y_te, sampler_fn = data
    out: dict = {"config": {**OMNI, "steps": steps, "seeds": seeds, "test": f"{N_TEST} test episodes (sampler "
                            "seed 0), 10 queries per class"}}
    # 1. BatchNorm at meta-test time: one MAML training per norm; batch-norm models evaluated three ways.
    bn = {"batch, transductive": [], "batch, training statistics": [], "batch, one query at a time": [],
          "group": [], "none": []}
    maml_s1 = []
    for seed in seeds:
        for norm in ("batch", "group", "none"):
            rec, st = omni_run(OMNI, seed, steps, data, norm=norm)
            if norm == "batch":
                maml_s1.append(rec)
                bn["batch, transductive"].append(rec)
                g = torch.Generator().manual_seed(100 + seed)
                idx = torch.randint(0, x_tr.shape[0], (2000,), generator=g)
                params = {n: p.detach() for n, p in st["params"].items()}
                fixed = with_training_statistics(st["model"], params, x_tr[idx])
                r2 = {"seed": seed, "test": omni_test(lambda t, fixed=fixed, params=params: maml.predict(
                    fixed, params, t, loss_fn=F.cross_entropy, inner_lr=OMNI["alpha"], inner_steps=OMNI["S"]),
                    sampler_fn, x_te, y_te)}
                bn["batch, training statistics"].append(r2)

                def one_at_a_time(t, model=st["model"], params=params):
                    # adapt on the support set as usual, then score each query image in a batch of its own
                    scores = []
                    for i in range(t.meta_batch):
                        theta = maml.adapt(model, params, t.x_support[i], t.y_support[i], loss_fn=F.cross_entropy,
                                           inner_lr=OMNI["alpha"], inner_steps=OMNI["S"], first_order=True)
                        with torch.no_grad():
                            scores.append(torch.cat([torch.func.functional_call(model, theta, (q[None],))
                                                     for q in t.x_query[i]]))
                    return torch.stack(scores)
                bn["batch, one query at a time"].append({"seed": seed, "test": omni_test(one_at_a_time, sampler_fn,
                                                                                          x_te, y_te)})
            else:
                bn[norm].append(rec)
            print(f"omniglot-extra bn {norm} seed {seed}: " + ", ".join(
                f"{k} {v[-1]['test']['acc']}" for k, v in bn.items() if v and len(v) == seed + 1), flush=True)
    out["batchnorm"] = bn
    # 2. alpha grid (S = 1): divergence, collapsed head, over-confident logits.
    grid = []
    for alpha in (0.04, 0.4, 4.0):
        for seed in seeds:
            rec = maml_s1[seed] if alpha == OMNI["alpha"] else omni_run({**OMNI, "alpha": alpha}, seed, steps, data)[0]
            grid.append({"alpha": alpha, **rec})
            print(f"omniglot-extra alpha={alpha} seed {seed}: {rec.get('test', {}).get('acc')}", flush=True)
    out["alpha_grid"] = grid
    # 3. Meta-SGD (one inner step, learned per-weight rates) against MAML at the same budget.
    msgd = []
    for seed in seeds:
        rec, st = omni_run({**OMNI, "metasgd": True}, seed, steps, data)
        layers = {}
        for name, a in st["rates"].items():
            a = a.detach().flatten()
            q = torch.quantile(a, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95]))
            hist = torch.histc(a.clamp(-1.0, 2.0), bins=30, min=-1.0, max=2.0)
            layers[name] = {"n": a.numel(), "mean": round(float(a.mean()), 5), "std": round(float(a.std()), 5),
                            "min": round(float(a.min()), 5), "max": round(float(a.max()), 5),
                            "negative": round(float((a < 0).double().mean()), 5),
                            "quantiles_5_25_50_75_95": [round(float(v), 5) for v in q],
                            "hist_-1_2_30bins": [int(h) for h in hist]}
        rec["rates"] = layers
        msgd.append(rec)
        print(f"omniglot-extra metasgd seed {seed}: {rec.get('test', {}).get('acc')} {rec['ms_per_step']} ms",
              flush=True)
    out["metasgd"] = msgd
    out["maml_S1"] = [{k: r[k] for k in ("seed", "test", "ms_per_step")} for r in maml_s1]
    # 4. Chen et al. (2019)-style baseline: a Conv4 trained as an ordinary classifier on all training
    # classes, the same number of images per step (B·N·(K+Q) = 120) and of steps; at test time no
    # adaptation: nearest class mean of the support embeddings, cosine similarity.
    base = []
    images_per_step = OMNI["B"] * OMNI["N"] * (OMNI["K"] + OMNI["Q"])
    n_classes = int(y_tr.max()) + 1
    for seed in seeds:
        torch.manual_seed(seed)
        net = Conv4(1, n_classes, hidden=OMNI["hidden"], norm="batch")
        opt = torch.optim.Adam(net.parameters(), lr=OMNI["beta"])
        g = torch.Generator().manual_seed(seed)
        seconds = []
        for _ in range(steps):
            idx = torch.randint(0, x_tr.shape[0], (images_per_step,), generator=g)
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
            seconds.append(time.perf_counter() - start)
        net.eval()
        with torch.no_grad():
            test = omni_test(lambda t, net=net: protonet.predict(net.body, t, n_way=5, distance="cosine"), sampler_fn,
                             x_te, y_te)
        base.append({"seed": seed, "test": test, "ms_per_step": round(1000 * float(torch.tensor(seconds[5:])
                                                                                   .median()), 2)})
        print(f"omniglot-extra pretrained seed {seed}: {test['acc']}", flush=True)
    out["pretrained_baseline"] = {"images_per_step": images_per_step, "classes": n_classes, "runs": base}
    return out


OMNI_FIXES = {   # S = 3 inner steps at alpha = 0.4 (MAML trains with 1): the regime the fixes target
    **SINE_FIXES,   # the same four fixes, then the two that need a network with normalisation layers
    "+ per-step batch norm (BNWB, BNRS)": {"per_step_bn": True},
    "all four + per-step batch norm": {"msl": True, "lslr": True, "da": True, "cosine": True,
                                       "per_step_bn": True},
}


def part_omniglot_fixes(configs: list[int] | None = None) -> dict:
    """The MAML++ fixes one by one on Omniglot 5-way 1-shot, S = 3 in training and at test, 3 seeds,
    the same 100 test episodes for every run (paired by seed and episode)."""
    steps, seeds = budget(300, [0, 1, 2])
    data = omniglot()
    base = {**OMNI, "S": 3}
    runs = {}
    for i, (name, fix) in enumerate(OMNI_FIXES.items()):
        if configs is not None and i not in configs:
            continue
        runs[name] = []
        for seed in seeds:
            rec = omni_run({**base, **fix}, seed, steps, data)[0]
            rec = {k: v for k, v in rec.items() if k != "grad_norm_median_per_window"}
            if fix.get("lslr") and rec.get("diverged_at") is None:
                rec["note"] = "learned rates not stored"
            runs[name].append(rec)
            print(f"omniglot-fixes {name:30s} seed {seed}: {rec.get('test', {}).get('acc')} "
                  f"max|g| {rec['grad_norm_max']} spikes {rec['spikes_10x']} {rec['ms_per_step']} ms/step",
                  flush=True)
    return {"config": {**base, "steps": steps, "seeds": seeds, "test": f"{N_TEST} test episodes (sampler seed "
                       "0), 10 queries per class, S_test = 3", "da_fraction": 1 / 3, "msl_anneal_fraction": 0.5,
                       "cosine_eta_min": "0.01 beta"}, "runs": runs}


PARTS = {"sine-fixes": part_sine_fixes, "sine-edge": part_sine_edge, "sine-grids": part_sine_grids,
         "omniglot-extra": part_omniglot_extra, "omniglot-fixes": part_omniglot_fixes}
CONFIGURABLE = {"sine-fixes": SINE_FIXES, "sine-edge": SINE_FIXES, "omniglot-fixes": OMNI_FIXES}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--configs", help="sine-fixes, sine-edge and omniglot-fixes only: comma-separated "
                        "row numbers of SINE_FIXES / OMNI_FIXES")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    configs = [int(c) for c in args.configs.split(",")] if args.configs else None
    if configs is not None and args.part not in CONFIGURABLE:
        parser.error(f"--configs applies to {' and '.join(CONFIGURABLE)} only, not {args.part}")
    if configs is not None and not all(0 <= c < len(CONFIGURABLE[args.part]) for c in configs):
        parser.error(f"--configs {args.configs}: rows of {args.part} are 0..{len(CONFIGURABLE[args.part]) - 1} "
                     f"({', '.join(CONFIGURABLE[args.part])})")
    result = PARTS[args.part](configs) if configs is not None else PARTS[args.part]()
    suffix = "" if configs is None else "-" + "-".join(map(str, configs))
    result["produced_by"] = f"python scripts/maml_in_practice.py {args.part}" + (
        f" --configs {args.configs}" if configs is not None else "")
    result["environment"] = {"torch": torch.__version__, "python": platform.python_version(), "threads": 1,
                             "device": "cpu", "minutes": round((time.perf_counter() - start) / 60, 1),
                             "load_average_at_end": round(os.getloadavg()[0], 2)}
    out_dir = Path("/tmp/mip_smoke") if SMOKE else OUT
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{args.part}{suffix}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path} in {result['environment']['minutes']} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
