"""The library's training loop (`peft_softmix.training.train_relation`, `peft_softmix.trainer.RelationTrainer`) on a
tiny random BERT and synthetic facts (offline, CPU): best on dev, resume, frozen parts, EM, NaN stop, bad input.

`examples/train_trex.py` is this loop with flags; its command line is tested in test_train_trex_script.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoTokenizer
from trex_fixture import TEMPLATES, build_fixture, check_two_relation_outputs, write_jsonl

import peft_softmix  # noqa: F401
from peft_softmix import PeftModelForSoftMixture, SoftMixtureConfig
from peft_softmix.checkpoints import STATE_FILE, ResumeError, TrainingState, checkpoint_dir, resume_points
from peft_softmix.relations import (
    RelationDataError,
    candidate_mask,
    drop_long_queries,
    load_relation_data,
    resolve_relations,
)
from peft_softmix.results import results_document, row_labels, write_results
from peft_softmix.trainer import TrainingDiverged
from peft_softmix.training import train_relation, trained_label
from peft_softmix.training_args import PRESETS, TrainingArguments, preset_note

# SoftMixtureConfig fields the runs below vary; they define the run, as the script's flags do
CONFIG_FLAGS = ("deep", "train_prompts", "train_weights")


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> SimpleNamespace:
    return build_fixture(tmp_path_factory.mktemp("trex_fixture"))


@pytest.fixture(autouse=True)
def fresh_accelerate_state(monkeypatch):
    """Each run builds its own Accelerator, as a fresh `accelerate launch` would."""
    from accelerate.state import AcceleratorState, GradientState

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run(
    fx,
    out: Path,
    relations: str = "P19",
    model: Path | None = None,
    num_templates: int = 5,
    resume: str | None = None,
    common_vocab: Path | None = None,
    data_dir: Path | None = None,
    config: dict | None = None,
    **training,
) -> dict:
    """Train ``relations`` with the library as examples/train_trex.py does; returns the results document."""
    model = model or fx.model_nodrop
    data_dir = data_dir or fx.trex
    args = TrainingArguments(
        **{"learning_rate": 0.1, "num_train_epochs": 2, "patience": 5, "per_device_train_batch_size": 8, **training}
    )
    accelerator = Accelerator()
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    base = AutoModelForMaskedLM.from_pretrained(str(model))
    words = candidates = None
    if common_vocab is not None:
        words, candidates, _ = candidate_mask(tokenizer, common_vocab, base.get_input_embeddings().num_embeddings)
    names = resolve_relations(data_dir, relations)
    points, notes = resume_points(resume, out, names)
    print(*notes, sep="\n")
    outcomes, label = [], ""
    for relation in names:
        data = load_relation_data(
            data_dir, relation, tokenizer, "mined", num_templates, fx.root / "templates", common_words=words,
            multi_token=args.multi_token,
        )  # fmt: skip
        set_seed(args.seed)
        adapter = SoftMixtureConfig(templates=data.templates, tokenizer_name_or_path=str(model), **(config or {}))
        peft_model = get_peft_model(base, adapter)
        data, _ = drop_long_queries(peft_model, data)
        outcome = train_relation(
            peft_model,
            data,
            args,
            accelerator,
            candidate_mask=candidates,
            checkpoint_dir=checkpoint_dir(out, relation),
            resume_from=points[relation],
            settings={"num_templates": num_templates, **{k: (config or {}).get(k) for k in CONFIG_FLAGS}},
        )
        outcome.adapter_dir = str(out / relation / "adapter")
        peft_model.save_pretrained(outcome.adapter_dir)
        outcomes.append(outcome)
        label = trained_label(adapter, args)
    results = results_document(outcomes, row_labels("mined", label), {"relations": relations})
    write_results(out, results, "# test run")
    return results


def checkpoint_state(out: Path, relation: str, epoch: int) -> dict:
    state = TrainingState()
    state.load(checkpoint_dir(out, relation) / f"epoch_{epoch}")
    return vars(state)


def initial_adapter(fx, templates: list[str], **config) -> dict[str, torch.Tensor]:
    base = AutoModelForMaskedLM.from_pretrained(str(fx.model))
    model = get_peft_model(
        base, SoftMixtureConfig(templates=templates, tokenizer_name_or_path=str(fx.model), **config)
    )
    return {k: v.detach().clone() for k, v in model.prompt_encoder["default"].state_dict().items()}


# -- arguments -------------------------------------------------------------------------------------------------


def test_training_arguments_check_their_values_and_presets_fill_in_what_is_not_given():
    with pytest.raises(ValueError, match="--patience must be at least 1"):
        TrainingArguments(patience=0)
    with pytest.raises(ValueError, match="--mixture_fit must be 'gradient' or 'em'"):
        TrainingArguments(mixture_fit="adam")
    paper = TrainingArguments.from_preset("paper", learning_rate=None, seed=1)
    assert (paper.mixture_fit, paper.learning_rate, paper.num_train_epochs, paper.patience) == ("em", 1e-3, 16, 4)
    assert paper.seed == 1
    assert TrainingArguments.from_preset("paper", learning_rate=0.05).learning_rate == 0.05  # explicit wins
    assert TrainingArguments.from_preset(None) == TrainingArguments()
    with pytest.raises(ValueError, match="Unknown preset 'fast'"):
        TrainingArguments.from_preset("fast")
    assert preset_note("paper", {"learning_rate": 0.05}) == (
        "--preset paper: --mixture_fit em, --learning_rate 0.05 (given; preset: 0.001), --num_train_epochs 16, "
        "--patience 4"
    )
    assert set(PRESETS["paper"]) <= set(TrainingArguments.__dataclass_fields__)


# -- a full run ------------------------------------------------------------------------------------------------


def test_run_keeps_best_on_dev_and_reports_what_it_wrote(fx, tmp_path, caplog):
    out = tmp_path / "out"
    caplog.set_level("INFO")
    results = run(fx, out, relations="P19,P20", num_train_epochs=3)  # 3: patience is 5
    assert "P20 epoch 3: train loss" in caplog.text and "dev P@1" in caplog.text
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))  # what the call returns is what the file holds
    check_two_relation_outputs(on_disk, out)


def test_resume_continues_to_the_same_result_bitwise(fx, tmp_path):
    # a model with dropout, so that this also checks that the RNG states come back
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(fx, straight, model=fx.model, num_train_epochs=2)
    run(fx, resumed, model=fx.model, num_train_epochs=1)
    first = json.loads((resumed / "results.json").read_text())["relations"]["P19"]["history"]
    assert [h["epoch"] for h in first] == [0, 1]
    run(fx, resumed, model=fx.model, num_train_epochs=2, resume="latest")

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
    with pytest.raises(ResumeError) as err:
        run(fx, resumed, model=fx.model, num_templates=2, resume=epoch_1)
    assert "--num_templates: checkpoint 5, now 2" in str(err.value)
    with pytest.raises(ResumeError, match="no training_state.json"):
        resume_points(str(tmp_path), tmp_path, ["P19"])


def test_resume_may_lower_the_learning_rate(fx, tmp_path, capsys):
    # what the message after a diverged loss suggests: resume from the last good checkpoint with a lower rate
    out = tmp_path / "out"
    run(fx, out, num_train_epochs=1)
    capsys.readouterr()
    run(fx, out, learning_rate=0.0, num_train_epochs=2, resume="latest")
    assert "resuming with changed settings (--learning_rate 0.1 -> 0.0)" in capsys.readouterr().out
    before, after = checkpoint_state(out, "P19", 1)["adapter"], checkpoint_state(out, "P19", 2)["adapter"]
    assert all(torch.equal(before[k], after[k]) for k in before)  # a zero rate: epoch 2 changed nothing


# -- which parts are trained (the slides' table) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "config, training, prompts_move, weights_move",
    [
        ({"train_prompts": False}, {}, False, True),  # adjust mixture weights only
        ({"train_weights": False}, {}, True, False),  # adjust token vectors only
        ({}, {}, True, True),  # adjust both
        ({"train_weights": False}, {"mixture_fit": "em"}, True, True),
        ({"train_weights": False, "train_prompts": False}, {"mixture_fit": "em"}, False, True),  # EM alone
        ({"deep": 1}, {}, True, True),
    ],
)
def test_config_and_arguments_choose_what_is_trained(fx, tmp_path, config, training, prompts_move, weights_move):
    out = tmp_path / "out"
    em_only = training.get("mixture_fit") == "em" and config.get("train_prompts") is False
    run(fx, out, num_train_epochs=1, config=config, **training)
    after = checkpoint_state(out, "P19", 1)["adapter"]
    templates = [t for r, t in TEMPLATES if r == "P19"]
    before = initial_adapter(fx, templates, deep=config.get("deep", False))
    assert torch.equal(after["soft_words"], before["soft_words"]) is not prompts_move
    assert torch.equal(after["mixture_logits"], before["mixture_logits"]) is not weights_move
    weights = torch.softmax(after["mixture_logits"], 0)
    assert weights.sum().item() == pytest.approx(1.0)
    if "deep" in config:
        assert after["deep_offsets"].shape == (1, before["soft_words"].shape[0], 32)
        assert after["deep_offsets"].abs().sum() > 0
    else:
        assert "deep_offsets" not in after
    if em_only:
        # one EM step from the uniform start: the weights become the mean posterior over the training facts
        from peft_softmix.em import em_posteriors
        from peft_softmix.facts import filter_single_token, load_facts

        base = AutoModelForMaskedLM.from_pretrained(str(fx.model_nodrop))
        model = get_peft_model(base, SoftMixtureConfig(templates=templates, tokenizer_name_or_path=str(fx.model)))
        facts, _ = filter_single_token(load_facts(fx.trex / "P19" / "train.jsonl").facts, model.tokenizer)
        batch = model.encode([f.subject for f in facts], [f.object for f in facts])
        with torch.no_grad():
            out_ = model(**batch, return_template_log_probs=True)
        expected = em_posteriors(out_.template_log_probs, out_.log_weights, batch["labels"]).mean(0)
        assert weights.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
        assert max(expected.tolist()) - min(expected.tolist()) > 1e-3  # not trivially uniform


def test_trained_label_names_what_was_trained():
    def label(**kw):
        training = {k: kw.pop(k) for k in ("mixture_fit",) if k in kw}
        return trained_label(SoftMixtureConfig(templates=["[X] in [Y] ."], **kw), TrainingArguments(**training))

    assert label() == "soft (vectors + weights)"
    assert label(train_prompts=False) == "soft (weights only)"
    assert label(train_weights=False) == "soft (token vectors only)"
    assert label(train_weights=False, mixture_fit="em", deep=2, init="random") == (
        "soft (vectors + weights, deep 2, EM, random init)"
    )


def test_common_vocab_restricts_candidates_and_facts(fx, tmp_path):
    vocab = tmp_path / "common.txt"
    vocab.write_text("Paris\nRome\nMilan\nNew York\n")
    results = run(fx, tmp_path / "out", num_train_epochs=1, common_vocab=vocab)
    entry = results["relations"]["P19"]
    # facts with other objects are dropped; the candidates are three tokens, so every gold object is in the top 10
    assert entry["facts"]["test"] < 16
    for row in results["rows"]:
        assert entry["test"][row]["p@10"] == 1.0
        assert entry["test"][row]["mrr"] >= 1 / 3


def test_facts_too_long_for_the_model_are_left_out_and_counted(fx, tmp_path):
    trex = tmp_path / "trex"
    shutil.copytree(fx.trex / "P19", trex / "P19")
    # 60 subject tokens + "[CLS] was born in [MASK] . [SEP]" is over the tiny BERT's 64 positions
    long_fact = {"sub_label": " ".join(["Anna"] * 60), "obj_label": "Paris"}
    for split in ("train", "test"):
        with open(trex / "P19" / f"{split}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(long_fact) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(str(fx.model))
    data = load_relation_data(trex, "P19", tokenizer, "mined", 5, fx.root / "templates")
    base = AutoModelForMaskedLM.from_pretrained(str(fx.model))
    model = get_peft_model(base, SoftMixtureConfig(templates=data.templates, tokenizer_name_or_path=str(fx.model)))
    kept, note = drop_long_queries(model, data)
    assert note is not None and "query longer than the model's 64 tokens: train 1, test 1" in note
    assert {split: len(facts) for split, facts in kept.splits.items()} == {"train": 40, "dev": 16, "test": 16}
    assert run(fx, tmp_path / "out", data_dir=trex, num_train_epochs=1)["relations"]["P19"]["facts"] == {
        "train": 40,
        "dev": 16,
        "test": 16,
    }


# -- bad input -------------------------------------------------------------------------------------------------


def test_bad_input_is_refused_with_a_message_that_names_the_fix(fx, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(fx.model))

    def fails(call) -> str:
        with pytest.raises(RelationDataError) as err:
            call()
        return str(err.value)

    message = fails(lambda: resolve_relations(tmp_path / "nowhere"))
    assert "nowhere" in message and "does not exist" in message and "--data_dir" in message
    message = fails(lambda: resolve_relations(fx.trex, "P19,P999"))
    assert "P999" in message and "P19, P20" in message and "--relations" in message

    only_p20 = tmp_path / "p20_templates.jsonl"
    write_jsonl(only_p20, [{"relation": "P20", "template": "[X] died in [Y] ."}])
    message = fails(lambda: load_relation_data(fx.trex, "P19", tokenizer, str(only_p20), 5))
    assert "no templates for relation 'P19'" in message and "--templates" in message

    empty = tmp_path / "empty_data"
    for split in ("train", "dev", "test"):
        write_jsonl(empty / "P19" / f"{split}.jsonl", [{"sub_label": "Anna", "obj_label": "New York"}])
    message = fails(lambda: load_relation_data(empty, "P19", tokenizer, "mined", 5, fx.root / "templates"))
    assert "P19" in message and "empty after filtering" in message and "not one token" in message

    nothing = tmp_path / "nothing.txt"
    nothing.write_text("Zürich\n")
    message = fails(lambda: candidate_mask(tokenizer, nothing, len(tokenizer)))
    assert "No word of" in message and "--common_vocab" in message


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
    with pytest.raises(TrainingDiverged) as err:
        run(fx, out, num_train_epochs=3)
    message = str(err.value)
    assert "P19" in message and "epoch 2, step 2" in message and "nan" in message
    assert str(out / "P19" / "checkpoints" / "epoch_1") in message
    assert (out / "P19" / "checkpoints" / "epoch_1" / STATE_FILE).is_file()
    assert not (out / "P19" / "checkpoints" / "epoch_2").exists()
    assert torch.isfinite(checkpoint_state(out, "P19", 1)["adapter"]["soft_words"]).all()


# -- resume integrity (issue 20) -------------------------------------------------------------------------------


def test_resume_with_other_parameter_shaping_settings_or_data_names_each_difference_first(fx, tmp_path):
    out = tmp_path / "out"
    run(fx, out, num_train_epochs=1)
    # a deep adapter has another parameter group: without the fingerprint this failed inside torch's optimizer
    with pytest.raises(ResumeError) as err:
        run(fx, out, num_train_epochs=2, resume="latest", config={"deep": 1})
    assert "--deep: checkpoint None, now 1" in str(err.value)
    assert "parameter group" not in str(err.value)
    with pytest.raises(ResumeError, match="--train_prompts: checkpoint None, now False"):
        run(fx, out, num_train_epochs=2, resume="latest", config={"train_prompts": False})
    # other facts (another --data_dir): the hash of each split's facts differs
    other = tmp_path / "trex"
    shutil.copytree(fx.trex, other)
    lines = (other / "P19" / "train.jsonl").read_text().splitlines()
    (other / "P19" / "train.jsonl").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(ResumeError) as err:
        run(fx, out, num_train_epochs=2, resume="latest", data_dir=other)
    assert "facts:train: checkpoint '40 facts" in str(err.value) and "now '39 facts" in str(err.value)
    assert "facts:dev" not in str(err.value)


def test_a_broken_checkpoint_file_is_named_and_latest_falls_back_to_the_previous_epoch(fx, tmp_path, capsys):
    straight, out = tmp_path / "straight", tmp_path / "out"
    run(fx, straight, model=fx.model, num_train_epochs=2)
    run(fx, out, model=fx.model, num_train_epochs=2)
    broken = out / "P19" / "checkpoints" / "epoch_2" / "optimizer.bin"
    broken.write_bytes(broken.read_bytes()[:100])  # truncated, as by a full disk
    with pytest.raises(ResumeError) as err:
        resume_points(str(broken.parent), out, ["P19"])
    assert str(broken) in str(err.value) and "cannot be read" in str(err.value)

    capsys.readouterr()
    run(fx, out, model=fx.model, num_train_epochs=2, resume="latest")
    printed = capsys.readouterr().out
    assert f"{broken} cannot be read" in printed and "Falling back to the previous epoch" in printed
    assert f"latest is {out / 'P19' / 'checkpoints' / 'epoch_1'}" in printed
    # epoch 2 was trained again from epoch 1: the same adapter as the uninterrupted run
    a = load_file(straight / "P19" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "P19" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # a truncated random state is named too (it used to be skipped silently, breaking the bitwise resume)
    rng = out / "P19" / "checkpoints" / "epoch_2" / "random_states_0.pkl"
    rng.write_bytes(rng.read_bytes()[:50])
    points, notes = resume_points("latest", out, ["P19"])
    assert points["P19"] == out / "P19" / "checkpoints" / "epoch_1"
    assert any(str(rng) in note for note in notes)


def test_latest_ignores_an_earlier_runs_checkpoints_and_says_when_there_is_none(fx, tmp_path):
    out = tmp_path / "out"
    points, notes = resume_points("latest", out, ["P19"])
    assert points == {"P19": None}
    root = out / "P19" / "checkpoints"
    assert notes == [
        f"P19: --resume_from_checkpoint latest: no checkpoint of the last run in {root}; this relation starts afresh."
    ]
    run(fx, out, num_train_epochs=3)  # an earlier run: epochs 1-3
    run(fx, out, num_train_epochs=1)  # a fresh run into the same folder: only its epoch 1 is its own
    points, notes = resume_points("latest", out, ["P19"])
    assert points["P19"] == out / "P19" / "checkpoints" / "epoch_1"
    assert notes == [f"P19: --resume_from_checkpoint latest is {points['P19']}"]


def test_checkpoints_hold_no_pickles_of_ours(fx, tmp_path):
    out = tmp_path / "out"
    run(fx, out, num_train_epochs=1)
    files = {p.name for p in (out / "P19" / "checkpoints" / "epoch_1").iterdir()}
    # ours as JSON and safetensors; Accelerate's optimizer and random states are its own format
    assert {"training_state.json", "adapter_state.safetensors", "fingerprint.json"} <= files
    assert not any(name.startswith("custom_checkpoint") for name in files)
    state = json.loads((out / "P19" / "checkpoints" / "epoch_1" / "training_state.json").read_text())
    assert state["relation"] == "P19" and state["epoch"] == 1 and len(state["history"]) == 2


def test_max_train_samples_reports_the_facts_really_kept(fx):
    tokenizer = AutoTokenizer.from_pretrained(str(fx.model))
    data = load_relation_data(
        fx.trex, "P19", tokenizer, "mined", 5, fx.root / "templates", max_train_samples=10, max_eval_samples=4
    )
    assert len(data.splits["train"]) == 10
    assert "train 10/41 (1 objects not one token) (30 beyond --max_train_samples 10)" in data.notes
    assert "dev 4/17 (1 objects not one token) (12 beyond --max_eval_samples 4)" in data.notes


def test_subjects_the_tokenizer_reads_as_unknown_only_are_left_out_and_counted(fx, tmp_path):
    trex = tmp_path / "trex"
    shutil.copytree(fx.trex / "P19", trex / "P19")
    with open(trex / "P19" / "test.jsonl", "a", encoding="utf-8") as f:
        for subject in ("\U0001f600", "\u00e9\u00e9\u00e9"):  # no piece of either is in the tiny vocabulary
            f.write(json.dumps({"sub_label": subject, "obj_label": "Paris"}) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(str(fx.model))
    before = load_relation_data(fx.trex, "P19", tokenizer, "mined", 5, fx.root / "templates")
    data = load_relation_data(trex, "P19", tokenizer, "mined", 5, fx.root / "templates")
    assert data.splits["test"] == before.splits["test"]  # both left out, nothing else
    assert "2 subjects only unknown tokens, e.g. '\U0001f600'" in data.notes
    assert "unknown tokens" not in before.notes


def test_mixed_precision_that_would_silently_run_in_fp32_is_refused():
    from peft_softmix.trainer import TrainingSetupError, check_mixed_precision

    cpu_fp16 = SimpleNamespace(mixed_precision="fp16", native_amp=False, device=torch.device("cpu"))
    with pytest.raises(TrainingSetupError, match="--mixed_precision fp16 is not available on cpu"):
        check_mixed_precision(cpu_fp16)
    check_mixed_precision(SimpleNamespace(mixed_precision="bf16", native_amp=True, device=torch.device("cpu")))
    check_mixed_precision(SimpleNamespace(mixed_precision="no", native_amp=False, device=torch.device("cpu")))


def test_an_output_folder_is_held_by_one_run_and_must_be_writable(tmp_path):
    from peft_softmix.output_dir import OutputDirError, lock_output_dir

    out = tmp_path / "out"
    held = pytest.raises(OutputDirError, match=rf"in use by another run \(process {os.getpid()}\)")
    with lock_output_dir(out), held, lock_output_dir(out):
        pass
    with lock_output_dir(out):  # released when the first run ends
        pass
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OutputDirError, match="Cannot write to --output_dir"), lock_output_dir(blocker / "out"):
        pass


# -- the multi-token setting (#17) -----------------------------------------------------------------------------


def test_multi_token_run_trains_on_all_facts_and_scores_them_by_length(fx, tmp_path):
    results = run(fx, tmp_path / "out", relations="P19,P20", multi_token=True)
    for relation in ("P19", "P20"):
        entry = results["relations"][relation]
        assert entry["facts"] == {"train": 41, "dev": 17, "test": 17}  # "New York" (two tokens) is kept
        assert entry["candidates"] == {"count": 7, "gold_not_a_candidate": {"dev": 0, "test": 0}}  # 6 cities + it
        for split in ("dev", "test"):
            by_length = entry["by_length"][split]
            for row in results["rows"]:
                single, multi, whole = by_length["single_token"][row], by_length["multi_token"][row], entry[split][row]
                assert (single["count"], multi["count"], whole["count"]) == (16, 1, 17)
                for key in ("p@1", "mrr"):
                    assert single[key] * 16 + multi[key] == pytest.approx(whole[key] * 17)
        # early stopping follows dev P@1 of candidate ranking: the kept epoch is the best of the history
        best = max(entry["history"], key=lambda h: h["dev_p@1"])
        assert entry["dev"]["soft"]["p@1"] == pytest.approx(best["dev_p@1"])
    overall = results["by_length"]["test"]["multi_token"]["soft"]
    assert overall["num_facts"] == 2
    text = (tmp_path / "out" / "results.md").read_text()
    assert "Facts whose gold object is several tokens (multi_token)." in text


def test_em_on_whole_objects_sets_the_weights_to_the_mean_posterior(fx, tmp_path):
    from peft_softmix.em import em_object_posteriors
    from peft_softmix.facts import load_facts

    out = tmp_path / "out"
    run(fx, out, num_train_epochs=1, multi_token=True, mixture_fit="em",
        config={"train_weights": False, "train_prompts": False})  # fmt: skip
    weights = torch.softmax(checkpoint_state(out, "P19", 1)["adapter"]["mixture_logits"], 0)
    templates = [t for r, t in TEMPLATES if r == "P19"]
    base = AutoModelForMaskedLM.from_pretrained(str(fx.model_nodrop))
    model = get_peft_model(base, SoftMixtureConfig(templates=templates, tokenizer_name_or_path=str(fx.model)))
    facts = load_facts(fx.trex / "P19" / "train.jsonl").facts
    batch = model.encode([f.subject for f in facts], [f.object for f in facts], multi_token=True)
    assert (batch["labels"] != -100).sum(1).max() == 2  # the two-token object is among them
    with torch.no_grad():
        out_ = model(**batch)
    expected = em_object_posteriors(out_.template_object_log_probs, out_.log_weights, batch["labels"]).mean(0)
    assert weights.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert max(expected.tolist()) - min(expected.tolist()) > 1e-3  # not trivially uniform


def test_resume_refuses_a_switched_multi_token_setting(fx, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    run(fx, single, num_train_epochs=1)
    with pytest.raises(ResumeError, match="--multi_token: checkpoint False, now True"):
        run(fx, single, num_train_epochs=2, resume="latest", multi_token=True)
    run(fx, multi, num_train_epochs=1, multi_token=True)
    with pytest.raises(ResumeError, match="--multi_token: checkpoint True, now False"):
        run(fx, multi, num_train_epochs=2, resume="latest")
    with pytest.raises(ResumeError, match="--length_normalized: checkpoint False, now True"):
        run(fx, multi, num_train_epochs=2, resume="latest", multi_token=True, length_normalized=True)
    # a checkpoint of an earlier version, which did not record the setting, resumes in the single-token setting
    epoch = checkpoint_dir(single, "P19") / "epoch_1"
    for name in ("fingerprint.json", STATE_FILE):
        saved = json.loads((epoch / name).read_text())
        where = saved["settings"]
        for key in ("multi_token", "length_normalized"):
            del where[key]
        (epoch / name).write_text(json.dumps(saved))
    resumed = run(fx, single, num_train_epochs=2, resume="latest")
    assert resumed["relations"]["P19"]["epochs_run"] == 2


def test_multi_token_leaves_out_objects_too_long_for_the_model_and_names_empty_lines(fx, tmp_path):
    trex = tmp_path / "trex"
    shutil.copytree(fx.trex / "P19", trex / "P19")
    # 60 object tokens fill [Y] with 60 masks: over the tiny BERT's 64 positions with any template
    with open(trex / "P19" / "train.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"sub_label": "Bruno", "obj_label": " ".join(["York"] * 60)}) + "\n")
        f.write(json.dumps({"sub_label": "Carla", "obj_label": " "}) + "\n")  # line 43: an empty object
    tokenizer = AutoTokenizer.from_pretrained(str(fx.model))
    data = load_relation_data(trex, "P19", tokenizer, "mined", 5, fx.root / "templates", multi_token=True)
    assert "1 empty subjects or objects, train.jsonl line 43" in data.notes
    # every dev and test fact is scored against every candidate, the 60-token one too: only train keeps its facts
    with_long = data.candidates
    assert len(with_long) == 8
    base = AutoModelForMaskedLM.from_pretrained(str(fx.model))
    model = get_peft_model(base, SoftMixtureConfig(templates=data.templates, tokenizer_name_or_path=str(fx.model)))
    with pytest.raises(RelationDataError, match="every dev fact has a query longer than the model's 64 tokens") as err:
        drop_long_queries(model, data)
    assert "longest candidate (60 tokens). Give --candidates without objects that long" in str(err.value)
    data.candidates = [c for c in with_long if len(c) < 100]
    kept, note = drop_long_queries(model, data)
    assert (
        note is not None and "query with one mask per object token longer than the model's 64 tokens: train 1" in note
    )
    assert {split: len(facts) for split, facts in kept.splits.items()} == {"train": 41, "dev": 17, "test": 17}
