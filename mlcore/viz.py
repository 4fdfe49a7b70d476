"""Figures for the book: episode grids and embedding plots.

matplotlib and scikit-learn are imported inside the functions, so importing mlcore never needs them.
Every function accepts tensors on any device (they are moved to the CPU here) and returns the
matplotlib Figure it drew, so notebooks can save or close it.
"""
from __future__ import annotations

# --- episode grids (section owned by the data work: plot_episode) ---------------------------------
from collections.abc import Sequence  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import torch  # noqa: E402

from .tasks import TaskBatch  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def plot_episode(tasks: TaskBatch, index: int = 0, *, max_query: int = 5, class_names: Sequence[str] | None = None,
                 cmap: str = "gray_r", cell_size: float = 0.9) -> Figure:
    """Draw episode ``index`` of ``tasks``: one row per class, its support images, a gap, its query images.

    Row n shows the examples labelled n (``y_support == n`` then up to ``max_query`` of ``y_query == n``),
    labelled ``class_names[n]`` when given (e.g. the data set's names of the episode's classes; see
    ``EpisodeSampler.sample_indices``). Images (C, H, W) with 1 or 3 channels in [0, 1]; the default
    ``cmap="gray_r"`` draws Omniglot's strokes-high images as dark ink on white paper.
    Returns the matplotlib Figure (made with pyplot: in a notebook, assign it, ``fig = ...``, to show it once).
    """
    import matplotlib.pyplot as plt

    if not isinstance(tasks, TaskBatch) or not tasks.is_classification:
        raise TypeError("plot_episode: pass a classification TaskBatch (int64 labels), e.g. EpisodeSampler.sample()")
    if tasks.x_support.dim() != 5 or tasks.x_support.shape[2] not in (1, 3):
        raise ValueError(f"plot_episode: expected images (B, n, C, H, W) with C = 1 or 3, got x_support of shape "
                         f"{tuple(tasks.x_support.shape)}")
    if not -tasks.meta_batch <= index < tasks.meta_batch:
        raise IndexError(f"plot_episode: index={index} but the batch holds {tasks.meta_batch} episodes")
    if isinstance(max_query, bool) or not isinstance(max_query, int) or max_query < 0:
        raise ValueError(f"plot_episode: max_query must be an integer >= 0, got {max_query!r}")
    episode = tasks[index].to("cpu")
    xs, ys, xq, yq = (t[0].detach() for t in (episode.x_support, episode.y_support, episode.x_query, episode.y_query))
    n_way = int(torch.cat([ys, yq]).max()) + 1
    if class_names is not None and len(class_names) != n_way:
        raise ValueError(f"plot_episode: {len(class_names)} class_names for an episode of {n_way} classes")
    rows = [(xs[ys == n], xq[yq == n][:max_query]) for n in range(n_way)]        # per class: (k, C, H, W), (q, C, H, W)
    n_support = max(len(s) for s, _ in rows)
    n_query = max(len(q) for _, q in rows)
    gap = 0.3 if n_query else 0.0                                                 # spacer column, in image widths
    width_ratios = [1.0] * n_support + ([gap] + [1.0] * n_query if n_query else [])
    fig = plt.figure(figsize=(cell_size * sum(width_ratios) + 1.2, cell_size * n_way + 0.6))
    grid = fig.add_gridspec(n_way, len(width_ratios), width_ratios=width_ratios, wspace=0.05, hspace=0.05)
    for n, (support, query) in enumerate(rows):
        cells = [(j, x, "support") for j, x in enumerate(support)]
        cells += [(n_support + 1 + j, x, "query") for j, x in enumerate(query)]
        for column, image, kind in cells:
            ax = fig.add_subplot(grid[n, column])
            pixels = image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)    # (H, W) or (H, W, 3)
            ax.imshow(pixels.float().clamp(0, 1).numpy(), cmap=cmap, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if n == 0 and column in (0, n_support + 1):
                ax.set_title(kind, fontsize="small", loc="left")
            if column == 0:
                ax.set_ylabel(class_names[n] if class_names is not None else f"class {n}", rotation=0,
                              ha="right", va="center", fontsize="small")
    fig.suptitle(f"episode {index}: {n_way}-way {n_support}-shot, {len(yq)} queries"
                 + (f" ({n_query} per class shown)" if n_query < len(yq) // max(n_way, 1) else ""))
    return fig



# --- embedding plots (section owned by the metric-learning work: PCA of support/query/prototypes) ---
