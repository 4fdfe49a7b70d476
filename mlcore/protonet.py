"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017, arXiv:1703.05175).

An embedding network f_φ maps every image to a point in R^D. Each class of an episode is represented
by the mean of its embedded support examples, its *prototype* (eq. 1); a query is classified by a
softmax over negative distances to the prototypes (eq. 2). Training minimises the negative
log-probability of the true class of every query, over many episodes (Algorithm 1).

    c_k = 1/|S_k| Σ_{(x_i, y_i) ∈ S_k} f_φ(x_i)                                   (eq. 1)
    p_φ(y = k | x) = exp(−d(f_φ(x), c_k)) / Σ_k' exp(−d(f_φ(x), c_k'))            (eq. 2)
    J(φ) = −log p_φ(y = k | x)   for each query x of true class k                    (Algorithm 1)

Notation:

================  ==========  =====================================================================
code              paper       meaning
================  ==========  =====================================================================
``model.embed``   f_φ         embedding network, (N, C, H, W) → (N, D)
``support_emb``   f_φ(x_i)    embedded support set, (B, n_support, D)
``prototypes``    c_k         one point per class, (B, n_way, D)
``query_emb``     f_φ(x)      embedded queries, (B, n_query_total, D)
``logits``        −d(f_φ(x), c_k)  (B, n_query_total, n_way); softmax over the last dim is eq. 2
``distance``      d           ``"euclidean"``: squared Euclidean (the paper's choice, Section 2.3);
                              ``"cosine"``: −``scale`` · cosine similarity
================  ==========  =====================================================================

B is ``meta_batch``; n_support = n_way · k_shot; n_query_total = n_way · n_query (see mlcore.tasks).

Batch statistics (``Conv4(norm="batch")``). ``embed_episodes`` embeds the support and the query
set of each episode *together*, in one forward pass per episode, so both are normalised with the
same statistics: the prototypes and the queries must live in one coordinate system for distances
between them to mean anything. Embedding support (5 images in 5-way 1-shot) and query separately
would normalise them with different means and variances and shift one set against the other. The
price is that the method is transductive: the statistics, hence each prediction, depend on the
other queries of the episode, at training and at test time alike (Snell et al.'s code also embeds
support and query in one batch). Episodes never share statistics: every episode is its own batch.
With ``norm="group"`` or ``"none"`` nothing is transductive and the choice makes no difference.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .family import Step
from .tasks import TaskBatch

__all__ = ["embed_episodes", "support_one_hot", "prototypes", "logits", "loss", "predict", "meta_loss", "train_step", "Step"]

Distance = Literal["euclidean", "cosine"]


def embed_episodes(model: nn.Module | Callable[[Tensor], Tensor], tasks: TaskBatch) -> tuple[Tensor, Tensor]:
    """Embed the support and query sets of every episode, each episode in one forward pass.

    ``model`` is the embedding network: its ``embed`` method is used when it has one (``Conv4``,
    whose ``forward`` would also apply a classification head), otherwise the model is called.
    Support and query of one episode form one batch (shared batch statistics; see the module
    docstring); different episodes are separate batches, so no statistics leak between episodes.

    Returns (support_emb (B, n_support, D), query_emb (B, n_query_total, D)).
    """
    if not tasks.is_classification:
        raise TypeError("embed_episodes: metric-based methods need classification tasks with int64 labels, "
                        f"got y_support of dtype {tasks.y_support.dtype}")
    embed = getattr(model, "embed", model)
    n_support = tasks.x_support.shape[1]
    x = torch.cat([tasks.x_support, tasks.x_query], dim=1)     # (B, n_support + n_query_total, C, H, W)
    # One forward pass per episode: a plain loop was faster than torch.func.vmap on a 2-core CPU and
    # gives the same numbers; both keep each episode's batch statistics to itself.
    z = torch.stack([embed(episode) for episode in x])          # (B, n_support + n_query_total, D)
    if z.dim() != 3:
        raise ValueError(f"embed_episodes: the embedding network must map (N, ...) to (N, D), but it returned "
                         f"shape {tuple(z.shape[1:])} for one episode; flatten its output")
    return z[:, :n_support], z[:, n_support:]


def support_one_hot(support_labels: Tensor, n_way: int, n_support: int, *, who: str = "support_one_hot"
                    ) -> tuple[Tensor, Tensor]:
    """Check support labels and return (one_hot (..., n_support, n_way), counts (..., n_way)).

    Raises, naming ``who``, if the labels are not int64, do not pair up with ``n_support``
    embeddings, fall outside 0..n_way-1, or leave a class without a support example (its
    prototype would be 0/0). Shared by Prototypical and Matching Networks.
    """
    if isinstance(n_way, bool) or not isinstance(n_way, int) or n_way < 1:
        raise ValueError(f"{who}: n_way must be a positive integer, got {n_way!r}")
    if support_labels.dtype != torch.int64:
        raise TypeError(f"{who}: support labels must be int64 class indices, got {support_labels.dtype}; "
                        f"use .long()")
    if support_labels.dim() == 0 or support_labels.shape[-1] != n_support:
        raise ValueError(f"{who}: {n_support} support embeddings but support labels of shape "
                         f"{tuple(support_labels.shape)}; they must pair up one to one")
    low, high = int(support_labels.min()), int(support_labels.max())
    if low < 0 or high >= n_way:
        raise ValueError(f"{who}: support labels must lie in 0..n_way-1 = 0..{n_way - 1}, found values in "
                         f"{low}..{high}; remap each episode's classes to 0..n_way-1")
    one_hot = F.one_hot(support_labels, n_way)                 # (..., n_support, n_way)
    counts = one_hot.sum(dim=-2)                               # (..., n_way)
    empty = (counts == 0).nonzero()
    if len(empty):
        where = empty[0].tolist()
        episode = f" in episode {where[0]}" if len(where) > 1 else ""
        raise ValueError(f"{who}: class {where[-1]} has no support example{episode} (n_way={n_way}); every "
                         f"class 0..n_way-1 needs at least one labelled support example")
    return one_hot, counts


def prototypes(support_emb: Tensor, support_labels: Tensor, n_way: int) -> Tensor:
    """Class prototypes c_k, the mean embedded support example of each class (eq. 1).

    Shapes: support_emb (B, n_support, D) and support_labels (B, n_support) → (B, n_way, D);
    an unbatched episode, (n_support, D) and (n_support,) → (n_way, D), works too.
    Computed as one matrix product with the one-hot labels (no loop over classes), so any order of
    the support set and unequal shots per class are fine.
    """
    if support_emb.dim() not in (2, 3) or support_labels.dim() != support_emb.dim() - 1:
        raise ValueError(f"prototypes: expected support_emb (B, n_support, D) with labels (B, n_support), or "
                         f"(n_support, D) with (n_support,); got {tuple(support_emb.shape)} and "
                         f"{tuple(support_labels.shape)}")
    if support_labels.shape[:-1] != support_emb.shape[:-2]:
        raise ValueError(f"prototypes: support_emb has {support_emb.shape[0]} episodes but support_labels has "
                         f"{support_labels.shape[0]}")
    one_hot, counts = support_one_hot(support_labels, n_way, support_emb.shape[-2], who="prototypes")
    one_hot = one_hot.to(support_emb.dtype)
    sums = one_hot.transpose(-1, -2) @ support_emb             # (..., n_way, D): Σ_{i ∈ S_k} f(x_i)
    return sums / counts.unsqueeze(-1).to(support_emb.dtype)   # (..., n_way, D)


def logits(query_emb: Tensor, prototypes: Tensor, distance: Distance = "euclidean", *,
           scale: float = 10.0) -> Tensor:
    """Logits −d(f(x), c_k) of eq. 2; a softmax over the last dimension gives p(y = k | x).

    ``distance="euclidean"``: −‖f(x) − c_k‖², the squared Euclidean distance (Snell et al. show it
    beats cosine, Section 2.3 and Table 4). ``distance="cosine"``: ``scale`` · cos(f(x), c_k); the
    cosine lies in [−1, 1], far too flat for a softmax over 5 classes, so it is multiplied by a fixed
    temperature ``scale`` (10 by default, as in cosine classifiers such as Chen et al., ICLR 2019).
    ``scale`` is ignored for the Euclidean distance.

    Shapes: query_emb (B, n_query_total, D), prototypes (B, n_way, D) → (B, n_query_total, n_way);
    without the leading B as well.
    """
    if query_emb.dim() != prototypes.dim() or query_emb.shape[:-2] != prototypes.shape[:-2] \
            or query_emb.shape[-1] != prototypes.shape[-1]:
        raise ValueError(f"logits: query_emb (B, n_query, D) and prototypes (B, n_way, D) must agree on B and D; "
                         f"got {tuple(query_emb.shape)} and {tuple(prototypes.shape)}")
    if distance == "cosine" and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                 or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"logits: scale must be a positive finite number (the cosine softmax temperature), "
                         f"got {scale!r}; a negative scale would rank the farthest prototype first")
    if distance == "euclidean":
        # ‖q − c‖² = ‖q‖² − 2 q·c + ‖c‖²: O(B·Q·N) memory instead of the O(B·Q·N·D) of broadcasting
        # q − c; the tests compare it with torch.cdist in float64.
        q2 = query_emb.square().sum(-1, keepdim=True)              # (..., Q, 1)
        c2 = prototypes.square().sum(-1).unsqueeze(-2)             # (..., 1, N)
        qc = query_emb @ prototypes.transpose(-1, -2)              # (..., Q, N)
        return -(q2 - 2 * qc + c2)
    if distance == "cosine":
        q = F.normalize(query_emb, dim=-1)
        c = F.normalize(prototypes, dim=-1)
        return scale * (q @ c.transpose(-1, -2))                   # (..., Q, N)
    raise ValueError(f"logits: distance must be 'euclidean' or 'cosine', got {distance!r}")


def loss(logits: Tensor, query_labels: Tensor) -> Tensor:
    """J(φ): mean negative log-probability of the true class over all queries (Algorithm 1).

    Shapes: logits (..., n_query_total, n_way), query_labels (..., n_query_total) → scalar.
    """
    if logits.shape[:-1] != query_labels.shape:
        raise ValueError(f"loss: logits {tuple(logits.shape)} do not match query labels {tuple(query_labels.shape)}")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), query_labels.reshape(-1))


def predict(model: nn.Module | Callable[[Tensor], Tensor], tasks: TaskBatch, *, n_way: int | None = None,
            distance: Distance = "euclidean", scale: float = 10.0) -> Tensor:
    """Logits for every query of every episode: (B, n_query_total, n_way).

    ``n_way`` defaults to 1 + the largest support label (episodes use labels 0..n_way-1, and
    ``prototypes`` checks that no class in between is empty). Gradients are kept; wrap the call in
    ``torch.no_grad()`` for evaluation.
    """
    if n_way is None:
        n_way = int(tasks.y_support.max()) + 1
    support_emb, query_emb = embed_episodes(model, tasks)            # (B, n_support, D), (B, Q, D)
    protos = prototypes(support_emb, tasks.y_support, n_way)        # (B, n_way, D)
    return logits(query_emb, protos, distance, scale=scale)         # (B, Q, n_way)


def meta_loss(model: nn.Module | Callable[[Tensor], Tensor], tasks: TaskBatch, *, n_way: int | None = None,
              distance: Distance = "euclidean", scale: float = 10.0) -> tuple[Tensor, Tensor]:
    """Loss J(φ) averaged over all queries of all episodes, and the query accuracy (detached).

    Returns (loss (scalar, differentiable), accuracy (scalar tensor in [0, 1])).
    """
    z = predict(model, tasks, n_way=n_way, distance=distance, scale=scale)  # (B, Q, n_way)
    accuracy = (z.argmax(-1) == tasks.y_query).float().mean().detach()
    return loss(z, tasks.y_query), accuracy


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, tasks: TaskBatch, *,
               n_way: int | None = None, distance: Distance = "euclidean", scale: float = 10.0
               ) -> Step:
    """One optimiser step on a meta-batch of episodes; returns (loss, accuracy) as Python floats."""
    optimizer.zero_grad(set_to_none=True)
    value, accuracy = meta_loss(model, tasks, n_way=n_way, distance=distance, scale=scale)
    value.backward()
    optimizer.step()
    return Step(value.item(), accuracy.item())
