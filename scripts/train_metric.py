"""Train Prototypical Networks and Matching Networks on Omniglot; report test accuracy ± 95% CI.

5-way 1-shot episodes from the Vinyals et al. (2016) train split (4112 classes, rotations included)
for training, the Vinyals test split (1692 classes) for evaluation: ``evaluate`` over 600 seeded
episodes, identical for every method. A CPU run takes a few minutes per method; the papers train for
far longer (e.g. Snell et al.: 60-way episodes, until validation loss stops improving), so expect
less than their 98.8% (ProtoNet) and 98.1% (Matching Networks without FCE), 5-way 1-shot.

Measured with the defaults (seed 0, 1600 training episodes, 600 test episodes), on a 2-core CPU
shared with other jobs (--threads 1; wall times are inflated by the sharing):

    protonet       91.5% ± 0.6%   train 638 s, eval 192 s
    matching       79.3% ± 0.9%   train 324 s, eval 132 s     (--matching-scale 10: 92.7% ± 0.5%)
    matching-fce   83.9% ± 0.8%   train 351 s, eval 181 s     (--matching-scale 10: 94.2% ± 0.5%)

    python scripts/train_metric.py                               # all methods, defaults below
    python scripts/train_metric.py --methods protonet --steps 50 # a quick look

Data: $MLCORE_OMNIGLOT (or --root) must point at an Omniglot copy (see mlcore.data.omniglot).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from mlcore import matching, protonet
from mlcore.data.omniglot import load_omniglot
from mlcore.episodes import EpisodeSampler
from mlcore.evaluate import evaluate
from mlcore.models import Conv4

METHODS = ("protonet", "matching", "matching-fce")


@dataclass(frozen=True)
class Config:
    n_way: int = 5
    k_shot: int = 1
    n_query: int = 5            # query examples per class in training episodes (Snell et al.: 5)
    n_query_test: int = 15      # query examples per class in test episodes
    meta_batch: int = 4         # episodes per optimiser step
    steps: int = 400            # optimiser steps, i.e. steps · meta_batch training episodes
    lr: float = 1e-3            # Adam, as in Snell et al. (2017)
    lr_halve_every: int = 150   # steps; Snell et al. halve every 2000 episodes
    k_steps: int = 5            # FCE processing steps K
    matching_scale: float = 1.0  # cosine multiplier in Matching Networks' softmax (1 = the paper's)
    n_episodes: int = 600       # test episodes
    seed: int = 0
    hidden: int = 64


def train_and_evaluate(method: str, cfg: Config, train: tuple, test: tuple, device: torch.device) -> None:
    torch.manual_seed(cfg.seed)                                   # network initialisation only
    model = Conv4(1, None, hidden=cfg.hidden).to(device)
    fce = matching.FullContextEmbedding(model.embedding_dim, cfg.k_steps).to(device) \
        if method == "matching-fce" else None
    params = [*model.parameters(), *(fce.parameters() if fce is not None else [])]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_halve_every, gamma=0.5)
    if method == "protonet":
        step = lambda tasks: protonet.train_step(model, optimizer, tasks)  # noqa: E731
        predict = lambda tasks: protonet.predict(model, tasks)              # noqa: E731
    else:
        scale = cfg.matching_scale
        step = lambda tasks: matching.train_step(model, optimizer, tasks, fce=fce, scale=scale)  # noqa: E731
        predict = lambda tasks: matching.predict(model, tasks, fce=fce, scale=scale)             # noqa: E731

    sampler = EpisodeSampler(*train, n_way=cfg.n_way, k_shot=cfg.k_shot, n_query=cfg.n_query, device=device,
                             generator=torch.Generator().manual_seed(cfg.seed))
    start = time.perf_counter()
    with tqdm(range(cfg.steps), desc=f"train {method}", unit="step") as bar:
        for i in bar:
            loss, acc = step(sampler.sample(cfg.meta_batch))
            schedule.step()
            if i % 10 == 0:
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}")
    train_time = time.perf_counter() - start

    # Same 600 test episodes for every method: a fresh sampler with the same seed.
    test_sampler = EpisodeSampler(*test, n_way=cfg.n_way, k_shot=cfg.k_shot, n_query=cfg.n_query_test,
                                  device=device, generator=torch.Generator())
    start = time.perf_counter()
    with torch.no_grad():
        accuracy = evaluate(predict, test_sampler, n_episodes=cfg.n_episodes, meta_batch=20, seed=cfg.seed + 1,
                            progress=True)
    eval_time = time.perf_counter() - start
    print(f"{method:>13}: test {accuracy}   train {train_time:.0f} s "
          f"({cfg.steps * cfg.meta_batch} episodes), eval {eval_time:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--root", default=None, help="Omniglot folder (default: $MLCORE_OMNIGLOT)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch; 1 is much faster on a CPU shared with other jobs")
    for name, value in asdict(Config()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args()
    cfg = Config(**{k: getattr(args, k) for k in asdict(Config())})
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"device {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}")
    print(cfg)
    start = time.perf_counter()
    train = load_omniglot(args.root, split="train")
    test = load_omniglot(args.root, split="test")
    print(f"Omniglot loaded in {time.perf_counter() - start:.0f} s: train {train[0].shape[0]} images, "
          f"test {test[0].shape[0]} images")
    for method in args.methods:
        train_and_evaluate(method, cfg, train, test, device)


if __name__ == "__main__":
    main()
