"""The reusable half of every chapter's setup cell.

Every chapter notebook starts with the same first code cell (``book/quickstart.ipynb`` holds the
reference copy; tests/test_book_structure.py checks every chapter's)::

    # Setup: the first cell of every chapter.
    import sys

    # The book's repository (the same URL as repository.url in _config.yml).
    REPO_URL = "https://github.com/mlcore-book/meta-learning-book"
    if "google.colab" in sys.modules:  # in Colab: install mlcore first
        %pip install -q "mlcore @ git+{REPO_URL}@main"

    from mlcore.notebook import setup

    device = setup(seed=0)

``setup`` makes a chapter's stored outputs reproducible on the CPU (CI re-runs every notebook with
``pytest --nbval`` and compares the printed text with what is committed) and picks the GPU when the
reader has one (Colab). It touches process-wide state on purpose -- the global random generators
that ``nn.Module`` initialisation and ``random``/``numpy`` calls draw from, and matplotlib's defaults --
which is right for a notebook and wrong for a library: mlcore's own functions never call it, they
take a ``torch.Generator`` argument instead.

Stored outputs and the CPU they were computed on
------------------------------------------------
A float32 training run of a few hundred steps amplifies last-bit rounding differences into visible
ones (82.1% on one machine, 82.3% on another). By default torch computes CPU convolutions with
oneDNN (or NNPACK for large batches), which choose their code paths and blockings by the
processor's instruction set and cache sizes, so the same chapter with the same seeds printed
different digits on the AMD EPYC that stored it and on a CI machine with another processor:
exactly the chapters that train convolutional networks. With ``MLCORE_PORTABLE_CPU=1`` in the environment, ``setup`` switches
oneDNN and NNPACK off on the CPU, and convolutions run as im2col + an MKL matrix product. (MKL's
own products printed the same digits on both processors: the chapters without convolutions
reproduced on both as they were. ``MKL_CBWR=COMPATIBLE`` would pin them too, at 2-4x the cost of
every matrix product, so it is not set.) ``make test``, ``make test-notebook`` and
``scripts/run_notebook.py`` set the variable (``PORTABLE_CPU_ENV``): that is how the committed
outputs were made and how CI checks them, on whichever CPU it gets. It costs speed (a MAML step on
Omniglot about 1.2x, a 60-way ProtoNet episode about 1.6x), so a reader running a chapter by hand
is not slowed by it, and gets the same numbers to rounding rather than to the digit.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

import mlcore

__all__ = [
    "FIGURE_DPI",
    "FIGURE_WIDTH",
    "PORTABLE_CPU_ENV",
    "TEXT_COLUMN_PX",
    "portable_cpu_kernels",
    "setup",
]

#: The environment under which the book's stored outputs are computed and checked (see above).
PORTABLE_CPU_ENV = {"MLCORE_PORTABLE_CPU": "1"}

#: Resolution of every figure in the book (inline PNGs and saved files alike).
FIGURE_DPI = 100
#: Width in pixels of a cell's output area on the site in a 1280-px-wide window (sphinx-book-theme's
#: article column with theme/static/book.css, measured in Chromium). A wider PNG is scaled down to it,
#: and its text with it: a figure at most this wide is shown at its own size.
TEXT_COLUMN_PX = 728
#: Default figure width in inches, and the widest a chapter's ``figsize`` should be: 700 px at
#: FIGURE_DPI, which leaves TEXT_COLUMN_PX room for the ~10 px that the inline backend's
#: ``bbox_inches="tight"`` adds (a 7.2-in figure is stored about 730 px wide, and scaled down).
FIGURE_WIDTH = 7.0


def setup(seed: int = 0, *, device: str | torch.device | None = None, verbose: bool = True) -> torch.device:
    """Seed the global generators, fix figure defaults and return the device to compute on.

    Args:
        seed: seeds Python's ``random``, NumPy's legacy global generator and torch's CPU and CUDA
            generators (model initialisation draws from torch's). Chapters still pass an explicit
            ``torch.Generator`` to samplers, so that the tasks do not depend on what ran before.
        device: ``None`` picks ``cuda`` when a GPU is visible, else ``cpu``; pass ``"cpu"`` to force
            the CPU (for example to compare with the stored CPU outputs while on a GPU).
        verbose: print one line naming the versions and the device.

    Returns:
        The ``torch.device`` to put models and tasks on.

    With ``MLCORE_PORTABLE_CPU=1`` in the environment (``make test`` sets it), a CPU run uses
    :func:`portable_cpu_kernels`, so that its convolutions round the same on every x86-64 CPU.

    The line printed reads ``mlcore 0.1.0 · torch 2.13.0+cpu · device cpu``. CI's sanitize file
    (``nbval_sanitize.cfg``) masks the two version numbers, so a version bump does not force
    re-executing every chapter; the device stays compared (CI runs on the CPU).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"setup: seed must be a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "setup: device='cuda' was asked for but torch sees no GPU. In Colab choose "
            "Runtime → Change runtime type → GPU, then run the notebook again; locally, omit device."
        )

    portable = os.environ.get("MLCORE_PORTABLE_CPU", "0")
    if portable not in ("0", "1"):
        raise ValueError(f"setup: MLCORE_PORTABLE_CPU must be 0 or 1, got {portable!r}")
    if device.type == "cpu" and portable == "1":
        portable_cpu_kernels()
    _figure_defaults()
    if verbose:
        print(f"mlcore {mlcore.__version__} · torch {torch.__version__} · device {device}")
    return device


def portable_cpu_kernels() -> None:
    """Compute CPU convolutions with kernels whose rounding does not depend on the processor.

    Switches torch's oneDNN and NNPACK off for this process: convolutions (and their gradients) fall
    back to im2col + an MKL matrix product. Called by ``setup`` when ``MLCORE_PORTABLE_CPU=1``; see
    the module docstring for why, and what it costs.
    """
    torch.backends.mkldnn.enabled = False
    torch.backends.nnpack.set_flags(False)


def _figure_defaults() -> None:
    """Deterministic, legible matplotlib defaults (skipped when matplotlib is not installed).

    matplotlib is an optional dependency of mlcore (the ``plots`` extra); a notebook that plots
    imports it anyway and then fails with its own clear ImportError.

    Sizes are chosen for the page, where a figure is shown at its own size when it fits the text
    column (``TEXT_COLUMN_PX``): at ``FIGURE_DPI`` = 100 a point is 1.39 px, so 11-pt text is as tall
    as the prose around it and nothing is drawn below 9 pt (legends and tick labels: 10 pt).
    Chapters therefore pass no ``fontsize=`` except where a size is deliberately different (numbers
    written inside the cells of a heat map). Animations (``to_jshtml``) save their frames at
    ``savefig.dpi``, so their frames follow the same rules.
    """
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.rcParams.update({
        "figure.dpi": FIGURE_DPI,          # the inline backend's PNG size; fixed so pages look alike
        "savefig.dpi": FIGURE_DPI,
        "figure.figsize": (FIGURE_WIDTH, 3.6),
        "figure.autolayout": False,
        "figure.constrained_layout.use": True,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "font.size": 11,
        "axes.titlesize": 12,
        "axes.labelsize": 11,
        "figure.titlesize": 12,
        "figure.labelsize": 11,
        "xtick.labelsize": 10,
        "ytick.labelsize": 10,
        "legend.fontsize": 10,
        "legend.title_fontsize": 10,
        "legend.frameon": False,
        "image.cmap": "viridis",
        "animation.embed_limit": 20.0,  # MB; to_jshtml() animations larger than this are cut
    })
