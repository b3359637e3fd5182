"""One writer per folder: ``with run_lock(folder, "lipnext train"): ...``.

The lock is an OS file lock (``fcntl.flock``, exclusive, non-blocking) on ``<folder>/.lipnext.lock``.
The kernel releases it when the process ends, however it ends (SIGKILL included), so a killed
run never leaves a stale lock: the file may stay behind, unlocked, and the next process takes
it. The holder writes one JSON line into the file (PID, command, host, start time); a second
process gets :class:`RunFolderBusy`, a one-line error naming that PID. On a clean exit the
file is removed (while still locked; a process that opened the removed file notices the
changed inode and tries again). The lock is re-entrant within a process: ``lipnext study``
holds each run's folder while the trainer inside takes the same lock again.

A folder that did not exist is created, and removed again on exit if it is still empty (with
the parents created for it), so a command refused before it wrote anything leaves no folder.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["run_lock", "RunFolderBusy", "LOCK_NAME"]

LOCK_NAME = ".lipnext.lock"
_HELD: dict[str, int] = {}          # folders this process holds (realpath -> depth)


class RunFolderBusy(RuntimeError):
    """Another live process holds the folder's lock."""


def _create_folder(folder: Path) -> list[Path]:
    """mkdir -p ``folder``; the folders it created, deepest first."""
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder; choose another folder")
    created = []
    for p in [folder, *folder.parents]:
        if p.exists():
            break
        created.append(p)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:          # a parent is a file
        raise NotADirectoryError(f"cannot create the folder {folder}: a part of its path is a "
                                 "file; choose another folder") from None
    except OSError as e:
        raise OSError(e.errno, f"cannot create the folder {folder}: {e.strerror}") from None
    return created


def _holder(path: Path) -> str:
    """Who holds the lock, from the line it wrote ('PID 123, lipnext train, since 12:00:00')."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "another process (it is starting)"
    return (f"{info.get('command', 'a lipnext command')}, PID {info['pid']}"
            f"{' on ' + info['host'] if info.get('host') != socket.gethostname() else ''}"
            f", since {info.get('since', '?')}")


def _acquire(path: Path, command: str) -> int:
    """Open and lock ``path`` (retrying if the file was replaced meanwhile); the descriptor."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OSError(e.errno, f"cannot write in {path.parent} (its lock file {path.name}): "
                          f"{e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderBusy(f"{path.parent} is in use by {_holder(path)}; wait for it to "
                                    "finish or stop it, or use another folder") from None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)                # the holder removed it as we opened it: take the new one
    line = json.dumps({"pid": os.getpid(), "command": command, "host": socket.gethostname(),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    try:
        os.ftruncate(fd, 0)
        os.write(fd, (line + "\n").encode())
    except OSError as e:                     # a full disk
        os.unlink(path)
        os.close(fd)
        raise OSError(e.errno, f"cannot write in {path.parent} (its lock file {path.name}): "
                      f"{e.strerror}") from None
    return fd


@contextmanager
def run_lock(folder: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created if missing) for ``command``; yields the folder."""
    folder = Path(folder)
    created = _create_folder(folder)
    key = os.path.realpath(folder)
    if key in _HELD:                                  # re-entrant in this process
        _HELD[key] += 1
        try:
            yield folder
        finally:
            _HELD[key] -= 1
        return
    path = folder / LOCK_NAME
    try:
        fd = _acquire(path, command)
    except BaseException:
        _remove_empty(created)
        raise
    _HELD[key] = 1
    try:
        yield folder
    finally:
        del _HELD[key]
        try:
            os.unlink(path)
        except OSError:             # a read-only folder after all, or removed by hand
            pass
        os.close(fd)
        _remove_empty(created)


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders this lock created if nothing was written in them."""
    for p in created:
        try:
            p.rmdir()
        except OSError:
            break
