"""mlcore.episodes: property tests of the N-way K-shot sampler, and a smoke test of viz.plot_episode.

The synthetic images carry their own index (every pixel of image i equals i), so each test can read
back exactly which images an episode used.
"""
from __future__ import annotations

import pytest
import torch

from mlcore.episodes import EpisodeSampler, split_classes
from mlcore.tasks import TaskBatch

N_CLASSES = 13


def data(sizes: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 2, 3) whose pixels equal their index; labels = arbitrary ids 100 + 7c, unequal class sizes."""
    sizes = sizes or [6 + (c % 4) for c in range(N_CLASSES)]
    labels = torch.cat([torch.full((n,), 100 + 7 * c) for c, n in enumerate(sizes)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]   # not grouped
    images = torch.arange(len(labels), dtype=torch.float32)[:, None, None, None].expand(-1, 1, 2, 3).clone()
    return images, labels


def sampler(n_way=4, k_shot=2, n_query=3, seed=0, **kwargs) -> EpisodeSampler:
    images, labels = data()
    return EpisodeSampler(images, labels, n_way=n_way, k_shot=k_shot, n_query=n_query,
                          generator=torch.Generator().manual_seed(seed), **kwargs)


def index_of(x: torch.Tensor) -> torch.Tensor:
    return x[..., 0, 0, 0].long()                                         # (B, n) image indices


@pytest.mark.parametrize(("n_way", "k_shot", "n_query"), [(4, 2, 3), (1, 1, 1), (13, 1, 5), (5, 5, 1)])
def test_episode_properties(n_way, k_shot, n_query):
    images, labels = data()
    s = sampler(n_way, k_shot, n_query)
    tasks = s.sample(16)
    assert isinstance(tasks, TaskBatch) and tasks.meta_batch == 16
    assert tasks.x_support.shape == (16, n_way * k_shot, 1, 2, 3)
    assert tasks.x_query.shape == (16, n_way * n_query, 1, 2, 3)
    assert tasks.y_support.dtype == tasks.y_query.dtype == torch.int64
    for y, per_class in ((tasks.y_support, k_shot), (tasks.y_query, n_query)):
        assert y.min() >= 0 and y.max() < n_way
        assert torch.equal(torch.stack([torch.bincount(row, minlength=n_way) for row in y]),
                           torch.full((16, n_way), per_class))
    support, query = index_of(tasks.x_support), index_of(tasks.x_query)
    for b in range(16):
        used = torch.cat([support[b], query[b]])
        assert len(set(used.tolist())) == len(used)                        # no image twice, none in both sets
        classes = []
        for n in range(n_way):
            original = torch.cat([labels[support[b][tasks.y_support[b] == n]], labels[query[b][tasks.y_query[b] == n]]])
            assert (original == original[0]).all()                         # label n is one class, in both sets
            classes.append(int(original[0]))
        assert len(set(classes)) == n_way                                  # distinct classes per episode


def test_sample_indices_agree_with_the_episode():
    s = sampler()
    classes, support, query = s.sample_indices(5)
    tasks = s.episodes_from_indices(support, query)
    assert classes.shape == (5, 4) and support.shape == (5, 8) and query.shape == (5, 12)
    assert torch.equal(index_of(tasks.x_support), support) and torch.equal(index_of(tasks.x_query), query)
    _, labels = data()
    assert torch.equal(labels[support], classes.gather(1, tasks.y_support))   # label n is classes[:, n]


def test_same_seed_same_episodes_different_seed_different():
    a, b, c = sampler(seed=1).sample(8), sampler(seed=1).sample(8), sampler(seed=2).sample(8)
    assert torch.equal(a.x_support, b.x_support) and torch.equal(a.x_query, b.x_query)
    assert not torch.equal(a.x_support, c.x_support)
    s = sampler(seed=1)
    assert not torch.equal(s.sample(8).x_support, s.sample(8).x_support)    # the generator advances


def test_none_generator_uses_torch_global_generator():
    images, labels = data()
    s = EpisodeSampler(images, labels, n_way=3, k_shot=1, n_query=1)
    torch.manual_seed(5)
    first = s.sample(4).x_support
    torch.manual_seed(5)
    assert torch.equal(first, s.sample(4).x_support)


def test_every_class_and_every_image_gets_drawn():
    images, labels = data()
    s = sampler(n_way=3, k_shot=1, n_query=1)
    _, support, query = s.sample_indices(2000)
    used = torch.cat([support.flatten(), query.flatten()])
    counts = torch.bincount(used, minlength=len(labels)).double()
    assert (counts > 0).all()
    # Uniform over classes, then over the class's images: an image of a class of size m is used with
    # probability (3/13)·(2/m) per episode; 2000 episodes → expectation well above 50, loose ±40% band.
    sizes = torch.bincount(torch.unique(labels, return_inverse=True)[1])[torch.unique(labels, return_inverse=True)[1]]
    expected = 2000 * (3 / N_CLASSES) * (2 / sizes.double())
    assert ((counts / expected - 1).abs() < 0.4).all()


def test_device_argument_and_meta_device():
    s = sampler(device="meta")                                           # shapes only, no memory
    tasks = s.sample(3)
    assert tasks.device == torch.device("meta") and tasks.x_query.shape == (3, 12, 1, 2, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_episodes_match_cpu_episodes():
    cpu, gpu = sampler(seed=3).sample(4), sampler(seed=3, device="cuda").sample(4)
    assert gpu.device.type == "cuda"
    assert torch.equal(cpu.x_support, gpu.x_support.cpu()) and torch.equal(cpu.y_query, gpu.y_query.cpu())


def test_errors_say_what_is_wrong_and_what_is_allowed():
    images, labels = data()
    make = lambda **kw: EpisodeSampler(**{"images": images, "labels": labels, "n_way": 3, "k_shot": 1,  # noqa: E731
                                          "n_query": 1, **kw})
    with pytest.raises(ValueError, match=r"n_way=14 but the labels hold only 13 classes; use n_way <= 13"):
        make(n_way=14)
    # the smallest class (id 100, 6 images) is named with its count
    with pytest.raises(ValueError, match=r"3 \+ 4 = 7 examples .* class 100 has only 6 examples"):
        make(k_shot=3, n_query=4)
    for name in ("n_way", "k_shot", "n_query"):
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ValueError, match=f"{name} must be a positive integer, got {bad!r}"):
                make(**{name: bad})
    with pytest.raises(ValueError, match=r"labels must have shape \(num_images,\) = \(96,\)"):
        make(labels=labels[:-1])
    with pytest.raises(TypeError, match="labels must be int64 class ids, got torch.int32; use labels.long()"):
        make(labels=labels.int())
    with pytest.raises(ValueError, match=r"4-D floating point .* got shape \(96, 2, 3\)"):
        make(images=images[:, 0])
    with pytest.raises(ValueError, match="dtype torch.uint8"):
        make(images=images.to(torch.uint8))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        make(generator=0)
    with pytest.raises(ValueError, match="meta_batch must be a positive integer, got 0"):
        make().sample(0)


def test_split_classes_is_disjoint_and_reproducible():
    images, labels = data()
    a, b = split_classes(labels, [8, 4], generator=torch.Generator().manual_seed(0))
    assert len(torch.unique(labels[a])) == 8 and len(torch.unique(labels[b])) == 4
    assert not set(labels[a].tolist()) & set(labels[b].tolist())
    for part in (a, b):                                                  # whole classes, never part of one
        for c in torch.unique(labels[part]):
            assert (labels[part] == c).sum() == (labels == c).sum()
    again = split_classes(labels, [8, 4], generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, again[0]) and torch.equal(b, again[1])
    EpisodeSampler(images[b], labels[b], n_way=4, k_shot=1, n_query=1).sample(2)
    with pytest.raises(ValueError, match=r"add up to 14 classes but labels hold only 13"):
        split_classes(labels, [10, 4])


def test_plot_episode_draws_one_image_axis_per_shown_example():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlcore.viz import plot_episode

    tasks = sampler(n_way=4, k_shot=2, n_query=3).sample(2)
    fig = plot_episode(tasks, index=1, max_query=2, class_names=["a", "b", "c", "d"])
    assert isinstance(fig, matplotlib.figure.Figure)
    assert len(fig.axes) == 4 * (2 + 2) and all(ax.images for ax in fig.axes)
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()] == ["a", "b", "c", "d"]
    plt.close(fig)
    fig = plot_episode(tasks, max_query=0)                               # support only
    assert len(fig.axes) == 4 * 2
    plt.close(fig)
    with pytest.raises(ValueError, match="3 class_names for an episode of 4 classes"):
        plot_episode(tasks, class_names=["a", "b", "c"])
    with pytest.raises(IndexError, match="index=2 but the batch holds 2 episodes"):
        plot_episode(tasks, index=2)
