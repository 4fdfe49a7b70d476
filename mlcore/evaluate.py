"""Few-shot accuracy over test episodes, with the 95% confidence interval the papers report.

Every method in the book is scored the same way: draw ``n_episodes`` test episodes (600 in Vinyals et
al. 2016, Finn et al. 2017 and Snell et al. 2017), classify each episode's queries, and report the
mean of the per-episode accuracies with a 95% confidence interval for that mean,

    mean = 1/n Σ_e acc_e,      ci95 = 1.96 · s / √n,      s² = 1/(n−1) Σ_e (acc_e − mean)²,

the normal approximation (1.96 is the 97.5% quantile of N(0, 1)) with the sample standard deviation s
of the per-episode accuracies. (MAML's code uses the 1/n standard deviation; for n = 600 the two
differ by 0.08%, far below the reported precision.)

``evaluate`` knows nothing about any method: it takes a ``predict(tasks) -> scores`` function, where
``scores`` (B, n_query_total, n_way) are logits, log-probabilities or anything whose argmax over the
last dimension is the predicted class, and an episode sampler (anything with ``.sample(meta_batch)``
returning a TaskBatch, such as ``mlcore.episodes.EpisodeSampler``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from .tasks import TaskBatch

__all__ = ["Accuracy", "evaluate", "episode_accuracy"]


class Sampler(Protocol):
    def sample(self, meta_batch: int) -> TaskBatch: ...


@dataclass(frozen=True, eq=False)
class Accuracy:
    """Mean accuracy over episodes with its 95% confidence interval (fractions in [0, 1]).

    ``str(acc)`` reads ``"97.3% ± 0.4% (600 episodes)"``. ``per_episode`` (n_episodes,) float64 holds
    every episode's accuracy, in the order the episodes were drawn.
    """

    mean: float
    ci95: float
    n_episodes: int
    per_episode: Tensor

    @classmethod
    def from_episodes(cls, per_episode: Tensor) -> Accuracy:
        """Mean and 1.96 · s / √n from per-episode accuracies (n >= 2: one episode has no spread)."""
        per_episode = torch.as_tensor(per_episode, dtype=torch.float64).detach().cpu().flatten()
        n = per_episode.numel()
        if n < 2:
            raise ValueError(f"Accuracy: a confidence interval needs at least 2 episodes, got {n}")
        if per_episode.isnan().any() or per_episode.min() < 0 or per_episode.max() > 1:
            raise ValueError("Accuracy: per-episode accuracies must be fractions in [0, 1]")
        std = per_episode.std(correction=1).item()
        return cls(per_episode.mean().item(), 1.96 * std / math.sqrt(n), n, per_episode)

    def __str__(self) -> str:
        return f"{100 * self.mean:.1f}% ± {100 * self.ci95:.1f}% ({self.n_episodes} episodes)"


def episode_accuracy(scores: Tensor, tasks: TaskBatch) -> Tensor:
    """Fraction of each episode's queries whose argmax score is the true label: (B,) float64, CPU.

    ``scores`` (B, n_query_total, n_way) must match ``tasks.y_query`` (B, n_query_total).
    """
    if not isinstance(scores, Tensor) or scores.dim() != 3 or scores.shape[:2] != tasks.y_query.shape:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"evaluate: predict must return scores of shape (meta_batch, n_query_total, n_way) = "
                         f"({tasks.meta_batch}, {tasks.y_query.shape[1]}, n_way), got {shape}")
    if not tasks.is_classification:
        raise TypeError(f"evaluate: accuracy needs classification tasks (int64 labels), got {tasks.y_query.dtype}")
    n_way = int(tasks.y_support.max()) + 1                          # episodes label classes 0..n_way-1
    if scores.shape[-1] != n_way:
        raise ValueError(f"evaluate: predict returned scores for {scores.shape[-1]} classes, but the episodes are "
                         f"{n_way}-way (labels 0..{n_way - 1}); a model's head must have n_way outputs")
    if not bool(torch.isfinite(scores).all()):
        bad = (~torch.isfinite(scores.detach())).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"evaluate: predict returned NaN or infinite scores (episodes {bad[:5]} of this batch); "
                         f"an argmax over them would score as chance without any error. Check the model (a "
                         f"diverged inner loop, NaN weights) before evaluating")
    correct = scores.detach().argmax(-1) == tasks.y_query           # (B, n_query_total)
    return correct.double().mean(1).cpu()                            # (B,)


def evaluate(predict: Callable[[TaskBatch], Tensor], sampler: Sampler, *, n_episodes: int = 600,
             meta_batch: int = 20, seed: int | None = None, progress: bool = False) -> Accuracy:
    """Accuracy of ``predict`` over ``n_episodes`` episodes from ``sampler``, with a 95% CI.

    Episodes are drawn ``meta_batch`` at a time (the last batch may be smaller) and each batch is
    passed to ``predict(tasks) -> scores (B, n_query_total, n_way)``.

    Gradients: ``predict`` is *not* run under ``torch.no_grad()``, because gradient-based methods
    (MAML, ANIL, ...) adapt on the support set inside ``predict`` and need autograd there. Metric-based
    methods need none: wrap their call, ``with torch.no_grad(): acc = evaluate(...)``, or decorate
    ``predict``. The scores are detached here, so no graph outlives one batch.

    Reproducibility: the episodes are exactly those the sampler draws, from its own generator
    (``EpisodeSampler`` takes it at construction). ``seed`` re-seeds that generator first,
    ``sampler.generator.manual_seed(seed)``, so ``evaluate(..., seed=0)`` scores every method on the
    same episodes; it needs a sampler built with ``generator=torch.Generator()`` (the global RNG is
    never touched). With ``seed=None`` the sampler simply continues its stream.
    """
    if isinstance(n_episodes, bool) or not isinstance(n_episodes, int) or n_episodes < 2:
        raise ValueError(f"evaluate: n_episodes must be an integer >= 2 (a confidence interval needs a spread), "
                         f"got {n_episodes!r}; the papers use 600")
    if isinstance(meta_batch, bool) or not isinstance(meta_batch, int) or meta_batch < 1:
        raise ValueError(f"evaluate: meta_batch must be a positive integer, got {meta_batch!r}")
    if not callable(getattr(sampler, "sample", None)):
        raise TypeError(f"evaluate: sampler must have a .sample(meta_batch) method returning a TaskBatch, got "
                        f"{type(sampler).__name__}")
    if seed is not None:
        generator = getattr(sampler, "generator", None)
        if not isinstance(generator, torch.Generator):
            raise ValueError("evaluate: seed= re-seeds sampler.generator, but this sampler has none; build it "
                             "with generator=torch.Generator() or leave seed=None")
        generator.manual_seed(seed)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_episodes, desc="evaluate", unit="episode")
    accuracies: list[Tensor] = []
    done = 0
    try:
        while done < n_episodes:
            size = min(meta_batch, n_episodes - done)
            tasks = sampler.sample(size)
            if not isinstance(tasks, TaskBatch) or tasks.meta_batch != size:
                raise TypeError(f"evaluate: sampler.sample({size}) must return a TaskBatch of {size} episodes, "
                                f"got {tasks!r:.80}")
            accuracies.append(episode_accuracy(predict(tasks), tasks))
            done += size
            if bar is not None:
                bar.update(size)
    finally:
        if bar is not None:
            bar.close()
    return Accuracy.from_episodes(torch.cat(accuracies))


if __name__ == "__main__":  # python -m mlcore.evaluate RUN …  (see mlcore.cli)
    import sys

    from mlcore.cli import evaluate_main
    sys.exit(evaluate_main())
