"""End-to-end tests of ``examples/train_trex.py`` on a tiny random BERT and synthetic facts (offline, CPU).

The script runs in-process through ``main(argv)``; only the two-process (DDP over gloo) run is a subprocess.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import load_script, save_tiny_bert, two_process_launch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertTokenizerFast

import peft_softmix  # noqa: F401
from peft_softmix import PeftModelForSoftMixture

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "train_trex.py"

SUBJECTS = ["Anna", "Bruno", "Carla", "Dario", "Elena", "Fabio", "Gina", "Hugo", "Ivo", "Lara", "Marco", "Nina"]
CITIES = ["Paris", "Rome", "Milan", "Berlin", "Madrid", "Lisbon"]
WORDS = ["was", "born", "in", "is", "from", "comes", "died", "lived", "the", "city", "of", ".", ",", "New", "York"]
TEMPLATES = [
    ("P19", "[X] was born in [Y] ."),
    ("P19", "[X] is from [Y] ."),
    ("P19", "[X] comes from the city of [Y] ."),
    ("P20", "[X] died in [Y] ."),
    ("P20", "[X] lived in [Y] ."),
]


train_trex = load_script(SCRIPT)


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> SimpleNamespace:
    return build_fixture(tmp_path_factory.mktemp("trex_fixture"))


def build_fixture(root: Path) -> SimpleNamespace:
    """Tiny BERTs (with and without dropout), two relations of skewed synthetic facts, and template files.

    Each split has one fact whose object ("New York") is two tokens, so filtering has something to count. Objects
    are "Paris" 60 % of the time: a prompt can learn that, so training has something to find.
    """
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *SUBJECTS, *CITIES]
    save_tiny_bert(root / "model", vocab, dropout=0.1)
    save_tiny_bert(root / "model_nodrop", vocab, dropout=0.0)
    rng = random.Random(0)
    # distinct subjects of one or two tokens (a repeated fact would be dropped by the loader)
    pool = SUBJECTS + [f"{a} {b}" for a in SUBJECTS for b in SUBJECTS if a != b]
    for relation in ("P19", "P20"):
        subjects = iter(rng.sample(pool, 72))
        for split, n in (("train", 40), ("dev", 16), ("test", 16)):
            records = []
            for _ in range(n):
                subject = next(subjects)
                obj = "Paris" if rng.random() < 0.6 else rng.choice(CITIES)
                records.append({"sub_label": subject, "obj_label": obj, "predicate_id": relation})
            records.append({"sub_label": "Anna", "obj_label": "New York"})
            write_jsonl(root / "trex" / relation / f"{split}.jsonl", records)
    write_jsonl(root / "templates" / "lpaqa_mined.jsonl", [{"relation": r, "template": t} for r, t in TEMPLATES])
    write_jsonl(root / "templates" / "lama.jsonl", [{"relation": r, "template": t} for r, t in TEMPLATES[::3]])
    return SimpleNamespace(root=root, model=root / "model", model_nodrop=root / "model_nodrop", trex=root / "trex")


@pytest.fixture(autouse=True)
def fresh_accelerate_state(monkeypatch):
    """Each in-process run builds its own Accelerator, as a fresh `accelerate launch` would."""
    from accelerate.state import AcceleratorState, GradientState

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


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


def checkpoint_state(out: Path, relation: str, epoch: int) -> dict:
    path = out / relation / "checkpoints" / f"epoch_{epoch}" / "custom_checkpoint_0.pkl"
    return torch.load(path, weights_only=False)


def initial_adapter(fx, templates: list[str], **config) -> dict[str, torch.Tensor]:
    from peft import get_peft_model

    from peft_softmix import SoftMixtureConfig

    base = AutoModelForMaskedLM.from_pretrained(str(fx.model))
    model = get_peft_model(
        base, SoftMixtureConfig(templates=templates, tokenizer_name_or_path=str(fx.model), **config)
    )
    return {k: v.detach().clone() for k, v in model.prompt_encoder["default"].state_dict().items()}


# -- a full run ------------------------------------------------------------------------------------------------


def test_run_writes_results_adapters_and_keeps_best_on_dev(fx, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    caplog.set_level("INFO")
    results = train_trex.main(argv(fx, out, "--num_train_epochs", "3", relations="P19,P20"))  # 3: patience is 5
    printed = capsys.readouterr().out

    # filtering is reported per relation and split
    assert "P19: 3 of 3 templates from 'mined'" in printed
    assert "train 40/41 (1 objects not one token)" in printed
    # one log line per epoch with loss and dev P@1
    assert "P20 epoch 3: train loss" in caplog.text and "dev P@1" in caplog.text

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["rows"] == results["rows"]
    assert list(on_disk["rows"]) == ["hard_first", "hard_mixture", "soft"]
    for relation in ("P19", "P20"):
        entry = on_disk["relations"][relation]
        assert entry["facts"] == {"train": 40, "dev": 16, "test": 16}
        history = entry["history"]
        assert [h["epoch"] for h in history] == [0, 1, 2, 3]
        # the kept state is the best on dev, and its dev P@1 is what the metric reports for the soft row
        best = max(history, key=lambda h: h["dev_p@1"])
        assert entry["best_epoch"] == best["epoch"]
        assert entry["dev"]["soft"]["p@1"] == pytest.approx(best["dev_p@1"])
        # the hard single-template row is template 1's own column of the per-template scores
        assert entry["test"]["hard_first"]["p@1"] == pytest.approx(entry["test_hard_template_p@1"][0])
        # training lowers the dev loss of the frozen model's answers
        assert min(h["dev_loss"] for h in history[1:]) < history[0]["dev_loss"]
        assert (out / relation / "checkpoints" / "epoch_3").is_dir()
        assert not list((out / relation / "checkpoints").glob(".epoch_*"))  # no staging folder left behind
    overall = on_disk["overall"]["test"]["soft"]
    per_rel = [on_disk["relations"][r]["test"]["soft"]["p@1"] for r in ("P19", "P20")]
    assert overall["macro_p@1"] == pytest.approx(sum(per_rel) / 2)
    assert overall["num_facts"] == 32

    table = (out / "results.md").read_text()
    assert "| P19 | 16 |" in table and "**micro**" in table and "**macro**" in table
    assert (out / "mixture_weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # each adapter loads with PeftModel.from_pretrained and reproduces the reported test P@1
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(str(fx.model))
    from peft_softmix.facts import filter_single_token, load_facts

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


def test_resume_continues_to_the_same_result_bitwise(fx, tmp_path):
    # a model with dropout, so that this also checks that the RNG states come back
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_trex.main(argv(fx, straight, "--num_train_epochs", "2", model=fx.model))
    train_trex.main(argv(fx, resumed, "--num_train_epochs", "1", model=fx.model))
    first = json.loads((resumed / "results.json").read_text())["relations"]["P19"]["history"]
    assert [h["epoch"] for h in first] == [0, 1]
    train_trex.main(argv(fx, resumed, "--num_train_epochs", "2", "--resume_from_checkpoint", "latest", model=fx.model))

    a = load_file(straight / "P19" / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "P19" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    state_a, state_b = checkpoint_state(straight, "P19", 2), checkpoint_state(resumed, "P19", 2)
    assert all(torch.equal(state_a["adapter"][k], state_b["adapter"][k]) for k in state_a["adapter"])
    hist_a = json.loads((straight / "results.json").read_text())["relations"]["P19"]["history"]
    hist_b = json.loads((resumed / "results.json").read_text())["relations"]["P19"]["history"]
    assert hist_a[1:] == hist_b[1:]

    # an explicit checkpoint path works too; settings that change the adapter's shape or data are refused
    epoch_1 = str(resumed / "P19" / "checkpoints" / "epoch_1")
    with pytest.raises(SystemExit) as err:
        train_trex.main(argv(fx, resumed, "--num_templates", "2", "--resume_from_checkpoint", epoch_1, model=fx.model))
    assert "--num_templates: checkpoint 5, now 2" in str(err.value)


def test_resume_may_lower_the_learning_rate(fx, tmp_path, capsys):
    # what the message after a diverged loss suggests: resume from the last good checkpoint with a lower rate
    out = tmp_path / "out"
    train_trex.main(argv(fx, out, "--num_train_epochs", "1"))
    capsys.readouterr()
    train_trex.main(
        argv(fx, out, "--learning_rate", "0", "--num_train_epochs", "2", "--resume_from_checkpoint", "latest")
    )
    assert "resuming with changed settings (--learning_rate 0.1 -> 0.0)" in capsys.readouterr().out
    before, after = checkpoint_state(out, "P19", 1)["adapter"], checkpoint_state(out, "P19", 2)["adapter"]
    assert all(torch.equal(before[k], after[k]) for k in before)  # a zero rate: epoch 2 changed nothing


# -- which parts are trained (the slides' table) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, prompts_move, weights_move",
    [
        (["--freeze_prompts"], False, True),  # adjust mixture weights only
        (["--uniform_mixture"], True, False),  # adjust token vectors only
        ([], True, True),  # adjust both
        (["--mixture_fit", "em"], True, True),
        (["--mixture_fit", "em", "--freeze_prompts"], False, True),  # EM alone: no gradient at all
        (["--deep_layers", "1"], True, True),
    ],
)
def test_flags_choose_what_is_trained(fx, tmp_path, flags, prompts_move, weights_move):
    out = tmp_path / "out"
    em_only = "em" in flags and "--freeze_prompts" in flags
    train_trex.main(argv(fx, out, "--num_train_epochs", "1", *flags))
    after = checkpoint_state(out, "P19", 1)["adapter"]
    templates = [t for r, t in TEMPLATES if r == "P19"]
    before = initial_adapter(fx, templates, deep=1 if "--deep_layers" in flags else False)
    assert torch.equal(after["soft_words"], before["soft_words"]) is not prompts_move
    assert torch.equal(after["mixture_logits"], before["mixture_logits"]) is not weights_move
    weights = torch.softmax(after["mixture_logits"], 0)
    assert weights.sum().item() == pytest.approx(1.0)
    if "--deep_layers" in flags:
        assert after["deep_offsets"].shape == (1, before["soft_words"].shape[0], 32)
        assert after["deep_offsets"].abs().sum() > 0
    else:
        assert "deep_offsets" not in after
    if em_only:
        # one EM step from the uniform start: the weights become the mean posterior over the training facts
        from peft import get_peft_model

        from peft_softmix import SoftMixtureConfig
        from peft_softmix.facts import filter_single_token, load_facts
        from peft_softmix.training import em_posteriors

        base = AutoModelForMaskedLM.from_pretrained(str(fx.model_nodrop))
        model = get_peft_model(base, SoftMixtureConfig(templates=templates, tokenizer_name_or_path=str(fx.model)))
        facts, _ = filter_single_token(load_facts(fx.trex / "P19" / "train.jsonl").facts, model.tokenizer)
        batch = model.encode([f.subject for f in facts], [f.object for f in facts])
        with torch.no_grad():
            out_ = model(**batch, return_template_log_probs=True)
        expected = em_posteriors(out_.template_log_probs, out_.log_weights, batch["labels"]).mean(0)
        assert weights.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
        assert max(expected.tolist()) - min(expected.tolist()) > 1e-3  # not trivially uniform


def test_common_vocab_restricts_candidates_and_facts(fx, tmp_path):
    vocab = tmp_path / "common.txt"
    vocab.write_text("Paris\nRome\nMilan\nNew York\n")
    out = tmp_path / "out"
    results = train_trex.main(argv(fx, out, "--num_train_epochs", "1", "--common_vocab", str(vocab)))
    entry = results["relations"]["P19"]
    # facts with other objects are dropped; the candidates are three tokens, so every gold object is in the top 10
    assert entry["facts"]["test"] < 16
    for row in results["rows"]:
        assert entry["test"][row]["p@10"] == 1.0
        assert entry["test"][row]["mrr"] >= 1 / 3


def test_facts_too_long_for_the_model_are_left_out_and_counted(fx, tmp_path, capsys):
    trex = tmp_path / "trex"
    shutil.copytree(fx.trex / "P19", trex / "P19")
    # 60 subject tokens + "[CLS] was born in [MASK] . [SEP]" is over the tiny BERT's 64 positions
    long_fact = {"sub_label": " ".join(["Anna"] * 60), "obj_label": "Paris"}
    for split in ("train", "test"):
        with open(trex / "P19" / f"{split}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(long_fact) + "\n")
    args = argv(fx, tmp_path / "out", "--num_train_epochs", "1", "--data_dir", str(trex))
    results = train_trex.main(args)
    assert "query longer than the model's 64 tokens: train 1, test 1" in capsys.readouterr().out
    assert results["relations"]["P19"]["facts"] == {"train": 40, "dev": 16, "test": 16}


# -- bad input -------------------------------------------------------------------------------------------------


def test_bad_input_stops_early_with_a_message(fx, tmp_path):
    out = tmp_path / "out"

    def fails(args: list[str]) -> str:
        with pytest.raises(SystemExit) as err:
            train_trex.main(args)
        assert not (out / "results.json").exists()
        return str(err.value.code)

    message = fails(argv(fx, out) + ["--data_dir", str(tmp_path / "nowhere")])
    assert "nowhere" in message and "does not exist" in message and "--data_dir" in message

    message = fails(argv(fx, out, relations="P19,P999"))
    assert "P999" in message and "P19, P20" in message and "--relations" in message

    only_p20 = tmp_path / "p20_templates.jsonl"
    write_jsonl(only_p20, [{"relation": "P20", "template": "[X] died in [Y] ."}])
    message = fails(argv(fx, out, "--templates", str(only_p20)))
    assert "no templates for relation 'P19'" in message and "--templates" in message

    empty = tmp_path / "empty_data"
    for split in ("train", "dev", "test"):
        write_jsonl(empty / "P19" / f"{split}.jsonl", [{"sub_label": "Anna", "obj_label": "New York"}])
    message = fails(argv(fx, out) + ["--data_dir", str(empty)])
    assert "P19" in message and "empty after filtering" in message and "not one token" in message

    no_mask = tmp_path / "no_mask_model"
    shutil.copytree(fx.model_nodrop, no_mask)
    vocab = AutoTokenizer.from_pretrained(str(fx.model)).get_vocab()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        (no_mask / name).unlink(missing_ok=True)
    BertTokenizerFast(vocab=vocab, do_lower_case=False, mask_token=None).save_pretrained(no_mask)
    message = fails(argv(fx, out, model=no_mask))
    assert "no mask token" in message and "masked language model" in message


def test_nan_loss_stops_with_relation_and_step_and_keeps_last_checkpoint(fx, tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = PeftModelForSoftMixture.forward

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 7:  # epoch 2 (5 steps per epoch), step 2
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(PeftModelForSoftMixture, "forward", poisoned)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        train_trex.main(argv(fx, out, "--num_train_epochs", "3"))
    message = str(err.value.code)
    assert "P19" in message and "epoch 2, step 2" in message and "nan" in message
    assert str(out / "P19" / "checkpoints" / "epoch_1") in message
    assert (out / "P19" / "checkpoints" / "epoch_1" / "custom_checkpoint_0.pkl").is_file()
    assert not (out / "P19" / "checkpoints" / "epoch_2").exists()
    assert torch.isfinite(checkpoint_state(out, "P19", 1)["adapter"]["soft_words"]).all()


def test_push_to_hub_uploads_each_relation_adapter(fx, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import HfApi, ModelCard

    created, commits = [], []

    def create_repo(self, repo_id, **kwargs):
        created.append(repo_id)
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        commits.append((repo_id, sorted(op.path_in_repo for op in operations), kwargs.get("commit_message")))
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}")

    def no_network(*args, **kwargs):
        raise AssertionError("the test must not reach the network")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(ModelCard, "load", classmethod(lambda cls, *a, **k: ModelCard("---\n---\n")))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    out = tmp_path / "out"
    train_trex.main(
        argv(fx, out, "--num_train_epochs", "1", "--push_to_hub", "--hub_model_id", "me/softmix", relations="P19,P20")
    )
    assert created == ["me/softmix-P19", "me/softmix-P20"]
    assert [c[0] for c in commits] == created
    for _, files, message in commits:
        assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
        assert "best dev P@1" in message


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
    one = train_trex.main(
        argv(fx, single, *common, "--gradient_accumulation_steps", "2", model=fx.model_nodrop)
        + ["--per_device_train_batch_size", "4"]
    )

    wrapper = tmp_path / "audit_launch.py"
    wrapper.write_text(AUDIT_WRAPPER)
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "AUDIT_ROOT": str(double),
        "AUDIT_LOG_DIR": str(tmp_path),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
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
