"""The paper's data from its public sources: LAMA T-REx facts, LAMA and LPAQA templates, LAMA's common vocabulary.

`download_trex` fetches the files pinned in ``peft_softmix/data/paper_data.json`` (URLs at fixed commits, each with
its SHA-256), keeps them in a cache folder (`peft_softmix.download`), and lays them out as the loaders read them:

```text
<root>/trex/<relation>/{train,dev,test}.jsonl    load_relation(root / "trex", "P19")
<root>/templates/lama.jsonl, lpaqa_mined.jsonl,  load_templates("mined", "P19", templates_dir=root / "templates")
    lpaqa_paraphrase.jsonl, lpaqa_manual_paraphrase.jsonl
<root>/vocab/common_vocab_cased.txt              load_common_vocab(root / "vocab" / "common_vocab_cased.txt")
<root>/sources.json                              the repositories, commits and licences the files came from
```

The T-REx split is AutoPrompt's (Shin et al. 2020; 41 relations; test = the LAMA T-REx test facts of Petroni et al.
2019), as hiaoxui/soft-prompts (Qin & Eisner's code) keeps it: ``{"sub", "obj"}`` lines. LPAQA's per-relation
template files are merged into one file per kind, each line with a ``relation`` field first.

From the command line, which prints where the data landed: ``python -m peft_softmix.datasets --root data/``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .atomic import atomic_folder
from .download import CACHE_ENV, Download, default_cache_dir, fetch_all, offline_mode
from .errors import DataFormatError
from .facts import read_json_object

__all__ = [
    "BASE_URL_ENV",
    "DEFAULT_BASE_URL",
    "MANIFEST_PATH",
    "DataManifest",
    "DataOutput",
    "PaperData",
    "RemoteFile",
    "download_trex",
    "load_manifest",
]

MANIFEST_PATH = Path(__file__).parent / "data" / "paper_data.json"
DEFAULT_BASE_URL = "https://raw.githubusercontent.com"
BASE_URL_ENV = "PEFT_SOFTMIX_DATA_URL"
# copy: the file as it is; jsonl_add_relation: JSON lines merged, the part's relation put first in each;
# lines_to_jsonl: one template per text line, merged into {"relation", "template"} lines.
CONVERTERS = ("copy", "jsonl_add_relation", "lines_to_jsonl")

_HEX40 = re.compile(r"[0-9a-f]{40}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class RemoteFile:
    """One upstream file at a fixed commit.

    Attributes:
        repo: ``owner/name`` on GitHub.
        commit: The full (40 hex digit) commit id, so the URL always serves the same bytes.
        path: The file's path in the repository.
        sha256: Its SHA-256 (64 hex digits).
        size: Its size in bytes (for the progress bar).
        relation: The relation the file holds, for per-relation files that are merged.
    """

    repo: str
    commit: str
    path: str
    sha256: str
    size: int | None = None
    relation: str | None = None

    def url(self, base_url: str = DEFAULT_BASE_URL) -> str:
        return f"{base_url.rstrip('/')}/{self.repo}/{self.commit}/{urllib.parse.quote(self.path)}"

    def cache_path(self, cache_dir: str | os.PathLike) -> Path:
        return Path(cache_dir) / "downloads" / self.repo / self.commit / self.path


@dataclass(frozen=True)
class DataOutput:
    """One file of the laid-out data: its path under the root, how it is made, and from which upstream files."""

    path: str
    convert: str
    parts: tuple[RemoteFile, ...]
    relation: str | None = None  # set on trex/<relation>/<split>.jsonl, which `download_trex(relations=...)` picks


def _safe_relative(path: str, what: str) -> str:
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts or "\\" in path:
        raise DataFormatError(f"{what}: {path!r} must be a relative path without '..'.")
    return path


@dataclass(frozen=True)
class DataManifest:
    """What to fetch and how to lay it out: ``sources`` (repo, commit, licence per source name) and ``outputs``."""

    sources: dict[str, dict[str, str]]
    outputs: tuple[DataOutput, ...]

    @property
    def relations(self) -> list[str]:
        """The T-REx relations, in manifest order."""
        return list(dict.fromkeys(o.relation for o in self.outputs if o.relation is not None))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "manifest") -> DataManifest:
        """Read and check a manifest (the JSON form of ``paper_data.json``); `DataFormatError` names what is wrong."""
        if not isinstance(data, dict) or data.get("format") != 1:
            raise DataFormatError(f'{where}: expected a JSON object with "format": 1.')
        sources = data.get("sources")
        if not isinstance(sources, dict) or not sources:
            raise DataFormatError(f"{where}: 'sources' must map source names to {{repo, commit, license}}.")
        for name, source in sources.items():
            if not isinstance(source, dict) or not _REPO.fullmatch(str(source.get("repo", ""))):
                raise DataFormatError(f"{where}: source {name!r} needs 'repo' as 'owner/name'.")
            if not _HEX40.fullmatch(str(source.get("commit", ""))):
                raise DataFormatError(f"{where}: source {name!r} needs 'commit' as a full 40-hex-digit commit id.")
        outputs = []
        for path, entry in dict(data.get("outputs") or {}).items():
            at = f"{where}, output {path!r}"
            _safe_relative(path, at)
            convert = entry.get("convert")
            if convert not in CONVERTERS:
                raise DataFormatError(f"{at}: 'convert' must be one of {', '.join(CONVERTERS)}, got {convert!r}.")
            parts = []
            for part in entry.get("parts") or []:
                if part.get("source") not in sources:
                    raise DataFormatError(f"{at}: part source {part.get('source')!r} is not in 'sources'.")
                if not _HEX64.fullmatch(str(part.get("sha256", ""))):
                    raise DataFormatError(f"{at}: part {part.get('path')!r} needs 'sha256' as 64 hex digits.")
                source = sources[part["source"]]
                parts.append(
                    RemoteFile(
                        repo=source["repo"],
                        commit=source["commit"],
                        path=_safe_relative(str(part.get("path", "")), at),
                        sha256=part["sha256"],
                        size=part.get("size"),
                        relation=part.get("relation"),
                    )
                )
            if not parts or (convert == "copy" and len(parts) != 1):
                raise DataFormatError(f"{at}: {convert!r} needs {'one part' if convert == 'copy' else 'parts'}.")
            if convert != "copy" and any(p.relation is None for p in parts):
                raise DataFormatError(f"{at}: every part of a merged file needs its 'relation'.")
            outputs.append(DataOutput(path, convert, tuple(parts), entry.get("relation")))
        if not outputs:
            raise DataFormatError(f"{where}: 'outputs' is empty.")
        return cls(sources=sources, outputs=tuple(outputs))

    def select(self, relations: str | Iterable[str] | None = None) -> list[DataOutput]:
        """The outputs for ``relations`` (all if None), plus every template and vocabulary file (all relations:
        they are small, and a later call for other relations must not find them cut down)."""
        if relations is None:
            return list(self.outputs)
        wanted = list(dict.fromkeys([relations] if isinstance(relations, str) else relations))
        unknown = [r for r in wanted if r not in self.relations]
        if unknown:
            raise ValueError(
                f"Unknown T-REx relation(s) {', '.join(unknown)}; the {len(self.relations)} relations are "
                f"{', '.join(self.relations)}."
            )
        return [o for o in self.outputs if o.relation is None or o.relation in wanted]


def load_manifest(path: str | os.PathLike | None = None) -> DataManifest:
    """The manifest at ``path``; by default the one shipped with the package (``MANIFEST_PATH``)."""
    path = Path(path) if path is not None else MANIFEST_PATH
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: not valid JSON ({err.msg}, line {err.lineno}).") from None
    return DataManifest.from_dict(data, where=str(path))


def _text(path: Path, part: RemoteFile) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DataFormatError(f"{part.path} ({part.repo}@{part.commit[:7]}) is not UTF-8 text.") from None


def _convert(output: DataOutput, cached: list[Path]) -> bytes:
    if output.convert == "copy":
        return cached[0].read_bytes()
    lines = []
    for part, path in zip(output.parts, cached):
        for lineno, line in enumerate(_text(path, part).splitlines(), start=1):
            if not line.strip():
                continue
            if output.convert == "lines_to_jsonl":
                record: dict[str, Any] = {"template": line.strip()}
            else:
                record = read_json_object(Path(part.path), lineno, line)
            record.pop("relation", None)
            lines.append(json.dumps({"relation": part.relation, **record}))
    return ("\n".join(lines) + "\n").encode("utf-8")


@dataclass(frozen=True)
class PaperData:
    """Where `download_trex` put the data, and what it fetched.

    Attributes:
        root: The folder holding ``trex/``, ``templates/`` and ``vocab/``.
        relations: The T-REx relations laid out this time.
        downloaded: Files fetched from the network this time.
        cached: Files taken from the cache (already verified there).
    """

    root: Path
    relations: list[str]
    downloaded: int
    cached: int

    @property
    def trex_dir(self) -> Path:
        """``--data_dir`` / `load_relation`'s folder."""
        return self.root / "trex"

    @property
    def templates_dir(self) -> Path:
        """``--templates_dir`` / `load_templates`' folder."""
        return self.root / "templates"

    @property
    def vocab_file(self) -> Path:
        """LAMA's common vocabulary, for `load_common_vocab`."""
        return self.root / "vocab" / "common_vocab_cased.txt"


def download_trex(
    root: str | os.PathLike | None = None,
    relations: str | Sequence[str] | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    base_url: str | None = None,
    offline: bool | None = None,
    progress: bool = True,
    manifest: DataManifest | None = None,
) -> PaperData:
    """Fetch (or take from the cache), verify and lay out the paper's T-REx data under ``root``.

    Args:
        root: Where to lay the data out; default ``<cache_dir>/data``. Files already there are replaced, others
            are left alone. Nothing lands unless every file was fetched and verified.
        relations: T-REx relations to fetch (``["P17", "P19"]``); all 41 if None. Templates and the vocabulary
            always cover every relation.
        cache_dir: The download cache; default ``$PEFT_SOFTMIX_CACHE`` or ``~/.cache/peft_softmix``.
        base_url: Where files are fetched from, as ``<base_url>/<owner>/<repo>/<commit>/<path>``; default
            ``$PEFT_SOFTMIX_DATA_URL`` or ``https://raw.githubusercontent.com``. A mirror must serve the same
            bytes: every file is checked against its pinned SHA-256.
        offline: Use only the cache; default: on when ``PEFT_SOFTMIX_OFFLINE`` or ``HF_HUB_OFFLINE`` is set.
        progress: Show a progress bar while downloading.
        manifest: What to fetch; default the shipped one (`load_manifest`).

    Raises:
        ChecksumError: A download is not the pinned file (nothing of it is kept).
        FileNotFoundError: Offline, and a file is not in the cache.
        ConnectionError: A file could not be downloaded.
        ValueError: An unknown relation.
    """
    manifest = manifest if manifest is not None else load_manifest()
    outputs = manifest.select(relations)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = Path(root).expanduser() if root is not None else cache / "data"
    base = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    remote = {part.cache_path(cache): part for output in outputs for part in output.parts}
    items = [Download(part.url(base), part.sha256, dest, part.size) for dest, part in remote.items()]
    command = f"python -m peft_softmix.datasets --root {root}" + (f" --cache_dir {cache}" if cache_dir else "")
    how = (
        f"Run `{command}` once with internet access (without offline mode), or copy such a cache folder to "
        f"{cache} ({CACHE_ENV} or --cache_dir chooses it)."
    )
    downloaded, cached = fetch_all(items, offline=offline_mode(offline), progress=progress, how_to_fetch=how)
    with atomic_folder(root) as staging:
        for output in outputs:
            target = staging / output.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(_convert(output, [part.cache_path(cache) for part in output.parts]))
        sources = {
            "note": "Laid out by peft_softmix.datasets from these repositories at these commits; the files, their "
            "URLs and their SHA-256 checksums are listed in peft_softmix/data/paper_data.json.",
            "sources": manifest.sources,
        }
        (staging / "sources.json").write_text(json.dumps(sources, indent=1) + "\n", encoding="utf-8")
    chosen = list(dict.fromkeys(o.relation for o in outputs if o.relation is not None))
    return PaperData(root=root, relations=chosen, downloaded=downloaded, cached=cached)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m peft_softmix.datasets",
        description="Download the paper's data (LAMA T-REx, LAMA and LPAQA templates, LAMA's common vocabulary) from "
        "its public sources, verify every file's SHA-256, and lay it out for --data_dir / --templates_dir.",
    )
    parser.add_argument("--root", type=Path, default=None, help="where to put the data (default: <cache>/data)")
    parser.add_argument("--relations", nargs="+", default=None, help="T-REx relations, e.g. P17 P19 (default: all)")
    cache_help = f"download cache (default: ${CACHE_ENV} or ~/.cache/peft_softmix)"
    parser.add_argument("--cache_dir", type=Path, default=None, help=cache_help)
    url_help = f"mirror serving <owner>/<repo>/<commit>/<path> (default: ${BASE_URL_ENV} or {DEFAULT_BASE_URL})"
    parser.add_argument("--base_url", default=None, help=url_help)
    parser.add_argument("--offline", action="store_true", default=None, help="use only the cache")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    relations = None if args.relations in (None, ["all"]) else args.relations
    try:
        data = download_trex(
            args.root,
            relations,
            cache_dir=args.cache_dir,
            base_url=args.base_url,
            offline=args.offline,
            progress=not args.no_progress,
        )
    except (OSError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(f"{data.downloaded} files downloaded, {data.cached} taken from the cache; all SHA-256 checksums verified.")
    print(f"T-REx ({len(data.relations)} relations): {data.trex_dir}   (--data_dir)")
    print(f"Templates: {data.templates_dir}   (--templates_dir)")
    print(f"Common vocabulary: {data.vocab_file}")
    print(f"Sources and licences: {data.root / 'sources.json'} (LAMA's facts are CC BY-NC 4.0: non-commercial use).")


if __name__ == "__main__":
    main()
