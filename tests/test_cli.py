"""The ``peft-softmix`` command line on the probe LM: ask, evaluate and inspect a small adapter saved in a fixture.

The main paths run as subprocesses (``python -m peft_softmix.cli``), as a user would; the many bad-input cases run
in-process with typer's CliRunner (same code, no interpreter start-up each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForMaskedLM
from typer.testing import CliRunner

import peft_softmix
from peft_softmix import SoftMixtureConfig
from peft_softmix.cli import app
from peft_softmix.facts import SAMPLE_DIR, filter_single_token, load_facts
from peft_softmix.inspection import inspect_adapter
from peft_softmix.metrics import load_fact_retrieval, rank_of_gold
from peft_softmix.template_sets import load_templates

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "examples" / "probe_lm"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# an object that is not one token of the probe LM's word-level tokenizer: counted, never silently dropped
MULTI_TOKEN_FACT = {"sub_label": "Pierre Messmer", "obj_label": "Old Church Slavonic"}


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> SimpleNamespace:
    """A 3-template P103 adapter on the probe LM (weights 3:2:1, soft words nudged off their start), and facts."""
    root = tmp_path_factory.mktemp("cli")
    base = AutoModelForMaskedLM.from_pretrained(str(PROBE))
    templates = load_templates("paraphrase", "P103", k=3).templates
    model = get_peft_model(base, SoftMixtureConfig(templates=templates, template_weights=[3, 2, 1]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        words = model.prompt_encoder["default"].soft_words
        words.add_(0.05 * torch.randn(words.shape, generator=generator))
    adapter = root / "p103"
    model.save_pretrained(str(adapter))
    lines = (SAMPLE_DIR / "trex" / "P103" / "test.jsonl").read_text(encoding="utf-8").splitlines()[:150]
    facts = root / "facts.jsonl"
    facts.write_text("\n".join([*lines, json.dumps(MULTI_TOKEN_FACT)]) + "\n", encoding="utf-8")
    return SimpleNamespace(root=root, adapter=adapter, facts=facts, templates=templates)


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m peft_softmix.cli ARGS`` in a fresh interpreter that imports this checkout's peft_softmix."""
    package_root = str(Path(peft_softmix.__file__).resolve().parents[1])
    env = {**os.environ, **OFFLINE, "PYTHONPATH": package_root}
    return subprocess.run(
        [sys.executable, "-m", "peft_softmix.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or package_root,
        timeout=300,
    )


def run_in_process(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def loaded(fx) -> PeftModel:
    base = AutoModelForMaskedLM.from_pretrained(str(PROBE))
    return PeftModel.from_pretrained(base, str(fx.adapter)).eval()


# -- the main paths, as subprocesses ---------------------------------------------------------------------------


def test_ask_prints_each_subjects_answers_and_json_matches_query(fx):
    proc = cli("ask", fx.adapter, "Pierre Messmer", "Valeria Bruni Tedeschi", "--top_k", "3")
    assert proc.returncode == 0, proc.stderr
    assert "Pierre Messmer" in proc.stdout and "Valeria Bruni Tedeschi" in proc.stdout
    assert "French" in proc.stdout  # the probe LM knows these two speak French
    assert "template shares (t0, t1" in proc.stdout and "t0: " in proc.stdout  # each template's share, named
    assert "Traceback" not in proc.stderr

    proc = cli("ask", fx.adapter, "Pierre Messmer", "--top_k", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    answers = json.loads(proc.stdout)
    assert [a["subject"] for a in answers] == ["Pierre Messmer"]
    assert answers[0]["adapter"] == "default"
    predictions = answers[0]["predictions"]
    assert len(predictions) == 4
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    model = loaded(fx)
    assert predictions[0]["token_str"] == "French"
    # the same answers as the library's own query, token for token
    batch = model.encode(["Pierre Messmer"])  # no objects: no labels
    with torch.no_grad():
        probs = model(**batch).log_probs[0].exp()
    top = probs.topk(4)
    assert [p["token"] for p in predictions] == top.indices.tolist()
    assert scores == pytest.approx(top.values.tolist(), abs=1e-6)


def test_evaluate_json_agrees_with_the_librarys_evaluation(fx):
    proc = cli("evaluate", fx.adapter, "--facts", fx.facts, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for key in ("p@1", "p@10", "mrr"):
        assert 0.0 <= result[key] <= 1.0
    assert result["read"] == 151
    assert result["left_out"]["object_not_one_token"] == 1  # counted, not silently lost
    assert result["facts"] == 150

    # the library, by hand: every fact through the adapter, the gold object's rank, the fact_retrieval metric
    model = loaded(fx)
    facts, dropped = filter_single_token(load_facts(fx.facts).facts, model.tokenizer)
    assert len(dropped) == 1
    batch = model.encode([f.subject for f in facts], [f.object for f in facts])
    with torch.no_grad():
        log_probs = model(**batch).log_probs
    ranks = rank_of_gold(log_probs, batch["labels"]).tolist()
    expected = load_fact_retrieval().compute(ranks=ranks, relations=["P103"] * len(ranks))["per_relation"]["P103"]
    assert result["p@1"] == pytest.approx(expected["p@1"])
    assert result["p@10"] == pytest.approx(expected["p@10"])
    assert result["mrr"] == pytest.approx(expected["mrr"])


def test_a_bad_line_in_the_facts_file_is_one_error_line_without_traceback(fx, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sub_label": "Dante", "obj_label": "Italian"}\n{"sub_label": "Dante"\n', encoding="utf-8")
    proc = cli("evaluate", fx.adapter, "--facts", bad)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert "Error:" in proc.stderr and f"{bad}, line 2: not valid JSON" in " ".join(proc.stderr.split())


def test_an_unknown_hub_id_offline_is_a_clear_error():
    proc = cli("ask", "someone/no-such-adapter", "Dante")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "someone/no-such-adapter is not a local folder, and as a Hub id" in " ".join(proc.stderr.split())


# -- in-process: the human output and bad input -------------------------------------------------------------------


def test_evaluate_prints_the_scores_and_what_was_left_out(fx):
    result = run_in_process("evaluate", fx.adapter, "--facts", fx.facts, "--batch_size", "32")
    assert result.exit_code == 0, result.output
    assert "P@1" in result.stdout and "MRR" in result.stdout and "150" in result.stdout
    assert "1 (object not one token)" in result.stdout


def test_evaluate_with_a_common_vocabulary_ranks_among_its_words_only(fx, tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("French\nEnglish\nGerman\n", encoding="utf-8")
    result = run_in_process("evaluate", fx.adapter, "--facts", fx.facts, "--common_vocab", vocab, "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["p@10"] == 1.0  # three candidates: every gold object is among the top 10
    assert scores["mrr"] >= 1 / 3
    assert scores["facts"] + scores["left_out"]["object_not_in_common_vocab"] == 150


def test_inspect_reports_weights_nearest_words_and_movement(fx):
    result = run_in_process("inspect", fx.adapter, "--top_n", "3", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [t["template"] for t in report["templates"]] == fx.templates
    assert [t["weight"] for t in report["templates"]] == pytest.approx([0.5, 1 / 3, 1 / 6], abs=1e-6)
    first = report["templates"][0]["words"]
    assert [w["token"] for w in first] == ["speak", "."]
    for word in first:
        assert len(word["nearest"]) == 3
        assert word["nearest"][0][0] == word["token"]  # nudged a little: still nearest its own token
        assert word["moved"] > 0 and word["relative_move"] < 1

    # an untrained adapter has moved nowhere: the distance really is measured from the template token
    base = AutoModelForMaskedLM.from_pretrained(str(PROBE))
    fresh = inspect_adapter(get_peft_model(base, SoftMixtureConfig(templates=fx.templates)), top_n=1)
    assert all(
        w.moved == 0 and w.nearest[0] == (w.token, pytest.approx(1.0)) for t in fresh.templates for w in t.words
    )

    human = run_in_process("inspect", fx.adapter)
    assert human.exit_code == 0, human.output
    assert "Mixture weights" in human.stdout and "0.5000" in human.stdout and "speak" in human.stdout


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda root: root / "nowhere" / "adapter", "does not exist"),
        (lambda root: root / "facts.jsonl", "is a file"),
        (lambda root: root, "holds no adapter_config.json"),
    ],
)
def test_a_missing_or_wrong_adapter_is_a_clear_error(fx, make, expected):
    result = run_in_process("ask", make(fx.root), "Dante")
    assert result.exit_code == 1
    assert expected in result.stderr and "Error:" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_missing_facts_file_and_an_unloadable_base_are_clear_errors(fx, tmp_path):
    result = run_in_process("evaluate", fx.adapter, "--facts", tmp_path / "none.jsonl")
    assert result.exit_code == 1 and "does not exist" in result.stderr

    result = run_in_process("ask", fx.adapter, "Dante", "--base", tmp_path / "no-such-base")
    assert result.exit_code == 1
    assert "Cannot load the base model" in result.stderr and "given with --base" in result.stderr

    # an adapter whose recorded base is gone says so, and how to point at it
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (moved / name).write_bytes((fx.adapter / name).read_bytes())
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    result = run_in_process("ask", moved, "Dante")
    assert result.exit_code == 1 and "Pass --base MODEL" in result.stderr
    assert run_in_process("ask", moved, "Dante", "--base", PROBE, "--json").exit_code == 0


def test_facts_none_of_which_can_be_scored_are_an_error_not_zero_scores(fx, tmp_path):
    facts = tmp_path / "multi.jsonl"
    facts.write_text(json.dumps(MULTI_TOKEN_FACT) + "\n", encoding="utf-8")
    result = run_in_process("evaluate", fx.adapter, "--facts", facts)
    assert result.exit_code == 1
    assert "No fact of" in result.stderr and "1 object not one token" in result.stderr


def test_bad_options_are_usage_errors(fx):
    result = run_in_process("ask", fx.adapter, "Dante", "--top_k", "0")
    assert result.exit_code == 2 and "top_k" in result.output.replace("-", "_")
    assert run_in_process("evaluate", fx.adapter).exit_code == 2  # --facts is required
