"""A self-contained HTML report: tables and notes as given, figures embedded as PNG data URIs."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; }
td, th { padding: 0.25em 0.8em; border-bottom: 1px solid #eee; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.note { padding: 0.6em 1em; margin: 0.6em 0; border-left: 4px solid #4a7; background: #f3faf5; }
.warn { border-left-color: #c44; background: #fdf2f2; }
figure { margin: 1em 0; } figure img { max-width: 100%; }
figcaption { font-size: 0.9em; color: #555; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


@dataclass
class Table:
    title: str
    header: Sequence[str]
    rows: Sequence[Sequence[str]]


@dataclass
class Note:
    text: str
    warning: bool = False


@dataclass
class FigureItem:
    title: str
    caption: str
    png: bytes


def _table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in t.rows
    )
    return f"<h2>{html.escape(t.title)}</h2><table><tr>{head}</tr>{body}</table>"


def render_html(
    title: str, subtitle: str, notes: Sequence[Note], tables: Sequence[Table],
    figures: Sequence[FigureItem],
) -> str:
    parts = [f"<h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p>"]
    parts += [
        f'<div class="note{" warn" if n.warning else ""}">{html.escape(n.text)}</div>'
        for n in notes
    ]
    parts += [_table(t) for t in tables]
    for f in figures:
        data = base64.b64encode(f.png).decode("ascii")
        parts.append(
            f"<h2>{html.escape(f.title)}</h2><figure>"
            f'<img alt="{html.escape(f.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(f.caption)}</figcaption></figure>"
        )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(parts)}</body></html>\n"
    )
