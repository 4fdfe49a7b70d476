"""Sphinx extension (loaded by _config.yml, sphinx.local_extensions): an author-year bibliography.

The text cites author-year ("Finn et al., 2017", sphinxcontrib-bibtex's ``bibtex_reference_style:
author_year``); pybtex's default labels in the list are alpha codes ("[FAL17]"). The ``authoryear``
style registered here (``bibtex_default_style`` in _config.yml) is pybtex's ``plain`` (sorted by
author, year, title) with labels written like the citations, so an entry reads
"[Finn et al., 2017]" both in the text and in the list.
"""
from __future__ import annotations

import re
from collections import Counter

from pybtex.plugin import register_plugin
from pybtex.style.formatting.plain import Style as PlainStyle
from pybtex.style.labels import BaseLabelStyle
from sphinx.application import Sphinx


def _surname(person) -> str:
    return re.sub(r"[{}]", "", " ".join(person.prelast_names + person.last_names))


class AuthorYearLabelStyle(BaseLabelStyle):
    """'Pearlmutter, 1994', 'Ravi and Larochelle, 2017', 'Finn et al., 2017' (+ a, b, … if equal)."""

    def format_labels(self, sorted_entries):
        labels = [self._label(entry) for entry in sorted_entries]
        total, seen = Counter(labels), Counter()
        for label in labels:
            if total[label] > 1:
                seen[label] += 1
                label += "abcdefghijklmnopqrstuvwxyz"[seen[label] - 1]
            yield label

    @staticmethod
    def _label(entry) -> str:
        people = entry.persons.get("author") or entry.persons.get("editor") or []
        names = [_surname(p) for p in people]
        if not names:
            who = entry.key
        elif len(names) == 1:
            who = names[0]
        elif len(names) == 2:
            who = f"{names[0]} and {names[1]}"
        else:
            who = f"{names[0]} et al."
        return f"{who}, {entry.fields.get('year', 'n.d.')}"


class AuthorYearStyle(PlainStyle):
    default_label_style = AuthorYearLabelStyle


def setup(app: Sphinx) -> dict:
    register_plugin("pybtex.style.formatting", "authoryear", AuthorYearStyle)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
