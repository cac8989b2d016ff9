"""Write ``peft_softmix/data/paper_data.json``: the pinned URLs and SHA-256 checksums of the paper's public data.

The checksums are computed from git clones of the upstream repositories at the pinned commits (``git show
<commit>:<path>``), so the manifest says exactly what ``raw.githubusercontent.com/<repo>/<commit>/<path>`` serves.
Only data files are read; nothing of those repositories' code is used. Run it when a pinned commit changes::

    git clone https://github.com/hiaoxui/soft-prompts && git clone https://github.com/jzbjyb/LPAQA
    git clone https://github.com/princeton-nlp/OptiPrompt
    python scripts/build_data_manifest.py --soft_prompts soft-prompts --lpaqa LPAQA --optiprompt OptiPrompt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
from pathlib import Path

from peft_softmix.atomic import write_text_atomic
from peft_softmix.datasets import MANIFEST_PATH

# The pinned snapshots (full commit ids) and what their repositories state about reuse.
SOURCES = {
    "soft-prompts": {
        "repo": "hiaoxui/soft-prompts",
        "commit": "eb9047e134de25dd9442dc2a809652814a005b4d",
        "license": "Apache-2.0 (the T-REx test facts are LAMA's: CC BY-NC 4.0)",
    },
    "lpaqa": {
        "repo": "jzbjyb/LPAQA",
        "commit": "3204221b47e66caa9bc3aebbcc4b2c2600dbaa1b",
        "license": "none stated",
    },
    "optiprompt": {
        "repo": "princeton-nlp/OptiPrompt",
        "commit": "9450bc96f28ac3df01337c79be079a2ac3defb5c",
        "license": "MIT (LAMA's templates and vocabulary: CC BY-NC 4.0)",
    },
}
SPLITS = ("train", "dev", "test")
TREX_DIR = "db/trex_original"


def git(repo: Path, *args: str) -> bytes:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=True).stdout


def remote(source: str, repo: Path, path: str) -> dict:
    blob = git(repo, "show", f"{SOURCES[source]['commit']}:{path}")
    return {"source": source, "path": path, "sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}


def relations(repo: Path) -> list[str]:
    """The relation folders of soft-prompts' T-REx split, in git's (byte) order, which is also LPAQA's file order."""
    commit = SOURCES["soft-prompts"]["commit"]
    names = git(repo, "ls-tree", "--name-only", f"{commit}:{TREX_DIR}").decode().split()
    return sorted(names)


def build(soft_prompts: Path, lpaqa: Path, optiprompt: Path) -> dict:
    outputs: dict[str, dict] = {}
    rels = relations(soft_prompts)
    for rel in rels:
        for split in SPLITS:
            part = remote("soft-prompts", soft_prompts, f"{TREX_DIR}/{rel}/{split}.jsonl")
            outputs[f"trex/{rel}/{split}.jsonl"] = {"relation": rel, "convert": "copy", "parts": [part]}
    lama = remote("optiprompt", optiprompt, "relation_metainfo/LAMA_relations.jsonl")
    outputs["templates/lama.jsonl"] = {"convert": "copy", "parts": [lama]}
    for name, folder, suffix, convert in (
        ("lpaqa_mined", "mine", "jsonl", "jsonl_add_relation"),
        ("lpaqa_paraphrase", "paraphrase", "jsonl", "jsonl_add_relation"),
        ("lpaqa_manual_paraphrase", "manual_paraphrase", "txt", "lines_to_jsonl"),
    ):
        parts = [{"relation": rel, **remote("lpaqa", lpaqa, f"prompt/{folder}/{rel}.{suffix}")} for rel in rels]
        outputs[f"templates/{name}.jsonl"] = {"convert": convert, "parts": parts}
    vocab = remote("optiprompt", optiprompt, "common_vocabs/common_vocab_cased.txt")
    outputs["vocab/common_vocab_cased.txt"] = {"convert": "copy", "parts": [vocab]}
    return {"format": 1, "sources": SOURCES, "outputs": outputs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--soft_prompts", type=Path, required=True, help="git clone of hiaoxui/soft-prompts")
    parser.add_argument("--lpaqa", type=Path, required=True, help="git clone of jzbjyb/LPAQA")
    parser.add_argument("--optiprompt", type=Path, required=True, help="git clone of princeton-nlp/OptiPrompt")
    parser.add_argument("--output", type=Path, default=MANIFEST_PATH)
    args = parser.parse_args()
    manifest = build(args.soft_prompts, args.lpaqa, args.optiprompt)
    write_text_atomic(args.output, json.dumps(manifest, indent=1) + "\n")
    print(f"{args.output}: {len(manifest['outputs'])} outputs")


if __name__ == "__main__":
    main()
