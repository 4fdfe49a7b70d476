"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, NeurIPS 2016, arXiv:1606.04080).

A query x̂ is labelled by attention over the support set S = {(x_i, y_i)}: the attention weights are
a softmax of cosine similarities between the embedded query f(x̂) and the embedded support items
g(x_i), and the prediction is the attention-weighted sum of the one-hot support labels.

    a(x̂, x_i) = exp(c(f(x̂), g(x_i))) / Σ_j exp(c(f(x̂), g(x_j)))      c = cosine       (eq. 2)
    P(y = k | x̂, S) = Σ_i a(x̂, x_i) [y_i = k]                                          (eq. 1)
    loss = −log P(y = true class | x̂, S)                                  (training objective, Section 2.2)

The loss is the negative log of that probability. A common mistake applies ``F.cross_entropy`` to the
probabilities, which treats them as logits and takes a second softmax.
``log_probs`` computes log P directly and stably, never taking the log of a probability that may
underflow to 0:

    log P(y = k | x̂, S) = logsumexp_{i: y_i = k} c_i − logsumexp_i c_i,     c_i = c(f(x̂), g(x_i)).

Full Context Embeddings (FCE, Section 2.1.2 and Appendix A.1, A.2) make both embeddings depend on
the whole support set. f' and g' denote the plain CNN embedding (the same network here):

    g(x_i) = h→_i + h←_i + g'(x_i)        h→, h← : a bidirectional LSTM over g'(x_1) … g'(x_|S|)
    ĥ_k, c_k = LSTM(f'(x̂), [h_{k−1}, r_{k−1}], c_{k−1})
    h_k = ĥ_k + f'(x̂)
    r_{k−1} = Σ_i a(h_{k−1}, g(x_i)) g(x_i),     a(h, g(x_i)) = softmax_i(h^T g(x_i))
    f(x̂, S) = h_K                          after K processing steps, starting from h_0 = c_0 = 0

Notation:

================  ===========  ==================================================================
code              paper        meaning and shape (B = meta_batch)
================  ===========  ==================================================================
``support_emb``   g'(x_i)      CNN embedding of the support set, (B, n_support, D)
``query_emb``     f'(x̂)        CNN embedding of the queries, (B, n_query_total, D)
``g``, ``f``      g, f         support / query embeddings after FCE (the CNN's without FCE)
``scores``        c_i          scale · cosine, the attention logits, (B, n_query_total, n_support)
``scale``         —            cosine multiplier before the softmax; 1 is the paper's
``k_steps``       K            processing steps of the attention LSTM
================  ===========  ==================================================================

The symbols above are the paper's: S is the support set and K the number of processing steps. In the
rest of mlcore and in the book, K is the number of shots and S the number of inner steps; chapter 7
writes D^tr for the support set and T for the processing steps.

Support and query are embedded jointly per episode (``protonet.embed_episodes``: shared batch
statistics with ``Conv4(norm="batch")``, transductive; see mlcore.protonet). With FCE the support set
is read as a sequence, so its order (class-major from the episode sampler) matters.
"""
from __future__ import annotations

import math

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .protonet import embed_episodes, support_one_hot
from .family import Step
from .tasks import TaskBatch

__all__ = ["FullContextEmbedding", "log_probs", "predict", "meta_loss", "train_step", "Step"]


class FullContextEmbedding(nn.Module):
    """Full Context Embeddings g and f (Vinyals et al. 2016, Appendix A.1 and A.2), batched.

    ``forward(support_emb (B, S, D), query_emb (B, Q, D)) -> (g (B, S, D), f (B, Q, D))``.
    All queries of all episodes run through the attention LSTM at once; only the K processing
    steps are a loop.
    """

    def __init__(self, dim: int, k_steps: int) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("k_steps", k_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"FullContextEmbedding: {name} must be a positive integer, got {value!r}")
        self.dim = dim
        self.k_steps = k_steps
        # g: bidirectional LSTM, hidden size D per direction so that h→ + h← + g' adds up (A.2).
        self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
        # f: the paper's LSTM takes the concatenation [h_{k−1}, r_{k−1}] (2D) as its recurrent state but
        # returns a D-dimensional ĥ_k; nn.LSTMCell needs state and output of one size, so the cell is
        # written out: its gates are one linear map of [f'(x̂), h_{k−1}, r_{k−1}].
        self.query_gates = nn.Linear(3 * dim, 4 * dim)

    def embed_support(self, support_emb: Tensor) -> Tensor:
        """g(x_i) = h→_i + h←_i + g'(x_i): (B, S, D) → (B, S, D)."""
        h, _ = self.support_lstm(support_emb)                      # (B, S, 2D): forward then backward
        h_forward, h_backward = h.split(self.dim, dim=-1)          # (B, S, D) each
        return h_forward + h_backward + support_emb

    def embed_query(self, query_emb: Tensor, g: Tensor) -> Tensor:
        """f(x̂, S) = h_K of the attention LSTM: query_emb (B, Q, D), g (B, S, D) → (B, Q, D)."""
        h = torch.zeros_like(query_emb)                            # h_0, (B, Q, D)
        c = torch.zeros_like(query_emb)                            # c_0, (B, Q, D)
        for _ in range(self.k_steps):
            attention = torch.softmax(h @ g.transpose(-1, -2), dim=-1)  # a(h_{k−1}, g(x_i)), (B, Q, S)
            r = attention @ g                                      # r_{k−1}, (B, Q, D)
            gates = self.query_gates(torch.cat([query_emb, h, r], dim=-1))  # (B, Q, 4D)
            i, f, z, o = gates.chunk(4, dim=-1)                    # input, forget, candidate, output
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(z)
            h = torch.sigmoid(o) * torch.tanh(c) + query_emb       # h_k = ĥ_k + f'(x̂)
        return h

    def forward(self, support_emb: Tensor, query_emb: Tensor) -> tuple[Tensor, Tensor]:
        if support_emb.dim() != 3 or query_emb.dim() != 3 or support_emb.shape[0] != query_emb.shape[0] \
                or support_emb.shape[-1] != self.dim or query_emb.shape[-1] != self.dim:
            raise ValueError(f"FullContextEmbedding(dim={self.dim}): expected support (B, n_support, {self.dim}) "
                             f"and query (B, n_query, {self.dim}), got {tuple(support_emb.shape)} and "
                             f"{tuple(query_emb.shape)}")
        g = self.embed_support(support_emb)
        return g, self.embed_query(query_emb, g)


def log_probs(query_emb: Tensor, support_emb: Tensor, support_labels: Tensor, n_way: int, *,
              fce: FullContextEmbedding | None = None, scale: float = 1.0) -> Tensor:
    """log P(y = k | x̂, S) for every query, computed stably (eqs. 1 and 2 in log space).

    Shapes: query_emb (B, n_query_total, D), support_emb (B, n_support, D), support_labels
    (B, n_support) int64 in 0..n_way-1 → (B, n_query_total, n_way); without the leading B as well.
    ``fce``: a FullContextEmbedding applied to the embeddings first (None: f = f', g = g').
    ``scale`` multiplies the cosines before the softmax (1, the paper's choice, keeps the attention
    soft: with cosines in [−1, 1] no probability can reach 1, so the loss never reaches 0).
    """
    unbatched = support_emb.dim() == 2
    if unbatched:
        query_emb, support_emb, support_labels = query_emb[None], support_emb[None], support_labels[None]
    if support_emb.dim() != 3 or query_emb.dim() != 3 or support_labels.dim() != 2 \
            or not query_emb.shape[0] == support_emb.shape[0] == support_labels.shape[0] \
            or query_emb.shape[-1] != support_emb.shape[-1]:
        raise ValueError(f"log_probs: expected query_emb (B, n_query, D), support_emb (B, n_support, D) and "
                         f"support_labels (B, n_support) (or all without B); got {tuple(query_emb.shape)}, "
                         f"{tuple(support_emb.shape)} and {tuple(support_labels.shape)}")
    one_hot, _ = support_one_hot(support_labels, n_way, support_emb.shape[1], who="matching.log_probs")
    if fce is not None:
        support_emb, query_emb = fce(support_emb, query_emb)      # g (B, S, D), f (B, Q, D)
    cosine = F.normalize(query_emb, dim=-1) @ F.normalize(support_emb, dim=-1).transpose(-1, -2)  # (B, Q, S)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"log_probs: scale must be a positive finite number (1 is the paper's), got {scale!r}; "
                         f"a negative scale would attend to the least similar support examples")
    scores = scale * cosine
    # logsumexp over the support items of class k: mask the others with −inf. Every class has at least
    # one item (checked above), so no logsumexp is over −inf alone and the gradient stays finite.
    in_class = one_hot.bool().unsqueeze(1)                          # (B, 1, S, N)
    masked = scores.unsqueeze(-1).masked_fill(~in_class, float("-inf"))  # (B, Q, S, N)
    out = torch.logsumexp(masked, dim=-2) - torch.logsumexp(scores, dim=-1, keepdim=True)  # (B, Q, N)
    return out[0] if unbatched else out


def predict(model: nn.Module | Callable[[Tensor], Tensor], tasks: TaskBatch, *, fce: FullContextEmbedding | None = None,
            n_way: int | None = None, scale: float = 1.0) -> Tensor:
    """Log-probabilities for every query of every episode: (B, n_query_total, n_way).

    ``n_way`` defaults to 1 + the largest support label. Gradients are kept; wrap the call in
    ``torch.no_grad()`` for evaluation.
    """
    if n_way is None:
        n_way = int(tasks.y_support.max()) + 1
    support_emb, query_emb = embed_episodes(model, tasks)            # (B, S, D), (B, Q, D)
    return log_probs(query_emb, support_emb, tasks.y_support, n_way, fce=fce, scale=scale)


def meta_loss(model: nn.Module | Callable[[Tensor], Tensor], tasks: TaskBatch, *,
              fce: FullContextEmbedding | None = None, n_way: int | None = None, scale: float = 1.0
              ) -> tuple[Tensor, Tensor]:
    """Mean −log P(true class | x̂, S) over all queries of all episodes, and the accuracy (detached)."""
    log_p = predict(model, tasks, fce=fce, n_way=n_way, scale=scale)  # (B, Q, n_way)
    accuracy = (log_p.argmax(-1) == tasks.y_query).float().mean().detach()
    return F.nll_loss(log_p.reshape(-1, log_p.shape[-1]), tasks.y_query.reshape(-1)), accuracy


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, tasks: TaskBatch, *,
               fce: FullContextEmbedding | None = None, n_way: int | None = None, scale: float = 1.0
               ) -> Step:
    """One optimiser step; returns (loss, accuracy) as floats. With FCE, ``optimizer`` must hold the
    parameters of ``fce`` as well as the model's."""
    optimizer.zero_grad(set_to_none=True)
    value, accuracy = meta_loss(model, tasks, fce=fce, n_way=n_way, scale=scale)
    value.backward()
    optimizer.step()
    return Step(value.item(), accuracy.item())
