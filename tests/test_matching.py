"""Oracles for Matching Networks: normalisation, the paper's formula, cosine nearest neighbour, FCE."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracles import F64, image_tasks

from mlcore import matching
from mlcore.matching import FullContextEmbedding
from mlcore.models import Conv4


def _episode(meta_batch=2, n_way=4, k_shot=3, n_query=5, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    support = torch.randn(meta_batch, n_way * k_shot, dim, generator=g, dtype=F64)
    query = torch.randn(meta_batch, n_way * n_query, dim, generator=g, dtype=F64)
    labels = torch.stack([torch.randperm(n_way * k_shot, generator=g) % n_way for _ in range(meta_batch)])
    return query, support, labels


@pytest.mark.parametrize("use_fce", [False, True])
def test_log_probs_are_normalised(use_fce):
    torch.manual_seed(0)
    query, support, labels = _episode()
    fce = FullContextEmbedding(6, k_steps=3).double() if use_fce else None
    out = matching.log_probs(query, support, labels, 4, fce=fce)
    assert out.shape == (2, 20, 4)
    torch.testing.assert_close(out.logsumexp(-1), torch.zeros(2, 20, dtype=F64), rtol=0, atol=1e-12)


def test_log_probs_equal_paper_formula():
    """log of P(y = k | x, S) = Σ_i a(x, x_i) [y_i = k], a = softmax of cosines (eqs. 1, 2)."""
    query, support, labels = _episode()
    cos = F.cosine_similarity(query[:, :, None], support[:, None], dim=-1)    # (B, Q, S)
    attention = torch.softmax(cos, dim=-1)
    probs = attention @ F.one_hot(labels, 4).to(F64)                          # (B, Q, N)
    torch.testing.assert_close(matching.log_probs(query, support, labels, 4), probs.log())
    # Unbatched and with a temperature.
    probs3 = torch.softmax(3 * cos[0], -1) @ F.one_hot(labels[0], 4).to(F64)
    torch.testing.assert_close(matching.log_probs(query[0], support[0], labels[0], 4, scale=3.0), probs3.log())


def test_log_probs_stable_where_probabilities_underflow():
    # With a huge temperature one class's probability underflows to 0 in float64; log P must stay finite.
    query, support, labels = _episode()
    out = matching.log_probs(query, support, labels, 4, scale=1e4)
    assert torch.isfinite(out).all()
    naive = (torch.softmax(1e4 * F.cosine_similarity(query[:, :, None], support[:, None], dim=-1), -1)
             @ F.one_hot(labels, 4).to(F64)).log()
    assert torch.isinf(naive).any()          # the naive route would give −inf (and NaN gradients)
    support = support.clone().requires_grad_()
    matching.log_probs(query, support, labels, 4, scale=1e4).sum().backward()
    assert torch.isfinite(support.grad).all()


def test_one_shot_without_fce_is_cosine_nearest_neighbour():
    g = torch.Generator().manual_seed(4)
    support = torch.randn(8, 5, 32, generator=g)                    # 1-shot, 5-way, 8 episodes
    labels = torch.stack([torch.randperm(5, generator=g) for _ in range(8)])
    query = torch.randn(8, 40, 32, generator=g)
    nearest = F.cosine_similarity(query[:, :, None], support[:, None], dim=-1).argmax(-1)   # (B, Q) item index
    expected = labels.gather(1, nearest)
    assert torch.equal(matching.log_probs(query, support, labels, 5).argmax(-1), expected)


def test_fce_shapes_and_gradients_reach_every_lstm_parameter():
    torch.manual_seed(0)
    fce = FullContextEmbedding(6, k_steps=2)
    support = torch.randn(3, 10, 6, requires_grad=True)
    query = torch.randn(3, 7, 6, requires_grad=True)
    g, f = fce(support, query)
    assert g.shape == (3, 10, 6) and f.shape == (3, 7, 6)
    labels = torch.arange(5).repeat(2).repeat(3, 1)
    matching.log_probs(query, support, labels, 5, fce=fce).sum().backward()
    for name, p in fce.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert support.grad.abs().sum() > 0 and query.grad.abs().sum() > 0


def test_fce_batches_queries_and_episodes_independently():
    """Batched FCE equals running each episode, and each query, on its own (no leakage)."""
    torch.manual_seed(0)
    fce = FullContextEmbedding(5, k_steps=3).double()
    support = torch.randn(2, 6, 5, dtype=F64)
    query = torch.randn(2, 4, 5, dtype=F64)
    g, f = fce(support, query)
    for b in range(2):
        for j in range(4):
            gb, fbj = fce(support[b:b + 1], query[b:b + 1, j:j + 1])
            torch.testing.assert_close(gb[0], g[b])
            torch.testing.assert_close(fbj[0, 0], f[b, j])


def test_fce_support_embedding_uses_both_directions_and_skip():
    torch.manual_seed(0)
    fce = FullContextEmbedding(4, k_steps=1).double()
    support = torch.randn(1, 5, 4, dtype=F64)
    h, _ = fce.support_lstm(support)
    torch.testing.assert_close(fce.embed_support(support), h[..., :4] + h[..., 4:] + support)
    # g(x_1) depends on the last item (backward LSTM), g(x_5) on the first (forward LSTM).
    support.requires_grad_()
    g = fce.embed_support(support)
    assert torch.autograd.grad(g[0, 0].sum(), support, retain_graph=True)[0][0, 4].abs().sum() > 0
    assert torch.autograd.grad(g[0, 4].sum(), support)[0][0, 0].abs().sum() > 0


@pytest.mark.parametrize("labels, message", [
    (torch.tensor([[0, 1, 2, 4]]), "0..n_way-1"),
    (torch.tensor([[0, 1, -1, 2]]), "0..n_way-1"),
    (torch.tensor([[0, 1, 1, 3]]), "class 2 has no support example"),
    (torch.tensor([[0, 1, 2]]), "pair up"),
])
def test_bad_labels_raise(labels, message):
    with pytest.raises(ValueError, match=message):
        matching.log_probs(torch.randn(1, 3, 6), torch.randn(1, 4, 6), labels, 4)


def test_shape_mismatches_raise():
    labels = torch.tensor([[0, 1, 2, 3]])
    with pytest.raises(ValueError, match="expected query_emb"):
        matching.log_probs(torch.randn(1, 3, 5), torch.randn(1, 4, 6), labels, 4)
    with pytest.raises(ValueError, match="expected query_emb"):
        matching.log_probs(torch.randn(2, 3, 6), torch.randn(1, 4, 6), labels, 4)
    with pytest.raises(ValueError, match="FullContextEmbedding"):
        matching.log_probs(torch.randn(1, 3, 6), torch.randn(1, 4, 6), labels, 4, fce=FullContextEmbedding(8, 1))
    with pytest.raises(ValueError, match="k_steps"):
        FullContextEmbedding(8, 0)


def test_meta_loss_is_nll_of_probabilities_and_train_step_learns():
    torch.manual_seed(0)
    tasks = image_tasks(2, n_way=5, k_shot=1, n_query=2, dtype=torch.float32)
    model = Conv4(1, None, hidden=8, image_size=16)
    fce = FullContextEmbedding(model.embedding_dim, k_steps=2)
    value, acc = matching.meta_loss(model, tasks, fce=fce)
    log_p = matching.predict(model, tasks, fce=fce)
    torch.testing.assert_close(value, -log_p.gather(-1, tasks.y_query[..., None]).mean())
    assert 0 <= acc.item() <= 1
    opt = torch.optim.Adam([*model.parameters(), *fce.parameters()], lr=1e-3)
    first, _ = matching.train_step(model, opt, tasks, fce=fce)
    for _ in range(5):
        last, _ = matching.train_step(model, opt, tasks, fce=fce)
    assert last < first
