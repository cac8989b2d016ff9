"""Where a training step's time goes: the bare frozen model against the mixture, shallow and deep.

Times one step (forward, backward and, for the mixture, an Adam step) of each case, interleaved, then profiles a
few steps of each with `torch.profiler`: kernel launches per step, GPU time per step and the host-device
synchronisations, and the mixture's busiest operators. It complements `speed.py`, which says *how much* a case
costs, by saying *why*.

Run::

    python benchmarks/profile_step.py --device cuda --k 5          # BERT-base shape on a GPU
    python benchmarks/profile_step.py --k 1                        # tiny shape on a CPU (a smoke run)

To profile an older commit, run its own copy of this script from a checkout of it.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
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
    parser.add_argument("--data_dir", help="T-REx data (speed.py's default: ../shared/data).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    speed = importlib.import_module("speed")  # puts this checkout first on sys.path, so peft_softmix comes from here

    import peft_softmix

    device = torch.device(args.device)
    preset = args.preset or ("bert-base" if device.type == "cuda" else "tiny")
    data_dir = Path(args.data_dir) if args.data_dir else speed.DEFAULT_DATA_DIR
    print(f"peft_softmix from {peft_softmix.__file__}; device {device}, preset {preset}, K={args.k}", flush=True)

    base = speed.random_mlm(preset, device)
    pm, batches, optimizers = speed.shallow_and_deep(base, data_dir, preset, args.k, device, shuffle_seed=0)
    N, T = batches["shallow"]["input_ids"].shape  # one row per (fact, template)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def mixture(name: str) -> Callable[[], None]:
        def step() -> None:
            pm(**batches[name], return_log_probs=False).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)

        return step

    cases = {"bare": speed.bare_step(pm, batches["shallow"]), "shallow": mixture("shallow"), "deep": mixture("deep")}

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
        f"tokens {N} x {T}; median of {args.repeats} steps (ms): "
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
