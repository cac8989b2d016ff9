"""Results of a run over relations: typed per-relation outcomes, and the files a run writes from them.

`RelationOutcome` is what `peft_softmix.training.train_relation` returns for one relation. `results_document` turns
a run's outcomes into the ``results.json`` structure (scored by the ``fact_retrieval`` metric: per relation, and
micro and macro averages), `results_markdown` into its tables, and `write_results` writes ``results.json``,
``results.md`` and ``mixture_weights.png`` atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_file, write_json_atomic, write_text_atomic
from .candidate_evaluation import LENGTH_GROUPS
from .evaluation import scores_from_metric
from .metrics import METRIC_KEYS, load_fact_retrieval
from .trainer import TrainResult

__all__ = [
    "ROWS",
    "RelationOutcome",
    "SplitRanks",
    "plot_mixture_weights",
    "results_document",
    "results_markdown",
    "results_markdown_by_length",
    "row_labels",
    "write_results",
]

# The rows of the results table: the hard first template, the hard templates as a uniform mixture, the trained one.
ROWS = ("hard_first", "hard_mixture", "soft")


@dataclass
class SplitRanks:
    """Ranks of one split's gold objects for each row of the results table, in fact order.

    Args:
        hard_first: the untrained first template on its own.
        hard_mixture: the untrained templates as a uniform mixture.
        soft: the trained adapter (its best state on dev).
    """

    hard_first: torch.Tensor
    hard_mixture: torch.Tensor
    soft: torch.Tensor


@dataclass
class RelationOutcome:
    """One relation's trained adapter, as scored.

    Args:
        relation: the relation id.
        templates: its K templates.
        mixture_weights: the kept adapter's mixture weights.
        facts: facts per split that were scored.
        training: the training loop's `TrainResult` (best epoch, history, early stop).
        dev: ranks on dev per row.
        test: ranks on test per row.
        hard_templates_test: ``[N, K]`` test ranks of each hard template on its own.
        adapter_dir: where the adapter was saved, if it was.
        candidates: in the multi-token setting (ranks among candidate objects): ``count`` (candidates),
            ``gold_not_a_candidate`` (per split: facts ranked last) and ``length_groups`` (per split: each fact's
            ``"single_token"`` or ``"multi_token"``, by its gold object); None otherwise.
    """

    relation: str
    templates: list[str]
    mixture_weights: list[float]
    facts: dict[str, int]
    training: TrainResult
    dev: SplitRanks
    test: SplitRanks
    hard_templates_test: torch.Tensor
    adapter_dir: str | None = None
    candidates: dict[str, Any] | None = None


def row_labels(templates: str, soft_label: str) -> dict[str, str]:
    """The table's row labels: ``templates`` is the template source (its first template is the hard row)."""
    first = "manual template (hard)" if templates.split("+")[0] == "manual" else f"hard, template 1 ({templates})"
    return {"hard_first": first, "hard_mixture": "hard, uniform mixture", "soft": soft_label}


def results_document(
    outcomes: Sequence[RelationOutcome], rows: Mapping[str, str], settings: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``results.json`` structure: ``settings``, ``rows`` (``{key: label}``), ``relations[rel]`` (facts, history,
    weights, and ``dev``/``test`` scores per row) and ``overall[split][row]`` (micro and macro averages).

    In the multi-token setting, ``relations[rel]`` also has ``candidates`` (how many, and per split the facts whose
    gold object is none of them) and ``by_length[split][group][row]``, and the document ``by_length[split][group]
    [row]`` (micro and macro averages): the scores of the facts whose gold object is one token (``single_token``)
    and several (``multi_token``)."""
    metric = load_fact_retrieval(keep_in_memory=True)
    relations: dict[str, Any] = {}
    pooled: dict[str, dict[str, tuple[list[int], list[str]]]] = {"dev": {}, "test": {}}
    by_length: dict[str, dict[str, dict[str, tuple[list[int], list[str]]]]] = {}
    for outcome in outcomes:
        rel = outcome.relation
        entry: dict[str, Any] = {
            "templates": outcome.templates,
            "mixture_weights": outcome.mixture_weights,
            "facts": outcome.facts,
            "best_epoch": outcome.training.best_epoch,
            "epochs_run": outcome.training.epochs_run,
            "stopped_early": outcome.training.stopped_early,
            "history": [h.to_dict() for h in outcome.training.history],
            "adapter": outcome.adapter_dir,
        }
        for split, ranks in (("dev", outcome.dev), ("test", outcome.test)):
            entry[split] = {}
            for row in rows:
                r = getattr(ranks, row).tolist()
                entry[split][row] = scores_from_metric(metric, r, rel)
                ranks_list, rel_list = pooled[split].setdefault(row, ([], []))
                ranks_list.extend(r)
                rel_list.extend([rel] * len(r))
        if outcome.candidates is not None:
            entry["candidates"] = {k: v for k, v in outcome.candidates.items() if k != "length_groups"}
            entry["by_length"] = _by_length(metric, outcome, rows, by_length)
        hard = outcome.hard_templates_test
        entry["test_hard_template_p@1"] = [float((hard[:, k] == 1).float().mean()) for k in range(hard.shape[1])]
        relations[rel] = entry
    overall: dict[str, Any] = {}
    for split, by_row in pooled.items():
        overall[split] = {}
        for row, (r, rels) in by_row.items():
            scores = metric.compute(ranks=r, relations=rels)
            scores.pop("per_relation")
            overall[split][row] = scores
    document = {"settings": dict(settings), "rows": dict(rows), "relations": relations, "overall": overall}
    if by_length:
        document["by_length"] = {
            split: {group: _micro_macro(metric, rows_of) for group, rows_of in groups.items()}
            for split, groups in by_length.items()
        }
    return document


def _by_length(
    metric: Any,
    outcome: RelationOutcome,
    rows: Mapping[str, str],
    pooled: dict[str, dict[str, dict[str, tuple[list[int], list[str]]]]],
) -> dict[str, Any]:
    """One relation's ``by_length[split][group][row]`` scores (None for a group without facts), pooling its ranks
    into ``pooled[split][group][row]`` for the averages."""
    assert outcome.candidates is not None
    out: dict[str, Any] = {}
    for split, ranks in (("dev", outcome.dev), ("test", outcome.test)):
        groups = outcome.candidates["length_groups"][split]
        out[split] = {}
        for group in LENGTH_GROUPS:
            out[split][group] = {}
            for row in rows:
                mine = [int(r) for r, g in zip(getattr(ranks, row).tolist(), groups) if g == group]
                out[split][group][row] = scores_from_metric(metric, mine, outcome.relation) if mine else None
                if mine:
                    ranks_list, rel_list = pooled.setdefault(split, {}).setdefault(group, {}).setdefault(row, ([], []))
                    ranks_list.extend(mine)
                    rel_list.extend([outcome.relation] * len(mine))
    return out


def _micro_macro(metric: Any, rows_of: Mapping[str, tuple[list[int], list[str]]]) -> dict[str, Any]:
    out = {}
    for row, (ranks, rels) in rows_of.items():
        scores = metric.compute(ranks=ranks, relations=rels)
        scores.pop("per_relation")
        out[row] = scores
    return out


def results_markdown_by_length(results: Mapping[str, Any], split: str = "test") -> str:
    """The tables of `results_markdown` for the facts whose gold object is one token and those whose gold object is
    several (multi-token setting); empty when ``results`` has no ``by_length`` scores."""
    if "by_length" not in results:
        return ""
    titles = {"single_token": "one token", "multi_token": "several tokens"}
    parts = []
    for group in LENGTH_GROUPS:
        view = {
            "rows": results["rows"],
            "relations": {
                rel: {split: {row: s for row, s in entry["by_length"][split][group].items() if s}}
                for rel, entry in results["relations"].items()
            },
            "overall": {split: results["by_length"].get(split, {}).get(group, {})},
        }
        parts.append(f"Facts whose gold object is {titles[group]} ({group}).\n\n" + results_markdown(view, split))
    return "\n".join(parts)


def _cell(scores: Mapping[str, float] | None) -> str:
    if not scores:
        return "–"
    return " / ".join(f"{100 * scores[key]:.1f}" for key in METRIC_KEYS)


def results_markdown(results: Mapping[str, Any], split: str = "test") -> str:
    """A Markdown table: one line per relation (then micro and macro averages), one column per row of results.

    ``results`` is the `results_document` structure: ``rows`` (ordered ``{key: label}``),
    ``relations[rel][split][row]`` and ``overall[split][row]`` (the metric's micro/macro keys).
    """
    rows: dict[str, str] = results["rows"]
    header = ["relation", "facts", *rows.values()]
    lines = [
        f"Scores on {split}: P@1 / P@10 / MRR, in %. Micro averages weigh every fact equally, macro averages every "
        "relation (LAMA's convention).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * len(rows)) + "|",
    ]
    for relation, rel in results["relations"].items():
        scores = rel.get(split, {})
        count = next((s["count"] for s in scores.values() if s), 0)
        lines.append(f"| {relation} | {count} | " + " | ".join(_cell(scores.get(row)) for row in rows) + " |")
    overall = results.get("overall", {}).get(split, {})
    for kind in ("micro", "macro"):
        cells = []
        for row in rows:
            o = overall.get(row)
            cells.append(_cell({k: o[f"{kind}_{k}"] for k in METRIC_KEYS}) if o else "–")
        facts = next((o["num_facts"] for o in overall.values() if o), 0)
        lines.append(f"| **{kind}** | {facts} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_mixture_weights(path: str | os.PathLike, weights: Mapping[str, Sequence[float]]) -> bool:
    """A bar chart of each relation's learned mixture weights (one panel per relation) saved as a PNG.

    Returns False, writing nothing, when matplotlib is not installed (it is an optional extra: ``peft-softmix[plot]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    relations = list(weights)
    if not relations:
        return False
    cols = min(4, len(relations))
    rows = math.ceil(len(relations) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, relation in zip(axes.flat, relations):
        w = list(weights[relation])
        ax.bar(range(1, len(w) + 1), w, color="tab:blue")
        ax.set_title(relation, fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xticks(range(1, len(w) + 1))
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(relations) :]:
        ax.axis("off")
    fig.supxlabel("template", fontsize=9)
    fig.supylabel("mixture weight", fontsize=9)
    fig.tight_layout()
    try:
        with atomic_file(path, suffix=".png") as tmp:  # matplotlib picks the format from the suffix
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    return True


def write_results(output_dir: str | os.PathLike, results: Mapping[str, Any], title: str) -> list[Path]:
    """Write ``results.json``, ``results.md`` (test and dev tables under ``title``) and ``mixture_weights.png``
    (when matplotlib is installed) into ``output_dir``; returns the paths written."""
    out = Path(output_dir)
    write_json_atomic(out / "results.json", results)
    text = f"{title}\n\n" + results_markdown(results, "test") + "\n" + results_markdown(results, "dev")
    if "by_length" in results:
        text += "\n" + results_markdown_by_length(results, "test") + "\n" + results_markdown_by_length(results, "dev")
    write_text_atomic(out / "results.md", text)
    written = [out / "results.json", out / "results.md"]
    weights = {rel: entry["mixture_weights"] for rel, entry in results["relations"].items()}
    if plot_mixture_weights(out / "mixture_weights.png", weights):
        written.append(out / "mixture_weights.png")
    return written
