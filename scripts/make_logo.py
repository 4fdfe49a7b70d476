"""Draw the book's logo and favicon (this repository's own art, no third-party files).

The picture is MAML's: one initialisation θ (the white dot) from which a gradient step reaches each
task's solution θ'_i (the coloured dots). Run once after changing the drawing and commit the outputs:

    python scripts/make_logo.py        # writes theme/logo.svg and theme/site/favicon.ico

theme/logo.svg is the sidebar logo (_config.yml `logo`) and the page icon (`html.favicon`);
theme/site/ is copied to the site's root (html_extra_path), so the /favicon.ico that browsers ask
for exists.
"""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "theme"
BACKGROUND = "#1d3f66"
TASKS = [((0.76, 0.76), "#f2a541"), ((0.80, 0.34), "#63c49a"), ((0.36, 0.80), "#7fb8f0")]
START = (0.25, 0.26)


def draw(size_in: float = 1.0, *, bold: bool = False) -> plt.Figure:
    fig = plt.figure(figsize=(size_in, size_in))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set(xlim=(0, 1), ylim=(0, 1))
    ax.axis("off")
    ax.add_patch(FancyBboxPatch((0.02, 0.02), 0.96, 0.96, boxstyle="round,pad=0,rounding_size=0.18",
                                facecolor=BACKGROUND, edgecolor="none"))
    # Sizes in points for a 1-inch (72 pt) figure, scaled with it.
    width, dot, start = (4.5, 130, 190) if bold else (2.8, 85, 130)
    for (x, y), colour in TASKS:
        ax.add_patch(FancyArrowPatch(START, (x, y), arrowstyle="-|>", mutation_scale=11 * size_in,
                                     linewidth=width * size_in, color=colour, shrinkA=7 * size_in,
                                     shrinkB=7 * size_in))
        ax.scatter([x], [y], s=dot * size_in**2, color=colour, zorder=3, linewidths=0)
    ax.scatter([START[0]], [START[1]], s=start * size_in**2, color="white", zorder=3, linewidths=0)
    return fig


def main() -> None:
    (OUT / "site").mkdir(parents=True, exist_ok=True)
    plt.rcParams["svg.hashsalt"] = "mlcore-logo"   # stable ids: the SVG is the same on every run
    fig = draw(1.0)
    fig.savefig(OUT / "logo.svg", transparent=True, metadata={"Date": None, "Creator": None})

    plt.close(fig)
    # The favicon: the same picture with thicker strokes, so that it still reads at 16 px.
    buffer = io.BytesIO()
    fig = draw(1.0, bold=True)
    fig.savefig(buffer, format="png", dpi=256, transparent=True)
    plt.close(fig)
    icon = Image.open(buffer).convert("RGBA")
    icon.save(OUT / "site" / "favicon.ico", sizes=[(16, 16), (32, 32), (48, 48), (64, 64)])
    for path in (OUT / "logo.svg", OUT / "site" / "favicon.ico"):
        print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
