"""mlcore.notebook.setup's figure defaults: figures legible at the size the site shows them.

The site shows a cell's PNG at its own size when it fits the text column (TEXT_COLUMN_PX at a
1280-px-wide window; tests/test_site.py measures the column) and scales it down otherwise, its text
with it. So the defaults must give a figure that fits, with no text below 9 pt.
"""
from __future__ import annotations

import io

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.font_manager import FontProperties

from mlcore.notebook import FIGURE_DPI, FIGURE_WIDTH, TEXT_COLUMN_PX, setup

MIN_POINTS = 9          # nothing smaller on the page (legends, tick labels)
TEXT_KEYS = ("legend.fontsize", "legend.title_fontsize", "xtick.labelsize", "ytick.labelsize",
             "axes.titlesize", "axes.labelsize", "figure.titlesize", "figure.labelsize")


@pytest.fixture
def defaults():
    """rcParams as setup() leaves them (restored afterwards, so other tests see matplotlib's own)."""
    with matplotlib.rc_context():
        setup(seed=0, device="cpu", verbose=False)
        yield matplotlib.rcParams.copy()


def _points(rc, key: str) -> float:
    """A size in points, with relative sizes ("small", "large") resolved against font.size as
    matplotlib does."""
    value = rc[key]
    if isinstance(value, str):
        return FontProperties(size=value).get_size_in_points()
    return float(value)


def test_base_font_and_resolution(defaults) -> None:
    assert 10.5 <= defaults["font.size"] <= 12, defaults["font.size"]
    assert defaults["figure.dpi"] == defaults["savefig.dpi"] == FIGURE_DPI >= 100
    assert defaults["figure.constrained_layout.use"] is True


@pytest.mark.parametrize("key", TEXT_KEYS)
def test_no_default_text_below_9_points(defaults, key: str) -> None:
    assert _points(defaults, key) >= MIN_POINTS, f"{key} = {defaults[key]!r} is below {MIN_POINTS} pt"


def test_titles_are_11_to_12_points(defaults) -> None:
    for key in ("axes.titlesize", "figure.titlesize"):
        assert 11 <= _points(defaults, key) <= 12.5, (key, defaults[key])
    assert _points(defaults, "legend.fontsize") >= MIN_POINTS + 1


def test_default_figure_fits_the_text_column(defaults) -> None:
    width, height = defaults["figure.figsize"]
    assert width == FIGURE_WIDTH
    assert width * FIGURE_DPI <= TEXT_COLUMN_PX - 20, "no room for what bbox_inches='tight' may add"
    assert 0.4 <= height / width <= 0.7, defaults["figure.figsize"]


def test_a_two_panel_figure_with_a_legend_saves_within_the_column(defaults) -> None:
    """What the inline backend stores: savefig with bbox_inches='tight'."""
    fig, axes = plt.subplots(1, 2, sharey=True)
    for ax in axes:
        ax.plot([0, 1000], [0, 1], label="query MSE after 10 steps")
        ax.plot([0, 1000], [1, 0], label="support MSE")
        ax.set(xlabel="gradient steps on the support set", ylabel="MSE", title="a panel title")
        ax.legend()
    fig.suptitle("a figure title")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    png = buffer.getvalue()
    width = int.from_bytes(png[16:20], "big")       # the IHDR chunk: width, then height, in pixels
    assert width <= TEXT_COLUMN_PX, f"a default figure saves {width} px wide, the column is {TEXT_COLUMN_PX}"


def test_setup_leaves_other_settings_alone() -> None:
    """Only the keys setup() names change (e.g. the backend is the caller's)."""
    with matplotlib.rc_context():
        backend = matplotlib.get_backend()
        setup(seed=0, device="cpu", verbose=False)
        assert matplotlib.get_backend() == backend


# --- portable CPU kernels (MLCORE_PORTABLE_CPU=1): convolutions that round the same on any x86-64 CPU

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from mlcore.notebook import PORTABLE_CPU_ENV

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_kernels():
    mkldnn, nnpack = torch.backends.mkldnn.enabled, torch._C._get_nnpack_enabled()
    yield
    torch.backends.mkldnn.enabled = mkldnn
    torch.backends.nnpack.set_flags(nnpack)


def test_portable_mode_switches_processor_specific_kernels_off(monkeypatch, restore_kernels):
    monkeypatch.setenv("MLCORE_PORTABLE_CPU", "1")
    with matplotlib.rc_context():
        setup(seed=0, device="cpu", verbose=False)
    assert torch.backends.mkldnn.enabled is False
    assert torch._C._get_nnpack_enabled() is False


def test_default_mode_leaves_torchs_kernels_alone(monkeypatch, restore_kernels):
    monkeypatch.delenv("MLCORE_PORTABLE_CPU", raising=False)
    torch.backends.mkldnn.enabled = True
    with matplotlib.rc_context():
        setup(seed=0, device="cpu", verbose=False)
    assert torch.backends.mkldnn.enabled is True


def test_portable_flag_must_be_0_or_1(monkeypatch):
    monkeypatch.setenv("MLCORE_PORTABLE_CPU", "yes")
    with pytest.raises(ValueError, match="must be 0 or 1, got 'yes'"):
        setup(seed=0, device="cpu", verbose=False)


def test_makefile_gives_the_notebook_stages_the_portable_environment():
    makefile = (ROOT / "Makefile").read_text()
    line = re.search(r"^NB_ENV := (.*)$", makefile, re.MULTILINE)
    assert line, "Makefile defines no NB_ENV"
    assert dict(kv.split("=", 1) for kv in line.group(1).split()) == PORTABLE_CPU_ENV
    nbval_runs = re.findall(r"^\t.*-m pytest --nbval.*$", makefile, re.MULTILINE)
    assert len(nbval_runs) == 2 and all("env $(NB_ENV)" in run for run in nbval_runs), nbval_runs


def test_run_notebook_kernels_get_the_portable_environment(tmp_path):
    """scripts/run_notebook.py stores outputs computed the way CI checks them."""
    import json

    code = ("import os, torch\nfrom mlcore.notebook import setup\n_ = setup(verbose=False)\n"
            "print(os.environ.get('MLCORE_PORTABLE_CPU'), torch.backends.mkldnn.enabled)")
    nb = tmp_path / "env.ipynb"
    nb.write_text(json.dumps({
        "cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                   "source": [code]}],
        "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_CPU_ENV}
    subprocess.run([sys.executable, str(ROOT / "scripts" / "run_notebook.py"), str(nb)],
                   check=True, env=env, capture_output=True)
    assert "1 False" in nb.read_text()
