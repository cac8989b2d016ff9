"""Two ways to add deep-prompt offsets, timed against each other and the bare model in one process.

- ``canvas`` (the library's design, `peft_softmix.hooks.deep_prompt_hooks`): every layer's offsets are laid out
  on the batch once per forward, ``[L, N*T, H]``, so that each layer call costs one dense add; the layout lives for
  the forward pass and its gradient for the backward pass.
- ``rows``: each layer call adds its offsets at the P template positions with an out-of-place ``index_add``: no
  layout, but two more operations per layer forward and one backward. Timed as the shallow adapter's forward with
  this script's own hooks on the model's public `transformer_layers` adding the deep adapter's offsets: the same
  soft words, offsets and parameters to update as the library's deep step, through public API only.

The GPU step at K = 1 is launch-bound (host time per operation is what counts), at K >= 5 it is compute-bound; the
memory case shows what the layout costs. Steps are timed one at a time, round-robin over the cases, and the ratio
of each step to the bare step *of the same round* is reported too (paired), which cancels slow phases of the host.

Run::

    python benchmarks/deep_offsets.py --device cuda          # BERT-base shape: K=1 and K=5 timing, K=10 memory
    python benchmarks/deep_offsets.py --preset tiny --repeats 3 --ks 1 --memory_k 0   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent


@contextmanager
def rows_hooks(layers: list[torch.nn.Module], offsets: torch.Tensor, positions: Any) -> Iterator[None]:
    """The ``rows`` design: each layer call adds its offsets at the soft positions only (BERT-style layers)."""
    pending = iter(offsets.index_select(1, positions.words).unbind(0))

    def hook(module, args, kwargs):
        values = next(pending, None)
        if values is None:
            return None
        hidden = args[0]
        flat = hidden.reshape(-1, hidden.shape[-1])
        return (flat.index_add(0, positions.index, values.to(hidden.dtype)).view(hidden.shape), *args[1:]), kwargs

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in dict.fromkeys(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", help="Model shape (speed.py's presets); bert-base on a GPU, tiny on a CPU.")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5], help="Mixture sizes to time.")
    parser.add_argument("--repeats", type=int, default=60, help="Rounds of timed steps at the first K.")
    parser.add_argument("--memory_k", type=int, default=10, help="Mixture size for peak memory (GPU; 0: skip).")
    parser.add_argument("--data_dir", help="T-REx data (speed.py's default: ../shared/data).")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    speed = importlib.import_module("speed")

    from peft_softmix.hooks import SoftPositions

    device = torch.device(args.device)
    preset = args.preset or ("bert-base" if device.type == "cuda" else "tiny")
    data_dir = Path(args.data_dir) if args.data_dir else speed.DEFAULT_DATA_DIR
    base = speed.random_mlm(preset, device)
    print(f"device {device}, preset {preset}", flush=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    Case = tuple[Callable[[], None], Callable[[], None]]

    def build(k: int) -> dict[str, Case]:
        """The bare model, the shallow mixture and the deep mixture under each design, on one batch of 32 facts.

        Each case is ``(prepare, step)``: ``prepare`` (untimed: `set_adapter` walks every module) activates the
        case's adapter and design, ``step`` is one training step.
        """
        pm, batches, optimizers = speed.shallow_and_deep(base, data_dir, preset, k, device)
        deep = pm.prompt_encoder["deep"]
        # the offsets start at zero; give them values so that the designs' agreement below means something
        with torch.no_grad():
            deep.deep_offsets.normal_(0, 1.0)
        batch = batches["shallow"]  # the same queries as batches["deep"]: both adapters have the same templates
        N, T = batch["input_ids"].shape  # one row per (fact, template)
        positions = SoftPositions.of(batch["roles"])
        # rows: the shallow adapter's soft words (equal to the deep adapter's: both start at the template's
        # embeddings), the deep adapter's offsets added by this script's hooks; one optimizer over both
        rows_params = [p for p in pm.prompt_encoder["shallow"].parameters() if p.requires_grad] + [deep.deep_offsets]
        rows_optimizer = torch.optim.Adam(rows_params, lr=1e-3, fused=device.type == "cuda")

        def canvas_forward(**kwargs: Any) -> Any:
            return pm(**batches["deep"], **kwargs)

        def rows_forward(**kwargs: Any) -> Any:
            with rows_hooks(pm.transformer_layers, deep.deep_offsets, positions):
                return pm(**batch, **kwargs)

        log_probs = {}
        pm.eval()  # no dropout, so that both designs see the same network
        for design, (adapter, forward) in {
            "canvas": ("deep", canvas_forward),
            "rows": ("shallow", rows_forward),
        }.items():
            pm.set_adapter(adapter)
            with torch.no_grad():
                log_probs[design] = forward().log_probs
        pm.train()
        diff = (log_probs["canvas"] - log_probs["rows"]).abs().max().item()
        if diff > 1e-4:
            raise RuntimeError(f"The two designs disagree: log-probabilities differ by up to {diff}")

        def mixture(adapter: str, forward: Callable[..., Any], optimizer: torch.optim.Optimizer) -> Case:
            def prepare() -> None:
                pm.set_adapter(adapter)

            def step() -> None:
                forward(return_log_probs=False).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            return prepare, step

        print(f"K={k}: {N} rows x {T} tokens; canvas and rows agree to {diff:.1e} with random offsets")
        return {
            "bare": (lambda: None, speed.bare_step(pm, batch)),
            "shallow": mixture("shallow", lambda **kw: pm(**batch, **kw), optimizers["shallow"]),
            "deep_canvas": mixture("deep", canvas_forward, optimizers["deep"]),
            "deep_rows": mixture("shallow", rows_forward, rows_optimizer),
        }

    summary: dict[str, Any] = {}
    for i, k in enumerate(args.ks):
        cases = build(k)
        for prepare, step in cases.values():
            prepare()
            for _ in range(3):
                step()
        times: dict[str, list[float]] = {name: [] for name in cases}
        repeats = args.repeats if i == 0 else max(args.repeats // 4, 1)
        for _ in range(repeats):
            for name, (prepare, step) in cases.items():
                prepare()
                sync()
                start = time.perf_counter()
                step()
                sync()
                times[name].append(time.perf_counter() - start)
        bare_ms = statistics.median(times["bare"]) * 1e3
        print(f"{'case':14s} {'median ms':>9s} {'over bare':>9s} {'paired':>7s}   ({repeats} rounds)")
        for name, values in times.items():
            median = statistics.median(values) * 1e3
            paired = statistics.median(t / b for t, b in zip(values, times["bare"]))
            print(f"{name:14s} {median:9.2f} {median / bare_ms:9.3f} {paired:7.3f}")
            summary[f"k{k}_{name}_over_bare"] = round(median / bare_ms, 3)
            summary[f"k{k}_{name}_over_bare_paired"] = round(paired, 3)

    if args.memory_k and device.type == "cuda":
        cases = build(args.memory_k)
        print(f"K={args.memory_k}: peak memory of one step above what was allocated before it")
        for name, (prepare, step) in cases.items():
            prepare()
            step()
            sync()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step()
            sync()
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20
            print(f"  {name:14s} {peak:8.1f} MiB")
            summary[f"k{args.memory_k}_{name}_peak_mib"] = round(peak, 1)
    return summary


if __name__ == "__main__":
    main()
