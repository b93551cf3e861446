"""JSON with numbers only: NaN and infinities, which JSON has no words for, written as null,
and where they stood said in the same object (so that a reader can tell a refused number from
a missing one, and put it back)."""

from __future__ import annotations

import json
import math
from typing import Any

# The key under which a written object lists what was not a number: each entry's "at" is the
# path of keys and list indices to it, "was" one of "NaN", "inf", "-inf".
NON_FINITE = "non_finite"


def finite_json(obj: Any, at: tuple = ()) -> tuple[Any, list[dict]]:
    """``obj`` (dicts, lists, tuples, scalars) with every NaN or infinite float replaced by None,
    and the entries saying where each was and what it was."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, [{"at": list(at), "was": repr(obj).replace("nan", "NaN")}]
    found: list[dict] = []
    if isinstance(obj, dict):
        out: Any = {}
        for key, value in obj.items():
            out[key], inner = finite_json(value, (*at, key))
            found += inner
        return out, found
    if isinstance(obj, list | tuple):
        out = []
        for i, value in enumerate(obj):
            item, inner = finite_json(value, (*at, i))
            out.append(item)
            found += inner
        return out, found
    return obj, found


def strict_json(obj: Any, indent: int | None = None) -> str:
    """``obj`` as strict JSON text: NaN and infinities become null, and an object lists them
    under ``non_finite`` (why they arose is the writer's to say, in its notes)."""
    clean, found = finite_json(obj)
    if found and isinstance(clean, dict):
        clean[NON_FINITE] = found
    return json.dumps(clean, indent=indent, allow_nan=False)


def restored(obj: Any) -> Any:
    """An object ``strict_json`` wrote, read back with its NaN and infinities in place again
    (and no ``non_finite`` key): the numbers as they were before writing."""
    if not isinstance(obj, dict) or not isinstance(obj.get(NON_FINITE), list):
        return obj
    obj = dict(obj)
    for entry in obj.pop(NON_FINITE):
        try:
            *parents, last = entry["at"]
            holder = obj
            for key in parents:
                holder = holder[key]
            if holder[last] is None:
                holder[last] = float(entry["was"])
        except (KeyError, IndexError, TypeError, ValueError):
            continue  # an entry that does not fit the object: the null stays a null
    return obj
