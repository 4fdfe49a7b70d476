"""Chapters still waiting for issue 14's page pass (figures sized for the text column, no printed line
wider than it, live-widget output left out of the site).

tests/test_book_structure.py and tests/test_site.py enforce these rules on every other notebook in
_toc.yml. When a chapter below has been re-executed with mlcore.notebook.setup's figure defaults and
passes them, delete its line: the list only shrinks.
"""
from __future__ import annotations

PENDING = frozenset({
})
