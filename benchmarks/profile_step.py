"""Where a training step's time goes: the bare frozen model against the mixture, shallow and deep.

Times one step (forward, backward and, for the mixture, an Adam step) of each case, interleaved, then profiles a
few steps of each with `torch.profiler`: kernel launches per step, GPU time per step and the host-device
synchronisations, and the mixture's busiest operators. It complements `speed.py`, which says *how much* a case
costs, by saying *why*.

Run::

    python benchmarks/profile_step.py --device cuda --k 5          # BERT-base shape on a GPU
    python benchmarks/profile_step.py --k 1                        # tiny shape on a CPU (a smoke run)

``--root`` points at another checkout of this repository to profile its ``peft_softmix`` (an old commit, say).
"""

from __future__ import annotations

import argparse
import importlib
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--k", type=int, default=5, help="Templates in the mixture.")
    parser.add_argument("--preset", help="Model shape (speed.py's presets); bert-base on a GPU, tiny on a CPU.")
    parser.add_argument("--repeats", type=int, default=20, help="Timed steps of every case.")
    parser.add_argument("--root", default=str(HERE.parent), help="Checkout whose peft_softmix is profiled.")
    parser.add_argument("--data_dir", help="T-REx data (speed.py's default: ../shared/data).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(args.root).resolve() / "benchmarks"))
    speed = importlib.import_module("speed")  # puts its checkout first on sys.path, so peft_softmix comes from there
    from peft import get_peft_model
    from transformers import AutoTokenizer

    import peft_softmix
    from peft_softmix.layers import find_backbone, gather_mask_positions

    device = torch.device(args.device)
    preset = args.preset or ("bert-base" if device.type == "cuda" else "tiny")
    data_dir = Path(args.data_dir) if args.data_dir else speed.DEFAULT_DATA_DIR
    print(f"peft_softmix from {peft_softmix.__file__}; device {device}, preset {preset}, K={args.k}", flush=True)

    templates = speed.relation_templates(data_dir, "P19", args.k)
    facts = [f for f in speed.relation_facts(data_dir, "P19", "train") if f[0] and f[1]]
    random.Random(0).shuffle(facts)
    texts = (
        [s for s, _ in facts] + [o for _, o in facts] + [t.replace("[X]", " ").replace("[Y]", " ") for t in templates]
    )
    tokenizer_dir = speed.build_tokenizer(texts, speed.PRESETS[preset][4], Path(tempfile.mkdtemp()) / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    batch_facts = [f for f in facts if peft_softmix.object_token_id(tokenizer, f[1]) is not None][:32]
    base = speed.random_mlm(preset, device)
    pm: Any = None
    for name, deep in (("shallow", False), ("deep", True)):
        config = peft_softmix.SoftMixtureConfig(
            templates=templates, tokenizer_name_or_path=str(tokenizer_dir), deep=deep
        )
        if pm is None:
            pm = get_peft_model(base, config, adapter_name=name)
        else:
            pm.add_adapter(name, config)
    pm.to(device).train()
    subjects, objects = [s for s, _ in batch_facts], [o for _, o in batch_facts]
    batches, optimizers = {}, {}
    for name in ("shallow", "deep"):
        pm.set_adapter(name)
        batches[name] = pm.encode(subjects, objects, device=device)
        params = [p for p in pm.prompt_encoder[name].parameters() if p.requires_grad]
        optimizers[name] = torch.optim.Adam(params, lr=1e-3, fused=device.type == "cuda")

    batch = batches["shallow"]
    B, K, T = batch["input_ids"].shape
    ids, attention = batch["input_ids"].reshape(B * K, T), batch["attention_mask"].reshape(B * K, T)
    masks, labels = batch["mask_positions"].reshape(-1), batch["labels"].repeat_interleave(K)
    embeddings, backbone = pm.word_embeddings, find_backbone(base)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def bare() -> None:
        embeds = embeddings(ids).detach().requires_grad_()
        with gather_mask_positions(backbone, masks):
            logits = base(inputs_embeds=embeds, attention_mask=attention).logits
        (-torch.log_softmax(logits[:, 0].float(), -1).gather(1, labels[:, None]).mean()).backward()

    def mixture(name: str) -> Callable[[], None]:
        def step() -> None:
            pm(**batches[name]).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)

        return step

    cases = {"bare": bare, "shallow": mixture("shallow"), "deep": mixture("deep")}

    def run(name: str) -> None:
        # the adapter is chosen outside the timed call: set_adapter walks every module
        if name != "bare":
            pm.set_adapter(name)
        cases[name]()

    for name in cases:
        for _ in range(3):
            run(name)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, step in cases.items():
            if name != "bare":
                pm.set_adapter(name)
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(
        f"tokens {B * K} x {T}; median of {args.repeats} steps (ms): "
        + ", ".join(f"{n} {v:.2f}" for n, v in medians.items())
    )
    print("over bare: " + ", ".join(f"{n} {v / medians['bare']:.3f}" for n, v in medians.items()))

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    summary: dict[str, Any] = {"median_ms": medians}
    steps = 5
    for name in cases:
        if name != "bare":
            pm.set_adapter(name)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                cases[name]()
            sync()
        events = prof.key_averages()
        launches = sum(e.count for e in events if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
        syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
        gpu_ms = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e3
        ops = sum(e.count for e in events if e.key.startswith("aten::"))
        per_step = {
            "kernel_launches": launches / steps,
            "synchronisations": syncs / steps,
            "gpu_ms": gpu_ms / steps,
            "aten_ops": ops / steps,
        }
        summary[name] = per_step
        print(f"== {name}: per step " + ", ".join(f"{k} {v:.1f}" for k, v in per_step.items()))
        if name == "deep":
            print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50))
    return summary


if __name__ == "__main__":
    main()
