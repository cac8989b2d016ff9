"""Shared fixtures: a tiny offline BERT and its WordPiece tokenizer, saved once per session like a Hub checkpoint."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForMaskedLM, BertTokenizerFast

import peft_softmix  # registers SOFT_MIXTURE with PEFT

# Enough words for a few relations; "##"-pieces let multi-token subjects and objects occur.
WORDS = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    ".", ",", "'", "(", ")", "-",
    "the", "a", "of", "in", "is", "was", "born", "from", "capital", "city", "language", "speaks", "native",
    "works", "for", "located", "citizen", "country", "plays", "at",
    "Dante", "Paris", "Rome", "Milan", "Florence", "Berlin", "Madrid", "Lisbon", "Vienna", "Oslo",
    "France", "Italy", "Germany", "Spain", "Portugal", "Austria", "Norway",
    "French", "Italian", "German", "Spanish", "English",
    "Ali", "Bo", "Cy", "Ed", "Flo",
    "Ind", "##ia", "##s", "##er", "##o", "##an", "##ia", "##ne",
]  # fmt: skip
WORDS = list(dict.fromkeys(WORDS))

TINY_CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    # no dropout: a few optimisation steps in the tests then follow the exact gradient
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


def tiny_bert(vocab_size: int = len(WORDS), seed: int = 0, **overrides) -> BertForMaskedLM:
    torch.manual_seed(seed)
    model = BertForMaskedLM(BertConfig(vocab_size=vocab_size, **{**TINY_CONFIG, **overrides}))
    # the default init puts almost all mass on a uniform-looking distribution; a wider spread makes
    # predictions differ between templates, so equalities in the tests are not trivially true
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A saved tiny BERT + WordPiece tokenizer, loadable with `from_pretrained(str(tiny_dir))`."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)}, do_lower_case=False)
    tokenizer.save_pretrained(path)
    tiny_bert().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(str(tiny_dir))


@pytest.fixture
def base(tiny_dir):
    """A fresh copy of the tiny BERT (get_peft_model wraps and freezes it, so never share one)."""
    return AutoModelForMaskedLM.from_pretrained(str(tiny_dir)).eval()


def run_python(code: str, env: dict[str, str] | None = None, timeout: int = 120) -> dict:
    """Run ``code`` in a fresh interpreter; it must print one JSON object on its last stdout line."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    # the child imports the very peft_softmix this process tests
    package_root = str(Path(peft_softmix.__file__).resolve().parents[1])
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, full_env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=package_root
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def save_tiny_bert(folder: Path, vocab: list[str], dropout: float) -> None:
    """Save a tiny BERT (seed 0, wide init) and a WordPiece tokenizer over ``vocab`` into ``folder``."""
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=False)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        # a wide init makes the tiny model's answers depend on its input, so prompts can be learned
        initializer_range=0.5,
    )
    BertForMaskedLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def load_script(path: Path, name: str | None = None):
    """A script of the repository (an example, a benchmark, a build script) imported as a module."""
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def script_environment(**extra: str) -> dict[str, str]:
    """The environment a repository script runs in from the tests: offline, on the CPU, one thread, this checkout
    first on the import path; ``extra`` adds or overrides variables."""
    repo_root = Path(__file__).resolve().parents[1]
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "ACCELERATE_USE_CPU": "true",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(repo_root), os.environ.get("PYTHONPATH")])),
        **extra,
    }


def two_process_launch(port_base: int) -> list[str]:
    """``accelerate launch`` of two CPU processes on one machine, on a port of its own per test process."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port_base + os.getpid() % 1000),
    ]
