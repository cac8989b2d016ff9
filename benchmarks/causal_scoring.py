"""Prefix or whole-sentence scoring of a causal LM's templates: which ranks candidate objects better?

For each relation, the LAMA manual template plus LPAQA's first mined templates (held out of the causal probe LM's
corpus) make a K-template mixture on a causal LM (`examples/probe_lm_causal` by default). Test facts rank every
distinct object of the relation (train/dev/test) with ``causal_scoring="prefix"`` (the object's tokens given the
text before them) and ``"sentence"`` (the whole sentence from the object on), for the template-initialised
adapter (the hard templates) and after a short training run of the soft mixture with each scoring. Public API
only. Prints one table and, last, one JSON object.

    OMP_NUM_THREADS=1 python benchmarks/causal_scoring.py
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from peft import get_peft_model  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from peft_softmix import SoftMixtureConfig  # noqa: E402
from peft_softmix.base_models import load_language_model  # noqa: E402
from peft_softmix.facts import SAMPLE_DIR  # noqa: E402
from peft_softmix.relations import drop_long_queries, load_relation_data  # noqa: E402

MODES = ("prefix", "sentence")


def precision_at_1(model: Any, data: Any, mode: str, facts: list, batch_size: int) -> float:
    subjects = [f.subject for f in facts]
    scores = model.score_candidates(subjects, data.candidates, batch_size=batch_size, causal_scoring=mode).log_probs
    best = [data.candidates[i] for i in scores.argmax(1).tolist()]
    return sum(b == f.object for b, f in zip(best, facts)) / max(1, len(facts))


def train(model: Any, facts: list, mode: str, epochs: int, lr: float, batch_size: int, seed: int) -> None:
    order = list(range(len(facts)))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for epoch in range(epochs):
        random.Random(seed + epoch).shuffle(order)
        for start in range(0, len(order), batch_size):
            chunk = [facts[i] for i in order[start : start + batch_size]]
            batch = model.encode([f.subject for f in chunk], [f.object for f in chunk], causal_scoring=mode)
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO_ROOT / "examples" / "probe_lm_causal"))
    parser.add_argument("--data_dir", default=str(SAMPLE_DIR / "trex"))
    parser.add_argument("--templates_dir", default=str(SAMPLE_DIR / "templates"))
    parser.add_argument("--relations", nargs="+", default=["P17", "P19", "P36", "P103", "P176", "P37"])
    parser.add_argument("--num_templates", type=int, default=5)
    parser.add_argument("--max_train", type=int, default=300)
    parser.add_argument("--max_test", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows: dict[str, dict[str, float]] = {}
    for relation in args.relations:
        data = load_relation_data(
            args.data_dir, relation, tokenizer, "manual+mined", args.num_templates,
            templates_dir=args.templates_dir, max_train_samples=args.max_train, max_eval_samples=args.max_test,
            multi_token=True,
        )  # fmt: skip
        row: dict[str, float] = {}
        for mode in MODES:
            torch.manual_seed(args.seed)
            config = SoftMixtureConfig(templates=data.templates, tokenizer_name_or_path=args.model)
            model = get_peft_model(load_language_model(args.model), config).eval()
            data, dropped = drop_long_queries(model, data)  # facts the model's positions cannot hold
            if dropped:
                print(f"{relation}: {dropped}", flush=True)
            row[f"hard_{mode}"] = precision_at_1(model, data, mode, data.splits["test"], args.batch_size)
            train(model, data.splits["train"], mode, args.epochs, args.lr, args.batch_size, args.seed)
            row[f"soft_{mode}"] = precision_at_1(model, data, mode, data.splits["test"], args.batch_size)
        rows[relation] = row
        print(relation, json.dumps({k: round(100 * v, 1) for k, v in row.items()}), flush=True)
    columns = [f"{kind}_{mode}" for kind in ("hard", "soft") for mode in MODES]
    print("\n| relation | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for relation, row in rows.items():
        print(f"| {relation} | " + " | ".join(f"{100 * row[c]:.1f}" for c in columns) + " |")
    macro = {c: round(100 * statistics.mean(row[c] for row in rows.values()), 1) for c in columns}
    print("| macro | " + " | ".join(f"{macro[c]:.1f}" for c in columns) + " |")
    summary = {"model": args.model, "macro_p@1": macro, "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
