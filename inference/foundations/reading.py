"""Reading a run directory's files as the files they are.

A run directory may come from anyone: its ``config.json`` could be a link to a file of yours,
or to ``/dev/zero`` or a FIFO, where a plain read never ends.  Its files are opened without
following a link (``O_NOFOLLOW``) and read only when they are regular files."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .errors import ConfigError


def read_regular_file(path: str | Path) -> bytes:
    """The bytes of the regular file at ``path``; a ``ConfigError`` naming it where it is a
    symbolic link, a device, a FIFO or a directory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(f"{path}: a symbolic link; a run's files are read only as the "
                              "files they are (copy the file in its place)") from None
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ConfigError(f"{path}: not a regular file (a device, a FIFO or a directory)")
        return f.read()
