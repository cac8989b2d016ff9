"""The output folder of a training run: checked writable before any training, and held by one run at a time.

Two runs into one folder would both exit 0 while each overwrote the other's adapters, results and checkpoints, so a
run takes an exclusive lock on the folder (``.lock``, which also proves the folder writable) for as long as it runs.
The lock is an advisory ``flock`` (POSIX); the operating system releases it when the process ends, however it ends.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; the folder is still checked writable
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "OutputDirError", "lock_output_dir"]

LOCK_FILE = ".lock"


class OutputDirError(OSError):
    """The output folder cannot be written, or another run holds it."""


@contextmanager
def lock_output_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Create ``path`` if needed, check it is writable and hold it exclusively for the ``with`` block.

    Raises `OutputDirError` naming the folder when it cannot be created or written, or when another run holds it
    (with that run's process id).
    """
    path = Path(path)
    lock = path / LOCK_FILE
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise OutputDirError(
            f"Cannot write to --output_dir {path} ({err.strerror or err}); choose a folder this user can write to."
        ) from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.lseek(fd, 0, os.SEEK_SET)
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                raise OutputDirError(
                    f"--output_dir {path} is in use by another run (process {holder}); wait for it to finish or "
                    "choose another --output_dir."
                ) from None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock
