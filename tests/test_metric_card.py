"""The fact_retrieval metric is ready to be pushed as a Hub metric: a Space-style metric card whose examples run, and
a folder that `evaluate.load` reads the way it reads a Hub Space (the script named after its folder)."""

from __future__ import annotations

import doctest
import re

import evaluate
import pytest
from huggingface_hub import SpaceCard

from peft_softmix.metrics import FACT_RETRIEVAL_SCRIPT, load_fact_retrieval

CARD = FACT_RETRIEVAL_SCRIPT.parent / "README.md"


def test_card_header_is_an_evaluate_metric_space():
    card = SpaceCard.load(CARD)
    data = card.data.to_dict()
    assert data["title"] == "Fact Retrieval"
    assert data["sdk"] == "gradio" and data["app_file"] == "app.py" and data["sdk_version"]
    assert {"evaluate", "metric"} <= set(data["tags"])
    assert "mean reciprocal rank" in data["description"]
    for section in ("## Metric Description", "## How to Use", "### Inputs", "### Output Values", "### Examples"):
        assert section in card.text, section


def test_card_examples_compute_what_they_say():
    text = CARD.read_text(encoding="utf-8")
    examples = "\n".join(re.findall(r"^```python\n(>>> .*?)^```", text, re.S | re.M))
    assert examples.count(">>>") >= 4
    test = doctest.DocTestParser().get_doctest(examples, {"metric": load_fact_retrieval()}, "card", str(CARD), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_card_states_every_output_the_metric_returns():
    scores = load_fact_retrieval().compute(ranks=[1, 3], relations=["P1", "P2"])
    text = CARD.read_text(encoding="utf-8")
    for key in scores:
        assert f"**{key}**" in text, key


def test_the_folder_loads_as_a_hub_space_would():
    # evaluate.load("<namespace>/fact_retrieval") fetches <folder>/fact_retrieval.py; a local folder works the same way
    metric = evaluate.load(str(FACT_RETRIEVAL_SCRIPT.parent))
    assert metric.compute(ranks=[1, 12], relations=["P19", "P19"])["micro_p@10"] == pytest.approx(0.5)
