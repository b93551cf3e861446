"""Counts in words: "1 point", "2 points"."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1 ("1 point", "0 points", "2 data sets")."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
