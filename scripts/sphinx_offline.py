"""Sphinx extension (loaded by _config.yml, sphinx.local_extensions): keep the site self-contained.

The book must work offline (tests/test_site.py loads every page with the network closed and fails on
any request that leaves the local server). Notebook outputs can carry links to CDNs that the site
does not need:

* matplotlib's ``FuncAnimation.to_jshtml()`` links Font Awesome 4 from maxcdn for its player's
  button icons. The book's theme already ships Font Awesome (its script draws the same ``fa fa-play``
  icons), so on the site the link is dropped. In Jupyter and Colab the notebook keeps it.

Any other external ``<script src>``, ``<link href>`` or ``<img src>`` left in a page's body is reported
as a Sphinx warning, so `jupyter-book build -W` fails at the page that has it: vendor the file
(scripts/fetch_js.sh) or save the image with the notebook instead.
"""
from __future__ import annotations

import re

from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)

_TO_JSHTML_FONT_AWESOME = re.compile(
    r'<link rel="stylesheet"\s+href="https://maxcdn\.bootstrapcdn\.com/font-awesome/[\d.]+/css/'
    r'font-awesome\.min\.css">\s*')
_EXTERNAL_RESOURCE = re.compile(
    r'<(?:script|link|img|iframe|source)\b[^>]*?\b(?:src|href)=["\']((?:https?:)?//[^"\']+)["\']',
    re.IGNORECASE)


def _offline_body(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    body = context.get("body")
    if not body:
        return
    body = _TO_JSHTML_FONT_AWESOME.sub("", body)
    for url in dict.fromkeys(_EXTERNAL_RESOURCE.findall(body)):
        logger.warning(f"{pagename}: the page loads {url} from the network; the site must work offline "
                       f"(vendor it with scripts/fetch_js.sh, or embed it)", location=pagename)
    context["body"] = body


def setup(app: Sphinx) -> dict:
    app.connect("html-page-context", _offline_body)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
