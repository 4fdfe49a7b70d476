"""mlcore.viz.grid_player: a static-page player with one slider per grid axis.

The HTML is checked here (frames, order, ids, errors); tests/test_site.py moves its sliders in a
browser on the built site.
"""
from __future__ import annotations

import base64
import json
import re

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import matplotlib.pyplot as plt

from mlcore.viz import grid_player

AXES = {"α": (0.1, 0.3), "inner steps": (0, 1, 2)}


def _player(**kwargs) -> tuple[str, list[tuple]]:
    fig, ax = plt.subplots(figsize=(2, 1), dpi=50)
    drawn = []

    def update(alpha, steps):
        drawn.append((alpha, steps))
        ax.clear()
        ax.plot([0, 1], [0, alpha * steps])

    return grid_player(fig, update, AXES, name="demo", **kwargs), drawn


def _frames(html: str) -> list[str]:
    return json.loads(re.search(r"var frames = (\[.*?\]);", html).group(1))


def test_one_png_frame_per_combination_in_row_major_order() -> None:
    html, drawn = _player()
    assert drawn == [(0.1, 0), (0.1, 1), (0.1, 2), (0.3, 0), (0.3, 1), (0.3, 2)]
    frames = _frames(html)
    assert len(frames) == 6
    for frame in frames:
        png = base64.b64decode(frame.removeprefix("data:image/png;base64,"))
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert int.from_bytes(png[16:20], "big") == 100      # 2 in at 50 dpi, every frame the same size
    assert json.loads(re.search(r"var sizes = (\[.*?\]);", html).group(1)) == [2, 3]


def test_sliders_labels_and_the_first_frame() -> None:
    html, _ = _player(start=(1, 2))
    assert re.search(r'<input type="range" id="demo-0" min="0" max="1" step="1" value="1"', html)
    assert re.search(r'<input type="range" id="demo-1" min="0" max="2" step="1" value="2"', html)
    assert '<label for="demo-0">α</label>' in html and '<label for="demo-1">inner steps</label>' in html
    assert '<output id="demo-0-value">0.3</output>' in html and '<output id="demo-1-value">2</output>' in html
    shown = re.search(r'<img id="demo-img" src="([^"]+)"', html).group(1)
    assert shown == _frames(html)[5]                           # row 1, column 2 of a 2 × 3 grid


def test_the_html_is_the_same_on_every_run() -> None:
    """No random ids (unlike to_jshtml's): a re-executed notebook stores the same text."""
    first, _ = _player()
    second, _ = _player()
    assert first == second


def test_the_figure_is_closed() -> None:
    before = set(plt.get_fignums())
    _player()
    assert set(plt.get_fignums()) == before


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "2 bad"}, "name must be an HTML id"),
    ({"axes": {"α": ()}}, "every axis needs at least one value"),
    ({"start": (0,)}, "one index per axis"),
    ({"start": (0, 3)}, "one index per axis"),
])
def test_bad_arguments_raise(kwargs, message) -> None:
    fig, _ = plt.subplots()
    arguments = {"name": "demo", "axes": AXES, **kwargs}
    with pytest.raises(ValueError, match=message):
        grid_player(fig, lambda *values: None, arguments.pop("axes"), **arguments)
    plt.close(fig)
