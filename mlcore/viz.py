"""Figures for the book: episode grids and embedding plots.

matplotlib and scikit-learn are imported inside the functions, so importing mlcore never needs them.
Every function accepts tensors on any device (they are moved to the CPU here) and returns the
matplotlib Figure it drew, so notebooks can save or close it.
"""
from __future__ import annotations

# --- episode grids (section owned by the data work: plot_episode) ---------------------------------

# --- embedding plots (section owned by the metric-learning work: PCA of support/query/prototypes) ---
