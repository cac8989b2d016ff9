"""Downloading files into a local cache, each checked against its SHA-256 before anything may use it.

A file is streamed to a hidden temporary name beside its cache path while its hash is computed, and renamed into
place only when the hash is the expected one (`peft_softmix.atomic.atomic_file`): an interrupted or tampered
download never lands. A cached file is hashed again each time it is used, so a damaged copy is fetched anew (or,
offline, reported) rather than trusted.

The cache folder is ``$PEFT_SOFTMIX_CACHE`` if set, else ``$XDG_CACHE_HOME/peft_softmix``, else
``~/.cache/peft_softmix``. Offline mode (``offline=True``, or ``PEFT_SOFTMIX_OFFLINE=1`` / ``HF_HUB_OFFLINE=1`` in the
environment) uses cached files only and names any file that is missing.
"""

from __future__ import annotations

import hashlib
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import atomic_file
from .errors import ChecksumError

__all__ = ["CACHE_ENV", "OFFLINE_ENVS", "Download", "default_cache_dir", "fetch_all", "offline_mode", "sha256_file"]

CACHE_ENV = "PEFT_SOFTMIX_CACHE"
OFFLINE_ENVS = ("PEFT_SOFTMIX_OFFLINE", "HF_HUB_OFFLINE")
_TRUE = {"1", "true", "yes", "on"}
# Status codes worth another try: rate limits and a server or proxy briefly failing.
_TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}
_CHUNK = 1 << 16


def default_cache_dir() -> Path:
    """``$PEFT_SOFTMIX_CACHE``, else ``$XDG_CACHE_HOME/peft_softmix``, else ``~/.cache/peft_softmix``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "peft_softmix"


def offline_mode(offline: bool | None = None) -> bool:
    """``offline`` if given, else whether ``PEFT_SOFTMIX_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to a true value."""
    if offline is not None:
        return bool(offline)
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in OFFLINE_ENVS)


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as 64 lower-case hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Download:
    """One file to fetch: where from, its expected SHA-256, where it is cached, and its size if known (progress)."""

    url: str
    sha256: str
    dest: Path
    size: int | None = None


def _check_url(url: str) -> None:
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("https", "http", "file"):
        raise ValueError(f"Cannot download {url!r}: only https://, http:// and file:// URLs are supported.")


def _is_cached(item: Download) -> bool:
    return item.dest.is_file() and sha256_file(item.dest) == item.sha256


def _stream(item: Download, tmp: Path, timeout: float, bar: Any) -> str:
    request = urllib.request.Request(item.url, headers={"User-Agent": "peft_softmix"})
    digest = hashlib.sha256()
    written = 0
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, tmp.open("wb") as out:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                written += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
    except BaseException:
        if bar is not None and written:
            bar.update(-written)  # a retry counts these bytes again
        raise
    return digest.hexdigest()


def _fetch_one(item: Download, timeout: float, retries: int, backoff: float, bar: Any) -> None:
    _check_url(item.url)
    item.dest.unlink(missing_ok=True)  # a copy that failed its check is never left to be mistaken for a good one
    for attempt in range(1, retries + 1):
        try:
            with atomic_file(item.dest) as tmp:
                actual = _stream(item, tmp, timeout, bar)
                if actual != item.sha256:
                    raise ChecksumError(
                        f"Checksum mismatch for {item.dest.name} downloaded from {item.url}: expected SHA-256 "
                        f"{item.sha256}, got {actual}. The file was not saved. If you set a mirror (base URL), it "
                        "serves a different file; otherwise the download was altered on the way: try again."
                    )
            return
        except urllib.error.HTTPError as err:
            if err.code not in _TRANSIENT_HTTP or attempt == retries:
                raise ConnectionError(
                    f"Could not download {item.url}: HTTP {err.code} {err.reason}. If you point the base URL at a "
                    "mirror, check that it serves <owner>/<repo>/<commit>/<path> like raw.githubusercontent.com."
                ) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            if attempt == retries:
                reason = getattr(err, "reason", err)
                raise ConnectionError(
                    f"Could not download {item.url} after {retries} attempts: {reason}. Check the connection (a proxy "
                    "is taken from HTTPS_PROXY), or download once elsewhere and copy the cache folder."
                ) from None
        time.sleep(backoff * attempt)


def fetch_all(
    items: Sequence[Download],
    *,
    offline: bool | None = None,
    progress: bool = True,
    workers: int = 8,
    timeout: float = 60.0,
    retries: int = 3,
    backoff: float = 1.0,
    how_to_fetch: str = "",
) -> tuple[int, int]:
    """Make every item's ``dest`` hold its verified file; returns ``(downloaded, already cached)``.

    Cached files whose hash is right are not downloaded again. Offline, nothing is downloaded: a missing or damaged
    file is a `FileNotFoundError` listing them and ending with ``how_to_fetch``. Online, the missing ones are
    fetched ``workers`` at a time, with ``retries`` attempts each for network errors (not for a wrong checksum,
    which raises `ChecksumError`).
    """
    missing = [item for item in items if not _is_cached(item)]
    if offline_mode(offline) and missing:
        names = ", ".join(str(item.dest) for item in missing[:3])
        raise FileNotFoundError(
            f"Offline mode is on and {len(missing)} of {len(items)} files are not in the cache (or fail their "
            f"checksum): {names}{', ...' if len(missing) > 3 else ''}. {how_to_fetch}".rstrip()
        )
    if missing:
        from tqdm.auto import tqdm

        sizes = [item.size for item in missing]
        total = sum(s for s in sizes if s is not None) if None not in sizes else None
        with (
            tqdm(total=total, unit="B", unit_scale=True, desc="Downloading", disable=not progress) as bar,
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
        ):
            futures = [pool.submit(_fetch_one, item, timeout, retries, backoff, bar) for item in missing]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    return len(missing), len(items) - len(missing)
