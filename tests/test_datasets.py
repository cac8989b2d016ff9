"""peft_softmix.datasets: the paper's data fetched from pinned URLs, verified, cached and laid out for the loaders.

Everything runs offline: a local HTTP server on 127.0.0.1 serves small fixture repositories laid out as
raw.githubusercontent.com is (``<owner>/<repo>/<commit>/<path>``), under a manifest computed here.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from peft_softmix.datasets import DataManifest, download_trex, load_manifest, main
from peft_softmix.download import Download, fetch_all
from peft_softmix.errors import ChecksumError, DataFormatError
from peft_softmix.facts import SAMPLE_DIR, list_relations, load_common_vocab, load_relation
from peft_softmix.template_sets import load_templates

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}")

FACTS = "acme/facts", "a" * 40
PROMPTS = "acme/prompts", "b" * 40
META = "acme/meta", "c" * 40
RELATIONS = ("P17", "P19")
TREX = {
    ("P17", "train"): [("Eibenstock", "Germany"), ("Simcoe", "Canada")],
    ("P17", "dev"): [("Lyon", "France")],
    ("P17", "test"): [("Vrienden", "Netherlands"), ("Kyoto", "Japan")],
    ("P19", "train"): [("Dante Alighieri", "Florence")],
    ("P19", "dev"): [("Jean Sibelius", "Hämeenlinna")],
    ("P19", "test"): [("Mozart", "Salzburg"), ("Mozart", "Salzburg")],
}
MINED = {"P17": [("[X] , [Y] .", 0.5), ("[X] • in [Y] .", 0.25)], "P19": [("[X] from [Y] .", 0.1)]}
PARAPHRASE = {"P17": [("[X] is a country [Y] .", 0.3)], "P19": [("[X] was born at [Y] .", 0.2)]}
MANUAL_PARAPHRASE = {"P17": ["[X] is located in [Y] .", "[X] is in [Y]."], "P19": ["[X] is born in [Y] ."]}
LAMA = [
    {"relation": r, "template": t, "label": "x"} for r, t in [("P17", "[X] is in [Y] ."), ("P19", "[X] born [Y] .")]
]
VOCAB = ["Germany", "Canada", "France", "Florence"]


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, folder: Path):
        self.requests: Counter[str] = Counter()
        self.fail_once: set[str] = set()  # paths answered 503 the first time

        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self):
                server.requests[self.path] += 1
                if self.path in server.fail_once:
                    server.fail_once.discard(self.path)
                    self.send_error(503)
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def _put(www: Path, repo_commit: tuple[str, str], path: str, text: str) -> dict:
    repo, commit = repo_commit
    data = text.encode("utf-8")
    (www / repo / commit / path).parent.mkdir(parents=True, exist_ok=True)
    (www / repo / commit / path).write_bytes(data)
    return {"path": path, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _build_fixture(www: Path) -> dict:
    """Write the fixture repositories under ``www`` and return their manifest (as JSON)."""
    sources = {
        name: {"repo": repo, "commit": commit, "license": "test"}
        for name, (repo, commit) in {"facts": FACTS, "prompts": PROMPTS, "meta": META}.items()
    }
    outputs: dict[str, dict] = {}
    for (rel, split), pairs in TREX.items():
        # upstream's files have no trailing newline: they are copied as they are
        text = "\n".join(json.dumps({"sub": s, "obj": o}) for s, o in pairs)
        part = {"source": "facts", **_put(www, FACTS, f"db/{rel}/{split}.jsonl", text)}
        outputs[f"trex/{rel}/{split}.jsonl"] = {"relation": rel, "convert": "copy", "parts": [part]}
    lama = {"source": "meta", **_put(www, META, "LAMA_relations.jsonl", _jsonl(LAMA))}
    outputs["templates/lama.jsonl"] = {"convert": "copy", "parts": [lama]}
    for name, folder, table in (("lpaqa_mined", "mine", MINED), ("lpaqa_paraphrase", "paraphrase", PARAPHRASE)):
        texts = {rel: _jsonl({"template": t, "weight": w} for t, w in table[rel]) for rel in RELATIONS}
        parts = [
            {"source": "prompts", "relation": rel, **_put(www, PROMPTS, f"prompt/{folder}/{rel}.jsonl", texts[rel])}
            for rel in RELATIONS
        ]
        outputs[f"templates/{name}.jsonl"] = {"convert": "jsonl_add_relation", "parts": parts}
    # one template per line; a blank line at the end is skipped
    texts = {rel: "\n".join(MANUAL_PARAPHRASE[rel]) + "\n\n" for rel in RELATIONS}
    parts = [
        {"source": "prompts", "relation": rel, **_put(www, PROMPTS, f"prompt/manual_paraphrase/{rel}.txt", texts[rel])}
        for rel in RELATIONS
    ]
    outputs["templates/lpaqa_manual_paraphrase.jsonl"] = {"convert": "lines_to_jsonl", "parts": parts}
    vocab = {"source": "meta", **_put(www, META, "common_vocab_cased.txt", "\n".join(VOCAB) + "\n")}
    outputs["vocab/common_vocab_cased.txt"] = {"convert": "copy", "parts": [vocab]}
    return {"format": 1, "sources": sources, "outputs": outputs}


N_FILES = len(TREX) + 1 + 3 * len(RELATIONS) + 1


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    for name in ("PEFT_SOFTMIX_OFFLINE", "HF_HUB_OFFLINE", "PEFT_SOFTMIX_DATA_URL", "PEFT_SOFTMIX_CACHE"):
        monkeypatch.delenv(name, raising=False)
    www = tmp_path / "www"
    httpd = _Server(www)
    httpd.manifest = DataManifest.from_dict(_build_fixture(www))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _download(server, tmp_path, **kwargs):
    kwargs = {"cache_dir": tmp_path / "cache", "base_url": server.url, "progress": False, **kwargs}
    return download_trex(kwargs.pop("root", tmp_path / "data"), manifest=server.manifest, **kwargs)


def test_downloaded_data_loads_with_the_project_loaders(server, tmp_path):
    data = _download(server, tmp_path, offline=False)
    assert (data.downloaded, data.cached) == (N_FILES, 0)
    assert data.relations == list(RELATIONS)
    assert list_relations(data.trex_dir) == ["P17", "P19"]
    for (rel, split), pairs in TREX.items():
        facts = load_relation(data.trex_dir, rel, splits=[split])[split]
        assert [(f.subject, f.object) for f in facts] == pairs
        assert {f.relation for f in facts} == {rel}
    # LPAQA's per-relation files merged: relation first, the file's order and weights kept
    mined = load_templates("mined", "P17", templates_dir=data.templates_dir)
    assert mined.templates == [t for t, _ in MINED["P17"]] and mined.weights == [w for _, w in MINED["P17"]]
    first = (data.templates_dir / "lpaqa_mined.jsonl").read_text(encoding="utf-8").splitlines()[0]
    assert list(json.loads(first)) == ["relation", "template", "weight"]
    assert load_templates("paraphrase", "P19", templates_dir=data.templates_dir).templates == ["[X] was born at [Y] ."]
    manual_para = load_templates("manual_paraphrase", "P17", templates_dir=data.templates_dir)
    assert manual_para.templates == MANUAL_PARAPHRASE["P17"] and manual_para.weights is None
    assert load_templates("manual", "P19", templates_dir=data.templates_dir).templates == ["[X] born [Y] ."]
    assert load_templates("manual+mined", "P17", k=2, templates_dir=data.templates_dir).templates == [
        "[X] is in [Y] .",
        "[X] , [Y] .",
    ]
    assert load_common_vocab(data.vocab_file) == VOCAB
    # copies are byte for byte what upstream serves
    served = tmp_path / "www" / FACTS[0] / FACTS[1] / "db" / "P17" / "test.jsonl"
    assert (data.trex_dir / "P17" / "test.jsonl").read_bytes() == served.read_bytes()
    assert json.loads((data.root / "sources.json").read_text())["sources"]["facts"]["repo"] == FACTS[0]


def test_cached_files_are_not_downloaded_again(server, tmp_path):
    _download(server, tmp_path, offline=False)
    assert sum(server.requests.values()) == N_FILES
    again = _download(server, tmp_path, root=tmp_path / "elsewhere", offline=False)
    assert (again.downloaded, again.cached) == (0, N_FILES)
    assert sum(server.requests.values()) == N_FILES
    assert load_common_vocab(again.vocab_file) == VOCAB
    # a damaged cached copy is not trusted: that one file is fetched again
    cached = tmp_path / "cache" / "downloads" / META[0] / META[1] / "common_vocab_cased.txt"
    cached.write_text("tampered\n")
    third = _download(server, tmp_path, offline=False)
    assert (third.downloaded, third.cached) == (1, N_FILES - 1)
    assert server.requests[f"/{META[0]}/{META[1]}/common_vocab_cased.txt"] == 2
    assert cached.read_text().splitlines() == VOCAB


def test_checksum_mismatch_is_refused_and_nothing_lands(server, tmp_path):
    path = tmp_path / "www" / FACTS[0] / FACTS[1] / "db" / "P19" / "dev.jsonl"
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_text(json.dumps({"sub": "Jean Sibelius", "obj": "Helsinki"}))
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ChecksumError) as info:
        _download(server, tmp_path, offline=False)
    message = str(info.value)
    assert "dev.jsonl" in message and f"{server.url}/{FACTS[0]}/{FACTS[1]}/db/P19/dev.jsonl" in message
    assert expected in message and actual in message
    assert not (tmp_path / "data").exists()  # no half-laid-out data
    downloads = tmp_path / "cache" / "downloads"
    assert not (downloads / FACTS[0] / FACTS[1] / "db" / "P19" / "dev.jsonl").exists()
    leftovers = [p for p in downloads.rglob(".*")]  # atomic_file's temporary names start with a dot
    assert not leftovers, leftovers
    # verified files fetched before the failure were kept (the rest were cancelled): once the server is fixed,
    # only what is not in the cache is fetched
    kept = sum(1 for p in downloads.rglob("*") if p.is_file())
    assert kept >= 1
    path.write_text("\n".join(json.dumps({"sub": s, "obj": o}) for s, o in TREX[("P19", "dev")]))
    before = sum(server.requests.values())
    data = _download(server, tmp_path, offline=False)
    assert (data.downloaded, data.cached) == (N_FILES - kept, kept)
    assert sum(server.requests.values()) == before + N_FILES - kept
    assert server.requests[f"/{FACTS[0]}/{FACTS[1]}/db/P19/dev.jsonl"] == 2


def test_offline_uses_the_cache_and_names_what_is_missing(server, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as info:
        _download(server, tmp_path, offline=True)
    message = str(info.value)
    assert f"{N_FILES} of {N_FILES} files are not in the cache" in message
    assert "python -m peft_softmix.datasets" in message and str(tmp_path / "cache") in message
    assert sum(server.requests.values()) == 0
    # HF_HUB_OFFLINE=1 means offline too
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="Offline mode is on"):
        _download(server, tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    _download(server, tmp_path)
    fetched = sum(server.requests.values())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = _download(server, tmp_path, root=tmp_path / "offline", base_url="http://127.0.0.1:9")
    assert (data.downloaded, data.cached) == (0, N_FILES)
    assert sum(server.requests.values()) == fetched
    assert load_relation(data.trex_dir, "P19", splits=["test"])["test"].objects == ["Salzburg", "Salzburg"]


def test_relations_environment_and_default_root(server, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_SOFTMIX_CACHE", str(tmp_path / "env-cache"))
    monkeypatch.setenv("PEFT_SOFTMIX_DATA_URL", server.url)
    data = download_trex(relations=["P19"], manifest=server.manifest, progress=False, offline=False)
    assert data.root == tmp_path / "env-cache" / "data"
    assert list_relations(data.trex_dir) == ["P19"]
    # templates always cover every relation, so a later call for others finds them whole
    assert load_templates("mined", "P17", templates_dir=data.templates_dir).templates
    assert not any("/P17/" in path for path in server.requests)
    # one relation given as a string is that relation, not its characters
    assert list_relations(download_trex(relations="P17", manifest=server.manifest, progress=False).trex_dir) == [
        "P17",
        "P19",
    ]
    with pytest.raises(ValueError, match=r"Unknown T-REx relation\(s\) P999.*P17, P19"):
        download_trex(relations=["P999"], manifest=server.manifest, progress=False, offline=False)


def test_http_errors_are_clear_and_transient_ones_retried(server, tmp_path):
    good = server.manifest.outputs[0].parts[0]
    item = Download(good.url(server.url), good.sha256, tmp_path / "x" / "file.jsonl", good.size)
    server.fail_once.add(f"/{good.repo}/{good.commit}/{good.path}")
    assert fetch_all([item], offline=False, progress=False, backoff=0) == (1, 0)
    assert server.requests[f"/{good.repo}/{good.commit}/{good.path}"] == 2
    missing = Download(f"{server.url}/acme/none/{'d' * 40}/nothing.jsonl", good.sha256, tmp_path / "y", None)
    with pytest.raises(ConnectionError, match=r"HTTP 404.*nothing\.jsonl|nothing\.jsonl.*HTTP 404"):
        fetch_all([missing], offline=False, progress=False, backoff=0)
    assert server.requests[f"/acme/none/{'d' * 40}/nothing.jsonl"] == 1  # a 404 is not retried
    with pytest.raises(ValueError, match="only https://"):
        fetch_all([Download("ftp://example.org/x", good.sha256, tmp_path / "z")], offline=False, progress=False)


def test_command_line(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("peft_softmix.datasets.load_manifest", lambda path=None: server.manifest)
    args = ["--root", str(tmp_path / "data"), "--cache_dir", str(tmp_path / "c"), "--base_url", server.url]
    main([*args, "--no_progress", "--relations", "P17"])
    out = capsys.readouterr().out
    assert f"{N_FILES - 3} files downloaded" in out
    assert str(tmp_path / "data" / "trex") in out and "--data_dir" in out and "CC BY-NC 4.0" in out
    with pytest.raises(SystemExit, match="error: Unknown T-REx relation"):
        main([*args, "--relations", "P1"])
    with pytest.raises(SystemExit, match="error: Offline mode is on"):
        main(["--root", str(tmp_path / "d2"), "--cache_dir", str(tmp_path / "empty"), "--offline"])


def test_module_runs_as_a_command(tmp_path):
    env = {**os.environ, "PEFT_SOFTMIX_CACHE": str(tmp_path / "empty"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "peft_softmix.datasets", "--root", str(tmp_path / "d"), "--offline"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1
    assert "error: Offline mode is on and 248 of 248 files are not in the cache" in result.stderr
    assert str(tmp_path / "empty") in result.stderr and not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["sources"]["facts"].update(commit="eb9047e"), "40-hex-digit commit"),
        (lambda m: m["outputs"]["trex/P17/dev.jsonl"]["parts"][0].update(sha256="abc"), "64 hex digits"),
        (lambda m: m["outputs"].update({"../evil.txt": m["outputs"]["trex/P17/dev.jsonl"]}), "without '..'"),
        (lambda m: m["outputs"]["templates/lpaqa_mined.jsonl"]["parts"][0].pop("relation"), "needs its 'relation'"),
        (lambda m: m["outputs"]["templates/lama.jsonl"].update(convert="unzip"), "'convert' must be one of"),
    ],
)
def test_bad_manifest_is_refused(tmp_path, change, message):
    manifest = _build_fixture(tmp_path)
    change(manifest)
    with pytest.raises(DataFormatError, match=message):
        DataManifest.from_dict(manifest)


def test_real_manifest_pins_every_file():
    manifest = load_manifest()
    assert len(manifest.relations) == 41
    assert set(list_relations(SAMPLE_DIR / "trex")) <= set(manifest.relations)
    trex = [o for o in manifest.outputs if o.path.startswith("trex/")]
    assert sorted(o.path for o in trex) == sorted(
        f"trex/{rel}/{split}.jsonl" for rel in manifest.relations for split in ("train", "dev", "test")
    )
    pinned = re.compile(r"https://raw\.githubusercontent\.com/[\w.-]+/[\w.-]+/[0-9a-f]{40}/\S+")
    parts = [part for output in manifest.outputs for part in output.parts]
    for part in parts:
        assert pinned.fullmatch(part.url()), part.url()
        assert re.fullmatch(r"[0-9a-f]{64}", part.sha256) and part.size and part.size > 0
    by_path = {o.path: o for o in manifest.outputs}
    for name in ("lpaqa_mined", "lpaqa_paraphrase", "lpaqa_manual_paraphrase"):
        assert [p.relation for p in by_path[f"templates/{name}.jsonl"].parts] == manifest.relations
    assert {"templates/lama.jsonl", "vocab/common_vocab_cased.txt"} <= set(by_path)
    assert {s["repo"] for s in manifest.sources.values()} == {
        "hiaoxui/soft-prompts",
        "jzbjyb/LPAQA",
        "princeton-nlp/OptiPrompt",
    }


@needs_shared
@pytest.mark.parametrize("path", ["templates/lama.jsonl", "vocab/common_vocab_cased.txt"])
def test_real_manifest_checksums_match_the_development_copy(path):
    # these two files are upstream's bytes unchanged in the development copy, so their pins can be checked here
    (part,) = {o.path: o for o in load_manifest().outputs}[path].parts
    assert hashlib.sha256((SHARED_DATA / path).read_bytes()).hexdigest() == part.sha256
