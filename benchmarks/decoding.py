"""Open-answer decoding (X-FACTR style) on a probe LM: exact match and time per fact of each strategy.

For each relation, a soft-mixture adapter (K mined templates) is trained on the relation's train facts with
objects of any length (``encode(..., multi_token=True)``), or loaded from ``--adapters DIR/<relation>`` where an
earlier run saved it. Every test fact's subject is then decoded into answers of 1..``--max_tokens`` tokens by each
strategy of `peft_softmix.decoding` (``independent``, ``left_to_right``, ``confidence``), with no candidates. The
top-1 answer is exact when its token ids are the gold object's (`object_tokens`), ranked by the model's sequence
score log p(y|x) (``raw``) and by log p(y|x) / n (``normalized``). Accuracy is reported over all test facts and
split by the gold object's length (single-token / multi-token); facts whose object is longer than ``--max_tokens``
count as misses (how many there are is reported). Time per fact is the wall time of the decoding alone.

Public API only. Run (defaults: the word-level probe LM and the sample shipped with the package)::

    OMP_NUM_THREADS=2 python benchmarks/decoding.py
    OMP_NUM_THREADS=2 python benchmarks/decoding.py --model examples/probe_lm_subword --max_tokens 4 \\
        --data_dir ../shared/data/trex --adapters /tmp/decoding-adapters

The last line printed is one JSON object (also written to ``--output`` when given).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # this checkout's peft_softmix, installed or not

from peft import PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForMaskedLM, AutoTokenizer  # noqa: E402

import peft_softmix  # noqa: E402, F401  (registers SOFT_MIXTURE with PEFT)
from peft_softmix import SoftMixtureConfig  # noqa: E402
from peft_softmix.atomic import write_json_atomic  # noqa: E402
from peft_softmix.decoding import STRATEGIES, decode_answers  # noqa: E402
from peft_softmix.facts import SAMPLE_DIR, Fact, load_relation  # noqa: E402
from peft_softmix.objects import object_tokens  # noqa: E402
from peft_softmix.template_sets import load_templates  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO_ROOT / "examples" / "probe_lm"), help="Masked LM folder or id.")
    parser.add_argument("--data_dir", default=str(SAMPLE_DIR / "trex"), help="Folder of <relation>/<split>.jsonl.")
    parser.add_argument("--templates_dir", default=None, help="Template files (default: the package's sample).")
    parser.add_argument("--relations", nargs="*", default=["P17", "P19", "P36", "P103", "P176", "P37"])
    parser.add_argument("--templates", default="mined", help="Template source of the mixture.")
    parser.add_argument("--num_templates", type=int, default=3)
    parser.add_argument("--max_tokens", type=int, default=3, help="Longest answer decoded.")
    parser.add_argument("--num_beams", type=int, default=1, help="Tokens kept at the first mask filled, per length.")
    parser.add_argument("--max_test", type=int, default=300, help="Test facts per relation (the first N).")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1e-2)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--adapters", default=None, help="Load adapters from DIR/<relation>, or save them there.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None, help="Also write the results to this JSON file.")
    return parser.parse_args(argv)


def writable(tokenizer: Any, facts: list[Fact]) -> list[Fact]:
    """The facts whose object the tokenizer can write (an unknown piece can never be decoded)."""
    return [f for f in facts if object_tokens(tokenizer, f.object)]


def train_adapter(base: Any, templates: list[str], facts: list[Fact], args: argparse.Namespace) -> Any:
    """A soft mixture trained on ``facts`` (objects of any length) with Adam, ``--epochs`` passes."""
    model = get_peft_model(base, SoftMixtureConfig(templates=templates)).to(args.device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    order = list(range(len(facts)))
    rng = random.Random(args.seed)
    model.train()
    for _ in range(args.epochs):
        rng.shuffle(order)
        for start in range(0, len(order), args.batch_size):
            chunk = [facts[i] for i in order[start : start + args.batch_size]]
            batch = model.encode(
                [f.subject for f in chunk], [f.object for f in chunk], device=args.device, multi_token=True
            )
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def adapter_for(relation: str, tokenizer: Any, facts: dict[str, list[Fact]], args: argparse.Namespace) -> Any:
    base = AutoModelForMaskedLM.from_pretrained(args.model).to(args.device)
    saved = Path(args.adapters) / relation if args.adapters else None
    if saved is not None and (saved / "adapter_config.json").is_file():
        return PeftModel.from_pretrained(base, str(saved)).to(args.device).eval()
    templates = load_templates(args.templates, relation, k=args.num_templates, templates_dir=args.templates_dir)
    model = train_adapter(base, templates.templates, facts["train"], args)
    if saved is not None:
        model.save_pretrained(str(saved))
    return model


def score(model: Any, tokenizer: Any, facts: list[Fact], strategy: str, args: argparse.Namespace) -> dict[str, Any]:
    """Exact match of the top-1 decoded answer (raw and length-normalised ranking) and the decoding time."""
    subjects = [f.subject for f in facts]
    decode_answers(model, subjects[:4], args.max_tokens, strategy, args.num_beams)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    found = decode_answers(model, subjects, args.max_tokens, strategy, args.num_beams)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    hits: dict[str, dict[str, int]] = {"raw": {}, "normalized": {}}
    for fact, answers in zip(facts, found):
        gold = object_tokens(tokenizer, fact.object)
        kind = "single" if len(gold) == 1 else "multi"
        for ranking, normalized in (("raw", False), ("normalized", True)):
            top = answers.ranked(normalized).tokens[0]
            hits[ranking][kind] = hits[ranking].get(kind, 0) + int(top == gold)
    return {"hits": hits, "seconds": seconds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    totals = {s: {"raw": {}, "normalized": {}, "seconds": 0.0} for s in STRATEGIES}
    counts = {"single": 0, "multi": 0, "longer_than_max_tokens": 0, "unwritable": 0}
    per_relation = {}
    started = time.perf_counter()
    for relation in args.relations:
        splits = load_relation(args.data_dir, relation)
        facts = {name: writable(tokenizer, split.facts) for name, split in splits.items()}
        test_all = splits["test"].facts[: args.max_test]
        test = writable(tokenizer, test_all)
        counts["unwritable"] += len(test_all) - len(test)
        lengths = [len(object_tokens(tokenizer, f.object)) for f in test]
        counts["single"] += sum(n == 1 for n in lengths)
        counts["multi"] += sum(n > 1 for n in lengths)
        counts["longer_than_max_tokens"] += sum(n > args.max_tokens for n in lengths)
        model = adapter_for(relation, tokenizer, facts, args)
        per_relation[relation] = {}
        for strategy in STRATEGIES:
            result = score(model, tokenizer, test, strategy, args)
            per_relation[relation][strategy] = result
            total = totals[strategy]
            total["seconds"] += result["seconds"]
            for ranking in ("raw", "normalized"):
                for kind, n in result["hits"][ranking].items():
                    total[ranking][kind] = total[ranking].get(kind, 0) + n
        print(f"{relation}: {len(test)} test facts ({sum(n > 1 for n in lengths)} multi-token)", file=sys.stderr)
    n_all = counts["single"] + counts["multi"]
    table = {}
    for strategy, total in totals.items():
        row: dict[str, Any] = {"ms_per_fact": 1000 * total["seconds"] / max(n_all, 1)}
        for ranking in ("raw", "normalized"):
            hits = total[ranking]
            row[ranking] = {
                "all": sum(hits.values()) / max(n_all, 1),
                "single": hits.get("single", 0) / counts["single"] if counts["single"] else None,
                "multi": hits.get("multi", 0) / counts["multi"] if counts["multi"] else None,
            }
        table[strategy] = row
    print(f"\nExact match of the top-1 decoded answer, {n_all} test facts ({counts['multi']} multi-token), "
          f"max_tokens={args.max_tokens}, num_beams={args.num_beams}, model {args.model}")  # fmt: skip
    print(f"{'strategy':<14} {'ranking':<11} {'all':>7} {'single':>7} {'multi':>7} {'ms/fact':>8}")
    for strategy, row in table.items():
        for ranking in ("raw", "normalized"):
            cells = [row[ranking][k] for k in ("all", "single", "multi")]
            shown = " ".join(f"{c:7.3f}" if c is not None else f"{'-':>7}" for c in cells)
            print(f"{strategy:<14} {ranking:<11} {shown} {row['ms_per_fact']:8.2f}")
    result = {
        "model": args.model,
        "data_dir": args.data_dir,
        "relations": args.relations,
        "max_tokens": args.max_tokens,
        "num_beams": args.num_beams,
        "facts": counts,
        "strategies": table,
        "per_relation": per_relation,
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads "
        f"{args.device}".strip(),
        "torch": torch.__version__,
        "seconds": time.perf_counter() - started,
    }
    if args.output:
        write_json_atomic(args.output, result)
    print(json.dumps({"strategies": table, "facts": counts}))
    return result


if __name__ == "__main__":
    main()
