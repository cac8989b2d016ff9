"""``examples/train_trex.py`` from the command line, on a tiny random BERT and synthetic facts (offline, CPU).

Every run is a subprocess, as a user runs the script: its outputs, its log, its exit codes and messages. The training
loop itself is the library's and is tested in test_trainer.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import load_script, script_environment, two_process_launch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertTokenizerFast
from trex_fixture import build_fixture, check_two_relation_outputs

import peft_softmix  # noqa: F401
from peft_softmix import PeftModelForSoftMixture

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "train_trex.py"


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> SimpleNamespace:
    return build_fixture(tmp_path_factory.mktemp("trex_fixture"))


def argv(fx, out: Path, *extra: str, relations: str = "P19", model: Path | None = None) -> list[str]:
    return [
        "--model_name_or_path",
        str(model or fx.model_nodrop),
        "--data_dir",
        str(fx.trex),
        "--templates_dir",
        str(fx.root / "templates"),
        "--relations",
        relations,
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        "8",
        "--learning_rate",
        "0.1",
        "--num_train_epochs",
        "2",
        "--patience",
        "5",
        "--templates",
        "mined",  # the fixture's relations have mined templates; an --templates in extra overrides this
        *extra,
    ]


def script(args: list[str], cwd: Path, launcher: list[str] | None = None, **env: str) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable]), str(SCRIPT), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=script_environment(**env), timeout=300, cwd=cwd)


# -- a full run ------------------------------------------------------------------------------------------------


def test_run_writes_results_adapters_and_keeps_best_on_dev(fx, tmp_path):
    out = tmp_path / "out"
    proc = script(argv(fx, out, "--num_train_epochs", "3", relations="P19,P20"), tmp_path)  # 3: patience is 5
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # filtering is reported per relation and split
    assert "P19: 3 of 3 templates from 'mined'" in proc.stdout
    assert "train 40/41 (1 objects not one token)" in proc.stdout
    # one log line per epoch with loss and dev P@1
    assert "P20 epoch 3: train loss" in proc.stderr and "dev P@1" in proc.stderr

    on_disk = json.loads((out / "results.json").read_text())
    check_two_relation_outputs(on_disk, out)
    assert on_disk["rows"]["soft"] == "soft (vectors + weights)"
    assert on_disk["settings"]["learning_rate"] == 0.1 and "hub_token" not in on_disk["settings"]
    overall = on_disk["overall"]["test"]["soft"]
    per_rel = [on_disk["relations"][r]["test"]["soft"]["p@1"] for r in ("P19", "P20")]
    assert overall["macro_p@1"] == pytest.approx(sum(per_rel) / 2)
    assert overall["num_facts"] == 32

    table = (out / "results.md").read_text()
    assert "| P19 | 16 |" in table and "**micro**" in table and "**macro**" in table
    assert "| P19 | 16 |" in proc.stdout  # the test table is printed too
    assert (out / "mixture_weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # each adapter loads with PeftModel.from_pretrained and reproduces the reported test P@1
    from peft import PeftModel

    from peft_softmix.facts import filter_single_token, load_facts

    tokenizer = AutoTokenizer.from_pretrained(str(fx.model))
    for relation in ("P19", "P20"):
        # the base it was trained on: an adapter file names its tokenizer, and another base needs tokenizer=
        base = AutoModelForMaskedLM.from_pretrained(str(fx.model_nodrop))
        model = PeftModel.from_pretrained(base, str(out / relation / "adapter"))
        assert isinstance(model, PeftModelForSoftMixture)
        facts, _ = filter_single_token(load_facts(fx.trex / relation / "test.jsonl").facts, tokenizer)
        batch = model.encode([f.subject for f in facts], [f.object for f in facts])
        with torch.no_grad():
            log_probs = model(**batch).log_probs
        p_at_1 = (log_probs.argmax(-1) == batch["labels"]).float().mean().item()
        assert p_at_1 == pytest.approx(on_disk["relations"][relation]["test"]["soft"]["p@1"])
        assert model.mixture_weights() == pytest.approx(on_disk["relations"][relation]["mixture_weights"])


def test_multi_token_run_ranks_candidates_and_writes_split_metrics(fx, tmp_path):
    from peft import PeftModel

    from peft_softmix.facts import load_facts

    out, folder = tmp_path / "out", tmp_path / "candidates"
    folder.mkdir()
    cities = ["Paris", "Rome", "Milan", "Berlin", "Madrid", "Lisbon"]
    (folder / "P19.txt").write_text("\n".join([*cities, "New York"]) + "\n", encoding="utf-8")
    (folder / "P20.txt").write_text("\n".join(cities) + "\n", encoding="utf-8")  # without the two-token object
    proc = script(argv(fx, out, "--multi_token", "--candidates", str(folder), relations="P19,P20"), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "train 41/41" in proc.stdout and "7 candidate objects (given)" in proc.stdout
    assert "test 17/17 (1 gold objects not among the candidates, ranked last)" in proc.stdout

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["settings"]["multi_token"] is True
    p20 = on_disk["relations"]["P20"]
    assert p20["candidates"] == {"count": 6, "gold_not_a_candidate": {"dev": 1, "test": 1}}
    # the gold that is no candidate is ranked last, after all six: never a hit
    assert p20["by_length"]["test"]["multi_token"]["soft"] == pytest.approx(
        {"p@1": 0.0, "p@10": 1.0, "mrr": 1 / 7, "count": 1}
    )
    for split in ("dev", "test"):
        for group in ("single_token", "multi_token"):
            row = on_disk["by_length"][split][group]["soft"]
            assert row["num_facts"] == {"single_token": 32, "multi_token": 2}[group]
    table = (out / "results.md").read_text()
    assert "Facts whose gold object is one token (single_token)." in table and "| P19 | 1 |" in table
    assert "several tokens (multi_token)" in proc.stdout

    # the saved adapter, scoring the candidates directly, reproduces the reported test scores
    base = AutoModelForMaskedLM.from_pretrained(str(fx.model_nodrop))
    model = PeftModel.from_pretrained(base, str(out / "P19" / "adapter"))
    facts = load_facts(fx.trex / "P19" / "test.jsonl").facts
    candidates = [*cities, "New York"]
    scores = model.score_candidates([f.subject for f in facts], candidates).log_probs
    gold = torch.tensor([candidates.index(f.object) for f in facts])
    ranks = (scores > scores.gather(1, gold[:, None])).sum(1) + 1
    reported = on_disk["relations"]["P19"]["test"]["soft"]
    assert (ranks == 1).float().mean().item() == pytest.approx(reported["p@1"])
    assert (1 / ranks.float()).mean().item() == pytest.approx(reported["mrr"])


def test_preset_paper_sets_the_papers_protocol_and_explicit_flags_win(fx, tmp_path):
    out = tmp_path / "out"
    args = [a for a in argv(fx, out) if a not in ("--learning_rate", "0.1")]
    proc = script([*args, "--preset", "paper", "--num_train_epochs", "1", "--freeze_prompts"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (
        "--preset paper: --mixture_fit em, --learning_rate 0.001, --num_train_epochs 1 (given; preset: 16), "
        "--patience 5 (given; preset: 4)" in proc.stdout
    )
    results = json.loads((out / "results.json").read_text())
    settings = results["settings"]
    assert (settings["mixture_fit"], settings["learning_rate"], settings["num_train_epochs"]) == ("em", 0.001, 1)
    assert settings["preset"] == "paper"
    assert results["rows"]["soft"] == "soft (weights only, EM)"
    assert results["relations"]["P19"]["epochs_run"] == 1


# -- bad input -------------------------------------------------------------------------------------------------


def test_bad_input_exits_early_with_a_message(fx, tmp_path):
    out = tmp_path / "out"

    def fails(args: list[str], code: int = 1) -> str:
        proc = script(args, tmp_path)
        assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert not (out / "results.json").exists()
        return proc.stderr

    message = fails(argv(fx, out) + ["--data_dir", str(tmp_path / "nowhere")])
    assert "error: " in message and "nowhere" in message and "does not exist" in message and "--data_dir" in message

    no_mask = tmp_path / "no_mask_model"
    shutil.copytree(fx.model_nodrop, no_mask)
    vocab = AutoTokenizer.from_pretrained(str(fx.model)).get_vocab()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        (no_mask / name).unlink(missing_ok=True)
    BertTokenizerFast(vocab=vocab, do_lower_case=False, mask_token=None).save_pretrained(no_mask)
    message = fails(argv(fx, out, model=no_mask))
    assert "no mask token" in message and "masked language model" in message
    message = fails(argv(fx, out, "--multi_token", model=no_mask))
    assert "no mask token" in message and "masked language model" in message

    # flags that contradict each other are usage errors (exit code 2), found before anything loads
    message = fails(argv(fx, out, "--freeze_prompts", "--uniform_mixture"), code=2)
    assert "leaves nothing to train" in message
    message = fails(argv(fx, out, "--preset", "paper", "--freeze_weights"), code=2)
    assert "--mixture_fit em (from --preset paper)" in message
    message = fails(argv(fx, out, "--patience", "0"), code=2)
    assert "--patience must be at least 1" in message


def test_early_failures_stop_before_any_training(fx, tmp_path):
    from peft_softmix.output_dir import lock_output_dir

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = script(argv(fx, blocker / "out"), tmp_path)
    assert proc.returncode == 1 and "Cannot write to --output_dir" in proc.stderr, proc.stderr[-2000:]
    assert "epoch 1" not in proc.stderr  # found before the baselines and the first epoch

    proc = script(argv(fx, tmp_path / "fp16", "--mixed_precision", "fp16"), tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "--mixed_precision fp16 is not available on cpu" in proc.stderr

    out = tmp_path / "busy"
    with lock_output_dir(out):  # another run holds the folder
        proc = script(argv(fx, out), tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"--output_dir {out} is in use by another run (process {os.getpid()})" in proc.stderr
    assert not (out / "results.json").exists() and not (out / "P19").exists()


def test_resume_says_what_latest_is_and_names_changed_flags(fx, tmp_path):
    out = tmp_path / "out"
    assert script(argv(fx, out, "--num_train_epochs", "1"), tmp_path).returncode == 0
    proc = script(argv(fx, out, "--resume_from_checkpoint", "latest", "--deep"), tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"P19: --resume_from_checkpoint latest is {out / 'P19' / 'checkpoints' / 'epoch_1'}" in proc.stdout
    assert "--deep: checkpoint False, now True" in proc.stderr
    assert "Traceback" not in proc.stderr  # a message, not a torch error about parameter groups


HUB_WRAPPER = r"""
import json, os, runpy, sys
from types import SimpleNamespace
import huggingface_hub
from huggingface_hub import HfApi, ModelCard

log = open(os.environ["HUB_LOG"], "w")

def create_repo(self, repo_id, **kwargs):
    log.write(json.dumps(["create", repo_id]) + "\n")
    log.flush()
    return SimpleNamespace(repo_id=repo_id)

def create_commit(self, repo_id, operations, **kwargs):
    files = sorted(op.path_in_repo for op in operations)
    log.write(json.dumps(["commit", repo_id, files, kwargs.get("commit_message")]) + "\n")
    log.flush()
    return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}")

def no_network(*args, **kwargs):
    raise AssertionError("the test must not reach the network")

HfApi.create_repo, HfApi.create_commit = create_repo, create_commit
ModelCard.load = classmethod(lambda cls, *a, **k: ModelCard("---\n---\n"))
huggingface_hub.hf_hub_download = no_network
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_push_to_hub_uploads_each_relation_adapter(fx, tmp_path):
    wrapper, log = tmp_path / "hub_wrapper.py", tmp_path / "hub.log"
    wrapper.write_text(HUB_WRAPPER)
    args = argv(fx, tmp_path / "out", "--num_train_epochs", "1", "--push_to_hub", "--hub_model_id", "me/softmix")
    proc = script(
        [a if a != "P19" else "P19,P20" for a in args], tmp_path, launcher=[sys.executable, str(wrapper)],
        HUB_LOG=str(log),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    events = [json.loads(line) for line in log.read_text().splitlines()]
    created = [e[1] for e in events if e[0] == "create"]
    commits = [e[1:] for e in events if e[0] == "commit"]
    assert created == ["me/softmix-P19", "me/softmix-P20"]
    assert [c[0] for c in commits] == created
    for _, files, message in commits:
        assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
        assert "best dev P@1" in message
    assert "pushed the adapter to me/softmix-P20" in proc.stdout


# -- two processes ---------------------------------------------------------------------------------------------

AUDIT_WRAPPER = r"""
import os, runpy, sys
rank = os.environ.get("RANK", "0")
root = os.path.realpath(os.environ["AUDIT_ROOT"])
log = open(os.path.join(os.environ["AUDIT_LOG_DIR"], f"writes.{rank}"), "w")

def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if not isinstance(path, (str, bytes, os.PathLike)):
            return
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        )
    elif event in ("os.rename", "os.replace", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.unlink"):
        path, writes = args[1] if event in ("os.rename", "os.replace") else args[0], True
    else:
        return
    if writes and isinstance(path, (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(path))
        if path.startswith(root):
            log.write(f"{event} {path}\n")
            log.flush()

sys.addaudithook(hook)
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.slow
def test_two_processes_match_one_and_only_the_main_process_writes(fx, tmp_path):
    """DDP on gloo: 2 processes x 4 facts per step vs 1 process x 4 facts x 2 accumulation steps.

    Both average the gradient over the same 8 facts per update (the same batches, as the sampler depends only on
    the seed and epoch), so on a model without dropout the runs agree up to float summation order. Tolerance:
    adapter tensors within 1e-4, dev P@1 within one fact and MRR within 1e-3, hard-template rows exactly equal.
    """
    common = ["--num_train_epochs", "2", "--mixture_fit", "em"]
    single, double = tmp_path / "single", tmp_path / "double"
    alone = script(
        argv(fx, single, *common, "--gradient_accumulation_steps", "2", model=fx.model_nodrop)
        + ["--per_device_train_batch_size", "4"],
        tmp_path,
    )
    assert alone.returncode == 0, alone.stdout[-3000:] + alone.stderr[-3000:]
    one = json.loads((single / "results.json").read_text())

    wrapper = tmp_path / "audit_launch.py"
    wrapper.write_text(AUDIT_WRAPPER)
    env = script_environment(AUDIT_ROOT=str(double), AUDIT_LOG_DIR=str(tmp_path))
    cmd = [
        *two_process_launch(29500),
        str(wrapper),
        str(SCRIPT),
        *argv(fx, double, *common, model=fx.model_nodrop),
        "--per_device_train_batch_size",
        "4",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "Distributed environment: DistributedType.MULTI_CPU" in proc.stderr + proc.stdout
    two = json.loads((double / "results.json").read_text())

    a, b = one["relations"]["P19"], two["relations"]["P19"]
    assert a["dev"]["soft"]["count"] == b["dev"]["soft"]["count"] == 16  # every fact once: no duplicates
    for row in ("hard_first", "hard_mixture"):
        assert a["dev"][row] == b["dev"][row]
    assert abs(a["dev"]["soft"]["p@1"] - b["dev"]["soft"]["p@1"]) <= 1 / 16 + 1e-9
    assert a["dev"]["soft"]["mrr"] == pytest.approx(b["dev"]["soft"]["mrr"], abs=1e-3)
    wa = load_file(single / "P19" / "adapter" / "adapter_model.safetensors")
    wb = load_file(double / "P19" / "adapter" / "adapter_model.safetensors")
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-4), name

    main_writes = (tmp_path / "writes.0").read_text().splitlines()
    other_writes = (tmp_path / "writes.1").read_text().splitlines()
    assert any(line.endswith("results.json") for line in main_writes)  # the audit sees the main process write
    # the only files another process writes are its own RNG state in the checkpoint being staged (Accelerate's
    # save_state design); it also asks for that staging folder to exist
    for line in other_writes:
        event, path = line.split(" ", 1)
        rel = Path(path).relative_to(double.resolve())
        assert rel.parts[:2] == ("P19", "checkpoints") and rel.parts[2].startswith(".epoch_"), line
        assert (event == "os.mkdir" and len(rel.parts) == 3) or rel.name == "random_states_1.pkl", line


def test_multi_token_flags_that_contradict_or_a_bad_candidates_line_are_refused(fx, tmp_path, capsys):
    train_trex = load_script(SCRIPT, "train_trex_flags")
    for extra, expected in (
        (["--multi_token", "--common_vocab"], "with --multi_token give --candidates"),
        (["--candidates", "x.txt"], "--candidates ranks objects of any length"),
        (["--length_normalized"], "--length_normalized ranks candidate objects"),
    ):
        with pytest.raises(SystemExit) as exit_:
            train_trex.parse_args(argv(fx, tmp_path / "out", *extra))
        assert exit_.value.code == 2 and expected in capsys.readouterr().err
    args = train_trex.parse_args(argv(fx, tmp_path / "out", "--multi_token", "--length_normalized"))
    assert args.training.multi_token and args.training.length_normalized and args.multi_token
    assert not train_trex.parse_args(argv(fx, tmp_path / "out")).training.multi_token
    # a candidates line the tokenizer cannot write is named, with the flag to fix
    tokenizer = AutoTokenizer.from_pretrained(str(fx.model))
    candidates = tmp_path / "candidates.txt"
    candidates.write_text("Paris\nRome\nZürich\n", encoding="utf-8")
    with pytest.raises(train_trex.RelationDataError) as err:
        train_trex.relation_candidates(str(candidates), "P19", tokenizer)
    assert f"{candidates}, line 3: 'Zürich'" in str(err.value) and "--candidates" in str(err.value)
    with pytest.raises(train_trex.RelationDataError, match="no file .*P20.txt"):
        train_trex.relation_candidates(str(tmp_path), "P20", tokenizer)


def test_multi_token_evaluation_across_two_processes_ranks_every_fact_once(fx, tmp_path):
    """Candidate ranking gathered from two processes (17 facts in batches of 5: Accelerate repeats some to even
    out the last batch) gives every fact one rank, and the untrained rows the very ranks of one process."""
    common = ["--multi_token", "--num_train_epochs", "1", "--per_device_eval_batch_size", "5"]
    single, double = tmp_path / "single", tmp_path / "double"
    alone = script(argv(fx, single, *common), tmp_path)
    assert alone.returncode == 0, alone.stdout[-3000:] + alone.stderr[-3000:]
    pair = script(argv(fx, double, *common), tmp_path, launcher=two_process_launch(29800))
    assert pair.returncode == 0, pair.stdout[-3000:] + pair.stderr[-6000:]
    a = json.loads((single / "results.json").read_text())["relations"]["P19"]
    b = json.loads((double / "results.json").read_text())["relations"]["P19"]
    for split in ("dev", "test"):
        assert b[split]["soft"]["count"] == 17
        for row in ("hard_first", "hard_mixture"):
            assert a[split][row] == b[split][row]
            assert a["by_length"][split]["multi_token"][row] == b["by_length"][split]["multi_token"][row]
