"""What a run recorded, read back checked: ``metrics.jsonl`` (one record per epoch) and
``diagnostics.json`` (the final evaluation).  A damaged file is one line naming it and what was
expected; the half record a crash leaves at the end of ``metrics.jsonl`` is dropped on resuming.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..foundations.errors import ConfigError
from ..foundations.reading import read_regular_file
from ..foundations.strict_json import restored

DIAGNOSTICS = "diagnostics.json"


def read_history(path: str | Path, *, drop_half_line: bool = False) -> list[dict]:
    """The records of a ``metrics.jsonl``, epochs 1, 2, ... in order ([] when there is none).
    A last line cut short (no newline after it, not a whole record) is refused, or dropped
    with a note when ``drop_half_line``: resuming rewrites the file whole."""
    path = Path(path)
    if not os.path.lexists(path):  # a link, a device: refused when read
        return []
    try:
        lines = read_regular_file(path).decode().split("\n")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not text; expected one JSON record per line") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            if number < len(lines):
                raise ConfigError(f"{path}: line {number} is not a JSON record") from None
            if not drop_half_line:
                raise ConfigError(
                    f"{path}: the file ends in the middle of a record (line {number}), as a "
                    "crash leaves it: --resume drops it and goes on, or delete that line"
                ) from None
            print(f"note: {path}: dropped the half record a crash left at its end "
                  f"(line {number})", file=sys.stderr)
            break
        if not (isinstance(record, dict) and type(record.get("epoch")) is int):
            raise ConfigError(f"{path}: line {number}: expected an epoch's record, a JSON object "
                              "with an integer 'epoch'")
        if record["epoch"] != len(records) + 1:
            raise ConfigError(f"{path}: line {number} is the record of epoch {record['epoch']}, "
                              f"expected epoch {len(records) + 1}'s (one record per epoch, in "
                              "order)")
        records.append(restored(record))
    return records


def read_json(path: Path) -> object:
    """A JSON file of a run, or one line saying it is not valid JSON."""
    try:
        return json.loads(read_regular_file(path).decode(), parse_constant=_not_a_json_number)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a run's file") from None


def _not_a_json_number(constant: str) -> float:
    # Python's json reads NaN and Infinity, which JSON itself has not; elbogap writes null.
    raise json.JSONDecodeError(f"{constant} is not a JSON number", constant, 0)


def read_final_summary(run_dir: str | Path) -> dict:
    """The run's final evaluation, ``diagnostics.json``."""
    path = Path(run_dir) / DIAGNOSTICS
    if not os.path.lexists(path):  # a link, a device: refused when read
        raise ConfigError(
            f"{path}: missing: the run's final evaluation was never written (training "
            f"interrupted, or still going); finish the run with scripts/fit.py --resume {run_dir}, "
            f"or evaluate it as it is with scripts/evaluate.py {run_dir}")
    summary = read_json(path)
    if not (isinstance(summary, dict) and "num_data" in summary):
        raise ConfigError(f"{path}: expected the JSON object of a run's final evaluation "
                          "(with its num_data, elbo, ...)")
    return summary
