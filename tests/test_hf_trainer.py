"""`transformers.Trainer` with peft_softmix.hf_trainer: the collator, the rows that survive the default column
removal, and fact-retrieval metrics that pick the best checkpoint."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from peft_softmix import SoftMixtureConfig
from peft_softmix.facts import Fact
from peft_softmix.hf_trainer import FactRetrievalMetrics, FactRows, SoftMixtureDataCollator
from peft_softmix.metrics import rank_of_gold

TEMPLATES = ["[X] was born in [Y] .", "[X] is from [Y] ."]
PAIRS = [("Dante", "Florence"), ("Ali", "Paris"), ("Bo", "Rome"), ("Cy", "Milan"), ("Ed", "Berlin"), ("Flo", "Madrid")]


@pytest.fixture
def model(base):
    return get_peft_model(base, SoftMixtureConfig(templates=TEMPLATES))


@pytest.fixture
def table() -> Dataset:
    return Dataset.from_list([{"subject": s, "object": o, "note": "x"} for s, o in PAIRS * 4])


def test_trainer_with_default_arguments_computes_the_metric_and_loads_the_best_model(model, table, tmp_path):
    metrics = FactRetrievalMetrics()
    seen: list[float] = []

    def compute_metrics(prediction):
        scores = metrics.compute_metrics(prediction)
        seen.append(scores["p@1"])
        return scores

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        num_train_epochs=3,
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model="p@1",
        per_device_train_batch_size=4,
        learning_rate=0.1,
        report_to=[],
        use_cpu=True,
    )
    assert args.remove_unused_columns  # the default, which would drop the subject and object columns
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=FactRows(table),
        eval_dataset=FactRows(table),
        data_collator=SoftMixtureDataCollator(model),
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=metrics.preprocess_logits_for_metrics,
    )
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_p@1" in entry]
    assert [entry["eval_p@1"] for entry in evals] == pytest.approx(seen[:3])
    assert all(entry["eval_facts"] == len(table) for entry in evals)
    assert all(0 <= entry["eval_mrr"] <= 1 and entry["eval_p@1"] <= entry["eval_p@10"] for entry in evals)
    best = int(np.argmax(seen[:3]))  # Trainer keeps the first of equal scores, as argmax does
    assert trainer.state.best_metric == pytest.approx(seen[best])
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{6 * (best + 1)}")

    # the weights in memory are the best checkpoint's, not the last epoch's
    saved = load_file(f"{trainer.state.best_model_checkpoint}/adapter_model.safetensors")
    encoder = model.prompt_encoder["default"]
    assert torch.equal(encoder.soft_words.detach(), saved["soft_words"])
    assert torch.equal(encoder.mixture_logits.detach(), saved["mixture_logits"])
    assert best != 2, "the setting should make an earlier epoch the best, so that loading it is visible"
    last = load_file(str(tmp_path / "out" / "checkpoint-18" / "adapter_model.safetensors"))
    assert not torch.equal(last["soft_words"], saved["soft_words"])
    assert trainer.evaluate()["eval_p@1"] == pytest.approx(seen[best])

    # eval predictions are each fact's gold rank, as the library computes it
    predicted = trainer.predict(FactRows(table))
    batch = model.encode(list(table["subject"]), list(table["object"]))
    with torch.no_grad():
        expected = rank_of_gold(model(**batch).log_probs, batch["labels"])
    assert predicted.predictions.tolist() == expected.tolist()
    assert predicted.label_ids.tolist() == batch["labels"].tolist()


def test_a_raw_dataset_under_default_arguments_is_told_what_to_do(model, table, tmp_path):
    # the Trainer drops the columns the base model's forward does not name; only a "labels" column survives here
    with_labels = table.add_column("labels", [0] * len(table))
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1),
        train_dataset=with_labels,
        data_collator=SoftMixtureDataCollator(model),
    )
    with pytest.raises(ValueError, match=r"no 'subject'.*FactRows\(dataset\).*remove_unused_columns=False"):
        trainer.train()


def test_the_collator_takes_dict_rows_and_fact_rows_alike(model):
    collator = SoftMixtureDataCollator(model)
    from_dicts = collator([{"subject": "Dante", "object": "Florence"}, {"subject": "Ali", "object": "Paris"}])
    from_facts = collator([Fact("Dante", "Florence"), Fact("Ali", "Paris")])
    expected = model.encode(["Dante", "Ali"], ["Florence", "Paris"])
    for batch in (from_dicts, from_facts):
        assert batch.keys() == expected.keys()
        assert all(
            torch.equal(batch[k], v) if isinstance(v, torch.Tensor) else batch[k] == v for k, v in expected.items()
        )
    # no object column: a batch to predict, without labels to learn from
    assert "labels" not in collator([{"subject": "Dante"}])  # and then the forward's loss is None
    renamed = SoftMixtureDataCollator(model, subject_column="sub_label", object_column="obj_label")
    assert (
        renamed([{"sub_label": "Dante", "obj_label": "Florence"}])["labels"].tolist()
        == expected["labels"][:1].tolist()
    )
    with pytest.raises(TypeError, match="needs a PeftModelForSoftMixture"):
        SoftMixtureDataCollator(model.base_model)


def test_fact_rows_check_their_table():
    rows = FactRows(Dataset.from_list([{"sub_label": "Dante", "obj_label": "Florence"}]), "sub_label", "obj_label")
    assert rows[0] == Fact("Dante", "Florence") and len(rows) == 1
    assert FactRows([Fact("Ali", "Paris")])[0].object == "Paris"
    with pytest.raises(ValueError, match=r"no 'subject' column \(it has \['sub', 'obj'\]\)"):
        FactRows(Dataset.from_list([{"sub": "Dante", "obj": "Florence"}]))
    with pytest.raises(ValueError, match="Row 1: the subject"):
        FactRows([{"subject": "Dante", "object": "Florence"}, {"subject": "  ", "object": "Rome"}])
    with pytest.raises(ValueError, match="Row 0: the object"):
        FactRows([{"subject": "Dante", "object": 3}])
    with pytest.raises(ValueError, match="empty"):
        FactRows([])


def test_metrics_rank_the_gold_object_and_count_what_they_cannot_score(model):
    metrics = FactRetrievalMetrics()
    batch = model.encode(["Dante", "Ali", "Bo"], ["Florence", "Paris", "Indias"])  # "Indias": two word pieces
    assert batch["labels"][2] == -100
    with torch.no_grad():
        out = model(**batch)
    ranks = metrics.preprocess_logits_for_metrics((out.log_probs, out.log_weights), batch["labels"])
    assert ranks[:2].tolist() == rank_of_gold(out.log_probs[:2], batch["labels"][:2]).tolist()
    assert ranks[2] == 0
    scores = metrics.compute_metrics(SimpleNamespace(predictions=ranks.numpy(), label_ids=batch["labels"].numpy()))
    assert scores["facts"] == 2 and scores["unscored"] == 1
    assert scores["mrr"] == pytest.approx(float((1.0 / ranks[:2].float()).mean()))

    # candidates: the rank among them only
    restricted = FactRetrievalMetrics(candidate_ids=batch["labels"][:2].tolist())
    assert restricted.preprocess_logits_for_metrics(out.log_probs[:2], batch["labels"][:2]).max() <= 2

    with pytest.raises(ValueError, match="preprocess_logits_for_metrics"):
        metrics.compute_metrics(SimpleNamespace(predictions=out.log_probs.numpy(), label_ids=None))
    with pytest.raises(ValueError, match="None of the 1 evaluation facts"):
        metrics.compute_metrics(SimpleNamespace(predictions=np.array([0]), label_ids=None))


def test_gradient_accumulation_takes_the_same_step_as_one_big_batch(tiny_dir, tmp_path):
    from transformers import AutoModelForMaskedLM

    rows = FactRows([Fact(s, o) for s, o in PAIRS[:4]] * 2)
    steps = {}
    for accumulation, batch_size in ((1, 8), (2, 4)):
        model = get_peft_model(
            AutoModelForMaskedLM.from_pretrained(str(tiny_dir)), SoftMixtureConfig(templates=TEMPLATES)
        )
        before = model.prompt_encoder["default"].soft_words.detach().clone()
        args = TrainingArguments(
            output_dir=str(tmp_path / str(accumulation)),
            max_steps=1,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            learning_rate=0.1,
            optim="sgd",
            lr_scheduler_type="constant",
            max_grad_norm=1e9,
            report_to=[],
            use_cpu=True,
        )
        Trainer(model=model, args=args, train_dataset=rows, data_collator=SoftMixtureDataCollator(model)).train()
        steps[accumulation] = model.prompt_encoder["default"].soft_words.detach() - before
    torch.testing.assert_close(steps[2], steps[1], rtol=1e-4, atol=1e-7)
