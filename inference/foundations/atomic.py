"""Writing files so that a crash never leaves a half-written one in place of a good one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .errors import ElbogapError
from .strict_json import strict_json


class WriteError(ElbogapError, OSError):
    """A file could not be written (a full disk, a quota, no permission)."""


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write`` on a temporary file beside ``path``, flush it to disk, then rename it.
    The temporary file has a name of its own (``mkstemp``: created anew, never an existing
    file or a link followed), and renaming replaces ``path`` itself, never a link's target.
    A failure leaves ``path`` as it was and raises ``WriteError`` naming it."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise WriteError(f"{path}: cannot write it ({e.strerror or e})") from None
    try:
        # mkstemp makes the file private (0600); the result should be an ordinary file.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, ElbogapError):
            raise
        raise WriteError(f"{path}: cannot write it ({e.strerror or e}); the file there is as "
                         "it was") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """``obj`` as strict JSON (``strict_json``: NaN and infinities as null, listed)."""
    write_text_atomic(path, strict_json(obj, indent=2) + "\n")
