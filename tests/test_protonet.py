"""Oracles for Prototypical Networks: hand-worked prototypes, brute-force distances, one training step."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracles import F64, FD_TOL, directional_fd_error, image_tasks, leaf_params
from torch.func import functional_call

from mlcore import protonet
from mlcore.models import Conv4
from mlcore.tasks import TaskBatch


def test_prototypes_hand_worked_example():
    # Classes out of order and with unequal shots: class 0 = {(1, 2), (3, 6)}, class 1 = {(0, 0)},
    # class 2 = {(2, -2), (4, 0), (6, 5)}.
    emb = torch.tensor([[1., 2.], [2., -2.], [0., 0.], [3., 6.], [4., 0.], [6., 5.]], dtype=F64)
    labels = torch.tensor([0, 2, 1, 0, 2, 2])
    expected = torch.tensor([[2., 4.], [0., 0.], [4., 1.]], dtype=F64)
    torch.testing.assert_close(protonet.prototypes(emb, labels, 3), expected, rtol=0, atol=1e-15)
    # Batched: two episodes, the second a permutation of the first with relabelled classes.
    perm = torch.tensor([5, 0, 3, 1, 2, 4])
    relabel = torch.tensor([2, 0, 1])  # class c of episode 0 is class relabel[c] of episode 1
    batched = protonet.prototypes(torch.stack([emb, emb[perm]]), torch.stack([labels, relabel[labels[perm]]]), 3)
    assert batched.shape == (2, 3, 2)
    torch.testing.assert_close(batched[0], expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(batched[1][relabel], expected, rtol=0, atol=1e-15)


def test_prototypes_equal_class_means_random():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(4, 15, 7, generator=g, dtype=F64)
    labels = torch.stack([torch.randperm(15, generator=g) % 5 for _ in range(4)])
    protos = protonet.prototypes(emb, labels, 5)
    for b in range(4):
        for k in range(5):
            torch.testing.assert_close(protos[b, k], emb[b][labels[b] == k].mean(0))


def test_euclidean_logits_are_negative_squared_distances():
    g = torch.Generator().manual_seed(1)
    query = torch.randn(3, 10, 16, generator=g, dtype=F64) * 5 + 2
    protos = torch.randn(3, 4, 16, generator=g, dtype=F64) * 5 + 2
    torch.testing.assert_close(protonet.logits(query, protos), -torch.cdist(query, protos) ** 2,
                               rtol=1e-12, atol=1e-10)
    # Unbatched works too.
    torch.testing.assert_close(protonet.logits(query[0], protos[0]), -torch.cdist(query[0], protos[0]) ** 2,
                               rtol=1e-12, atol=1e-10)


def test_cosine_logits():
    g = torch.Generator().manual_seed(2)
    query = torch.randn(2, 6, 8, generator=g, dtype=F64)
    protos = torch.randn(2, 3, 8, generator=g, dtype=F64)
    expected = 7.0 * F.cosine_similarity(query[:, :, None], protos[:, None], dim=-1)
    torch.testing.assert_close(protonet.logits(query, protos, "cosine", scale=7.0), expected)
    with pytest.raises(ValueError, match="euclidean"):
        protonet.logits(query, protos, "manhattan")


def test_loss_is_negative_log_softmax_of_true_class():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 5, 3, generator=g, dtype=F64)
    y = torch.randint(0, 3, (2, 5), generator=g)
    manual = -torch.log(torch.softmax(z, -1).gather(-1, y[..., None])).mean()
    torch.testing.assert_close(protonet.loss(z, y), manual)


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([0, 1, 3]), "0..n_way-1 = 0..2"),
    (torch.tensor([0, -1, 2]), "0..n_way-1"),
    (torch.tensor([0, 0, 2]), "class 1 has no support example"),
    (torch.tensor([0., 1., 2.]), "int64"),
    (torch.tensor([0, 1]), "pair up"),
])
def test_prototypes_bad_labels_raise(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        protonet.prototypes(torch.randn(3, 4), bad, 3)


def test_empty_class_error_names_episode_and_class():
    labels = torch.tensor([[0, 1, 2], [0, 2, 2]])
    with pytest.raises(ValueError, match="class 1 has no support example in episode 1"):
        protonet.prototypes(torch.randn(2, 3, 4), labels, 3)


def test_shape_mismatches_raise():
    with pytest.raises(ValueError, match="prototypes"):
        protonet.prototypes(torch.randn(2, 3, 4), torch.zeros(3, 3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="agree on B and D"):
        protonet.logits(torch.randn(2, 5, 4), torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="agree on B and D"):
        protonet.logits(torch.randn(2, 5, 4), torch.randn(3, 3, 4))


def test_episodes_are_embedded_jointly_and_independently():
    """Batch statistics: support + query of one episode form one batch; episodes never mix."""
    torch.manual_seed(0)
    model = Conv4(1, None, hidden=8, image_size=16).double()
    tasks = image_tasks(3, n_way=3, k_shot=2, n_query=2)
    s, q = protonet.embed_episodes(model, tasks)
    assert s.shape == (3, 6, 8) and q.shape == (3, 6, 8)
    one = model.embed(torch.cat([tasks.x_support[1], tasks.x_query[1]]))
    torch.testing.assert_close(torch.cat([s[1], q[1]]), one)
    # Changing episode 0 leaves episode 1 untouched.
    other = TaskBatch(tasks.x_support * torch.tensor([2., 1., 1.], dtype=F64)[:, None, None, None, None],
                      tasks.y_support, tasks.x_query, tasks.y_query)
    torch.testing.assert_close(protonet.embed_episodes(model, other)[1][1], q[1])


def test_meta_loss_gradient_matches_finite_differences():
    """Over every parameter at once (a conv bias right before batch norm, checked alone, has an exactly-zero
    gradient: 0 against 0 cannot fail)."""
    torch.manual_seed(0)
    model = Conv4(1, None, hidden=4, image_size=16, norm="batch").double()
    tasks = image_tasks(2, n_way=3, k_shot=2, n_query=2)
    value, acc = protonet.meta_loss(model, tasks)
    assert 0.0 <= acc.item() <= 1.0 and not acc.requires_grad
    params = leaf_params(model)

    def f(ts):   # the same loss as a function of the parameter values
        theta = dict(zip(params, ts, strict=True))
        return protonet.meta_loss(lambda x: functional_call(model, theta, (x,)), tasks)[0]
    torch.testing.assert_close(f(list(params.values())), value, rtol=0, atol=0)

    def module_grad(ts):  # the gradient under test: the model's own, at its own parameters (= ts)
        return torch.autograd.grad(value, list(model.parameters()))
    assert directional_fd_error(f, list(params.values()), torch.Generator().manual_seed(1), module_grad) < FD_TOL


def test_train_step_reduces_loss_on_fixed_batch():
    torch.manual_seed(0)
    model = Conv4(1, None, hidden=8, image_size=16)
    tasks = image_tasks(2, n_way=5, k_shot=1, n_query=2, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first, _ = protonet.train_step(model, opt, tasks)
    for _ in range(5):
        last, _ = protonet.train_step(model, opt, tasks)
    assert last < first


def test_predict_infers_n_way_and_rejects_regression_tasks():
    model = Conv4(1, None, hidden=4, image_size=16)
    assert protonet.predict(model, image_tasks(3, n_way=4, k_shot=2, dtype=torch.float32)).shape == (3, 8, 4)
    x = torch.rand(1, 3, 1, 16, 16)
    y = torch.rand(1, 3, 1)
    with pytest.raises(TypeError, match="classification"):
        protonet.predict(model, TaskBatch(x, y, x, y))


def test_embedding_pca_plot_smoke():
    """viz: one episode before and after a training step, PCA panels titled with the accuracy."""
    matplotlib = pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlcore import matching, viz

    torch.manual_seed(0)
    model = Conv4(1, None, hidden=8, image_size=16)
    episode = image_tasks(1, n_way=4, k_shot=2, n_query=3, dtype=torch.float32)
    before = viz.embed_episode(model, episode, title="before")
    protonet.train_step(model, torch.optim.Adam(model.parameters(), lr=1e-2), episode)
    after = viz.embed_episode(model, episode, title="after",
                              predict=lambda t: matching.predict(model, t))
    assert before.support.shape == (8, 8) and before.query.shape == (12, 8) and before.prototypes.shape == (4, 8)
    assert not before.support.requires_grad and 0 <= before.accuracy <= 1
    fig = viz.plot_embeddings_pca(before, after)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("before: episode accuracy") and titles[1].startswith("after: episode accuracy")
    plt.close(fig)
    with pytest.raises(ValueError, match="one episode"):
        viz.embed_episode(model, image_tasks(2, dtype=torch.float32))
    with pytest.raises(TypeError, match="EpisodeEmbedding"):
        viz.plot_embeddings_pca()
