"""Atomic writes: a crash, a full disk or a kill mid-write never leaves half a file or half a folder behind.

Every file and folder that peft_softmix writes for a user (adapters, checkpoints, results, plots) goes through the
helpers here: the content is written beside its destination under a hidden temporary name and renamed into place,
which POSIX and Windows both do atomically within one file system.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_file", "atomic_folder", "publish_folder", "write_json_atomic", "write_text_atomic"]


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block succeeds, that file replaces ``path``.

    ``suffix`` keeps an extension some writers look at (matplotlib picks its format from it). If the block raises,
    ``path`` is untouched and the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _umask_mode())  # mkstemp makes the file private; ours are ordinary files
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """`write_text_atomic` for JSON (NaN, e.g. a loss before the first epoch, is written as ``NaN``)."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; once the block succeeds, its files move into ``path``.

    Files already in ``path`` that the block did not write stay (a folder may hold several adapters); each file
    written replaces its old version in one rename, so a reader never sees a half-written file.
    """
    path = Path(path)
    if path.is_file():
        raise ValueError(f"{path} is a file; a folder is needed there.")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
        for root, _, files in os.walk(staging):
            target = path / Path(root).relative_to(staging)
            target.mkdir(parents=True, exist_ok=True)
            for name in files:
                os.replace(Path(root) / name, target / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_folder(staging: str | os.PathLike, path: str | os.PathLike) -> None:
    """Replace the folder ``path`` by the complete folder ``staging`` (both on one file system).

    For a folder written by several processes (an Accelerate checkpoint): they all write into ``staging``, then one
    process publishes it. A crash before the rename leaves the previous ``path`` as it was.
    """
    path = Path(path)
    if path.exists():
        # a folder cannot be renamed over a non-empty one: move the old one aside first, then drop it
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
        os.replace(path, old / path.name)
        os.replace(staging, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, path)
