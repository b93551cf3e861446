"""One owner at a time for a run directory.

Two fits on one ``--out``, a report written while the run still trains, a restart racing the
process it replaces: each would leave a directory of mixed runs.  Whatever writes into a run
directory first owns it: an exclusive ``flock(2)`` on ``.NAME.lock`` beside the directory
(beside, not inside, so that ``--overwrite`` can rename the old directory aside whole), the
file naming the owner (command, pid, host, since when).  The lock is the directory's, links
followed: ``S/real`` and a link ``S/alias`` to it share one.  The kernel drops the lock when its
process ends, however it ends, so an owner killed outright leaves only a stale file, which the
next owner takes over with a note; while the owner lives, others are refused with its name.
A normal exit removes the file.  On network file systems flock is as good as their locking
(NFSv4 on Linux emulates it with byte-range locks).
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from ..foundations.errors import ConfigError


class RunInUse(ConfigError):
    """Another process owns the run directory."""


_owned: dict[Path, int] = {}


def real_path(run_dir: str | Path) -> Path:
    """The directory ``run_dir`` is, links followed (it need not exist yet): two names of one
    directory (a symbolic link to it) have one owner."""
    return Path(os.path.realpath(run_dir))


def lock_path(run_dir: str | Path) -> Path:
    run_dir = real_path(run_dir)
    return run_dir.parent / f".{run_dir.name}.lock"


def own(run_dir: str | Path, doing: str) -> None:
    """Make this process the owner of ``run_dir`` (which need not exist yet) until it ends or
    calls ``release``; ``RunInUse`` while another process owns it.  ``doing`` names the command
    for whoever is refused."""
    key = real_path(run_dir)
    if key in _owned:
        return
    path = lock_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _locked(path, run_dir)
    except OSError as e:
        raise ConfigError(f"{run_dir}: cannot write there ({e.strerror}; its lock file goes "
                          f"beside it, in {path.parent})") from None
    previous = _owner(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"doing": doing, "pid": os.getpid(),
                                  "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
    except OSError as e:  # a full disk: the lock is held, but whoever is refused learns less
        os.close(fd)
        path.unlink(missing_ok=True)
        raise ConfigError(f"{path}: cannot write it ({e.strerror or e}): the lock file of "
                          f"{run_dir} goes there") from None
    if previous:
        print(f"note: {run_dir}: {previous} ended without releasing it; taking it over",
              file=sys.stderr)
    if not _owned:
        atexit.register(release_all)
    _owned[key] = fd


def _locked(path: Path, run_dir: str | Path) -> int:
    """A descriptor of ``path`` holding its exclusive lock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd) or "another process"
            os.close(fd)
            raise RunInUse(f"{run_dir}: in use by {owner}: a run directory has one owner at a "
                           "time; wait until it ends, or use another --out") from None
        try:
            current = os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            return fd
        # Its owner released it (removing the file) between our open and our lock.
        os.close(fd)


def release(run_dir: str | Path) -> None:
    """Give up ``run_dir`` (nothing when this process does not own it)."""
    key = real_path(run_dir)
    fd = _owned.pop(key, None)
    if fd is not None:
        # Removed while still locked: whoever opened it meanwhile finds it gone and retries.
        lock_path(key).unlink(missing_ok=True)
        os.close(fd)


def release_all() -> None:
    for run_dir in list(_owned):
        release(run_dir)


def _owner(fd: int) -> str:
    """Who the lock file names, in words ("" for an empty file)."""
    text = os.pread(fd, 4096, 0)
    if not text.strip():
        return ""
    try:
        owner = json.loads(text)
        return (f"{owner['doing']} (pid {owner['pid']} on {owner['host']}, since "
                f"{owner['since']})")
    except (ValueError, KeyError, TypeError):
        return "another process"
