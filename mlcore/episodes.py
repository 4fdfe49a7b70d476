"""N-way K-shot episodes from any labelled image tensor.

An *episode* (Vinyals et al. 2016, "Matching Networks for One Shot Learning", Section 2.2 and 4.1)
picks N classes at random, then K labelled support examples and Q query examples from each, with no
example in both sets. Labels are remapped to 0..N-1 in the order the classes were drawn, so a model
never sees the data set's own class ids: "class 3" means something different in every episode.

==============  ==========================================================
``n_way``       classes per episode (N)
``k_shot``      support examples per class (K)
``n_query``     query examples per class (Q)
``meta_batch``  episodes sampled together (B)
==============  ==========================================================

Layout of one episode (class-major, the same in support and query): example ``j`` of the support set
belongs to episode class ``j // k_shot``, example ``j`` of the query set to class ``j // n_query``.
The labels say so explicitly; nothing is implied by position alone.

All randomness comes from the ``torch.Generator`` you pass. Sampling is a few tensor operations on an
index table built once, so episodes are cheap next to a training step.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mlcore import checks
from mlcore.tasks import TaskBatch

__all__ = ["EpisodeSampler", "split_classes"]


class EpisodeSampler:
    """Sample batches of N-way K-shot episodes from ``images`` with class ids ``labels``.

    Args:
        images: (num_images, C, H, W) floating point, e.g. from ``mlcore.data.omniglot.load_omniglot``.
        labels: (num_images,) int64 class ids; any integers (they need not be 0..n_classes-1).
        n_way, k_shot, n_query: N, K and Q above; every class needs at least K + Q examples.
        generator: the only source of randomness (a ``torch.Generator``; its device is where the random
            numbers are drawn). ``None`` means torch's global default generator, i.e. episodes then
            depend on ``torch.manual_seed`` and on every other use of the global RNG; pass a seeded
            generator for reproducible episodes.
        device: where the episodes are returned (``None``: where ``images`` are). The images are moved
            there once, here, so sampling on a GPU copies nothing from the host but a few indices.

    ``sample(meta_batch)`` returns a TaskBatch with
        x_support (B, N·K, C, H, W), y_support (B, N·K) int64 in 0..N-1,
        x_query   (B, N·Q, C, H, W), y_query   (B, N·Q) int64 in 0..N-1.
    """

    def __init__(self, images: Tensor, labels: Tensor, *, n_way: int, k_shot: int, n_query: int,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None) -> None:
        _check_images_labels(images, labels)
        for name, value in (("n_way", n_way), ("k_shot", k_shot), ("n_query", n_query)):
            checks.positive_int(name, value, "EpisodeSampler")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"EpisodeSampler: generator must be a torch.Generator or None, got "
                            f"{type(generator).__name__}; e.g. torch.Generator().manual_seed(0)")
        self.n_way, self.k_shot, self.n_query = n_way, k_shot, n_query
        self.generator = generator
        self.device = torch.device(device) if device is not None else images.device
        # Random numbers are drawn, and indices computed, on the generator's device (CPU by default),
        # so a seed gives the same episodes whether the images live on the CPU or a GPU.
        self._index_device = generator.device if generator is not None else torch.device("cpu")

        # class_ids[c] is the data set's id of class c; class_of[i] the class (0..n_classes-1) of image i.
        class_ids, class_of, counts = torch.unique(labels.cpu(), return_inverse=True, return_counts=True)
        n_classes = class_ids.numel()
        if n_way > n_classes:
            raise ValueError(f"EpisodeSampler: n_way={n_way} but the labels hold only {n_classes} classes; "
                             f"use n_way <= {n_classes} or more classes")
        per_class = k_shot + n_query
        smallest = int(counts.argmin())
        if per_class > int(counts[smallest]):
            raise ValueError(
                f"EpisodeSampler: k_shot + n_query = {k_shot} + {n_query} = {per_class} examples per class are "
                f"needed, but class {int(class_ids[smallest])} has only {int(counts[smallest])} examples (the "
                f"smallest class); use k_shot + n_query <= {int(counts[smallest])} or drop small classes")

        # Index table (n_classes, max_per_class): row c lists the image indices of class c, padded with -1.
        # Memory and per-episode work scale with the *largest* class: meant for roughly balanced data sets
        # (Omniglot: 20 per class, mini-ImageNet: 600), not for a few huge classes among many small ones.
        order = torch.argsort(class_of, stable=True)                        # images grouped by class
        starts = torch.cumsum(counts, 0) - counts                           # (n_classes,)
        slot = torch.arange(labels.numel()) - starts[class_of[order]]       # position inside its class
        table = torch.full((n_classes, int(counts.max())), -1, dtype=torch.int64)
        table[class_of[order], slot] = order
        self.class_ids = class_ids                                          # (n_classes,) CPU
        self.counts = counts                                                # (n_classes,) CPU
        self._table = table.to(self._index_device)
        # Padding slots get key +inf, so they sort after every real example and are never drawn.
        self._padding = (torch.arange(table.shape[1])[None, :] >= counts[:, None]).to(self._index_device)
        self.images = images.to(self.device)

    @property
    def n_classes(self) -> int:
        return self.class_ids.numel()

    def sample_indices(self, meta_batch: int) -> tuple[Tensor, Tensor, Tensor]:
        """Draw ``meta_batch`` episodes as indices: (class_ids, support_index, query_index).

        class_ids (B, N) are the data set's ids of each episode's classes (episode label n is
        class_ids[:, n]); support_index (B, N·K) and query_index (B, N·Q) index ``images``.
        """
        checks.positive_int("meta_batch", meta_batch, "EpisodeSampler")
        n, k, q = self.n_way, self.k_shot, self.n_query
        dev, g = self._index_device, self.generator
        # N distinct classes per episode: the N largest of iid uniform keys form a uniformly random
        # subset, in uniformly random order.
        keys = torch.rand(meta_batch, self.n_classes, generator=g, device=dev)            # (B, n_classes)
        classes = keys.topk(n, dim=1).indices                                               # (B, N)
        # K + Q distinct examples per class: the K + Q smallest keys among the class's real examples.
        keys = torch.rand(meta_batch, n, self._table.shape[1], generator=g, device=dev)    # (B, N, max_per_class)
        keys = keys.masked_fill(self._padding[classes], float("inf"))
        slots = keys.topk(k + q, dim=2, largest=False).indices                              # (B, N, K + Q)
        index = torch.gather(self._table[classes], 2, slots)                                # (B, N, K + Q)
        support = index[:, :, :k].reshape(meta_batch, n * k)                                # (B, N·K)
        query = index[:, :, k:].reshape(meta_batch, n * q)                                  # (B, N·Q)
        return self.class_ids[classes.cpu()], support, query

    def episodes_from_indices(self, support: Tensor, query: Tensor) -> TaskBatch:
        """Gather the images of ``sample_indices``' support (B, N·K) and query (B, N·Q) into a TaskBatch."""
        meta_batch = support.shape[0]
        n, k, q = self.n_way, self.k_shot, self.n_query
        support, query = support.to(self.device), query.to(self.device)
        y = torch.arange(n, device=self.device)                                             # (N,)
        return TaskBatch(
            x_support=self.images[support],                                                 # (B, N·K, C, H, W)
            y_support=y.repeat_interleave(k).repeat(meta_batch, 1),                           # (B, N·K)
            x_query=self.images[query],                                                     # (B, N·Q, C, H, W)
            y_query=y.repeat_interleave(q).repeat(meta_batch, 1),                             # (B, N·Q)
        )

    def sample(self, meta_batch: int) -> TaskBatch:
        """``meta_batch`` fresh episodes as a TaskBatch on ``self.device`` (shapes in the class docstring)."""
        _, support, query = self.sample_indices(meta_batch)
        return self.episodes_from_indices(support, query)

    def __repr__(self) -> str:
        return (f"EpisodeSampler({self.n_way}-way {self.k_shot}-shot, n_query={self.n_query}, "
                f"{self.n_classes} classes, {self.images.shape[0]} images on {self.device})")


def split_classes(labels: Tensor, sizes: Sequence[int], *, generator: torch.Generator | None = None
                  ) -> tuple[Tensor, ...]:
    """Split the classes of ``labels`` into disjoint groups of ``sizes[i]`` classes each.

    Returns one index tensor per group (indices into ``labels``, i.e. into the images), so that
    ``EpisodeSampler(images[idx], labels[idx], ...)`` samples only that group's classes. Classes are
    assigned at random from ``generator`` (``None``: torch's global generator); classes left over
    when ``sum(sizes)`` is less than the number of classes belong to no group.
    """
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype != torch.int64:
        raise TypeError("split_classes: labels must be a 1-D int64 tensor of class ids")
    for i, size in enumerate(sizes):
        checks.positive_int(f"sizes[{i}]", size, "split_classes")
    class_ids = torch.unique(labels.cpu())
    if sum(sizes) > class_ids.numel():
        raise ValueError(f"split_classes: sizes {list(sizes)} add up to {sum(sizes)} classes but labels hold "
                         f"only {class_ids.numel()}")
    perm = class_ids[torch.randperm(class_ids.numel(), generator=generator)]
    groups, start = [], 0
    for size in sizes:
        chosen = perm[start:start + size]
        start += size
        groups.append(torch.isin(labels, chosen.to(labels.device)).nonzero().squeeze(1))
    return tuple(groups)


def _check_images_labels(images: Tensor, labels: Tensor) -> None:
    if not isinstance(images, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(f"EpisodeSampler: images and labels must be torch.Tensors, got "
                        f"{type(images).__name__} and {type(labels).__name__}")
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"EpisodeSampler: images must be a 4-D floating point tensor (num_images, C, H, W), "
                         f"got shape {tuple(images.shape)} and dtype {images.dtype}; add a channel dimension "
                         f"with images.unsqueeze(1) and convert with .float()")
    if labels.dtype != torch.int64:
        raise TypeError(f"EpisodeSampler: labels must be int64 class ids, got {labels.dtype}; use labels.long()")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"EpisodeSampler: labels must have shape (num_images,) = ({images.shape[0]},) to match "
                         f"images, got {tuple(labels.shape)}")
