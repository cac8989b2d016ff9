"""Run the Python examples of the documentation, offline, so that the docs cannot drift from the API.

Each page's ```python blocks run in order, in one namespace, in a fresh process whose working directory holds a
tiny random BERT and GPT-2 saved under the names the pages use (``bert-base-cased``, ``gpt2``): ``from_pretrained``
finds a local folder of that name before it would go to the Hub. ``push_to_hub`` saves to a local folder named by
the repo id, which is where ``PeftModel.from_pretrained(base, "<repo id>")`` then finds it. The numbers the examples
print are meaningless (the model is random); what is checked is that every call exists and runs.

    python scripts/check_docs.py            # the pages in PAGES
    python scripts/check_docs.py docs/quickstart.md
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Pages whose examples are complete programs (the API pages show fragments that need a trained model around them).
PAGES = ("docs/index.md", "docs/quickstart.md", "docs/trainer.md", "README.md")
MODEL_NAME = "bert-base-cased"
CAUSAL_NAME = "gpt2"
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}

PRELUDE = f"""
import os
import sys

sys.path.insert(0, {str(ROOT / "tests")!r})
import torch
from factories import wordpiece_tokenizer

import peft_softmix
from peft import PeftModel
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

tokenizer = AutoTokenizer.from_pretrained(wordpiece_tokenizer("tokenizers"))
torch.manual_seed(0)
config = BertConfig(
    vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
)
BertForMaskedLM(config).save_pretrained({MODEL_NAME!r})
tokenizer.save_pretrained({MODEL_NAME!r})

# a tiny GPT-2 under the name the causal examples use
from factories import byte_level_vocabulary
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

_vocab, _merges = byte_level_vocabulary(["<|endoftext|>"])
_eot = "<|endoftext|>"
GPT2Tokenizer(
    vocab=_vocab, merges=_merges, add_bos_token=True, bos_token=_eot, eos_token=_eot, unk_token=_eot, pad_token=_eot
).save_pretrained({CAUSAL_NAME!r})
GPT2LMHeadModel(GPT2Config(vocab_size=len(_vocab), n_embd=32, n_layer=2, n_head=2)).save_pretrained({CAUSAL_NAME!r})


def _push_to_hub_locally(self, repo_id, *args, **kwargs):
    self.save_pretrained(repo_id)
    print(f"[check_docs] push_to_hub({{repo_id!r}}) saved to ./{{repo_id}} instead")


PeftModel.push_to_hub = _push_to_hub_locally
peft_softmix.PeftModelForSoftMixture.push_to_hub = _push_to_hub_locally
# the pages must define what they use: nothing of this set-up stays visible to them
del os, sys, torch, peft_softmix, PeftModel, AutoTokenizer, BertConfig, BertForMaskedLM
del config, tokenizer, wordpiece_tokenizer, _push_to_hub_locally
del byte_level_vocabulary, GPT2Config, GPT2LMHeadModel, GPT2Tokenizer, _vocab, _merges, _eot
"""


def python_blocks(page: Path) -> list[str]:
    return [textwrap.dedent(block) for block in re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)]


def run_page(page: Path, timeout: int) -> bool:
    name = page.relative_to(ROOT) if page.is_relative_to(ROOT) else page
    blocks = python_blocks(page)
    if not blocks:
        print(f"{name}: no python examples")
        return True
    program = PRELUDE + "\n".join(
        f"\nprint('[check_docs] block {i} of {len(blocks)}', flush=True)\n{block}"
        for i, block in enumerate(blocks, start=1)
    )
    with tempfile.TemporaryDirectory(prefix="check-docs-") as workdir:
        script = Path(workdir) / "page.py"
        script.write_text(program, encoding="utf-8")
        result = subprocess.run(
            [sys.executable, str(script)],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT)},
        )
    if result.returncode != 0:
        print(f"{name}: FAILED ({len(blocks)} blocks)\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
        return False
    print(f"{name}: {len(blocks)} python blocks ran")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pages", nargs="*", type=Path, help=f"Markdown files (default: {', '.join(PAGES)})")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per page")
    args = parser.parse_args()
    pages = [p.resolve() for p in args.pages] or [ROOT / p for p in PAGES]
    missing = [str(p) for p in pages if not p.is_file()]
    if missing:
        parser.error(f"no such page: {', '.join(missing)}")
    ok = [run_page(page, args.timeout) for page in pages]
    sys.exit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()
