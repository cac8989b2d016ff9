"""Peak memory of training steps of the mixture, with shallow or deep prompts.

One case per process, since a process's peak only grows: run it once per case and compare. On a GPU the figure is
``torch.cuda.max_memory_allocated`` over two steps, exact. On a CPU it is the growth of the peak resident set size,
which the allocator makes noisy (identical BERT-base K=10 runs on the 2-core dev box differed by 0.7 GiB): there,
compare the medians of several runs.

Run::

    python benchmarks/memory_step.py --case deep --k 10                  # BERT-base shape, 32 facts
    python benchmarks/memory_step.py --case shallow --k 10
"""

from __future__ import annotations

import argparse
import importlib
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=["shallow", "deep"], default="deep")
    parser.add_argument("--k", type=int, default=10, help="Templates in the mixture.")
    parser.add_argument("--preset", default="bert-base", help="Model shape (speed.py's presets).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data_dir", help="T-REx data (speed.py's default: ../shared/data).")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    speed = importlib.import_module("speed")
    from peft import get_peft_model

    from peft_softmix import SoftMixtureConfig

    device = torch.device(args.device)
    data_dir = Path(args.data_dir) if args.data_dir else speed.DEFAULT_DATA_DIR
    templates = speed.relation_templates(data_dir, "P19", args.k)
    facts = [f for f in speed.relation_facts(data_dir, "P19", "train") if f[0] and f[1]][:32]
    texts = (
        [s for s, _ in facts] + [o for _, o in facts] + [t.replace("[X]", " ").replace("[Y]", " ") for t in templates]
    )
    tokenizer_dir = speed.build_tokenizer(texts, speed.PRESETS[args.preset][4], Path(tempfile.mkdtemp()) / "tokenizer")
    base = speed.random_mlm(args.preset, device)
    config = SoftMixtureConfig(
        templates=templates, tokenizer_name_or_path=str(tokenizer_dir), deep=args.case == "deep"
    )
    pm: Any = get_peft_model(base, config).train()
    batch = pm.encode([s for s, _ in facts], [o for _, o in facts], device=device)

    def step() -> None:
        pm(**batch, return_log_probs=False).loss.backward()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(2):
        step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - start
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
    shape = tuple(batch["input_ids"].shape)
    print(
        f"{args.case}: preset {args.preset}, batch {shape} ((facts x templates) x tokens), "
        f"peak growth {peak / 2**20:.0f} MiB"
    )
    return {"case": args.case, "batch": shape, "peak_mib": peak / 2**20}


if __name__ == "__main__":
    main()
