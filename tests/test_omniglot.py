"""mlcore.data.omniglot: the real copy (skipped when absent) and the download path (local server, no network).

Real-data tests read $MLCORE_OMNIGLOT, else the repository's sibling ../shared/data/omniglot
(_omniglot_fixtures.REAL_ROOT), and use mlcore's normal decoded cache ($MLCORE_CACHE, else
~/.cache/mlcore): the first run on a machine decodes once (~10 s), later runs load in a fraction of a
second. The cold decode into a fresh cache is the one ``slow`` test.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from functools import cache
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from _omniglot_fixtures import (
    DRAWINGS,
    REAL_ROOT,
    TINY_LAYOUT,
    closed_port_url,
    make_tiny_omniglot,
    needs_real_omniglot,
    serve,
)
from PIL import Image

from mlcore.data import omniglot as og
from mlcore.data.omniglot import (
    OMNIGLOT_MD5,
    load_omniglot,
    omniglot_class_names,
    omniglot_root,
)

CLASS_COUNTS = {("vinyals", "train"): 4112, ("vinyals", "val"): 688, ("vinyals", "trainval"): 4800,
                ("vinyals", "test"): 1692, ("original", "background"): 964, ("original", "evaluation"): 659}


@cache
def real_split(protocol: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    return load_omniglot(REAL_ROOT, split=split, protocol=protocol, download=False, progress=False)


# --- arguments and root resolution --------------------------------------------------------------------

def test_bad_split_or_protocol_lists_allowed_values():
    with pytest.raises(ValueError, match=r"split='background' is not a split of protocol 'vinyals'.*train, val"):
        load_omniglot(split="background", protocol="vinyals")
    with pytest.raises(ValueError, match=r"protocol='imagenet' is not one of .*'vinyals', 'original', 'lake'"):
        omniglot_class_names("train", "imagenet")
    with pytest.raises(ValueError, match="image_size must be a positive integer"):
        load_omniglot(split="train", image_size=0)


def test_root_resolution_order(monkeypatch, tmp_path):
    monkeypatch.setenv("MLCORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLCORE_OMNIGLOT", raising=False)
    assert omniglot_root() == tmp_path / "cache" / "omniglot"
    monkeypatch.setenv("MLCORE_OMNIGLOT", str(tmp_path / "env"))
    assert omniglot_root() == tmp_path / "env"
    assert omniglot_root(tmp_path / "arg") == tmp_path / "arg"


def test_vinyals_class_names_ship_with_the_package():
    for split in og.SPLITS["vinyals"]:
        names = omniglot_class_names(split)
        assert len(names) == CLASS_COUNTS["vinyals", split] == len(set(names))
    train, val, test = (set(omniglot_class_names(s)) for s in ("train", "val", "test"))
    assert not train & val and not train & test and not val & test
    assert set(omniglot_class_names("trainval")) == train | val


def test_missing_data_without_download_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setenv("MLCORE_OMNIGLOT", str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match=r"nothing \(from \$MLCORE_OMNIGLOT\).*download=True.*root="):
        load_omniglot(download=False)


# --- the real copy ------------------------------------------------------------------------------------

@needs_real_omniglot
@pytest.mark.parametrize(("protocol", "split"), list(CLASS_COUNTS))
def test_real_split_sizes_shapes_and_values(protocol, split):
    images, labels = real_split(protocol, split)
    n_classes = CLASS_COUNTS[protocol, split]
    assert images.shape == (n_classes * 20, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (n_classes * 20,) and labels.dtype == torch.int64
    assert torch.equal(torch.bincount(labels), torch.full((n_classes,), 20))
    assert torch.equal(labels, torch.arange(n_classes).repeat_interleave(20))   # split-file order
    assert images.min() == 0 and images.max() == 1
    assert images.mean() < 0.2                                                  # strokes high: mostly paper
    assert len(omniglot_class_names(split, protocol, root=REAL_ROOT)) == n_classes


@needs_real_omniglot
def test_real_rotated_classes_are_rot90_of_the_upright_class():
    images, labels = real_split("vinyals", "train")
    names = omniglot_class_names("train")
    upright = images[labels == names.index("Angelic/character01/rot000")]        # (20, 1, 28, 28)
    for k, rot in enumerate(("rot000", "rot090", "rot180", "rot270")):
        rotated = images[labels == names.index(f"Angelic/character01/{rot}")]
        assert torch.equal(rotated, torch.rot90(upright, k, dims=(-2, -1)))
    assert not torch.equal(images[labels == names.index("Angelic/character01/rot090")],
                           torch.rot90(upright, -1, dims=(-2, -1)))              # clockwise would differ


def _pil_pipeline(png: Path, degrees: int, size: int, rotate_first: bool) -> torch.Tensor:
    with Image.open(png) as im:
        im = im.convert("F")
        if rotate_first:
            im = im.rotate(degrees)                                              # PIL: counter-clockwise
        im = im.resize((size, size), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(255 - np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8))
    return pixels if rotate_first else torch.rot90(pixels, degrees // 90, dims=(-2, -1))


@needs_real_omniglot
def test_rot90_matches_pil_rotate_and_commutes_with_resizing_on_a_real_image():
    png = sorted(next(REAL_ROOT.glob("images_*/Angelic/character01")).glob("*.png"))[3]
    for degrees in (90, 180, 270):
        for size in (28, 84):
            assert torch.equal(_pil_pipeline(png, degrees, size, True), _pil_pipeline(png, degrees, size, False))
    # The loader's pixels are exactly PIL's rotate-then-resize pipeline (rot090 = counter-clockwise).
    images, labels = real_split("vinyals", "train")
    index = sorted(png.parent.glob("*.png")).index(png)
    loaded = images[labels == omniglot_class_names("train").index("Angelic/character01/rot090")][index, 0]
    assert torch.equal((loaded * 255).round().to(torch.uint8), _pil_pipeline(png, 90, 28, True))


@needs_real_omniglot
def _no_decoding(*args, **kwargs):
    raise AssertionError("a cached load must not open any PNG")


def test_real_cache_second_load_is_fast_identical_and_outside_the_shared_copy(monkeypatch):
    # Timing alone is a weak oracle on a busy machine (scripts/bench_data.py measures it properly):
    # the cached load must not decode at all, and be fast even with a generous bound.
    before = sorted(p.name for p in REAL_ROOT.iterdir())
    first = real_split("vinyals", "test")                          # decodes or loads the cache
    monkeypatch.setattr(PIL.Image, "open", _no_decoding)
    start = time.perf_counter()
    second = load_omniglot(REAL_ROOT, split="test", download=False, progress=False)
    assert time.perf_counter() - start < 3.0
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert sorted(p.name for p in REAL_ROOT.iterdir()) == before
    if not og._writable(REAL_ROOT):
        assert not og._cache_path(REAL_ROOT, 28).is_relative_to(REAL_ROOT)


@needs_real_omniglot
@pytest.mark.slow
def test_real_cold_decode_into_a_fresh_cache(monkeypatch, tmp_path):
    # Always cold: the cache goes to a fresh folder even when the data folder is writable (a cache an
    # earlier run left beside the images would make this "cold" load warm).
    monkeypatch.setenv("MLCORE_CACHE", str(tmp_path))
    monkeypatch.setattr(og, "_writable", lambda folder: False)
    start = time.perf_counter()
    images, labels = load_omniglot(REAL_ROOT, split="test", download=False, progress=False)
    cold = time.perf_counter() - start
    assert og._cache_path(REAL_ROOT, 28).is_relative_to(tmp_path)
    monkeypatch.setattr(PIL.Image, "open", _no_decoding)
    start = time.perf_counter()
    again = load_omniglot(REAL_ROOT, split="test", download=False, progress=False)
    assert time.perf_counter() - start < cold / 5                  # relative: robust to a busy machine
    assert torch.equal(images, again[0]) and torch.equal(labels, again[1])
    assert torch.equal(images, real_split("vinyals", "test")[0])  # same pixels as the default cache


# --- download and decode, against a tiny Omniglot on a local server -----------------------------------

@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """(base URL of a local server holding tiny official-layout zips, their md5s, an empty root)."""
    monkeypatch.setenv("MLCORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLCORE_OMNIGLOT", raising=False)
    monkeypatch.delenv("MLCORE_OMNIGLOT_URL", raising=False)
    md5 = make_tiny_omniglot(tmp_path / "server")
    with serve(tmp_path / "server") as url:
        yield url, md5, tmp_path / "root"


def _nothing_trusted(root: Path) -> bool:
    """No images_* folder and no archive or extracted file anywhere under ``root``."""
    return not any(root.glob("images_*")) and not any(p.is_file() for p in root.rglob("*"))


def test_download_verify_extract_and_decode(tiny):
    url, md5, root = tiny
    images, labels = load_omniglot(root, split="background", protocol="original", image_size=10, base_url=url,
                                   md5=md5, progress=False)
    n_classes = sum(TINY_LAYOUT["images_background"].values())
    assert images.shape == (n_classes * DRAWINGS, 1, 10, 10) and images.dtype == torch.float32
    assert torch.equal(labels, torch.arange(n_classes).repeat_interleave(DRAWINGS))
    assert 0 < images.mean() < 0.5 and images.min() == 0                   # strokes high, paper 0
    assert omniglot_class_names("background", "lake", root=root) == [
        "Alpha/character01", "Alpha/character02", "Beta/character01", "Beta/character02", "Beta/character03"]
    assert sorted(p.name for p in root.iterdir()) == [
        "images_background", "images_evaluation", "mlcore_omniglot_10px_v2.pt"]   # no temp leftovers
    evaluation, _ = load_omniglot(root, split="evaluation", protocol="original", image_size=10,
                                  base_url=closed_port_url(), progress=False)    # present: no download
    assert evaluation.shape == (2 * DRAWINGS, 1, 10, 10)
    with pytest.raises(FileNotFoundError, match=r"'Angelic/character01/rot000' needs the character folder"):
        load_omniglot(root, split="train", image_size=10, progress=False)


def test_download_url_from_environment(tiny, monkeypatch):
    url, md5, root = tiny
    monkeypatch.setenv("MLCORE_OMNIGLOT_URL", url)
    monkeypatch.setenv("MLCORE_OMNIGLOT", str(root))
    images, _ = load_omniglot(split="evaluation", protocol="original", image_size=8, md5=md5, progress=False)
    assert images.shape == (2 * DRAWINGS, 1, 8, 8)


def test_bad_md5_deletes_the_file_and_extracts_nothing(tiny):
    url, md5, root = tiny
    wrong = {**md5, "images_background": "0" * 32}
    with pytest.raises(RuntimeError, match=f"has md5 {md5['images_background']}, expected {'0' * 32}"):
        load_omniglot(root, split="background", protocol="original", base_url=url, md5=wrong, progress=False)
    assert _nothing_trusted(root)


def test_official_md5_is_checked_by_default(tiny):
    url, _, root = tiny
    with pytest.raises(RuntimeError, match=f"expected {OMNIGLOT_MD5['images_background']}"):
        og.download_omniglot(root, base_url=url, progress=False)
    assert _nothing_trusted(root)


def test_connection_dropped_midway_leaves_nothing_trusted(tiny):
    url, md5, root = tiny
    with pytest.raises(RuntimeError, match=r"Could not download Omniglot from .*truncate/images_background.zip"):
        og.download_omniglot(root, base_url=url + "truncate/", md5=md5, progress=False)
    assert _nothing_trusted(root)
    og.download_omniglot(root, base_url=url, md5=md5, progress=False)   # a later run starts clean
    assert (root / "images_background" / "Beta" / "character03").is_dir()


def test_truncated_archive_with_matching_md5_is_not_extracted(tiny, tmp_path):
    url, md5, root = tiny
    archive = tmp_path / "server" / "images_background.zip"
    archive.write_bytes(archive.read_bytes()[:500])
    md5 = {**md5, "images_background": hashlib.md5(archive.read_bytes()).hexdigest()}
    with pytest.raises(RuntimeError, match="not a valid zip archive"):
        og.download_omniglot(root, base_url=url, md5=md5, progress=False)
    assert _nothing_trusted(root)


def test_server_down_error_names_url_root_and_how_to_use_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.delenv("MLCORE_OMNIGLOT", raising=False)
    url = closed_port_url()
    with pytest.raises(RuntimeError) as info:
        load_omniglot(tmp_path / "root", split="test", base_url=url, progress=False)
    message = str(info.value)
    for expected in (url + "images_background.zip", str(tmp_path / "root"), "$MLCORE_OMNIGLOT", "root="):
        assert expected in message
    assert _nothing_trusted(tmp_path / "root")


def test_read_only_root_is_never_written(tiny, tmp_path):
    url, md5, root = tiny
    og.download_omniglot(root, base_url=url, md5=md5, progress=False)
    os.chmod(root, 0o555)                       # like the shared copy; even root (uid 0) must not write here
    try:
        images, _ = load_omniglot(root, split="background", protocol="original", image_size=6, progress=False)
        assert images.shape == (5 * DRAWINGS, 1, 6, 6)
        assert sorted(p.name for p in root.iterdir()) == ["images_background", "images_evaluation"]
        assert og._cache_path(root, 6).is_relative_to(tmp_path / "cache") and og._cache_path(root, 6).exists()
        os.chmod(root, 0o755)
        (root / "images_evaluation").rename(tmp_path / "moved")
        os.chmod(root, 0o555)
        with pytest.raises(PermissionError, match="read-only"):
            load_omniglot(root, split="background", protocol="original", image_size=6, base_url=url, md5=md5)
    finally:
        os.chmod(root, 0o755)


def test_incomplete_character_is_reported(tiny):
    url, md5, root = tiny
    og.download_omniglot(root, base_url=url, md5=md5, progress=False)
    next((root / "images_evaluation" / "Gamma" / "character02").glob("*.png")).unlink()
    with pytest.raises(ValueError, match=r"character02 holds 19 PNGs, expected 20"):
        load_omniglot(root, split="evaluation", protocol="original", image_size=8, progress=False)


def test_changed_images_rebuild_the_cache(tiny):
    """The cache is keyed on the files (paths, sizes, times): new or replaced images are never served stale."""
    url, md5, root = tiny
    load_omniglot(root, split="background", protocol="original", image_size=8, base_url=url, md5=md5, progress=False)
    beta = root / "images_background" / "Beta"
    shutil.copytree(beta / "character03", beta / "character04")
    with pytest.warns(UserWarning, match=r"re-decoding .*images were added, removed or replaced"):
        images, _ = load_omniglot(root, split="background", protocol="original", image_size=8, progress=False)
    assert images.shape[0] == 6 * DRAWINGS
    png = next((beta / "character01").glob("*.png"))
    blank = PIL.Image.new("1", (12, 12), 1)
    blank.save(png)                                                       # replace one drawing in place
    os.utime(png, ns=(png.stat().st_atime_ns, png.stat().st_mtime_ns + 10**9))
    with pytest.warns(UserWarning, match="re-decoding"):
        again, _ = load_omniglot(root, split="background", protocol="original", image_size=8, progress=False)
    assert not torch.equal(images, again)


@pytest.mark.parametrize("damage", ["truncate", "empty", "foreign"])
def test_a_damaged_cache_is_named_and_rebuilt(tiny, damage):
    url, md5, root = tiny
    first, _ = load_omniglot(root, split="background", protocol="original", image_size=8, base_url=url, md5=md5,
                             progress=False)
    cache = og._cache_path(root, 8)
    if damage == "truncate":
        cache.write_bytes(cache.read_bytes()[:1000])
    elif damage == "empty":
        cache.write_bytes(b"")
    else:
        torch.save({"something": "else"}, cache)
    with pytest.warns(UserWarning, match=rf"decoded cache {re.escape(str(cache))} (cannot be read|is not an mlcore)"):
        images, _ = load_omniglot(root, split="background", protocol="original", image_size=8, progress=False)
    assert torch.equal(images, first)
    assert og._read_cache(cache, 8, og._fingerprint(root))[0] is not None      # rewritten, valid again
