"""Per-relation training checkpoints: what Accelerate saves each epoch, where, and what a resumed run must share.

A checkpoint is Accelerate's state (optimizer, random states, the data loaders' epochs) plus a `TrainingState`: the
epoch, the best dev score so far, the history, and the adapter's tensors (current and best), so a checkpoint never
holds the frozen base model. It is written under a hidden staging name and published with one rename
(`peft_softmix.atomic.publish_folder`), so a kill mid-save leaves the previous epoch's checkpoint as it was.
"""

from __future__ import annotations

import shutil
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .atomic import publish_folder

__all__ = [
    "CHECKPOINT_STATE_FILE",
    "ResumeError",
    "TrainingState",
    "checkpoint_dir",
    "compare_settings",
    "latest_checkpoint",
    "resume_points",
    "save_checkpoint",
    "training_state",
]

# The file Accelerate writes for the first object registered for checkpointing: our `TrainingState`.
CHECKPOINT_STATE_FILE = "custom_checkpoint_0.pkl"


class ResumeError(ValueError):
    """A checkpoint cannot continue this run (another relation, or settings that shape the run differently)."""


class TrainingState:
    """The training state of the current relation that Accelerate checkpoints along with the optimizer and RNGs.

    It holds the adapter tensors too (current and best), so a checkpoint never contains the frozen base model.
    """

    def __init__(self) -> None:
        self.reset(None, {})

    def reset(self, relation: str | None, settings: dict[str, Any]) -> None:
        self.relation = relation
        self.settings = settings
        self.epoch = 0
        self.best_p1 = -1.0
        self.best_epoch = 0
        self.bad_epochs = 0
        self.stopped = False
        self.history: list[dict[str, float]] = []
        self.adapter: dict[str, torch.Tensor] = {}
        self.best_adapter: dict[str, torch.Tensor] = {}

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


_STATES: weakref.WeakKeyDictionary[Any, TrainingState] = weakref.WeakKeyDictionary()


def training_state(accelerator) -> TrainingState:
    """The `TrainingState` that ``accelerator`` checkpoints, registered on first use (once per Accelerator).

    Checkpoints then hold only the adapter (inside the state): the hooks drop the models' own weights, which would
    be the whole frozen base model.
    """
    state = _STATES.get(accelerator)
    if state is None:
        state = _STATES[accelerator] = TrainingState()
        accelerator.register_for_checkpointing(state)

        def save_hook(models, weights, output_dir):
            weights.clear()

        def load_hook(models, input_dir):
            models.clear()

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)
    return state


def latest_checkpoint(root: str | Path) -> Path | None:
    """The ``epoch_N`` folder with the highest N under ``root`` (None if there is none)."""
    root = Path(root)
    if not root.is_dir():
        return None
    epochs = []
    for path in root.iterdir():
        name = path.name
        if path.is_dir() and name.startswith("epoch_") and name[6:].isdigit():
            epochs.append((int(name[6:]), path))
    return max(epochs)[1] if epochs else None


def save_checkpoint(accelerator, root: str | Path, epoch: int) -> Path:
    """Save Accelerate's state to ``root/epoch_N`` through a staging folder, so a crash never leaves half of it."""
    root = Path(root)
    final = root / f"epoch_{epoch}"
    staging = root / f".epoch_{epoch}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    # every process writes its own RNG state file into the staging folder; the main process writes the rest
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        publish_folder(staging, final)
    accelerator.wait_for_everyone()
    return final


def compare_settings(
    checkpoint: str | Path, saved: Mapping[str, Any], now: Mapping[str, Any], adjustable: tuple[str, ...]
) -> dict[str, tuple[Any, Any]]:
    """Check that a checkpoint's settings match this run's; return the ``adjustable`` ones that changed.

    Settings are named as the flags (fields) that set them. A resumed run may change an adjustable setting (a lower
    learning rate after the loss diverged: the result then differs from an uninterrupted run); any other difference
    is a `ResumeError` naming each setting with its two values.
    """
    differ = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    fixed = {k: d for k, d in differ.items() if k not in adjustable}
    if fixed:
        listed = "; ".join(f"--{k}: checkpoint {old!r}, now {new!r}" for k, (old, new) in fixed.items())
        raise ResumeError(
            f"Checkpoint {checkpoint} was made with other settings ({listed}). Resume with the same arguments, or "
            "start afresh in another --output_dir."
        )
    return differ


def checkpoint_dir(output_dir: str | Path, relation: str) -> Path:
    """Where a run in ``output_dir`` keeps ``relation``'s ``epoch_N`` checkpoints."""
    return Path(output_dir) / relation / "checkpoints"


def resume_points(resume_from: str | None, output_dir: str | Path, relations: list[str]) -> dict[str, Path | None]:
    """Which checkpoint each relation resumes from (None: it starts afresh).

    ``resume_from`` is None, ``"latest"`` (each relation's last checkpoint in ``output_dir``) or one
    ``<output_dir>/<relation>/checkpoints/epoch_N`` folder (that relation resumes, the others start afresh).
    """
    points: dict[str, Path | None] = dict.fromkeys(relations)
    if resume_from == "latest":
        return {relation: latest_checkpoint(checkpoint_dir(output_dir, relation)) for relation in relations}
    if resume_from is None:
        return points
    path = Path(resume_from)
    if not (path / CHECKPOINT_STATE_FILE).is_file():
        raise ResumeError(
            f"--resume_from_checkpoint {path} is not a checkpoint of this script (no {CHECKPOINT_STATE_FILE}); give "
            "a <output_dir>/<relation>/checkpoints/epoch_N folder or 'latest'."
        )
    relation = path.resolve().parent.parent.name
    if relation not in points:
        raise ResumeError(
            f"--resume_from_checkpoint {path} belongs to relation {relation!r}, which is not in this run "
            f"({', '.join(relations)}). Add it to --relations."
        )
    points[relation] = path
    return points
