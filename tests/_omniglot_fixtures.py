"""Test helpers for mlcore.data.omniglot: where the real copy is, a tiny Omniglot in the official layout,
and a local HTTP server.

Nothing here touches the network: the server listens on 127.0.0.1 on an ephemeral port.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import threading
import zipfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

# The real Omniglot (both archives unpacked): $MLCORE_OMNIGLOT, else the repository's sibling
# ../shared/data/omniglot. Tests that need it are marked @needs_real_omniglot and skip cleanly without it.
REAL_ROOT = Path(os.environ.get("MLCORE_OMNIGLOT") or Path(__file__).resolve().parents[2] / "shared" / "data"
                 / "omniglot")
HAVE_REAL = (REAL_ROOT / "images_background").is_dir() and (REAL_ROOT / "images_evaluation").is_dir()
needs_real_omniglot = pytest.mark.skipif(not HAVE_REAL,
                                         reason=f"no Omniglot copy at {REAL_ROOT} (set MLCORE_OMNIGLOT)")

# Alphabet -> number of characters, per archive (alphabet names are unique across the two, as in Omniglot).
TINY_LAYOUT = {"images_background": {"Alpha": 2, "Beta": 3}, "images_evaluation": {"Gamma": 2}}
DRAWINGS = 20
PNG_SIDE = 12


def make_tiny_omniglot(directory: Path) -> dict[str, str]:
    """Write images_background.zip and images_evaluation.zip into ``directory``; return their md5 sums.

    Each character holds 20 black-on-white 1-bit PNGs (background = 1, like the real data) with one
    stroke whose position depends on the character and the drawer, so images differ.
    """
    directory.mkdir(parents=True, exist_ok=True)
    md5 = {}
    for folder, alphabets in TINY_LAYOUT.items():
        archive = directory / f"{folder}.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for alphabet, n_characters in alphabets.items():
                for c in range(1, n_characters + 1):
                    for d in range(1, DRAWINGS + 1):
                        image = Image.new("1", (PNG_SIDE, PNG_SIDE), 1)
                        ImageDraw.Draw(image).line((c, d % PNG_SIDE, PNG_SIDE - 1, 2), fill=0, width=2)
                        path = directory / "png.png"
                        image.save(path)
                        zf.write(path, f"{folder}/{alphabet}/character{c:02d}/{c:04d}_{d:02d}.png")
                        path.unlink()
        md5[folder] = hashlib.md5(archive.read_bytes()).hexdigest()
    return md5


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves files; under ``/truncate/`` it promises the whole file but sends half and hangs up."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.startswith("/truncate/"):
            data = (Path(self.directory) / self.path.removeprefix("/truncate/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve ``directory`` over HTTP on 127.0.0.1; yields the base URL; shuts the server down afterwards."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (the port was bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"
