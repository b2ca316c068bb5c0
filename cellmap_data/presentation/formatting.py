"""Formatting shared by the command line, the reprs and the figures, so that a number, a
coordinate triple or a crop reads the same wherever it is shown: :func:`number_text`,
:func:`triple_text`, tables as plain text (:func:`text_table`, the terminal) or HTML
(:func:`html_table`, notebooks), and :func:`short_names` of paths.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["html_table", "number_text", "short_names", "text_table", "triple_text"]


def number_text(value: Any) -> str:
    """``value`` as a short number (Python's ``g`` format: ``8``, ``0.5``, ``1e+06``), ``NaN``
    for NaN, and anything that is not a number as its ``str`` (a repr must not raise)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):
        return "NaN"
    return f"{v:g}"


def triple_text(values: Any, sep: str = " × ") -> str:
    """Per-axis values joined by ``sep`` (``8 × 8 × 8``; the command line passes ``","`` or
    ``"x"``), each as :func:`number_text`; ``—`` for None and a lone number as itself."""
    if values is None:
        return "—"
    if not isinstance(values, (list, tuple)):
        try:
            values = list(values)
        except TypeError:
            return number_text(values)
    return sep.join(number_text(v) for v in values)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> str:
    """A plain text table for the terminal: each line starts with ``indent``, columns are
    left-aligned and separated by two spaces, trailing spaces are cut."""
    widths = [max([len(h)] + [len(str(r[i])) for r in rows]) for i, h in enumerate(headers)]
    lines = [indent + "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for row in rows:
        lines.append(indent + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def html_table(headers: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """An HTML table of already-escaped cells (``headers`` are escaped here); a cell that is a
    whole ``<td ...>`` element is used as it is, so a caller can give it attributes."""
    head = "".join(f"<th>{html.escape(str(h), quote=True)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def short_names(paths: Sequence[str]) -> dict[str, str]:
    """Short distinct names of paths (or URLs), for labels in figures and columns in the command
    line's tables, so a crop or a dataset is called the same in both: the path components they
    do not all share, then the shortest distinct tail of those (``crop1``, ``ds0.zarr``...).
    A lone path is named by its last component."""
    unique = list(dict.fromkeys(paths))
    # Split on "/" (and "\\"), not os.sep: URLs and paths from other systems split the same way.
    parts = {p: [c for c in str(p).replace("\\", "/").split("/") if c] or [str(p)] for p in unique}
    if len(unique) <= 1:
        return {p: parts[p][-1] for p in unique}
    lists = list(parts.values())
    shortest = min(len(p) for p in lists)
    head = 0
    while head < shortest - 1 and all(p[head] == lists[0][head] for p in lists):
        head += 1
    tail = 0
    while tail < shortest - head - 1 and all(p[-1 - tail] == lists[0][-1 - tail] for p in lists):
        tail += 1
    middles = {p: parts[p][head: len(parts[p]) - tail] for p in unique}
    longest = max(len(m) for m in middles.values())
    for k in range(1, longest + 1):
        names = {p: "/".join(m[-k:]) for p, m in middles.items()}
        if len(set(names.values())) == len(unique):
            return names
    return {p: str(p) for p in unique}
