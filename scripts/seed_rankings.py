"""Several training seeds for the rankings of chapters 5 and 6 (book/05_reptile.ipynb, book/06_anil.ipynb).

Both chapters train each method once, from one seed, and compare the methods on fixed test tasks. A
confidence interval over test episodes says how well one trained network was measured, not whether
another training run would come out in the same order. This script retrains every method of the two
chapters, with the chapters' own settings and mlcore functions, for 5 seeds:

    ch5  sine waves: Reptile, FOMAML, MAML, 600 meta-iterations of 10 tasks, S = 5 SGD steps at
         α = 0.02 (training and test), Reptile ε = 1, Adam 1e-3; scored by the query MSE of 200 fixed
         test tasks (seed 1234) after 0, 1 and 5 steps.
         Omniglot 5-way 1-shot, Conv4 with 32 channels, meta-batch 4: Reptile 90 iterations (3 steps at
         α = 0.2 on 5 images per class, ε annealed 1 → 0, 10 test steps), FOMAML 230 and MAML 150
         (1 step at α = 0.4, Adam 3e-3, 5 queries per class, 3 test steps).
    ch6  Omniglot 5-way 1-shot, Conv4-32, meta-batch 4, 150 meta-iterations of MAML and of ANIL (1 step
         at α = 0.4, Adam 3e-3); every row of the chapter's table (MAML-trained network with its full
         inner loop, head-only and no inner loop; ANIL-trained network with head-only and no inner loop;
         the untrained network with no inner loop), with 3 test steps, and MAML's and ANIL's test-step
         study (1, 3 and 10 steps).

Seed s fixes the initial weights (``torch.manual_seed(s)``) and the training task stream (a generator
seeded as the chapter seeds it for its one run, shifted by s: ch5 s + 1, ch6 s), and every method of
one seed shares both, so seed 0 is the chapters' own run. The untrained initialisation of each seed is
the floor. The test tasks are fixed and shared by all seeds and methods: the 200 sine test tasks, and on
Omniglot the protocol of chapters 4 to 7, 200 test episodes with 5 query images per class drawn by
``evaluate(..., seed=0)``, with batch statistics taken over each episode's images (transductive). So a
difference between two methods is paired twice, by seed and by test episode, and the results store
every test task's (episode's) score.

    python scripts/seed_rankings.py ch5 ch6   # writes results/seed_rankings/ch5.json and ch6.json

Each part takes about 6–7 minutes on one thread of a busy two-core CPU (seed 0 reproduces the chapters'
live numbers exactly). One thread, CPU, deterministic: the same command gives the same files. Runs are
saved as they finish and skipped when the file already holds them, so an interrupted run resumes where
it stopped.
``SR_SMOKE=1`` runs 3 meta-iterations, 2 seeds and 20 test episodes of everything to /tmp (checks the
script).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from mlcore import anil, maml, protonet
from mlcore.data.omniglot import load_omniglot
from mlcore.episodes import EpisodeSampler
from mlcore.evaluate import evaluate
from mlcore.inner import query_losses
from mlcore.models import MLP, Conv4
from mlcore.reptile import reptile_step
from mlcore.tasks import SineTasks

SMOKE = os.environ.get("SR_SMOKE") == "1"
OUT = Path("/tmp/seed_rankings_smoke") if SMOKE else \
    Path(__file__).resolve().parent.parent / "results" / "seed_rankings"
COMMAND = "python scripts/seed_rankings.py ch5 ch6"
SEEDS = [0, 1] if SMOKE else [0, 1, 2, 3, 4]

# The test protocol of chapters 4-7 on Omniglot (and the 200 sine test tasks of chapter 5).
TEST_EPISODES = 20 if SMOKE else 200
TEST_QUERY = 5                       # query images per class in a test episode
N_WAY, K_SHOT, HIDDEN = 5, 1, 32

# Chapter 5, sine (cell "Sine waves: Reptile next to MAML and FOMAML").
SINE = dict(iterations=3 if SMOKE else 600, meta_batch=10, k_shot=10, n_query=10, inner_lr=0.02,
            inner_steps=5, outer_lr=1.0, meta_lr=1e-3, test_tasks=200, test_query=100, test_seed=1234)
# Chapter 5, Omniglot (cell "Omniglot: 5-way 1-shot classification").
CH5_OMNI = dict(meta_batch=4, maml_iterations=3 if SMOKE else 150, fomaml_iterations=3 if SMOKE else 230,
                maml_inner_lr=0.4, maml_train_steps=1, maml_test_steps=3, maml_meta_lr=3e-3, train_query=5,
                reptile_iterations=3 if SMOKE else 90, reptile_train_shots=5, reptile_inner_lr=0.2,
                reptile_train_steps=3, reptile_test_steps=10, reptile_outer_lr=1.0)
# Chapter 6 (cell "Data and the CPU budget").
CH6 = dict(meta_batch=4, iterations=3 if SMOKE else 150, meta_lr=3e-3, inner_lr=0.4, train_steps=1,
           test_steps=3, train_query=5, step_study=[1, 3, 10])


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread"


def part_doc(part: str) -> str:
    """The docstring's description of one part, on one line."""
    block = __doc__.split("\n\n")[2]
    text = block.split("    ch6  ")[0].split("    ch5  ")[1] if part == "ch5" else block.split("    ch6  ")[1]
    return " ".join(text.split())


class Store:
    """One JSON results file: runs keyed by name, written atomically after every run."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {**header, "runs": {}}

    def add_seeds(self, seeds: list[int]) -> None:
        """Record the seeds this command asked for (the chapters read the file's list)."""
        self.data["seeds"] = sorted(set(self.data["seeds"]) | set(seeds))

    def __contains__(self, key: str) -> bool:
        return key in self.data["runs"]

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.data["runs"][key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.path)


def omniglot_result(predict: Callable, test_sampler: EpisodeSampler, seconds: float | None = None) -> dict:
    acc = evaluate(predict, test_sampler, n_episodes=TEST_EPISODES, meta_batch=20, seed=0)
    out = {"mean": acc.mean, "ci95": acc.ci95, "per_episode": [round(a, 4) for a in acc.per_episode.tolist()]}
    return out if seconds is None else {**out, "train_seconds": round(seconds, 1)}


def test_sampler_for(x_test, y_test) -> EpisodeSampler:
    return EpisodeSampler(x_test, y_test, n_way=N_WAY, k_shot=K_SHOT, n_query=TEST_QUERY,
                          generator=torch.Generator())


# ----------------------------------------------------------------------------------------------------- ch5

def sine_mse(model, params, tasks) -> torch.Tensor:
    """Per-task query MSE after 0, 1, ..., S SGD steps on the support set: (n_tasks, S + 1)."""
    frozen = {n: p.detach() for n, p in params.items()}
    with torch.no_grad():
        return query_losses(model, frozen, tasks, loss_fn=F.mse_loss, inner_lr=SINE["inner_lr"],
                            inner_steps=SINE["inner_steps"], first_order=True,
                            eval_steps=list(range(SINE["inner_steps"] + 1)))


def new_mlp(seed: int) -> MLP:
    torch.manual_seed(seed)
    return MLP(1, (40, 40), 1)


def train_sine(method: str, seed: int, sine: SineTasks):
    model = new_mlp(seed)
    params = dict(model.named_parameters())
    if method != "Reptile":
        meta_opt = torch.optim.Adam(params.values(), lr=SINE["meta_lr"])
    task_gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(SINE["iterations"]):
        tasks = sine.sample(SINE["meta_batch"], SINE["k_shot"], SINE["n_query"], generator=task_gen)
        if method == "Reptile":
            params = reptile_step(model, params, tasks, loss_fn=F.mse_loss, inner_lr=SINE["inner_lr"],
                                  inner_steps=SINE["inner_steps"], outer_lr=SINE["outer_lr"])
        else:
            loss = maml.meta_loss(model, params, tasks, loss_fn=F.mse_loss, inner_lr=SINE["inner_lr"],
                                  inner_steps=SINE["inner_steps"], first_order=(method == "FOMAML"))
            meta_opt.zero_grad()
            loss.backward()
            meta_opt.step()
    return model, params


def sine_result(per_task: torch.Tensor, seconds: float | None = None) -> dict:
    steps = {0: "before", 1: "after 1 step", SINE["inner_steps"]: f"after {SINE['inner_steps']} steps"}
    out = {name: [round(v, 5) for v in per_task[:, s].tolist()] for s, name in steps.items()}
    out["mean after"] = per_task[:, -1].mean().item()
    return out if seconds is None else {**out, "train_seconds": round(seconds, 1)}


def new_conv4(seed: int) -> Conv4:
    torch.manual_seed(seed)
    return Conv4(1, N_WAY, hidden=HIDDEN)


def train_ch5_omniglot(method: str, seed: int, x_train, y_train):
    c = CH5_OMNI
    model = new_conv4(seed)
    stream = torch.Generator().manual_seed(seed + 1)
    if method == "Reptile":
        params = {n: p.detach() for n, p in model.named_parameters()}
        sampler = EpisodeSampler(x_train, y_train, n_way=N_WAY, k_shot=c["reptile_train_shots"], n_query=1,
                                 generator=stream)
        iterations = c["reptile_iterations"]
        for it in range(iterations):
            tasks = sampler.sample(c["meta_batch"])
            eps = c["reptile_outer_lr"] * (1 - it / iterations)  # ε annealed linearly 1 → 0
            params = reptile_step(model, params, tasks, loss_fn=F.cross_entropy, inner_lr=c["reptile_inner_lr"],
                                  inner_steps=c["reptile_train_steps"], outer_lr=eps)
        return model, params
    params = dict(model.named_parameters())
    meta_opt = torch.optim.Adam(params.values(), lr=c["maml_meta_lr"])
    sampler = EpisodeSampler(x_train, y_train, n_way=N_WAY, k_shot=1, n_query=c["train_query"], generator=stream)
    iterations = c["maml_iterations"] if method == "MAML" else c["fomaml_iterations"]
    for _ in range(iterations):
        tasks = sampler.sample(c["meta_batch"])
        meta_opt.zero_grad()
        maml.meta_backward(model, params, tasks, loss_fn=F.cross_entropy, inner_lr=c["maml_inner_lr"],
                           inner_steps=c["maml_train_steps"], first_order=(method == "FOMAML"))
        meta_opt.step()
    return model, params


def sgd_predictor(model, params, inner_lr: float, inner_steps: int) -> Callable:
    return lambda tasks: maml.predict(model, params, tasks, loss_fn=F.cross_entropy, inner_lr=inner_lr,
                                      inner_steps=inner_steps)


def run_ch5(seeds: list[int]) -> Path:
    path = OUT / "ch5.json"
    store = Store(path, {
        "what": "Chapter 5 (book/05_reptile.ipynb) retrained for several seeds: " + part_doc("ch5"),
        "command": COMMAND, "machine": machine(), "seeds": seeds,
        "protocol": {"sine": SINE, "omniglot": {**CH5_OMNI, "n_way": N_WAY, "k_shot": K_SHOT, "hidden": HIDDEN,
                                                 "test_episodes": TEST_EPISODES, "test_n_query": TEST_QUERY,
                                                 "test_seed": 0, "transductive": True}},
        "keys": "sine/<method>/<seed>: per-task query MSE of the 200 test tasks before and after 1 and 5 "
                "steps; omniglot/<method>/<seed>: per-episode accuracy of the 200 test episodes"})
    store.add_seeds(seeds)
    sine = SineTasks()
    sine_tests, _, _ = sine.fixed_eval_set(SINE["test_tasks"], k_shot=SINE["k_shot"], n_query=SINE["test_query"],
                                           seed=SINE["test_seed"])
    for seed in seeds:
        if f"sine/untrained/{seed}" not in store:
            model = new_mlp(seed)
            store.put(f"sine/untrained/{seed}", sine_result(sine_mse(model, dict(model.named_parameters()),
                                                                      sine_tests)))
        for method in ("Reptile", "FOMAML", "MAML"):
            key = f"sine/{method}/{seed}"
            if key in store:
                continue
            started = time.perf_counter()
            model, params = train_sine(method, seed, sine)
            seconds = time.perf_counter() - started
            store.put(key, sine_result(sine_mse(model, params, sine_tests), seconds))
            print(f"ch5 {key:22s} MSE after 5 steps {store.data['runs'][key]['mean after']:.3f}  ({seconds:.0f} s)",
                  flush=True)
    x_train, y_train = load_omniglot(split="train", progress=False)
    test_sampler = test_sampler_for(*load_omniglot(split="test", progress=False))
    c = CH5_OMNI
    for seed in seeds:
        if f"omniglot/untrained/{seed}" not in store:
            model = new_conv4(seed)
            store.put(f"omniglot/untrained/{seed}", omniglot_result(
                sgd_predictor(model, dict(model.named_parameters()), c["maml_inner_lr"], c["maml_test_steps"]),
                test_sampler))
        for method in ("Reptile", "FOMAML", "MAML"):
            key = f"omniglot/{method}/{seed}"
            if key in store:
                continue
            started = time.perf_counter()
            model, params = train_ch5_omniglot(method, seed, x_train, y_train)
            seconds = time.perf_counter() - started
            lr, steps = ((c["reptile_inner_lr"], c["reptile_test_steps"]) if method == "Reptile"
                         else (c["maml_inner_lr"], c["maml_test_steps"]))
            store.put(key, omniglot_result(sgd_predictor(model, params, lr, steps), test_sampler, seconds))
            print(f"ch5 {key:22s} {100 * store.data['runs'][key]['mean']:5.1f}%  ({seconds:.0f} s)", flush=True)
    return path


# ----------------------------------------------------------------------------------------------------- ch6

def train_ch6(method: str, seed: int, x_train, y_train):
    model = new_conv4(seed)
    params = dict(model.named_parameters())
    opt = torch.optim.Adam(params.values(), lr=CH6["meta_lr"])
    sampler = EpisodeSampler(x_train, y_train, n_way=N_WAY, k_shot=K_SHOT, n_query=CH6["train_query"],
                             generator=torch.Generator().manual_seed(seed))
    extra = {"head": "head"} if method == "ANIL" else {}
    backward = anil.meta_backward if method == "ANIL" else maml.meta_backward
    for _ in range(CH6["iterations"]):
        tasks = sampler.sample(CH6["meta_batch"])
        opt.zero_grad()
        backward(model, params, tasks, loss_fn=F.cross_entropy, inner_lr=CH6["inner_lr"],
                 inner_steps=CH6["train_steps"], **extra)
        opt.step()
    return model, params


def ch6_predictor(how: str, model, params, steps: int) -> Callable:
    if how == "full":
        return lambda tasks: maml.predict(model, params, tasks, loss_fn=F.cross_entropy, inner_lr=CH6["inner_lr"],
                                          inner_steps=steps)
    if how == "head-only":
        return lambda tasks: anil.predict(model, params, tasks, head="head", loss_fn=F.cross_entropy,
                                          inner_lr=CH6["inner_lr"], inner_steps=steps)
    if how == "NIL":
        @torch.no_grad()
        def predict(tasks):  # no inner loop: the body's features, cosine similarity to the support
            return protonet.predict(model, tasks, n_way=N_WAY, distance="cosine")
        return predict
    raise ValueError(f"ch6_predictor: unknown inner loop {how!r}; allowed: full, head-only, NIL")


def ch6_rows() -> list[tuple[str, str, int]]:
    """(trained network, inner loop at test time, test steps): the chapter's table and step study."""
    s = CH6["test_steps"]
    rows = [("MAML", "full", k) for k in CH6["step_study"]] + [("MAML", "head-only", s), ("MAML", "NIL", 0)]
    rows += [("ANIL", "head-only", k) for k in CH6["step_study"]] + [("ANIL", "NIL", 0), ("untrained", "NIL", 0)]
    return rows


def run_ch6(seeds: list[int]) -> Path:
    path = OUT / "ch6.json"
    store = Store(path, {
        "what": "Chapter 6 (book/06_anil.ipynb) retrained for several seeds: " + part_doc("ch6"),
        "command": COMMAND, "machine": machine(), "seeds": seeds,
        "protocol": {**CH6, "n_way": N_WAY, "k_shot": K_SHOT, "hidden": HIDDEN, "test_episodes": TEST_EPISODES,
                     "test_n_query": TEST_QUERY, "test_seed": 0, "transductive": True},
        "keys": "<trained network>/<inner loop at test: full, head-only or NIL>/S<test steps>/<seed>: "
                "per-episode accuracy of the 200 test episodes; train/<method>/<seed>: training seconds"})
    store.add_seeds(seeds)
    x_train, y_train = load_omniglot(split="train", progress=False)
    test_sampler = test_sampler_for(*load_omniglot(split="test", progress=False))
    for seed in seeds:
        rows = ch6_rows()
        if all(f"{t}/{how}/S{k}/{seed}" in store for t, how, k in rows):
            continue
        nets = {"untrained": (new_conv4(seed), None)}
        for method in ("MAML", "ANIL"):
            started = time.perf_counter()
            nets[method] = train_ch6(method, seed, x_train, y_train)
            store.put(f"train/{method}/{seed}", {"train_seconds": round(time.perf_counter() - started, 1)})
        for trained, how, steps in rows:
            key = f"{trained}/{how}/S{steps}/{seed}"
            if key in store:
                continue
            model, params = nets[trained]
            store.put(key, omniglot_result(ch6_predictor(how, model, params, steps), test_sampler))
            print(f"ch6 {key:28s} {100 * store.data['runs'][key]['mean']:5.1f}%", flush=True)
    return path


PARTS = {"ch5": run_ch5, "ch6": run_ch6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="+", metavar="PART", help=f"which chapters to run: {', '.join(PARTS)}")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)),
                        help=f"comma-separated training seeds (default {','.join(map(str, SEEDS))})")
    args = parser.parse_args()
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; allowed: {list(PARTS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers such as 0,1,2, got {args.seeds!r}")
    if len(seeds) < 2 or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        parser.error(f"--seeds needs at least 2 distinct non-negative seeds (a spread over seeds), got {seeds}")
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    for part in args.parts:
        started = time.perf_counter()
        path = PARTS[part](seeds)
        print(f"{part}: wrote {path} ({(time.perf_counter() - started) / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
