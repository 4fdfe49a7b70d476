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
# torch, TaskBatch and Figure are imported above, in the episode-grid section.
from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402


@dataclass(frozen=True, eq=False)
class EpisodeEmbedding:
    """One episode in embedding space: what ``plot_embeddings_pca`` draws for one panel.

    Shapes: support (n_support, D), support_labels (n_support,), query (n_query_total, D),
    query_labels (n_query_total,), prototypes (n_way, D), row k the prototype of class k.
    ``accuracy`` is a fraction in [0, 1] (shown in the panel title). Tensors may live on any device.
    """

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    prototypes: torch.Tensor
    accuracy: float
    title: str = ""


def embed_episode(model: torch.nn.Module, episode: TaskBatch, *, title: str = "",
                  predict: Callable[[TaskBatch], torch.Tensor] | None = None) -> EpisodeEmbedding:
    """Embed ONE episode (a TaskBatch with meta_batch 1) with ``model``, under ``torch.no_grad()``.

    Support and query are embedded together, exactly as in training (``protonet.embed_episodes``);
    prototypes are the class means of the support embeddings (eq. 1 of Snell et al.). The accuracy is
    that of ``predict(episode)`` (scores (1, n_query_total, n_way), e.g.
    ``lambda t: matching.predict(model, t)``), or, by default, of the nearest prototype (ProtoNet).
    Call it once per state (before / after training) and pass the results to ``plot_embeddings_pca``.
    """
    from . import protonet

    if episode.meta_batch != 1:
        raise ValueError(f"embed_episode: pass one episode (meta_batch 1, e.g. tasks[0]), got meta_batch "
                         f"{episode.meta_batch}")
    n_way = int(episode.y_support.max()) + 1
    with torch.no_grad():
        support, query = protonet.embed_episodes(model, episode)       # (1, n_support, D), (1, Q, D)
        protos = protonet.prototypes(support, episode.y_support, n_way)  # (1, n_way, D)
        scores = predict(episode) if predict is not None else protonet.logits(query, protos)
        accuracy = (scores.argmax(-1) == episode.y_query).double().mean().item()
    cpu = lambda t: t[0].detach().cpu()  # noqa: E731
    return EpisodeEmbedding(cpu(support), cpu(episode.y_support), cpu(query), cpu(episode.y_query), cpu(protos),
                            accuracy, title)


def plot_embeddings_pca(*states: EpisodeEmbedding, panel_size: float = 4.0) -> Figure:
    """Side-by-side PCA plots of one episode's embeddings, e.g. ``plot_embeddings_pca(before, after)``.

    Each panel projects its own support, query and prototypes onto their first two principal
    components (scikit-learn PCA fitted per panel: the networks before and after training embed into
    different spaces, so no common projection exists). Colour is the class; support examples are
    filled circles, queries crosses, prototypes large stars. Titles carry each episode's accuracy.
    Returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from sklearn.decomposition import PCA

    if not states or not all(isinstance(s, EpisodeEmbedding) for s in states):
        raise TypeError("plot_embeddings_pca: pass one or more EpisodeEmbedding (see embed_episode)")
    fig, axes = plt.subplots(1, len(states), figsize=(panel_size * len(states), panel_size), squeeze=False,
                             layout="constrained")
    for ax, state in zip(axes[0], states, strict=True):
        support, query, protos = (t.detach().cpu().double() for t in (state.support, state.query, state.prototypes))
        y_support, y_query = state.support_labels.detach().cpu(), state.query_labels.detach().cpu()
        if support.dim() != 2 or query.dim() != 2 or protos.dim() != 2 or \
                not support.shape[1] == query.shape[1] == protos.shape[1]:
            raise ValueError(f"plot_embeddings_pca: expected support (n_support, D), query (n_query, D) and "
                             f"prototypes (n_way, D); got {tuple(support.shape)}, {tuple(query.shape)}, "
                             f"{tuple(protos.shape)}")
        points = torch.cat([support, query, protos]).numpy()
        xy = PCA(n_components=2).fit_transform(points)                 # (n_support + Q + n_way, 2)
        xy_s, xy_q, xy_p = xy[:len(support)], xy[len(support):len(support) + len(query)], xy[-len(protos):]
        n_way = len(protos)
        cmap = plt.get_cmap("tab10" if n_way <= 10 else "tab20")
        for k in range(n_way):
            colour = cmap(k % cmap.N)
            s, q = (y_support == k).numpy(), (y_query == k).numpy()
            ax.scatter(xy_q[q, 0], xy_q[q, 1], color=colour, marker="x", s=25, alpha=0.7)
            ax.scatter(xy_s[s, 0], xy_s[s, 1], color=colour, marker="o", s=50, edgecolors="black", linewidths=0.5)
            ax.scatter(xy_p[k, 0], xy_p[k, 1], color=colour, marker="*", s=350, edgecolors="black", linewidths=1)
        title = f"{state.title}: " if state.title else ""
        ax.set_title(f"{title}episode accuracy {100 * state.accuracy:.0f}%")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Line2D([], [], color="grey", marker=m, linestyle="", markersize=ms, markeredgecolor="black", label=lab)
               for m, ms, lab in (("o", 7, "support"), ("x", 6, "query"), ("*", 14, "prototype"))]
    axes[0][-1].legend(handles=handles, loc="best", fontsize="small")
    return fig


# --- kernel-free players: precomputed frames behind sliders that work on a static page ------------
import base64  # noqa: E402
import html as _html  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402


def grid_player(fig: Figure, update: Callable[..., object], axes: dict[str, Sequence[object]], *,
                name: str, start: Sequence[int] | None = None, fmt: str = "{}") -> str:
    """HTML for a player with one slider per grid axis, over frames drawn in advance.

    ``axes`` maps each slider's label to its values, e.g. ``{"α": (0.003, 0.01), "inner steps": (0, 1, 5)}``.
    For every combination, ``update(*values)`` redraws ``fig`` (one argument per axis, in the order
    of ``axes``) and the figure is saved as a PNG at its own dpi. The returned HTML (show it with
    ``IPython.display.HTML``) holds every frame and a few lines of JavaScript that swap the image as
    the sliders move, so it works on a static web page with no kernel, like matplotlib's
    ``FuncAnimation.to_jshtml()`` (which has a single slider: a grid walked in one line).

    ``name`` becomes the HTML id (letters, digits, ``-`` and ``_``; one per page): fixed, unlike
    to_jshtml's random one, so a re-executed notebook stores the same text. ``start`` is the index on
    each axis shown first (default: the first value of each). ``fmt`` formats the values shown beside
    the sliders. The figure is closed afterwards.

    Shapes: with axes of lengths n_1, ..., n_d the player holds n_1 × ... × n_d frames; keep it in
    the tens (each frame is a PNG of tens of kB inside the page).
    """
    import matplotlib.pyplot as plt

    if not re.fullmatch(r"[A-Za-z][\w-]*", name):
        raise ValueError(f"grid_player: name must be an HTML id (a letter, then letters, digits, - or _), "
                         f"got {name!r}")
    if not axes or any(len(values) == 0 for values in axes.values()):
        raise ValueError(f"grid_player: every axis needs at least one value, got "
                         f"{ {label: len(values) for label, values in axes.items()} }")
    sizes = [len(values) for values in axes.values()]
    start = [0] * len(sizes) if start is None else list(start)
    if len(start) != len(sizes) or not all(0 <= s < n for s, n in zip(start, sizes, strict=True)):
        raise ValueError(f"grid_player: start={start} must hold one index per axis, within {sizes}")

    frames = []                                            # row-major over the axes, as the script reads them
    for values in itertools.product(*axes.values()):
        update(*values)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=fig.dpi)     # no bbox_inches: every frame the same size
        frames.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"))
    plt.close(fig)

    first = 0
    for index, size in zip(start, sizes, strict=True):
        first = first * size + index
    width = round(fig.get_figwidth() * fig.dpi)
    rows = []
    for k, (label, values) in enumerate(axes.items()):
        rows.append(
            f'<label for="{name}-{k}">{_html.escape(str(label))}</label>'
            f'<input type="range" id="{name}-{k}" min="0" max="{len(values) - 1}" step="1" '
            f'value="{start[k]}" style="width:100%">'
            f'<output id="{name}-{k}-value">{_html.escape(fmt.format(values[start[k]]))}</output>')
    shown = [[fmt.format(v) for v in values] for values in axes.values()]
    return f"""<div class="mlcore-grid-player" id="{name}" style="max-width:{width}px">
<img id="{name}-img" src="{frames[first]}" alt="frame of the player {name}" style="max-width:100%;height:auto;display:block">
<div style="display:grid;grid-template-columns:max-content 1fr 4em;gap:0.2em 0.8em;align-items:center;margin-top:0.3em">
{chr(10).join(rows)}
</div>
<script>
(function () {{
  var frames = {json.dumps(frames)};
  var shown = {json.dumps(shown, ensure_ascii=False)};
  var sizes = {json.dumps(sizes)};
  var img = document.getElementById("{name}-img");
  var sliders = sizes.map(function (_, k) {{ return document.getElementById("{name}-" + k); }});
  function show() {{
    var index = 0;
    sliders.forEach(function (slider, k) {{
      index = index * sizes[k] + Number(slider.value);
      document.getElementById(slider.id + "-value").textContent = shown[k][Number(slider.value)];
    }});
    img.src = frames[index];
  }}
  sliders.forEach(function (slider) {{ slider.addEventListener("input", show); }});
}})();
</script>
</div>"""
