"""Fact retrieval scores for cloze queries: precision at 1 and 10 and mean reciprocal rank, per relation and overall.

This file is an `evaluate` metric script and must stay self-contained (evaluate copies it into its module cache):
it imports nothing from peft_softmix.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import datasets
import evaluate

_CITATION = """\
@inproceedings{petroni-etal-2019-language,
    title = "Language Models as Knowledge Bases?",
    author = "Petroni, Fabio and Rockt{\\"a}schel, Tim and Riedel, Sebastian and Lewis, Patrick and Bakhtin, Anton
      and Wu, Yuxiang and Miller, Alexander",
    booktitle = "Proceedings of EMNLP-IJCNLP",
    year = "2019",
    pages = "2463--2473",
}
@inproceedings{qin-eisner-2021-learning,
    title = "Learning How to Ask: Querying {LM}s with Mixtures of Soft Prompts",
    author = "Qin, Guanghui and Eisner, Jason",
    booktitle = "Proceedings of NAACL-HLT",
    year = "2021",
    pages = "5203--5212",
}
"""

_DESCRIPTION = """\
Scores a masked language model's answers to fact queries (LAMA's protocol). Each query's prediction is summarised by
the rank of the gold object among the candidate tokens (1 = the model's top answer). P@k is the fraction of facts
whose gold object ranks k or better; MRR is the mean of 1/rank. Micro averages weigh every fact equally; macro
averages weigh every relation equally (the mean of per-relation scores), which is how LAMA reports T-REx.
"""

_KWARGS_DESCRIPTION = """
Args:
    ranks (`list` of `int`): 1-based rank of the gold object among the candidates, one per fact.
    relations (`list` of `str`): the relation of each fact. Use one name for all facts if there is one relation.
Returns:
    micro_p@1, micro_p@10, micro_mrr (`float`): averages over all facts.
    macro_p@1, macro_p@10, macro_mrr (`float`): averages of the per-relation values.
    per_relation (`dict`): relation -> {"p@1", "p@10", "mrr", "count"}, relations sorted by name.
    num_facts, num_relations (`int`).
Examples:
    >>> metric = peft_softmix.metrics.load_fact_retrieval()
    >>> scores = metric.compute(ranks=[1, 3, 1, 12], relations=["P19", "P19", "P20", "P20"])
    >>> scores["micro_p@1"], scores["macro_mrr"]
    (0.5, 0.6041666666666666)
"""

CUTOFFS = (1, 10)


def _scores(ranks: Sequence[int]) -> dict[str, float]:
    n = len(ranks)
    out = {f"p@{k}": sum(1 for r in ranks if r <= k) / n for k in CUTOFFS}
    out["mrr"] = sum(1.0 / r for r in ranks) / n
    return out


def fact_retrieval_scores(ranks: Sequence[int], relations: Sequence[str]) -> dict:
    """The metric's computation, without evaluate's input handling (see the module's ``_KWARGS_DESCRIPTION``)."""
    if len(ranks) != len(relations):
        raise ValueError(f"Got {len(ranks)} ranks but {len(relations)} relations; give one relation per rank.")
    if not ranks:
        raise ValueError("No ranks to score: fact retrieval needs at least one fact.")
    bad = [r for r in ranks if isinstance(r, bool) or not isinstance(r, int) or r < 1]
    if bad:
        raise ValueError(
            f"Ranks are 1-based integers (1 = the gold object is the top answer); got {bad[:5]}"
            f"{' ...' if len(bad) > 5 else ''}."
        )
    by_relation: dict[str, list[int]] = defaultdict(list)
    for rank, relation in zip(ranks, relations):
        by_relation[relation].append(rank)
    per_relation = {}
    for relation in sorted(by_relation):
        scores = _scores(by_relation[relation])
        per_relation[relation] = {**scores, "count": len(by_relation[relation])}
    micro = _scores(ranks)
    result: dict = {f"micro_{name}": value for name, value in micro.items()}
    for name in micro:
        result[f"macro_{name}"] = sum(r[name] for r in per_relation.values()) / len(per_relation)
    result["per_relation"] = per_relation
    result["num_facts"] = len(ranks)
    result["num_relations"] = len(per_relation)
    return result


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FactRetrieval(evaluate.Metric):
    """P@1, P@10 and MRR of gold-object ranks, micro- and macro-averaged over relations."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"ranks": datasets.Value("int64"), "relations": datasets.Value("string")}),
            reference_urls=["https://github.com/facebookresearch/LAMA"],
        )

    def _compute(self, ranks: Sequence[int], relations: Sequence[str]) -> dict:
        return fact_retrieval_scores([int(r) for r in ranks], list(relations))
