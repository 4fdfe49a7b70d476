"""Omniglot: download (md5-verified), decode once, cache, and serve as image tensors.

Omniglot (Lake, Salakhutdinov & Tenenbaum 2015, "Human-level concept learning through probabilistic
program induction", Science 350(6266):1332-1338) has 1623 handwritten characters from 50 alphabets,
each drawn once by 20 people: 32,460 black-on-white 105×105 PNGs.

Two class protocols:

=============  ===========================================================================================
``"vinyals"``  Vinyals et al. (2016), Matching Networks, Section 4.1.1, as used by Prototypical Networks
               and most later work: every character rotated by 0, 90, 180 and 270 degrees
               (counter-clockwise) is a class of its own; splits ``train`` 4112, ``val`` 688,
               ``trainval`` 4800 (= train + val) and ``test`` 1692 classes, from the split lists shipped
               in ``mlcore/data/splits/vinyals``. Class names read ``Alphabet/characterNN/rotDDD``.
``"original"`` Lake et al. (2015): ``background`` (964 characters, 30 alphabets) for learning and
(``"lake"``)   ``evaluation`` (659 characters, 20 alphabets) for testing, no rotations. Class names read
               ``Alphabet/characterNN``, sorted.
=============  ===========================================================================================

Images come back as float32 (N, 1, S, S) in [0, 1] with strokes high (1 = ink, 0 = paper; the PNGs
are the other way round), labels as int64 0..n_classes-1 in split-file order, 20 images per class.
Resizing: each PNG is converted to float and resized with PIL's LANCZOS filter *in float* (mode "F"),
then rounded to uint8. Because nothing is clipped or rounded between PIL's horizontal and vertical
passes, rotating after resizing gives exactly the same pixels as resizing after rotating, so the
rotated classes are derived from the decoded characters with ``torch.rot90`` (counter-clockwise, like
PIL's ``Image.rotate``). Resizing 8-bit images ("L") instead would differ by up to 28/255 after a
90° rotation.

Where things live:
    root       the ``root`` argument, else $MLCORE_OMNIGLOT, else ``<cache dir>/omniglot``.
    cache dir  $MLCORE_CACHE, else ``~/.cache/mlcore``.
    decoded    ``<root>/mlcore_omniglot_<S>px_v<version>.pt`` if ``root`` is writable, else under
               ``<cache dir>/omniglot-decoded/`` in a folder named after a hash of ``root``'s path.
The decoded file holds every character once (uint8, about 25 MB at 28 px) and serves all splits.
"""
from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["OMNIGLOT_URL", "OMNIGLOT_MD5", "SPLITS", "load_omniglot", "omniglot_class_names", "omniglot_root",
           "download_omniglot", "cache_dir"]

OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
OMNIGLOT_MD5 = {"images_background": "68d2efa1b9178cc56df9314c21c6e718",
                "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811"}
SPLITS = {"vinyals": ("train", "val", "trainval", "test"), "original": ("background", "evaluation")}
DRAWINGS_PER_CHARACTER = 20
CACHE_FORMAT_VERSION = 2
ROOT_ENV, CACHE_ENV, URL_ENV = "MLCORE_OMNIGLOT", "MLCORE_CACHE", "MLCORE_OMNIGLOT_URL"
_FOLDERS = tuple(OMNIGLOT_MD5)


def load_omniglot(root: str | os.PathLike | None = None, *, split: str = "train", protocol: str = "vinyals",
                  image_size: int = 28, download: bool = True, base_url: str | None = None,
                  md5: Mapping[str, str] | None = None, progress: bool = True) -> tuple[Tensor, Tensor]:
    """Omniglot ``split`` of ``protocol`` as (images, labels), downloading and decoding on first use.

    Args:
        root: folder holding ``images_background/`` and ``images_evaluation/`` (see the module docstring
            for the fallbacks). It is only read, unless the data must be downloaded into it.
        split, protocol: see ``SPLITS``; protocol ``"lake"`` is an alias of ``"original"``.
        image_size: side S of the square output images (28 in most papers; 105 keeps the originals).
        download: fetch the official archives into ``root`` when they are absent (``download_omniglot``).
        base_url, md5: passed to ``download_omniglot`` (mirrors and tests).
        progress: show tqdm progress bars while downloading and decoding.

    Returns:
        images: (n_classes · 20, 1, S, S) float32 in [0, 1], strokes high.
        labels: (n_classes · 20,) int64 in 0..n_classes-1; class c is ``omniglot_class_names(...)[c]``,
            its 20 images are consecutive.
    """
    protocol = _check_split(split, protocol)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"load_omniglot: image_size must be a positive integer, got {image_size!r}")
    root_dir = omniglot_root(root)
    missing = [f for f in _FOLDERS if not (root_dir / f).is_dir()]
    if missing and not download:
        raise FileNotFoundError(f"Omniglot not found: {_where(root_dir, root)} has no {' or '.join(missing)}/ folder. "
                                f"Pass download=True, or point root= or ${ROOT_ENV} at an extracted copy.")
    if missing:
        download_omniglot(root_dir, base_url=base_url, md5=md5, progress=progress)
    pixels, characters = _decoded(root_dir, image_size, progress)                 # (1623, 20, S, S) uint8
    names = omniglot_class_names(split, protocol, root=root_dir)
    position = {name: i for i, name in enumerate(characters)}
    select, turns = _class_index(names, protocol, position, root_dir, image_size)
    images = pixels.new_empty((len(names), *pixels.shape[1:]))                   # (n_classes, 20, S, S)
    for k in range(4):                                                            # k quarter turns, CCW
        rows = (turns == k).nonzero().squeeze(1)
        images[rows] = torch.rot90(pixels[select[rows]], k, dims=(-2, -1))
    images = images.reshape(-1, 1, image_size, image_size).float().div_(255)     # (n_classes·20, 1, S, S)
    labels = torch.arange(len(names)).repeat_interleave(DRAWINGS_PER_CHARACTER)   # (n_classes·20,)
    return images, labels


def omniglot_class_names(split: str = "train", protocol: str = "vinyals", *,
                         root: str | os.PathLike | None = None) -> list[str]:
    """Names of the classes of ``split``, in label order (label c is name c).

    ``vinyals`` names come from the shipped split lists (no data needed); ``original`` names are the
    sorted ``Alphabet/characterNN`` folders of ``root`` (resolved like ``load_omniglot``'s).
    """
    protocol = _check_split(split, protocol)
    if protocol == "vinyals":
        text = resources.files("mlcore.data").joinpath(f"splits/vinyals/{split}.txt").read_text()
        return [line.strip() for line in text.splitlines() if line.strip()]
    root_dir = omniglot_root(root)
    folder = root_dir / f"images_{split}"
    if not folder.is_dir():
        raise FileNotFoundError(f"Omniglot not found: {_where(root_dir, root)} has no {folder.name}/ folder; "
                                f"call load_omniglot(download=True) first, or point root= or ${ROOT_ENV} at a copy")
    return [f"{a.name}/{c.name}" for a in sorted(folder.iterdir()) if a.is_dir()
            for c in sorted(a.iterdir()) if c.is_dir()]


def omniglot_root(root: str | os.PathLike | None = None) -> Path:
    """The Omniglot folder: ``root`` if given, else $MLCORE_OMNIGLOT, else ``<cache dir>/omniglot``."""
    if root is not None:
        return Path(root).expanduser().resolve()
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV]).expanduser().resolve()
    return cache_dir() / "omniglot"


def cache_dir() -> Path:
    """mlcore's per-user cache folder: $MLCORE_CACHE, else ``~/.cache/mlcore``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mlcore").expanduser().resolve()


def download_omniglot(root: str | os.PathLike, *, base_url: str | None = None,
                      md5: Mapping[str, str] | None = None, progress: bool = True) -> Path:
    """Download, verify and extract the official archives into ``root`` (skipping folders already there).

    Each ``<base_url>/images_{background,evaluation}.zip`` is downloaded into a temporary folder inside
    ``root``, its md5 compared with ``md5`` (default ``OMNIGLOT_MD5``), and it is extracted there; only
    after all of that succeeded is the extracted folder renamed into place. An interrupted or failed
    download therefore never leaves an ``images_*`` folder that a later run would trust.
    ``base_url`` defaults to $MLCORE_OMNIGLOT_URL, else ``OMNIGLOT_URL``.
    """
    from tqdm.auto import tqdm

    root = Path(root)
    base_url = base_url or os.environ.get(URL_ENV) or OMNIGLOT_URL
    md5 = {**OMNIGLOT_MD5, **(md5 or {})}
    if root.exists() and not _writable(root):
        raise PermissionError(f"cannot download Omniglot into {root}: the folder is read-only. Pass a writable "
                              f"root= (or ${ROOT_ENV}), or complete the copy there by hand.")
    root.mkdir(parents=True, exist_ok=True)
    for folder in _FOLDERS:
        if (root / folder).is_dir():
            continue
        url = f"{base_url.rstrip('/')}/{folder}.zip"
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{folder}-download-") as tmp:
            archive = Path(tmp) / f"{folder}.zip"
            try:
                with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
                    size = int(response.headers.get("Content-Length") or 0) or None
                    with tqdm(total=size, unit="B", unit_scale=True, desc=f"{folder}.zip", disable=not progress) as bar:
                        while chunk := response.read(1 << 20):
                            out.write(chunk)
                            bar.update(len(chunk))
                if size is not None and archive.stat().st_size != size:
                    raise OSError(f"the connection closed after {archive.stat().st_size} of {size} bytes")
            except (OSError, urllib.error.URLError) as err:           # URLError, HTTPError, timeouts, resets
                raise RuntimeError(
                    f"Could not download Omniglot from {url}: {err}. Looked for the data in {root} (the root "
                    f"argument, else ${ROOT_ENV}, else {cache_dir() / 'omniglot'}). If you have a copy, pass "
                    f"root= or set ${ROOT_ENV} to the folder holding images_background/ and images_evaluation/; "
                    f"to use a mirror, pass base_url= or set ${URL_ENV}.") from err
            got = _md5(archive)
            if got != md5[folder]:
                archive.unlink()
                raise RuntimeError(f"{url} has md5 {got}, expected {md5[folder]}: the download is corrupt or "
                                   f"not the official archive; it was deleted and nothing was extracted. Retry, "
                                   f"or point root= or ${ROOT_ENV} at a verified copy.")
            extracted = Path(tmp) / "extracted"
            try:
                with zipfile.ZipFile(archive) as zf:
                    zf.extractall(extracted)
            except zipfile.BadZipFile as err:
                raise RuntimeError(f"{url} passed the md5 check but is not a valid zip archive ({err})") from err
            if not (extracted / folder).is_dir():
                raise RuntimeError(f"{url} does not contain a top-level {folder}/ folder")
            os.replace(extracted / folder, root / folder)
    return root


def _decoded(root: Path, image_size: int, progress: bool) -> tuple[Tensor, list[str]]:
    """Every character of ``root`` at ``image_size``: ((1623, 20, S, S) uint8 strokes high, names).

    Decoded once and cached (see the module docstring); the names are ``Alphabet/characterNN``.
    """
    path = _cache_path(root, image_size)
    fingerprint = _fingerprint(root)
    if path.exists():
        cached, why = _read_cache(path, image_size, fingerprint)
        if cached is not None:
            return cached["images"], cached["characters"]
        warnings.warn(f"Omniglot: re-decoding the images of {root} because the decoded cache {path} {why}; "
                      f"it is rewritten now.", stacklevel=3)
    characters, files = _index_characters(root)
    images = torch.empty(len(characters), DRAWINGS_PER_CHARACTER, image_size, image_size, dtype=torch.uint8)
    from PIL import Image
    from tqdm.auto import tqdm

    with tqdm(total=images.shape[0] * images.shape[1], unit="img", desc=f"Decoding Omniglot at {image_size}px",
              disable=not progress) as bar:
        for c, pngs in enumerate(files):
            for d, png in enumerate(pngs):
                with Image.open(png) as im:
                    # Float mode: no clipping or rounding between the two resampling passes (see above).
                    im = im.convert("F").resize((image_size, image_size), Image.Resampling.LANCZOS)
                pixels = np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8)
                images[c, d] = torch.from_numpy(255 - pixels)                # strokes high
            bar.update(len(pngs))
    _atomic_save({"version": CACHE_FORMAT_VERSION, "root": str(root), "image_size": image_size,
                  "fingerprint": fingerprint, "images": images, "characters": characters}, path)
    return images, characters


def _fingerprint(root: Path) -> str:
    """A hash of every PNG's path, size and modification time under ``root``: the cache's content key.

    Replacing, adding or removing an image changes it, so a stale cache is never served. Listing
    the 32,460 files costs a fraction of a second, against about a minute to decode them.
    """
    digest = hashlib.sha1()
    for folder in _FOLDERS:
        for dirpath, dirnames, filenames in os.walk(root / folder):
            dirnames.sort()
            for name in sorted(filenames):
                if name.endswith(".png"):
                    full = os.path.join(dirpath, name)
                    st = os.stat(full)
                    digest.update(f"{os.path.relpath(full, root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _read_cache(path: Path, image_size: int, fingerprint: str) -> tuple[dict | None, str]:
    """(the cached dict, "") when ``path`` is a valid, current cache; else (None, why not)."""
    try:
        cached = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, empty or foreign file: rebuild it
        return None, f"cannot be read ({type(err).__name__}: {str(err)[:120]})"
    if not isinstance(cached, dict) or cached.get("version") != CACHE_FORMAT_VERSION:
        return None, "is not an mlcore Omniglot cache of this version"
    if cached.get("image_size") != image_size:
        return None, f"holds {cached.get('image_size')} px images, not {image_size} px"
    if cached.get("fingerprint") != fingerprint:
        return None, "was decoded from other files (images were added, removed or replaced since)"
    images = cached.get("images")
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
            or tuple(images.shape[1:]) != (DRAWINGS_PER_CHARACTER, image_size, image_size) \
            or not isinstance(cached.get("characters"), list) or len(cached["characters"]) != images.shape[0]:
        return None, "is damaged (unexpected contents)"
    return cached, ""


def _index_characters(root: Path) -> tuple[list[str], list[list[Path]]]:
    """All characters as ``Alphabet/characterNN`` (background first, each folder sorted) and their PNGs."""
    names, files, seen = [], [], {}
    for folder in _FOLDERS:
        alphabets = sorted(a for a in (root / folder).iterdir() if a.is_dir())
        if not alphabets:
            raise FileNotFoundError(f"{root / folder} holds no alphabet folders; expected "
                                    f"{folder}/<Alphabet>/characterNN/*.png as in the official archive")
        for alphabet in alphabets:
            if alphabet.name in seen:
                raise ValueError(f"alphabet {alphabet.name} appears in both {seen[alphabet.name]} and {folder} "
                                 f"of {root}")
            seen[alphabet.name] = folder
            for character in sorted(c for c in alphabet.iterdir() if c.is_dir()):
                pngs = sorted(character.glob("*.png"))
                if len(pngs) != DRAWINGS_PER_CHARACTER:
                    raise ValueError(f"{character} holds {len(pngs)} PNGs, expected {DRAWINGS_PER_CHARACTER} (one "
                                     f"per drawer); the copy in {root} is incomplete or not Omniglot")
                names.append(f"{alphabet.name}/{character.name}")
                files.append(pngs)
    return names, files


def _class_index(names: list[str], protocol: str, position: dict[str, int], root: Path,
                 image_size: int) -> tuple[Tensor, Tensor]:
    """Decoded-character index and counter-clockwise quarter turns of each class name.

    Names read ``Alphabet/characterNN/rotDDD`` (vinyals) or ``Alphabet/characterNN`` (original).
    """
    select, turns = [], []
    for name in names:
        character, rotation = name.rsplit("/", 1) if protocol == "vinyals" else (name, "rot000")
        if rotation not in ("rot000", "rot090", "rot180", "rot270"):
            raise ValueError(f"split class {name!r}: the rotation must be rot000, rot090, rot180 or rot270")
        if character not in position and protocol == "original":
            raise ValueError(f"{root} holds character {character}/, which the decoded cache "
                             f"{_cache_path(root, image_size)} lacks; the copy changed since it was decoded: "
                             f"delete that file to decode again")
        if character not in position:
            raise FileNotFoundError(f"split class {name!r} needs the character folder {character}/, which is in "
                                    f"neither images_background/ nor images_evaluation/ of {root}")
        select.append(position[character])
        turns.append(int(rotation[3:]) // 90)
    return torch.tensor(select), torch.tensor(turns)


def _check_split(split: str, protocol: str) -> str:
    canonical = {"lake": "original"}.get(protocol, protocol)
    if canonical not in SPLITS:
        raise ValueError(f"protocol={protocol!r} is not one of {[*SPLITS, 'lake']}")
    if split not in SPLITS[canonical]:
        raise ValueError(f"split={split!r} is not a split of protocol {protocol!r}; allowed: "
                         + "; ".join(f"protocol={p!r}: {', '.join(s)}" for p, s in SPLITS.items()))
    return canonical


def _cache_path(root: Path, image_size: int) -> Path:
    name = f"mlcore_omniglot_{image_size}px_v{CACHE_FORMAT_VERSION}.pt"
    if _writable(root):
        return root / name
    key = hashlib.sha1(str(root).encode()).hexdigest()[:12]
    return cache_dir() / "omniglot-decoded" / f"{root.name}-{key}" / name


def _writable(folder: Path) -> bool:
    # os.access alone says yes to root even for an r-x folder, so the mode bits must allow writing too:
    # a copy deliberately made read-only (like a shared data set) stays untouched whoever runs this.
    mode = folder.stat().st_mode
    return os.access(folder, os.W_OK) and bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _atomic_save(obj: dict, path: Path) -> None:
    # Readers see the old file or the whole new one (mlcore.train.atomic_write: a random temporary name
    # in the same folder, fsync, rename); 0644 because a cache beside shared data is read by all.
    from ..train import atomic_write
    atomic_write(path, lambda f: torch.save(obj, f), mode=0o644)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _where(root_dir: Path, root: str | os.PathLike | None) -> str:
    source = ("the root argument" if root is not None else f"${ROOT_ENV}" if os.environ.get(ROOT_ENV)
              else f"the default (neither root= nor ${ROOT_ENV} was set)")
    return f"{root_dir} (from {source})"
